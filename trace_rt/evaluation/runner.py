"""``trace-rt eval``: run a benchmark through the pipeline (or a server), resumably.

``OUT/`` receives:

* ``run.json``: the settings that determine the generations (benchmark, task, the
  annotation files' sha256, model, frames, token budget, template). A later run into the
  same ``OUT`` resumes only with the same settings.
* ``predictions.jsonl``: one record per query (per video for dense captioning), appended
  and flushed as each generation finishes: ``key``, ``video_id``, ``video``, ``query``,
  ``duration``, ``frames``, ``stop_reason``, ``token_ids``, ``release`` (the original's
  lists, :func:`~trace_rt.evaluation.reformat.release_output`) and ``events`` (our
  parser's). A request that failed (an undecodable video) is recorded with ``error`` and
  retried by the next run; a line torn by an interruption is dropped on resume.
* ``missing_videos.txt``: video ids without a video file (or that are not plain file
  names), one per line with the reason and the number of queries they take with them.
* ``refmt_<task>.json`` (the original's prediction file), ``metrics.json``, ``metrics.md``.

Video QA (``mvbench``, ``videomme``, task ``qa``) asks each question as a free question
(:mod:`trace_rt.evaluation.videoqa`: the original's prompt, segment-midpoint frames, 128
new tokens); its records add ``question`` and its original-format file is ``refmt_qa.json``
(the original's ``test.json``: ``acc_dict``, ``res_list``).
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from trace_rt.errors import InputError, TraceError
from trace_rt.evaluation import benchmarks as bm
from trace_rt.evaluation import reformat as rf
from trace_rt.evaluation import videoqa as vqa
from trace_rt.evaluation.report import write_report
from trace_rt.evaluation.scoring import read_jsonl, score, to_original_format
from trace_rt.evaluation.videos import InvalidVideoIdError, VideoIndex

PREDICTIONS = "predictions.jsonl"


@dataclass
class EvalSettings:
    """Everything ``trace-rt eval`` takes (see ``trace-rt eval --help``)."""

    benchmark: str
    annotations: list[str]
    videos: str
    model: str
    out: str = "eval-out"
    backend: str | None = None  # None: from the directory (manifest.json -> onnxruntime)
    url: str | None = None  # a running `trace-rt serve` instead of a local backend
    task: str | None = None
    limit: int | None = None
    concurrency: int = 1
    frames: int | None = None
    max_new_tokens: int | None = None  # None: 128 for video QA (the original's), else 512
    device: str = "cpu"
    dtype: str | None = None
    template: str = "llama_2"
    rules: str = "original"
    use_java: bool | None = None
    progress: bool | None = None  # None: when stderr is a terminal
    report_items: str = "best-worst"  # report.html: which items get a timeline page
    report_n: int = 5  # report.html: how many best and worst items it shows
    links: tuple[str, ...] = ()  # report.html: other reports to link (bench markdown/PNG)


def infer_backend(model_dir: str | Path) -> str:
    """``onnxruntime`` for an exported artifact directory (it has ``manifest.json``),
    ``torch`` for a checkpoint; anything else is an error saying which it expected."""
    d = Path(model_dir)
    if not d.is_dir():
        raise InputError(f"model directory {d} does not exist")
    if (d / "manifest.json").is_file():
        return "onnxruntime"
    if (d / "config.json").is_file():
        return "torch"
    raise InputError(
        f"{d} is neither an exported artifact directory (no manifest.json; make one with "
        "`python -m export onnx CKPT DIR`) nor a checkpoint (no config.json)"
    )


@dataclass
class Work:
    key: str
    video_id: str
    path: Path
    task: str  # the prompt task
    query: str | None
    question: str | None = None  # video QA: the free question asked
    bound: tuple[float, float] | None = None  # video QA: MVBench's start/end


class _Engine:
    """Answers one request: a local pipeline, or a server over gRPC (thread-safe)."""

    def __init__(self, s: EvalSettings):
        from trace_rt.generate import GenerationConfig

        self.gen = GenerationConfig(max_new_tokens=token_budget(s))
        self.frames = s.frames
        self.url = s.url
        self.pipe = None
        self._local = threading.local()
        if s.url is None:
            from trace_rt.pipeline import Pipeline

            backend = s.backend or infer_backend(s.model)
            opts: dict[str, Any] = {"device": s.device}
            if backend == "torch":
                # The release evaluates in fp16 on GPU.
                opts["dtype"] = s.dtype or ("fp16" if s.device.startswith("cuda") else None)
            self.pipe = Pipeline.from_dir(s.model, backend, template=s.template, **opts)
            self.tok, self.ids = self.pipe.tokenizer, self.pipe.config.ids
        else:
            from trace_rt.config import TraceConfig
            from trace_rt.tokenizer import TextTokenizer

            self.tok = TextTokenizer.from_dir(s.model)
            self.ids = TraceConfig.from_dir(s.model).ids

    def answer(self, w: Work) -> dict[str, Any]:
        if self.pipe is not None:
            if w.question is not None:
                n = self.frames or self.pipe.config.num_frames
                return self.pipe.run(
                    w.path, None, question=w.question, frames=n, gen=self.gen,
                    sampler=lambda total, fps: vqa.segment_indices(total, fps, n, w.bound),
                )  # fmt: skip
            return self.pipe.run(w.path, w.task, query=w.query, frames=self.frames, gen=self.gen)
        client = getattr(self._local, "client", None)
        if client is None:
            from trace_rt.serving.client import TraceClient, check_url

            client = self._local.client = TraceClient(check_url(self.url))
        # A server samples frames its own way (uniformly over the whole video).
        return client.infer(
            w.path,
            task=None if w.question is not None else w.task,
            query=w.query,
            question=w.question,
            max_new_tokens=self.gen.max_new_tokens,
        )

    def record(self, w: Work, res: dict[str, Any]) -> dict[str, Any]:
        ids = res["token_ids"]
        return {
            "key": w.key,
            "video_id": w.video_id,
            "video": str(w.path),
            "task": w.task,
            "query": w.query,
            **({"question": w.question} if w.question is not None else {}),
            "duration": res.get("duration"),
            "frames": res.get("frames"),
            "stop_reason": res.get("stop_reason"),
            "frame_times": res.get("frame_times"),
            "token_ids": ids,
            "release": rf.release_output(ids, self.tok, self.ids).to_dict(),
            "events": rf.lenient_events(ids, self.tok, self.ids),
        }


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def token_budget(s: EvalSettings) -> int:
    """``--max-new-tokens``, or the benchmark's default: 128 for video QA, else 512."""
    if s.max_new_tokens is not None:
        return s.max_new_tokens
    return vqa.MAX_NEW_TOKENS if s.benchmark in bm.QA_BENCHMARKS else 512


def _annotation_files(paths: list[str]) -> list[Path]:
    """The files named, a directory (MVBench's json/) standing for its JSON files."""
    return [g for a in map(Path, paths) for g in (sorted(a.glob("*.json")) if a.is_dir() else [a])]


def _run_header(s: EvalSettings, task: str) -> dict[str, Any]:
    return {
        "benchmark": s.benchmark,
        "task": task,
        "annotations": {str(p.resolve()): _sha256(p) for p in _annotation_files(s.annotations)},
        "model": str(Path(s.model).resolve()),
        "frames": s.frames,
        "max_new_tokens": token_budget(s),
        "template": s.template,
    }


def _check_resume(out: Path, header: dict[str, Any]) -> None:
    path = out / "run.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = None
        if old != header:
            diff = sorted(k for k in header if not isinstance(old, dict) or old.get(k) != header[k])
            what = ", ".join(diff) or "unreadable run.json"
            raise InputError(
                f"{out} holds a run with other settings ({what}); "
                "use another --out, or delete it to start over"
            )
    else:
        path.write_text(json.dumps(header, indent=1) + "\n")


def plan(s: EvalSettings) -> tuple[str, list[Any], list[Work], dict[str, list]]:
    """Read the annotations and find the videos: ``(task, items, work, missing)``, with
    *missing* = video id -> [reason, number of items without a video]."""
    bench = bm.get_benchmark(s.benchmark)
    task, items = bm.load(bench, s.annotations, s.task)
    if s.limit is not None:
        items = items[: s.limit]
    index = VideoIndex(s.videos)
    prompt_task = bench.prompt_task(task)
    work: list[Work] = []
    missing: dict[str, list] = {}
    for it in items:
        if it.video in missing:
            missing[it.video][1] += 1
            continue
        try:
            path = _qa_video(index, it) if task == "qa" else index.find(it.video)
        except InvalidVideoIdError as e:
            missing[it.video] = [str(e), 1]
            continue
        if path is None:
            missing[it.video] = [f"no video file under {s.videos}", 1]
            continue
        if task == "qa":
            question = vqa.prompt_question(bench.name, it)
            work.append(Work(it.qid, it.video, path, "custom", None, question, it.bound))
            continue
        query = None if task == "dvc" else it.query
        work.append(Work(bm.item_key(it), it.video, path, prompt_task, query))
    return task, items, work, missing


def _qa_video(index: VideoIndex, q: vqa.ChoiceQuestion) -> Path | None:
    """MVBench: ``--videos/<task directory>/<video>`` (a relative path that must stay
    inside); Video-MME: the id looked up as for the other benchmarks."""
    if not q.video_dir:
        return index.find(q.video)
    if q.data_type != "video":
        raise InvalidVideoIdError(f"{q.category}: frame directories are not read by trace-rt")
    rel = Path(q.video_dir) / q.video
    if rel.is_absolute() or ".." in rel.parts or "\0" in q.video:
        raise InvalidVideoIdError(f"video {q.video!r} is not a path inside the videos directory")
    path = index.root / rel
    return path if path.is_file() else None


def run_eval(s: EvalSettings, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Generate every missing prediction into ``s.out``, then score; returns the metrics."""
    log = log or (lambda m: print(m, file=sys.stderr))
    if s.concurrency < 1:
        raise InputError("--concurrency must be >= 1")
    if s.concurrency > 1 and s.url is None:
        raise InputError("--concurrency > 1 needs --url (a local backend answers one at a time)")
    if s.url is not None and (s.frames is not None or s.backend is not None):
        raise InputError("with --url the server's model sets --frames and --backend")
    if s.rules not in rf.RULES:
        raise InputError(f"--rules must be one of {rf.RULES}")
    task, items, work, missing = plan(s)
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    _check_resume(out, _run_header(s, task))
    lost = sum(n for _, n in missing.values())
    (out / "missing_videos.txt").write_text(
        "".join(f"{v}\t{why}\t{n} item(s)\n" for v, (why, n) in missing.items())
    )
    if missing:
        log(f"{len(missing)} videos missing, {lost} of {len(items)} items without a video "
            "(see missing_videos.txt)")  # fmt: skip
    records = _load_done(out / PREDICTIONS)
    todo = [w for w in work if w.key not in records]
    if len(todo) < len(work):
        log(f"resuming: {len(work) - len(todo)} predictions already in {out / PREDICTIONS}")
    errors = 0
    if todo:
        engine = _Engine(s)
        with (out / PREDICTIONS).open("a", encoding="utf-8") as f:
            answers = _answers(engine, todo, s.concurrency)
            for w, rec in _progress(answers, len(todo), s.progress, s.benchmark):
                f.write(json.dumps(rec) + "\n")
                f.flush()
                if "error" in rec:
                    errors += 1
                    log(f"{w.key}: {rec['error']}")
                else:
                    records[w.key] = rec
    if task == "qa":
        metrics = vqa.score_qa(s.benchmark, items, records)
        refmt = vqa.original_results(s.benchmark, items, records)
    else:
        metrics = score(task, items, records, rules=s.rules, use_java=s.use_java)
        refmt = to_original_format(task, items, records, s.rules)
    metrics.update(missing_videos=len(missing), items_without_video=lost, errors=errors)
    (out / f"refmt_{task}.json").write_text(json.dumps(refmt) + "\n")
    write_report(out, s.benchmark, task, metrics, asdict(s))
    from trace_rt.timeline.evalpage import write_eval_report

    write_eval_report(
        out, s.benchmark, task, items, records, metrics, asdict(s),
        n=s.report_n, pages=s.report_items, links=s.links,
    )  # fmt: skip
    return metrics


def _load_done(path: Path) -> dict[str, dict]:
    recs, torn = read_jsonl(path)
    if torn:  # rewrite without the torn line, so appends start on a fresh line
        path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    return {r["key"]: r for r in recs if "release" in r and "key" in r}


def _answers(engine: _Engine, todo: list[Work], concurrency: int) -> Iterator[tuple[Work, dict]]:
    def one(w: Work) -> dict:
        try:
            return engine.record(w, engine.answer(w))
        except (TraceError, OSError) as e:  # this request's problem: record it, go on
            return {"key": w.key, "video_id": w.video_id, "error": f"{type(e).__name__}: {e}"}

    if concurrency == 1:
        for w in todo:
            yield w, one(w)
        return
    with ThreadPoolExecutor(concurrency) as pool:
        futures = {pool.submit(one, w): w for w in todo}
        for fut in as_completed(futures):
            yield futures[fut], fut.result()


def _progress(it: Iterator[Any], total: int, show: bool | None, label: str) -> Iterator[Any]:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    show = sys.stderr.isatty() if show is None else show
    cols = (
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*cols, console=Console(stderr=True), disable=not show) as bar:
        task = bar.add_task(label, total=total)
        for x in it:
            yield x
            bar.advance(task)
