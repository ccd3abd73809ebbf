"""A `tiny` checkpoint edited so that greedy decoding walks every head.

Random weights rarely leave the time head, so end-to-end tests on them never switch
heads. Here the embeddings of the ids on one answer path are made large (so the last
fed-back id dominates the final hidden state) and each head's row for the next id on the
path is aligned with the previous id's embedding. Greedy decoding then emits, through the
real model and every layer, ``0123.4 <sync> | 4.5 <sync> | a dog <sync> | 0123.4 ...``.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

from trace_rt.model import load_model, save_model
from trace_rt.tokenizer import TextTokenizer

TIME = {c: 32001 + i for i, c in enumerate(["<sync>", "<sep>", *"0123456789."])}
SCORE = {c: 32014 + i for i, c in enumerate(["<sync>", "<sep>", *"0123456789."])}


def answer_path(tok: TextTokenizer, end_with_eos: bool) -> list[int]:
    """The ids greedy decoding follows after the prompt's closing text <sync> (32000)."""
    caption = tok.encode("a dog")
    time = [TIME[c] for c in "0123.4"] + [TIME["<sync>"]]
    score = [SCORE[c] for c in "4.5"] + [SCORE["<sync>"]]
    return [*time, *score, *caption, 2 if end_with_eos else 32000]


def _row(sd: dict[str, torch.Tensor], uid: int, head: bool) -> tuple[str, int]:
    """(weight name, row) of *uid*'s embedding (head=False) or output row (head=True)."""
    if uid < 32000:
        return ("lm_head.weight" if head else "model.embed_tokens.weight"), uid
    if uid == 32000:
        return ("sync_head.weight" if head else "model.sync_tower.embed_tokens.weight"), 0
    if uid < 32014:
        return ("time_head.weight" if head else "model.time_tower.embed_tokens.weight"), uid - 32001
    return ("score_head.weight" if head else "model.score_tower.embed_tokens.weight"), uid - 32014


def make_walker(src: Path, out: Path, *, end_with_eos: bool, seed: int = 0) -> Path:
    model = load_model(src)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    tok = TextTokenizer.from_dir(src)
    path = [32000, *answer_path(tok, end_with_eos)]
    g = torch.Generator().manual_seed(seed)
    dim = model.config.hidden_size
    unit: dict[int, torch.Tensor] = {}
    for uid in path[:-1]:
        if uid not in unit:
            v = torch.randn(dim, generator=g)
            unit[uid] = v / v.norm()
            name, row = _row(sd, uid, head=False)
            sd[name][row] = unit[uid] * 8.0  # ~50x a random embedding's norm
    for prev, nxt in itertools.pairwise(path):
        name, row = _row(sd, nxt, head=True)
        sd[name][row] = unit[prev] * 5.0
    model.load_state_dict(sd)
    save_model(model, out, tokenizer_model=src / "tokenizer.model")
    return out
