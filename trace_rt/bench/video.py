"""The bench's default input: a synthetic clip, written with PyAV so nothing is shipped.

Fixed content (a square moving over a background that changes colour every frame, H.264
with 2 s keyframe intervals), so every backend and every run decodes the same bytes.
tests/media.py has a richer writer; the library cannot import from tests/.
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np

SECONDS, FPS, WIDTH, HEIGHT = 8, 25, 320, 240
DESCRIPTION = f"synthetic {SECONDS} s {WIDTH}x{HEIGHT} {FPS} fps H.264 ({SECONDS * FPS} frames)"


def synthetic_video(path: str | Path) -> Path:
    """Write the default clip to *path*; returns it."""
    path = Path(path)
    side = HEIGHT // 4
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.options = {"crf": "23", "preset": "veryfast", "g": str(2 * FPS)}
        for i in range(SECONDS * FPS):
            img = np.empty((HEIGHT, WIDTH, 3), np.uint8)
            img[...] = ((i * 7) % 200 + 30, 90, 160)
            x = (i * 3) % (WIDTH - side)
            img[HEIGHT // 3 : HEIGHT // 3 + side, x : x + side] = (230, 40, 40)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path
