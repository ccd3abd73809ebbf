"""Export TRACE checkpoints to deployable graphs: ONNX, TensorRT engines, ATC variants.

Builds on :mod:`trace_rt.model` (torch); the runtime never imports this package. The
graphs' I/O specs live in :mod:`trace_rt.graphs` so the runtime reads the same ones.

``export_onnx`` is imported on first use: ``python -m export trt`` runs on a Jetson's
torch-free install (engines are built on the device that runs them) and must not pull in
torch or onnx through this package.
"""

from __future__ import annotations

from typing import Any

__all__ = ["export_onnx"]


def __getattr__(name: str) -> Any:
    if name == "export_onnx":
        from export.onnx_export import export_onnx

        return export_onnx
    raise AttributeError(f"module 'export' has no attribute {name!r}")
