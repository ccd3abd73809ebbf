"""PyTorch backend: our compact model over a pooled KV cache, eager mode."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from trace_rt.backends.base import (
    KVPrefix,
    check_decode,
    check_pool_size,
    check_prefix,
    check_slots,
    split_prompt,
)
from trace_rt.errors import DeviceError, InputError, PromptTooLongError
from trace_rt.model import load_model
from trace_rt.model.decode import decode_with_past
from trace_rt.tokens import VIDEO_PLACEHOLDER_ID, Head, head_base, head_size

# Cache positions reserved past the prompt at prefill (grown by doubling beyond that).
PREFILL_HEADROOM = 1024


class TorchBackend:
    """Runs a checkpoint directory with :class:`trace_rt.model.TraceModel`.

    The KV cache is a pool of ``max_sequences`` slots, per layer K and V tensors
    ``[capacity, max_sequences, kv, hd]`` (position-major, as the exported decoder's), and
    every step is :func:`trace_rt.model.decode.decode_with_past`, the function the
    exported decoder graph is traced from.

    Args:
        model_dir: HF-format TRACE checkpoint.
        device: ``cpu`` or ``cuda[:N]``.
        dtype: compute dtype (fp32, fp16, bf16); defaults to fp32 on CPU and to the
            checkpoint's dtype on CUDA.
        max_sequences: KV slots (sequences one decode step advances together).
    """

    name = "torch"

    def __init__(
        self,
        model_dir: str | Path,
        device: str = "cpu",
        dtype: str | None = None,
        max_sequences: int = 1,
    ):
        check_pool_size(max_sequences)
        try:
            self.device = torch.device(device)
        except RuntimeError:
            raise InputError(f"unknown device {device!r}; use cpu or cuda[:N]") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise DeviceError(f"--device {device} was asked for, but torch sees no CUDA device")
        if dtype is None and self.device.type == "cpu":
            dtype = "fp32"  # CPU kernels for half types are slow and less exact
        self.model_dir = Path(model_dir)
        self.model = load_model(model_dir, dtype=dtype, device=self.device)
        self.config = self.model.config
        self.dtype = self.model.lm_head.weight.dtype
        self.max_sequences = max_sequences
        self.lengths = np.zeros(max_sequences, np.int64)
        self._kv: list[torch.Tensor] = []  # K0, V0, K1, V1, ... [capacity, slots, kv, hd]

    @property
    def capacity(self) -> int:
        return self._kv[0].shape[0] if self._kv else 0

    @torch.inference_mode()
    def encode_video(self, pixel_values: np.ndarray, time_ids: np.ndarray) -> torch.Tensor:
        return self.project(self.encode_frames(pixel_values), time_ids)  # [F*(S+6), H]

    # encode_frames/project: the two halves of encode_video (StagedVideoEncoder), so the
    # benchmark can time the vision tower and the projector apart.
    @torch.inference_mode()
    def encode_frames(self, pixel_values: np.ndarray) -> torch.Tensor:
        px = torch.from_numpy(np.ascontiguousarray(pixel_values)).to(self.device, self.dtype)
        return self.model.encode_frames(px)  # [F, P, D]

    @torch.inference_mode()
    def project(self, features: torch.Tensor, time_ids: np.ndarray) -> torch.Tensor:
        tid = torch.from_numpy(np.asarray(time_ids, dtype=np.int64)).to(self.device)
        return self.model.project(features, tid)  # [F*(S+6), H]

    @torch.inference_mode()
    def prefill(
        self,
        prompt_ids: Sequence[int],
        video: torch.Tensor | None,
        head: Head,
        *,
        slot: int = 0,
        prefix: KVPrefix | None = None,
    ) -> np.ndarray:
        check_slots([slot], self.max_sequences)
        before, after = split_prompt(prompt_ids, VIDEO_PLACEHOLDER_ID)
        if prefix is None:
            x = torch.cat([self._embed(before), self._video(video), self._embed(after)])
            start, past = 0, None
        else:
            check_prefix(prefix, before)
            x, start = self._embed(after), prefix.length
            past = [torch.from_numpy(a).to(self.device, self.dtype) for a in prefix.kv]
        logits = self._fill(slot, x, start, past)
        return self._head(logits[0], head)

    @torch.inference_mode()
    def save_prefix(
        self, prompt_ids: Sequence[int], video: torch.Tensor, *, slot: int = 0
    ) -> KVPrefix:
        check_slots([slot], self.max_sequences)
        before, _ = split_prompt(prompt_ids, VIDEO_PLACEHOLDER_ID)
        x = torch.cat([self._embed(before), self._video(video)])  # [L, H]
        self._fill(slot, x, 0, None)
        n = x.shape[0]
        # Widened to f32 on the host (exact; numpy has no bf16), narrowed back when loaded.
        # clone(): on the CPU .float().cpu().numpy() of an fp32 view would alias the pool,
        # whose rows the slot's next sequence overwrites.
        kv = tuple(t[:n, slot : slot + 1].float().cpu().clone().numpy() for t in self._kv)
        return KVPrefix(tuple(before), int(video.shape[0]), kv)

    @torch.inference_mode()
    def decode(
        self, slots: Sequence[int], token_ids: Sequence[int], heads: Sequence[Head]
    ) -> list[np.ndarray]:
        check_decode(slots, token_ids, heads, self.max_sequences)
        rows = torch.tensor(list(slots), device=self.device)
        lengths = self.lengths[list(slots)]
        longest = int(lengths.max())
        limit = self.config.max_position_embeddings
        if longest >= limit:
            raise PromptTooLongError(f"generation reached the model's context of {limit}")
        if longest >= self.capacity:
            self._grow(min(2 * self.capacity, limit))
        s = self.max_sequences
        # Every slot's row runs over the pool's first `longest` positions (the exported
        # graph's contract); unused rows sit at position 0 and are discarded.
        x = torch.zeros(s, 1, self.config.hidden_size, device=self.device, dtype=self.dtype)
        x[rows, 0] = self._embed(token_ids)
        pos = torch.zeros(s, 1, dtype=torch.int64, device=self.device)
        at = torch.from_numpy(lengths).to(self.device)
        pos[rows, 0] = at
        logits, new = decode_with_past(self.model, x, pos, [t[:longest] for t in self._kv])
        for buf, n in zip(self._kv, new, strict=True):
            buf[at, rows] = n[0, rows]
        self.lengths[list(slots)] += 1
        return [self._head(logits[r], h) for r, h in zip(slots, heads, strict=True)]

    def decode_step(self, token_id: int, head: Head, *, slot: int = 0) -> np.ndarray:
        return self.decode([slot], [token_id], [head])[0]

    def release(self, slot: int) -> None:
        check_slots([slot], self.max_sequences)
        self.lengths[slot] = 0

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ---- internals -------------------------------------------------------------------
    def _embed(self, ids: Sequence[int]) -> torch.Tensor:
        return self.model.embed(torch.tensor([list(ids)], device=self.device))[0]  # [n, H]

    def _video(self, video: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(video, device=self.device).to(self.dtype)  # [F*(S+6), H]

    def _head(self, logits: torch.Tensor, head: Head) -> np.ndarray:
        ids = self.config.ids
        base, size = head_base(ids, head), head_size(ids, head)
        return logits[base : base + size].float().cpu().numpy()

    def _fill(
        self, slot: int, x: torch.Tensor, start: int, past: list[torch.Tensor] | None
    ) -> torch.Tensor:
        """Run *x* [T, H] into *slot* at positions start.. over *past* (a prefix's K/V
        [start, 1, kv, hd] each, or none); returns the last position's logits [1, V]."""
        n = start + x.shape[0]
        limit = self.config.max_position_embeddings
        if n > limit:
            raise PromptTooLongError(f"prompt of {n} positions exceeds the model's {limit}")
        self.lengths[slot] = 0
        if n > self.capacity:
            # Room for the prompt and a generous answer; grown in decode if needed.
            self._grow(min(n + PREFILL_HEADROOM, limit))
        pos = torch.arange(start, n, device=self.device)[None]  # [1, T]
        logits, new = decode_with_past(self.model, x[None], pos, past)
        for j, buf in enumerate(self._kv):
            if past is not None:
                buf[:start, slot] = past[j][:, 0]
            buf[start:n, slot] = new[j][:, 0]
        self.lengths[slot] = n
        return logits

    def _grow(self, capacity: int) -> None:
        cfg = self.config
        shape = (capacity, self.max_sequences, cfg.num_key_value_heads, cfg.attn_head_dim)
        old, keep = self._kv, min(self.capacity, capacity)
        self._kv = [
            torch.zeros(shape, dtype=self.dtype, device=self.device)
            for _ in range(2 * cfg.num_hidden_layers)
        ]
        for new, buf in zip(self._kv, old, strict=False):
            new[:keep] = buf[:keep]
