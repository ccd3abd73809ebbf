"""A served request's state between the thread that admits it and the engine thread.

The ``trace_pipeline`` model admits a request on a worker thread (parse, video cache,
prompt) and the engine thread decodes it, streams its events and answers it; a
:class:`Job` carries what both need. No Triton import: the sender and the request are
whatever the server passes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trace_rt.engine import Sequence
from trace_rt.engine.cache import VideoEntry, content_hash, video_key
from trace_rt.events import Event, EventParser
from trace_rt.prompts import CUSTOM_TASK
from trace_rt.serving.protocol import ServingRequest


@dataclass(eq=False)
class Job:
    """One request on its way through the instance.

    Attributes:
        sender: the request's response sender (events, then the final response).
        cancelled: True once the client has gone (cheap to call often).
        t0: arrival time (``time.perf_counter``).
        pin: the video cache entry's context manager, entered by the worker and exited
            (unpinned) by :meth:`release` once the request is answered.
        owner: this request filled the cache entry (a miss: its video was decoded and
            encoded for it); False for a hit.
        steps0: the engine's (steps, sequences) when its first token came (its batch
            sizes are the difference at its end).
    """

    sender: Any
    cancelled: Callable[[], bool]
    t0: float
    task: str | None = None  # the request's task name, for metric labels only
    req: ServingRequest | None = None
    prompt_ids: list[int] | None = None
    pin: Any = None
    entry: VideoEntry | None = None
    owner: bool = False
    video_ms: float = 0.0
    vision_ms: float = 0.0
    parser: EventParser | None = None
    events: list[Event] = field(default_factory=list)
    steps0: tuple[int, int] | None = None

    def release(self) -> None:
        """Unpin the cache entry (idempotent)."""
        pin, self.pin = self.pin, None
        if pin is not None:
            pin.__exit__(None, None, None)


def cache_key(req: ServingRequest, n_frames: int, preprocess: Any, fingerprint: str) -> str:
    """The video cache key (the ``video_id``) of a request that sends bytes or frames.

    Bytes: sha256 of the file with the frame count, the release's uniform sampling, the
    preprocessing and the model (:func:`~trace_rt.engine.cache.video_key`). Frames: sha256
    of the frames (shape and float32 values), their timestamps and the duration, as
    sampling ``frames``, so they never collide with a decoded file's entry.
    """
    if req.video is not None:
        content, sampling = content_hash(req.video), "uniform"
    else:
        h = hashlib.sha256()
        frames = np.ascontiguousarray(req.frames, dtype=np.float32)
        h.update(repr(frames.shape).encode())
        h.update(frames.tobytes())
        h.update(np.ascontiguousarray(req.timestamps, dtype=np.float64).tobytes())
        h.update(repr(req.duration).encode())
        content, sampling = h.hexdigest(), "frames"
    return video_key(content, n_frames, sampling, preprocess, fingerprint)


def job_result(job: Job, seq: Sequence, engine: dict[str, Any]) -> dict[str, Any]:
    """The final response of a finished *seq*: the ``trace-rt run`` JSON plus the
    ``video_id``, the cache's part in it and the engine's figures (*engine*)."""
    req, entry = job.req, job.entry
    assert req is not None and entry is not None and job.prompt_ids is not None
    meta, tm = entry.meta, seq.timing
    if req.video is not None:
        source = f"<{len(req.video)} bytes>"
    elif req.video_id is not None:
        source = f"<video_id {req.video_id}>"
    else:
        source = "<frames>"
    task = req.task or CUSTOM_TASK  # a free question is task custom, as `trace-rt run` says
    answer = {}
    if task == CUSTOM_TASK:
        # As the original's QA evaluation reads it: the first event's caption.
        answer = {"answer": job.events[0].caption if job.events else ""}
    prefilled = tm.get("prefilled", tm["admitted"])
    timing = {
        "video": job.video_ms,  # decode + preprocessing (0 for a cache hit)
        "vision": job.vision_ms,  # vision encoder + projector (0 for a cache hit)
        "queue": (tm["admitted"] - tm["queued"]) * 1e3,  # waiting for a KV slot
        "prefill": (prefilled - tm["admitted"]) * 1e3,
        "decode": (tm["finished"] - prefilled) * 1e3,
    }
    return {
        "video": source,
        "task": task,
        **answer,
        "duration": round(float(meta["duration"]), 3),
        "frames": len(meta["times"]),
        "events": [e.to_dict() for e in job.events],
        "token_ids": list(seq.tokens),
        "prompt_ids": job.prompt_ids,
        "frame_times": [round(float(t), 6) for t in meta["times"]],
        "stop_reason": seq.stop_reason,
        "video_id": entry.key,
        "cache": {"video": not job.owner, "prefix": bool(seq.prefix_hit)},
        "engine": engine,
        "timing_ms": timing,
    }
