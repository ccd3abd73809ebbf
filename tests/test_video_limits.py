"""Decode limits: frame size, memory, time budget, cancellation, pipes, URLs."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import trace_rt.video.source as vsrc
from tests.media import read_index, write_video
from trace_rt.config import PreprocessConfig
from trace_rt.errors import (
    DecodeCancelledError,
    VideoError,
    VideoNotFoundError,
    VideoTimeoutError,
    VideoTooLargeError,
)
from trace_rt.preprocess import preprocess_frame, preprocess_frames
from trace_rt.video import DEFAULT_LIMITS, DecodeLimits, load_video
from trace_rt.video.decode import _probe
from trace_rt.video.source import Source

ROOT = Path(__file__).resolve().parents[1]
CLIP = PreprocessConfig(
    image_mean=(0.48145466, 0.4578275, 0.40821073),
    image_std=(0.26862954, 0.26130258, 0.27577711),
    shortest_edge=336,
    crop_height=336,
    crop_width=336,
)


@pytest.fixture(scope="module")
def gop(tmp_path_factory) -> str:
    return write_video(tmp_path_factory.mktemp("v") / "gop.mp4", n_frames=120, gop=10)


def test_default_limits():
    assert isinstance(DEFAULT_LIMITS, DecodeLimits)
    assert DEFAULT_LIMITS.max_pixels == 8192 * 4320 and DEFAULT_LIMITS.time_budget_s == 120.0
    assert "mpegts" in DEFAULT_LIMITS.allow_formats and "concat" not in DEFAULT_LIMITS.allow_formats
    src = Source(b"x")
    for w, h in [(3840, 2160), (2160, 3840), (7680, 4320), (4320, 8192)]:
        src.check_size(w, h)  # 4K and 8K, either orientation
    with pytest.raises(VideoTooLargeError, match=r"16000x16000 \(256\.0 megapixels\).*35\.4"):
        src.check_size(16000, 16000)


def test_frame_size_refused_from_the_header(gop):
    small = replace(DEFAULT_LIMITS, max_pixels=64 * 48 - 1)
    with pytest.raises(VideoTooLargeError, match=r"64x48"):
        _probe(Source(gop, small))  # pass 1 demuxes only: nothing was decoded
    with pytest.raises(VideoTooLargeError, match=r"gop\.mp4: frames are 64x48"):
        load_video(gop, 4, limits=small)
    assert load_video(gop, 4, limits=replace(small, max_pixels=64 * 48)).frames.shape[0] == 4


def test_preprocess_on_decode_is_bit_exact(gop, tmp_path):
    odd = write_video(tmp_path / "odd.mp4", 333, 191, n_frames=9)
    for path in (gop, odd):
        full = load_video(path, 6)
        each = load_video(path, 6, transform=lambda f: preprocess_frame(f, CLIP))
        np.testing.assert_array_equal(each.frames, preprocess_frames(full.frames, CLIP))
        np.testing.assert_array_equal(each.times, full.times)


# Peak RSS from /proc/self/status VmHWM: ru_maxrss carries the parent's peak across fork
# and exec (Linux keeps the larger one), which hid growth below pytest's own size.
HWM = """
def hwm():
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) * 1024 for x in f if x.startswith("VmHWM:"))
"""
MEASURE = (
    HWM
    + """
import sys
import numpy as np
from tests.test_video_limits import CLIP
from trace_rt.preprocess import preprocess_frame, preprocess_frames
from trace_rt.video import load_video

big, small, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
load_video(small, 2)  # libraries and codecs loaded before the baseline
preprocess_frames(np.zeros((1, 48, 64, 3), np.uint8), CLIP)
base = hwm()
px = load_video(big, n, transform=lambda f: preprocess_frame(f, CLIP)).frames
print(hwm() - base, px.nbytes)
"""
)


def test_memory_is_bounded_by_sampled_frames_at_model_size(tmp_path):
    """4K frames are preprocessed as they are decoded, never stacked at full size.

    Stacking 24 sampled 3840x2160 RGB frames (as before) grew the peak RSS by ~1.2 GB;
    now it grows ~250 MiB, under the model-size frames plus 16 full frames (411 MiB).
    """
    w, h, n = 3840, 2160, 24
    big = write_video(tmp_path / "4k.mp4", w, h, n_frames=n, gop=6)
    small = write_video(tmp_path / "small.mp4", n_frames=4)
    run = subprocess.run(
        [sys.executable, "-c", MEASURE, big, small, str(n)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    grew, sampled = map(int, run.stdout.split())
    assert sampled == n * 3 * 336 * 336 * 4
    bound = sampled + 16 * w * h * 3
    assert grew < bound, f"peak RSS grew {grew / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB"


# ---- time budget and cancellation -------------------------------------------------------------


def test_time_budget(gop):
    with pytest.raises(VideoTimeoutError, match=r"time budget of 0 s"):
        load_video(gop, 4, limits=replace(DEFAULT_LIMITS, time_budget_s=0.0))

    def slow() -> bool:  # each packet now takes 20 ms
        threading.Event().wait(0.02)
        return False

    budget = replace(DEFAULT_LIMITS, time_budget_s=0.3)
    with pytest.raises(VideoTimeoutError, match=r"gop\.mp4: decoding took longer .* 0\.3 s"):
        load_video(gop, 4, limits=budget, cancelled=slow)
    assert load_video(gop, 4, limits=replace(DEFAULT_LIMITS, time_budget_s=None)).total_frames


def test_cancelled_between_packets(gop):
    asked = []

    def cancelled() -> bool:
        asked.append(1)
        threading.Event().wait(0.011)  # past the 10 ms between questions
        return len(asked) > 5

    with pytest.raises(DecodeCancelledError, match="cancelled"):
        load_video(gop, 4, cancelled=cancelled)
    assert len(asked) == 6  # asked as it went, stopped at the first yes
    assert indices(load_video(gop, 4, cancelled=lambda: False)) == [0, 39, 79, 119]


def indices(v) -> list[int]:
    return [read_index(f) for f in v.frames]


# ---- URLs, pipes, stdin -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/a.mp4",
        "rtsp://cam/stream",
        "file:a.mp4",
        "udp://0.0.0.0:5004",
        "concat:a.mp4|b.mp4",
        "s3://bucket/video.mp4",
    ],
)
def test_urls_are_refused(url):
    with pytest.raises(VideoError, match="URLs are not supported"):
        load_video(url, 4)


def test_a_drive_letter_is_not_a_url():
    with pytest.raises(VideoNotFoundError):
        load_video("C:\\videos\\a.mp4", 4)


def test_a_file_with_a_colon_is_still_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_video(tmp_path / "clip:1.mp4", n_frames=5)
    assert load_video("clip:1.mp4", 2).total_frames == 5


FIFO = """
import os, sys, threading
from trace_rt.video import load_video
fifo, data = sys.argv[1], open(sys.argv[2], "rb").read()
os.mkfifo(fifo)
def write():
    with open(fifo, "wb") as f:
        f.write(data)
threading.Thread(target=write, daemon=True).start()
v = load_video(fifo, 3)
print(v.total_frames)
"""


def test_named_pipe_is_read_once(gop, tmp_path):
    """The decoder opened a FIFO twice (two passes) and hung; a timeout makes that fail."""
    run = subprocess.run(
        [sys.executable, "-c", FIFO, str(tmp_path / "fifo"), gop],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["120"]


def test_dev_stdin_from_a_pipe(gop):
    script = (
        "from trace_rt.video import load_video; print(load_video('/dev/stdin', 3).total_frames)"
    )
    run = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        input=Path(gop).read_bytes(),
        capture_output=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr.decode()[-2000:]
    assert run.stdout.split() == [b"120"]


class Trickle(io.RawIOBase):
    """A non-seekable stream handing out a few bytes per read."""

    def __init__(self, data: bytes):
        self._buf = io.BytesIO(data)

    def readable(self):
        return True

    def readinto(self, b):
        chunk = self._buf.read(min(len(b), 1000))
        b[: len(chunk)] = chunk
        return len(chunk)


def test_streams_are_read_whole_and_bounded(gop, monkeypatch):
    data = Path(gop).read_bytes()
    assert indices(load_video(Trickle(data), 4)) == [0, 39, 79, 119]
    monkeypatch.setattr(vsrc, "MAX_STREAM_BYTES", 1 << 20)
    with pytest.raises(VideoError, match="more than 1 MiB from a pipe"):
        load_video(Trickle(os.urandom(1 << 20) + b"x"), 4)


def test_cli_reads_video_from_stdin(tiny_ckpt, gop):
    args = ["run", "-", "--model", str(tiny_ckpt), "--max-new-tokens", "4", "--frames", "3"]
    run = subprocess.run(
        [sys.executable, "-m", "trace_rt", *args],
        cwd=ROOT,
        input=Path(gop).read_bytes(),
        capture_output=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr.decode()[-2000:]
    res = json.loads(run.stdout)
    assert res["video"] == "-" and res["frames"] == 3
    assert res["duration"] == pytest.approx(12.0, abs=0.2)


BOMB = (
    HWM
    + """
import sys
from trace_rt.errors import VideoTooLargeError
from trace_rt.video import load_video

load_video(sys.argv[2], 2)  # libraries and codecs loaded before the baseline
base = hwm()
try:
    load_video(sys.argv[1], 4)
except VideoTooLargeError as e:
    print(e, file=sys.stderr)
    print(hwm() - base)
"""
)


def test_bomb_is_refused_without_decoding_a_frame(tmp_path):
    """One 8192x8192 frame in 130 KB of MPEG-TS: FFmpeg's stream probe used to decode it
    (157 MiB) before the header check; now the probe's decoder gets the pixel limit too."""
    import av

    path = tmp_path / "bomb.ts"
    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=1)
        s.width = s.height = 8192
        s.pix_fmt, s.options = "yuv420p", {"preset": "ultrafast"}
        frame = av.VideoFrame(8192, 8192, "yuv420p")
        for plane in frame.planes:
            plane.update(bytes(plane.buffer_size))
        for p in [*s.encode(frame), *s.encode()]:
            out.mux(p)
    small = write_video(tmp_path / "small.ts", n_frames=4)
    run = subprocess.run(
        [sys.executable, "-c", BOMB, str(path), small],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0 and "8192x8192" in run.stderr, run.stderr[-2000:]
    grew = int(run.stdout)
    assert grew < 64 << 20, f"peak RSS grew {grew / 2**20:.0f} MiB"  # one frame is 96 MiB
