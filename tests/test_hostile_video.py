"""The hostile-input corpus (tests/hostile_media.py): every case decodes or fails cleanly.

Each case runs from its bytes and from its path in one child process whose working
directory holds ``secret_video.mp4``. Every run must either decode or raise a
:class:`TraceError` with a one-line message, within seconds, without opening a socket
and without opening any file but its input (inotify sees FFmpeg's own opens).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from tests.hostile_media import CORPUS, write_corrupt_pts_ts
from tests.media import read_index, write_video
from trace_rt.video import load_video
from trace_rt.video.timeline import repair_timestamps

ROOT = Path(__file__).resolve().parents[1]
OK = "decodes"
EXPECT = {
    "zero_byte": "NotAVideoError",
    "random_bytes": "NotAVideoError",
    "text": "NotAVideoError",
    "png_image": "UnsupportedFormatError",
    "jpeg_image": "UnsupportedFormatError",
    "ffconcat": "UnsupportedFormatError",
    "ffconcat_missing": "UnsupportedFormatError",
    "ffconcat_absolute": "UnsupportedFormatError",
    "sdp": "UnsupportedFormatError",
    "hls": "NotAVideoError",
    "file_url_bytes": "NotAVideoError",
    "http_url_bytes": "NotAVideoError",
    "concat_protocol_bytes": "NotAVideoError",
    "image2_pattern": "VideoNotFoundError",
    "truncated_mp4": "NotAVideoError",
    "truncated_mkv": OK,
    "moovless_mp4": "NotAVideoError",
    "garbage_packets": "NoDecodableFramesError",
    "zero_frames": "VideoError",
    "huge_dimensions": "VideoTooLargeError",
    "corrupt_pts_ts": OK,
    "audio_only_wav": "NoVideoStreamError",
    "audio_only_m4a": "NoVideoStreamError",
    "one_frame": OK,
    "tiny_2x2": OK,
    "odd_size": OK,
    "rotated": OK,
    "vfr": OK,
    "many_streams": OK,
    "raw_h264": OK,
    "mpegts": OK,
    "webm": OK,
    "avi": OK,
    "flv": OK,
    "mpeg_ps": OK,
    "gif": OK,
}
CASE_SECONDS = 10.0  # each decode is of a tiny file; a stall (SDP, HLS) took 20 s or hung


def test_expectations_cover_the_corpus():
    assert set(EXPECT) == set(CORPUS)


@pytest.fixture(scope="module")
def corpus_runs(tmp_path_factory) -> dict[tuple[str, str], dict]:
    d = tmp_path_factory.mktemp("hostile")
    try:
        run = subprocess.run(
            [sys.executable, "-m", "tests.hostile_media", str(d)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=240,
        )
    except subprocess.TimeoutExpired as e:  # a hang: name the case that never finished
        done = [json.loads(line)["case"] for line in (e.stdout or b"").decode().splitlines()]
        pending = [c for c in CORPUS if c not in done]
        pytest.fail(f"the corpus run hung; finished {len(done)} runs, stuck at {pending[:1]}")
    assert run.returncode == 0, run.stderr[-3000:]
    runs = [json.loads(line) for line in run.stdout.splitlines()]
    return {(r["case"], r["mode"]): r for r in runs}


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_case_decodes_or_fails_cleanly(corpus_runs, case):
    runs = [r for (c, _), r in corpus_runs.items() if c == case]
    assert runs, f"{case} did not run"
    for r in runs:
        where = f"{case} ({r['mode']})"
        assert r["sockets"] == [], f"{where} opened sockets"
        assert r["opened"] == [], f"{where} opened other files: {r['opened']}"
        assert r["seconds"] < CASE_SECONDS, f"{where} took {r['seconds']:.1f} s"
        if EXPECT[case] == OK:
            assert r["outcome"] == "ok", f"{where}: {r.get('message')}"
            assert r["shape"][0] == 4 and r["shape"][-1] == 3
            continue
        assert r["outcome"] == "error", f"{where} decoded, expected {EXPECT[case]}"
        assert r["trace_error"], f"{where} raised {r['classes'][0]}: {r['message']}"
        assert EXPECT[case] in r["classes"], f"{where}: {r['classes'][0]}: {r['message']}"
        msg = r["message"]
        assert msg and "\n" not in msg and len(msg) < 300


def test_refusal_does_not_tell_whether_a_path_exists(corpus_runs):
    for mode in ("bytes", "path"):
        here = corpus_runs[("ffconcat", mode)]["message"].replace("req.mp4", "X")
        gone = corpus_runs[("ffconcat_missing", mode)]["message"].replace("req2.mp4", "X")
        assert here == gone


def test_sdp_opens_no_socket(corpus_runs):
    """Today's code bound two UDP sockets and stalled 20 s on these bytes."""
    r = corpus_runs[("sdp", "bytes")]
    assert r["sockets"] == [] and "UnsupportedFormatError" in r["classes"]
    assert r["seconds"] < 2


# ---- corrupt timestamps ---------------------------------------------------------------------


def test_one_corrupt_pts_is_repaired(tmp_path):
    """One PES PTS of a 4 s TS moved by 1490 s read as a 1507 s video before."""
    clean = load_video(write_video(tmp_path / "clean.ts", n_frames=100, fps=25, gop=25), 8)
    bad = load_video(tmp_path / write_corrupt_pts_ts(tmp_path / "bad.ts", frame=50), 8)
    assert bad.duration == pytest.approx(4.0, abs=0.05) and bad.total_frames == 100
    np.testing.assert_allclose(bad.times, clean.times, atol=1e-6)
    assert [read_index(f) for f in bad.frames] == [read_index(f) for f in clean.frames]


@pytest.mark.parametrize("frame", [0, 99])
def test_corrupt_pts_at_either_end(tmp_path, frame):
    bad = load_video(tmp_path / write_corrupt_pts_ts(tmp_path / "end.ts", frame=frame), 5)
    assert bad.duration == pytest.approx(4.0, abs=0.1)
    assert [read_index(f) for f in bad.frames] == np.linspace(0, 99, 5).astype(int).tolist()


def test_real_gaps_and_reordering_are_not_repaired():
    tb = Fraction(1, 1000)
    pause = np.r_[np.arange(0, 3000, 40), np.arange(60_000, 63_000, 40)]  # a 57 s pause
    table, n = repair_timestamps(pause, tb)
    assert n == 0 and np.array_equal(table, pause)
    # B-frames: decode order I P B B P B B ... (presentation order differs by a few frames)
    order = np.arange(300) * 40
    reordered = order.reshape(-1, 3)[:, [0, 2, 1]].reshape(-1)
    assert repair_timestamps(reordered, tb)[1] == 0
    lone = np.r_[0, 40, 80, 30_000, 30_040, 30_080, 90_000]  # sparse but consistent
    assert repair_timestamps(lone, tb)[1] == 0
    spike = order.copy()
    spike[150] += 1_490_000
    table, n = repair_timestamps(spike, tb)
    assert n == 1 and table[-1] < 12_000 and len(table) == 300


def test_protocols_are_refused_even_for_an_allowed_referencing_format(tmp_path, monkeypatch):
    """Defence in depth: with the concat demuxer allowed on purpose, the script's file is
    still never opened, because no protocol is whitelisted."""
    from tests.hostile_media import SECRET, FileWatch
    from trace_rt.errors import TraceError
    from trace_rt.video import DEFAULT_LIMITS

    write_video(tmp_path / SECRET, n_frames=5)
    monkeypatch.chdir(tmp_path)
    unsafe = replace(DEFAULT_LIMITS, allow_formats=DEFAULT_LIMITS.allow_formats | {"concat"})
    watch = FileWatch(tmp_path)
    for script in (f"ffconcat version 1.0\nfile {SECRET}\n", f"file '{tmp_path / SECRET}'\n"):
        with pytest.raises(TraceError):
            load_video(script.encode(), 4, limits=unsafe)
    opened = watch.opened()
    watch.close()
    assert opened == set()
