"""``python -m training synth-data``: a synthetic temporal-grounding set with real videos.

Each video (H.264 mp4 written with PyAV) shows one or more coloured shapes on a plain
background; each shape appears at a known time, moves in one direction and vanishes at a
known time. From those windows come, per video:

* ``mr``  one sample per shape: query = its caption ("a red circle moves left"), target =
  one event with the window's two timestamps;
* ``dvc`` one sample: an event per shape (timestamps + caption), ordered by start;
* ``vhd`` one sample per shape: one event per 1-s clip the shape is visible in, with the
  clip's centre time and a saliency score 1.0..5.0 growing with how long it is visible.

With ``frame_words`` every sample also lists its clip's shapes as timed colour words
(``[start, end, colour]``), and with ``kind_words`` their kind words as well (``[start,
end, "circle"]``), which a recipe may show in place of the frames.

Videos are split by video into ``train.json`` and ``val.json`` (the format of
:mod:`training.data`); ``synth.json`` keeps the ground truth of every video (windows,
per-clip saliency) for inspection. Everything is a function of ``--seed``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from training.data import EventTarget, Sample, write_split

COLORS = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
}
KINDS = ("circle", "square", "triangle")
MOTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
TASKS = ("mr", "dvc", "vhd")


@dataclass(frozen=True)
class SynthConfig:
    """Knobs of the generator (defaults: the set the tiny learning run uses)."""

    videos: int = 200
    seed: int = 0
    val_fraction: float = 0.2
    size: int = 64  # square frames, px
    fps: int = 8
    min_duration: float = 8.0
    max_duration: float = 12.0
    min_window: float = 2.0
    max_window: float = 4.5
    max_shapes: int = 2
    min_shapes: int = 1
    # Write each sample's shapes as timed colour words too (training.data's frame_words),
    # for the recipes that first train the lookup on words (tiny-synthetic-lookup-words).
    frame_words: bool = False
    # With frame_words: each shape's kind word too ([start, end, "circle"]), so that a
    # recipe's slots can show what dense captions name besides the colour.
    kind_words: bool = False
    tasks: tuple[str, ...] = TASKS
    clip_seconds: float = 1.0  # saliency clip length (vhd)


@dataclass(frozen=True)
class ShapeTrack:
    color: str
    kind: str
    motion: str
    start: float
    end: float
    radius: int

    @property
    def caption(self) -> str:
        return f"a {self.color} {self.kind} moves {self.motion}"


def _mask(kind: str, size: int, cx: float, cy: float, r: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    dx, dy = xx - cx, yy - cy
    if kind == "circle":
        return dx * dx + dy * dy <= r * r
    if kind == "square":
        return (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    # Upward triangle: inside when below the two slanted edges and above the base.
    return (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)


def _position(track: ShapeTrack, t: float, size: int) -> tuple[float, float]:
    """Centre at time t: from one side to the other across the window."""
    u = (t - track.start) / max(track.end - track.start, 1e-6)
    lo, hi = track.radius + 2, size - track.radius - 3
    mx, my = MOTIONS[track.motion]
    along = lo + (hi - lo) * (u if (mx + my) > 0 else 1 - u)
    mid = size / 2
    return (along, mid) if mx else (mid, along)


def render_frame(tracks: list[ShapeTrack], t: float, size: int, bg: tuple[int, int, int]):
    img = np.empty((size, size, 3), np.uint8)
    img[...] = bg
    for tr in tracks:
        if tr.start <= t < tr.end:
            cx, cy = _position(tr, t, size)
            img[_mask(tr.kind, size, cx, cy, tr.radius)] = COLORS[tr.color]
    return img


def write_synth_video(
    path: Path, tracks: list[ShapeTrack], n_frames: int, cfg: SynthConfig, bg
) -> None:
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=Fraction(cfg.fps))
        stream.width = stream.height = cfg.size
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "20", "preset": "ultrafast"}
        for i in range(n_frames):
            img = render_frame(tracks, i / cfg.fps, cfg.size, bg)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _tracks(rng: np.random.Generator, duration: float, cfg: SynthConfig) -> list[ShapeTrack]:
    n = int(rng.integers(cfg.min_shapes, cfg.max_shapes + 1))
    # Distinct colours and kinds keep every query unambiguous within its video.
    colors = rng.permutation(list(COLORS))[:n]
    kinds = rng.permutation(list(KINDS))[:n]
    out = []
    for c, k in zip(colors, kinds, strict=True):
        length = float(rng.uniform(cfg.min_window, min(cfg.max_window, duration - 0.5)))
        start = float(rng.uniform(0.0, duration - length))
        # Windows on the frame grid, to one decimal (the time format's resolution).
        start = round(round(start * cfg.fps) / cfg.fps, 1)
        end = round(min(start + length, duration), 1)
        motion = str(rng.choice(list(MOTIONS)))
        out.append(ShapeTrack(str(c), str(k), motion, start, end, int(rng.integers(7, 11))))
    return sorted(out, key=lambda tr: tr.start)


def clip_saliency(track: ShapeTrack, duration: float, clip: float) -> list[tuple[float, float]]:
    """(clip centre, score) for every clip the shape is visible in; score 1..5 by overlap."""
    out = []
    for k in range(math.ceil(duration / clip)):
        a, b = k * clip, min((k + 1) * clip, duration)
        overlap = max(0.0, min(b, track.end) - max(a, track.start)) / (b - a)
        if overlap > 0:
            out.append((round((a + b) / 2, 1), round(1.0 + 4.0 * overlap, 1)))
    return out


def _samples(vid: str, video: Path, tracks, duration: float, cfg: SynthConfig) -> list[Sample]:
    out = []
    if "mr" in cfg.tasks:
        for j, tr in enumerate(tracks):
            ev = EventTarget((tr.start, tr.end), (), "")
            out.append(Sample(f"{vid}-mr-{j}", video, "mr", (ev,), query=tr.caption))
    if "dvc" in cfg.tasks:
        evs = tuple(EventTarget((tr.start, tr.end), (), tr.caption) for tr in tracks)
        out.append(Sample(f"{vid}-dvc", video, "dvc", evs))
    if "vhd" in cfg.tasks:
        for j, tr in enumerate(tracks):
            evs = tuple(
                EventTarget((t,), (s,), "")
                for t, s in clip_saliency(tr, duration, cfg.clip_seconds)
            )
            out.append(Sample(f"{vid}-vhd-{j}", video, "vhd", evs, query=tr.caption))
    words = None
    if cfg.frame_words:
        words = tuple((tr.start, tr.end, tr.color) for tr in tracks)
        if cfg.kind_words:
            words += tuple((tr.start, tr.end, tr.kind) for tr in tracks)
    return [replace(s, duration=duration, frame_words=words) for s in out]


def make_synth_data(out: str | Path, cfg: SynthConfig) -> dict[str, int]:
    """Write videos, ``train.json``, ``val.json`` and ``synth.json`` under *out*."""
    bad = set(cfg.tasks) - set(TASKS)
    if bad:
        raise ValueError(f"unknown synthetic tasks {sorted(bad)}; choose from {TASKS}")
    if cfg.max_shapes < 1 or cfg.max_shapes > min(len(COLORS), len(KINDS)):
        raise ValueError(f"max_shapes must be 1..{min(len(COLORS), len(KINDS))}")
    if not 1 <= cfg.min_shapes <= cfg.max_shapes:
        raise ValueError(f"min_shapes must be 1..max_shapes ({cfg.max_shapes})")
    if cfg.kind_words and not cfg.frame_words:
        raise ValueError("kind_words adds to frame_words: ask for both")
    if not cfg.min_window + 0.5 <= cfg.min_duration <= cfg.max_duration:
        raise ValueError("need min_window + 0.5 <= min_duration <= max_duration")
    # Absolute: the split files store video paths relative to themselves, whatever the cwd.
    root = Path(out).resolve()
    (root / "videos").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    n_val = max(1, round(cfg.videos * cfg.val_fraction)) if cfg.videos > 1 else 0
    splits: dict[str, list[Sample]] = {"train": [], "val": []}
    truth = []
    for i in range(cfg.videos):
        vid = f"v{i:04d}"
        n_frames = round(float(rng.uniform(cfg.min_duration, cfg.max_duration)) * cfg.fps)
        duration = n_frames / cfg.fps
        tracks = _tracks(rng, duration, cfg)
        bg = tuple(int(v) for v in rng.integers(20, 70, 3))
        path = root / "videos" / f"{vid}.mp4"
        write_synth_video(path, tracks, n_frames, cfg, bg)
        split = "val" if i >= cfg.videos - n_val else "train"
        splits[split].extend(_samples(vid, path, tracks, duration, cfg))
        truth.append(
            {
                "video": f"videos/{vid}.mp4",
                "split": split,
                "duration": duration,
                "fps": cfg.fps,
                "shapes": [
                    {
                        **asdict(tr),
                        "caption": tr.caption,
                        "saliency": clip_saliency(tr, duration, cfg.clip_seconds),
                    }
                    for tr in tracks
                ],
            }
        )
    for name, samples in splits.items():
        write_split(root / f"{name}.json", samples, root)
    meta = {"config": {**asdict(cfg), "tasks": list(cfg.tasks)}, "videos": truth}
    (root / "synth.json").write_text(json.dumps(meta, indent=1) + "\n")
    return {k: len(v) for k, v in splits.items()}
