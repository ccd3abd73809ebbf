"""What the projector's slots say on pixels, slot by slot, in a fixed slot layout.

Usage: python -m benchmarks.training_slot_probe MODEL_DIR SPLIT [--limit N] [--out FILE]

For a model trained with ``frame_word_slots`` and ``slot_target`` (training/README.md;
stage B of the lookup curriculum) each projector slot of a frame shown as pixels should
come out as the embedding of the word its layout puts there (a colour or kind the frame
shows) or of the filler (``nothing``). This reads every slot of the split's sampled frames
as the nearest (L2) of those candidate embeddings and counts, per layout word, how often
the reading is right over all frames and over the frames that show the word: where the
move from words to pixels falls short, and for which words (benchmarks/results/
training-synthetic-hard-tiny-cpu.md, twelfth attempt). Frames are sampled as the
training data set samples them (``uniform``, the model's frame count), one clip per
video (the split's first sample of each video).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.training_words_eval import slot_layout
from trace_rt.model import TraceModel
from trace_rt.model.checkpoint import load_model
from trace_rt.tokenizer import TextTokenizer
from training.data import load_split
from training.dataset import FRAME_WORDS_FILLER, GroundingDataset, collate


@torch.no_grad()
def slot_readings(
    model: TraceModel, dataset: GroundingDataset, layout: Sequence[str], tok: TextTokenizer
) -> dict[str, dict[str, int]]:
    """Per layout word: ``frames``, ``right`` (reading == target), ``shown`` (frames whose
    target is the word) and ``found`` (of those, read as the word)."""
    words = [*layout, FRAME_WORDS_FILLER]
    cand = torch.tensor([tok.encode(w)[0] for w in words])
    emb = model.model.embed_tokens.weight[cand]  # [W, H]
    s, h = model.config.mm_num_slots, model.config.hidden_size
    out = {w: {"frames": 0, "right": 0, "shown": 0, "found": 0} for w in layout}
    for i in range(len(dataset)):
        b = collate([dataset.get(i)])
        px = b.pixel_values.flatten(0, 1)  # [F, 3, H, W]
        block = model.project(model.encode_frames(px), b.time_ids.flatten(0, 1))
        slots = block.view(px.shape[0], -1, h)[:, :s]  # [F, S, H]
        read = cand[torch.cdist(slots, emb[None].expand(len(slots), -1, -1)).argmin(-1)]
        want = b.slot_ids[0]  # [F, S]
        for k, w in enumerate(layout):
            shown = want[:, k] == cand[k]
            r = out[w]
            r["frames"] += len(want)
            r["right"] += int((read[:, k] == want[:, k]).sum())
            r["shown"] += int(shown.sum())
            r["found"] += int((read[:, k][shown] == cand[k]).sum())
    return out


def probe(model_dir: str | Path, split: str | Path, limit: int | None = None) -> dict[str, Any]:
    layout = slot_layout(model_dir)
    if not layout:
        raise ValueError(f"{model_dir}: its training recipe has no frame_word_slots layout")
    model = load_model(model_dir)
    tok = TextTokenizer.from_dir(model_dir)
    first: dict[Path, Any] = {}
    for s in load_split(split):
        if s.frame_words is not None:
            first.setdefault(s.video, s)
    samples = list(first.values())[:limit]
    if not samples:
        raise ValueError(f"{split}: no samples carry frame_words")
    ds = GroundingDataset(
        samples, model.config, tok, snap_times="cover", template="llama_2",
        answer_space=False, slot_targets=True, frame_word_slots=layout,
    )  # fmt: skip
    slots = slot_readings(model, ds, layout, tok)
    return {"model": str(model_dir), "clips": len(samples), "layout": list(layout), "slots": slots}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="checkpoint directory (torch) trained with frame_word_slots")
    ap.add_argument("split", help="split file whose samples carry frame_words")
    ap.add_argument("--limit", type=int, help="only the first N clips")
    ap.add_argument("--out", help="also write the report as JSON here")
    args = ap.parse_args(argv)
    report = probe(args.model, args.split, args.limit)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    for w, r in report["slots"].items():
        print(f"{w:>10}: right {r['right']}/{r['frames']} frames; "
              f"read as {w} on {r['found']}/{r['shown']} frames showing it")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
