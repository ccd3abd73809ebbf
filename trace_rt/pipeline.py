"""Video + question in, TRACE's events out: the stages around the decoding loop.

video decode + sampling (PyAV), each sampled frame scaled to the model's input as it is
converted from YUV (libswscale, or the release's exact Pillow arithmetic with
``resize="exact"``; :mod:`trace_rt.video.convert`) -> normalisation -> backend.encode_video ->
prompt ids -> :func:`trace_rt.generate.generate` -> parser. Backend-agnostic: the same
code runs every backend.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trace_rt.answers import answer_questions
from trace_rt.backends import Backend, default_backend, load_backend
from trace_rt.config import PreprocessConfig, TraceConfig
from trace_rt.engine.cache import VideoCache, VideoEntry, content_hash, model_fingerprint, video_key
from trace_rt.errors import InputError, PromptTooLongError
from trace_rt.events import Event, EventParser
from trace_rt.generate import GenerationConfig, generate
from trace_rt.preprocess import normalize
from trace_rt.prompts import CUSTOM_TASK, PromptSet, prompt_ids
from trace_rt.tokenizer import TextTokenizer
from trace_rt.tokens import MAX_TIMESTAMP, encode_timestamp
from trace_rt.video import DecodeLimits, SampledVideo, VideoSource, load_video
from trace_rt.video.convert import DEFAULT_RESIZE, RESIZE_MODES, ModelFrames


@dataclass(frozen=True)
class Question:
    """One question about a video: a task (``dvc``, ``mr``, ``vhd``, ``custom``/None) and its
    query or free question."""

    task: str | None = "dvc"
    query: str | None = None
    question: str | None = None


@dataclass(frozen=True)
class Prepared:
    """One request's model inputs, made on the host by :meth:`Pipeline.prepare`."""

    prompt_ids: list[int]  # -201 where the video block goes
    clip: SampledVideo  # frames: uint8 RGB at model size [F, 3, H, W] (empty if sent pixels)
    pixel_values: np.ndarray  # float32 [F, 3, H, W]
    time_ids: np.ndarray  # int64 [F, 6]
    free_question: bool = False  # task custom: the result gets an ``answer``


class Pipeline:
    """One model behind one backend, ready to answer requests.

    Args:
        backend: a loaded backend.
        tokenizer: the checkpoint's text tokenizer.
        prompts: system text and task questions (defaults to the release's).
        template: ``llama_2`` (the release's evaluation) or ``mistral_instruct``.
        video_cache: keeps encoded videos and their prompt-prefix K/V across calls of
            :meth:`run_many` (a server's); None caches only within one call.
        resize: how frames reach the model's size: ``exact`` (full-resolution RGB, then
            the release's Pillow bicubic bit for bit, the default: the original code's ids)
            or ``fast`` (libswscale while converting from YUV; several times faster and
            lighter on large frames, pixels within a few levels). See
            :mod:`trace_rt.video.convert`.
    """

    def __init__(
        self,
        backend: Backend,
        tokenizer: TextTokenizer,
        prompts: PromptSet | None = None,
        template: str = "llama_2",
        video_cache: VideoCache | None = None,
        resize: str = DEFAULT_RESIZE,
    ):
        if resize not in RESIZE_MODES:  # fail at load, not on every request
            raise InputError(f"resize must be one of {', '.join(RESIZE_MODES)}; got {resize!r}")
        self.resize = resize
        self.backend = backend
        self.config = backend.config
        self.tokenizer = tokenizer
        self.prompts = prompts or PromptSet.load()
        self.template = template
        self.video_cache = video_cache
        model_dir = getattr(backend, "model_dir", None)
        identity = (
            f"{backend.name}:{getattr(backend, 'decoder_variant', None)}:"
            f"{getattr(backend, 'dtype', None)}"
        )
        # Without a directory to fingerprint, cache entries are this backend object's own.
        self.fingerprint = (
            model_fingerprint(model_dir, identity) if model_dir else f"{identity}:{id(backend)}"
        )

    @classmethod
    def from_dir(
        cls,
        model_dir: str | Path,
        backend: str | None = None,
        *,
        prompts_file: str | Path | None = None,
        template: str = "llama_2",
        video_cache: VideoCache | None = None,
        resize: str = DEFAULT_RESIZE,
        **backend_options: Any,
    ) -> Pipeline:
        """Load *model_dir* (checkpoint or artifact directory) with backend *backend*
        (default: from the directory's kind, :func:`trace_rt.backends.default_backend`).
        Prompt strings: *prompts_file*, else the model's own (:meth:`PromptSet.for_model`)."""
        if backend is None:
            backend = default_backend(model_dir)
        return cls(
            load_backend(backend, model_dir, **backend_options),
            TextTokenizer.from_dir(model_dir),
            PromptSet.for_model(model_dir, prompts_file),
            template,
            video_cache,
            resize,
        )

    def run(
        self,
        video: VideoSource,
        task: str | None = "dvc",
        *,
        query: str | None = None,
        question: str | None = None,
        frames: int | None = None,
        gen: GenerationConfig | None = None,
        on_token: Callable[[int], None] | None = None,
        on_event: Callable[[Event], None] | None = None,
        limits: DecodeLimits | None = None,
        cancelled: Callable[[], bool] | None = None,
        sampler: Callable[[int, float], np.ndarray] | None = None,
    ) -> dict[str, Any]:
        """Answer one request; returns the ``trace-rt run`` JSON object.

        Args:
            limits, cancelled, sampler: for decoding the video, as in :meth:`prepare`.
            on_token: called with each generated id as soon as it is chosen.
            on_event: called with each event as soon as its last id is generated (the
                events passed are exactly the result's ``events``, in order).
        """
        gen = gen or GenerationConfig()
        t0 = time.perf_counter()
        req = self.prepare(
            video,
            task,
            query=query,
            question=question,
            frames=frames,
            gen=gen,
            limits=limits,
            cancelled=cancelled,
            sampler=sampler,
        )
        video_ms = (time.perf_counter() - t0) * 1e3
        out = self.run_prepared(req, gen, on_token=on_token, on_event=on_event)
        out["timing_ms"]["video"] = video_ms
        out["timing_ms"]["total"] += video_ms
        return {"video": _describe(video), "task": task, **out}

    def run_prepared(
        self,
        req: Prepared,
        gen: GenerationConfig,
        *,
        on_token: Callable[[int], None] | None = None,
        on_event: Callable[[Event], None] | None = None,
    ) -> dict[str, Any]:
        """The model's part of :meth:`run` for a :meth:`prepare` d request (what a server
        runs after it has decoded the video itself or was sent frames)."""
        ids, clip = req.prompt_ids, req.clip
        parser = EventParser(self.tokenizer, self.config.ids)
        events: list[Event] = []

        def emit(done: list[Event]) -> None:
            events.extend(done)
            if on_event is not None:
                for ev in done:
                    on_event(ev)

        def token_cb(token: int) -> None:
            if on_token is not None:
                on_token(token)
            emit(parser.feed(token))

        t1 = time.perf_counter()
        handle = self.backend.encode_video(req.pixel_values, req.time_ids)
        self.backend.synchronize()
        t2 = time.perf_counter()
        result = generate(
            self.backend,
            ids,
            handle,
            gen,
            duration=clip.duration,
            frame_times=clip.times,
            on_token=token_cb,
        )
        emit(parser.finish())
        t3 = time.perf_counter()
        answer = {}
        if req.free_question:
            # As the original's QA evaluation reads it: the first event's caption.
            answer = {"answer": events[0].caption if events else ""}
        return {
            **answer,
            "duration": round(clip.duration, 3),
            "frames": len(clip.times),
            "events": [e.to_dict() for e in events],
            "token_ids": result.token_ids,
            "prompt_ids": ids,
            "frame_times": [round(float(t), 6) for t in clip.times],
            "stop_reason": result.stop_reason,
            "timing_ms": {
                "video": 0.0,
                "vision": (t2 - t1) * 1e3,
                "prefill": result.timing_ms["prefill"],
                "decode": result.timing_ms["decode"],
                "total": (t3 - t1) * 1e3,
            },
        }

    def prepare(
        self,
        video: VideoSource,
        task: str | None = "dvc",
        *,
        query: str | None = None,
        question: str | None = None,
        frames: int | None = None,
        gen: GenerationConfig | None = None,
        limits: DecodeLimits | None = None,
        cancelled: Callable[[], bool] | None = None,
        sampler: Callable[[int, float], np.ndarray] | None = None,
    ) -> Prepared:
        """The host-side work before the model: prompt ids, frames, pixels, time ids.

        Split out of :meth:`run` so that ``trace_rt.bench`` times exactly this work as
        its ``video`` stage and then drives the backend stage by stage itself. Each
        sampled frame is scaled to the model's input as soon as it is decoded (in the
        YUV-to-RGB conversion itself by default), so memory holds frames at model
        resolution, not at the video's, and no full-resolution RGB image is made.

        Args:
            limits: formats, frame size and time budget allowed for decoding (default
                :data:`trace_rt.video.DEFAULT_LIMITS`).
            cancelled: asked while the video decodes; True raises
                :class:`~trace_rt.errors.DecodeCancelledError`.
            sampler: which frames to take (see :func:`trace_rt.video.load_video`;
                default the release's uniform sampling).
        """
        n_frames = self.config.num_frames if frames is None else frames
        ids = self._prompt(task, query, question, n_frames, gen or GenerationConfig())
        pp = self.config.preprocess
        clip, pixels = video_inputs(
            video, n_frames, pp, self.resize, limits=limits, cancelled=cancelled, sampler=sampler
        )
        free = task in (None, CUSTOM_TASK)
        return Prepared(ids, clip, pixels, _time_ids(clip.times), free)

    def run_many(
        self,
        video: VideoSource | SampledVideo,
        questions: Sequence[Question],
        *,
        frames: int | None = None,
        gen: GenerationConfig | None = None,
        limits: DecodeLimits | None = None,
        cancelled: Callable[[], bool] | None = None,
        on_event: Callable[[int, Event], None] | None = None,
    ) -> list[dict[str, Any]]:
        """Answer several questions about one video; one ``trace-rt run`` dict per question.

        The video is decoded and encoded once, and the prompt up to the end of the video
        block is prefilled once (per template and system text): every later question
        starts its KV slot from that prefix. The questions decode together, batched over
        the backend's ``max_sequences`` slots. With a :attr:`video_cache`, the encoded
        video and its prefix also serve later calls (the result's ``video_id`` names it).

        Args:
            on_event: called with (question index, event) as each event completes.
        """
        gen = gen or GenerationConfig()
        if not questions:
            raise InputError("no questions to answer")
        n_frames = self.config.num_frames if frames is None else frames
        prompts = [
            self._prompt(q.task, q.query, q.question, n_frames, gen) for q in questions
        ]  # checked before the video is decoded
        t0 = time.perf_counter()
        content = content_hash(video) if self.video_cache is not None else None
        if content is None:
            entry = VideoEntry("")
            self._encode_into(entry, video, n_frames, limits, cancelled)
            results = answer_questions(self, entry, questions, prompts, gen, on_event, t0)
        else:
            prep = (self.config.preprocess, self.resize)  # how frames reach the model
            key = video_key(content, n_frames, "uniform", prep, self.fingerprint)
            with self.video_cache.entry(
                key, lambda e: self._encode_into(e, video, n_frames, limits, cancelled)
            ) as entry:
                results = answer_questions(self, entry, questions, prompts, gen, on_event, t0)
        source = _describe(video)
        return [{"video": source, **r} for r in results]

    def _encode_into(
        self,
        entry: VideoEntry,
        video: VideoSource,
        n_frames: int,
        limits: DecodeLimits | None,
        cancelled: Callable[[], bool] | None,
    ) -> None:
        """Decode, preprocess and encode *video* into a cache *entry*. A
        :class:`~trace_rt.video.SampledVideo` is a video :meth:`decode` d already (elsewhere:
        ``trace-rt batch`` decodes in parallel tasks): only encoded."""
        t0 = time.perf_counter()
        if isinstance(video, SampledVideo):
            clip = video
            if len(clip.times) != n_frames:
                raise InputError(f"decoded video has {len(clip.times)} frames, not {n_frames}")
        else:
            clip = self.decode(video, n_frames, limits, cancelled)
        pixels = normalize(clip.frames, self.config.preprocess)  # [F, 3, h, w] float32
        t1 = time.perf_counter()
        entry.video = self.backend.encode_video(pixels, _time_ids(clip.times))
        self.backend.synchronize()
        t2 = time.perf_counter()
        entry.video_bytes = int(getattr(entry.video, "nbytes", 0) or 0)
        entry.meta = {
            "duration": clip.duration,
            "times": clip.times,
            "timing_ms": {"video": (t1 - t0) * 1e3, "vision": (t2 - t1) * 1e3},
        }

    def decode(
        self,
        video: VideoSource,
        n_frames: int | None = None,
        limits: DecodeLimits | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> SampledVideo:
        """:func:`decode_clip` with this model's config and resize mode."""
        return decode_clip(self.config, video, n_frames, limits, cancelled, self.resize)

    def prepare_frames(
        self,
        pixel_values: np.ndarray,
        timestamps: np.ndarray,
        task: str | None = "dvc",
        *,
        query: str | None = None,
        question: str | None = None,
        duration: float | None = None,
        gen: GenerationConfig | None = None,
    ) -> Prepared:
        """:meth:`prepare` for a client that decoded and preprocessed the video itself.

        Args:
            pixel_values: float32 ``[F, 3, H, W]``, already CLIP-preprocessed.
            timestamps: each frame's time in seconds ``[F]``, non-decreasing.
            duration: the video's length (default: the last timestamp); bounds the
                timestamps of constrained decoding.
        """
        pp = self.config.preprocess
        px = np.asarray(pixel_values)
        want = (3, pp.crop_height, pp.crop_width)
        if px.ndim != 4 or px.shape[1:] != want or px.shape[0] < 1:
            raise InputError(
                f"frames must be [frames, {want[0]}, {want[1]}, {want[2]}] (this model's "
                f"preprocessed size), got {list(px.shape)}"
            )
        if not np.issubdtype(px.dtype, np.floating) or not np.isfinite(px).all():
            raise InputError(f"frames must be finite floats, got {px.dtype}")
        ts = np.asarray(timestamps, dtype=np.float64).reshape(-1)
        if ts.shape[0] != px.shape[0]:
            raise InputError(f"{px.shape[0]} frames but {ts.shape[0]} timestamps")
        if not np.isfinite(ts).all() or (ts < 0).any() or (np.diff(ts) < 0).any():
            raise InputError("timestamps must be finite, >= 0 and non-decreasing")
        dur = float(ts[-1]) if duration is None else float(duration)
        if not np.isfinite(dur) or dur < ts[-1] or dur > MAX_TIMESTAMP:
            raise InputError(
                f"duration must lie in [last timestamp ({ts[-1]:.3f}), {MAX_TIMESTAMP}] s, "
                f"got {dur}"
            )
        ids = self._prompt(task, query, question, px.shape[0], gen or GenerationConfig())
        clip = SampledVideo(
            frames=np.zeros((0, 0, 0, 3), np.uint8),
            times=ts,
            duration=dur,
            fps=(len(ts) - 1) / ts[-1] if ts[-1] > 0 else 0.0,
            total_frames=len(ts),
        )
        px = np.ascontiguousarray(px, dtype=np.float32)
        return Prepared(ids, clip, px, _time_ids(ts), task in (None, CUSTOM_TASK))

    def _prompt(
        self,
        task: str | None,
        query: str | None,
        question: str | None,
        n_frames: int,
        gen: GenerationConfig,
    ) -> list[int]:
        cfg = self.config
        ids = prompt_ids(
            task,
            query=query,
            question=question,
            tok=self.tokenizer,
            ids=cfg.ids,
            template=self.template,
            prompts=self.prompts,
        )
        need = len(ids) - 1 + n_frames * cfg.tokens_per_frame + gen.max_new_tokens
        if need > cfg.max_position_embeddings:
            raise PromptTooLongError(
                f"prompt ({len(ids) - 1} ids) + video block ({n_frames} frames x "
                f"{cfg.tokens_per_frame}) + max_new_tokens ({gen.max_new_tokens}) = {need} "
                f"positions exceeds the model's context of {cfg.max_position_embeddings}"
            )
        return ids


def video_inputs(
    video: VideoSource,
    n_frames: int,
    pp: PreprocessConfig,
    resize: str = DEFAULT_RESIZE,
    **load: Any,
) -> tuple[SampledVideo, np.ndarray]:
    """The video half of :meth:`Pipeline.prepare`: sampled frames and pixel values.

    Each sampled frame goes to the model's input size as it is decoded
    (:class:`~trace_rt.video.convert.ModelFrames`); the uint8 frames are normalised once
    all are in, after the decoder's memory is released, so the peak holds the decoder or
    the float32 pixel values, not both.

    Args:
        load: ``limits``, ``cancelled``, ``sampler`` of :func:`trace_rt.video.load_video`.

    Returns:
        The clip (``frames`` uint8 ``[F, 3, h, w]``) and float32 ``[F, 3, h, w]`` pixels.
    """
    clip = load_video(video, n_frames, convert=ModelFrames(pp, resize), **load)
    return clip, normalize(clip.frames, pp)


def decode_clip(
    config: TraceConfig,
    video: VideoSource,
    n_frames: int | None = None,
    limits: DecodeLimits | None = None,
    cancelled: Callable[[], bool] | None = None,
    resize: str = DEFAULT_RESIZE,
) -> SampledVideo:
    """Decode *video* to frames at the input size of a model of *config* (uint8
    ``[F, 3, h, w]``, its frame count): what :meth:`Pipeline.run_many` does before
    normalising and encoding, and accepts in place of a video. Needs only the config, so
    it runs where the model is not loaded."""
    n = config.num_frames if n_frames is None else n_frames
    convert = ModelFrames(config.preprocess, resize)
    return load_video(video, n, limits=limits, cancelled=cancelled, convert=convert)


def _time_ids(times: np.ndarray) -> np.ndarray:
    return np.array([encode_timestamp(float(t)) for t in times], dtype=np.int64)  # [F, 6]


def _describe(video: VideoSource) -> str:
    if isinstance(video, (str, os.PathLike)):
        return os.fspath(video)
    if isinstance(video, (bytes, bytearray, memoryview)):
        return f"<{len(video)} bytes>"
    return f"<{type(video).__name__}>"
