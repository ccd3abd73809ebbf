"""Decoding over an explicit, pooled KV cache: the math the exported decoder graph and the
torch backend share.

The model's own :func:`trace_rt.model.mistral.run_decoder` keeps its cache inside the
layers (one sequence, training and HF parity). Serving many sequences needs the cache
outside the model, in a pool the runtime owns, and a step that advances a *batch* of
sequences, each at its own position. This module is that step, written once:

- :func:`decode_with_past` runs ``inputs_embeds`` [B, T, H] at ``position_ids`` [B, T]
  over ``past`` K/V [P, B, kv, hd] per layer and returns every head's logits for each
  row's last position [B, V] plus the T new positions' K/V [T, B, kv, hd].
- Layout is **position-major** (``[positions, batch, kv, hd]``), chosen for two reasons:
  the first P positions of *every* row of a pooled buffer ``[capacity, S, kv, hd]`` are
  one contiguous block, so a runtime binds them by pointer for a batch step; and
  onnxruntime folds the ``[P, B, kv, hd] -> [B, kv, hd, P]`` view the scores need into its
  strided MatMul (FusedMatMul ``transBatchB``), so the past is read in place (a
  batch-major ``[B, P, kv, hd]`` past is transposed and copied every step instead).
  With B = 1 the layout is byte-for-byte the old single-sequence ``[1, P, kv, hd]``.
- Ragged lengths are data: row b's positions are ``position_ids[b]``, and past slot j of
  row b is attended iff ``j < position_ids[b, 0]`` (slot j holds position j). A batch
  thus shares one past length P (the longest row's) and shorter rows ignore their tail;
  an unused row (position 0) attends only to its own new key, so nothing is all-masked.
- Past and new K/V are never concatenated: attention scores are taken against each
  separately and only the (small) score rows are joined for one softmax.
"""

from __future__ import annotations

import torch
from torch import Tensor

from trace_rt.config import TraceConfig
from trace_rt.model.mistral import Attention, DecoderLayer, apply_rope, rope_tables
from trace_rt.model.trace import TraceModel

_MIN = torch.finfo(torch.float32).min


def decode_with_past(
    model: TraceModel,
    inputs_embeds: Tensor,
    position_ids: Tensor,
    past: list[Tensor] | tuple[Tensor, ...] | None,
    valid: Tensor | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """Run T new positions of B sequences over their past; return logits and new K/V.

    Args:
        model: the loaded model (its layers, norm and heads are used).
        inputs_embeds: ``[B, T, H]``, each row's next T embeddings.
        position_ids: int64 ``[B, T]``, each row's absolute positions (contiguous).
        past: per layer K then V ``[P, B, kv, hd]`` (position-major), or None for no past.
        valid: bool ``[B, P]`` of past slots to attend; default ``j < position_ids[b, 0]``.

    Returns:
        (logits ``[B, V]`` f32 of each row's last position, every head side by side in
        the unified id order; new K/V per layer, K then V, ``[T, B, kv, hd]``).
    """
    x, cos, sin, causal, past_bias = decode_setup(
        model.config, inputs_embeds, position_ids, past[0] if past is not None else None, valid
    )
    new_kv: list[Tensor] = []
    for i, layer in enumerate(model.model.layers):
        pk, pv = (past[2 * i], past[2 * i + 1]) if past is not None else (None, None)
        x, k, v = layer_step(layer, x, cos, sin, causal, pk, pv, past_bias)
        new_kv += [k, v]
    return decode_logits(model, x), new_kv  # [B, V] f32


def decode_setup(
    cfg: TraceConfig,
    inputs_embeds: Tensor,
    position_ids: Tensor,
    past_k0: Tensor | None,
    valid: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """What every layer of a step shares: (x [T, B, H], cos, sin [T, B, hd], causal
    [T, T], past [B, P] or None), the two masks as additive f32 biases (0 where attended,
    the float32 minimum where not). *past_k0* (any layer's past K) only gives P.

    The masks are biases, made once here, because a masked fill in each layer exports as
    a ``Where`` over the whole score matrix, which onnxruntime broadcasts ~8x slower than
    an ``Add`` (1.86 vs 0.15-0.24 ms a layer; 22-25 ms of a ~330 ms 385-position prefill
    of ``small``). The scores are unchanged bit for bit: ``s + 0 == s`` and ``s + min``
    rounds to ``min`` for any score far below 1e31, which is what the fill wrote. Unlike a
    fill, a bias does not hide a NaN or inf in a masked-out cache slot; the pools were
    already zeroed because such a slot's V meets a zero probability (0 * inf is NaN).

    Split from :func:`decode_with_past` so a layer-streamed export (``export/stream.py``)
    traces the same math one piece at a time.
    """
    b, t, _ = inputs_embeds.shape
    pos_pm = position_ids.transpose(0, 1)  # [T, B]
    cos, sin = rope_tables(cfg.attn_head_dim, pos_pm.reshape(-1), cfg.rope_theta)
    cos, sin = cos.view(t, b, -1), sin.view(t, b, -1)  # [T, B, hd] each
    idx = torch.arange(t, device=inputs_embeds.device)
    causal = idx[:, None] >= idx[None, :]  # [T, T]: new query t sees new key j <= t
    if past_k0 is not None and valid is None:
        slots = torch.arange(past_k0.shape[0], device=inputs_embeds.device)
        valid = slots[None, :] < position_ids[:, :1]  # [B, P]
    x = inputs_embeds.transpose(0, 1)  # [T, B, H]: position-major all the way through
    return x, cos, sin, _bias(causal), None if valid is None else _bias(valid)


def _bias(attend: Tensor) -> Tensor:
    """bool mask -> additive f32 bias: 0 where attended, the float32 minimum where not."""
    return torch.zeros(attend.shape, dtype=torch.float32, device=attend.device).masked_fill(
        ~attend, _MIN
    )


def layer_step(
    layer: DecoderLayer,
    x: Tensor,
    cos: Tensor,
    sin: Tensor,
    causal: Tensor,
    past_k: Tensor | None,
    past_v: Tensor | None,
    past_bias: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One decoder layer of a step: (x out [T, B, H], new K, new V [T, B, kv, hd])."""
    a, k, v = decoder_attention(layer, x, cos, sin, causal, past_k, past_v, past_bias)
    x = x + a
    return x + layer.mlp(layer.post_attention_layernorm(x)), k, v


def decode_logits(model: TraceModel, x: Tensor) -> Tensor:
    """Final norm and every head on each row's last position: x [T, B, H] -> [B, V] f32."""
    return model.all_logits(model.model.norm(x[-1]))  # only the last position is read


def decoder_attention(
    layer: DecoderLayer,
    x: Tensor,
    cos: Tensor,
    sin: Tensor,
    causal: Tensor,
    past_k: Tensor | None,
    past_v: Tensor | None,
    past_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One layer's attention, position-major; returns (out [T, B, H], k, v [T, B, kv, hd]).

    Args:
        x: the layer's input ``[T, B, H]``.
        cos, sin: RoPE tables ``[T, B, hd]``.
        causal: f32 bias ``[T, T]`` among the new positions (:func:`decode_setup`).
        past_k, past_v: ``[P, B, kv, hd]`` or None (attend to the new keys only).
        past_bias: f32 bias ``[B, P]`` over the past slots each row attends (None: all).

    GQA without repeating K/V: q is grouped as [B, kv, T*rep, hd] (query head g*rep + r
    reads KV head g, as ``enable_gqa``), so each KV head is read once per step.
    """
    attn: Attention = layer.self_attn
    h = layer.input_layernorm(x)
    t, b, _ = h.shape
    hd, nh, nkv = attn.head_dim, attn.n_heads, attn.n_kv
    rep = nh // nkv
    q = attn.q_proj(h).view(t, b, nkv, rep, hd)
    k = attn.k_proj(h).view(t, b, nkv, hd)  # position-major straight out of the projection
    v = attn.v_proj(h).view(t, b, nkv, hd)
    q = apply_rope(q, cos[:, :, None, None], sin[:, :, None, None])
    k = apply_rope(k, cos[:, :, None], sin[:, :, None])
    qg = q.permute(1, 2, 0, 3, 4).reshape(b, nkv, t * rep, hd)  # [B, kv, T*rep, hd]: small
    scale = hd**-0.5
    # [T, B, kv, hd] -> [B, kv, hd, T]: the view onnxruntime folds into its MatMul.
    s_new = (qg @ k.permute(1, 2, 3, 0)).float() * scale  # [B, kv, T*rep, T]
    s_new = (s_new.view(b, nkv, t, rep, t) + causal[:, None, :]).view(b, nkv, t * rep, t)
    v_new = v.permute(1, 2, 0, 3)  # [B, kv, T, hd]
    if past_k is None or past_v is None:
        y = s_new.softmax(-1).to(q.dtype) @ v_new  # [B, kv, T*rep, hd]
    else:
        s_past = (qg @ past_k.permute(1, 2, 3, 0)).float() * scale  # [B, kv, T*rep, P]
        if past_bias is not None:
            s_past = s_past + past_bias[:, None, None, :]
        # One softmax over the joined score rows ([B, kv, T*rep, P+T]: small at decode, and
        # at prefill P = 0 so it is the ordinary attention matrix).
        probs = torch.cat([s_past, s_new], dim=-1).softmax(-1).to(q.dtype)
        n_past = past_k.shape[0]
        y = probs[..., :n_past] @ past_v.permute(1, 2, 0, 3)  # [B, kv, T*rep, hd]
        y = y + probs[..., n_past:] @ v_new
    y = y.view(b, nkv, t, rep, hd).permute(2, 0, 1, 3, 4).reshape(t, b, nh * hd)
    return attn.o_proj(y), k, v  # [T, B, H], new K/V [T, B, kv, hd]
