"""``python -m export quantize`` on `tiny`: variant files, manifest, accuracy, runtime."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from export import export_onnx
from export.quantize import quantize_artifact
from trace_rt.backends import load_backend
from trace_rt.backends.onnxruntime_backend import OnnxRuntimeBackend
from trace_rt.errors import CheckpointError, InputError
from trace_rt.generate import GenerationConfig
from trace_rt.graphs import DECODER, MANIFEST_FILE, load_manifest, sha256_file
from trace_rt.pipeline import Pipeline
from trace_rt.tokens import Head, heads_along

TRT_OPS = Path(__file__).parents[1] / "export" / "trt_ops.txt"
QUERY = "a red circle moves left"
VARIANTS = {  # name -> (file, scheme, bits)
    "int4": ("decoder.int4.onnx", "MatMulNBits", 4),
    "int8": ("decoder.int8.onnx", "MatMulNBits", 8),
    "int4-qdq": ("decoder.int4.qdq.onnx", "QDQ", 4),
    "int8-qdq": ("decoder.int8.qdq.onnx", "QDQ", 8),
    "int8-dynamic": ("decoder.int8.dynamic.onnx", "dynamic", 8),
}
# max |variant - fp32| / max |fp32| of the text head's logits on random inputs, tiny's
# random weights. Measured ~0.05-0.10 (int4, block 32) and ~0.005 (int8); the bounds
# leave room for other CPUs' kernels (accuracy level 4 quantises activations too).
RTOL = {4: 0.25, 8: 0.03}
# fp8 (E4M3FN, per output channel): measured 0.020-0.022 on tiny (fp32 and fp16 exports;
# int8-qdq 0.0075 on the same inputs): 3 mantissa bits against int8's 7.
RTOL_FP8 = 0.06


@pytest.fixture(scope="module")
def art(tiny_ckpt, tmp_path_factory) -> Path:
    out = export_onnx(tiny_ckpt, tmp_path_factory.mktemp("quant") / "tiny", progress=False)
    quantize_artifact(out, 4)
    quantize_artifact(out, 8, forms=("nbits", "qdq", "dynamic"))
    return out


def _manifest(art: Path) -> dict:
    return json.loads((art / MANIFEST_FILE).read_text())


def _graph(art: Path, file: str) -> onnx.GraphProto:
    return onnx.load(str(art / file)).graph


def test_variants_written_and_recorded(art):
    m = _manifest(art)
    layers = m["config"]["num_hidden_layers"]
    variants = m["variants"][DECODER]
    assert set(variants) == set(VARIANTS)
    for name, (file, scheme, bits) in VARIANTS.items():
        rec = variants[name]
        got = (rec["file"], rec["scheme"], rec["bits"], rec["symmetric"])
        assert got == (file, scheme, bits, True), name
        assert rec["files"][file]["sha256"] == sha256_file(art / file)
        assert file not in m["files"]  # checked when picked, not at every load
        assert rec["source"] == {
            "file": "decoder.onnx",
            "sha256": m["files"]["decoder.onnx"]["sha256"],
        }
        # q, k, v, o, gate, up, down per layer; the four heads stay in fp32.
        assert len(rec["weights"]["quantized"]) == 7 * layers, name
        assert len(rec["weights"]["kept"]) == 4 and rec["weights"]["lm_head"] is False
    assert variants["int4"]["block_size"] == 32 and variants["int4"]["accuracy_level"] == 4
    assert variants["int4-qdq"]["opset"] == 21 and variants["int8-qdq"]["block_size"] is None
    load_manifest(art)  # the base artifact is still consistent


def test_quantised_logits_close_to_fp32(art):
    g = np.random.default_rng(0)
    base = OnnxRuntimeBackend(art, cache_dir=False)
    x = g.standard_normal((9, base.config.hidden_size)).astype(np.float32)
    steps = [32005, 1234, 17]

    def logits(b: OnnxRuntimeBackend) -> np.ndarray:
        out = [b.prefill([-201], x, Head.TEXT)]
        out += [b.decode_step(t, Head.TEXT) for t in steps]
        return np.stack(out)

    want = logits(base)
    for name, (_, _, bits) in VARIANTS.items():
        got = logits(OnnxRuntimeBackend(art, cache_dir=False, decoder_variant=name))
        err = float(np.abs(got - want).max() / np.abs(want).max())
        assert 0 < err <= RTOL[bits], f"{name}: rel. error {err:.3e} > {RTOL[bits]}"


def teacher_forced(pipe: Pipeline, prep, tokens: list[int]) -> tuple[list[np.ndarray], list]:
    """The pipeline backend's logits at each of *tokens*' steps, fed *tokens* (not its own
    picks), with the head each step ran in."""
    b = pipe.backend
    heads = heads_along(pipe.config.ids, tokens)
    video = b.encode_video(prep.pixel_values, prep.time_ids)
    out = [b.prefill(prep.prompt_ids, video, heads[0])]
    out += [b.decode_step(tok, h) for tok, h in zip(tokens[:-1], heads[1:], strict=True)]
    return out, heads


def agrees_with_fp32(pipe: Pipeline, base: Pipeline, prep, rtol: float, budget: int) -> None:
    """The variant's greedy run against fp32's: every step's logits within *rtol* (rel.
    to the step's largest), and the same token wherever fp32's top-2 margin exceeds twice
    the measured error (below that a flip is allowed, and nothing after it is compared)."""
    gen = GenerationConfig(max_new_tokens=budget)
    want = base.run_prepared(prep, gen)["token_ids"]
    got = pipe.run_prepared(prep, gen)["token_ids"]
    ref, heads = teacher_forced(base, prep, want)
    var, _ = teacher_forced(pipe, prep, want)
    worst = 0.0
    for k, (r, v, head) in enumerate(zip(ref, var, heads, strict=True)):
        err = float(np.abs(v - r).max())
        worst = max(worst, err / float(np.abs(r).max()))
        top2 = np.sort(r)[-2:]
        if top2[1] - top2[0] > 2 * err:
            assert got[k] == want[k], f"step {k} ({head.name}): {got[k]} != fp32 {want[k]}"
        else:
            break  # a near tie: the variant may pick the other token from here on
    assert 0 < worst <= rtol, f"rel. error {worst:.3e} > {rtol}"


@pytest.fixture(scope="module")
def fp32_pipe(art) -> Pipeline:
    return Pipeline.from_dir(art, "onnxruntime", cache_dir=False)


@pytest.mark.parametrize("variant", ["int4", "int8", "int4-qdq", "int8-qdq"])
def test_pipeline_runs_variant(art, fp32_pipe, clip_video, variant):
    pipe = Pipeline.from_dir(art, "onnxruntime", cache_dir=False, decoder_variant=variant)
    assert pipe.backend.specs[DECODER].file == VARIANTS[variant][0]
    prep = pipe.prepare(clip_video, "mr", query=QUERY)
    agrees_with_fp32(pipe, fp32_pipe, prep, RTOL[VARIANTS[variant][2]], budget=12)


def test_convenience_backend_names(art):
    for name, variant in (("onnxruntime-int4", "int4"), ("onnxruntime-int8", "int8")):
        b = load_backend(name, art, cache_dir=False)
        assert b.decoder_variant == variant
        assert b.specs[DECODER].file == VARIANTS[variant][0]


def test_qdq_form(art):
    for name, bits in (("int4-qdq", 4), ("int8-qdq", 8)):
        g = _graph(art, VARIANTS[name][0])
        assert not [n for n in g.node if n.op_type == "MatMulNBits" or n.domain]
        inits = {t.name: t for t in g.initializer}
        dqs = [n for n in g.node if n.op_type == "DequantizeLinear"]
        assert dqs, name
        want = onnx.TensorProto.INT4 if bits == 4 else onnx.TensorProto.INT8
        consumers = {i for n in g.node if n.op_type == "MatMul" for i in n.input}
        for dq in dqs:
            assert inits[dq.input[0]].data_type == want
            assert len(dq.input) == 2  # no zero point: symmetric (TensorRT needs it)
            assert dq.output[0] in consumers
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in dq.attribute}
            assert attrs == ({"axis": 0, "block_size": 32} if bits == 4 else {"axis": 1})
    for name in ("int4", "int8"):
        ops = {n.op_type for n in _graph(art, VARIANTS[name][0]).node}
        assert "MatMulNBits" in ops and "DequantizeLinear" not in ops


def test_qdq_ops_supported_by_tensorrt(art):
    allowed = {
        line.strip()
        for line in TRT_OPS.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for name in ("int4-qdq", "int8-qdq"):
        g = _graph(art, VARIANTS[name][0])
        ops = {(n.domain or "ai.onnx", n.op_type) for n in g.node}
        bad = sorted(f"{d}::{op}" for d, op in ops if d != "ai.onnx" or op not in allowed)
        assert not bad, f"{name} uses ops TensorRT 10 lacks: {bad}"


def test_qdq_scales_searched_positive_and_as_accurate_as_matmulnbits():
    from benchmarks.nbits_step import layer_error
    from export.rtn import symmetric_rtn

    rng = np.random.default_rng(1)
    w = rng.standard_normal((256, 64), dtype=np.float32)
    w[:32, 0] = 0.0  # an all-zero block still gets a usable scale
    for bits, block in ((4, 32), (8, None)):
        q, s = symmetric_rtn(w, bits, block, np.dtype(np.float16))
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        assert s.dtype == np.float16 and (s > 0).all()  # TensorRT: strictly positive
        assert q.min() >= lo and q.max() <= hi and q.min() == lo  # -8 / -128 are used
        g = block or w.shape[0]
        back = np.repeat(s.astype(np.float32).reshape(-1, 64), g, axis=0)  # [256, 64]
        amax = np.abs(w.reshape(-1, g, 64)).max(axis=1)
        old_s = np.repeat(np.where(amax > 0, amax / hi, 1.0), g, axis=0)  # the old rule
        old_err = np.square(np.clip(np.rint(w / old_s), -hi, hi) * old_s - w).sum()
        assert np.square(q * back - w).sum() < old_err
    # small's gate, int4 blocks of 32: measured 8.6% for both (QDQ's amax/7 rule: 9.7%).
    qdq, nbits = (layer_error("small", 4, 32, f)["rel_rms_error"] for f in ("qdq", "nbits"))
    assert 0.07 < nbits < 0.10 and abs(qdq - nbits) < 0.03 * nbits, (qdq, nbits)
    assert layer_error("small", 8, 32, "qdq")["rel_rms_error"] < 0.012


def test_lm_head_option(tiny_ckpt, tmp_path, clip_video):
    out = export_onnx(tiny_ckpt, tmp_path / "a", progress=False)
    rec = quantize_artifact(out, 8, forms=("qdq",), lm_head=True)["int8-qdq"]
    assert rec["weights"]["lm_head"] is True and len(rec["weights"]["kept"]) == 3
    assert rec["weights"]["lm_head_bits"] == 8
    g = _graph(out, rec["file"])
    widths = {tuple(t.dims) for t in g.initializer if t.data_type == onnx.TensorProto.INT8}
    assert any(32000 in d for d in widths)  # the text head is int8 now

    # lm_head at its own width: int4 layers with an int8 head, in both runtimes' forms.
    recs = quantize_artifact(out, 4, lm_head=8)
    nbits = recs["int4"]
    assert nbits["weights"]["lm_head_bits"] == 8 and len(nbits["weights"]["kept"]) == 3
    widths = {}
    for n in _graph(out, nbits["file"]).node:
        if n.op_type == "MatMulNBits":
            a = {x.name: x.i for x in n.attribute}
            widths[a["N"]] = widths.get(a["N"], set()) | {a["bits"]}
    text_vocab = json.loads((out / "config.json").read_text())["vocab_size"]
    assert widths.pop(text_vocab) == {8} and set().union(*widths.values()) == {4}
    qdq = _graph(out, recs["int4-qdq"]["file"])
    head_w = {tuple(t.dims): t.data_type for t in qdq.initializer if text_vocab in t.dims}
    assert onnx.TensorProto.INT8 in head_w.values()  # per channel, as int8's QDQ form

    # The int8 head costs int8's error on the text logits, not int4's.
    base = Pipeline.from_dir(out, "onnxruntime", cache_dir=False)
    pipe = Pipeline.from_dir(out, "onnxruntime", cache_dir=False, decoder_variant="int4")
    prep = pipe.prepare(clip_video, "mr", query=QUERY)
    agrees_with_fp32(pipe, base, prep, RTOL[4], budget=8)

    with pytest.raises(InputError, match="8 or 4"):
        quantize_artifact(out, 4, lm_head=16)
    with pytest.raises(InputError, match="fp8"):
        quantize_artifact(out, "fp8", lm_head=8)


def test_fp16_artifact(tiny_ckpt, tmp_path):
    out = export_onnx(tiny_ckpt, tmp_path / "a", dtype="fp16", progress=False)
    quantize_artifact(out, 4)
    quantize_artifact(out, 8, forms=("qdq",))
    base = OnnxRuntimeBackend(out, cache_dir=False)
    x = np.random.default_rng(1).standard_normal((5, base.config.hidden_size))
    want = base.prefill([-201], x.astype(np.float16), Head.TEXT)
    for name in ("int4", "int4-qdq", "int8-qdq"):
        b = OnnxRuntimeBackend(out, cache_dir=False, decoder_variant=name)
        got = b.prefill([-201], x.astype(np.float16), Head.TEXT)
        bound = RTOL[VARIANTS[name][2]] + 2e-2  # + the fp16 graph's own error
        assert np.abs(got - want).max() / np.abs(want).max() <= bound, name


def test_external_data(art, tmp_path):
    # The >2 GB path (a 7B's variants) forced on tiny: weights go to <file>.data.
    a = _copy(art, tmp_path / "a")
    rec = quantize_artifact(a, 4, forms=("nbits",), external_data_threshold=0)["int4"]
    assert set(rec["files"]) == {"decoder.int4.onnx", "decoder.int4.onnx.data"}
    b = OnnxRuntimeBackend(a, cache_dir=False, decoder_variant="int4")
    inline = OnnxRuntimeBackend(art, cache_dir=False, decoder_variant="int4")  # one file
    x = np.random.default_rng(3).standard_normal((3, b.config.hidden_size)).astype(np.float32)
    got, want = b.prefill([-201], x, Head.TIME), inline.prefill([-201], x, Head.TIME)
    # the same quantised weights, only stored apart: the same logits
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(
        b.decode_step(32005, Head.TIME), inline.decode_step(32005, Head.TIME)
    )


def _copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".*")))


def test_missing_or_unknown_variant(art, tmp_path):
    a = _copy(art, tmp_path / "a")
    (a / "decoder.int4.onnx").unlink()
    with pytest.raises(CheckpointError, match=r"decoder\.int4\.onnx is missing .*int4"):
        OnnxRuntimeBackend(a, cache_dir=False, decoder_variant="int4")
    OnnxRuntimeBackend(a, cache_dir=False)  # fp32 and other variants still load
    OnnxRuntimeBackend(a, cache_dir=False, decoder_variant="int8")
    with pytest.raises(CheckpointError, match=r"no decoder variant 'int3'.*available: int4"):
        OnnxRuntimeBackend(a, cache_dir=False, decoder_variant="int3")
    data = bytearray((a / "decoder.int8.onnx").read_bytes())
    data[-50] ^= 0xFF
    (a / "decoder.int8.onnx").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"decoder\.int8\.onnx does not match"):
        OnnxRuntimeBackend(a, cache_dir=False, decoder_variant="int8")


def test_cli(art, tmp_path, clip_video):
    a = _copy(art, tmp_path / "a")
    cmd = [sys.executable, "-m", "export", "quantize", str(a), "--int4", "--forms", "qdq"]
    cmd += ["--block-size", "64"]
    subprocess.run(cmd, check=True, capture_output=True)
    assert _manifest(a)["variants"][DECODER]["int4-qdq"]["block_size"] == 64

    run = [sys.executable, "-m", "trace_rt", "run", str(clip_video), "--model", str(a)]
    run += ["--task", "mr", "--query", QUERY, "--max-new-tokens", "8"]
    out = subprocess.run([*run, "--backend", "onnxruntime", "--quant", "int4-qdq"], **_text)
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)["token_ids"]) == 8
    out = subprocess.run([*run, "--backend", "torch", "--quant", "int4"], **_text)
    assert out.returncode == 2 and "--quant" in out.stderr


_text = {"capture_output": True, "text": True}


def test_variant_runs_without_torch(art):
    code = f"""
import sys
sys.modules["torch"] = None
from trace_rt.backends import load_backend
b = load_backend("onnxruntime-int4", {str(art)!r}, cache_dir=False)
print(b.specs["decoder"].file)
"""
    out = subprocess.run([sys.executable, "-c", code], **_text)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "decoder.int4.onnx"


def test_fp8_variant(art, tmp_path, clip_video):
    a = _copy(art, tmp_path / "a")
    (rec,) = quantize_artifact(a, "fp8").values()
    m = _manifest(a)
    assert m["variants"][DECODER]["fp8-qdq"] == rec
    assert (rec["file"], rec["form"], rec["scheme"], rec["weight_type"]) == (
        "decoder.fp8.qdq.onnx", "qdq", "QDQ", "float8e4m3fn",
    )  # fmt: skip
    assert rec["granularity"] == "channel" and rec["opset"] == 19 and rec["symmetric"]
    assert rec["files"][rec["file"]]["sha256"] == sha256_file(a / rec["file"])
    layers = m["config"]["num_hidden_layers"]
    assert len(rec["weights"]["quantized"]) == 7 * layers and len(rec["weights"]["kept"]) == 4
    model = onnx.load(str(a / rec["file"]))
    onnx.checker.check_model(model, full_check=True)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    dqs = [n for n in g.node if n.op_type == "DequantizeLinear"]
    assert len(dqs) == 7 * layers
    for dq in dqs:
        assert inits[dq.input[0]].data_type == onnx.TensorProto.FLOAT8E4M3FN
        assert len(dq.input) == 2  # symmetric: no zero point
        attrs = {x.name: onnx.helper.get_attribute_value(x) for x in dq.attribute}
        assert attrs == {"axis": 1}
        assert inits[dq.input[1]].dims == inits[dq.input[0]].dims[1:]  # one scale per column
    allowed = {
        line.strip()
        for line in TRT_OPS.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    ops = {(n.domain or "ai.onnx", n.op_type) for n in g.node}
    assert not sorted(f"{d}::{op}" for d, op in ops if d != "ai.onnx" or op not in allowed)

    # onnxruntime's CPU EP runs float8 DequantizeLinear: logits close to fp32.
    x = np.random.default_rng(0).standard_normal((9, m["config"]["hidden_size"]))
    x = x.astype(np.float32)
    outs = []
    for variant in (None, "fp8-qdq"):
        b = OnnxRuntimeBackend(a, cache_dir=False, decoder_variant=variant)
        out = [b.prefill([-201], x, Head.TEXT)]
        outs.append(np.stack(out + [b.decode_step(t, Head.TEXT) for t in (32005, 1234, 17)]))
    err = float(np.abs(outs[1] - outs[0]).max() / np.abs(outs[0]).max())
    assert 0 < err <= RTOL_FP8, f"fp8 rel. error {err:.3e}"
    pipe = Pipeline.from_dir(a, "onnxruntime", cache_dir=False, decoder_variant="fp8-qdq")
    base = Pipeline.from_dir(a, "onnxruntime", cache_dir=False)
    prep = pipe.prepare(clip_video, "mr", query=QUERY)
    agrees_with_fp32(pipe, base, prep, RTOL_FP8, budget=8)


def test_fp8_cli_and_errors(art, tmp_path):
    a = _copy(art, tmp_path / "a")
    cmd = [sys.executable, "-m", "export", "quantize", str(a), "--fp8"]
    out = subprocess.run(cmd, **_text)
    assert out.returncode == 0, out.stderr
    assert "fp8-qdq" in out.stdout and (a / "decoder.fp8.qdq.onnx").is_file()
    with pytest.raises(InputError, match="fp8 has the qdq form only"):
        quantize_artifact(a, "fp8", forms=("nbits", "qdq"))


def test_reexport_drops_stale_variants(tiny_ckpt, tmp_path):
    out = export_onnx(tiny_ckpt, tmp_path / "re", progress=False)
    quantize_artifact(out, 8, forms=("qdq",))
    assert (out / "decoder.int8.qdq.onnx").is_file()
    export_onnx(tiny_ckpt, out, progress=False)
    # The variant was made from the replaced graph: gone, and not listed as a plain file.
    assert not list(out.glob("decoder.*.onnx"))
    manifest = _manifest(out)
    assert "variants" not in manifest
    assert not any(f.startswith("decoder.") and f != "decoder.onnx" for f in manifest["files"])


def test_cli_quant_settings_match_the_quantiser():
    """The CLI offers the quantiser's block sizes and defaults (one definition, in
    trace_rt.variants, which loads no onnx)."""
    from export import cli, quantize

    assert cli.BLOCK_SIZES is quantize.BLOCK_SIZES
    for command in (["quantize", "OUT", "--int4"], ["onnx", "CKPT", "OUT"], ["optimize", "OUT"]):
        args = cli.build_parser().parse_args(command)
        assert args.block_size == quantize.DEFAULT_BLOCK_SIZE
        # optimize: None = int8 (fuse.DEFAULT_LM_HEAD), or a streamed source's own choice
        assert args.lm_head is (None if command[0] == "optimize" else False)
        default = None if command[0] == "optimize" else False
        for flag, want in (([], default), (["--lm-head"], True), (["--lm-head", "int8"], 8)):
            assert cli.build_parser().parse_args(command + flag).lm_head == want
        if command[0] != "optimize":
            assert args.accuracy_level == quantize.DEFAULT_ACCURACY_LEVEL
