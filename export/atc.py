"""``python -m export atc``: static-shape ONNX variants and ``atc`` command lines for Ascend.

From an artifact directory written by ``python -m export onnx`` this writes ``atc/``::

    vision_encoder.onnx   frames fixed to N (the artifact's graph, dims fixed)
    projector.onnx        frames fixed to N (likewise)
    decoder_prefill.onnx  seq fixed to P = video block of N frames + text budget; no past
    decoder_decode.onnx   seq 1, past fixed to max_seq - 1 slots, masked by position
    convert.sh            one ``atc`` line per variant (needs the CANN toolkit)

and records the variants (files, sha256, input shapes, commands) as ``manifest["atc"]``.
How a runtime drives the decoder variants (padding, masking, buffers): see
``export/atc_runtime.py``; why the decoder is re-exported from the checkpoint rather
than dim-fixed: ``export/atc_decoder.py``.

What ATC wants, from Huawei's ATC documentation (CANN 7-9 ``atc`` parameter pages):
``--framework=5`` reads ONNX (per-op opset support; CANN 7 lists opsets 9-18, so the
default opset 17 export is in range, older CANN may need ``export onnx --opset 15``);
``--input_shape`` names each graph input with its dims and must be static unless
``--dynamic_dims`` lists 2..100 "gears", whose values fill the ``-1`` placeholders of
``--input_shape`` in order, together with ``--input_format=ND``; every non-constant tensor
must have non-zero dims (hence no empty past at prefill); ``--soc_version`` is the exact
chip name ``npu-smi info`` reports, prefixed with "Ascend" (e.g. Ascend910B3,
Ascend310P3); ``--output`` is a path prefix to which ``.om`` is appended;
``--precision_mode`` trades accuracy for speed: ``force_fp16`` (the inference default)
runs everything in fp16, ``allow_fp32_to_fp16`` runs matrix ops in fp16 but keeps vector
ops (softmax, norms) in fp32 where the chip has them, ``must_keep_origin_dtype`` keeps the
graph's dtypes. Our default is ``allow_fp32_to_fp16``: TRACE's digit heads are sensitive.
"""

from __future__ import annotations

import argparse
import json
import re
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from export.atc_plan import Plan
from export.atc_runtime import AtcError, DecoderRoles, concrete, decoder_roles
from export.files import replace_text, replace_with_copy, save_onnx, write_json
from trace_rt.config import TraceConfig
from trace_rt.errors import CheckpointError, InputError
from trace_rt.graphs import (
    BATCH_DIM,
    DECODER,
    EXTERNAL_DATA_THRESHOLD,
    MANIFEST_FILE,
    PROJECTOR,
    VISION_ENCODER,
    GraphSpec,
    TensorSpec,
    load_manifest,
    manifest_specs,
    sha256_file,
)

ATC_DIR = "atc"
SCRIPT = "convert.sh"
OM_DIR = "om"
DEFAULT_TEXT_BUDGET = 256  # TRACE's prompts are 160-210 text ids plus the query
DEFAULT_PRECISION = "allow_fp32_to_fp16"
PRECISION_MODES = (
    "allow_fp32_to_fp16",
    "must_keep_origin_dtype",
    "force_fp16",
    "force_fp32",
    "allow_mix_precision",
)
_SOC_RE = re.compile(r"^Ascend[0-9A-Za-z_]+$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.]+$")  # names we put unquoted into --input_shape


@dataclass(frozen=True)
class Variant:
    """One ONNX file for ATC: its I/O as converted and its ``--dynamic_dims`` gears."""

    name: str
    graph: str  # the artifact graph it stands for
    file: str  # relative to atc/
    inputs: tuple[TensorSpec, ...]  # dims as given to --input_shape (str = a gear dim)
    outputs: tuple[TensorSpec, ...]
    gear_dim: str | None = None  # the symbolic dim the gears set
    gears: tuple[int, ...] = ()
    input_format: str = "ND"

    def input_shape_arg(self) -> str:
        """``name:d,d;...`` with -1 for the gear dim."""
        parts = []
        for t in self.inputs:
            dims = ",".join("-1" if isinstance(d, str) else str(d) for d in t.shape)
            parts.append(f"{t.name}:{dims}")
        return ";".join(parts)

    def dynamic_dims_arg(self) -> str | None:
        """One gear per ``;``: the gear value repeated for each -1 of --input_shape."""
        if not self.gears:
            return None
        n = sum(isinstance(d, str) for t in self.inputs for d in t.shape)
        return ";".join(",".join([str(g)] * n) for g in self.gears)

    def command(self, soc_version: str, precision_mode: str) -> str:
        args = [
            "atc",
            f"--model={self.file}",
            "--framework=5",
            f"--output={OM_DIR}/{self.name}",
            f"--soc_version={soc_version}",
            f"--input_format={self.input_format}",
            f'--input_shape="{self.input_shape_arg()}"',
        ]
        if self.gears:
            args.append(f'--dynamic_dims="{self.dynamic_dims_arg()}"')
        args += [f"--precision_mode={precision_mode}", "--log=error"]
        return " ".join(args)


def export_atc(
    artifact: str | Path,
    *,
    checkpoint: str | Path,
    soc_version: str,
    frames: int | None = None,
    max_seq: int | None = None,
    text_budget: int = DEFAULT_TEXT_BUDGET,
    dynamic_dims: bool = False,
    precision_mode: str = DEFAULT_PRECISION,
    verify_checkpoint: bool = True,
) -> Path:
    """Write ``<artifact>/atc/`` (variants + convert.sh) and ``manifest["atc"]``; returns atc/.

    Args:
        artifact: artifact directory written by ``python -m export onnx``.
        checkpoint: the checkpoint the artifact was exported from (the decoder variants
            are re-exported from it; its files are checked against the manifest).
        soc_version: ATC ``--soc_version``, e.g. ``Ascend910B3`` or ``Ascend310P3``.
        frames: frames per request the variants are fixed to (default: the config's).
        max_seq: positions a request may reach, prompt and generated tokens together
            (default: prefill length + 512, within the model's context).
        text_budget: text ids of the prompt the prefill variant has room for.
        dynamic_dims: keep the prefill's seq and the decode step's past length symbolic
            and list ``--dynamic_dims`` gears for them instead of fixing them.
        precision_mode: ATC ``--precision_mode``.
        verify_checkpoint: sha256-check the checkpoint against the manifest.

    Raises:
        InputError: a bad option. AtcError / CheckpointError: the artifact or checkpoint
        does not fit (named reason).
    """
    root, checkpoint = Path(artifact), Path(checkpoint)
    _check_options(soc_version, precision_mode)
    manifest = load_manifest(root, verify="size")
    cfg = TraceConfig.from_dir(root)
    specs = manifest_specs(manifest)
    roles = decoder_roles(specs[DECODER])
    plan = Plan.make(cfg, frames, max_seq, text_budget, dynamic_dims)
    if verify_checkpoint:
        _verify_source(checkpoint, manifest)

    out = root / ATC_DIR
    out.mkdir(exist_ok=True)
    for old in [*out.glob("*.onnx"), *out.glob("*.onnx.data"), out / SCRIPT]:
        old.unlink(missing_ok=True)
    opset = int(manifest["export"]["opset"])
    variants = [
        _fixed_frames(root, out, specs[VISION_ENCODER], plan.frames, "NCHW"),
        _fixed_frames(root, out, specs[PROJECTOR], plan.frames, "ND"),
        *_decoder_variants(checkpoint, manifest, roles, out, plan, opset),
    ]
    commands = [v.command(soc_version, precision_mode) for v in variants]
    _write_script(out / SCRIPT, commands, soc_version)
    manifest = json.loads((root / MANIFEST_FILE).read_text())  # re-read: others may write
    manifest["atc"] = {
        "soc_version": soc_version,
        "precision_mode": precision_mode,
        **plan.to_dict(),
        "opset": opset,
        "script": f"{ATC_DIR}/{SCRIPT}",
        "protocol": "export/atc_runtime.py: right-padded prefill of the first n-1 prompt "
        "positions, then decode steps; past slot j holds position j and is valid iff "
        "j < position_ids[0, 0]",
        "converted": False,  # convert.sh was not run here: no CANN toolkit, no NPU
        "variants": {
            v.name: _variant_record(out, v, cmd) for v, cmd in zip(variants, commands, strict=True)
        },
    }
    write_json(root / MANIFEST_FILE, manifest)
    return out


def _check_options(soc_version: str, precision_mode: str) -> None:
    if not _SOC_RE.match(soc_version):
        raise InputError(
            f"--soc-version {soc_version!r}: expected the chip name ATC uses, 'Ascend' + the "
            "Chip Name from `npu-smi info` (e.g. Ascend910B3, Ascend310P3)"
        )
    if precision_mode not in PRECISION_MODES:
        raise InputError(f"--precision-mode {precision_mode!r}: use one of {PRECISION_MODES}")


def _variant_record(out: Path, v: Variant, command: str) -> dict[str, Any]:
    return {
        "graph": v.graph,
        "file": f"{ATC_DIR}/{v.file}",
        "files": _hashes(out, v.file),
        "sha256": sha256_file(out / v.file),
        "inputs": [t.to_dict() for t in v.inputs],
        "outputs": [t.to_dict() for t in v.outputs],
        "input_format": v.input_format,
        "gear_dim": v.gear_dim,
        "gears": list(v.gears),
        "om": f"{ATC_DIR}/{OM_DIR}/{v.name}.om",
        "command": command,
    }


def _verify_source(checkpoint: Path, manifest: dict[str, Any]) -> None:
    for rel, want in manifest["source"]["files"].items():
        f = checkpoint / rel
        if not f.is_file() or sha256_file(f) != want:
            raise CheckpointError(
                f"{checkpoint}: {rel} is missing or differs from the checkpoint this artifact "
                f"was exported from ({manifest['source']['name']}); pass that checkpoint"
            )


# ---- vision encoder and projector: the artifact's graphs with the frame dim fixed -------
def _fixed_frames(root: Path, out: Path, spec: GraphSpec, frames: int, fmt: str) -> Variant:
    """Fix the graph's one symbolic input dim (the frame count); :func:`_finish` does the rest.

    Only the dims change, so the artifact's graph is reused as is (same weights, no torch).
    """
    sym = {d for t in spec.inputs for d in t.shape if isinstance(d, str)}
    if len(sym) != 1:
        raise AtcError(f"{spec.name}: expected one symbolic input dim (frames), got {sym}")
    dims = {sym.pop(): frames}
    proto = onnx.load(str(root / spec.file))
    _fix_dims(proto, dims)
    proto = _finish(proto, out / spec.file, static=True)
    inputs = tuple(TensorSpec(t.name, t.dtype, concrete(t.shape, dims)) for t in spec.inputs)
    outputs = tuple(
        TensorSpec(o.name, t.dtype, tuple(d.dim_value for d in o.type.tensor_type.shape.dim))
        for o, t in zip(proto.graph.output, spec.outputs, strict=True)
    )
    return Variant(spec.name, spec.name, spec.file, inputs, outputs, input_format=fmt)


def _fix_dims(proto: onnx.ModelProto, dims: dict[str, int]) -> None:
    """Give the inputs' symbolic *dims* their values; drop the now stale output shapes
    (:func:`_finish` infers them again, with the intermediates')."""
    for vi in proto.graph.input:
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param in dims:
                d.dim_value = dims[d.dim_param]  # setting the value clears the param
    for vi in proto.graph.output:
        vi.type.tensor_type.ClearField("shape")
    del proto.graph.value_info[:]


def _finish(proto: onnx.ModelProto, path: Path, static: bool) -> onnx.ModelProto:
    """Fold shape arithmetic into constants, re-infer shapes and save to *path*.

    The exported graphs compute many sizes at run time (Shape -> Gather -> Concat ->
    Reshape); with static inputs those are constants, and folding them leaves ATC a
    graph whose every tensor has a static shape (its docs rule out intermediate dynamic
    shapes with gears). onnxruntime's BASIC level is used for this: constant folding
    and redundant-node removal only, standard ONNX ops out (the test checks the op
    domains), nothing specific to a CPU or an execution provider.
    """
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        raw, opt = Path(tmp) / "raw.onnx", Path(tmp) / path.name
        _save(proto, raw)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(opt)
        so.log_severity_level = 3
        big = (Path(tmp) / "raw.onnx.data").is_file()
        if big:  # weights past protobuf's limit go to <name>.data again
            so.add_session_config_entry(
                "session.optimized_model_external_initializers_file_name", f"{path.name}.data"
            )
            so.add_session_config_entry(
                "session.optimized_model_external_initializers_min_size_in_bytes", "1024"
            )
        ort.InferenceSession(str(raw), so, providers=["CPUExecutionProvider"])
        folded = onnx.load(str(opt), load_external_data=False)
        # onnxruntime declares its own domains; keep only those the nodes use.
        used = {n.domain for n in folded.graph.node} | {""}
        keep = [o for o in folded.opset_import if o.domain in used]
        del folded.opset_import[:]
        folded.opset_import.extend(keep)
        del folded.graph.value_info[:]
        folded.doc_string = proto.doc_string
        onnx.save_model(folded, str(opt))
        onnx.shape_inference.infer_shapes_path(str(opt), str(opt), strict_mode=True, data_prop=True)
        folded = onnx.load(str(opt), load_external_data=False)
        if static and not _static([*folded.graph.output, *folded.graph.value_info]):
            raise AtcError(f"{path.name}: shapes remain symbolic after folding")
        for f in (opt.with_name(f"{path.name}.data"), opt):
            if f.is_file():  # copied beside the target, then renamed over it
                replace_with_copy(f, path.parent / f.name)
    return folded


def _static(values: Any) -> bool:
    """Every tensor in *values* (ValueInfoProtos) has a known, fully static shape."""
    for vi in values:
        t = vi.type.tensor_type
        if not t.HasField("shape") or any(not d.HasField("dim_value") for d in t.shape.dim):
            return False
    return True


# ---- decoder: re-exported from the checkpoint --------------------------------------------
def _decoder_variants(
    checkpoint: Path,
    manifest: dict[str, Any],
    roles: DecoderRoles,
    out: Path,
    plan: Plan,
    opset: int,
) -> list[Variant]:
    from export.atc_decoder import export_static_decoder
    from trace_rt.model.checkpoint import load_model

    model = load_model(checkpoint, dtype=manifest["export"]["dtype"])
    new = [t for pair in roles.new for t in pair]
    past = [t for pair in roles.past for t in pair]
    variants = []
    for name, seq, cap, gear_dim, gears in (
        ("decoder_prefill", plan.prefill_gears[-1], None, roles.seq_dim, plan.prefill_gears),
        ("decoder_decode", 1, plan.past_gears[-1], roles.past_dim, plan.past_gears),
    ):
        keep = gear_dim if plan.dynamic_dims else None
        dims = {roles.seq_dim: seq, roles.past_dim: cap or 0, BATCH_DIM: 1}
        if keep:
            dims.pop(keep)
        io_in = [roles.embeds, roles.positions, *(past if cap else [])]
        variant = Variant(
            name=name,
            graph=DECODER,
            file=f"{name}.onnx",
            inputs=tuple(TensorSpec(t.name, t.dtype, concrete(t.shape, dims)) for t in io_in),
            outputs=tuple(
                TensorSpec(t.name, t.dtype, concrete(t.shape, dims)) for t in (roles.logits, *new)
            ),
            gear_dim=keep,
            gears=gears if keep else (),
        )
        for t in variant.inputs:
            if not _NAME_RE.match(t.name):
                raise AtcError(f"decoder input name {t.name!r} cannot go into --input_shape")
        proto = export_static_decoder(model, roles, with_past=cap is not None, opset=opset)
        proto.doc_string = f"trace-rt {name} for ATC"
        if not keep:
            _fix_dims(proto, dims)
        _finish(proto, out / variant.file, static=not keep)
        variants.append(variant)
    return variants


# ---- files -------------------------------------------------------------------------------
def _save(proto: onnx.ModelProto, path: Path) -> None:
    """Save like ``export onnx`` does: external data past the protobuf limit, new files."""
    save_onnx(proto, path, EXTERNAL_DATA_THRESHOLD)


def _hashes(out: Path, file: str) -> dict[str, str]:
    files = [file] + ([f"{file}.data"] if (out / f"{file}.data").is_file() else [])
    return {f"{ATC_DIR}/{f}": sha256_file(out / f) for f in files}


def _write_script(path: Path, commands: list[str], soc_version: str) -> None:
    lines = [
        "#!/usr/bin/env bash",
        "# Converts trace-rt's ATC variants into Ascend offline models under om/.",
        f"# Written by `python -m export atc` for {soc_version}; it has NOT been run where it",
        "# was written (no CANN toolkit, no Ascend NPU there).",
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
        "if ! command -v atc >/dev/null 2>&1; then",
        "  echo \"convert.sh: 'atc' is not on PATH; install the CANN toolkit and source its"
        ' set_env.sh (e.g. /usr/local/Ascend/ascend-toolkit/set_env.sh)" >&2',
        "  exit 127",
        "fi",
        f"mkdir -p {OM_DIR}",
        *commands,
        f'echo "wrote $(ls {OM_DIR}/*.om | wc -l) offline models to $(pwd)/{OM_DIR}"',
        "",
    ]
    replace_text(path, "\n".join(lines))
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


# ---- CLI (wired into export/cli.py) ------------------------------------------------------
def add_atc_parser(sub: argparse._SubParsersAction) -> None:
    a = sub.add_parser(
        "atc",
        help="write static-shape ONNX variants and `atc` command lines for Ascend NPUs",
        description="Write OUT/atc/: static-shape (or --dynamic_dims) variants of the three "
        "graphs for Huawei's ATC, convert.sh with one `atc` line per variant, and "
        "manifest['atc']. Needs the checkpoint OUT was exported from (the decoder variants "
        "are re-exported from it). Does not run ATC.",
    )
    a.add_argument("out", type=Path, help="artifact directory written by `python -m export onnx`")
    a.add_argument(
        "--checkpoint", type=Path, required=True, help="the checkpoint OUT was exported from"
    )
    a.add_argument(
        "--soc-version", required=True, help="ATC --soc_version, e.g. Ascend910B3, Ascend310P3"
    )
    a.add_argument("--frames", type=int, default=None, help="frames (default: the config's)")
    a.add_argument(
        "--max-seq", type=int, default=None, help="prompt + generated positions (default P+512)"
    )
    a.add_argument(
        "--text-budget",
        type=int,
        default=DEFAULT_TEXT_BUDGET,
        help=f"prompt text ids the prefill holds (default {DEFAULT_TEXT_BUDGET})",
    )
    a.add_argument(
        "--dynamic-dims",
        action="store_true",
        help="gears over the prefill length and the decode step's past instead of fixed sizes",
    )
    a.add_argument(
        "--precision-mode",
        choices=PRECISION_MODES,
        default=DEFAULT_PRECISION,
        help=f"ATC --precision_mode (default {DEFAULT_PRECISION})",
    )


def run_atc(args: argparse.Namespace) -> None:
    out = export_atc(
        args.out,
        checkpoint=args.checkpoint,
        soc_version=args.soc_version,
        frames=args.frames,
        max_seq=args.max_seq,
        text_budget=args.text_budget,
        dynamic_dims=args.dynamic_dims,
        precision_mode=args.precision_mode,
    )
    print(f"wrote {out} (run {out / SCRIPT} where the CANN toolkit is installed)")
