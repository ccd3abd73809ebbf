"""The benchmarks ``trace-rt eval`` knows: their files, their task, the release's numbers.

Evaluation settings are the original's (``trace/eval/eval.sh``, ``evaluate.py``): the
``llama_2`` template, the task prompts of ``trace/prompts`` (``dvc-anet.txt`` for
ActivityNet dense captioning), queries stripped of surrounding whitespace, greedy
decoding, 512 new tokens, the checkpoint's frame count (128 for the release). The
video-QA benchmarks (``mvbench``, ``videomme``; task ``qa``) follow their own scripts:
see :mod:`trace_rt.evaluation.videoqa` (128 new tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trace_rt.evaluation import annotations as ann
from trace_rt.evaluation import videoqa as vqa

# trace-uni's MVBench accuracy per task, in the order of the original's task table.
_MVB = tuple(vqa.MVBENCH_TASKS.values())
_MVB_UNI = (68.1, 58.5, 72.5, 41.5, 73.5, 55.1, 71.5, 40.5, 25.0, 53.0)
_MVB_UNI += (88.5, 63.5, 38.5, 51.0, 52.5, 49.0, 59.5, 33.5, 49.5, 32.5)

# The release's published zero-shot results (the TRACE paper), in percent.
PUBLISHED: dict[tuple[str, str], dict[str, float]] = {
    ("youcook2", "dvc"): {"CIDEr": 8.1, "METEOR": 2.8, "SODA_c": 2.2, "F1": 22.4},
    ("charades-sta", "mr"): {"R@0.3": 58.6, "R@0.5": 40.3, "R@0.7": 19.4, "mIoU": 38.7},
    ("qvhighlights", "vhd"): {"mAP": 26.8, "HIT@1": 42.7},
    ("activitynet-captions", "dvc"): {"CIDEr": 25.9, "METEOR": 6.0, "SODA_c": 6.4, "F1": 39.3},
    ("activitynet-captions", "mr"): {"R@0.3": 53.0, "R@0.5": 37.7, "R@0.7": 24.0, "mIoU": 39.0},
    # trace-uni (general video-QA data added), the release's model card.
    ("mvbench", "qa"): {
        "accuracy": 53.8,
        **{f"accuracy · {t[0]}": v for t, v in zip(_MVB, _MVB_UNI, strict=True)},
    },
    ("videomme", "qa"): {  # without subtitles
        "accuracy": 49.6,
        "accuracy · duration=short": 58.2,
        "accuracy · duration=medium": 48.1,
        "accuracy · duration=long": 42.3,
    },
}
QA_BENCHMARKS = ("mvbench", "videomme")


@dataclass(frozen=True)
class Benchmark:
    name: str
    tasks: tuple[str, ...]  # the first is the default
    files: str  # what --annotations takes, for help and errors

    def prompt_task(self, task: str) -> str:
        """The prompt the original evaluates *task* with on this benchmark."""
        return "dvc_activitynet" if (self.name, task) == ("activitynet-captions", "dvc") else task


BENCHMARKS = {
    b.name: b
    for b in (
        Benchmark("charades-sta", ("mr",), "charades_sta_test.txt or a coco-format json"),
        Benchmark("qvhighlights", ("vhd",), "highlight_val_release.jsonl"),
        Benchmark("youcook2", ("dvc",), "youcookii_annotations_trainval.json"),
        Benchmark("activitynet-captions", ("dvc", "mr"), "val_1.json and/or val_2.json"),
        Benchmark("coco-format", ("mr", "dvc"), "a TimeIT/VTG-IT *.caption_coco_format.json"),
        Benchmark("mvbench", ("qa",), "MVBench's json/ directory or its per-task *.json files"),
        Benchmark("videomme", ("qa",), "Video-MME's test-*.parquet (pyarrow) or its JSON form"),
    )
}


def get_benchmark(name: str) -> Benchmark:
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise ann.AnnotationError(
            [f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}"]
        ) from None


def load(bench: Benchmark, files: Sequence[str | Path], task: str | None = None):
    """Read *files* for *bench*; returns ``(task, items)``: a list of
    :class:`~trace_rt.evaluation.annotations.MomentQuery`,
    :class:`~trace_rt.evaluation.annotations.HighlightQuery` or
    :class:`~trace_rt.evaluation.annotations.CaptionedVideo`."""
    files = [Path(f) for f in files]
    if not files:
        raise ann.AnnotationError(["no annotation file given (--annotations FILE)"])
    if task is not None and task not in bench.tasks:
        raise ann.AnnotationError([f"{bench.name} has no task {task!r} (tasks: {bench.tasks})"])
    if bench.name == "mvbench":
        # A directory stands for its task files, in name order.
        files = [g for f in files for g in (sorted(f.glob("*.json")) if f.is_dir() else [f])]
        return "qa", vqa.read_mvbench(files)
    if len(files) > 1 and bench.name != "activitynet-captions":
        raise ann.AnnotationError([f"{bench.name} takes one annotation file ({bench.files})"])
    path = files[0]
    items: list[Any]
    if bench.name == "charades-sta":
        items = ann.read_charades_txt(path) if path.suffix == ".txt" else ann.read_coco_format(path)
        if items and not isinstance(items[0], ann.MomentQuery):
            raise ann.AnnotationError([f"{path}: dense-captioning records, not Charades-STA"])
        return "mr", items
    if bench.name == "videomme":
        return "qa", vqa.read_videomme(path)
    if bench.name == "qvhighlights":
        return "vhd", ann.read_qvhighlights(path)
    if bench.name == "youcook2":
        if path.name.endswith("caption_coco_format.json"):
            return "dvc", ann.read_coco_format(path)
        return "dvc", ann.read_youcook2(path)
    if bench.name == "activitynet-captions":
        videos = ann.read_activitynet(files)
        task = task or "dvc"
        return task, (ann.activitynet_queries(videos) if task == "mr" else videos)
    items = ann.read_coco_format(path)
    found = "dvc" if items and isinstance(items[0], ann.CaptionedVideo) else "mr"
    if task is not None and task != found:
        raise ann.AnnotationError([f"{path}: holds {found} records, not {task}"])
    return found, items


def item_key(item: Any) -> str:
    """The key a prediction is stored and scored under: the query id, or for dense
    captioning the video id."""
    return item.video if isinstance(item, ann.CaptionedVideo) else item.qid
