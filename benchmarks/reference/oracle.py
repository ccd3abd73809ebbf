"""Reference TRACE: a plain, independent implementation on HF transformers modules.

Used as the oracle of parity tests and as the ``reference`` baseline of benchmarks. It
follows the released ``gyxxyg/TRACE`` code (transformers 4.40) step by step and favours
obviousness over speed: HF ``MistralForCausalLM`` / ``CLIPVisionModel`` built from the
checkpoint's own configs, a direct ``SpatialSlotPool``, and greedy task-interleaved
decoding with HF's own ``DynamicCache``.

It shares nothing with ``trace_rt``: ``config.json`` is read by transformers'
``MistralConfig`` (a ``trace_mistral`` subclass, as the release declares it), the CLIP
tower's by ``CLIPVisionConfig``, its ``preprocessor_config.json`` by
``CLIPImageProcessor``; the id space, the timestamp codec and the head switches are
re-derived here from ``docs/trace-model.md``. A test that compares code with itself
proves nothing, and a config parsed once for both sides is such a comparison.
"""

from __future__ import annotations

import contextlib
import inspect
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from torch import Tensor, nn
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    DynamicCache,
    MistralConfig,
    MistralForCausalLM,
    MistralModel,
)
from transformers.initialization import no_init_weights

try:  # transformers >= 5: the PIL-backed processor (the release's semantics) has its own class
    from transformers.models.clip.image_processing_pil_clip import (
        CLIPImageProcessorPil as CLIPImageProcessor,
    )
except ImportError:  # transformers 4.x: CLIPImageProcessor itself is PIL-backed
    from transformers import CLIPImageProcessor

# ---- facts of trace-model.md (re-derived here on purpose, not imported) -------------------
VIDEO_PLACEHOLDER_ID = -201  # the release's video placeholder in prompt ids
RELEASE_SYNC_PLACEHOLDER_ID = -205  # the release's prompt-side <sync>; same as the text <sync>
TEXT, TIME, SCORE = 0, 1, 2  # heads, numbered as the release passes them
EOS_ID = 2
VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."  # + CLIPVisionModel names
CLIP_DIR_PREFIX = "vision_model."  # names in the CLIP directory's model.safetensors
IGNORABLE_SUFFIXES = ("embeddings.position_ids",)  # a buffer some CLIP exports carry
# The release's SpatialSlotPool constants (in its code, not in config.json; a config.json
# may carry them as mm_num_slots / mm_rope_theta / mm_layer_norm_eps).
RELEASE_PROJECTOR = {"mm_num_slots": 8, "mm_rope_theta": 10000.0, "mm_layer_norm_eps": 1e-6}
# openai/clip-vit-large-patch14-336, which the release names by hub id: known facts.
HUB_TOWERS = {
    "openai/clip-vit-large-patch14-336": (
        {
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "image_size": 336,
            "patch_size": 14,
            "projection_dim": 768,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
        },
        {
            "size": {"shortest_edge": 336},
            "crop_size": {"height": 336, "width": 336},
            "resample": 3,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
        },
    )
}
# transformers 5.x renamed MistralModel.forward's `past_key_values` to `cache`
_CACHE_SIG = inspect.signature(MistralModel.forward).parameters
_CACHE_KW = "cache" if "cache" in _CACHE_SIG else "past_key_values"


class CheckpointError(ValueError):
    """A checkpoint the oracle cannot read (its own error type: it imports nothing of ours)."""


class TraceMistralConfig(MistralConfig):
    """The release's ``TraceMistralConfig``: ``MistralConfig`` plus the ``mm_*`` fields."""

    model_type = "trace_mistral"


def timestamp_ids(t: float) -> list[int]:
    """trace-model.md: ``format(t, '0>6.1f')``, digits -> 2..11, '.' -> 12 (time vocab)."""
    text = format(t, "0>6.1f")
    if len(text) != 6 or t < 0:
        raise ValueError(f"timestamp {t} s does not fit the 6-token format")
    return [12 if ch == "." else 2 + int(ch) for ch in text]


def expand2square(img: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    """VideoLLaMA2's ``expand2square``: centre *img* on a square of colour *fill*."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), fill)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def read_configs(
    ckpt_dir: Path, llm_attn: str = "sdpa", vision_attn: str = "eager"
) -> tuple[TraceMistralConfig, CLIPVisionConfig, CLIPImageProcessor, Path | None]:
    """The checkpoint's configs, each read by transformers' own class.

    Returns:
        The decoder config (``config.json``), the CLIP tower's config and image processor
        (from the directory ``mm_vision_tower`` names, relative to the checkpoint or
        absolute, or the known facts of the release's hub name) and that directory.
    """
    if not (ckpt_dir / "config.json").is_file():
        raise CheckpointError(f"{ckpt_dir}: no config.json")
    text = TraceMistralConfig.from_pretrained(ckpt_dir, attn_implementation=llm_attn)
    required = {"mm_projector_type": "spatial_slot", "mm_vision_select_feature": "patch"}
    for field, want in required.items():
        if getattr(text, field, want) != want:
            raise CheckpointError(f"{ckpt_dir}: {field} must be {want!r}")
    tower = getattr(text, "mm_vision_tower", None)
    if not tower:
        raise CheckpointError(f"{ckpt_dir}: config.json has no mm_vision_tower")
    clip_dir = Path(tower) if Path(tower).is_absolute() else ckpt_dir / tower
    if (clip_dir / "config.json").is_file():
        vision = CLIPVisionConfig.from_pretrained(clip_dir, attn_implementation=vision_attn)
        processor = CLIPImageProcessor.from_pretrained(clip_dir)
        return text, vision, processor, clip_dir
    if tower not in HUB_TOWERS:
        raise CheckpointError(f"{ckpt_dir}: mm_vision_tower {tower!r} names no CLIP directory")
    vision_facts, processor_facts = HUB_TOWERS[tower]
    vision = CLIPVisionConfig(**vision_facts, attn_implementation=vision_attn)
    return text, vision, CLIPImageProcessor(**processor_facts), None


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class SpatialSlotProjector(nn.Module):
    """The release's ``SpatialSlotPool`` (8 learned slots attending over one frame's patches)."""

    def __init__(self, mm_hidden: int, hidden: int, num_slots: int, eps: float, theta: float):
        super().__init__()
        self.slots = nn.Parameter(torch.empty(mm_hidden, num_slots))  # [D, S]
        self.ln_vision = nn.LayerNorm(mm_hidden, eps=eps)  # timm LayerNorm: eps 1e-6
        self.readout = nn.Linear(mm_hidden, hidden, bias=False)  # [hidden, D]
        self.theta = theta

    def rope(self, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos, sin [n, D] in fp32 (the release builds them in fp32, casts to x.dtype)."""
        d = self.slots.shape[0]
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, d, 2, device=device).float() / d))
        freqs = torch.outer(torch.arange(n, device=device).float(), inv_freq)  # [n, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [n, D]
        return emb.cos(), emb.sin()

    def forward(self, x: Tensor) -> Tensor:  # x: [F, P, D] patch features (CLS dropped)
        x = self.ln_vision(x)  # [F, P, D]
        cos, sin = self.rope(x.shape[1], x.device)
        x = x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)  # [F, P, D], pos 0..P-1
        attn = torch.softmax(x @ self.slots, dim=1)  # [F, P, S], softmax over patches
        pooled = (x.transpose(1, 2) @ attn).transpose(1, 2)  # [F, S, D]; values = rotated x
        return self.readout(pooled)  # [F, S, hidden]


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _weight_files(ckpt_dir: Path) -> dict[str, Path]:
    """checkpoint weight name -> safetensors file holding it."""
    index = ckpt_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (ckpt_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{ckpt_dir}: no model.safetensors nor model.safetensors.index.json")
    where: dict[str, Path] = {}
    for f in files:
        if not (ckpt_dir / f).is_file():
            raise CheckpointError(f"{ckpt_dir}: shard {f} named by the index is missing")
        with safe_open(ckpt_dir / f, framework="pt") as sf:
            where.update({k: ckpt_dir / f for k in sf.keys()})  # noqa: SIM118
    return where


class ReferenceTrace(nn.Module):
    """The release's TRACE on HF modules, built from transformers-parsed configs.

    Args:
        text: ``config.json`` as :class:`TraceMistralConfig`.
        vision: the CLIP tower's :class:`CLIPVisionConfig`.
        processor: the CLIP tower's image processor (for :meth:`preprocess`).
    """

    def __init__(
        self, text: TraceMistralConfig, vision: CLIPVisionConfig, processor: CLIPImageProcessor
    ):
        super().__init__()
        self.text_config, self.vision_config, self.processor = text, vision, processor
        proj = {k: getattr(text, k, v) for k, v in RELEASE_PROJECTOR.items()}
        self.time_vocab = getattr(text, "time_vocab_size", 13)
        self.score_vocab = getattr(text, "score_vocab_size", 13)
        # The one id space (trace-model.md): text, text <sync>, time, score.
        self.text_sync = text.vocab_size
        self.time_base = self.text_sync + 1
        self.score_base = self.time_base + self.time_vocab
        self.id_space = self.score_base + self.score_vocab
        h = text.hidden_size
        self.llm = MistralForCausalLM(text)
        self.clip = CLIPVisionModel(vision)
        self.projector = SpatialSlotProjector(
            text.mm_hidden_size,
            h,
            proj["mm_num_slots"],
            proj["mm_layer_norm_eps"],
            proj["mm_rope_theta"],
        )
        self.time_embed = nn.Embedding(self.time_vocab, h)  # [13, hidden]
        self.score_embed = nn.Embedding(self.score_vocab, h)  # [13, hidden]
        self.sync_embed = nn.Embedding(1, h)  # [1, hidden]
        self.time_head = nn.Linear(h, self.time_vocab, bias=False)
        self.score_head = nn.Linear(h, self.score_vocab, bias=False)
        self.sync_head = nn.Linear(h, 1, bias=False)

    # ---- loading -----------------------------------------------------------------------
    def checkpoint_names(self) -> dict[str, Tensor]:
        """Checkpoint weight name -> this module's tensor (without the CLIP tower)."""
        out = dict(self.llm.state_dict(keep_vars=True))
        proj = self.projector.state_dict(keep_vars=True)
        out |= {f"model.mm_projector.{k}": t for k, t in proj.items()}
        for tower, emb in (("time", self.time_embed), ("score", self.score_embed)):
            out[f"model.{tower}_tower.embed_tokens.weight"] = emb.weight
        out["model.sync_tower.embed_tokens.weight"] = self.sync_embed.weight
        for head in ("time_head", "score_head", "sync_head"):
            out[f"{head}.weight"] = getattr(self, head).weight
        return out

    @classmethod
    def from_pretrained(
        cls,
        ckpt_dir: str | Path,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        llm_attn: str = "sdpa",
        vision_attn: str = "eager",
    ) -> ReferenceTrace:
        ckpt_dir = Path(ckpt_dir)
        text, vision, processor, clip_dir = read_configs(ckpt_dir, llm_attn, vision_attn)
        with torch.device(device), _default_dtype(dtype), no_init_weights():
            model = cls(text, vision, processor)
        model.eval().requires_grad_(False)
        where = _weight_files(ckpt_dir)
        targets = model.checkpoint_names()
        clip_targets = dict(model.clip.state_dict(keep_vars=True))
        if any(k.startswith(VISION_PREFIX) for k in where):
            targets |= {VISION_PREFIX + k: t for k, t in clip_targets.items()}
            clip_where: dict[str, Path] = {}
        else:  # tower weights live in the CLIP directory named by mm_vision_tower
            if clip_dir is None or not (clip_dir / "model.safetensors").is_file():
                raise CheckpointError(
                    f"{ckpt_dir}: no vision tower weights ({VISION_PREFIX}*) in the checkpoint "
                    f"and no model.safetensors in the CLIP directory {text.mm_vision_tower!r}"
                )
            clip_where = {  # a full CLIPModel file also holds text_model.*: not ours
                k: p for k, p in _weight_files(clip_dir).items() if k.startswith(CLIP_DIR_PREFIX)
            }
            targets |= {f"clip:{CLIP_DIR_PREFIX}{k}": t for k, t in clip_targets.items()}
        found = {**{f"clip:{k}": p for k, p in clip_where.items()}, **where}
        found = {k: p for k, p in found.items() if not k.endswith(IGNORABLE_SUFFIXES)}
        missing, unknown = sorted(set(targets) - set(found)), sorted(set(found) - set(targets))
        if missing or unknown:
            raise CheckpointError(
                f"{ckpt_dir}: weights do not match the TRACE layout; "
                f"missing {len(missing)}: {', '.join(missing) or '-'}; "
                f"unknown {len(unknown)}: {', '.join(unknown) or '-'}"
            )
        by_file: dict[Path, list[str]] = {}
        for name, path in found.items():
            by_file.setdefault(path, []).append(name)
        with torch.no_grad():
            for path, names in by_file.items():
                with safe_open(path, framework="pt") as sf:
                    for name in names:
                        src = sf.get_tensor(name.removeprefix("clip:"))
                        dst = targets[name]
                        if src.shape != dst.shape:
                            raise CheckpointError(
                                f"{path}: {name} has shape {list(src.shape)}, "
                                f"expected {list(dst.shape)}"
                            )
                        dst.copy_(src)  # cast to dtype, move to device
        return model

    # ---- properties ----------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.llm.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.llm.lm_head.weight.device

    # ---- vision --------------------------------------------------------------------------
    def preprocess(self, frames: np.ndarray) -> Tensor:
        """``[F, H, W, 3]`` uint8 RGB -> ``[F, 3, h, w]`` pixel values, as the release does.

        VideoLLaMA2 pads each frame to a square of the processor's mean colour when
        ``image_aspect_ratio`` is ``pad``, then runs the CLIP image processor (PIL bicubic).
        """
        images = [Image.fromarray(np.ascontiguousarray(f)) for f in frames]
        if getattr(self.text_config, "image_aspect_ratio", "pad") == "pad":
            fill = tuple(int(m * 255) for m in self.processor.image_mean)
            images = [expand2square(i, fill) for i in images]
        out = self.processor(images, return_tensors="np")["pixel_values"]
        return torch.from_numpy(np.asarray(out, dtype=np.float32))

    @torch.no_grad()
    def vision_features(self, pixel_values: Tensor) -> Tensor:
        """[F, 3, H, W] -> [F, P, mm_hidden]: hidden_states[select_layer], CLS dropped."""
        out = self.clip(pixel_values.to(self.device, self.dtype), output_hidden_states=True)
        # hidden_states: (n_layers + 1) x [F, 1 + P, D]; [0] = pre_layrnorm(embeddings)
        return out.hidden_states[self.text_config.mm_vision_select_layer][:, 1:]  # [F, P, D]

    @torch.no_grad()
    def encode_video(self, pixel_values: Tensor, frame_times: Sequence[float]) -> Tensor:
        """[F, 3, H, W] + F timestamps -> the video block [F * (slots + 6), hidden]."""
        if pixel_values.ndim != 4 or len(frame_times) != pixel_values.shape[0]:
            raise ValueError(
                f"pixel_values {list(pixel_values.shape)} must be [F, 3, H, W] with one "
                f"timestamp per frame (got {len(frame_times)})"
            )
        slots = self.projector(self.vision_features(pixel_values))  # [F, S, hidden]
        t_ids = torch.tensor([timestamp_ids(t) for t in frame_times], device=self.device)
        times = self.time_embed(t_ids)  # [F, 6, hidden]
        return torch.cat([slots, times], dim=1).flatten(0, 1)  # [F * (S + 6), hidden]

    # ---- embedding -----------------------------------------------------------------------
    def embed_ids(self, ids: Sequence[int]) -> Tensor:
        """Unified-space ids -> [n, hidden], each through its own table."""
        t = torch.tensor(list(ids), dtype=torch.long, device=self.device)  # [n]
        text = (t >= 0) & (t < self.text_sync)
        sync = (t == self.text_sync) | (t == RELEASE_SYNC_PLACEHOLDER_ID)
        time = (t >= self.time_base) & (t < self.score_base)
        score = (t >= self.score_base) & (t < self.id_space)
        bad = ~(text | sync | time | score)
        if bad.any():
            raise ValueError(f"ids outside the id space 0..{self.id_space - 1}: {t[bad].tolist()}")
        h = self.text_config.hidden_size
        out = torch.empty(len(t), h, dtype=self.dtype, device=self.device)
        out[text] = self.llm.model.embed_tokens(t[text])
        out[sync] = self.sync_embed.weight[0]
        out[time] = self.time_embed(t[time] - self.time_base)
        out[score] = self.score_embed(t[score] - self.score_base)
        return out

    @torch.no_grad()
    def embed_prompt(self, prompt_ids: Sequence[int], video_embeds: Tensor | None = None) -> Tensor:
        """Prompt ids (with -201 for the video block) -> inputs_embeds [1, L, hidden]."""
        ids = [int(i) for i in prompt_ids]
        n_video = ids.count(VIDEO_PLACEHOLDER_ID)
        if n_video != (0 if video_embeds is None else 1):
            raise ValueError(
                f"prompt has {n_video} video placeholders ({VIDEO_PLACEHOLDER_ID}); "
                f"expected {0 if video_embeds is None else 1}"
            )
        parts: list[Tensor] = []
        if n_video:
            k = ids.index(VIDEO_PLACEHOLDER_ID)
            parts = [self.embed_ids(ids[:k]), video_embeds.to(self.device, self.dtype)]
            ids = ids[k + 1 :]
        parts.append(self.embed_ids(ids))
        return torch.cat(parts)[None]  # [1, L, hidden]

    # ---- decoder + heads -----------------------------------------------------------------
    def head_range(self, head: int) -> tuple[int, int]:
        """[lo, hi) of *head*'s ids: text = lm_head + sync_head, then time, then score."""
        return {
            TEXT: (0, self.text_sync + 1),
            TIME: (self.time_base, self.score_base),
            SCORE: (self.score_base, self.id_space),
        }[head]

    def head_logits(self, hidden: Tensor) -> Tensor:
        """[..., hidden] -> [..., id space] fp32: lm_head ++ sync ++ time ++ score, unmasked."""
        text = torch.cat([self.llm.lm_head(hidden), self.sync_head(hidden)], dim=-1).float()
        time, score = self.time_head(hidden).float(), self.score_head(hidden).float()
        return torch.cat([text, time, score], dim=-1)

    @torch.no_grad()
    def all_logits(self, inputs_embeds: Tensor) -> Tensor:
        """inputs_embeds [1, L, hidden] -> logits [1, L, 32027] fp32 (no cache, no mask)."""
        out = self.llm.model(inputs_embeds=inputs_embeds.to(self.dtype), use_cache=False)
        return self.head_logits(out.last_hidden_state)  # [1, L, V]

    def step_logits(self, inputs_embeds: Tensor, cache: DynamicCache) -> Tensor:
        """Run [1, n, hidden] new embeddings through the cache -> last position's [V] fp32."""
        out = self.llm.model(inputs_embeds=inputs_embeds, use_cache=True, **{_CACHE_KW: cache})
        return self.head_logits(out.last_hidden_state[0, -1])  # [V]

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: Sequence[int],
        pixel_values: Tensor,
        frame_times: Sequence[float],
        max_new_tokens: int,
        eos_id: int = EOS_ID,
    ) -> list[int]:
        """Greedy task-interleaved decoding; returns new ids (EOS included if reached)."""
        x = self.embed_prompt(prompt_ids, self.encode_video(pixel_values, frame_times))
        cache = DynamicCache(config=self.llm.config)
        head, out = TIME, []  # the prompt ends with the text <sync>
        for _ in range(max_new_tokens):
            logits = self.step_logits(x, cache)  # [V], all heads
            lo, hi = self.head_range(head)
            masked = torch.full_like(logits, float("-inf"))
            masked[lo:hi] = logits[lo:hi]
            tok = int(masked.argmax())
            out.append(tok)
            if tok == eos_id:
                break
            # each head's <sync> hands over: time -> score -> text -> time
            head = {self.time_base: SCORE, self.score_base: TEXT, self.text_sync: TIME}.get(
                tok, head
            )
            x = self.embed_ids([tok])[None]  # [1, 1, hidden]
        return out
