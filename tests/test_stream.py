"""Layer-streamed export (export/stream.py): the same graphs as the whole-model export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from trace_rt.config import TraceConfig
from trace_rt.errors import CheckpointError, InputError
from trace_rt.graphs import MANIFEST_FILE, sha256_file


@pytest.fixture(scope="module")
def small_pair(tmp_path_factory) -> tuple[Path, Path]:
    """A sharded `small` checkpoint (CLIP weights in clip_vision/), its whole-model export
    with int4/int8 MatMulNBits variants, and its streamed export with all three decoders."""
    from export.onnx_export import export_onnx
    from export.quantize import quantize_artifact
    from export.stream import export_streamed
    from training.make_checkpoint import make_checkpoint

    root = tmp_path_factory.mktemp("stream")
    ckpt = make_checkpoint(
        root / "ckpt",
        "small",
        seed=0,
        progress=False,
        max_shard_gb=0.05,
        separate_vision_tower=True,
    )
    assert (ckpt / "model.safetensors.index.json").is_file()  # sharded: the 7B's layout
    whole = export_onnx(ckpt, root / "whole", progress=False)
    for bits in (4, 8):
        quantize_artifact(whole, bits, forms=("nbits",))
    stream = export_streamed(
        ckpt, root / "stream", decoders=("fp32", "int4", "int8"), progress=False
    )
    return whole, stream


def _decoder_feeds(cfg: TraceConfig, past: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    b, t, kv, hd = 2, 4, cfg.num_key_value_heads, cfg.attn_head_dim
    feeds = {
        "inputs_embeds": rng.standard_normal((b, t, cfg.hidden_size)).astype(np.float32),
        # ragged rows: the second row's past is shorter than the bound past
        "position_ids": (np.array([[past], [max(past - 2, 0)]]) + np.arange(t)).astype(np.int64),
    }
    for i in range(cfg.num_hidden_layers):
        for n in (f"past_key.{i}", f"past_value.{i}"):
            feeds[n] = rng.standard_normal((past, b, kv, hd)).astype(np.float32)
    return feeds


def _run(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    assert [i.name for i in sess.get_inputs()] == list(feeds)
    return dict(zip(names, sess.run(None, feeds), strict=True))


def test_shell_graphs_equal_whole(small_pair):
    """Same files, and vision/projector graphs with the same outputs (their bytes differ:
    the tracer numbers values after all of the module's parameters, and the shell has no
    decoder layers)."""
    whole, stream = small_pair
    for f in ("embeddings.npy", "config.json", "tokenizer.model"):
        assert sha256_file(whole / f) == sha256_file(stream / f), f
    cfg = TraceConfig.from_dir(whole)
    rng = np.random.default_rng(2)
    v = cfg.vision
    pixels = rng.standard_normal((2, 3, v.image_size, v.image_size)).astype(np.float32)
    feats = _run_named(whole / "vision_encoder.onnx", {"pixel_values": pixels})["features"]
    assert np.array_equal(
        feats, _run_named(stream / "vision_encoder.onnx", {"pixel_values": pixels})["features"]
    )
    time_ids = rng.integers(0, cfg.time_vocab_size, (2, cfg.time_tokens_per_frame))
    feeds = {"features": feats, "time_ids": time_ids.astype(np.int64)}
    a = _run_named(whole / "projector.onnx", feeds)["video_embeds"]
    assert np.array_equal(a, _run_named(stream / "projector.onnx", feeds)["video_embeds"])


def _run_named(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, feeds), strict=True))


@pytest.mark.parametrize("file", ["decoder.onnx", "decoder.int4.onnx", "decoder.int8.onnx"])
@pytest.mark.parametrize("past", [0, 6])
def test_streamed_decoder_equals_whole(small_pair, file, past):
    whole, stream = small_pair
    cfg = TraceConfig.from_dir(whole)
    feeds = _decoder_feeds(cfg, past)
    a, b = _run(whole / file, feeds), _run(stream / file, feeds)
    assert list(a) == list(b)  # the spec's outputs, in order
    for name in a:
        scale = max(float(np.abs(a[name]).max()), 1e-6)
        assert float(np.abs(a[name] - b[name]).max()) / scale <= 1e-5, name
    # Quantised the same way: the same weights stored (MatMulNBits int4/int8, RTN).
    assert (stream / f"{file}.data").is_file()


def test_manifest_records_variants_and_figures(small_pair):
    whole, stream = small_pair
    m = json.loads((stream / MANIFEST_FILE).read_text())
    w = json.loads((whole / MANIFEST_FILE).read_text())
    assert m["graphs"]["decoder"]["inputs"] == w["graphs"]["decoder"]["inputs"]
    assert m["graphs"]["decoder"]["files"] == {
        "decoder.onnx": "graph",
        "decoder.onnx.data": "external_data",
    }
    for name in ("int4", "int8"):
        rec, ref = m["variants"]["decoder"][name], w["variants"]["decoder"][name]
        assert rec["source"]["sha256"] == m["files"]["decoder.onnx"]["sha256"]
        assert len(rec["weights"]["quantized"]) == len(ref["weights"]["quantized"])
        assert rec["block_size"] == ref["block_size"] and rec["bits"] == ref["bits"]
        for f, r in rec["files"].items():
            assert f not in m["files"]  # variant files are checked when picked
            assert r["sha256"] == sha256_file(stream / f)  # hashed while written
    fig = m["export"]["stream"]
    assert fig["peak_rss_mb"] > 0 and {s["step"] for s in fig["steps"]} >= {"layer 0", "head"}


def test_quantised_only_artifact(small_pair, tmp_path, monkeypatch, capsys):
    """Auto-streaming (memory short), no decoder.onnx, and clear errors asking for it."""
    from export import stream as stream_mod
    from export.cli import main
    from export.quantize import quantize_artifact
    from trace_rt.backends.onnxruntime_backend import OnnxRuntimeBackend

    whole, _ = small_pair
    ckpt = whole.parent / "ckpt"
    monkeypatch.setattr(stream_mod, "available_memory", lambda: 2**20)
    out = tmp_path / "q"
    assert main(["onnx", str(ckpt), str(out), "--decoders", "int4", "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert "exporting layer by layer" in said and "peak RSS" in said
    assert not (out / "decoder.onnx").exists()
    m = json.loads((out / MANIFEST_FILE).read_text())
    assert m["defaults"]["onnxruntime"]["decoder"] == "int4"
    assert m["graphs"]["decoder"]["files"] == {}
    backend = OnnxRuntimeBackend(out, video_graphs=False)  # the default: int4
    assert backend.decoder_variant == "int4"
    with pytest.raises(CheckpointError, match=r"no fp32 decoder\.onnx"):
        OnnxRuntimeBackend(out, decoder_variant="portable", video_graphs=False)
    with pytest.raises(InputError, match=r"no fp32 decoder\.onnx to quantise"):
        quantize_artifact(out, 8)


def test_refuses_when_disk_is_short(small_pair, tmp_path, monkeypatch):
    from export import stream as stream_mod

    whole, _ = small_pair
    usage = shutil.disk_usage(tmp_path)._replace(free=10 * 2**20)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage)
    with pytest.raises(InputError, match=r"needs about .* GiB and 0\.0 GiB is free"):
        stream_mod.export_streamed(whole.parent / "ckpt", tmp_path / "x", progress=False)
    assert not (tmp_path / "x" / MANIFEST_FILE).exists()
