"""Reference TRACE: a plain, independent implementation on HF transformers modules.

Used as the oracle of parity tests and as the ``reference`` baseline of benchmarks. It
follows the released ``gyxxyg/TRACE`` code (transformers 4.40) step by step and favours
obviousness over speed: HF ``MistralForCausalLM`` / ``CLIPVisionModel`` built from our
config, a direct ``SpatialSlotPool``, and greedy task-interleaved decoding with HF's own
``DynamicCache``. It must never import ``trace_rt.model`` (a test that compares code with
itself proves nothing).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
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

from trace_rt.config import TraceConfig, resolve_vision_tower_dir
from trace_rt.errors import CheckpointError
from trace_rt.tokens import VIDEO_PLACEHOLDER_ID, Head, encode_timestamp, head_base, head_size
from trace_rt.tokens import next_head as _next_head

RELEASE_SYNC_PLACEHOLDER_ID = -205  # the release's prompt-side <sync>; same as id 32000 here
VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."  # + CLIPVisionModel names
CLIP_DIR_PREFIX = "vision_model."  # names in the CLIP directory's model.safetensors
IGNORABLE_SUFFIXES = ("embeddings.position_ids",)  # a buffer some CLIP exports carry
_MISTRAL_FIELDS = (
    *("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"),
    *("num_attention_heads", "num_key_value_heads", "rms_norm_eps", "rope_theta"),
    *("max_position_embeddings", "sliding_window", "bos_token_id", "eos_token_id"),
)
# transformers 5.x renamed MistralModel.forward's `past_key_values` to `cache`
_CACHE_SIG = inspect.signature(MistralModel.forward).parameters
_CACHE_KW = "cache" if "cache" in _CACHE_SIG else "past_key_values"


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
    def __init__(self, cfg: TraceConfig, llm_attn: str = "sdpa", vision_attn: str = "eager"):
        super().__init__()
        self.cfg, self.ids = cfg, cfg.ids
        mcfg = MistralConfig(
            **{k: getattr(cfg, k) for k in _MISTRAL_FIELDS},
            head_dim=cfg.attn_head_dim,
            tie_word_embeddings=False,
            attn_implementation=llm_attn,
        )
        vcfg = CLIPVisionConfig(**dataclasses.asdict(cfg.vision), attn_implementation=vision_attn)
        h = cfg.hidden_size
        self.llm = MistralForCausalLM(mcfg)
        self.clip = CLIPVisionModel(vcfg)
        self.projector = SpatialSlotProjector(
            cfg.mm_hidden_size, h, cfg.mm_num_slots, cfg.mm_layer_norm_eps, cfg.mm_rope_theta
        )
        self.time_embed = nn.Embedding(cfg.time_vocab_size, h)  # [13, hidden]
        self.score_embed = nn.Embedding(cfg.score_vocab_size, h)  # [13, hidden]
        self.sync_embed = nn.Embedding(1, h)  # [1, hidden]
        self.time_head = nn.Linear(h, cfg.time_vocab_size, bias=False)
        self.score_head = nn.Linear(h, cfg.score_vocab_size, bias=False)
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
        cfg = TraceConfig.from_dir(ckpt_dir)
        with torch.device(device), _default_dtype(dtype), no_init_weights():
            model = cls(cfg, llm_attn, vision_attn)
        model.eval().requires_grad_(False)
        where = _weight_files(ckpt_dir)
        targets = model.checkpoint_names()
        clip_targets = dict(model.clip.state_dict(keep_vars=True))
        if any(k.startswith(VISION_PREFIX) for k in where):
            targets |= {VISION_PREFIX + k: t for k, t in clip_targets.items()}
            clip_where: dict[str, Path] = {}
        else:  # tower weights live in the CLIP directory named by mm_vision_tower
            clip_dir = resolve_vision_tower_dir(cfg.mm_vision_tower, ckpt_dir)
            if clip_dir is None or not (clip_dir / "model.safetensors").is_file():
                raise CheckpointError(
                    f"{ckpt_dir}: no vision tower weights ({VISION_PREFIX}*) in the checkpoint "
                    f"and no model.safetensors in the CLIP directory {cfg.mm_vision_tower!r}"
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
    @torch.no_grad()
    def vision_features(self, pixel_values: Tensor) -> Tensor:
        """[F, 3, H, W] -> [F, P, mm_hidden]: hidden_states[select_layer], CLS dropped."""
        out = self.clip(pixel_values.to(self.device, self.dtype), output_hidden_states=True)
        # hidden_states: (n_layers + 1) x [F, 1 + P, D]; [0] = pre_layrnorm(embeddings)
        return out.hidden_states[self.cfg.mm_vision_select_layer][:, 1:]  # [F, P, D]

    @torch.no_grad()
    def encode_video(self, pixel_values: Tensor, frame_times: Sequence[float]) -> Tensor:
        """[F, 3, H, W] + F timestamps -> the video block [F * (slots + 6), hidden]."""
        if pixel_values.ndim != 4 or len(frame_times) != pixel_values.shape[0]:
            raise ValueError(
                f"pixel_values {list(pixel_values.shape)} must be [F, 3, H, W] with one "
                f"timestamp per frame (got {len(frame_times)})"
            )
        slots = self.projector(self.vision_features(pixel_values))  # [F, S, hidden]
        t_ids = torch.tensor([encode_timestamp(t) for t in frame_times], device=self.device)
        times = self.time_embed(t_ids)  # [F, 6, hidden]
        return torch.cat([slots, times], dim=1).flatten(0, 1)  # [F * (S + 6), hidden]

    # ---- embedding -----------------------------------------------------------------------
    def embed_ids(self, ids: Sequence[int]) -> Tensor:
        """Unified-space ids -> [n, hidden], each through its own table."""
        t = torch.tensor(list(ids), dtype=torch.long, device=self.device)  # [n]
        s = self.ids
        text = (t >= 0) & (t < s.text_sync)
        sync = (t == s.text_sync) | (t == RELEASE_SYNC_PLACEHOLDER_ID)
        time = (t >= s.time_base) & (t < s.score_base)
        score = (t >= s.score_base) & (t < s.size)
        bad = ~(text | sync | time | score)
        if bad.any():
            raise ValueError(f"ids outside the id space 0..{s.size - 1}: {t[bad].tolist()}")
        out = torch.empty(len(t), self.cfg.hidden_size, dtype=self.dtype, device=self.device)
        out[text] = self.llm.model.embed_tokens(t[text])
        out[sync] = self.sync_embed.weight[0]
        out[time] = self.time_embed(t[time] - s.time_base)
        out[score] = self.score_embed(t[score] - s.score_base)
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
    def head_logits(self, hidden: Tensor) -> Tensor:
        """[..., hidden] -> [..., 32027] fp32: lm_head ++ sync ++ time ++ score, unmasked."""
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
        eos_id: int = 2,
    ) -> list[int]:
        """Greedy task-interleaved decoding; returns new ids (EOS included if reached)."""
        x = self.embed_prompt(prompt_ids, self.encode_video(pixel_values, frame_times))
        cache = DynamicCache(config=self.llm.config)
        head, out = Head.TIME, []  # the prompt ends with the text <sync>
        for _ in range(max_new_tokens):
            logits = self.step_logits(x, cache)  # [V], all heads
            lo = head_base(self.ids, head)
            hi = lo + head_size(self.ids, head)
            masked = torch.full_like(logits, float("-inf"))
            masked[lo:hi] = logits[lo:hi]
            tok = int(masked.argmax())
            out.append(tok)
            if tok == eos_id:
                break
            head = _next_head(self.ids, head, tok)
            x = self.embed_ids([tok])[None]  # [1, 1, hidden]
        return out
