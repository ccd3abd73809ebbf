"""The typed functions behind ``trace-rt run``: one question, or several about one video.

:mod:`trace_rt.cli` maps the command line onto these; they are also the plain Python
entry points for a script that wants the command's JSON without a subprocess.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from trace_rt.errors import InputError
from trace_rt.prompts import CUSTOM_TASK


def run(
    video: str,
    model: Path,
    *,
    task: str | None = "dvc",
    query: str | None = None,
    question: str | None = None,
    **options: Any,
) -> dict:
    """``trace-rt run``: one video, one request, the result as a JSON-ready dict.

    *backend* ``None`` picks it from the model directory (an artifact directory with
    ``manifest.json``: onnxruntime; a checkpoint: torch). A free *question* (task ``None``
    or ``custom``) adds ``answer``: the first event's caption. *template*, *timestamps*
    and *frames* left ``None`` come from the model card (*preset*, or the one the
    checkpoint's config names; :mod:`trace_rt.model_cards`), else the generic defaults.
    Other keyword options are :func:`run_many`'s.
    """
    pipe, gen, card, frames, source = _load_for_run(video, model, 1, options)
    result = pipe.run(source, task, query=query, question=question, frames=frames, gen=gen)
    result = {**result, "video": video}
    if card is not None:
        result["model_card"] = card.name
    if task in (None, CUSTOM_TASK):
        result = {**result, "task": CUSTOM_TASK}  # the pipeline added ``answer``
    return result


def run_many(video: str, model: Path, questions: list, **options: Any) -> list[dict]:
    """``trace-rt run`` with several questions (``--query`` / ``--task`` repeated): the video
    is decoded, encoded and prefilled up to the question once, and the questions decode
    together; one JSON-ready dict per question, in order.

    Args:
        questions: :class:`trace_rt.pipeline.Question` s.
        options: frames, max_new_tokens, backend, device, dtype, constrained, timestamps,
            seed, temperature, top_p, template, prompts, quant, preset (as :func:`run`).
    """
    pipe, gen, card, frames, source = _load_for_run(video, model, len(questions), options)
    results = pipe.run_many(source, questions, frames=frames, gen=gen)
    out = []
    for r in results:
        r = {**r, "video": video}
        if card is not None:
            r["model_card"] = card.name
        out.append(r)
    return out


def _load_for_run(video: str, model: Path, sequences: int, options: dict[str, Any]):
    """The pipeline, generation settings, model card, frames and video source of a run."""
    source = _stdin_video() if video == "-" else video  # read before the model loads
    return (*load_pipeline(model, sequences, options), source)


def load_pipeline(model: Path, sequences: int, options: dict[str, Any]):
    """The pipeline (with *sequences* KV slots), generation settings, model card and frames
    for *options* (:func:`run_many`'s; ``trace-rt batch`` uses it too)."""
    from trace_rt.backends import default_backend
    from trace_rt.generate import GenerationConfig
    from trace_rt.model_cards import resolve_card
    from trace_rt.pipeline import Pipeline

    o = {**_RUN_DEFAULTS, **options}
    unknown = set(options) - set(_RUN_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown run options {sorted(unknown)}")
    card = resolve_card(model, o["preset"])
    template = o["template"] or (card.template if card else "llama_2")
    timestamps = o["timestamps"] or (card.timestamps if card else "free")
    frames = o["frames"]
    if frames is None and card is not None:  # an explicit --frames 0 is still refused
        frames = card.frames

    # Settings are checked before the (slow) model load, so a typo fails fast.
    gen = GenerationConfig(
        max_new_tokens=o["max_new_tokens"],
        temperature=o["temperature"],
        top_p=o["top_p"],
        seed=o["seed"],
        constrained=o["constrained"],
        timestamps=timestamps,
    )
    backend = o["backend"] or default_backend(model)  # --quant needs the name now
    # The artifact fixes an onnxruntime model's dtype; --device picks its execution provider.
    kw: dict[str, Any] = {"device": o["device"]}
    if backend == "torch":
        kw["dtype"] = o["dtype"]
    if o["quant"] is not None:
        if not backend.startswith("onnxruntime"):
            raise InputError(f"--quant picks an onnxruntime decoder variant; not for {backend!r}")
        kw["decoder_variant"] = o["quant"]
    if sequences > 1:
        if backend == "tensorrt":  # no more slots than its engines decode at once
            from trace_rt.backends.tensorrt_manifest import built_max_batch

            sequences = min(sequences, built_max_batch(model))
        kw["max_sequences"] = sequences  # the questions decode as one batch
    pipe = Pipeline.from_dir(
        model, backend, prompts_file=o["prompts"], template=template, resize=o["resize"], **kw
    )
    return pipe, gen, card, frames


_RUN_DEFAULTS: dict[str, Any] = {
    "frames": None,
    "max_new_tokens": 512,
    "backend": None,
    "device": "cpu",
    "dtype": None,
    "constrained": False,
    "timestamps": None,
    "seed": 0,
    "temperature": 0.0,
    "top_p": 1.0,
    "template": None,
    "prompts": None,
    "quant": None,
    "preset": None,
    "resize": "exact",
}


def _stdin_video() -> bytes:
    """``-``: the video's bytes from standard input, read once (bounded)."""
    from trace_rt.video import read_stream

    if sys.stdin is None or sys.stdin.isatty():
        raise InputError("video '-' reads standard input, but it is a terminal; pipe a video in")
    return read_stream(sys.stdin.buffer, "<stdin>")


def run_questions(tasks: list[str] | None, queries: list[str] | None, question: str | None):
    """The questions of a ``trace-rt run`` command line.

    One task (default: a free *question* if given, else ``dvc``): mr/vhd ask once per
    ``--query``. Several tasks: each mr/vhd task takes the next query, in order.
    """
    from trace_rt.pipeline import Question

    queries = queries or []
    tasks = tasks or [CUSTOM_TASK if question else "dvc"]
    needs_query = ("mr", "vhd")
    if len(tasks) == 1:
        task = tasks[0]
        if task in needs_query and len(queries) > 1:
            return [Question(task, q) for q in queries]
        if task not in needs_query and len(queries) > 1:
            raise InputError(f"--task {task} takes no --query; got {len(queries)}")
        return [Question(task, queries[0] if queries else None, question)]
    wanted = sum(t in needs_query for t in tasks)
    if len(queries) != wanted:
        raise InputError(
            f"{wanted} mr/vhd task(s) need {wanted} --query (one each, in order); "
            f"got {len(queries)}"
        )
    it = iter(queries)
    return [Question(t, next(it) if t in needs_query else None, question) for t in tasks]
