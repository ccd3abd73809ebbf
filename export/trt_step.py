"""The fixed-shape decode-step graph the TensorRT backend captures one CUDA graph from.

The artifact's ``decoder.onnx`` takes the filled past prefix, so a decode step's shapes
(and the address its new K/V go to) change with the past length, and a CUDA graph, which
bakes in shapes and addresses, serves one past length only. The step built here is the
ATC decode variant (:mod:`export.atc_decoder`): re-exported from the checkpoint with the
past fixed to ``max_seq - 1`` slots and masked by ``position_ids`` (slot j is valid iff
j < the step's position), so the past length is data and every step of every request has
the same shapes and addresses. Its I/O names are the decoder spec's; only the dims are
fixed (``seq`` = 1, ``past`` = ``max_seq - 1``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from export.trt import Profile
from trace_rt.graphs import BATCH_DIM, DECODER, GraphSpec, load_manifest, manifest_specs

STEP_ONNX = "decoder_step.onnx"


def step_dims(spec: GraphSpec, max_seq: int) -> dict[str, int]:
    """The decode step's fixed dims: one new position over ``max_seq - 1`` past slots."""
    from export.atc_runtime import decoder_roles

    roles = decoder_roles(spec)
    return {roles.seq_dim: 1, roles.past_dim: max_seq - 1, BATCH_DIM: 1}


def step_profile(spec: GraphSpec, max_seq: int) -> Profile:
    """The step engine's one profile (``decode``): every input at its fixed shape."""
    dims = step_dims(spec, max_seq)
    shapes = {}
    for t in spec.inputs:
        shape = tuple(dims[d] if isinstance(d, str) else d for d in t.shape)
        shapes[t.name] = (shape, shape, shape)
    return Profile("decode", shapes)


def write_step_onnx(checkpoint: str | Path, out: str | Path, max_seq: int, opset: int) -> str:
    """Re-export the decode step from *checkpoint* into artifact *out*; returns its file.

    The checkpoint must be the one *out* was exported from (checked by hash).
    """
    from export.atc import _finish, _fix_dims, _verify_source
    from export.atc_decoder import export_static_decoder
    from export.atc_runtime import decoder_roles
    from trace_rt.model.checkpoint import load_model

    out = Path(out)
    manifest = load_manifest(out, verify="size")
    _verify_source(Path(checkpoint), manifest)
    spec = manifest_specs(manifest)[DECODER]
    roles = decoder_roles(spec)
    model = load_model(Path(checkpoint), dtype=manifest["export"]["dtype"])
    proto = export_static_decoder(model, roles, with_past=True, opset=opset)
    proto.doc_string = "trace-rt fixed-shape decode step for TensorRT"
    _fix_dims(proto, step_dims(spec, max_seq))
    _finish(proto, out / STEP_ONNX, static=True)
    return STEP_ONNX


def step_record(max_seq: int) -> dict[str, Any]:
    """What the manifest records about the step's shapes, beside the engine record."""
    return {"fixed": {"seq": 1, "past": max_seq - 1}}
