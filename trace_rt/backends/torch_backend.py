"""PyTorch backend: our compact model with a preallocated KV cache, eager mode."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from trace_rt.backends.base import split_prompt
from trace_rt.errors import DeviceError, InputError, PromptTooLongError
from trace_rt.model import load_model
from trace_rt.tokens import VIDEO_PLACEHOLDER_ID, Head


class TorchBackend:
    """Runs a checkpoint directory with :class:`trace_rt.model.TraceModel`.

    Args:
        model_dir: HF-format TRACE checkpoint.
        device: ``cpu`` or ``cuda[:N]``.
        dtype: compute dtype (fp32, fp16, bf16); defaults to fp32 on CPU and to the
            checkpoint's dtype on CUDA.
    """

    name = "torch"

    def __init__(self, model_dir: str | Path, device: str = "cpu", dtype: str | None = None):
        try:
            self.device = torch.device(device)
        except RuntimeError:
            raise InputError(f"unknown device {device!r}; use cpu or cuda[:N]") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise DeviceError(f"--device {device} was asked for, but torch sees no CUDA device")
        if dtype is None and self.device.type == "cpu":
            dtype = "fp32"  # CPU kernels for half types are slow and less exact
        self.model = load_model(model_dir, dtype=dtype, device=self.device)
        self.config = self.model.config
        self.dtype = self.model.lm_head.weight.dtype
        self._pos = 0

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
    def prefill(self, prompt_ids: Sequence[int], video: torch.Tensor, head: Head) -> np.ndarray:
        before, after = split_prompt(prompt_ids, VIDEO_PLACEHOLDER_ID)
        m = self.model
        embed = [m.embed(torch.tensor([ids], device=self.device)) for ids in (before, after)]
        x = torch.cat([embed[0], video[None].to(self.dtype), embed[1]], dim=1)  # [1, L, H]
        if x.shape[1] > m.config.max_position_embeddings:
            raise PromptTooLongError(
                f"prompt of {x.shape[1]} positions exceeds the model's "
                f"{m.config.max_position_embeddings}"
            )
        if m.cache_len < x.shape[1] + 1 or m.cache_len > 4 * (x.shape[1] + 1024):
            # Room for the prompt and a generous answer; regrown in decode_step if needed.
            m.setup_caches(min(x.shape[1] + 1024, m.config.max_position_embeddings))
        self._pos = x.shape[1]
        return self._logits(m.prefill(x), head)

    @torch.inference_mode()
    def decode_step(self, token_id: int, head: Head) -> np.ndarray:
        m = self.model
        if self._pos >= m.config.max_position_embeddings:
            raise PromptTooLongError(
                f"generation reached the model's context of {m.config.max_position_embeddings}"
            )
        if self._pos >= m.cache_len:
            self._grow_cache()
        ids = torch.tensor([[token_id]], device=self.device)
        pos = torch.tensor([self._pos], device=self.device)
        self._pos += 1
        return self._logits(m.decode_step(ids, pos), head)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _logits(self, hidden: torch.Tensor, head: Head) -> np.ndarray:
        return self.model.head_logits(hidden[0], head).cpu().numpy()

    def _grow_cache(self) -> None:
        m = self.model
        new_len = min(m.cache_len * 2, m.config.max_position_embeddings)
        old = [(layer.self_attn.kv_cache.k, layer.self_attn.kv_cache.v) for layer in m.model.layers]
        m.setup_caches(new_len)
        for layer, (k, v) in zip(m.model.layers, old, strict=True):
            layer.self_attn.kv_cache.k[:, :, : k.shape[2]] = k
            layer.self_attn.kv_cache.v[:, :, : v.shape[2]] = v
