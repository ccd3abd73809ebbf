"""The fixed-shape decode step for quantised (QDQ) builds, made apart from the build.

``python -m export step`` (torch) writes the step and quantises it like each QDQ decoder
variant; ``python -m export trt --int4`` (no torch: a Jetson) builds it beside the int4
decoder, or with ``--fixed-past`` as the decoder itself; the TensorRT backend then serves
every decode step with one CUDA graph. Through the CPU stand-ins (tests/fake_tensorrt.py);
the ``gpu`` test builds them with TensorRT (written, not yet run: no GPU here).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import onnx
import pytest

from export.trt import TensorRTBuildError
from trace_rt.backends import tensorrt_manifest as tm
from trace_rt.errors import CheckpointError
from trace_rt.graphs import DECODER

QUERY = "a red circle moves left"
MAX_SEQ = 384


@pytest.fixture(scope="module")
def int4_art(tiny_ckpt, tmp_path_factory) -> Path:
    """tiny's artifact with its int4 QDQ decoder and the step (made after the quantise)."""
    from export import export_onnx
    from export.cli import main
    from export.quantize import quantize_artifact

    art = export_onnx(tiny_ckpt, tmp_path_factory.mktemp("step4") / "art", progress=False)
    quantize_artifact(art, 4, forms=["qdq"])
    assert main(["step", str(art), "--checkpoint", str(tiny_ckpt), "--max-seq", str(MAX_SEQ)]) == 0
    return art


@pytest.fixture
def fake_trt(monkeypatch):
    from tests.fake_tensorrt import install, uninstall

    yield install(monkeypatch)
    uninstall()


def _manifest(art: Path) -> dict:
    return json.loads((art / "manifest.json").read_text())


def _int4_weights(path: Path) -> list[str]:
    """sha256 of every INT4 initializer of a graph (names differ between the graphs)."""
    g = onnx.load(str(path)).graph
    raw = [t.raw_data for t in g.initializer if t.data_type == onnx.TensorProto.INT4]
    return sorted(hashlib.sha256(r).hexdigest() for r in raw)


def test_step_record_and_same_quantised_weights(int4_art):
    m = _manifest(int4_art)
    step = m["decode_step"]
    assert (step["file"], step["max_seq"], step["fixed"]) == (
        "decoder_step.onnx",
        MAX_SEQ,
        {"seq": 1, "past": MAX_SEQ - 1},
    )
    q = step["variants"]["int4-qdq"]
    dec = m["variants"][DECODER]["int4-qdq"]
    assert q["file"] == "decoder_step.int4.qdq.onnx"
    assert q["quantized"] == len(dec["weights"]["quantized"]) > 0
    # The same weights, rounded the same way: the step and the decoder agree bit for bit.
    got = _int4_weights(int4_art / q["file"])
    assert got and got == _int4_weights(int4_art / dec["file"])


def test_int4_build_one_graph_equals_onnxruntime(fake_trt, int4_art, clip_video, tmp_path, capsys):
    """`export trt --int4` without a checkpoint builds the recorded int4 step; the backend
    replays one graph for every decode step and gives onnxruntime's int4-qdq tokens."""
    from export.cli import main
    from trace_rt.generate import GenerationConfig
    from trace_rt.pipeline import Pipeline

    art = tmp_path / "art"
    shutil.copytree(int4_art, art)
    # No --max-seq: the recorded step's context is the build's.
    assert main(["trt", str(art), "--int4", "--max-batch", "1", "--no-progress"]) == 0
    assert "decode step engine holds its own copy" in capsys.readouterr().out
    section = _manifest(art)["tensorrt"]
    assert section["limits"]["max_seq"] == MAX_SEQ
    rec, dec = section["engines"][tm.STEP], section["engines"][DECODER]
    assert (rec["onnx"], rec["variant"]) == ("decoder_step.int4.qdq.onnx", "int4-qdq")
    assert rec["file"].endswith("decoder_step.int4-qdq.engine") and rec["fixed"]["past"] == 383
    assert dec["variant"] == "int4-qdq"

    pipe = Pipeline.from_dir(art, "tensorrt", device="cuda")
    ref = Pipeline.from_dir(art, "onnxruntime", cache_dir=False, decoder_variant="int4-qdq")
    assert pipe.backend.step is not None
    steps = 0
    decode = pipe.backend.decode

    def counted(*a):
        nonlocal steps
        steps += 1
        return decode(*a)

    pipe.backend.decode = counted
    for task, gen in [
        ("dvc", GenerationConfig(max_new_tokens=20)),
        ("mr", GenerationConfig(max_new_tokens=20, temperature=1.0, seed=2)),
    ]:
        query = QUERY if task == "mr" else None
        got = pipe.run(clip_video, task, query=query, gen=gen)["token_ids"]
        assert got == ref.run(clip_video, task, query=query, gen=gen)["token_ids"], task
    assert steps > 10
    assert len(fake_trt.live_graphs) == 1 and fake_trt.launches == steps - 1
    assert pipe.backend.past_graphs.graphs == {}
    _check_step_logits(art)

    # --no-step: the decoder alone, decode steps back on graphs per past length.
    main(["trt", str(art), "--int4", "--max-batch", "1", "--no-step", "--no-progress"])
    assert tm.STEP not in _manifest(art)["tensorrt"]["engines"]
    assert Pipeline.from_dir(art, "tensorrt", device="cuda").backend.step is None


def _check_step_logits(art: Path) -> None:
    """The int4 step's logits are onnxruntime's int4-qdq decoder's, not the fp32 one's
    (tiny's tokens alone do not tell the two apart)."""
    import numpy as np

    from trace_rt.backends import load_backend
    from trace_rt.tokens import Head

    trt_b = load_backend("tensorrt", art, device="cuda")
    int4 = load_backend("onnxruntime", art, cache_dir=False, decoder_variant="int4-qdq")
    fp32 = load_backend("onnxruntime", art, cache_dir=False, decoder_variant="portable")
    c = int4.config
    video = np.random.default_rng(0).standard_normal((9, c.hidden_size)).astype(int4.dtype)
    prompt = [1, 733, -201, 28705, 13, 5, 6]
    for b in (trt_b, int4, fp32):
        b.prefill(prompt, video, Head.TEXT)
    far = 0.0
    for token, head in [(32005, Head.TIME), (1234, Head.SCORE), (32016, Head.TEXT)] * 2:
        got, want = trt_b.decode_step(token, head), int4.decode_step(token, head)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        far = max(far, float(np.abs(got - fp32.decode_step(token, head)).max()))
    assert trt_b.step.graph is not None and far > 1e-3  # int4 error, well above the bound
    trt_b.close()


def test_quantize_after_step_quantises_the_step(tiny_ckpt, tmp_path):
    from export import export_onnx
    from export.quantize import quantize_artifact
    from export.trt_step import make_step

    art = export_onnx(tiny_ckpt, tmp_path / "art", progress=False)
    assert make_step(tiny_ckpt, art, 256)["variants"] == {}
    quantize_artifact(art, 8, forms=["qdq"])
    q = _manifest(art)["decode_step"]["variants"]["int8-qdq"]
    assert q["file"] == "decoder_step.int8.qdq.onnx" and (art / q["file"]).is_file()


def test_step_errors(fake_trt, int4_art, tmp_path):
    """Each mismatch between the recorded step and the build is refused by name."""
    from export.quantize import quantize_artifact
    from export.trt import build_engines

    art = tmp_path / "art"
    shutil.copytree(int4_art, art)
    with pytest.raises(TensorRTBuildError, match=r"made for --max-seq 384.*--max-seq 384"):
        build_engines(art, precision="int4", max_seq=512, max_batch=1, progress=False)
    # A variant re-quantised differently: the step is re-quantised with it, so it matches.
    quantize_artifact(art, 4, forms=["qdq"], block_size=16)
    step = _manifest(art)["decode_step"]["variants"]["int4-qdq"]
    assert _int4_weights(art / step["file"]) == _int4_weights(art / "decoder.int4.qdq.onnx")
    build_engines(art, precision="int4", max_batch=1, progress=False)
    # A variant the step lacks (the record edited as if the step predated it).
    m = _manifest(art)
    del m["decode_step"]["variants"]["int4-qdq"]
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(TensorRTBuildError, match=r"has no 'int4-qdq' form"):
        build_engines(art, precision="int4", max_batch=1, progress=False)
    # A decoder that changed since the step was made.
    m["decode_step"]["source"] = {"decoder.onnx": "0" * 64}
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(TensorRTBuildError, match="decoder changed since the decode step"):
        build_engines(art, max_batch=1, progress=False)


def test_backend_refuses_step_of_another_variant(fake_trt, int4_art, tmp_path):
    from export.trt import build_engines
    from trace_rt.backends.tensorrt_backend import TensorRTBackend

    art = tmp_path / "art"
    shutil.copytree(int4_art, art)
    build_engines(art, precision="int4", max_batch=1, progress=False)
    m = _manifest(art)
    m["tensorrt"]["engines"][tm.STEP]["variant"] = None  # an unquantised step's record
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match=r"decode step built from decoder variant None"):
        TensorRTBackend(art, device="cuda", verify="size")


def test_fixed_past_decoder_one_engine(fake_trt, int4_art, clip_video, tmp_path):
    """`export trt --fixed-past`: the step graph is the decoder (prefill and decode over the
    fixed past), no second engine; tokens and logits are onnxruntime's int4-qdq decoder's,
    prefixes (the video cache) included, with one CUDA graph for every decode step."""
    import numpy as np

    from export.cli import main
    from export.trt import build_engines
    from trace_rt.backends import load_backend
    from trace_rt.generate import GenerationConfig
    from trace_rt.pipeline import Pipeline
    from trace_rt.tokens import Head

    art = tmp_path / "art"
    shutil.copytree(int4_art, art)
    with pytest.raises(TensorRTBuildError, match="--max-batch 1"):
        build_engines(art, precision="int4", fixed_past=True, progress=False)
    with pytest.raises(TensorRTBuildError, match="--fixed-past builds the decoder from"):
        build_engines(art, precision="int4", max_batch=1, step=False, fixed_past=True)
    args = ["trt", str(art), "--int4", "--max-batch", "1", "--fixed-past", "--no-progress"]
    assert main(args) == 0
    section = _manifest(art)["tensorrt"]
    dec = section["engines"][DECODER]
    assert tm.STEP not in section["engines"]
    assert (dec["onnx"], dec["variant"], dec["fixed"]) == (
        "decoder_step.int4.qdq.onnx",
        "int4-qdq",
        {"past": MAX_SEQ - 1},
    )
    prefill, decode = dec["profiles"]
    assert (prefill["name"], decode["name"]) == ("prefill", "decode")
    assert prefill["shapes"]["position_ids"]["max"] == [1, MAX_SEQ]
    assert decode["shapes"]["position_ids"]["max"] == [1, 1]
    assert {s["min"][0] for n, s in prefill["shapes"].items() if n.startswith("past_")} == {383}

    pipe = Pipeline.from_dir(art, "tensorrt", device="cuda")
    ref = Pipeline.from_dir(art, "onnxruntime", cache_dir=False, decoder_variant="int4-qdq")
    assert pipe.backend.fixed_past and pipe.backend.step is not None
    for task, gen in [
        ("dvc", GenerationConfig(max_new_tokens=20)),
        ("mr", GenerationConfig(max_new_tokens=20, temperature=1.0, seed=2)),
    ]:
        query = QUERY if task == "mr" else None
        got = pipe.run(clip_video, task, query=query, gen=gen)["token_ids"]
        assert got == ref.run(clip_video, task, query=query, gen=gen)["token_ids"], task
    assert len(fake_trt.live_graphs) == 1 and pipe.backend.past_graphs.graphs == {}

    # Step level, with a saved prefix run over again (stale rows past it stay masked).
    trt_b = load_backend("tensorrt", art, device="cuda")
    ort_b = load_backend("onnxruntime", art, cache_dir=False, decoder_variant="int4-qdq")
    c = ort_b.config
    video = np.random.default_rng(1).standard_normal((9, c.hidden_size)).astype(ort_b.dtype)
    prompt = [1, 733, -201, 28705, 13, 5, 6]
    prefixes = [b.save_prefix(prompt, video) for b in (trt_b, ort_b)]
    for _ in range(2):
        for b, prefix in zip((trt_b, ort_b), prefixes, strict=True):
            b.prefill(prompt, None, Head.TEXT, prefix=prefix)
        for token, head in [(32005, Head.TIME), (1234, Head.SCORE), (32016, Head.TEXT)]:
            got, want = trt_b.decode_step(token, head), ort_b.decode_step(token, head)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    want = ort_b.prefill(prompt, video, Head.TEXT)
    np.testing.assert_allclose(trt_b.prefill(prompt, video, Head.TEXT), want, atol=1e-4)
    trt_b.close()


@pytest.mark.gpu
@pytest.mark.parametrize("fixed_past", [False, True])
def test_int4_step_on_tensorrt(tiny_ckpt, clip_video, tmp_path, fixed_past):
    """Real TensorRT (written, not yet run: no GPU here): the int4 decode step, beside the
    decoder or as the fixed-past decoder, gives onnxruntime's int4-qdq tokens."""
    pytest.importorskip("tensorrt")
    pytest.importorskip("cuda")
    from export import export_onnx
    from export.quantize import quantize_artifact
    from export.trt import build_engines
    from export.trt_step import make_step
    from trace_rt.generate import GenerationConfig
    from trace_rt.pipeline import Pipeline

    art = export_onnx(tiny_ckpt, tmp_path / "art", progress=False)
    quantize_artifact(art, 4, forms=["qdq"])
    make_step(tiny_ckpt, art, 256)
    build_engines(art, precision="int4", max_batch=1, fixed_past=fixed_past, progress=False)
    pipe = Pipeline.from_dir(art, "tensorrt", device="cuda")
    ref = Pipeline.from_dir(art, "onnxruntime", cache_dir=False, decoder_variant="int4-qdq")
    assert pipe.backend.step is not None and pipe.backend.fixed_past == fixed_past
    gen = GenerationConfig(max_new_tokens=24)
    for task in ("dvc", "mr"):
        query = QUERY if task == "mr" else None
        got = pipe.run(clip_video, task, query=query, gen=gen)["token_ids"]
        assert got == ref.run(clip_video, task, query=query, gen=gen)["token_ids"], task
    assert pipe.backend.step.graph is not None
