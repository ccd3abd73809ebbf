"""Training recipes: a frozen dataclass read from a YAML file (``training/recipes/*.yaml``).

Unknown keys are errors (a typo must not silently fall back to a default). Parameter
groups name parts of the model by their release weight names:

| group       | weights                                                        |
|-------------|----------------------------------------------------------------|
| `vision`    | `model.vision_tower.*` (CLIP)                                  |
| `projector` | `model.mm_projector.*`                                         |
| `towers`    | `model.{time,score,sync}_tower.*`                              |
| `heads`     | `time_head`, `score_head`, `sync_head`                         |
| `llm`       | `model.layers.*`, `model.norm`                                 |
| `embed`     | `model.embed_tokens`, `lm_head` (the text vocabulary)          |

The release's stage 1 trains `projector`, `towers`, `heads`; stage 2 adds `llm` and
`embed` (``tune_lm_embed_head``) at a lower rate. The vision tower never learns in the
release (its CLIP tower is frozen and run without gradients).

Defaults that follow the release (``scripts/train/*.sh``, ``train_mt.py``), each because a
fine-tune must give the model the release's recipe would give:

* ``template: mistral_instruct``: the release trains with ``--version v1_mistral``
  (and evaluates with ``llama_2``, the runtime's default);
* global batch 128 (``global_batch``: gradient accumulation fills it for any number of
  processes), ``epochs`` (1 for stage 1, 2 for stage 2 and fine-tuning), warm-up ratio
  0.03 then cosine decay, weight decay 0, bf16, gradient checkpointing;
* ``sampling``: ``uniform`` frames in stage 1 (the release's default), ``rand`` in stage
  2 and fine-tuning (``--sample_scheme rand``);
* ``out_of_range: snap`` in the release recipes (the release snaps every target to the
  nearest sampled frame, so a timestamp past the end becomes the last frame's); each such
  sample is still reported. The dataclass default stays ``fail``: a user's own data
  with late timestamps is usually a mistake worth stopping for.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RECIPE_DIR = Path(__file__).parent / "recipes"
GROUPS = ("vision", "projector", "towers", "heads", "llm", "embed")
DEVICES = ("auto", "cpu", "cuda", "npu")
SAMPLING = ("uniform", "rand", "jitter")
PARALLEL = ("ddp", "fsdp")


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def resolve_recipe(path: str | Path) -> Path:
    """*path* if it is a file, else the shipped recipe of that name (``tiny-synthetic``,
    ``tiny-synthetic.yaml`` or ``training/recipes/tiny-synthetic.yaml`` from any cwd)."""
    path = Path(path)
    if path.is_file():
        return path
    shipped = RECIPE_DIR / (path.name if path.suffix in (".yaml", ".yml") else path.name + ".yaml")
    # Only a bare name or the README's repo-relative spelling: a path elsewhere that
    # happens to share a shipped recipe's name must not silently become that recipe.
    if shipped.is_file() and path.parent.as_posix() in (".", "training/recipes"):
        return shipped
    raise FileNotFoundError(
        f"no recipe file {path} (shipped recipes, by name: {', '.join(recipe_names())})"
    )


def param_group(name: str) -> str:
    """The recipe group of a release weight name."""
    if name.startswith("model.vision_tower."):
        return "vision"
    if name.startswith("model.mm_projector."):
        return "projector"
    if name.startswith(("model.time_tower.", "model.score_tower.", "model.sync_tower.")):
        return "towers"
    if name.startswith(("time_head.", "score_head.", "sync_head.")):
        return "heads"
    if name.startswith(("model.embed_tokens.", "lm_head.")):
        return "embed"
    if name.startswith(("model.layers.", "model.norm.")):
        return "llm"
    raise ValueError(f"weight {name!r} belongs to no parameter group")


@dataclass(frozen=True)
class TrainConfig:
    """One training recipe.

    Attributes:
        trainable: parameter groups that learn (the rest are frozen).
        lr: peak learning rate; ``lr_scale`` multiplies it per group.
        warmup_ratio / warmup_steps: linear warm-up (steps win when > 0), then cosine
            decay to ``min_lr_ratio * lr`` at ``max_steps``.
        batch_size: samples per process per micro-step; ``grad_accum`` micro-steps per
            optimiser step. Global batch = batch_size * grad_accum * processes.
        global_batch: when set, ``grad_accum`` is derived from it at start-up
            (``global_batch / (batch_size * processes)``, which must divide evenly).
        epochs: when set, ``max_steps`` is derived: ceil(epochs * samples / global batch).
        parallel: ``ddp`` (replicated weights) or ``fsdp`` (FSDP2 ``fully_shard``: weights,
            gradients and optimiser state sharded across processes, for the 7B).
        num_workers: data-loader worker processes decoding the sampled frames.
        cache_frames: decode each video's frames once and keep them in memory (``uniform``
            sampling only; each data-loader process keeps its own copy): small sets on CPU.
        group_by_video: keep the samples of one video next to each other in the data
            order (a group's samples land in the same batch unless it straddles one's
            end): a clip's queries for its different events are then contrasted in one
            step (the synthetic hard case).
        frame_words: the share (0..1) of samples carrying ``frame_words`` that train on
            those timed words in place of their frames' pixels (:mod:`training.dataset`);
            0 (default) never does.
        slot_target: weight of an extra loss that pulls each pixel-shown frame's
            projector slots towards the embeddings of its ``frame_words`` (in any slot
            order; :func:`training.loss.slot_loss`), so that the frames come to look to
            the LLM like the words a ``frame_words`` stage taught it to read; 0 (default):
            off.
        frame_word_slots: a fixed slot for each frame word (its index in this list)
            instead of span order (:class:`training.dataset.GroundingDataset`); with
            ``slot_target`` the pixel slots are then pulled towards that layout slot by
            slot. Empty (default): span order, and the slot target in any slot order.
        out_of_range: ``fail`` or ``snap`` for targets past a video's end (module doc).
        dtype: ``fp32`` or ``bf16`` (autocast; master weights and optimiser stay fp32).
        num_frames: frames per video (None: the checkpoint's ``num_frames``).
        sampling: ``uniform`` (the runtime's rule), ``rand`` (the release's stage 2) or
            ``jitter``.
        snap_times: ``nearest`` (the release: each target timestamp to the closest
            sampled frame), ``cover`` (a span to the frames bracketing it) or ``none``.
        tasks: keep only samples of these tasks (None: all).
        on_bad_sample: ``fail`` or ``skip`` (reported with the sample id either way).
        save_every: steps between resumable checkpoints (0: only at the end).
        keep_checkpoints: how many step checkpoints to keep (the newest).
        save_dtype: dtype of the release-format weights written (None: the init's).
        template: the chat template; ``answer_space``: the release's space between
            ``[/INST]`` and the answer (``training.render.render``); false makes the
            sequence start like the runtime's inference prompt, for models trained from
            scratch and served by this runtime.
        prompts_file: the prompt strings (system text, questions; the layout of
            ``trace_rt/data/trace-prompts.json``, the default); a relative path is read from
            the recipe's folder. Saved beside the trained model as ``prompts.json``, which
            the runtime then reads, and kept by a run that starts from that model.
        lora: LoRA on the LLM's linear layers instead of training them
            (:mod:`training.lora`): ``{r, alpha, dropout, targets, merge}``.
    """

    trainable: tuple[str, ...] = ("projector", "towers", "heads")
    lr: float = 1e-3
    lr_scale: dict[str, float] = field(default_factory=dict)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_ratio: float = 0.03
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    max_steps: int = 1000
    batch_size: int = 4
    grad_accum: int = 1
    global_batch: int | None = None
    epochs: float | None = None
    max_grad_norm: float = 1.0
    dtype: str = "fp32"
    gradient_checkpointing: bool = False
    num_frames: int | None = None
    sampling: str = "uniform"
    snap_times: str = "nearest"
    out_of_range: str = "fail"
    template: str = "mistral_instruct"
    answer_space: bool = True
    prompts_file: str | None = None
    tasks: tuple[str, ...] | None = None
    on_bad_sample: str = "fail"
    seed: int = 0
    device: str = "auto"
    parallel: str = "ddp"
    num_workers: int = 0
    cache_frames: bool = False
    group_by_video: bool = False
    frame_words: float = 0.0
    slot_target: float = 0.0
    frame_word_slots: tuple[str, ...] = ()
    log_every: int = 10
    save_every: int = 0
    keep_checkpoints: int = 2
    save_dtype: str | None = None
    lora: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        bad = set(self.trainable) - set(GROUPS)
        if bad or not self.trainable:
            raise ValueError(f"trainable groups must be among {GROUPS}, got {self.trainable}")
        bad = set(self.lr_scale) - set(GROUPS)
        if bad:
            raise ValueError(f"lr_scale names unknown groups {sorted(bad)}")
        if self.dtype not in ("fp32", "bf16"):
            raise ValueError(f"dtype must be fp32 or bf16, got {self.dtype!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.snap_times not in ("nearest", "cover", "none"):
            raise ValueError(f"snap_times must be nearest, cover or none: {self.snap_times!r}")
        if self.sampling not in SAMPLING:
            raise ValueError(f"sampling must be one of {SAMPLING}, got {self.sampling!r}")
        if self.out_of_range not in ("fail", "snap"):
            raise ValueError(f"out_of_range must be fail or snap, got {self.out_of_range!r}")
        if self.parallel not in PARALLEL:
            raise ValueError(f"parallel must be one of {PARALLEL}, got {self.parallel!r}")
        if self.global_batch is not None and self.global_batch < 1:
            raise ValueError("global_batch must be at least 1")
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError("epochs must be positive")
        if self.cache_frames and self.sampling != "uniform":
            raise ValueError("cache_frames needs sampling: uniform (the frames never change)")
        if not 0.0 <= self.frame_words <= 1.0:
            raise ValueError(f"frame_words must be a share in 0..1, got {self.frame_words}")
        if self.slot_target < 0:
            raise ValueError(f"slot_target must be a weight >= 0, got {self.slot_target}")
        if len(set(self.frame_word_slots)) != len(self.frame_word_slots):
            raise ValueError(f"frame_word_slots repeats a word: {list(self.frame_word_slots)}")
        if self.num_workers < 0:
            raise ValueError("num_workers must be 0 or more")
        if self.on_bad_sample not in ("fail", "skip"):
            raise ValueError(f"on_bad_sample must be fail or skip, got {self.on_bad_sample!r}")
        for k in ("max_steps", "batch_size", "grad_accum", "log_every"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be at least 1")
        if self.lora is not None:
            from training.lora import LoraConfig

            LoraConfig.from_dict(self.lora)  # a bad setting fails when the recipe loads

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "recipe") -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known - {"about"})
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}; known: {sorted(known)}")
        kw = {k: v for k, v in raw.items() if k in known}
        for k in ("trainable", "betas", "tasks", "frame_word_slots"):
            if kw.get(k) is not None:
                kw[k] = tuple(kw[k])
        return cls(**kw)

    @classmethod
    def load(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        """Read a recipe file, or a shipped recipe by name (``tiny-synthetic``)."""
        import yaml

        path = resolve_recipe(path)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path} is not valid YAML ({' '.join(str(e).split())})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: a recipe is a mapping of settings")
        raw.update({k: v for k, v in overrides.items() if v is not None})
        if isinstance(raw.get("prompts_file"), str) and not Path(raw["prompts_file"]).is_absolute():
            # Beside the recipe, as a shipped recipe keeps its prompt file.
            raw["prompts_file"] = str((path.parent / raw["prompts_file"]).resolve())
        return cls.from_dict(raw, str(path))

    def resolved(self, samples: int, processes: int) -> TrainConfig:
        """``grad_accum`` from ``global_batch`` and ``max_steps`` from ``epochs``."""
        rc = self
        if rc.global_batch is not None:
            per_step = rc.batch_size * processes
            if rc.global_batch % per_step:
                raise ValueError(
                    f"global_batch {rc.global_batch} is not a multiple of batch_size "
                    f"{rc.batch_size} x {processes} processes"
                )
            rc = rc.replace(grad_accum=rc.global_batch // per_step)
        if rc.epochs is not None:
            glob = rc.batch_size * rc.grad_accum * processes
            rc = rc.replace(max_steps=max(1, math.ceil(rc.epochs * samples / glob)))
        return rc

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("trainable", "betas", "tasks", "frame_word_slots"):
            if d[k] is not None:
                d[k] = list(d[k])
        return d
