"""Continuous batching over a backend's KV slots.

The :class:`Engine` keeps a queue of waiting sequences and the running ones, one per KV
slot. Each :meth:`Engine.step` first admits waiting sequences into free slots (their
prefill, from a cached KV prefix when the video cache has one), then advances every
running sequence by one id in a single batched :meth:`Backend.decode`, then retires the
finished ones, freeing their slots for the next step's admissions. A failure is the
failing sequence's alone: a prefill that raises, a callback that raises or a cancelled
request finish that sequence with its reason and leave the others decoding.

Why prefix K/V are copied into a slot rather than shared: the exported decoder takes each
sequence's past as one contiguous block of a pooled buffer (a portable, standard-op graph
that TensorRT and ATC take); sharing pages between sequences would need a paged-attention
kernel in every backend. The copy is a memcpy of the prefix's K/V (for the 7B model's
~1,850 prefix positions, ~230 MB at fp16), far cheaper than the prefill it replaces
(~27 TFLOP).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from trace_rt.backends.base import Backend, split_prompt
from trace_rt.engine.sequence import Sequence, Status
from trace_rt.errors import PromptTooLongError
from trace_rt.tokens import VIDEO_PLACEHOLDER_ID


@dataclass
class EngineStats:
    """Counters since the engine started (what a server exports as metrics)."""

    steps: int = 0  # batched decode steps
    batch_sum: int = 0  # sequences over all steps (mean batch = batch_sum / steps)
    prefills: int = 0
    prefix_hits: int = 0
    prefix_misses: int = 0
    finished: int = 0
    failed: int = 0
    queue_ms_sum: float = 0.0  # time from submit to admission, summed over admitted
    batch_sizes: list[int] = field(default_factory=list, repr=False)  # the last steps'

    def as_dict(self) -> dict[str, float]:
        return {
            "steps": self.steps,
            "mean_batch": self.batch_sum / self.steps if self.steps else 0.0,
            "prefills": self.prefills,
            "prefix_hits": self.prefix_hits,
            "prefix_misses": self.prefix_misses,
            "finished": self.finished,
            "failed": self.failed,
            "mean_queue_ms": self.queue_ms_sum / self.prefills if self.prefills else 0.0,
        }


class Engine:
    """Decodes many sequences on one backend, batching their decode steps.

    Args:
        backend: any :class:`~trace_rt.backends.base.Backend`; its ``max_sequences``
            slots bound how many sequences run at once (the rest wait).
        max_batch: at most this many sequences run at once (default: every slot).
    """

    def __init__(self, backend: Backend, max_batch: int | None = None):
        self.backend = backend
        slots = int(getattr(backend, "max_sequences", 1))
        self.max_batch = min(slots, max_batch or slots)
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}  # slot -> sequence
        self.free_slots = list(range(self.max_batch - 1, -1, -1))  # pop() gives slot 0 first
        self.stats = EngineStats()
        cfg = backend.config
        self._ids, self._eos = cfg.ids, cfg.eos_token_id
        self._limit = getattr(cfg, "max_position_embeddings", None)

    # ---- queue ----------------------------------------------------------------------
    def add(self, seq: Sequence) -> Sequence:
        """Queue *seq*; it is admitted at the next :meth:`step` with a free slot."""
        seq.status = Status.WAITING
        self.waiting.append(seq)
        return seq

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def run(self, seqs: Iterable[Sequence] = ()) -> None:
        """Queue *seqs* and step until every queued sequence has finished."""
        for s in seqs:
            self.add(s)
        while self.busy:
            self.step()

    # ---- one step -------------------------------------------------------------------
    def step(self) -> list[Sequence]:
        """Admit what fits, decode one id for every running sequence; returns the
        sequences that finished in this step."""
        done: list[Sequence] = []
        self._drop_cancelled(done)
        while self.waiting and self.free_slots:
            seq = self.waiting.popleft()
            self._admit(seq)
            if seq.finished:
                self._retire(seq, done)
        batch = [s for s in self.running.values() if not s.finished]
        if batch:
            self._decode(batch)
        for seq in list(self.running.values()):
            if seq.finished:
                self._retire(seq, done)
        return done

    def _drop_cancelled(self, done: list[Sequence]) -> None:
        for seq in list(self.waiting):
            if _is_cancelled(seq):
                self.waiting.remove(seq)
                seq.finish("cancelled")
                done.append(seq)
        for seq in list(self.running.values()):
            if _is_cancelled(seq):
                seq.finish("cancelled")
                self._retire(seq, done)

    def _admit(self, seq: Sequence) -> None:
        seq.slot = self.free_slots.pop()
        seq.status = Status.RUNNING
        self.running[seq.slot] = seq
        now = time.perf_counter()
        seq.timing["admitted"] = now
        self.stats.queue_ms_sum += (now - seq.timing["queued"]) * 1e3
        self.stats.prefills += 1
        try:
            logits = self._prefill(seq)
            seq.positions = _prompt_positions(seq)
            seq.timing["prefilled"] = time.perf_counter()
            seq.accept(logits, self._ids, self._eos)
        except Exception as e:
            seq.finish("error", e)

    def _prefill(self, seq: Sequence):
        b, head = self.backend, seq.head
        if seq.prefixes is None:
            return b.prefill(seq.prompt_ids, seq.video, head, slot=seq.slot)
        before, _ = split_prompt(seq.prompt_ids, VIDEO_PLACEHOLDER_ID)
        key = tuple(before)
        prefix = seq.prefixes.get(key)
        seq.prefix_hit = prefix is not None
        if prefix is None:
            self.stats.prefix_misses += 1
            prefix = b.save_prefix(seq.prompt_ids, seq.video, slot=seq.slot)
            seq.prefixes[key] = prefix
        else:
            self.stats.prefix_hits += 1
        return b.prefill(seq.prompt_ids, None, head, slot=seq.slot, prefix=prefix)

    def _decode(self, batch: list[Sequence]) -> None:
        ready = []
        for seq in batch:
            # Checked per sequence, so one sequence at the context's end fails alone.
            pos = seq.positions + len(seq.tokens) - 1  # where the fed id goes
            if self._limit is not None and pos >= self._limit:
                msg = f"generation reached the model's context of {self._limit}"
                seq.finish("error", PromptTooLongError(msg))
            else:
                ready.append(seq)
        if not ready:
            return
        slots = [s.slot for s in ready]
        try:
            rows = self.backend.decode(slots, [s.last for s in ready], [s.head for s in ready])
        except Exception as e:
            for seq in ready:
                seq.finish("error", e)
            return
        self.stats.steps += 1
        self.stats.batch_sum += len(ready)
        self.stats.batch_sizes = [*self.stats.batch_sizes[-255:], len(ready)]
        for seq, logits in zip(ready, rows, strict=True):
            try:
                seq.accept(logits, self._ids, self._eos)
            except Exception as e:
                seq.finish("error", e)

    def _retire(self, seq: Sequence, done: list[Sequence]) -> None:
        if seq.slot is not None and self.running.get(seq.slot) is seq:
            del self.running[seq.slot]
            self.backend.release(seq.slot)
            self.free_slots.append(seq.slot)
        if seq.error is not None:
            self.stats.failed += 1
        else:
            self.stats.finished += 1
        done.append(seq)


def _prompt_positions(seq: Sequence) -> int:
    """Positions the prompt filled (ids plus the video block; a lower bound for a video
    handle without a shape, where the backend's own check is the last word)."""
    rows = getattr(seq.video, "shape", (1,))[0] if seq.video is not None else 1
    if seq.video is None and seq.prefixes is not None:
        before, _ = split_prompt(seq.prompt_ids, VIDEO_PLACEHOLDER_ID)
        prefix = seq.prefixes.get(tuple(before))
        rows = prefix.video_len if prefix is not None else 1
    return len(seq.prompt_ids) - 1 + int(rows)


def _is_cancelled(seq: Sequence) -> bool:
    if seq.cancelled is None or seq.finished:
        return False
    try:
        return bool(seq.cancelled())
    except Exception:
        return True
