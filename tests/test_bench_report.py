"""The bench's summary over invocations (spread, side-by-side ratios, verdicts, tails), its
load record, and its console table at 80 columns: on hand-made runs, numbers by hand."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from trace_rt.bench import load, render, report, summary
from trace_rt.bench.cli import build_parser
from trace_rt.bench.floor import Peaks
from trace_rt.bench.runner import BackendRun
from trace_rt.bench.stats import STAGES
from training.presets import load_preset


# ---- verdicts -------------------------------------------------------------------------------
def test_verdict_needs_a_margin_wider_than_the_spread():
    v = summary.verdict([1.45, 1.5, 1.55], ">=", 1.3)  # margin 0.2 > spread 0.1
    assert (v["value"], v["spread"], v["verdict"], v["met"]) == (1.5, [1.45, 1.55], "met", True)
    v = summary.verdict([1.4, 1.5, 1.6], ">=", 1.3)  # margin 0.2 = spread 0.2: not beyond
    assert v["verdict"] == "within noise" and v["met"] is True
    v = summary.verdict([1.0, 1.02, 1.01], "<=", 0.9)  # a ceiling, missed by 12% (1.01 / 0.9)
    assert v["verdict"] == "missed" and v["gap"] == "missed: 12% over the bound"
    v = summary.verdict([2.0, 2.5, 3.5], ">=", 3.0)  # one invocation met, median short
    assert v["verdict"] == "within noise" and v["met"] is False
    one = summary.verdict([1.5], ">=", 1.3)
    assert one["verdict"] == "met" and "spread not measured" in one["gap"]
    assert summary.verdict([None], ">=", 1.0)["verdict"] is None


def test_spread():
    s = summary.spread([10.0, None, 14.0, 11.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (11.0, 10.0, 14.0, 3)
    assert s["spread_pct"] == pytest.approx(36.4, abs=0.05)  # (14 - 10) / 11


# ---- ratios within an invocation ------------------------------------------------------------
def _run(name: str, e2e: list[float], step: list[float], weight_bytes: float | None = None):
    r = BackendRun(name, "/m", 1.0)
    for s in STAGES:
        r.samples[s] = [1.0]
    r.samples["end_to_end"] = e2e
    r.samples["decode_step"] = step
    r.steps_by_run = [step]
    r.token_ids, r.prompt_positions, r.frames, r.staged = [1, 2], 50, 4, True
    r.peak_rss_mb, r.weight_bytes = 100.0, weight_bytes
    return r


def _doc(invocations: dict[str, list[BackendRun]], peaks: Peaks | None = None) -> dict:
    cfg = load_preset("tiny")
    peaks = peaks or Peaks(1000.0, 1000.0, "given")
    entries, by_inv = {}, {}
    for name, runs in invocations.items():
        entries[name], by_inv[name] = report.repeated_entry(runs, cfg, peaks, 1)
    machine = {"cpu_model": "x", "libraries": {}, "gpu": []}
    return report.build_report(machine, {}, entries, {}, by_invocation=by_inv)


def test_speedups_are_ratios_within_each_invocation():
    # The reference was slow in invocation 2 (load) and so was the candidate: side by side,
    # the ratio is 2 both times, while pooled medians would mix the two invocations.
    doc = _doc(
        {
            "reference": [_run("reference", [100.0], [10.0]), _run("reference", [300.0], [30.0])],
            "fast": [_run("fast", [50.0], [5.0]), _run("fast", [150.0], [15.0])],
        }
    )
    fast = doc["backends"]["fast"]
    assert fast["speedup_by_invocation"]["end_to_end"] == [2.0, 2.0]
    assert fast["speedup_vs_reference"] == {"end_to_end": 2.0, "decode_step": 2.0}
    assert fast["speedup_spread"]["end_to_end"] == [2.0, 2.0]
    st = fast["stages"]["end_to_end"]
    assert st["p50_by_invocation_ms"] == [50.0, 150.0] and st["p50_median_ms"] == 100.0
    assert st["p50_spread_ms"] == [50.0, 150.0] and st["spread_pct"] == 100.0
    step = fast["stages"]["decode_step"]
    assert step["vs_floor"] == pytest.approx(10.0 / step["floor_ms"], rel=1e-3)
    # tok/s is the mean rate (2 steps in 20 ms); 1000/step the rate of the median step.
    assert fast["decode_tokens_per_s"] == 100.0
    assert fast["decode_tokens_per_s_from_median_step"] == 100.0


def test_tails_and_floor_check_are_computed():
    doc = _doc({"b": [_run("b", [100.0] * 8 + [300.0, 310.0], [10.0, 10.5])]})
    tail = doc["backends"]["b"]["stages"]["end_to_end"]["tail"]
    assert tail["long"] and tail["p99_over_p50"] == pytest.approx(309.1 / 100.0, rel=1e-3)
    assert {"backend": "b", "stage": "end_to_end"}.items() <= doc["long_tails"][0].items()
    assert not doc["backends"]["b"]["stages"]["decode_step"]["tail"]["long"]
    assert doc["floor_check"]["ok"]  # fast peaks: floors far below 1 ms
    slow = Peaks(1e-3, 1e-6, "given")
    doc = _doc({"b": [_run("b", [100.0], [10.0])]}, slow)
    assert not doc["floor_check"]["ok"]
    assert {b["stage"] for b in doc["floor_check"]["beaten"]} >= {"decode_step", "end_to_end"}


# ---- load -----------------------------------------------------------------------------------
def test_load_window_takes_this_process_out(monkeypatch):
    hz = 100
    jiffies = iter([(1000, 600, 0), (1400, 700, 20)])  # 400 jiffies: 300 busy, 100 idle
    own = iter([5.0, 6.0])  # this process: 1 s = 100 jiffies of the 300 busy
    monkeypatch.setattr(load, "_cpu_jiffies", lambda: next(jiffies))
    monkeypatch.setattr(load, "_own_cpu_s", lambda: next(own))
    monkeypatch.setattr(load.os, "sysconf", lambda name: hz)
    w = load.LoadWindow()
    rec = w.close()
    assert rec["own_cpu_s"] == 1.0
    assert rec["others_busy_fraction"] == 0.5  # (300 - 100) / 400
    assert rec["steal_fraction"] == 0.05  # 20 / 400
    assert len(rec["loadavg_before"]) == 3 and rec["wall_s"] >= 0
    assert "others busy 50% of the CPUs" in load.describe(rec)


# ---- console -------------------------------------------------------------------------------
def _five_backends() -> dict:
    names = ["reference", "torch", "onnxruntime", "onnxruntime-int8", "onnxruntime-int4"]
    return _doc(
        {
            n: [_run(n, [3928.0 - 400 * i], [39.0 - 5 * i]), _run(n, [4100.0], [40.5])]
            for i, n in enumerate(names)
        }
    )


def test_console_table_fits_80_columns():
    doc = _five_backends()
    console = Console(width=80, record=True, file=io.StringIO(), color_system=None)
    console.print(render.console_table(doc["backends"], "small: 16 frames", console.width))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "…" not in text  # nothing cut off
    for name, e in doc["backends"].items():
        assert name in text
        p50, spread = render._cell(e["stages"]["end_to_end"]).split("\n")  # "3,928", "(4%)"
        assert f"{p50} " in text and spread.removeprefix("[dim]")[:4] in text
        assert render._x(e["speedup_vs_reference"]["end_to_end"]) in text
    wide = Console(width=180, record=True, file=io.StringIO(), color_system=None)
    wide.print(render.console_table(doc["backends"], "small", wide.width))
    out = wide.export_text()
    assert "tok/s" in out and "1000" in out and "…" not in out
    assert len(out.splitlines()) < len(text.splitlines())  # one table, a row per backend


def test_legend_defines_tok_s_and_step_and_help_shows_defaults():
    assert "tok/s: decode steps / the time spent in them" in render.LEGEND
    assert "step: the median decode step" in render.LEGEND
    text = " ".join(build_parser().format_help().split())
    for flag, default in (("decode-steps", 64), ("warmup", 1), ("runs", 5), ("repeat", 1)):
        start = text.index(f"--{flag} {flag.upper().replace('-', '_')} ")  # not the usage
        assert f"(default: {default})" in text[start : start + 300], flag


def test_triton_levels_pool_over_invocations():
    from trace_rt.bench import triton

    def rec(e2e: float) -> dict:
        server = {"video": 1.0, "vision": 2.0, "prefill": 3.0, "decode": 8.0, "total": 15.0}
        return {
            "end_to_end_ms": e2e,
            "first_response_ms": 5.0,
            "streamed_events": True,
            "server_ms": server,
            "decode_per_token_ms": 2.0,
            "overhead_ms": e2e - 15.0,
            "tokens": 5,
            "frames": 4,
            "prompt_ids": 10,
            "token_ids": [1, 2, 3, 4, 5],
        }

    a = triton.summarize_level(1, [([rec(20.0)], 20.0), ([rec(22.0)], 22.0)])
    b = triton.summarize_level(1, [([rec(40.0)], 40.0), ([rec(44.0)], 44.0)])
    (pooled,) = triton.pool_levels([[a], [b]])
    assert pooled["requests"] == 4 and pooled["rounds"] == 4
    assert pooled["end_to_end"]["samples_ms"] == [20.0, 22.0, 40.0, 44.0]
    assert pooled["requests_per_s"] == pytest.approx(4 / 0.126, abs=1e-3)
    assert [x["end_to_end_p50_ms"] for x in pooled["by_invocation"]] == [21.0, 42.0]
    assert pooled["token_ids"] == [1, 2, 3, 4, 5]


def test_no_floor_verdict_against_a_beaten_floor_and_rerender(tmp_path):
    import json

    from trace_rt.bench import mdreport

    fine = _doc({"onnxruntime": [_run("onnxruntime", [100.0], [10.0])] * 2})
    (row,) = [t for t in report.check_targets(fine) if t["metric"] == "decode_step_vs_floor"]
    assert row["verdict"] == "missed"  # 10 ms against a ~0 ms floor: far over 1.2x
    slow = _doc({"onnxruntime": [_run("onnxruntime", [100.0], [10.0])] * 2}, Peaks(1e-3, 1, "x"))
    (row,) = [t for t in report.check_targets(slow) if t["metric"] == "decode_step_vs_floor"]
    assert row["verdict"] is None and row["gap"].startswith("no verdict")
    # A recorded JSON re-checked and rendered again by this code.
    slow["config"] = {"model_config": {}, "peaks": {"gbps": 1e-3, "tflops": 1, "source": "x"}}
    slow["machine"].update(date_utc="d", git={"commit": "c", "dirty": False}, cores=2)
    slow["machine"].update(threads=2, memory_gb=1, load_average_start=[1.0, 1.0, 1.0])
    slow["config"].update(model_name="m", frames=1, decode_steps=1, device="cpu", command="c")
    slow["config"].update(task="dvc", video="v", warmup=0, runs=1)
    slow["floor_check"] = {"ok": True, "beaten": []}  # as an older version wrote it
    path = tmp_path / "r.json"
    path.write_text(json.dumps(slow))
    assert mdreport.main([str(path), "--recheck"]) == 0
    again = json.loads(path.read_text())
    assert again["floor_check"]["ok"] is False and again["config"]["rechecked"]
    assert "**not a floor**: `onnxruntime` decode_step" in (tmp_path / "r.md").read_text()
