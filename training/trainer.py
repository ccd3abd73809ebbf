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
    OUT/.train/final                                      the step OUT's model is from
    OUT/.train/tokenizer.model                            the run's tokenizer (saved from)

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

from trace_rt.errors import DeviceError
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
FINAL_FILE = "final"  # names the step whose model OUT holds
LOG_FILE = "train_log.jsonl"
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
                raise DeviceError("device 'npu' needs torch_npu (Ascend CANN)") from None
    if name in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if name == "cuda":
        raise DeviceError("device 'cuda' requested but torch sees no CUDA device")
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


def keep_tokenizer(out: Path, tok_file: Path) -> Path:
    """A copy of the tokenizer in ``OUT/.train/`` that the run saves from.

    The source may be a step checkpoint that rotation deletes (``--resume`` with
    ``keep_checkpoints: 1``), or a user's directory that changes under a long run.
    """
    root = out / STATE_DIR
    root.mkdir(parents=True, exist_ok=True)
    kept = root / TOKENIZER_FILE
    if tok_file.resolve() != kept.resolve():
        tmp = root / f".{TOKENIZER_FILE}.tmp"
        shutil.copyfile(tok_file, tmp)
        os.replace(tmp, kept)
    return kept


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


def save_final(
    out: Path, model: TraceModel, dtype: str | None, tok_file: Path, step: int | None = None
) -> None:
    """The release-format model in OUT itself, and ``.train/final`` naming its step.

    ``config.json`` goes first and comes back last: a run killed while the files are
    renamed in leaves an OUT that does not load (and no ``final`` for this step), never
    one that silently loads the previous model or a mix; ``--resume`` rewrites it.
    """
    tmp = out / ".final-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp, dtype=dtype, tokenizer_model=tok_file)
    (out / STATE_DIR / FINAL_FILE).unlink(missing_ok=True)
    (out / "config.json").unlink(missing_ok=True)
    entries = sorted(tmp.iterdir(), key=lambda p: p.name == "config.json")
    for p in entries:
        dst = out / p.name
        if dst.is_dir():
            shutil.rmtree(dst)
        os.replace(p, dst)
    tmp.rmdir()
    if step is not None:
        _atomic_write(out / STATE_DIR / FINAL_FILE, f"step-{step:07d}\n")


def trim_log(log_file: Path, step: int) -> None:
    """Drop records after *step*: a resumed run logs those steps again."""
    if not log_file.is_file():
        return
    keep = []
    for line in log_file.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):  # a line cut short by a kill
            continue
    _atomic_write(log_file, "".join(ln + "\n" for ln in keep))


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
    samples = load_split(data, rc.on_bad_sample)  # a bad --data fails before anything else
    if rc.tasks is not None:
        samples = [s for s in samples if s.task in rc.tasks]
    dist, device = init_distributed(rc.device)
    torch.manual_seed(rc.seed)
    try:
        run = _setup(rc, samples, out, dist, device, init, preset, resume)
        show = dist.main and (sys.stderr.isatty() if progress is None else progress)
        return _loop(rc, run, out, dist, device, show)
    finally:
        if dist.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@dataclass
class _Run:
    """What the loop works on, from :func:`_setup`."""

    model: TraceModel
    net: nn.Module  # the loss module (DDP-wrapped under torchrun)
    opt: torch.optim.Optimizer
    dataset: GroundingDataset
    tok_file: Path
    start_step: int


def _start_state(out: Path, resume: bool) -> tuple[Path | None, dict | None]:
    """(step checkpoint to resume from, its trainer state), or (None, None)."""
    if not resume and (out / STATE_DIR / "latest").exists():
        # Mixing two runs' checkpoints and logs in one directory would corrupt both.
        raise FileExistsError(
            f"{out} already holds training checkpoints: pass --resume to continue that run "
            "or choose a new --out"
        )
    resume_dir = latest_step_dir(out) if resume else None
    if resume and resume_dir is None:
        log.warning("--resume: no checkpoint under %s; starting from scratch", out / STATE_DIR)
    if resume_dir is None:
        return None, None
    return resume_dir, torch.load(resume_dir / STATE_FILE, map_location="cpu", weights_only=False)


def _setup(rc, samples, out, dist, device, init, preset, resume) -> _Run:
    """Model, data set, optimiser and loss module; restored from OUT with *resume*."""
    resume_dir, state = _start_state(out, resume)
    # The step checkpoint holds the weights; init/preset only matter on a fresh start.
    model, tok_file = build_model(resume_dir or init, None if resume_dir else preset,
                                  rc.num_frames, rc.seed)  # fmt: skip
    counts = set_trainable(model, rc.trainable)
    dataset = GroundingDataset(
        samples,
        model.config,
        TextTokenizer.from_file(tok_file),
        sampling=rc.sampling,
        snap_times=rc.snap_times,
        template=rc.template,
        prompts=PromptSet.load(rc.prompts_file),
        on_bad=rc.on_bad_sample,
        seed=rc.seed,
    )
    model.to(device)
    opt = make_optimizer(model, rc)
    start_step = 0
    if state is not None:
        start_step = int(state["step"])
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
        import yaml

        out.mkdir(parents=True, exist_ok=True)
        tok_file = keep_tokenizer(out, tok_file)
        trim_log(out / LOG_FILE, start_step)
        (out / "train_recipe.yaml").write_text(yaml.safe_dump(rc.to_dict(), sort_keys=False))
        trainable = {g: n for g, n in counts.items() if n}
        log.info(
            "%d samples, %d processes on %s, trainable %s, steps %d..%d",
            len(dataset), dist.world, device, trainable, start_step, rc.max_steps,
        )  # fmt: skip
    return _Run(model, net, opt, dataset, tok_file, start_step)


def _step(rc: TrainConfig, run: _Run, dist: Dist, device: torch.device, step: int) -> dict:
    """One optimiser step (all its micro-batches); returns the step's log record."""
    t0 = time.perf_counter()
    opt, net = run.opt, run.net
    for g in opt.param_groups:
        g["lr"] = rc.lr * rc.lr_scale.get(g["name"], 1.0) * lr_factor(step, rc)
    opt.zero_grad(set_to_none=True)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if rc.dtype == "bf16"
        else contextlib.nullcontext()
    )
    tot, parts_sum, n_samples = 0.0, {}, 0
    for m, items in enumerate(micro_batches(len(run.dataset), rc, dist, step)):
        batch: Batch = collate([run.dataset.get(i, e) for i, e in items]).to(device)
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
    params = [p for p in run.model.parameters() if p.requires_grad]
    gnorm = torch.nn.utils.clip_grad_norm_(params, rc.max_grad_norm)
    opt.step()
    return {
        "step": step + 1,
        "loss": _mean_across(tot, dist, device),
        **{f"loss_{k}": v for k, v in parts_sum.items()},
        "lr": opt.param_groups[0]["lr"],
        "grad_norm": float(gnorm),
        "samples_per_s": n_samples * dist.world / (time.perf_counter() - t0),
    }


def _loop(rc, run: _Run, out: Path, dist: Dist, device, show: bool) -> dict[str, Any]:
    """Steps start_step..max_steps, step checkpoints, then the final model in OUT."""
    losses: list[float] = []
    t_start = time.perf_counter()
    with _progress(show) as bar:
        task = bar.add_task("", total=rc.max_steps, completed=run.start_step, loss=math.nan,
                            sps=0.0)  # fmt: skip
        for step in range(run.start_step, rc.max_steps):
            rec = _step(rc, run, dist, device, step)
            losses.append(rec["loss"])
            done = rec["step"]
            if dist.main:
                bar.update(task, completed=done, loss=rec["loss"], sps=rec["samples_per_s"])
                with (out / LOG_FILE).open("a") as f:
                    f.write(json.dumps(rec) + "\n")
                if not show and (done % rc.log_every == 0 or done == rc.max_steps):
                    _log_line(rec, rc.max_steps)
            if rc.save_every and done % rc.save_every == 0 and done < rc.max_steps:
                _barrier(dist)
                if dist.main:
                    save_step(out, done, run.model, run.opt, rc, run.tok_file)
                _barrier(dist)
    _barrier(dist)
    if dist.main:
        if run.start_step < rc.max_steps:  # else: resumed a finished run, to redo OUT
            save_step(out, rc.max_steps, run.model, run.opt, rc, run.tok_file)
        save_final(out, run.model, rc.save_dtype, run.tok_file, rc.max_steps)
    _barrier(dist)
    return {
        "start_step": run.start_step,
        "steps": rc.max_steps,
        "losses": losses,
        "seconds": time.perf_counter() - t_start,
        "processes": dist.world,
    }


def _log_line(rec: dict, max_steps: int) -> None:
    heads = " ".join(f"{k[5:]} {v:.3f}" for k, v in rec.items() if k.startswith("loss_"))
    log.info("step %d/%d loss %.4f (%s) %.1f samples/s",
             rec["step"], max_steps, rec["loss"], heads, rec["samples_per_s"])  # fmt: skip


def _mean_across(x: float, dist: Dist, device: torch.device) -> float:
    if dist.world == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return float(t) / dist.world


def _barrier(dist: Dist) -> None:
    if dist.world > 1:
        torch.distributed.barrier()
