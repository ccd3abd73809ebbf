"""TensorRT export and backend.

CPU (always): optimisation profiles from the graph specs, the manifest's ``tensorrt``
section and its compatibility rules, and that nothing else needs tensorrt or CUDA.
GPU (``@pytest.mark.gpu``, skipped without one; also skipped without the ``tensorrt``
package): engines for ``tiny``, graph parity with PyTorch, tokens equal to torch and
onnxruntime, CUDA-graph replay equal to plain runs, a batched step's logits equal to
onnxruntime's. The pooled backend's batching through the CPU stand-in:
tests/test_tensorrt_batch.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from export.trt import Limits, Profile, profiles_from_spec
from trace_rt.backends import tensorrt_manifest as tm
from trace_rt.errors import CheckpointError
from trace_rt.graphs import (
    DECODER,
    GRAPH_NAMES,
    MANIFEST_FILE,
    PROJECTOR,
    VISION_ENCODER,
    GraphSpec,
    TensorSpec,
    graph_specs,
)
from training.presets import load_preset

QUERY = "a red circle moves left"
# fp16 engines vs the fp32 PyTorch stages (same bounds as the fp16 ONNX graphs).
RTOL_FP16 = {VISION_ENCODER: 5e-3, PROJECTOR: 5e-3, DECODER: 2e-2}


# ---- profiles ------------------------------------------------------------------------
def _check_profile(spec: GraphSpec, prof: Profile, ranges: dict[str, tuple[int, int, int]]):
    """Every input has min <= opt <= max, static dims as in the spec, symbolic from ranges."""
    assert list(prof.shapes) == spec.input_names
    for t in spec.inputs:
        lo, opt, hi = prof.shapes[t.name]
        for axis, d in enumerate(t.shape):
            want = ranges[d] if isinstance(d, str) else (d, d, d)
            assert (lo[axis], opt[axis], hi[axis]) == want, (t.name, axis)


def test_profiles_tiny():
    cfg = load_preset("tiny")
    specs = graph_specs(cfg, "fp32")
    limits = Limits(max_frames=8, max_seq=256, tokens_per_frame=cfg.tokens_per_frame)
    for name in (VISION_ENCODER, PROJECTOR):
        (prof,) = profiles_from_spec(specs[name], limits)
        assert prof.name == "default"
        _check_profile(specs[name], prof, limits.ranges("default"))
        lo, opt, hi = prof.shapes[specs[name].inputs[0].name]
        assert (lo[0], opt[0], hi[0]) == (1, 4, 8)  # frames: 1 / N/2 / N
    prefill, decode = profiles_from_spec(specs[DECODER], limits)
    assert (prefill.name, decode.name) == ("prefill", "decode")
    _check_profile(specs[DECODER], prefill, limits.ranges("prefill"))
    _check_profile(specs[DECODER], decode, limits.ranges("decode"))
    assert limits.ranges("decode")["seq"] == (1, 1, 1)
    assert limits.ranges("prefill")["past"] == (0, 0, 255)
    assert limits.ranges("decode")["past"] == (0, 128, 255)
    # opt prefill = the video block of N/2 frames + a short prompt
    assert limits.ranges("prefill")["seq"] == (1, 4 * cfg.tokens_per_frame + 161, 256)
    # Batching: a third profile; prefill and the one-row decode stay at batch 1.
    batched = Limits(max_frames=8, max_seq=256, tokens_per_frame=cfg.tokens_per_frame, max_batch=4)
    profiles = profiles_from_spec(specs[DECODER], batched)
    assert [p.name for p in profiles] == ["prefill", "decode", "decode_batch"]
    for p in profiles:
        _check_profile(specs[DECODER], p, batched.ranges(p.name))
    assert [batched.ranges(p.name)["batch"] for p in profiles] == [(1, 1, 1), (1, 1, 1), (1, 4, 4)]
    kv = (cfg.num_key_value_heads, cfg.attn_head_dim)
    assert profiles[2].shapes["past_key.0"][2] == (255, 4, *kv)  # [past, batch, kv, hd]


def test_profiles_7b():
    cfg = load_preset("trace-7b")
    specs = graph_specs(cfg, "fp16")
    limits = Limits(max_frames=128, max_seq=4096, tokens_per_frame=cfg.tokens_per_frame)
    (vis,) = profiles_from_spec(specs[VISION_ENCODER], limits)
    assert vis.shapes["pixel_values"] == ((1, 3, 336, 336), (64, 3, 336, 336), (128, 3, 336, 336))
    profiles = profiles_from_spec(specs[DECODER], limits)
    assert [p.name for p in profiles] == ["prefill", "decode"]
    for p, phase in zip(profiles, ("prefill", "decode"), strict=True):
        _check_profile(specs[DECODER], p, limits.ranges(phase))
        assert len(p.shapes) == 2 + 2 * cfg.num_hidden_layers
    # KV inputs: the cache can hold max_seq positions, so past <= max_seq - 1
    kv = [t for t in specs[DECODER].inputs if t.name.startswith("past_")]
    axis = next(i for i, d in enumerate(kv[0].shape) if d == "past")
    assert profiles[1].shapes[kv[0].name][2][axis] == 4095
    assert profiles[0].to_dict()["shapes"]["inputs_embeds"] == {
        "min": [1, 1, 4096], "opt": [1, 64 * 14 + 161, 4096], "max": [1, 4096, 4096],
    }  # fmt: skip


def test_profiles_unknown_dim():
    spec = GraphSpec("g", "g.onnx", (TensorSpec("x", "float32", ("tokens", 3)),), ())
    with pytest.raises(ValueError, match="tokens"):
        profiles_from_spec(spec, Limits())


# ---- manifest section ----------------------------------------------------------------
GPU = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}


def _fake_artifact(root: Path) -> dict:
    """A manifest plus fake engine files and the section `export trt` would write."""
    root.mkdir()
    (root / MANIFEST_FILE).write_text(json.dumps({"format": "x", "files": {}, "graphs": {}}))
    (root / tm.ENGINE_DIR).mkdir()
    cfg = load_preset("tiny")
    specs = graph_specs(cfg, "fp16")
    limits = Limits(8, 256, cfg.tokens_per_frame)
    engines = {}
    for i, name in enumerate(GRAPH_NAMES):
        rel = f"{tm.ENGINE_DIR}/{name}.fp16.engine"
        (root / rel).write_bytes(bytes([i]) * (100 + i))
        engines[name] = {
            "file": rel,
            "bytes": 100 + i,
            "sha256": tm.sha256_file(root / rel),
            "onnx": f"{name}.onnx",
            "strongly_typed": True,
            "flags": [],
            "variant": None,
            "profiles": [p.to_dict() for p in profiles_from_spec(specs[name], limits)],
            "build_s": 1.0,
        }
    return {
        "format": tm.FORMAT,
        "version": "10.9.0.34",
        "gpu": GPU,
        "precision": "fp16",
        "limits": {"max_frames": 8, "max_seq": 256},
        "engines": engines,
    }


def test_manifest_section_round_trip(tmp_path):
    root = tmp_path / "a"
    section = _fake_artifact(root)
    with pytest.raises(CheckpointError, match="python -m export trt"):
        tm.read_section(json.loads((root / MANIFEST_FILE).read_text()), root)
    tm.write_section(root, section)
    manifest = json.loads((root / MANIFEST_FILE).read_text())
    assert manifest["format"] == "x"  # the rest of the manifest is kept
    back = tm.read_section(manifest, root)
    assert back == section
    tm.verify_engines(back, root)
    dec = back["engines"][DECODER]
    assert tm.profile_index(dec, "decode") == 1
    assert tm.profile_max(dec, 0, "inputs_embeds") == [1, 256, 64]

    tm.check_compatible(back, "10.9.0.34", GPU)
    with pytest.raises(CheckpointError, match=r"TensorRT 10\.9\.0\.34.*TensorRT 10\.13"):
        tm.check_compatible(back, "10.13.0.35", GPU)
    with pytest.raises(CheckpointError, match=r"compute capability 9\.0.*8\.9"):
        tm.check_compatible(back, "10.9.0.34", {"name": "NVIDIA L40S", "compute_capability": "8.9"})
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        pcie = {"name": "NVIDIA H100 PCIe", "compute_capability": "9.0"}
        tm.check_compatible(back, "10.9.0.34", pcie)
    assert any("H100 PCIe" in str(x.message) for x in w)

    (root / dec["file"]).write_bytes(b"\x07" * dec["bytes"])  # same size, other content
    tm.verify_engines(back, root, verify="size")
    with pytest.raises(CheckpointError, match="sha256"):
        tm.verify_engines(back, root)
    (root / dec["file"]).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        tm.verify_engines(back, root)


def test_onnxruntime_ignores_engines(tiny_ckpt, tmp_path):
    # A tensorrt section (engines not in manifest["files"]) must not change what the
    # onnxruntime backend loads or hashes.
    from export import export_onnx
    from trace_rt.backends.onnxruntime_backend import OnnxRuntimeBackend

    art = export_onnx(tiny_ckpt, tmp_path / "art", progress=False)
    section = _fake_artifact(tmp_path / "fake")
    for rec in section["engines"].values():
        (art / tm.ENGINE_DIR).mkdir(exist_ok=True)
        (art / rec["file"]).write_bytes((tmp_path / "fake" / rec["file"]).read_bytes())
    tm.write_section(art, section)
    OnnxRuntimeBackend(art, cache_dir=False)


# ---- no tensorrt / no CUDA -------------------------------------------------------------
BLOCK = "import sys; sys.modules['tensorrt'] = None; sys.modules['cuda'] = None\n"


def _py(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + code], capture_output=True, text=True)


def test_runtime_imports_without_tensorrt():
    out = _py(
        "import trace_rt, trace_rt.backends, trace_rt.cli, trace_rt.pipeline\n"
        "import trace_rt.backends.tensorrt_manifest, export.trt\n"
        "from trace_rt.backends import BACKENDS\n"
        "assert 'tensorrt' in BACKENDS\n"
        "bad = [m for m in ('tensorrt', 'cuda', 'cuda.bindings') if sys.modules.get(m)]\n"
        "print(bad)"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"]])
def test_cli_help_without_tensorrt(argv):
    out = _py(f"sys.argv = ['trace-rt', *{argv!r}]\nfrom trace_rt.cli import main\nmain()")
    assert out.returncode == 0, out.stderr
    assert "usage: trace-rt" in out.stdout
    if argv == ["run", "--help"]:
        assert "tensorrt" in out.stdout  # listed as a --backend choice


def test_backend_names_missing_tensorrt():
    out = _py("import trace_rt.backends.tensorrt_backend")
    assert out.returncode != 0
    assert "ImportError" in out.stderr and "`tensorrt` package" in out.stderr
    out = _py("from trace_rt.backends import load_backend\nload_backend('tensorrt', '.')")
    assert "`tensorrt` package" in out.stderr


def test_backend_names_missing_cuda_python():
    # tensorrt present (a stand-in module), cuda-python absent: the error names cuda-python.
    code = "import types\nsys.modules['tensorrt'] = types.ModuleType('tensorrt')\n"
    out = _py(code + "import trace_rt.backends.tensorrt_backend")
    assert out.returncode != 0
    assert "`cuda-python` package" in out.stderr


def test_export_trt_names_missing_tensorrt(tiny_ckpt, tmp_path):
    from export import export_onnx

    art = export_onnx(tiny_ckpt, tmp_path / "art", progress=False)
    out = _py(f"from export.cli import main\nsys.exit(main(['trt', {str(art)!r}]))")
    assert out.returncode == 2
    assert "needs the `tensorrt` package" in out.stderr


# ---- the backend's bookkeeping on CPU (tests/fake_tensorrt.py) ----------------------------
@pytest.fixture(scope="module")
def fake_art(tiny_ckpt, tmp_path_factory) -> Path:
    from export import export_onnx
    from tests.fake_tensorrt import fake_engines

    art = export_onnx(tiny_ckpt, tmp_path_factory.mktemp("fake") / "art", progress=False)
    fake_engines(art, max_frames=8, max_seq=512)
    return art


@pytest.fixture
def fake_trt(monkeypatch):
    """tensorrt and cuda-python replaced by the CPU fakes while the test runs."""
    from tests.fake_tensorrt import install, uninstall

    yield install(monkeypatch)
    uninstall()


def test_decoder_only_backend(fake_trt, fake_art):
    # A Triton pipeline with tensorrt_plan encoders loads the decoder engine alone and
    # prefills from the video block the encoder models computed (a host array).
    from trace_rt.backends.onnxruntime_backend import OnnxRuntimeBackend
    from trace_rt.backends.tensorrt_backend import TensorRTBackend
    from trace_rt.tokens import Head

    full = TensorRTBackend(fake_art, device="cuda")
    lean = TensorRTBackend(fake_art, device="cuda", video_graphs=False)
    assert set(lean.engines) == {"decoder"}
    rng = np.random.default_rng(0)
    cfg = full.config
    px = rng.standard_normal((3, 3, cfg.vision.image_size, cfg.vision.image_size), np.float32)
    tid = np.tile(np.array([[3, 3, 3, 3, 12, 3]], np.int64), (3, 1))
    video = OnnxRuntimeBackend(fake_art, cache_dir=False).encode_video(px, tid)
    ids = [1, 733, -201, 28705, 32000]
    np.testing.assert_allclose(
        lean.prefill(ids, video, Head.TIME),
        full.prefill(ids, full.encode_video(px, tid), Head.TIME),
        rtol=1e-5, atol=1e-5,
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="video_graphs=False"):
        lean.encode_video(px, tid)


def test_fake_build_then_run(fake_trt, tiny_ckpt, tmp_path, clip_video):
    # build_engines end to end against the stand-in builder (which checks every profile
    # against the parsed network's inputs), then the backend on what it wrote.
    import tensorrt

    from export import export_onnx
    from export.trt import TensorRTBuildError, build_engines
    from trace_rt.generate import GenerationConfig
    from trace_rt.pipeline import Pipeline

    art = export_onnx(tiny_ckpt, tmp_path / "art", progress=False)
    section = build_engines(art, max_seq=512, progress=False)
    # tiny's num_frames; the default batch (export/trt.py DEFAULT_MAX_BATCH)
    assert section["limits"] == {"max_frames": 8, "max_seq": 512, "max_batch": 8}
    names = [p["name"] for p in section["engines"][DECODER]["profiles"]]
    assert names == ["prefill", "decode", "decode_batch"]
    assert section["precision"] == "fp32" and section["gpu"]["name"] == "Fake GPU"
    built = tensorrt.Builder.built
    assert len(built) == 3 and all("TF32" not in b["flags"] and b["network_flags"] for b in built)
    cache = art / section["timing_cache"]
    assert cache.read_bytes() == b"+++"  # one cache, passed from build to build
    again = build_engines(art, max_seq=512, graphs=["decoder"], progress=False)
    assert cache.read_bytes() == b"++++"  # reused, not restarted
    assert again["engines"]["vision_encoder"] == section["engines"]["vision_encoder"]

    gen = GenerationConfig(max_new_tokens=16)
    got = Pipeline.from_dir(art, "tensorrt", device="cuda").run(
        clip_video, "mr", query=QUERY, gen=gen
    )
    want = Pipeline.from_dir(art, "onnxruntime", cache_dir=False).run(
        clip_video, "mr", query=QUERY, gen=gen
    )
    assert got["token_ids"] == want["token_ids"]

    # fp16 on an fp32 export: TensorRT 10's weak typing; TensorRT 11 has none.
    weak = build_engines(art, precision="fp16", max_seq=512, progress=False)
    assert weak["engines"]["decoder"]["flags"] == ["FP16"]
    assert not weak["engines"]["decoder"]["strongly_typed"]
    del tensorrt.BuilderFlag.FP16
    with pytest.raises(TensorRTBuildError, match="weak typing"):
        build_engines(art, precision="fp16", max_seq=512, progress=False)
    with pytest.raises(TensorRTBuildError, match="export quantize"):
        build_engines(art, precision="int8", max_seq=512, progress=False)
    with pytest.raises(TensorRTBuildError, match=r"export quantize .* --fp8"):
        build_engines(art, precision="fp8", max_seq=512, progress=False)
    # --fp8 builds the decoder from the fp8 QDQ variant; the other graphs stay fp32.
    from export.quantize import quantize_artifact

    quantize_artifact(art, "fp8")
    fp8 = build_engines(art, precision="fp8", max_seq=512, progress=False)
    dec = fp8["engines"]["decoder"]
    assert (dec["onnx"], dec["variant"]) == ("decoder.fp8.qdq.onnx", "fp8-qdq")
    assert dec["strongly_typed"] and dec["file"].endswith("decoder.fp8-qdq.engine")
    assert fp8["engines"]["projector"]["onnx"] == "projector.onnx"
    got = Pipeline.from_dir(art, "tensorrt", device="cuda").run(
        clip_video, "mr", query=QUERY, gen=gen
    )
    want = Pipeline.from_dir(art, "onnxruntime", cache_dir=False, decoder_variant="fp8-qdq")
    assert got["token_ids"] == want.run(clip_video, "mr", query=QUERY, gen=gen)["token_ids"]
    with pytest.raises(TensorRTBuildError, match="exceeds the model's context"):
        build_engines(art, max_seq=10**6, progress=False)


def test_fake_backend_matches_onnxruntime(fake_trt, fake_art, clip_video):
    from trace_rt.backends import load_backend
    from trace_rt.generate import GenerationConfig
    from trace_rt.pipeline import Pipeline
    from trace_rt.tokens import Head

    # Same graph, same inputs: the logits must be identical, so any mis-bound buffer,
    # wrong KV slot or stale prefix shows up exactly.
    trt_b = load_backend("tensorrt", fake_art, device="cuda", cuda_graphs=0)
    ort_b = load_backend("onnxruntime", fake_art, cache_dir=False)
    c = trt_b.config
    px = np.random.default_rng(0).standard_normal((3, 3, *[c.vision.image_size] * 2), np.float32)
    tid = np.full((3, 6), 4, np.int64)
    video = trt_b.encode_video(px, tid)
    np.testing.assert_array_equal(trt_b.video_to_host(video), ort_b.encode_video(px, tid))
    prompt = [1, 733, -201, 28705, 13]
    ort_video = ort_b.encode_video(px, tid)
    np.testing.assert_array_equal(
        trt_b.prefill(prompt, video, Head.TEXT), ort_b.prefill(prompt, ort_video, Head.TEXT)
    )
    for token, head in [(32005, Head.TIME), (1234, Head.SCORE), (32016, Head.TEXT)]:
        np.testing.assert_array_equal(
            trt_b.decode_step(token, head), ort_b.decode_step(token, head)
        )

    pipes = {
        b: Pipeline.from_dir(fake_art, b, **opts)
        for b, opts in [("tensorrt", {"device": "cuda"}), ("onnxruntime", {"cache_dir": False})]
    }
    gens = [
        GenerationConfig(max_new_tokens=24),
        GenerationConfig(max_new_tokens=24, temperature=1.0, seed=3),
        # Frame-aligned timestamps through the TensorRT backend's buffers (the grammar is
        # the shared loop's; onnxruntime's outputs are checked against the frames in
        # test_frame_timestamps.py).
        GenerationConfig(max_new_tokens=24, timestamps="frames"),
        GenerationConfig(max_new_tokens=24, temperature=1.0, seed=3, timestamps="frames"),
    ]
    for task in ("dvc", "mr"):
        query = None if task == "dvc" else QUERY
        for gen in gens:
            got = pipes["tensorrt"].run(clip_video, task, query=query, gen=gen)
            want = pipes["onnxruntime"].run(clip_video, task, query=query, gen=gen)
            assert got["token_ids"] == want["token_ids"], (task, gen)


def test_fake_backend_cuda_graphs(fake_trt, fake_art, clip_video):
    from trace_rt.generate import GenerationConfig
    from trace_rt.pipeline import Pipeline

    gen = GenerationConfig(max_new_tokens=16)
    plain = Pipeline.from_dir(fake_art, "tensorrt", device="cuda", cuda_graphs=0)
    want = plain.run(clip_video, "dvc", gen=gen)["token_ids"]
    graphs = Pipeline.from_dir(fake_art, "tensorrt", device="cuda", cuda_graphs=8)
    got = [graphs.run(clip_video, "dvc", gen=gen)["token_ids"] for _ in range(3)]
    assert got == [want] * 3
    # Run 1 sees each past length, run 2 captures the first 8 (the cap), run 3 replays them.
    assert len(graphs.backend.past_graphs.graphs) == 8 and fake_trt.launches == 8
    graphs.backend.clear_cuda_graphs()
    assert graphs.run(clip_video, "dvc", gen=gen)["token_ids"] == want


def test_fake_backend_errors(fake_trt, fake_art, tmp_path):
    import shutil

    from trace_rt.backends import load_backend
    from trace_rt.errors import InputError, PromptTooLongError
    from trace_rt.tokens import Head

    with pytest.raises(InputError, match="--device cuda"):
        load_backend("tensorrt", fake_art, device="cpu")
    b = load_backend("tensorrt", fake_art, device="cuda", verify="size")
    c = b.config
    with pytest.raises(InputError, match="--max-frames"):
        b.encode_video(np.zeros((9, 3, *[c.vision.image_size] * 2), np.float32), np.zeros((9, 6)))
    with pytest.raises(PromptTooLongError, match="--max-seq 512"):
        b.prefill([1] * 400 + [-201], np.zeros((200, c.hidden_size), np.float32), Head.TEXT)

    art = Path(shutil.copytree(fake_art, tmp_path / "v"))
    manifest = json.loads((art / MANIFEST_FILE).read_text())
    manifest["tensorrt"]["version"] = "10.0.0"
    (art / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"built with TensorRT 10\.0\.0"):
        load_backend("tensorrt", art, device="cuda")
    del manifest["tensorrt"]
    (art / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="export trt"):
        load_backend("tensorrt", art, device="cuda")
    # A decoder engine without the decode profile is refused, not run with profile 0.
    manifest = json.loads((fake_art / MANIFEST_FILE).read_text())
    manifest["tensorrt"]["engines"][DECODER]["profiles"][1]["name"] = "step"
    (art / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"no profile 'decode' \(\['prefill', 'step'\]\)"):
        load_backend("tensorrt", art, device="cuda")


# ---- GPU -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trt_artifacts(tiny_ckpt, tmp_path_factory) -> dict[str, Path]:
    pytest.importorskip("tensorrt")
    pytest.importorskip("cuda")
    from export import export_onnx
    from export.trt import build_engines

    root = tmp_path_factory.mktemp("trt")
    arts = {}
    for dt in ("fp32", "fp16"):
        art = export_onnx(tiny_ckpt, root / dt, dtype=dt, progress=False)
        build_engines(art, max_frames=8, max_seq=256, progress=False)
        arts[dt] = art
    return arts


@pytest.mark.gpu
def test_engine_build_tiny(trt_artifacts):
    art = trt_artifacts["fp32"]
    manifest = json.loads((art / MANIFEST_FILE).read_text())
    section = tm.read_section(manifest, art)
    tm.verify_engines(section, art)
    assert section["precision"] == "fp32"
    assert section["limits"] == {"max_frames": 8, "max_seq": 256, "max_batch": 8}
    profiles = [p["name"] for p in section["engines"][DECODER]["profiles"]]
    assert profiles == ["prefill", "decode", "decode_batch"]
    cache = art / section["timing_cache"]
    size = cache.stat().st_size
    from export.trt import build_engines

    again = build_engines(art, max_frames=8, max_seq=256, progress=False)  # reuses the cache
    assert again["timing_cache"] == section["timing_cache"] and cache.stat().st_size >= size


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float64) - want).max() / np.abs(want).max())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_graph_parity_vs_torch(trt_artifacts, tiny_ckpt, dtype):
    import torch

    from trace_rt.backends.tensorrt_backend import TensorRTBackend
    from trace_rt.model import load_model
    from trace_rt.tokens import Head

    model = load_model(tiny_ckpt, dtype="fp32")
    backend = TensorRTBackend(trt_artifacts[dtype])
    cfg = model.config
    g = torch.Generator().manual_seed(7)
    px = torch.randn(3, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    tid = torch.randint(0, cfg.time_vocab_size, (3, 6), generator=g)
    with torch.no_grad():
        want_video = model.project(model.encode_frames(px), tid).numpy()
        got_video = backend.video_to_host(backend.encode_video(px.numpy(), tid.numpy()))
        x = torch.randn(1, 9, cfg.hidden_size, generator=g)
        model.setup_caches(32)
        want = [model.all_logits(model.prefill(x))]
        got = [backend.prefill([-201], x[0].numpy(), Head.TEXT)]
        for step, token in enumerate([32005, 1234]):
            hidden = model.decode_step(torch.tensor([[token]]), torch.tensor([9 + step]))
            want.append(model.all_logits(hidden))
            got.append(backend.decode_step(token, Head.TEXT))
    text = cfg.ids.text_vocab + 1
    bounds = {"fp32": {PROJECTOR: 1e-4, DECODER: 1e-4}, "fp16": RTOL_FP16}[dtype]
    assert _rel(got_video, want_video) <= bounds[PROJECTOR]
    assert _rel(np.stack(got), torch.cat(want)[:, :text].numpy()) <= bounds[DECODER]


@pytest.mark.gpu
def test_tokens_equal_torch_and_onnxruntime(trt_artifacts, tiny_ckpt, clip_video):
    from trace_rt.generate import GenerationConfig
    from trace_rt.pipeline import Pipeline

    pipes = {
        "tensorrt": Pipeline.from_dir(trt_artifacts["fp32"], "tensorrt", device="cuda"),
        "onnxruntime": Pipeline.from_dir(trt_artifacts["fp32"], "onnxruntime", cache_dir=False),
        "torch": Pipeline.from_dir(tiny_ckpt, "torch"),
    }
    gen = GenerationConfig(max_new_tokens=32)
    for task in ("dvc", "mr", "vhd"):
        query = None if task == "dvc" else QUERY
        ids = {
            k: p.run(clip_video, task, query=query, gen=gen)["token_ids"] for k, p in pipes.items()
        }
        assert ids["tensorrt"] == ids["torch"] == ids["onnxruntime"], task


@pytest.mark.gpu
def test_cuda_graph_replay_equals_plain_runs(trt_artifacts, clip_video):
    from trace_rt.generate import GenerationConfig
    from trace_rt.pipeline import Pipeline

    gen = GenerationConfig(max_new_tokens=24)
    plain = Pipeline.from_dir(trt_artifacts["fp16"], "tensorrt", device="cuda", cuda_graphs=0)
    graphs = Pipeline.from_dir(trt_artifacts["fp16"], "tensorrt", device="cuda", cuda_graphs=64)
    want = plain.run(clip_video, "dvc", gen=gen)["token_ids"]
    # Runs 1: seen, 2: captured, 3: replayed (same prompt length every time).
    for _ in range(3):
        assert graphs.run(clip_video, "dvc", gen=gen)["token_ids"] == want
    assert len(graphs.backend.past_graphs.graphs) > 0


@pytest.mark.gpu
def test_batch_step_logits_gpu(trt_artifacts):
    """A real decode_batch step (fp32 engines, max_batch 8 by default): each slot's logits
    against the pooled onnxruntime backend's, ragged lengths and a subset of slots."""
    from trace_rt.backends import load_backend
    from trace_rt.tokens import Head

    art = trt_artifacts["fp32"]
    trt_b = load_backend("tensorrt", art, device="cuda", max_sequences=3)
    ort_b = load_backend("onnxruntime", art, cache_dir=False, max_sequences=3)
    h = trt_b.config.hidden_size
    rng = np.random.default_rng(0)
    for slot, n in enumerate((9, 14, 5)):
        video = rng.standard_normal((n, h)).astype(np.float32)
        prompt = [1, 733, *([28705] * slot), -201, 13, 5]
        np.testing.assert_allclose(
            trt_b.prefill(prompt, video, Head.TEXT, slot=slot),
            ort_b.prefill(prompt, video, Head.TEXT, slot=slot),
            rtol=1e-4, atol=1e-4,
        )  # fmt: skip
    for slots in ([0, 1, 2], [2, 0], [1, 2, 0]):
        heads = [Head.TIME, Head.SCORE, Head.TEXT][: len(slots)]
        ids = [32005, 1234, 32016][: len(slots)]
        for got, want in zip(
            trt_b.decode(slots, ids, heads), ort_b.decode(slots, ids, heads), strict=True
        ):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# ---- the strict stand-in: TensorRT's and CUDA's rules, and the backend keeping them -------
def test_fake_enforces_tensorrt_rules(fake_trt, fake_art):
    # The rules themselves (tests/fake_tensorrt.py cites them): so a backend that breaks
    # one fails here on CPU, as it would on a GPU.
    import ctypes

    import tensorrt

    from tests.fake_tensorrt import ALIGN

    rt = tensorrt.Runtime(None)
    blob = (fake_art / "tensorrt" / "decoder.fake.engine").read_bytes()
    engine = rt.deserialize_cuda_engine(blob)
    ctx = engine.create_execution_context()
    _, ptr = fake_trt.cudaMalloc(4096)
    assert ptr % ALIGN == 0
    assert ctx.set_tensor_address("position_ids", ptr)
    assert not ctx.set_tensor_address("position_ids", ptr + 8)  # misaligned
    assert not ctx.set_tensor_address("no_such_tensor", ptr)
    hidden = engine.get_tensor_profile_shape("inputs_embeds", 0)[2][2]
    assert ctx.set_input_shape("inputs_embeds", (1, 5, hidden))
    assert not ctx.set_input_shape("inputs_embeds", (1, 513, hidden))  # past the profile
    assert not ctx.set_input_shape("inputs_embeds", (5, hidden))  # wrong rank
    assert ctx.set_optimization_profile_async(1, 0)  # decode: exactly one new position
    assert not ctx.set_input_shape("inputs_embeds", (1, 2, hidden))
    assert not ctx.set_optimization_profile_async(2, 0)
    assert not ctx.execute_async_v3(0)  # shapes and addresses missing
    # Copies are asynchronous: pinned host memory sees device data only after a sync.
    _, host = fake_trt.cudaMallocHost(8)
    ctypes.memmove(ptr, (ctypes.c_int64 * 1)(42), 8)
    fake_trt.cudaMemcpyAsync(host, ptr, 8, fake_trt.cudaMemcpyKind.cudaMemcpyDeviceToHost, 0)
    assert ctypes.c_int64.from_address(host).value == 0
    fake_trt.cudaStreamSynchronize(0)
    assert ctypes.c_int64.from_address(host).value == 42
    with pytest.raises(AssertionError, match="outside every allocation"):
        fake_trt.cudaMemcpyAsync(
            host, ptr + 4096, 8, fake_trt.cudaMemcpyKind.cudaMemcpyDeviceToHost, 0
        )


def test_fake_backend_alignment_and_streaming(fake_trt, fake_art):
    # tiny's K/V rows are 128 bytes: every other new-row slot is misaligned, so the backend
    # must stage them; positions go through an aligned buffer; engines are streamed.
    import tensorrt

    from trace_rt.backends.onnxruntime_backend import OnnxRuntimeBackend
    from trace_rt.backends.tensorrt_backend import TensorRTBackend, _set_address
    from trace_rt.tokens import Head

    b = TensorRTBackend(fake_art, device="cuda", cuda_graphs=0)
    assert tensorrt.Runtime.loaded == ["stream"] * 3  # never the whole file as bytes
    assert b.kv.row_bytes % 256 and b.kv.stage is not None
    assert [b.kv.staged(p) for p in range(4)] == [False, True, False, True]
    ref = OnnxRuntimeBackend(fake_art, cache_dir=False)
    video = np.random.default_rng(1).standard_normal((30, b.config.hidden_size), np.float32)
    prompt = [1, 733, -201, 28705]
    np.testing.assert_array_equal(
        b.prefill(prompt, video, Head.TEXT), ref.prefill(prompt, video, Head.TEXT)
    )
    for token in (5, 6, 7, 8, 9):  # odd and even past lengths: staged and direct rows
        np.testing.assert_array_equal(
            b.decode_step(token, Head.TEXT), ref.decode_step(token, Head.TEXT)
        )
    ctx = b._contexts["decoder.decode"]
    with pytest.raises(RuntimeError, match=r"'position_ids'.*not 256-byte aligned"):
        _set_address(ctx, "position_ids", b._buffers["position_ids"].ptr + 8)


def test_fake_backend_refused_shape(fake_trt, fake_art, tmp_path):
    # An engine whose profile admits less than the manifest's limits: the refused
    # set_input_shape is an error naming the input, not a silent run with the old shape.
    import shutil

    from trace_rt.backends.tensorrt_backend import TensorRTBackend
    from trace_rt.errors import InputError
    from trace_rt.tokens import Head

    art = Path(shutil.copytree(fake_art, tmp_path / "narrow"))
    manifest = json.loads((art / MANIFEST_FILE).read_text())
    rec = manifest["tensorrt"]["engines"][DECODER]
    blob = json.loads((art / rec["file"]).read_text())
    for shapes in blob["profiles"][0]["shapes"].values():
        shapes["max"] = [min(d, 40) if i == 1 else d for i, d in enumerate(shapes["max"])]
    (art / rec["file"]).write_text(json.dumps(blob))
    rec["bytes"] = (art / rec["file"]).stat().st_size
    (art / MANIFEST_FILE).write_text(json.dumps(manifest))
    b = TensorRTBackend(art, device="cuda", verify="size")
    video = np.zeros((60, b.config.hidden_size), np.float32)
    with pytest.raises(InputError, match=r"refused shape \[1, 61, \d+\] for decoder input"):
        b.prefill([1, -201], video, Head.TEXT)


@pytest.mark.parametrize("failure", ["fail_capture", "fail_instantiate"])
def test_fake_backend_failed_capture(fake_trt, fake_art, clip_video, failure):
    # A failed capture releases its graph and clears CUDA's error state (else TensorRT's
    # next enqueue fails), warns once, and decoding goes on without graphs, same tokens.
    from trace_rt.generate import GenerationConfig
    from trace_rt.pipeline import Pipeline

    gen = GenerationConfig(max_new_tokens=12)
    want = Pipeline.from_dir(fake_art, "tensorrt", device="cuda", cuda_graphs=0).run(
        clip_video, "dvc", gen=gen
    )["token_ids"]
    pipe = Pipeline.from_dir(fake_art, "tensorrt", device="cuda", cuda_graphs=8)
    assert pipe.run(clip_video, "dvc", gen=gen)["token_ids"] == want  # sees each length
    setattr(fake_trt, failure, True)
    with pytest.warns(UserWarning, match="CUDA graph capture failed"):
        got = pipe.run(clip_video, "dvc", gen=gen)["token_ids"]
    assert got == want
    assert fake_trt.live_graphs == set() and fake_trt.last_error == 0
    assert pipe.backend.past_graphs.capacity == 0 and not pipe.backend.past_graphs.graphs
    assert pipe.run(clip_video, "dvc", gen=gen)["token_ids"] == want


def test_fake_backend_tensorrt_version(monkeypatch, fake_art):
    # Any TensorRT >= 10.3 is accepted (JetPack 6.1's), older ones are refused by name.
    from tests.fake_tensorrt import install, uninstall

    install(monkeypatch, version="10.2.0.19")
    from trace_rt.backends.tensorrt_backend import TensorRTBackend

    with pytest.raises(CheckpointError, match=r"TensorRT 10\.2\.0\.19 is too old.*>= 10\.3"):
        TensorRTBackend(fake_art, device="cuda", verify="size")
    uninstall()
    tm.check_tensorrt_version("10.3.0.30")
    tm.check_tensorrt_version("11.0.0")
    assert tm.version_tuple("10.13.3.9") == (10, 13, 3)


@pytest.fixture(scope="module")
def step_art(tiny_ckpt, tmp_path_factory) -> Path:
    """An artifact whose build has the fixed-shape decode step (`export trt --checkpoint`)."""
    from export import export_onnx
    from tests.fake_tensorrt import fake_engines

    art = export_onnx(tiny_ckpt, tmp_path_factory.mktemp("step") / "art", progress=False)
    fake_engines(art, max_frames=8, max_seq=512, checkpoint=tiny_ckpt)
    return art


def test_step_engine_record(step_art):
    section = json.loads((step_art / "manifest.json").read_text())["tensorrt"]
    rec = section["engines"][tm.STEP]
    assert rec["fixed"] == {"seq": 1, "past": 511} and rec["onnx"] == "decoder_step.onnx"
    (profile,) = rec["profiles"]
    assert profile["name"] == "decode"
    assert profile["shapes"]["position_ids"] == {"min": [1, 1], "opt": [1, 1], "max": [1, 1]}
    shapes = [s["max"] for n, s in profile["shapes"].items() if n.startswith("past_")]
    assert shapes and all(s[:2] == [511, 1] for s in shapes)  # [past, batch, kv, hd]


def test_step_engine_one_graph_per_backend(fake_trt, step_art, clip_video):
    """The fixed-shape step: onnxruntime's tokens, one CUDA graph for every decode step of
    every request (captured at the first step, replayed by all later ones)."""
    from trace_rt.generate import GenerationConfig
    from trace_rt.pipeline import Pipeline

    trt_p = Pipeline.from_dir(step_art, "tensorrt", device="cuda")
    ort_p = Pipeline.from_dir(step_art, "onnxruntime", cache_dir=False)
    backend = trt_p.backend
    assert backend.step is not None
    steps = 0
    decode = backend.decode

    def counted(slots, token_ids, heads):
        nonlocal steps
        steps += 1
        return decode(slots, token_ids, heads)

    backend.decode = counted
    gens = [
        GenerationConfig(max_new_tokens=24),
        GenerationConfig(max_new_tokens=24, temperature=1.0, seed=3),
    ]
    graph = None
    for task, gen in [("dvc", gens[0]), ("dvc", gens[1]), ("mr", gens[0]), ("mr", gens[1])]:
        query = None if task == "dvc" else QUERY
        got = trt_p.run(clip_video, task, query=query, gen=gen)["token_ids"]
        assert got == ort_p.run(clip_video, task, query=query, gen=gen)["token_ids"], (task, gen)
        graph = graph or backend.step.graph
        assert backend.step.graph is graph  # the same graph, never re-captured
    assert steps > 20
    # One graph alive; every step but the first (which ran, then captured) replayed it; the
    # per-past-length path was never used.
    assert len(fake_trt.live_graphs) == 1 and fake_trt.launches == steps - 1
    assert backend.past_graphs.graphs == {} and backend.past_graphs.seen == set()


def test_step_engine_logits(fake_trt, step_art):
    """Step-level logits of the fixed-shape step against the dynamic decoder's, with and
    without graphs, and past the first request (stale slots from it must stay masked)."""
    from trace_rt.backends import load_backend
    from trace_rt.tokens import Head

    ort_b = load_backend("onnxruntime", step_art, cache_dir=False)
    c = ort_b.config
    video = np.random.default_rng(0).standard_normal((9, c.hidden_size)).astype(ort_b.dtype)
    for graphs in (0, 1):
        trt_b = load_backend("tensorrt", step_art, device="cuda", cuda_graphs=graphs)
        for prompt in ([1, 733, -201, 28705, 13, 5, 6], [1, -201, 13]):
            want = ort_b.prefill(prompt, video, Head.TEXT)
            np.testing.assert_array_equal(trt_b.prefill(prompt, video, Head.TEXT), want)
            for token, head in [(32005, Head.TIME), (1234, Head.SCORE), (32016, Head.TEXT)]:
                np.testing.assert_allclose(
                    trt_b.decode_step(token, head),
                    ort_b.decode_step(token, head),
                    rtol=1e-4,
                    atol=1e-4,
                )
        trt_b.close()


def test_fake_build_step_then_run(fake_trt, tiny_ckpt, tmp_path, clip_video):
    """`export trt --checkpoint`: the step is made, recorded and built (through the stand-in
    builder, which checks its fixed profile against the parsed network), run with one graph."""
    import tensorrt

    from export import export_onnx
    from export.cli import main
    from export.trt import build_engines
    from trace_rt.generate import GenerationConfig
    from trace_rt.pipeline import Pipeline

    art = export_onnx(tiny_ckpt, tmp_path / "art", progress=False)
    args = ["--max-seq", "384", "--max-batch", "2", "--checkpoint", str(tiny_ckpt)]
    main(["trt", str(art), *args, "--no-progress"])
    section = json.loads((art / "manifest.json").read_text())["tensorrt"]
    assert section["limits"] == {"max_frames": 8, "max_seq": 384, "max_batch": 2}
    names = [p["name"] for p in section["engines"][DECODER]["profiles"]]
    assert names == ["prefill", "decode", "decode_batch"]
    rec = section["engines"][tm.STEP]
    assert rec["fixed"] == {"seq": 1, "past": 383} and rec["onnx"] == "decoder_step.onnx"
    assert len(tensorrt.Builder.built) == 4
    gen = GenerationConfig(max_new_tokens=16)
    pipe = Pipeline.from_dir(art, "tensorrt", device="cuda")
    got = [pipe.run(clip_video, "dvc", gen=gen)["token_ids"] for _ in range(2)]
    want = Pipeline.from_dir(art, "onnxruntime", cache_dir=False).run(clip_video, "dvc", gen=gen)
    assert got == [want["token_ids"]] * 2
    assert len(fake_trt.live_graphs) == 1 and pipe.backend.past_graphs.graphs == {}
    # A decoder rebuilt without the checkpoint rebuilds the step the manifest records (no
    # torch needed); with step=False it drops the old one (the step goes with the decoder).
    again = build_engines(art, max_seq=384, max_batch=2, graphs=["decoder"], progress=False)
    assert again["engines"][tm.STEP]["onnx"] == "decoder_step.onnx"
    assert len(tensorrt.Builder.built) == 6
    again = build_engines(
        art, max_seq=384, max_batch=2, graphs=["decoder"], step=False, progress=False
    )
    assert tm.STEP not in again["engines"] and "vision_encoder" in again["engines"]
    assert Pipeline.from_dir(art, "tensorrt", device="cuda").backend.step is None


@pytest.mark.parametrize("failure", ["fail_capture", "fail_instantiate"])
def test_step_engine_failed_capture(fake_trt, step_art, clip_video, failure):
    """A failed capture of the step's graph: released, error cleared, same tokens, no graphs."""
    from trace_rt.generate import GenerationConfig
    from trace_rt.pipeline import Pipeline

    gen = GenerationConfig(max_new_tokens=12)
    want = Pipeline.from_dir(step_art, "onnxruntime", cache_dir=False).run(
        clip_video, "dvc", gen=gen
    )["token_ids"]
    pipe = Pipeline.from_dir(step_art, "tensorrt", device="cuda")
    setattr(fake_trt, failure, True)
    with pytest.warns(UserWarning, match="CUDA graph capture failed"):
        assert pipe.run(clip_video, "dvc", gen=gen)["token_ids"] == want
    assert fake_trt.live_graphs == set() and fake_trt.last_error == 0
    assert pipe.backend.step.graph is None and pipe.backend.past_graphs.capacity == 0
    assert pipe.run(clip_video, "dvc", gen=gen)["token_ids"] == want
    assert fake_trt.launches == 0
