"""Sharded data-parallel training with PyTorch FSDP2 (``fully_shard``).

Why FSDP2 and not DeepSpeed ZeRO-3 (the release's choice): it ships with PyTorch (no
extra package, no JSON config, runs on CPU with gloo for tests and on CUDA with nccl),
shards per parameter as DTensors (frozen and trainable weights may share a layer, as in
stage 1), composes with our activation checkpointing, and saves through
``torch.distributed.checkpoint`` (DCP), whose per-process shards can be resharded on
load or gathered into one state dict offline.

Every decoder layer is its own FSDP unit (its weights are all-gathered just for its
forward and backward, then freed); the loss module (:class:`training.loss.TraceLoss`) is
the root unit holding the rest (embeddings, heads, towers, projector, CLIP tower), so
all of the model's stage methods run inside the root's forward. Gradients are averaged
across processes, as DDP averages them.

Step checkpoints are DCP directories holding the model and optimiser state (the loss
module's names, ``model.<release name>``), ``trainer_state.pt`` (step, recipe) and
``rng-<rank>.pt`` per process, plus the model's ``config.json``/CLIP config so the model
can be rebuilt without the run's ``--init``. :func:`convert_sharded` turns one into a
release-format checkpoint on a single machine without a process group.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from trace_rt.config import TraceConfig, save_vision_tower_config
from trace_rt.model import TraceModel, save_model
from trace_rt.model.checkpoint import random_tensors
from training.checkpoints import STATE_DIR, STATE_FILE, publish_step, step_name

PREFIX = "model."  # the loss module's name for the model


def shard(net: nn.Module, model: TraceModel) -> nn.Module:
    """Apply ``fully_shard`` to each decoder layer, then to the loss module (root)."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(net)
    return net


def full_norm(gnorm: torch.Tensor) -> float:
    """A gradient norm as a float (a DTensor under FSDP: its full value)."""
    return float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)


def set_gradient_sync(net: nn.Module, sync: bool) -> None:
    """Reduce-scatter gradients only on a step's last micro-batch."""
    net.set_requires_gradient_sync(sync)  # type: ignore[operator]


def _barrier() -> None:
    torch.distributed.barrier()


def save_sharded(
    out: Path, step: int, net: nn.Module, opt, model: TraceModel, recipe: dict, keep: int
) -> Path:
    """Every process writes its shards into a temporary directory; rank 0 renames it
    into place once all have finished (so ``latest`` only ever names a complete one)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    rank = torch.distributed.get_rank()
    root = out / STATE_DIR
    tmp = root / f".tmp-{step_name(step)}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    msd, osd = get_state_dict(net, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))
    torch.save(torch.get_rng_state(), tmp / f"rng-{rank}.pt")
    _barrier()
    final = root / step_name(step)
    if rank == 0:
        cfg = model.config.replace(mm_vision_tower="clip_vision")
        save_vision_tower_config(cfg, tmp / "clip_vision")
        cfg.save(tmp)
        torch.save({"step": step, "recipe": recipe, "sharded": True}, tmp / STATE_FILE)
        final = publish_step(out, tmp, step, keep)
    _barrier()
    return final


def load_sharded(step_dir: Path, net: nn.Module, opt) -> None:
    """Restore weights, optimiser state and this process's RNG from a step directory."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(net, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(step_dir))
    set_state_dict(net, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng = step_dir / f"rng-{torch.distributed.get_rank()}.pt"
    if rng.is_file():
        torch.set_rng_state(torch.load(rng, weights_only=True))


def is_sharded(step_dir: Path) -> bool:
    return (step_dir / ".metadata").is_file()


def model_from_config(step_dir: Path, seed: int = 0) -> TraceModel:
    """A model of the step directory's config (weights to be loaded over it)."""
    cfg = TraceConfig.from_dir(step_dir)
    with torch.device("meta"):
        model = TraceModel(cfg)
    model.load_state_dict(dict(random_tensors(cfg, seed)), strict=True, assign=True)
    return model.float().train()


def full_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state on rank 0 (a collective: every process must call it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    sd = get_model_state_dict(net, options=opts)
    return {k[len(PREFIX) :]: v for k, v in sd.items() if k.startswith(PREFIX)}


def model_with(cfg: TraceConfig, state: dict[str, torch.Tensor]) -> TraceModel:
    with torch.device("meta"):
        model = TraceModel(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    return model


def convert_sharded(
    step_dir: str | Path, out: str | Path, dtype: str | None = None, tokenizer: Path | None = None
) -> Path:
    """A sharded step checkpoint -> a release-format checkpoint directory (one process)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    step_dir, out = Path(step_dir), Path(out)
    if not is_sharded(step_dir):
        raise ValueError(f"{step_dir} is not a sharded (FSDP) step checkpoint")
    cfg = TraceConfig.from_dir(step_dir)
    with tempfile.TemporaryDirectory() as td:
        dcp_to_torch_save(str(step_dir), f"{td}/full.pt")
        full = torch.load(f"{td}/full.pt", map_location="cpu", weights_only=False)
    state = {k[len(PREFIX) :]: v for k, v in full["model"].items() if k.startswith(PREFIX)}
    tok = tokenizer or step_dir.parent / "tokenizer.model"
    save_model(model_with(cfg, state), out, dtype=dtype or "fp32",
               tokenizer_model=tok if tok.is_file() else None)  # fmt: skip
    return out
