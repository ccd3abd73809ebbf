"""``trace-rt batch --engine ray``: the batch as a Ray Data job.

videos (one row per video) -> ``map``: decode + preprocess in parallel Ray tasks (no model
loaded there) -> ``map_batches`` with a callable class on an actor pool: each actor loads
the model once and answers a video's questions with one :meth:`Pipeline.run_many` on the
decoded frames -> records streamed back to the driver, which appends them to the results
file as they arrive. Ray Data's streaming executor bounds the rows in flight between the
stages (backpressure), so decoding never runs far ahead of the actors.

On a cluster (``--address``) every node needs trace-rt installed and the videos at the same
paths (a shared filesystem); the driver writes the results.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from trace_rt.batch import Item, VideoWork, answer_group

DECODE_MEMORY = 512 << 20  # bytes reserved per decode task


def _frames(model: Path, options: dict[str, Any]) -> int:
    """The frame count :func:`trace_rt.run_api.load_pipeline` will use (flag, card, config)."""
    from trace_rt.config import TraceConfig
    from trace_rt.model_cards import resolve_card

    if options.get("frames") is not None:
        return int(options["frames"])
    card = resolve_card(model, options.get("preset"))
    return card.frames if card is not None else TraceConfig.from_dir(model).num_frames


def _decode(row: dict[str, Any], model: str, frames: int) -> dict[str, Any]:
    """Ray task: a video row -> its decoded, preprocessed clip (pickled) or the error. Only
    the model's config is read here, never its weights."""
    from trace_rt.config import TraceConfig
    from trace_rt.pipeline import decode_clip

    try:
        clip = decode_clip(TraceConfig.from_dir(model), row["video"], frames)
        return {**row, "clip": pickle.dumps(clip), "error": ""}
    except Exception as e:  # recorded on each of this video's items by the actor
        return {**row, "clip": b"", "error": f"{type(e).__name__}: {e}"}


class _Answer:
    """Ray actor: loads the model once; answers each decoded video's questions."""

    def __init__(self, model: str, options: dict[str, Any], slots: int):
        from trace_rt.run_api import load_pipeline

        self.pipe, self.gen, _card, self.frames = load_pipeline(Path(model), slots, options)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = []
        for vid, video, items, clip, error in zip(
            batch["video_id"],
            batch["video"],
            batch["items"],
            batch["clip"],
            batch["error"],
            strict=True,
        ):
            group = VideoWork(str(vid), str(video), [Item(**d) for d in json.loads(items)])
            if error:
                out += [{**it.header(), "status": "error", "error": error} for it in group.items]
                continue
            video_clip = pickle.loads(clip)  # made by _decode in this job
            out += answer_group(self.pipe, group, video_clip, self.frames, self.gen)
        return {"record": np.array([json.dumps(r, ensure_ascii=False) for r in out], object)}


def run_ray(
    groups: list[VideoWork],
    model: Path,
    options: dict[str, Any],
    *,
    address: str | None = None,
    actors: int = 1,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
    decode_cpus: float = 1.0,
) -> Iterator[dict]:
    """Answer *groups* as a Ray Data job; yields records as the actors finish them.

    Args:
        address: a running cluster (``ray://HOST:10001`` or ``auto``); None starts a local
            one (or uses the one this process already started).
        actors: model replicas (actors), each loading the model once.
        cpus_per_actor, gpus_per_actor: resources each actor reserves.
        decode_cpus: CPUs each decode task reserves.
    """
    try:
        import ray
        import ray.data
    except ImportError as e:
        raise ImportError("--engine ray needs Ray Data: pip install 'trace-rt[ray]'") from e
    slots = max(1, min(options.pop("max_sequences", 8), max(len(g.items) for g in groups)))
    frames = _frames(model, options)
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, log_to_driver=False, include_dashboard=False)
    try:
        rows = [
            {
                "video_id": g.video_id,
                "video": g.video,
                "items": json.dumps([asdict(it) for it in g.items], ensure_ascii=False),
            }
            for g in groups
        ]
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # ours is on stderr already
        ds = ray.data.from_items(rows, override_num_blocks=len(rows))
        # A decode task holds a PyAV decoder and the clip at model resolution. Reserving
        # memory also keeps Ray Data from fusing decoding into the actors (it fuses stages
        # whose resource arguments are equal): decoding stays in its own parallel tasks.
        ds = ds.map(
            _decode,
            fn_kwargs={"model": str(model), "frames": frames},
            num_cpus=decode_cpus,
            memory=DECODE_MEMORY,
        )
        ds = ds.map_batches(
            _Answer,
            fn_constructor_kwargs={"model": str(model), "options": options, "slots": slots},
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=cpus_per_actor,
            num_gpus=gpus_per_actor,
        )
        for row in ds.iter_rows():
            yield json.loads(row["record"])
    finally:
        if started:
            ray.shutdown()
