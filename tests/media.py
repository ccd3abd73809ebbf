"""Real short test videos, written with PyAV (no binaries are shipped).

Every frame carries its own index as a row of black/white blocks along the top (bit 0
leftmost), which survives lossy coding, so a test can tell which frame it got back
(:func:`read_index`). Below it a coloured square moves left to right and the background
colour steps with the index.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from fractions import Fraction

import av
import numpy as np

BITS = 10  # frame indices up to 1023
BAND = 8  # height of the index band in pixels


def make_frame(index: int, width: int, height: int) -> np.ndarray:
    """The RGB picture of frame ``index``: index bits on top, a moving square below."""
    img = np.empty((height, width, 3), np.uint8)
    img[...] = ((index * 40) % 200 + 30, 90, 160)
    side = max(2, min(width, height) // 4)
    x = (index * 3) % max(1, width - side)
    img[BAND : BAND + side, x : x + side] = (230, 40, 40)
    block = width // BITS
    for b in range(BITS):
        img[:BAND, b * block : (b + 1) * block] = 255 if (index >> b) & 1 else 0
    return img


def read_index(frame: np.ndarray) -> int:
    """Decode the index written by :func:`make_frame` from an RGB frame."""
    block = frame.shape[1] // BITS
    band = frame[1 : BAND - 1].mean(axis=(0, 2))
    bits = [band[b * block + 1 : (b + 1) * block - 1].mean() > 128 for b in range(BITS)]
    return sum(1 << b for b, on in enumerate(bits) if on)


def write_video(
    path: str | os.PathLike,
    width: int = 64,
    height: int = 48,
    fps: int | Fraction = 10,
    n_frames: int | None = 20,
    *,
    pts: Sequence[int] | None = None,
    time_base: Fraction = Fraction(1, 1000),
    codec: str = "libx264",
    container: str | None = None,
    gop: int | None = None,
    rotation: int | None = None,
) -> str:
    """Write a video of :func:`make_frame` pictures; returns the path.

    Args:
        fps: Frame rate (constant frame rate unless ``pts`` is given).
        n_frames: Number of frames (ignored when ``pts`` is given).
        pts: Per-frame presentation times in ``time_base`` units: a variable frame rate.
        codec: ``libx264``, ``mpeg4``, ...
        container: FFmpeg format name; by default from the extension. ``h264`` writes a
            raw elementary stream: no frame count, no duration, no timestamps. ``.mkv``,
            ``.webm`` and ``.ts`` files have no frame count either.
        gop: Keyframe interval (1 = intra only).
        rotation: Display rotation in degrees, counter-clockwise (as PyAV reads it back).
    """
    path = os.fspath(path)
    count = len(pts) if pts is not None else int(n_frames or 0)
    with av.open(path, "w", format=container) as out:
        stream = out.add_stream(codec, rate=fps)
        # 4:2:0 needs even sizes; odd ones (real files have them) go 4:4:4.
        even = width % 2 == 0 and height % 2 == 0
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p" if even else "yuv444p"
        if codec == "libx264":
            stream.options = {"crf": "18", "preset": "ultrafast"}
        if gop is not None:
            stream.codec_context.gop_size = gop
        if pts is not None:
            stream.codec_context.time_base = time_base
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for i in range(count):
            frame = av.VideoFrame.from_ndarray(make_frame(i, width, height), format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = int(pts[i]), time_base
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def write_audio(path: str | os.PathLike, seconds: float = 1.0, rate: int = 8000) -> str:
    """An audio-only file (PCM in WAV by default, the format from the extension)."""
    path = os.fspath(path)
    with av.open(path, "w") as out:
        stream = out.add_stream("pcm_s16le" if path.endswith(".wav") else "aac", rate=rate)
        t = np.arange(int(seconds * rate)) / rate
        tone = (np.sin(2 * np.pi * 440 * t) * 8000).astype(np.int16)[None]
        frame = av.AudioFrame.from_ndarray(tone, format="s16", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def write_garbage_video(path: str | os.PathLike, n_packets: int = 10, codec: str = "mpeg4") -> str:
    """A container whose video packets are garbage, so no frame decodes."""
    path = os.fspath(path)
    rng = np.random.default_rng(0)
    with av.open(path, "w") as out:
        stream = out.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(n_packets):
            packet = av.Packet(rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
            packet.stream, packet.pts, packet.dts = stream, i, i
            packet.time_base, packet.is_keyframe = Fraction(1, 10), True
            out.mux(packet)
    return path


def spoil_packets(src: str | os.PathLike, dst: str | os.PathLike, spoil: Sequence[int]) -> str:
    """Copy ``src`` to ``dst`` with the video packets at indices ``spoil`` (in file
    order) replaced by garbage; use an intra-only ``src`` so the rest still decodes."""
    dst = os.fspath(dst)
    rng = np.random.default_rng(1)
    with av.open(os.fspath(src)) as inp, av.open(dst, "w") as out:
        s = inp.streams.video[0]
        stream = out.add_stream_from_template(s)
        packets = [p for p in inp.demux(s) if p.size]
        for i, p in enumerate(packets):
            payload = bytes(p)
            if i in spoil:
                payload = rng.integers(0, 256, len(payload), dtype=np.uint8).tobytes()
            packet = av.Packet(payload)
            packet.stream, packet.pts, packet.dts = stream, p.pts, p.dts
            packet.time_base, packet.is_keyframe = p.time_base, p.is_keyframe
            out.mux(packet)
    return dst
