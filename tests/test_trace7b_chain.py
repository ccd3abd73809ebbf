"""benchmarks/trace7b.py: the whole chain on `tiny`, and its preflight refusals."""

from __future__ import annotations

import json
import shutil

import pytest

from benchmarks import trace7b


def test_refuses_when_disk_is_short(tmp_path, monkeypatch, capsys):
    usage = shutil.disk_usage(tmp_path)._replace(free=2**20)
    monkeypatch.setattr(trace7b.shutil, "disk_usage", lambda p: usage)
    work = tmp_path / "w"
    assert trace7b.main(["--preset", "trace-7b", "--work", str(work)]) == 2
    err = capsys.readouterr().err
    # 7.5B parameters in bf16: ~15 GB for the checkpoint stage, nothing written
    assert "stage checkpoint: needs 1" in err and "GiB of disk" in err and "0.0 GiB free" in err
    assert not (work / "ckpt").exists()


def test_refuses_when_memory_is_short(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(trace7b, "available_memory", lambda: 2**30)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")  # the checkpoint stage has nothing to write
    argv = ["--preset", "trace-7b", "--work", str(tmp_path), "--stages", "checkpoint,export"]
    assert trace7b.main(argv) == 2
    err = capsys.readouterr().err
    assert "stage checkpoint: needs about 4.5 GiB of memory, 1.0 GiB available" in err


def test_chain_end_to_end_on_tiny(tmp_path):
    """Every stage on `tiny` (peers only where llama-cpp-python and its converter are
    installed): figures saved per stage, intermediates removed, the dated report written."""
    stages = ["checkpoint", "export", "load", "run", "reference", "plan", "report"]
    try:
        from benchmarks.peers.llamacpp import _llama_cpp, converter

        converter(_llama_cpp().__version__)
        stages.insert(6, "peers")
    except ImportError:
        pass
    work, results = tmp_path / "w", tmp_path / "results"
    argv = ["--preset", "tiny", "--work", str(work), "--frames", "2", "--decode-steps", "3"]
    argv += ["--lm-head", "int8"]  # llama.cpp's peers quantise theirs too
    argv += ["--block-size", "64"]  # the plan must be told: its bytes are checked below
    assert trace7b.main([*argv, "--stages", ",".join(stages), "--results", str(results)]) == 0
    fig = json.loads((work / "figures.json").read_text())
    assert fig["export"]["stream"]["decoders"] == ["int4", "int8"]
    assert fig["lm_head"] == "int8" and fig["export"]["files"]["int4"] > 0
    assert fig["block_size"] == 64
    assert fig["export"]["peak_rss_mb"] > 0 and fig["checkpoint"]["bytes"] > 0
    assert {"int4/default", "int4/no-prepack", "int8/default"} <= set(fig["load"])
    assert fig["load"]["int4/default"]["peak_rss_load_mb"] > 0
    assert not (work / "art").exists()  # removed once the run stage was done
    assert str(work / "art") in fig["removed"]
    [js] = results.glob("trace7b-tiny-cpu-*-lm-head-int8-b64.json")  # not the default run's name
    doc = json.loads(js.read_text())
    rows = doc["runs"]["2"]["backends"]
    assert {"onnxruntime-int4", "onnxruntime-int8"} <= set(rows)
    step = rows["onnxruntime-int4"]["stages"]["decode_step"]
    assert step["p50_ms"] > 0 and step["floor_ms"] > 0
    plan = {r["quantity"]: r for r in doc["plan_vs_measured"] if r["backend"].endswith("int4")}
    assert plan["peak_rss_bytes"]["measured"] > 0 and plan["peak_rss_bytes"]["plan"] > 0
    # The plan was told the head's width. The streamed files hold the planned bytes plus
    # external-data alignment (~1.4 MB of padding over tiny's ~40 tensors, nothing at 7B);
    # with an fp32 head (8.2 MB at tiny) the plan would exceed the files.
    weights = plan["decoder_weight_bytes"]
    assert 0.5 * weights["measured"] < weights["plan"] <= weights["measured"], weights
    assert rows["onnxruntime-int4"]["stages"]["decode_step_text"]["p50_ms"] is None  # not timed
    assert rows["torch"]["label"] == "torch bf16" and rows["torch"]["token_ids"]
    pairs = {(a["ours"], a["reference"]) for a in doc["token_agreement"]["2"]}
    assert pairs == {
        ("onnxruntime-int4", "torch bf16"),
        ("onnxruntime-int8", "torch bf16"),
        ("onnxruntime-int4", "onnxruntime-int8"),
    }
    for a in doc["token_agreement"]["2"]:
        assert 0 <= a["common_prefix"] <= a["tokens"] and 0 <= a["equal_fraction"] <= 1
    fig_after = json.loads((work / "figures.json").read_text())
    md = js.with_suffix(".md").read_text()
    assert "The int4/int8 decoders hold lm_head in int8, blocks of 64 weights." in md
    assert "## One dvc request, 2 frames" in md and "## Targets" in md
    assert "## Token agreement" in md
    if "peers" in stages:
        assert {"q4", "q8"} <= set(rows)
        assert rows["q4"]["prompt_positions"] == rows["onnxruntime-int4"]["prompt_positions"]
        assert not list(work.rglob("*.gguf")) and not (work / "hf-llm").exists()
        assert str(work / "peer-ref" / "model-Q4_0.gguf") in fig_after["removed"]
        met = [t["met"] for t in doc["targets"]]
        assert len(met) == 4 and all(m is not None for m in met)


@pytest.mark.parametrize("stage", ["bogus"])
def test_unknown_stage_is_refused(tmp_path, stage):
    with pytest.raises(SystemExit):
        trace7b.main(["--work", str(tmp_path), "--stages", stage])
