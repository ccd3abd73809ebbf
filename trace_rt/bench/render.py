"""The bench's console tables (fitted to the terminal's width) and its markdown report.

Every figure shown is the median over invocations of each invocation's p50 (with one
invocation: that p50), with the spread between invocations next to it; see
:mod:`trace_rt.bench.report` for the JSON these read.
"""

from __future__ import annotations

from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from trace_rt.bench import load as load_mod
from trace_rt.bench.stats import STAGES
from trace_rt.bench.summary import LONG_TAIL
from trace_rt.bench.video import ffmpeg_lines

SHORT = {  # console column headers
    "video": "video",
    "vision": "vision",
    "projector": "proj",
    "prefill": "prefill",
    "ttft": "ttft",
    "decode_step": "step",
    "decode_step_text": "text\nstep",
    "end_to_end": "e2e",
}
WIDE = 150  # below this many columns the main table becomes one block per backend
LEGEND = (
    "ms: median over invocations of each invocation's p50; (x%): spread between "
    "invocations, (max - min) / median. step: the median decode step. tok/s: decode steps "
    "/ the time spent in them (a mean rate: slow steps under load pull it down); "
    "1000/step: the rate of the median step; the two differ when some steps are slow. "
    "step/floor and vs ref: ratios within each invocation, median over invocations (min-max "
    "below); ! = a measurement beat its floor."
)


def _ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if v < 10 else f"{v:.1f}" if v < 1000 else f"{v:,.0f}"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _cell(s: dict[str, Any]) -> str:
    v = s.get("p50_median_ms", s.get("p50_ms"))
    if v is None:
        return "-"
    pct = s.get("spread_pct")
    n = len(s.get("p50_by_invocation_ms") or [])
    return _ms(v) + (f"\n[dim]({pct:.0f}%)[/dim]" if n > 1 and pct is not None else "")


def _rate(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _vs_floor(s: dict[str, Any]) -> str:
    text = _ratio(s.get("vs_floor"), s.get("vs_floor_spread"))
    return text.replace("x", "x !", 1) if s.get("floor_beaten") else text


def _ratio(v: float | None, sp: list[float] | None) -> str:
    """A ratio with its min-max over invocations on a second line (when they differ)."""
    text = _x(v)
    if v is not None and sp and sp[0] != sp[1]:
        text += f"\n[dim]{_short(sp[0])}-{_short(sp[1])}[/dim]"
    return text


def _short(v: float) -> str:
    return f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 100 else f"{v:.0f}"


def _speedup(e: dict[str, Any], stage: str) -> str:
    return _ratio(e["speedup_vs_reference"][stage], (e.get("speedup_spread") or {}).get(stage))


def console_table(
    entries: dict[str, dict[str, Any]], title: str, width: int | None = None
) -> RenderableType:
    """p50 per stage and backend, throughput, memory, floor and speed-ups; one wide table
    from WIDE columns up, else a block per backend and a summary table (fits 80)."""
    if width is not None and width < WIDE:
        return _narrow(entries, title)
    table = Table(title=title, title_justify="left", header_style="bold")
    table.add_column("backend")
    for stage in STAGES:
        table.add_column(SHORT[stage], justify="right")
    for col in ("tok/s", "1000\n/step", "RSS MB", "step\n/floor", "e2e\nvs ref", "step\nvs ref"):
        table.add_column(col, justify="right")
    for name, e in entries.items():
        st = e["stages"]
        table.add_row(
            name,
            *(_cell(st[s]) for s in STAGES),
            _rate(e["decode_tokens_per_s"]),
            _rate(e.get("decode_tokens_per_s_from_median_step")),
            "-" if e["peak_rss_mb"] is None else f"{e['peak_rss_mb']:.0f}",
            _vs_floor(st["decode_step"]),
            _speedup(e, "end_to_end"),
            _speedup(e, "decode_step"),
        )
    if entries:
        name, first = next(iter(entries.items()))
        table.add_row(
            f"[dim]floor ({name})[/dim]",
            *(f"[dim]{_ms(first['stages'][s]['floor_ms'])}[/dim]" for s in STAGES),
            *([""] * 6),
        )
    return table


def _narrow(entries: dict[str, dict[str, Any]], title: str) -> RenderableType:
    parts: list[RenderableType] = [Text(title, style="bold")]
    for name, e in entries.items():
        t = Table(title=name, title_justify="left", header_style="bold")
        for col in ("stage", "p50 ms (spread)", "floor ms", "x floor"):
            t.add_column(col, justify="left" if col == "stage" else "right")
        for stage in STAGES:
            s = e["stages"][stage]
            t.add_row(SHORT[stage], _cell(s), _ms(s["floor_ms"]), _vs_floor(s))
        parts.append(t)
    summary = Table(title="throughput, memory, speed-up", title_justify="left")
    for col in ("backend", "tok/s", "1000/step", "RSS MB", "e2e vs ref", "step vs ref"):
        summary.add_column(col, justify="left" if col == "backend" else "right")
    for name, e in entries.items():
        summary.add_row(
            name,
            _rate(e["decode_tokens_per_s"]),
            _rate(e.get("decode_tokens_per_s_from_median_step")),
            "-" if e["peak_rss_mb"] is None else f"{e['peak_rss_mb']:.0f}",
            _speedup(e, "end_to_end"),
            _speedup(e, "decode_step"),
        )
    parts.append(summary)
    return Group(*parts)


def notes(report: dict[str, Any]) -> list[str]:
    """Plain lines after the tables: legend, floor check, long tails, targets, load."""
    lines = [LEGEND]
    fc = report.get("floor_check") or {"ok": True, "beaten": []}
    for b in fc["beaten"]:
        lines.append(
            f"NOT A FLOOR: {b['backend']} {b['stage']} measured {_ms(b['fastest_ms'])} ms < "
            f"its floor {_ms(b['floor_ms'])} ms ({b['ratio']:.2f}x): the peaks underestimate "
            "this machine (marked ! in the tables)"
        )
    tails = report.get("long_tails") or []
    if tails:
        lines.append(
            f"long tails (p99 > {LONG_TAIL}x p50): "
            + ", ".join(f"{t['backend']} {t['stage']} {t['p99_over_p50']:.2f}x" for t in tails)
        )
    for t in report.get("targets", []):
        if t["value"] is not None:
            lines.append(f"target {t['backend']} {t['metric']} {t['target']}: {_target(t)}")
    lines += ffmpeg_lines(report)
    for inv in report.get("invocations", []):
        lines.append(f"invocation {inv['index'] + 1}: {load_mod.describe(inv['load'])}")
    return lines


def _target(t: dict[str, Any]) -> str:
    sp = t.get("spread")
    rng = f" [{sp[0]:.2f}-{sp[1]:.2f}]" if sp and len(t.get("by_invocation", [])) > 1 else ""
    return f"{t['value']:.2f}{rng}: {t['gap']}"


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
