"""Export wrappers: nn.Modules whose forward is exactly one graph's I/O spec.

The model files stay plain modules; what the graphs need beyond them (explicit past/present
K/V instead of the model's in-place cache, the last position only, all heads' logits) lives
here. Each wrapper holds the loaded :class:`TraceModel` and reuses its weights and stage
methods, so a graph is the PyTorch stage it is tested against.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from trace_rt.graphs import DECODER, PROJECTOR, VISION_ENCODER, GraphSpec
from trace_rt.model.mistral import Attention, DecoderLayer, apply_rope, rope_tables
from trace_rt.model.trace import TraceModel


class VisionEncoderGraph(nn.Module):
    """pixel_values [F, 3, H, W] f32 -> features [F, P, D].

    bf16: ONNX's Conv takes bfloat16 only from opset 22 (the TorchScript exporter stops at
    20), so a bf16 model's patch-embedding convolutions run in f32 here (bf16 weights widen
    exactly; the output is rounded back to bf16): a Cast either side of one small Conv.
    """

    def __init__(self, model: TraceModel):
        super().__init__()
        self.model = model
        for parent in model.modules():
            for name, child in parent.named_children():
                if isinstance(child, nn.Conv2d) and child.weight.dtype == torch.bfloat16:
                    setattr(parent, name, _Fp32Conv(child))

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.model.encode_frames(pixel_values)  # [F, P, D]


class _Fp32Conv(nn.Module):
    """A bf16 Conv2d computed in f32 (see :class:`VisionEncoderGraph`)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv.float()  # the model is loaded for this export only

    @property
    def weight(self) -> Tensor:
        # The CLIP embeddings read the conv's dtype to cast the pixels (to bf16, kept).
        return torch.empty(0, dtype=torch.bfloat16)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x.float()).to(torch.bfloat16)


class ProjectorGraph(nn.Module):
    """features [F, P, D] + time_ids [F, 6] -> video_embeds [F*(S+6), H]."""

    def __init__(self, model: TraceModel):
        super().__init__()
        self.model = model

    def forward(self, features: Tensor, time_ids: Tensor) -> Tensor:
        return self.model.project(features, time_ids)  # [F*(S+6), H]


class DecoderGraph(nn.Module):
    """inputs_embeds [1, T, H] + position_ids [1, T] + past K/V -> logits [1, V] + new K/V.

    The same layer weights as :func:`trace_rt.model.mistral.run_decoder`, with the cache
    explicit and seq-major (why: trace_rt/graphs.py): ``past_key.{i}`` / ``past_value.{i}``
    [1, P, kv, hd] are the filled prefix of the backend's buffers; the graph returns only
    the T new positions' (post-RoPE) ``key.{i}`` / ``value.{i}`` [1, T, kv, hd], which the
    backend writes straight into the buffers at offset P. Past and new K/V are never
    concatenated: attention scores are taken against each separately and only the (small)
    score rows are joined for one softmax.

    The new tokens sit at positions P..P+T-1 (``position_ids`` only feeds RoPE), so the
    mask is "every past key, and new key j <= new query t": the model's own
    ``key_pos <= position`` rule for contiguous positions.
    """

    def __init__(self, model: TraceModel):
        super().__init__()
        self.model = model
        self.cfg = model.config

    def forward(self, inputs_embeds: Tensor, position_ids: Tensor, *past: Tensor):
        cfg = self.cfg
        pos = position_ids[0]  # [T]
        cos, sin = rope_tables(cfg.attn_head_dim, pos, cfg.rope_theta)  # [T, hd] each
        t = inputs_embeds.shape[1]
        idx = torch.arange(t, device=inputs_embeds.device)
        causal = idx[:, None] >= idx[None, :]  # [T, T]: new query t sees new key j <= t
        x = inputs_embeds  # [1, T, H]
        new_kv: list[Tensor] = []
        for i, layer in enumerate(self.model.model.layers):
            a, k, v = decoder_attention(layer, x, cos, sin, causal, past[2 * i], past[2 * i + 1])
            new_kv += [k, v]
            x = x + a
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        hidden = self.model.model.norm(x)[:, -1]  # [1, H]: only the last position is read
        return (self.model.all_logits(hidden), *new_kv)  # [1, V] f32, then K/V pairs


_MIN = torch.finfo(torch.float32).min


def decoder_attention(
    layer: DecoderLayer,
    x: Tensor,
    cos: Tensor,
    sin: Tensor,
    causal: Tensor,
    past_k: Tensor | None,
    past_v: Tensor | None,
    valid: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One layer's attention over past [1, P, kv, hd] and new keys; returns (out, k, v).

    GQA without repeating K/V: q is grouped as [kv, T*rep, hd] (query head g*rep + r
    reads KV head g, as ``enable_gqa``), so each KV head is read once per step. No past
    (None) attends to the new keys only; *valid* [P] masks past slots that hold nothing
    yet (the fixed-capacity past of the static Ascend variants).
    """
    attn: Attention = layer.self_attn
    h = layer.input_layernorm(x)
    _, t, _ = h.shape
    hd, nh, nkv = attn.head_dim, attn.n_heads, attn.n_kv
    rep = nh // nkv
    # Seq-major straight out of the projections: no transpose for the new K/V outputs.
    q = attn.q_proj(h).view(t, nkv, rep, hd)  # [T, kv, rep, hd]
    k = attn.k_proj(h).view(1, t, nkv, hd)  # [1, T, kv, hd]
    v = attn.v_proj(h).view(1, t, nkv, hd)
    q = apply_rope(q, cos[:, None, None], sin[:, None, None])
    k = apply_rope(k, cos[:, None], sin[:, None])
    qg = q.permute(1, 0, 2, 3).reshape(nkv, t * rep, hd)  # [kv, T*rep, hd]: small
    scale = hd**-0.5
    nk, nv = k.squeeze(0), v.squeeze(0)  # [T, kv, hd]
    # Scores against the past and the new keys separately (no K concatenation), in f32.
    s_new = (qg @ nk.permute(1, 2, 0)).float() * scale  # [kv, T*rep, T]
    s_new = s_new.view(nkv, t, rep, t).masked_fill(~causal[:, None, :], _MIN)
    s_new = s_new.view(nkv, t * rep, t)
    if past_k is None or past_v is None:
        y = s_new.softmax(-1).to(q.dtype) @ nv.permute(1, 0, 2)  # [kv, T*rep, hd]
    else:
        # Squeeze, not [0]: Gather would copy the whole past; Squeeze aliases it in
        # onnxruntime, whose MatMul transpose fusion then reads the [P, kv, hd] prefix in
        # place.
        pk, pv = past_k.squeeze(0), past_v.squeeze(0)  # [P, kv, hd]
        s_past = (qg @ pk.permute(1, 2, 0)).float() * scale  # [kv, T*rep, P]
        if valid is not None:
            s_past = s_past.masked_fill(~valid, _MIN)
        # One softmax over the joined score rows ([kv, T*rep, P+T]: small at decode, and
        # at prefill P = 0 so it is the ordinary attention matrix).
        probs = torch.cat([s_past, s_new], dim=-1).softmax(-1).to(q.dtype)
        n_past = pk.shape[0]
        y = probs[..., :n_past] @ pv.permute(1, 0, 2)  # [kv, T*rep, hd]
        y = y + probs[..., n_past:] @ nv.permute(1, 0, 2)
    y = y.view(nkv, t, rep, hd).permute(1, 0, 2, 3).reshape(1, t, nh * hd)  # [1, T, h*hd]
    return attn.o_proj(y), k, v  # [1, T, H], new K/V [1, T, kv, hd]


WRAPPERS: dict[str, type[nn.Module]] = {
    VISION_ENCODER: VisionEncoderGraph,
    PROJECTOR: ProjectorGraph,
    DECODER: DecoderGraph,
}

# Example sizes for tracing: every symbolic dim gets a distinct value > 1, so that no
# dynamic size is mistaken for a constant (1) or confused with another dim.
_EXAMPLE_DIMS = {"frames": 2, "seq": 3, "past": 5}


def example_inputs(spec: GraphSpec, model: TraceModel) -> tuple[Tensor, ...]:
    """Deterministic example inputs matching *spec* (for torch.onnx.export's tracing)."""
    g = torch.Generator().manual_seed(0)
    cfg = model.config
    out: list[Tensor] = []
    for t in spec.inputs:
        shape = [_EXAMPLE_DIMS[d] if isinstance(d, str) else d for d in t.shape]
        if t.name == "time_ids":
            out.append(torch.randint(0, cfg.time_vocab_size, shape, generator=g))
        elif t.name == "position_ids":
            past = _EXAMPLE_DIMS["past"]
            out.append(torch.arange(past, past + shape[1])[None])  # [1, T]
        else:
            dt = getattr(torch, t.dtype)
            out.append(torch.randn(shape, generator=g).to(dt))
    return tuple(out)
