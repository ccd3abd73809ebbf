"""CLIP ViT vision tower, laid out like ``transformers.CLIPVisionModel``.

Module names mirror HF's so that the state dict carries the released weight names
(``vision_model.encoder.layers.{i}.self_attn.q_proj.weight`` ...). Only the layers up to
``mm_vision_select_layer`` run; the rest are kept so checkpoints round-trip unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trace_rt.config import VisionConfig


def quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


_ACTS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(
            cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size, bias=False
        )
        self.position_embedding = nn.Embedding(cfg.num_patches + 1, cfg.hidden_size)

    def forward(self, pixel_values: Tensor) -> Tensor:
        # pixel_values: [F, 3, H, W]
        dtype = self.patch_embedding.weight.dtype
        x = self.patch_embedding(pixel_values.to(dtype))  # [F, D, grid, grid]
        x = x.flatten(2).transpose(1, 2)  # [F, P, D]
        cls = self.class_embedding.expand(x.shape[0], 1, -1)  # [F, 1, D]
        x = torch.cat([cls, x], dim=1)  # [F, P+1, D]
        return x + self.position_embedding.weight  # [F, P+1, D]


class CLIPAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.q_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape  # [F, P+1, D]

        def heads(y: Tensor) -> Tensor:
            return y.view(n, t, self.num_heads, -1).transpose(1, 2)  # [F, h, P+1, hd]

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        y = F.scaled_dot_product_attention(q, k, v)  # [F, h, P+1, hd]
        return self.out_proj(y.transpose(1, 2).reshape(n, t, d))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        if cfg.hidden_act not in _ACTS:
            raise ValueError(f"unsupported CLIP hidden_act {cfg.hidden_act!r}")
        self.act = _ACTS[cfg.hidden_act]
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class CLIPVisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic (HF)
        self.encoder = CLIPEncoder(cfg)
        # Unused by TRACE (it reads an inner layer) but part of the released weights.
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def hidden_state(self, pixel_values: Tensor, num_layers: int) -> Tensor:
        """HF's ``hidden_states[num_layers]``: the output after *num_layers* layers."""
        x = self.pre_layrnorm(self.embeddings(pixel_values))  # [F, P+1, D]
        for layer in self.encoder.layers[:num_layers]:
            x = layer(x)
        return x  # [F, P+1, D]


class CLIPVisionModel(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.vision_model = CLIPVisionTransformer(cfg)


class CLIPVisionTower(nn.Module):
    """The release's tower wrapper: selects a layer's patch features, CLS dropped."""

    def __init__(self, cfg: VisionConfig, num_layers: int):
        super().__init__()
        self.vision_tower = CLIPVisionModel(cfg)
        self.num_layers = num_layers

    def forward(self, pixel_values: Tensor) -> Tensor:
        # pixel_values: [F, 3, H, W] -> patch features [F, P, D]
        return self.vision_tower.vision_model.hidden_state(pixel_values, self.num_layers)[:, 1:]
