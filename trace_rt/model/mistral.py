"""Mistral decoder (gpt-fast style) with a preallocated KV cache.

Module names mirror ``transformers.MistralModel`` so the state dict carries the
released names (``layers.{i}.self_attn.q_proj.weight`` ...). The KV cache lives in
non-persistent buffers: it never reaches a checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from trace_rt.config import TraceConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 like the reference; cast back before the scale.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_tables(head_dim: int, positions: Tensor, theta: float) -> tuple[Tensor, Tensor]:
    """cos/sin of rotate-half RoPE for *positions*: each [len, head_dim], fp32."""
    inv_freq = 1.0 / (
        theta
        ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device) / head_dim)
    )
    freqs = torch.outer(positions.float(), inv_freq.float())  # [len, head_dim/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [len, head_dim]
    return emb.cos(), emb.sin()


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)


class KVCache(nn.Module):
    """Per-layer K/V buffers [batch, kv_heads, max_seq, head_dim], written in place."""

    def __init__(self, batch: int, kv_heads: int, max_seq: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, kv_heads, max_seq, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        # input_pos: [L]; k, v: [B, kv, L, hd]. Returns the filled prefix [B, kv, end, hd].
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        end = int(input_pos[-1]) + 1
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: TraceConfig):
        super().__init__()
        hd = cfg.attn_head_dim
        self.n_heads, self.n_kv, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            hd,
        )
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * hd, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * hd, cfg.hidden_size, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor) -> Tensor:
        b, t, _ = x.shape  # [B, L, H]
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # [B, h, L, hd]
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)  # [B, kv, L, hd]
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)  # [B, kv, end, hd]
        # Causal over absolute positions: query at p sees keys 0..p.
        key_pos = torch.arange(k.shape[2], device=x.device)
        mask = key_pos[None, :] <= input_pos[:, None]  # [L, end]
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=self.n_kv != self.n_heads
        )
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: TraceConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TraceConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, input_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


def run_decoder(
    layers: nn.ModuleList,
    norm: RMSNorm,
    cfg: TraceConfig,
    embeds: Tensor,
    input_pos: Tensor,
    *,
    grad_checkpoint: bool = False,
) -> Tensor:
    """Decoder body: embeddings [B, L, H] at absolute *input_pos* [L] -> normed hidden.

    *grad_checkpoint* (training) recomputes each layer in the backward pass instead of
    keeping its activations: memory for compute. It has no effect without grad.
    """
    cos, sin = rope_tables(cfg.attn_head_dim, input_pos, cfg.rope_theta)  # [L, hd] each
    x = embeds
    recompute = grad_checkpoint and torch.is_grad_enabled()
    for layer in layers:
        if recompute:
            x = checkpoint(layer, x, cos, sin, input_pos, use_reentrant=False)
        else:
            x = layer(x, cos, sin, input_pos)
    return norm(x)  # [B, L, H]
