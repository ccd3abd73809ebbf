"""Static-shape decoder graphs for ATC, re-exported from the checkpoint.

Why re-export instead of fixing the dims of the artifact's ``decoder.onnx``: its
semantics need changing, not only its shapes.

- Prefill runs with an empty past (P = 0 in the dynamic graph), but ATC rejects
  zero-size dims on every non-constant tensor, so the prefill variant must have no past
  inputs at all.
- The dynamic decoder attends to *every* past row it is given (the caller passes the
  filled prefix). A static past of fixed capacity also holds unfilled slots, so the
  decode variant needs a validity mask; it is derived from ``position_ids`` (slot j
  holds position j, so slot j is valid iff j < the first new position), which keeps the
  graph's inputs exactly the spec's.
- ``--dynamic_dims`` gears over the unmasked past would need one gear per past length
  (hundreds; ATC allows at most 100) because an unmasked graph cannot be padded.

The graphs here reuse the loaded model's weights and stage methods like
``export/wrappers.py`` does; their I/O names, dtypes and layouts come from the
artifact's decoder spec (:func:`export.atc_runtime.decoder_roles`), and
``tests/test_atc.py`` checks them against the artifact's dynamic decoder.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import onnx
import torch
from torch import Tensor, nn

from export.atc_runtime import DecoderRoles
from trace_rt.graphs import BATCH_DIM
from trace_rt.model.decode import decode_with_past
from trace_rt.model.trace import TraceModel


class StaticDecoderGraph(nn.Module):
    """Decoder over a fixed-capacity, position-masked past (or none, for prefill).

    forward(inputs_embeds [1, T, H], position_ids [1, T], *past) -> (logits [1, V], new
    K/V per layer), with past and new K/V in the spec's layouts (``roles``).
    """

    def __init__(self, model: TraceModel, roles: DecoderRoles, with_past: bool):
        super().__init__()
        self.model = model
        self.roles = roles
        self.with_past = with_past

    def forward(self, inputs_embeds: Tensor, position_ids: Tensor, *past: Tensor):
        # Past slot j holds position j, so the decode step's mask is decode_with_past's
        # own rule (j < the first new position); the prefill variant has no past at all.
        pm = [self._position_major(p, self.roles.past_axis) for p in past]
        logits, new = decode_with_past(
            self.model, inputs_embeds, position_ids, pm if self.with_past else None
        )
        return (logits, *(self._spec_layout(kv) for kv in new))

    @staticmethod
    def _position_major(p: Tensor, axis: int) -> Tensor:
        """The spec's past layout (batch 1) -> [L, 1, kv, hd]."""
        return p if axis == 0 else p.transpose(0, axis)

    def _spec_layout(self, kv: Tensor) -> Tensor:
        """[T, 1, kv, hd] -> the spec's output layout."""
        axis = self.roles.new_axis
        return kv if axis == 0 else kv.transpose(0, axis)


# Tracing sizes: small, so tracing a 7B prefill does not run a 2k-token forward on the CPU,
# and unlike the sizes the variants get, so a size baked in by the tracer fails the tests.
_EXAMPLE_SEQ, _EXAMPLE_PAST = 3, 5


def export_static_decoder(
    model: TraceModel,
    roles: DecoderRoles,
    *,
    with_past: bool,
    opset: int,
    dynamic_seq: bool = False,
) -> onnx.ModelProto:
    """Trace the prefill (``with_past=False``) or decode-step variant; returns its proto.

    The variable dim stays symbolic (the spec's seq dim for prefill, its past dim for
    the decode step, whose seq is 1); the caller fixes it, or keeps it for
    ``--dynamic_dims`` gears. ``dynamic_seq`` (with a past): the seq dim stays symbolic
    too, traced with several new positions, so the graph also runs a prefill over the
    masked past (TensorRT's fixed-past decoder, export/trt_step.py).
    """
    cfg = model.config
    dt = next(model.parameters()).dtype
    g = torch.Generator().manual_seed(0)
    seq = 1 if with_past and not dynamic_seq else _EXAMPLE_SEQ
    start = _EXAMPLE_PAST if with_past else 0  # a step right after a full example past
    args: list[Tensor] = [
        torch.randn(1, seq, cfg.hidden_size, generator=g).to(dt),
        torch.arange(start, start + seq)[None],
    ]
    inputs = [roles.embeds.name, roles.positions.name]
    outputs = [roles.logits.name, *(t.name for pair in roles.new for t in pair)]
    if with_past:
        axes = {}
        for k_spec, v_spec in roles.past:
            for spec in (k_spec, v_spec):
                shape = [1 if d == BATCH_DIM else d for d in spec.shape]
                shape[roles.past_axis] = _EXAMPLE_PAST
                args.append(torch.randn(shape, generator=g).to(dt))
                inputs.append(spec.name)
                axes[spec.name] = {roles.past_axis: roles.past_dim}
        if dynamic_seq:
            axes |= {name: {1: roles.seq_dim} for name in inputs[:2]}
            axes |= {name: {roles.new_axis: roles.seq_dim} for name in outputs[1:]}
    else:
        axes = {name: {1: roles.seq_dim} for name in inputs}
        axes |= {name: {roles.new_axis: roles.seq_dim} for name in outputs[1:]}
    wrapper = StaticDecoderGraph(model, roles, with_past=with_past).eval()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_file = Path(tmp) / "decoder.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer notes on Python ints from shapes
            torch.onnx.export(
                wrapper,
                tuple(args),
                str(tmp_file),
                input_names=inputs,
                output_names=outputs,
                dynamic_axes=axes,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        proto = onnx.load(str(tmp_file))  # pulls in any external data torch wrote
    return proto
