"""``python -m export optimize`` on `tiny`: fused decoder variants against the portable graph.

The oracle is ``decoder.onnx`` (itself held to the PyTorch model by test_export.py and to
HF transformers by test_run.py): the fused graphs must give its logits and K/V within
the fp32 tolerance, the same greedy tokens for every task, and the engine's batched
decoding must still equal solo decoding with them.
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

from export import export_onnx
from export.decode_timing import record_default, request_ms
from export.fuse import optimize_artifact
from export.quantize import quantize_artifact
from tests.engine_runs import check_batched_equals_solo, check_cached_prefix_equals_uncached
from trace_rt.backends import load_backend
from trace_rt.backends.onnxruntime_backend import OnnxRuntimeBackend
from trace_rt.bench.plugins import BackendSpec
from trace_rt.bench.runner import precision_of
from trace_rt.engine import GenerationConfig
from trace_rt.errors import CheckpointError
from trace_rt.graphs import DECODER, MANIFEST_FILE, load_manifest, manifest_specs, sha256_file
from trace_rt.pipeline import Pipeline
from trace_rt.tokens import VIDEO_PLACEHOLDER_ID, Head
from trace_rt.variants import TEXT_HEAD_INPUT

TRT_OPS = Path(__file__).parents[1] / "export" / "trt_ops.txt"
QUERY = "a red circle moves left"


@pytest.fixture(scope="module")
def art(tiny_ckpts, tmp_path_factory) -> Path:
    out = export_onnx(tiny_ckpts[2], tmp_path_factory.mktemp("fuse") / "a", progress=False)
    optimize_artifact(out, (None, 4, 8), forms=("fused", "contrib"))
    # The plain int4 variant with the same int8 lm_head (optimize's default): the fused one
    # must compute exactly its weights.
    quantize_artifact(out, 4, forms=("nbits",), lm_head=8)
    return out


def _session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _feeds(art: Path, batch: int = 3, past: int = 5) -> dict[str, np.ndarray]:
    """Random embeddings at ragged positions over a random past (rows 0..batch-1 at
    positions past, past-2, 0: full, partial and no past)."""
    spec = manifest_specs(load_manifest(art))[DECODER]
    rng = np.random.default_rng(0)
    hidden = spec.input("inputs_embeds").shape[-1]
    pos = np.array([[past], [past - 2], [0]][:batch], np.int64)
    feeds = {
        "inputs_embeds": rng.standard_normal((batch, 1, hidden)).astype(np.float32),
        "position_ids": pos,
    }
    for t in spec.inputs[2:]:
        feeds[t.name] = rng.standard_normal((past, batch, *t.shape[2:])).astype(np.float32)
    return feeds


def test_variants_recorded_and_portable_untouched(art):
    m = json.loads((art / MANIFEST_FILE).read_text())
    variants = m["variants"][DECODER]
    for name, file in (
        ("fused", "decoder.fused.onnx"),
        ("fused-int4", "decoder.fused.int4.onnx"),
        ("fused-int8", "decoder.fused.int8.onnx"),
    ):
        rec = variants[name]
        assert rec["file"] == file and rec["form"] == "fused"
        assert rec["extra_inputs"] == [{"name": TEXT_HEAD_INPUT, "dtype": "bool", "shape": []}]
        assert rec["source"]["sha256"] == sha256_file(art / "decoder.onnx")
        assert rec["files"][file]["sha256"] == sha256_file(art / file)
    assert variants["fused-int4"]["bits"] == 4 and variants["fused-int4"]["block_size"] == 32
    # The portable graph is the manifest's, standard ops only (TensorRT/ATC take it).
    assert m["files"]["decoder.onnx"]["sha256"] == sha256_file(art / "decoder.onnx")
    allowed = {
        line.split()[0]
        for line in TRT_OPS.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    ops = {n.op_type for n in onnx.load(str(art / "decoder.onnx")).graph.node}
    assert ops <= allowed and "If" not in ops and "Split" not in ops


def test_fused_graph_is_packed_and_gated(art):
    cfg = json.loads((art / "config.json").read_text())
    layers = cfg["num_hidden_layers"]
    port = onnx.load(str(art / "decoder.onnx")).graph
    fused = onnx.load(str(art / "decoder.fused.onnx")).graph

    def count(g, op):
        return sum(n.op_type == op for n in g.node)

    # q/k/v -> one MatMul, gate/up -> one: 3 fewer per layer; lm_head moves into the If.
    assert count(port, "MatMul") - count(fused, "MatMul") == 3 * layers + 1
    assert count(fused, "Split") - count(port, "Split") == 2 * layers
    # Reshape targets and RoPE slice bounds are constants: less shape arithmetic.
    # (tiny, 2 layers: 480 -> 351 nodes as exported).
    assert count(fused, "Shape") < count(port, "Shape") and len(fused.node) < 0.8 * len(port.node)
    # What stays symbolic (batch, past length) is computed once, not once per layer: no two
    # Shape nodes read tensors of the same shape, no two nodes compute the same thing.
    shape_of = [n.input[0] for n in fused.node if n.op_type == "Shape"]
    pasts = [i for i in shape_of if i.startswith(("past_key", "past_value"))]
    assert len(pasts) <= 1, pasts
    keys = [(n.op_type, tuple(n.input), str(n.attribute)) for n in fused.node if n.input]
    assert len(keys) == len(set(keys))
    (gate,) = [n for n in fused.node if n.op_type == "If"]
    assert gate.input[0] == TEXT_HEAD_INPUT
    assert [i.name for i in fused.input] == [i.name for i in port.input] + [TEXT_HEAD_INPUT]
    assert [o.name for o in fused.output] == [o.name for o in port.output]
    q4 = onnx.load(str(art / "decoder.fused.int4.onnx")).graph
    assert count(q4, "MatMulNBits") == 4 * layers  # packed qkv, o, packed gate/up, down
    # lm_head in int8 (optimize's default: fuse.DEFAULT_LM_HEAD), inside the If.
    (gate4,) = [n for n in q4.node if n.op_type == "If"]
    then = next(a.g for a in gate4.attribute if a.name == "then_branch")
    assert [n.op_type for n in then.node] == ["MatMulNBits"]
    assert {a.name: a.i for a in then.node[0].attribute}["bits"] == 8


def test_onnxruntime_fuses_every_rmsnorm(art, tmp_path):
    """export/fuse.py leaves RMSNorm to onnxruntime: at the backend's level every exported
    norm (two per layer and the final one) must become SimplifiedLayerNormalization."""
    layers = json.loads((art / "config.json").read_text())["num_hidden_layers"]
    for name in ("decoder.fused.onnx", "decoder.contrib.int4.onnx"):
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(tmp_path / name)
        so.log_severity_level = 3
        ort.InferenceSession(str(art / name), so, providers=["CPUExecutionProvider"])
        g = onnx.load(str(tmp_path / name), load_external_data=False).graph
        norms = sum(n.op_type == "SimplifiedLayerNormalization" for n in g.node)
        assert norms == 2 * layers + 1, (name, norms)
        assert not any(n.op_type in ("ReduceMean", "Sqrt", "Pow") for n in g.node), name


def test_contrib_graph_uses_rotary_embedding(art):
    """Each layer's q and k rotation is one RotaryEmbedding; the exported rotate_half
    (Neg) and the per-step cos/sin computation are gone; the rest is the fused graph."""
    layers = json.loads((art / "config.json").read_text())["num_hidden_layers"]
    fused = onnx.load(str(art / "decoder.fused.onnx")).graph
    contrib = onnx.load(str(art / "decoder.contrib.onnx")).graph
    ops = [n.op_type for n in contrib.node]
    assert ops.count("RotaryEmbedding") == 2 * layers
    assert {"Neg", "Cos", "Sin"}.isdisjoint(ops) and "Neg" in {n.op_type for n in fused.node}
    assert [i.name for i in contrib.input] == [i.name for i in fused.input]
    assert [o.name for o in contrib.output] == [o.name for o in fused.output]
    rec = load_manifest(art)["variants"][DECODER]["contrib-int4"]
    assert "rotary-embedding" in rec["rewrites"] and rec["weight_type"] == "int4"


@pytest.mark.parametrize("form", ["fused", "contrib"])
def test_logits_and_kv_within_fp32_tolerance(art, form):
    spec = manifest_specs(load_manifest(art))[DECODER]
    feeds = _feeds(art)
    want = _session(art / "decoder.onnx").run(None, feeds)
    fused = _session(art / f"decoder.{form}.onnx")
    got = fused.run(None, {**feeds, TEXT_HEAD_INPUT: np.array(True)})
    for name, w, g in zip(spec.output_names, want, got, strict=True):
        err = float(np.abs(g - w).max() / np.abs(w).max())
        assert err <= spec.rtol_fp32, f"{name}: rel. error {err:.2e}"
    # Without the text head: the other heads' columns as before, zeros for lm_head's.
    off = fused.run(["logits"], {**feeds, TEXT_HEAD_INPUT: np.array(False)})[0]
    text = json.loads((art / "config.json").read_text())["vocab_size"]  # lm_head's columns
    assert not off[:, :text].any()
    np.testing.assert_allclose(off[:, text:], got[0][:, text:], rtol=0, atol=0)
    assert np.abs(got[0][:, :text]).max() > 0


def test_fused_int4_matches_unfused_int4(art):
    """Packing concatenates whole columns, so blocks and scales are the same weights'."""
    feeds = _feeds(art)
    want = _session(art / "decoder.int4.onnx").run(["logits"], feeds)[0]
    got = _session(art / "decoder.fused.int4.onnx").run(
        ["logits"], {**feeds, TEXT_HEAD_INPUT: np.array(True)}
    )[0]
    err = float(np.abs(got - want).max() / np.abs(want).max())
    assert err <= 1e-4, f"rel. error {err:.2e}"


@pytest.mark.parametrize("task", ["dvc", "mr", "vhd"])
def test_greedy_tokens_equal(art, clip_video, task):
    gen = GenerationConfig(max_new_tokens=40)
    query = None if task == "dvc" else QUERY
    runs = {}
    for variant in ("portable", "fused", "contrib"):
        pipe = Pipeline.from_dir(art, "onnxruntime", cache_dir=False, decoder_variant=variant)
        runs[variant] = pipe.run(clip_video, task, query=query, frames=6, gen=gen)["token_ids"]
    assert len(runs["portable"]) > 4
    assert runs["fused"] == runs["portable"]
    assert runs["contrib"] == runs["portable"]


def test_default_variant_and_explicit_choice(art, tmp_path):
    copy = tmp_path / "a"
    shutil.copytree(art, copy)
    assert OnnxRuntimeBackend(copy, cache_dir=False).decoder_variant is None  # no default yet
    chosen, timing = record_default(copy, measure=False)
    # Unmeasured, the fused form of each precision there; no plain int8 variant here, but
    # asking for int8 still gets one (the fused).
    assert chosen == {"decoder": "fused", "int4": "fused-int4", "int8": "fused-int8"}
    assert timing == {}
    m = json.loads((copy / MANIFEST_FILE).read_text())
    assert m["defaults"]["onnxruntime"][DECODER] == "fused"
    assert m["defaults"]["onnxruntime"]["decoder_by_precision"] == {
        "int4": "fused-int4",
        "int8": "fused-int8",
    }
    b = OnnxRuntimeBackend(copy, cache_dir=False, video_graphs=False)
    assert b.decoder_variant == "fused" and b.specs[DECODER].file == "decoder.fused.onnx"
    for asked, exact, file in (
        ("portable", False, "decoder.onnx"),
        ("int4", False, "decoder.fused.int4.onnx"),  # the precision's recorded default
        ("int4", True, "decoder.int4.onnx"),  # the variant of that name
        ("contrib-int4", False, "decoder.contrib.int4.onnx"),
    ):
        b = OnnxRuntimeBackend(
            copy, cache_dir=False, video_graphs=False, decoder_variant=asked, exact_variant=exact
        )
        assert b.specs[DECODER].file == file, (asked, exact)
    # The bench's onnxruntime-int4 is the same request; its precision is the record's.
    b = load_backend("onnxruntime-int4", copy, cache_dir=False, video_graphs=False)
    assert b.decoder_variant == "fused-int4"
    spec = BackendSpec("onnxruntime-int4", "", options={"decoder_variant": "int4"})
    assert precision_of(b, spec) == "int4"
    fused = OnnxRuntimeBackend(copy, cache_dir=False, video_graphs=False)
    assert precision_of(fused, BackendSpec("onnxruntime", "")) == "fp32"
    # A copy without a default's file (part of an artifact) runs what was asked (or
    # decoder.onnx) and says so; a variant asked for by name must be there.
    (copy / "decoder.fused.onnx").unlink()
    (copy / "decoder.fused.int4.onnx").unlink()
    with pytest.warns(RuntimeWarning, match=r"decoder\.fused\.onnx is missing"):
        b = OnnxRuntimeBackend(copy, cache_dir=False, video_graphs=False)
    assert b.decoder_variant is None and b.specs[DECODER].file == "decoder.onnx"
    with pytest.warns(RuntimeWarning, match=r"decoder\.fused\.int4\.onnx is missing.*running int4"):
        b = OnnxRuntimeBackend(copy, cache_dir=False, video_graphs=False, decoder_variant="int4")
    assert b.decoder_variant == "int4" and b.specs[DECODER].file == "decoder.int4.onnx"
    with pytest.raises(CheckpointError, match=r"decoder\.fused\.onnx is missing"):
        OnnxRuntimeBackend(copy, cache_dir=False, video_graphs=False, decoder_variant="fused")


@pytest.mark.parametrize("variant", ["fused", "contrib"])
def test_batched_equals_solo_with_fused(art, clip_video, variant):
    check_batched_equals_solo(art, variant, clip_video, QUERY)


def test_text_head_skipped_only_without_text_rows(art):
    """Steps in the time head run with text_head false; text steps see real logits."""
    b = OnnxRuntimeBackend(art, cache_dir=False, video_graphs=False, decoder_variant="fused")
    ref = OnnxRuntimeBackend(art, cache_dir=False, video_graphs=False, decoder_variant="portable")
    h = b.config.hidden_size
    video = np.random.default_rng(1).standard_normal((7, h)).astype(np.float32)
    for be in (b, ref):
        be.prefill([1, VIDEO_PLACEHOLDER_ID, 2], video, Head.TIME)
    for head in (Head.TIME, Head.TEXT, Head.SCORE):
        got, want = b.decode_step(5, head), ref.decode_step(5, head)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_cli_writes_measures_and_records(art, tmp_path):
    copy = tmp_path / "a"
    shutil.copytree(art, copy)
    done = subprocess.run(
        [sys.executable, "-m", "export", "optimize", str(copy), "--int4"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "variant fused-int4" in done.stdout and "onnxruntime's default decoder" in done.stdout
    assert "timing fused-int4 (" in done.stderr  # progress while the workers run
    assert "--quant int4 (and onnxruntime-int4) runs:" in done.stdout
    m = json.loads((copy / MANIFEST_FILE).read_text())
    defaults = m["defaults"]["onnxruntime"]
    assert defaults["measured"]["past"] == 400
    p50 = defaults["measured"]["p50_ms"]
    # Every precision's candidates in one run (the copy has contrib forms from the fixture).
    groups = {
        DECODER: ["portable", "fused", "contrib"],
        "int4": ["int4", "fused-int4", "contrib-int4"],
        "int8": ["fused-int8", "contrib-int8"],
    }
    assert set(p50) == {n for g in groups.values() for n in g}
    assert all(v["prefill"] > 0 and v["text"] > 0 and v["time"] > 0 for v in p50.values())
    chosen = {k: min(g, key=lambda n: request_ms(p50[n])) for k, g in groups.items()}
    assert defaults[DECODER] == chosen.pop(DECODER)
    assert defaults["decoder_by_precision"] == chosen


def test_cli_tag_makes_forms_to_compare_never_defaults(art, tmp_path):
    copy = tmp_path / "a"
    shutil.copytree(art, copy)
    done = subprocess.run(
        [sys.executable, "-m", "export", "optimize", str(copy), "--int4", "--block-size", "64",
         "--tag", "b64", "--no-measure"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "variant fused-int4-b64" in done.stdout
    m = json.loads((copy / MANIFEST_FILE).read_text())
    rec = m["variants"][DECODER]["fused-int4-b64"]
    assert rec["file"] == "decoder.fused.int4-b64.onnx" and rec["block_size"] == 64
    assert m["variants"][DECODER]["fused-int4"]["block_size"] == 32  # untouched
    assert m["defaults"]["onnxruntime"]["decoder_by_precision"]["int4"] == "fused-int4"


def test_fp16_fused_within_tolerance(tiny_ckpts, tmp_path):
    """An fp16 export fuses too (packing sums in another order: fp16 rounding only; the
    contrib form's cos/sin table is fp16, as the exported graph casts its own)."""
    art = export_onnx(tiny_ckpts[2], tmp_path / "a16", dtype="fp16", progress=False)
    optimize_artifact(art, (None,), forms=("fused", "contrib"))
    feeds = {
        k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in _feeds(art).items()
    }
    want = _session(art / "decoder.onnx").run(None, feeds)
    for form in ("fused", "contrib"):
        got = _session(art / f"decoder.{form}.onnx").run(
            None, {**feeds, TEXT_HEAD_INPUT: np.array(True)}
        )
        for w, g in zip(want, got, strict=True):
            w, g = w.astype(np.float32), g.astype(np.float32)
            err = float(np.abs(g - w).max() / np.abs(w).max())
            assert err <= 5e-3, f"{form}: rel. error {err:.2e}"  # measured 7e-4 (fused)


@pytest.mark.parametrize("variant", ["fused", "contrib"])
def test_cached_prefix_equals_uncached_with_fused(art, clip_video, variant):
    """The prefix cache's save_prefix runs without lm_head; later prompts must not mind."""
    check_cached_prefix_equals_uncached(art, variant, clip_video, QUERY)
