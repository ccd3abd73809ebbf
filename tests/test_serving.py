"""Serving against a real tritonserver on CPU: parity, concurrency, bad requests, metrics.

The server is the genuine tritonserver bundled in nvidia-pytriton, serving a repository
that ``python -m triton_repo build`` generated from a `tiny` export; requests go over gRPC
with tritonclient. Expected results come from ``trace-rt run --backend onnxruntime`` on
the same artifacts (the in-process Pipeline, and the CLI itself once).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.triton_server import running_server
from trace_rt.generate import GenerationConfig
from trace_rt.pipeline import Pipeline
from trace_rt.serving.client import ServingError, TraceClient

pytest.importorskip("tritonclient.grpc")

QUERY = "a red circle moves to the left"
TASKS = {"dvc": None, "mr": QUERY, "vhd": QUERY}
MAX_VIDEO = 1_000_000
STEPS = 24


@pytest.fixture(scope="module")
def artifact(tiny_ckpts, tmp_path_factory) -> Path:
    from export.onnx_export import export_onnx

    return export_onnx(tiny_ckpts[1], tmp_path_factory.mktemp("serve") / "art", progress=False)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> list[Path]:
    """Four clips of different lengths, rates and sizes."""
    from tests.media import write_video

    root = tmp_path_factory.mktemp("serve-videos")
    shapes = [(96, 64, 10, 40), (80, 80, 12, 30), (64, 48, 8, 56), (112, 64, 15, 45)]
    return [
        Path(write_video(root / f"v{i}.mp4", width=w, height=h, fps=fps, n_frames=n))
        for i, (w, h, fps, n) in enumerate(shapes)
    ]


@pytest.fixture(scope="module")
def local(artifact) -> Pipeline:
    return Pipeline.from_dir(artifact, "onnxruntime", cache_dir=False)


# BLS with two instances of each model: requests then really run in parallel.
@pytest.fixture(scope="module", params=[("in-process", 1), ("bls", 2)], ids=["in-process", "bls"])
def server(request, artifact, tmp_path_factory):
    from triton_repo.build import build_repository

    encoders, instances = request.param
    repo = build_repository(
        artifact,
        tmp_path_factory.mktemp("repo") / encoders,
        encoders=encoders,
        instances=instances,
        max_video_bytes=MAX_VIDEO,
        max_new_tokens=256,
        progress=False,
    )
    with running_server(repo) as s:
        yield s


@pytest.fixture
def client(server):
    with TraceClient(server.grpc_url) as c:
        yield c


def _expected(local: Pipeline, video: Path, task: str, **gen) -> dict:
    query = TASKS[task]
    return local.run(video, task, query=query, gen=GenerationConfig(max_new_tokens=STEPS, **gen))


def _same(got: dict, want: dict) -> None:
    for key in ("token_ids", "events", "prompt_ids", "frame_times", "duration", "stop_reason"):
        assert got[key] == want[key], key


def test_all_models_ready(client):
    for model in ("vision_encoder", "projector", "trace_pipeline"):
        assert client.client.is_model_ready(model), model


@pytest.mark.parametrize("task", ["dvc", "mr", "vhd"])
def test_grpc_equals_run(client, local, videos, task):
    got = client.infer(videos[0], task=task, query=TASKS[task], max_new_tokens=STEPS)
    _same(got, _expected(local, videos[0], task))
    assert got["task"] == task and set(got["timing_ms"]) >= {"video", "decode", "total"}


def test_sampled_and_constrained_equal_run(client, local, videos):
    params = {"temperature": 0.8, "top_p": 0.9, "seed": 7, "constrained": True}
    got = client.infer(videos[1], task="dvc", max_new_tokens=STEPS, **params)
    _same(got, _expected(local, videos[1], "dvc", **params))


def test_preprocessed_frames_equal_video(client, local, videos):
    prep = local.prepare(videos[2], "mr", query=QUERY)
    got = client.infer(
        None,
        task="mr",
        query=QUERY,
        frames=prep.pixel_values,
        timestamps=prep.clip.times,
        duration=prep.clip.duration,
        max_new_tokens=STEPS,
    )
    want = _expected(local, videos[2], "mr")
    assert got["token_ids"] == want["token_ids"] and got["events"] == want["events"]


def test_eight_concurrent_clients(server, local, videos):
    jobs = [(videos[i % 4], list(TASKS)[i % 3]) for i in range(8)]
    results: dict[int, dict] = {}
    errors: list[BaseException] = []

    def one(i: int) -> None:
        video, task = jobs[i]
        try:
            with TraceClient(server.grpc_url) as c:
                results[i] = c.infer(video, task=task, query=TASKS[task], max_new_tokens=STEPS)
        except BaseException as e:  # reported below, with the request it belongs to
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and sorted(results) == list(range(8))
    for i, (video, task) in enumerate(jobs):
        assert results[i]["task"] == task
        assert results[i]["video"] == str(video)
        _same(results[i], _expected(local, video, task))
    # The requests really differ (a mix-up would show).
    assert len({json.dumps(r["token_ids"] + r["frame_times"]) for r in results.values()}) >= 4


BAD_REQUESTS = [
    ("not a video", {"video": b"\x00\x01 this is not a video" * 50}, r"NotAVideoError"),
    ("empty payload", {"video": b""}, r"'video' is empty"),
    ("no video", {"video": None}, r"missing 'video'"),
    ("missing task", {"task": None}, r"missing 'task'"),
    ("unknown task", {"task": "karaoke"}, r"unknown task 'karaoke'"),
    ("mr without query", {"task": "mr"}, r"missing query.*'mr'"),
    ("budget too large", {"max_new_tokens": 100_000}, r"max_new_tokens must be in \[1, 256\]"),
    ("budget zero", {"max_new_tokens": 0}, r"max_new_tokens must be in"),
    ("negative temperature", {"temperature": -0.5}, r"temperature must be in"),
    ("top_p zero", {"top_p": 0.0}, r"top_p must be in"),
    ("oversized video", {"video": bytes(MAX_VIDEO + 1)}, rf"{MAX_VIDEO + 1} bytes.*limit"),
    ("frames, no timestamps", {"video": None, "frames": np.zeros((2, 3, 56, 56))}, "timestamps"),
]  # fmt: skip


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_gets_named_error(client, videos, case):
    _, override, pattern = case
    request = {"task": "dvc", "max_new_tokens": 8} | override
    video = request.pop("video", videos[0].read_bytes())
    with pytest.raises(ServingError, match=pattern):
        client.infer(video, **request)
    # The server is still live, and the next good request succeeds.
    assert client.client.is_server_live()
    assert client.infer(videos[0], task="dvc", max_new_tokens=4)["token_ids"]


def test_wrong_type_is_refused_by_name(client, videos):
    import tritonclient.grpc as g

    inp = g.InferInput("video", [4], "FP32")  # the contract says UINT8
    inp.set_data_from_numpy(np.zeros(4, np.float32))
    task = g.InferInput("task", [1], "BYTES")
    task.set_data_from_numpy(np.array([b"dvc"], dtype=np.object_))
    box: list = []
    client.client.start_stream(callback=lambda result, error: box.append(error))
    try:
        client.client.async_stream_infer("trace_pipeline", [inp, task])
        for _ in range(200):
            if box:
                break
            threading.Event().wait(0.05)
    finally:
        client.client.stop_stream()
    assert box and box[0] is not None and "video" in str(box[0])
    assert client.infer(videos[0], task="dvc", max_new_tokens=4)["token_ids"]


def test_metrics(server, client, videos):
    def scrape() -> dict[str, float]:
        text = urllib.request.urlopen(server.metrics_url).read().decode()
        out = {}
        for line in text.splitlines():
            if line.startswith("trace_"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    before = scrape()
    res = client.infer(videos[0], task="dvc", max_new_tokens=STEPS)
    after = scrape()
    ok = 'trace_requests_total{model="trace_pipeline",outcome="ok",task="dvc"}'
    tokens = 'trace_generated_tokens_total{model="trace_pipeline"}'
    tps = 'trace_decode_tokens_per_second_count{model="trace_pipeline"}'
    assert after[ok] == before.get(ok, 0) + 1
    assert after[tokens] == before.get(tokens, 0) + len(res["token_ids"])
    assert after[tps] == before.get(tps, 0) + 1
    assert 'trace_time_to_first_event_seconds_count{model="trace_pipeline"}' in after
    # Triton's own metrics sit beside ours.
    assert 'nv_inference_request_success{model="trace_pipeline",version="1"}' in (
        urllib.request.urlopen(server.metrics_url).read().decode()
    )


def _cli_run_and_client(server, artifact, video, common: list[str], client_extra=()):
    """(`trace-rt client` stdout, `trace-rt run` result) for the same arguments."""
    exe = [sys.executable, "-m", "trace_rt"]
    model = ["--model", str(artifact), "--backend", "onnxruntime"]
    run = subprocess.run(
        [*exe, "run", str(video), *model, *common],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    cli = subprocess.run(
        [*exe, "client", str(video), "--url", server.grpc_url, *client_extra, *common],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return cli.stdout, json.loads(run.stdout)


def test_cli_client_equals_cli_run(server, artifact, videos):
    common = ["--task", "mr", "--query", QUERY, "--max-new-tokens", str(STEPS)]
    out, want = _cli_run_and_client(server, artifact, videos[3], common, ["--stream"])
    lines = [json.loads(line) for line in out.splitlines()]
    assert [x["event"] for x in lines[:-1]] == [
        {"index": i, **e} for i, e in enumerate(want["events"])
    ]
    _same(lines[-1], want)


def test_cli_client_reports_errors(server, tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"definitely not a video" * 10)
    cli = subprocess.run(
        [sys.executable, "-m", "trace_rt", "client", str(bad), "--url", server.grpc_url],
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 2 and re.search(r"error: .*NotAVideoError", cli.stderr)


def test_vision_encoder_batches_concurrent_requests(server, artifact):
    # Frames of concurrent requests share a batch (dynamic batching), and each request
    # still gets exactly its own features back.
    import onnxruntime as ort
    import tritonclient.grpc as g

    session = ort.InferenceSession(str(artifact / "vision_encoder.onnx"))
    rng = np.random.default_rng(0)
    shape = session.get_inputs()[0].shape
    pixels = [rng.standard_normal((2, *shape[1:])).astype(np.float32) for _ in range(12)]
    got: dict[int, np.ndarray] = {}
    clients = [g.InferenceServerClient(server.grpc_url) for _ in range(12)]
    start = threading.Barrier(12)  # all requests leave together

    def one(i: int) -> None:
        inp = g.InferInput("pixel_values", list(pixels[i].shape), "FP32")
        inp.set_data_from_numpy(pixels[i])
        start.wait()
        got[i] = clients[i].infer("vision_encoder", [inp]).as_numpy("features")

    stats = g.InferenceServerClient(server.grpc_url).get_inference_statistics("vision_encoder")
    before = stats.model_stats[0]
    threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for i in range(12):
        want = session.run(None, {"pixel_values": pixels[i]})[0]
        np.testing.assert_allclose(got[i], want, rtol=1e-4, atol=1e-5)
    after = g.InferenceServerClient(server.grpc_url).get_inference_statistics("vision_encoder")
    runs = after.model_stats[0].execution_count - before.execution_count
    frames = after.model_stats[0].inference_count - before.inference_count
    assert frames == 24 and runs < 12  # fewer model runs than requests: batches were shared


def test_cli_client_without_a_server(videos):
    from trace_rt.serving.server import free_ports

    (port,) = free_ports(1)
    cli = subprocess.run(
        [sys.executable, "-m", "trace_rt", "client", str(videos[0]), "--url", f"127.0.0.1:{port}"],
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 2
    assert f"cannot reach the Triton server at 127.0.0.1:{port}" in cli.stderr
    assert "Traceback" not in cli.stderr


QUESTION = 'What is "this" {} {0} {question}?'


def test_free_question_and_frame_timestamps_equal_run(client, local, videos):
    """A free question (braces and quotes kept literally) and frame-aligned timestamps
    through the protocol give what the in-process pipeline gives, `answer` included."""
    got = client.infer(
        videos[0], task=None, question=QUESTION, max_new_tokens=STEPS, timestamp_mode="frames"
    )
    gen = GenerationConfig(max_new_tokens=STEPS, timestamps="frames")
    want = local.run(videos[0], None, question=QUESTION, gen=gen)
    _same(got, want)
    assert got["task"] == "custom" and got["answer"] == want["answer"]
    assert want["prompt_ids"] == local.prepare(videos[0], None, question=QUESTION).prompt_ids
    with pytest.raises(ServingError, match="timestamps must be one of free, frames"):
        client.infer(videos[0], task="dvc", max_new_tokens=4, timestamp_mode="frame")


def test_cli_client_question_equals_cli_run(server, artifact, videos):
    common = ["--question", QUESTION, "--timestamps", "frames", "--max-new-tokens", str(STEPS)]
    out, want = _cli_run_and_client(server, artifact, videos[3], common)
    got = json.loads(out)
    _same(got, want)
    assert got["answer"] == want["answer"] and got["task"] == want["task"] == "custom"
