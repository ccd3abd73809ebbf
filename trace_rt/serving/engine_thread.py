"""One :class:`~trace_rt.engine.Engine` stepped by one thread, fed from any thread.

A server instance gets requests on many threads (Triton's ``execute``, its video-decode
workers) but an :class:`Engine` is single-threaded: its queue, slots and the backend's KV
pool are touched only between steps. :class:`EngineThread` is the seam: :meth:`submit`
queues a sequence and its completion callback under a lock, and the engine thread moves
them into the engine between steps, steps while anything waits or runs, and sleeps on a
condition when idle (no polling). Each finished sequence's callback runs on the engine
thread right after the step that finished it; a callback that raises is logged and the
loop goes on.

No Triton import: the server's model (``triton_repo/models/trace_pipeline.py``) and the
tests drive it alike.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from trace_rt.engine import Engine, Sequence

log = logging.getLogger(__name__)

Done = Callable[[Sequence], None]


@dataclass(frozen=True)
class EngineSnapshot:
    """What the engine thread reports between steps (metrics, per-request figures)."""

    steps: int  # batched decode steps so far
    batch_sum: int  # sequences summed over those steps
    slots: int  # KV slots of the pool
    slots_in_use: int  # sequences holding a slot
    waiting: int  # sequences queued for a slot (submitted, not yet admitted)


class EngineThread:
    """Runs *engine* on a thread of its own.

    Args:
        engine: the engine to step; only this object's thread touches it once started.
        lock: held around every step (e.g. a device lock shared with video encoders on a
            backend whose encoders and decoder share one stream); None: no lock.
        on_step: called on the engine thread after every step with a snapshot (metrics);
            an exception it raises is logged.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        lock: Any = None,
        on_step: Callable[[EngineSnapshot], None] | None = None,
        name: str = "trace-engine",
    ):
        self.engine = engine
        self._lock = lock if lock is not None else contextlib.nullcontext()
        self._on_step = on_step
        self._cond = threading.Condition()
        self._incoming: list[tuple[Sequence, Done]] = []
        self._callbacks: dict[int, Done] = {}
        self._stopping = False
        self._batch_counts: dict[int, int] = {}  # batch size -> decode steps
        self._snapshot = self._take_snapshot(0)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, seq: Sequence, done: Done) -> None:
        """Queue *seq*; ``done(seq)`` is called on the engine thread once it has finished
        (``seq.stop_reason``: eos, max_new_tokens, cancelled or error)."""
        with self._cond:
            if self._stopping:
                raise RuntimeError("the engine thread has stopped")
            self._incoming.append((seq, done))
            self._cond.notify()

    def snapshot(self) -> EngineSnapshot:
        """The figures after the last step (any thread)."""
        return self._snapshot

    def batch_counts(self) -> dict[int, int]:
        """Decode steps so far by batch size (any thread)."""
        return dict(self._batch_counts)

    def close(self, timeout: float = 10.0) -> None:
        """Stop after the current step; sequences still queued or running are finished as
        cancelled and their callbacks called."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    # ---- the engine thread -----------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._incoming and not self.engine.busy and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    break
                new, self._incoming = self._incoming, []
            for seq, done in new:
                self._callbacks[seq.seq_id] = done
                self.engine.add(seq)
            before = (self.engine.stats.steps, self.engine.stats.batch_sum)
            with self._lock:
                try:
                    finished = self.engine.step()
                except Exception as e:  # an engine bug: fail what it held, keep serving
                    log.exception("engine step failed")
                    finished = self._fail_all(e)
            stats = self.engine.stats
            if stats.steps == before[0] + 1:
                size = stats.batch_sum - before[1]
                self._batch_counts[size] = self._batch_counts.get(size, 0) + 1
            self._snapshot = self._take_snapshot(len(self.engine.waiting))
            for seq in finished:
                self._finish(seq)
            if self._on_step is not None:
                try:
                    self._on_step(self._snapshot)
                except Exception:
                    log.exception("engine on_step callback failed")
        self._drain()

    def _take_snapshot(self, waiting: int) -> EngineSnapshot:
        e = self.engine
        return EngineSnapshot(
            steps=e.stats.steps,
            batch_sum=e.stats.batch_sum,
            slots=e.max_batch,
            slots_in_use=len(e.running),
            waiting=waiting,
        )

    def _finish(self, seq: Sequence) -> None:
        done = self._callbacks.pop(seq.seq_id, None)
        if done is None:
            return
        try:
            done(seq)
        except Exception:
            log.exception("completion callback of sequence %s failed", seq.seq_id)

    def _fail_all(self, error: Exception) -> list[Sequence]:
        """Finish every queued and running sequence with *error* and start a fresh engine
        on the same backend (the old one's state is not trusted after a failed step)."""
        e = self.engine
        seqs = [*e.waiting, *e.running.values()]
        for slot in list(e.running):
            with contextlib.suppress(Exception):
                e.backend.release(slot)
        for seq in seqs:
            if not seq.finished:
                seq.finish("error", error)
        self.engine = Engine(e.backend, e.max_batch)
        self.engine.stats = e.stats
        return seqs

    def _drain(self) -> None:
        with self._cond:
            pending, self._incoming = self._incoming, []
        seqs = [s for s, _ in pending]
        for seq, done in pending:
            self._callbacks[seq.seq_id] = done
        seqs += [*self.engine.waiting, *self.engine.running.values()]
        for seq in seqs:
            if not seq.finished:
                seq.finish("cancelled")
            self._finish(seq)
