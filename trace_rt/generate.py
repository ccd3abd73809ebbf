"""The decoding loop's one-sequence entry point.

The loop itself is written once, in :mod:`trace_rt.engine`: a :class:`Sequence` holds the
interleaved time/score/text rules and an :class:`Engine` drives sequences over a backend's
KV slots. :func:`generate` is the single-request case (one sequence in slot 0), which every
backend runs with the same ids as before batching existed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from trace_rt.backends.base import Backend
from trace_rt.engine.scheduler import Engine
from trace_rt.engine.sequence import TIMESTAMP_MODES, GenerationConfig, Sampler
from trace_rt.engine.sequence import Sequence as Seq

__all__ = ["TIMESTAMP_MODES", "GenerationConfig", "GenerationResult", "Sampler", "generate"]


@dataclass
class GenerationResult:
    token_ids: list[int]
    stop_reason: str  # "eos" or "max_new_tokens"
    timing_ms: dict[str, float] = field(default_factory=dict)


def generate(
    backend: Backend,
    prompt_ids: Sequence[int],
    video: Any,
    gen: GenerationConfig,
    *,
    duration: float | None = None,
    frame_times: Sequence[float] | None = None,
    on_token: Callable[[int], None] | None = None,
) -> GenerationResult:
    """Prefill *prompt_ids* with *video* spliced in, then decode until EOS or the budget.

    Args:
        backend: any :class:`Backend`.
        prompt_ids: prompt in unified ids with -201 where the video block goes.
        video: the handle :meth:`Backend.encode_video` returned.
        gen: decoding settings.
        duration: the video's length in seconds (bounds timestamps in constrained mode).
        frame_times: the sampled frames' times in seconds (needed for
            ``gen.timestamps == "frames"``).
        on_token: called with each new id as soon as it is chosen (for streaming).

    Raises:
        Whatever the backend or *on_token* raised (a one-sequence run has no one else to
        protect, so its error is the caller's).
    """
    seq = Seq(
        list(prompt_ids), video, gen, duration=duration, frame_times=frame_times, on_token=on_token
    )
    t0 = time.perf_counter()
    Engine(backend, max_batch=1).run([seq])
    backend.synchronize()
    t2 = time.perf_counter()
    if seq.error is not None:
        raise seq.error
    t1 = seq.timing.get("prefilled", t2)
    return GenerationResult(
        token_ids=seq.tokens,
        stop_reason=seq.stop_reason or "max_new_tokens",
        timing_ms={"prefill": (t1 - t0) * 1e3, "decode": (t2 - t1) * 1e3},
    )
