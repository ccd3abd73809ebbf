"""Serving under hostile or careless use (issue 16), against a real tritonserver on CPU.

One server with small limits: an 8 MB payload limit and a 1 s decode budget per request.
Oversized payloads must be refused and their memory given back; a video that decodes
slowly must neither block the instance's other requests nor run past its budget;
playlists and SDP files are refused; Triton's admin APIs need the admin key; the client
checks files and the server's limit before it reads anything.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.triton_server import long_gop_video, running_server
from trace_rt.serving.client import ServingError, TraceClient

pytest.importorskip("tritonclient.grpc")

MAX_VIDEO = 8_000_000
BUDGET_S = 1.0
CLI = [sys.executable, "-m", "trace_rt"]


@pytest.fixture(scope="module")
def repo(tiny_ckpt, tmp_path_factory) -> Path:
    from export.onnx_export import export_onnx
    from triton_repo.build import build_repository

    root = tmp_path_factory.mktemp("hardening")
    art = export_onnx(tiny_ckpt, root / "art", progress=False)
    return build_repository(
        art,
        root / "repo",
        max_video_bytes=MAX_VIDEO,
        video_time_budget_s=BUDGET_S,
        decode_workers=2,
        progress=False,
    )


@pytest.fixture(scope="module")
def server(repo):
    with running_server(repo) as s:
        yield s


@pytest.fixture(scope="module")
def slow_video(tmp_path_factory) -> Path:
    """~6 MB whose sampling decodes 200k frames: seconds, far past BUDGET_S."""
    return long_gop_video(tmp_path_factory.mktemp("slow") / "long_gop.mkv")


def _memory_mb(pid: int) -> float:
    """Anonymous + shared-memory resident MB of tritonserver and its backend stubs."""
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    total = 0
    for p in [pid, *map(int, children.stdout.split())]:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith(("RssAnon:", "RssShmem:")):
                total += int(line.split()[1])
    return total / 1024


def test_oversized_payload_is_refused_and_its_memory_returns(server, clip_video):
    with TraceClient(server.grpc_url) as c:
        c.infer(clip_video, task="dvc", max_new_tokens=4)  # warm: pools at working size
    base = _memory_mb(server.proc.pid)
    payload = bytes(48 << 20)
    with TraceClient(server.grpc_url) as c:  # a client that sends too much, then leaves
        t0 = time.perf_counter()
        with pytest.raises(ServingError, match=rf"{len(payload)} bytes, over .* {MAX_VIDEO}"):
            c.infer(payload, task="dvc", max_new_tokens=4)
        refused_s = time.perf_counter() - t0
    del payload
    # The memory must come back, not within a set time: a loaded CI machine (nice 19
    # beside other jobs) once took over 10 s.
    deadline = time.monotonic() + 40
    while (after := _memory_mb(server.proc.pid)) > base + 16 and time.monotonic() < deadline:
        time.sleep(0.2)
    # Before: tritonserver kept ~1.5x the payload, and shared memory (counted in the
    # server and in the stub) 2x.
    assert after < base + 16, f"{base:.0f} MB before, {after:.0f} MB after"
    assert refused_s < 10  # 48 MiB over loopback: about a second here
    with TraceClient(server.grpc_url) as c:
        assert c.infer(clip_video, task="dvc", max_new_tokens=4)["token_ids"]


def test_slow_video_neither_blocks_the_instance_nor_outlives_its_budget(
    server, slow_video, clip_video
):
    done: dict[str, float] = {}
    outcome: dict[str, object] = {}

    def send(name: str, video: Path) -> None:
        try:
            with TraceClient(server.grpc_url) as c:
                outcome[name] = c.infer(video, task="dvc", max_new_tokens=8)
        except ServingError as e:
            outcome[name] = e
        done[name] = time.perf_counter()

    t0 = time.perf_counter()
    slow = threading.Thread(target=send, args=("slow", slow_video))
    slow.start()
    time.sleep(0.3)  # the slow video is decoding now
    send("normal", clip_video)
    slow.join(60)
    assert isinstance(outcome["normal"], dict) and outcome["normal"]["token_ids"]
    assert isinstance(outcome["slow"], ServingError)
    assert "VideoTimeoutError" in str(outcome["slow"]), outcome["slow"]
    # The normal request did not wait for the slow one; the slow one stopped near its
    # budget (it needs several seconds unbounded).
    assert done["normal"] < done["slow"]
    assert done["slow"] - t0 < BUDGET_S + 2.5


def test_client_leaving_stops_the_decode(server, slow_video, clip_video):
    # The client closes its stream while its video decodes: the decode stops (counted as
    # cancelled; unchecked, it would run on to its budget and count as invalid) and the
    # instance goes on.
    import numpy as np
    import tritonclient.grpc as g

    def outcomes() -> dict[str, float]:
        text = urllib.request.urlopen(server.metrics_url).read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("trace_requests_total{"):
                kind = line.split('outcome="')[1].split('"')[0]
                out[kind] = out.get(kind, 0) + float(line.rsplit(" ", 1)[1])
        return out

    before = outcomes()
    client = g.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: None)
    video = g.InferInput("video", [slow_video.stat().st_size], "UINT8")
    video.set_data_from_numpy(np.frombuffer(slow_video.read_bytes(), np.uint8))
    task = g.InferInput("task", [1], "BYTES")
    task.set_data_from_numpy(np.array([b"dvc"], dtype=np.object_))
    client.async_stream_infer("trace_pipeline", [video, task])
    time.sleep(0.3)  # decoding now
    client.stop_stream(cancel_requests=True)
    client.close()
    deadline = time.monotonic() + 20
    while sum(outcomes().values()) < sum(before.values()) + 1:
        assert time.monotonic() < deadline, outcomes()
        time.sleep(0.05)
    after = outcomes()
    assert after.get("cancelled", 0) == before.get("cancelled", 0) + 1, (before, after)
    with TraceClient(server.grpc_url) as c:
        assert c.infer(clip_video, task="dvc", max_new_tokens=4)["token_ids"]


NOT_MEDIA = ("UnsupportedFormatError", "NotAVideoError")  # the first is a kind of the second
MUST_REFUSE = {
    "ffconcat": NOT_MEDIA,
    "ffconcat_absolute": NOT_MEDIA,
    "sdp": NOT_MEDIA,
    "hls": NOT_MEDIA,
    "concat_protocol_bytes": NOT_MEDIA,
    "file_url_bytes": NOT_MEDIA,
    "http_url_bytes": NOT_MEDIA,
    "huge_dimensions": ("VideoTooLargeError",),
}


def test_hostile_corpus_through_the_server(server, tmp_path, clip_video):
    # Every probe of tests/hostile_media.py, sent as a request's bytes: a result or an
    # error naming its class, never an internal error, no stall, and the server goes on.
    from tests.hostile_media import build

    cases = build(tmp_path)
    problems = []
    with TraceClient(server.grpc_url) as c:
        for name, fname in cases.items():
            if not (tmp_path / fname).is_file():
                continue  # a path-only probe (an image2 pattern): a request has bytes
            data = (tmp_path / fname).read_bytes()
            t0 = time.perf_counter()
            try:
                got: object = c.infer(data, task="dvc", max_new_tokens=4)
            except ServingError as e:
                got = str(e)
            took = time.perf_counter() - t0
            want = MUST_REFUSE.get(name)
            if isinstance(got, str) and (got.startswith("internal error") or ": " not in got):
                problems.append(f"{name}: {got}")
            elif want and not (isinstance(got, str) and got.startswith(want)):
                problems.append(f"{name}: want {want}, got {str(got)[:200]}")
            elif took > BUDGET_S + 5:
                problems.append(f"{name}: took {took:.1f} s")
        assert not problems, "\n".join(problems)
        assert c.infer(clip_video, task="dvc", max_new_tokens=4)["token_ids"]


def test_admin_apis_need_the_key(server, clip_video):
    from tritonclient.utils import InferenceServerException

    from trace_rt.serving.server import ADMIN_HEADER, GRPC_ADMIN_HEADER

    def http(path: str, headers: dict[str, str] | None = None) -> int:
        req = urllib.request.Request(f"{server.http_url}{path}", headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    for path in ("/v2/logging", "/v2/trace/setting", "/v2/systemsharedmemory/status"):
        assert http(path) >= 400, path
        assert http(path, {ADMIN_HEADER: server.admin_key}) == 200, path
    assert http("/v2/health/ready") == 200  # health and metadata stay open
    with TraceClient(server.grpc_url) as c:
        with pytest.raises(InferenceServerException, match="restricted"):
            c.client.get_log_settings()
        with pytest.raises(InferenceServerException, match="restricted"):
            c.client.unload_model("trace_pipeline")
        assert c.client.get_log_settings(headers={GRPC_ADMIN_HEADER: server.admin_key})
        assert c.infer(clip_video, task="dvc", max_new_tokens=4)["token_ids"]
        assert c.limits() == {"max_video_bytes": MAX_VIDEO, "max_new_tokens": 1024}


def _client(server, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, "client", *args, "--url", server.grpc_url, "--max-new-tokens", "4"],
        capture_output=True, text=True, timeout=120, **kw,
    )  # fmt: skip


def test_client_names_the_file_in_the_result(server, clip_video):
    out = _client(server, str(clip_video))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["video"] == str(clip_video)


def test_client_refuses_a_file_over_the_servers_limit_unread(server, tmp_path, monkeypatch):
    big = tmp_path / "big.mp4"
    with open(big, "wb") as f:
        f.truncate(1 << 30)  # sparse: 1 GiB that costs no disk
    out = _client(server, str(big))
    assert out.returncode == 2
    assert f"is {1 << 30} bytes, over the server's limit of {MAX_VIDEO}" in out.stderr
    assert "Traceback" not in out.stderr
    # Refused before a byte is read.
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail("read"))
    with TraceClient(server.grpc_url) as c, pytest.raises(Exception, match="server's limit"):
        c.infer(big, task="dvc")


def test_client_says_what_a_path_is(server, tmp_path):
    fifo = tmp_path / "pipe.mp4"
    os.mkfifo(fifo)
    for path, what in [(tmp_path, "is a directory"), (fifo, "is a named pipe")]:
        out = _client(server, str(path))
        assert out.returncode == 2 and what in out.stderr, out.stderr
    out = _client(server, str(tmp_path / "nope.mp4"))
    assert out.returncode == 2 and "video file not found" in out.stderr


def test_client_unreadable_file_is_one_line(server, clip_video, monkeypatch, capsys):
    from trace_rt import cli

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(os, "access", lambda *a, **k: True)  # as root, chmod would not bite
    monkeypatch.setattr(Path, "read_bytes", denied)
    assert cli.main(["client", str(clip_video), "--url", server.grpc_url]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"trace-rt: error: cannot read {clip_video}: Permission denied"


def test_client_into_a_closed_pipe_exits_quietly(server, clip_video):
    proc = subprocess.Popen(
        [*CLI, "client", str(clip_video), "--url", server.grpc_url, "--max-new-tokens", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    proc.stdout.close()  # `| head` that has already left
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141 and err == "", err


# Starting the server: causes first, no silent failures (no server needed to check).


def _serve(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, "serve", "--repo", str(repo), *args], capture_output=True, text=True, timeout=120
    )


def test_busy_port_is_the_first_thing_said(repo):
    import socket

    from trace_rt.serving.server import ServerError, TritonServer, free_ports

    _, http, metrics = free_ports(3)
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ServerError, match=rf"^gRPC port {port} on 127.0.0.1 is already in use"):
            TritonServer(repo, grpc_port=port, http_port=http, metrics_port=metrics).start()
        ports = ["--grpc-port", str(port), "--http-port", str(http), "--metrics-port", str(metrics)]
        out = _serve(repo, *ports)
        assert out.returncode == 2
        assert out.stderr.splitlines()[-1].startswith(
            f"trace-rt: error: gRPC port {port} on 127.0.0.1 is already in use"
        )
        assert "warning" not in out.stderr  # loopback: nothing to warn about
        # Any other address: the unauthenticated server is said plainly, first.
        out = _serve(repo, "--host", "0.0.0.0", *ports)
        assert out.stderr.startswith("trace-rt: warning: listening on 0.0.0.0: anyone")
        assert f"gRPC port {port} on 0.0.0.0 is already in use" in out.stderr


def test_a_failed_start_leads_with_its_cause(repo, tmp_path):
    import shutil

    from trace_rt.serving.server import ServerError, TritonServer, free_ports

    broken = tmp_path / "repo"
    shutil.copytree(repo, broken)
    settings = broken / "trace_pipeline" / "1" / "serving.json"
    settings.write_text(json.dumps({**json.loads(settings.read_text()), "bogus": 1}))
    g, h, m = free_ports(3)
    with pytest.raises(ServerError) as err:
        TritonServer(broken, grpc_port=g, http_port=h, metrics_port=m).start()
    first = str(err.value).splitlines()[0]
    assert first.startswith("tritonserver exited with code")
    assert "unknown settings ['bogus']" in first, str(err.value)


def test_death_signal_failure_is_an_error(repo, monkeypatch):
    from trace_rt.serving import server as srv

    monkeypatch.setattr(srv, "DEATH_SIGNAL", 1000)  # not a signal: prctl fails (EINVAL)
    g, h, m = srv.free_ports(3)
    with pytest.raises(srv.ServerError, match="PR_SET_PDEATHSIG"):
        srv.TritonServer(repo, grpc_port=g, http_port=h, metrics_port=m).start()


def test_admin_key_is_checked(repo):
    out = _serve(repo, "--admin-key", "short")
    assert out.returncode == 2 and "admin key must be at least 16 characters" in out.stderr
    out = _serve(repo, "--admin-key", "has spaces in it, sixteen+")
    assert out.returncode == 2 and "admin key" in out.stderr


def test_malloc_settings_are_the_servers_alone(server):
    # tritonserver gives payload memory back with them; the model stubs run faster without.
    def malloc_env(pid: int) -> set[str]:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        return {e.split(b"=")[0].decode() for e in env if e.startswith(b"MALLOC_")}

    stubs = subprocess.run(["pgrep", "-P", str(server.proc.pid)], capture_output=True, text=True)
    assert len(stubs.stdout.split()) == 3  # vision_encoder, projector, trace_pipeline
    assert "MALLOC_ARENA_MAX" in malloc_env(server.proc.pid)
    for pid in map(int, stubs.stdout.split()):
        assert not malloc_env(pid) & {"MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_"}
