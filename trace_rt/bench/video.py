"""The bench's video: its default input, and the ffmpeg CLI doing the video stage's job.

The default input is a synthetic clip, written with PyAV so nothing is shipped.

Fixed content (a square moving over a background that changes colour every frame, H.264
with 2 s keyframe intervals), so every backend and every run decodes the same bytes.
tests/media.py has a richer writer; the library cannot import from tests/.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import av
import numpy as np

from trace_rt.config import PreprocessConfig
from trace_rt.preprocess import layout
from trace_rt.video.convert import DEFAULT_RESIZE, quarter_turns
from trace_rt.video.decode import _probe, decoder_threads
from trace_rt.video.source import Source

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


# The target: the video stage within this factor of the ffmpeg CLI's run.
FFMPEG_TARGET = 1.2


def ffmpeg_baseline(
    video: str | Path,
    cfg: PreprocessConfig,
    frames: int,
    *,
    runs: int = 3,
    warmup: bool = True,
    keep: Path | None = None,
) -> dict[str, Any]:
    """Time the ``ffmpeg`` CLI doing the video stage's job the way a user would script it.

    It decodes *video* with as many threads as our decoder gets
    (:func:`~trace_rt.video.decode.decoder_threads`), keeps the same sampled frames
    (``select`` on the release's ``linspace`` indices), scales them to the model's input
    (``scale`` bicubic, ``pad`` with the mean colour, ``crop``) and writes raw RGB to a
    file. Median of *runs* after one warm-up run (``warmup``).

    Args:
        keep: copy ffmpeg's frames (raw RGB, ``frames x size x 3``) here.

    Returns:
        ``{"ms", "runs_ms", "threads", "frames", "size", "command"}``, or ``{"skipped":
        reason}`` when ffmpeg is absent or the file's frames cannot be counted.
    """
    exe = shutil.which("ffmpeg")
    if exe is None:
        return {"skipped": "no ffmpeg on PATH (Debian: apt-get install ffmpeg)"}
    src = Source(str(video))
    probe = _probe(src)
    if probe.pts is None:
        return {"skipped": "the stream's packets carry no timestamps: frames not counted"}
    n = len(probe.pts)
    with av.open(str(video)) as c:  # size and display rotation as the decoder reports them
        first = next(c.decode(video=0))
        h, w, k = first.height, first.width, quarter_turns(first)
    threads = decoder_threads(w, h)
    dh, dw = (w, h) if k % 2 else (h, w)
    lay = layout(dh, dw, cfg)
    (sh, sw), (rh, rw), (top, left) = lay.scaled, lay.canvas, lay.offset
    idx = np.unique(np.linspace(0, n - 1, frames).astype(int))
    chain = [
        f"select='{_any_of([f'eq(n,{i})' for i in idx])}'",
        f"scale={sw}:{sh}:flags=bicubic",
    ]
    if lay.fill is not None:
        chain.append(f"pad={rw}:{rh}:{left}:{top}:color=0x{bytes(lay.fill).hex()}")
    ch, cw = cfg.crop_height, cfg.crop_width
    if ch <= rh and cw <= rw:
        chain.append(f"crop={cw}:{ch}:{(rw - cw) // 2}:{(rh - ch) // 2}")
        size = (ch, cw)
    else:
        size = (rh, rw)
    with tempfile.TemporaryDirectory(prefix="trace-rt-ffmpeg-") as tmp:
        out = Path(tmp) / "frames.rgb"
        cmd = [
            exe, "-nostdin", "-hide_banner", "-loglevel", "error", "-threads", str(threads),
            "-i", str(video), "-an", "-filter_threads", str(threads), "-vf", ",".join(chain),
            "-vsync", "passthrough", "-f", "rawvideo", "-pix_fmt", "rgb24", "-y", str(out),
        ]  # fmt: skip
        times = []
        for _ in range(runs + warmup):
            t = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True)
            times.append((time.perf_counter() - t) * 1e3)
            if done.returncode != 0:
                return {"skipped": f"ffmpeg failed: {done.stderr.strip()[-300:]}"}
        written = out.stat().st_size // (size[0] * size[1] * 3)
        if keep is not None:
            shutil.copyfile(out, keep)
    if written != len(idx):
        return {"skipped": f"ffmpeg wrote {written} frames, not the {len(idx)} sampled"}
    return {
        "ms": float(np.median(times[warmup:])),
        "runs_ms": times[warmup:],
        "threads": threads,
        "frames": len(idx),
        "size": list(size),
        "command": " ".join([*cmd[:-1], "OUT.rgb"]),
    }


def _any_of(terms: list[str]) -> str:
    """``a+b+c+...`` as a balanced tree: ffmpeg's expression parser refuses a long flat
    sum (it recurses once per term)."""
    if len(terms) == 1:
        return terms[0]
    mid = len(terms) // 2
    return f"({_any_of(terms[:mid])}+{_any_of(terms[mid:])})"


def add_ffmpeg_ratios(report: dict[str, Any], baseline: dict[str, Any]) -> None:
    """Put *baseline* in *report* as ``video_ffmpeg``, with each backend's video-stage p50
    over ffmpeg's time (``ratios``; the target is :data:`FFMPEG_TARGET`)."""
    section = dict(baseline)
    if "ms" in section:
        section["target"] = FFMPEG_TARGET
        section["ratios"] = {
            name: e["stages"]["video"]["p50_ms"] / section["ms"]
            for name, e in report["backends"].items()
            if (e.get("stages", {}).get("video") or {}).get("p50_ms")
        }
    report["video_ffmpeg"] = section


def ffmpeg_lines(report: dict[str, Any]) -> list[str]:
    """One line per backend: its video stage against the ffmpeg CLI (or why not run)."""
    sec = report.get("video_ffmpeg")
    if not sec:
        return []
    if "skipped" in sec:
        return [f"video stage vs ffmpeg CLI: skipped ({sec['skipped']})"]
    # The bench's pipelines resize as Pipeline does by default (the release's pixels).
    head = (
        f"video stage ({DEFAULT_RESIZE} resize) vs ffmpeg CLI ({sec['threads']} threads, "
        f"{sec['frames']} frames to "
        f"{sec['size'][0]}x{sec['size'][1]} RGB: {sec['ms']:.0f} ms)"
    )
    return [
        f"{head}: {name} {r:.2f}x ({'meets' if r <= sec['target'] else 'misses'} "
        f"<= {sec['target']}x)"
        for name, r in sec.get("ratios", {}).items()
    ] or [head]
