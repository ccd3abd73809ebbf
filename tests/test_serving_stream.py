"""Streaming through a real tritonserver, and the server's lifetime.

Streaming needs a model that completes events: the "walker" checkpoint (tests/walker.py),
whose greedy decoding emits ``0123.4 <sync> 4.5 <sync> a dog <sync>`` again and again, so
a token budget of N gives about N / 12 events.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.triton_server import running_server
from trace_rt.generate import GenerationConfig
from trace_rt.pipeline import Pipeline
from trace_rt.serving.client import TraceClient

pytest.importorskip("tritonclient.grpc")

STEPS = 120


@pytest.fixture(scope="module")
def walker_artifact(tiny_ckpt, tmp_path_factory) -> Path:
    from export.onnx_export import export_onnx
    from tests.walker import make_walker

    root = tmp_path_factory.mktemp("walker-serve")
    ckpt = make_walker(tiny_ckpt, root / "ckpt", end_with_eos=False)
    return export_onnx(ckpt, root / "art", progress=False)


@pytest.fixture(scope="module")
def repo(walker_artifact, tmp_path_factory) -> Path:
    from triton_repo.build import build_repository

    out = tmp_path_factory.mktemp("walker-repo") / "repo"
    return build_repository(walker_artifact, out, encoders="bls", progress=False)


@pytest.fixture(scope="module")
def server(repo):
    with running_server(repo) as s:
        yield s


def _is_gone(pid: int, within: float = 20.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # A zombie (exited, not yet reaped by a dead parent's reaper) counts as gone.
        stat = Path(f"/proc/{pid}/stat")
        if stat.exists() and stat.read_text().split(") ")[-1].startswith("Z"):
            return True
        time.sleep(0.1)
    return False


def test_events_stream_one_by_one_before_the_final_response(server, walker_artifact, clip_video):
    arrivals: list[tuple[float, dict]] = []
    with TraceClient(server.grpc_url) as c:
        result = c.infer(
            clip_video,
            task="dvc",
            max_new_tokens=STEPS,
            on_event=lambda e: arrivals.append((time.perf_counter(), e)),
        )
    done = time.perf_counter()
    events = [e for _, e in arrivals]
    assert len(events) >= 8  # one response per event
    assert [e.pop("index") for e in events] == list(range(len(events)))
    assert events == result["events"]  # the stream is exactly the final result's events
    # All but the last (which the token budget may cut short) are the walker's event.
    assert all(
        e == {"timestamps": [123.4], "scores": [4.5], "caption": "a dog"} for e in events[:-1]
    )
    assert all(t < done for t, _ in arrivals)
    want = Pipeline.from_dir(walker_artifact, "onnxruntime", cache_dir=False).run(
        clip_video, "dvc", gen=GenerationConfig(max_new_tokens=STEPS)
    )
    assert result["token_ids"] == want["token_ids"] and result["events"] == want["events"]


def test_first_event_arrives_long_before_the_last(server, clip_video):
    # With a long budget, the first event must not wait for the end of decoding.
    arrivals: list[float] = []
    with TraceClient(server.grpc_url) as c:
        t0 = time.perf_counter()
        c.infer(clip_video, task="dvc", max_new_tokens=1000, on_event=lambda e: arrivals.append(
            time.perf_counter()))  # fmt: skip
        total = time.perf_counter() - t0
    assert len(arrivals) >= 60
    assert arrivals[0] - t0 < 0.5 * total


def test_server_dies_with_the_process_that_started_it(repo, tmp_path):
    # A test run killed outright (no teardown) must not leave tritonserver running.
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).parents[1])!r})
        from tests.triton_server import free_ports
        from trace_rt.serving.server import TritonServer
        g, h, m = free_ports(3)
        s = TritonServer({str(repo)!r}, grpc_port=g, http_port=h, metrics_port=m).start()
        print(s.proc.pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == -signal.SIGKILL, out.stderr
    assert _is_gone(int(out.stdout.split()[0]))


def test_server_stopped_when_tests_fail(repo, tmp_path):
    test = tmp_path / "test_fails.py"
    test.write_text(
        textwrap.dedent(f"""
        import pytest
        from tests.triton_server import running_server

        @pytest.fixture
        def server():
            with running_server(__import__("pathlib").Path({str(repo)!r})) as s:
                print("PID", s.proc.pid, flush=True)
                yield s

        def test_fails(server):
            assert server.ready()
            raise AssertionError("deliberate")
        """)
    )
    root = Path(__file__).parents[1]
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", str(test)],
        capture_output=True, text=True, cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
    )  # fmt: skip
    assert out.returncode == 1 and "deliberate" in out.stdout
    pid = int(next(w for w in out.stdout.split("PID ")[1:]).split()[0])
    assert _is_gone(pid, within=1.0)  # stopped by teardown, before pytest exited


def test_frames_tensor_streams_too(server, walker_artifact, clip_video):
    pipe = Pipeline.from_dir(walker_artifact, "onnxruntime", cache_dir=False)
    prep = pipe.prepare(clip_video, "dvc")
    got: list[dict] = []
    with TraceClient(server.grpc_url) as c:
        res = c.infer(
            None,
            task="dvc",
            frames=prep.pixel_values,
            timestamps=np.asarray(prep.clip.times),
            max_new_tokens=40,
            on_event=got.append,
        )
    # The stream is exactly the final result's events, which are the walker's events as
    # the local pipeline makes them from the same frames (40 tokens: 2 whole events and a
    # third whose caption the budget cuts).
    assert [e.pop("index") for e in got] == list(range(len(got)))
    assert got == res["events"]
    want = pipe.run_prepared(prep, GenerationConfig(max_new_tokens=40))
    assert res["token_ids"] == want["token_ids"] and res["events"] == want["events"]
    walker = {"timestamps": [123.4], "scores": [4.5], "caption": "a dog"}
    assert len(got) == 3 and got[:2] == [walker, walker]
    assert got[2] | {"caption": "a dog"} == walker and "a dog".startswith(got[2]["caption"])


def test_serve_command_ready_then_ctrl_c(repo, clip_video):
    from trace_rt.serving.server import free_ports

    g, h, m = free_ports(3)
    cmd = [sys.executable, "-m", "trace_rt", "serve", "--repo", str(repo)]
    ports = ["--grpc-port", str(g), "--http-port", str(h), "--metrics-port", str(m)]
    # Started with SIGINT ignored, as a shell starts a background job (`trace-rt serve &`):
    # Ctrl-C / kill -INT must stop it all the same.
    proc = subprocess.Popen(
        [*cmd, *ports],
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    try:
        lines = []
        for line in proc.stderr:  # blocks until serve prints; a failed start ends the stream
            lines.append(line)
            if line.startswith("ready:"):
                break
        assert lines and lines[-1].startswith("ready:"), "".join(lines)
        assert f"gRPC 127.0.0.1:{g}" in lines[-1] and f":{m}/metrics" in lines[-1]
        with TraceClient(f"127.0.0.1:{g}") as c:
            assert c.infer(clip_video, task="dvc", max_new_tokens=13)["events"]
        server_pids = subprocess.run(
            ["pgrep", "-f", f"tritonserver.*--grpc-port={g}"], capture_output=True, text=True
        ).stdout.split()
        assert len(server_pids) == 1
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        assert _is_gone(int(server_pids[0]), within=1.0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cancelled_request_stops_decoding(server, clip_video):
    # The client closes its stream while a long request decodes: the model notices within
    # 50 ms, stops, and counts the request as cancelled; the server goes on.
    import urllib.request

    import tritonclient.grpc as g

    def cancelled() -> float:
        text = urllib.request.urlopen(server.metrics_url).read().decode()
        hits = [ln for ln in text.splitlines() if 'outcome="cancelled"' in ln]
        return sum(float(ln.rsplit(" ", 1)[1]) for ln in hits)

    before = cancelled()
    first_event = threading.Event()
    client = g.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: first_event.set())
    video = g.InferInput("video", [clip_video.stat().st_size], "UINT8")
    video.set_data_from_numpy(np.frombuffer(clip_video.read_bytes(), np.uint8))
    task = g.InferInput("task", [1], "BYTES")
    task.set_data_from_numpy(np.array([b"dvc"], dtype=np.object_))
    budget = g.InferInput("max_new_tokens", [1], "INT32")
    budget.set_data_from_numpy(np.array([1024], np.int32))
    client.async_stream_infer("trace_pipeline", [video, task, budget])
    assert first_event.wait(60)
    client.stop_stream(cancel_requests=True)
    client.close()
    deadline = time.monotonic() + 30
    while cancelled() < before + 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cancelled() == before + 1
    with TraceClient(server.grpc_url) as c:
        assert c.infer(clip_video, task="dvc", max_new_tokens=13)["events"]


def test_timeout_bounds_the_whole_request_however_events_keep_coming(server, clip_video):
    # Responses keep arriving (the client handles each event in 0.1 s, ~85 of them), so a
    # per-response timeout never fires; the request's timeout is a deadline for all of it,
    # and the request is cancelled past it.
    from trace_rt.serving.client import ServingError

    events: list[dict] = []

    def slow_consumer(event: dict) -> None:
        events.append(event)
        time.sleep(0.1)

    with TraceClient(server.grpc_url) as c:
        t0 = time.perf_counter()
        with pytest.raises(ServingError, match=r"no final response within 2 s"):
            c.infer(
                clip_video, task="dvc", max_new_tokens=1024, ignore_eos=True,
                on_event=slow_consumer, timeout=2.0,
            )  # fmt: skip
        elapsed = time.perf_counter() - t0
    assert events  # it was streaming when the deadline passed
    assert elapsed < 2.0 + 1.5
    with TraceClient(server.grpc_url) as c:  # and the server goes on
        assert c.infer(clip_video, task="dvc", max_new_tokens=13)["events"]
