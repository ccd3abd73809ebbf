"""Decode a video and sample frames uniformly, as the release does, with PyAV.

The release picks ``N`` frames at ``np.linspace(0, n - 1, N).astype(int)`` over the ``n``
frames in presentation order and stamps each with ``index / fps``. Here ``n`` is counted
(container frame counts and durations are often missing or wrong) and each timestamp is
the chosen frame's own presentation time relative to the first frame, which equals
``index / fps`` at a constant frame rate and stays right at a variable one.

Two passes: the first demuxes packets without decoding to collect presentation
timestamps (a raw stream without timestamps is counted by decoding instead); the second
decodes, converts to RGB only the chosen frames, and seeks past whole groups of pictures
that hold no chosen frame. Frames that fail to decode are replaced by the nearest chosen
frame that did decode. The display rotation (a phone's portrait flag) is applied.

Policy on long videos: TRACE writes times as ``dddd.d`` seconds, so a video longer than
``max_duration`` (default 9999.9 s, :data:`trace_rt.tokens.MAX_TIMESTAMP`) is rejected
with :class:`VideoTooLongError` rather than silently clamped, which would give wrong
times.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from fractions import Fraction
from typing import BinaryIO

import av
import numpy as np

from trace_rt.errors import (
    InputError,
    NoDecodableFramesError,
    NotAVideoError,
    NoVideoStreamError,
    VideoError,
    VideoNotFoundError,
    VideoTooLongError,
)
from trace_rt.tokens import MAX_TIMESTAMP

VideoSource = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO
DEFAULT_FPS = 25.0  # FFmpeg's assumption for raw streams that state no rate


@dataclass(frozen=True)
class SampledVideo:
    """The frames chosen from a video and when they are shown."""

    frames: np.ndarray  # [N, H, W, 3] uint8 RGB
    times: np.ndarray  # [N] float64, seconds from the first frame's presentation time
    duration: float  # seconds (span of presentation times + one frame's duration)
    fps: float  # average frame rate
    total_frames: int  # frames in the stream (counted, not from metadata)


class _Retry(Exception):
    """Internal: decode again without seeking / without timestamp matching."""


class _Source:
    """Whatever the caller gave, re-openable for each pass."""

    def __init__(self, source: VideoSource):
        self.path: str | None = None
        self.data: bytes | None = None
        self.file: BinaryIO | None = None
        if isinstance(source, (str, os.PathLike)):
            self.path = os.fsdecode(source)
            self.name = self.path
            if not os.path.exists(self.path):
                raise VideoNotFoundError(f"video file not found: {self.path}")
            if os.path.isfile(self.path) and os.path.getsize(self.path) == 0:
                raise NotAVideoError(f"{self.path}: the file is empty (0 bytes)")
        elif isinstance(source, (bytes, bytearray, memoryview)):
            self.data, self.name = bytes(source), "<video bytes>"
        elif callable(getattr(source, "read", None)):
            self.name = f"<{getattr(source, 'name', type(source).__name__)}>"
            seekable = callable(getattr(source, "seekable", None)) and source.seekable()
            if seekable and source.tell() == 0:
                self.file, self.start = source, 0
                if source.seek(0, io.SEEK_END) == 0:
                    raise NotAVideoError(f"{self.name}: the video data is empty (0 bytes)")
                source.seek(0)
            else:  # FFmpeg seeks in absolute offsets: give it the rest as bytes
                self.data = source.read()
        else:
            raise TypeError(
                "video source must be a path, bytes-like or a binary file object; "
                f"got {type(source).__name__}"
            )
        if self.data is not None and not self.data:
            raise NotAVideoError(f"{self.name}: the video data is empty (0 bytes)")

    def open(self) -> av.container.InputContainer:
        try:
            if self.path is not None:
                return av.open(self.path)
            if self.file is not None:
                self.file.seek(self.start)
                return av.open(self.file)
            return av.open(io.BytesIO(self.data))
        except av.error.FileNotFoundError as e:
            raise VideoNotFoundError(f"video file not found: {self.name}") from e
        except av.error.IsADirectoryError as e:
            raise NotAVideoError(f"{self.name} is a directory, not a video file") from e
        except av.error.PermissionError as e:
            raise VideoError(f"{self.name}: permission denied") from e
        except (av.error.FFmpegError, OSError, ValueError) as e:
            raise NotAVideoError(f"{self.name}: not a video PyAV can read ({e})") from e

    def rewind(self) -> None:
        if self.file is not None:
            self.file.seek(self.start)


def _video_stream(container: av.container.InputContainer, name: str) -> av.video.VideoStream:
    """The first video stream that is not a cover picture."""
    pic = av.stream.Disposition.attached_pic
    streams = [s for s in container.streams.video if not s.disposition & pic]
    if not streams:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        raise NoVideoStreamError(f"{name}: no video stream (streams: {', '.join(kinds)})")
    return streams[0]


def _frames(container: av.container.InputContainer, stream: av.video.VideoStream):
    """Decoded frames in presentation order; packets that fail to decode are skipped."""
    try:
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.error.FFmpegError:
                continue  # a corrupt packet: its frame is missing
            yield from frames
    except av.error.FFmpegError:
        return  # a truncated or corrupt container: keep what came before


def _probe(src: _Source) -> tuple[np.ndarray | None, np.ndarray, Fraction, float | None]:
    """Pass 1: (sorted unique pts or None, keyframe pts, time base, stated frame rate)."""
    with src.open() as c:
        s = _video_stream(c, src.name)
        # Read while the container is open: a stream's fields are freed with it (reading
        # time_base after close intermittently gave None).
        tb = s.time_base
        rate = s.guessed_rate or s.average_rate
        pts: list[int] = []
        keys: list[int] = []
        try:
            for p in c.demux(s):
                if not p.size:
                    continue
                if p.pts is None or tb is None:  # no usable timestamps: count frames
                    return None, np.empty(0, np.int64), tb, rate and float(rate)
                pts.append(p.pts)
                if p.is_keyframe:
                    keys.append(p.pts)
        except av.error.FFmpegError:
            pass  # a truncated file: count what was there
    return np.unique(pts).astype(np.int64), np.unique(keys), tb, rate and float(rate)


def _rgb(frame: av.VideoFrame, size: tuple[int, int] | None) -> np.ndarray:
    kwargs = {} if size is None else {"width": size[1], "height": size[0]}
    img = frame.to_ndarray(format="rgb24", **kwargs)
    rot = getattr(frame, "rotation", 0) or 0  # counter-clockwise degrees, for display
    if rot % 90 == 0 and rot % 360:
        img = np.rot90(img, k=int(rot // 90) % 4)
    return img


def _decode(
    src: _Source,
    wanted: np.ndarray,
    keys: np.ndarray | None,
    seek: bool,
    pts: np.ndarray | None = None,
) -> tuple[dict[int, np.ndarray], np.ndarray | None, int]:
    """Pass 2: decode the frames whose pts (or, when ``keys`` is None, whose rank in
    presentation order) is in sorted ``wanted``; returns (frames by key, spare, seeks).
    ``pts``, all packet timestamps, lets it check that frames carry the same ones."""
    got: dict[int, np.ndarray] = {}
    spare, size, seeks, i, pos = None, None, 0, 0, None

    def group(t: int) -> int:  # which group of pictures holds pts t
        return int(np.searchsorted(keys, t, side="right")) - 1

    def far(t: int) -> bool:  # is the next wanted frame a whole GOP or more ahead?
        return seek and group(t) >= (group(pos) if pos is not None else -1) + 2

    with src.open() as c:
        s = _video_stream(c, src.name)
        # Frame threads call PyAV's Python log callback, which takes the GIL: with PyAV
        # logging on, closing a decoder mid-stream can deadlock. Slices only, then.
        s.thread_type = "AUTO" if av.logging.get_level() is None else "SLICE"
        while i < len(wanted):
            target = None
            if keys is not None and far(int(wanted[i])):
                target = int(keys[group(int(wanted[i]))])
                c.seek(target, stream=s, backward=True)
                seeks += 1
            for rank, frame in enumerate(_frames(c, s)):
                key = rank if keys is None else frame.pts
                if key is None:
                    raise _Retry("frames carry no timestamps")
                if pts is not None and pts[min(np.searchsorted(pts, key), len(pts) - 1)] != key:
                    raise _Retry("frames carry other timestamps than their packets")
                if target is not None and key > wanted[i]:
                    raise _Retry("seek overshot")
                target, pos = None, key
                if spare is None:
                    size = (frame.height, frame.width)
                    spare = _rgb(frame, size)
                while i < len(wanted) and wanted[i] < key:
                    i += 1  # that frame failed to decode
                if i < len(wanted) and wanted[i] == key:
                    got[key] = _rgb(frame, size)
                    i += 1
                if i == len(wanted) or (keys is not None and far(int(wanted[i]))):
                    break
            else:
                break  # end of stream
    return got, spare, seeks


def _count_frames(src: _Source) -> int:
    """Pass 1 for streams whose packets carry no timestamps: decode and count."""
    with src.open() as c:
        return sum(1 for _ in _frames(c, _video_stream(c, src.name)))


def load_video(
    source: VideoSource, num_frames: int, *, max_duration: float = MAX_TIMESTAMP
) -> SampledVideo:
    """Decode ``source`` and sample ``num_frames`` frames uniformly.

    Args:
        source: A path, the file's bytes, or a binary file object. The video starts at
            the object's current position; one that is not seekable or not at 0 is read
            into memory, one at 0 is read in place and seeked back to 0 afterwards.
        num_frames: N. When the video has fewer frames, some are repeated.
        max_duration: Longer videos raise :class:`VideoTooLongError`.

    Raises:
        VideoNotFoundError, NotAVideoError, NoVideoStreamError, NoDecodableFramesError,
        VideoTooLongError, InputError; TypeError for an unsupported source type.
    """
    if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)):
        raise InputError(f"num_frames must be an integer; got {num_frames!r}")
    if num_frames < 1:
        raise InputError(f"num_frames must be at least 1; got {num_frames}")
    src = _Source(source)
    try:
        pts, keys, tb, rate = _probe(src)
        n = len(pts) if pts is not None else _count_frames(src)
        if n == 0:
            raise NoDecodableFramesError(f"{src.name}: the video stream has no frames")
        span = float(int(pts[-1] - pts[0]) * tb) if pts is not None else 0.0
        fps = (n - 1) / span if span > 0 else (rate or DEFAULT_FPS)
        duration = n / fps
        if duration > max_duration:
            raise VideoTooLongError(
                f"{src.name}: the video lasts {duration:.1f} s, longer than the "
                f"{max_duration} s that TRACE's time format (dddd.d s) can express; "
                "trim or split it"
            )
        idx = np.linspace(0, n - 1, num_frames).astype(int)
        wanted = np.unique(pts[idx] if pts is not None else idx)
        by_pts = keys if pts is not None else None
        try:
            got, spare, _ = _decode(src, wanted, by_pts, True, pts)
        except _Retry:  # a seek went wrong: decode straight through
            try:
                got, spare, _ = _decode(src, wanted, by_pts, False, pts)
            except _Retry:  # timestamps are unusable in decoded frames: go by rank
                got, spare, _ = _decode(src, np.unique(idx), None, False)
                pts = None
    finally:
        src.rewind()
    if spare is None:
        raise NoDecodableFramesError(f"{src.name}: no frame of the video stream could be decoded")
    ranks = {int(np.searchsorted(pts, k)) if pts is not None else k: a for k, a in got.items()}
    have = np.array(sorted(ranks))
    out = []
    for r in idx:
        if r not in ranks and len(have):  # undecodable: use the nearest chosen frame
            r = int(have[np.argmin(np.abs(have - r))])
        out.append(ranks.get(int(r), spare))
    if pts is not None:
        times = np.array([float(int(p - pts[0]) * tb) for p in pts[idx]], np.float64)
    else:
        times = idx / fps
    return SampledVideo(np.stack(out), times, float(duration), float(fps), n)
