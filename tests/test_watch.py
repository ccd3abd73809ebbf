"""``trace-rt watch``: windows of a live source equal ``trace-rt run`` on the same cut.

The live source is a generated video streamed over a local TCP socket or HTTP (127.0.0.1
only);
it is intra-only H.264 in MPEG-TS, so a cut made by copying packets decodes to exactly the
frames the stream delivered and the comparison can be exact.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from trace_rt.generate import GenerationConfig

QUERY = "a red circle moves left"
GEN = GenerationConfig(max_new_tokens=16)
FPS, SECONDS = 10, 6


@pytest.fixture(scope="module")
def art(tiny_ckpt, tmp_path_factory) -> Path:
    from export import export_onnx

    return export_onnx(tiny_ckpt, tmp_path_factory.mktemp("watch") / "art", progress=False)


@pytest.fixture(scope="module")
def stream_file(tmp_path_factory) -> Path:
    from tests.media import write_video

    path = tmp_path_factory.mktemp("watch") / "live.ts"
    write_video(path, width=96, height=64, fps=FPS, n_frames=FPS * SECONDS, gop=1)
    return path


class TcpSource:
    """Serves a file's bytes to one client on 127.0.0.1; may stop part way and stall."""

    def __init__(self, data: bytes, stop_after: int | None = None, stall: float = 0.0):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"tcp://127.0.0.1:{self.sock.getsockname()[1]}"
        self.data, self.stop_after, self.stall = data, stop_after, stall
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(30)
        conn, _ = self.sock.accept()
        with conn:
            end = len(self.data) if self.stop_after is None else self.stop_after
            for i in range(0, end, 4096):  # in pieces, as a network delivers them
                conn.sendall(self.data[i : min(i + 4096, end)])
            time.sleep(self.stall)  # a stalled stream: open, silent
        self.sock.close()


def _cut(src: Path, dst: Path, start: float, end: float) -> Path:
    """The packets of [start, end) of stream time (from the first frame), copied."""
    import av

    with av.open(str(src)) as inp, av.open(str(dst), "w", format="mpegts") as out:
        s = inp.streams.video[0]
        o = out.add_stream_from_template(s)
        t0 = None
        for p in inp.demux(s):
            if p.pts is None:
                continue
            t0 = p.pts if t0 is None else t0
            t = float((p.pts - t0) * s.time_base)
            if start - 1e-6 <= t < end - 1e-6:
                p.stream = o
                out.mux(p)
    return dst


def _local_infer(pipe, task, query):
    from trace_rt.preprocess import preprocess_frames

    def infer(frames, times, duration):
        px = preprocess_frames(frames, pipe.config.preprocess)
        req = pipe.prepare_frames(px, times, task, query=query, duration=duration, gen=GEN)
        return pipe.run_prepared(req, GEN)

    return infer


@pytest.mark.parametrize("task", ["dvc", "mr"])
def test_tcp_stream_windows_equal_run_on_cuts(art, stream_file, tmp_path, task):
    from trace_rt.pipeline import Pipeline
    from trace_rt.watch import run_watch

    # exact: watch preprocesses full RGB frames with the release's arithmetic
    pipe = Pipeline.from_dir(art, "onnxruntime", cache_dir=False, resize="exact")
    query = QUERY if task == "mr" else None
    lines: list[dict] = []
    src = TcpSource(stream_file.read_bytes())
    status = run_watch(
        src.url,
        _local_infer(pipe, task, query),
        window=2.0,
        stride=1.5,
        n_frames=4,
        drop=False,
        emit=lines.append,
    )
    windows = [x for x in lines if "window" in x]
    assert status == {"end": "stream ended", "windows": 3, "dropped": 0} == lines[-1]
    # 6 s of stream, windows every 1.5 s: [4.5, 6.5) never completes and is not answered.
    spans = [(w["stream_start"], w["stream_end"]) for w in windows]
    assert spans == [(0.0, 2.0), (1.5, 3.5), (3.0, 5.0)]
    for w in windows:
        cut = _cut(stream_file, tmp_path / f"cut{w['window']}.ts", w["stream_start"],
                   w["stream_end"])  # fmt: skip
        want = pipe.run(cut, task, query=query, frames=4, gen=GEN)
        for key in ("token_ids", "events", "frame_times", "duration", "frames", "prompt_ids"):
            assert w[key] == want[key], (w["window"], key)
        shifted = [
            [round(w["stream_start"] + t, 3) for t in e["timestamps"]] for e in want["events"]
        ]
        assert [e["timestamps"] for e in w["stream_events"]] == shifted
        assert w["wall_clock"].endswith("+00:00") and w["latency_s"] >= 0


def test_http_stream_windows_equal_run_on_cuts(art, stream_file, tmp_path):
    # A live HTTP stream (no Content-Length: it ends when the server closes) on 127.0.0.1.
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from trace_rt.pipeline import Pipeline
    from trace_rt.watch import run_watch

    data = stream_file.read_bytes()

    class Live(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "video/mp2t")
            self.end_headers()
            for i in range(0, len(data), 4096):
                self.wfile.write(data[i : i + 4096])
            self.close_connection = True

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Live)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        pipe = Pipeline.from_dir(art, "onnxruntime", cache_dir=False, resize="exact")
        lines: list[dict] = []
        url = f"http://127.0.0.1:{server.server_address[1]}/live.ts"
        status = run_watch(url, _local_infer(pipe, "dvc", None), window=2.0, stride=2.0,
                           n_frames=4, drop=False, emit=lines.append)  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()
    windows = [x for x in lines if "window" in x]
    # FFmpeg ends a body without a length with an I/O error after its last frame: the
    # windows complete by then are still answered (the last, [4, 6), was lost before).
    assert status["end"].startswith("the stream failed") and "Input/output" in status["end"]
    assert (status["windows"], status["dropped"]) == (3, 0)
    for w in windows:
        cut = _cut(stream_file, tmp_path / f"h{w['window']}.ts", w["stream_start"],
                   w["stream_end"])  # fmt: skip
        want = pipe.run(cut, "dvc", frames=4, gen=GEN)
        assert (w["token_ids"], w["frame_times"]) == (want["token_ids"], want["frame_times"])


def test_stream_that_ends_or_stalls(art, stream_file):
    # Half the bytes then silence: the complete windows come out, then the stall is named;
    # half the bytes then a close: the same windows, then "stream ended".
    from trace_rt.pipeline import Pipeline
    from trace_rt.watch import run_watch

    pipe = Pipeline.from_dir(art, "onnxruntime", cache_dir=False)
    data = stream_file.read_bytes()
    half = (len(data) // 2) // 188 * 188  # whole MPEG-TS packets
    for stall, expect in ((5.0, "the stream failed"), (0.0, "stream ended")):
        lines: list[dict] = []
        src = TcpSource(data, stop_after=half, stall=stall)
        t0 = time.monotonic()
        status = run_watch(
            src.url, _local_infer(pipe, "dvc", None), window=1.0, stride=1.0, n_frames=2,
            drop=False, timeout=1.0, emit=lines.append,
        )  # fmt: skip
        assert status["end"].startswith(expect), status
        assert 1 <= status["windows"] <= SECONDS // 2
        assert time.monotonic() - t0 < 4.5  # gave up after the 1 s timeout, not the stall
        assert [x["window"] for x in lines if "window" in x] == list(range(status["windows"]))


def test_sources_that_do_not_exist(tmp_path, art):
    from trace_rt.watch import SourceError, open_source

    with pytest.raises(SourceError, match="no such file"):
        open_source(str(tmp_path / "nope.mp4"), 1.0)
    with pytest.raises(SourceError, match="no such camera"):
        open_source("/dev/video99", 1.0)
    with pytest.raises(SourceError, match="unsupported protocol"):
        open_source("file:///etc/passwd", 1.0)
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    with pytest.raises(SourceError, match=r"cannot open tcp://127\.0\.0\.1"):
        open_source(f"tcp://127.0.0.1:{port}", 1.0)
    out = subprocess.run(
        [sys.executable, "-m", "trace_rt", "watch", str(tmp_path / "nope.ts"), "--model", str(art)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert out.stderr.startswith("trace-rt: error:") and "no such file" in out.stderr


def test_realtime_drops_windows_when_behind(art, stream_file):
    # Windows complete every 0.2 s of a file played at real speed; a request takes longer
    # on this CPU, so waiting windows are replaced by newer ones, each drop reported.
    from trace_rt.pipeline import Pipeline
    from trace_rt.watch import run_watch

    pipe = Pipeline.from_dir(art, "onnxruntime", cache_dir=False)
    infer = _local_infer(pipe, "dvc", None)

    def slow(frames, times, duration):
        out = infer(frames, times, duration)
        time.sleep(0.3)  # a slower model than tiny; the stream does not wait for it
        return out

    lines: list[dict] = []
    status = run_watch(str(stream_file), slow, window=0.5, stride=0.2, n_frames=2,
                       realtime=True, emit=lines.append)  # fmt: skip
    answered = [x["window"] for x in lines if "window" in x]
    dropped = [x["dropped"] for x in lines if "reason" in x]
    assert status["dropped"] == len(dropped) > 0 and status["windows"] == len(answered)
    assert sorted(answered + dropped) == list(range(len(answered) + len(dropped)))
    assert all("behind" in x["reason"] for x in lines if "reason" in x)


def test_cli_watch_file(art, stream_file):
    out = subprocess.run(
        [sys.executable, "-m", "trace_rt", "watch", str(stream_file), "--model", str(art),
         "--backend", "onnxruntime", "--window", "3", "--stride", "3", "--frames", "4",
         "--max-new-tokens", "8", "--task", "vhd", "--query", QUERY],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = [json.loads(x) for x in out.stdout.splitlines()]
    assert [x.get("window") for x in lines[:-1]] == [0, 1]
    assert lines[-1] == {"end": "stream ended", "windows": 2, "dropped": 0}
    assert all(len(x["token_ids"]) <= 8 and x["frames"] == 4 for x in lines[:-1])


def test_watch_against_a_server_equals_local(art, stream_file, tmp_path):
    # --url: each window's preprocessed frames go to a real tritonserver (trace-rt serve's
    # repository); the answers equal the in-process pipeline's.
    from tests.triton_server import running_server
    from triton_repo.build import build_repository

    repo = build_repository(art, tmp_path / "repo", progress=False)
    args = ["--model", str(art), "--window", "3", "--stride", "3", "--frames", "4",
            "--max-new-tokens", "8", "--task", "mr", "--query", QUERY]  # fmt: skip

    def watch(*extra: str) -> list[dict]:
        out = subprocess.run(
            [sys.executable, "-m", "trace_rt", "watch", str(stream_file), *args, *extra],
            capture_output=True, text=True,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        return [json.loads(x) for x in out.stdout.splitlines()]

    local = watch("--backend", "onnxruntime")
    with running_server(repo, log_file=tmp_path / "triton.log") as server:
        remote = watch("--url", server.grpc_url)
    assert len(remote) == len(local) == 3
    for got, want in zip(remote[:-1], local[:-1], strict=True):
        for key in ("window", "stream_start", "stream_end", "token_ids", "events", "frame_times"):
            assert got[key] == want[key], key
    assert remote[-1] == local[-1] == {"end": "stream ended", "windows": 2, "dropped": 0}


def test_cli_watch_free_question_with_frame_timestamps(art, stream_file):
    from trace_rt.constrained import frame_time_strings
    from trace_rt.pipeline import Pipeline

    question = 'Who says "hi" {} here?'
    out = subprocess.run(
        [sys.executable, "-m", "trace_rt", "watch", str(stream_file), "--model", str(art),
         "--backend", "onnxruntime", "--window", "3", "--stride", "3", "--frames", "4",
         "--max-new-tokens", "24", "--question", question, "--timestamps", "frames"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    windows = [json.loads(x) for x in out.stdout.splitlines()][:-1]
    pipe = Pipeline.from_dir(art, "onnxruntime", cache_dir=False)
    want_ids = pipe.prepare_frames(
        np.zeros((4, 3, 56, 56), np.float32), np.arange(4.0), None, question=question
    ).prompt_ids
    assert len(windows) == 2
    for w in windows:
        assert w["answer"] == (w["events"][0]["caption"] if w["events"] else "")
        assert w["prompt_ids"] == want_ids  # the question went in literally
        allowed = set(frame_time_strings(w["frame_times"]))
        for e in w["events"]:
            assert {format(x, "0>6.1f") for x in e["timestamps"]} <= allowed
