"""The repository generator and the trace_pipeline contract, without a server."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trace_rt.config import TraceConfig
from trace_rt.errors import CheckpointError, InputError
from trace_rt.graphs import load_manifest, manifest_specs
from trace_rt.serving.protocol import (
    PIPELINE_OUTPUTS,
    ServingSettings,
    parse_request,
    pipeline_inputs,
)
from triton_repo.build import build_repository


@pytest.fixture(scope="module")
def artifact(tiny_ckpt, tmp_path_factory) -> Path:
    from export.onnx_export import export_onnx

    return export_onnx(tiny_ckpt, tmp_path_factory.mktemp("repo-art") / "art", progress=False)


def _config(path: Path) -> str:
    return path.read_text()


def _inputs(text: str) -> dict[str, tuple[str, list[int], bool]]:
    out = {}
    for m in re.finditer(
        r'name: "(\w+)" data_type: (\w+) dims: \[([-\d, ]*)\]( optional: true)?', text
    ):
        dims = [int(d) for d in m.group(3).split(",") if d.strip()]
        out[m.group(1)] = (m.group(2), dims, bool(m.group(4)))
    return out  # fmt: skip


def test_configs_follow_the_manifest(artifact, tmp_path):
    repo = build_repository(artifact, tmp_path / "repo", max_batch_frames=4, progress=False)
    specs = manifest_specs(load_manifest(artifact))
    cfg = TraceConfig.from_dir(artifact)

    vision = _config(repo / "vision_encoder" / "config.pbtxt")
    assert "max_batch_size: 4" in vision and "dynamic_batching" in vision
    tensors = _inputs(vision)
    for t in (*specs["vision_encoder"].inputs, *specs["vision_encoder"].outputs):
        dims = [d if isinstance(d, int) else -1 for d in t.shape][1:]  # batch axis dropped
        assert tensors[t.name] == ("TYPE_FP32", dims, False)

    projector = _config(repo / "projector" / "config.pbtxt")
    assert "max_batch_size: 0" in projector and "dynamic_batching" not in projector
    assert set(_inputs(projector)) == {"features", "time_ids", "video_embeds"}
    assert _inputs(projector)["time_ids"][0] == "TYPE_INT64"

    pipeline = _config(repo / "trace_pipeline" / "config.pbtxt")
    assert "decoupled: true" in pipeline and 'backend: "python"' in pipeline
    tensors = _inputs(pipeline)
    for t in (*pipeline_inputs(cfg), *PIPELINE_OUTPUTS):
        assert tensors[t.name] == (t.triton_type, list(t.shape), t.optional)
    h, w = cfg.preprocess.crop_height, cfg.preprocess.crop_width
    assert tensors["frames"][1] == [-1, 3, h, w]

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
        engines[g] = {"file": f"tensorrt/{g}.fp16.engine", "profiles": []}
    section = {"format": tm.FORMAT, "limits": {"max_frames": 6, "max_seq": 512}, "engines": engines}
    tm.write_section(art, section)
    with pytest.raises(InputError, match="max-batch-frames"):
        build_repository(art, tmp_path / "r0", backend="tensorrt", max_batch_frames=7,
                         progress=False)  # fmt: skip
    repo = build_repository(art, tmp_path / "repo", backend="tensorrt", progress=False)
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
    res = subprocess.run([*cmd, *limits], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "trace-rt serve --repo" in res.stdout
    s = ServingSettings.from_dir(out / "trace_pipeline" / "1")
    assert (s.max_video_bytes, s.decode_workers) == (1000, 3)
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
