"""Moment retrieval (or dense captions) with every frame shown as its ``frame_words``
instead of its pixels.

Usage: python -m benchmarks.training_words_eval MODEL_DIR VAL_JSON [--task mr|dvc]
[--out FILE.json]

Reads how well a model trained with ``frame_words`` (training/README.md; stage A of the
lookup curriculum, ``tiny-synthetic-lookup-words``) does the lookup on the words alone,
before anything is moved to pixels. The evaluation is ``python -m training eval``'s own
(:func:`training.evaluate.evaluate_mr`, ``--task dvc``
:func:`training.evaluate.evaluate_dvc`: the serving pipeline, torch backend, greedy, the
original's parsing rule, the ``llama_2`` prompt in the model's own strings), except that
each frame's slot positions hold the token embeddings of the words covering its time, then
the filler, exactly as the training data set puts them
(:func:`training.dataset.frame_word_ids`, in the slot layout of the model's training
recipe, ``frame_word_slots`` in its ``train_recipe.yaml``); the time tokens stay the
frame's own. Needs a
split whose samples carry ``frame_words`` (``synth-data --frame-words``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from trace_rt.backends.torch_backend import TorchBackend
from trace_rt.pipeline import Pipeline
from trace_rt.prompts import PromptSet
from trace_rt.tokenizer import TextTokenizer
from trace_rt.tokens import LOCAL_VOCAB
from training.checkpoints import STATE_FILE
from training.data import load_split
from training.dataset import frame_word_ids
from training.evaluate import evaluate_dvc, evaluate_mr
from training.loss import words_for_pixels
from training.trainer import RECIPE_FILE

EVALUATE = {"mr": evaluate_mr, "dvc": evaluate_dvc}


def _time_of(row: np.ndarray) -> float:
    """A frame's 6 local time ids -> its timestamp in seconds ('0012.5' -> 12.5)."""
    return float("".join(LOCAL_VOCAB[int(i)] for i in row))


class WordsBackend(TorchBackend):
    """The torch backend with each frame's slots replaced by the current video's words."""

    def __init__(
        self, model_dir: str | Path, tokenizer: TextTokenizer, layout: tuple[str, ...] = ()
    ):
        super().__init__(model_dir)
        self.tokenizer, self.layout = tokenizer, layout
        self.words: tuple[tuple[float, float, str], ...] = ()

    def project(self, features: torch.Tensor, time_ids: np.ndarray) -> torch.Tensor:
        block = super().project(features, time_ids)  # [F*(S+6), H]
        times = [_time_of(row) for row in np.asarray(time_ids)]
        ids = frame_word_ids(
            self.words, times, self.config.mm_num_slots, self.tokenizer, self.layout
        )
        frame_ids = torch.from_numpy(ids).to(block.device)[None]  # [1, F, S]
        with torch.no_grad():
            return words_for_pixels(self.model, block[None], frame_ids)[0]


class WordsPipeline(Pipeline):
    """Sets the backend's words from the split before each request."""

    def __init__(self, backend: WordsBackend, words: dict[str, Any], prompts: PromptSet):
        super().__init__(backend, backend.tokenizer, prompts)
        self.words = words

    def run(self, video: Any, task: str | None = "dvc", **kw: Any) -> dict[str, Any]:
        self.backend.words = self.words[str(video)]
        return super().run(video, task, **kw)


def slot_layout(model_dir: str | Path) -> tuple[str, ...]:
    """The ``frame_word_slots`` a model was trained with: from the run's
    ``train_recipe.yaml`` (a run's output) or ``trainer_state.pt`` (a step checkpoint)."""
    model_dir = Path(model_dir)
    recipe: dict[str, Any] = {}
    if (model_dir / RECIPE_FILE).is_file():
        recipe = yaml.safe_load((model_dir / RECIPE_FILE).read_text()) or {}
    elif (model_dir / STATE_FILE).is_file():
        recipe = torch.load(model_dir / STATE_FILE, weights_only=True).get("recipe", {})
    return tuple(recipe.get("frame_word_slots") or ())


def words_eval(model_dir: str | Path, split: str | Path, task: str = "mr") -> dict[str, Any]:
    """``evaluate_mr``'s (or, *task* ``dvc``, ``evaluate_dvc``'s) report for *model_dir*
    on *split*, frames shown as words."""
    if task not in EVALUATE:
        raise ValueError(f"task must be one of {sorted(EVALUATE)}, got {task!r}")
    words = {str(s.video): s.frame_words for s in load_split(split) if s.task == task}
    missing = [v for v, w in words.items() if w is None]
    if missing:
        raise ValueError(f"{split}: {len(missing)} videos have no frame_words, e.g. {missing[0]}")
    layout = slot_layout(model_dir)
    backend = WordsBackend(model_dir, TextTokenizer.from_dir(model_dir), layout)
    pipe = WordsPipeline(backend, words, PromptSet.for_model(model_dir))
    report = EVALUATE[task](model_dir, split, pipeline=pipe)
    report["frames_shown_as"] = "frame_words"
    report["frame_word_slots"] = list(layout)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="checkpoint directory (torch)")
    ap.add_argument("split", help="split file whose samples carry frame_words")
    ap.add_argument("--out", help="also write the full report (predictions) as JSON here")
    ap.add_argument("--task", choices=sorted(EVALUATE), default="mr",
                    help="mr (default) or dvc: training eval's dense-caption reading")  # fmt: skip
    args = ap.parse_args(argv)
    report = words_eval(args.model, args.split, args.task)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    report.pop("predictions")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
