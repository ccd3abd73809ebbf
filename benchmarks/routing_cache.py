"""Replicas behind nginx: video-cache hit rate and throughput, hash routing vs round-robin.

Starts ``deploy/local/cluster.sh`` (real ``trace-rt serve`` replicas, Debian's nginx
proxying gRPC) once per routing on the same model repository, replays the same workload
through each, and reads the replicas' own cache counters from their metrics ports::

    python -m benchmarks.routing_cache --preset small --replicas 2 --videos 8 \\
        --questions 4 --clients 4 --out benchmarks/results/routing-cache-small-cpu-DATE

The workload: ``--videos`` synthetic clips, each a *session* of ``--questions`` follow-up
questions (dvc, then mr, vhd and a free question, cycling) asked one after another, as a
user would; ``--clients`` threads each take sessions from a shared queue. Every request
sends the video's bytes (a replica that has not seen the video must get them) and names
the video in the ``x-video-id`` header (:class:`~trace_rt.serving.routing.RoutedClient`).
Decoding runs the whole ``--max-new-tokens`` budget (``ignore_eos``), so both routings do
the same decoding work and differ only in where the videos are encoded.

Per routing: the hit rate from the replicas' ``trace_video_cache_{hits,misses}_total``,
and the misses that nginx's access log predicts (one per video and replica it was sent
to: a session's questions are sequential, so only its first question on a replica misses;
the two agree unless the cache evicted something), requests/s over the replay's wall time,
latency p50/p90 per request as the client saw it, and where each video's questions went.
Writes ``OUT.json`` and ``OUT.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import queue
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "deploy" / "local" / "cluster.sh"
INFER = "/inference.GRPCInferenceService/ModelStreamInfer"
# key=value fields of deploy/local/nginx.conf.in's log line; a value runs to the next key.
LOG_FIELD = re.compile(r"(\w+)=(.*?)(?= \w+=|$)")
ROUTINGS = ("hash", "round-robin")
# The questions of a session, cycled: (task, query/question).
QUESTIONS = [
    ("dvc", None),
    ("mr", "a shape moves across the frame"),
    ("vhd", "the most colourful moment"),
    (None, "What happens in this video?"),
]


def find_nginx() -> str | None:
    if found := shutil.which("nginx"):
        return found
    return "/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None


def free_block(n: int) -> int:
    """A base port B with B .. B+n-1 all free on 127.0.0.1 now."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1] // 100 * 100
        if base + n > 65000:
            continue
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free block of ports")


def metric_total(text: str, name: str) -> float:
    """The sum of metric *name* over all its label sets in a Prometheus text scrape."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " "):
            total += float(line.rsplit(None, 1)[1])
    return total


class LocalCluster:
    """``deploy/local/cluster.sh`` replicas behind nginx, as a context manager.

    Args:
        repo: the model repository.
        run: the cluster's run directory (logs, pid files).
        routing: ``hash`` or ``round-robin``.
        replicas: how many ``trace-rt serve`` replicas.
    """

    def __init__(self, repo: Path, run: Path, routing: str, replicas: int = 2):
        nginx = find_nginx()
        if nginx is None:
            raise RuntimeError("nginx not found (apt-get install -y nginx-light)")
        self.base = free_block(10 * replicas + 1)
        self.run, self.port, self.replicas = run, self.base + 10 * replicas, replicas
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "NGINX_BIN": nginx}
        self.args = [str(repo), "--replicas", str(replicas), "--port", str(self.port)]
        self.args += ["--base-port", str(self.base), "--routing", routing, "--dir", str(run)]

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def sh(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", str(SCRIPT), *args], env=self.env, capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip

    def __enter__(self) -> LocalCluster:
        try:
            done = self.sh("start", *self.args)
        except subprocess.TimeoutExpired:
            self.sh("stop", "--dir", str(self.run), timeout=120)
            raise
        if done.returncode != 0:
            raise RuntimeError(f"cluster.sh start failed:\n{done.stdout}{done.stderr}")
        self.started = done.stdout  # "replica N ready: gRPC HOST:PORT (pid P)" lines
        return self

    def __exit__(self, *exc: object) -> None:
        self.sh("stop", "--dir", str(self.run), timeout=120)

    def access_log(self, n: int = 0, timeout: float = 10.0) -> list[dict[str, str]]:
        """nginx's stream lines (``video``, ``upstream``, ``status``, ``grpc``, ``time``),
        once there are *n* of them or *timeout* s have passed (nginx writes a line after
        its stream has closed, just after the client saw the answer)."""
        deadline = time.monotonic() + timeout
        while True:
            out = []
            for line in (self.run / "nginx-access.log").read_text().splitlines():
                parts = line.split(" ", 2)
                if len(parts) == 3 and parts[1] == INFER:
                    # A value may hold spaces: nginx's own retry logs "upstream=a, b".
                    out.append(dict(LOG_FIELD.findall(parts[2])))
            if len(out) >= n or time.monotonic() > deadline:
                return out
            time.sleep(0.1)

    def cache_stats(self) -> list[dict[str, float]]:
        """Each replica's video-cache counters, read from its metrics port."""
        stats = []
        for i in range(self.replicas):
            url = f"http://127.0.0.1:{self.base + 10 * i + 2}/metrics"
            with urllib.request.urlopen(url, timeout=10) as r:
                text = r.read().decode()
            stats.append(
                {
                    k: metric_total(text, f"trace_video_cache_{k}_total")
                    for k in ("hits", "misses", "evictions")
                }
            )
        return stats


@dataclass
class Record:
    """One request as the client saw it."""

    video: int
    question: int
    latency_s: float
    ok: bool
    error: str = ""
    retries: int = 0


@dataclass
class Replay:
    """A workload replayed through one cluster."""

    records: list[Record] = field(default_factory=list)
    wall_s: float = 0.0


def replay(
    url: str,
    videos: list[bytes],
    questions: int,
    clients: int,
    max_new_tokens: int,
) -> Replay:
    """Ask every video its *questions* in turn; *clients* threads share the sessions."""
    from trace_rt.serving.routing import RoutedClient

    sessions: queue.Queue[int] = queue.Queue()
    for v in range(len(videos)):
        sessions.put(v)
    out = Replay()
    lock = threading.Lock()

    def client() -> None:
        with RoutedClient(url) as c:
            while True:
                try:
                    v = sessions.get_nowait()
                except queue.Empty:
                    return
                for q in range(questions):
                    task, text = QUESTIONS[q % len(QUESTIONS)]
                    kw = {"query": text} if task in ("mr", "vhd") else {"question": text}
                    retries: list[int] = []
                    c.on_retry = lambda n, msg: retries.append(n)  # noqa: B023 - used at once
                    t0 = time.perf_counter()
                    try:
                        c.infer(videos[v], task=task, max_new_tokens=max_new_tokens,
                                ignore_eos=True, seed=q, **kw)  # fmt: skip
                        rec = Record(v, q, time.perf_counter() - t0, True, retries=len(retries))
                    except Exception as e:  # recorded, the session goes on
                        rec = Record(v, q, time.perf_counter() - t0, False, str(e), len(retries))
                    with lock:
                        out.records.append(rec)

    threads = [threading.Thread(target=client, name=f"client-{i}") for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.wall_s = time.perf_counter() - t0
    return out


def percentile(values: list[float], p: float) -> float | None:
    """The *p*-th percentile (linear interpolation between closest ranks)."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def measure(
    repo: Path,
    run: Path,
    routing: str,
    videos: list[bytes],
    *,
    replicas: int,
    questions: int,
    clients: int,
    max_new_tokens: int,
) -> dict[str, Any]:
    """One routing: start the cluster, replay, read the counters, stop it."""
    from trace_rt.serving.routing import video_id

    ids = {video_id(b): i for i, b in enumerate(videos)}
    t0 = time.perf_counter()
    with LocalCluster(repo, run, routing, replicas) as cl:
        start_s = time.perf_counter() - t0
        before = cl.cache_stats()
        rep = replay(cl.url, videos, questions, clients, max_new_tokens)
        after = cl.cache_stats()
        log = cl.access_log(len(rep.records) + sum(r.retries for r in rep.records))
    per = [{k: a[k] - b[k] for k in a} for a, b in zip(after, before, strict=True)]
    hits = int(sum(p["hits"] for p in per))
    misses = int(sum(p["misses"] for p in per))
    ok_lines = [e for e in log if e["status"] == "200" and e.get("grpc") == "0"]
    placed: dict[int, Counter] = defaultdict(Counter)
    served: Counter = Counter()
    for e in ok_lines:
        last = e["upstream"].rsplit(", ", 1)[-1]  # nginx's own retry lists every one it tried
        placed[ids.get(e["video"], -1)][last] += 1
        served[last] += 1
    lat = [r.latency_s for r in rep.records if r.ok]
    n_ok = len(lat)
    return {
        "routing": routing,
        "cluster_start_s": round(start_s, 1),
        "requests": len(rep.records),
        "ok": n_ok,
        "failed": [r.error for r in rep.records if not r.ok],
        "retries": sum(r.retries for r in rep.records),
        "wall_s": round(rep.wall_s, 2),
        "req_per_s": round(n_ok / rep.wall_s, 3) if rep.wall_s else None,
        "latency_p50_s": _round(percentile(lat, 50)),
        "latency_p90_s": _round(percentile(lat, 90)),
        "cache_hits": hits,
        "cache_misses": misses,
        "cache_evictions": int(sum(p["evictions"] for p in per)),
        "hit_rate": round(hits / (hits + misses), 4) if hits + misses else None,
        # One miss per (video, replica it reached): what the placement alone predicts.
        "misses_from_placement": sum(len(c) for c in placed.values()),
        "replicas_per_video": {str(v): len(c) for v, c in sorted(placed.items())},
        "per_replica": [
            {
                "requests": served[f"127.0.0.1:{cl.base + 10 * i}"],
                **{k: int(v) for k, v in p.items()},
            }
            for i, p in enumerate(per)
        ],
    }


def _round(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(x, digits)


def prepare(tmp: Path, preset: str, artifacts: Path | None, n_videos: int) -> tuple[Path, list]:
    """The model repository (from *artifacts*, or a random-weight *preset* exported here)
    and the videos' bytes."""
    from tests.media import write_video
    from triton_repo.build import build_repository

    if artifacts is None:
        from export.onnx_export import export_onnx
        from training.make_checkpoint import make_checkpoint

        ckpt = make_checkpoint(tmp / "ckpt", preset, seed=0, progress=False)
        artifacts = export_onnx(ckpt, tmp / "art", progress=False)
    repo = build_repository(artifacts, tmp / "repo", progress=False)
    videos = []
    for i in range(n_videos):
        path = write_video(tmp / f"v{i}.mp4", width=96 + 16 * i, height=72, fps=10,
                           n_frames=40 + 4 * i)  # fmt: skip
        videos.append(Path(path).read_bytes())
    return repo, videos


def run_all(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Both routings on one repository and workload; the report's data."""
    repo, videos = prepare(tmp, args.preset, args.artifacts, args.videos)
    uptime = [_uptime()]
    results = []
    # Rounds alternate the order (hash, rr; rr, hash; ...) so that a change in the machine's
    # load during the run does not favour one routing.
    for i in range(args.rounds):
        for routing in args.routings if i % 2 == 0 else args.routings[::-1]:
            r = measure(repo, tmp / f"run-{routing}-{i}", routing, videos,
                        replicas=args.replicas, questions=args.questions,
                        clients=args.clients, max_new_tokens=args.max_new_tokens)  # fmt: skip
            results.append({"round": i + 1, **r})
            uptime.append(f"after {routing} (round {i + 1}): {_uptime()}")
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "uptime": uptime,  # before, and after each routing of each round
        },
        "model": str(args.artifacts) if args.artifacts else f"random-weight `{args.preset}`",
        "workload": {
            "replicas": args.replicas,
            "videos": args.videos,
            "questions_per_video": args.questions,
            "clients": args.clients,
            "max_new_tokens": args.max_new_tokens,
            "questions": [t or "custom" for t, _ in QUESTIONS][: args.questions],
        },
        "note": args.note,
        "results": results,
        "summary": summary(results),
    }


def summary(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per routing over all rounds: hits, misses, hit rate, answered requests per second of
    replay (all rounds' answers over all rounds' wall time)."""
    out = {}
    for routing in dict.fromkeys(r["routing"] for r in results):
        rs = [r for r in results if r["routing"] == routing]
        hits, misses = sum(r["cache_hits"] for r in rs), sum(r["cache_misses"] for r in rs)
        out[routing] = {
            "rounds": len(rs),
            "cache_hits": hits,
            "cache_misses": misses,
            "hit_rate": round(hits / (hits + misses), 4) if hits + misses else None,
            "req_per_s": round(sum(r["ok"] for r in rs) / sum(r["wall_s"] for r in rs), 3),
            "latency_p50_s_rounds": [r["latency_p50_s"] for r in rs],
            "latency_p90_s_rounds": [r["latency_p90_s"] for r in rs],
        }
    return out


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "load average: " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def markdown(data: dict[str, Any]) -> str:
    w, m = data["workload"], data["machine"]
    rows = [
        "| round | routing | hit rate | hits / misses (from placement) | req/s | p50 s | p90 s "
        "| failed / retried | requests per replica |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in data["results"]:
        spread = ", ".join(str(p["requests"]) for p in r["per_replica"])
        rows.append(
            f"| {r['round']} | {r['routing']} | {r['hit_rate']:.1%} | {r['cache_hits']} / "
            f"{r['cache_misses']} ({r['misses_from_placement']}) | {r['req_per_s']:.3f} "
            f"| {r['latency_p50_s']:.2f} | {r['latency_p90_s']:.2f} "
            f"| {len(r['failed'])} / {r['retries']} | {spread} |"
        )
    total = ["| routing | hit rate | hits / misses | req/s (all rounds) |", "|---|---:|---:|---:|"]
    for routing, t in data["summary"].items():
        total.append(
            f"| {routing} | {t['hit_rate']:.1%} | {t['cache_hits']} / {t['cache_misses']} "
            f"| {t['req_per_s']:.3f} |"
        )
    uptimes = "\n".join(f"- `{u}`" for u in m["uptime"])
    return f"""# Replicas behind nginx: video cache with hash routing vs round-robin

{data["date_utc"]}, {m["processor"]}, {m["cpus"]} CPUs, Python {m["python"]}; model:
{data["model"]}; `python -m benchmarks.routing_cache`.

Workload: {w["replicas"]} `trace-rt serve` replicas behind nginx (`deploy/local/cluster.sh`);
{w["videos"]} videos, each asked {w["questions_per_video"]} follow-up questions
({", ".join(w["questions"])}) one after another; {w["clients"]} clients share the videos;
{w["max_new_tokens"]} new tokens per answer (EOS ignored); the video's bytes are sent with
every question. A fresh cluster for each routing in each round, on the same repository;
rounds alternate the order. Hits and misses are the replicas' own
`trace_video_cache_*_total` counters; "from placement" is the number of misses that nginx's
access log predicts (one per video and replica it reached).

{chr(10).join(rows)}

All rounds:

{chr(10).join(total)}

`uptime` before the run and after each routing:
{uptimes}

{data["note"] or ""}
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.routing_cache")
    p.add_argument("--preset", default="small", help="random-weight model (default small)")
    p.add_argument("--artifacts", type=Path, help="an artifact directory instead of --preset")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--videos", type=int, default=8)
    p.add_argument("--questions", type=int, default=4, help="questions per video")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=1, help="rounds, alternating the order")
    p.add_argument("--routings", nargs="+", default=list(ROUTINGS), choices=ROUTINGS)
    p.add_argument("--note", default="", help="a line for the report (the machine's load)")
    p.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="routing-cache-") as tmp:
        data = run_all(args, Path(tmp))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
    text = markdown(data)
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 0 if all(not r["failed"] for r in data["results"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
