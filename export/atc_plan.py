"""The fixed sizes of one ATC export (``python -m export atc``): frames, prefill length,
positions and ``--dynamic_dims`` gears, checked against the model's context."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trace_rt.backends.base import video_block_len
from trace_rt.config import TraceConfig
from trace_rt.errors import InputError

DEFAULT_NEW_TOKENS = 512  # GenerationConfig's default budget, for the default max_seq
GEARS = 4  # ATC recommends 3-4 gears; 2 is its minimum


@dataclass(frozen=True)
class Plan:
    """The fixed sizes of one ATC export: frames, prefill length, positions, gears."""

    frames: int
    video_len: int
    text_budget: int
    prefill_len: int
    max_seq: int
    past_capacity: int  # past slots; the step at position max_seq - 1 is the last
    dynamic_dims: bool
    prefill_gears: tuple[int, ...]
    past_gears: tuple[int, ...]

    @classmethod
    def make(
        cls,
        cfg: TraceConfig,
        frames: int | None,
        max_seq: int | None,
        text_budget: int,
        dynamic_dims: bool,
    ) -> Plan:
        frames = cfg.num_frames if frames is None else frames
        if frames < 1 or text_budget < 1:
            raise InputError("--frames and --text-budget must be positive")
        video = video_block_len(cfg, frames)
        prefill_len = video + text_budget
        limit = cfg.max_position_embeddings
        max_seq = min(prefill_len + DEFAULT_NEW_TOKENS, limit) if max_seq is None else max_seq
        if not prefill_len < max_seq <= limit:
            raise InputError(
                f"--max-seq {max_seq} must exceed the prefill length {prefill_len} (video "
                f"block {video} + text budget {text_budget}) and be at most the model's "
                f"context {limit}"
            )
        capacity = max_seq - 1
        return cls(
            frames=frames,
            video_len=video,
            text_budget=text_budget,
            prefill_len=prefill_len,
            max_seq=max_seq,
            past_capacity=capacity,
            dynamic_dims=dynamic_dims,
            prefill_gears=_gears(video, prefill_len) if dynamic_dims else (prefill_len,),
            # Every prompt holds the video block, so no step runs with a shorter past.
            past_gears=_gears(video, capacity) if dynamic_dims else (capacity,),
        )

    def to_dict(self) -> dict[str, Any]:
        """The manifest's record of the plan (the gears are recorded per variant)."""
        keys = ("frames", "video_len", "text_budget", "prefill_len", "max_seq")
        return {k: getattr(self, k) for k in (*keys, "past_capacity", "dynamic_dims")}


def _gears(base: int, top: int) -> tuple[int, ...]:
    """Up to GEARS lengths spaced evenly over (base, top], ending at top."""
    gears = sorted({base + (top - base) * k // GEARS for k in range(1, GEARS + 1)} - {base})
    if len(gears) < 2:
        raise InputError(f"--dynamic-dims needs at least 2 gears between {base} and {top}")
    return tuple(gears)
