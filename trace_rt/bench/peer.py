"""Peers: other engines running TRACE's LLM half, measured beside our backends.

Users compare us with the engines they would pick for the LLM of a video LLM (llama.cpp,
onnxruntime-genai). Those engines take text ids and generate text; they have no vision
tower, projector, time/score heads or TRACE's head switching. So a peer is measured on
exactly what it shares with our backends, like for like:

- the **same prompt length**: the request's prompt with its video block, as text ids. A
  peer without video input gets, in place of each video-block position (and of ids outside
  the text vocabulary, such as the text ``<sync>``), a text id taken in turn from the
  prompt's own text: the positions and hence the prefill's work are the same;
- the **same number of decode steps**, greedy, EOS ignored;
- ``prefill``: the prompt from an empty cache up to the first token chosen;
  ``decode_step``: time between consecutive tokens (the engine's step and its pick), as
  for our backends;
- stages a peer does not have (``video``, ``vision``, ``projector``, and so ``ttft`` and
  ``end_to_end``, which include them) have no samples and are marked
  :data:`LLM_ONLY_NOTE` in the report.

A peer is a bench plugin (``--plugin NAME=module:Class``, see
:mod:`trace_rt.bench.plugins`) whose class has ``llm_only = True`` and implements
:class:`LlmPeer`. It is built as ``Class(checkpoint_dir, ...)``; an optional classmethod
``prepare(checkpoint_dir)`` does its one-time, cached conversion (an HF directory, an
engine's own format) before the load is timed. Our peers live in ``benchmarks/peers/``.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from trace_rt.config import TraceConfig
from trace_rt.tokens import VIDEO_PLACEHOLDER_ID

LLM_ONLY_NOTE = "LLM only (a peer engine: no video front end)"
PEER_STAGES = ("prefill", "decode_step")  # what a peer shares with our backends
# Our stages held against a peer's: each decode step of a peer computes every logit, as our
# text-head steps do (a fused decoder skips lm_head in time and score steps).
PEER_COMPARED = {
    "prefill": "prefill",
    "decode_step": "decode_step",
    "decode_step_text": "decode_step",
}
PEER_TEXT_NOTE = "n/a: every decode_step of a peer computes all logits (= a text-head step)"
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4")


@runtime_checkable
class LlmPeer(Protocol):
    """An engine running the LLM alone: text ids in, greedy text ids out."""

    llm_only: bool  # True: the bench drives it with :func:`one_peer_request`
    precision: str  # one of PRECISIONS: which of our backends it is compared with

    def prefill(self, ids: Sequence[int], max_new_tokens: int) -> int:
        """Run *ids* from an empty cache (sized for *max_new_tokens* more); return the
        first greedy token."""
        ...

    def decode_step(self, token_id: int) -> int:
        """Append *token_id* (the token last returned); return the next greedy token."""
        ...


def is_peer(backend: Any) -> bool:
    return bool(getattr(backend, "llm_only", False))


def peer_prompt(prompt_ids: Sequence[int], video_rows: int, cfg: TraceConfig) -> list[int]:
    """Our prompt (video placeholder included) as text ids of the same number of positions.

    Raises:
        ValueError: the prompt has no video placeholder or no text to fill with.
    """
    ids = list(prompt_ids)
    if ids.count(VIDEO_PLACEHOLDER_ID) != 1:
        raise ValueError("the prompt needs exactly one video placeholder")
    text = [i for i in ids[1:] if 0 <= i < cfg.vocab_size and i != cfg.bos_token_id]
    if not text:
        raise ValueError("the prompt has no text ids to stand in for the video block")
    filler = itertools.cycle(text)
    out: list[int] = []
    for i in ids:
        if i == VIDEO_PLACEHOLDER_ID:
            out.extend(next(filler) for _ in range(video_rows))
        elif 0 <= i < cfg.vocab_size:
            out.append(i)
        else:  # text <sync> and any other id the plain LLM has no embedding for
            out.append(next(filler))
    return out


def one_peer_request(peer: LlmPeer, ids: Sequence[int], decode_steps: int) -> dict[str, Any]:
    """One timed request of a peer: stage -> ms (``decode_steps``: a list), its tokens."""
    clock = time.perf_counter
    t0 = clock()
    tok = peer.prefill(ids, decode_steps + 1)
    marks, tokens = [clock()], [tok]
    for _ in range(decode_steps):
        tok = peer.decode_step(tok)
        marks.append(clock())
        tokens.append(tok)
    ms = 1e3
    return {
        "prefill": (marks[0] - t0) * ms,
        "decode_steps": [(b - a) * ms for a, b in itertools.pairwise(marks)],
        "token_ids": tokens,
    }
