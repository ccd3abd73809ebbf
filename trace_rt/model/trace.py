"""The TRACE model: vision tower, projector, towers, Mistral decoder and four heads.

One named method per stage, the units export, training and the torch backend share:

- :meth:`TraceModel.encode_frames`  pixels [F, 3, H, W]      -> patch features [F, P, D]
- :meth:`TraceModel.project`        features + time ids       -> video block [F*(S+6), H]
- :meth:`TraceModel.embed`          unified ids [B, L]        -> embeddings [B, L, H]
- :meth:`TraceModel.prefill` / :meth:`TraceModel.decode_step`  -> normed hidden (KV cached)
- :meth:`TraceModel.head_logits`    hidden [B, H], head      -> that head's logits

The module tree mirrors the release (``model.layers...``, ``model.vision_tower.vision_tower
.vision_model...``, ``model.mm_projector...``, ``time_head``...), so ``state_dict()`` keys are
the released weight names.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from trace_rt.config import TraceConfig
from trace_rt.model.clip import CLIPVisionTower
from trace_rt.model.mistral import DecoderLayer, KVCache, RMSNorm, run_decoder
from trace_rt.model.projector import SpatialSlotProjector, TokenTower
from trace_rt.tokens import Head


class TraceBackbone(nn.Module):
    """``model.*`` of the release: embeddings, decoder layers, vision parts and towers."""

    def __init__(self, cfg: TraceConfig):
        super().__init__()
        h = cfg.hidden_size
        self.embed_tokens = nn.Embedding(cfg.vocab_size, h)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(h, cfg.rms_norm_eps)
        self.vision_tower = CLIPVisionTower(cfg.vision, cfg.vision_layers_used)
        self.mm_projector = SpatialSlotProjector(cfg)
        self.time_tower = TokenTower(cfg.time_vocab_size, h)
        self.score_tower = TokenTower(cfg.score_vocab_size, h)
        self.sync_tower = TokenTower(1, h)


class TraceModel(nn.Module):
    def __init__(self, cfg: TraceConfig):
        super().__init__()
        if cfg.sliding_window is not None and cfg.sliding_window < cfg.max_position_embeddings:
            raise ValueError(
                f"sliding_window={cfg.sliding_window} is not supported (TRACE's Mistral "
                "v0.2 base has none)"
            )
        self.config = cfg
        h = cfg.hidden_size
        self.model = TraceBackbone(cfg)
        self.lm_head = nn.Linear(h, cfg.vocab_size, bias=False)
        self.time_head = nn.Linear(h, cfg.time_vocab_size, bias=False)
        self.score_head = nn.Linear(h, cfg.score_vocab_size, bias=False)
        self.sync_head = nn.Linear(h, 1, bias=False)

    # ---- KV cache --------------------------------------------------------------------
    def setup_caches(self, max_seq: int, batch: int = 1) -> None:
        """Allocate a KV cache of *max_seq* positions in every layer (replaces any old one)."""
        cfg = self.config
        p = self.lm_head.weight
        for layer in self.model.layers:
            layer.self_attn.kv_cache = KVCache(
                batch, cfg.num_key_value_heads, max_seq, cfg.attn_head_dim, p.dtype, p.device
            )

    @property
    def cache_len(self) -> int:
        cache = self.model.layers[0].self_attn.kv_cache
        return 0 if cache is None else cache.k.shape[2]

    # ---- stages ----------------------------------------------------------------------
    def encode_frames(self, pixel_values: Tensor) -> Tensor:
        """Preprocessed frames [F, 3, H, W] -> selected-layer patch features [F, P, D]."""
        return self.model.vision_tower(pixel_values)

    def project(self, features: Tensor, time_ids: Tensor) -> Tensor:
        """Patch features [F, P, D] and local time ids [F, 6] -> video block [F*(S+6), H].

        Each frame contributes its slot embeddings followed by the time-tower embeddings
        of its timestamp, in frame order.
        """
        slots = self.model.mm_projector(features)  # [F, S, H]
        times = self.model.time_tower(time_ids).to(slots.dtype)  # [F, 6, H]
        return torch.cat([slots, times], dim=1).flatten(0, 1)  # [F*(S+6), H]

    def embed(self, ids: Tensor) -> Tensor:
        """Unified ids [B, L] -> embeddings [B, L, H], each id through its own table."""
        ids_space = self.config.ids
        m = self.model
        out = m.embed_tokens(ids.clamp(0, ids_space.text_vocab - 1))  # [B, L, H]
        sync = (ids == ids_space.text_sync).unsqueeze(-1)
        out = torch.where(sync, m.sync_tower.embed_tokens.weight[0], out)
        for tower, base, size in (
            (m.time_tower, ids_space.time_base, ids_space.time_vocab),
            (m.score_tower, ids_space.score_base, ids_space.score_vocab),
        ):
            local = ids - base
            inside = ((local >= 0) & (local < size)).unsqueeze(-1)
            out = torch.where(inside, tower(local.clamp(0, size - 1)), out)
        return out

    def forward_embeds(
        self, embeds: Tensor, input_pos: Tensor, *, grad_checkpoint: bool = False
    ) -> Tensor:
        """Embeddings [B, L, H] at positions [L] -> normed hidden [B, L, H] (caches filled).

        Without caches (training: never call :meth:`setup_caches`) attention is causal over
        the *input_pos* given, i.e. full-sequence teacher forcing.
        """
        return run_decoder(
            self.model.layers,
            self.model.norm,
            self.config,
            embeds,
            input_pos,
            grad_checkpoint=grad_checkpoint,
        )

    def prefill(self, embeds: Tensor) -> Tensor:
        """Whole prompt [B, L, H] from position 0 -> last position's hidden [B, H]."""
        pos = torch.arange(embeds.shape[1], device=embeds.device)
        return self.forward_embeds(embeds, pos)[:, -1]

    def decode_step(self, ids: Tensor, input_pos: Tensor) -> Tensor:
        """One new id per sequence [B, 1] at position [1] -> its hidden [B, H]."""
        return self.forward_embeds(self.embed(ids), input_pos)[:, -1]

    def head_logits(self, hidden: Tensor, head: Head) -> Tensor:
        """Hidden [..., H] -> the head's logits in its own vocabulary, fp32.

        The text head is ``lm_head`` followed by ``sync_head`` (id 32000 = text <sync>).
        """
        if head == Head.TEXT:
            logits = torch.cat([self.lm_head(hidden), self.sync_head(hidden)], dim=-1)
        elif head == Head.TIME:
            logits = self.time_head(hidden)
        else:
            logits = self.score_head(hidden)
        return logits.float()

    def all_logits(self, hidden: Tensor) -> Tensor:
        """Every head's logits side by side in the unified id order [..., 32027], fp32."""
        return torch.cat([self.head_logits(hidden, h) for h in Head], dim=-1)
