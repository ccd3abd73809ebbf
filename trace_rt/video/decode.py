"""The two passes over a container: timestamps first, then the chosen frames.

Every loop asks :meth:`Source.check` between packets (time budget, cancellation), and
every frame's size is held to the request's pixel limit before it is converted.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable
from fractions import Fraction
from typing import NamedTuple

import av
import numpy as np

from trace_rt.errors import NoVideoStreamError
from trace_rt.video.source import Source

# Frame threads each hold a frame in flight: fewer threads for big frames keep the
# decoder's memory near this many pixels (4K decodes on 8 threads, 8K on 2).
_THREAD_PIXELS = 8 * 3840 * 2160

# (decoded frame, first frame's (height, width)) -> the array kept for it
FrameConverter = Callable[[av.VideoFrame, tuple[int, int]], np.ndarray]


class _Retry(Exception):
    """Internal: decode again without seeking / without timestamp matching."""


def _video_stream(container: av.container.InputContainer, src: Source) -> av.video.VideoStream:
    """The first video stream that is not a cover picture, checked against the limits."""
    pic = av.stream.Disposition.attached_pic
    streams = [s for s in container.streams.video if not s.disposition & pic]
    if not streams:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        raise NoVideoStreamError(f"{src.name}: no video stream (streams: {', '.join(kinds)})")
    s = streams[0]
    src.check_size(s.codec_context.width, s.codec_context.height)  # before any decoding
    return s


def _open_decoder(s: av.video.VideoStream, src: Source) -> None:
    """Decoder settings: the pixel limit (FFmpeg refuses larger frames) and threads."""
    cc = s.codec_context
    cc.options = {"max_pixels": str(src.limits.max_pixels)}
    # Frame threads call PyAV's Python log callback, which takes the GIL: with PyAV
    # logging on, closing a decoder mid-stream can deadlock. Slices only, then.
    frame_threads = av.logging.get_level() is None
    threads = decoder_threads(int(cc.width or 0), int(cc.height or 0))
    s.thread_type = "AUTO" if frame_threads and threads > 1 else "SLICE"
    s.thread_count = threads


def decoder_threads(width: int, height: int) -> int:
    """The decoder threads used for frames of this size (benchmarks give peers as many)."""
    return min(_cores(), max(1, _THREAD_PIXELS // max(1, width * height)))


def _cores() -> int:
    """The cores this process may run on (a server's instances may be pinned to a few)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity else os.cpu_count() or 1


# Codecs whose packets each hold one frame with that frame's pts, so a packet's pts says
# whether its frame is wanted. (MPEG-4 part 2 in AVI may pack two frames in one packet.)
_ONE_FRAME_PER_PACKET = frozenset({"h264", "hevc"})


def _frames(
    container: av.container.InputContainer,
    stream: av.video.VideoStream,
    src: Source,
    wanted: frozenset[int] | None = None,
):
    """Decoded frames in presentation order; packets that fail to decode are skipped.

    Given the pts of the ``wanted`` frames (H.264/HEVC only), the decoder skips the others
    that no frame depends on (non-reference pictures: most B-frames) instead of decoding
    them: they could only be thrown away. Reference pictures are always decoded.
    """
    cc = stream.codec_context
    if cc.name not in _ONE_FRAME_PER_PACKET:
        wanted = None
    mode = cc.skip_frame
    try:
        for packet in container.demux(stream):
            src.check()
            if wanted is not None:
                want = "DEFAULT" if packet.pts is None or packet.pts in wanted else "NONREF"
                if want != mode:  # frame threads take the setting with each packet
                    cc.skip_frame = mode = want
            try:
                frames = packet.decode()
            except av.error.FFmpegError:
                # The decoder refuses frames over max_pixels: say so rather than skip.
                cc = stream.codec_context
                src.check_size(cc.width, cc.height)
                continue  # a corrupt packet: its frame is missing
            for frame in frames:
                src.check_size(frame.width, frame.height)
                yield frame
    except av.error.FFmpegError:
        return  # a truncated or corrupt container: keep what came before


class Probe(NamedTuple):
    """What pass 1 learns without decoding."""

    pts: np.ndarray | None  # packet pts in file order; None: no usable timestamps
    keys: np.ndarray  # sorted keyframe pts
    time_base: Fraction
    rate: float | None  # the stream's stated frame rate
    duration: float | None  # the container's stated duration, seconds


def _probe(src: Source) -> Probe:
    """Pass 1: demux the video stream's packets (no decoding) for their timestamps."""
    with src.open() as c:
        s = _video_stream(c, src)
        if s.codec_context.width and s.codec_context.height:
            return _timestamps(c, s, src)
    # No size: FFmpeg's probe decoder zeroes one over max_pixels (or none was declared).
    # Look again without letting the probe decode, so the declared size is checked.
    with src.open(probe_decodes=False) as c:
        return _timestamps(c, _video_stream(c, src), src)


def _timestamps(c: av.container.InputContainer, s: av.video.VideoStream, src: Source) -> Probe:
    stated = c.duration / 1e6 if c.duration else None
    # Read while the container is open: a stream's fields are freed with it (reading
    # time_base after close intermittently gave None).
    tb = s.time_base
    rate = s.guessed_rate or s.average_rate
    rate = rate and float(rate)
    pts: list[int] = []
    keys: list[int] = []
    try:
        for p in c.demux(s):
            src.check()
            if not p.size:
                continue
            if p.pts is None or tb is None:  # no usable timestamps: count frames
                return Probe(None, np.empty(0, np.int64), tb, rate, stated)
            pts.append(p.pts)
            if p.is_keyframe:
                keys.append(p.pts)
    except av.error.FFmpegError:
        pass  # a truncated file: count what was there
    return Probe(np.array(pts, np.int64), np.unique(keys), tb, rate, stated)


def _rgb(frame: av.VideoFrame, size: tuple[int, int] | None) -> np.ndarray:
    kwargs = {} if size is None else {"width": size[1], "height": size[0]}
    img = frame.to_ndarray(format="rgb24", **kwargs)
    rot = getattr(frame, "rotation", 0) or 0  # counter-clockwise degrees, for display
    if rot % 90 == 0 and rot % 360:
        img = np.rot90(img, k=int(rot // 90) % 4)
    return img


def _decode(
    src: Source,
    wanted: np.ndarray,
    keys: np.ndarray | None,
    seek: bool,
    pts: np.ndarray | None = None,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
    convert: FrameConverter | None = None,
) -> tuple[dict[int, np.ndarray], np.ndarray | None, int]:
    """Pass 2: decode the frames whose pts (or, when ``keys`` is None, whose rank in
    presentation order) is in sorted ``wanted``; returns (frames by key, spare, seeks).

    ``pts``, all packet timestamps sorted, lets it check that frames carry the same ones.
    Each chosen frame is converted to RGB (at the first frame's size) and passed through
    ``transform`` as soon as it is decoded, so only its result is kept; ``convert``, given,
    replaces both (``convert(frame, first frame's (height, width))``). ``spare`` is the
    first decoded frame, converted only when no chosen frame decoded.
    """
    got: dict[int, np.ndarray] = {}
    first, size, seeks, i, pos = None, None, 0, 0, None

    def conv(frame: av.VideoFrame) -> np.ndarray:
        if convert is not None:
            return convert(frame, size)
        img = _rgb(frame, size)
        return img if transform is None else transform(img)

    def group(t: int) -> int:  # which group of pictures holds pts t
        return int(np.searchsorted(keys, t, side="right")) - 1

    def far(t: int) -> bool:  # is the next wanted frame a whole GOP or more ahead?
        return seek and group(t) >= (group(pos) if pos is not None else -1) + 2

    # Frames chosen by rank need every frame decoded to count them.
    skip = frozenset(int(t) for t in wanted) if keys is not None else None
    with src.open() as c:
        s = _video_stream(c, src)
        _open_decoder(s, src)
        while i < len(wanted):
            target = None
            if keys is not None and far(int(wanted[i])):
                target = int(keys[group(int(wanted[i]))])
                c.seek(target, stream=s, backward=True)
                seeks += 1
            for rank, frame in enumerate(_frames(c, s, src, skip)):
                key = rank if keys is None else frame.pts
                if key is None:
                    raise _Retry("frames carry no timestamps")
                if pts is not None and pts[min(np.searchsorted(pts, key), len(pts) - 1)] != key:
                    raise _Retry("frames carry other timestamps than their packets")
                if target is not None and key > wanted[i]:
                    raise _Retry("seek overshot")
                target, pos = None, key
                if size is None:
                    size, first = (frame.height, frame.width), frame
                while i < len(wanted) and wanted[i] < key:
                    i += 1  # that frame failed to decode
                if i < len(wanted) and wanted[i] == key:
                    got[key] = conv(frame)
                    first = None  # a chosen frame decoded: no spare needed
                    i += 1
                if i == len(wanted) or (keys is not None and far(int(wanted[i]))):
                    break
            else:
                break  # end of stream
        spare = conv(first) if first is not None and not got else None
        if spare is None and got:
            spare = next(iter(got.values()))
    return got, spare, seeks


def _count_frames(src: Source) -> int:
    """Pass 1 for streams whose packets carry no timestamps: decode and count."""
    with src.open() as c:
        s = _video_stream(c, src)
        _open_decoder(s, src)
        return sum(1 for _ in _frames(c, s, src))


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc
    except (AttributeError, OSError):
        return None  # another C library: nothing to do


def release_heap() -> None:
    """Hand the heap memory freed by a closed decoder back to the system.

    A 4K H.264 decoder's reference frames and thread buffers come to 100-150 MB. glibc
    keeps such freed blocks in the process heap, so without this the stage's peak would
    carry them into the pixel values allocated next (and into every later stage).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
