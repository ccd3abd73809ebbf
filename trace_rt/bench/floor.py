"""The physical floor: the least time each stage could take on this device.

From the model config alone: FLOPs and bytes that a stage must move, against the device's
peak FLOP rate and memory bandwidth (a roofline: ``max(FLOPs / peak, bytes / bandwidth)``).
Vision and prefill are compute-bound, a decode step is bandwidth-bound (every weight is read
once per token, plus the KV cache so far). The peaks are the fastest of several kernels
(:mod:`trace_rt.bench.peaks`) or given with ``--peak-gbps/--peak-tflops``. Measured peaks
are what this machine achieves, not its data sheet, so the floor is one a real program
could touch; the report checks that no measurement beats it
(:func:`trace_rt.bench.summary.floor_check`).

Counting conventions (documented in benchmarks/README.md):

- a multiply-add is 2 FLOPs; norms, activations, softmax and RoPE are not counted;
- attention is counted (QK^T and AV); prefill attention is causal (half the square);
- decode reads every decoder weight (all layers, the final norm and all four heads: the
  exported decoder computes every head, as the release does) plus K and V of every
  position already in the cache; embedding tables are not counted (one row per token);
- vision runs the CLIP layers up to the selected one (``vision_layers_used``);
- a quantised decoder's (int4/int8) linear layers compute in int8 (MatMulNBits at
  accuracy level 4, MatMulInteger, llama.cpp's quantised dot products), so the prefill's
  linear work counts at the measured int8 peak; attention and the heads stay float.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

from trace_rt.config import TraceConfig


@dataclass(frozen=True)
class Peaks:
    """The device's achievable peaks: memory bandwidth (GB/s = 1e9 B/s), float32 TFLOP/s
    and, where measured, int8 TOP/s (None: given peaks, CUDA, or no onnxruntime; int8 work
    then counts at the float peak, as before the int8 peak existed)."""

    gbps: float
    tflops: float
    source: str  # "measured" or "given"
    details: dict[str, Any] | None = None
    int8_tops: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Cost:
    """Work of one stage: float FLOPs, int8 operations and bytes of memory traffic."""

    flops: float
    bytes: float
    int8_ops: float = 0.0

    def floor_ms(self, peaks: Peaks) -> float:
        """Roofline minimum in ms: the larger of compute time and memory time."""
        compute = self.flops / (peaks.tflops * 1e12)
        compute += self.int8_ops / ((peaks.int8_tops or peaks.tflops) * 1e12)
        return 1e3 * max(compute, self.bytes / (peaks.gbps * 1e9))


# ---- parameter counts ----------------------------------------------------------------
def decoder_layer_params(cfg: TraceConfig) -> int:
    """Weights of one Mistral layer (attention, MLP, two RMSNorms)."""
    h, hd = cfg.hidden_size, cfg.attn_head_dim
    q = cfg.num_attention_heads * hd
    kv = cfg.num_key_value_heads * hd
    return h * q + 2 * h * kv + q * h + 3 * h * cfg.intermediate_size + 2 * h


def head_params(cfg: TraceConfig) -> int:
    """lm_head + the sync, time and score heads (all computed every step)."""
    return cfg.hidden_size * (cfg.vocab_size + 1 + cfg.time_vocab_size + cfg.score_vocab_size)


def decoder_params(cfg: TraceConfig) -> int:
    """Every weight a decode step reads: layers, final norm, heads (no embedding tables)."""
    return cfg.num_hidden_layers * decoder_layer_params(cfg) + cfg.hidden_size + head_params(cfg)


def kv_bytes_per_position(cfg: TraceConfig, itemsize: int) -> int:
    """K and V of one position, all layers (the doc's 128 KiB/token for 7B fp16)."""
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.attn_head_dim * itemsize


def vision_params(cfg: TraceConfig) -> int:
    v = cfg.vision
    d, i, p = v.hidden_size, v.intermediate_size, v.patch_size
    layer = 4 * (d * d + d) + 2 * d * i + i + d + 4 * d  # qkvo, MLP, 2 LayerNorms
    embed = v.num_channels * p * p * d + (v.num_patches + 1) * d + d
    return cfg.vision_layers_used * layer + embed


# ---- per-stage costs -------------------------------------------------------------------
def vision_cost(cfg: TraceConfig, frames: int, itemsize: int) -> Cost:
    v = cfg.vision
    d, i, p = v.hidden_size, v.intermediate_size, v.patch_size
    n_patch = v.num_patches
    t = n_patch + 1  # + CLS
    per_layer = 2 * t * (4 * d * d + 2 * d * i) + 2 * 2 * t * t * d
    patch_embed = 2 * n_patch * v.num_channels * p * p * d
    flops = frames * (cfg.vision_layers_used * per_layer + patch_embed)
    pixels = frames * v.num_channels * v.image_size**2 * 4  # float32 in
    feats = frames * n_patch * d * itemsize  # selected layer out
    return Cost(flops, vision_params(cfg) * itemsize + pixels + feats)


def projector_cost(cfg: TraceConfig, frames: int, itemsize: int) -> Cost:
    d, h, s = cfg.mm_hidden_size, cfg.hidden_size, cfg.mm_num_slots
    n_patch = cfg.vision.num_patches
    flops = frames * (2 * n_patch * d * s * 2 + 2 * s * d * h)  # scores, pooling, readout
    weights = d * s + d * h + 2 * d
    moved = frames * (n_patch * d + cfg.tokens_per_frame * h)  # features in, block out
    return Cost(flops, (weights + moved) * itemsize)


def prefill_cost(
    cfg: TraceConfig, positions: int, itemsize: int, masked: int = 0, int8: bool = False
) -> Cost:
    """*positions* tokens from an empty cache; heads for the last position only. *masked*:
    cache slots every query also scores and reads though masked (a fixed-past graph).
    *int8*: the decoder layers' linear work is int8 (a quantised decoder)."""
    n, layers = positions, cfg.num_hidden_layers
    q = cfg.num_attention_heads * cfg.attn_head_dim
    linear = 2 * n * layers * decoder_layer_params(cfg)
    attention = layers * 2 * 2 * q * n * (n + 1) / 2  # causal: half of QK^T and AV
    attention += layers * 2 * 2 * q * n * masked
    flops = attention + 2 * head_params(cfg) + (0 if int8 else linear)
    kv = kv_bytes_per_position(cfg, itemsize)
    moved = decoder_params(cfg) * itemsize + (n + masked) * kv
    return Cost(flops, moved, linear if int8 else 0.0)


def decode_cost(cfg: TraceConfig, past: int, itemsize: int, weight_bytes: float | None) -> Cost:
    """One token with *past* positions cached; *weight_bytes* overrides params x itemsize
    (a quantised decoder's real size)."""
    q = cfg.num_attention_heads * cfg.attn_head_dim
    flops = 2 * decoder_params(cfg) + cfg.num_hidden_layers * 2 * 2 * q * (past + 1)
    weights = decoder_params(cfg) * itemsize if weight_bytes is None else weight_bytes
    return Cost(flops, weights + (past + 1) * kv_bytes_per_position(cfg, itemsize))


def stage_floors(
    cfg: TraceConfig,
    peaks: Peaks,
    *,
    frames: int,
    prompt_positions: int,
    decode_steps: int,
    itemsize: int = 4,
    weight_bytes: float | None = None,
    fixed_past: int | None = None,
    masked_prefill: bool = False,
    int8: bool = False,
) -> dict[str, Any]:
    """Floor in ms of every stage (None for ``video``: decoding has no model-derived floor).

    Args:
        prompt_positions: prefill length (text ids + the video block).
        decode_steps: decode_step calls; the first runs with ``prompt_positions + 1``
            positions cached (the prefill's, and the first token).
        itemsize: bytes per weight/activation of the backend's compute dtype.
        weight_bytes: bytes of decoder weights if not params x itemsize (quantised).
        fixed_past: cache slots of a fixed-past decode step (TensorRT's one-graph step):
            every step scores and reads all of them, whatever its position.
        masked_prefill: the prefill runs over those slots too (a fixed-past decoder).
        int8: the decoder's linear layers compute in int8 (quantised weights with int8
            activations): the prefill's linear work counts at the int8 peak.
    """
    vision = vision_cost(cfg, frames, itemsize).floor_ms(peaks)
    projector = projector_cost(cfg, frames, itemsize).floor_ms(peaks)
    masked = fixed_past if fixed_past and masked_prefill else 0
    pre = prefill_cost(cfg, prompt_positions, itemsize, masked, int8)
    prefill = pre.floor_ms(peaks)
    steps = [
        decode_cost(cfg, fixed_past or prompt_positions + i, itemsize, weight_bytes).floor_ms(peaks)
        for i in range(decode_steps)
    ]
    step = sum(steps) / len(steps) if steps else 0.0
    ttft = vision + projector + prefill
    wb = decoder_params(cfg) * itemsize if weight_bytes is None else weight_bytes
    return {
        "video": None,
        "vision": vision,
        "projector": projector,
        "prefill": prefill,
        "ttft": ttft,
        "decode_step": step,
        "decode_step_text": step,  # the floor reads every head every step already
        "end_to_end": ttft + sum(steps),
        "inputs": {
            "decoder_weight_bytes": int(wb),
            "kv_bytes_per_position": kv_bytes_per_position(cfg, itemsize),
            "prompt_positions": prompt_positions,
            "decode_step_min_ms": steps[0] if steps else None,  # the first, cheapest step
            "itemsize": itemsize,
            "vision_gflop": vision_cost(cfg, frames, itemsize).flops / 1e9,
            "prefill_gflop": (pre.flops + pre.int8_ops) / 1e9,
            "prefill_int8": int8,
        },
    }


# ---- measuring the peaks ---------------------------------------------------------------
def cpu_threads() -> int:
    """CPUs this process may run on (the container's share, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1
