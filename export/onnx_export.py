"""``python -m export onnx``: a checkpoint -> an artifact directory of ONNX graphs.

The artifact directory holds everything the torch-free runtime needs::

    vision_encoder.onnx  projector.onnx  decoder.onnx  [decoder.onnx.data]
    embeddings.npy       unified embedding table [ids, hidden] (see trace_rt/graphs.py)
    config.json  clip_vision/{config,preprocessor_config}.json  tokenizer.model
    manifest.json        specs, config, id space, export settings, sha256 of every file

Re-exporting the same checkpoint with the same settings and library versions gives
byte-identical files (TorchScript-based exporter, fixed example inputs, no timestamps).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

import trace_rt
from export.atc import ATC_DIR
from export.files import publish_tree, save_onnx, write_json
from export.wrappers import WRAPPERS, example_inputs
from trace_rt.backends.tensorrt_manifest import ENGINE_DIR
from trace_rt.config import save_vision_tower_config
from trace_rt.errors import CheckpointError
from trace_rt.graphs import (
    BF16,
    EMBEDDINGS_FILE,
    EXTERNAL_DATA_THRESHOLD,
    FLOAT_DTYPES,
    GRAPH_NAMES,
    KV_CACHE,
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    GraphSpec,
    graph_specs,
    sha256_file,
)
from trace_rt.model.checkpoint import TOKENIZER_FILE, load_model
from trace_rt.model.trace import TraceModel
from trace_rt.prompts import MODEL_PROMPTS_FILE, model_prompts_file

DEFAULT_OPSET = 17  # LayerNormalization is native from 17; TensorRT 10 parses opsets 9..20
CLIP_DIR = "clip_vision"
STAGING_PREFIX = ".export-"


def export_onnx(
    checkpoint: str | Path,
    out: str | Path,
    *,
    dtype: str = "fp32",
    opset: int = DEFAULT_OPSET,
    progress: bool = True,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
) -> Path:
    """Export *checkpoint* to the artifact directory *out*; returns *out*.

    Everything is written into a hidden staging directory inside *out* first, then renamed
    into place file by file, ``manifest.json`` last: no published file is modified in
    place, so a model repository that hard-links the previous export (or a server that
    memory-maps its ``embeddings.npy``) keeps the previous bytes (``export/files.py``).

    Args:
        checkpoint: HF-format TRACE checkpoint directory.
        out: artifact directory (created; files of a previous export are replaced).
        dtype: ``fp32``, ``fp16`` or ``bf16`` weights and activations; pixels in and
            logits out stay f32. bf16 artifacts are for TensorRT/CUDA: their
            ``embeddings.npy`` holds bf16 bit patterns as uint16 (numpy has no bfloat16),
            and the onnxruntime backend refuses them (its CPU EP lacks bf16 kernels).
        opset: ONNX opset (TensorRT 10 accepts 9..20).
        progress: show a progress display.
        external_data_threshold: graphs whose serialised size exceeds this many bytes keep
            their weights in ``<graph>.onnx.data`` (protobuf's 2 GiB limit).
    """
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"unsupported export dtype {dtype!r}; use one of {list(FLOAT_DTYPES)}")
    checkpoint, out = Path(checkpoint), Path(out)
    if not checkpoint.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {checkpoint}")
    out.mkdir(parents=True, exist_ok=True)
    steps = ["hash checkpoint", "load model", *GRAPH_NAMES, "embeddings", "manifest"]
    title = f"export onnx {checkpoint.name} ({dtype}, opset {opset})"
    with _steps(title, steps, progress) as step, _staging(out) as stage:
        step()
        source = _hash_tree(checkpoint)
        step()
        model = load_model(checkpoint, dtype=dtype)
        graphs: dict[str, dict[str, Any]] = {}
        for spec in graph_specs(model.config, dtype).values():
            step()
            files = _export_graph(model, spec, stage, opset, external_data_threshold)
            graphs[spec.name] = spec.to_dict() | {"files": files}
        step()
        emb = embeddings_array(model)  # [ids, H]
        np.save(stage / EMBEDDINGS_FILE, emb, allow_pickle=False)
        _write_support_files(model, checkpoint, stage, dtype)
        step()
        _remove_derived(out)
        _remove_stale(out, stage)
        publish_tree(stage, out)
        manifest = _manifest(model, checkpoint.name, source, graphs, emb, dtype, opset, out)
        write_json(out / MANIFEST_FILE, manifest)
        step()
    return out


@contextmanager
def _steps(title: str, steps: list[str], progress: bool) -> Iterator[Callable[[], None]]:
    """A progress display; each call of the yielded function starts the next step."""
    with Progress(
        TextColumn(f"[bold]{title}[/bold]"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
        disable=not progress,
    ) as bar:
        task = bar.add_task(steps[0], total=len(steps))
        done = iter(range(len(steps) + 1))

        def step() -> None:
            i = next(done)
            bar.update(task, completed=i, description=steps[i] if i < len(steps) else "done")

        yield step


@contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A hidden directory inside *out* (same file system: renames, not copies)."""
    for old in out.glob(f"{STAGING_PREFIX}*"):  # left by a killed export
        shutil.rmtree(old, ignore_errors=True)
    stage = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out))
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _manifest(
    model: TraceModel,
    source_name: str,
    source: dict[str, str],
    graphs: dict[str, dict[str, Any]],
    emb: np.ndarray,
    dtype: str,
    opset: int,
    out: Path,
    skip: set[str] | frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """``manifest.json``: specs, config, id space, settings and every file's sha256
    (except *skip*: variant files, recorded with their variant)."""
    return {
        "format": MANIFEST_FORMAT,
        "config": model.config.replace(mm_vision_tower=CLIP_DIR).to_dict()
        | {"torch_dtype": FLOAT_DTYPES[dtype]},
        "id_space": _id_space(model),
        "export": {
            "dtype": dtype,
            "opset": opset,
            "exporter": "torch.onnx.export (TorchScript, dynamo=False)",
            "torch": torch.__version__.split("+")[0],
            "onnx": onnx.__version__,
            "trace_rt": trace_rt.__version__,
            "kv_cache": KV_CACHE,  # the decoder's cache contract (trace_rt/graphs.py)
        },
        "source": {"name": source_name, "files": source},
        "graphs": graphs,
        "embeddings": {
            "file": EMBEDDINGS_FILE,
            "dtype": FLOAT_DTYPES[dtype],
            "shape": list(emb.shape),
        }
        | ({"storage": "uint16"} if dtype == BF16 else {}),
        "files": {
            str(p.relative_to(out)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(out.rglob("*"))
            if p.is_file()
            and p.name != MANIFEST_FILE
            and not _hidden(p.relative_to(out))
            and str(p.relative_to(out)) not in skip
        },
    }


def unified_embeddings(model: TraceModel) -> torch.Tensor:
    """Every id's embedding in unified id order [ids, H]: text, text <sync>, time, score."""
    m = model.model
    table = torch.cat(
        [
            m.embed_tokens.weight,  # [32000, H]
            m.sync_tower.embed_tokens.weight,  # [1, H]
            m.time_tower.embed_tokens.weight,  # [13, H]
            m.score_tower.embed_tokens.weight,  # [13, H]
        ]
    ).detach()
    assert table.shape[0] == model.config.ids.size
    return table.contiguous()


def embeddings_array(model: TraceModel) -> np.ndarray:
    """:func:`unified_embeddings` as numpy; bf16 as its bit patterns in uint16."""
    table = unified_embeddings(model)
    if table.dtype == torch.bfloat16:
        return table.view(torch.int16).numpy().view(np.uint16)
    return table.numpy()


def _export_graph(
    model: TraceModel, spec: GraphSpec, out: Path, opset: int, threshold: int
) -> dict[str, str]:
    """Trace one wrapper to ONNX; returns {file: role} of what it wrote."""
    wrapper = WRAPPERS[spec.name](model).eval()
    args = example_inputs(spec, model)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_file = Path(tmp) / spec.file
        with warnings.catch_warnings(), torch.no_grad():
            # The tracer warns about Python ints taken from shapes; the graphs are checked
            # against PyTorch at other sizes than the example ones instead.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper,
                args,
                str(tmp_file),
                input_names=spec.input_names,
                output_names=spec.output_names,
                dynamic_axes=spec.dynamic_axes,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        proto = onnx.load(str(tmp_file))  # pulls in any external data torch wrote
    proto.doc_string = f"trace-rt {spec.name}"
    return save_onnx(proto, out / spec.file, threshold)


def _write_support_files(model: TraceModel, checkpoint: Path, out: Path, dtype: str) -> None:
    """config.json + clip_vision/ (so TraceConfig.from_dir(out) works), tokenizer.model and
    the checkpoint's own prompt strings where it has them (``prompts.json``)."""
    cfg = model.config.replace(mm_vision_tower=CLIP_DIR, torch_dtype=FLOAT_DTYPES[dtype])
    cfg.save(out)
    save_vision_tower_config(cfg, out / CLIP_DIR)
    shutil.copyfile(checkpoint / TOKENIZER_FILE, out / TOKENIZER_FILE)  # out: the staging dir
    own_prompts = model_prompts_file(checkpoint)
    if own_prompts is not None:
        shutil.copyfile(own_prompts, out / MODEL_PROMPTS_FILE)


def _id_space(model: TraceModel) -> dict[str, int]:
    ids = model.config.ids
    return {
        "text_vocab": ids.text_vocab,
        "text_sync": ids.text_sync,
        "time_base": ids.time_base,
        "score_base": ids.score_base,
        "size": ids.size,
    }


def _remove_derived(out: Path) -> None:
    """Drop what an earlier export's graphs were turned into: quantised decoder variants,
    TensorRT engines and ATC variants would be stale next to the new graphs and the new
    manifest no longer records them (re-run quantize/trt/atc). TensorRT timing caches stay:
    they depend on the GPU and TensorRT version, not on the graphs.
    """
    for p in out.glob("decoder.*.onnx*"):
        p.unlink()
    for p in (out / ENGINE_DIR).glob("*.engine"):
        p.unlink()
    shutil.rmtree(out / ATC_DIR, ignore_errors=True)


def _remove_stale(out: Path, stage: Path) -> None:
    """Unlink files the previous export listed that this one does not write (a
    ``decoder.onnx.data`` the new, smaller graph does not need)."""
    try:
        previous = json.loads((out / MANIFEST_FILE).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    for rel in previous:
        if not (stage / rel).is_file() and not _hidden(Path(rel)):
            (out / rel).unlink(missing_ok=True)


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def _hash_tree(root: Path) -> dict[str, str]:
    """sha256 of every (non-hidden) file under *root*, by relative path."""
    files = (p for p in sorted(root.rglob("*")) if p.is_file())
    return {
        str(p.relative_to(root)): sha256_file(p) for p in files if not _hidden(p.relative_to(root))
    }
