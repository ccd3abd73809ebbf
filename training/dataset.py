"""Dataset and collator: frames, the runtime's prompt, and the three heads' labels.

One example is the sequence the model sees at inference, plus the answer::

    prompt ids (BOS ... <video> ... [/INST] <sync>)   the video block spliced at <video>
    target ids (time ... <sync> | score ... <sync> | caption <sync> | ... caption EOS)

``input_ids`` hold unified ids (``trace_rt.tokens``) with
:data:`~trace_rt.tokens.VIDEO_PLACEHOLDER_ID` at each of the video block's positions.
Labels follow the release (``prepare_inputs_labels_for_multimodal``): three tensors the
length of the sequence, aligned with the input (the loss shifts by one), holding at each
target position its token in that head's own vocabulary and -100 everywhere else:

* text labels: caption ids, the text ``<sync>`` that closes an event (32000) and the EOS
  that closes the answer;
* time labels: 0..12 (time ``<sync>``, ``<sep>``, digits, '.');
* score labels: 0..12 likewise.

Prompt and video positions are never labelled; the prompt's closing ``<sync>`` is always
given at inference, so it is context, not a target. Timestamps are snapped to the nearest
sampled frame's time before encoding, as the release does (or per ``snap_times``), so an
answer can be read off the frames' own time tokens.

The answer ends with EOS instead of a last text ``<sync>``: the decoding loop switches to
the time head after text ``<sync>`` and only the text head can stop generation.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch

from trace_rt.config import TraceConfig
from trace_rt.preprocess import preprocess_frames
from trace_rt.prompts import CUSTOM_TASK, PromptSet, prompt_ids
from trace_rt.tokenizer import TextTokenizer
from trace_rt.tokens import (
    SCORE_FORMAT,
    TIME_FORMAT,
    VIDEO_PLACEHOLDER_ID,
    encode_timestamp,
    encode_values,
)
from training.data import BadSampleError, Sample, check_against_video, report_bad

IGNORE = -100
SAMPLING = ("uniform", "jitter")
log = logging.getLogger("training.dataset")


# ---- video ---------------------------------------------------------------------------
@dataclass(frozen=True)
class DecodedVideo:
    frames: np.ndarray  # [n, H, W, 3] uint8, presentation order
    times: np.ndarray  # [n] seconds from the first frame
    duration: float


def decode_video(path: Path) -> DecodedVideo:
    """Every frame of *path* with its presentation time (small training clips only)."""
    if not path.is_file():
        raise FileNotFoundError(f"video {path} does not exist")
    frames, pts = [], []
    with av.open(str(path)) as c:
        if not c.streams.video:
            raise ValueError(f"{path} has no video stream")
        s = c.streams.video[0]
        for f in c.decode(s):
            frames.append(f.to_ndarray(format="rgb24"))
            pts.append(float(f.time) if f.time is not None else len(pts))
    if not frames:
        raise ValueError(f"{path}: no frame could be decoded")
    order = np.argsort(pts, kind="stable")
    t = np.asarray(pts, np.float64)[order]
    t -= t[0]
    n = len(t)
    fps = (n - 1) / t[-1] if n > 1 and t[-1] > 0 else 25.0
    # The duration the runtime reports (trace_rt.video: n / average fps).
    return DecodedVideo(np.stack(frames)[order], t, n / fps)


class VideoCache:
    """Decoded videos kept in memory up to *max_bytes* (least recently used leaves)."""

    def __init__(self, max_bytes: int = 1 << 30):
        self.max_bytes = max_bytes
        self._items: OrderedDict[Path, DecodedVideo] = OrderedDict()
        self._bytes = 0

    def get(self, path: Path) -> DecodedVideo:
        if path in self._items:
            self._items.move_to_end(path)
            return self._items[path]
        v = decode_video(path)
        size = v.frames.nbytes
        if size <= self.max_bytes:
            self._items[path] = v
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.frames.nbytes
        return v


def frame_indices(n: int, num: int, mode: str, rng: np.random.Generator | None) -> np.ndarray:
    """Uniform: the runtime's ``linspace(0, n-1, N)`` rule. Jitter: each index moved by up
    to half the spacing (a different but still ordered, still spread-out pick)."""
    base = np.linspace(0, n - 1, num)
    if mode == "uniform" or rng is None or num < 2:
        return base.astype(int)
    step = (n - 1) / (num - 1)
    idx = np.rint(base + rng.uniform(-0.5, 0.5, num) * step).astype(int)
    return np.sort(np.clip(idx, 0, n - 1))


# ---- labels --------------------------------------------------------------------------
SNAP = ("nearest", "cover", "none")


def snap_span(stamps: Sequence[float], frame_times: np.ndarray, mode: str) -> list[float]:
    """Timestamps moved onto sampled frame times.

    ``nearest`` (the release): each to the closest frame. ``cover``: a two-timestamp span
    [start, end] to the last frame at or before start and the first at or after end (the
    frames bracketing the event, so the target is a function of which frames show it);
    other counts fall back to nearest. ``none``: unchanged.
    """
    if mode == "none":
        return list(stamps)
    ft = frame_times

    def nearest(t: float) -> float:
        return float(ft[int(np.argmin(np.abs(ft - t)))])

    if mode == "cover" and len(stamps) == 2 and stamps[0] <= stamps[1]:
        eps = 1e-6
        before, after = ft[ft <= stamps[0] + eps], ft[ft >= stamps[1] - eps]
        return [
            float(before[-1]) if len(before) else float(ft[0]),
            float(after[0]) if len(after) else float(ft[-1]),
        ]
    return [nearest(t) for t in stamps]


def target_ids(
    sample: Sample,
    tok: TextTokenizer,
    cfg: TraceConfig,
    frame_times: np.ndarray | None = None,
    snap: str = "nearest",
) -> list[int]:
    """The answer as unified ids: per event time, score and text segments (module doc).
    With *frame_times*, timestamps are snapped onto them (:func:`snap_span`)."""
    ids = cfg.ids
    out: list[int] = []
    for k, ev in enumerate(sample.events):
        stamps = list(ev.timestamps)
        if frame_times is not None:
            stamps = snap_span(stamps, frame_times, snap)
        out += [ids.time_base + i for i in encode_values(stamps, TIME_FORMAT)]
        out += [ids.score_base + i for i in encode_values(list(ev.scores), SCORE_FORMAT)]
        if ev.caption:
            out += tok.encode(ev.caption)  # a chunk of its own, like the prompt's chunks
        out.append(ids.text_sync if k + 1 < len(sample.events) else tok.eos_id)
    return out


@dataclass
class Example:
    """One tokenised sample, unpadded."""

    sample_id: str
    input_ids: torch.Tensor  # [L] unified ids, VIDEO_PLACEHOLDER_ID on the video block
    labels: torch.Tensor  # [3, L]: text, time, score labels (head-local ids or -100)
    video_start: int  # first position of the video block
    pixel_values: torch.Tensor  # [F, 3, H, W]
    time_ids: torch.Tensor  # [F, 6] local time ids of the frames' timestamps
    frame_times: np.ndarray


def build_example(
    prompt: Sequence[int], target: Sequence[int], video_len: int, cfg: TraceConfig
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(input_ids [L], labels [3, L], video_start) from prompt ids (one -201) and target."""
    ids = cfg.ids
    at = list(prompt).index(VIDEO_PLACEHOLDER_ID)
    seq = [*prompt[:at], *[VIDEO_PLACEHOLDER_ID] * video_len, *prompt[at + 1 :], *target]
    labels = torch.full((3, len(seq)), IGNORE, dtype=torch.long)
    first = len(seq) - len(target)
    for p, t in enumerate(target, start=first):
        if 0 <= t <= ids.text_sync:
            labels[0, p] = t
        elif ids.time_base <= t < ids.score_base:
            labels[1, p] = t - ids.time_base
        elif ids.score_base <= t < ids.size:
            labels[2, p] = t - ids.score_base
        else:
            raise ValueError(f"target id {t} is outside the id space")
    return torch.tensor(seq, dtype=torch.long), labels, at


class GroundingDataset:
    """Samples -> :class:`Example` (frames sampled per the recipe, labels built).

    Args:
        samples: validated samples (:func:`training.data.load_split`).
        cfg: the model's config (frame size, slots, id space).
        tok: the checkpoint's tokenizer.
        num_frames: frames per video (default: ``cfg.num_frames``).
        sampling: ``uniform`` (the runtime's rule) or ``jitter``.
        snap_times: ``nearest`` (the release), ``cover`` or ``none``: how target
            timestamps move onto the sampled frames' times (:func:`snap_span`).
        template, prompts: the prompt (``trace_rt.prompts``).
        on_bad: ``fail`` raises :class:`BadSampleError`; ``skip`` drops the sample with
            a warning naming it.
        seed: jitter is a function of (seed, epoch, sample index): resumable.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        cfg: TraceConfig,
        tok: TextTokenizer,
        *,
        num_frames: int | None = None,
        sampling: str = "uniform",
        snap_times: str = "nearest",
        template: str = "llama_2",
        prompts: PromptSet | None = None,
        on_bad: str = "fail",
        seed: int = 0,
        cache_bytes: int = 1 << 30,
    ):
        if sampling not in SAMPLING:
            raise ValueError(f"sampling must be one of {SAMPLING}, got {sampling!r}")
        if snap_times not in SNAP:
            raise ValueError(f"snap_times must be one of {SNAP}, got {snap_times!r}")
        self.cfg, self.tok = cfg, tok
        self.num_frames = num_frames or cfg.num_frames
        self.sampling, self.snap_times = sampling, snap_times
        self.template, self.prompts = template, prompts or PromptSet.load()
        self.on_bad, self.seed = on_bad, seed
        self.cache = VideoCache(cache_bytes)
        self.samples = self._checked(samples)
        if not self.samples:
            raise ValueError("no usable training samples")

    def _checked(self, samples: Sequence[Sample]) -> list[Sample]:
        """Open every video once and check the targets against it (before training
        starts, so a bad sample is reported up front rather than mid-run)."""
        good = []
        for s in samples:
            try:
                try:
                    v = self.cache.get(s.video)
                except (OSError, ValueError, av.error.FFmpegError) as e:
                    raise BadSampleError(s.id, f"video unusable: {e}") from None
                # One frame of slack: annotations often round the end up.
                slack = v.duration / max(len(v.times), 1)
                check_against_video(s, v.duration + slack)
                self._prompt(s)
            except BadSampleError as e:
                report_bad(e, self.on_bad)
                continue
            good.append(s)
        return good

    def _prompt(self, s: Sample) -> list[int]:
        task = CUSTOM_TASK if s.task == CUSTOM_TASK else s.task
        try:
            return prompt_ids(
                task,
                tok=self.tok,
                ids=self.cfg.ids,
                query=s.query,
                question=s.question,
                template=self.template,
                prompts=self.prompts,
            )
        except ValueError as e:
            raise BadSampleError(s.id, f"prompt: {e}") from None

    def __len__(self) -> int:
        return len(self.samples)

    def get(self, index: int, epoch: int = 0) -> Example:
        s = self.samples[index]
        v = self.cache.get(s.video)
        rng = np.random.default_rng((self.seed, epoch, index))
        idx = frame_indices(len(v.times), self.num_frames, self.sampling, rng)
        times = v.times[idx]
        pixels = preprocess_frames(v.frames[idx], self.cfg.preprocess)
        time_ids = np.array([encode_timestamp(float(t)) for t in times], dtype=np.int64)
        target = target_ids(s, self.tok, self.cfg, times, self.snap_times)
        video_len = self.num_frames * self.cfg.tokens_per_frame
        input_ids, labels, start = build_example(self._prompt(s), target, video_len, self.cfg)
        return Example(
            s.id,
            input_ids,
            labels,
            start,
            torch.from_numpy(pixels),
            torch.from_numpy(time_ids),
            times,
        )


@dataclass
class Batch:
    sample_ids: list[str]
    input_ids: torch.Tensor  # [B, L], right-padded with 0
    attention_mask: torch.Tensor  # [B, L] bool, False on padding
    labels: torch.Tensor  # [3, B, L], -100 on padding
    video_start: torch.Tensor  # [B]
    pixel_values: torch.Tensor  # [B, F, 3, H, W]
    time_ids: torch.Tensor  # [B, F, 6]

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.sample_ids,
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.labels.to(device),
            self.video_start.to(device),
            self.pixel_values.to(device),
            self.time_ids.to(device),
        )

    @property
    def size(self) -> int:
        return len(self.sample_ids)


def collate(examples: Sequence[Example]) -> Batch:
    """Right-pad to the longest sequence. With right padding the causal mask already keeps
    real tokens from seeing pads, so the mask only marks them (and their labels are -100)."""
    n = max(len(e.input_ids) for e in examples)
    b = len(examples)
    input_ids = torch.zeros(b, n, dtype=torch.long)
    mask = torch.zeros(b, n, dtype=torch.bool)
    labels = torch.full((3, b, n), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        m = len(e.input_ids)
        input_ids[i, :m], mask[i, :m], labels[:, i, :m] = e.input_ids, True, e.labels
    return Batch(
        [e.sample_id for e in examples],
        input_ids,
        mask,
        labels,
        torch.tensor([e.video_start for e in examples], dtype=torch.long),
        torch.stack([e.pixel_values for e in examples]),
        torch.stack([e.time_ids for e in examples]),
    )
