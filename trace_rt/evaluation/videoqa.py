"""Multiple-choice video QA: MVBench and Video-MME, as the original evaluates them.

The original's ``trace/eval/mvbench/evaluate.py`` and ``trace/eval/videomme/evaluate.py``
fix what is reproduced here:

* the question: ``Question: …\\nOptions:\\n(A) …\\n(B) …`` after a benchmark-specific
  instruction and followed by a benchmark-specific request (:data:`PROMPTS`), asked as a
  free question in the ``llama_2`` template with the prompt ending in ``<sync>``;
* frame sampling: the midpoints of N equal segments of the video (of the annotated
  ``start``-``end`` bound for MVBench's bounded tasks), :func:`segment_indices`;
* greedy decoding, 128 new tokens; the prediction is the first caption of the output;
* answer matching: MVBench's ``check_ans`` (:func:`mvbench_correct`) and Video-MME's
  first-option-letter rule (:func:`videomme_correct`), letter-based as in the original
  (an option's text alone matches only by chance of the letter regex).

Video-MME's original script declares an answer prompt (``Best option:(``) but never puts
it in the prompt; neither does trace-rt. Differences left: the original resizes the
shorter side and centre-crops for QA, trace-rt preprocesses as the checkpoint says
(``expand2square``); MVBench's ``Episodic Reasoning`` is a directory of JPEG frames,
which trace-rt does not read (reported as missing videos).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trace_rt.evaluation import annotations as ann

# file stem -> (task name, video directory under --videos, data type, has start/end bound):
# the original's table in trace/eval/mvbench/evaluate.py.
MVBENCH_TASKS: dict[str, tuple[str, str, str, bool]] = {
    "action_sequence": ("Action Sequence", "star/Charades_v1_480", "video", True),
    "action_prediction": ("Action Prediction", "star/Charades_v1_480", "video", True),
    "action_antonym": ("Action Antonym", "ssv2_video", "video", False),
    "fine_grained_action": ("Fine-grained Action", "Moments_in_Time_Raw/videos", "video", False),
    "unexpected_action": ("Unexpected Action", "FunQA_test/test", "video", False),
    "object_existence": ("Object Existence", "clevrer/video_validation", "video", False),
    "object_interaction": ("Object Interaction", "star/Charades_v1_480", "video", True),
    "object_shuffle": ("Object Shuffle", "perception/videos", "video", False),
    "moving_direction": ("Moving Direction", "clevrer/video_validation", "video", False),
    "action_localization": ("Action Localization", "sta/sta_video", "video", True),
    "scene_transition": ("Scene Transition", "scene_qa/video", "video", False),
    "action_count": ("Action Count", "perception/videos", "video", False),
    "moving_count": ("Moving Count", "clevrer/video_validation", "video", False),
    "moving_attribute": ("Moving Attribute", "clevrer/video_validation", "video", False),
    "state_change": ("State Change", "perception/videos", "video", False),
    "fine_grained_pose": ("Fine-grained Pose", "nturgbd", "video", False),
    "character_order": ("Character Order", "perception/videos", "video", False),
    "egocentric_navigation": ("Egocentric Navigation", "vlnqa", "video", False),
    "episodic_reasoning": ("Episodic Reasoning", "tvqa/frames_fps3_hq", "frame", True),
    "counterfactual_inference": (
        "Counterfactual Inference",
        "clevrer/video_validation",
        "video",
        False,
    ),
}

# benchmark -> (instruction before the question, request after it): the original's
# `system` (with system_llm=True) and `question_prompt`.
PROMPTS = {
    "mvbench": (
        "Watch the video carefully, noticing the cause and sequence of events, and then "
        "choose the best option for the given question.\n",
        "\nPlease think step by step and only give the best option that matches the question best.",
    ),
    "videomme": (
        "Carefully watch the video and pay attention to the cause and sequence of events, "
        "the detail and movement of objects, and the action and pose of persons. Based on "
        "your observations, select the best option that accurately addresses the question.\n",
        "\nOnly give the best option.",
    ),
}
ACCURACY_PREFIX = "accuracy · "
MAX_NEW_TOKENS = 128  # the original's generate(max_new_tokens=128)
_OPTION_RE = re.compile(r"\(*\s*([a-z])\s*[\).]")  # the original's option-letter regex


@dataclass(frozen=True)
class ChoiceQuestion:
    """One multiple-choice question about one video.

    Attributes:
        qid: unique key (MVBench: ``<file stem>/<index>``; Video-MME: ``question_id``).
        video: the video's path relative to its directory (MVBench) or its id (Video-MME).
        options: the options' texts, in order; option k is letter ``chr(65 + k)``.
        answer: the correct option's letter.
        category: the task (MVBench task name, Video-MME ``task_type``).
        bound: MVBench's ``(start, end)`` in seconds for the bounded tasks.
        video_dir: MVBench: the task's directory under ``--videos``.
        data_type: ``video`` or ``frame`` (a directory of JPEGs: not read by trace-rt).
        facets: further groupings (Video-MME ``duration``, ``domain``).
    """

    qid: str
    video: str
    question: str
    options: tuple[str, ...]
    answer: str
    category: str
    bound: tuple[float, float] | None = None
    video_dir: str = ""
    data_type: str = "video"
    facets: Mapping[str, str] = field(default_factory=dict)

    @property
    def answer_text(self) -> str:
        """The ground truth as the original's ``qa_template`` spells it: ``(B) text``."""
        return f"({self.answer}) {self.options[ord(self.answer) - 65]}"


def qa_block(question: str, options: Sequence[str]) -> str:
    """``Question: …\\nOptions:\\n(A) …`` without a trailing newline (``qa_template``)."""
    lines = [f"Question: {question}", "Options:"]
    lines += [f"({chr(65 + k)}) {c}" for k, c in enumerate(options)]
    return "\n".join(lines)


def prompt_question(benchmark: str, q: ChoiceQuestion) -> str:
    """The free question trace-rt asks (the template adds ``<video>\\n`` before it)."""
    system, request = PROMPTS[benchmark]
    return system + qa_block(q.question, q.options) + request


def segment_indices(
    n_frames: int, fps: float, num_segments: int, bound: tuple[float, float] | None = None
) -> np.ndarray:
    """The original's ``get_index``: the midpoint frame of each of *num_segments* equal
    segments of ``[start, end]`` (the whole video without a bound)."""
    max_frame = n_frames - 1
    start, end = bound if bound else (-100000.0, 100000.0)
    start_idx = max(0, round(start * fps))
    end_idx = min(round(end * fps), max_frame)
    seg = float(end_idx - start_idx) / num_segments
    return np.array(
        [int(start_idx + seg / 2 + np.round(seg * k)) for k in range(num_segments)], np.int64
    )


def mvbench_correct(pred: str, gt: str) -> bool:
    """MVBench's ``check_ans``: the first ``(x)``/``x.``-style letter of *pred* (``(a)``
    when none) against the option of *gt* (``(B) text``)."""
    found = _OPTION_RE.findall(pred.lower())
    pred_option = f"({found[0]})" if found else "(a)"  # the original's "random answer"
    gt_option = gt.lower().split(" ")[0]
    return pred_option.replace(".", "") in gt_option or gt_option in pred_option


def videomme_correct(pred: str, gt_letter: str) -> bool:
    """Video-MME's rule: the first option letter of *pred* equals the answer's; no letter
    is wrong (the original skips such a question after counting it)."""
    found = _OPTION_RE.findall(pred.lower())
    return bool(found) and found[0] == gt_letter.lower()


def is_correct(benchmark: str, q: ChoiceQuestion, pred: str) -> bool:
    if benchmark == "mvbench":
        return mvbench_correct(pred, q.answer_text)
    return videomme_correct(pred, q.answer)


def read_mvbench(files: Sequence[Path]) -> list[ChoiceQuestion]:
    """MVBench's per-task JSON files (``json/<task>.json``: ``video``, ``question``,
    ``candidates``, ``answer`` and, for bounded tasks, ``start``/``end``)."""
    out: list[ChoiceQuestion] = []
    errors: list[str] = []
    for path in files:
        stem = path.stem
        if stem not in MVBENCH_TASKS:
            errors.append(f"{path}: not an MVBench task file (known: {', '.join(MVBENCH_TASKS)})")
            continue
        name, vdir, dtype, bounded = MVBENCH_TASKS[stem]
        raw = ann.load_json(path)
        if not isinstance(raw, list):
            errors.append(f"{path}: expected a list of questions")
            continue
        for i, r in enumerate(raw):
            try:
                cands = [str(c) for c in r["candidates"]]
                answer = str(r["answer"])
                if answer not in cands:
                    raise ValueError(f"answer {answer!r} is not one of the candidates")
                bound = (float(r["start"]), float(r["end"])) if bounded else None
                out.append(
                    ChoiceQuestion(
                        f"{stem}/{i}",
                        str(r["video"]),
                        str(r["question"]),
                        tuple(cands),
                        chr(65 + cands.index(answer)),
                        name,
                        bound,
                        vdir,
                        dtype,
                    )
                )
            except (KeyError, TypeError, ValueError) as e:
                errors.append(f"{path}[{i}]: {type(e).__name__}: {e}")
    if errors:
        raise ann.AnnotationError(errors)
    return out


def read_videomme(path: Path) -> list[ChoiceQuestion]:
    """Video-MME's annotations: the published parquet (needs pyarrow, the ``videoqa``
    extra) or the same records as JSON (a list, or ``{"data": [...]}``): ``videoID``
    (or ``url``), ``question_id``, ``question``, ``options`` (``"A. text"``), ``answer``,
    ``duration``, ``domain``, ``task_type``."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ann.AnnotationError(
                [
                    f"{path}: reading parquet needs pyarrow (pip install 'trace-rt[videoqa]'), "
                    "or pass the JSON form of the annotations"
                ]
            ) from None
        rows = pq.read_table(path).to_pylist()
    else:
        raw = ann.load_json(path)
        rows = raw.get("data") if isinstance(raw, dict) else raw
        if not isinstance(rows, list):
            raise ann.AnnotationError([f"{path}: expected a list of question records"])
    out, errors = [], []
    for i, r in enumerate(rows):
        try:
            vid = r.get("videoID") or str(r["url"]).split("watch?v=")[1]
            opts = [str(o) for o in r["options"]]
            letters = [o[:1] for o in opts]
            answer = str(r["answer"]).strip()
            if letters != [chr(65 + k) for k in range(len(opts))] or answer not in letters:
                raise ValueError(f"options {opts!r} / answer {answer!r} are not lettered A, B, ...")
            facets = {k: str(r[k]) for k in ("duration", "domain") if r.get(k) is not None}
            out.append(
                ChoiceQuestion(
                    str(r.get("question_id") or f"{vid}-{i}"),
                    str(vid),
                    str(r["question"]),
                    tuple(o[3:] for o in opts),
                    answer,
                    str(r.get("task_type") or "all"),
                    facets=facets,
                )
            )
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            errors.append(f"{path}[{i}]: {type(e).__name__}: {e}")
    if errors:
        raise ann.AnnotationError(errors)
    return out


def prediction_text(rec: Mapping[str, Any]) -> str:
    """The original's prediction: the first caption of its own parse of the output."""
    caps = (rec.get("release") or {}).get("captions") or []
    return str(caps[0]) if caps else ""


def score_qa(
    benchmark: str, items: Sequence[ChoiceQuestion], records: Mapping[str, Any]
) -> dict[str, Any]:
    """Accuracy (percent) overall, per task and per facet, over the questions with a
    prediction (the original's denominator: questions it could answer)."""
    groups: dict[str, dict[str, list[int]]] = {"per_task": {}}
    correct = total = 0
    for q in items:
        rec = records.get(q.qid)
        if rec is None:
            continue
        ok = int(is_correct(benchmark, q, prediction_text(rec)))
        correct, total = correct + ok, total + 1
        keys = [("per_task", q.category)] + [(f"by_{k}", v) for k, v in q.facets.items()]
        for group, name in keys:
            c = groups.setdefault(group, {}).setdefault(name, [0, 0])
            c[0] += ok
            c[1] += 1
    out: dict[str, Any] = {
        "accuracy": 100.0 * correct / total if total else None,
        "correct": correct,
        "queries": len(items),
        "predictions": total,
    }
    for group, counts in groups.items():
        out[group] = {
            k: {"accuracy": 100.0 * c / n, "correct": c, "total": n}
            for k, (c, n) in sorted(counts.items())
        }
        # Flat copies for the report tables (metrics.md, report.html).
        facet = "" if group == "per_task" else group[3:] + "="
        for k, v in out[group].items():
            out[f"{ACCURACY_PREFIX}{facet}{k}"] = v["accuracy"]
    return out


def original_results(
    benchmark: str, items: Sequence[ChoiceQuestion], records: Mapping[str, Any]
) -> dict[str, Any]:
    """The original's ``test.json``: ``acc_dict`` (task -> [correct, total]) and
    ``res_list`` (``pred``, ``gt``)."""
    acc: dict[str, list[int]] = {}
    res = []
    for q in items:
        rec = records.get(q.qid)
        if rec is None:
            continue
        pred = prediction_text(rec)
        c = acc.setdefault(q.category, [0, 0])
        c[0] += int(is_correct(benchmark, q, pred))
        c[1] += 1
        res.append({"qid": q.qid, "pred": pred, "gt": q.answer_text})
    return {"acc_dict": acc, "res_list": res}
