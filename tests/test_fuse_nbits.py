"""``python -m export optimize`` on a layer-streamed artifact (no float decoder): fused forms
made from the MatMulNBits variants themselves (export/fuse_nbits.py).

The oracle is the unfused MatMulNBits variant it was made from (itself held to the fp32
graph by test_stream.py and test_quantize.py): packing stacks whole output rows, so the
fused graph must give its logits, K/V and greedy tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from export.fuse import optimize_artifact
from export.stream import export_streamed
from tests.test_fuse import _feeds, _session
from trace_rt.engine import GenerationConfig
from trace_rt.errors import InputError
from trace_rt.graphs import MANIFEST_FILE
from trace_rt.pipeline import Pipeline
from trace_rt.variants import TEXT_HEAD_INPUT


@pytest.fixture(scope="module")
def streamed(tiny_ckpts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fuse_nbits") / "a"
    export_streamed(tiny_ckpts[2], out, decoders=("int4", "int8"), progress=False)
    optimize_artifact(out, (4, 8))
    return out


def _count(path: Path, op: str) -> int:
    return sum(n.op_type == op for n in onnx.load(str(path), load_external_data=False).graph.node)


def test_recorded_packed_and_gated(streamed):
    manifest = json.loads((streamed / MANIFEST_FILE).read_text())
    variants = manifest["variants"]["decoder"]
    layers = json.loads((streamed / "config.json").read_text())["num_hidden_layers"]
    for b in (4, 8):
        rec, src = variants[f"fused-int{b}"], variants[f"int{b}"]
        assert rec["form"] == "fused" and rec["bits"] == b and rec["block_size"] == 32
        assert rec["source"]["file"] == f"decoder.int{b}.onnx"
        assert rec["extra_inputs"] == [{"name": TEXT_HEAD_INPUT, "dtype": "bool", "shape": []}]
        assert rec["weights"] == src["weights"]  # the source's quantisation, unchanged
        assert len(rec["packed"]) == 2 * layers  # q/k/v and gate/up per layer
        fused, plain = streamed / rec["file"], streamed / src["file"]
        # 7 MatMulNBits per layer become 4; lm_head (fp32) sits in the If's branch.
        assert _count(plain, "MatMulNBits") == 7 * layers
        assert _count(fused, "MatMulNBits") == 4 * layers
        assert _count(fused, "If") == 1


@pytest.mark.parametrize("bits", [4, 8])
def test_logits_and_kv_equal_the_source(streamed, bits):
    feeds = _feeds(streamed)
    plain = _session(streamed / f"decoder.int{bits}.onnx")
    names = [o.name for o in plain.get_outputs()]
    want = dict(zip(names, plain.run(names, feeds), strict=True))
    fused = _session(streamed / f"decoder.fused.int{bits}.onnx")
    outs = fused.run(names, {**feeds, TEXT_HEAD_INPUT: np.array(True)})
    got = dict(zip(names, outs, strict=True))
    for n in names:
        err = float(np.abs(got[n] - want[n]).max() / max(np.abs(want[n]).max(), 1e-6))
        assert err <= 1e-5, f"{n}: rel. error {err:.2e}"


@pytest.mark.parametrize("task", ["dvc", "mr"])
def test_greedy_tokens_equal(streamed, clip_video, task):
    gen = GenerationConfig(max_new_tokens=32)
    query = None if task == "dvc" else "a red circle moves left"
    runs = {}
    for variant in ("int4", "fused-int4"):
        pipe = Pipeline.from_dir(
            streamed, "onnxruntime", cache_dir=False, decoder_variant=variant, exact_variant=True
        )
        runs[variant] = pipe.run(clip_video, task, query=query, frames=6, gen=gen)["token_ids"]
    assert len(runs["int4"]) > 4
    assert runs["fused-int4"] == runs["int4"]


def test_refusals_name_the_problem(streamed):
    with pytest.raises(InputError, match="no float decoder"):
        optimize_artifact(streamed, (None,))
    with pytest.raises(InputError, match="without --contrib"):
        optimize_artifact(streamed, (4,), forms=("contrib",))
    with pytest.raises(InputError, match="lm-head fp32, not int4"):
        optimize_artifact(streamed, (4,), lm_head=True)
    with pytest.raises(InputError, match="block-size 32, not 64"):
        optimize_artifact(streamed, (4,), block_size=64)


def test_default_becomes_the_fused_form(streamed, tmp_path):
    """The streamed artifact's default (its first quantised decoder, ``int4``) becomes that
    precision's fused form; no float default is invented (there is no decoder.onnx)."""
    import shutil

    from export.decode_timing import record_default
    from trace_rt.variants import resolve_variant

    art = tmp_path / "a"
    shutil.copytree(streamed, art)
    chosen, timing = record_default(art, measure=False)
    assert timing == {} and chosen == {
        "decoder": "fused-int4",
        "int4": "fused-int4",
        "int8": "fused-int8",
    }
    manifest = json.loads((art / MANIFEST_FILE).read_text())
    assert resolve_variant(manifest, "onnxruntime") == "fused-int4"
    assert resolve_variant(manifest, "onnxruntime", "int8") == "fused-int8"


def test_cli_asks_for_the_quantised_decoders(streamed):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "export", "optimize", str(streamed), "--no-measure"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "no float decoder" in proc.stderr and "--int4 and/or --int8" in proc.stderr
