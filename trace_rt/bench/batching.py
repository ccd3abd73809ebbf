"""Many requests on one engine: ``--concurrency`` and ``--queries-per-video`` in-process.

Two measurements per in-process backend that owns a pool of KV slots (its class takes
``max_sequences``), after the per-stage runs and with the same request (video, frames,
``--decode-steps``, EOS ignored so every request does the same number of steps):

**Concurrency** (``--concurrency 1,2,4,8``). For each level N, N copies of the request
arrive at once (time 0):

- *batched*: one :class:`~trace_rt.engine.Engine` over a backend with ``max_sequences=N``;
  each request's video is decoded and encoded, then all N are queued and the engine
  admits (prefills) them and decodes them together, continuous batching;
- *one at a time*: the same requests through an engine over a ``max_sequences=1`` backend,
  each run to its end before the next starts (today's unbatched server). Measured once
  with max(N) requests: its first N requests are exactly the N-request run (every request
  arrived at 0, so request k's latency is the same whatever follows it).

Per level and mode: requests/s (N / time to the last token), per-request latency (arrival
to its last token) p50/p90, time to first token, aggregate decode tokens/s (decode tokens
of all requests / wall time spent decoding: the engine's time minus its prefill calls),
the per-sequence step (time between a sequence's consecutive tokens) and the engine's mean
batch size.

**Batch-1 step** (when level 1 is measured): the engine with one sequence against the
single-request path (:func:`trace_rt.generate.generate`), both on one warmed
``max_sequences=1`` backend, alternating (engine first on even pairs, single first on odd)
for ``--runs`` pairs; each side's figure is the median over pairs of its p50 step. Taking
the per-stage table's step instead compares runs from different loads and warm-ups.

**Queries per video** (``--queries-per-video N``): N ``mr`` queries about the bench's video,
``decode_steps + 1`` tokens each:

- *independent*: N :meth:`Pipeline.run` calls (each decodes, encodes and prefills the video);
- *cached, one at a time*: N :meth:`Pipeline.run_many` calls with one query each, sharing
  a :class:`~trace_rt.engine.VideoCache`: the first encodes the video and saves the
  prompt prefix's K/V, later ones start from them. The second query's ttft and end to end
  as a fraction of the first's are the issue's "second query on a cached video";
- *batched*: one :meth:`Pipeline.run_many` call with all N queries (one encode, one prefix
  prefill, decoded together over a backend with ``max_sequences=N``).

The workload speed-up is the independent runs' total time over each mode's.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from trace_rt.bench.load import LoadWindow
from trace_rt.bench.plugins import BackendSpec
from trace_rt.bench.runner import Request, _free_memory, build_options, one_request
from trace_rt.bench.stats import percentile
from trace_rt.engine import Engine, VideoCache
from trace_rt.engine import Sequence as Seq
from trace_rt.pipeline import Pipeline, Question
from trace_rt.prompts import PromptSet
from trace_rt.tokenizer import TextTokenizer

Progress = Callable[[str], None]
# Queries about the bench's synthetic clip (a square moving over a changing background).
QUERIES = (
    "a red square moves across the screen",
    "the background changes colour",
    "the square reaches the right edge",
    "the square starts again from the left",
    "the picture turns darker",
    "the square is in the middle of the frame",
    "the background is at its brightest",
    "the clip ends",
)
WARMUP_STEPS = 2  # decode steps of a warmup request: enough to run every graph once


def takes_pool(cls: type) -> bool:
    """Whether a backend class owns a pool of KV slots (takes ``max_sequences``)."""
    import inspect

    return "max_sequences" in inspect.signature(cls.__init__).parameters


def queries(n: int, first: str | None = None) -> list[str]:
    """*n* distinct ``mr`` queries (``first`` leads when given)."""
    base = [first] if first else []
    base += [q for q in QUERIES if q != first]
    return [base[i % len(base)] + (f" ({i // len(base) + 1})" if i >= len(base) else "")
            for i in range(n)]  # fmt: skip


@dataclass
class Loader:
    """Loads one backend class with a given pool size, on the bench's device and dtype."""

    spec: BackendSpec
    cls: type
    model_dir: Path
    device: str
    dtype: str | None

    def pipeline(self, slots: int, cache: VideoCache | None = None) -> Pipeline:
        opts = build_options(self.cls, self.spec, self.device, self.dtype)
        opts["max_sequences"] = slots
        backend = self.cls(self.model_dir, **opts)
        tok = TextTokenizer.from_dir(self.model_dir)
        return Pipeline(backend, tok, PromptSet.for_model(self.model_dir), video_cache=cache)


class _Timed:
    """A backend seen through a stopwatch on its prefill calls (the engine's time minus
    these is its decoding time)."""

    def __init__(self, backend: Any):
        self._backend = backend
        self.prefill_s = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def _timed(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.prefill_s += time.perf_counter() - t

    def prefill(self, *args: Any, **kwargs: Any) -> Any:
        return self._timed(self._backend.prefill, *args, **kwargs)

    def save_prefix(self, *args: Any, **kwargs: Any) -> Any:
        return self._timed(self._backend.save_prefix, *args, **kwargs)


# ---- concurrency ----------------------------------------------------------------------------
def _sequence(pipe: Pipeline, req: Request, marks: list[float]) -> Seq:
    """Decode, preprocess and encode the request's video; its sequence, not yet queued."""
    backend, gen = pipe.backend, req.gen
    prep = pipe.prepare(req.video, req.task, query=req.query, frames=req.frames, gen=gen)
    video = backend.encode_video(prep.pixel_values, prep.time_ids)
    backend.synchronize()
    return Seq(
        prep.prompt_ids,
        video,
        gen,
        duration=prep.clip.duration,
        frame_times=prep.clip.times,
        on_token=lambda _t: marks.append(time.perf_counter()),
    )


def serve(pipe: Pipeline, req: Request, n: int, batched: bool) -> dict[str, Any]:
    """N copies of *req* arriving at once, batched or one at a time; per-request records
    (seconds from arrival) and the engine's figures."""
    timed = _Timed(pipe.backend)
    engine = Engine(timed)
    records: list[dict[str, Any]] = []
    seqs: list[tuple[Seq, list[float]]] = []
    engine_s = 0.0
    t0 = time.perf_counter()
    for _ in range(n):
        marks: list[float] = []
        seqs.append((_sequence(pipe, req, marks), marks))
        if not batched:
            before, t = timed.prefill_s, time.perf_counter()
            engine.run([seqs[-1][0]])
            spent = time.perf_counter() - t
            engine_s += spent
            seqs[-1][0].timing["decode_s"] = spent - (timed.prefill_s - before)
    if batched:
        t = time.perf_counter()
        engine.run([s for s, _ in seqs])
        engine_s = time.perf_counter() - t
    pipe.backend.synchronize()
    for seq, marks in seqs:
        if seq.error is not None:
            raise seq.error
        records.append(
            {
                "latency_s": seq.timing["finished"] - t0,
                "ttft_s": marks[0] - t0,
                "decode_tokens": len(seq.tokens) - 1,
                "decode_s": seq.timing.get("decode_s"),
                "steps_ms": [(b - a) * 1e3 for a, b in itertools.pairwise(marks)],
                "token_ids": list(seq.tokens),
            }
        )
    st = engine.stats
    return {
        "records": records,
        "decode_s": engine_s - timed.prefill_s,
        "mean_batch": st.batch_sum / st.steps if st.steps else None,
    }


def level_figures(records: list[dict[str, Any]], decode_s: float) -> dict[str, Any]:
    """One level's figures from its requests' records (times from a common arrival)."""
    lat = [r["latency_s"] * 1e3 for r in records]
    ttft = [r["ttft_s"] * 1e3 for r in records]
    steps = [x for r in records for x in r["steps_ms"]]
    tokens = sum(r["decode_tokens"] for r in records)
    wall = max(r["latency_s"] for r in records)
    return {
        "requests": len(records),
        "wall_s": round(wall, 6),
        "requests_per_s": round(len(records) / wall, 4),
        "latency_p50_ms": round(percentile(lat, 50), 1),
        "latency_p90_ms": round(percentile(lat, 90), 1),
        "ttft_p50_ms": round(percentile(ttft, 50), 1),
        "decode_tokens": tokens,
        "decode_s": round(decode_s, 6),
        "decode_tokens_per_s": round(tokens / decode_s, 3) if decode_s > 0 else None,
        "step_p50_ms": round(percentile(steps, 50), 2) if steps else None,
        "latency_ms": [round(x, 1) for x in lat],
    }


def measure_concurrency(
    load: Loader, req: Request, levels: list[int], warmup: int, note: Progress
) -> dict[str, Any]:
    """Every level batched, and the one-at-a-time baseline; see the module docstring."""
    short = replace(req, decode_steps=WARMUP_STEPS)
    note("one at a time: load")
    pipe = load.pipeline(1)
    for _ in range(warmup):
        serve(pipe, short, 1, batched=False)
    note(f"one at a time: {max(levels)} requests")
    alone = serve(pipe, req, max(levels), batched=False)
    del pipe
    _free_memory()
    solo_tokens = alone["records"][0]["token_ids"]
    out = []
    for n in levels:
        note(f"batched: {n} slots, load")
        pipe = load.pipeline(n)
        for _ in range(warmup):
            serve(pipe, short, 1, batched=True)  # every slot's row runs: all graphs warm
        note(f"batched: {n} requests at once")
        run = serve(pipe, req, n, batched=True)
        del pipe
        _free_memory()
        first = alone["records"][:n]
        base = level_figures(first, sum(r["decode_s"] for r in first))
        base["mean_batch"] = 1.0
        level = {"concurrency": n, "batched": level_figures(run["records"], run["decode_s"])}
        level["batched"]["mean_batch"] = round(run["mean_batch"] or 0.0, 3)
        level["one_at_a_time"] = base
        level["tokens_match"] = all(r["token_ids"] == solo_tokens for r in run["records"])
        b, s = level["batched"], base
        level["requests_per_s_vs_one_at_a_time"] = _ratio(b["requests_per_s"], s["requests_per_s"])
        level["decode_tokens_per_s_vs_one_at_a_time"] = _ratio(
            b["decode_tokens_per_s"], s["decode_tokens_per_s"]
        )
        out.append(level)
    one = next((lv for lv in out if lv["concurrency"] == 1), None)
    for lv in out:
        lv["decode_tokens_per_s_vs_level_1"] = _ratio(
            lv["batched"]["decode_tokens_per_s"],
            one["batched"]["decode_tokens_per_s"] if one else None,
        )
    return {"levels": out, "one_at_a_time_requests": max(levels)}


def measure_batch1(load: Loader, req: Request, pairs: int, warmup: int) -> dict[str, Any]:
    """The engine's batch-1 step vs the single-request path's, alternating on one backend."""
    pipe = load.pipeline(1)
    try:
        engine_ms, single_ms = _batch1_pairs(pipe, req, pairs, warmup)
    finally:
        del pipe
        _free_memory()
    e, s = percentile(engine_ms, 50), percentile(single_ms, 50)
    per_pair = [a / b for a, b in zip(engine_ms, single_ms, strict=True)]
    return {
        "engine_ms": round(e, 3),
        "single_request_ms": round(s, 3),
        "ratio": _ratio(e, s),
        "pairs": pairs,
        "pair_ratio_min": round(min(per_pair), 4),
        "pair_ratio_max": round(max(per_pair), 4),
    }


def _batch1_pairs(
    pipe: Pipeline, req: Request, pairs: int, warmup: int
) -> tuple[list[float], list[float]]:
    """p50 step of each side per pair; the order alternates so drift hits both alike."""
    short = replace(req, decode_steps=WARMUP_STEPS)
    for _ in range(max(warmup, 1)):
        serve(pipe, short, 1, batched=True)
        one_request(pipe, short, staged=False)
    engine_ms: list[float] = []
    single_ms: list[float] = []
    for i in range(pairs):
        for side in ("engine", "single") if i % 2 == 0 else ("single", "engine"):
            if side == "engine":
                steps = serve(pipe, req, 1, batched=True)["records"][0]["steps_ms"]
                engine_ms.append(percentile(steps, 50))
            else:
                single_ms.append(percentile(one_request(pipe, req, False)["decode_steps"], 50))
    return engine_ms, single_ms


# ---- queries per video ----------------------------------------------------------------------
def _timed_run(pipe: Pipeline, req: Request, query: str) -> dict[str, Any]:
    marks: list[float] = []
    t0 = time.perf_counter()
    r = pipe.run(req.video, "mr", query=query, frames=req.frames, gen=req.gen,
                 on_token=lambda _t: marks.append(time.perf_counter()))  # fmt: skip
    end = time.perf_counter()
    return {"ttft_ms": (marks[0] - t0) * 1e3, "end_to_end_ms": (end - t0) * 1e3,
            "token_ids": r["token_ids"]}  # fmt: skip


def _many(pipe: Pipeline, req: Request, qs: list[str]) -> tuple[list[dict[str, Any]], float]:
    t0 = time.perf_counter()
    rs = pipe.run_many(req.video, [Question("mr", q) for q in qs], frames=req.frames, gen=req.gen)
    wall = time.perf_counter() - t0
    out = [
        {"ttft_ms": r["timing_ms"]["ttft"], "end_to_end_ms": r["timing_ms"]["total"],
         "cache": r["cache"], "token_ids": r["token_ids"]}
        for r in rs
    ]  # fmt: skip
    return out, wall


def measure_queries(
    load: Loader, req: Request, n: int, warmup: int, note: Progress
) -> dict[str, Any]:
    """N ``mr`` queries about one video: independent, cached one at a time, batched."""
    qs = queries(n, req.query)
    short = replace(req, decode_steps=WARMUP_STEPS)
    note("queries: load")
    pipe = load.pipeline(1)
    for _ in range(warmup):
        _timed_run(pipe, short, qs[0])
    note(f"queries: {n} independent runs")
    independent = [_timed_run(pipe, req, q) for q in qs]
    note(f"queries: {n} cached, one at a time")
    pipe.video_cache = VideoCache()
    cached: list[dict[str, Any]] = []
    cached_s = 0.0
    for q in qs:
        rows, wall = _many(pipe, req, [q])
        cached += rows
        cached_s += wall
    del pipe
    _free_memory()
    note(f"queries: {n} batched, load")
    pipe = load.pipeline(n)
    for _ in range(warmup):
        _many(pipe, short, qs[:1])
    note(f"queries: {n} batched in one call")
    batched, batched_s = _many(pipe, req, qs)
    del pipe
    _free_memory()
    independent_s = sum(r["end_to_end_ms"] for r in independent) / 1e3
    same = all(
        a["token_ids"] == b["token_ids"] == c["token_ids"]
        for a, b, c in zip(independent, cached, batched, strict=True)
    )
    second = {}
    if n >= 2:
        second = {
            "ttft_fraction": _ratio(cached[1]["ttft_ms"], cached[0]["ttft_ms"]),
            "end_to_end_fraction": _ratio(cached[1]["end_to_end_ms"], cached[0]["end_to_end_ms"]),
        }
    return {
        "queries": qs,
        "decode_tokens": req.decode_steps + 1,
        "independent": _rows(independent),
        "cached_one_at_a_time": _rows(cached),
        "batched": _rows(batched),
        "second_query": second,
        "workload_s": {
            "independent": round(independent_s, 3),
            "cached_one_at_a_time": round(cached_s, 3),
            "batched": round(batched_s, 3),
        },
        "workload_speedup": {
            "cached_one_at_a_time": _ratio(independent_s, cached_s),
            "batched": _ratio(independent_s, batched_s),
        },
        "tokens_match": same,
    }


def _rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {k: round(v, 1) if isinstance(v, float) else v for k, v in r.items() if k != "token_ids"}
        for r in rows
    ]


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 4) if a is not None and b else None


# ---- the CLI's section ------------------------------------------------------------------------
def check_args(concurrency: str | None, queries_per_video: int | None) -> list[int] | None:
    """The parsed ``--concurrency`` levels (None when not given); bad values raise
    ValueError before anything is measured."""
    from trace_rt.bench.triton import parse_concurrency

    if queries_per_video is not None and queries_per_video < 1:
        raise ValueError(f"--queries-per-video must be at least 1, got {queries_per_video}")
    return parse_concurrency(concurrency) if concurrency else None


def run_section(
    specs: list[BackendSpec],
    skipped: dict[str, str],
    args: Any,
    req: Request,
    entries: dict[str, dict[str, Any]],
    console: Any,
) -> dict[str, Any] | None:
    """``--concurrency`` and ``--queries-per-video`` for every in-process backend that ran
    and owns a KV-slot pool; the report's ``engine`` section (None when neither was asked)."""
    from trace_rt.bench.plugins import model_dir_for
    from trace_rt.errors import TraceError

    levels = check_args(args.concurrency, args.queries_per_video)
    n = args.queries_per_video
    if not levels and not n:
        return None
    section: dict[str, Any] = {
        "concurrency": {},
        "queries_per_video": {},
        "skipped": {},
        "load": {},  # backend -> the machine's load while it was measured (bench.load)
    }
    for spec in specs:
        if spec.name in skipped or spec.name not in entries:
            continue
        cls = spec.load_class()
        model_dir, _ = model_dir_for(spec.model_format(cls), args.model, args.artifacts)
        if not takes_pool(cls) or model_dir is None:
            section["skipped"][spec.name] = "no KV-slot pool: its class takes no max_sequences"
            continue
        load = Loader(spec, cls, model_dir, args.device, args.dtype)
        window = LoadWindow()
        t0 = time.perf_counter()
        with console.status(f"{spec.name}: engine") as status:

            def note(
                phase: str, name: str = spec.name, status: Any = status, t0: float = t0
            ) -> None:
                console.log(f"{name}: {phase} ({time.perf_counter() - t0:.0f} s)")
                status.update(f"{name}: {phase}")

            try:
                if levels:
                    conc = measure_concurrency(load, req, levels, args.warmup, note)
                    if 1 in levels:
                        note(f"batch-1 step: engine vs single request, {args.runs} pairs")
                        conc["batch1_step"] = measure_batch1(load, req, args.runs, args.warmup)
                    section["concurrency"][spec.name] = conc
                if n:
                    section["queries_per_video"][spec.name] = measure_queries(
                        load, req, n, args.warmup, note
                    )
            except (ImportError, RuntimeError, TraceError, OSError) as e:
                section["skipped"][spec.name] = f"{type(e).__name__}: {e}"
        section["load"][spec.name] = window.close()
    return section
