"""Backends behind one interface (:class:`~trace_rt.backends.base.Backend`).

Each is imported only when asked for, so ``import trace_rt`` needs neither torch nor
onnxruntime nor TensorRT.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from trace_rt.backends.base import Backend

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


def load_backend(name: str, model_dir: str | Path, **options: Any) -> Backend:
    """Instantiate backend *name* for *model_dir* (options go to its constructor)."""
    try:
        target = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}") from None
    module, cls = target.split(":")
    options = BACKEND_OPTIONS.get(name, {}) | options
    return getattr(importlib.import_module(module), cls)(model_dir, **options)


__all__ = ["BACKENDS", "BACKEND_OPTIONS", "Backend", "load_backend"]
