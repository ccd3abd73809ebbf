"""The training sequence and its labels, rendered as the release renders them.

One sample is a pair of turns, as in the release's training JSON: the user's message
(``<video>\\n`` + question) and the assistant's answer written with placeholders::

    <sync><time>x14<score>x1 a red circle moves<sync><time>x14<score>x4 ... caption

``<time>`` and ``<score>`` stand for one token each of the sample's ``times`` / ``scores``
(each event's values in ``dddd.d`` / ``d.d``, joined by ``<sep>``, closed by that head's
``<sync>``: :func:`trace_rt.tokens.encode_values`), ``<sync>`` is the text head's sync
(id 32000). The release's chat code (``conversation.py``, sep style LLAMA_2) writes the
whole sequence as::

    template(system, user) + " " + answer + " " + "</s>"

with ``template`` ``[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST]`` for both
``llama_2`` and ``mistral_instruct`` (they differ in the system text; the release
*trains* with ``mistral_instruct``, ``--version v1_mistral``, and evaluates with
``llama_2``). The string is tokenised chunk-wise at the placeholders
(``tokenizer_MMODAL_token_all``: each chunk with its own sentencepiece dummy prefix, BOS
kept on the first only) and ``</s>`` is the EOS id. Labels (``preprocess_llama_2`` then
``prepare_inputs_labels_for_multimodal`` in ``trace_arch.py``) are three rows aligned
with the input (the loss shifts by one):

* text: every token after the instruction's own tokens (so the ``▁`` of the space before
  the answer, the captions, the ``▁`` before ``</s>`` and EOS), except the placeholders;
  **every** ``<sync>`` is labelled 32000, wherever it stands;
* time / score: the head-local token at each ``<time>`` / ``<score>`` position.

The release's answer starts with ``<sync>`` so that, as at inference (where the prompt
ends with ``[/INST]<sync>``; the release trains with ``[/INST]▁<sync>``, see
``answer_space``), the time head speaks first; the last event ends with EOS,
not ``<sync>``, because after a text ``<sync>`` only the time head may speak and only the
text head can stop.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from trace_rt.config import IdSpace
from trace_rt.prompts import PromptSet
from trace_rt.tokenizer import TextTokenizer
from trace_rt.tokens import SCORE_FORMAT, TIME_FORMAT, VIDEO_PLACEHOLDER_ID, encode_values

IGNORE = -100
VIDEO, IMAGE, TIME, SCORE, SYNC = "<video>", "<image>", "<time>", "<score>", "<sync>"
PLACEHOLDERS = (VIDEO, IMAGE, TIME, SCORE, SYNC)
_SPLIT = re.compile("(" + "|".join(re.escape(p) for p in PLACEHOLDERS) + ")")
_TIME_PH, _SCORE_PH = -203, -204  # internal markers before the values are filled in


class RenderError(ValueError):
    """A sample cannot be rendered (placeholder counts, tokenisation); says why."""


@dataclass(frozen=True)
class Turns:
    """One training conversation in the release's terms.

    Attributes:
        human: the user's message, holding ``<video>`` (or ``<image>``) once.
        answer: the assistant's message with ``<time>``/``<score>``/``<sync>``.
        times: per event, its timestamps (seconds); one ``<time>`` per encoded token.
        scores: per event, its scores; one ``<score>`` per encoded token.
    """

    human: str
    answer: str
    times: tuple[tuple[float, ...], ...]
    scores: tuple[tuple[float, ...], ...]


def time_tokens(times: Sequence[Sequence[float]]) -> list[int]:
    """Head-local time tokens of all events, in order (the release's ``encode_time``)."""
    return [t for ev in times for t in encode_values(list(ev), TIME_FORMAT)]


def score_tokens(scores: Sequence[Sequence[float]]) -> list[int]:
    return [t for ev in scores for t in encode_values(list(ev), SCORE_FORMAT)]


def answer_from_events(events: Sequence) -> tuple[str, tuple, tuple]:
    """(answer, times, scores) for :class:`training.data.EventTarget` events."""
    parts = [SYNC]
    for k, ev in enumerate(events):
        if k:
            parts.append(SYNC)
        parts.append(TIME * len(encode_values(list(ev.timestamps), TIME_FORMAT)))
        parts.append(SCORE * len(encode_values(list(ev.scores), SCORE_FORMAT)))
        parts.append(ev.caption)
    times = tuple(tuple(ev.timestamps) for ev in events)
    scores = tuple(tuple(ev.scores) for ev in events)
    return "".join(parts), times, scores


def tokenize_chunks(text: str, tok: TextTokenizer, ids: IdSpace) -> list[int]:
    """BOS + chunk-wise ids; placeholders become markers (video -201, time -203,
    score -204) or the text sync id. Empty chunks add nothing (BOS only, dropped)."""
    marker = {VIDEO: VIDEO_PLACEHOLDER_ID, IMAGE: VIDEO_PLACEHOLDER_ID, TIME: _TIME_PH,
              SCORE: _SCORE_PH, SYNC: ids.text_sync}  # fmt: skip
    out = [tok.bos_id]
    for i, part in enumerate(_SPLIT.split(text)):
        if i % 2:
            out.append(marker[part])
        elif part:
            out.extend(tok.encode(part))
    return out


def render(
    turns: Turns,
    tok: TextTokenizer,
    ids: IdSpace,
    prompts: PromptSet,
    template: str,
    answer_space: bool = True,
) -> tuple[list[int], torch.Tensor]:
    """(input ids, labels [3, L]) before the video block is expanded.

    *answer_space* writes the release's ``" "`` between ``[/INST]`` and the answer (a
    labelled ``▁``). Without it the sequence up to the answer's first ``<sync>`` is
    exactly the runtime's inference prompt (``[/INST]<sync>``): for a model trained from
    scratch and served by this runtime, which never learnt the release's mismatch.

    Input ids are unified ids (``trace_rt.tokens``): time/score tokens sit at their
    placeholders as ``time_base + t`` / ``score_base + t``; the one video placeholder
    is :data:`VIDEO_PLACEHOLDER_ID`.

    Raises:
        RenderError: placeholder counts that do not match ``times``/``scores``, no or
            several ``<video>``, or an instruction whose ids are not a prefix of the
            whole sequence's (the release drops such a sample's labels with a warning).
    """
    if template not in prompts.templates:
        raise RenderError(f"unknown template {template!r}; known: {', '.join(prompts.templates)}")
    instruction = prompts.templates[template].render(turns.human)
    n_video = sum(instruction.count(p) for p in (VIDEO, IMAGE))
    if n_video != 1 or any(p in turns.answer for p in (VIDEO, IMAGE)):
        raise RenderError("the conversation must hold exactly one <video> (or <image>)")
    space = " " if answer_space else ""
    seq = [*tokenize_chunks(instruction + space + turns.answer + " ", tok, ids), tok.eos_id]
    head = tokenize_chunks(instruction, tok, ids)
    if seq[: len(head)] != head:
        raise RenderError("the instruction tokenises differently inside the conversation")
    tt, st = time_tokens(turns.times), score_tokens(turns.scores)
    n_t, n_s = seq.count(_TIME_PH), seq.count(_SCORE_PH)
    if n_t != len(tt):
        raise RenderError(f"{n_t} <time> placeholders for {len(tt)} time tokens of {turns.times}")
    if n_s != len(st):
        raise RenderError(
            f"{n_s} <score> placeholders for {len(st)} score tokens of {turns.scores}"
        )
    labels = torch.full((3, len(seq)), IGNORE, dtype=torch.long)
    it, is_ = iter(tt), iter(st)
    for p, t in enumerate(seq):
        if t == _TIME_PH:
            seq[p] = ids.time_base + (lab := next(it))
            labels[1, p] = lab
        elif t == _SCORE_PH:
            seq[p] = ids.score_base + (lab := next(is_))
            labels[2, p] = lab
        elif t == ids.text_sync:
            labels[0, p] = t  # every <sync>, the instruction's too (trace_arch.py)
        elif t >= 0 and p >= len(head):
            labels[0, p] = t
    return seq, labels


def expand_video(
    seq: Sequence[int], labels: torch.Tensor, video_len: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Replace the one video placeholder by *video_len* unlabelled positions; returns
    (input ids [L], labels [3, L], first video position)."""
    at = list(seq).index(VIDEO_PLACEHOLDER_ID)
    ids = [*seq[:at], *[VIDEO_PLACEHOLDER_ID] * video_len, *seq[at + 1 :]]
    pad = torch.full((3, video_len), IGNORE, dtype=torch.long)
    lab = torch.cat([labels[:, :at], pad, labels[:, at + 1 :]], dim=1)
    return torch.tensor(ids, dtype=torch.long), lab, at
