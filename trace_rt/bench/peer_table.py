"""The side-by-side table of our backends and the peers (console and markdown).

One row per backend, grouped by precision: prefill and decode step p50 (median over
invocations, with their min-max), and for each of our backends the speed-up over the
fastest peer at its precision (``speedup_vs_best_peer`` of :mod:`trace_rt.bench.report`).
"""

from __future__ import annotations

from typing import Any

from rich.table import Table

from trace_rt.bench.peer import PRECISIONS

COLUMNS = (
    "backend",
    "kind",
    "precision",
    "positions",
    "prefill ms",
    "decode step ms",
    "text-head step ms",
    "prefill vs best peer",
    "step vs best peer",
    "text-head step vs best peer",
    "best peer (prefill / step)",
)
ABOUT = (
    "Peers run the LLM alone (no video front end) on a prompt of the same number of "
    "positions (the request's text and video-block positions, as text ids) and the same "
    "number of greedy decode steps. ms: median over invocations of each invocation's p50 "
    "[min–max]. vs best peer: the fastest peer of the same precision's p50 / this backend's "
    "p50 within each invocation, median [min–max] over invocations (> 1: we are faster). "
    "text-head step: our decode steps with lm_head running (decode_step_text); a peer's "
    "every step computes all logits, so its decode step is the one to hold against it."
)


def has_peers(entries: dict[str, dict[str, Any]]) -> bool:
    return any(e.get("peer") for e in entries.values())


def _ms(s: dict[str, Any]) -> str:
    v = s.get("p50_median_ms", s.get("p50_ms"))
    if v is None:
        return "-"
    text = f"{v:.2f}" if v < 100 else f"{v:.0f}"
    sp = s.get("p50_spread_ms")
    if sp and len(s.get("p50_by_invocation_ms") or []) > 1 and sp[0] != sp[1]:
        fmt = "{:.2f}" if v < 100 else "{:.0f}"
        text += f" [{fmt.format(sp[0])}–{fmt.format(sp[1])}]"
    return text


def _vs(r: dict[str, Any] | None) -> str:
    if not r or r.get("value") is None:
        return "-"
    sp = r.get("spread")
    rng = f" [{sp[0]:.2f}–{sp[1]:.2f}]" if sp and sp[0] != sp[1] else ""
    return f"{r['value']:.2f}x{rng}"


def rows(entries: dict[str, dict[str, Any]]) -> list[list[str]]:
    """The table's rows, our backends first within each precision."""
    order = {p: i for i, p in enumerate(PRECISIONS)}
    names = sorted(
        entries,
        key=lambda n: (
            order.get(entries[n].get("precision") or "", len(order)),
            bool(entries[n].get("peer")),
        ),
    )
    out = []
    for name in names:
        e = entries[name]
        vs = e.get("speedup_vs_best_peer") or {}
        best = [(vs.get(s) or {}).get("peer") for s in ("prefill", "decode_step")]
        if e.get("peer"):
            best_cell = ""
        elif not vs:
            best_cell = "no peer at this precision"
        else:
            best_cell = " / ".join(b or "-" for b in best)
        out.append(
            [
                name,
                "peer" if e.get("peer") else "trace-rt",
                e.get("precision") or "-",
                str(e.get("prompt_positions") or "-"),
                _ms(e["stages"]["prefill"]),
                _ms(e["stages"]["decode_step"]),
                "" if e.get("peer") else _ms(e["stages"]["decode_step_text"]),
                "" if e.get("peer") else _vs(vs.get("prefill")),
                "" if e.get("peer") else _vs(vs.get("decode_step")),
                "" if e.get("peer") else _vs(vs.get("decode_step_text")),
                best_cell,
            ]
        )
    return out


def markdown(entries: dict[str, dict[str, Any]]) -> list[str]:
    if not has_peers(entries):
        return []
    lines = ["", "## Against the peers (same prompt positions, same decode steps)", "", ABOUT]
    lines += ["", "| " + " | ".join(COLUMNS) + " |", "|---|---|---|" + "---:|" * 7 + "---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows(entries)]
    return lines


def console(entries: dict[str, dict[str, Any]]) -> Table:
    table = Table(title="against the peers (p50 ms)", title_justify="left", header_style="bold")
    left = ("backend", "kind", COLUMNS[-1])
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in left else "right")
    for r in rows(entries):
        table.add_row(*r)
    return table
