"""``python -m training train``: the training loop.

One process or many under ``torchrun``: replicated weights (``parallel: ddp``: gloo on
CPU, nccl on CUDA, hccl on Ascend) or sharded ones (``parallel: fsdp``, FSDP2:
:mod:`training.sharded`). The data order is a pure function of (seed, step), so a run
resumed from a checkpoint sees exactly the batches it would have seen: the next step's
loss is the same. Frames are decoded in ``num_workers`` data-loader processes, only the
sampled ones. ``global_batch`` and ``epochs`` become ``grad_accum`` and ``max_steps``
once the data set and the process count are known (:meth:`TrainConfig.resolved`).

Output: OUT holds the final release-format model (``trace-rt run``, export), the recipe
(``train_recipe.yaml``), per-step metrics (``train_log.jsonl``) and resumable
checkpoints under ``OUT/.train/`` (:mod:`training.checkpoints`).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trace_rt.errors import DeviceError
from trace_rt.model import TraceModel, load_model
from trace_rt.model.checkpoint import random_tensors
from trace_rt.prompts import MODEL_PROMPTS_FILE, PromptSet, model_prompts_file
from trace_rt.tokenizer import TOKENIZER_FILE, TextTokenizer, default_tokenizer_model
from training import lora, sharded
from training.checkpoints import (
    STATE_DIR,
    STATE_FILE,
    keep_file,
    keep_tokenizer,
    latest_step_dir,
    load_adapters,
    save_final,
    save_step,
    trim_log,
)
from training.data import load_split
from training.dataset import Batch, GroundingDataset
from training.loader import Dist, batch_loader, micro_batches
from training.loss import TraceLoss
from training.presets import load_preset
from training.recipe import GROUPS, TrainConfig, param_group

LOG_FILE = "train_log.jsonl"
RECIPE_FILE = "train_recipe.yaml"  # the resolved recipe, beside the model
__all__ = ["STATE_DIR", "Dist", "batch_loader", "build_model", "micro_batches", "train", "trim_log"]
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


def keep_freed_memory() -> bool:
    """Keep freed blocks in the process heap instead of returning them to the OS (glibc).

    Every step frees and reallocates the same large tensors (the [vocab, hidden]
    gradients of ``embed_tokens`` and ``lm_head``: 8 MB each at ``tiny``'s width). glibc
    unmaps such blocks on free and trims the heap top, so each step faults their pages
    in again: ~4000 minor faults a step and ~17 % of a ``tiny`` CPU step (57.7 -> 47.2 ms
    measured on the lookup recipe). Applies to this process; returns False where the C
    library is not glibc (nothing changed).
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    return bool(
        mallopt(m_mmap_threshold, 32 << 20)  # glibc's ceiling for the threshold
        and mallopt(m_trim_threshold, 1 << 30)
        and mallopt(m_top_pad, 64 << 20)
    )


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


def _group(name: str) -> str:
    return "lora" if lora.is_adapter(name) else param_group(name)


def set_trainable(model: TraceModel, groups: tuple[str, ...]) -> dict[str, int]:
    """Freeze all but *groups* (and LoRA adapters, which always learn)."""
    counts = dict.fromkeys((*GROUPS, "lora"), 0)
    for name, p in model.named_parameters():
        g = _group(name)
        on = g in groups or g == "lora"
        p.requires_grad_(on)
        if on:
            counts[g] += p.numel()
    return counts


def make_optimizer(model: TraceModel, rc: TrainConfig) -> torch.optim.Optimizer:
    by_group: dict[str, list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            by_group.setdefault(_group(name), []).append(p)
    groups = [
        {"params": ps, "lr": rc.lr * rc.lr_scale.get(g, 1.0), "name": g}
        for g, ps in by_group.items()
    ]
    kw = {"lr": rc.lr, "betas": rc.betas, "weight_decay": rc.weight_decay}
    if rc.parallel == "fsdp":  # DTensor parameters: the default (foreach) kernel
        return torch.optim.AdamW(groups, **kw)
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
    data_folder: str | Path | None = None,
    until: int | None = None,
) -> dict[str, Any]:
    """Train per *rc*; returns a summary (steps, first/last loss, seconds).

    *until* pauses the run after that many steps of its schedule (which stays the
    recipe's ``max_steps``): a step checkpoint is written, not the final model, and
    ``resume`` continues it exactly, e.g. after comparing starts at that step.
    """
    out = Path(out)
    # A bad --data fails before anything else.
    samples = load_split(data, rc.on_bad_sample, data_folder)
    if rc.tasks is not None:
        samples = [s for s in samples if s.task in rc.tasks]
    if rc.lora is not None and rc.parallel == "fsdp":
        raise ValueError("LoRA is for one device (parallel: ddp); FSDP trains full weights")
    dist, device = init_distributed(rc.device)
    if device.type == "cpu":
        keep_freed_memory()
    torch.manual_seed(rc.seed)
    ok = False
    try:
        run = _setup(rc, samples, out, dist, device, init, preset, resume)
        show = dist.main and (sys.stderr.isatty() if progress is None else progress)
        if until is not None and not run.start_step < until < run.rc.max_steps:
            raise ValueError(f"until must lie after the start step {run.start_step} and "
                             f"before max_steps {run.rc.max_steps}, got {until}")  # fmt: skip
        summary = _loop(run.rc, run, out, dist, device, show, until)
        ok = True
        return summary
    finally:
        if dist.world > 1 and torch.distributed.is_initialized():
            if ok:
                # A rank that tears gloo down while its peer still has a collective in
                # flight aborts at exit ("terminate called without an active exception");
                # after an error the peer may never arrive, so only a clean end waits.
                torch.distributed.barrier()
            torch.distributed.destroy_process_group()


@dataclass
class _Run:
    """What the loop works on, from :func:`_setup`."""

    rc: TrainConfig  # resolved: grad_accum and max_steps known
    model: TraceModel
    net: nn.Module  # the loss module (DDP-wrapped or FSDP-sharded under torchrun)
    opt: torch.optim.Optimizer
    dataset: GroundingDataset
    tok_file: Path
    start_step: int
    prompts_file: Path | None = None  # the run's prompt strings (None: the release's)

    @property
    def fsdp(self) -> bool:
        return self.rc.parallel == "fsdp" and torch.distributed.is_initialized()


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


def _model(rc, resume_dir, init, preset) -> tuple[TraceModel, Path]:
    if resume_dir is not None and sharded.is_sharded(resume_dir):
        # The weights come from the shards; the model is rebuilt from the saved config.
        model = sharded.model_from_config(resume_dir, rc.seed)
        return model, resume_dir.parent / TOKENIZER_FILE
    # The step checkpoint holds the weights; init/preset only matter on a fresh start.
    model, tok_file = build_model(resume_dir or init, None if resume_dir else preset,
                                  rc.num_frames, rc.seed)  # fmt: skip
    if rc.lora is not None:
        lora.inject(model, lora.LoraConfig.from_dict(rc.lora))
        if resume_dir is not None:
            load_adapters(model, resume_dir)
    return model, tok_file


def _prompts_file(rc: TrainConfig, out: Path, resume_dir: Path | None, init) -> Path | None:
    """The prompt strings the run trains with: resuming, the run's own copy; else the
    recipe's ``prompts_file``; else the starting checkpoint's own (``prompts.json``: a
    model answers well only to the wording it was trained on); else the release's (None).
    """
    kept = out / STATE_DIR / MODEL_PROMPTS_FILE
    if resume_dir is not None and kept.is_file():
        return kept
    if rc.prompts_file is not None:
        return Path(rc.prompts_file)
    return model_prompts_file(init) if resume_dir is None and init is not None else None


def _setup(rc, samples, out, dist, device, init, preset, resume) -> _Run:
    """Model, data set, optimiser and loss module; restored from OUT with *resume*."""
    resume_dir, state = _start_state(out, resume)
    model, tok_file = _model(rc, resume_dir, init, preset)
    prompts_file = _prompts_file(rc, out, resume_dir, init)
    counts = set_trainable(model, rc.trainable)
    dataset = GroundingDataset(
        samples,
        model.config,
        TextTokenizer.from_file(tok_file),
        num_frames=rc.num_frames,
        sampling=rc.sampling,
        snap_times=rc.snap_times,
        out_of_range=rc.out_of_range,
        template=rc.template,
        answer_space=rc.answer_space,
        prompts=PromptSet.load(prompts_file),
        on_bad=rc.on_bad_sample,
        seed=rc.seed,
        probe_workers=rc.num_workers,
        cache_frames=rc.cache_frames,
        frame_words=rc.frame_words,
        slot_targets=rc.slot_target > 0,
        frame_word_slots=rc.frame_word_slots,
    )
    rc = rc.resolved(len(dataset), dist.world)
    model.to(device)
    net: nn.Module = TraceLoss(
        model, rc.gradient_checkpointing, rc.slot_target, ordered_slots=bool(rc.frame_word_slots)
    )
    fsdp = rc.parallel == "fsdp" and dist.world > 1
    if fsdp:
        net = sharded.shard(net, model)
    opt = make_optimizer(model, rc)
    start_step = 0
    if state is not None:
        start_step = int(state["step"])
        if state.get("sharded"):
            sharded.load_sharded(resume_dir, net, opt)
        else:
            opt.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["torch_rng"])
    if dist.world > 1 and not fsdp:
        net = nn.parallel.DistributedDataParallel(
            net,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True,  # e.g. CLIP layers past the selected one
        )
    if dist.main:
        import yaml

        out.mkdir(parents=True, exist_ok=True)
        tok_file = keep_tokenizer(out, tok_file)
        if prompts_file is not None:
            prompts_file = keep_file(out, prompts_file, MODEL_PROMPTS_FILE)
        trim_log(out / LOG_FILE, start_step)
        (out / RECIPE_FILE).write_text(yaml.safe_dump(rc.to_dict(), sort_keys=False))
        trainable = {g: n for g, n in counts.items() if n}
        log.info(
            "%d samples, %d processes (%s) on %s, global batch %d, trainable %s, steps %d..%d",
            len(dataset), dist.world, rc.parallel, device,
            rc.batch_size * rc.grad_accum * dist.world, trainable, start_step, rc.max_steps,
        )  # fmt: skip
    else:
        tok_file = out / STATE_DIR / TOKENIZER_FILE
    return _Run(rc, model, net, opt, dataset, tok_file, start_step, prompts_file)


def _sync_ctx(run: _Run, sync: bool):
    """Skip the gradient all-reduce (DDP) / reduce-scatter (FSDP) but on the last
    micro-batch of a step."""
    if run.fsdp:
        sharded.set_gradient_sync(run.net, sync)
        return contextlib.nullcontext()
    if sync or not isinstance(run.net, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return run.net.no_sync()


def _step(rc: TrainConfig, run: _Run, dist: Dist, device: torch.device, step: int,
          batches: Iterator[Batch]) -> dict:  # fmt: skip
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
    for m in range(rc.grad_accum):
        batch: Batch = next(batches).to(device)
        ctx = _sync_ctx(run, m + 1 == rc.grad_accum)
        with ctx, autocast:
            loss, parts = net(batch)
        with ctx:
            (loss / rc.grad_accum).backward()
        tot += float(loss.detach()) / rc.grad_accum
        for k, v in parts.items():
            parts_sum[k] = parts_sum.get(k, 0.0) + float(v.detach()) / rc.grad_accum
        n_samples += batch.size
    params = [p for p in run.model.parameters() if p.requires_grad]
    gnorm = sharded.full_norm(torch.nn.utils.clip_grad_norm_(params, rc.max_grad_norm))
    opt.step()
    return {
        "step": step + 1,
        "loss": _mean_across(tot, dist, device),
        **{f"loss_{k}": v for k, v in parts_sum.items()},
        "lr": opt.param_groups[0]["lr"],
        "grad_norm": gnorm,
        "samples_per_s": n_samples * dist.world / (time.perf_counter() - t0),
    }


def _save_step(run: _Run, out: Path, dist: Dist, step: int) -> None:
    _barrier(dist)
    if run.fsdp:
        sharded.save_sharded(out, step, run.net, run.opt, run.model, run.rc.to_dict(),
                             run.rc.keep_checkpoints)  # fmt: skip
    elif dist.main:
        save_step(out, step, run.model, run.opt, run.rc, run.tok_file, run.prompts_file)
    _barrier(dist)


def _save_final(run: _Run, out: Path, dist: Dist) -> None:
    rc = run.rc
    model = run.model
    if run.fsdp:  # gather the full weights onto rank 0
        state = sharded.full_state(run.net)
        model = sharded.model_with(model.config, state) if dist.main else model
    if dist.main:
        if rc.lora is not None and lora.LoraConfig.from_dict(rc.lora).merge:
            lora.merge(model)  # the run is over: fold the adapters in for the release format
        save_final(out, model, rc.save_dtype, run.tok_file, rc.max_steps, run.prompts_file)


def _loop(
    rc, run: _Run, out: Path, dist: Dist, device, show: bool, until: int | None = None
) -> dict[str, Any]:
    """Steps start_step..max_steps (or ..until: then only a step checkpoint), step
    checkpoints, then the final model in OUT."""
    stop = rc.max_steps if until is None else until
    losses: list[float] = []
    t_start = time.perf_counter()
    batches = batch_loader(run.dataset, rc, dist, run.start_step)
    with _progress(show) as bar:
        task = bar.add_task("", total=rc.max_steps, completed=run.start_step, loss=math.nan,
                            sps=0.0)  # fmt: skip
        for step in range(run.start_step, stop):
            rec = _step(rc, run, dist, device, step, batches)
            losses.append(rec["loss"])
            done = rec["step"]
            if dist.main:
                bar.update(task, completed=done, loss=rec["loss"], sps=rec["samples_per_s"])
                with (out / LOG_FILE).open("a") as f:
                    f.write(json.dumps(rec) + "\n")
                if not show and (done % rc.log_every == 0 or done == stop):
                    _log_line(rec, rc.max_steps)
            if rc.save_every and done % rc.save_every == 0 and done < stop:
                _save_step(run, out, dist, done)
    if until is not None:
        _save_step(run, out, dist, until)  # resumable; the final model comes at max_steps
    else:
        if run.start_step < rc.max_steps:  # else: resumed a finished run, to redo OUT
            _save_step(run, out, dist, rc.max_steps)
        _save_final(run, out, dist)
        _barrier(dist)
    return {
        "start_step": run.start_step,
        "steps": stop,
        "paused": until is not None,
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
