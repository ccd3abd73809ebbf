"""`python -m export atc` on `tiny`: static variants vs the dynamic graphs, script, manifest.

ATC itself is not run (no CANN toolkit here); these tests check everything up to the
`atc` command lines: that the variants compute what the artifact's dynamic graphs compute
(onnxruntime, fp32), that they are fully static (or symbolic exactly in the gear dim),
and that convert.sh and manifest["atc"] describe them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from export.atc import SCRIPT, export_atc
from export.atc_runtime import AtcError, StaticDecoderRunner, decoder_roles
from export.onnx_export import export_onnx
from trace_rt.backends.onnxruntime_backend import OnnxRuntimeBackend
from trace_rt.errors import CheckpointError, InputError
from trace_rt.graphs import (
    BATCH_DIM,
    DECODER,
    MANIFEST_FILE,
    PROJECTOR,
    VISION_ENCODER,
    manifest_specs,
    sha256_file,
)

SOC = "Ascend910B3"
FRAMES, TEXT_BUDGET, MAX_SEQ = 3, 24, 120  # tiny: video block 42, prefill 66, 119 past slots
RTOL = 1e-5
ATC_OPS = Path(__file__).parents[1] / "export" / "atc_ops.txt"  # CANN 8.0 list


@pytest.fixture(scope="module")
def artifact(tiny_ckpt, tmp_path_factory) -> Path:
    return export_onnx(tiny_ckpt, tmp_path_factory.mktemp("atc") / "art", progress=False)


@pytest.fixture(scope="module")
def static(artifact, tiny_ckpt) -> Path:
    export_atc(
        artifact,
        checkpoint=tiny_ckpt,
        soc_version=SOC,
        frames=FRAMES,
        max_seq=MAX_SEQ,
        text_budget=TEXT_BUDGET,
    )
    return artifact


@pytest.fixture(scope="module")
def geared(artifact, tiny_ckpt, tmp_path_factory) -> Path:
    art = Path(shutil.copytree(artifact, tmp_path_factory.mktemp("atc-dyn") / "art"))
    shutil.rmtree(art / "atc", ignore_errors=True)
    export_atc(
        art,
        checkpoint=tiny_ckpt,
        soc_version="Ascend310P3",
        frames=FRAMES,
        max_seq=MAX_SEQ,
        text_budget=TEXT_BUDGET,
        dynamic_dims=True,
    )
    return art


def _manifest(art: Path) -> dict:
    return json.loads((art / MANIFEST_FILE).read_text())


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float64) - want).max() / np.abs(want).max())


def _dynamic_decoder(art: Path, embeds: np.ndarray, n_prompt: int) -> list[np.ndarray]:
    """The artifact's dynamic decoder, driven as the onnxruntime backend does: a prefill of
    n_prompt embeddings from an empty past, then one step per remaining embedding."""
    m = _manifest(art)
    roles = decoder_roles(manifest_specs(m)[DECODER])
    sess = _session(art / m["graphs"][DECODER]["file"])
    past_specs = [t for pair in roles.past for t in pair]
    new_names = [t.name for pair in roles.new for t in pair]

    def empty(spec):  # one sequence (batch 1), no past positions yet
        shape = [1 if d == BATCH_DIM else 0 if isinstance(d, str) else d for d in spec.shape]
        return np.zeros(shape, np.float32)

    past = [empty(t) for t in past_specs]
    logits, pos = [], 0
    for chunk in [embeds[:n_prompt], *(embeds[i : i + 1] for i in range(n_prompt, len(embeds)))]:
        feeds = {
            roles.embeds.name: chunk[None],
            roles.positions.name: np.arange(pos, pos + len(chunk), dtype=np.int64)[None],
        }
        feeds |= {t.name: p for t, p in zip(past_specs, past, strict=True)}
        outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))
        logits.append(outs[roles.logits.name][0])
        past = [
            np.concatenate([p, outs[n]], axis=roles.past_axis)
            for p, n in zip(past, new_names, strict=True)
        ]
        pos += len(chunk)
    return logits


def _runner(art: Path) -> StaticDecoderRunner:
    m = _manifest(art)
    v = m["atc"]["variants"]
    prefill, decode = v["decoder_prefill"], v["decoder_decode"]
    return StaticDecoderRunner(
        art / prefill["file"],
        art / decode["file"],
        decoder_roles(manifest_specs(m)[DECODER]),
        prefill["gears"] or [m["atc"]["prefill_len"]],
        decode["gears"] or [m["atc"]["past_capacity"]],
    )


def test_vision_and_projector_match_dynamic(static):
    m = _manifest(static)
    specs = manifest_specs(m)
    rng = np.random.default_rng(1)
    vis = specs[VISION_ENCODER].inputs[0]
    px = rng.standard_normal((FRAMES, *vis.shape[1:])).astype(np.float32)
    tid = rng.integers(0, 13, (FRAMES, 6)).astype(np.int64)
    results = {}
    for where in ("graphs", "atc"):
        recs = m["graphs"] if where == "graphs" else m["atc"]["variants"]
        files = {g: static / recs[g]["file"] for g in (VISION_ENCODER, PROJECTOR)}
        (feats,) = _session(files[VISION_ENCODER]).run(None, {vis.name: px})
        names = specs[PROJECTOR].input_names
        (video,) = _session(files[PROJECTOR]).run(None, dict(zip(names, [feats, tid], strict=True)))
        results[where] = (feats, video)
    for got, want in zip(results["atc"], results["graphs"], strict=True):
        assert got.shape == want.shape and _rel(got, want) <= RTOL


@pytest.mark.parametrize("art_name", ["static", "geared"])
@pytest.mark.parametrize("n_prompt", [50, 67])  # padded, and exactly fills the prefill (66 + 1)
def test_decoder_prefill_and_steps_match_dynamic(request, art_name, n_prompt):
    art = request.getfixturevalue(art_name)
    hidden = _manifest(art)["config"]["hidden_size"]
    rng = np.random.default_rng(n_prompt)
    embeds = rng.standard_normal((n_prompt + 4, hidden)).astype(np.float32)
    want = _dynamic_decoder(art, embeds, n_prompt)
    runner = _runner(art)
    got = [runner.prefill(embeds[:n_prompt])]
    got += [runner.step(e) for e in embeds[n_prompt:]]
    assert len(got) == len(want) == 5
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert _rel(g, w) <= RTOL, f"{art_name} call {i}: rel. error {_rel(g, w):.2e}"


@pytest.mark.parametrize("art_name", ["static", "geared"])
def test_decode_variant_up_to_capacity(request, art_name):
    # Run the cache full: the last step sits at position max_seq - 1 (and, geared, the
    # steps walk through every past gear).
    art = request.getfixturevalue(art_name)
    hidden = _manifest(art)["config"]["hidden_size"]
    embeds = np.random.default_rng(5).standard_normal((MAX_SEQ, hidden)).astype(np.float32)
    want = _dynamic_decoder(art, embeds, 60)
    runner = _runner(art)
    got = [runner.prefill(embeds[:60])] + [runner.step(e) for e in embeds[60:]]
    assert runner.pos == MAX_SEQ and len(got) == len(want)
    errors = [_rel(g, w) for g, w in zip(got, want, strict=True)]
    assert max(errors) <= RTOL, f"worst step {int(np.argmax(errors))}: {max(errors):.2e}"
    with pytest.raises(AtcError, match="past positions"):
        runner.step(embeds[0])


def test_static_variants_have_no_symbolic_dims(static):
    for name, rec in _manifest(static)["atc"]["variants"].items():
        g = onnx.load(str(static / rec["file"]), load_external_data=False).graph
        values = [*g.input, *g.output, *g.value_info]
        assert len(g.value_info) > 0, name  # shapes were inferred for the intermediates
        for vi in values:
            t = vi.type.tensor_type  # a known shape (scalars have no dims), every dim a value
            assert t.HasField("shape"), (name, vi.name)
            assert all(d.HasField("dim_value") for d in t.shape.dim), (name, vi.name)
        assert [i.name for i in g.input] == [t["name"] for t in rec["inputs"]]
        assert [o.name for o in g.output] == [t["name"] for t in rec["outputs"]]
        for vi, t in zip([*g.input, *g.output], rec["inputs"] + rec["outputs"], strict=True):
            assert [d.dim_value for d in vi.type.tensor_type.shape.dim] == t["shape"]


def test_geared_variants_keep_only_the_gear_dim(geared):
    v = _manifest(geared)["atc"]["variants"]
    assert not v["vision_encoder"]["gears"] and not v["projector"]["gears"]
    for name in ("decoder_prefill", "decoder_decode"):
        rec = v[name]
        assert 2 <= len(rec["gears"]) <= 100 and rec["gears"] == sorted(rec["gears"])
        g = onnx.load(str(geared / rec["file"])).graph
        sym = {d.dim_param for vi in g.input for d in vi.type.tensor_type.shape.dim if d.dim_param}
        assert sym == {rec["gear_dim"]}, name
        n_placeholders = rec["command"].split("--input_shape=")[1].split()[0].count("-1")
        gears = rec["command"].split('--dynamic_dims="')[1].split('"')[0].split(";")
        assert [int(x.split(",")[0]) for x in gears] == rec["gears"]
        assert all(len(x.split(",")) == n_placeholders for x in gears)
        assert "--input_format=ND" in rec["command"]


def test_convert_script(static, tmp_path):
    atc = _manifest(static)["atc"]
    script = static / atc["script"]
    text = script.read_text()
    assert os.access(script, os.X_OK) and text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text and "command -v atc" in text
    lines = [line for line in text.splitlines() if line.startswith("atc ")]
    # The manifest's keys are sorted; the script runs the graphs in pipeline order.
    assert sorted(lines) == sorted(v["command"] for v in atc["variants"].values())
    assert len(lines) == len(atc["variants"]) == 4
    for name, v in atc["variants"].items():
        (line,) = [x for x in lines if f"--output=om/{name} " in x]
        assert f"--soc_version={SOC}" in line and "--framework=5" in line
        assert f"--model={Path(v['file']).name}" in line and f"--output=om/{name}" in line
        assert "--precision_mode=" in line and "--input_shape=" in line
    # Without the CANN toolkit the script stops before doing anything, and says why.
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env)
    assert out.returncode == 127 and "'atc' is not on PATH" in out.stderr
    assert not (script.parent / "om").exists()


def test_manifest_records_atc(static):
    m = _manifest(static)
    atc = m["atc"]
    assert atc["soc_version"] == SOC and atc["frames"] == FRAMES and atc["max_seq"] == MAX_SEQ
    assert atc["prefill_len"] == FRAMES * 14 + TEXT_BUDGET and atc["past_capacity"] == MAX_SEQ - 1
    assert atc["converted"] is False
    assert set(atc["variants"]) == {
        "vision_encoder", "projector", "decoder_prefill", "decoder_decode",
    }  # fmt: skip
    for rec in atc["variants"].values():
        for rel, sha in rec["files"].items():
            assert sha256_file(static / rel) == sha
        assert rec["sha256"] == rec["files"][rec["file"]]
    # The artifact itself is unchanged: the runtime still loads and verifies it.
    OnnxRuntimeBackend(static, cache_dir=False)
    # The decode variant's inputs are the spec's inputs with fixed dims.
    dec = manifest_specs(m)[DECODER]
    assert [t["name"] for t in atc["variants"]["decoder_decode"]["inputs"]] == dec.input_names


def test_variant_ops(static, geared):
    """Every node of every variant is an ONNX op that CANN's ATC documents (atc_ops.txt)."""
    allowed = {
        line.strip()
        for line in ATC_OPS.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for art in (static, geared):
        for name, rec in _manifest(art)["atc"]["variants"].items():
            model = onnx.load(str(art / rec["file"]), load_external_data=False)
            assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}, name
            ops = {(n.domain or "ai.onnx", n.op_type) for n in model.graph.node}
            bad = sorted(f"{d}::{op}" for d, op in ops if d != "ai.onnx" or op not in allowed)
            assert not bad, f"{name}: {bad}"


def test_external_data(static, tiny_ckpt, tmp_path, monkeypatch):
    import export.atc as atc_mod

    art = Path(shutil.copytree(static, tmp_path / "art"))
    monkeypatch.setattr(atc_mod, "EXTERNAL_DATA_THRESHOLD", 0)  # force the >2 GB layout
    export_atc(art, checkpoint=tiny_ckpt, soc_version=SOC, frames=FRAMES, max_seq=MAX_SEQ,
               text_budget=TEXT_BUDGET)  # fmt: skip
    v = _manifest(art)["atc"]["variants"]
    assert all(len(rec["files"]) == 2 for rec in v.values())
    hidden = _manifest(art)["config"]["hidden_size"]
    embeds = np.random.default_rng(9).standard_normal((52, hidden)).astype(np.float32)
    want = _dynamic_decoder(art, embeds, 50)
    runner = _runner(art)
    got = [runner.prefill(embeds[:50]), runner.step(embeds[50]), runner.step(embeds[51])]
    assert all(_rel(g, w) <= RTOL for g, w in zip(got, want, strict=True))


def test_bad_options_and_wrong_checkpoint(artifact, tiny_ckpt, tiny_ckpts):
    with pytest.raises(InputError, match="soc-version"):
        export_atc(artifact, checkpoint=tiny_ckpt, soc_version="910B")
    with pytest.raises(InputError, match="max-seq"):
        export_atc(artifact, checkpoint=tiny_ckpt, soc_version=SOC, max_seq=10)
    with pytest.raises(CheckpointError, match="differs from the checkpoint"):
        export_atc(artifact, checkpoint=tiny_ckpts[1], soc_version=SOC)


def test_cli(static, tiny_ckpt, tmp_path):
    art = Path(shutil.copytree(static, tmp_path / "art"))
    cmd = [sys.executable, "-m", "export", "atc", str(art), "--checkpoint", str(tiny_ckpt)]
    cmd += ["--frames", "2", "--max-seq", "100", "--text-budget", "16"]
    out = subprocess.run([*cmd, "--soc-version", "Ascend310P3"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    atc = _manifest(art)["atc"]
    assert atc["soc_version"] == "Ascend310P3" and atc["prefill_len"] == 2 * 14 + 16
    assert "--soc_version=Ascend310P3" in (art / "atc" / SCRIPT).read_text()
    out = subprocess.run([*cmd, "--soc-version", "bogus"], capture_output=True, text=True)
    assert out.returncode == 2 and "soc-version" in out.stderr
