"""The bench's JSON document: a contract (rendering is in :mod:`trace_rt.bench.render`).

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

With ``--repeat N`` (N invocations; N = 1 is the old single run and gives the same core
figures), added keys, all compatible with the core shape:

- ``samples_ms`` and ``p50/p90/p99_ms`` pool every invocation's samples (re-derivable with
  numpy); per stage also ``p50_by_invocation_ms`` (one p50 per invocation), ``p50_median_ms``
  (their median: the figure the tables show), ``p50_spread_ms`` ([min, max] over
  invocations), ``spread_pct`` ((max - min) / median), ``min_ms`` (fastest sample),
  ``vs_floor`` (median over invocations of p50 / floor) with ``vs_floor_spread``,
  ``floor_beaten`` and ``tail`` (``p90_over_p50``, ``p99_over_p50``, ``long``);
- per backend: ``speedup_vs_reference`` is the median over invocations of the ratio
  computed within each invocation (``speedup_by_invocation``; ``speedup_spread`` [min, max]),
  ``decode_tokens_per_s_from_median_step`` (1000 / median step), ``load_by_invocation``
  (the machine's load while this backend ran, per invocation), ``load_s_by_invocation``;
- ``invocations``: [{"index", "started_utc", "load": {...}, "peaks": {"gbps", "tflops"},
  "backends": {NAME: load}}] (load as in :mod:`trace_rt.bench.load`); ``config.peaks`` are
  the best per kernel over invocations (``details``: every kernel's figure, which one set
  each peak, ``by_invocation``); ``floor_check``: {"ok", "beaten": [{"backend", "stage",
  "floor_ms", "fastest_ms", "ratio"}]}; ``long_tails``, ``long_tail_rule``;
- ``triton.levels[]`` pool the rounds of every invocation and add ``by_invocation``;
- each target: ``value`` (median), ``spread``, ``margin``, ``verdict`` (met / missed /
  within noise), ``by_invocation``; ``met`` is the median's side of the bound.

Peers (:mod:`trace_rt.bench.peer`, other engines running the LLM alone) are backends with
``"peer": true``; their stages other than ``prefill`` and ``decode_step`` have no samples
and a ``note``. Every backend has ``precision`` (fp32 / fp16 / bf16 / int8 / int4); every
non-peer backend has ``speedup_vs_best_peer``: null without a peer at its precision, else
per stage (``prefill``, ``decode_step``, ``decode_step_text``: the last held against the
peers' ``decode_step``, which computes every logit as a text-head step does) {"value"
(median over invocations of the fastest same-precision peer's p50 / this backend's p50,
within each invocation), "spread" [min, max], "by_invocation", "peer" (the fastest peer,
most often), "peers" (those compared)}. Our backends also have ``decode_steps_by_head``:
how many of the request's decode steps ran in each head.
"""

from __future__ import annotations

from typing import Any

from trace_rt.bench import summary
from trace_rt.bench.floor import Peaks, stage_floors
from trace_rt.bench.peer import LLM_ONLY_NOTE, PEER_STAGES, PEER_TEXT_NOTE
from trace_rt.bench.runner import BackendRun
from trace_rt.bench.stats import STAGES, per_position, summarize, tokens_per_s
from trace_rt.config import TraceConfig
from trace_rt.tokens import Head, heads_along

REFERENCE = "reference"
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
    """One backend's JSON object from one run (speed-ups are filled in by build_report)."""
    floors = stage_floors(
        cfg,
        peaks,
        frames=run.frames,
        prompt_positions=run.prompt_positions,
        decode_steps=decode_steps,
        itemsize=run.itemsize,
        weight_bytes=run.weight_bytes,
        int8=run.precision in ("int8", "int4"),
    )
    stages: dict[str, Any] = {}
    for stage in STAGES:
        s = summarize(run.samples.get(stage, []))
        floor = floors[stage]
        s["floor_ms"] = round(floor, 4) if floor is not None else None
        s["vs_floor"] = round(s["p50_ms"] / floor, 3) if floor and s["p50_ms"] else None
        if run.peer and stage == "decode_step_text":
            s["note"] = PEER_TEXT_NOTE
        elif run.peer and stage not in PEER_STAGES:
            s["note"] = LLM_ONLY_NOTE
        elif stage == "projector" and not run.staged:
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
        "precision": run.precision,
        "decoder_variant": run.decoder_variant,
        "peer": run.peer,
        "decode_steps_by_head": None if run.peer else steps_by_head(run.token_ids, cfg),
    }


def steps_by_head(token_ids: list[int], cfg: TraceConfig) -> dict[str, int]:
    """How many of a request's decode steps ran in each head: a fused decoder runs
    ``lm_head`` (32000 rows) only in text steps, so the step's cost depends on the mix;
    random weights often decode time digits only."""
    counts = {h.name.lower(): 0 for h in Head}
    for head in heads_along(cfg.ids, token_ids)[1:]:  # [0]: the prefill's
        counts[head.name.lower()] += 1
    return counts


def repeated_entry(
    runs: list[BackendRun | None], cfg: TraceConfig, peaks: Peaks, decode_steps: int
) -> tuple[dict[str, Any], list[dict[str, float | None]]]:
    """One backend over the invocations (None where it did not run): the pooled entry with
    the spread between invocations added, and each invocation's p50s (empty where it did
    not run), for the side-by-side ratios of :func:`build_report`."""
    ran = [r for r in runs if r is not None]
    entry = backend_entry(summary.merge_runs(ran), cfg, peaks, decode_steps)
    by_inv = [summary.p50s(r) if r is not None else {} for r in runs]
    summary.add_invocation_stats(entry, by_inv)
    entry["load_s_by_invocation"] = [r.load_s if r is not None else None for r in runs]
    step = entry["stages"]["decode_step"]["p50_median_ms"]
    entry["decode_tokens_per_s_from_median_step"] = round(1000.0 / step, 3) if step else None
    return entry, by_inv


def build_report(
    machine: dict[str, Any],
    config: dict[str, Any],
    entries: dict[str, dict[str, Any]],
    skipped: dict[str, str],
    triton: dict[str, Any] | None = None,
    *,
    by_invocation: dict[str, list[dict[str, float | None]]] | None = None,
    invocations: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The document; *by_invocation* maps backend -> each invocation's stage p50s (from
    :func:`repeated_entry`); without it each entry counts as one invocation."""
    if by_invocation is None:
        by_invocation = {}
        for name, e in entries.items():
            by_invocation[name] = [{s: v["p50_ms"] for s, v in e["stages"].items()}]
            summary.add_invocation_stats(e, by_invocation[name])
    summary.add_speedups(entries, by_invocation, REFERENCE)
    summary.add_peer_speedups(entries, by_invocation)
    report = {"machine": machine, "config": config, "backends": entries, "skipped": skipped}
    report["triton"] = triton
    report["invocations"] = invocations or []
    return derive_checks(report)


def derive_checks(report: dict[str, Any]) -> dict[str, Any]:
    """The floor check, long tails and targets, from the entries' samples and floors (so
    a recorded JSON can be re-checked by newer code: ``python -m trace_rt.bench.mdreport``)."""
    entries = report["backends"]
    report["floor_check"] = summary.floor_check(entries)
    report["long_tails"] = summary.long_tails(entries)
    report["long_tail_rule"] = f"p99 > {summary.LONG_TAIL} x p50 (pooled samples)"
    report["targets"] = check_targets(report) if targets_apply(report["config"]) else []
    return report


def targets_apply(config: dict[str, Any]) -> bool:
    """The CPU targets are stated for `small` (768 wide, 12 layers), 16 frames, 64 steps."""
    mc = config.get("model_config", {})
    return (
        config.get("device", "cpu") == "cpu"
        and (mc.get("hidden_size"), mc.get("num_hidden_layers")) == (768, 12)
        and (config.get("frames"), config.get("decode_steps")) == (16, 64)
    )


def _per_invocation(entry: dict[str, Any], metric: str) -> list[float | None]:
    if metric == "decode_step_vs_floor":
        st = entry["stages"]["decode_step"]
        floor = st["floor_ms"]
        return [v / floor if v and floor else None for v in st["p50_by_invocation_ms"]]
    return list(entry["speedup_by_invocation"][metric.removeprefix("speedup_")])


def check_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's CPU targets: median over invocations, spread, and a verdict that is
    ``within noise`` unless the margin to the bound exceeds the spread."""
    out = []
    for name, metric, op, bound in CPU_TARGETS:
        entry = report["backends"].get(name)
        row: dict[str, Any] = {"backend": name, "metric": metric, "target": f"{op} {bound}"}
        values = _per_invocation(entry, metric) if entry is not None else []
        row["by_invocation"] = [round(v, 4) if v is not None else None for v in values]
        row.update(summary.verdict(values, op, bound))
        if row["value"] is None:
            row["gap"] = "not measured" if entry is None else "no reference in this run"
        elif metric.endswith("_vs_floor") and entry["stages"]["decode_step"]["floor_beaten"]:
            # Measured against a floor that a measurement beat: the ratio means nothing.
            row["verdict"] = row["met"] = None
            row["gap"] = "no verdict: a measured step beat this floor (peaks measured too low)"
        out.append(row)
    return out
