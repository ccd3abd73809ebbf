"""The ``spatial_slot`` projector and the time/score/sync towers."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from trace_rt.config import TraceConfig
from trace_rt.model.mistral import apply_rope, rope_tables


class SpatialSlotProjector(nn.Module):
    """Pools a frame's patches into ``mm_num_slots`` slots and maps them to the LLM width.

    LayerNorm -> rotate-half RoPE over patch positions (full width) -> attention logits
    against learned slot queries -> softmax over patches -> weighted sum -> readout.
    """

    def __init__(self, cfg: TraceConfig):
        super().__init__()
        d = cfg.mm_hidden_size
        self.theta = cfg.mm_rope_theta
        self.slots = nn.Parameter(torch.empty(d, cfg.mm_num_slots))
        self.ln_vision = nn.LayerNorm(d, eps=cfg.mm_layer_norm_eps)
        self.readout = nn.Linear(d, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        # x: [F, P, D] patch features
        x = self.ln_vision(x)
        pos = torch.arange(x.shape[1], device=x.device)
        cos, sin = rope_tables(x.shape[-1], pos, self.theta)  # [P, D] each
        x = apply_rope(x, cos, sin)  # [F, P, D]
        attn = torch.softmax(x @ self.slots, dim=1)  # [F, P, S], normalised over patches
        pooled = attn.transpose(1, 2) @ x  # [F, S, D]
        return self.readout(pooled)  # [F, S, H]


class TokenTower(nn.Module):
    """An embedding table of its own (time, score or sync tower)."""

    def __init__(self, num: int, dim: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(num, dim)

    def forward(self, ids: Tensor) -> Tensor:
        return self.embed_tokens(ids)
