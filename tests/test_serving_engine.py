"""One engine per Triton instance (issue 10), against a real tritonserver on CPU.

Concurrent requests share the instance's decode steps (continuous batching over its KV
slots) and its video cache. The oracle for every result is the in-process Pipeline running
that request alone (one KV slot, no cache, greedy or seeded), i.e. `trace-rt run`: batching,
admission order, prefix reuse and the other requests must change nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.triton_server import long_gop_video, running_server
from trace_rt.generate import GenerationConfig
from trace_rt.pipeline import Pipeline
from trace_rt.serving.client import ServingError, TraceClient

pytest.importorskip("tritonclient.grpc")

QUERIES = ["a red circle moves to the left", "the blue square stops", "something flashes"]
SLOTS = 4  # fewer than the 8 clients: some wait for a slot and join mid-batch
LONG = 2048  # tokens (ignore_eos) of the requests that must outlive a bad or cancelled one
CANCELLED_BUDGET = 3500  # the leaving stream's: more than it decodes (tiny's context: 4096)


@pytest.fixture(scope="module")
def artifact(tiny_ckpts, tmp_path_factory) -> Path:
    from export.onnx_export import export_onnx

    return export_onnx(tiny_ckpts[1], tmp_path_factory.mktemp("eng") / "art", progress=False)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> list[Path]:
    """Clips of different lengths, rates and sizes; the first four are the eight-client
    test's alone (it counts their cache misses), whatever order the tests run in."""
    from tests.media import write_video

    root = tmp_path_factory.mktemp("eng-videos")
    shapes = [
        (96, 64, 10, 40), (80, 80, 12, 30), (64, 48, 8, 56), (112, 64, 15, 45),
        (72, 56, 10, 33), (64, 64, 9, 27), (88, 48, 11, 38), (96, 80, 7, 29),
    ]  # fmt: skip
    return [
        Path(write_video(root / f"v{i}.mp4", width=w, height=h, fps=fps, n_frames=n))
        for i, (w, h, fps, n) in enumerate(shapes)
    ]


@pytest.fixture(scope="module")
def local(artifact) -> Pipeline:
    return Pipeline.from_dir(artifact, "onnxruntime", cache_dir=False)


@pytest.fixture(scope="module")
def server(artifact, tmp_path_factory):
    from triton_repo.build import build_repository

    repo = build_repository(
        artifact,
        tmp_path_factory.mktemp("eng-repo") / "repo",
        max_sequences=SLOTS,
        decode_workers=4,
        max_new_tokens=CANCELLED_BUDGET,
        progress=False,
    )
    with running_server(repo) as s:
        yield s


def _solo(local: Pipeline, video: Path, task: str, query: str | None, **gen) -> dict:
    return local.run(video, task, query=query, gen=GenerationConfig(**gen))


def _same(got: dict, want: dict) -> None:
    for key in ("token_ids", "events", "prompt_ids", "frame_times", "duration", "stop_reason"):
        assert got[key] == want[key], key


def _metrics(server) -> dict[str, float]:
    text = urllib.request.urlopen(server.metrics_url).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("trace_"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def _sum(metrics: dict[str, float], prefix: str, part: str = "") -> float:
    return sum(v for k, v in metrics.items() if k.startswith(prefix) and part in k)


def _concurrently(fns: list) -> list:
    """Run *fns* on threads released together; their results (or exceptions), in order."""
    out: list = [None] * len(fns)
    start = threading.Barrier(len(fns))

    def one(i: int) -> None:
        start.wait()
        try:
            out[i] = fns[i]()
        except BaseException as e:  # returned, and checked by the caller
            out[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return out


def test_eight_concurrent_clients_each_get_their_solo_result(server, local, videos):
    # Mixed tasks, budgets, greedy and seeded sampling, on four videos (two requests each:
    # the second of a pair may find the first's video and prefix in the cache).
    tasks = [("dvc", None), ("mr", QUERIES[0]), ("vhd", QUERIES[1]), ("mr", QUERIES[2])]
    jobs = []
    for i in range(8):
        task, query = tasks[i % 4]
        gen = {"max_new_tokens": 40 + 8 * i, "ignore_eos": i % 2 == 0}
        if i % 3 == 1:
            gen |= {"temperature": 0.9, "top_p": 0.95, "seed": 11 + i}
        jobs.append((videos[i % 4], task, query, gen))
    before = _metrics(server)

    def request(video, task, query, gen):
        def send() -> dict:
            with TraceClient(server.grpc_url) as c:
                return c.infer(video, task=task, query=query, **gen)

        return send

    results = _concurrently([request(*job) for job in jobs])
    for (video, task, query, gen), got in zip(jobs, results, strict=True):
        assert isinstance(got, dict), got
        _same(got, _solo(local, video, task, query, **gen))
        assert got["video"] == str(video) and len(got["video_id"]) == 32
    assert len({json.dumps(r["token_ids"]) for r in results}) == 8  # they really differ
    # They shared decode steps: some steps advanced several sequences at once.
    after = _metrics(server)
    batched = sum(
        after[k] - before.get(k, 0)
        for k in after
        if k.startswith("trace_decode_steps_total") and 'batch_size="1"' not in k
    )
    assert batched > 0 and max(r["engine"]["mean_batch"] for r in results) > 1
    # Each video was decoded and encoded once, whichever of its two requests came first.
    misses = 'trace_video_cache_misses_total{model="trace_pipeline"}'
    assert after[misses] - before.get(misses, 0) == 4
    assert sum(not r["cache"]["video"] for r in results) == 4
    _wait_idle(server)


SLOTS_IN_USE = 'trace_kv_slots_in_use{model="trace_pipeline"}'
WAITING = 'trace_requests_waiting{model="trace_pipeline"}'


def _wait_for(server, condition, within: float = 60.0) -> None:
    deadline = time.monotonic() + within
    while not condition(m := _metrics(server)):
        assert time.monotonic() < deadline, m
        time.sleep(0.05)


def _wait_idle(server) -> None:
    """Every KV slot free again and nothing queued (cancelled or failed ones included)."""
    _wait_for(server, lambda m: m[SLOTS_IN_USE] == 0 and m[WAITING] == 0, within=10)


class CancellingClient:
    """A raw gRPC client with one long request (far more tokens than it can decode before
    the test ends it), which leaves by closing its stream."""

    def __init__(self, server, video: Path, budget: int = CANCELLED_BUDGET):
        import tritonclient.grpc as g

        self.client = g.InferenceServerClient(server.grpc_url)
        self.client.start_stream(callback=lambda result, error: None)
        inputs = []
        for name, array, kind in (
            ("video", np.frombuffer(video.read_bytes(), np.uint8), "UINT8"),
            ("task", np.array([b"dvc"], dtype=np.object_), "BYTES"),
            ("max_new_tokens", np.array([budget], np.int32), "INT32"),
            ("ignore_eos", np.array([True]), "BOOL"),
        ):
            tensor = g.InferInput(name, list(array.shape), kind)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        self.client.async_stream_infer("trace_pipeline", inputs)

    def leave(self) -> None:
        self.client.stop_stream(cancel_requests=True)
        self.client.close()


def test_bad_and_cancelled_requests_mid_batch_leave_the_others_intact(server, local, videos):
    good = [(videos[4], "dvc", None), (videos[5], "mr", QUERIES[0]), (videos[6], "vhd", QUERIES[2])]
    gen = {"max_new_tokens": LONG, "ignore_eos": True}
    before = _metrics(server)
    leaving = CancellingClient(server, videos[7])
    _wait_for(server, lambda m: m[SLOTS_IN_USE] == 1)  # it is decoding
    results: dict[int, object] = {}
    finished: dict[int, float] = {}

    def good_request(i: int) -> None:
        video, task, query = good[i]
        with TraceClient(server.grpc_url) as c:
            results[i] = c.infer(video, task=task, query=query, **gen)
        finished[i] = time.monotonic()

    threads = [threading.Thread(target=good_request, args=(i,)) for i in range(len(good))]
    for t in threads:
        t.start()
    _wait_for(server, lambda m: m[SLOTS_IN_USE] == len(good) + 1)  # one batch of four
    # Now, in the middle of that batch: a corrupt video, a bad parameter, a client leaving.
    with TraceClient(server.grpc_url) as c:
        with pytest.raises(ServingError, match="NotAVideoError"):
            c.infer(b"\x00\x01 not a video at all" * 64, task="dvc", max_new_tokens=8)
        with pytest.raises(ServingError, match="missing query"):
            c.infer(videos[7], task="mr", max_new_tokens=8)
    leaving.leave()
    left = time.monotonic()
    for t in threads:
        t.join(timeout=300)
    assert min(finished.values()) > left  # the good ones were still decoding
    for i, (video, task, query) in enumerate(good):
        got = results[i]
        assert isinstance(got, dict), got
        _same(got, _solo(local, video, task, query, **gen))
        assert got["stop_reason"] == "max_new_tokens" and len(got["token_ids"]) == LONG
    # They shared decode steps with the one that left (the slot gauge read four above).
    four = 'trace_decode_steps_total{batch_size="4",model="trace_pipeline"}'
    assert _metrics(server)[four] > before.get(four, 0)
    # The stream that left is counted as cancelled and its KV slot is free again.
    _wait_for(
        server,
        lambda m: (
            _sum(m, "trace_requests_total", 'outcome="cancelled"')
            == _sum(before, "trace_requests_total", 'outcome="cancelled"') + 1
        ),
        within=20,
    )
    _wait_idle(server)
    with TraceClient(server.grpc_url) as c:  # and the instance goes on
        assert c.infer(videos[4], task="dvc", max_new_tokens=4)["token_ids"]


def test_video_id_reuse_equals_sending_the_bytes(server, local, tmp_path):
    from tests.media import write_video

    video = Path(write_video(tmp_path / "reuse.mp4", width=80, height=48, fps=10, n_frames=35))
    before = _metrics(server)
    with TraceClient(server.grpc_url) as c:
        first = c.infer(video, task="mr", query=QUERIES[0], max_new_tokens=32)
        by_id = c.infer(
            None, video_id=first["video_id"], task="mr", query=QUERIES[1], max_new_tokens=32
        )
        again = c.infer(video, task="dvc", max_new_tokens=24)
    _same(first, _solo(local, video, "mr", QUERIES[0], max_new_tokens=32))
    _same(by_id, _solo(local, video, "mr", QUERIES[1], max_new_tokens=32))
    _same(again, _solo(local, video, "dvc", None, max_new_tokens=24))
    assert first["cache"] == {"video": False, "prefix": False}
    # The second question reuses the encoded video and the prompt prefix's K/V.
    assert by_id["cache"] == {"video": True, "prefix": True}
    assert by_id["video_id"] == first["video_id"] == again["video_id"]
    assert by_id["timing_ms"]["video"] == by_id["timing_ms"]["vision"] == 0
    assert again["cache"]["video"] is True
    after = _metrics(server)
    hits = 'trace_video_cache_hits_total{model="trace_pipeline"}'
    misses = 'trace_video_cache_misses_total{model="trace_pipeline"}'
    assert after[hits] - before.get(hits, 0) == 2
    assert after[misses] - before.get(misses, 0) == 1
    assert after['trace_video_cache_bytes{model="trace_pipeline"}'] > 0


def test_unknown_video_id_is_a_clear_error(server, videos):
    with TraceClient(server.grpc_url) as c:
        with pytest.raises(ServingError, match=r"UnknownVideoError: .*send the video bytes"):
            c.infer(None, video_id="0" * 32, task="dvc", max_new_tokens=4)
        with pytest.raises(ServingError, match=r"'video_id' must be the 32 hex digits"):
            c.infer(None, video_id="../../etc/passwd", task="dvc", max_new_tokens=4)
        with pytest.raises(ServingError, match=r"not both 'video' and 'video_id'"):
            c.infer(videos[7], video_id="0" * 32, task="dvc", max_new_tokens=4)
        assert c.infer(videos[7], task="dvc", max_new_tokens=4)["token_ids"]


def test_concurrent_requests_for_one_new_video_encode_it_once(server, local, tmp_path):
    from tests.media import write_video

    video = Path(write_video(tmp_path / "once.mp4", width=64, height=56, fps=12, n_frames=30))
    before = _metrics(server)
    questions = [("mr", QUERIES[0]), ("mr", QUERIES[1]), ("dvc", None), ("vhd", QUERIES[2])]

    def request(task, query):
        def send() -> dict:
            with TraceClient(server.grpc_url) as c:
                return c.infer(video, task=task, query=query, max_new_tokens=24)

        return send

    results = _concurrently([request(*q) for q in questions])
    for (task, query), got in zip(questions, results, strict=True):
        assert isinstance(got, dict), got
        _same(got, _solo(local, video, task, query, max_new_tokens=24))
    after = _metrics(server)
    misses = 'trace_video_cache_misses_total{model="trace_pipeline"}'
    assert after[misses] - before.get(misses, 0) == 1
    assert sum(not r["cache"]["video"] for r in results) == 1
    assert len({r["video_id"] for r in results}) == 1


def test_cli_client_by_video_id(server, artifact, videos):
    exe = [sys.executable, "-m", "trace_rt", "client", "--url", server.grpc_url]
    common = ["--task", "mr", "--query", QUERIES[2], "--max-new-tokens", "20"]
    first = json.loads(
        subprocess.run(
            [*exe, str(videos[6]), *common], capture_output=True, text=True, check=True
        ).stdout
    )
    again = subprocess.run(
        [*exe, "--video-id", first["video_id"], *common], capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr
    got = json.loads(again.stdout)
    _same(got, first)
    assert got["cache"]["video"] is True and got["video"] == f"<video_id {first['video_id']}>"
    unknown = subprocess.run(
        [*exe, "--video-id", "f" * 32, *common], capture_output=True, text=True
    )
    assert unknown.returncode == 2
    assert "not in this server's video cache" in unknown.stderr
    assert "Traceback" not in unknown.stderr
    neither = subprocess.run([*exe, *common], capture_output=True, text=True)
    assert neither.returncode == 2 and "--video-id" in neither.stderr


BUDGET_S = 3.0  # the second server's decode budget per request


@pytest.fixture(scope="module")
def no_cache_server(artifact, tmp_path_factory):
    """No room in the video cache (a video lives only while its requests run) and a
    short decode budget."""
    from triton_repo.build import build_repository

    repo = build_repository(
        artifact,
        tmp_path_factory.mktemp("eng-repo") / "no-cache",
        video_cache_mb=0,
        video_time_budget_s=BUDGET_S,
        progress=False,
    )
    with running_server(repo) as s:
        yield s


def test_an_evicted_video_id_asks_for_the_bytes(no_cache_server, videos):
    s = no_cache_server
    with TraceClient(s.grpc_url) as c:
        first = c.infer(videos[0], task="dvc", max_new_tokens=4)
        with pytest.raises(ServingError, match=r"never sent, or evicted\): send the video bytes"):
            c.infer(None, video_id=first["video_id"], task="dvc", max_new_tokens=4)
        again = c.infer(videos[0], task="dvc", max_new_tokens=4)
        assert again["video_id"] == first["video_id"] and again["cache"]["video"] is False
        evictions = _metrics(s)['trace_video_cache_evictions_total{model="trace_pipeline"}']
        assert evictions == 2


def test_a_waiter_does_not_inherit_the_first_clients_leaving(no_cache_server, tmp_path):
    # Two requests for one new video: the first decodes it (a video far slower to decode
    # than the budget), the second waits for that; the first client leaves mid-decode.
    # The second must not be cancelled with it: it decodes the video itself, and gets its
    # own outcome (here the budget's VideoTimeoutError) rather than a silent end.
    s = no_cache_server
    video = long_gop_video(tmp_path / "gop.mkv")
    before = _metrics(s)
    leaving = CancellingClient(s, video, budget=64)
    time.sleep(0.3)  # its worker is decoding now
    out: dict[str, object] = {}

    def wait_for_it() -> None:
        try:
            with TraceClient(s.grpc_url) as c:
                out["got"] = c.infer(video, task="dvc", max_new_tokens=8, timeout=30)
        except ServingError as e:
            out["got"] = e

    waiter = threading.Thread(target=wait_for_it)
    waiter.start()
    time.sleep(0.3)  # it waits on the first one's decode
    leaving.leave()
    waiter.join(60)
    assert "VideoTimeoutError" in str(out["got"]), out["got"]
    after = _metrics(s)
    for outcome in ("cancelled", "invalid"):
        want = _sum(before, "trace_requests_total", f'outcome="{outcome}"') + 1
        assert _sum(after, "trace_requests_total", f'outcome="{outcome}"') == want, outcome
    misses = 'trace_video_cache_misses_total{model="trace_pipeline"}'
    assert after[misses] - before.get(misses, 0) == 2  # the waiter decoded it again
