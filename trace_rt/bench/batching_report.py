"""The ``engine`` section of the report: ``--concurrency`` and ``--queries-per-video``.

JSON (``report["engine"]``, absent when neither flag was given)::

    {"concurrency": {backend: {"levels": [{"concurrency", "batched": {...},
                                           "one_at_a_time": {...}, "tokens_match", ...}],
                               "batch1_step": {"engine_ms", "single_request_ms", "ratio", ...}}},
     "queries_per_video": {backend: {"queries", "independent", "cached_one_at_a_time",
                                     "batched", "second_query", "workload_s",
                                     "workload_speedup", "tokens_match"}},
     "skipped": {backend: why}, "load": {backend: LoadWindow.close()},
     "targets": [{"backend", "metric", "value", "target", "met"}]}

Each mode's figures are :func:`trace_rt.bench.batching.level_figures`; the measurements
are one round per level (not repeated per invocation), so no spread is reported for them.
"""

from __future__ import annotations

from typing import Any

from rich.table import Table

from trace_rt.bench import load as load_mod
from trace_rt.bench.render import _ms, _x

# (metric, op, bound): issue 10's targets, read from the section (see ``engine_targets``).
TARGETS = (
    ("batch1_step_ratio", "<=", 1.05),
    ("decode_tokens_per_s_8_vs_1", ">=", 4.0),
    ("requests_per_s_8_vs_one_at_a_time", ">=", 1.8),
    ("second_query_ttft_fraction", "<=", 0.10),
    ("second_query_end_to_end_fraction", "<=", 0.50),
    ("queries_workload_speedup", ">=", 2.5),
)


def _metrics(section: dict[str, Any], name: str) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    conc = section.get("concurrency", {}).get(name)
    if conc:
        out["batch1_step_ratio"] = conc.get("batch1_step", {}).get("ratio")
        eight = next((lv for lv in conc["levels"] if lv["concurrency"] == 8), None)
        if eight:
            out["decode_tokens_per_s_8_vs_1"] = eight["decode_tokens_per_s_vs_level_1"]
            out["requests_per_s_8_vs_one_at_a_time"] = eight["requests_per_s_vs_one_at_a_time"]
    q = section.get("queries_per_video", {}).get(name)
    if q:
        out["second_query_ttft_fraction"] = q["second_query"].get("ttft_fraction")
        out["second_query_end_to_end_fraction"] = q["second_query"].get("end_to_end_fraction")
        if len(q["queries"]) >= 4:
            out["queries_workload_speedup"] = q["workload_speedup"]["batched"]
    return out


def engine_targets(section: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target a backend's section measured: value, bound and whether it is met (one
    round, no spread: a verdict near the bound is within this machine's noise)."""
    names = list(
        dict.fromkeys([*section.get("concurrency", {}), *section.get("queries_per_video", {})])
    )
    rows = []
    for name in names:
        values = _metrics(section, name)
        for metric, op, bound in TARGETS:
            if metric not in values:
                continue
            v = values[metric]
            met = None if v is None else (v <= bound if op == "<=" else v >= bound)
            rows.append(
                {"backend": name, "metric": metric, "value": v, "target": f"{op} {bound}",
                 "met": met}
            )  # fmt: skip
    return rows


# ---- console ---------------------------------------------------------------------------------
CONC_COLUMNS = (
    "backend", "N", "mode", "req/s", "lat p50", "lat p90", "ttft p50", "decode tok/s", "step",
    "batch", "vs 1-at-a-time",
)  # fmt: skip


def concurrency_rows(section: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, conc in section.get("concurrency", {}).items():
        for lv in conc["levels"]:
            for mode in ("batched", "one_at_a_time"):
                f = lv[mode]
                vs = "-"
                if mode == "batched":
                    vs = (f"{_x(lv['requests_per_s_vs_one_at_a_time'])} req/s, "
                          f"{_x(lv['decode_tokens_per_s_vs_one_at_a_time'])} tok/s")  # fmt: skip
                rows.append(
                    [
                        name,
                        str(lv["concurrency"]),
                        mode.replace("_", " ")
                        + ("" if lv["tokens_match"] else " (tokens differ!)"),
                        f"{f['requests_per_s']:.3f}",
                        _ms(f["latency_p50_ms"]),
                        _ms(f["latency_p90_ms"]),
                        _ms(f["ttft_p50_ms"]),
                        "-"
                        if f["decode_tokens_per_s"] is None
                        else f"{f['decode_tokens_per_s']:.2f}",
                        _ms(f["step_p50_ms"]),
                        "-" if f["mean_batch"] is None else f"{f['mean_batch']:.2f}",
                        vs,
                    ]
                )
    return rows


QUERY_COLUMNS = ("backend", "mode", "ttft ms per query", "e2e ms per query", "total s", "speed-up")


def query_rows(section: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, q in section.get("queries_per_video", {}).items():
        for mode in ("independent", "cached_one_at_a_time", "batched"):
            speed = q["workload_speedup"].get(mode, 1.0 if mode == "independent" else None)
            rows.append(
                [
                    name,
                    mode.replace("_", " "),
                    ", ".join(_ms(r["ttft_ms"]) for r in q[mode]),
                    ", ".join(_ms(r["end_to_end_ms"]) for r in q[mode]),
                    f"{q['workload_s'][mode]:.2f}",
                    _x(speed),
                ]
            )
    return rows


def _table(title: str, columns: tuple[str, ...], rows: list[list[str]]) -> Table:
    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c, justify="left" if c in ("backend", "mode") else "right")
    for r in rows:
        t.add_row(*r)
    return t


def console_tables(section: dict[str, Any]) -> list[Table]:
    out = []
    if section.get("concurrency"):
        out.append(_table("in-process concurrency (ms)", CONC_COLUMNS, concurrency_rows(section)))
    if section.get("queries_per_video"):
        out.append(_table("queries per video", QUERY_COLUMNS, query_rows(section)))
    return out


def target_line(t: dict[str, Any]) -> str:
    v = "not measured" if t["value"] is None else f"{t['value']:.3f}"
    verdict = {True: "met", False: "MISSED", None: "-"}[t["met"]]
    return f"{t['backend']} {t['metric']}: {v} (target {t['target']}): {verdict}"


# ---- markdown --------------------------------------------------------------------------------
def _md_table(columns: tuple[str, ...], rows: list[list[str]]) -> list[str]:
    head = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    return head + ["| " + " | ".join(r) + " |" for r in rows]


def markdown(section: dict[str, Any]) -> list[str]:
    """The section's markdown lines (issue 10's figures)."""
    lines: list[str] = []
    if section.get("concurrency"):
        lines += [
            "",
            "## In-process concurrency (continuous batching)",
            "",
            "N copies of the request arrive at once. batched: one Engine over a backend with "
            "max_sequences = N (videos decoded and encoded in turn, then prefilled and decoded "
            "together). one at a time: an engine over max_sequences = 1, each request to its "
            "end before the next (the first N of one run of max(N) requests). lat: arrival to "
            "last token; decode tok/s: decode tokens of all requests / time spent decoding; "
            "step: p50 time between a sequence's tokens; batch: mean sequences per decode "
            "step. One round per level.",
            "",
            *_md_table(CONC_COLUMNS, concurrency_rows(section)),
            "",
        ]
        for name, conc in section["concurrency"].items():
            b = conc.get("batch1_step")
            if not b:
                continue
            lines.append(
                f"- `{name}` batch-1 step: engine {_ms(b['engine_ms'])} ms vs the "
                f"single-request path {_ms(b['single_request_ms'])} ms: {_x(b['ratio'])} "
                f"(medians of {b['pairs']} alternating pairs on one warmed backend; pair "
                f"ratios {b['pair_ratio_min']:.3f}-{b['pair_ratio_max']:.3f})"
            )
    if section.get("queries_per_video"):
        lines += [
            "",
            "## Queries per video",
            "",
            "N `mr` queries about the same video. independent: N `Pipeline.run` calls; cached "
            "one at a time: N `run_many` calls of one query sharing a VideoCache (the first "
            "encodes and saves the prompt prefix's K/V); batched: one `run_many` call with "
            "all N (max_sequences = N). ttft and e2e from each call's start; speed-up: the "
            "independent runs' total / the mode's.",
            "",
            *_md_table(QUERY_COLUMNS, query_rows(section)),
            "",
        ]
        for name, q in section["queries_per_video"].items():
            sq = q["second_query"]
            lines.append(
                f"- `{name}`: second query on the cached video: ttft "
                f"{_frac(sq.get('ttft_fraction'))}, end to end "
                f"{_frac(sq.get('end_to_end_fraction'))} of the first's; tokens "
                f"{'identical' if q['tokens_match'] else 'DIFFER'} across the three modes"
            )
    loads = section.get("load") or {}
    if loads:
        lines += [""]
        lines += [
            f"- machine while `{name}` was measured here: {load_mod.describe(w)}, "
            f"{w['wall_s']:.0f} s (started {w['started_utc']})"
            for name, w in loads.items()
        ]
    if section.get("targets"):
        lines += ["", "### Issue 10 targets (one round each, no spread)", ""]
        lines += [f"- {target_line(t)}" for t in section["targets"]]
    if section.get("skipped"):
        lines += ["", "Not measured for concurrency/queries:", ""]
        lines += [f"- `{k}`: {v}" for k, v in section["skipped"].items()]
    return lines


def _frac(v: float | None) -> str:
    return "-" if v is None else f"{v:.1%}"
