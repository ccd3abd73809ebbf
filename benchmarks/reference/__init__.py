"""The reference oracle: a plain TRACE on HF transformers modules, importing nothing of trace_rt."""

from benchmarks.reference.oracle import ReferenceTrace, SpatialSlotProjector

__all__ = ["ReferenceTrace", "SpatialSlotProjector"]
