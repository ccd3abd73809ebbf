"""The ``triton`` backend of the bench: a real Triton server, measured from its clients.

Unlike the in-process backends, ``triton`` is not loaded here: ``--url HOST:PORT`` names
the gRPC endpoint of a running ``trace-rt serve`` (a repository from ``python -m
triton_repo build``), and the bench measures what its clients see. For each concurrency C
of ``--concurrency``, ``--warmup`` unmeasured rounds and then ``--runs`` measured rounds
run; in a round, C threads (each with its own :class:`~trace_rt.serving.client.TraceClient`,
so its own gRPC channel and stream) send the same request at once (a barrier releases them
together): the bench's video bytes, ``--task``/``--query``, ``max_new_tokens =
--decode-steps + 1``, ``ignore_eos``: like the in-process backends, one token from prefill
and then ``--decode-steps`` decode steps. Per request:

- ``end_to_end``: the client's clock around ``TraceClient.infer`` (sending the bytes,
  queueing, the server's work, the streamed events, the final JSON);
- ``first_response``: request start to the first streamed event, or to the final result
  for a request that streams none;
- the server's own ``timing_ms`` (``trace_pipeline`` measures them around its stages):
  ``video`` (request parsing + PyAV decode + preprocessing), ``vision`` (vision encoder +
  projector), ``prefill``, ``decode`` (all decode steps), ``total``; ``decode_per_token`` =
  decode / (tokens - 1) (the first token comes from prefill);
- ``overhead``: end_to_end - server total (client, gRPC transport, Triton's queueing).

Per concurrency: percentiles of each, and throughput over the measured rounds: requests
and generated tokens per second of round wall time (first send to last final response).

This module needs no torch and imports tritonclient only through ``TraceClient``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trace_rt.bench.runner import BackendRun
from trace_rt.bench.stats import summarize
from trace_rt.errors import TraceError
from trace_rt.serving.client import TraceClient, check_url  # tritonclient: at TraceClient()

NAME = "triton"
SERVER_STAGES = ("video", "vision", "prefill", "decode", "total")
Progress = Callable[[str, int, int], None]  # (phase, done, total)


class TritonBenchError(TraceError):
    """The Triton server cannot be benchmarked: no URL, unreachable, or its model not ready."""


@dataclass(frozen=True)
class TritonRequest:
    """The request every client sends (the bench's video, task and step count)."""

    video: str
    task: str = "dvc"
    query: str | None = None
    decode_steps: int = 64


def parse_concurrency(text: str) -> list[int]:
    """``"1,2,4,8"`` -> ``[1, 2, 4, 8]`` (positive, distinct, in the order given)."""
    out: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        if not part.isdigit() or int(part) < 1:
            raise ValueError(f"--concurrency must be positive integers like 1,2,4,8, got {text!r}")
        if int(part) not in out:
            out.append(int(part))
    if not out:
        raise ValueError(f"--concurrency must name at least one level, got {text!r}")
    return out


def check_server(url: str | None, timeout: float = 10.0) -> dict[str, Any]:
    """Check *url* serves a ready ``trace_pipeline`` model; returns what it serves.

    Raises:
        TritonBenchError: no URL, not HOST:PORT, the server does not answer, or the model
            is not ready (the message names the URL).
    """
    if not url:
        raise TritonBenchError(
            "the triton backend needs --url HOST:PORT, the gRPC endpoint of a running "
            "`trace-rt serve --repo REPO` (see benchmarks/README.md)"
        )
    try:
        check_url(url)
    except TraceError as e:
        raise TritonBenchError(str(e)) from None
    client = TraceClient(url)
    try:
        model = client.model
        try:
            live = client.client.is_server_live(client_timeout=timeout)
        except Exception as e:  # connection refused, DNS, timeout: tritonclient's own types
            raise TritonBenchError(
                f"no Triton server answers at {url} (gRPC): {_reason(e)}; start one with "
                "`trace-rt serve --repo REPO --grpc-port PORT` and pass --url HOST:PORT"
            ) from None
        try:
            api = client.client
            ready = bool(live) and bool(api.is_server_ready(client_timeout=timeout))
            model_ready = ready and bool(api.is_model_ready(model, client_timeout=timeout))
        except Exception as e:
            raise TritonBenchError(f"Triton server at {url}: {_reason(e)}") from None
        if not ready:
            raise TritonBenchError(f"the Triton server at {url} is up but not ready")
        if not model_ready:
            raise TritonBenchError(
                f"the Triton server at {url} has no ready {model!r} model: is it serving a "
                "`python -m triton_repo build` repository?"
            )
        info: dict[str, Any] = {"url": url, "model": model}
        try:
            meta = client.client.get_server_metadata(client_timeout=timeout)
            info["server_version"] = getattr(meta, "version", None)
        except Exception:  # informational only
            info["server_version"] = None
        return info
    finally:
        client.close()


def _reason(e: BaseException) -> str:
    msg = e.message() if hasattr(e, "message") and callable(e.message) else str(e)
    return " ".join(str(msg or type(e).__name__).split())[:300]


def one_round(
    clients: list[Any], data: bytes, req: TritonRequest, clock: Callable[[], float]
) -> tuple[list[dict[str, Any]], float]:
    """All clients send the request at once; per-request records and the round's wall ms."""
    n = len(clients)
    barrier = threading.Barrier(n)
    records: list[dict[str, Any] | None] = [None] * n
    errors: list[BaseException] = []

    def one(i: int) -> None:
        first: list[float] = []
        try:
            barrier.wait()
            t0 = clock()
            result = clients[i].infer(
                data,
                task=req.task,
                query=req.query,
                max_new_tokens=req.decode_steps + 1,  # prefill's token + the steps
                ignore_eos=True,
                on_event=lambda _ev: first.append(clock()) if not first else None,
            )
            t1 = clock()
            records[i] = {"t0": t0, "t1": t1, "first": first[0] if first else t1, **_keep(result)}
            records[i]["streamed_events"] = bool(first)
        except BaseException as e:  # re-raised below, on the caller's thread
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
    if real or errors:
        raise (real or errors)[0]
    done = [r for r in records if r is not None]
    start, end = min(r["t0"] for r in done), max(r["t1"] for r in done)
    out = []
    for r in done:
        server = r["timing_ms"]
        e2e = (r["t1"] - r["t0"]) * 1e3
        tokens = len(r["token_ids"])
        out.append(
            {
                "end_to_end_ms": round(e2e, 4),
                "first_response_ms": round((r["first"] - r["t0"]) * 1e3, 4),
                "streamed_events": r["streamed_events"],
                "server_ms": {k: round(float(server.get(k, 0.0)), 4) for k in SERVER_STAGES},
                "decode_per_token_ms": (
                    round(float(server["decode"]) / (tokens - 1), 4) if tokens > 1 else None
                ),
                "overhead_ms": round(e2e - float(server["total"]), 4),
                "tokens": tokens,
                "frames": r["frames"],
                "prompt_ids": len(r["prompt_ids"]),
                "token_ids": r["token_ids"],
            }
        )
    return out, (end - start) * 1e3


def _keep(result: dict[str, Any]) -> dict[str, Any]:
    return {k: result[k] for k in ("timing_ms", "token_ids", "frames", "prompt_ids")}


def measure(
    url: str,
    req: TritonRequest,
    concurrency: list[int],
    *,
    warmup: int,
    runs: int,
    progress: Progress | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> list[dict[str, Any]]:
    """Every concurrency level: ``warmup`` + ``runs`` rounds; one summary dict per level."""
    note = progress or (lambda phase, done, total: None)
    data = Path(req.video).read_bytes()  # read once: disk reads are not the server's time
    total = len(concurrency) * (warmup + runs)
    done = 0
    levels = []
    for c in concurrency:
        clients = [TraceClient(url) for _ in range(c)]
        try:
            rounds: list[tuple[list[dict[str, Any]], float]] = []
            for i in range(warmup + runs):
                records, wall_ms = one_round(clients, data, req, clock)
                if i >= warmup:
                    rounds.append((records, wall_ms))
                done += 1
                note(f"c={c} {'warmup' if i < warmup else 'run'}", done, total)
        finally:
            for cl in clients:
                cl.close()
        levels.append(summarize_level(c, rounds))
    return levels


def summarize_level(c: int, rounds: list[tuple[list[dict[str, Any]], float]]) -> dict[str, Any]:
    """One concurrency level's percentiles and throughput from its measured rounds."""
    reqs = [{"round": i, **r} for i, (records, _) in enumerate(rounds) for r in records]
    walls = [w for _, w in rounds]
    tokens = sum(r["tokens"] for r in reqs)
    wall_s = sum(walls) / 1e3
    per_token = [r["decode_per_token_ms"] for r in reqs if r["decode_per_token_ms"] is not None]
    decode_tokens = sum(r["tokens"] - 1 for r in reqs if r["tokens"] > 1)
    decode_s = sum(r["server_ms"]["decode"] for r in reqs if r["tokens"] > 1) / 1e3
    return {
        "concurrency": c,
        "rounds": len(rounds),
        "requests": len(reqs),
        "end_to_end": summarize([r["end_to_end_ms"] for r in reqs]),
        "first_response": summarize([r["first_response_ms"] for r in reqs]),
        "server": {
            **{s: summarize([r["server_ms"][s] for r in reqs]) for s in SERVER_STAGES},
            "decode_per_token": summarize(per_token),
        },
        "overhead": summarize([r["overhead_ms"] for r in reqs]),
        "round_ms": summarize(walls),
        "requests_per_s": round(len(reqs) / wall_s, 4) if wall_s > 0 else None,
        "tokens_per_s": round(tokens / wall_s, 3) if wall_s > 0 else None,
        "decode_tokens_per_s_per_request": (
            round(decode_tokens / decode_s, 3) if decode_s > 0 else None
        ),
        "tokens_per_request": sorted({r["tokens"] for r in reqs}),
        "frames": sorted({r["frames"] for r in reqs}),
        "streamed_events": sum(r["streamed_events"] for r in reqs),
        "token_ids": reqs[-1]["token_ids"] if reqs else [],
        "prompt_ids": reqs[-1]["prompt_ids"] if reqs else 0,
        "samples": [{k: v for k, v in r.items() if k != "token_ids"} for r in reqs],
    }


def pool_levels(invocations: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Each concurrency level over several invocations: their measured rounds pooled into
    one summary (as if measured at once), with each invocation's own figures kept in
    ``by_invocation`` (e2e p50, server total p50, requests/s, tokens/s)."""
    if len(invocations) == 1:
        return invocations[0]
    pooled = []
    for levels in zip(*invocations, strict=True):
        rounds: list[tuple[list[dict[str, Any]], float]] = []
        for lv in levels:
            walls = lv["round_ms"]["samples_ms"]
            for i, wall in enumerate(walls):
                records = [
                    {k: v for k, v in r.items() if k != "round"}
                    for r in lv["samples"]
                    if r["round"] == i
                ]
                for r in records:
                    r["token_ids"] = lv["token_ids"]
                rounds.append((records, wall))
        out = summarize_level(levels[0]["concurrency"], rounds)
        out["by_invocation"] = [
            {
                "end_to_end_p50_ms": lv["end_to_end"]["p50_ms"],
                "server_total_p50_ms": lv["server"]["total"]["p50_ms"],
                "requests_per_s": lv["requests_per_s"],
                "tokens_per_s": lv["tokens_per_s"],
            }
            for lv in levels
        ]
        pooled.append(out)
    return pooled


def backend_run(level: dict[str, Any], url: str, tokens_per_frame: int) -> BackendRun:
    """The main table's ``triton`` row from one level (concurrency 1): the stage columns
    are the server's own timings, ``end_to_end`` is the client's."""
    reqs = level["samples"]
    server = [r["server_ms"] for r in reqs]
    run = BackendRun(NAME, url, 0.0, options={"url": url, "concurrency": level["concurrency"]})
    run.samples = {
        "video": [s["video"] for s in server],
        "vision": [s["vision"] for s in server],  # the projector runs inside (not split)
        "prefill": [s["prefill"] for s in server],
        # Server-side time to the first token's forward pass: video + vision + prefill.
        "ttft": [s["video"] + s["vision"] + s["prefill"] for s in server],
        # One sample per request: its mean per-token decode time (steps are not sent apart).
        "decode_step": [
            r["decode_per_token_ms"] for r in reqs if r["decode_per_token_ms"] is not None
        ],
        "end_to_end": [r["end_to_end_ms"] for r in reqs],
    }
    run.token_ids = list(level["token_ids"])
    run.frames = level["frames"][-1] if level["frames"] else 0
    # Prefill length: text ids (the video placeholder replaced) + the video block's rows.
    run.prompt_positions = max(0, int(level["prompt_ids"]) - 1 + run.frames * tokens_per_frame)
    run.peak_rss_mb = None  # the server's memory is its own process's
    run.peak_rss_method = "not measured (server process)"
    return run


NOTES = (
    "triton row: video/vision/prefill/decode_step are the server's own timings "
    "(trace_pipeline's timing_ms) at concurrency 1; vision includes the projector; ttft = "
    "server video + vision + prefill; decode_step has one sample per request (its decode "
    "time / (tokens - 1)); end_to_end is the client's clock (includes gRPC transport and "
    "streaming). Each request generates --decode-steps + 1 tokens (max_new_tokens, EOS "
    "ignored): one from prefill + --decode-steps decode steps, as in-process; the server "
    "samples the model's num_frames frames (--frames is not sent)."
)
