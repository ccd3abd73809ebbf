"""``make-checkpoint``: a checkpoint with random weights and the real Mistral tokenizer."""

from __future__ import annotations

from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from trace_rt.model.checkpoint import expected_shapes, random_tensors, torch_dtype, write_checkpoint
from trace_rt.tokenizer import default_tokenizer_model
from training.presets import load_preset


def make_checkpoint(
    out: str | Path,
    preset: str = "tiny",
    *,
    seed: int = 0,
    dtype: str | None = None,
    separate_vision_tower: bool = False,
    max_shard_gb: float = 4.0,
    progress: bool = True,
    force: bool = False,
) -> Path:
    """Write a random-weight checkpoint of *preset* to *out*.

    Tensors are generated and written one shard at a time, so even ``trace-7b`` needs only
    about one shard of memory (``max_shard_gb``), not the whole model.

    Args:
        out: checkpoint directory to create.
        preset: ``tiny``, ``small`` or ``trace-7b``.
        seed: weights are a pure function of (seed, weight name).
        dtype: storage dtype (fp32, fp16, bf16); defaults to the preset's ``torch_dtype``.
        separate_vision_tower: keep the CLIP weights in ``clip_vision/model.safetensors``
            instead of the checkpoint (the layout of checkpoints saved without the tower).
        max_shard_gb: shard size limit.
        progress: show a progress bar.
        force: replace a checkpoint already in *out* (refused otherwise).

    Raises:
        FileExistsError: *out* already holds a checkpoint and *force* is not set.
    """
    out = Path(out)
    taken = (out / "config.json").exists() or any(out.glob("model*.safetensors*"))
    if taken and not force:
        raise FileExistsError(
            f"{out} already holds a checkpoint; pass --force to overwrite it, or choose "
            "another directory"
        )
    cfg = load_preset(preset)
    dt = torch_dtype(dtype or cfg.torch_dtype)
    total = len(expected_shapes(cfg))
    with Progress(
        TextColumn(f"[bold]make-checkpoint {preset}[/bold]"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
        disable=not progress,
        transient=False,
    ) as bar:
        task = bar.add_task("", total=total)
        write_checkpoint(
            cfg,
            out,
            random_tensors(cfg, seed),
            dtype=dt,
            tokenizer_model=default_tokenizer_model(),
            separate_vision_tower=separate_vision_tower,
            max_shard_bytes=int(max_shard_gb * 2**30),
            on_tensor=lambda name: bar.update(task, advance=1, description=name),
        )
    return Path(out)
