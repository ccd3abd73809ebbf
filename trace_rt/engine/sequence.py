"""One request's decoding state: the interleaved time/score/text rules, written once.

Generation starts in the time head (the prompt ends with a text ``<sync>``). Each step the
active head's logits are turned into one id of the unified id space, fed back, and the
head switches on ``<sync>``: time -> score -> text -> time. EOS from the text head or the
token budget ends it (only the budget with ``ignore_eos``, for benchmarks).

A :class:`Sequence` owns everything that differs between requests decoded together (head,
grammar, sampler and its seed, budget, stop, callbacks), so a batch step is just "each
sequence takes its row of logits": a sequence decodes the same ids alone or in a batch.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np

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
        seed: seed of the sampler's generator (sampling only); each sequence has its own.
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


class Status(Enum):
    WAITING = "waiting"  # queued for a KV slot
    RUNNING = "running"  # prefilled, decoding
    FINISHED = "finished"  # stopped (eos, budget, cancelled) or failed (``error``)


_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """One prompt being answered.

    Args:
        prompt_ids: unified ids with -201 where the video block goes.
        video: the backend's video handle (``encode_video``), or None when *prefix* covers it.
        gen: decoding settings.
        duration: the video's length in seconds (bounds timestamps in constrained mode).
        frame_times: the sampled frames' times (needed for ``timestamps="frames"``).
        on_token: called with each new id as soon as it is chosen (streaming); an exception
            it raises fails this sequence only.
        cancelled: asked before every step; True stops the sequence (``cancelled``).
        prefixes: where this prompt's KV prefix (up to the end of the video block) is
            cached, a dict-like keyed by the ids before the video (the video cache's
            entry); None decodes without a prefix cache.
    """

    prompt_ids: list[int]
    video: Any
    gen: GenerationConfig
    duration: float | None = None
    frame_times: Any = None
    on_token: Callable[[int], None] | None = None
    cancelled: Callable[[], bool] | None = None
    prefixes: Any = None
    seq_id: int = field(default_factory=lambda: next(_ids))
    status: Status = Status.WAITING
    slot: int | None = None
    tokens: list[int] = field(default_factory=list)
    stop_reason: str | None = None
    error: BaseException | None = None
    prefix_hit: bool | None = None  # None: no prefix cache
    timing: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.gen.timestamps == "frames" and (
            self.frame_times is None or len(self.frame_times) == 0
        ):
            raise InputError("timestamps='frames' needs the sampled frames' times")
        self.head = Head.TIME
        self.sampler = Sampler(self.gen)
        self.grammar = self._grammar(self.head)
        self.last: int | None = None  # the id to feed at the next step
        self.positions = 0  # the prompt's positions in the KV cache, once prefilled
        self.timing["queued"] = time.perf_counter()

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def accept(self, logits: np.ndarray, ids, eos: int) -> None:
        """Choose the next id from this sequence's head *logits*; stop or switch heads."""
        if self.grammar is not None:
            logits = constrain_logits(logits, self.grammar.allowed())
        local = self.sampler(logits)
        if self.grammar is not None:
            self.grammar.advance(local)
        token = head_base(ids, self.head) + local
        self.tokens.append(token)
        if len(self.tokens) == 1:
            self.timing["first_token"] = time.perf_counter()
        if self.on_token is not None:
            self.on_token(token)
        if self.head == Head.TEXT and token == eos and not self.gen.ignore_eos:
            self.finish("eos")
            return
        if len(self.tokens) >= self.gen.max_new_tokens:
            self.finish("max_new_tokens")
            return
        new_head = next_head(ids, self.head, token)
        if new_head != self.head:
            self.head, self.grammar = new_head, self._grammar(new_head)
        self.last = token

    def finish(self, reason: str, error: BaseException | None = None) -> None:
        self.status = Status.FINISHED
        self.stop_reason = reason
        self.error = error
        self.timing["finished"] = time.perf_counter()

    def _grammar(self, head: Head) -> SegmentGrammar | None:
        gen = self.gen
        if head == Head.TIME and gen.timestamps == "frames":
            return SegmentGrammar(head, frame_times=self.frame_times)
        if not gen.constrained or head == Head.TEXT:
            return None
        return SegmentGrammar(head, self.duration if head == Head.TIME else None)
