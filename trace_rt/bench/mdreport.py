"""``--markdown FILE``: the bench's report as markdown, every figure computed from the JSON
document (:mod:`trace_rt.bench.report`): nothing here is hand-written about the data."""

from __future__ import annotations

from typing import Any

from trace_rt.bench import batching_report, peer_table
from trace_rt.bench.peer import LLM_ONLY_NOTE
from trace_rt.bench.render import LEGEND, TRITON_COLUMNS, _ms, _target, _x, triton_rows
from trace_rt.bench.stats import STAGES
from trace_rt.bench.summary import LONG_TAIL
from trace_rt.bench.video import ffmpeg_lines


def _header(report: dict[str, Any]) -> list[str]:
    m, c = report["machine"], report["config"]
    libs = ", ".join(f"{k} {v}" for k, v in m["libraries"].items())
    gpu = ", ".join(g["name"] for g in m["gpu"]) or "none"
    peaks = c["peaks"]
    repeat = c.get("repeat", 1)
    kernels = (peaks.get("details") or {}).get("bandwidth_kernels_gbps")
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
        f"- request: task `{c['task']}`, video {c['video']}; {repeat} invocation(s)"
        f"{', ' + str(c.get('repeat_gap_s')) + ' s apart' if repeat > 1 else ''}, each "
        f"{c['warmup']} warmup + {c['runs']} measured runs per backend, backends one after "
        "another",
        f"- peaks ({peaks['source']}): {peaks['gbps']} GB/s, {peaks['tflops']} TFLOP/s"
        + (f", int8 {peaks['int8_tops']} TOP/s" if peaks.get("int8_tops") else ""),
    ]
    if kernels:
        d = peaks["details"]
        fl = d.get("compute_kernels_tflops", {})
        i8 = d.get("int8_kernels_tops", {})
        int8 = f"; int8 {', '.join(f'{k} {v}' for k, v in i8.items())}" if i8 else ""
        lines.append(
            f"  (fastest of: bandwidth {', '.join(f'{k} {v}' for k, v in kernels.items())}; "
            f"compute {', '.join(f'{k} {v}' for k, v in fl.items())}{int8}; best per kernel "
            f"over the invocations; set by `{d['bandwidth']}` and `{d['compute']}`"
            + (f" and `{d['int8']}`" if d.get("int8") else "")
            + ")"
        )
    variants = {
        n: e["decoder_variant"] for n, e in report["backends"].items() if e.get("decoder_variant")
    }
    if variants:
        lines.append(
            "- decoder variants run: " + ", ".join(f"{n} `{v}`" for n, v in variants.items())
        )
    mix = {
        n: e["decode_steps_by_head"]
        for n, e in report["backends"].items()
        if e.get("decode_steps_by_head") and any(e["decode_steps_by_head"].values())
    }
    if mix:
        lines.append(
            "- decode steps by head (the fused decoders run `lm_head` in text steps only; "
            "peers compute every logit each step): "
            + "; ".join(
                f"{n} " + ", ".join(f"{h} {k}" for h, k in m.items() if k) for n, m in mix.items()
            )
        )
    if c.get("note"):
        lines.append(f"- note: {c['note']}")
    return lines


def _load_lines(report: dict[str, Any]) -> list[str]:
    invs = report.get("invocations") or []
    if not invs:
        return []
    lines = [
        "",
        "## Machine load per invocation",
        "",
        "loadavg: 1-min load average before and after; others busy: share of all CPUs' time "
        "spent by other processes during the invocation (/proc/stat busy time minus this "
        "process's CPU time).",
        "",
        "| invocation | started (UTC) | wall s | loadavg before → after | others busy | "
        "steal | peaks GB/s, TFLOP/s |",
        "|---:|---|---:|---|---:|---:|---|",
    ]
    for inv in invs:
        ld, pk = inv["load"], inv.get("peaks") or {}
        b, a = ld.get("loadavg_before") or ["?"], ld.get("loadavg_after") or ["?"]
        busy, steal = ld.get("others_busy_fraction"), ld.get("steal_fraction")
        lines.append(
            f"| {inv['index'] + 1} | {ld['started_utc']} | {ld['wall_s']:.0f} | {b[0]} → {a[0]} "
            f"| {'-' if busy is None else f'{busy:.0%}'} | "
            f"{'-' if steal is None else f'{steal:.0%}'} | "
            f"{pk.get('gbps', '-')}, {pk.get('tflops', '-')} |"
        )
    return lines


def _stage_cell(st: dict[str, Any], stage: str) -> str:
    if st["p50_ms"] is None:
        if st.get("note") == LLM_ONLY_NOTE:
            return "n/a (LLM only)"
        return "in vision" if stage == "projector" else "-"
    cell = _ms(st.get("p50_median_ms", st["p50_ms"]))
    sp = st.get("p50_spread_ms")
    if sp and len(st.get("p50_by_invocation_ms") or []) > 1:
        cell += f" [{_ms(sp[0])}–{_ms(sp[1])}]"
    cell += f" / {_ms(st['p90_ms'])} / {_ms(st['p99_ms'])}"
    if st.get("vs_floor") is not None:
        cell += f" ({st['vs_floor']:.2f}x floor{' — BEATEN' if st.get('floor_beaten') else ''})"
    return cell


def _latency(entries: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "## p50 [min–max over invocations] / p90 / p99 (ms) and floor",
        "",
        "p50: median over invocations of each invocation's p50; [min–max]: the spread "
        "between invocations; p90/p99: over every sample of every invocation.",
        "",
        "| backend | " + " | ".join(STAGES) + " |",
        "|---|" + "---:|" * len(STAGES),
    ]
    for name, e in entries.items():
        cells = [_stage_cell(e["stages"][s], s) for s in STAGES]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    seen: set[str] = set()
    for name, e in entries.items():  # one floor row per distinct floor (dtype, variant)
        floors = " | ".join(_ms(e["stages"][s]["floor_ms"]) for s in STAGES)
        if floors not in seen:
            seen.add(floors)
            lines.append(f"| *floor ({name})* | {floors} |")
    return lines


def _spread_x(v: float | None, sp: list[float] | None) -> str:
    return _x(v) + (f" [{sp[0]:.2f}–{sp[1]:.2f}]" if sp and sp[0] != sp[1] else "")


def _throughput(entries: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "## Throughput, memory, speed-up over `reference`",
        "",
        "Speed-ups: reference p50 / backend p50 within each invocation (side by side, same "
        "load), median [min–max] over invocations. decode tok/s: decode steps / the time spent "
        "in them over every sample (a mean rate); 1000/step: the rate of the median step.",
        "",
        "| backend | decode tok/s | 1000/step | peak RSS MB | peak GPU MB | load s | "
        "end to end | decode step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, e in entries.items():
        sp, spr = e["speedup_vs_reference"], e.get("speedup_spread") or {}
        lines.append(
            f"| {name} | {e['decode_tokens_per_s']} | "
            f"{e.get('decode_tokens_per_s_from_median_step', '-')} | "
            f"{e['peak_rss_mb'] if e['peak_rss_mb'] is not None else '-'} | "
            f"{e['peak_gpu_mb'] if e['peak_gpu_mb'] is not None else '-'} | "
            f"{e['load_s'] if e['load_s'] is not None else '-'} | "
            f"{_spread_x(sp['end_to_end'], spr.get('end_to_end'))} | "
            f"{_spread_x(sp['decode_step'], spr.get('decode_step'))} |"
        )
    return lines


def _checks(report: dict[str, Any]) -> list[str]:
    fc = report.get("floor_check") or {"ok": True, "beaten": []}
    lines = ["", "## Floor check", ""]
    if fc["ok"]:
        lines.append("No measured sample of any backend beats its floor.")
    for b in fc["beaten"]:
        lines.append(
            f"- **not a floor**: `{b['backend']}` {b['stage']}: fastest sample "
            f"{_ms(b['fastest_ms'])} ms < floor {_ms(b['floor_ms'])} ms ({b['ratio']:.2f}x)"
        )
    lines += ["", f"## Tails (long: p99 > {LONG_TAIL}x p50, pooled samples)", ""]
    lines += ["| backend | stage | p90/p50 | p99/p50 | long |", "|---|---|---:|---:|---|"]
    for name, e in report["backends"].items():
        for stage in STAGES:
            t = e["stages"][stage].get("tail")
            if t:
                long = "**long**" if t["long"] else ""
                lines.append(
                    f"| {name} | {stage} | {t['p90_over_p50']:.2f} | {t['p99_over_p50']:.2f} "
                    f"| {long} |"
                )
    return lines


def _targets(report: dict[str, Any]) -> list[str]:
    if not report["targets"]:
        return []
    lines = [
        "",
        "## CPU targets (issue 5)",
        "",
        "value: median over invocations [min–max]; verdict met/missed only when the margin "
        "to the bound exceeds the spread (max - min) between invocations, else within noise.",
        "",
        "| backend | metric | target | per invocation | value | verdict |",
        "|---|---|---|---|---:|---|",
    ]
    for t in report["targets"]:
        per = ", ".join("-" if v is None else f"{v:.2f}" for v in t.get("by_invocation", []))
        v = "-" if t["value"] is None else _target(t).split(": ", 1)[0]
        lines.append(
            f"| {t['backend']} | {t['metric']} | {t['target']} | {per} | {v} | {t['gap']} |"
        )
    return lines


def _triton(section: dict[str, Any]) -> list[str]:
    req = section["request"]
    lines = [
        "",
        "## Triton server by concurrency",
        "",
        f"Server `{section['url']}` (model `{section['model']}`"
        f"{', tritonserver ' + section['server_version'] if section.get('server_version') else ''}"
        f"): each round, *clients* threads (one gRPC client each) send the same request at "
        f"once (task `{req['task']}`, max_new_tokens {req['max_new_tokens']}, EOS ignored); "
        f"{section['warmup']} warmup + {section['runs']} measured rounds per level and "
        "invocation, rounds of every invocation pooled. "
        "e2e, first response (first streamed event, else the final result) and overhead "
        "(e2e - server total: client, gRPC, queueing) are client clocks; `server *` are "
        "trace_pipeline's own timing_ms; req/s and tok/s: requests and generated tokens per "
        "second of round wall time.",
        "",
        "| " + " | ".join(TRITON_COLUMNS) + " |",
        "|" + "---:|" * len(TRITON_COLUMNS),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in triton_rows(section)]
    by_inv = [lv for lv in section["levels"] if lv.get("by_invocation")]
    if by_inv:
        lines += ["", "Per invocation (e2e p50 ms; req/s):", ""]
        for lv in by_inv:
            per = "; ".join(
                f"{_ms(x['end_to_end_p50_ms'])}, {x['requests_per_s']}" for x in lv["by_invocation"]
            )
            lines.append(f"- {lv['concurrency']} client(s): {per}")
    lines += ["", f"- {section['notes']}"]
    return lines


def markdown(report: dict[str, Any]) -> str:
    """The whole report: header, load, latency, throughput, checks, targets, triton, the
    in-process engine (``--concurrency``, ``--queries-per-video``)."""
    lines = _header(report)
    lines += _load_lines(report)
    lines += _latency(report["backends"])
    lines += _throughput(report["backends"])
    lines += peer_table.markdown(report["backends"])
    lines += _checks(report)
    lines += _targets(report)
    if report.get("video_ffmpeg"):
        lines += ["", "## Video stage vs the ffmpeg CLI", ""]
        lines += [f"- {line}" for line in ffmpeg_lines(report)]
        if "command" in report["video_ffmpeg"]:
            lines += ["", f"`{report['video_ffmpeg']['command']}`"]
    if report.get("triton"):
        lines += _triton(report["triton"])
    if report.get("engine"):
        lines += batching_report.markdown(report["engine"])
    if report["skipped"]:
        lines += ["", "## Skipped", ""]
        lines += [f"- `{k}`: {v}" for k, v in report["skipped"].items()]
    lines += ["", "---", "", LEGEND]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m trace_rt.bench.mdreport RESULT.json [OUT.md] [--recheck]``: render a
    recorded result again; ``--recheck`` first re-derives the floor check, tails and target
    verdicts from its samples with this code (and rewrites the JSON, noting it)."""
    import argparse
    import json
    from pathlib import Path

    from trace_rt.bench.report import derive_checks

    p = argparse.ArgumentParser(prog="python -m trace_rt.bench.mdreport")
    p.add_argument("json", type=Path, help="a --json result of python -m trace_rt.bench")
    p.add_argument("markdown", type=Path, nargs="?", help="output (default: beside, .md)")
    p.add_argument("--recheck", action="store_true", help="re-derive checks, rewrite the JSON")
    args = p.parse_args(argv)
    doc = json.loads(args.json.read_text())
    if args.recheck:
        derive_checks(doc)
        doc["config"]["rechecked"] = "floor_check, long_tails, targets re-derived from samples"
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    (args.markdown or args.json.with_suffix(".md")).write_text(markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
