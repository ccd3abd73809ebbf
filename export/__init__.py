"""Export TRACE checkpoints to deployable graphs (ONNX today; TensorRT and ATC planned).

Builds on :mod:`trace_rt.model` (torch); the runtime never imports this package. The
graphs' I/O specs live in :mod:`trace_rt.graphs` so the runtime reads the same ones.
"""

from export.onnx_export import export_onnx

__all__ = ["export_onnx"]
