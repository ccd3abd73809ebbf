"""The bench's outputs: the JSON document (a contract), the console table and markdown.

JSON core shape (scripts rely on it; add keys, never rename these)::

    {"machine": {...}, "config": {...},
     "backends": {NAME: {"stages": {STAGE: {"p50_ms", "p90_ms", "p99_ms", "samples_ms", ...}},
                         "decode_tokens_per_s", "peak_rss_mb",
                         "speedup_vs_reference": {"end_to_end", "decode_step"}, ...}},
     "skipped": {NAME: reason}, "targets": [...],
     "triton": null | {"url", "model", "levels": [{"concurrency", "end_to_end",
                       "first_response", "server": {STAGE: {...}}, "overhead",
                       "requests_per_s", "tokens_per_s", "samples": [...], ...}], "notes"}}

STAGE is each of :data:`~trace_rt.bench.stats.STAGES`; every backend has every stage (a
stage a backend cannot time apart has ``samples_ms: []``, null percentiles and a ``note``).
The ``triton`` backend (a server, :mod:`trace_rt.bench.triton`) is in ``backends`` with its
concurrency-1 figures and has its own ``triton`` section, one level per ``--concurrency``.
"""

from __future__ import annotations

from typing import Any

from rich.table import Table

from trace_rt.bench.floor import Peaks, stage_floors
from trace_rt.bench.runner import BackendRun
from trace_rt.bench.stats import STAGES, per_position, speedup, summarize, tokens_per_s
from trace_rt.config import TraceConfig

REFERENCE = "reference"
SHORT = {  # console column headers
    "video": "video",
    "vision": "vision",
    "projector": "proj",
    "prefill": "prefill",
    "ttft": "ttft",
    "decode_step": "step",
    "end_to_end": "e2e",
}
# The CPU targets for `small` (recorded, not asserted): (backend, metric, op, bound).
CPU_TARGETS = (
    ("onnxruntime", "decode_step_vs_floor", "<=", 1.2),
    ("onnxruntime", "speedup_end_to_end", ">=", 1.3),
    ("onnxruntime-int4", "speedup_decode_step", ">=", 3.0),
    ("onnxruntime-int4", "speedup_end_to_end", ">=", 2.0),
    ("onnxruntime-int8", "speedup_decode_step", ">=", 1.8),
)


def backend_entry(
    run: BackendRun, cfg: TraceConfig, peaks: Peaks, decode_steps: int
) -> dict[str, Any]:
    """One backend's JSON object (speed-ups are filled in by :func:`build_report`)."""
    floors = stage_floors(
        cfg,
        peaks,
        frames=run.frames,
        prompt_positions=run.prompt_positions,
        decode_steps=decode_steps,
        itemsize=run.itemsize,
        weight_bytes=run.weight_bytes,
    )
    stages: dict[str, Any] = {}
    for stage in STAGES:
        s = summarize(run.samples.get(stage, []))
        floor = floors[stage]
        s["floor_ms"] = round(floor, 4) if floor is not None else None
        s["vs_floor"] = round(s["p50_ms"] / floor, 3) if floor and s["p50_ms"] else None
        if stage == "projector" and not run.staged:
            s["note"] = "this backend has no encode_frames/project split: included in vision"
        stages[stage] = s
    return {
        "stages": stages,
        "decode_tokens_per_s": tokens_per_s(run.samples.get("decode_step", [])),
        "peak_rss_mb": run.peak_rss_mb,
        "peak_rss_method": run.peak_rss_method,
        "peak_gpu_mb": run.peak_gpu_mb,
        "speedup_vs_reference": {"end_to_end": None, "decode_step": None},
        "load_s": run.load_s,
        "model_dir": run.model_dir,
        "options": run.options,
        "prompt_positions": run.prompt_positions,
        "frames": run.frames,
        "decode_step_by_position_ms": per_position(run.steps_by_run),
        "floor_inputs": floors["inputs"],
        "token_ids": run.token_ids,
    }


def build_report(
    machine: dict[str, Any],
    config: dict[str, Any],
    entries: dict[str, dict[str, Any]],
    skipped: dict[str, str],
    triton: dict[str, Any] | None = None,
) -> dict[str, Any]:
    ref = entries.get(REFERENCE)
    for entry in entries.values():
        for stage in ("end_to_end", "decode_step"):
            entry["speedup_vs_reference"][stage] = (
                speedup(ref["stages"][stage]["p50_ms"], entry["stages"][stage]["p50_ms"])
                if ref is not None
                else None
            )
    report = {"machine": machine, "config": config, "backends": entries, "skipped": skipped}
    report["targets"] = check_targets(report) if targets_apply(config) else []
    report["triton"] = triton
    return report


def targets_apply(config: dict[str, Any]) -> bool:
    """The CPU targets are stated for `small` (768 wide, 12 layers), 16 frames, 64 steps."""
    mc = config.get("model_config", {})
    return (
        config.get("device", "cpu") == "cpu"
        and (mc.get("hidden_size"), mc.get("num_hidden_layers")) == (768, 12)
        and (config.get("frames"), config.get("decode_steps")) == (16, 64)
    )


def _metric(entry: dict[str, Any], metric: str) -> float | None:
    if metric == "decode_step_vs_floor":
        return entry["stages"]["decode_step"]["vs_floor"]
    return entry["speedup_vs_reference"][metric.removeprefix("speedup_")]


def check_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's CPU targets against this run: value, bound, met, and by how much."""
    out = []
    for name, metric, op, bound in CPU_TARGETS:
        entry = report["backends"].get(name)
        value = _metric(entry, metric) if entry is not None else None
        row: dict[str, Any] = {"backend": name, "metric": metric, "target": f"{op} {bound}"}
        row["value"] = value
        if value is None:
            row["met"] = None
            row["gap"] = "not measured" if entry is None else "no reference in this run"
        else:
            met = value <= bound if op == "<=" else value >= bound
            row["met"] = met
            # How far off: over a ceiling, or short of a minimum, in % of the bound.
            if met:
                row["gap"] = "met"
            elif op == "<=":
                row["gap"] = f"missed: {(value / bound - 1) * 100:.0f}% over the bound"
            else:
                row["gap"] = f"missed: {(1 - value / bound) * 100:.0f}% short of the bound"
        out.append(row)
    return out


# ---- console -------------------------------------------------------------------------------
def _ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if v < 10 else f"{v:.1f}" if v < 1000 else f"{v:,.0f}"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def console_table(entries: dict[str, dict[str, Any]], title: str) -> Table:
    """p50 ms per stage and backend, plus throughput, memory, floor and speed-ups."""
    table = Table(title=title, title_justify="left", header_style="bold")
    table.add_column("backend")
    for stage in STAGES:
        table.add_column(SHORT[stage], justify="right")
    for col in ("tok/s", "RSS MB", "step\n/floor", "e2e\nvs ref", "step\nvs ref"):
        table.add_column(col, justify="right")
    for name, e in entries.items():
        st = e["stages"]
        table.add_row(
            name,
            *(_ms(st[s]["p50_ms"]) for s in STAGES),
            "-" if e["decode_tokens_per_s"] is None else f"{e['decode_tokens_per_s']:.1f}",
            "-" if e["peak_rss_mb"] is None else f"{e['peak_rss_mb']:.0f}",
            _x(st["decode_step"]["vs_floor"]),
            _x(e["speedup_vs_reference"]["end_to_end"]),
            _x(e["speedup_vs_reference"]["decode_step"]),
        )
    if entries:
        name, first = next(iter(entries.items()))
        table.add_row(
            f"[dim]floor ({name})[/dim]",
            *(f"[dim]{_ms(first['stages'][s]['floor_ms'])}[/dim]" for s in STAGES),
            *([""] * 5),
        )
    return table


def triton_table(section: dict[str, Any]) -> Table:
    """The Triton server per concurrency: client latency, server stages, throughput."""
    table = Table(
        title=f"triton concurrency ({section['url']}, {section['model']}); ms, p50 unless noted",
        title_justify="left",
        header_style="bold",
    )
    for col in TRITON_COLUMNS:
        table.add_column(col.replace(" ", "\n", 1), justify="right")
    for row in triton_rows(section):
        table.add_row(*row)
    return table


TRITON_COLUMNS = (
    "clients",
    "requests",
    "e2e p50",
    "e2e p90",
    "first response",
    "server video",
    "server vision",
    "server prefill",
    "server decode",
    "server ms/token",
    "server total",
    "overhead",
    "req/s",
    "tok/s",
)


def triton_rows(section: dict[str, Any]) -> list[list[str]]:
    rows = []
    for lv in section["levels"]:
        sv = lv["server"]
        rows.append(
            [
                str(lv["concurrency"]),
                str(lv["requests"]),
                _ms(lv["end_to_end"]["p50_ms"]),
                _ms(lv["end_to_end"]["p90_ms"]),
                _ms(lv["first_response"]["p50_ms"]),
                *(_ms(sv[s]["p50_ms"]) for s in ("video", "vision", "prefill", "decode")),
                _ms(sv["decode_per_token"]["p50_ms"]),
                _ms(sv["total"]["p50_ms"]),
                _ms(lv["overhead"]["p50_ms"]),
                "-" if lv["requests_per_s"] is None else f"{lv['requests_per_s']:.2f}",
                "-" if lv["tokens_per_s"] is None else f"{lv['tokens_per_s']:.1f}",
            ]
        )
    return rows


# ---- markdown -----------------------------------------------------------------------------
def markdown(report: dict[str, Any]) -> str:
    m, c, entries = report["machine"], report["config"], report["backends"]
    libs = ", ".join(f"{k} {v}" for k, v in m["libraries"].items())
    gpu = ", ".join(g["name"] for g in m["gpu"]) or "none"
    peaks = c["peaks"]
    lines = [
        f"# trace-rt bench: {c['model_name']}, {c['frames']} frames, "
        f"{c['decode_steps']} decode steps ({c['device']})",
        "",
        f"- date: {m['date_utc']}; git {str(m['git']['commit'])[:12]}"
        f"{' (dirty tree)' if m['git']['dirty'] else ''}",
        f"- machine: {m['cpu_model']}, {m['cores']} cores / {m['threads']} threads usable, "
        f"{m['memory_gb']} GB RAM; GPU: {gpu}; load average at start "
        f"{', '.join(f'{x:.2f}' for x in m['load_average_start'] or [])}, at end "
        f"{', '.join(f'{x:.2f}' for x in m.get('load_average_end') or [])} (1/5/15 min)",
        f"- libraries: {libs}",
        f"- command: `{c['command']}`",
        f"- request: task `{c['task']}`, video {c['video']}; {c['warmup']} warmup + "
        f"{c['runs']} measured runs per backend, backends run one after another",
        f"- peaks ({peaks['source']}): {peaks['gbps']} GB/s, {peaks['tflops']} TFLOP/s",
        *([f"- note: {c['note']}"] if c.get("note") else []),
        "",
        "## p50 / p90 / p99 (ms) and floor",
        "",
        "| backend | " + " | ".join(STAGES) + " |",
        "|---|" + "---:|" * len(STAGES),
    ]
    for name, e in entries.items():
        cells = []
        for s in STAGES:
            st = e["stages"][s]
            if st["p50_ms"] is None:
                cells.append("in vision" if s == "projector" else "-")
                continue
            cell = f"{_ms(st['p50_ms'])} / {_ms(st['p90_ms'])} / {_ms(st['p99_ms'])}"
            if st["vs_floor"] is not None:
                cell += f" ({st['vs_floor']:.2f}x floor)"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    seen: set[str] = set()
    for name, e in entries.items():  # one floor row per distinct floor (dtype, variant)
        floors = " | ".join(_ms(e["stages"][s]["floor_ms"]) for s in STAGES)
        if floors not in seen:
            seen.add(floors)
            lines.append(f"| *floor ({name})* | {floors} |")
    lines += [
        "",
        "## Throughput, memory, speed-up over `reference` (ratio of p50s)",
        "",
        "| backend | decode tok/s | peak RSS MB | peak GPU MB | load s | end to end "
        "| decode step |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, e in entries.items():
        sp = e["speedup_vs_reference"]
        lines.append(
            f"| {name} | {e['decode_tokens_per_s']} | "
            f"{e['peak_rss_mb'] if e['peak_rss_mb'] is not None else '-'} | "
            f"{e['peak_gpu_mb'] if e['peak_gpu_mb'] is not None else '-'} | "
            f"{e['load_s'] if e['load_s'] is not None else '-'} | "
            f"{_x(sp['end_to_end'])} | {_x(sp['decode_step'])} |"
        )
    if report.get("triton"):
        lines += _triton_markdown(report["triton"])
    if report["targets"]:
        lines += ["", "## CPU targets (issue 5)", "", "| backend | metric | target | value | |"]
        lines.append("|---|---|---|---:|---|")
        for t in report["targets"]:
            v = "-" if t["value"] is None else f"{t['value']:.2f}"
            lines.append(f"| {t['backend']} | {t['metric']} | {t['target']} | {v} | {t['gap']} |")
    if report["skipped"]:
        lines += ["", "## Skipped", ""]
        lines += [f"- `{k}`: {v}" for k, v in report["skipped"].items()]
    return "\n".join(lines) + "\n"


def _triton_markdown(section: dict[str, Any]) -> list[str]:
    req = section["request"]
    lines = [
        "",
        "## Triton server by concurrency",
        "",
        f"Server `{section['url']}` (model `{section['model']}`"
        f"{', tritonserver ' + section['server_version'] if section.get('server_version') else ''}"
        f"): each round, *clients* threads (one gRPC client each) send the same request at "
        f"once (task `{req['task']}`, max_new_tokens {req['max_new_tokens']}, EOS ignored); "
        f"{section['warmup']} warmup + {section['runs']} measured rounds per level. "
        "e2e, first response (first streamed event, else the final result) and overhead "
        "(e2e - server total: client, gRPC, queueing) are client clocks; `server *` are "
        "trace_pipeline's own timing_ms; req/s and tok/s: requests and generated tokens per "
        "second of round wall time.",
        "",
        "| " + " | ".join(TRITON_COLUMNS) + " |",
        "|" + "---:|" * len(TRITON_COLUMNS),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in triton_rows(section)]
    lines += ["", f"- {section['notes']}"]
    return lines
