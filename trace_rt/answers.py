"""Several questions about one encoded video: their sequences, decoded together.

What :meth:`trace_rt.pipeline.Pipeline.run_many` does once the video is encoded (or found
in the video cache): one :class:`~trace_rt.engine.Sequence` per question, all run by one
:class:`~trace_rt.engine.Engine` over the backend's KV slots, then one result per question.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from trace_rt.engine import Engine, GenerationConfig
from trace_rt.engine import Sequence as Seq
from trace_rt.engine.cache import VideoEntry
from trace_rt.events import Event, EventParser
from trace_rt.prompts import CUSTOM_TASK

if TYPE_CHECKING:
    from trace_rt.pipeline import Pipeline, Question


def answer_questions(
    pipe: Pipeline,
    entry: VideoEntry,
    questions: Sequence[Question],
    prompts: list[list[int]],
    gen: GenerationConfig,
    on_event: Callable[[int, Event], None] | None,
    t0: float,
) -> list[dict[str, Any]]:
    """Decode *prompts* (one per question) over *entry*'s encoded video, batched on the
    pipeline's backend, each starting from the video's cached KV prefix; one ``trace-rt
    run`` dict per question (plus ``video_id``, ``cache`` and per-question timings), the
    times measured from *t0*, the call's start.

    Raises:
        The first failed question's error.
    """
    meta = entry.meta
    parsers = [EventParser(pipe.tokenizer, pipe.config.ids) for _ in questions]
    events: list[list[Event]] = [[] for _ in questions]

    def feeder(i: int) -> Callable[[int], None]:
        def feed(token: int) -> None:
            for ev in parsers[i].feed(token):
                events[i].append(ev)
                if on_event is not None:
                    on_event(i, ev)

        return feed

    seqs = [
        Seq(
            ids,
            entry.video,
            gen,
            duration=meta["duration"],
            frame_times=meta["times"],
            on_token=feeder(i),
            prefixes=entry.prefixes,
        )
        for i, ids in enumerate(prompts)
    ]
    Engine(pipe.backend).run(seqs)
    pipe.backend.synchronize()
    spent = meta.pop("timing_ms", None)  # the encode's cost goes to this call only
    out = []
    for i, (q, seq) in enumerate(zip(questions, seqs, strict=True)):
        if seq.error is not None:
            raise seq.error
        for ev in parsers[i].finish():
            events[i].append(ev)
            if on_event is not None:
                on_event(i, ev)
        tm = seq.timing
        timing = {
            "video": spent["video"] if spent and i == 0 else 0.0,
            "vision": spent["vision"] if spent and i == 0 else 0.0,
            "queue": (tm["admitted"] - tm["queued"]) * 1e3,
            "prefill": (tm["prefilled"] - tm["admitted"]) * 1e3,
            "ttft": (tm["first_token"] - t0) * 1e3,
            "decode": (tm["finished"] - tm["prefilled"]) * 1e3,
            "total": (tm["finished"] - t0) * 1e3,
        }
        answer = {}
        if q.task in (None, CUSTOM_TASK):
            answer = {"answer": events[i][0].caption if events[i] else ""}
        out.append(
            {
                "task": CUSTOM_TASK if q.task is None else q.task,
                **({"query": q.query} if q.query is not None else {}),
                **answer,
                "duration": round(meta["duration"], 3),
                "frames": len(meta["times"]),
                "events": [e.to_dict() for e in events[i]],
                "token_ids": seq.tokens,
                "prompt_ids": prompts[i],
                "frame_times": [round(float(t), 6) for t in meta["times"]],
                "stop_reason": seq.stop_reason,
                "video_id": entry.key or None,
                "cache": {"video": spent is None, "prefix": bool(seq.prefix_hit)},
                "timing_ms": timing,
            }
        )
    return out
