"""Model configuration, read from a checkpoint or artifact directory.

Every size used anywhere in trace-rt comes from here; nothing is guessed from a file
name. A TRACE checkpoint's ``config.json`` holds the Mistral fields and the ``mm_*``
fields; the CLIP tower's own config sits in the directory that ``mm_vision_tower``
names (or, for the release's hub name, in :data:`KNOWN_VISION_TOWERS`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trace_rt.errors import CheckpointError

CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"

# Facts of the public CLIP tower the release names by hub id: its dimensions are known,
# so a release checkpoint loads with no download (trace-model.md, "Checkpoint layout").
_CLIP_L_336 = {
    "vision": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 336,
        "patch_size": 14,
        "num_channels": 3,
        "layer_norm_eps": 1e-5,
        "hidden_act": "quick_gelu",
    },
    "preprocess": {
        "crop_size": {"height": 336, "width": 336},
        "size": {"shortest_edge": 336},
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3,
        "rescale_factor": 1 / 255,
    },
}
KNOWN_VISION_TOWERS: dict[str, dict[str, dict[str, Any]]] = {
    "openai/clip-vit-large-patch14-336": _CLIP_L_336,
}


@dataclass(frozen=True)
class VisionConfig:
    """CLIP ViT vision tower (the fields of a ``CLIPVisionConfig``)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VisionConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        # A full CLIPConfig nests the vision part.
        d = d.get("vision_config", d)
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_hf_dict(self) -> dict[str, Any]:
        return {"model_type": "clip_vision_model", "architectures": ["CLIPVisionModel"]} | (
            dataclasses.asdict(self)
        )


@dataclass(frozen=True)
class PreprocessConfig:
    """CLIP image processing (the fields of a ``preprocessor_config.json``)."""

    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    shortest_edge: int
    crop_height: int
    crop_width: int
    resample: int = 3  # PIL.Image.BICUBIC
    rescale_factor: float = 1 / 255
    pad_to_square: bool = True

    @classmethod
    def from_dict(cls, d: dict[str, Any], pad_to_square: bool) -> PreprocessConfig:
        size = d.get("size", 336)
        shortest = size["shortest_edge"] if isinstance(size, dict) else int(size)
        crop = d.get("crop_size", shortest)
        ch, cw = (crop["height"], crop["width"]) if isinstance(crop, dict) else (crop, crop)
        return cls(
            image_mean=tuple(d["image_mean"]),
            image_std=tuple(d["image_std"]),
            shortest_edge=shortest,
            crop_height=ch,
            crop_width=cw,
            resample=d.get("resample", 3),
            rescale_factor=d.get("rescale_factor", 1 / 255),
            pad_to_square=pad_to_square,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        return {
            "image_processor_type": "CLIPImageProcessor",
            "do_resize": True,
            "size": {"shortest_edge": self.shortest_edge},
            "resample": self.resample,
            "do_center_crop": True,
            "crop_size": {"height": self.crop_height, "width": self.crop_width},
            "do_rescale": True,
            "rescale_factor": self.rescale_factor,
            "do_normalize": True,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "do_convert_rgb": True,
        }


@dataclass(frozen=True)
class IdSpace:
    """The unified id space of all heads (trace-model.md, "One id space")."""

    text_vocab: int  # lm_head size; also the id of the text <sync>
    time_vocab: int
    score_vocab: int

    @property
    def text_sync(self) -> int:
        return self.text_vocab

    @property
    def time_base(self) -> int:
        return self.text_vocab + 1

    @property
    def score_base(self) -> int:
        return self.time_base + self.time_vocab

    @property
    def time_sync(self) -> int:
        return self.time_base

    @property
    def score_sync(self) -> int:
        return self.score_base

    @property
    def size(self) -> int:
        return self.score_base + self.score_vocab


@dataclass(frozen=True)
class TraceConfig:
    """A TRACE checkpoint's configuration (its ``config.json`` and its CLIP tower)."""

    # Mistral decoder
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    # Multimodal parts
    mm_vision_tower: str
    mm_hidden_size: int
    mm_vision_select_layer: int
    vision: VisionConfig
    preprocess: PreprocessConfig
    head_dim: int | None = None
    sliding_window: int | None = None
    bos_token_id: int = 1
    eos_token_id: int = 2
    torch_dtype: str = "float32"
    mm_projector_type: str = "spatial_slot"
    mm_vision_select_feature: str = "patch"
    image_aspect_ratio: str = "pad"
    num_frames: int = 128
    time_vocab_size: int = 13
    score_vocab_size: int = 13
    # The release's SpatialSlotPool has 8 slots and a RoPE base of 10000 in code, not in
    # config.json; a config may override them.
    mm_num_slots: int = 8
    mm_rope_theta: float = 10000.0
    mm_layer_norm_eps: float = 1e-6
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    # ---- derived -------------------------------------------------------------------
    @property
    def attn_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def ids(self) -> IdSpace:
        return IdSpace(self.vocab_size, self.time_vocab_size, self.score_vocab_size)

    @property
    def vision_layers_used(self) -> int:
        """How many CLIP layers run to produce the selected hidden state."""
        n = self.vision.num_hidden_layers
        sel = self.mm_vision_select_layer
        # hidden_states has n + 1 entries: [embeddings, layer 1, ..., layer n].
        return n + 1 + sel if sel < 0 else sel

    @property
    def time_tokens_per_frame(self) -> int:
        from trace_rt.tokens import TIME_TOKENS_PER_STAMP

        return TIME_TOKENS_PER_STAMP

    @property
    def tokens_per_frame(self) -> int:
        return self.mm_num_slots + self.time_tokens_per_frame

    # ---- I/O -----------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str | Path) -> TraceConfig:
        """Read ``config.json`` of a checkpoint or artifact directory and its CLIP tower."""
        path = Path(path)
        cfg_file = path / CONFIG_FILE
        if not cfg_file.is_file():
            raise CheckpointError(f"{path}: no {CONFIG_FILE}; is this a TRACE checkpoint?")
        try:
            raw = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from e
        return cls.from_dict(raw, base_dir=path)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], base_dir: str | Path | None = None) -> TraceConfig:
        if raw.get("model_type") not in ("trace_mistral", None):
            raise CheckpointError(
                f"config.json has model_type {raw.get('model_type')!r}; expected 'trace_mistral'"
            )
        tower = raw.get("mm_vision_tower")
        if not tower:
            raise CheckpointError("config.json has no mm_vision_tower")
        if raw.get("mm_projector_type", "spatial_slot") != "spatial_slot":
            raise CheckpointError(
                f"mm_projector_type {raw['mm_projector_type']!r} is not supported "
                "(TRACE uses 'spatial_slot')"
            )
        if raw.get("mm_vision_select_feature", "patch") != "patch":
            raise CheckpointError("only mm_vision_select_feature='patch' is supported")
        vision_raw, prep_raw = _read_vision_tower(tower, base_dir)
        return cls.from_parts(raw, vision_raw, prep_raw)

    @classmethod
    def from_parts(
        cls, raw: dict[str, Any], vision_raw: dict[str, Any], prep_raw: dict[str, Any]
    ) -> TraceConfig:
        """Build from config.json content plus the CLIP config and preprocessor config."""
        pad = raw.get("image_aspect_ratio", "pad") == "pad"
        names = {f.name for f in dataclasses.fields(cls)} - {"vision", "preprocess", "extra"}
        missing = [
            n
            for n in (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "mm_hidden_size",
                "mm_vision_select_layer",
            )
            if n not in raw
        ]
        if missing:
            raise CheckpointError(f"config.json lacks required fields: {', '.join(missing)}")
        kwargs = {k: v for k, v in raw.items() if k in names}
        kwargs.setdefault("num_key_value_heads", raw["num_attention_heads"])
        kwargs.setdefault("rms_norm_eps", 1e-5)
        kwargs.setdefault("rope_theta", 1e6)
        kwargs.setdefault("max_position_embeddings", 32768)
        extra = {k: v for k, v in raw.items() if k not in names}
        cfg = cls(
            vision=VisionConfig.from_dict(vision_raw),
            preprocess=PreprocessConfig.from_dict(prep_raw, pad),
            extra=extra,
            **kwargs,
        )
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.mm_hidden_size != self.vision.hidden_size:
            raise CheckpointError(
                f"mm_hidden_size {self.mm_hidden_size} != vision tower hidden_size "
                f"{self.vision.hidden_size}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError("num_attention_heads must be a multiple of num_key_value_heads")
        if not 0 < self.vision_layers_used <= self.vision.num_hidden_layers:
            raise CheckpointError(
                f"mm_vision_select_layer {self.mm_vision_select_layer} is out of range for a "
                f"{self.vision.num_hidden_layers}-layer tower"
            )

    def to_dict(self) -> dict[str, Any]:
        """The ``config.json`` content (HF layout; the CLIP tower is written separately)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for k in ("vision", "preprocess", "extra"):
            d.pop(k)
        out: dict[str, Any] = {
            "architectures": ["TraceMistralForCausalLM"],
            "model_type": "trace_mistral",
        }
        out.update(self.extra)
        out.update(d)
        out["hidden_act"] = "silu"
        out["tie_word_embeddings"] = False
        return out

    def save(self, path: str | Path) -> None:
        """Write ``config.json`` into *path* (pretty-printed, sorted for stable diffs)."""
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / CONFIG_FILE).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))

    def replace(self, **changes: Any) -> TraceConfig:
        return dataclasses.replace(self, **changes)


def resolve_vision_tower_dir(tower: str, base_dir: str | Path | None) -> Path | None:
    """The directory named by ``mm_vision_tower``, or None for a known hub name."""
    p = Path(tower)
    candidates = [p] if p.is_absolute() else ([Path(base_dir) / p] if base_dir else []) + [p]
    for c in candidates:
        if (c / CONFIG_FILE).is_file():
            return c
    if tower in KNOWN_VISION_TOWERS:
        return None
    raise CheckpointError(
        f"mm_vision_tower {tower!r}: no CLIP directory with a {CONFIG_FILE} at "
        f"{', '.join(str(c) for c in candidates)}, and not a known hub name "
        f"({', '.join(KNOWN_VISION_TOWERS)})"
    )


def _read_vision_tower(
    tower: str, base_dir: str | Path | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    d = resolve_vision_tower_dir(tower, base_dir)
    if d is None:
        known = KNOWN_VISION_TOWERS[tower]
        return known["vision"], known["preprocess"]
    vision = json.loads((d / CONFIG_FILE).read_text())
    prep_file = d / PREPROCESSOR_FILE
    if not prep_file.is_file():
        raise CheckpointError(f"CLIP directory {d} has no {PREPROCESSOR_FILE}")
    return vision, json.loads(prep_file.read_text())


def save_vision_tower_config(cfg: TraceConfig, clip_dir: str | Path) -> None:
    """Write the CLIP tower's ``config.json`` and ``preprocessor_config.json``."""
    clip_dir = Path(clip_dir)
    clip_dir.mkdir(parents=True, exist_ok=True)
    (clip_dir / CONFIG_FILE).write_text(json.dumps(cfg.vision.to_hf_dict(), indent=2))
    (clip_dir / PREPROCESSOR_FILE).write_text(json.dumps(cfg.preprocess.to_hf_dict(), indent=2))
