"""Several invocations of the bench into one honest summary.

On a shared machine one invocation can move by more than the margins the targets are
judged on, so ``--repeat N`` runs the whole bench (every backend, warmup + runs) N times,
spread over time. This module turns them into:

- per stage: each invocation's p50, their median and the spread between invocations
  (min-max, and ``spread_pct`` = (max - min) / median);
- ratios (speed-ups over ``reference``, measured / floor) computed *within* an invocation,
  where the backends ran side by side under the same load, then summarised the same way;
- a verdict per target: ``met`` / ``missed`` only when the margin to the bound exceeds
  the spread of the ratio between invocations, else ``within noise``;
- the floor check: a floor is a lower bound only if no measured sample beats it;
- tails: p90/p50 and p99/p50 of every stage, and which stages have long ones.

Pure Python over the JSON-able dicts and :class:`~trace_rt.bench.runner.BackendRun`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from trace_rt.bench.peer import PEER_COMPARED
from trace_rt.bench.runner import BackendRun
from trace_rt.bench.stats import STAGES, percentile

# A stage's tail is "long" when p99 > LONG_TAIL x p50 (pooled samples of all invocations).
LONG_TAIL = 1.5
SPREAD_NOTE = "spread = min-max over invocations"


def spread(values: Sequence[float | None]) -> dict[str, Any]:
    """Median, min, max and (max - min) / median of the non-None *values*."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return {"median": None, "min": None, "max": None, "spread_pct": None, "n": 0}
    med = percentile(xs, 50)
    pct = (max(xs) - min(xs)) / med * 100 if med else None
    return {
        "median": round(med, 4),
        "min": round(min(xs), 4),
        "max": round(max(xs), 4),
        "spread_pct": round(pct, 1) if pct is not None else None,
        "n": len(xs),
    }


def merge_runs(runs: Sequence[BackendRun]) -> BackendRun:
    """One backend's runs of every invocation pooled (samples in invocation order)."""
    last = runs[-1]
    out = BackendRun(last.name, last.model_dir, last.load_s, options=last.options)
    for r in runs:
        for stage, xs in r.samples.items():
            out.samples.setdefault(stage, []).extend(xs)
        out.steps_by_run.extend(r.steps_by_run)
    out.token_ids, out.prompt_positions, out.frames = (
        last.token_ids,
        last.prompt_positions,
        last.frames,
    )
    out.staged, out.weight_bytes, out.itemsize = last.staged, last.weight_bytes, last.itemsize
    out.precision, out.peer, out.decoder_variant = last.precision, last.peer, last.decoder_variant
    rss = [r.peak_rss_mb for r in runs if r.peak_rss_mb is not None]
    out.peak_rss_mb = max(rss) if rss else None
    out.peak_rss_method = last.peak_rss_method
    gpu = [r.peak_gpu_mb for r in runs if r.peak_gpu_mb is not None]
    out.peak_gpu_mb = max(gpu) if gpu else None
    return out


def p50s(run: BackendRun) -> dict[str, float | None]:
    """One invocation's p50 of every stage."""
    return {
        s: (round(percentile(run.samples[s], 50), 4) if run.samples.get(s) else None)
        for s in STAGES
    }


def add_invocation_stats(entry: dict[str, Any], by_inv: list[dict[str, float | None]]) -> None:
    """Per stage: p50 of each invocation, their median and spread, vs_floor summarised the
    same way (floors are fixed, so ratio of each invocation's p50), and the tail."""
    for stage, s in entry["stages"].items():
        values = [inv.get(stage) for inv in by_inv]
        s["p50_by_invocation_ms"] = values
        sp = spread(values)
        s["p50_median_ms"] = sp["median"]
        s["p50_spread_ms"] = [sp["min"], sp["max"]] if sp["n"] else None
        s["spread_pct"] = sp["spread_pct"]
        floor = s.get("floor_ms")
        if floor and sp["n"]:
            ratios = spread([v / floor for v in values if v is not None])
            s["vs_floor"] = round(ratios["median"], 3)
            s["vs_floor_spread"] = [round(ratios["min"], 3), round(ratios["max"], 3)]
        s["min_ms"] = round(min(s["samples_ms"]), 4) if s["samples_ms"] else None
        s["tail"] = tail(s)


def tail(s: dict[str, Any]) -> dict[str, Any] | None:
    """p90/p50 and p99/p50 of pooled samples; ``long`` when p99 > LONG_TAIL x p50."""
    if not s.get("p50_ms"):
        return None
    r90, r99 = s["p90_ms"] / s["p50_ms"], s["p99_ms"] / s["p50_ms"]
    return {"p90_over_p50": round(r90, 3), "p99_over_p50": round(r99, 3), "long": r99 > LONG_TAIL}


def add_speedups(
    entries: dict[str, dict[str, Any]], by_inv: dict[str, list[dict[str, float | None]]], ref: str
) -> None:
    """Speed-up over *ref* per invocation (same invocation: side by side, same load), then
    the median (``speedup_vs_reference``) and min-max (``speedup_spread``)."""
    for name, entry in entries.items():
        per: dict[str, list[float | None]] = {"end_to_end": [], "decode_step": []}
        for i, inv in enumerate(by_inv.get(name, [])):
            ref_inv = by_inv[ref][i] if ref in by_inv and i < len(by_inv[ref]) else None
            for stage in per:
                a = ref_inv.get(stage) if ref_inv else None
                b = inv.get(stage)
                per[stage].append(round(a / b, 4) if a and b else None)
        entry["speedup_by_invocation"] = per
        entry["speedup_spread"] = {}
        for stage, values in per.items():
            sp = spread(values)
            entry["speedup_vs_reference"][stage] = (
                round(sp["median"], 3) if sp["median"] is not None else None
            )
            entry["speedup_spread"][stage] = (
                [round(sp["min"], 3), round(sp["max"], 3)] if sp["n"] else None
            )


def add_peer_speedups(
    entries: dict[str, dict[str, Any]], by_inv: dict[str, list[dict[str, float | None]]]
) -> None:
    """``speedup_vs_best_peer`` of every non-peer backend: per stage and invocation, the
    fastest peer of the same precision in that invocation, its p50 / this backend's p50;
    then the median and min-max over invocations (see :mod:`trace_rt.bench.report`)."""
    peers = {n: e.get("precision") for n, e in entries.items() if e.get("peer")}
    for name, entry in entries.items():
        if entry.get("peer"):
            continue
        same = [p for p, prec in peers.items() if prec == entry.get("precision")]
        if not same:
            entry["speedup_vs_best_peer"] = None
            continue
        out: dict[str, Any] = {}
        for stage, theirs in PEER_COMPARED.items():
            per: list[float | None] = []
            fastest: list[str] = []
            for i, inv in enumerate(by_inv.get(name, [])):
                mine = inv.get(stage)
                times = [
                    (t, p)
                    for p in same
                    if i < len(by_inv.get(p, [])) and (t := by_inv[p][i].get(theirs))
                ]
                if not mine or not times:
                    per.append(None)
                    continue
                best, who = min(times)
                per.append(round(best / mine, 4))
                fastest.append(who)
            sp = spread(per)
            out[stage] = {
                "value": round(sp["median"], 3) if sp["median"] is not None else None,
                "spread": [round(sp["min"], 3), round(sp["max"], 3)] if sp["n"] else None,
                "by_invocation": per,
                "peer": Counter(fastest).most_common(1)[0][0] if fastest else None,
                "peers": same,
            }
        entry["speedup_vs_best_peer"] = out


def verdict(values: Sequence[float | None], op: str, bound: float) -> dict[str, Any]:
    """A target judged on its per-invocation values: ``met``/``missed`` when the margin
    between the median and the bound exceeds the spread (max - min) between invocations,
    else ``within noise``. One invocation has no measured spread: the verdict says so."""
    sp = spread(values)
    if sp["median"] is None:
        return {"value": None, "spread": None, "met": None, "verdict": None}
    med = sp["median"]
    met = med <= bound if op == "<=" else med >= bound
    width = sp["max"] - sp["min"]
    margin = abs(med - bound)
    word = "met" if met else "missed"
    if sp["n"] < 2:
        text = f"{word} (one invocation: spread not measured)"
    elif margin > width:
        text = word
    else:
        word = text = "within noise"
    if word == "missed":
        short = (med / bound - 1) if op == "<=" else (1 - med / bound)
        how = "over" if op == "<=" else "short of"
        text = text.replace("missed", f"missed: {short * 100:.0f}% {how} the bound", 1)
    return {
        "value": round(med, 3),
        "spread": [round(sp["min"], 3), round(sp["max"], 3)],
        "margin": round(margin, 3),
        "met": met,
        "verdict": word,
        "gap": text,
    }


def floor_check(entries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every stage's fastest sample against its floor (a decode step against the floor of
    the first, cheapest step). A floor that a measurement beats is not a floor: listed."""
    beaten = []
    for name, entry in entries.items():
        for stage, s in entry["stages"].items():
            floor = s.get("floor_ms")
            if stage == "decode_step":
                floor = entry["floor_inputs"].get("decode_step_min_ms", floor)
            fastest = s.get("min_ms")
            s["floor_beaten"] = bool(floor and fastest is not None and fastest < floor)
            if s["floor_beaten"]:
                beaten.append(
                    {
                        "backend": name,
                        "stage": stage,
                        "floor_ms": round(floor, 4),
                        "fastest_ms": fastest,
                        "ratio": round(fastest / floor, 3),
                    }
                )
    return {"ok": not beaten, "beaten": beaten}


def long_tails(entries: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """(backend, stage, p90/p50, p99/p50) of every stage whose tail is long."""
    out = []
    for name, entry in entries.items():
        for stage, s in entry["stages"].items():
            t = s.get("tail")
            if t and t["long"]:
                out.append({"backend": name, "stage": stage, **t})
    return out
