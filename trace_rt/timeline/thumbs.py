"""Small JPEG thumbnails of the sampled frames, for the filmstrip of a timeline report.

Encoded with FFmpeg's MJPEG encoder through PyAV, so the torch-free runtime needs no
image library. Each frame is scaled down with libswscale before it is encoded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from fractions import Fraction

import av
import numpy as np

THUMB_HEIGHT = 72  # px: legible in a filmstrip, ~2-4 KB per JPEG


def thumb_size(width: int, height: int, target_height: int = THUMB_HEIGHT) -> tuple[int, int]:
    """(width, height) of a thumbnail keeping the aspect ratio; even sides (4:2:0 JPEG)."""
    h = max(2, min(target_height, height) // 2 * 2)
    w = max(2, round(width * h / height / 2) * 2)
    return w, h


def shrinker(target_height: int = THUMB_HEIGHT) -> Callable[[np.ndarray], np.ndarray]:
    """A per-frame transform: RGB ``[H, W, 3]`` uint8 -> thumbnail ``[h, w, 3]``. The size
    is fixed by the first frame, so a stream that changes resolution midway still gives
    thumbnails that stack."""
    size: list[int] = []

    def shrink(frame: np.ndarray) -> np.ndarray:
        if not size:
            size.extend(thumb_size(frame.shape[1], frame.shape[0], target_height))
        vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        return vf.reformat(width=size[0], height=size[1], interpolation="AREA").to_ndarray()

    return shrink


def jpegs(frames: Iterable[np.ndarray]) -> list[bytes]:
    """Encode RGB frames ``[h, w, 3]`` uint8 (thumbnail sized) as JPEG files, at the
    encoder's default rate (~1-3 KB for a 128x72 thumbnail)."""
    out: list[bytes] = []
    ctx: av.VideoCodecContext | None = None
    for rgb in frames:
        h, w = rgb.shape[:2]
        if ctx is None or (ctx.width, ctx.height) != (w, h):
            ctx = av.CodecContext.create("mjpeg", "w")
            ctx.width, ctx.height = w, h
            ctx.pix_fmt = "yuvj420p"
            ctx.time_base = Fraction(1, 25)
        vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        vf = vf.reformat(format="yuvj420p")
        vf.pts = len(out)
        packets = ctx.encode(vf)
        out.append(b"".join(bytes(p) for p in packets))
    return out
