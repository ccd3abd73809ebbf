"""``trace-rt plan``: will a model fit a device, with which settings, and how fast at best.

Torch-free arithmetic on the model config alone. Memory, per pipeline instance (``--concurrency
N`` runs N instances, as ``triton_repo build --instances N`` does: each loads its own
backend, so everything but the process's runtime is counted N times):

- **weights per graph**: vision encoder and projector at the float precision (fp16 on GPUs,
  fp32 on the CPU); decoder linear layers at ``--precision``, scales included: on GPUs the
  QDQ forms TensorRT builds from (int8: 1 byte + a per-channel scale; int4: half a byte +
  an fp16 scale per block), on the CPU onnxruntime's MatMulNBits (1 or half a byte + a
  scale per block in the graph's float type, fp32: 12.5% on top of int4's bytes at blocks
  of 32); blocks of ``--block-size`` weights (default: the artifact's, else 32);
  its heads, norms at the float precision (``export quantize`` keeps them), except
  ``lm_head`` when a quantised decoder holds it at ``--lm-head`` (``export quantize
  --lm-head``, ``export optimize``'s int8 default: read from an artifact's variant); the
  embedding table in host memory (the backends embed ids on the host).
- **KV cache**: K and V of every position of the context (prompt + video block + new tokens)
  at the float precision; the backends preallocate it for the whole context.
- **activations + TensorRT workspace**: what an engine's execution context holds for its
  largest profile, estimated as one layer's working set with attention scores materialised
  (fp32 softmax, as exported): an upper bound where TensorRT fuses attention.
- **video buffers**: the decoder's frames in flight at the source resolution (~8 YUV 4:2:0
  frames: references and frame threads) and each sampled frame at model size (uint8 as
  decoded and scaled, float32 as pixel values; :mod:`trace_rt.video.convert`).
- **runtime**: the process (Python, numpy, PyAV, onnxruntime or TensorRT and CUDA libraries)
  and, on a GPU, the CUDA context with TensorRT's and cuBLAS's handles.
- **onnxruntime's prepacking** (CPU): a MatMulNBits weight at accuracy level 4 is held as
  the kernel's packed copy (the quantised data, its block scales and a block sum per
  block for the int8 dot products) while the graph's own scales stay mapped from the
  file: two more fp32 values per block than the file holds (+0.25 B per weight at
  blocks of 32; a quantised ``lm_head`` too). Measured at trace-7b
  (benchmarks/results/trace7b-*.md, "Session loading": RssAnon/RssFile of a session)
  within 0.2% for int4 and int8. Loading also holds an fp32 ``lm_head`` twice while
  packing it, before any activation exists: a transient smaller than the activations, so
  not counted.

On a Jetson (unified memory) all of it counts against the memory the OS leaves; on a
discrete GPU the device part counts against the GPU's memory (host memory is reported);
on ``cpu`` everything is host memory. A plan fits when it leaves :data:`MARGIN` of the
usable memory free (allocator slack, fragmentation, page cache of the engine files).

Latency floors per stage come from :mod:`trace_rt.bench.floor` (the same roofline the
benchmarks report) with the device's data-sheet bandwidth and FLOP rate.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from trace_rt.bench.floor import (
    Peaks,
    decoder_layer_params,
    head_params,
    kv_bytes_per_position,
    projector_cost,
    stage_floors,
    vision_params,
)
from trace_rt.config import TraceConfig
from trace_rt.devices import Device
from trace_rt.errors import InputError
from trace_rt.prompts import PROMPT_TEXT_TOKENS
from trace_rt.variants import BLOCK_SIZES, DEFAULT_BLOCK_SIZE

PRECISIONS = ("fp32", "fp16", "int8", "int4")
LM_HEAD_PRECISIONS = ("int8", "int4")  # a quantised decoder's lm_head (None: float)
_ENGINE_ITEMS = {"decoder_step": "decoder step"}  # engine name -> plan item
_ENGINE_ORDER = ["vision_encoder", "projector", "decoder", "decoder_step"]
MARGIN = 0.10  # of usable memory kept free
PREPACK_EXTRA_PER_BLOCK = 2 * 4  # MatMulNBits at accuracy level 4: block sum + scale copy
# Process baselines, measured on x86-64 (Debian 12, Python 3.11, onnxruntime 1.2x,
# 2026-11-30) with `tiny`, whose weights are negligible: RSS after importing trace_rt.pipeline
# with numpy, PyAV, sentencepiece and onnxruntime (75 MB); each onnxruntime CPU session's
# own overhead (loaded RSS - imports - weights - embeddings, over 3 sessions: ~5.5 MB); and
# what one request adds beyond its tensors (FFmpeg's decoder state and frame pool, the
# tokenizer, malloc arenas: ~16 MB). `small` (500x the weights) checks the rest of the sums.
# The import baseline moves with the install (75 MB in one venv, ~97 MB in a fresh one of
# the same packages), so the `cpu` device measures it (devices.runtime_baseline_bytes);
# other devices use this figure.
HOST_RUNTIME_BYTES = 75e6
ORT_SESSION_BYTES = 5.5e6
REQUEST_STATE_BYTES = 16e6
# GPU side: the CUDA context with lazy module loading (CUDA_MODULE_LOADING=LAZY, CUDA 12's
# default) plus TensorRT's and cuBLAS(Lt)'s handles and kernels; host side: the mapped CUDA,
# TensorRT and cuBLAS libraries. NVIDIA does not publish these; they are the usual figures
# reported for TensorRT 10 processes (several hundred MB) and are flagged as estimates.
GPU_RUNTIME_BYTES = 600e6
GPU_HOST_RUNTIME_BYTES = 400e6
SOURCE_SIZE = (720, 1280)  # height, width of the decoded video (720p)


@dataclass(frozen=True)
class Built:
    """TensorRT engines ``python -m export trt`` built into an artifact directory.

    The backend allocates for the engines, not for the request: a KV pool of ``max_seq``
    positions and each engine's activation memory for its largest profile (``max_frames``
    frames, ``max_seq`` positions), and it loads the engine files' weights.

    Attributes:
        max_frames, max_seq: the build's limits (``manifest["tensorrt"]["limits"]``).
        precision: the build's decoder precision, as the plan names it.
        itemsize: bytes of the engines' float tensors (the export's dtype).
        engine_bytes: engine file size per graph (``decoder_step`` too, if built).
    """

    max_frames: int
    max_seq: int
    precision: str
    itemsize: int
    engine_bytes: dict[str, int]
    fixed_past: bool = False


def manifest_records(model_dir: str | Path) -> dict[str, Any]:
    """*model_dir*'s manifest as recorded ({} for a checkpoint, or none readable): what the
    plan reads of an artifact, with no check of its files (loading hashes them)."""
    try:
        manifest = json.loads((Path(model_dir) / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def built_engines(model_dir: str | Path) -> Built | None:
    """The TensorRT build recorded in *model_dir*'s manifest; None without one."""
    manifest = manifest_records(model_dir)
    section = manifest.get("tensorrt")
    if not section:
        return None
    limits = section["limits"]
    # bf16 weighs what fp16 does, fp8 (weight-only) what int8 does.
    precision = {"bf16": "fp16", "fp8": "int8"}.get(section["precision"], section["precision"])
    return Built(
        max_frames=int(limits["max_frames"]),
        max_seq=int(limits["max_seq"]),
        precision=precision,
        itemsize=4 if manifest["export"]["dtype"] == "fp32" else 2,
        engine_bytes={g: int(rec["bytes"]) for g, rec in section["engines"].items()},
        fixed_past="fixed" in section["engines"].get("decoder", {}),
    )


@dataclass(frozen=True)
class Settings:
    """What a request needs: precision, frames, new tokens, instances, video size."""

    precision: str = "int4"
    frames: int = 128
    max_new_tokens: int = 512
    concurrency: int = 1
    source_size: tuple[int, int] = SOURCE_SIZE
    decode_step: bool = False  # the fixed-shape decode step engine (TensorRT, export step)
    fixed_past: bool = False  # the decoder engine is the step graph (export trt --fixed-past)
    built: Built | None = None  # engines already built: plan what the backend allocates
    lm_head: str | None = None  # a quantised decoder's lm_head: int8, int4 (None: float)
    block_size: int = DEFAULT_BLOCK_SIZE  # weights per quantisation block (int4, int8)

    def check(self, device: Device) -> None:
        if self.precision not in PRECISIONS:
            raise InputError(f"unknown precision {self.precision!r}; use one of {PRECISIONS}")
        if self.precision == "fp32" and device.gpu and self.built is None:
            raise InputError("fp32 is the CPU backend's precision; on a GPU use fp16/int8/int4")
        if self.precision == "fp16" and not device.gpu:
            raise InputError("the CPU backend runs fp32, int8 or int4 decoders, not fp16")
        if (self.decode_step or self.fixed_past) and not device.gpu:
            raise InputError("the decode step engine is TensorRT's (a GPU); not on cpu")
        if self.decode_step and self.fixed_past:
            raise InputError("a fixed-past decoder is its own decode step: not both")
        if self.lm_head is not None:
            if self.lm_head not in LM_HEAD_PRECISIONS:
                raise InputError(
                    f"unknown lm_head precision {self.lm_head!r}; use one of "
                    f"{LM_HEAD_PRECISIONS} (or leave it float)"
                )
            if self.precision not in LM_HEAD_PRECISIONS:
                raise InputError(
                    f"a quantised lm_head belongs to an int8 or int4 decoder, not {self.precision}"
                )
        if self.block_size not in BLOCK_SIZES:
            raise InputError(f"block size must be one of {BLOCK_SIZES}, got {self.block_size}")
        for name in ("frames", "max_new_tokens", "concurrency"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be at least 1")


def float_itemsize(device: Device) -> int:
    """Bytes of the float tensors: fp16 on GPUs, fp32 on the CPU (onnxruntime's CPU EP)."""
    return 2 if device.gpu else 4


def linear_bytes_per_weight(
    precision: str, gpu: bool = False, block: int = DEFAULT_BLOCK_SIZE
) -> float:
    """Bytes per decoder linear weight, scales included: a scale per *block* weights in
    the float type (MatMulNBits on the CPU: fp32; TensorRT's int4 QDQ on a GPU: fp16);
    TensorRT's int8 has one scale per output channel (negligible)."""
    scale = (2 if gpu else 4) / block
    return {
        "fp32": 4.0,
        "fp16": 2.0,
        "int8": 1.0 if gpu else 1.0 + scale,
        "int4": 0.5 + scale,
    }[precision]


def linear_params(cfg: TraceConfig) -> int:
    """Weights of the decoder layers' linear projections (what quantisation touches): the
    layers' parameters less their two RMSNorm weights each."""
    layer = decoder_layer_params(cfg) - 2 * cfg.hidden_size
    return cfg.num_hidden_layers * layer


def context_positions(cfg: TraceConfig, s: Settings) -> tuple[int, int]:
    """(prompt positions, whole context) for *s*: the video block, text, new tokens."""
    prompt = s.frames * cfg.tokens_per_frame + PROMPT_TEXT_TOKENS
    return prompt, prompt + s.max_new_tokens


def kv_positions(cfg: TraceConfig, device: Device, prompt: int, context: int) -> int:
    """Positions the backend's KV cache holds: TensorRT engines built with ``--max-seq``
    = the context; onnxruntime reserves prompt + 1024 and doubles when full."""
    if device.gpu:
        return context
    from trace_rt.backends.onnxruntime_backend import PREFILL_HEADROOM

    limit = cfg.max_position_embeddings
    capacity = min(prompt + PREFILL_HEADROOM, limit)
    while capacity < min(context, limit):
        capacity = min(2 * capacity, limit)
    return capacity


def lm_head_params(cfg: TraceConfig) -> int:
    return cfg.hidden_size * cfg.vocab_size


def weights(cfg: TraceConfig, device: Device, s: Settings) -> dict[str, float]:
    """Bytes of each graph's weights, and the host embedding table."""
    it = float_itemsize(device)
    norms = 2 * cfg.hidden_size * cfg.num_hidden_layers  # RMSNorm weights stay float
    decoder = linear_params(cfg) * linear_bytes_per_weight(s.precision, device.gpu, s.block_size)
    floats = norms + cfg.hidden_size + head_params(cfg)
    if s.lm_head is not None:
        floats -= lm_head_params(cfg)
        head = linear_bytes_per_weight(s.lm_head, device.gpu, s.block_size)
        decoder += lm_head_params(cfg) * head
    decoder += floats * it
    out = {
        "vision_encoder": vision_params(cfg) * it,
        "projector": projector_cost(cfg, 0, it).bytes,  # frames=0: the weights alone
        "decoder": decoder,
    }
    if s.decode_step:
        # An engine of its own, quantised like the decoder: TensorRT engines do not share
        # weights, so the one-graph decode step holds a second copy of the decoder's.
        out["decoder step"] = decoder
    out["embeddings (host)"] = cfg.ids.size * cfg.hidden_size * it
    return out


def activations(
    cfg: TraceConfig,
    device: Device,
    frames: int,
    positions: int,
    itemsize: int | None = None,
    fixed_past: bool = False,
) -> dict[str, float]:
    """Largest working set of each engine (one layer at a time, scores materialised); a
    fixed-past decoder's prefill also scores every query against the whole masked cache."""
    it = itemsize or float_itemsize(device)
    v = cfg.vision
    t = v.num_patches + 1
    vision = frames * (t * (5 * v.hidden_size + v.intermediate_size) * it)
    vision += frames * v.num_attention_heads * t * t * (it + 4)  # scores + fp32 softmax
    p, d, slots = v.num_patches, cfg.mm_hidden_size, cfg.mm_num_slots
    projector = frames * (
        2 * p * slots * 4 + p * d * it + cfg.tokens_per_frame * cfg.hidden_size * it
    )
    h, kv = cfg.hidden_size, cfg.num_key_value_heads * cfg.attn_head_dim
    n = positions
    decoder = n * (4 * h + 2 * kv + 3 * cfg.intermediate_size) * it
    keys = 2 * n - 1 if fixed_past else n
    decoder += cfg.num_attention_heads * n * keys * 8  # fp32 scores and softmax
    decoder += cfg.ids.size * 4  # every head's logits, fp32
    return {"vision_encoder": vision, "projector": projector, "decoder": decoder}


def step_activations(
    cfg: TraceConfig, device: Device, positions: int, itemsize: int | None = None
) -> float:
    """The decode step engine's working set: one query over the whole (masked) cache."""
    it = itemsize or float_itemsize(device)
    h, kv = cfg.hidden_size, cfg.num_key_value_heads * cfg.attn_head_dim
    row = (4 * h + 2 * kv + 3 * cfg.intermediate_size) * it
    return row + cfg.num_attention_heads * positions * 8 + cfg.ids.size * 4


def prepacked_bytes(
    cfg: TraceConfig, precision: str, lm_head: str | None = None, block: int = DEFAULT_BLOCK_SIZE
) -> float:
    """What an onnxruntime CPU session holds beyond its decoder file's bytes (module
    docstring): MatMulNBits' packed block scales and block sums; none for fp32."""
    if precision not in ("int4", "int8"):
        return 0.0
    packed = linear_params(cfg) + (lm_head_params(cfg) if lm_head is not None else 0)
    return packed / block * PREPACK_EXTRA_PER_BLOCK


def video_buffers(cfg: TraceConfig, s: Settings) -> float:
    """The video stage: the decoder's frames in flight at the source size (references and
    frame threads, ~8 YUV 4:2:0 frames), then each sampled frame at model size (uint8 as
    decoded, float32 as pixel values; frames go to model size as they are decoded)."""
    h, w = s.source_size
    decoder = 8 * h * w * 1.5
    return decoder + s.frames * 3 * cfg.vision.image_size**2 * (1 + 4)


def memory(cfg: TraceConfig, device: Device, s: Settings) -> dict[str, Any]:
    """The memory plan of *s* on *device*: items in bytes, totals, fits, margin."""
    s.check(device)
    prompt, context = context_positions(cfg, s)
    it = float_itemsize(device)
    w = weights(cfg, device, s)
    frames, positions, exceeds = s.frames, context, []
    if s.built is not None:  # allocated for the engines' limits, whatever the request
        b = s.built
        it, frames, positions = b.itemsize, b.max_frames, b.max_seq
        order = sorted(b.engine_bytes, key=lambda g: [*_ENGINE_ORDER, g].index(g))
        w = {_ENGINE_ITEMS.get(g, g): float(b.engine_bytes[g]) for g in order}
        w["embeddings (host)"] = cfg.ids.size * cfg.hidden_size * it
        if s.frames > b.max_frames:
            exceeds.append(f"{s.frames} frames > the engines' --max-frames {b.max_frames}")
        if context > b.max_seq:
            exceeds.append(f"{context} positions > the engines' --max-seq {b.max_seq}")
    act = activations(cfg, device, frames, positions, it, s.fixed_past)
    if s.decode_step:
        act["decoder step"] = step_activations(cfg, device, positions, it)
    if s.built is not None:
        kv = positions * kv_bytes_per_position(cfg, it)
    else:
        kv = kv_positions(cfg, device, prompt, context) * kv_bytes_per_position(cfg, it)
    if s.fixed_past:  # where the prefill writes its new rows before they go to the cache
        act["decoder prefill rows"] = positions * kv_bytes_per_position(cfg, it)
    video = video_buffers(cfg, s)
    n = s.concurrency
    graphs = sum(v for k, v in w.items() if k != "embeddings (host)")
    packed = 0.0 if device.gpu else prepacked_bytes(cfg, s.precision, s.lm_head, s.block_size)
    per_instance_device = graphs + packed + kv + sum(act.values())
    per_instance_host = w["embeddings (host)"] + video
    runtime = device.host_runtime_bytes or HOST_RUNTIME_BYTES
    if device.gpu:
        device_bytes = GPU_RUNTIME_BYTES + n * per_instance_device
        host_bytes = GPU_HOST_RUNTIME_BYTES + runtime
        host_bytes += n * (per_instance_host + REQUEST_STATE_BYTES)
    else:  # onnxruntime CPU: one process, three sessions per instance, all host memory
        device_bytes = 0.0
        host_bytes = runtime + n * (
            per_instance_device + per_instance_host + 3 * ORT_SESSION_BYTES + REQUEST_STATE_BYTES
        )
    need = device_bytes + host_bytes if device.unified else device_bytes
    usable = device.usable_gb * 1e9
    return {
        "settings": {
            "precision": s.precision,
            "frames": s.frames,
            "max_new_tokens": s.max_new_tokens,
            "concurrency": n,
            "source_size": list(s.source_size),
            "decode_step": s.decode_step,
            "fixed_past": s.fixed_past,
            "lm_head": s.lm_head,
            "block_size": s.block_size,
        },
        "positions": {"prompt": prompt, "context": context},
        "items": {
            **{f"weights: {k}": v for k, v in w.items()},
            **({"weights: decoder, prepacked blocks": packed} if packed else {}),
            "kv cache": kv,
            **{f"activations: {k}": v for k, v in act.items()},
            "video buffers (host)": video,
            "runtime: device" if device.gpu else "runtime: onnxruntime sessions": (
                GPU_RUNTIME_BYTES if device.gpu else 3 * ORT_SESSION_BYTES
            ),
            "runtime: request state (host)": REQUEST_STATE_BYTES,
            "runtime: host": runtime + (GPU_HOST_RUNTIME_BYTES if device.gpu else 0),
        },
        "per_instance_items_times": n,
        "device_bytes": device_bytes,
        "host_bytes": host_bytes,
        "counted_bytes": need,
        "usable_bytes": usable,
        "weights_from": "engine files" if s.built is not None else "arithmetic",
        "exceeds_engines": exceeds,
        "fits": need <= usable * (1 - MARGIN) and not exceeds,
        "margin_bytes": usable - need,
        "margin_fraction": (usable - need) / usable,
    }


def floors(cfg: TraceConfig, device: Device, s: Settings) -> dict[str, Any]:
    """Roofline floor (ms) of each stage on *device* for *s* (trace_rt.bench.floor)."""
    prompt, _ = context_positions(cfg, s)
    it = float_itemsize(device)
    peaks = Peaks(device.gbps, device.tflops, "data sheet")
    out = stage_floors(
        cfg,
        peaks,
        frames=s.frames,
        prompt_positions=prompt,
        decode_steps=s.max_new_tokens,
        itemsize=it,
        weight_bytes=weights(cfg, device, s)["decoder"],
        # A fixed-past step reads the whole cache at every step (past slots = max_seq - 1).
        fixed_past=_cache_positions(cfg, s) - 1 if s.decode_step or s.fixed_past else None,
        masked_prefill=s.fixed_past,
    )
    out["decode_tokens_per_s"] = 1e3 / out["decode_step"] if out["decode_step"] else None
    return out


def _cache_positions(cfg: TraceConfig, s: Settings) -> int:
    """The TensorRT cache's positions: the build's --max-seq, else the request's context."""
    return s.built.max_seq if s.built is not None else context_positions(cfg, s)[1]


def suggest(cfg: TraceConfig, device: Device, s: Settings) -> list[dict[str, Any]]:
    """For each precision, the most frames (then tokens) that fit; best first.

    Frames matter most to a temporal-grounding model, precision next (fp16 > int8 > int4),
    the token budget last (dense captions of a long video need a few hundred).
    """
    s = replace(s, built=None)  # settings to build with: the arithmetic, not these engines
    precisions = ("fp16", "int8", "int4") if device.gpu else ("fp32", "int8", "int4")
    frames = {f for f in (s.frames, 128, 96, 64, 48, 32, 16, 8, 4) if f <= s.frames}
    tokens = {t for t in (s.max_new_tokens, 512, 256, 128) if t <= s.max_new_tokens}
    found = []
    for rank, precision in enumerate(precisions):
        for f, t in itertools.product(sorted(frames, reverse=True), sorted(tokens, reverse=True)):
            head = s.lm_head if precision in LM_HEAD_PRECISIONS else None
            cand = replace(s, precision=precision, frames=f, max_new_tokens=t, lm_head=head)
            m = memory(cfg, device, cand)
            if m["fits"]:
                found.append(
                    {
                        "precision": precision,
                        "frames": f,
                        "max_new_tokens": t,
                        "counted_gb": round(m["counted_bytes"] / 1e9, 2),
                        "margin_gb": round(m["margin_bytes"] / 1e9, 2),
                        "decode_tokens_per_s_floor": round(
                            floors(cfg, device, cand)["decode_tokens_per_s"], 1
                        ),
                        "_rank": (-f, rank, -t),
                    }
                )
                break
    found.sort(key=lambda x: x.pop("_rank"))
    return found


def plan(cfg: TraceConfig, device: Device, s: Settings) -> dict[str, Any]:
    """Memory plan, floors and suggestions: what ``trace-rt plan`` prints.

    ``without_decode_step``: with the decode step engine counted, the margin without it
    (``export trt --no-step``) and, before a build, with ``--fixed-past`` instead (one
    decoder engine that is its own step).
    """
    mem = memory(cfg, device, s)
    out = {
        "device": device.to_dict(),
        "memory": mem,
        "floor_ms": floors(cfg, device, s),
        "suggestions": suggest(cfg, device, s),
    }
    if s.decode_step:
        built = s.built
        if built is not None:
            kept = {g: n for g, n in built.engine_bytes.items() if g != "decoder_step"}
            built = replace(built, engine_bytes=kept)
        alone = memory(cfg, device, replace(s, decode_step=False, built=built))
        out["without_decode_step"] = {
            "fits": alone["fits"],
            "margin_gb": round(alone["margin_bytes"] / 1e9, 2),
        }
        if s.built is None:
            fixed = memory(cfg, device, replace(s, decode_step=False, fixed_past=True))
            out["without_decode_step"]["fixed_past"] = {
                "fits": fixed["fits"],
                "margin_gb": round(fixed["margin_bytes"] / 1e9, 2),
            }
    return out
