"""The reference oracle: an independent plain TRACE on HF transformers modules."""

from benchmarks.reference.oracle import ReferenceTrace, SpatialSlotProjector

__all__ = ["ReferenceTrace", "SpatialSlotProjector"]
