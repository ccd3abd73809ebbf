"""``python -m trace_rt.bench --concurrency/--queries-per-video`` for in-process backends
(issue 10): one real run on ``tiny`` checked for the report's fields and their arithmetic,
not for timings; and the section's pieces by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trace_rt.bench import batching, batching_report, plugins
from trace_rt.bench.batching import level_figures, queries


@pytest.fixture(scope="module")
def tiny_artifact(tiny_ckpt, tmp_path_factory) -> Path:
    from export import export_onnx

    return export_onnx(tiny_ckpt, tmp_path_factory.mktemp("art") / "tiny", progress=False)


@pytest.fixture(scope="module")
def engine_doc(tiny_ckpt, tiny_artifact, tmp_path_factory) -> tuple[dict, str]:
    from trace_rt.bench.cli import main

    out = tmp_path_factory.mktemp("engine")
    argv = [
        *("--model", str(tiny_ckpt), "--artifacts", str(tiny_artifact)),
        *("--plugin", plugins.REFERENCE_SPEC, "--backends", "reference,onnxruntime"),
        *("--frames", "2", "--decode-steps", "3", "--warmup", "1", "--runs", "1"),
        *("--peak-gbps", "10", "--peak-tflops", "0.1"),
        *("--concurrency", "1,2,3", "--queries-per-video", "3"),
        *("--json", str(out / "e.json"), "--markdown", str(out / "e.md")),
    ]
    assert main(argv) == 0
    return json.loads((out / "e.json").read_text()), (out / "e.md").read_text()


def test_concurrency_levels_are_reported_and_consistent(engine_doc):
    doc, md = engine_doc
    section = doc["engine"]
    # The oracle owns one KV cache, no pool: said, not silently dropped.
    assert "max_sequences" in section["skipped"]["reference"]
    assert set(section["concurrency"]) == {"onnxruntime"}
    conc = section["concurrency"]["onnxruntime"]
    assert [lv["concurrency"] for lv in conc["levels"]] == [1, 2, 3]
    assert conc["one_at_a_time_requests"] == 3
    for lv in conc["levels"]:
        n = lv["concurrency"]
        assert lv["tokens_match"] is True  # batched, every request decodes its solo tokens
        for mode in ("batched", "one_at_a_time"):
            f = lv[mode]
            assert f["requests"] == n and len(f["latency_ms"]) == n
            assert f["decode_tokens"] == n * 3  # 3 decode steps each, EOS ignored
            assert f["requests_per_s"] == pytest.approx(n / f["wall_s"], rel=1e-2)
            assert 0 < f["ttft_p50_ms"] <= f["latency_p50_ms"] <= f["latency_p90_ms"]
            assert f["latency_p90_ms"] <= max(f["latency_ms"]) + 0.1
            assert f["decode_tokens_per_s"] == pytest.approx(
                f["decode_tokens"] / f["decode_s"], 1e-2
            )
            assert f["step_p50_ms"] > 0
        # All N arrive together and run the same number of steps: every step is full.
        assert lv["batched"]["mean_batch"] == n and lv["one_at_a_time"]["mean_batch"] == 1
        b, s = lv["batched"], lv["one_at_a_time"]
        assert lv["requests_per_s_vs_one_at_a_time"] == pytest.approx(
            b["requests_per_s"] / s["requests_per_s"], rel=1e-2
        )
        one = conc["levels"][0]["batched"]["decode_tokens_per_s"]
        assert lv["decode_tokens_per_s_vs_level_1"] == pytest.approx(
            b["decode_tokens_per_s"] / one, rel=1e-2
        )
    # One-at-a-time levels are prefixes of one run: level 1's request is level 3's first.
    levels = conc["levels"]
    assert levels[0]["one_at_a_time"]["latency_ms"] == levels[2]["one_at_a_time"]["latency_ms"][:1]
    b1 = conc["batch1_step"]  # alternating pairs on one backend, not the per-stage table
    assert b1["pairs"] == doc["config"]["runs"] and b1["engine_ms"] > 0
    # The steps are rounded to 1 us and the ratio to 1e-4; on tiny (sub-ms steps) that
    # alone moves the ratio by tenths of a percent: check the interval the rounding allows.
    e, s = b1["engine_ms"], b1["single_request_ms"]
    assert (e - 5e-4) / (s + 5e-4) - 1e-4 <= b1["ratio"] <= (e + 5e-4) / (s - 5e-4) + 1e-4
    assert b1["pair_ratio_min"] <= b1["pair_ratio_max"]
    assert "alternating pairs on one warmed backend" in md
    load = section["load"]["onnxruntime"]  # the machine while the section ran
    assert load["wall_s"] > 0 and 0.0 <= load["others_busy_fraction"] <= 1.0
    assert "machine while `onnxruntime` was measured here: load" in md
    assert section["targets"] == []  # the targets are stated for `small`, 16 frames, 64 steps
    assert "## In-process concurrency (continuous batching)" in md
    assert "| onnxruntime | 3 | batched |" in md and "batch-1 step" in md


def test_queries_per_video_reuse_the_cache(engine_doc):
    doc, md = engine_doc
    q = doc["engine"]["queries_per_video"]["onnxruntime"]
    assert len(q["queries"]) == len(set(q["queries"])) == 3
    assert q["tokens_match"] is True  # the cached and batched runs answer as the solo runs
    assert q["decode_tokens"] == 4
    for mode in ("independent", "cached_one_at_a_time", "batched"):
        assert len(q[mode]) == 3
        for r in q[mode]:
            assert 0 < r["ttft_ms"] <= r["end_to_end_ms"]
        assert q["workload_s"][mode] > 0
    cached = [r["cache"] for r in q["cached_one_at_a_time"]]
    assert cached == [{"video": False, "prefix": False}] + [{"video": True, "prefix": True}] * 2
    # One call: the video is encoded once; the first query saves the prefix, the rest load it.
    assert [r["cache"]["prefix"] for r in q["batched"]] == [False, True, True]
    first, second = q["cached_one_at_a_time"][:2]
    sq = q["second_query"]
    for key, frac in (("ttft_ms", "ttft_fraction"), ("end_to_end_ms", "end_to_end_fraction")):
        # The rows are rounded to 0.1 ms and the fraction to 1e-4: on tiny (a few ms) that
        # alone moves the ratio by percents, so the check is the interval the rounding allows.
        s, f = second[key], first[key]
        assert (s - 0.05) / (f + 0.05) - 1e-4 <= sq[frac] <= (s + 0.05) / (f - 0.05) + 1e-4
    ws, speed = q["workload_s"], q["workload_speedup"]
    for mode in ("cached_one_at_a_time", "batched"):
        # workload_s is rounded to the millisecond: on tiny (tens of ms) that alone moves
        # the ratio by a few percent.
        assert speed[mode] == pytest.approx(ws["independent"] / ws[mode], rel=5e-2)
    assert "## Queries per video" in md and "second query on the cached video" in md


def test_level_figures_by_hand():
    recs = [
        {"latency_s": 2.0, "ttft_s": 0.5, "decode_tokens": 4, "steps_ms": [10.0, 30.0]},
        {"latency_s": 4.0, "ttft_s": 1.0, "decode_tokens": 4, "steps_ms": [20.0]},
    ]
    f = level_figures(recs, decode_s=2.0)
    assert f["requests_per_s"] == 0.5  # 2 requests, the last done at 4 s
    assert (f["latency_p50_ms"], f["latency_p90_ms"]) == (3000.0, 3800.0)
    assert f["ttft_p50_ms"] == 750.0
    assert f["decode_tokens_per_s"] == 4.0  # 8 tokens in 2 s of decoding
    assert f["step_p50_ms"] == 20.0


def _section(ratio, tok8, req8, ttft, e2e, speed, n_queries=4) -> dict:
    level = {"concurrency": 8, "decode_tokens_per_s_vs_level_1": tok8,
             "requests_per_s_vs_one_at_a_time": req8}  # fmt: skip
    return {
        "concurrency": {"ort": {"levels": [level], "batch1_step": {"ratio": ratio}}},
        "queries_per_video": {
            "ort": {
                "queries": ["q"] * n_queries,
                "second_query": {"ttft_fraction": ttft, "end_to_end_fraction": e2e},
                "workload_speedup": {"batched": speed},
            }
        },
    }


def test_targets_read_the_section():
    rows = batching_report.engine_targets(_section(1.04, 4.5, 1.7, 0.05, 0.6, 3.0))
    met = {r["metric"]: r["met"] for r in rows}
    assert met == {
        "batch1_step_ratio": True,
        "decode_tokens_per_s_8_vs_1": True,
        "requests_per_s_8_vs_one_at_a_time": False,
        "second_query_ttft_fraction": True,
        "second_query_end_to_end_fraction": False,
        "queries_workload_speedup": True,
    }
    # The workload target is for 4 queries per video; an unmeasured value has no verdict.
    rows = batching_report.engine_targets(_section(None, 4.5, 1.9, 0.2, 0.4, 3.0, n_queries=2))
    met = {r["metric"]: r["met"] for r in rows}
    assert "queries_workload_speedup" not in met and met["batch1_step_ratio"] is None
    assert met["second_query_ttft_fraction"] is False
    lines = {r["metric"]: batching_report.target_line(r) for r in rows}
    assert lines["second_query_ttft_fraction"].endswith("(target <= 0.1): MISSED")
    assert lines["second_query_end_to_end_fraction"].endswith(": met")
    assert "not measured" in lines["batch1_step_ratio"]


def test_queries_are_distinct_and_start_with_the_given_one():
    qs = queries(11, "a dog barks")
    assert qs[0] == "a dog barks" and len(set(qs)) == 11
    assert queries(2) == list(batching.QUERIES[:2])


def test_bad_engine_arguments_fail_before_measuring(tiny_ckpt, capsys):
    from trace_rt.bench.cli import main

    base = ["--model", str(tiny_ckpt), "--backends", "torch"]
    assert main([*base, "--queries-per-video", "0"]) == 2
    assert "--queries-per-video must be at least 1" in capsys.readouterr().err
    assert main([*base, "--concurrency", "1,x"]) == 2
    assert "--concurrency must be positive integers" in capsys.readouterr().err
