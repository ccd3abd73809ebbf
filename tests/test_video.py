"""load_video on real files written by tests/media.py."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

import trace_rt.video.decode as tv
from tests.media import (
    read_index,
    spoil_packets,
    write_audio,
    write_garbage_video,
    write_video,
)
from trace_rt.errors import (
    InputError,
    NoDecodableFramesError,
    NotAVideoError,
    NoVideoStreamError,
    VideoNotFoundError,
    VideoTooLongError,
)
from trace_rt.tokens import MAX_TIMESTAMP
from trace_rt.video import _decode, _probe, _Retry, _Source, load_video


def indices(v) -> list[int]:
    return [read_index(f) for f in v.frames]


def linspace_idx(n: int, num: int) -> list[int]:
    return np.linspace(0, n - 1, num).astype(int).tolist()


@pytest.fixture(scope="module")
def cfr(tmp_path_factory) -> str:
    return write_video(tmp_path_factory.mktemp("v") / "cfr.mp4", n_frames=30, fps=10)


def test_cfr_frames_and_times(cfr):
    v = load_video(cfr, 8)
    idx = linspace_idx(30, 8)
    assert v.frames.shape == (8, 48, 64, 3) and v.frames.dtype == np.uint8
    assert indices(v) == idx
    np.testing.assert_allclose(v.times, np.array(idx) / 10, atol=1e-9)
    assert v.times.dtype == np.float64
    assert (v.total_frames, v.fps, v.duration) == (30, pytest.approx(10), pytest.approx(3.0))


def test_fractional_rate(tmp_path):
    p = write_video(tmp_path / "ntsc.mp4", fps=Fraction(30000, 1001), n_frames=40)
    v = load_video(p, 7)
    idx = linspace_idx(40, 7)
    assert indices(v) == idx
    np.testing.assert_allclose(v.times, np.array(idx) * 1001 / 30000, atol=1e-4)
    assert v.fps == pytest.approx(30000 / 1001, rel=1e-4)


NO_COUNT = [
    ("a.mkv", "libx264", None),
    ("a.webm", "libvpx", None),
    ("a.ts", "libx264", None),
    ("a.h264", "libx264", "h264"),  # raw elementary stream: no timestamps either
]


@pytest.mark.parametrize("name,codec,fmt", NO_COUNT)
def test_no_frame_count_metadata(tmp_path, name, codec, fmt):
    p = write_video(tmp_path / name, n_frames=25, codec=codec, container=fmt)
    with av.open(p) as c:
        assert c.streams.video[0].frames == 0  # the container states no frame count
        if fmt == "h264":
            assert c.duration is None
    v = load_video(p, 6)
    idx = linspace_idx(25, 6)
    assert v.total_frames == 25
    assert indices(v) == idx
    np.testing.assert_allclose(v.times, np.array(idx) / 10, atol=2e-3)


def test_variable_frame_rate_times_are_actual_pts(tmp_path):
    pts_ms = [0, 100, 150, 400, 410, 1000, 1500, 1530, 2900]
    p = write_video(tmp_path / "vfr.mp4", pts=pts_ms, n_frames=None)
    v = load_video(p, 5)
    idx = linspace_idx(len(pts_ms), 5)
    assert indices(v) == idx
    np.testing.assert_allclose(v.times, np.array(pts_ms)[idx] / 1000, atol=1e-6)
    assert v.total_frames == len(pts_ms)
    assert v.duration == pytest.approx(2.9 * 9 / 8)  # span + one mean frame duration


def test_more_frames_requested_than_exist(tmp_path):
    p = write_video(tmp_path / "short.mp4", n_frames=5)
    v = load_video(p, 12)
    idx = linspace_idx(5, 12)
    assert len(v.frames) == 12 and len(v.times) == 12
    assert indices(v) == idx
    np.testing.assert_allclose(v.times, np.array(idx) / 10, atol=1e-9)


def test_single_frame(tmp_path):
    v = load_video(write_video(tmp_path / "one.mp4", n_frames=1), 3)
    assert indices(v) == [0, 0, 0] and v.times.tolist() == [0, 0, 0] and v.total_frames == 1


class NonSeekable(io.RawIOBase):
    def __init__(self, data: bytes):
        self._buf = io.BytesIO(data)

    def readable(self):
        return True

    def seekable(self):
        return False

    def readinto(self, b):
        chunk = self._buf.read(len(b))
        b[: len(chunk)] = chunk
        return len(chunk)


def test_all_source_kinds_agree(cfr):
    data = Path(cfr).read_bytes()
    ref = load_video(cfr, 6)
    with open(cfr, "rb") as f:
        from_file = load_video(f, 6)
        assert f.tell() == 0 and not f.closed
    sources = [Path(cfr), data, bytearray(data), memoryview(data), io.BytesIO(data)]
    for got in [load_video(s, 6) for s in sources] + [from_file, load_video(NonSeekable(data), 6)]:
        np.testing.assert_array_equal(got.frames, ref.frames)
        np.testing.assert_array_equal(got.times, ref.times)
        assert got.total_frames == ref.total_frames


def test_file_object_read_from_current_position(cfr):
    data = Path(cfr).read_bytes()
    f = io.BytesIO(b"HEADER" + data)
    f.seek(6)
    assert indices(load_video(f, 3)) == linspace_idx(30, 3)


def test_odd_size_and_mpeg4_avi(tmp_path):
    v = load_video(write_video(tmp_path / "odd.mp4", 333, 191, n_frames=9), 4)
    assert v.frames.shape == (4, 191, 333, 3) and indices(v) == linspace_idx(9, 4)
    v = load_video(write_video(tmp_path / "m.avi", codec="mpeg4", n_frames=9), 4)
    assert indices(v) == linspace_idx(9, 4)


def test_rotation_metadata_is_applied(tmp_path):
    v = load_video(write_video(tmp_path / "rot.mp4", 64, 48, rotation=90, n_frames=6), 3)
    assert v.frames.shape == (3, 64, 48, 3)  # portrait
    # Undo the counter-clockwise display rotation to read the index band again.
    assert [read_index(np.rot90(f, -1)) for f in v.frames] == linspace_idx(6, 3)


def test_seeks_past_groups_of_pictures(tmp_path):
    p = write_video(tmp_path / "gop.mp4", n_frames=300, gop=10)
    v = load_video(p, 5)
    assert indices(v) == linspace_idx(300, 5)
    src = _Source(p)
    pts, keys, *_ = _probe(src)
    wanted = np.unique(pts)[linspace_idx(300, 5)]
    seek_got, _, seeks = _decode(src, wanted, keys, seek=True)
    lin_got, _, none = _decode(src, wanted, keys, seek=False)
    assert seeks > 0 and none == 0
    assert sorted(seek_got) == sorted(lin_got) == sorted(wanted.tolist())
    for k in wanted:
        np.testing.assert_array_equal(seek_got[k], lin_got[k])


def test_frame_timestamps_must_match_packets(cfr):
    src = _Source(cfr)
    pts, keys, *_ = _probe(src)
    pts = np.unique(pts)
    with pytest.raises(_Retry, match="other timestamps"):
        _decode(src, pts[:3], keys, False, pts + 1)


@pytest.mark.parametrize("failures", [1, 2])
def test_falls_back_when_seeking_or_timestamps_fail(monkeypatch, tmp_path, failures):
    """A failed seek decodes straight through; unusable timestamps go by rank."""
    p = write_video(tmp_path / "gop.mp4", n_frames=120, gop=10)
    real, calls = tv._decode, []

    def flaky(*args, **kwargs):
        calls.append(args[2] is not None)
        if len(calls) <= failures:
            raise _Retry("simulated")
        return real(*args, **kwargs)

    monkeypatch.setattr(tv, "_decode", flaky)
    v = load_video(p, 6)
    assert indices(v) == linspace_idx(120, 6)
    np.testing.assert_allclose(v.times, np.array(linspace_idx(120, 6)) / 10, atol=1e-9)
    assert calls == {1: [True, True], 2: [True, True, False]}[failures]  # by pts, by pts, rank


def test_no_deadlock_with_pyav_logging_on(tmp_path):
    """PyAV's log callback takes the GIL from FFmpeg's frame threads; stopping a decode
    early with logging on once hung within a few hundred calls. Run it in a child."""
    p = write_video(tmp_path / "gop.mp4", n_frames=60, gop=10)
    script = (
        "import sys, av\n"
        "from trace_rt.video import _decode, _probe, _Retry, _Source, load_video\n"
        "av.logging.set_level(av.logging.PANIC)\n"
        "src = _Source(sys.argv[1])\n"
        "pts, keys, *_ = _probe(src)\n"
        "for i in range(300):\n"
        "    try:\n"
        "        _decode(src, pts[:3], keys, False, pts + 1)  # stops after one frame\n"
        "    except _Retry:\n"
        "        pass\n"
        "    if i % 100 == 0:\n"
        "        load_video(src.path, 3)\n"
    )
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run(
        [sys.executable, "-c", script, p], cwd=root, timeout=60, capture_output=True
    )
    assert run.returncode == 0, run.stderr.decode()[-2000:]


def test_undecodable_frames_replaced_by_nearest(tmp_path):
    good = write_video(tmp_path / "intra.avi", codec="mpeg4", gop=1, n_frames=12)
    bad = spoil_packets(good, tmp_path / "spoiled.avi", spoil=[3, 4, 7])
    v = load_video(bad, 12)
    assert indices(v) == [0, 1, 2, 2, 5, 5, 6, 6, 8, 9, 10, 11]
    np.testing.assert_allclose(v.times, np.arange(12) / 10, atol=1e-9)
    assert v.total_frames == 12


# ---- errors -------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.mp4")
    with pytest.raises(VideoNotFoundError, match="not found") as e:
        load_video(path, 4)
    assert path in str(e.value) and isinstance(e.value, FileNotFoundError)


def test_not_a_video(tmp_path):
    with pytest.raises(NotAVideoError, match="not a video"):
        load_video(b"this is plain text, not a video\n" * 50, 4)
    p = tmp_path / "notes.mp4"
    p.write_bytes(os.urandom(4096))
    with pytest.raises(NotAVideoError, match=r"notes\.mp4"):
        load_video(p, 4)
    with pytest.raises(NotAVideoError, match="directory"):
        load_video(tmp_path, 4)


def test_empty_inputs(tmp_path):
    with pytest.raises(NotAVideoError, match="empty"):
        load_video(b"", 4)
    with pytest.raises(NotAVideoError, match="empty"):
        load_video(io.BytesIO(), 4)
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(NotAVideoError, match="empty"):
        load_video(tmp_path / "empty.mp4", 4)


def test_audio_only(tmp_path):
    p = write_audio(tmp_path / "tone.wav")
    with pytest.raises(NoVideoStreamError, match=r"no video stream.*audio") as e:
        load_video(p, 4)
    assert "tone.wav" in str(e.value)


@pytest.mark.parametrize("name,codec", [("g.mp4", "libx264"), ("g.mkv", "mpeg4")])
def test_nothing_decodes(tmp_path, name, codec):
    p = write_garbage_video(tmp_path / name, codec=codec)
    with pytest.raises(NoDecodableFramesError, match="could be decoded"):
        load_video(p, 4)


def test_too_long(cfr):
    with pytest.raises(VideoTooLongError, match=r"3\.0 s.*2\.0 s"):
        load_video(cfr, 4, max_duration=2.0)
    assert load_video(cfr, 4, max_duration=3.0).duration == pytest.approx(3.0)


def test_default_limit_is_trace_time_format(tmp_path):
    assert MAX_TIMESTAMP == 9999.9
    # Two frames 4999 s apart: 9998 s long, under the limit.
    ok = write_video(tmp_path / "ok.mp4", pts=[0, 4999], n_frames=None, time_base=Fraction(1, 1))
    assert load_video(ok, 2).duration == pytest.approx(9998)
    # Three frames 5000 s apart: 15000 s long.
    long = write_video(
        tmp_path / "long.mp4", pts=[0, 5000, 10000], n_frames=None, time_base=Fraction(1, 1)
    )
    with pytest.raises(VideoTooLongError, match=r"9999\.9 s"):
        load_video(long, 2)


@pytest.mark.parametrize("n", [0, -3, 2.5, True, "8"])
def test_bad_num_frames(cfr, n):
    with pytest.raises(InputError, match="num_frames"):
        load_video(cfr, n)


@pytest.mark.parametrize("source", [123, None, ["a.mp4"]])
def test_bad_source_type(source):
    with pytest.raises(TypeError, match="video source"):
        load_video(source, 4)
