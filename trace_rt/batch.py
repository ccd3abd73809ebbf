"""``trace-rt batch``: many videos and questions, one JSON line per item, resumable.

A MANIFEST is JSON Lines, one video a line (relative paths are the manifest's)::

    {"video": "a.mp4", "id": "a", "task": "mr", "queries": ["a door opens", "a dog runs"]}
    {"video": "b.mp4"}                                   # the --task (default dvc)
    {"video": "c.mp4", "questions": [{"task": "dvc"}, {"question": "what is shown?"}]}

or plain text, one video path a line (each asked the ``--task``). An *item* is one question
about one video. ``OUT/results.jsonl`` gets one line per item, appended and fsynced as it is
answered: a killed run loses nothing written, and a rerun skips the items already answered
(failed ones are tried again unless ``--no-retry-failed``). A failure is recorded on its
item's line with the reason and never stops the job.

Engines: ``local`` answers a video's questions with one :meth:`Pipeline.run_many` (the video
is decoded, encoded and prefilled once); ``ray`` runs the same work as a Ray Data job
(:mod:`trace_rt.batch_ray`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from trace_rt.errors import InputError

RESULTS_FILE = "results.jsonl"
LOCK_FILE = ".lock"
TASKS = ("dvc", "mr", "vhd", "custom")
# Timings and cache hits differ between runs and engines; everything else is the answer.
VOLATILE_KEYS = ("timing_ms", "cache", "video_id")


@dataclass(frozen=True)
class Item:
    """One question about one video of the manifest."""

    key: str  # stable across runs: the video's id and the question
    video_id: str
    video: str  # path as resolved
    task: str
    query: str | None = None
    question: str | None = None

    def header(self) -> dict[str, Any]:
        """The fields every output line of this item starts with."""
        out = {"key": self.key, "id": self.video_id, "video": self.video, "task": self.task}
        if self.query is not None:
            out["query"] = self.query
        if self.question is not None:
            out["question"] = self.question
        return out


@dataclass
class VideoWork:
    """One video's pending items: answered together (one encode, one prefix)."""

    video_id: str
    video: str
    items: list[Item] = field(default_factory=list)


def item_key(video_id: str, task: str, query: str | None, question: str | None) -> str:
    text = json.dumps([video_id, task, query, question], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def read_manifest(path: str | Path, default_task: str = "dvc") -> list[Item]:
    """The manifest's items, in order, duplicates dropped. Errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"manifest {path}: no such file")
    base = path.resolve().parent
    items: dict[str, Item] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise InputError(f"manifest {path}, line {line}: not UTF-8 text") from None
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"manifest {path}, line {n}"
        if line.startswith("{"):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{where}: not valid JSON ({e.msg})") from None
        else:
            entry = {"video": line}
        for item in _entry_items(entry, base, default_task, where):
            items.setdefault(item.key, item)
    if not items:
        raise InputError(f"manifest {path} lists no videos")
    return list(items.values())


def _entry_items(entry: Any, base: Path, default_task: str, where: str) -> Iterator[Item]:
    if not isinstance(entry, dict) or not isinstance(entry.get("video"), str):
        raise InputError(f'{where}: each line needs "video": a path')
    unknown = set(entry) - {"video", "id", "task", "query", "queries", "question", "questions"}
    if unknown:
        raise InputError(f"{where}: unknown field(s) {sorted(unknown)}")
    video = str(base / entry["video"]) if not os.path.isabs(entry["video"]) else entry["video"]
    vid = str(entry.get("id", entry["video"]))
    if "questions" in entry:
        questions = entry["questions"]
        if not isinstance(questions, list) or not questions:
            raise InputError(f'{where}: "questions" must be a non-empty list')
    else:
        task = entry.get("task", default_task if "question" not in entry else "custom")
        queries = entry.get("queries", [entry["query"]] if "query" in entry else [None])
        if not isinstance(queries, list) or not queries:
            raise InputError(f'{where}: "queries" must be a non-empty list')
        questions = [{"task": task, "query": q, "question": entry.get("question")} for q in queries]
    for q in questions:
        if not isinstance(q, dict):
            raise InputError(f"{where}: each question must be an object")
        task = q.get("task") or ("custom" if q.get("question") else default_task)
        query, question = q.get("query"), q.get("question")
        for name, value in (("task", task), ("query", query), ("question", question)):
            if value is not None and not isinstance(value, str):
                raise InputError(f'{where}: "{name}" must be a string, not {type(value).__name__}')
        if "\0" in video:
            raise InputError(f"{where}: the video path holds a NUL byte")
        if task not in TASKS:
            raise InputError(f"{where}: unknown task {task!r}; choose {', '.join(TASKS)}")
        if task in ("mr", "vhd") and not query:
            raise InputError(f"{where}: task {task} needs a query")
        if task == "custom" and not question:
            raise InputError(f"{where}: task custom needs a question")
        yield Item(item_key(vid, task, query, question), vid, video, task, query, question)


def group_by_video(items: Iterable[Item]) -> list[VideoWork]:
    """Items grouped per video, in first-seen order."""
    groups: dict[tuple[str, str], VideoWork] = {}
    for it in items:
        groups.setdefault((it.video_id, it.video), VideoWork(it.video_id, it.video)).items.append(
            it
        )
    return list(groups.values())


class ResultStore:
    """``OUT/results.jsonl``: append + fsync per line; what it holds decides what is done.

    A run killed while writing leaves at most one partial last line: it is cut off on open
    (everything before it is whole). A lock file keeps a second run off the same directory.
    """

    def __init__(self, out_dir: str | Path):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / RESULTS_FILE
        self._lock = _lock(self.dir / LOCK_FILE)
        self.status: dict[str, str] = {}  # key -> "ok" | "error" (the latest line wins)
        self._repair_and_load()
        self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def _repair_and_load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        whole = data[: data.rfind(b"\n") + 1]
        if len(whole) != len(data):
            with open(self.path, "r+b") as f:  # the partial line of a killed run
                f.truncate(len(whole))
        for line in whole.decode("utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError, KeyError, TypeError):
                rec = json.loads(line)
                self.status[rec["key"]] = rec["status"]

    def done(self, item: Item, retry_failed: bool = True) -> bool:
        st = self.status.get(item.key)
        return st == "ok" or (st == "error" and not retry_failed)

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        self.status[record["key"]] = record["status"]

    def close(self) -> None:
        self._f.close()
        self._lock.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _lock(path: Path) -> TextIO:
    import fcntl

    f = open(path, "w")  # noqa: SIM115 (held for the run, closed by ResultStore.close)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise InputError(f"{path.parent} is in use by another trace-rt batch run") from None
    return f


def ok_record(item: Item, result: dict[str, Any]) -> dict[str, Any]:
    result = {k: v for k, v in result.items() if k not in ("video", "task", "query")}
    return {**item.header(), "status": "ok", "result": result}


def error_record(item: Item, error: BaseException) -> dict[str, Any]:
    return {**item.header(), "status": "error", "error": f"{type(error).__name__}: {error}"}


def comparable(record: dict[str, Any]) -> dict[str, Any]:
    """A line without what legitimately differs between runs (timings, cache hits)."""
    out = dict(record)
    if "result" in out:
        out["result"] = {k: v for k, v in out["result"].items() if k not in VOLATILE_KEYS}
    return out


class Progress:
    """Items done, failed, rate and ETA on stderr: a live bar on a terminal, else a line
    every *every* seconds (and at the end), for logs."""

    def __init__(self, total: int, skipped: int, stream: TextIO | None = None, every: float = 5):
        self.total, self.skipped = total, skipped
        self.done = self.failed = 0
        self.stream = stream or sys.stderr
        self.every = every
        self.t0 = self.last = time.monotonic()
        self.tty = self.stream.isatty()

    def update(self, record: dict[str, Any]) -> None:
        self.done += 1
        self.failed += record["status"] != "ok"
        now = time.monotonic()
        if self.tty or now - self.last >= self.every or self.done == self.total:
            self.last = now
            end = "\n" if self.done == self.total or not self.tty else ""
            print(("\r" if self.tty else "") + self.line(now), end=end, file=self.stream)
            self.stream.flush()

    def line(self, now: float) -> str:
        spent = now - self.t0
        rate = self.done / spent if spent > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta_s = _clock(eta) if eta == eta else "?"
        return (
            f"trace-rt batch: {self.done}/{self.total} items ({pct:.0f}%), "
            f"{self.failed} failed, {rate:.2f} items/s, elapsed {_clock(spent)}, ETA {eta_s}"
        )


def _clock(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def run_local(groups: list[VideoWork], model: Path, options: dict[str, Any]) -> Iterator[dict]:
    """Answer *groups* in this process: one :meth:`Pipeline.run_many` per video."""
    from trace_rt.run_api import load_pipeline

    slots = max(1, min(options.pop("max_sequences", 8), max(len(g.items) for g in groups)))
    pipe, gen, _card, frames = load_pipeline(model, slots, options)
    for group in groups:
        yield from answer_group(pipe, group, group.video, frames, gen)


def answer_group(pipe: Any, group: VideoWork, video: Any, frames: Any, gen: Any) -> Iterator[dict]:
    """One video's records: all questions in one :meth:`Pipeline.run_many`; if that fails
    and there are several, each alone, so that each item gets its own reason."""
    from trace_rt.pipeline import Question

    def ask(items: list[Item]) -> list[dict]:
        qs = [Question(it.task, it.query, it.question) for it in items]
        results = pipe.run_many(video, qs, frames=frames, gen=gen)
        return [ok_record(it, r) for it, r in zip(items, results, strict=True)]

    try:
        yield from ask(group.items)
        return
    except Exception as e:  # this video's problem (or one question's): recorded, job goes on
        if len(group.items) == 1:
            yield error_record(group.items[0], e)
            return
    for it in group.items:
        try:
            yield from ask([it])
        except Exception as e:
            yield error_record(it, e)


def run_batch(
    manifest: str | Path,
    out_dir: str | Path,
    model: Path,
    *,
    task: str = "dvc",
    engine: str = "local",
    retry_failed: bool = True,
    progress: TextIO | None = None,
    ray_options: dict[str, Any] | None = None,
    **options: Any,
) -> dict[str, int]:
    """``trace-rt batch``: answer every pending item of *manifest* into *out_dir*.

    Returns counts: ``items`` in the manifest, ``skipped`` (answered before), ``ok`` and
    ``failed`` in this run. *options* are :func:`trace_rt.run_api.run_many`'s plus
    ``max_sequences`` (KV slots, default 8).
    """
    items = read_manifest(manifest, task)
    with ResultStore(out_dir) as store:
        todo = [it for it in items if not store.done(it, retry_failed)]
        counts = {"items": len(items), "skipped": len(items) - len(todo), "ok": 0, "failed": 0}
        if not todo:
            print(
                f"trace-rt batch: all {len(items)} items already done", file=progress or sys.stderr
            )
            return counts
        bar = Progress(len(todo), counts["skipped"], progress)
        groups = group_by_video(todo)
        if engine == "local":
            records = run_local(groups, model, dict(options))
        elif engine == "ray":
            from trace_rt.batch_ray import run_ray

            records = run_ray(groups, model, dict(options), **(ray_options or {}))
        else:
            raise InputError(f"unknown engine {engine!r}; choose local or ray")
        for rec in records:
            store.write(rec)
            counts["ok" if rec["status"] == "ok" else "failed"] += 1
            bar.update(rec)
    return counts


def add_batch_parser(sub: Any) -> None:
    """``trace-rt batch``'s arguments (registered by :mod:`trace_rt.cli`)."""
    p = sub.add_parser(
        "batch",
        help="answer every video (and question) of a manifest, one JSON line per item; resumable",
        description="Answer each question of each video listed in MANIFEST (JSON Lines: "
        '{"video": PATH, "id": ..., "task": ..., "queries": [...]} or {"video": ..., '
        '"questions": [{"task": ..., "query": ...}]}; or one video path a line). Results go '
        "to OUT/results.jsonl, one line per item, written as each is answered; a rerun skips "
        "answered items. Failures are recorded per item with the reason.",
    )
    p.add_argument("manifest", type=Path, help="the manifest (JSON Lines or one path a line)")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--model", required=True, type=Path, help="checkpoint or artifact directory")
    p.add_argument(
        "--task",
        choices=["dvc", "mr", "vhd", "custom"],
        default="dvc",
        help="the task of manifest lines that name none",
    )
    p.add_argument("--engine", choices=["local", "ray"], default="local", help="where to run")
    p.add_argument(
        "--address", help="--engine ray: a running Ray cluster (default: start a local one)"
    )
    p.add_argument("--actors", type=int, default=1, help="--engine ray: model actors")
    p.add_argument("--cpus-per-actor", type=float, default=1.0, help="--engine ray")
    p.add_argument("--gpus-per-actor", type=float, default=0.0, help="--engine ray")
    p.add_argument(
        "--decode-cpus", type=float, default=1.0, help="--engine ray: CPUs per decode task"
    )
    p.add_argument(
        "--no-retry-failed",
        action="store_true",
        help="a rerun skips failed items too (default: they are tried again)",
    )
    p.add_argument("--backend", help="default: from the model directory")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--frames", type=int, help="frames to sample (default: the model's)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="token budget")
    p.add_argument("--max-sequences", type=int, default=8, help="questions decoded together")
    p.add_argument("--constrained", action="store_true", help="well-formed numbers only")
    p.add_argument("--timestamps", choices=["free", "frames"], help="timestamp mode")
    p.add_argument("--template", choices=["llama_2", "mistral_instruct"], help="chat template")
    p.add_argument("--preset", metavar="CARD", help="model card (see trace-rt run)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")


def batch_command(args: Any) -> int:
    """``trace-rt batch``: exit status 0 if every item is answered, 1 if some failed."""
    if args.engine == "local" and args.address:
        raise InputError("--address is for --engine ray")
    counts = run_batch(
        args.manifest,
        args.out,
        args.model,
        task=args.task,
        engine=args.engine,
        retry_failed=not args.no_retry_failed,
        ray_options={
            "address": args.address,
            "actors": args.actors,
            "cpus_per_actor": args.cpus_per_actor,
            "gpus_per_actor": args.gpus_per_actor,
            "decode_cpus": args.decode_cpus,
        },
        backend=args.backend,
        device=args.device,
        frames=args.frames,
        max_new_tokens=args.max_new_tokens,
        max_sequences=args.max_sequences,
        constrained=args.constrained,
        timestamps=args.timestamps,
        template=args.template,
        preset=args.preset,
        seed=args.seed,
        temperature=args.temperature,
    )
    print(json.dumps(counts), file=sys.stderr)
    return 1 if counts["failed"] else 0
