"""Load and save HF-format TRACE checkpoint directories.

A checkpoint is ``config.json`` + ``model.safetensors`` (or shards with
``model.safetensors.index.json``) + ``tokenizer.model``, plus the CLIP directory that
``mm_vision_tower`` names. The vision tower's weights sit in the checkpoint under
``model.vision_tower.vision_tower.vision_model.*`` or, when absent there, in the CLIP
directory's own ``model.safetensors`` under ``vision_model.*``.

Loading is strict: a missing or unknown weight raises :class:`CheckpointError` naming it.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from trace_rt.config import TraceConfig, resolve_vision_tower_dir, save_vision_tower_config
from trace_rt.errors import CheckpointError
from trace_rt.model.trace import TraceModel

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.model"
VISION_PREFIX = "model.vision_tower.vision_tower."
DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}
# Buffers some HF versions saved; recomputed here, so tolerated and dropped.
_IGNORED_SUFFIXES = ("embeddings.position_ids", "rotary_emb.inv_freq")


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of fp32, fp16, bf16") from None


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint, from its index when sharded."""
    index = path / INDEX_FILE
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise CheckpointError(f"{path}: shards listed in {INDEX_FILE} are missing: {missing}")
        return [path / f for f in files]
    if (path / WEIGHTS_FILE).is_file():
        return [path / WEIGHTS_FILE]
    raise CheckpointError(f"{path}: no {WEIGHTS_FILE} or {INDEX_FILE}")


def iter_tensors(files: Iterable[Path], prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():  # noqa: SIM118 (safe_open is no dict)
                yield prefix + name, sf.get_tensor(name)


def read_state_dict(path: str | Path, cfg: TraceConfig) -> dict[str, torch.Tensor]:
    """All weights of a checkpoint under release names, the CLIP directory's included."""
    path = Path(path)
    sd = {k: v for k, v in iter_tensors(weight_files(path)) if not k.endswith(_IGNORED_SUFFIXES)}
    if not any(k.startswith(VISION_PREFIX) for k in sd):
        clip_dir = resolve_vision_tower_dir(cfg.mm_vision_tower, path)
        if clip_dir is None or not (clip_dir / WEIGHTS_FILE).is_file():
            raise CheckpointError(
                f"{path}: the vision tower weights are neither in the checkpoint "
                f"({VISION_PREFIX}*) nor in a {WEIGHTS_FILE} of the CLIP directory "
                f"named by mm_vision_tower={cfg.mm_vision_tower!r}"
            )
        for k, v in iter_tensors([clip_dir / WEIGHTS_FILE], prefix=VISION_PREFIX):
            if not k.endswith(_IGNORED_SUFFIXES):
                sd[k] = v
    return sd


def check_names(expected: dict[str, torch.Size], got: dict[str, torch.Tensor]) -> None:
    missing = sorted(set(expected) - set(got))
    unknown = sorted(set(got) - set(expected))
    wrong = sorted(
        f"{k}: checkpoint {tuple(got[k].shape)} vs config {tuple(expected[k])}"
        for k in set(expected) & set(got)
        if got[k].shape != expected[k]
    )
    problems = []
    for label, items in (("missing", missing), ("unknown", unknown), ("wrong shape", wrong)):
        if items:
            shown = ", ".join(items[:8]) + (f" ... ({len(items)} in all)" if len(items) > 8 else "")
            problems.append(f"{label} weights: {shown}")
    if problems:
        raise CheckpointError("checkpoint does not match its config.json: " + "; ".join(problems))


def expected_shapes(cfg: TraceConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = TraceModel(cfg)
    return {k: v.shape for k, v in model.state_dict().items()}


def load_model(
    path: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu"
) -> TraceModel:
    """Load a checkpoint directory into a :class:`TraceModel` (eval mode).

    Args:
        path: checkpoint directory.
        dtype: compute dtype; defaults to the checkpoint's ``torch_dtype``.
        device: where the weights go.
    """
    path = Path(path)
    cfg = TraceConfig.from_dir(path)
    dt = torch_dtype(dtype or cfg.torch_dtype)
    sd = read_state_dict(path, cfg)
    with torch.device("meta"):
        model = TraceModel(cfg)
    check_names({k: v.shape for k, v in model.state_dict().items()}, sd)
    sd = {k: v.to(device=device, dtype=dt) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


def save_model(
    model: TraceModel,
    path: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    tokenizer_model: str | Path | None = None,
    separate_vision_tower: bool = False,
    max_shard_bytes: int = 5 * 2**30,
) -> None:
    """Write *model* as an HF-format checkpoint directory (see module docstring)."""
    cfg = model.config
    dt = torch_dtype(dtype) if dtype else model.lm_head.weight.dtype
    tensors = ((k, v.detach()) for k, v in model.state_dict().items())
    write_checkpoint(
        cfg,
        path,
        tensors,
        dtype=dt,
        tokenizer_model=tokenizer_model,
        separate_vision_tower=separate_vision_tower,
        max_shard_bytes=max_shard_bytes,
    )


def write_checkpoint(
    cfg: TraceConfig,
    path: str | Path,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    dtype: torch.dtype,
    tokenizer_model: str | Path | None,
    separate_vision_tower: bool = False,
    max_shard_bytes: int = 5 * 2**30,
    clip_dir_name: str = "clip_vision",
    on_tensor: Callable[[str], None] | None = None,
) -> None:
    """Stream (name, tensor) pairs into safetensors shards; only one shard is held at once."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    clip_dir = path / clip_dir_name
    cfg = cfg.replace(mm_vision_tower=clip_dir_name, torch_dtype=dtype_name(dtype))
    save_vision_tower_config(cfg, clip_dir)
    vision: dict[str, torch.Tensor] = {}
    shard: dict[str, torch.Tensor] = {}
    shard_of: dict[str, int] = {}  # weight name -> shard number
    size = 0
    n_written = 0

    def flush() -> None:
        nonlocal shard, size, n_written
        shard_file = path / f"{_TMP_PREFIX}{n_written}.safetensors"
        save_file(shard, str(shard_file), metadata=_META)
        _usual_mode(shard_file)
        shard_of.update(dict.fromkeys(shard, n_written))
        n_written += 1
        shard, size = {}, 0

    for name, t in tensors:
        t = t.to(dtype=dtype, device="cpu").contiguous()
        if on_tensor:
            on_tensor(name)
        if separate_vision_tower and name.startswith(VISION_PREFIX):
            vision[name[len(VISION_PREFIX) :]] = t
            continue
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
        shard[name] = t
        size += nbytes
    flush()
    for old in [*path.glob("model*.safetensors"), path / INDEX_FILE]:
        old.unlink(missing_ok=True)
    # The shard count is known only now: shards are renamed to their final names.
    names = _shard_names(n_written)
    for i, final in enumerate(names):
        (path / f"{_TMP_PREFIX}{i}.safetensors").rename(path / final)
    if n_written > 1:
        weight_map = {k: names[i] for k, i in sorted(shard_of.items())}
        index = {"metadata": {}, "weight_map": weight_map}
        (path / INDEX_FILE).write_text(json.dumps(index, indent=2))
    if vision:
        save_file(vision, str(clip_dir / WEIGHTS_FILE), metadata=_META)
        _usual_mode(clip_dir / WEIGHTS_FILE)
    cfg.save(path)
    if tokenizer_model is not None:
        shutil.copyfile(tokenizer_model, path / TOKENIZER_FILE)


_TMP_PREFIX = ".partial-shard-"
_META = {"format": "pt"}


def _usual_mode(path: Path) -> None:
    """safetensors writes through a private (0600) temporary file; give the weights the
    mode every other file gets (0666 minus the umask), so a checkpoint is readable alike."""
    mask = os.umask(0)
    os.umask(mask)
    path.chmod(0o666 & ~mask)


def _shard_names(n: int) -> list[str]:
    if n == 1:
        return [WEIGHTS_FILE]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def random_tensors(
    cfg: TraceConfig, seed: int, std: float = 0.02
) -> Iterator[tuple[str, torch.Tensor]]:
    """Random weights in state-dict order, one tensor at a time (fp32).

    Each tensor has its own generator seeded from (seed, name), so values do not depend
    on the order or on which other tensors exist. Norm scales are ones and biases zeros,
    as a freshly initialised model has; the slot queries are N(0, 1) like the release's.
    """
    for name, shape in expected_shapes(cfg).items():
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        leaf = name.rsplit(".", 2)
        if "norm" in name or "layrnorm" in name or "ln_vision" in name:
            t = torch.ones(shape) if leaf[-1] == "weight" else torch.zeros(shape)
        elif name.endswith(".bias"):
            t = torch.zeros(shape)
        elif name.endswith("mm_projector.slots"):
            t = torch.randn(shape, generator=g)
        else:
            t = torch.randn(shape, generator=g) * std
        yield name, t
