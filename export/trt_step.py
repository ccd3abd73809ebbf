"""The fixed-shape decode-step graph the TensorRT backend captures one CUDA graph from.

The artifact's ``decoder.onnx`` takes the filled past prefix, so a decode step's shapes
(and the address its new K/V go to) change with the past length, and a CUDA graph, which
bakes in shapes and addresses, serves one past length only. The step built here is the
ATC decode variant (:mod:`export.atc_decoder`): re-exported from the checkpoint with the
past fixed to ``max_seq - 1`` slots and masked by ``position_ids`` (slot j is valid iff
j < the step's position), so the past length is data and every step of every request has
the same shapes and addresses. Its I/O names are the decoder spec's; only the dims are
fixed (``seq`` = 1, ``past`` = ``max_seq - 1``).

Two halves, so that the board that builds the engines needs no torch:

- :func:`make_step` (``python -m export step ART --checkpoint CKPT --max-seq N``, on a
  machine with torch and onnx) re-exports the step into the artifact as
  ``decoder_step.onnx`` and quantises it like each QDQ decoder variant the artifact has
  (``decoder_step.int4.qdq.onnx`` for ``int4-qdq``: the same weights, selection, scheme and
  block size, so the step and the dynamic decoder compute with the same quantised weights).
  ``python -m export quantize`` run later quantises the recorded step too. All of it is
  recorded under ``manifest["decode_step"]``::

      "decode_step": {"file": "decoder_step.onnx", "files": {name: {role, sha256, bytes}},
                      "max_seq": N, "fixed": {"seq": 1, "past": N - 1},
                      "source": {"decoder.onnx": sha256, ...},
                      "variants": {"int4-qdq": {"file": ..., "files": ...,
                                                "source": {variant file: sha256, ...},
                                                "quantized": 14}}}

- :func:`step_onnx` (``python -m export trt``, torch-free) picks the recorded step (or its
  variant for a quantised build) after checking that its files and sources still match.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from export.trt import (
    BuildPlan,
    Limits,
    Profile,
    TensorRTBuildError,
    profile_of,
    profiles_from_spec,
)
from trace_rt.backends import tensorrt_manifest as tm
from trace_rt.graphs import (
    BATCH_DIM,
    DECODER,
    EXTERNAL_DATA_THRESHOLD,
    MANIFEST_FILE,
    GraphSpec,
    load_manifest,
    manifest_specs,
    sha256_file,
)

STEP_ONNX = "decoder_step.onnx"
SECTION = "decode_step"
_BITS = {"int4": 4, "int8": 8, "float8e4m3fn": "fp8"}  # a variant's weight_type -> bits


def step_dims(spec: GraphSpec, max_seq: int) -> dict[str, int]:
    """The decode step's fixed dims: one new position over ``max_seq - 1`` past slots."""
    from export.atc_runtime import decoder_roles

    roles = decoder_roles(spec)
    return {roles.seq_dim: 1, roles.past_dim: max_seq - 1, BATCH_DIM: 1}


def step_profile(spec: GraphSpec, max_seq: int) -> Profile:
    """The step engine's one profile (``decode``): every input at its fixed shape."""
    dims = step_dims(spec, max_seq)
    return profile_of("decode", spec, {d: (n, n, n) for d, n in dims.items()})


def fixed_past_profiles(spec: GraphSpec, limits: Limits) -> list[Profile]:
    """The fixed-past decoder's profiles (``export trt --fixed-past``): ``prefill`` (seq
    as :meth:`Limits.ranges` gives it) and ``decode`` (seq 1), both over the fixed
    ``max_seq - 1`` past slots, batch 1."""
    past = (limits.max_seq - 1,) * 3
    out = []
    for phase in ("prefill", "decode"):
        ranges = {**limits.ranges(phase), "past": past, BATCH_DIM: (1, 1, 1)}
        out.append(profile_of(phase, spec, ranges))
    return out


def write_step_onnx(checkpoint: str | Path, out: str | Path, max_seq: int, opset: int) -> str:
    """Re-export the decode step from *checkpoint* into artifact *out*; returns its file.

    The checkpoint must be the one *out* was exported from (checked by hash). Not recorded
    in the manifest: :func:`make_step` does that.
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
    # seq stays symbolic: the same graph runs a decode step (seq 1) or, as the fixed-past
    # decoder (`export trt --fixed-past`), a prefill over the masked cache.
    proto = export_static_decoder(model, roles, with_past=True, opset=opset, dynamic_seq=True)
    proto.doc_string = "trace-rt fixed-past decoder (decode step) for TensorRT"
    dims = step_dims(spec, max_seq)
    del dims[roles.seq_dim]
    _fix_dims(proto, dims)
    _finish(proto, out / STEP_ONNX, static=False)
    return STEP_ONNX


def make_step(checkpoint: str | Path, out: str | Path, max_seq: int) -> dict[str, Any]:
    """Write the step (and its quantised forms) into *out* and record it; returns the record.

    Needs torch and onnx (the re-export); every QDQ decoder variant of *out* gets its step.
    """
    from trace_rt.config import TraceConfig

    out = Path(out)
    manifest = load_manifest(out, verify="size")
    limit = TraceConfig.from_dir(out).max_position_embeddings
    if not 2 <= max_seq <= limit:
        raise TensorRTBuildError(f"--max-seq {max_seq} is outside 2..{limit} (the context)")
    opset = int(manifest["export"].get("opset", 17))
    file = write_step_onnx(checkpoint, out, max_seq, opset)
    record = {
        "file": file,
        "files": _file_records(out, file),
        "max_seq": max_seq,
        "fixed": {"seq": 1, "past": max_seq - 1},
        "source": _decoder_source(manifest),
        "variants": {},
    }
    _write_record(out, record)
    for name in qdq_variants(manifest):
        quantize_step(out, name)
    return json.loads((out / MANIFEST_FILE).read_text())[SECTION]


def quantize_step(out: str | Path, name: str) -> dict[str, Any]:
    """Quantise *out*'s recorded step like its QDQ decoder variant *name*; returns the
    variant's record (also written to the manifest)."""
    import onnx

    from export.quantize import (
        _save,
        quantise_nodes,
        select_weights,
        variant_file,
    )
    from trace_rt.variants import recorded_head_bits

    out = Path(out)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    step = _recorded(manifest, out)
    rec = manifest["variants"][DECODER][name]
    if rec.get("form") != "qdq":
        raise TensorRTBuildError(f"decoder variant {name!r} is not a QDQ (TensorRT) variant")
    bits = _BITS[rec["weight_type"]]
    model = onnx.load(str(out / step["file"]))
    lm_bits = recorded_head_bits(rec["weights"], bits)
    chosen, _, lm = select_weights(model, lm_head=lm_bits is not None)
    block = int(rec.get("block_size") or 32)
    model, done = quantise_nodes(model, chosen, lm, "qdq", bits, lm_bits, block, 0)
    if len(done) != len(rec["weights"]["quantized"]):
        # The same model, selection rule and scheme must pick the same layers.
        raise TensorRTBuildError(
            f"the decode step quantised {len(done)} MatMuls, decoder variant {name!r} "
            f"{len(rec['weights']['quantized'])}: they would compute with different weights"
        )
    file = variant_file(bits, "qdq").replace(f"{DECODER}.", "decoder_step.", 1)
    files = _save(model, out, file, EXTERNAL_DATA_THRESHOLD)
    variant = {"file": file, "files": files, "source": _files_sha(rec), "quantized": len(done)}
    step["variants"][name] = variant
    _write_record(out, step)
    return variant


def step_onnx(manifest: dict[str, Any], out: Path, max_seq: int, variant: str | None) -> str | None:
    """The recorded step's ONNX file for a build at *max_seq* with decoder *variant*;
    None when the artifact has no step. Torch-free.

    Raises:
        TensorRTBuildError: the step was made for another max_seq, lacks the variant, or
            its files or sources changed since (each naming the command that fixes it).
    """
    step = manifest.get(SECTION)
    if step is None:
        return None
    redo = f"re-make it: `python -m export step {out} --checkpoint CKPT --max-seq {max_seq}`"
    if step["max_seq"] != max_seq:
        raise TensorRTBuildError(
            f"{out}: the decode step was made for --max-seq {step['max_seq']}, this build is "
            f"for {max_seq}: pass --max-seq {step['max_seq']}, {redo}, or --no-step"
        )
    if step["source"] != _decoder_source(manifest):
        raise TensorRTBuildError(f"{out}: the decoder changed since the decode step; {redo}")
    rec = step
    if variant is not None:
        rec = step["variants"].get(variant)
        if rec is None:
            raise TensorRTBuildError(
                f"{out}: the decode step has no {variant!r} form ({sorted(step['variants'])}); "
                f"{redo} after `python -m export quantize`, or pass --no-step"
            )
        if rec["source"] != _files_sha(manifest["variants"][DECODER][variant]):
            raise TensorRTBuildError(
                f"{out}: decoder variant {variant!r} changed since its decode step; "
                f"re-run `python -m export quantize {out}` (it re-quantises the step)"
            )
    for rel, f in rec["files"].items():
        path = out / rel
        if not path.is_file() or path.stat().st_size != f["bytes"]:
            raise TensorRTBuildError(f"{out}: {rel} is missing or changed; {redo}")
    return rec["file"]


def step_file_for_build(
    out: Path,
    plans: dict[str, BuildPlan],
    limits: Limits,
    graphs: Sequence[str],
    checkpoint: str | Path | None,
    step: bool,
    fixed_past: bool,
) -> str | None:
    """The recorded decode step graph to build (made first from *checkpoint* if given),
    in the decoder's variant; None when there is none or it is not wanted."""
    step_file = None
    if step and DECODER in graphs:
        if checkpoint is not None:
            make_step(checkpoint, out, limits.max_seq)
        manifest = load_manifest(out, verify="size")
        step_file = step_onnx(manifest, out, limits.max_seq, plans[DECODER].variant)
    if fixed_past:
        _check_fixed_past(step_file, limits, out, graphs)
    return step_file


def engine_plan(
    name: str,
    plans: dict[str, BuildPlan],
    specs: dict[str, GraphSpec],
    limits: Limits,
    step_file: str | None,
    fixed_past: bool,
) -> tuple[BuildPlan, GraphSpec, list[Profile], dict[str, int] | None]:
    """(plan, I/O spec, profiles, fixed dims to record) of engine *name*: a graph, the
    decode step (the decoder's I/O, seq 1 over the fixed past) or the fixed-past decoder."""
    spec, past = specs.get(name, specs[DECODER]), limits.max_seq - 1
    if name == tm.STEP:
        plan = replace(plans[DECODER], onnx=step_file)
        return plan, spec, [step_profile(spec, limits.max_seq)], {"seq": 1, "past": past}
    if name == DECODER and fixed_past:
        return plans[name], spec, fixed_past_profiles(spec, limits), {"past": past}
    return plans[name], spec, profiles_from_spec(spec, limits), None


def _check_fixed_past(
    step_file: str | None, limits: Limits, out: Path, graphs: Sequence[str]
) -> None:
    """A fixed-past build needs the recorded step graph and one sequence."""
    if DECODER not in graphs:
        raise TensorRTBuildError("--fixed-past builds the decoder: include it in the graphs")
    if step_file is None:
        raise TensorRTBuildError(
            f"--fixed-past builds the decoder from the decode step graph: make it with "
            f"`python -m export step {out} --checkpoint CKPT --max-seq {limits.max_seq}` "
            "(or pass --checkpoint)"
        )
    if limits.max_batch != 1:
        raise TensorRTBuildError("--fixed-past decodes one sequence: pass --max-batch 1")


def qdq_variants(manifest: dict[str, Any]) -> list[str]:
    """Names of the artifact's QDQ decoder variants (the ones TensorRT builds)."""
    variants = manifest.get("variants", {}).get(DECODER, {})
    return sorted(n for n, r in variants.items() if r.get("form") == "qdq")


def _decoder_source(manifest: dict[str, Any]) -> dict[str, str]:
    """sha256 of each of ``decoder.onnx``'s files (its external data too: the graph file
    alone may not change when only the weights do)."""
    return {f: manifest["files"][f]["sha256"] for f in manifest["graphs"][DECODER]["files"]}


def _files_sha(rec: dict[str, Any]) -> dict[str, str]:
    return {f: r["sha256"] for f, r in rec["files"].items()}


def _recorded(manifest: dict[str, Any], out: Path) -> dict[str, Any]:
    step = manifest.get(SECTION)
    if step is None:
        raise TensorRTBuildError(
            f"{out}: no decode step recorded; make it with `python -m export step {out} "
            "--checkpoint CKPT --max-seq N`"
        )
    return step


def _file_records(out: Path, file: str) -> dict[str, dict[str, Any]]:
    files = [file] + ([f"{file}.data"] if (out / f"{file}.data").is_file() else [])
    roles = {file: "graph", f"{file}.data": "external_data"}
    return {
        f: {"role": roles[f], "sha256": sha256_file(out / f), "bytes": (out / f).stat().st_size}
        for f in files
    }


def _write_record(out: Path, record: dict[str, Any]) -> None:
    from export.files import write_json

    path = out / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    manifest[SECTION] = record
    write_json(path, manifest)
