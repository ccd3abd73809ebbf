"""A corpus of bad, odd and hostile video inputs, generated (nothing is downloaded).

:data:`CORPUS` maps a case name to a builder that writes the case into a directory and
returns the input's file name there. The directory also holds ``secret_video.mp4``, a
valid video that no input may make the decoder read.

``python -m tests.hostile_media DIR [CASE...]`` builds the corpus in ``DIR``, then runs
``load_video`` on each case, once from its bytes and once from its path, with the working
directory at ``DIR`` (where relative references in playlists and scripts resolve), and
prints one JSON object per run: the outcome, the exception's classes and message, the
seconds it took, every socket the process held meanwhile, and every file in ``DIR`` that
was opened (by inotify, so FFmpeg's own C-level opens are seen too).
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
import sys
import threading
import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from tests.media import make_frame, write_audio, write_garbage_video, write_video

SECRET = "secret_video.mp4"


def _put(d: Path, name: str, data: bytes) -> str:
    (d / name).write_bytes(data)
    return name


def _mux(path: Path, codec: str, w: int, h: int, n: int, pix_fmt: str, fmt: str | None = None):
    with av.open(os.fspath(path), "w", format=fmt) as out:
        s = out.add_stream(codec, rate=10)
        s.width, s.height, s.pix_fmt = w, h, pix_fmt
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(make_frame(i, w, h), format="rgb24")
            for p in s.encode(frame):
                out.mux(p)
        for p in s.encode():
            out.mux(p)


def _boxes(data: bytes) -> list[tuple[bytes, int, int]]:
    """Top-level MP4 boxes: (type, start, end)."""
    out, i = [], 0
    while i + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[i : i + 8])
        size = len(data) - i if size == 0 else size
        if size < 8:
            break
        out.append((kind, i, i + size))
        i += size
    return out


# ---- MPEG-TS timestamps ----------------------------------------------------------------------


def ts_pes_starts(data: bytes | bytearray) -> list[int]:
    """Byte offsets of the video PES headers in an MPEG-TS."""
    out = []
    for off in range(0, len(data) - 187, 188):
        b = data[off : off + 188]
        if b[0] != 0x47:
            continue
        afc, i = (b[3] >> 4) & 3, 4
        if afc in (2, 3):
            i += 1 + b[4]
        if b[1] & 0x40 and afc in (1, 3) and b[i : i + 3] == b"\0\0\1" and b[i + 3] >> 4 == 0xE:
            out.append(off + i)
    return out


def ts_read_pts(d: bytes | bytearray, i: int) -> int:
    b = d[i + 9 : i + 14]
    return ((b[0] >> 1) & 7) << 30 | b[1] << 22 | (b[2] >> 1) << 15 | b[3] << 7 | (b[4] >> 1)


def ts_write_pts(d: bytearray, i: int, pts: int) -> None:
    """Overwrite the PTS of the PES header at ``i`` (its marker bits kept valid)."""
    d[i + 9] = (d[i + 9] & 0xF0) | ((pts >> 29) & 0x0E) | 1
    d[i + 10] = (pts >> 22) & 0xFF
    d[i + 11] = ((pts >> 14) & 0xFE) | 1
    d[i + 12] = (pts >> 7) & 0xFF
    d[i + 13] = ((pts << 1) & 0xFE) | 1


def write_corrupt_pts_ts(path: Path, frame: int = 50, jump_s: float = 1490.0) -> str:
    """A 4 s, 25 fps MPEG-TS whose frame ``frame`` has a PTS ``jump_s`` seconds off."""
    write_video(path, n_frames=100, fps=25, gop=25)
    data = bytearray(path.read_bytes())
    at = ts_pes_starts(data)[frame]
    ts_write_pts(data, at, ts_read_pts(data, at) + int(jump_s * 90000))
    path.write_bytes(bytes(data))
    return path.name


# ---- the corpus --------------------------------------------------------------------------------


def _truncated_mp4(d: Path) -> str:
    data = Path(write_video(d / "full.mp4", n_frames=30)).read_bytes()
    return _put(d, "truncated.mp4", data[: len(data) * 6 // 10])


def _truncated_mkv(d: Path) -> str:
    data = Path(write_video(d / "full.mkv", n_frames=30)).read_bytes()
    return _put(d, "truncated.mkv", data[: len(data) * 6 // 10])


def _moovless(d: Path) -> str:
    data = Path(write_video(d / "whole.mp4", n_frames=10)).read_bytes()
    kept = b"".join(data[a:e] for k, a, e in _boxes(data) if k != b"moov")
    return _put(d, "moovless.mp4", kept)


def _image(codec: str, pix_fmt: str, name: str) -> Callable[[Path], str]:
    def build(d: Path) -> str:
        _mux(d / name, codec, 64, 48, 1, pix_fmt, fmt="image2pipe")
        return name

    return build


def _huge_dims(d: Path) -> str:
    """A 16000x16000 raw-video header over a 1 KB packet: a bomb's declared size."""
    with av.open(os.fspath(d / "huge.mkv"), "w") as out:
        s = out.add_stream("rawvideo", rate=10)
        s.width, s.height, s.pix_fmt = 16000, 16000, "gray"
        p = av.Packet(b"\0" * 1000)
        p.stream, p.pts, p.dts, p.time_base, p.is_keyframe = s, 0, 0, Fraction(1, 10), True
        out.mux(p)
    return "huge.mkv"


def _zero_frames(d: Path) -> str:
    with av.open(os.fspath(d / "zero.mkv"), "w") as out:
        s = out.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        out.start_encoding()
    return "zero.mkv"


def _many_streams(d: Path) -> str:
    with av.open(os.fspath(d / "many.mkv"), "w") as out:
        vs = [out.add_stream("mpeg4", rate=10) for _ in range(6)]
        for s in vs:
            s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for i in range(10):
            for s in vs:
                frame = av.VideoFrame.from_ndarray(make_frame(i, 64, 48), format="rgb24")
                for p in s.encode(frame):
                    out.mux(p)
        for s in vs:
            for p in s.encode():
                out.mux(p)
    return "many.mkv"


def _image_pattern(d: Path) -> str:
    for i in range(1, 4):
        _mux(d / f"img{i:03d}.png", "png", 64, 48, 1, "rgb24", fmt="image2pipe")
    return "img%03d.png"  # a pattern FFmpeg's image2 demuxer would expand


def _sdp(d: Path) -> str:
    text = (
        "v=0\no=- 0 0 IN IP4 127.0.0.1\ns=probe\nc=IN IP4 0.0.0.0\nt=0 0\n"
        "m=video 25004 RTP/AVP 96\na=rtpmap:96 H264/90000\n"
    )
    return _put(d, "stream.sdp", text.encode())


def _text(name: str, text: str) -> Callable[[Path], str]:
    return lambda d: _put(d, name, text.encode())


def _writer(name: str, **kw) -> Callable[[Path], str]:
    return lambda d: Path(write_video(d / name, **kw)).name


CORPUS: dict[str, Callable[[Path], str]] = {
    # not media at all
    "zero_byte": lambda d: _put(d, "zero.mp4", b""),
    "random_bytes": lambda d: _put(d, "random.mp4", np.random.default_rng(0).bytes(65536)),
    "text": _text("notes.mp4", "this is plain text, not a video\n" * 50),
    "png_image": _image("png", "rgb24", "still.png"),
    "jpeg_image": _image("mjpeg", "yuvj420p", "still.jpg"),
    # formats that reference other files or sockets
    "ffconcat": _text("req.mp4", f"ffconcat version 1.0\nfile {SECRET}\n"),
    "ffconcat_missing": _text("req2.mp4", "ffconcat version 1.0\nfile no_such_video.mp4\n"),
    "ffconcat_absolute": lambda d: _put(
        d, "req3.mp4", f"ffconcat version 1.0\nfile {d / SECRET}\n".encode()
    ),
    "sdp": _sdp,
    "hls": _text("list.m3u8", f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\n{SECRET}\n"),
    "file_url_bytes": _text("url.mp4", f"file:{SECRET}"),
    "http_url_bytes": _text("http.mp4", "http://127.0.0.1:9/video.mp4"),
    "concat_protocol_bytes": _text("cat.mp4", f"concat:{SECRET}|{SECRET}"),
    "image2_pattern": _image_pattern,
    # broken media
    "truncated_mp4": _truncated_mp4,
    "truncated_mkv": _truncated_mkv,
    "moovless_mp4": _moovless,
    "garbage_packets": lambda d: Path(write_garbage_video(d / "garbage.mkv")).name,
    "zero_frames": _zero_frames,
    "huge_dimensions": _huge_dims,
    "corrupt_pts_ts": lambda d: write_corrupt_pts_ts(d / "corrupt.ts"),
    "audio_only_wav": lambda d: Path(write_audio(d / "tone.wav")).name,
    "audio_only_m4a": lambda d: Path(write_audio(d / "tone.m4a")).name,
    # odd but valid
    "one_frame": _writer("one.mp4", n_frames=1),
    "tiny_2x2": _writer("tiny.mp4", width=2, height=2, n_frames=5),
    "odd_size": _writer("odd.mp4", width=333, height=191, n_frames=9),
    "rotated": _writer("rot.mp4", rotation=90, n_frames=6),
    "vfr": _writer("vfr.mp4", pts=[0, 100, 150, 400, 410, 1000, 1500, 1530, 2900], n_frames=None),
    "many_streams": _many_streams,
    "raw_h264": _writer("raw.h264", container="h264", n_frames=12),
    "mpegts": _writer("a.ts", n_frames=12),
    "webm": _writer("a.webm", codec="libvpx", n_frames=12),
    "avi": _writer("a.avi", codec="mpeg4", n_frames=12),
    "flv": _writer("a.flv", codec="flv", n_frames=12),
    "mpeg_ps": _writer("a.mpg", codec="mpeg2video", container="mpeg", n_frames=12),
    "gif": lambda d: (_mux(d / "anim.gif", "gif", 64, 48, 10, "rgb8"), "anim.gif")[1],
}


def build(d: Path, names: list[str] | None = None) -> dict[str, str]:
    """Write the secret video and the cases into ``d``; returns case -> file name."""
    d.mkdir(parents=True, exist_ok=True)
    write_video(d / SECRET, n_frames=10)
    return {n: CORPUS[n](d) for n in names or CORPUS}


# ---- watching what a decode touches ------------------------------------------------------------

_IN_OPEN = 0x20


class FileWatch:
    """inotify on a directory: the names of files in it opened since :meth:`start`."""

    def __init__(self, d: Path):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK)
        if self.fd < 0 or self.libc.inotify_add_watch(self.fd, os.fsencode(d), _IN_OPEN) < 0:
            raise OSError(ctypes.get_errno(), "inotify")

    def opened(self) -> set[str]:
        names = set()
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return names
            i = 0
            while i < len(buf):
                _, mask, _, n = struct.unpack_from("iIII", buf, i)
                name = buf[i + 16 : i + 16 + n].rstrip(b"\0").decode()
                if mask & _IN_OPEN and name:
                    names.add(name)
                i += 16 + n

    def close(self) -> None:
        os.close(self.fd)


class SocketWatch(threading.Thread):
    """Polls the process's file descriptors for sockets while a decode runs."""

    def __init__(self):
        super().__init__(daemon=True)
        self.seen: set[str] = set()
        self.stop = threading.Event()

    def poll(self) -> None:
        for fd in os.listdir("/proc/self/fd"):
            try:
                link = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:"):
                self.seen.add(link)

    def run(self) -> None:
        while not self.stop.is_set():
            self.poll()
            time.sleep(0.001)


def run_case(d: Path, name: str, fname: str, mode: str, num_frames: int = 4) -> dict:
    """``load_video`` on one case, from its bytes or its path; what happened."""
    from trace_rt.errors import TraceError
    from trace_rt.video import load_video

    path = d / fname
    source: object = path.read_bytes() if mode == "bytes" else os.fspath(path)
    files, sockets = FileWatch(d), SocketWatch()
    sockets.poll()
    before = set(sockets.seen)
    sockets.start()
    t0 = time.monotonic()
    res: dict = {"case": name, "mode": mode}
    try:
        v = load_video(source, num_frames)
        res.update(outcome="ok", shape=list(v.frames.shape), times=v.times.tolist())
        res.update(duration=v.duration, total_frames=v.total_frames)
    except Exception as e:  # the corpus records every outcome; the test judges it
        res.update(outcome="error", trace_error=isinstance(e, TraceError), message=str(e))
        res["classes"] = [c.__name__ for c in type(e).__mro__]
    res["seconds"] = time.monotonic() - t0
    sockets.stop.set()
    sockets.join()
    sockets.poll()
    res["sockets"] = sorted(sockets.seen - before)
    res["opened"] = sorted(files.opened() - ({fname} if mode == "path" else set()))
    files.close()
    return res


def main(argv: list[str]) -> None:
    d = Path(argv[0]).resolve()
    cases = build(d, argv[1:] or None)
    os.chdir(d)  # where relative references in playlists and scripts resolve
    for name, fname in cases.items():
        modes = ["path"] if not (d / fname).exists() else ["bytes", "path"]
        for mode in modes:
            print(json.dumps(run_case(d, name, fname, mode)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
