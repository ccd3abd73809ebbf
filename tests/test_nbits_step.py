"""benchmarks/nbits_step.py: a step's MatMulNBits alone, built from the preset's shapes."""

from __future__ import annotations

import json

import pytest

from benchmarks import nbits_step
from trace_rt.presets import load_preset


def test_nbits_step_on_tiny(tmp_path, capsys):
    out = tmp_path / "nbits.json"
    argv = ["--preset", "tiny", "--runs", "2", "--lm-head", "none,int8,fp32", "--json", str(out)]
    assert nbits_step.main(argv) == 0
    doc = json.loads(out.read_text())
    rows = {r["lm_head"]: r for r in doc["rows"]}
    assert set(rows) == {"none", "int8", "fp32"} and doc["bits"] == 4
    cfg = load_preset("tiny")
    # The layers' bytes as the export stores int4: half a byte + an fp32 scale per 32.
    h, hd = cfg.hidden_size, cfg.attn_head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    linear = cfg.num_hidden_layers * (h * q + 2 * h * kv + q * h + 3 * h * cfg.intermediate_size)
    assert rows["none"]["weight_bytes"] == linear * (0.5 + 4 / 32)
    lm = h * cfg.vocab_size
    assert rows["int8"]["weight_bytes"] - rows["none"]["weight_bytes"] == lm * (1 + 4 / 32)
    assert rows["fp32"]["weight_bytes"] - rows["none"]["weight_bytes"] == lm * 4
    assert all(r["p50_ms"] > 0 and r["min_ms"] <= r["p50_ms"] for r in rows.values())
    assert "lm_head int8" in capsys.readouterr().out


def test_unknown_head_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        nbits_step.main(["--preset", "tiny", "--lm-head", "bf16"])
    assert e.value.code == 2
    assert "unknown ['bf16']" in capsys.readouterr().err


def test_layer_error_grows_with_the_block(tmp_path):
    # small's gate (768 x 2048), Gaussian weights at 4 bits: about 8.6% relative RMS error
    # at blocks of 32 (a 4-bit grid spread over each block's largest weight), more as blocks
    # grow (tiny's hidden size, 64, would make blocks of 128 the same as 64).
    errors = [nbits_step.layer_error("small", 4, b)["rel_rms_error"] for b in (32, 64, 128)]
    assert 0.05 < errors[0] < errors[1] < errors[2] < 0.15, errors
    assert nbits_step.layer_error("small", 8, 32)["rel_rms_error"] < errors[0] / 10
    out = tmp_path / "e.json"
    argv = ["--preset", "small", "--error", "--block", "64", "--json", str(out)]
    assert nbits_step.main(argv) == 0
    assert json.loads(out.read_text())["rel_rms_error"] == errors[1]
