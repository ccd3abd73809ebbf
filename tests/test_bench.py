"""``python -m trace_rt.bench``: percentile and floor arithmetic, backend resolution, and one
real run on ``tiny`` (torch, the reference oracle, onnxruntime) checked against the JSON
contract of issue 5."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from trace_rt.bench import floor, peaks, plugins, stats
from trace_rt.bench.stats import STAGES, percentile
from training.presets import load_preset

REF_PLUGIN = plugins.REFERENCE_SPEC


# ---- percentiles ---------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 3, 10, 101])
@pytest.mark.parametrize("q", [0, 1, 50, 90, 99, 100])
def test_percentile_matches_numpy_linear(n, q):
    xs = list(np.random.default_rng(n).exponential(10.0, n))
    assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)), rel=1e-12)


def test_percentile_by_hand():
    xs = [4.0, 1.0, 3.0, 2.0]  # unsorted on purpose
    assert percentile(xs, 50) == 2.5  # halfway between ranks 1 and 2 of 0..3
    assert percentile(xs, 90) == pytest.approx(3.7)  # rank 2.7
    assert percentile(xs, 100) == 4.0 and percentile(xs, 0) == 1.0
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summary_speedup_throughput():
    s = stats.summarize([1.0, 2.0, 3.0])
    assert (s["p50_ms"], s["mean_ms"], s["n"], s["samples_ms"]) == (2.0, 2.0, 3, [1.0, 2.0, 3.0])
    empty = stats.summarize([])
    assert empty["p50_ms"] is None and empty["samples_ms"] == []
    assert stats.speedup(100.0, 25.0) == 4.0
    assert stats.speedup(None, 25.0) is None
    assert stats.tokens_per_s([10.0, 30.0]) == 50.0  # 2 steps in 40 ms
    assert stats.per_position([[1.0, 5.0, 9.0], [3.0, 7.0]]) == [2.0, 6.0]


# ---- floor -----------------------------------------------------------------------------------
def test_roofline_takes_the_slower_of_compute_and_memory():
    peaks = floor.Peaks(gbps=10.0, tflops=1.0, source="given")
    assert floor.Cost(flops=2e9, bytes=1e6).floor_ms(peaks) == pytest.approx(2.0)  # compute
    assert floor.Cost(flops=1e6, bytes=5e8).floor_ms(peaks) == pytest.approx(50.0)  # memory


def test_floor_reproduces_the_design_doc_for_7b():
    # docs/trace-model.md, "Cost of one 128-frame request".
    cfg = load_preset("trace-7b")
    assert floor.kv_bytes_per_position(cfg, 2) == 128 * 1024  # 128 KiB/token in fp16
    weights = floor.decoder_params(cfg) * 2
    assert 14.0e9 < weights < 14.5e9  # "~14.5 GB of fp16 weights" (we skip the embeddings)
    h100 = floor.Peaks(gbps=3350.0, tflops=989.0, source="given")
    step = floor.decode_cost(cfg, past=0, itemsize=2, weight_bytes=None).floor_ms(h100)
    assert step == pytest.approx(4.3, abs=0.1)  # "a floor of ~4.3 ms per token"
    assert floor.vision_cost(cfg, 128, 2).flops / 1e12 == pytest.approx(45, rel=0.1)
    assert floor.prefill_cost(cfg, 1900, 2).flops / 1e12 == pytest.approx(27, rel=0.1)


def test_decode_floor_counts_weights_and_kv_by_hand():
    cfg = load_preset("tiny")  # 64 wide, 2 layers, 4 heads / 2 KV of 16, MLP 128
    layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64
    heads = 64 * (32000 + 1 + 13 + 13)
    assert floor.decoder_params(cfg) == 2 * layer + 64 + heads
    kv = 2 * 2 * 2 * 16 * 4  # K+V, layers, kv heads, head dim, fp32
    assert floor.kv_bytes_per_position(cfg, 4) == kv
    peaks = floor.Peaks(gbps=1.0, tflops=1e6, source="given")  # memory-bound on purpose
    f = floor.stage_floors(cfg, peaks, frames=8, prompt_positions=100, decode_steps=3)
    w = floor.decoder_params(cfg) * 4
    expected = [(w + (100 + i + 1) * kv) / 1e9 * 1e3 for i in range(3)]
    assert f["decode_step"] == pytest.approx(sum(expected) / 3)
    assert f["end_to_end"] == pytest.approx(f["ttft"] + sum(expected))
    assert f["ttft"] == pytest.approx(f["vision"] + f["projector"] + f["prefill"])
    assert f["video"] is None
    # A quantised decoder's file size replaces params x itemsize.
    q = floor.stage_floors(
        cfg, peaks, frames=8, prompt_positions=100, decode_steps=1, weight_bytes=1000.0
    )
    assert q["decode_step"] == pytest.approx((1000.0 + 101 * kv) / 1e9 * 1e3)


def test_peaks_are_the_fastest_of_every_kernel_measured():
    p = peaks.resolve_peaks(None, None, "cpu", quick=True)
    d = p.details
    bw, fl = d["bandwidth_kernels_gbps"], d["compute_kernels_tflops"]
    # Several kernels each, onnxruntime's own among them (it is installed with the bench).
    assert {"read", "copy", "add", "onnxruntime_gemv"} <= bw.keys()
    assert {"numpy_matmul_512", "onnxruntime_matmul_512"} <= fl.keys()
    assert all(v > 0 for v in [*bw.values(), *fl.values()])
    # The peak is the best of them (a floor must not be beaten by anything measured) ...
    assert p.source == "measured"
    assert (p.gbps, d["bandwidth"]) == (max(bw.values()), max(bw, key=bw.get))
    assert (p.tflops, d["compute"]) == (max(fl.values()), max(fl, key=fl.get))
    # ... also over invocations: each kernel's best, then the best kernel.
    # The int8 peak: onnxruntime's MatMulInteger, the best size.
    i8 = d["int8_kernels_tops"]
    assert {"onnxruntime_matmulinteger_512"} <= i8.keys() and all(v > 0 for v in i8.values())
    assert (p.int8_tops, d["int8"]) == (max(i8.values()), max(i8, key=i8.get))
    a = peaks.peaks_from_kernels({"read": 10.0, "copy": 30.0}, {"mm": 0.1, "ort": 0.3}, {"i": 0.5})
    b = peaks.peaks_from_kernels({"read": 40.0, "copy": 20.0}, {"mm": 0.2, "ort": 0.1}, {"i": 0.9})
    best = peaks.best_of([a, b])
    assert (best.gbps, best.tflops, best.int8_tops) == (40.0, 0.3, 0.9)
    assert best.details["bandwidth_kernels_gbps"] == {"read": 40.0, "copy": 30.0}
    assert best.details["by_invocation"] == [
        {"gbps": 30.0, "tflops": 0.3, "int8_tops": 0.5},
        {"gbps": 40.0, "tflops": 0.2, "int8_tops": 0.9},
    ]
    given = peaks.resolve_peaks(13.0, 0.2)
    assert (given.gbps, given.tflops, given.source) == (13.0, 0.2, "given")


def test_floors_on_tiny_follow_the_peaks_by_hand():
    """Vision, prefill and decode floors of `tiny` from FLOPs and bytes counted here by
    hand, against measured peaks: the floor is what the peaks and the config say."""
    cfg = load_preset("tiny")  # CLIP 32 wide, MLP 64, 14 px patches, 56 px: 16 patches, 2 layers
    p = peaks.resolve_peaks(None, None, "cpu", quick=True)
    frames, positions = 4, 70
    t = 17  # 16 patches + CLS
    layer = 2 * t * (4 * 32 * 32 + 2 * 32 * 64) + 2 * 2 * t * t * 32
    vision_flops = frames * (2 * layer + 2 * 16 * 3 * 14 * 14 * 32)
    f = floor.stage_floors(cfg, p, frames=frames, prompt_positions=positions, decode_steps=2)
    vision_bytes = 4 * (floor.vision_params(cfg) + frames * (3 * 56 * 56 + 16 * 32))
    assert f["vision"] == pytest.approx(
        1e3 * max(vision_flops / (p.tflops * 1e12), vision_bytes / (p.gbps * 1e9))
    )
    lin = 2 * positions * 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64)
    attn = 2 * 2 * 2 * 64 * positions * (positions + 1) / 2
    heads = 2 * 64 * (32000 + 1 + 13 + 13)
    pre_flops = lin + attn + heads
    pre_bytes = 4 * floor.decoder_params(cfg) + positions * 512
    assert f["prefill"] == pytest.approx(
        1e3 * max(pre_flops / (p.tflops * 1e12), pre_bytes / (p.gbps * 1e9))
    )
    step0 = (4 * floor.decoder_params(cfg) + (positions + 1) * 512) / (p.gbps * 1e9) * 1e3
    assert f["inputs"]["decode_step_min_ms"] == pytest.approx(step0)
    # A quantised decoder: the layers' linear work at the int8 peak, the rest as before.
    q = floor.stage_floors(
        cfg, p, frames=frames, prompt_positions=positions, decode_steps=2, int8=True
    )
    compute = (attn + heads) / (p.tflops * 1e12) + lin / (p.int8_tops * 1e12)
    assert q["prefill"] == pytest.approx(1e3 * max(compute, pre_bytes / (p.gbps * 1e9)))
    assert q["inputs"]["prefill_int8"] and q["inputs"]["prefill_gflop"] == pytest.approx(
        pre_flops / 1e9
    )


# ---- backend resolution -------------------------------------------------------------------
def test_plugins_and_model_dirs(tmp_path, monkeypatch):
    monkeypatch.delenv(plugins.ENV_VAR, raising=False)
    specs, skipped = plugins.resolve(["torch", "reference", "triton"], [])
    assert [s.name for s in specs] == ["torch"]  # triton: a server, measured by the CLI
    assert REF_PLUGIN in skipped["reference"] and "triton" not in skipped
    monkeypatch.setenv(plugins.ENV_VAR, REF_PLUGIN)
    specs, skipped = plugins.resolve(["reference", "onnxruntime-int4"], [])
    assert specs[0].plugin and specs[0].target.endswith(":ReferenceBackend")
    assert specs[1].options == {"decoder_variant": "int4"}
    assert not skipped
    # NAME@VARIANT: that decoder variant by its own name (export optimize --tag's forms).
    [spec], _ = plugins.resolve(["onnxruntime-int4@fused-int4-b128"], [])
    assert spec.options == {"decoder_variant": "fused-int4-b128", "exact_variant": True}
    assert spec.model_format() == "artifact"
    with pytest.raises(ValueError, match="name a decoder variant"):
        plugins.resolve(["onnxruntime@"], [])
    with pytest.raises(ValueError, match="unknown backend"):
        plugins.resolve(["torch@int4"], [])
    with pytest.raises(ValueError, match="unknown backend"):
        plugins.resolve(["nope"], [])
    with pytest.raises(ValueError, match="NAME=module:Class"):
        plugins.parse_plugins(["reference"])

    ckpt, art = tmp_path / "ckpt", tmp_path / "art"
    ckpt.mkdir(), art.mkdir()
    (ckpt / "config.json").write_text("{}")
    (art / "manifest.json").write_text("{}")
    assert plugins.model_dir_for("checkpoint", ckpt, art) == (ckpt, None)
    assert plugins.model_dir_for("artifact", ckpt, art) == (art, None)
    assert plugins.model_dir_for("artifact", ckpt, None)[1].startswith("needs an artifact")
    assert "needs a checkpoint" in plugins.model_dir_for("checkpoint", art, None)[1]


def test_bench_imports_no_torch():
    code = (
        "import sys, trace_rt.bench.cli, trace_rt.bench.runner; "
        "print(','.join(m for m in ('torch', 'transformers', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


# ---- a real run ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_artifact(tiny_ckpt, tmp_path_factory) -> Path:
    from export import export_onnx

    return export_onnx(tiny_ckpt, tmp_path_factory.mktemp("art") / "tiny", progress=False)


def _fastest_below_floor(doc: dict) -> set[tuple[str, str]]:
    """(backend, stage) whose fastest sample is under its floor, recomputed from the JSON's
    samples (a decode step against the first, cheapest step's floor)."""
    out = set()
    for name, b in doc["backends"].items():
        for stage, s in b["stages"].items():
            floor_ms = s["floor_ms"]
            if stage == "decode_step":
                floor_ms = b["floor_inputs"]["decode_step_min_ms"]
            if floor_ms and s["samples_ms"] and min(s["samples_ms"]) < floor_ms:
                out.add((name, stage))
    return out


def test_bench_on_tiny_writes_json_markdown_png(tiny_ckpt, tiny_artifact, tmp_path):
    from trace_rt.bench.cli import main

    out = tmp_path / "out"
    argv = [
        *("--model", str(tiny_ckpt), "--artifacts", str(tiny_artifact)),
        *("--plugin", REF_PLUGIN, "--backends", "reference,torch,onnxruntime"),
        *("--frames", "4", "--decode-steps", "6", "--warmup", "1", "--runs", "3"),
        *("--repeat", "2", "--quick-peaks"),  # peaks measured: the floor check is real
        *("--json", str(out / "b.json"), "--markdown", str(out / "b.md")),
        *("--plot", str(out / "b.png")),
    ]
    t = time.perf_counter()
    assert main(argv) == 0
    assert time.perf_counter() - t < 120  # issue 5: the bench on tiny in under a minute, x2

    doc = json.loads((out / "b.json").read_text())
    assert {"machine", "config", "backends"} <= doc.keys()
    m = doc["machine"]
    assert m["cpu_model"] and m["threads"] >= 1 and "numpy" in m["libraries"]
    assert "commit" in m["git"]
    assert doc["config"]["decode_steps"] == 6 and doc["config"]["frames"] == 4
    assert doc["config"]["repeat"] == 2 and len(doc["invocations"]) == 2
    for inv in doc["invocations"]:
        load = inv["load"]
        assert len(load["loadavg_before"]) == 3 and len(load["loadavg_after"]) == 3
        assert 0.0 <= load["others_busy_fraction"] <= 1.0 and load["wall_s"] > 0
        assert set(inv["backends"]) == {"reference", "torch", "onnxruntime"}
        assert inv["peaks"]["gbps"] <= doc["config"]["peaks"]["gbps"]  # the best is kept
    assert set(doc["backends"]) == {"reference", "torch", "onnxruntime"}
    for name, b in doc["backends"].items():
        assert set(b["stages"]) == set(STAGES), name
        for stage, s in b["stages"].items():
            assert {"p50_ms", "p90_ms", "p99_ms", "samples_ms"} <= s.keys()
            # invocations x runs (x steps); decode_step_text: as many steps, in the text head
            want = 2 * 3 * (6 if stage.startswith("decode_step") else 1)
            assert len(s["samples_ms"]) == want, (name, stage)
            assert s["p50_ms"] == pytest.approx(np.percentile(s["samples_ms"], 50), abs=1e-3)
            assert s["p50_ms"] <= s["p90_ms"] <= s["p99_ms"]
            # One p50 per invocation, from that invocation's own samples.
            per = 3 * (6 if stage.startswith("decode_step") else 1)
            halves = [s["samples_ms"][:per], s["samples_ms"][per:]]
            want_p50s = [np.percentile(h, 50) for h in halves] if halves[0] else [None] * 2
            assert s["p50_by_invocation_ms"] == pytest.approx(want_p50s, abs=1e-3)
            if halves[0]:
                assert s["p50_median_ms"] == pytest.approx(np.mean(want_p50s), abs=1e-3)
                assert s["p50_spread_ms"] == pytest.approx(sorted(want_p50s), abs=1e-3)
        st = b["stages"]
        assert st["ttft"]["p50_ms"] < st["end_to_end"]["p50_ms"]
        assert b["decode_tokens_per_s"] > 0 and b["peak_rss_mb"] > 0
        assert set(b["speedup_vs_reference"]) == {"end_to_end", "decode_step"}
        assert b["speedup_vs_reference"]["end_to_end"] > 0
        # Speed-ups are ratios within each invocation, then their median.
        ref = doc["backends"]["reference"]["stages"]["end_to_end"]["p50_by_invocation_ms"]
        mine = st["end_to_end"]["p50_by_invocation_ms"]
        ratios = [r / x for r, x in zip(ref, mine, strict=True)]
        assert b["speedup_by_invocation"]["end_to_end"] == pytest.approx(ratios, rel=1e-3)
        assert b["speedup_vs_reference"]["end_to_end"] == pytest.approx(np.mean(ratios), 1e-3)
        assert len(b["token_ids"]) == 7  # the prefill's token + 6 decode steps, EOS ignored
        assert len(b["decode_step_by_position_ms"]) == 6
        assert st["decode_step"]["floor_ms"] > 0 and st["video"]["floor_ms"] is None
    assert doc["backends"]["reference"]["speedup_vs_reference"]["decode_step"] == 1.0

    # The floor invariant: no measured stage is below its floor unless the report says so.
    below = _fastest_below_floor(doc)
    flagged = {(b["backend"], b["stage"]) for b in doc["floor_check"]["beaten"]}
    assert flagged == below and doc["floor_check"]["ok"] == (not below)
    md = (out / "b.md").read_text()
    for name, stage in below:
        assert f"**not a floor**: `{name}` {stage}" in md
    assert "| reference |" in md and "| onnxruntime |" in md
    assert "## Machine load per invocation" in md and "## Tails" in md
    ff = doc["video_ffmpeg"]  # the video stage against the ffmpeg CLI, or why not
    if shutil.which("ffmpeg"):
        assert ff["frames"] == 4 and ff["ms"] > 0 and set(ff["ratios"]) == set(doc["backends"])
        assert "## Video stage vs the ffmpeg CLI" in md
        assert " onnxruntime " in md.split("## Video stage vs the ffmpeg CLI")[1]
    else:
        assert "no ffmpeg" in ff["skipped"] and "skipped (no ffmpeg" in md
    assert (out / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_floor_that_is_beaten_is_reported(tiny_ckpt, tmp_path, capsys):
    """Peaks far below the machine's make every floor too high: each stage beaten must be
    named in the JSON, the console and the markdown, not printed as < 1.0x silently."""
    from trace_rt.bench.cli import main

    out = tmp_path / "f"
    argv = ["--model", str(tiny_ckpt), "--backends", "torch", "--frames", "2"]
    argv += ["--decode-steps", "3", "--warmup", "0", "--runs", "2"]
    argv += ["--peak-gbps", "0.001", "--peak-tflops", "1e-7"]
    argv += ["--json", str(out / "f.json"), "--markdown", str(out / "f.md")]
    assert main(argv) == 0
    doc = json.loads((out / "f.json").read_text())
    below = _fastest_below_floor(doc)
    assert {("torch", s) for s in ("vision", "prefill", "decode_step", "end_to_end")} <= below
    assert {(b["backend"], b["stage"]) for b in doc["floor_check"]["beaten"]} == below
    assert doc["floor_check"]["ok"] is False
    assert doc["backends"]["torch"]["stages"]["decode_step"]["floor_beaten"] is True
    err = capsys.readouterr().err
    assert "NOT A FLOOR: torch decode_step" in " ".join(err.split())
    assert "**not a floor**: `torch` decode_step" in (out / "f.md").read_text()


def test_cli_reports_unavailable_backends_and_bad_args(tiny_ckpt, tmp_path, monkeypatch):
    from trace_rt.bench.cli import main

    monkeypatch.delenv(plugins.ENV_VAR, raising=False)
    out = tmp_path / "s.json"
    argv = ["--model", str(tiny_ckpt), "--backends", "torch,onnxruntime,reference"]
    argv += ["--frames", "2", "--decode-steps", "2", "--warmup", "0", "--runs", "1"]
    argv += ["--peak-gbps", "10", "--peak-tflops", "0.1", "--json", str(out)]
    assert main(argv) == 0
    doc = json.loads(out.read_text())
    assert list(doc["backends"]) == ["torch"]
    assert "--artifacts" in doc["skipped"]["onnxruntime"]  # checkpoint only: no artifact
    assert "--plugin" in doc["skipped"]["reference"]
    assert main(["--model", str(tiny_ckpt), "--runs", "0"]) == 2


# ---- peers ---------------------------------------------------------------------------------
PEER_PRECISION = {
    "ort-genai": "fp32",
    "ort-genai-int4": "int4",
    "llama.cpp": "fp32",
    "llama.cpp-q8_0": "int8",
    "llama.cpp-q4_0": "int4",
}
PEER_ENGINES = {  # each peer's engine module (the peers extra)
    "ort-genai": "onnxruntime_genai",
    "ort-genai-int4": "onnxruntime_genai",
    "llama.cpp": "llama_cpp",
    "llama.cpp-q8_0": "llama_cpp",
    "llama.cpp-q4_0": "llama_cpp",
}


def test_bench_runs_the_peers_on_tiny(tiny_ckpt, tiny_artifact, tmp_path, monkeypatch):
    """The peers (benchmarks/peers/) beside onnxruntime fp32/int4 on the same request's
    prompt length and decode steps: only prefill and decode_step, the other stages marked,
    speed-ups against the best peer of each precision. Runs the peers that are installed
    (CI installs the peers extra); the others must be skipped with how to install them."""
    import importlib.util

    from benchmarks.peers import PLUGINS
    from benchmarks.peers.files import CACHE_ENV
    from export.quantize import quantize_artifact
    from trace_rt.bench.cli import main
    from trace_rt.bench.peer import LLM_ONLY_NOTE, PEER_STAGES, PEER_TEXT_NOTE

    assert set(PEER_ENGINES) == set(PLUGINS)
    have = {n for n, m in PEER_ENGINES.items() if importlib.util.find_spec(m) is not None}
    if not have:
        pytest.skip("the peers extra is not installed (pip install -e '.[peers]'): no peer to run")
    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    quantize_artifact(art, 4)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "peers-cache"))
    out = tmp_path / "p"
    names = ["onnxruntime", "onnxruntime-int4", "onnxruntime@int4", *PLUGINS]
    argv = ["--model", str(tiny_ckpt), "--artifacts", str(art), "--plugin", "benchmarks.peers"]
    argv += ["--backends", ",".join(names), "--frames", "4", "--decode-steps", "5"]
    argv += ["--warmup", "1", "--runs", "2", "--repeat", "2", "--quick-peaks"]
    argv += ["--json", str(out / "p.json"), "--markdown", str(out / "p.md")]
    assert main(argv) == 0
    doc = json.loads((out / "p.json").read_text())
    ran = {n for n, b in doc["backends"].items() if b["peer"]}
    assert ran <= have
    for name in set(PLUGINS) - ran:  # skipped, saying how to get it
        why = doc["skipped"][name]
        # Installed but llama.cpp's converter not unpacked, or not installed at all.
        assert ("benchmarks.peers converter" if name in have else "pip install") in why, why
    ours = doc["backends"]["onnxruntime"]
    assert ours["precision"] == "fp32" and not ours["peer"]
    assert doc["backends"]["onnxruntime-int4"]["precision"] == "int4"
    # Which decoder ran is recorded (pooled over invocations) and named in the markdown.
    assert (ours["decoder_variant"], doc["backends"]["onnxruntime-int4"]["decoder_variant"]) == (
        None,
        "int4",
    )
    assert "decoder variants run: onnxruntime-int4 `int4`" in (out / "p.md").read_text()
    named = doc["backends"]["onnxruntime@int4"]  # a variant asked for by name
    assert (named["decoder_variant"], named["precision"]) == ("int4", "int4")
    # The head each of our decode steps ran in (lm_head runs in text steps only), replayed
    # from the tokens: 5 steps; peers compute every logit, so they have no such split.
    # Our text-head steps are held against the peers' decode steps (every logit each step).
    vs_text = ours["speedup_vs_best_peer"]
    if vs_text is not None:
        assert vs_text["decode_step_text"]["value"] > 0
    assert "text-head step vs best peer" in (out / "p.md").read_text()
    mix = ours["decode_steps_by_head"]
    assert set(mix) == {"text", "time", "score"} and sum(mix.values()) == 5
    assert "decode steps by head" in (out / "p.md").read_text()
    precision = {n: doc["backends"][n]["precision"] for n in ran}
    for name in ran:
        b = doc["backends"][name]
        assert precision[name] == PEER_PRECISION[name], name
        # Like for like: our prompt's positions (text + video block), our decode steps.
        assert b["prompt_positions"] == ours["prompt_positions"] and b["frames"] == 4
        assert len(b["token_ids"]) == 6 and all(0 <= t < 32000 for t in b["token_ids"])
        assert b["decode_steps_by_head"] is None
        for stage, s in b["stages"].items():
            if stage in PEER_STAGES:
                assert len(s["samples_ms"]) == 2 * 2 * (5 if stage == "decode_step" else 1)
                assert s["p50_median_ms"] > 0
            else:
                note = PEER_TEXT_NOTE if stage == "decode_step_text" else LLM_ONLY_NOTE
                assert s["samples_ms"] == [] and s["note"] == note, (name, stage)
        # The floor counts the engine's own weights (a quantised file's real size).
        weights = b["floor_inputs"]["decoder_weight_bytes"]
        assert weights < ours["floor_inputs"]["decoder_weight_bytes"] * 1.1
        if precision[name] != "fp32":
            assert weights < 0.5 * ours["floor_inputs"]["decoder_weight_bytes"]
    for mine in ("onnxruntime", "onnxruntime-int4"):
        vs = doc["backends"][mine]["speedup_vs_best_peer"]
        same = {n for n in ran if precision[n] == doc["backends"][mine]["precision"]}
        if not same:
            assert vs is None
            continue
        for stage in PEER_STAGES:
            v = vs[stage]
            assert set(v["peers"]) == same and v["peer"] in same
            # Recomputed from the JSON: the fastest same-precision peer per invocation.
            mine_p50 = doc["backends"][mine]["stages"][stage]["p50_by_invocation_ms"]
            best = [
                min(doc["backends"][p]["stages"][stage]["p50_by_invocation_ms"][i] for p in same)
                for i in range(2)
            ]
            want = [b / m for b, m in zip(best, mine_p50, strict=True)]
            assert v["by_invocation"] == pytest.approx(want, rel=1e-3)
    md = (out / "p.md").read_text()
    assert "## Against the peers (same prompt positions, same decode steps)" in md
    assert "n/a (LLM only)" in md
    for name in ran:
        assert f"| {name} | peer |" in md
