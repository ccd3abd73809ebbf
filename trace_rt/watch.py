"""``trace-rt watch``: TRACE over a live video, one sliding window at a time.

A source (a V4L2 camera such as ``/dev/video0``, an ``rtsp://``/``http(s)://``/``tcp://``/
``udp://``/``srt://`` stream, or a file, optionally played at its real speed) is decoded on a
reader thread; frames are cut into windows of ``window`` seconds every ``stride`` seconds of
stream time, and each window's answer comes out as one JSON line with its stream times and
the wall-clock time it was produced.

Each window samples its frames exactly as ``trace-rt run`` samples a file holding just that
window (ranks ``linspace(0, n-1, F)`` of the window's ``n`` frames, ``n`` taken from the
stream's frame rate; times relative to the window's first frame; duration ``n / fps``), so a
window's events equal ``trace-rt run`` on that cut of the stream. Memory is bounded: a window
keeps only the frames it samples (at most ``frames`` per open window, and at most
``ceil(window / stride)`` windows are open), and completed windows wait in a queue of one:
when inference falls behind a live source, the waiting window is dropped and a
``{"dropped": ...}`` line says so (files are never dropped: reading waits instead).

Live protocols are an explicit, user-chosen exception to the runtime's no-network rule for
video: they are opened only here, never for request bytes (``trace_rt.video`` and the
server accept only media bytes).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trace_rt.errors import InputError, TraceError

LIVE_SCHEMES = (
    "rtsp://",
    "rtsps://",
    "rtmp://",
    "http://",
    "https://",
    "tcp://",
    "udp://",
    "srt://",
)


class SourceError(TraceError):
    """The source cannot be opened, or fails while it is read."""


@dataclass
class Window:
    """One window of stream time [start, end) and the frames it samples."""

    index: int
    start: float
    end: float
    ranks: np.ndarray  # frame ranks within the window that are sampled
    count: int = 0  # frames of the window seen so far
    kept: dict[int, tuple[float, np.ndarray]] = field(default_factory=dict)
    closed_wall: float = 0.0

    def add(self, t: float, rgb: np.ndarray) -> None:
        if self.count in self._wanted:
            self.kept[self.count] = (t, rgb)
        self.count += 1

    @property
    def _wanted(self) -> set[int]:
        return {int(r) for r in self.ranks}

    def sampled(self) -> tuple[np.ndarray, np.ndarray]:
        """(frames [F, H, W, 3], times [F] relative to the window's first frame); a rank
        the stream did not deliver takes the nearest kept frame, as ``load_video`` does."""
        have = np.array(sorted(self.kept))
        frames, times = [], []
        for r in self.ranks:
            r = int(r) if int(r) in self.kept else int(have[np.argmin(np.abs(have - r))])
            t, rgb = self.kept[r]
            frames.append(rgb)
            times.append(t)
        first = self.kept[int(have[0])][0]
        return np.stack(frames), np.array(times) - first


def open_source(source: str, timeout: float) -> Any:
    """Open a camera, a live stream or a file with PyAV; a clear error when it cannot."""
    import av

    us = str(int(timeout * 1e6))
    try:
        if source.startswith("/dev/video"):
            if not Path(source).exists():
                raise SourceError(f"{source}: no such camera device")
            return av.open(source, format="v4l2")
        if source.startswith(LIVE_SCHEMES):
            # rw_timeout: a stalled stream fails the read instead of blocking for ever.
            options = {"rw_timeout": us, "timeout": us}
            if source.startswith("rtsp"):
                options = {"rtsp_transport": "tcp", "timeout": us}
            return av.open(source, options=options, timeout=timeout)
        if "://" in source:
            raise SourceError(
                f"{source}: unsupported protocol; use one of {', '.join(LIVE_SCHEMES)}"
            )
        if not Path(source).is_file():
            raise SourceError(f"{source}: no such file (or a camera /dev/videoN, or a stream URL)")
        return av.open(source)
    except av.error.FFmpegError as e:
        raise SourceError(f"cannot open {source}: {e}") from None


def decoded_frames(
    container: Any, realtime: bool, failures: list[SourceError] | None = None
) -> Iterator[tuple[float, np.ndarray]]:
    """(stream time in s from the first frame, RGB frame) in presentation order.

    A read error raises :class:`SourceError`, or with *failures* is appended there and
    ends the frames, so that the windows already complete are still answered (an HTTP
    stream without a length ends with an I/O error after its last frame).
    """
    import av

    stream = next((s for s in container.streams if s.type == "video"), None)
    if stream is None:
        raise SourceError("the source has no video stream")
    t0 = wall0 = None
    try:
        for frame in container.decode(stream):
            if frame.pts is None or frame.time_base is None:
                continue
            t = float(frame.pts * frame.time_base)
            if t0 is None:
                t0, wall0 = t, time.monotonic()
            t -= t0
            if realtime:  # a file played at its own speed
                time.sleep(max(0.0, wall0 + t - time.monotonic()))
            yield t, frame.to_ndarray(format="rgb24")
    except av.error.FFmpegError as e:
        failure = SourceError(f"the stream failed: {e}")
        if failures is None:
            raise failure from None
        failures.append(failure)


def stream_rate(container: Any) -> float | None:
    stream = next((s for s in container.streams if s.type == "video"), None)
    rate = stream and (stream.average_rate or stream.guessed_rate)
    return float(rate) if rate else None


def windows_of(
    frames: Iterator[tuple[float, np.ndarray]],
    *,
    window: float,
    stride: float,
    n_frames: int,
    fps: float | None,
) -> Iterator[Window]:
    """Completed windows, in order. A window closes when a frame at or past its end arrives
    (or the stream ends with all its frames in)."""
    open_: list[Window] = []
    next_index = 0
    rate = fps
    last_t = None

    def new(k: int) -> Window:
        n = max(1, round(window * rate))
        return Window(
            k, k * stride, k * stride + window, np.linspace(0, n - 1, n_frames).astype(int)
        )

    pending: list[tuple[float, np.ndarray]] = []
    for t, rgb in frames:
        if rate is None:  # no nominal rate: measure it from the first two frames
            pending.append((t, rgb))
            if len(pending) < 2:
                continue
            rate = 1.0 / max(pending[1][0] - pending[0][0], 1e-6)
            items, pending = pending, []
        else:
            items = [(t, rgb)]
        for t, rgb in items:
            last_t = t
            while next_index * stride <= t:  # windows that have started
                open_.append(new(next_index))
                next_index += 1
            for w in list(open_):
                if t >= w.end:
                    w.closed_wall = time.monotonic()
                    open_.remove(w)
                    yield w
                elif t >= w.start:
                    w.add(t, rgb)
    for w in open_:  # stream ended: a window with all its frames is complete
        n = max(1, round(window * rate)) if rate else 0
        if w.count >= n and last_t is not None:
            w.closed_wall = time.monotonic()
            yield w


def run_watch(
    source: str,
    infer: Callable[[np.ndarray, np.ndarray, float], dict[str, Any]],
    *,
    window: float,
    stride: float,
    n_frames: int,
    realtime: bool = False,
    drop: bool | None = None,
    timeout: float = 10.0,
    max_windows: int | None = None,
    emit: Callable[[dict[str, Any]], None] = lambda d: print(json.dumps(d), flush=True),
) -> dict[str, Any]:
    """Watch *source*; *infer(frames, times, duration)* answers one window. Returns the
    summary line (also emitted).

    Args:
        drop: drop a waiting window when a newer one completes (default: for cameras and
            streams, and files played in real time); False makes reading wait instead.
        timeout: seconds a stream may stall before it is given up.
        max_windows: stop after this many windows (answered or dropped).
    """
    if window <= 0 or stride <= 0:
        raise InputError("--window and --stride must be positive (seconds)")
    if n_frames < 1:
        raise InputError("--frames must be at least 1")
    container = open_source(source, timeout)
    live = realtime or not Path(source).is_file()
    drop = live if drop is None else drop
    fps = stream_rate(container)
    done = queue.Queue(maxsize=1)
    stop = threading.Event()
    status: dict[str, Any] = {"end": "stream ended", "windows": 0, "dropped": 0}

    def reader() -> None:
        failures: list[SourceError] = []
        try:
            frames = decoded_frames(container, realtime, failures)
            for w in windows_of(frames, window=window, stride=stride, n_frames=n_frames, fps=fps):
                if stop.is_set():
                    break
                if drop:
                    try:
                        done.put_nowait(w)
                    except queue.Full:  # inference is behind: replace the waiting window
                        try:
                            old = done.get_nowait()
                            status["dropped"] += 1
                            emit(_dropped(old))
                        except queue.Empty:
                            pass
                        done.put(w)
                else:
                    done.put(w)
            if failures:
                status["end"] = str(failures[0])
        except SourceError as e:
            status["end"] = str(e)
        finally:
            done.put(None)
            container.close()

    thread = threading.Thread(target=reader, name="trace-rt-watch-reader", daemon=True)
    thread.start()
    answered = 0
    try:
        while True:
            w = done.get()
            if w is None:
                break
            frames, times = w.sampled()
            result = infer(frames, times, w.end - w.start)
            answered += 1
            emit(_line(w, result))
            if max_windows is not None and answered + status["dropped"] >= max_windows:
                status["end"] = f"stopped after {max_windows} windows"
                break
    finally:
        stop.set()
        while thread.is_alive():  # unblock a reader waiting on the full queue
            with contextlib.suppress(queue.Empty):
                done.get(timeout=0.1)
    status["windows"] = answered
    emit(status)
    return status


def _wall() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def _dropped(w: Window) -> dict[str, Any]:
    return {
        "dropped": w.index,
        "stream_start": round(w.start, 3),
        "stream_end": round(w.end, 3),
        "wall_clock": _wall(),
        "reason": "inference is behind the stream; a newer window replaced this one",
    }


def _line(w: Window, result: dict[str, Any]) -> dict[str, Any]:
    events = result.get("events", [])
    shifted = [
        {**e, "timestamps": [round(w.start + t, 3) for t in e.get("timestamps", [])]}
        for e in events
    ]
    return {
        "window": w.index,
        "stream_start": round(w.start, 3),
        "stream_end": round(w.end, 3),
        "wall_clock": _wall(),
        "latency_s": round(time.monotonic() - w.closed_wall, 3),
        "events": events,
        "stream_events": shifted,
        **{k: v for k, v in result.items() if k not in ("events", "video")},
    }
