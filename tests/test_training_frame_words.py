"""Frame words: timed words that stand in for a frame's pixels (the lookup curriculum)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from trace_rt.model import TraceModel
from trace_rt.model.checkpoint import random_tensors
from training.data import BadSampleError, load_split
from training.dataset import FRAME_WORDS_FILLER, GroundingDataset, collate
from training.loss import sequence_embeddings
from training.presets import load_preset
from training.recipe import TrainConfig
from training.synth import SynthConfig, make_synth_data

CFG = load_preset("tiny")


@pytest.fixture(scope="module")
def words_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("words")
    cfg = SynthConfig(videos=4, seed=5, min_duration=4.0, max_duration=6.0, min_window=1.5,
                      max_window=3.0, min_shapes=2, max_shapes=2, tasks=("mr",),
                      frame_words=True)  # fmt: skip
    make_synth_data(root, cfg)
    return root


def test_synth_writes_the_tracks_as_words(words_set):
    truth = json.loads((words_set / "synth.json").read_text())["videos"]
    samples = load_split(words_set / "train.json") + load_split(words_set / "val.json")
    by_video = {t["video"].split("/")[-1]: t["shapes"] for t in truth}
    for s in samples:
        shapes = by_video[s.video.name]
        assert len(shapes) == 2  # --min-shapes 2
        assert s.frame_words == tuple((x["start"], x["end"], x["color"]) for x in shapes)
    # Without --frame-words nothing is written, and the default min_shapes keeps old sets.
    assert SynthConfig().min_shapes == 1 and not SynthConfig().frame_words


def test_words_take_the_slots_of_the_frames_they_cover(words_set, tok):
    samples = load_split(words_set / "train.json")
    slots = CFG.mm_num_slots
    ds = GroundingDataset(samples, CFG, tok, num_frames=6, frame_words=1.0)
    filler = tok.encode(FRAME_WORDS_FILLER)[0]
    for i, s in enumerate(samples):
        e = ds.get(i)
        assert e.frame_ids is not None and e.frame_ids.shape == (6, slots)
        for f, t in enumerate(e.frame_times):
            want = [tok.encode(w)[0] for a, b, w in s.frame_words if a <= t < b]
            row = e.frame_ids[f].tolist()
            assert row == want + [filler] * (slots - len(want))
    # Share 0: never; a share between: per (seed, epoch, index), reproducibly.
    plain = GroundingDataset(samples, CFG, tok, num_frames=6)
    assert all(plain.get(i).frame_ids is None for i in range(len(samples)))
    half = GroundingDataset(samples, CFG, tok, num_frames=6, frame_words=0.5)
    picks = [[half.get(i, ep).frame_ids is not None for i in range(len(samples))]
             for ep in range(6)]  # fmt: skip
    assert picks == [[half.get(i, ep).frame_ids is not None for i in range(len(samples))]
                     for ep in range(6)]  # fmt: skip
    assert 0 < sum(map(sum, picks)) < 6 * len(samples)
    # The words do not change which frames are picked.
    assert np.array_equal(half.get(0, 3).pixel_values, plain.get(0, 3).pixel_values)
    with pytest.raises(ValueError, match="frame_words must be a share"):
        GroundingDataset(samples, CFG, tok, frame_words=1.5)


def test_embeddings_put_words_on_the_slots_only(words_set, tok):
    samples = load_split(words_set / "train.json")[:2]
    with torch.device("meta"):
        model = TraceModel(CFG.replace(num_frames=4))
    model.load_state_dict(dict(random_tensors(CFG, 0)), strict=True, assign=True)
    words = GroundingDataset(samples, CFG, tok, num_frames=4, frame_words=1.0)
    pixels = GroundingDataset(samples, CFG, tok, num_frames=4)
    mixed = collate([words.get(0), pixels.get(1)])
    assert mixed.frame_ids is not None and (mixed.frame_ids[1] == -1).all()
    both_pixels = collate([pixels.get(0), pixels.get(1)])
    assert both_pixels.frame_ids is None
    with torch.no_grad():
        got = sequence_embeddings(model, mixed)
        ref = sequence_embeddings(model, both_pixels)
    s, per = CFG.mm_num_slots, CFG.tokens_per_frame
    start = int(mixed.video_start[0])
    table = model.model.embed_tokens.weight
    for f in range(4):
        at = start + f * per
        assert torch.equal(got[0, at : at + s], table[mixed.frame_ids[0, f]])
        assert torch.equal(got[0, at + s : at + per], ref[0, at + s : at + per])  # time tokens
    assert torch.equal(got[1], ref[1])  # the pixel sample is untouched
    outside = torch.ones(got.shape[1], dtype=torch.bool)
    outside[start : start + 4 * per] = False
    assert torch.equal(got[0, outside], ref[0, outside])


def test_bad_frame_words_are_named(words_set, tmp_path):
    raw = json.loads((words_set / "train.json").read_text())
    good = raw["samples"][0]
    for bad, msg in (
        ("red", "must be a list"),
        ([[2.0, 1.0, "red"]], "start < end"),
        ([[0.0, 1.0]], r"\[start, end, word\]"),
        ([[0.0, "x", "red"]], "non-number"),
        ([[0.0, 1.0, "  "]], "start < end"),
    ):
        f = tmp_path / "s.json"
        f.write_text(json.dumps({**raw, "samples": [{**good, "frame_words": bad}]}))
        with pytest.raises(BadSampleError, match=f"sample '{good['id']}'.*{msg}"):
            load_split(f)


def test_recipe_share_is_checked():
    assert TrainConfig.load("tiny-synthetic-lookup-words").frame_words == 1.0
    assert TrainConfig.load("tiny-synthetic-lookup").frame_words == 0.5
    with pytest.raises(ValueError, match="frame_words must be a share"):
        TrainConfig.from_dict({"frame_words": -0.1})
