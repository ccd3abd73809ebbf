"""Percentiles and per-stage summaries of timing samples (pure Python: unit-testable)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

# Stages of one request, in order; the JSON contract names exactly these.
STAGES = (
    "video",
    "vision",
    "projector",
    "prefill",
    "ttft",
    "decode_step",
    "decode_step_text",
    "end_to_end",
)
QUANTILES = (50, 90, 99)


def percentile(samples: Sequence[float], q: float) -> float:
    """The *q*-th percentile with linear interpolation between closest ranks.

    The same definition as ``numpy.percentile``'s default (``method="linear"``), so numbers
    can be re-derived from the JSON's samples with numpy. With few samples p99 is close
    to the maximum, which is the honest reading of a short run.

    Raises:
        ValueError: no samples, or *q* outside [0, 100].
    """
    if not samples:
        raise ValueError("percentile of no samples")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    xs = sorted(float(x) for x in samples)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(samples_ms: Sequence[float]) -> dict[str, Any]:
    """``{"p50_ms", "p90_ms", "p99_ms", "mean_ms", "n", "samples_ms"}`` (None when empty)."""
    xs = [float(x) for x in samples_ms]
    out: dict[str, Any] = {
        f"p{q}_ms": (round(percentile(xs, q), 4) if xs else None) for q in QUANTILES
    }
    out["mean_ms"] = round(sum(xs) / len(xs), 4) if xs else None
    out["n"] = len(xs)
    out["samples_ms"] = [round(x, 4) for x in xs]
    return out


def speedup(reference_ms: float | None, candidate_ms: float | None) -> float | None:
    """How many times faster *candidate* is than *reference* (ratio of medians)."""
    if not reference_ms or not candidate_ms:
        return None
    return round(reference_ms / candidate_ms, 3)


def tokens_per_s(step_samples_ms: Sequence[float]) -> float | None:
    """Decode throughput: steps taken / time spent in them (not 1000 / median)."""
    total = sum(step_samples_ms)
    return round(1000.0 * len(step_samples_ms) / total, 3) if total > 0 else None


def per_position(runs: Sequence[Sequence[float]]) -> list[float]:
    """Median over runs of the i-th decode step's latency, for each step i."""
    if not runs:
        return []
    n = min(len(r) for r in runs)
    return [round(percentile([r[i] for r in runs], 50), 4) for i in range(n)]
