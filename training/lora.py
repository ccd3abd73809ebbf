"""LoRA for fine-tuning on one GPU: low-rank adapters on the LLM's linear layers.

Our own small implementation rather than ``peft`` (not installed here, and it wraps
Hugging Face models, not ours). Each targeted ``nn.Linear`` ``W`` of the decoder layers
becomes :class:`LoraLinear`: ``y = x W^T + (alpha / r) * dropout(x) A^T B^T`` with
``A`` [r, in] (Kaiming-uniform) and ``B`` [out, r] (zeros), so training starts from the
unchanged model. ``W`` keeps its name (``...q_proj.weight``) and stays frozen; only
``lora_A``/``lora_B`` learn (plus the recipe's other trainable groups, e.g. the towers).

The release's defaults (``train_mt.py``): r 64, alpha 16, dropout 0.05, every linear
layer of the LLM (not ``lm_head``, not the vision/projector/tower parts).

Saving: :func:`merge` folds ``(alpha / r) B A`` into ``W`` and restores plain
``nn.Linear`` modules, so the model saves in the release format and runs everywhere;
:func:`adapter_state` is the adapters alone (``adapter_model.safetensors``), which
:func:`load_adapters` puts back on an injected model (resume, or a kept-apart adapter).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_FILE = "adapter_model.safetensors"


@dataclass(frozen=True)
class LoraConfig:
    r: int = 64
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = DEFAULT_TARGETS
    merge: bool = True

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> LoraConfig:
        known = {f.name for f in fields(cls)}
        if not isinstance(raw, dict) or set(raw) - known:
            raise ValueError(f"lora: a mapping of {sorted(known)}, got {raw!r}")
        kw = dict(raw)
        if "targets" in kw:
            kw["targets"] = tuple(kw["targets"])
        cfg = cls(**kw)
        if cfg.r < 1 or cfg.alpha <= 0 or not 0 <= cfg.dropout < 1:
            raise ValueError(f"lora: r >= 1, alpha > 0 and 0 <= dropout < 1, got {raw!r}")
        bad = set(cfg.targets) - set(DEFAULT_TARGETS)
        if bad or not cfg.targets:
            raise ValueError(f"lora: targets must be among {DEFAULT_TARGETS}, got {cfg.targets}")
        return cfg

    @property
    def scale(self) -> float:
        return self.alpha / self.r


class LoraLinear(nn.Linear):
    """An ``nn.Linear`` (same ``weight``) plus a scaled low-rank update."""

    def __init__(self, base: nn.Linear, cfg: LoraConfig):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None,
                         device="meta")  # fmt: skip
        self.weight = base.weight
        self.bias = base.bias
        self.scale = cfg.scale
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(cfg.r, base.in_features, device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, cfg.r, device=dev, dtype=dt))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) + (self.drop(x) @ self.lora_A.T @ self.lora_B.T) * self.scale

    def merged(self) -> nn.Linear:
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device="meta")  # fmt: skip
        w = self.weight.detach() + self.scale * (self.lora_B @ self.lora_A).detach()
        out.weight = nn.Parameter(w.to(self.weight.dtype), requires_grad=False)
        out.bias = self.bias
        return out


def _targets(model: nn.Module, cfg: LoraConfig):
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in cfg.targets:
                if hasattr(parent, name):
                    yield parent, name


def inject(model: nn.Module, cfg: LoraConfig) -> int:
    """Wrap the targeted linears of every decoder layer; returns adapter parameters."""
    n = 0
    for parent, name in _targets(model, cfg):
        lin = getattr(parent, name)
        if isinstance(lin, LoraLinear):
            raise ValueError("LoRA adapters are already injected")
        wrapped = LoraLinear(lin, cfg)
        setattr(parent, name, wrapped)
        n += wrapped.lora_A.numel() + wrapped.lora_B.numel()
    return n


def is_adapter(name: str) -> bool:
    return ".lora_A" in name or ".lora_B" in name


def adapter_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if is_adapter(k)}


def load_adapters(model: nn.Module, tensors: dict[str, Tensor]) -> None:
    own = {k for k in model.state_dict() if is_adapter(k)}
    if set(tensors) != own:
        raise ValueError(
            f"adapter file does not match the model ({len(tensors)} tensors, {len(own)} slots)"
        )
    model.load_state_dict(tensors, strict=False)


def merge(model: nn.Module) -> None:
    """Fold every adapter into its weight and restore plain ``nn.Linear`` modules."""
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, LoraLinear):
                    setattr(parent, name, child.merged())


def base_state(model: nn.Module) -> dict[str, Tensor]:
    """The release-format state (adapters left out, weights unmerged)."""
    return {k: v for k, v in model.state_dict().items() if not is_adapter(k)}
