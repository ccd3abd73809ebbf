"""The small interface every backend implements; the decoding loop drives only this.

A backend owns the model's weights and a pool of KV slots. The loop hands it numpy arrays
and unified ids and gets back each sequence's logits in its active head (numpy, fp32), so
the same loop serves PyTorch, onnxruntime, TensorRT and Triton's Python model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from trace_rt.config import TraceConfig
from trace_rt.tokens import Head


@dataclass(frozen=True)
class KVPrefix:
    """A host copy of one sequence's K/V for the prompt up to the end of its video block.

    What the video cache keeps per (video, template/system text): a later question about
    the same video starts its slot from these positions instead of recomputing them.
    Backend-neutral (numpy, position-major ``[L, 1, kv, hd]`` per layer, K then V), so any
    backend can load a prefix another backend made from the same artifact's weights.

    Attributes:
        before_ids: the prompt ids before the video placeholder that it covers (checked
            against the prompt it is loaded for).
        video_len: the video block's positions.
        kv: per layer K then V, each ``[L, 1, kv, hd]`` with L = len(before_ids) +
            video_len.
    """

    before_ids: tuple[int, ...]
    video_len: int
    kv: tuple[np.ndarray, ...]

    @property
    def length(self) -> int:
        return len(self.before_ids) + self.video_len

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.kv)


@runtime_checkable
class Backend(Protocol):
    """What the decoding loop needs from a backend: a pool of KV slots.

    A backend owns the weights and KV cache space for up to ``max_sequences`` sequences,
    one per slot (``0 .. max_sequences - 1``). :meth:`prefill` fills one slot;
    :meth:`decode` advances a batch of slots by one id each, every sequence at its own
    position and in its own head. The scheduler (:mod:`trace_rt.engine`) decides which
    slot a sequence uses; a single ``trace-rt run`` is the one-slot case.
    """

    name: str
    config: TraceConfig
    max_sequences: int

    def encode_video(self, pixel_values: np.ndarray, time_ids: np.ndarray) -> Any:
        """Frames -> the video block, kept wherever the backend likes (opaque handle).

        Args:
            pixel_values: preprocessed frames, float32 ``[F, 3, H, W]``.
            time_ids: each frame's timestamp as local time-vocabulary ids, int64 ``[F, 6]``.

        Returns:
            A handle to the ``[F * (slots + 6), hidden]`` embeddings for :meth:`prefill`.
        """
        ...

    def prefill(
        self,
        prompt_ids: Sequence[int],
        video: Any,
        head: Head,
        *,
        slot: int = 0,
        prefix: KVPrefix | None = None,
    ) -> np.ndarray:
        """Fill *slot* with the prompt (video block spliced in at id -201).

        Without *prefix* the slot starts empty. With it, the slot starts from the prefix's
        K/V and only the prompt ids after the video placeholder are run (*video* is then
        unused and may be None).

        Returns:
            *head*'s logits for the last position, float32 ``[head_size]``.
        """
        ...

    def save_prefix(self, prompt_ids: Sequence[int], video: Any, *, slot: int = 0) -> KVPrefix:
        """Fill *slot* with the prompt up to the end of the video block; return a host copy
        of its K/V (:meth:`prefill` with ``prefix=`` continues from it)."""
        ...

    def decode(
        self, slots: Sequence[int], token_ids: Sequence[int], heads: Sequence[Head]
    ) -> list[np.ndarray]:
        """Append one unified id to each of *slots* (one batched step); returns each
        slot's next logits in its head ``[head_size]``, in the order given."""
        ...

    def decode_step(self, token_id: int, head: Head, *, slot: int = 0) -> np.ndarray:
        """:meth:`decode` for one slot: its next logits in *head* ``[head_size]``."""
        ...

    def release(self, slot: int) -> None:
        """Forget *slot*'s sequence (its space is reused by the next :meth:`prefill`)."""
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


def check_pool_size(max_sequences: object) -> int:
    """A backend's ``max_sequences``: a positive int (bools refused), else InputError."""
    from trace_rt.errors import InputError

    if isinstance(max_sequences, bool) or not isinstance(max_sequences, int) or max_sequences < 1:
        raise InputError(f"max_sequences must be a positive integer, got {max_sequences!r}")
    return max_sequences


def check_decode(
    slots: Sequence[int], token_ids: Sequence[int], heads: Sequence[Head], max_sequences: int
) -> None:
    """The arguments of one :meth:`Backend.decode`: valid slots, one id and head each."""
    check_slots(slots, max_sequences)
    if not len(slots) == len(token_ids) == len(heads):
        raise ValueError("decode needs one token id and one head per slot")


def check_slots(slots: Sequence[int], max_sequences: int) -> None:
    """Slots of one :meth:`Backend.decode` call: distinct and inside the pool."""
    if len(set(slots)) != len(slots) or any(not 0 <= s < max_sequences for s in slots):
        raise ValueError(f"slots {list(slots)} must be distinct and in 0..{max_sequences - 1}")


def check_prefix(prefix: KVPrefix, before: Sequence[int]) -> None:
    """A prefix is loaded only for a prompt that starts with the ids it was made from."""
    if tuple(before) != prefix.before_ids:
        raise ValueError(
            "the KV prefix was made for other prompt ids before the video (another template "
            "or system text): it cannot start this prompt"
        )
