"""The ``reference`` benchmark backend: the HF-transformers oracle behind the Backend protocol.

This is the baseline every other backend is reported against, so it keeps the release's
way of running (``gyxxyg/TRACE`` on transformers), not ours: every step computes all
heads' logits (lm_head included) and the active head's slice is taken afterwards, the
KV cache is HF's ``DynamicCache``, which grows by concatenation each step, and one request
runs at a time (a pool of one KV slot for the decoding engine, no prefix cache). It adds no
optimisation of its own; making it faster would flatter nothing but the baseline.

It lives in ``benchmarks/`` because it builds on ``trace_rt`` and transformers, and the
library must not depend on either: ``python -m trace_rt.bench`` loads it as a plugin
(``--plugin reference=benchmarks.reference.backend:ReferenceBackend``, see
``trace_rt/bench/plugins.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import DynamicCache

from benchmarks.reference.oracle import ReferenceTrace
from trace_rt.config import TraceConfig
from trace_rt.tokens import Head, head_base, head_size

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ReferenceBackend:
    """:class:`ReferenceTrace` (HF ``MistralForCausalLM`` + ``CLIPVisionModel``) as a Backend.

    Args:
        model_dir: HF-format TRACE checkpoint.
        device: ``cpu`` or ``cuda[:N]``.
        dtype: fp32 (CPU default), fp16 or bf16 (CUDA default: the checkpoint's dtype).
    """

    name = "reference"
    model_format = "checkpoint"  # what the bench must pass as model_dir
    # The release ran one request at a time: one KV slot, no batched steps, no prefixes.
    max_sequences = 1

    def __init__(self, model_dir: str | Path, device: str = "cpu", dtype: str | None = None):
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
        if dtype is None:
            dtype = "fp32" if self.device.type == "cpu" else "fp16"
        self.model = ReferenceTrace.from_pretrained(model_dir, _DTYPES[dtype], self.device)
        # What the bench reads (preprocessing, sizes); the oracle itself parses its own.
        self.config = TraceConfig.from_dir(model_dir)
        self.dtype = self.model.dtype  # read by the bench for the floor's bytes per weight
        self._cache: DynamicCache | None = None

    # ---- Backend protocol (+ StagedVideoEncoder) --------------------------------------
    @torch.no_grad()
    def encode_video(self, pixel_values: np.ndarray, time_ids: np.ndarray) -> torch.Tensor:
        return self.project(self.encode_frames(pixel_values), time_ids)

    @torch.no_grad()
    def encode_frames(self, pixel_values: np.ndarray) -> torch.Tensor:
        return self.model.vision_features(torch.from_numpy(np.ascontiguousarray(pixel_values)))

    @torch.no_grad()
    def project(self, features: torch.Tensor, time_ids: np.ndarray) -> torch.Tensor:
        m = self.model
        slots = m.projector(features)  # [F, S, hidden]
        tid = torch.from_numpy(np.asarray(time_ids, dtype=np.int64)).to(m.device)
        times = m.time_embed(tid)  # [F, 6, hidden]
        return torch.cat([slots, times], dim=1).flatten(0, 1)  # [F * (S + 6), hidden]

    @torch.no_grad()
    def prefill(
        self,
        prompt_ids: Sequence[int],
        video: torch.Tensor,
        head: Head,
        *,
        slot: int = 0,
        prefix: object | None = None,
    ) -> np.ndarray:
        self._check_slot(slot)
        if prefix is not None:
            raise NotImplementedError(self._NO_PREFIX)
        x = self.model.embed_prompt(prompt_ids, video)  # [1, L, hidden]
        self._cache = DynamicCache(config=self.model.llm.config)  # a fresh cache per request
        return self._head(self.model.step_logits(x, self._cache), head)

    def save_prefix(self, prompt_ids: Sequence[int], video: torch.Tensor, *, slot: int = 0):
        raise NotImplementedError(self._NO_PREFIX)

    @torch.no_grad()
    def decode(
        self, slots: Sequence[int], token_ids: Sequence[int], heads: Sequence[Head]
    ) -> list[np.ndarray]:
        if len(slots) != 1 or len(token_ids) != 1 or len(heads) != 1:
            raise ValueError("the reference backend decodes one sequence (max_sequences = 1)")
        return [self.decode_step(token_ids[0], heads[0], slot=slots[0])]

    @torch.no_grad()
    def decode_step(self, token_id: int, head: Head, *, slot: int = 0) -> np.ndarray:
        self._check_slot(slot)
        if self._cache is None:
            raise RuntimeError("decode_step before prefill")
        x = self.model.embed_ids([token_id])[None]  # [1, 1, hidden]
        return self._head(self.model.step_logits(x, self._cache), head)

    def release(self, slot: int) -> None:
        self._check_slot(slot)
        self._cache = None

    _NO_PREFIX = "the reference backend keeps no KV prefixes (the release had none)"

    def _check_slot(self, slot: int) -> None:
        if slot != 0:
            raise ValueError(f"slot {slot}: the reference backend has one KV slot (0)")

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _head(self, logits: torch.Tensor, head: Head) -> np.ndarray:
        # All heads were computed (the release's semantics); the loop wants the active one.
        lo = head_base(self.config.ids, head)
        return logits[lo : lo + head_size(self.config.ids, head)].float().cpu().numpy()
