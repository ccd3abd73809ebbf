"""``python -m training train``: the training loop.

One process or many under ``torchrun`` (DDP: gloo on CPU, nccl on CUDA, hccl on Ascend).
The data order is a pure function of (seed, step), so a run resumed from a checkpoint
sees exactly the batches it would have seen: the next step's loss is the same.

Output directory::

    OUT/config.json, model.safetensors, tokenizer.model, clip_vision/   the final model,
                                                          release format (trace-rt run, export)
    OUT/train_recipe.yaml, OUT/train_log.jsonl            the recipe and per-step metrics
    OUT/.train/step-0000100/                              resumable checkpoints: release-format
                                                          weights + trainer_state.pt
    OUT/.train/latest                                     name of the newest complete one

Checkpoints are written into a temporary directory and renamed into place, and ``latest``
is replaced atomically, so a run killed mid-write leaves the previous checkpoint usable.
``.train`` is hidden so that export's hash of the checkpoint covers only the model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trace_rt.config import TraceConfig
from trace_rt.model import TraceModel, load_model, save_model
from trace_rt.model.checkpoint import random_tensors
from trace_rt.prompts import PromptSet
from trace_rt.tokenizer import TOKENIZER_FILE, TextTokenizer, default_tokenizer_model
from training.data import load_split
from training.dataset import Batch, GroundingDataset, collate
from training.loss import TraceLoss
from training.presets import load_preset
from training.recipe import GROUPS, TrainConfig, param_group

STATE_DIR = ".train"
STATE_FILE = "trainer_state.pt"
log = logging.getLogger("training")


# ---- devices and processes -----------------------------------------------------------
def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto``: CUDA, else Ascend (``torch_npu``, when installed), else CPU."""
    if name in ("auto", "npu"):
        try:
            import torch_npu  # noqa: F401  (registers the "npu" device)

            npu_ok = torch.npu.is_available()  # type: ignore[attr-defined]
            if npu_ok and (name == "npu" or not torch.cuda.is_available()):
                return torch.device("npu", local_rank)
        except ImportError:
            if name == "npu":
                raise RuntimeError("device 'npu' needs torch_npu (Ascend CANN)") from None
    if name in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if name == "cuda":
        raise RuntimeError("device 'cuda' requested but torch sees no CUDA device")
    return torch.device("cpu")


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> tuple[Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dist = Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = pick_device(device_name, dist.local_rank)
    if world > 1:
        backend = {"cuda": "nccl", "npu": "hccl"}.get(device.type, "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend)
    return dist, device


# ---- model ---------------------------------------------------------------------------
def build_model(
    init: str | Path | None, preset: str | None, num_frames: int | None, seed: int
) -> tuple[TraceModel, Path]:
    """(fp32 model, tokenizer file): from a checkpoint, or random weights of a preset."""
    if (init is None) == (preset is None):
        raise ValueError("give exactly one of --init CKPT or --preset NAME")
    if init is not None:
        model = load_model(init, dtype=torch.float32)
        tok_file = Path(init) / TOKENIZER_FILE
    else:
        cfg = load_preset(preset)
        with torch.device("meta"):
            model = TraceModel(cfg)
        model.load_state_dict(dict(random_tensors(cfg, seed)), strict=True, assign=True)
        tok_file = default_tokenizer_model()
    if num_frames is not None and num_frames != model.config.num_frames:
        # The frame count is data, not weights: it travels in config.json.
        model.config = model.config.replace(num_frames=num_frames)
    return model.train(), tok_file


def set_trainable(model: TraceModel, groups: tuple[str, ...]) -> dict[str, int]:
    counts = dict.fromkeys(GROUPS, 0)
    for name, p in model.named_parameters():
        g = param_group(name)
        p.requires_grad_(g in groups)
        if g in groups:
            counts[g] += p.numel()
    return counts


def make_optimizer(model: TraceModel, rc: TrainConfig) -> torch.optim.Optimizer:
    by_group: dict[str, list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            by_group.setdefault(param_group(name), []).append(p)
    groups = [
        {"params": ps, "lr": rc.lr * rc.lr_scale.get(g, 1.0), "name": g}
        for g, ps in by_group.items()
    ]
    kw = {"lr": rc.lr, "betas": rc.betas, "weight_decay": rc.weight_decay}
    try:  # the fused kernel is several times faster (CPU and CUDA); not on every device
        return torch.optim.AdamW(groups, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, **kw)


def lr_factor(step: int, rc: TrainConfig) -> float:
    """Linear warm-up then cosine decay to ``min_lr_ratio`` (step counts from 0)."""
    warm = rc.warmup_steps or math.ceil(rc.warmup_ratio * rc.max_steps)
    if step < warm:
        return (step + 1) / warm
    u = min(1.0, (step - warm) / max(1, rc.max_steps - warm))
    return rc.min_lr_ratio + (1 - rc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * u))


# ---- data order ----------------------------------------------------------------------
def micro_batches(n: int, rc: TrainConfig, dist: Dist, step: int) -> Iterator[list[tuple]]:
    """The (index, epoch) lists of this process's micro-batches for optimiser *step*.

    The stream of samples is epoch-wise permutations seeded by (seed, epoch); global
    micro-batch k covers stream positions [k*B*W, (k+1)*B*W) and rank r takes its B.
    """
    bw = rc.batch_size * dist.world
    perms: dict[int, np.ndarray] = {}
    for m in range(rc.grad_accum):
        k = step * rc.grad_accum + m
        out = []
        first = k * bw + dist.rank * rc.batch_size
        for p in range(first, first + rc.batch_size):
            epoch = p // n
            if epoch not in perms:
                perms[epoch] = np.random.default_rng((rc.seed, epoch)).permutation(n)
            out.append((int(perms[epoch][p % n]), epoch))
        yield out


# ---- checkpoints ---------------------------------------------------------------------
def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_step(
    out: Path, step: int, model: TraceModel, opt, rc: TrainConfig, tok_file: Path
) -> Path:
    """A resumable checkpoint after *step* optimiser steps (written atomically)."""
    root = out / STATE_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp, dtype=torch.float32, tokenizer_model=tok_file)
    state = {
        "step": step,
        "optimizer": opt.state_dict(),
        "recipe": rc.to_dict(),
        "torch_rng": torch.get_rng_state(),
    }
    torch.save(state, tmp / STATE_FILE)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _atomic_write(root / "latest", final.name + "\n")
    kept = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in kept[: -max(1, rc.keep_checkpoints)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_step_dir(out: Path) -> Path | None:
    latest = out / STATE_DIR / "latest"
    if not latest.is_file():
        return None
    d = out / STATE_DIR / latest.read_text().strip()
    return d if (d / STATE_FILE).is_file() else None


def save_final(out: Path, model: TraceModel, dtype: str | None, tok_file: Path) -> None:
    """The release-format model in OUT itself; files are renamed in, config.json last."""
    tmp = out / ".final-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp, dtype=dtype, tokenizer_model=tok_file)
    entries = sorted(tmp.iterdir(), key=lambda p: p.name == "config.json")
    for p in entries:
        dst = out / p.name
        if dst.is_dir():
            shutil.rmtree(dst)
        os.replace(p, dst)
    tmp.rmdir()


# ---- the loop ------------------------------------------------------------------------
def _progress(enabled: bool):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]train[/bold]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  {task.fields[sps]:.1f} samples/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )


def train(
    rc: TrainConfig,
    data: str | Path,
    out: str | Path,
    *,
    init: str | Path | None = None,
    preset: str | None = None,
    resume: bool = False,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Train per *rc*; returns a summary (steps, first/last loss, seconds)."""
    out = Path(out)
    dist, device = init_distributed(rc.device)
    torch.manual_seed(rc.seed)
    try:
        return _train(rc, Path(data), out, dist, device, init, preset, resume, progress)
    finally:
        if dist.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train(rc, data, out, dist, device, init, preset, resume, progress) -> dict[str, Any]:
    start_step = 0
    resume_dir = latest_step_dir(out) if resume else None
    if resume and resume_dir is None:
        log.warning("--resume: no checkpoint under %s; starting from scratch", out / STATE_DIR)
    if not resume and (out / STATE_DIR / "latest").exists():
        # Mixing two runs' checkpoints and logs in one directory would corrupt both.
        raise FileExistsError(
            f"{out} already holds training checkpoints: pass --resume to continue that run "
            "or choose a new --out"
        )
    if resume_dir is not None:
        # The step checkpoint holds the weights; init/preset only matter on a fresh start.
        state = torch.load(resume_dir / STATE_FILE, map_location="cpu", weights_only=False)
        start_step = int(state["step"])
        model, tok_file = build_model(resume_dir, None, rc.num_frames, rc.seed)
    else:
        model, tok_file = build_model(init, preset, rc.num_frames, rc.seed)
    cfg: TraceConfig = model.config
    tok = TextTokenizer.from_file(tok_file)
    counts = set_trainable(model, rc.trainable)
    samples = load_split(data, rc.on_bad_sample)
    if rc.tasks is not None:
        samples = [s for s in samples if s.task in rc.tasks]
    dataset = GroundingDataset(
        samples,
        cfg,
        tok,
        sampling=rc.sampling,
        snap_times=rc.snap_times,
        template=rc.template,
        prompts=PromptSet.load(rc.prompts_file),
        on_bad=rc.on_bad_sample,
        seed=rc.seed,
    )
    model.to(device)
    opt = make_optimizer(model, rc)
    if resume_dir is not None:
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
    net: nn.Module = TraceLoss(model, rc.gradient_checkpointing)
    if dist.world > 1:
        net = nn.parallel.DistributedDataParallel(
            net,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True,  # e.g. CLIP layers past the selected one
        )
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        import yaml

        (out / "train_recipe.yaml").write_text(yaml.safe_dump(rc.to_dict(), sort_keys=False))
        trainable = {g: n for g, n in counts.items() if n}
        log.info(
            "%d samples, %d processes on %s, trainable %s, steps %d..%d",
            len(dataset), dist.world, device, trainable, start_step, rc.max_steps,
        )  # fmt: skip
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if rc.dtype == "bf16"
        else contextlib.nullcontext()
    )
    show = dist.main and (sys.stderr.isatty() if progress is None else progress)
    log_file = out / "train_log.jsonl"
    losses: list[float] = []
    t_start = time.perf_counter()
    with _progress(show) as bar:
        task = bar.add_task("", total=rc.max_steps, completed=start_step, loss=math.nan, sps=0.0)
        for step in range(start_step, rc.max_steps):
            t0 = time.perf_counter()
            for g in opt.param_groups:
                g["lr"] = rc.lr * rc.lr_scale.get(g["name"], 1.0) * lr_factor(step, rc)
            opt.zero_grad(set_to_none=True)
            tot, parts_sum, n_samples = 0.0, {}, 0
            for m, items in enumerate(micro_batches(len(dataset), rc, dist, step)):
                batch: Batch = collate([dataset.get(i, e) for i, e in items]).to(device)
                # DDP all-reduces gradients only on the last micro-batch of a step.
                sync = m + 1 == rc.grad_accum or dist.world == 1
                ctx = contextlib.nullcontext() if sync else net.no_sync()
                with ctx, autocast:
                    loss, parts = net(batch)
                with ctx:
                    (loss / rc.grad_accum).backward()
                tot += float(loss.detach()) / rc.grad_accum
                for k, v in parts.items():
                    parts_sum[k] = parts_sum.get(k, 0.0) + float(v.detach()) / rc.grad_accum
                n_samples += batch.size
            params = [p for p in model.parameters() if p.requires_grad]
            gnorm = torch.nn.utils.clip_grad_norm_(params, rc.max_grad_norm)
            opt.step()
            tot = _mean_across(tot, dist, device)
            losses.append(tot)
            dt = time.perf_counter() - t0
            sps = n_samples * dist.world / dt
            done = step + 1
            if dist.main:
                bar.update(task, completed=done, loss=tot, sps=sps)
                rec = {
                    "step": done,
                    "loss": tot,
                    **{f"loss_{k}": v for k, v in parts_sum.items()},
                    "lr": opt.param_groups[0]["lr"],
                    "grad_norm": float(gnorm),
                    "samples_per_s": sps,
                }
                with log_file.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
                if not show and (done % rc.log_every == 0 or done == rc.max_steps):
                    heads = " ".join(f"{k} {v:.3f}" for k, v in parts_sum.items())
                    log.info("step %d/%d loss %.4f (%s) %.1f samples/s",
                             done, rc.max_steps, tot, heads, sps)  # fmt: skip
            if rc.save_every and done % rc.save_every == 0 and done < rc.max_steps:
                _barrier(dist)
                if dist.main:
                    save_step(out, done, model, opt, rc, tok_file)
                _barrier(dist)
    _barrier(dist)
    if dist.main:
        save_step(out, rc.max_steps, model, opt, rc, tok_file)
        save_final(out, model, rc.save_dtype, tok_file)
    _barrier(dist)
    return {
        "start_step": start_step,
        "steps": rc.max_steps,
        "losses": losses,
        "seconds": time.perf_counter() - t_start,
        "processes": dist.world,
    }


def _mean_across(x: float, dist: Dist, device: torch.device) -> float:
    if dist.world == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return float(t) / dist.world


def _barrier(dist: Dist) -> None:
    if dist.world > 1:
        torch.distributed.barrier()
