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
    assert len(got) == len(res["events"]) >= 3
