"""One invocation of the bench: the peaks, every in-process backend in turn (a live table
and a progress bar), then the Triton server's concurrency levels; and each backend's
entry over the invocations (:mod:`trace_rt.bench.report`)."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from trace_rt.bench import floor as floor_mod
from trace_rt.bench import peaks as peaks_mod
from trace_rt.bench import plugins, render, report
from trace_rt.bench import triton as triton_mod
from trace_rt.bench.load import LoadWindow
from trace_rt.bench.runner import BackendRun, Request, run_backend
from trace_rt.config import TraceConfig
from trace_rt.errors import TraceError


@dataclass
class Invocation:
    """One full round of the bench: every backend's run, the load, the peaks."""

    runs: dict[str, BackendRun]
    peaks: floor_mod.Peaks
    record: dict[str, Any]
    levels: list[dict[str, Any]] | None = None  # triton, when asked for


def run_invocation(
    k: int,
    specs: list[plugins.BackendSpec],
    skipped: dict[str, str],
    args: argparse.Namespace,
    cfg: TraceConfig,
    request: Request,
    console: Console,
    server: dict[str, Any] | None,
) -> Invocation:
    """Invocation *k*: wait --repeat-gap (after the first), measure the peaks, run every
    backend (and the server), and keep the machine's load over it all."""
    if k and args.repeat_gap:
        console.print(f"waiting {args.repeat_gap:g} s before invocation {k + 1} …")
        time.sleep(args.repeat_gap)
    label = f"invocation {k + 1}/{args.repeat}" if args.repeat > 1 else "trace-rt bench"
    window = LoadWindow()
    console.print(f"[bold]{label}[/bold]: measuring the device's peaks …")
    peaks = peaks_mod.resolve_peaks(
        args.peak_gbps, args.peak_tflops, args.device, quick=args.quick_peaks
    )
    int8 = f", int8 {peaks.int8_tops} TOP/s" if peaks.int8_tops else ""
    console.print(f"peaks ({peaks.source}): {peaks.gbps} GB/s, {peaks.tflops} TFLOP/s{int8}")
    active = [s for s in specs if s.name not in skipped]
    out = Invocation({}, peaks, {})
    loads = _run_all(active, skipped, args, cfg, request, peaks, console, server, out)
    out.record = {
        "index": k,
        "started_utc": window.started_utc,
        "load": window.close(),
        "peaks": {"gbps": peaks.gbps, "tflops": peaks.tflops, "int8_tops": peaks.int8_tops},
        "backends": loads,
    }
    return out


def entries_of(
    rounds: list[Invocation], cfg: TraceConfig, peaks: floor_mod.Peaks, decode_steps: int
) -> tuple[dict[str, dict[str, Any]], dict[str, list[dict[str, float | None]]]]:
    """Each backend's entry over the invocations it ran in, and its per-invocation p50s
    (aligned with the invocations: empty where it did not run)."""
    entries: dict[str, dict[str, Any]] = {}
    by_inv: dict[str, list[dict[str, float | None]]] = {}
    names = list(dict.fromkeys(n for r in rounds for n in r.runs))
    for name in names:
        runs = [r.runs.get(name) for r in rounds]
        steps = max(1, decode_steps - 1) if name == triton_mod.NAME else decode_steps
        entry, by_inv[name] = report.repeated_entry(runs, cfg, peaks, steps)
        entry["load_by_invocation"] = [r.record["backends"].get(name) for r in rounds]
        if name == triton_mod.NAME:
            entry["load_s"] = None  # loaded by the server, not here
            entry["concurrency"] = entry["options"].get("concurrency")
            entry["note"] = triton_mod.NOTES
        entries[name] = entry
    return entries, by_inv


def _run_all(
    specs: list[plugins.BackendSpec],
    skipped: dict[str, str],
    args: argparse.Namespace,
    cfg: TraceConfig,
    request: Request,
    peaks: floor_mod.Peaks,
    console: Console,
    server: dict[str, Any] | None,
    out: Invocation,
) -> dict[str, dict[str, Any]]:
    """Each backend in turn into ``out.runs``, with a live table of the finished ones and a
    progress bar; then the Triton *server* (checked ready by the caller) if ``triton`` was
    asked for, its levels into ``out.levels``. Returns each backend's load record."""
    loads: dict[str, dict[str, Any]] = {}
    progress = Progress(
        TextColumn("{task.description:<28}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )
    tasks = {
        s.name: progress.add_task(f"{s.name}: waiting", total=args.warmup + args.runs)
        for s in specs
    }
    if server is not None:
        levels = len(server["concurrency"]) * (args.warmup + args.runs)
        tasks[triton_mod.NAME] = progress.add_task(f"{triton_mod.NAME}: waiting", total=levels)

    def view() -> Group:
        shown = {n: report.backend_entry(r, cfg, peaks, request.decode_steps)
                 for n, r in out.runs.items()}  # fmt: skip
        return Group(render.console_table(shown, "finished (p50)", console.width), progress)

    with Live(view(), console=console, refresh_per_second=4, transient=True) as live:
        for spec in specs:
            task = tasks[spec.name]
            try:
                cls = spec.load_class()
            except ImportError as e:
                skipped[spec.name] = f"cannot import {spec.target}: {e}"
                progress.update(task, description=f"{spec.name}: skipped")
                continue
            model_dir, why = plugins.model_dir_for(
                spec.model_format(cls), args.model, args.artifacts
            )
            if model_dir is None:
                skipped[spec.name] = why or "no model directory"
                progress.update(task, description=f"{spec.name}: skipped")
                continue

            def note(
                phase: str, done: int, total: int, task: Any = task, name: str = spec.name
            ) -> None:
                progress.update(task, completed=done, description=f"{name}: {phase}")
                live.update(view())

            window = LoadWindow()
            try:
                run = run_backend(
                    spec,
                    cls,
                    model_dir,
                    request,
                    warmup=args.warmup,
                    runs=args.runs,
                    device=args.device,
                    dtype=args.dtype,
                    progress=note,
                )
            except (ImportError, RuntimeError, TraceError, OSError) as e:
                # Unavailable here (no GPU, no engines, no int4 variant, ...): say why, go on.
                skipped[spec.name] = f"{type(e).__name__}: {e}"
                progress.update(task, description=f"{spec.name}: skipped")
                continue
            loads[spec.name] = window.close()
            out.runs[spec.name] = run
            progress.update(task, description=f"{spec.name}: done")
            live.update(view())
        if server is not None and triton_mod.NAME not in skipped:
            window = LoadWindow()
            _run_triton(server, args, cfg, request, out, skipped, progress, tasks)
            loads[triton_mod.NAME] = window.close()
            live.update(view())
    return loads


def _run_triton(
    server: dict[str, Any],
    args: argparse.Namespace,
    cfg: TraceConfig,
    request: Request,
    out: Invocation,
    skipped: dict[str, str],
    progress: Progress,
    tasks: dict[str, Any],
) -> None:
    """Every --concurrency level against the server; a failure mid-way skips triton."""
    name, task = triton_mod.NAME, tasks[triton_mod.NAME]
    req = triton_mod.TritonRequest(request.video, request.task, request.query, args.decode_steps)

    def note(phase: str, done: int, total: int) -> None:
        progress.update(task, completed=done, description=f"{name}: {phase}")

    try:
        levels = triton_mod.measure(
            server["url"], req, server["concurrency"], warmup=args.warmup, runs=args.runs,
            progress=note,
        )  # fmt: skip
    except Exception as e:  # a remote service: ServingError, tritonclient's, a dropped link
        skipped[name] = f"{type(e).__name__} from {server['url']}: {e}"
        progress.update(task, description=f"{name}: skipped")
        return
    server["section"] = {
        "url": server["url"],
        "model": server["model"],
        "server_version": server.get("server_version"),
        "request": {
            "task": req.task,
            "query": req.query,
            "max_new_tokens": req.decode_steps + 1,
            "ignore_eos": True,
        },
        "warmup": args.warmup,
        "runs": args.runs,
        "notes": triton_mod.NOTES,
    }
    out.levels = levels
    first = min(levels, key=lambda lv: lv["concurrency"])  # main table: 1 client (default)
    out.runs[name] = triton_mod.backend_run(first, server["url"], cfg.tokens_per_frame)
    progress.update(task, description=f"{name}: done")
