"""Write the video front end's benchmark clips with PyAV (nothing is shipped or committed).

``python -m benchmarks.video_clips OUT_DIR [--which 4k,portrait,long]`` writes:

- ``4k.mp4``: 6 s 3840x2160 30 fps H.264 (a phone's 4K clip);
- ``portrait.mp4``: 6 s 1920x1080 30 fps H.264 stored landscape with a 90 degree display
  rotation (how phones store portrait video), shown as 1080x1920;
- ``long720.mp4``: 10 min 1280x720 25 fps H.264.

Content is a textured background that pans, plus a moving square and per-frame colour
changes: it compresses like camera footage (a few Mbit/s), not like flat synthetic colour,
so decoding costs what it costs on real videos. libx264 ``veryfast``, High profile, with
B-frames and a 2 s keyframe interval, as phones and web encoders write.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import av
import numpy as np

CLIPS = {
    # name: (width, height, fps, seconds, display rotation)
    "4k": (3840, 2160, 30, 6, None),
    "portrait": (1920, 1080, 30, 6, 90),
    "long720": (1280, 720, 25, 600, None),
}


def _texture(width: int, height: int) -> np.ndarray:
    """A smooth random texture twice the frame's width (it pans across)."""
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (height // 8 + 1, width // 4 + 1, 3), dtype=np.uint8)
    big = np.repeat(np.repeat(small, 8, axis=0), 8, axis=1)[:height, : 2 * width]
    return big


def write_clip(path: Path, width: int, height: int, fps: int, seconds: int, rotation) -> Path:
    tex = _texture(width, height)
    side = height // 4
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "23", "preset": "veryfast", "g": str(2 * fps), "bf": "2"}
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for i in range(fps * seconds):
            x0 = (i * 4) % width
            img = tex[:, x0 : x0 + width].copy()
            img[..., 0] = img[..., 0] // 2 + (i * 5) % 128
            x = (i * 7) % (width - side)
            img[height // 3 : height // 3 + side, x : x + side] = (230, 40, 40)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--which", default=",".join(CLIPS))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.which.split(","):
        path = args.out / f"{name}.mp4"
        if path.exists():
            print(f"{path}: exists", file=sys.stderr)
            continue
        t = time.perf_counter()
        write_clip(path.with_suffix(".part.mp4"), *CLIPS[name]).rename(path)
        size = path.stat().st_size / 1e6
        print(f"{path}: {size:.1f} MB in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
