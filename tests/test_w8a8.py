"""The dynamic int8 form (export/w8a8.py): int8 weights per output channel x activations
quantised per token, as ``python -m export quantize --form dynamic`` and ``python -m export
optimize --int8-dynamic`` write it.

Oracles: a numpy implementation of the scheme for one MatMul (the graph must compute
exactly that), the fp32 portable decoder (logits within int8's tolerance, greedy tokens
as test_quantize.py allows) and solo decoding (the engine's batched steps must give the
same tokens with it).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from export import export_onnx
from export.decode_timing import default_candidates, record_default, request_ms
from export.fuse import optimize_artifact
from export.quantize import quantize_artifact
from export.w8a8 import to_w8a8
from tests.engine_runs import check_batched_equals_solo, check_cached_prefix_equals_uncached
from tests.test_quantize import QUERY, agrees_with_fp32
from trace_rt.errors import InputError
from trace_rt.graphs import DECODER, MANIFEST_FILE, load_manifest, manifest_specs
from trace_rt.pipeline import Pipeline
from trace_rt.variants import TEXT_HEAD_INPUT

DYNAMIC = ("int8-dynamic", "fused-int8-dynamic", "contrib-int8-dynamic")
RTOL = 0.03  # as int8 in test_quantize.py (measured ~0.005-0.01 here)


@pytest.fixture(scope="module")
def art(tiny_ckpts, tmp_path_factory) -> Path:
    out = export_onnx(tiny_ckpts[2], tmp_path_factory.mktemp("w8a8") / "a", progress=False)
    # The plain form with optimize's default int8 lm_head, so that the fused forms compute
    # exactly its weights.
    quantize_artifact(out, 8, forms=("dynamic",), lm_head=8)
    optimize_artifact(out, (None, 8), forms=("fused", "contrib"), int8_dynamic=True)
    return out


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s.run(None, feeds)


def _one_matmul(w: np.ndarray, opset: int) -> onnx.ModelProto:
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", w.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w")],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("opset", [17, 21])
def test_graph_computes_the_scheme(opset):
    """Per-row scale max|x|/127, uint8 with zero point 128, int8 per-column weights: the
    graph's output equals that computed in numpy (float rounding of the two multiplies
    only), rows of zeros give zeros, and the weight initializer is replaced."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 20)).astype(np.float32)
    w[:, 3] = 0  # a zero column: scale 1, all-zero weights
    x = (rng.standard_normal((2, 5, 48)) * np.array([1, 30])[:, None, None]).astype(np.float32)
    x[1, 2] = 0  # a padding row
    model = to_w8a8(_one_matmul(w, opset), ["mm"])
    assert "w" not in {t.name for t in model.graph.initializer}
    assert {n.op_type for n in model.graph.node} >= {"MatMulIntegerToFloat", "ReduceMax", "Round"}
    (got,) = _run(model, {"x": x})

    s = np.maximum(np.abs(x).max(-1, keepdims=True), 1e-12) / 127  # [b, s, 1]
    xq = np.rint(x / s + 128).astype(np.int64)  # uint8 grid
    sw = np.abs(w).max(0) / 127
    sw[sw == 0] = 1.0
    wq = np.clip(np.rint(w / sw), -127, 127).astype(np.int64)
    want = ((xq - 128) @ wq).astype(np.float32) * s * sw.astype(np.float32)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
    assert not got[1, 2].any() and not np.isnan(got).any()
    # And it approximates the float matmul to int8's precision.
    err = np.abs(got - x @ w).max() / np.abs(x @ w).max()
    assert 0 < err < 0.02


def test_recorded_with_same_io(art):
    m = json.loads((art / MANIFEST_FILE).read_text())
    variants = m["variants"][DECODER]
    spec = manifest_specs(load_manifest(art))[DECODER]
    for name in DYNAMIC:
        rec = variants[name]
        assert rec["scheme"] == "dynamic" and rec["bits"] == 8, name
        assert rec["accuracy_level"] is None and rec["granularity"] == "channel"
        g = onnx.load(str(art / rec["file"]), load_external_data=False).graph
        ops = {n.op_type for n in g.node}
        assert "MatMulIntegerToFloat" in ops, name
        # The one MatMulNBits is lm_head in int8 (at top level in the plain form; the fused
        # forms hold it in the text-head If).
        nbits = [n for n in g.node if n.op_type == "MatMulNBits"]
        assert len(nbits) == (1 if name == DYNAMIC[0] else 0), name
        for n in nbits:
            a = {x.name: x.i for x in n.attribute}
            assert a["bits"] == 8 and a["N"] == m["config"]["vocab_size"], name
        want = [t.name for t in spec.inputs] + ([TEXT_HEAD_INPUT] if name != DYNAMIC[0] else [])
        assert [i.name for i in g.input] == want
        assert [o.name for o in g.output] == [t.name for t in spec.outputs]
    # Packing kept: 4 integer matmuls per layer in the fused forms, 7 in the plain one.
    layers = m["config"]["num_hidden_layers"]
    count = {
        n: sum(
            x.op_type == "MatMulIntegerToFloat"
            for x in onnx.load(str(art / variants[n]["file"]), load_external_data=False).graph.node
        )
        for n in DYNAMIC
    }
    assert count == {DYNAMIC[0]: 7 * layers, DYNAMIC[1]: 4 * layers, DYNAMIC[2]: 4 * layers}


def test_logits_close_to_fp32_and_packing_exact(art):
    """Ragged batch of 3 over a past (the engine's step shape)."""
    from tests.test_fuse import _feeds, _session

    feeds = _feeds(art)
    want = _session(art / "decoder.onnx").run(["logits"], feeds)[0]
    plain = _session(art / "decoder.int8.dynamic.onnx").run(["logits"], feeds)[0]
    err = float(np.abs(plain - want).max() / np.abs(want).max())
    assert 0 < err <= RTOL, f"rel. error {err:.3e}"
    for name in DYNAMIC[1:]:
        got = _session(art / f"decoder.{name.split('-')[0]}.int8-dynamic.onnx").run(
            ["logits"], {**feeds, TEXT_HEAD_INPUT: np.array(True)}
        )[0]
        # Packing concatenates whole columns: per-column weight scales and the per-token
        # activation scale are the same, so only float summation order differs.
        rel = float(np.abs(got - plain).max() / np.abs(plain).max())
        assert rel <= 1e-4, f"{name}: {rel:.2e} from the unpacked form"


@pytest.mark.parametrize("variant", DYNAMIC)
def test_greedy_run_agrees_with_fp32(art, clip_video, variant):
    base = Pipeline.from_dir(art, "onnxruntime", cache_dir=False, decoder_variant="portable")
    pipe = Pipeline.from_dir(
        art, "onnxruntime", cache_dir=False, decoder_variant=variant, exact_variant=True
    )
    for task, query in (("dvc", None), ("mr", QUERY)):
        prep = base.prepare(clip_video, task, query=query, frames=6)
        agrees_with_fp32(pipe, base, prep, RTOL, budget=24)


def test_batched_equals_solo(art, clip_video):
    check_batched_equals_solo(art, "contrib-int8-dynamic", clip_video, QUERY)


def test_cached_prefix_equals_uncached(art, clip_video):
    """Per-token scales keep a row's quantisation independent of the rows prefilled with
    it, so a prompt whose video prefix comes from the prefix cache gets the same tokens as
    one prefilled whole (a per-tensor scale would depend on the whole chunk)."""
    check_cached_prefix_equals_uncached(art, "contrib-int8-dynamic", clip_video, QUERY)


def test_default_counts_the_prefill(art, tmp_path):
    """The dynamic forms compete for int8's default, judged on one request's time."""
    groups = default_candidates(json.loads((art / MANIFEST_FILE).read_text()))
    assert set(groups["int8"]) == {"fused-int8", "contrib-int8", *DYNAMIC}
    timing = {"prefill": 300.0, "text": 5.0, "time": 3.0}
    assert request_ms(timing) == 300.0 + 64 * 4.0
    copy = tmp_path / "a"
    shutil.copytree(art, copy)
    chosen, _ = record_default(copy, measure=False)  # unmeasured: the fused MatMulNBits
    assert chosen["int8"] == "fused-int8"


def test_int8_head(art, tmp_path, clip_video):
    """lm_head=8 in the dynamic form: one MatMulNBits (8 bits) inside the text-head gate,
    the layers still MatMulIntegerToFloat; text logits within int8's tolerance."""
    copy = tmp_path / "a"
    shutil.copytree(art, copy)
    rec = optimize_artifact(copy, (), forms=("fused",), int8_dynamic=True, lm_head=8)
    rec = rec["fused-int8-dynamic"]
    assert rec["weights"]["lm_head_bits"] == 8
    g = onnx.load(str(copy / rec["file"]), load_external_data=False).graph
    gate = next(n for n in g.node if n.op_type == "If")
    then = next(a.g for a in gate.attribute if a.name == "then_branch")
    (head,) = then.node
    assert head.op_type == "MatMulNBits" and {a.name: a.i for a in head.attribute}["bits"] == 8
    assert any(n.op_type == "MatMulIntegerToFloat" for n in g.node)
    base = Pipeline.from_dir(copy, "onnxruntime", cache_dir=False)
    pipe = Pipeline.from_dir(
        copy, "onnxruntime", cache_dir=False, decoder_variant="fused-int8-dynamic"
    )
    prep = pipe.prepare(clip_video, "mr", query=QUERY)
    agrees_with_fp32(pipe, base, prep, RTOL, budget=8)


def test_refusals(art, tmp_path):
    with pytest.raises(InputError, match="int8 only"):
        quantize_artifact(art, 4, forms=("dynamic",))
    fp16 = _one_matmul(np.ones((4, 4), np.float16), 17)
    with pytest.raises(InputError, match="float32 weights"):
        to_w8a8(fp16, ["mm"])


def test_cli_writes_and_times(art, tmp_path):
    copy = tmp_path / "a"
    shutil.copytree(art, copy)
    done = subprocess.run(
        [sys.executable, "-m", "export", "optimize", str(copy), "--int8-dynamic"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "variant fused-int8-dynamic" in done.stdout
    assert "fused-int8-dynamic: prefill" in done.stdout
    m = json.loads((copy / MANIFEST_FILE).read_text())
    p50 = m["defaults"]["onnxruntime"]["measured"]["p50_ms"]
    assert all(v["prefill"] > 0 for v in p50.values())
    int8 = [n for n in p50 if "int8" in n]
    want = min(int8, key=lambda n: request_ms(p50[n]))
    assert m["defaults"]["onnxruntime"]["decoder_by_precision"]["int8"] == want
