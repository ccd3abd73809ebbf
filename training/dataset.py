"""Dataset and collator: sampled frames, the release's sequence, the three heads' labels.

Each sample becomes the release's conversation (:mod:`training.render`): samples in our
format (``events``) are written as the release's answer with placeholders, samples read
from the release's own JSON (:mod:`training.release_data`) keep their turns verbatim.
Targets are snapped onto the sampled frames' times before encoding, as the release does
(or per ``snap_times``), so an answer can be read off the frames' own time tokens.

Videos are never held whole: at start-up each is *probed* (container metadata and one
demux pass over its packets, no decoding: frame count, frame rate, duration), which is
enough to check every target against the video's length; each ``get`` then decodes only
the sampled frames (:func:`trace_rt.video.load_video` with a sampler: it seeks past
groups of pictures that hold none) and reduces each to model resolution as soon as it is
decoded. ``get`` runs in the data loader's worker processes (``num_workers``).

Frame sampling (``sampling``), the release's ``frame_sample``:

* ``uniform``: ``linspace(0, n - 1, N)`` as ints (the release's stage 1 and inference);
* ``rand``: N equal bins over the frames, in each a random pick among 5 evenly spaced
  candidate indices (the release's ``--sample_scheme rand``: stage 2 and fine-tuning);
* ``jitter``: each uniform index moved by up to half a spacing (ours, not the release's).

Targets beyond the video's end (``out_of_range``): ``fail`` (default) reports the sample
(stop or skip per ``on_bad_sample``); ``snap`` follows the release, which snaps every
timestamp to the nearest sampled frame, and still reports each such sample as a warning.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import av
import numpy as np
import torch

from trace_rt.config import TraceConfig
from trace_rt.errors import TraceError
from trace_rt.preprocess import preprocess_frame, preprocess_frames
from trace_rt.prompts import CUSTOM_TASK, PromptSet
from trace_rt.tokenizer import TextTokenizer
from trace_rt.tokens import encode_timestamp
from trace_rt.video import SampledVideo, load_video
from trace_rt.video.decode import _count_frames, _probe
from trace_rt.video.source import Source
from trace_rt.video.timeline import repair_timestamps
from training.data import BadSampleError, Sample, check_against_video, report_bad
from training.render import IGNORE, RenderError, Turns, answer_from_events, expand_video, render

SAMPLING = ("uniform", "rand", "jitter")
SNAP = ("nearest", "cover", "none")
OUT_OF_RANGE = ("fail", "snap")
RAND_CANDIDATES = 5  # the release: linspace(lo, hi, 6)[:-1] per bin
# What a frame's unused slots show when words stand in for its pixels: a frame with no
# covering word then reads "nothing" in every slot.
FRAME_WORDS_FILLER = "nothing"
log = logging.getLogger("training.dataset")
__all__ = ["IGNORE", "Batch", "Example", "GroundingDataset", "collate", "frame_indices"]


# ---- video ---------------------------------------------------------------------------
class VideoInfo(NamedTuple):
    frames: int  # counted from the packets
    fps: float
    duration: float  # frames / fps, the runtime's rule


def probe_video(path: Path) -> VideoInfo:
    """Frame count, rate and duration from container metadata and one demux pass (the
    runtime's rules, :func:`trace_rt.video.load_video`), without decoding a frame; a raw
    stream whose packets carry no timestamps is counted by decoding."""
    if not path.is_file():
        raise FileNotFoundError(f"video {path} does not exist")
    src = Source(str(path))
    p = _probe(src)
    if p.pts is not None and len(p.pts):
        table, _ = repair_timestamps(p.pts, p.time_base, p.duration)
        n = len(table)
        span = float(table[-1] - table[0]) * float(p.time_base)
    else:
        n, span = _count_frames(src), 0.0
    if n == 0:
        raise ValueError(f"{path}: the video stream has no frames")
    fps = (n - 1) / span if span > 0 else (p.rate or 25.0)
    return VideoInfo(n, fps, n / fps)


def _probe_or_error(path: Path) -> VideoInfo | str:
    try:
        return probe_video(path)
    except (OSError, ValueError, TraceError, av.error.FFmpegError) as e:
        return str(e)


def probe_videos(paths: Sequence[Path], workers: int = 0) -> dict[Path, VideoInfo | str]:
    """Each distinct video probed once (many samples share one), by *workers* processes
    when > 0; a video that cannot be probed maps to the reason."""
    uniq = sorted(set(paths))
    t0 = time.perf_counter()
    if workers > 0 and len(uniq) > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(workers, len(uniq))) as ex:
            found = list(ex.map(_probe_or_error, uniq, chunksize=8))
    else:
        found = [_probe_or_error(p) for p in uniq]
    log.info("probed %d videos in %.1f s (no decoding)", len(uniq), time.perf_counter() - t0)
    return dict(zip(uniq, found, strict=True))


def frame_indices(n: int, num: int, mode: str, rng: np.random.Generator | None) -> np.ndarray:
    """*num* frame indices out of *n* per *mode* (module doc)."""
    base = np.linspace(0, n - 1, num)
    if mode == "uniform" or rng is None:
        return base.astype(int)
    if mode == "rand":
        edges = np.linspace(0, n - 1, num + 1).astype(int)
        picks = [
            rng.choice(np.linspace(lo, hi - 1, RAND_CANDIDATES + 1).astype(int)[:-1])
            for lo, hi in itertools.pairwise(edges)
        ]
        return np.clip(np.asarray(picks, dtype=int), 0, n - 1)
    if num < 2:
        return base.astype(int)
    step = (n - 1) / (num - 1)
    idx = np.rint(base + rng.uniform(-0.5, 0.5, num) * step).astype(int)
    return np.sort(np.clip(idx, 0, n - 1))


def decode_video(path: Path) -> SampledVideo:
    """Every frame of a small clip (tests and tools: training decodes only sampled ones)."""
    return load_video(path, probe_video(path).frames)


# ---- labels --------------------------------------------------------------------------
def snap_span(stamps: Sequence[float], frame_times: np.ndarray, mode: str) -> list[float]:
    """Timestamps moved onto sampled frame times.

    ``nearest`` (the release): each to the closest frame. ``cover``: a two-timestamp span
    [start, end] to the last frame at or before start and the first at or after end (the
    frames bracketing the event, so the target is a function of which frames show it);
    other counts fall back to nearest. ``none``: unchanged, but never past the last frame.
    """
    ft = frame_times
    if mode == "none":
        return [min(float(t), float(ft[-1])) if t > ft[-1] else float(t) for t in stamps]

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


def sample_turns(s: Sample, prompts: PromptSet) -> Turns:
    """The release's conversation of a sample (its own turns when it came with them)."""
    if s.turns is not None:
        return s.turns
    task = None if s.task == CUSTOM_TASK else s.task
    question = prompts.question(task, s.query, s.question)
    answer, times, scores = answer_from_events(s.events)
    return Turns(prompts.user_message.format(question=question), answer, times, scores)


def snapped(turns: Turns, frame_times: np.ndarray, mode: str) -> Turns:
    times = tuple(tuple(snap_span(list(t), frame_times, mode)) for t in turns.times)
    return Turns(turns.human, turns.answer, times, turns.scores)


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
    frame_ids: torch.Tensor | None = None  # [F, S] text ids shown in place of the pixels
    slot_ids: torch.Tensor | None = None  # [F, S] the same words as targets for pixel slots


class GroundingDataset:
    """Samples -> :class:`Example` (frames sampled per the recipe, labels rendered).

    Args:
        samples: validated samples (:func:`training.data.load_split` or
            :func:`training.release_data.load_release_json`).
        cfg: the model's config (frame size, slots, id space).
        tok: the checkpoint's tokenizer.
        num_frames: frames per video (default: ``cfg.num_frames``).
        sampling: ``uniform``, ``rand`` (the release's stage 2) or ``jitter``.
        snap_times: ``nearest`` (the release), ``cover`` or ``none`` (:func:`snap_span`).
        out_of_range: ``fail`` or ``snap`` for targets past the video's end (module doc).
        template, prompts: the chat template (``mistral_instruct`` trains the release).
        answer_space: the release's space before the answer (:func:`render`).
        on_bad: ``fail`` raises :class:`BadSampleError`; ``skip`` drops the sample with
            a warning naming it.
        seed: random frame picks are a function of (seed, epoch, sample index): resumable.
        probe_workers: processes probing the videos at start-up (0: this one).
        cache_frames: keep each video's sampled frames in memory after its first decode
            (``uniform`` sampling only: then they never change). Costs F x 3 x H x W
            float32 per video, per data-loader process; for small sets, where decoding
            the same frames every epoch would cost more than the model's steps.
        frame_words: the share of samples with ``frame_words`` (:mod:`training.data`) shown
            as those words instead of their frames' pixels, drawn per (seed, epoch,
            index). A frame's slot positions then hold the token embeddings of the words
            whose spans cover its time, in span order, and :data:`FRAME_WORDS_FILLER` in
            the slots left over; its time tokens are unchanged.
        frame_word_slots: a fixed slot per word (its index here) instead of span order:
            what a projector can reproduce from pixels, where "the shape that appeared
            first" is not visible; every frame word must be listed. Empty: span order.
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
        out_of_range: str = "fail",
        template: str = "mistral_instruct",
        answer_space: bool = True,
        prompts: PromptSet | None = None,
        on_bad: str = "fail",
        seed: int = 0,
        probe_workers: int = 0,
        cache_frames: bool = False,
        frame_words: float = 0.0,
        slot_targets: bool = False,
        frame_word_slots: Sequence[str] = (),
    ):
        for name, value, allowed in (("sampling", sampling, SAMPLING),
                                     ("snap_times", snap_times, SNAP),
                                     ("out_of_range", out_of_range, OUT_OF_RANGE)):  # fmt: skip
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        self.cfg, self.tok = cfg, tok
        self.num_frames = num_frames or cfg.num_frames
        self.sampling, self.snap_times, self.out_of_range = sampling, snap_times, out_of_range
        self.template, self.prompts = template, prompts or PromptSet.load()
        self.answer_space = answer_space
        self.on_bad, self.seed = on_bad, seed
        if not 0.0 <= frame_words <= 1.0:
            raise ValueError(f"frame_words must be a share in 0..1, got {frame_words}")
        self.frame_words, self.slot_targets = frame_words, slot_targets
        if len(frame_word_slots) > cfg.mm_num_slots:
            raise ValueError(f"frame_word_slots lists {len(frame_word_slots)} words for "
                             f"{cfg.mm_num_slots} slots per frame")  # fmt: skip
        self.frame_word_slots = tuple(frame_word_slots)
        if cache_frames and sampling != "uniform":
            raise ValueError(f"cache_frames needs sampling 'uniform' (got {sampling!r}): "
                             "other samplings pick new frames every epoch")  # fmt: skip
        self._cache: dict[Path, tuple[np.ndarray, np.ndarray]] | None = {} if cache_frames else None
        # With the frames fixed, so is each sample's rendering (its ids, labels and time
        # ids) and its frame words: kept too, ~8 % of a tiny CPU step otherwise.
        self._rendered: dict[int, tuple[torch.Tensor, torch.Tensor, int, np.ndarray]] | None = (
            {} if cache_frames else None
        )
        self._words: dict[int, torch.Tensor] | None = {} if cache_frames else None
        self.samples = self._checked(samples, probe_workers)
        if not self.samples:
            raise ValueError("no usable training samples")

    def _checked(self, samples: Sequence[Sample], workers: int) -> list[Sample]:
        """Probe every video once (no decoding) and check each sample's targets and
        rendering before training starts, so a bad sample is reported up front."""
        infos = probe_videos([s.video for s in samples if s.image is None], workers)
        good = []
        for s in samples:
            try:
                if s.image is None:
                    info = infos[s.video]
                    if isinstance(info, str):
                        raise BadSampleError(s.id, f"video unusable: {info}")
                    # One frame of slack: annotations often round the end up.
                    try:
                        check_against_video(s, info.duration + 1 / info.fps)
                    except BadSampleError as e:
                        if self.out_of_range == "fail":
                            raise
                        log.warning("%s; snapped to the last frame (out_of_range: snap)", e)
                elif not s.image.is_file():
                    raise BadSampleError(s.id, f"image {s.image} does not exist")
                try:
                    self._render(sample_turns(s, self.prompts))
                except (RenderError, ValueError) as e:
                    raise BadSampleError(s.id, f"cannot render: {e}") from None
            except BadSampleError as e:
                report_bad(e, self.on_bad)
                continue
            good.append(s)
        return good

    def __len__(self) -> int:
        return len(self.samples)

    def _render(self, turns: Turns) -> tuple[list[int], torch.Tensor]:
        return render(turns, self.tok, self.cfg.ids, self.prompts, self.template,
                      self.answer_space)  # fmt: skip

    def _frames(self, s: Sample, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(pixels [F, 3, h, w], frame times [F]) decoding only the sampled frames."""
        pp = self.cfg.preprocess
        if s.image is not None:  # the release repeats an image as every frame, at time 0
            from PIL import Image

            with Image.open(s.image) as im:
                px = preprocess_frames(np.asarray(im.convert("RGB"))[None], pp)
            return np.repeat(px, self.num_frames, axis=0), np.zeros(self.num_frames)
        if self._cache is not None and s.video in self._cache:
            return self._cache[s.video]
        v = load_video(
            s.video,
            self.num_frames,
            transform=lambda rgb: preprocess_frame(rgb, pp),
            sampler=lambda n, _fps: frame_indices(n, self.num_frames, self.sampling, rng),
        )
        if self._cache is not None:
            self._cache[s.video] = (v.frames, v.times)
        return v.frames, v.times

    def get(self, index: int, epoch: int = 0) -> Example:
        s = self.samples[index]
        rng = np.random.default_rng((self.seed, epoch, index))
        pixels, times = self._frames(s, rng)
        if self._rendered is not None and index in self._rendered:
            input_ids, labels, start, time_ids = self._rendered[index]
        else:
            turns = snapped(sample_turns(s, self.prompts), times, self.snap_times)
            seq, labels = self._render(turns)
            video_len = self.num_frames * self.cfg.tokens_per_frame
            input_ids, labels, start = expand_video(seq, labels, video_len)
            time_ids = np.array([encode_timestamp(float(t)) for t in times], dtype=np.int64)
            if self._rendered is not None:
                self._rendered[index] = (input_ids, labels, start, time_ids)
        frame_ids = slot_ids = None
        if s.frame_words and self.frame_words > 0:
            # A stream of its own: the frame picks above stay what they were without it.
            pick = np.random.default_rng((self.seed, epoch, index, 1)).random()
            if pick < self.frame_words:
                frame_ids = self._word_ids(index, s.frame_words, times)
        if s.frame_words and self.slot_targets and frame_ids is None:
            slot_ids = self._word_ids(index, s.frame_words, times)
        return Example(
            s.id,
            input_ids,
            labels,
            start,
            torch.from_numpy(np.ascontiguousarray(pixels)),
            torch.from_numpy(time_ids),
            times,
            frame_ids,
            slot_ids,
        )

    def _word_ids(
        self, index: int, words: tuple[tuple[float, float, str], ...], times
    ) -> torch.Tensor:
        if self._words is not None and index in self._words:
            return self._words[index]
        ids = frame_word_ids(words, times, self.cfg.mm_num_slots, self.tok, self.frame_word_slots)
        out = torch.from_numpy(ids)
        if self._words is not None:
            self._words[index] = out
        return out


def frame_word_ids(
    words: Sequence[tuple[float, float, str]],
    times: Sequence[float],
    slots: int,
    tok,
    layout: Sequence[str] = (),
) -> np.ndarray:
    """[F, S] text ids shown in place of frames at ``times``: each frame's covering words
    (``start <= t < end``), then the filler; ``tok`` has ``encode(text) -> ids``.

    With ``layout`` (a list of one-token words) each word sits in its own slot, its index
    in ``layout``, and the filler everywhere else; without it, in span order from slot 0.
    """
    filler = tok.encode(FRAME_WORDS_FILLER)
    spans = [(a, b, tok.encode(w), w) for a, b, w in words]  # each word once, not per frame
    out = np.full((len(times), slots), filler[0], dtype=np.int64)
    if layout:
        for _, _, w_ids, w in spans:
            if w not in layout:
                raise ValueError(f"frame word {w!r} has no slot in frame_word_slots {list(layout)}")
            if len(w_ids) != 1:
                raise ValueError(f"frame word {w!r} is not one token; frame_word_slots needs that")
        for f, t in enumerate(times):
            for a, b, w_ids, w in spans:
                if a <= t < b:
                    out[f, layout.index(w)] = w_ids[0]
        return out
    for f, t in enumerate(times):
        ids = [i for a, b, w_ids, _ in spans if a <= t < b for i in w_ids][:slots]
        out[f, : len(ids)] = ids
    return out


@dataclass
class Batch:
    sample_ids: list[str]
    input_ids: torch.Tensor  # [B, L], right-padded with 0
    attention_mask: torch.Tensor  # [B, L] bool, False on padding
    labels: torch.Tensor  # [3, B, L], -100 on padding
    video_start: torch.Tensor  # [B]
    pixel_values: torch.Tensor  # [B, F, 3, H, W]
    time_ids: torch.Tensor  # [B, F, 6]
    frame_ids: torch.Tensor | None = None  # [B, F, S] words in place of pixels; -1: pixels
    slot_ids: torch.Tensor | None = None  # [B, F, S] word targets of pixel slots; -1: none

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.sample_ids,
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.labels.to(device),
            self.video_start.to(device),
            self.pixel_values.to(device),
            self.time_ids.to(device),
            None if self.frame_ids is None else self.frame_ids.to(device),
            None if self.slot_ids is None else self.slot_ids.to(device),
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
        _word_grid([e.frame_ids for e in examples]),
        _word_grid([e.slot_ids for e in examples]),
    )


def _word_grid(per_example: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    """Stack [F, S] word ids into [B, F, S], -1 for examples without any (None if none has)."""
    given = [w for w in per_example if w is not None]
    if not given:
        return None
    out = torch.full((len(per_example), *given[0].shape), -1, dtype=torch.long)
    for i, w in enumerate(per_example):
        if w is not None:
            out[i] = w
    return out
