"""Backends behind one interface (:class:`~trace_rt.backends.base.Backend`).

Each is imported only when asked for, so ``import trace_rt`` needs neither torch nor
onnxruntime nor TensorRT.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from trace_rt.backends.base import Backend
from trace_rt.errors import CheckpointError

MANIFEST_FILE = "manifest.json"  # trace_rt.graphs.MANIFEST_FILE (not imported: numpy-free)
CHECKPOINT_FILES = ("model.safetensors", "model.safetensors.index.json")

# name -> "module:class"
BACKENDS = {
    "torch": "trace_rt.backends.torch_backend:TorchBackend",
    "onnxruntime": "trace_rt.backends.onnxruntime_backend:OnnxRuntimeBackend",
    "onnxruntime-int4": "trace_rt.backends.onnxruntime_backend:OnnxRuntimeBackend",
    "onnxruntime-int8": "trace_rt.backends.onnxruntime_backend:OnnxRuntimeBackend",
    # Needs the `tensorrt` extra (tensorrt + cuda-python) and engines from `export trt`.
    "tensorrt": "trace_rt.backends.tensorrt_backend:TensorRTBackend",
}
# Convenience names = a backend with fixed options, so benchmarks and the CLI can name a
# quantised decoder like any other backend (explicit options still win).
BACKEND_OPTIONS: dict[str, dict[str, Any]] = {
    "onnxruntime-int4": {"decoder_variant": "int4"},
    "onnxruntime-int8": {"decoder_variant": "int8"},
}


def model_kind(model_dir: str | Path) -> str:
    """``artifact`` (``python -m export`` output: manifest.json) or ``checkpoint``
    (HF-format: model.safetensors); a directory that is neither is an error naming both."""
    d = Path(model_dir)
    if not d.is_dir():
        raise CheckpointError(f"model directory not found: {d}")
    if (d / MANIFEST_FILE).is_file():
        return "artifact"
    if any((d / f).is_file() for f in CHECKPOINT_FILES):
        return "checkpoint"
    raise CheckpointError(
        f"{d} is neither a checkpoint (config.json + model.safetensors) nor an exported "
        f"artifact directory ({MANIFEST_FILE}, from `python -m export onnx`)"
    )


def default_backend(model_dir: str | Path) -> str:
    """The backend for *model_dir*'s kind: ``onnxruntime`` for an artifact directory,
    ``torch`` for a checkpoint."""
    return "onnxruntime" if model_kind(model_dir) == "artifact" else "torch"


def check_backend_fits(name: str, model_dir: str | Path) -> None:
    """Refuse, with the flag to use, a backend that cannot read *model_dir*'s kind."""
    kind = model_kind(model_dir)
    if name == "torch" and kind == "artifact":
        raise CheckpointError(
            f"{model_dir} is an exported artifact directory ({MANIFEST_FILE}), which the torch "
            "backend cannot load: use --backend onnxruntime (or tensorrt), or leave "
            "--backend out to pick it from the directory"
        )
    if name != "torch" and kind == "checkpoint":
        raise CheckpointError(
            f"{model_dir} is a checkpoint, not an exported artifact directory: use "
            f"--backend torch, or export it first (python -m export onnx {model_dir} OUT)"
        )


def load_backend(name: str, model_dir: str | Path, **options: Any) -> Backend:
    """Instantiate backend *name* for *model_dir* (options go to its constructor).

    A backend that cannot read the directory's kind (torch on an artifact directory,
    onnxruntime on a checkpoint) is refused with the flag to use instead.
    """
    try:
        target = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}") from None
    module, cls = target.split(":")
    options = BACKEND_OPTIONS.get(name, {}) | options
    impl = getattr(importlib.import_module(module), cls)  # a missing package is named first
    check_backend_fits(name, model_dir)
    return impl(model_dir, **options)


__all__ = [
    "BACKENDS",
    "BACKEND_OPTIONS",
    "Backend",
    "check_backend_fits",
    "default_backend",
    "load_backend",
    "model_kind",
]
