"""``python -m triton_repo build``: a ready Triton model repository from an artifact dir.

Layout written (tensor names from the artifact manifest and trace_rt.serving.protocol)::

    OUT/
      vision_encoder/config.pbtxt   dynamic batching over frames
      vision_encoder/1/             CPU: model.py (onnxruntime) + the graph + graph.json
                                    GPU: model.plan (the TensorRT engine)
      projector/config.pbtxt, 1/    the same, without batching
      trace_pipeline/config.pbtxt   Python backend, decoupled
      trace_pipeline/1/model.py     the decoding loop (trace_rt.generate)
      trace_pipeline/1/serving.json limits and modes (ServingSettings)
      trace_pipeline/1/artifacts/   the artifact directory (hard links where possible;
                                    every file's sha256 checked against the manifest),
                                    of its decoder variants only the one the backend
                                    runs (trace_rt.variants.pick_variant: the
                                    manifest's default, e.g. ``fused`` after
                                    ``python -m export optimize``)
      repository.json               every file's size and sha256: the repository can be
                                    copied to a URL (trace-rt serve --repo s3://...)

Every size comes from the artifact's manifest and config; nothing is guessed.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from trace_rt.config import TraceConfig
from trace_rt.errors import CheckpointError, InputError
from trace_rt.graphs import (
    DECODER,
    MANIFEST_FILE,
    PROJECTOR,
    VISION_ENCODER,
    GraphSpec,
    TensorSpec,
    kv_names,
    load_manifest,
    manifest_specs,
    sha256_file,
)
from trace_rt.serving.protocol import (
    ARTIFACTS_DIR,
    PIPELINE_OUTPUTS,
    TRACE_PIPELINE,
    TRITON_TYPES,
    ServingSettings,
    ServingTensor,
    pipeline_inputs,
)
from trace_rt.serving.remote import write_index
from trace_rt.variants import load_variant, pick_variant

MODELS_DIR = Path(__file__).parent / "models"
GRAPH_JSON = "graph.json"
MARKER = ".trace-rt-repository"  # lets a rebuild replace OUT, and nothing else
# Frames waiting this long for others to join the vision encoder's batch.
QUEUE_DELAY_US = 2000


def build_repository(
    artifacts: str | Path,
    out: str | Path,
    *,
    backend: str = "onnxruntime",
    instances: int = 1,
    max_batch_frames: int | None = None,
    encoders: str = "in-process",
    max_video_bytes: int = ServingSettings.max_video_bytes,
    max_new_tokens: int = ServingSettings.max_new_tokens,
    default_max_new_tokens: int = ServingSettings.default_max_new_tokens,
    threads: int = 0,
    server_tensorrt: str | None = None,
    decode_workers: int = ServingSettings.decode_workers,
    video_time_budget_s: float = ServingSettings.video_time_budget_s,
    max_frame_pixels: int = ServingSettings.max_frame_pixels,
    max_sequences: int = ServingSettings.max_sequences,
    video_cache_mb: int = ServingSettings.video_cache_mb,
    progress: bool = True,
) -> Path:
    """Write the model repository for *artifacts* to *out* (replacing an earlier build).

    Args:
        artifacts: directory from ``python -m export onnx`` (plus ``export trt`` engines
            for ``backend="tensorrt"``).
        out: the repository to write.
        backend: ``onnxruntime`` (CPU, or CUDA with onnxruntime-gpu: encoders are Python
            models) or ``tensorrt`` (encoders are ``tensorrt_plan`` models).
        instances: model instances of each model (parallel requests).
        max_batch_frames: the vision encoder's largest batch (default: the model's
            ``num_frames``, or the TensorRT engine's frame limit).
        encoders: how ``trace_pipeline`` runs the vision encoder and projector:
            ``in-process`` or ``bls`` (through the repository's models).
        max_video_bytes, max_new_tokens, default_max_new_tokens: request limits.
        threads: onnxruntime intra-op threads per session (0: onnxruntime's default).
        server_tensorrt: the TensorRT version of the tritonserver that will load the
            ``tensorrt_plan`` models (engines load only on the version that built them);
            default: the ``tensorrt`` importable here, if any (building inside the serving
            container), else an error asking for it.
        decode_workers, video_time_budget_s, max_frame_pixels: how each instance decodes
            request videos (:class:`~trace_rt.serving.protocol.ServingSettings`).
        max_sequences: KV slots per ``trace_pipeline`` instance (requests decoded together);
            their K/V take up to ``kv_bytes_per_position`` x the model's context x slots.
        video_cache_mb: each instance's video cache (encoded videos, prompt-prefix K/V).
    """
    src, out = Path(artifacts).resolve(), Path(out).resolve()
    if instances < 1:
        raise InputError(f"--instances must be at least 1, got {instances}")
    # A TensorRT deployment may have dropped the ONNX graphs that its engines replace.
    # Sizes first (fast, names a truncated file); hashes of what was linked, at the end.
    manifest = load_manifest(src, verify="size", graphs=backend != "tensorrt")
    cfg = TraceConfig.from_dir(src)
    specs = manifest_specs(manifest)
    engines, frame_limit = ({}, None)
    if backend == "tensorrt":
        engines, frame_limit = _engines(manifest, src, server_tensorrt)
    if max_batch_frames is None:
        max_batch_frames = min(cfg.num_frames, frame_limit or cfg.num_frames)
    if max_batch_frames < 1 or (frame_limit and max_batch_frames > frame_limit):
        raise InputError(
            f"--max-batch-frames must be in [1, {frame_limit or 'inf'}], got {max_batch_frames}"
        )
    settings = ServingSettings(
        backend=backend,
        encoders=encoders,
        max_video_bytes=max_video_bytes,
        max_new_tokens=max_new_tokens,
        default_max_new_tokens=min(default_max_new_tokens, max_new_tokens),
        threads=threads,
        decode_workers=decode_workers,
        video_time_budget_s=video_time_budget_s,
        max_frame_pixels=max_frame_pixels,
        max_sequences=max_sequences,
        video_cache_mb=video_cache_mb,
    )
    _prepare_out(out)
    files = list(manifest["files"])
    for spec, max_batch in ((specs[VISION_ENCODER], max_batch_frames), (specs[PROJECTOR], 0)):
        _graph_model(out, src, spec, files, engines, instances, max_batch, threads)
        _written(out / spec.name, progress)
    kv = KVBudget.of(cfg, specs[DECODER], max_sequences)
    # The decoder the pipeline will run, by the runtime's own rule; other variants' files
    # (GBs each on the 7B) stay out of the repository.
    variant, _ = pick_variant(manifest, src, backend, verify="size")
    skip = _unused_variant_files(manifest, variant)
    _pipeline_model(out, src, cfg, settings, instances, max_batch_frames, kv, skip)
    _written(out / TRACE_PIPELINE, progress)
    if progress:
        print(f"{TRACE_PIPELINE}: {kv.describe()} per instance", flush=True)
        print(f"{TRACE_PIPELINE}: decoder {_describe_variant(manifest, variant)}", flush=True)
    try:
        _verify_copies(out, specs, files, engines, manifest, variant)
    except CheckpointError:
        shutil.rmtree(out, ignore_errors=True)  # no repository that looks ready
        raise
    (out / MARKER).write_text(json.dumps({"artifacts": str(src), "backend": backend}) + "\n")
    _write_index(out, specs, files, manifest)
    return out


def _write_index(out: Path, specs: dict[str, GraphSpec], files: list[str], manifest: dict) -> None:
    """``repository.json`` (every file's size and sha256), so that the repository can be
    served from a URL (``trace-rt serve --repo s3://...``). The artifact files and graph
    copies were just checked against the manifest: their hashes are not computed again."""
    known = {
        f"{TRACE_PIPELINE}/1/{ARTIFACTS_DIR}/{rel}": rec["sha256"]
        for rel, rec in manifest["files"].items()
    }
    for name in (VISION_ENCODER, PROJECTOR):
        for rel in _graph_files(files, specs[name]):
            known[f"{name}/1/{rel}"] = manifest["files"][rel]["sha256"]
    write_index(out, known)


@dataclass(frozen=True)
class KVBudget:
    """What the decoder's KV slots of one ``trace_pipeline`` instance may hold.

    The pool is per layer K and V, ``[capacity, slots, kv_heads, head_dim]``; it grows
    (doubling) to the longest sequence it has held, up to the model's context, so the
    most it takes is ``per_position x context x slots``.
    """

    per_position: int  # bytes of one position of one slot: 2 x layers x kv_heads x head_dim
    context: int  # positions a slot can hold at most (max_position_embeddings)
    slots: int

    @classmethod
    def of(cls, cfg: TraceConfig, decoder: GraphSpec, slots: int) -> KVBudget:
        name = kv_names(0)[0]
        dtype = next((t.dtype for t in decoder.inputs if t.name == name), "float32")
        size = {"float32": 4, "float16": 2, "bfloat16": 2}.get(dtype, 4)
        per = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.attn_head_dim * size
        return cls(per, int(cfg.max_position_embeddings), slots)

    @property
    def max_bytes(self) -> int:
        return self.per_position * self.context * self.slots

    def describe(self) -> str:
        return (
            f"KV cache up to {self.max_bytes / 2**20:.1f} MiB ({self.slots} slots x "
            f"{self.context} positions x {self.per_position} bytes)"
        )


def _verify_copies(
    out: Path,
    specs: dict[str, GraphSpec],
    files: list[str],
    engines: dict[str, str],
    manifest: dict,
    variant: str | None = None,
) -> None:
    """Check the repository's own copies (links) of the artifact files by sha256 (with
    the decoder *variant*'s, when the pipeline runs one).

    Hashing what was linked, after linking, leaves no window in which the artifact
    directory can change unnoticed (a half-written export, a file edited in place): a
    file that differs from its manifest record is an error naming it, and the build
    leaves no repository behind.
    """
    from trace_rt.backends import tensorrt_manifest as tm

    art = out / TRACE_PIPELINE / "1" / ARTIFACTS_DIR
    linked = load_manifest(art, verify="sha256", graphs=not engines)
    if linked != manifest:
        raise CheckpointError(f"{art}: {MANIFEST_FILE} changed while the repository was built")
    section = tm.read_section(manifest, art) if engines else {}
    if engines:
        tm.verify_engines(section, art, "sha256")
    if variant is not None:
        load_variant(linked, art, variant, DECODER, verify="sha256")
    for name in (VISION_ENCODER, PROJECTOR):
        version = out / name / "1"
        if engines:
            rec = section["engines"][name]
            pairs = [(version / "model.plan", rec["sha256"], rec["file"])]
        else:
            pairs = [
                (version / rel, manifest["files"][rel]["sha256"], rel)
                for rel in _graph_files(files, specs[name])
            ]
        for path, want, rel in pairs:
            if sha256_file(path) != want:
                raise CheckpointError(
                    f"{rel} does not match its sha256 in {MANIFEST_FILE}; the artifact "
                    "directory is inconsistent (re-export it)"
                )


def _unused_variant_files(manifest: dict, variant: str | None) -> set[str]:
    """Files of the decoder variants other than *variant* (none of the graphs' own)."""
    records = manifest.get("variants", {}).get(DECODER, {})
    unused = {f for name, rec in records.items() if name != variant for f in rec["files"]}
    return unused - set(manifest["files"]) - set(records.get(variant, {}).get("files", {}))


def _describe_variant(manifest: dict, variant: str | None) -> str:
    if variant is None:
        return manifest["graphs"][DECODER]["file"]
    return f"{manifest['variants'][DECODER][variant]['file']} (variant {variant})"


def _written(model: Path, progress: bool) -> None:
    if progress:
        print(f"{model.name}: written to {model}", flush=True)


def _prepare_out(out: Path) -> None:
    if out.exists():
        if not out.is_dir():
            raise InputError(f"{out} exists and is not a directory")
        if any(out.iterdir()) and not (out / MARKER).exists():
            raise InputError(
                f"{out} is not empty and not a repository built by triton_repo; "
                "pick an empty or new directory"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True)


def _engines(manifest: dict, src: Path, server_tensorrt: str | None) -> tuple[dict[str, str], int]:
    """Each graph's TensorRT engine file, and the engines' frame limit.

    Triton's TensorRT backend deserialises ``model.plan`` with the TensorRT it was built
    with, and a plan loads only on the exact version that built it: a mismatch would
    surface as a model that fails to load at server start, so it is refused here.
    """
    from trace_rt.backends import tensorrt_manifest as tm

    section = tm.read_section(manifest, src)
    built = section.get("version")
    server = server_tensorrt or _local_tensorrt()
    if server is None:
        raise InputError(
            "--backend tensorrt: pass --server-tensorrt VERSION, the TensorRT of the "
            "tritonserver image that will serve (e.g. `docker run IMAGE python3 -c 'import "
            "tensorrt; print(tensorrt.__version__)'`; NVIDIA's Frameworks Support Matrix "
            f"lists it per release); the engines were built with TensorRT {built}"
        )
    if built is None or tm.version_tuple(built) != tm.version_tuple(server):
        raise CheckpointError(
            f"{src}: the engines were built with TensorRT {built}, the server has TensorRT "
            f"{server}; engines load only on the version that built them: run `python -m "
            "export trt` with the server's TensorRT (e.g. inside its container)"
        )
    files = {}
    for graph in (VISION_ENCODER, PROJECTOR, DECODER):
        rec = section["engines"].get(graph)
        if rec is None:
            raise CheckpointError(f"{src}: no TensorRT engine for {graph}; run `export trt`")
        files[graph] = rec["file"]
    return files, int(section["limits"]["max_frames"])


def _local_tensorrt() -> str | None:
    try:
        import tensorrt
    except ImportError:
        return None
    return str(tensorrt.__version__)


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link (same file system: no second copy of GBs of weights), else a copy.

    Linking is safe because ``export`` never modifies a published file in place: it
    writes a new file and renames it over the old name, so the repository keeps the old
    inode (``export/files.py``). The build checks the linked bytes' sha256 at the end.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _graph_files(manifest_files: Iterable[str], spec: GraphSpec) -> list[str]:
    # The graph and its external-data files (decoder.onnx, decoder.onnx.data, ...).
    return [f for f in manifest_files if f == spec.file or f.startswith(spec.file + ".")]


def _graph_model(
    out: Path,
    src: Path,
    spec: GraphSpec,
    files: list[str],
    engines: dict[str, str],
    instances: int,
    max_batch: int,
    threads: int,
) -> None:
    version = out / spec.name / "1"
    version.mkdir(parents=True)
    if engines:
        _link_or_copy(src / engines[spec.name], version / "model.plan")
        head = 'platform: "tensorrt_plan"'
        kind = "KIND_GPU"
    else:
        for rel in _graph_files(files, spec):
            _link_or_copy(src / rel, version / rel)
        shutil.copy2(MODELS_DIR / "onnx_graph.py", version / "model.py")
        (version / GRAPH_JSON).write_text(json.dumps(spec.to_dict(), indent=2) + "\n")
        head = 'backend: "python"'
        kind = "KIND_CPU"
    batched = max_batch > 0
    lines = [f'name: "{spec.name}"', head, f"max_batch_size: {max_batch}"]
    lines += _tensors("input", [_graph_tensor(t, batched) for t in spec.inputs])
    lines += _tensors("output", [_graph_tensor(t, batched) for t in spec.outputs])
    if batched:
        lines.append(
            "dynamic_batching {\n"
            f"  preferred_batch_size: [ {max_batch} ]\n"
            f"  max_queue_delay_microseconds: {QUEUE_DELAY_US}\n}}"
        )
    lines.append(f"instance_group [ {{ count: {instances} kind: {kind} }} ]")
    if not engines and threads:
        lines.append(_parameters({"threads": threads}))
    (out / spec.name / "config.pbtxt").write_text("\n".join(lines) + "\n")


def _graph_tensor(t: TensorSpec, batched: bool) -> tuple[str, str, list[int], bool]:
    dims = [d if isinstance(d, int) else -1 for d in t.shape]
    if batched:
        dims = dims[1:]  # the frames axis is Triton's batch axis
    return t.name, TRITON_TYPES[t.dtype], dims, False


def _pipeline_model(
    out: Path,
    src: Path,
    cfg: TraceConfig,
    settings: ServingSettings,
    instances: int,
    max_batch_frames: int,
    kv: KVBudget,
    skip: set[str],
) -> None:
    version = out / TRACE_PIPELINE / "1"
    version.mkdir(parents=True)
    for f in sorted(src.rglob("*")):
        rel = f.relative_to(src)
        # No .ort_cache, no decoder variant the pipeline will not load.
        if f.is_file() and not rel.parts[0].startswith(".") and rel.as_posix() not in skip:
            _link_or_copy(f, version / ARTIFACTS_DIR / rel)
    shutil.copy2(MODELS_DIR / "trace_pipeline.py", version / "model.py")
    settings.save(version)
    kind = "KIND_GPU" if settings.backend == "tensorrt" else "KIND_CPU"

    def tensor(t: ServingTensor) -> tuple[str, str, list[int], bool]:
        return t.name, t.triton_type, list(t.shape), t.optional

    lines = [
        f'name: "{TRACE_PIPELINE}"',
        'backend: "python"',
        "max_batch_size: 0",
        "model_transaction_policy { decoupled: true }",
        *_tensors("input", [tensor(t) for t in pipeline_inputs(cfg)]),
        *_tensors("output", [tensor(t) for t in PIPELINE_OUTPUTS]),
        f"instance_group [ {{ count: {instances} kind: {kind} }} ]",
        # The limits clients may ask for (model config) before they send anything.
        _parameters(
            {
                "max_batch_frames": max_batch_frames,
                "max_video_bytes": settings.max_video_bytes,
                "max_new_tokens": settings.max_new_tokens,
                "max_sequences": settings.max_sequences,
                "video_cache_mb": settings.video_cache_mb,
                "kv_bytes_per_position": kv.per_position,
                "kv_max_bytes": kv.max_bytes,
            }
        ),
    ]
    (out / TRACE_PIPELINE / "config.pbtxt").write_text("\n".join(lines) + "\n")


def _tensors(kind: str, tensors: list[tuple[str, str, list[int], bool]]) -> list[str]:
    body = []
    for name, dtype, dims, optional in tensors:
        opt = " optional: true" if optional else ""
        body.append(f'  {{ name: "{name}" data_type: {dtype} dims: {dims}{opt} }}')
    return [f"{kind} [", ",\n".join(body), "]"]


def _parameters(params: dict[str, object]) -> str:
    items = [f'  {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in params.items()]
    return "parameters [\n" + ",\n".join(items) + "\n]"
