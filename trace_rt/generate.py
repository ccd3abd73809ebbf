"""The interleaved time/score/text decoding loop, written once for every backend.

Generation starts in the time head (the prompt ends with a text ``<sync>``). Each step
the active head's logits are turned into one id of the unified id space, fed back, and
the head switches on ``<sync>``: time -> score -> text -> time. EOS from the text head or
the token budget ends it (only the budget with ``ignore_eos``, for benchmarks).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trace_rt.backends.base import Backend
from trace_rt.constrained import SegmentGrammar, constrain_logits
from trace_rt.errors import InputError
from trace_rt.tokens import Head, head_base, next_head

TIMESTAMP_MODES = ("free", "frames")


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings.

    Attributes:
        max_new_tokens: the token budget.
        temperature: 0 means greedy (the paper's evaluation); > 0 samples.
        top_p: nucleus sampling mass (1.0 keeps every token).
        seed: seed of the sampler's generator (sampling only).
        constrained: let the time and score heads emit only well-formed numbers, with
            timestamps inside the video.
        ignore_eos: keep decoding past EOS until ``max_new_tokens`` (benchmarks: every
            backend then does the same number of steps, whatever its weights emit).
        timestamps: ``free`` (any well-formed value the model spells) or ``frames`` (the
            time head may only spell one of the sampled frames' times, ``dddd.d``: what
            ``trace-retrieval`` was trained to do). ``frames`` constrains the time head
            whatever ``constrained`` says; the score head follows ``constrained``.
    """

    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = 0
    constrained: bool = False
    ignore_eos: bool = False
    timestamps: str = "free"

    def __post_init__(self) -> None:
        if self.timestamps not in TIMESTAMP_MODES:
            raise InputError(
                f"timestamps must be one of {', '.join(TIMESTAMP_MODES)}, got {self.timestamps!r}"
            )
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise InputError(
                f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}"
            )
        if not 0.0 <= self.temperature <= 100.0:
            raise InputError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0
        ):
            # numpy's generators take only non-negative seeds.
            raise InputError(f"seed must be a non-negative integer, got {self.seed!r}")


@dataclass
class GenerationResult:
    token_ids: list[int]
    stop_reason: str  # "eos" or "max_new_tokens"
    timing_ms: dict[str, float] = field(default_factory=dict)


class Sampler:
    """Greedy or temperature/top-p sampling over one head's logits, seeded."""

    def __init__(self, gen: GenerationConfig):
        self.greedy = gen.temperature == 0.0
        self.temperature = gen.temperature
        self.top_p = gen.top_p
        self.rng = np.random.default_rng(gen.seed)

    def __call__(self, logits: np.ndarray) -> int:
        if self.greedy:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / self.temperature
        z -= z.max()
        p = np.exp(z)
        p /= p.sum()
        if self.top_p < 1.0:
            order = np.argsort(-p, kind="stable")
            cum = np.cumsum(p[order])
            # Keep the smallest prefix whose mass reaches top_p (at least one token).
            keep = order[: int(np.searchsorted(cum, self.top_p)) + 1]
            q = np.zeros_like(p)
            q[keep] = p[keep]
            p = q / q.sum()
        return int(self.rng.choice(p.size, p=p))


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
    """
    ids = backend.config.ids
    eos = backend.config.eos_token_id
    sample = Sampler(gen)
    if gen.timestamps == "frames" and (frame_times is None or len(frame_times) == 0):
        raise InputError("timestamps='frames' needs the sampled frames' times")
    head = Head.TIME
    grammar = _grammar(gen, head, duration, frame_times)

    t0 = time.perf_counter()
    logits = backend.prefill(prompt_ids, video, head)
    t1 = time.perf_counter()
    out: list[int] = []
    stop = "max_new_tokens"
    while True:
        if grammar is not None:
            logits = constrain_logits(logits, grammar.allowed())
        local = sample(logits)
        if grammar is not None:
            grammar.advance(local)
        token = head_base(ids, head) + local
        out.append(token)
        if on_token is not None:
            on_token(token)
        if head == Head.TEXT and token == eos and not gen.ignore_eos:
            stop = "eos"
            break
        if len(out) >= gen.max_new_tokens:
            break
        new_head = next_head(ids, head, token)
        if new_head != head:
            head, grammar = new_head, _grammar(gen, new_head, duration, frame_times)
        logits = backend.decode_step(token, head)
    backend.synchronize()
    t2 = time.perf_counter()
    return GenerationResult(
        token_ids=out,
        stop_reason=stop,
        timing_ms={"prefill": (t1 - t0) * 1e3, "decode": (t2 - t1) * 1e3},
    )


def _grammar(
    gen: GenerationConfig,
    head: Head,
    duration: float | None,
    frame_times: Sequence[float] | None,
) -> SegmentGrammar | None:
    if head == Head.TIME and gen.timestamps == "frames":
        return SegmentGrammar(head, frame_times=frame_times)
    if not gen.constrained or head == Head.TEXT:
        return None
    return SegmentGrammar(head, duration if head == Head.TIME else None)
