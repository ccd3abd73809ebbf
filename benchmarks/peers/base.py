"""What every peer shares: it takes a TRACE checkpoint, runs on the CPU, compares by
precision (see :mod:`trace_rt.bench.peer` for how the bench drives it)."""

from __future__ import annotations

from pathlib import Path

from trace_rt.config import TraceConfig


class Peer:
    """Base of the peer plugins: ``Class(checkpoint_dir, device="cpu")``.

    Subclasses set ``name``, ``precision`` and ``requirement`` (the package, for the
    message when it is missing), implement :meth:`prepare` (the one-time conversion,
    cached) and the :class:`~trace_rt.bench.peer.LlmPeer` methods.
    """

    llm_only = True  # the bench drives it as a peer: prefill + decode steps of text ids
    model_format = "checkpoint"
    name = "peer"
    precision = "fp32"

    def __init__(self, model_dir: str | Path, device: str = "cpu"):
        if device != "cpu":
            raise RuntimeError(f"{self.name} is measured on the CPU only (asked: {device})")
        self.model_dir = Path(model_dir)
        self.config = TraceConfig.from_dir(self.model_dir)  # the bench's prompt building
        self.weight_bytes: float | None = None  # the engine's model file(s): the floor's bytes

    @classmethod
    def prepare(cls, model_dir: str | Path) -> Path:
        """Make (once) and return the engine's model for *model_dir*."""
        raise NotImplementedError

    def synchronize(self) -> None:
        """CPU engines return results synchronously."""
