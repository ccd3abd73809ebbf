"""Export wrappers: nn.Modules whose forward is exactly one graph's I/O spec.

The model files stay plain modules; what the graphs need beyond them (explicit past/present
K/V instead of the model's in-place cache, the last position only, all heads' logits) lives
here. Each wrapper holds the loaded :class:`TraceModel` and reuses its weights and stage
methods, so a graph is the PyTorch stage it is tested against.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from trace_rt.graphs import DECODER, PROJECTOR, VISION_ENCODER, GraphSpec
from trace_rt.model.decode import decode_with_past
from trace_rt.model.trace import TraceModel


class VisionEncoderGraph(nn.Module):
    """pixel_values [F, 3, H, W] f32 -> features [F, P, D].

    bf16: ONNX's Conv takes bfloat16 only from opset 22 (the TorchScript exporter stops at
    20), so a bf16 model's patch-embedding convolutions run in f32 here (bf16 weights widen
    exactly; the output is rounded back to bf16): a Cast either side of one small Conv.
    """

    def __init__(self, model: TraceModel):
        super().__init__()
        self.model = model
        for parent in model.modules():
            for name, child in parent.named_children():
                if isinstance(child, nn.Conv2d) and child.weight.dtype == torch.bfloat16:
                    setattr(parent, name, _Fp32Conv(child))

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.model.encode_frames(pixel_values)  # [F, P, D]


class _Fp32Conv(nn.Module):
    """A bf16 Conv2d computed in f32 (see :class:`VisionEncoderGraph`)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv.float()  # the model is loaded for this export only

    @property
    def weight(self) -> Tensor:
        # The CLIP embeddings read the conv's dtype to cast the pixels (to bf16, kept).
        return torch.empty(0, dtype=torch.bfloat16)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x.float()).to(torch.bfloat16)


class ProjectorGraph(nn.Module):
    """features [F, P, D] + time_ids [F, 6] -> video_embeds [F*(S+6), H]."""

    def __init__(self, model: TraceModel):
        super().__init__()
        self.model = model

    def forward(self, features: Tensor, time_ids: Tensor) -> Tensor:
        return self.model.project(features, time_ids)  # [F*(S+6), H]


class DecoderGraph(nn.Module):
    """inputs_embeds [B, T, H] + position_ids [B, T] + past K/V -> logits [B, V] + new K/V.

    The batched, explicit-cache step of :mod:`trace_rt.model.decode` (the torch backend
    runs the same function): ``past_key.{i}`` / ``past_value.{i}`` [P, B, kv, hd]
    (position-major, why: trace_rt/graphs.py) are the first P positions of the runtime's
    pooled buffers; the graph returns only the T new positions' (post-RoPE) ``key.{i}`` /
    ``value.{i}`` [T, B, kv, hd], which the runtime writes at each row's offset. Row b
    attends past slot j iff j < ``position_ids[b, 0]``, so rows of different lengths share
    one step (ragged lengths are data, not shapes).
    """

    def __init__(self, model: TraceModel):
        super().__init__()
        self.model = model

    def forward(self, inputs_embeds: Tensor, position_ids: Tensor, *past: Tensor):
        logits, new_kv = decode_with_past(self.model, inputs_embeds, position_ids, past)
        return (logits, *new_kv)  # [B, V] f32, then K/V pairs [T, B, kv, hd]


WRAPPERS: dict[str, type[nn.Module]] = {
    VISION_ENCODER: VisionEncoderGraph,
    PROJECTOR: ProjectorGraph,
    DECODER: DecoderGraph,
}

# Example sizes for tracing: every symbolic dim gets a distinct value > 1, so that no
# dynamic size is mistaken for a constant (1) or confused with another dim.
_EXAMPLE_DIMS = {"frames": 2, "seq": 3, "past": 5, "batch": 2}


def example_inputs(spec: GraphSpec, model: TraceModel) -> tuple[Tensor, ...]:
    """Deterministic example inputs matching *spec* (for torch.onnx.export's tracing)."""
    g = torch.Generator().manual_seed(0)
    cfg = model.config
    out: list[Tensor] = []
    for t in spec.inputs:
        shape = [_EXAMPLE_DIMS[d] if isinstance(d, str) else d for d in t.shape]
        if t.name == "time_ids":
            out.append(torch.randint(0, cfg.time_vocab_size, shape, generator=g))
        elif t.name == "position_ids":
            # Rows at different past lengths (both within the example past).
            past = _EXAMPLE_DIMS["past"]
            starts = torch.arange(shape[0]).clamp(max=past)[:, None]  # [B, 1]
            out.append(starts + past - shape[0] + 1 + torch.arange(shape[1])[None])  # [B, T]
        else:
            dt = getattr(torch, t.dtype)
            out.append(torch.randn(shape, generator=g).to(dt))
    return tuple(out)
