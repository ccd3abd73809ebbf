"""Training checkpoints: resumable step checkpoints and the release-format output.

Layout under the output directory OUT::

    OUT/config.json, model.safetensors, tokenizer.model, clip_vision/   the final model
    OUT/.train/step-0000100/        one resumable checkpoint (below)
    OUT/.train/latest               name of the newest complete one
    OUT/.train/final                the step OUT's model is from
    OUT/.train/tokenizer.model      the run's tokenizer (saved from)
    OUT/.train/prompts.json         the run's prompt strings, when not the release's

A replicated (DDP) run's step checkpoint is release-format weights + ``trainer_state.pt``
(step, optimiser, recipe, RNG), with LoRA adapters apart in ``adapter_model.safetensors``.
A sharded (FSDP2) run's is a ``torch.distributed.checkpoint`` directory (each process
writes its own shards of the weights and optimiser state, :mod:`training.sharded`).
Either is written into a temporary directory and renamed into place, and ``latest`` is
replaced atomically, so a run killed mid-write leaves the previous checkpoint usable.
``.train`` is hidden so that export's hash of the checkpoint covers only the model.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from trace_rt.model import TraceModel
from trace_rt.model.checkpoint import write_checkpoint
from trace_rt.prompts import MODEL_PROMPTS_FILE
from trace_rt.tokenizer import TOKENIZER_FILE
from training import lora
from training.recipe import TrainConfig

STATE_DIR = ".train"
STATE_FILE = "trainer_state.pt"
FINAL_FILE = "final"  # names the step whose model OUT holds


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def keep_file(out: Path, src: Path, name: str) -> Path:
    """A copy of *src* as ``OUT/.train/NAME``, which the run saves from.

    The source may be a step checkpoint that rotation deletes (``--resume`` with
    ``keep_checkpoints: 1``), or a user's directory that changes under a long run.
    """
    root = out / STATE_DIR
    root.mkdir(parents=True, exist_ok=True)
    kept = root / name
    if src.resolve() != kept.resolve():
        tmp = root / f".{name}.tmp"
        shutil.copyfile(src, tmp)
        os.replace(tmp, kept)
    return kept


def keep_tokenizer(out: Path, tok_file: Path) -> Path:
    """The run's tokenizer, kept in ``OUT/.train/`` (:func:`keep_file`)."""
    return keep_file(out, tok_file, TOKENIZER_FILE)


def write_weights(
    model: TraceModel, path: Path, dtype, tok_file: Path | None, prompts_file: Path | None = None
) -> None:
    """Release-format weights of *model* (LoRA adapters, if any, left out), with the
    prompt strings it was trained with as ``prompts.json`` when they are not the release's."""
    dt = dtype or model.lm_head.weight.dtype
    if isinstance(dt, str):
        from trace_rt.model.checkpoint import torch_dtype

        dt = torch_dtype(dt)
    tensors = ((k, v.detach()) for k, v in lora.base_state(model).items())
    write_checkpoint(model.config, path, tensors, dtype=dt, tokenizer_model=tok_file)
    if prompts_file is not None:
        shutil.copyfile(prompts_file, path / MODEL_PROMPTS_FILE)
    adapters = lora.adapter_state(model)
    if adapters:
        save_file(adapters, str(path / lora.ADAPTER_FILE), metadata={"format": "pt"})


def load_adapters(model: TraceModel, path: Path) -> None:
    lora.load_adapters(model, load_file(str(path / lora.ADAPTER_FILE)))


def step_name(step: int) -> str:
    return f"step-{step:07d}"


def publish_step(out: Path, tmp: Path, step: int, keep: int) -> Path:
    """Rename a finished temporary step directory into place, point ``latest`` at it and
    drop the oldest beyond *keep*."""
    root = out / STATE_DIR
    final = root / step_name(step)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    atomic_write(root / "latest", final.name + "\n")
    kept = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in kept[: -max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_step(
    out: Path,
    step: int,
    model: TraceModel,
    opt,
    rc: TrainConfig,
    tok_file: Path,
    prompts_file: Path | None = None,
) -> Path:
    """A resumable checkpoint of a replicated run after *step* optimiser steps."""
    root = out / STATE_DIR
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{step_name(step)}"
    shutil.rmtree(tmp, ignore_errors=True)
    write_weights(model, tmp, torch.float32, tok_file, prompts_file)
    state = {
        "step": step,
        "optimizer": opt.state_dict(),
        "recipe": rc.to_dict(),
        "torch_rng": torch.get_rng_state(),
    }
    torch.save(state, tmp / STATE_FILE)
    return publish_step(out, tmp, step, rc.keep_checkpoints)


def latest_step_dir(out: Path) -> Path | None:
    latest = out / STATE_DIR / "latest"
    if not latest.is_file():
        return None
    d = out / STATE_DIR / latest.read_text().strip()
    return d if (d / STATE_FILE).is_file() else None


def save_final(
    out: Path,
    model: TraceModel,
    dtype: str | None,
    tok_file: Path,
    step: int | None = None,
    prompts_file: Path | None = None,
) -> None:
    """The release-format model in OUT itself, and ``.train/final`` naming its step.

    ``config.json`` goes first and comes back last: a run killed while the files are
    renamed in leaves an OUT that does not load (and no ``final`` for this step), never
    one that silently loads the previous model or a mix; ``--resume`` rewrites it.
    """
    tmp = out / ".final-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    write_weights(model, tmp, dtype, tok_file, prompts_file)
    (out / STATE_DIR / FINAL_FILE).unlink(missing_ok=True)
    (out / "config.json").unlink(missing_ok=True)
    (out / lora.ADAPTER_FILE).unlink(missing_ok=True)
    (out / MODEL_PROMPTS_FILE).unlink(missing_ok=True)  # an earlier run's strings
    entries = sorted(tmp.iterdir(), key=lambda p: p.name == "config.json")
    for p in entries:
        dst = out / p.name
        if dst.is_dir():
            shutil.rmtree(dst)
        os.replace(p, dst)
    tmp.rmdir()
    if step is not None:
        atomic_write(out / STATE_DIR / FINAL_FILE, f"{step_name(step)}\n")


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
    atomic_write(log_file, "".join(ln + "\n" for ln in keep))
