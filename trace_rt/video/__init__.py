"""Decode a video and sample frames uniformly, as the release does, with PyAV.

The release picks ``N`` frames at ``np.linspace(0, n - 1, N).astype(int)`` over the ``n``
frames in presentation order and stamps each with ``index / fps``. Here ``n`` is counted
(container frame counts and durations are often missing or wrong) and each timestamp is
the chosen frame's own presentation time relative to the first frame, which equals
``index / fps`` at a constant frame rate and stays right at a variable one.

Two passes: the first demuxes packets without decoding to collect presentation
timestamps (a raw stream without timestamps is counted by decoding instead); the second
decodes only the chosen frames and seeks past whole groups of pictures that hold none.
Each chosen frame is converted to RGB and, given a ``transform`` (the pipeline passes
CLIP preprocessing), reduced to model resolution as soon as it is decoded: memory holds
the sampled frames at model size plus a few full frames, never a stack of full frames.
Frames that fail to decode are replaced by the nearest chosen frame that did decode. The
display rotation (a phone's portrait flag) is applied. Corrupt timestamps (one PTS far from
both its neighbours, :mod:`trace_rt.video.timeline`) are interpolated and the frames
sampled by rank instead.

Untrusted input (:mod:`trace_rt.video.source`): bytes, file objects and, by default,
paths are demuxed only by the media formats of :data:`ALLOWED_FORMATS` (mp4/mov,
matroska/webm, avi, mpegts, mpeg-ps, flv, ogg, gif, raw h264/hevc), with every FFmpeg
protocol refused, so a playlist, a concat script or an SDP file can neither read other
files nor open sockets (:class:`UnsupportedFormatError`). URLs are refused. A named pipe,
``/dev/stdin`` or a non-seekable file object is read once into memory, up to
:data:`MAX_STREAM_BYTES` (1 GiB); ``trace-rt run -`` reads standard input that way and
passes the bytes (``"-"`` is not a path here). :class:`DecodeLimits` bounds each decode:
``max_pixels`` (default DCI 8K, 8192 x 4320; larger frames raise
:class:`VideoTooLargeError`, from the stream header before decoding) and
``time_budget_s`` (default 120 s; :class:`VideoTimeoutError`); a ``cancelled`` callback is
asked between packets (:class:`DecodeCancelledError`).

Policy on long videos: TRACE writes times as ``dddd.d`` seconds, so a video longer than
``max_duration`` (default 9999.9 s, :data:`trace_rt.tokens.MAX_TIMESTAMP`) is rejected
with :class:`VideoTooLongError` rather than silently clamped, which would give wrong
times.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from trace_rt.errors import InputError, NoDecodableFramesError, VideoTooLongError
from trace_rt.tokens import MAX_TIMESTAMP
from trace_rt.video import decode as _dec
from trace_rt.video.decode import FrameConverter, _decode, _probe, _Retry
from trace_rt.video.source import (
    ALLOWED_FORMATS,
    DEFAULT_LIMITS,
    MAX_STREAM_BYTES,
    DecodeLimits,
    Source,
    VideoSource,
    read_stream,
)
from trace_rt.video.timeline import repair_timestamps

_Source = Source  # the name tests and older callers use

__all__ = [
    "ALLOWED_FORMATS",
    "DEFAULT_FPS",
    "DEFAULT_LIMITS",
    "MAX_STREAM_BYTES",
    "DecodeLimits",
    "FrameConverter",
    "SampledVideo",
    "VideoSource",
    "_Retry",
    "_Source",
    "_decode",
    "_probe",
    "load_video",
    "read_stream",
]

DEFAULT_FPS = 25.0  # FFmpeg's assumption for raw streams that state no rate


@dataclass(frozen=True)
class SampledVideo:
    """The frames chosen from a video and when they are shown."""

    frames: np.ndarray  # [N, H, W, 3] uint8 RGB, or [N, ...] transform outputs
    times: np.ndarray  # [N] float64, seconds from the first frame's presentation time
    duration: float  # seconds (span of presentation times + one frame's duration)
    fps: float  # average frame rate
    total_frames: int  # frames in the stream (counted, not from metadata)


def load_video(
    source: VideoSource,
    num_frames: int,
    *,
    max_duration: float = MAX_TIMESTAMP,
    limits: DecodeLimits | None = None,
    cancelled: Callable[[], bool] | None = None,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
    convert: FrameConverter | None = None,
    sampler: Callable[[int, float], np.ndarray] | None = None,
) -> SampledVideo:
    """Decode ``source`` and sample ``num_frames`` frames uniformly.

    Args:
        source: A path, the file's bytes, or a binary file object. The video starts at
            the object's current position; one that is not seekable or not at 0 is read
            into memory, one at 0 is read in place and seeked back to 0 afterwards. A
            path to a named pipe or ``/dev/stdin`` is read once into memory.
        num_frames: N. When the video has fewer frames, some are repeated.
        max_duration: Longer videos raise :class:`VideoTooLongError`.
        limits: Allowed formats, largest frame, time budget (default
            :data:`DEFAULT_LIMITS`).
        cancelled: Asked between packets; returning True raises
            :class:`DecodeCancelledError`.
        transform: Applied to each chosen ``[H, W, 3]`` uint8 RGB frame as soon as it is
            decoded; ``frames`` then stacks its outputs (the full-size frame is dropped).
        convert: Instead of the RGB conversion and ``transform``: called with each chosen
            decoded ``av.VideoFrame`` and the first frame's coded ``(height, width)``, so
            it can scale while converting (:class:`trace_rt.video.convert.ModelFrames`
            does, straight to the model's input); ``frames`` stacks its outputs.
        sampler: ``(frame count, fps) -> num_frames frame indices`` instead of the
            release's uniform ``linspace(0, n - 1, N)`` (e.g. the video-QA benchmarks'
            segment midpoints within a bound); indices are clipped to the stream.

    Raises:
        VideoNotFoundError, NotAVideoError, UnsupportedFormatError, NoVideoStreamError,
        NoDecodableFramesError, VideoTooLongError, VideoTooLargeError, VideoTimeoutError,
        VideoError, InputError, DecodeCancelledError; TypeError for an unsupported
        source type.
    """
    if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)):
        raise InputError(f"num_frames must be an integer; got {num_frames!r}")
    if num_frames < 1:
        raise InputError(f"num_frames must be at least 1; got {num_frames}")
    src = Source(source, limits, cancelled)
    if transform is not None and convert is not None:
        raise InputError("give transform or convert, not both")
    fn = {"transform": transform, "convert": convert}
    try:
        probe = _dec._probe(src)
        tb, repaired = probe.time_base, 0
        if probe.pts is not None:
            table, repaired = repair_timestamps(probe.pts, tb, probe.duration)
            n = len(table)
        else:
            table, n = None, _dec._count_frames(src)
        if n == 0:
            raise NoDecodableFramesError(f"{src.name}: the video stream has no frames")
        span = _seconds(table[-1] - table[0], tb) if table is not None else 0.0
        fps = (n - 1) / span if span > 0 else (probe.rate or DEFAULT_FPS)
        duration = n / fps
        if duration > max_duration:
            raise VideoTooLongError(
                f"{src.name}: the video lasts {duration:.1f} s, longer than the "
                f"{max_duration} s that TRACE's time format (dddd.d s) can express; "
                "trim or split it"
            )
        if sampler is None:
            idx = np.linspace(0, n - 1, num_frames).astype(int)
        else:
            idx = np.clip(np.asarray(sampler(n, fps), dtype=np.int64).reshape(-1), 0, n - 1)
            if idx.size != num_frames:
                raise InputError(f"the sampler chose {idx.size} frames, not {num_frames}")
        pts = table if table is not None and not repaired else None  # frames carry these
        got = spare = None
        if pts is not None:
            wanted = pts[idx]
            try:
                got, spare, _ = _dec._decode(src, wanted, probe.keys, True, pts, **fn)
            except _Retry:  # a seek went wrong: decode straight through
                try:
                    got, spare, _ = _dec._decode(src, wanted, probe.keys, False, pts, **fn)
                except _Retry:  # timestamps are unusable in decoded frames: go by rank
                    pts = None
        if pts is None:  # by rank in presentation order, no seeking
            got, spare, _ = _dec._decode(src, np.unique(idx), None, False, **fn)
    finally:
        src.rewind()
        _dec.release_heap()
    if spare is None:
        raise NoDecodableFramesError(f"{src.name}: no frame of the video stream could be decoded")
    ranks = {int(np.searchsorted(pts, k)) if pts is not None else k: a for k, a in got.items()}
    have = np.array(sorted(ranks))
    out = []
    for r in idx:
        if r not in ranks and len(have):  # undecodable: use the nearest chosen frame
            r = int(have[np.argmin(np.abs(have - r))])
        out.append(ranks.get(int(r), spare))
    if table is not None:
        times = np.array([_seconds(t - table[0], tb) for t in table[idx]], np.float64)
    else:
        times = idx / fps
    frames = np.stack(out)
    # The per-frame arrays are stacked: free them and hand their pages back too. Scattered
    # among the decoder's freed blocks, they had kept ~90 MB of heap resident past the
    # trim above (exact resize, 4K): memory the caller's next allocation (the float32
    # pixel values, 173 MB at 128 frames) would otherwise come on top of.
    del out, got, ranks, spare
    _dec.release_heap()
    return SampledVideo(frames, times, float(duration), float(fps), n)


def _seconds(ticks: np.integer | np.floating, tb: Fraction) -> float:
    """``ticks * tb`` in seconds; exact (a Fraction) for integer timestamps, as before."""
    if isinstance(ticks, (int, np.integer)):
        return float(int(ticks) * tb)
    return float(ticks) * float(tb)
