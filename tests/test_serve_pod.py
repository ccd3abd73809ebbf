"""trace-rt serve as a pod runs it: JSON logs and a graceful drain on SIGTERM (a real
tritonserver, a request in flight when the signal comes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from trace_rt.serving.podlog import LogFollower, ServeLog
from trace_rt.serving.server import free_ports

ROOT = Path(__file__).resolve().parents[1]


def test_triton_log_lines_become_json(tmp_path):
    out = tmp_path / "out"
    log_file = tmp_path / "triton.log"
    log_file.write_text(
        'I1130 07:04:54.393681 19514 server.cc:321] "Timeout 10: Found 0 model versions"\n'
        "E1130 07:04:55.000001 19514 model.py:12] failed to load\n"
        "  a continuation line\n"
        "W1130 07:04:56.5 19514 pinned_memory_manager.cc:1"  # no newline yet: not emitted
    )
    with out.open("w") as stream:
        f = LogFollower(log_file, ServeLog("json", stream), poll=0.01)
        f.start()
        time.sleep(0.2)
        f.stop()
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(r["level"], r["msg"]) for r in recs] == [
        ("info", "Timeout 10: Found 0 model versions"),
        ("error", "failed to load"),
        ("error", "  a continuation line"),
    ]
    assert recs[0]["source"] == "tritonserver" and recs[0]["pid"] == 19514
    assert recs[0]["at"] == "server.cc:321" and recs[0]["time"].endswith("+00:00")


def test_which_errors_are_retried():
    from trace_rt.serving.routing import retryable

    assert retryable("StatusCode.UNAVAILABLE", "Received http2 header with status: 502")
    assert retryable("StatusCode.RESOURCE_EXHAUSTED", "queue full")
    draining = "Request for unknown model: 'trace_pipeline' has no available versions"
    assert retryable("StatusCode.NOT_FOUND", draining)
    assert not retryable("StatusCode.NOT_FOUND", "Request for unknown model: 'x' is not found")
    assert not retryable("StatusCode.INVALID_ARGUMENT", "task 'dcv' is not one of dvc, mr")
    assert not retryable("StatusCode.INTERNAL", "NotAVideoError: not a video")


def test_text_format_is_unchanged(tmp_path):
    out = tmp_path / "out"
    with out.open("w") as stream:
        log = ServeLog("text", stream)
        log("ready: gRPC x")
        log("listening on 0.0.0.0", "warning")
    assert out.read_text() == "ready: gRPC x\ntrace-rt: warning: listening on 0.0.0.0\n"
    with pytest.raises(ValueError, match="text or json"):
        ServeLog("yaml")


@pytest.fixture(scope="module")
def repo(tiny_ckpt, tmp_path_factory) -> Path:
    from export.onnx_export import export_onnx
    from triton_repo.build import build_repository

    root = tmp_path_factory.mktemp("pod")
    art = export_onnx(tiny_ckpt, root / "art", progress=False)
    return build_repository(art, root / "repo", progress=False)


@pytest.mark.slow
def test_sigterm_drains_in_flight_requests_and_refuses_new_ones(repo, clip_video, tmp_path):
    from trace_rt.serving.client import ServingError, TraceClient
    from trace_rt.serving.routing import RetryableError, RoutedClient, retryable

    grpc, http, metrics = free_ports(3)
    cmd = [sys.executable, "-m", "trace_rt", "serve", "--repo", str(repo)]
    cmd += ["--grpc-port", str(grpc), "--http-port", str(http), "--metrics-port", str(metrics)]
    cmd += ["--log-format", "json", "--drain-timeout", "60"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if '"msg": "ready: ' in line:
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert ready.wait(180), "".join(lines[-20:])
        url = f"127.0.0.1:{grpc}"
        with TraceClient(url) as c:  # how long a long request takes here
            t0 = time.monotonic()
            c.infer(clip_video, max_new_tokens=200, ignore_eos=True)
            per_token = (time.monotonic() - t0) / 200
        n = min(1024, max(400, int(4.0 / per_token)))  # in flight for seconds (the limit)
        got: dict = {}

        def long() -> None:
            with TraceClient(url) as c:
                try:
                    got["result"] = c.infer(clip_video, max_new_tokens=n, ignore_eos=True)
                except ServingError as e:
                    got["error"] = e

        t = threading.Thread(target=long)
        t.start()
        time.sleep(min(1.5, n * per_token / 4))
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        # Arrives while draining: refused with a status a client may retry elsewhere.
        with RoutedClient(url, retries=0) as c, pytest.raises(ServingError) as refused:
            c.infer(clip_video, max_new_tokens=4)
        status = c.last_status
        t.join(120)
        assert proc.wait(90) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(5)
    # The request in flight when SIGTERM came finished, whole.
    assert "error" not in got, got
    assert len(got["result"]["token_ids"]) == n
    assert got["result"]["stop_reason"] == "max_new_tokens"
    assert retryable(status, str(refused.value)), (status, refused.value)
    assert isinstance(refused.value, RetryableError)
    # Every line on stderr is a JSON object: ours and tritonserver's.
    recs = [json.loads(x) for x in lines]
    assert all({"time", "level", "source", "msg"} <= r.keys() for r in recs)
    ours = [r["msg"] for r in recs if r["source"] == "trace-rt"]
    assert ours[-2].startswith("draining") and ours[-1] == "stopped"
    stopped = next(r for r in recs if r["msg"] == "stopped")
    assert stopped["exit_code"] == 0
    triton = [r for r in recs if r["source"] == "tritonserver"]
    assert any("in-flight" in r["msg"] for r in triton)  # Triton's drain, forwarded
