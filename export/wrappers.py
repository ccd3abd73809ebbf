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
from trace_rt.model.mistral import Attention, DecoderLayer, apply_rope, rope_tables
from trace_rt.model.trace import TraceModel


class VisionEncoderGraph(nn.Module):
    """pixel_values [F, 3, H, W] f32 -> features [F, P, D]."""

    def __init__(self, model: TraceModel):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.model.encode_frames(pixel_values)  # [F, P, D]


class ProjectorGraph(nn.Module):
    """features [F, P, D] + time_ids [F, 6] -> video_embeds [F*(S+6), H]."""

    def __init__(self, model: TraceModel):
        super().__init__()
        self.model = model

    def forward(self, features: Tensor, time_ids: Tensor) -> Tensor:
        return self.model.project(features, time_ids)  # [F*(S+6), H]


class DecoderGraph(nn.Module):
    """inputs_embeds [1, T, H] + position_ids [1, T] + past K/V -> logits [1, V] + present K/V.

    The same layer weights as :func:`trace_rt.model.mistral.run_decoder`, but the cache is
    explicit: past K/V [1, kv, past, hd] come in, present = concat(past, new) goes out. Key
    *j* of the concatenation sits at absolute position *j*, so the causal mask is
    ``key_pos <= position_ids`` as in the model's own attention.
    """

    def __init__(self, model: TraceModel):
        super().__init__()
        self.model = model
        self.cfg = model.config

    def forward(self, inputs_embeds: Tensor, position_ids: Tensor, *past: Tensor):
        cfg = self.cfg
        pos = position_ids[0]  # [T]
        cos, sin = rope_tables(cfg.attn_head_dim, pos, cfg.rope_theta)  # [T, hd] each
        x = inputs_embeds  # [1, T, H]
        presents: list[Tensor] = []
        for i, layer in enumerate(self.model.model.layers):
            a, k, v = self._attention(layer, x, cos, sin, pos, past[2 * i], past[2 * i + 1])
            presents += [k, v]
            x = x + a
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        hidden = self.model.model.norm(x)[:, -1]  # [1, H]: only the last position is read
        return (self.model.all_logits(hidden), *presents)  # [1, V] f32, then K/V pairs

    @staticmethod
    def _attention(
        layer: DecoderLayer,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        pos: Tensor,
        past_k: Tensor,
        past_v: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        attn: Attention = layer.self_attn
        h = layer.input_layernorm(x)
        b, t, _ = h.shape
        hd, nh, nkv = attn.head_dim, attn.n_heads, attn.n_kv
        q = attn.q_proj(h).view(b, t, nh, hd).transpose(1, 2)  # [1, h, T, hd]
        k = attn.k_proj(h).view(b, t, nkv, hd).transpose(1, 2)  # [1, kv, T, hd]
        v = attn.v_proj(h).view(b, t, nkv, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k = torch.cat([past_k, k], dim=2)  # [1, kv, past+T, hd]
        v = torch.cat([past_v, v], dim=2)
        # GQA by Unsqueeze/Expand/Reshape (TensorRT-friendly; no repeat_interleave).
        rep = nh // nkv
        kk = k[:, :, None].expand(b, nkv, rep, k.shape[2], hd).reshape(b, nh, k.shape[2], hd)
        vv = v[:, :, None].expand(b, nkv, rep, v.shape[2], hd).reshape(b, nh, v.shape[2], hd)
        # Plain MatMul/Softmax attention rather than SDPA: an explicit, portable op set.
        scores = (q @ kk.transpose(-1, -2)).float() * (hd**-0.5)  # [1, h, T, past+T] f32
        key_pos = torch.arange(k.shape[2], device=x.device)
        allowed = key_pos[None, :] <= pos[:, None]  # [T, past+T]
        scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
        y = scores.softmax(-1).to(q.dtype) @ vv  # [1, h, T, hd]
        out = attn.o_proj(y.transpose(1, 2).reshape(b, t, nh * hd))  # [1, T, H]
        return out, k, v


WRAPPERS: dict[str, type[nn.Module]] = {
    VISION_ENCODER: VisionEncoderGraph,
    PROJECTOR: ProjectorGraph,
    DECODER: DecoderGraph,
}

# Example sizes for tracing: every symbolic dim gets a distinct value > 1, so that no
# dynamic size is mistaken for a constant (1) or confused with another dim.
_EXAMPLE_DIMS = {"frames": 2, "seq": 3, "past": 5}


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
            past = _EXAMPLE_DIMS["past"]
            out.append(torch.arange(past, past + shape[1])[None])  # [1, T]
        else:
            dt = getattr(torch, t.dtype)
            out.append(torch.randn(shape, generator=g).to(dt))
    return tuple(out)
