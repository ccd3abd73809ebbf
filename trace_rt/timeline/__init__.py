"""Timeline reports: one self-contained HTML page per answer (``trace-rt run --report``).

    write_report("out.html", result, video="clip.mp4", request={"task": "dvc", ...})

The page shows the sampled frames as a filmstrip on a time axis, the events on that axis
(``dvc`` captions, the ``mr`` span, the ``vhd`` salience curve and highlights), the request
and its timings, and, when the video sits next to the page (or is embedded), a player
that seeks to an event when it is clicked. It loads nothing from the network.
"""

from __future__ import annotations

import base64
import os
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from trace_rt.errors import InputError
from trace_rt.timeline.render import Page, render
from trace_rt.timeline.thumbs import jpegs, shrinker

__all__ = ["MAX_EMBED_BYTES", "Page", "frame_thumbnails", "render", "write_report"]

MAX_EMBED_BYTES = 16 << 20  # --embed-video is for small files; larger ones sit beside the page
_MIME = {
    ".mp4": "video/mp4",
    ".m4v": "video/mp4",
    ".mov": "video/quicktime",
    ".webm": "video/webm",
    ".mkv": "video/x-matroska",
    ".ogv": "video/ogg",
    ".ogg": "video/ogg",
}


def frame_thumbnails(
    video: str | os.PathLike | bytes, n_frames: int
) -> tuple[list[bytes], list[float]]:
    """JPEG thumbnails of the ``n_frames`` frames a request samples from *video* (the same
    frames: sampling is deterministic) and their times, decoded through the runtime's own
    video loader and its limits."""
    from trace_rt.video import load_video

    # Each frame is shrunk as soon as it is decoded: memory stays at thumbnail size.
    clip = load_video(video, n_frames, transform=shrinker())
    return jpegs(clip.frames), [float(t) for t in clip.times]


def player_source(
    video: str | os.PathLike, page: Path, embed: bool = False, anywhere: bool = False
) -> str | None:
    """The ``<video src>`` for *video* seen from *page*: a relative URL when the video sits
    in the page's folder (or below it, or *anywhere*), a ``data:`` URI with *embed*, else
    None."""
    path = Path(video).resolve()
    if embed:
        size = path.stat().st_size
        if size > MAX_EMBED_BYTES:
            raise InputError(
                f"--embed-video: {video} is {size / 2**20:.1f} MiB, over the "
                f"{MAX_EMBED_BYTES >> 20} MiB an HTML page should carry; put the video next "
                "to the report instead"
            )
        mime = _MIME.get(path.suffix.lower(), "video/mp4")
        return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"
    rel = os.path.relpath(path, page.resolve().parent)
    if rel.startswith("..") and not anywhere:
        return None
    return urllib.parse.quote(Path(rel).as_posix())


def write_report(
    out: str | os.PathLike,
    result: Mapping[str, Any],
    *,
    video: str | os.PathLike | None = None,
    request: Mapping[str, Any] | None = None,
    embed_video: bool = False,
    ground_truth: Sequence[tuple[float, float, str]] = (),
    gt_iou: float | None = None,
    title: str | None = None,
    link_video: bool = False,
) -> Path:
    """Write the timeline page of *result* to *out*; returns its path.

    Args:
        video: the local video file the result is about: thumbnails are decoded from it
            and the player plays it (from beside the page, or embedded).
        request: task, query/question, frames, model, backend (shown on the page).
        ground_truth: an evaluation's reference segments ``(start, end, caption)``.
        gt_iou: the evaluation's score of the prediction (shown with the reference).
        link_video: play the video by a relative path even when it lies outside the
            page's folder (evaluation pages: the videos stay in their own folder).
    """
    out = Path(out)
    thumbs: list[bytes] = []
    src = None
    if video is not None:
        n = len(result.get("frame_times") or []) or int(result.get("frames") or 1)
        thumbs, times = frame_thumbnails(video, n)
        result = {"frame_times": times, **result} if not result.get("frame_times") else result
        if isinstance(video, (str, os.PathLike)):
            src = player_source(video, out, embed_video, link_video)
    page = Page(result, dict(request or {}), thumbs, src, tuple(ground_truth), gt_iou)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(render(page, title), encoding="utf-8")
    os.replace(tmp, out)
    return out
