"""The repository generator and the trace_pipeline contract, without a server."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trace_rt.errors import CheckpointError, InputError
from trace_rt.graphs import load_manifest
from trace_rt.serving.protocol import (
    ServingSettings,
    parse_request,
)
from triton_repo.build import build_repository


@pytest.fixture(scope="module")
def artifact(tiny_ckpt, tmp_path_factory) -> Path:
    from export.onnx_export import export_onnx

    return export_onnx(tiny_ckpt, tmp_path_factory.mktemp("repo-art") / "art", progress=False)


def _config(path: Path) -> str:
    return path.read_text()


# What the repository for `tiny` must say, written out by hand from tiny's sizes (CLIP
# 56 px / patch 14 -> 16 patches of width 32, select layer -2; decoder hidden 64; 6 time
# tokens a frame; KV: K and V x 2 layers x 2 kv heads x head dim 16 x 4 bytes = 512 bytes a
# position, x 4096 positions x 4 slots) and the serving contract of triton_repo/README.md;
# compared as parsed by Triton's own ModelConfig proto, so only meaning counts, not layout.
EXPECTED_TINY = {
    "vision_encoder": """
        name: "vision_encoder" backend: "python" max_batch_size: 4
        input { name: "pixel_values" data_type: TYPE_FP32 dims: [3, 56, 56] }
        output { name: "features" data_type: TYPE_FP32 dims: [16, 32] }
        dynamic_batching { preferred_batch_size: 4 max_queue_delay_microseconds: 2000 }
        instance_group { count: 1 kind: KIND_CPU }
    """,
    "projector": """
        name: "projector" backend: "python" max_batch_size: 0
        input { name: "features" data_type: TYPE_FP32 dims: [-1, 16, 32] }
        input { name: "time_ids" data_type: TYPE_INT64 dims: [-1, 6] }
        output { name: "video_embeds" data_type: TYPE_FP32 dims: [-1, 64] }
        instance_group { count: 1 kind: KIND_CPU }
    """,
    "trace_pipeline": """
        name: "trace_pipeline" backend: "python" max_batch_size: 0
        model_transaction_policy { decoupled: true }
        input { name: "video" data_type: TYPE_UINT8 dims: [-1] optional: true }
        input { name: "video_id" data_type: TYPE_STRING dims: [1] optional: true }
        input { name: "frames" data_type: TYPE_FP32 dims: [-1, 3, 56, 56] optional: true }
        input { name: "timestamps" data_type: TYPE_FP32 dims: [-1] optional: true }
        input { name: "duration" data_type: TYPE_FP32 dims: [1] optional: true }
        input { name: "task" data_type: TYPE_STRING dims: [1] optional: true }
        input { name: "query" data_type: TYPE_STRING dims: [1] optional: true }
        input { name: "question" data_type: TYPE_STRING dims: [1] optional: true }
        input { name: "max_new_tokens" data_type: TYPE_INT32 dims: [1] optional: true }
        input { name: "temperature" data_type: TYPE_FP32 dims: [1] optional: true }
        input { name: "top_p" data_type: TYPE_FP32 dims: [1] optional: true }
        input { name: "seed" data_type: TYPE_INT64 dims: [1] optional: true }
        input { name: "constrained" data_type: TYPE_BOOL dims: [1] optional: true }
        input { name: "ignore_eos" data_type: TYPE_BOOL dims: [1] optional: true }
        input { name: "timestamp_mode" data_type: TYPE_STRING dims: [1] optional: true }
        output { name: "event" data_type: TYPE_STRING dims: [1] }
        output { name: "result" data_type: TYPE_STRING dims: [1] }
        instance_group { count: 1 kind: KIND_CPU }
        parameters { key: "max_batch_frames" value: { string_value: "4" } }
        parameters { key: "max_video_bytes" value: { string_value: "268435456" } }
        parameters { key: "max_new_tokens" value: { string_value: "1024" } }
        parameters { key: "max_sequences" value: { string_value: "4" } }
        parameters { key: "video_cache_mb" value: { string_value: "1024" } }
        parameters { key: "kv_bytes_per_position" value: { string_value: "512" } }
        parameters { key: "kv_max_bytes" value: { string_value: "8388608" } }
    """,
}


def _model_config(text: str):
    """*text* parsed as Triton parses config.pbtxt (its ModelConfig proto, text format)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())


def test_configs_are_the_expected_triton_configs(artifact, tmp_path):
    from google.protobuf import text_format

    repo = build_repository(artifact, tmp_path / "repo", max_batch_frames=4, progress=False)
    for model, want in EXPECTED_TINY.items():
        got = _model_config(_config(repo / model / "config.pbtxt"))
        # as text, so that a failure shows the difference field by field
        assert text_format.MessageToString(got) == text_format.MessageToString(
            _model_config(want)
        ), model

    # Each version directory is self-contained: model code, graph, settings, artifacts.
    assert (repo / "vision_encoder" / "1" / "vision_encoder.onnx").is_file()
    assert json.loads((repo / "projector" / "1" / "graph.json").read_text())["name"] == "projector"
    load_manifest(repo / "trace_pipeline" / "1" / "artifacts")  # hashes still match
    assert ServingSettings.from_dir(repo / "trace_pipeline" / "1") == ServingSettings()


def test_rebuild_replaces_and_foreign_dirs_are_refused(artifact, tmp_path):
    out = tmp_path / "repo"
    build_repository(artifact, out, instances=2, progress=False)
    assert "count: 2" in _config(out / "trace_pipeline" / "config.pbtxt")
    build_repository(artifact, out, instances=3, encoders="bls", progress=False)
    assert "count: 3" in _config(out / "trace_pipeline" / "config.pbtxt")
    assert ServingSettings.from_dir(out / "trace_pipeline" / "1").encoders == "bls"
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="not empty"):
        build_repository(artifact, foreign, progress=False)
    assert (foreign / "notes.txt").exists()


def test_bad_build_arguments(artifact, tmp_path):
    with pytest.raises(InputError, match="instances"):
        build_repository(artifact, tmp_path / "a", instances=0, progress=False)
    with pytest.raises(InputError, match="encoders"):
        build_repository(artifact, tmp_path / "b", encoders="rpc", progress=False)
    with pytest.raises(InputError, match="max_new_tokens"):
        build_repository(artifact, tmp_path / "c", max_new_tokens=0, progress=False)
    with pytest.raises(CheckpointError, match="manifest"):
        build_repository(tmp_path, tmp_path / "d", progress=False)
    with pytest.raises(CheckpointError, match="TensorRT"):
        build_repository(artifact, tmp_path / "e", backend="tensorrt", progress=False)


def _hashes(root: Path) -> dict[str, str]:
    from trace_rt.graphs import sha256_file

    return {
        str(p.relative_to(root)): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".ort_cache" not in p.parts
    }


def test_reexport_leaves_a_built_repository_alone(tiny_ckpts, clip_video, tmp_path):
    # A server built from ART keeps answering with ck1's model after `export onnx ck2 ART`:
    # the repository links ART's files and the server memory-maps embeddings.npy, so
    # export must write new files, never rewrite the published ones.
    from export.onnx_export import export_onnx
    from trace_rt.generate import GenerationConfig
    from trace_rt.pipeline import Pipeline

    art = export_onnx(tiny_ckpts[1], tmp_path / "art", progress=False)
    repo = build_repository(art, tmp_path / "repo", progress=False)
    served = repo / "trace_pipeline" / "1" / "artifacts"
    before = _hashes(repo)
    gen = GenerationConfig(max_new_tokens=16, temperature=1.0, seed=3)
    running = Pipeline.from_dir(served, "onnxruntime", cache_dir=False)
    first = running.run(clip_video, "dvc", gen=gen)["token_ids"]
    old_art = _hashes(art)
    export_onnx(tiny_ckpts[2], art, progress=False)
    assert _hashes(art)["decoder.onnx"] != old_art["decoder.onnx"]  # ART did change
    assert _hashes(repo) == before
    load_manifest(served)  # sha256 of every file
    assert running.run(clip_video, "dvc", gen=gen)["token_ids"] == first
    fresh = Pipeline.from_dir(served, "onnxruntime", cache_dir=False)
    assert fresh.run(clip_video, "dvc", gen=gen)["token_ids"] == first


def test_links_the_decoder_variant_the_runtime_picks(artifact, tmp_path):
    """After `export optimize`, trace_pipeline gets the manifest's default decoder (the
    rule the backend applies, trace_rt.variants.pick_variant) and no other variant."""
    import shutil
    import warnings

    from export.decode_timing import record_default
    from export.fuse import optimize_artifact
    from trace_rt.backends.onnxruntime_backend import OnnxRuntimeBackend

    art = tmp_path / "art"
    shutil.copytree(artifact, art)
    optimize_artifact(art, (None, 4))
    record_default(art, measure=False)  # fused; int4 -> fused-int4
    repo = build_repository(art, tmp_path / "repo", progress=False)
    served = repo / "trace_pipeline" / "1" / "artifacts"
    decoders = sorted(p.name for p in served.glob("decoder*.onnx"))
    assert decoders == ["decoder.fused.onnx", "decoder.onnx"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback: the default's file is there
        backend = OnnxRuntimeBackend(served, cache_dir=False, video_graphs=False)
    assert backend.decoder_variant == "fused"
    # A damaged variant file is caught by the build's sha256 check of what it linked.
    _flip_byte(art / "decoder.fused.onnx")
    with pytest.raises(CheckpointError, match=r"decoder\.fused\.onnx does not match"):
        build_repository(art, tmp_path / "repo2", progress=False)
    assert not (tmp_path / "repo2").exists()
    # The portable graph as the default: no variant file at all.
    m = json.loads((art / "manifest.json").read_text())
    m["defaults"]["onnxruntime"]["decoder"] = "portable"
    (art / "manifest.json").write_text(json.dumps(m))
    repo = build_repository(art, tmp_path / "repo3", progress=False)
    served = repo / "trace_pipeline" / "1" / "artifacts"
    assert not list(served.glob("decoder.*.onnx"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # portable is no variant to look for
        backend = OnnxRuntimeBackend(served, cache_dir=False, video_graphs=False)
    assert backend.decoder_variant is None


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda a: _flip_byte(a / "embeddings.npy"), "embeddings.npy does not match"),
        (lambda a: _flip_byte(a / "decoder.onnx"), "decoder.onnx does not match"),
        (lambda a: _flip_byte(a / "vision_encoder.onnx"), "vision_encoder.onnx does not match"),
        (lambda a: _flip_byte(a / "tokenizer.model"), "tokenizer.model does not match"),
        (lambda a: _truncate(a / "projector.onnx"), "projector.onnx has"),
        (lambda a: (a / "tokenizer.model").unlink(), "tokenizer.model is missing"),
        (lambda a: _truncate(a / "manifest.json"), "not valid JSON"),
    ],
    ids=["embeddings", "decoder", "vision", "tokenizer", "truncated", "removed", "manifest"],
)
def test_half_written_artifacts_are_refused(artifact, tmp_path, damage, message):
    import shutil

    art = tmp_path / "art"
    shutil.copytree(artifact, art)
    damage(art)
    with pytest.raises(CheckpointError, match=message):
        build_repository(art, tmp_path / "repo", progress=False)
    assert not (tmp_path / "repo").exists()  # nothing that looks like a ready repository


def test_tensorrt_repository(artifact, tmp_path):
    # Engines cannot be built here; a manifest section pointing at placeholder files
    # checks what the generator writes for a GPU host (platform, batch limits, files).
    import shutil

    from trace_rt.backends import tensorrt_manifest as tm

    art = tmp_path / "art"
    shutil.copytree(artifact, art)
    engines = {}
    for g in ("vision_encoder", "projector", "decoder"):
        f = art / "tensorrt" / f"{g}.fp16.engine"
        f.parent.mkdir(exist_ok=True)
        f.write_bytes(g.encode())
        engines[g] = {"file": f"tensorrt/{g}.fp16.engine", "profiles": [], "bytes": len(g),
                      "sha256": tm.sha256_file(f)}  # fmt: skip
    section = {"format": tm.FORMAT, "version": "10.3.0.30",
               "limits": {"max_frames": 6, "max_seq": 512}, "engines": engines}  # fmt: skip
    tm.write_section(art, section)
    trt = {"backend": "tensorrt", "server_tensorrt": "10.3.0.30", "progress": False}
    with pytest.raises(InputError, match="max-batch-frames"):
        build_repository(art, tmp_path / "r0", max_batch_frames=7, **trt)
    # Engines load only on the TensorRT that built them: the server's must match.
    with pytest.raises(CheckpointError, match=r"built with TensorRT 10\.3\.0\.30.*10\.8\.0"):
        build_repository(art, tmp_path / "r1", **{**trt, "server_tensorrt": "10.8.0.43"})
    if importlib.util.find_spec("tensorrt") is None:
        with pytest.raises(InputError, match="--server-tensorrt"):
            build_repository(art, tmp_path / "r2", backend="tensorrt", progress=False)
    repo = build_repository(art, tmp_path / "repo", **trt)
    vision = _config(repo / "vision_encoder" / "config.pbtxt")
    assert 'platform: "tensorrt_plan"' in vision and "max_batch_size: 6" in vision
    assert "KIND_GPU" in vision and (repo / "vision_encoder" / "1" / "model.plan").read_bytes()
    assert not (repo / "vision_encoder" / "1" / "model.py").exists()
    assert 'platform: "tensorrt_plan"' in _config(repo / "projector" / "config.pbtxt")
    pipeline = _config(repo / "trace_pipeline" / "config.pbtxt")
    assert "KIND_GPU" in pipeline
    assert ServingSettings.from_dir(repo / "trace_pipeline" / "1").backend == "tensorrt"
    # The CPU server cannot run engines: said before anything starts.
    from trace_rt.serving.server import ServerError, TritonServer

    with pytest.raises(ServerError, match="projector, vision_encoder are tensorrt_plan"):
        TritonServer(repo).start()


def test_cli_build(artifact, tmp_path):
    out = tmp_path / "repo"
    cmd = [sys.executable, "-m", "triton_repo", "build", str(artifact), str(out)]
    limits = ["--max-video-bytes", "1000", "--decode-workers", "3"]
    limits += ["--video-time-budget", "7.5", "--max-frame-pixels", "640000"]
    limits += ["--max-sequences", "6", "--video-cache-mb", "64"]
    res = subprocess.run([*cmd, *limits], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "trace-rt serve --repo" in res.stdout
    s = ServingSettings.from_dir(out / "trace_pipeline" / "1")
    assert (s.max_video_bytes, s.decode_workers) == (1000, 3)
    assert (s.max_sequences, s.video_cache_mb) == (6, 64)
    assert "KV cache up to 12.0 MiB (6 slots x 4096 positions x 512 bytes)" in res.stdout
    assert s.decode_limits().time_budget_s == 7.5 and s.decode_limits().max_pixels == 640000
    # The limits a client asks for before sending, in the model's config.
    config = (out / "trace_pipeline" / "config.pbtxt").read_text()
    assert '{ key: "max_video_bytes" value: { string_value: "1000" } }' in config
    res = subprocess.run([*cmd, "--instances", "0"], capture_output=True, text=True)
    assert res.returncode == 2 and "instances" in res.stderr


# ---- the request contract --------------------------------------------------------------
def _req(**kw) -> dict:
    base = {"video": np.frombuffer(b"abcd", np.uint8), "task": np.array([b"dvc"], object)}
    return base | kw


def test_parse_request_defaults_and_types():
    s = ServingSettings(default_max_new_tokens=64)
    r = parse_request(_req(), s)
    assert r.video == b"abcd" and r.task == "dvc" and r.gen.max_new_tokens == 64
    assert r.gen.temperature == 0.0 and r.gen.top_p == 1.0 and not r.gen.constrained
    r = parse_request(
        _req(
            query=np.array(["été".encode()], object),
            max_new_tokens=np.array([9], np.int32),
            temperature=np.array([0.5], np.float32),
            seed=np.array([3], np.int64),
            constrained=np.array([True]),
        ),
        s,
    )
    assert r.query == "été" and r.gen.max_new_tokens == 9 and r.gen.seed == 3
    assert r.gen.temperature == 0.5 and r.gen.constrained


@pytest.mark.parametrize(
    "override, message",
    [
        ({"task": None}, "missing 'task'"),
        ({"task": np.array([b"a", b"b"], object)}, "one string"),
        ({"task": np.array([b"\xff"], object)}, "UTF-8"),
        ({"video": None}, "missing 'video'"),
        ({"video": np.zeros(0, np.uint8)}, "empty"),
        ({"video": np.zeros(11, np.uint8)}, "11 bytes, over"),
        ({"video": np.zeros(4, np.float32)}, "uint8"),
        ({"frames": np.zeros((1, 3, 2, 2), np.float32)}, "not both"),
        ({"max_new_tokens": np.array([0], np.int32)}, r"\[1, 100\]"),
        ({"max_new_tokens": np.array([101], np.int32)}, r"\[1, 100\]"),
        ({"max_new_tokens": np.array([1, 2], np.int32)}, "one value"),
        ({"temperature": np.array([np.nan], np.float32)}, "finite"),
        ({"temperature": np.array([-1], np.float32)}, "temperature"),
        ({"top_p": np.array([1.5], np.float32)}, "top_p"),
        ({"seed": np.array([-1], np.int64)}, "seed"),
    ],
)
def test_parse_request_errors_name_the_problem(override, message):
    with pytest.raises(InputError, match=message):
        settings = ServingSettings(
            max_video_bytes=10, max_new_tokens=100, default_max_new_tokens=50
        )
        parse_request(_req(**override), settings)


def test_video_id_requests():
    s = ServingSettings()
    vid = "0123456789abcdef" * 2
    r = parse_request(_req(video=None, video_id=np.array([vid.encode()], object)), s)
    assert r.video_id == vid and r.video is None and r.frames is None and r.task == "dvc"
    for bad in ("0123", "G" * 32, vid.upper(), vid + "0", "../" * 11):
        with pytest.raises(InputError, match="'video_id' must be the 32 hex digits"):
            parse_request(_req(video=None, video_id=np.array([bad.encode()], object)), s)
    with pytest.raises(InputError, match="not both 'video' and 'video_id'"):
        parse_request(_req(video_id=np.array([vid.encode()], object)), s)
    frames = np.zeros((1, 3, 2, 2), np.float32)
    with pytest.raises(InputError, match="not all of 'video' and 'frames' and 'video_id'"):
        parse_request(_req(frames=frames, video_id=np.array([vid.encode()], object)), s)
    with pytest.raises(InputError, match="or the 'video_id' of an earlier response"):
        parse_request(_req(video=None), s)


def test_engine_limits_are_checked_and_saved(artifact, tmp_path):
    for field, value in (("max_sequences", 0), ("video_cache_mb", -1)):
        with pytest.raises(InputError, match=field):
            ServingSettings(**{field: value})
    repo = build_repository(
        artifact, tmp_path / "repo", max_sequences=3, video_cache_mb=0, progress=False
    )
    s = ServingSettings.from_dir(repo / "trace_pipeline" / "1")
    assert (s.max_sequences, s.video_cache_mb) == (3, 0)
    config = (repo / "trace_pipeline" / "config.pbtxt").read_text()
    assert '{ key: "kv_max_bytes" value: { string_value: "6291456" } }' in config  # 512 x 4096 x 3


def test_frames_requests(tiny_ckpt, clip_video):
    from trace_rt.generate import GenerationConfig
    from trace_rt.pipeline import Pipeline

    s = ServingSettings(max_frames=4)
    frames = np.zeros((5, 3, 8, 8), np.float32)
    with pytest.raises(InputError, match="1 to 4 frames"):
        parse_request(_req(video=None, frames=frames, timestamps=np.zeros(5)), s)
    # Frames preprocessed by the client give what the server would have made of the video.
    pipe = Pipeline.from_dir(tiny_ckpt)
    gen = GenerationConfig(max_new_tokens=12)
    prep = pipe.prepare(clip_video, "dvc", gen=gen)
    again = pipe.prepare_frames(
        prep.pixel_values, prep.clip.times, "dvc", duration=prep.clip.duration, gen=gen
    )
    assert again.prompt_ids == prep.prompt_ids
    assert np.array_equal(again.time_ids, prep.time_ids)
    assert pipe.run_prepared(again, gen)["token_ids"] == pipe.run_prepared(prep, gen)["token_ids"]
    px, ts = prep.pixel_values, prep.clip.times
    for args, message in [
        ((px[:, :, :10], ts), "preprocessed size"),
        ((px, ts[:-1]), "timestamps"),
        ((px, ts[::-1]), "non-decreasing"),
        ((px * np.nan, ts), "finite"),
    ]:
        with pytest.raises(InputError, match=message):
            pipe.prepare_frames(*args, "dvc")
    with pytest.raises(InputError, match="duration"):
        pipe.prepare_frames(px, ts, "dvc", duration=float(ts[-1]) - 1)


@pytest.mark.parametrize(
    "field, value",
    [("decode_workers", 0), ("video_time_budget_s", 0.0), ("max_frame_pixels", 0)],
)
def test_decode_settings_must_be_positive(field, value):
    with pytest.raises(InputError, match=field):
        ServingSettings(**{field: value})


def test_settings_file_errors(tmp_path):
    with pytest.raises(CheckpointError, match="missing"):
        ServingSettings.from_dir(tmp_path)
    (tmp_path / "serving.json").write_text(json.dumps({"backend": "onnxruntime", "colour": 1}))
    with pytest.raises(CheckpointError, match="colour"):
        ServingSettings.from_dir(tmp_path)


def test_bf16_tensors_have_a_triton_type():
    # bf16 artifacts' specs say "bfloat16": the config writer needs TYPE_BF16 for them
    # (a KeyError before).
    from trace_rt.graphs import TensorSpec
    from triton_repo.build import _graph_tensor

    t = TensorSpec("inputs_embeds", "bfloat16", (1, "seq", 64))
    assert _graph_tensor(t, batched=False) == ("inputs_embeds", "TYPE_BF16", [1, -1, 64], False)
