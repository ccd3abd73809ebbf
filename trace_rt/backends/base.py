"""The small interface every backend implements; the decoding loop drives only this.

A backend owns the model's weights and its KV cache. The loop hands it numpy arrays and
unified ids and gets back one head's logits (numpy, fp32) for the last position, so the
same loop serves PyTorch, onnxruntime, TensorRT and Triton's Python model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from trace_rt.config import TraceConfig
from trace_rt.tokens import Head


@runtime_checkable
class Backend(Protocol):
    """What the decoding loop needs from a backend."""

    name: str
    config: TraceConfig

    def encode_video(self, pixel_values: np.ndarray, time_ids: np.ndarray) -> Any:
        """Frames -> the video block, kept wherever the backend likes (opaque handle).

        Args:
            pixel_values: preprocessed frames, float32 ``[F, 3, H, W]``.
            time_ids: each frame's timestamp as local time-vocabulary ids, int64 ``[F, 6]``.

        Returns:
            A handle to the ``[F * (slots + 6), hidden]`` embeddings for :meth:`prefill`.
        """
        ...

    def prefill(self, prompt_ids: Sequence[int], video: Any, head: Head) -> np.ndarray:
        """Run the prompt (video block spliced in at id -201) from an empty cache.

        Returns:
            *head*'s logits for the last position, float32 ``[head_size]``.
        """
        ...

    def decode_step(self, token_id: int, head: Head) -> np.ndarray:
        """Append one unified id to the cache; returns *head*'s next logits ``[head_size]``."""
        ...

    def synchronize(self) -> None:
        """Wait for queued device work, so timings are honest."""
        ...


@runtime_checkable
class StagedVideoEncoder(Protocol):
    """Optional: a backend whose ``encode_video`` is ``project(encode_frames(...))``.

    Lets benchmarks time the vision encoder and the projector apart with the backend's
    own code; backends without it are timed as one ``encode_video`` call.
    """

    def encode_frames(self, pixel_values: np.ndarray) -> Any:
        """Frames ``[F, 3, H, W]`` -> selected-layer patch features (opaque, may stay on
        the device)."""
        ...

    def project(self, features: Any, time_ids: np.ndarray) -> Any:
        """Features + time ids ``[F, 6]`` -> the video handle :meth:`Backend.prefill` takes."""
        ...


def video_block_len(cfg: TraceConfig, frames: int) -> int:
    """Embeddings the video block of *frames* frames occupies in the sequence."""
    return frames * cfg.tokens_per_frame


def split_prompt(prompt_ids: Sequence[int], placeholder: int) -> tuple[list[int], list[int]]:
    """Prompt ids around the single video placeholder: (before, after)."""
    ids = list(prompt_ids)
    n = ids.count(placeholder)
    if n != 1:
        raise ValueError(f"the prompt must hold exactly one video placeholder, found {n}")
    i = ids.index(placeholder)
    return ids[:i], ids[i + 1 :]
