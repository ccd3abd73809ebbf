"""``python -m export trt``: an artifact directory's ONNX graphs -> TensorRT engines.

One engine per graph, parsed from the ONNX files ``python -m export onnx`` wrote, with
optimisation profiles computed from the graphs' I/O specs (:func:`profiles_from_spec`,
the same specs that drove the export), a timing cache kept in the artifact directory and
reused by later builds on the same GPU, and the build recorded in ``manifest["tensorrt"]``
(see :mod:`trace_rt.backends.tensorrt_manifest`).

Precision: the ONNX graphs already carry their types (fp16 exports are fp16 throughout,
with fp32 softmax and logits), so engines are built as *strongly typed* networks: TensorRT
keeps exactly the exported precisions. That is the only mode TensorRT 11 has, and it makes
the engines numerically the graphs onnxruntime was tested with. A precision different from
the export's (``--fp16``/``--bf16`` on an fp32 export) falls back to TensorRT 10's weak
typing (builder flags), which TensorRT 11 removed. ``--fp8``/``--int8``/``--int4`` need a
quantised QDQ decoder variant (``python -m export quantize --fp8|--int8|--int4``: fp8 is
weight-only E4M3FN, per output channel); the vision encoder and projector stay at the
export dtype. No fp8 (or any) engine has been built here: no GPU, no TensorRT.

``tensorrt`` is imported inside the functions that build, so profiles can be computed and
tested on machines without TensorRT.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from export.files import replace_bytes
from trace_rt.backends import tensorrt_manifest as tm
from trace_rt.config import TraceConfig
from trace_rt.errors import CheckpointError, TraceError
from trace_rt.graphs import DECODER, GRAPH_NAMES, GraphSpec, load_manifest, manifest_specs
from trace_rt.prompts import PROMPT_TEXT_TOKENS

PRECISIONS = ("fp32", "fp16", "bf16", "fp8", "int8", "int4")
QUANTISED = ("fp8", "int8", "int4")  # need explicit (QDQ) quantisation: a decoder variant
# Sequences one decode step advances by default (--max-batch): a server's continuous
# batching wants several; the KV pool the backend allocates is max_sequences x max_seq.
DEFAULT_MAX_BATCH = 8

Range = tuple[int, int, int]  # (min, opt, max) of one dimension


class TensorRTBuildError(TraceError):
    """The engines cannot be built (missing TensorRT, unsupported precision, parse error)."""


@dataclass(frozen=True)
class Limits:
    """The largest request the engines must serve.

    Attributes:
        max_frames: most frames per request (vision encoder and projector batch).
        max_seq: most positions in the decoder's context (prompt + video + generated); the
            backend's preallocated KV cache has this length.
        tokens_per_frame: video-block embeddings per frame (slots + time tokens), used only
            to pick the prefill profile's *opt* length.
        max_batch: most sequences one decode step advances (the TensorRT backend's
            ``max_sequences``, its KV pool slots). Above 1 the decoder gets a third
            profile, ``decode_batch``, so batch-1 steps keep kernels tuned for one row.
    """

    max_frames: int = 128
    max_seq: int = 4096
    tokens_per_frame: int = 14
    max_batch: int = 1

    def __post_init__(self) -> None:
        if self.max_frames < 1 or self.max_seq < 2 or self.max_batch < 1:
            raise ValueError(f"limits too small: {self}")

    def record(self) -> dict[str, int]:
        """What ``manifest["tensorrt"]["limits"]`` records (and a rebuild compares)."""
        return {"max_frames": self.max_frames, "max_seq": self.max_seq, "max_batch": self.max_batch}

    def ranges(self, phase: str) -> dict[str, Range]:
        """(min, opt, max) of every symbolic dimension the graph specs use, for *phase*.

        frames: 1 / N/2 / N. seq (new positions): a whole prompt in ``prefill`` (opt: the
        video block of N/2 frames plus a short prompt), exactly 1 in the decode phases (a
        static size lets TensorRT pick its single-token kernels). past (cached positions):
        0..max-1, opt 0 for prefill (it starts from an empty cache) and half the context
        for decode. batch (sequences): 1 in ``prefill`` (one sequence at a time) and
        ``decode``; 1..max_batch, tuned for max_batch, in ``decode_batch`` (the backend
        binds every pool slot's row).
        """
        n, s = self.max_frames, self.max_seq
        frames = (1, max(1, n // 2), n)
        opt_prompt = min(s, max(1, (n // 2) * self.tokens_per_frame + PROMPT_TEXT_TOKENS))
        if phase in ("decode", "decode_batch"):
            b = self.max_batch if phase == "decode_batch" else 1
            return {
                "frames": frames,
                "seq": (1, 1, 1),
                "past": (0, s // 2, s - 1),
                "batch": (1, b, b),
            }
        return {
            "frames": frames,
            "seq": (1, opt_prompt, s),
            "past": (0, 0, s - 1),
            "batch": (1, 1, 1),
        }


@dataclass(frozen=True)
class Profile:
    """One optimisation profile: input name -> (min, opt, max) shapes."""

    name: str
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = field(
        default_factory=dict
    )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shapes": {
                k: {"min": list(a), "opt": list(b), "max": list(c)}
                for k, (a, b, c) in self.shapes.items()
            },
        }


def profiles_from_spec(spec: GraphSpec, limits: Limits) -> list[Profile]:
    """The optimisation profiles of *spec*'s engine, derived from its symbolic dims.

    A graph with a ``past`` dimension (the decoder) gets two profiles, ``prefill`` and
    ``decode``, plus ``decode_batch`` when ``limits.max_batch`` > 1: one engine serves
    them all, and each phase gets kernels tuned for its shapes (TensorRT tunes for *opt*).
    Every other graph gets one profile, ``default``.

    Raises:
        ValueError: an input uses a symbolic dimension no rule covers (a spec changed
            without teaching this function its range).
    """
    symbolic = {d for t in spec.inputs for d in t.shape if isinstance(d, str)}
    phases = ["prefill", "decode"] if "past" in symbolic else ["default"]
    if "past" in symbolic and limits.max_batch > 1:
        phases.append("decode_batch")
    out = []
    for phase in phases:
        ranges = limits.ranges(phase)
        unknown = sorted(symbolic - set(ranges))
        if unknown:
            raise ValueError(f"{spec.name}: no profile range for symbolic dims {unknown}")
        out.append(profile_of(phase, spec, ranges))
    return out


def profile_of(phase: str, spec: GraphSpec, ranges: dict[str, tuple[int, int, int]]) -> Profile:
    """*phase*'s profile: each input's (min, opt, max) shape, symbolic dims from *ranges*."""
    shapes = {}
    for t in spec.inputs:
        lo, opt, hi = (
            tuple(ranges[d][i] if isinstance(d, str) else d for d in t.shape) for i in range(3)
        )
        shapes[t.name] = (lo, opt, hi)
    return Profile(phase, shapes)


@dataclass(frozen=True)
class BuildPlan:
    """How one graph is built: from which ONNX file, typed how, with which flags."""

    onnx: str
    strongly_typed: bool
    flags: tuple[str, ...]
    variant: str | None = None


def build_engines(
    out: str | Path,
    *,
    precision: str | None = None,
    max_frames: int | None = None,
    max_seq: int | None = None,
    max_batch: int | None = None,
    workspace_gb: float | None = None,
    decoder_variant: str | None = None,
    graphs: Sequence[str] = GRAPH_NAMES,
    checkpoint: str | Path | None = None,
    step: bool = True,
    fixed_past: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Build the three engines for artifact directory *out*; returns the manifest section.

    Args:
        out: artifact directory written by ``python -m export onnx``.
        precision: one of :data:`PRECISIONS`; default: the export's dtype.
        max_frames: most frames per request the engines admit (default: the model's
            ``num_frames``, what a request samples unless told otherwise).
        max_seq: decoder context the engines admit (default: the model's, capped at 4096:
            the KV cache the backend preallocates is this long).
        max_batch: most sequences one decode step advances, the largest
            ``max_sequences`` the TensorRT backend can run (default
            :data:`DEFAULT_MAX_BATCH`; 1 builds the single-sequence engine of earlier
            versions, without the ``decode_batch`` profile).
        workspace_gb: TensorRT's workspace pool limit (default: TensorRT's, the GPU's memory).
        decoder_variant: a QDQ decoder from ``manifest["variants"]["decoder"]`` to build
            instead of ``decoder.onnx`` (needed for fp8/int8/int4).
        graphs: build only these; the engines of the others are kept from the manifest
            when they were built with the same TensorRT, GPU, precision and limits (lets a
            time-boxed GPU run build and measure the cheap engines first).
        checkpoint: the checkpoint *out* was exported from: (re)make the fixed-shape decode
            step first (:func:`export.trt_step.make_step`; needs torch and onnx).
        step: build the decode step the artifact records (``python -m export step``, or
            *checkpoint*), quantised like the decoder for a QDQ variant; recorded as
            ``engines["decoder_step"]``, it lets the backend serve every decode step with
            one CUDA graph. Without a checkpoint this needs no torch. False: no step.
        fixed_past: build the decoder itself from the recorded step graph (prefill and
            decode profiles over the fixed past, ``engines["decoder"]["fixed"]``): one
            engine, so one copy of the decoder's weights, and one CUDA graph for every
            decode step; one sequence (``max_batch`` 1).
        progress: show a progress display.
    """
    out = Path(out)
    manifest = load_manifest(out, verify="size")
    export_dtype = manifest["export"]["dtype"]
    precision = _precision(precision, decoder_variant, export_dtype)
    unknown = sorted(set(graphs) - set(GRAPH_NAMES))
    if unknown:
        raise TensorRTBuildError(f"unknown graphs {unknown}; use {list(GRAPH_NAMES)}")
    trt = _import_tensorrt()
    specs = manifest_specs(manifest)
    if max_seq is None and step and checkpoint is None:  # the recorded step's context
        max_seq = (manifest.get("decode_step") or {}).get("max_seq")
    limits = _limits(TraceConfig.from_dir(out), max_frames, max_seq, max_batch)
    plans = _plans(trt, out, manifest, precision, export_dtype, decoder_variant)
    from export.trt_step import engine_plan, step_file_for_build

    step_file = step_file_for_build(out, plans, limits, graphs, checkpoint, step, fixed_past)
    if fixed_past:  # the step graph is the decoder: no engine of its own
        plans[DECODER], step_file = replace(plans[DECODER], onnx=step_file), None
    gpu = _gpu_info()
    (out / tm.ENGINE_DIR).mkdir(exist_ok=True)
    cache_file = out / tm.ENGINE_DIR / f"timing-{_slug(gpu['name'])}-trt{trt.__version__}.cache"
    cache = cache_file.read_bytes() if cache_file.is_file() else b""
    logger = trt.Logger(trt.Logger.WARNING)
    engines = _kept_engines(manifest, trt.__version__, gpu, precision, limits, graphs)
    t_all = time.perf_counter()
    with _progress(f"export trt {out.name} ({precision}, {gpu['name']})", progress) as bar:
        todo = [g for g in GRAPH_NAMES if g in graphs] + ([tm.STEP] if step_file else [])
        task = bar.add_task("", total=len(todo))
        for i, name in enumerate(todo):
            bar.update(task, completed=i, description=f"{name}: parse + build")
            plan, spec, profiles, fixed = engine_plan(
                name, plans, specs, limits, step_file, fixed_past
            )
            t0 = time.perf_counter()
            blob, cache = _build_one(
                trt, logger, out / plan.onnx, spec, plan, profiles, cache, workspace_gb
            )
            rel = f"{tm.ENGINE_DIR}/{name}.{plan.variant or precision}.engine"
            replace_bytes(out / rel, blob)  # a new file: a repository may link the old one
            replace_bytes(cache_file, cache)  # after every graph: a later failure keeps it
            engines[name] = _engine_record(out, rel, plan, profiles, time.perf_counter() - t0)
            if fixed is not None:
                engines[name]["fixed"] = fixed
        bar.update(task, completed=len(todo), description="manifest")
        section = {
            "format": tm.FORMAT,
            "version": trt.__version__,
            "gpu": {k: gpu[k] for k in ("name", "compute_capability")},
            "precision": precision,
            "limits": limits.record(),
            "workspace_gb": workspace_gb,
            "timing_cache": str(cache_file.relative_to(out)),
            "built_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "build_s": round(time.perf_counter() - t_all, 1),
            "engines": engines,
        }
        tm.write_section(out, section)
    return section


def _precision(precision: str | None, decoder_variant: str | None, export_dtype: str) -> str:
    """The build precision: as asked, else the QDQ variant's (int8-qdq -> int8), else the
    export's dtype."""
    if precision is None and decoder_variant:
        precision = decoder_variant.split("-")[0]
    precision = precision or export_dtype
    if precision not in PRECISIONS:
        raise TensorRTBuildError(f"unknown precision {precision!r}; use one of {PRECISIONS}")
    return precision


def _limits(
    cfg: TraceConfig, max_frames: int | None, max_seq: int | None, max_batch: int | None = None
) -> Limits:
    """The engines' shape limits (default max_seq: the model's context, capped at 4096)."""
    max_seq = max_seq or min(4096, cfg.max_position_embeddings)
    if max_seq > cfg.max_position_embeddings:
        raise TensorRTBuildError(
            f"--max-seq {max_seq} exceeds the model's context ({cfg.max_position_embeddings})"
        )
    max_batch = DEFAULT_MAX_BATCH if max_batch is None else max_batch
    if max_batch < 1:
        raise TensorRTBuildError(f"--max-batch must be >= 1, got {max_batch}")
    return Limits(max_frames or cfg.num_frames, max_seq, cfg.tokens_per_frame, max_batch)


def _progress(title: str, enabled: bool) -> Progress:
    return Progress(
        TextColumn(f"[bold]{title}[/bold]"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
        disable=not enabled,
    )


def _engine_record(
    out: Path, rel: str, plan: BuildPlan, profiles: list[Profile], build_s: float
) -> dict[str, Any]:
    """The manifest's record of one built engine."""
    return {
        "file": rel,
        "bytes": (out / rel).stat().st_size,
        "sha256": tm.sha256_file(out / rel),
        "onnx": plan.onnx,
        "strongly_typed": plan.strongly_typed,
        "flags": list(plan.flags),
        "variant": plan.variant,
        "profiles": [p.to_dict() for p in profiles],
        "build_s": round(build_s, 1),
    }


def _kept_engines(
    manifest: dict[str, Any],
    version: str,
    gpu: dict[str, Any],
    precision: str,
    limits: Limits,
    rebuilt: Sequence[str],
) -> dict[str, Any]:
    """Engines of the previous build worth keeping: same TensorRT, GPU, precision, limits."""
    old = manifest.get(tm.SECTION) or {}
    same = (
        old.get("format") == tm.FORMAT
        and old.get("version") == version
        and old.get("gpu", {}).get("compute_capability") == gpu["compute_capability"]
        and old.get("precision") == precision
        and old.get("limits") == limits.record()
    )
    if not same:
        return {}
    # The decode step goes with the decoder: a rebuilt decoder drops the old step.
    drop = {*rebuilt, *((tm.STEP,) if DECODER in rebuilt else ())}
    return {g: rec for g, rec in old.get("engines", {}).items() if g not in drop}


def _plans(
    trt: Any,
    out: Path,
    manifest: dict[str, Any],
    precision: str,
    export_dtype: str,
    variant: str | None,
) -> dict[str, BuildPlan]:
    """Per graph: source file and typing. Strong typing whenever the ONNX types suffice."""
    weak_flag = {"fp16": "FP16", "bf16": "BF16"}
    plans = {}
    for name in GRAPH_NAMES:
        onnx_file = manifest["graphs"][name]["file"]
        if name == DECODER and (precision in QUANTISED or variant):
            vname, onnx_file = _variant(out, manifest, precision, variant)
            plans[name] = BuildPlan(onnx_file, True, (), vname)  # the QDQ nodes set precisions
        elif precision in (export_dtype, *QUANTISED):
            # Quantised builds keep the unquantised graphs at the export dtype.
            plans[name] = BuildPlan(onnx_file, True, ())
        else:
            flag = weak_flag.get(precision)
            if flag is None or not hasattr(trt.BuilderFlag, flag):
                raise TensorRTBuildError(
                    f"--{precision} on a {export_dtype} export needs TensorRT's weak typing, "
                    f"which TensorRT {trt.__version__} does not have; export the graphs at "
                    f"{precision} instead (python -m export onnx CKPT OUT --dtype {precision})"
                )
            plans[name] = BuildPlan(onnx_file, False, (flag,))
    return plans


def _variant(
    out: Path, manifest: dict[str, Any], precision: str, name: str | None
) -> tuple[str, str]:
    """(name, ONNX file) of the QDQ decoder variant (``python -m export quantize``) to build.

    Only the ``qdq`` form parses in TensorRT: MatMulNBits and the ``dynamic`` form's
    MatMulIntegerToFloat are onnxruntime contrib ops (and MatMulInteger is not in
    TensorRT's ONNX op set either).
    """
    from trace_rt.variants import load_variant, variant_names

    if name is None:
        qdq = [
            n
            for n in variant_names(manifest)
            if manifest["variants"][DECODER][n].get("form") == "qdq" and n.startswith(precision)
        ]
        if len(qdq) != 1:
            make = (
                f"make one with `python -m export quantize {out} --{precision}`"
                if precision in QUANTISED
                else "`python -m export quantize` makes int4/int8/fp8 only"
            )
            raise TensorRTBuildError(
                f"--{precision} builds a quantised (QDQ) decoder variant: {make}, then pass "
                f"--decoder-variant NAME (this artifact has: {variant_names(manifest) or 'none'})"
            )
        name = qdq[0]
    try:
        rec = load_variant(manifest, out, name, verify="size")
    except CheckpointError as e:
        raise TensorRTBuildError(str(e)) from e
    if rec.get("form") != "qdq":
        raise TensorRTBuildError(
            f"decoder variant {name!r} is the {rec.get('form')!r} form ({rec.get('scheme')}), "
            "which TensorRT cannot parse; use its QDQ form (e.g. int8-qdq)"
        )
    return name, rec["file"]


def _build_one(
    trt: Any,
    logger: Any,
    onnx_path: Path,
    spec: GraphSpec,
    plan: BuildPlan,
    profiles: list[Profile],
    cache: bytes,
    workspace_gb: float | None,
) -> tuple[memoryview, bytes]:
    """Parse and build one engine; returns (serialized engine, updated timing cache)."""
    builder = trt.Builder(logger)
    flags = 0
    if plan.strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # parse_from_file (not parse(bytes)) so external weights (<graph>.onnx.data) resolve.
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTBuildError(f"{onnx_path.name}: TensorRT's ONNX parser failed: {errors}")
    got = [network.get_input(i).name for i in range(network.num_inputs)]
    if got != spec.input_names:
        raise TensorRTBuildError(
            f"{onnx_path.name}: inputs {got} differ from the manifest's {spec.input_names}"
        )
    config = builder.create_builder_config()
    if workspace_gb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2**30))
    for flag in plan.flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if not plan.flags and spec.inputs and _is_fp32(spec) and hasattr(trt.BuilderFlag, "TF32"):
        # fp32 engines are the reference precision: TF32 matmuls would break the 1e-4 parity.
        config.clear_flag(trt.BuilderFlag.TF32)
    for p in profiles:
        prof = builder.create_optimization_profile()
        for tensor, (lo, opt, hi) in p.shapes.items():
            prof.set_shape(tensor, lo, opt, hi)
        config.add_optimization_profile(prof)
    timing = config.create_timing_cache(cache)
    if not config.set_timing_cache(timing, ignore_mismatch=False):
        # A cache from another GPU or TensorRT: start afresh rather than mis-tune.
        timing = config.create_timing_cache(b"")
        config.set_timing_cache(timing, ignore_mismatch=False)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise TensorRTBuildError(f"{onnx_path.name}: TensorRT could not build an engine")
    # A memoryview, not bytes: a 7B engine is ~15 GB and need not be copied to be written.
    return memoryview(blob), bytes(memoryview(config.get_timing_cache().serialize()))


def _is_fp32(spec: GraphSpec) -> bool:
    return all(t.dtype in ("float32", "int64") for t in (*spec.inputs, *spec.outputs))


def _gpu_info() -> dict[str, Any]:
    """GPU 0's name and compute capability: cuda-python if installed, else torch."""
    try:
        from trace_rt.backends.cuda_rt import device_info

        return device_info(0)
    except ImportError:
        import torch

        if not torch.cuda.is_available():
            raise TensorRTBuildError(
                "no CUDA GPU: TensorRT engines are built on the GPU that will run them"
            ) from None
        major, minor = torch.cuda.get_device_capability(0)
        return {"name": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}


def _import_tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError as e:
        raise TensorRTBuildError(
            "python -m export trt needs the `tensorrt` package (pip install "
            f"'trace-rt[tensorrt]' or the tensorrt wheels for your CUDA): {e}"
        ) from e
    return tensorrt


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
