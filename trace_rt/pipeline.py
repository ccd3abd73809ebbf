"""Video + question in, TRACE's events out: the stages around the decoding loop.

video decode + sampling (PyAV) -> CLIP preprocessing (numpy) -> backend.encode_video ->
prompt ids -> :func:`trace_rt.generate.generate` -> parser. Backend-agnostic: the same
code runs every backend.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from trace_rt.backends import Backend, load_backend
from trace_rt.errors import PromptTooLongError
from trace_rt.events import parse_events
from trace_rt.generate import GenerationConfig, generate
from trace_rt.preprocess import preprocess_frames
from trace_rt.prompts import PromptSet, prompt_ids
from trace_rt.tokenizer import TextTokenizer
from trace_rt.tokens import encode_timestamp
from trace_rt.video import SampledVideo, load_video

VideoSource = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO


@dataclass(frozen=True)
class Prepared:
    """One request's model inputs, made on the host by :meth:`Pipeline.prepare`."""

    prompt_ids: list[int]  # -201 where the video block goes
    clip: SampledVideo
    pixel_values: np.ndarray  # float32 [F, 3, H, W]
    time_ids: np.ndarray  # int64 [F, 6]


class Pipeline:
    """One model behind one backend, ready to answer requests.

    Args:
        backend: a loaded backend.
        tokenizer: the checkpoint's text tokenizer.
        prompts: system text and task questions (defaults to the release's).
        template: ``llama_2`` (the release's evaluation) or ``mistral_instruct``.
    """

    def __init__(
        self,
        backend: Backend,
        tokenizer: TextTokenizer,
        prompts: PromptSet | None = None,
        template: str = "llama_2",
    ):
        self.backend = backend
        self.config = backend.config
        self.tokenizer = tokenizer
        self.prompts = prompts or PromptSet.load()
        self.template = template

    @classmethod
    def from_dir(
        cls,
        model_dir: str | Path,
        backend: str = "torch",
        *,
        prompts_file: str | Path | None = None,
        template: str = "llama_2",
        **backend_options: Any,
    ) -> Pipeline:
        """Load *model_dir* (checkpoint or artifact directory) with backend *backend*."""
        return cls(
            load_backend(backend, model_dir, **backend_options),
            TextTokenizer.from_dir(model_dir),
            PromptSet.load(prompts_file),
            template,
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
    ) -> dict[str, Any]:
        """Answer one request; returns the ``trace-rt run`` JSON object."""
        gen = gen or GenerationConfig()
        t0 = time.perf_counter()
        req = self.prepare(video, task, query=query, question=question, frames=frames, gen=gen)
        ids, clip = req.prompt_ids, req.clip
        t1 = time.perf_counter()
        handle = self.backend.encode_video(req.pixel_values, req.time_ids)
        self.backend.synchronize()
        t2 = time.perf_counter()
        result = generate(self.backend, ids, handle, gen, duration=clip.duration, on_token=on_token)
        t3 = time.perf_counter()
        events = parse_events(result.token_ids, self.tokenizer, self.config.ids)
        return {
            "video": _describe(video),
            "task": task,
            "duration": round(clip.duration, 3),
            "frames": len(clip.times),
            "events": [e.to_dict() for e in events],
            "token_ids": result.token_ids,
            "prompt_ids": ids,
            "frame_times": [round(float(t), 6) for t in clip.times],
            "timing_ms": {
                "video": (t1 - t0) * 1e3,
                "vision": (t2 - t1) * 1e3,
                "prefill": result.timing_ms["prefill"],
                "decode": result.timing_ms["decode"],
                "total": (t3 - t0) * 1e3,
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
    ) -> Prepared:
        """The host-side work before the model: prompt ids, frames, pixels, time ids.

        Split out of :meth:`run` so that ``trace_rt.bench`` times exactly this work as
        its ``video`` stage and then drives the backend stage by stage itself.
        """
        gen = gen or GenerationConfig()
        cfg = self.config
        n_frames = cfg.num_frames if frames is None else frames
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
        clip = load_video(video, n_frames)
        pixels = preprocess_frames(clip.frames, cfg.preprocess)  # [F, 3, H, W]
        time_ids = np.array([encode_timestamp(float(t)) for t in clip.times], dtype=np.int64)
        return Prepared(ids, clip, pixels, time_ids)


def _describe(video: VideoSource) -> str:
    if isinstance(video, (str, os.PathLike)):
        return os.fspath(video)
    if isinstance(video, (bytes, bytearray, memoryview)):
        return f"<{len(video)} bytes>"
    return f"<{type(video).__name__}>"
