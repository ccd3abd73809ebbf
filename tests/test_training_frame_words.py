"""Frame words: timed words that stand in for a frame's pixels (the lookup curriculum)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from trace_rt.backends.torch_backend import TorchBackend
from trace_rt.model import TraceModel
from trace_rt.model.checkpoint import random_tensors
from training.data import BadSampleError, load_split
from training.dataset import FRAME_WORDS_FILLER, GroundingDataset, collate
from training.loss import (
    TraceLoss,
    sequence_embeddings,
    slot_loss,
    video_block,
    words_for_pixels,
)
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


def test_synth_writes_kind_words_beside_the_colours(tmp_path, tiny_ckpt):
    from benchmarks.training_words_eval import words_eval

    cfg = SynthConfig(videos=2, seed=5, min_duration=4.0, max_duration=6.0, min_window=1.5,
                      max_window=3.0, min_shapes=2, max_shapes=2, tasks=("mr", "dvc"),
                      frame_words=True, kind_words=True)  # fmt: skip
    make_synth_data(tmp_path / "k", cfg)
    truth = json.loads((tmp_path / "k" / "synth.json").read_text())["videos"]
    shapes = {t["video"].split("/")[-1]: t["shapes"] for t in truth}
    for s in load_split(tmp_path / "k" / "train.json"):
        sh = shapes[s.video.name]
        assert s.frame_words == tuple((x["start"], x["end"], x["color"]) for x in sh) + tuple(
            (x["start"], x["end"], x["kind"]) for x in sh
        )
    with pytest.raises(ValueError, match="kind_words adds to frame_words"):
        make_synth_data(tmp_path / "bad", SynthConfig(videos=1, kind_words=True))
    # Dense captions read on words: every true event of the split's dvc samples paired.
    val = load_split(tmp_path / "k" / "val.json")
    report = words_eval(tiny_ckpt, tmp_path / "k" / "val.json", task="dvc")
    assert report["model_metrics"]["events"] == sum(len(s.events) for s in val if s.task == "dvc")
    with pytest.raises(ValueError, match="task must be one of"):
        words_eval(tiny_ckpt, tmp_path / "k" / "val.json", task="vhd")


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


def test_a_batch_all_in_words_skips_the_vision_tower(words_set, tok):
    samples = load_split(words_set / "train.json")[:2]
    model = _tiny_model(4)
    words = GroundingDataset(samples, CFG, tok, num_frames=4, frame_words=1.0)
    batch = collate([words.get(0), words.get(1)])
    calls = []
    model.model.vision_tower.register_forward_hook(lambda *_: calls.append(1))
    got = video_block(model, batch)
    assert not calls
    with torch.no_grad():  # what the pixels' block with the words put in gives
        b, h = 2, CFG.hidden_size
        pixels = model.project(
            model.encode_frames(batch.pixel_values.flatten(0, 1)), batch.time_ids.flatten(0, 1)
        ).view(b, -1, h)
        ref = words_for_pixels(model, pixels, batch.frame_ids)
    assert torch.allclose(got, ref, atol=1e-6)
    TraceLoss(model)(batch)[0].backward()
    assert all(p.grad is None for p in model.model.vision_tower.parameters())
    assert model.model.embed_tokens.weight.grad is not None


def _tiny_model(frames: int) -> TraceModel:
    with torch.device("meta"):
        model = TraceModel(CFG.replace(num_frames=frames))
    model.load_state_dict(dict(random_tensors(CFG, 0)), strict=True, assign=True)
    return model


def test_slot_targets_are_the_words_of_the_frames_shown_as_pixels(words_set, tok):
    samples = load_split(words_set / "train.json")[:2]
    ds = GroundingDataset(samples, CFG, tok, num_frames=4, frame_words=1.0, slot_targets=True)
    assert ds.get(0).slot_ids is None  # shown as words: nothing to pull towards
    ds = GroundingDataset(samples, CFG, tok, num_frames=4, slot_targets=True)
    words = GroundingDataset(samples, CFG, tok, num_frames=4, frame_words=1.0)
    e = ds.get(0)
    assert e.frame_ids is None and torch.equal(e.slot_ids, words.get(0).frame_ids)
    assert GroundingDataset(samples, CFG, tok, num_frames=4).get(0).slot_ids is None
    batch = collate([e, GroundingDataset(samples, CFG, tok, num_frames=4).get(1)])
    assert batch.slot_ids.shape == (2, 4, CFG.mm_num_slots) and (batch.slot_ids[1] == -1).all()


def test_slot_loss_matches_slots_to_words_in_any_order(words_set, tok):
    model = _tiny_model(4)
    samples = load_split(words_set / "train.json")[:1]
    batch = collate([GroundingDataset(samples, CFG, tok, num_frames=4, slot_targets=True).get(0)])
    s, h = CFG.mm_num_slots, CFG.hidden_size
    block = video_block(model, batch).detach()  # [1, 4 * (S + 6), H]
    table = model.model.embed_tokens.weight.detach()
    frames = block.view(1, 4, -1, h).clone()
    rng = np.random.default_rng(0)
    for f in range(4):  # the words, each frame's slots shuffled: nothing left to learn
        frames[0, f, :s] = table[batch.slot_ids[0, f, rng.permutation(s)]]
    exact = frames.flatten(1, 2).requires_grad_()
    assert float(slot_loss(model, exact, batch.slot_ids).detach()) == pytest.approx(0.0, abs=1e-10)
    off = exact.detach().clone()
    off.view(1, 4, -1, h)[0, 1, 2] += 1.0  # one slot of one frame moved
    loss = slot_loss(model, off.requires_grad_(), batch.slot_ids)
    norm = float(table[batch.slot_ids[0]].square().sum(-1).mean())
    assert float(loss.detach()) == pytest.approx(h / (4 * s) / norm, rel=1e-4)
    loss.backward()
    grad = off.grad.view(1, 4, -1, h)
    assert grad[0, 1, 2].abs().sum() > 0 and grad.abs().sum() == grad[0, 1, 2].abs().sum()
    # The time tokens are no target, and without targets the term is a zero.
    assert float(slot_loss(model, block, torch.full_like(batch.slot_ids, -1))) == 0.0


def test_slot_target_trains_the_projector_towards_the_words(words_set, tok):
    torch.manual_seed(0)
    model = _tiny_model(4)
    samples = load_split(words_set / "train.json")
    ds = GroundingDataset(samples, CFG, tok, num_frames=4, slot_targets=True)
    batch = collate([ds.get(i) for i in range(len(samples))])
    net = TraceLoss(model, slot_weight=1.0)
    params = list(model.model.mm_projector.parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=1e-2)
    first = None
    for _ in range(60):
        _, parts = net(batch)
        first = first if first is not None else float(parts["slots"].detach())
        opt.zero_grad()
        parts["slots"].backward()
        opt.step()
    assert float(parts["slots"].detach()) < 0.5 * first
    assert set(parts) == {"text", "time", "score", "slots"}
    with pytest.raises(ValueError, match="slot_target must be"):
        TrainConfig(slot_target=-1.0)


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
    b = TrainConfig.load("tiny-synthetic-lookup")  # stage B: pixels, the slot target
    assert b.frame_words == 0.0 and b.slot_target == 1.0
    assert set(b.trainable) == {"vision", "projector", "llm"} and b.lr_scale == {"llm": 0.1}
    a = TrainConfig.load("tiny-synthetic-lookup-words")
    assert a.frame_word_slots == b.frame_word_slots == LAYOUT  # one layout for both stages
    with pytest.raises(ValueError, match="frame_words must be a share"):
        TrainConfig.from_dict({"frame_words": -0.1})


def test_lookup_recipes_train_without_the_system_text():
    # Both stages read synthetic-prompts.json beside them: the release's strings, only the
    # llama_2 system text empty (half the positions of a stage-A sequence).
    from trace_rt.prompts import DEFAULT_PROMPTS_FILE, PromptSet

    release = PromptSet.load(DEFAULT_PROMPTS_FILE)
    for name in ("tiny-synthetic-lookup-words", "tiny-synthetic-lookup"):
        ps = PromptSet.load(TrainConfig.load(name).prompts_file)
        assert ps.templates["llama_2"].system == ""
        assert ps.templates["llama_2"].format == release.templates["llama_2"].format
        assert dict(ps.tasks) == dict(release.tasks)
        assert ps.templates["mistral_instruct"] == release.templates["mistral_instruct"]
        assert (ps.user_message, ps.after_prompt) == (release.user_message, release.after_prompt)


def test_words_eval_shows_each_frame_as_its_words(words_set, tiny_ckpt):
    from benchmarks.training_words_eval import WordsBackend, _time_of, words_eval
    from trace_rt.tokenizer import TextTokenizer
    from trace_rt.tokens import encode_timestamp
    from training.dataset import frame_word_ids

    assert _time_of(np.array(encode_timestamp(12.5))) == 12.5
    sample = load_split(words_set / "val.json")[0]
    tokenizer = TextTokenizer.from_dir(tiny_ckpt)
    backend = WordsBackend(tiny_ckpt, tokenizer)
    backend.words = sample.frame_words
    times = [0.25, 1.75, 3.0, 4.5]
    time_ids = np.array([encode_timestamp(t) for t in times])
    pixels = np.random.default_rng(0).standard_normal((4, 3, 56, 56)).astype(np.float32)
    feats = backend.encode_frames(pixels)
    got = backend.project(feats, time_ids).view(4, -1, CFG.hidden_size)
    ref = TorchBackend.project(backend, feats, time_ids).view(4, -1, CFG.hidden_size)
    s = CFG.mm_num_slots
    ids = torch.from_numpy(frame_word_ids(sample.frame_words, times, s, tokenizer))
    assert torch.equal(got[:, :s], backend.model.model.embed_tokens(ids).detach())
    assert torch.equal(got[:, s:], ref[:, s:])  # the frames' own time tokens
    report = words_eval(tiny_ckpt, words_set / "val.json")
    n = sum(s.task == "mr" for s in load_split(words_set / "val.json"))
    assert report["frames_shown_as"] == "frame_words"
    assert report["model_metrics"]["queries"] == n == len(report["predictions"])


LAYOUT = ("red", "green", "blue", "yellow")


def test_fixed_slot_layout_puts_each_word_in_its_own_slot(words_set, tok):
    from training.dataset import frame_word_ids

    samples = load_split(words_set / "train.json")
    slots = CFG.mm_num_slots
    ds = GroundingDataset(samples, CFG, tok, num_frames=6, frame_words=1.0,
                          frame_word_slots=LAYOUT)  # fmt: skip
    filler = tok.encode(FRAME_WORDS_FILLER)[0]
    seen_second = False
    for i, s in enumerate(samples):
        e = ds.get(i)
        for f, t in enumerate(e.frame_times):
            want = [filler] * slots
            for a, b, w in s.frame_words:
                if a <= t < b:
                    want[LAYOUT.index(w)] = tok.encode(w)[0]
            assert e.frame_ids[f].tolist() == want
            seen_second |= any(a <= t < b and LAYOUT.index(w) > 0 for a, b, w in s.frame_words)
    assert seen_second  # not only slot 0: the layout, not span order, placed them
    # Stage B's targets use the same layout.
    pix = GroundingDataset(samples, CFG, tok, num_frames=6, slot_targets=True,
                           frame_word_slots=LAYOUT)  # fmt: skip
    assert torch.equal(pix.get(0).slot_ids, ds.get(0).frame_ids)
    words = ((0.0, 1.0, "purple"),)
    with pytest.raises(ValueError, match="'purple' has no slot"):
        frame_word_ids(words, [0.5], slots, tok, LAYOUT)
    with pytest.raises(ValueError, match="not one token"):
        frame_word_ids(((0.0, 1.0, "xylophonist"),), [0.5], slots, tok, ("xylophonist",))
    with pytest.raises(ValueError, match="9 words for 8 slots"):
        GroundingDataset(samples, CFG, tok, frame_word_slots=[f"w{i}" for i in range(9)])
    rc = TrainConfig.from_dict({"frame_word_slots": list(LAYOUT)})
    assert rc.frame_word_slots == LAYOUT and rc.to_dict()["frame_word_slots"] == list(LAYOUT)
    with pytest.raises(ValueError, match="repeats a word"):
        TrainConfig(frame_word_slots=("red", "red"))


def test_ordered_slot_loss_holds_the_layout(words_set, tok):
    model = _tiny_model(4)
    samples = load_split(words_set / "train.json")[:1]
    ds = GroundingDataset(samples, CFG, tok, num_frames=4, slot_targets=True,
                          frame_word_slots=LAYOUT)  # fmt: skip
    batch = collate([ds.get(0)])
    s, h = CFG.mm_num_slots, CFG.hidden_size
    block = video_block(model, batch).detach()
    table = model.model.embed_tokens.weight.detach()
    frames = block.view(1, 4, -1, h).clone()
    frames[0, :, :s] = table[batch.slot_ids[0]]
    exact = frames.flatten(1, 2)
    assert float(slot_loss(model, exact, batch.slot_ids, ordered=True)) == pytest.approx(
        0, abs=1e-10
    )
    # The same words in other slots: nothing to the set matching, a loss in the layout.
    swapped = frames.clone()
    swapped[0, :, :s] = swapped[0, :, :s].flip(1)
    swapped = swapped.flatten(1, 2)
    assert float(slot_loss(model, swapped, batch.slot_ids)) == pytest.approx(0, abs=1e-10)
    assert float(slot_loss(model, swapped, batch.slot_ids, ordered=True)) > 0.1
    net = TraceLoss(model, slot_weight=1.0, ordered_slots=True)
    assert float(net(batch)[1]["slots"].detach()) > 0


def test_words_eval_reads_the_models_slot_layout(words_set, tiny_ckpt, tmp_path):
    import shutil

    import yaml

    from benchmarks.training_words_eval import slot_layout, words_eval

    step = tmp_path / "step"  # a step checkpoint keeps its recipe in the trainer state
    step.mkdir()
    torch.save({"recipe": {"frame_word_slots": list(LAYOUT)}}, step / "trainer_state.pt")
    assert slot_layout(step) == LAYOUT
    model = tmp_path / "m"
    shutil.copytree(tiny_ckpt, model)
    (model / "train_recipe.yaml").write_text(yaml.safe_dump({"frame_word_slots": list(LAYOUT)}))
    report = words_eval(model, words_set / "val.json")
    assert report["frame_word_slots"] == list(LAYOUT)
    assert words_eval(tiny_ckpt, words_set / "val.json")["frame_word_slots"] == []


def test_slot_probe_reads_each_slot_as_its_nearest_word(words_set, tiny_ckpt, tmp_path):
    import shutil

    import yaml

    from benchmarks.training_slot_probe import probe, slot_readings
    from trace_rt.tokenizer import TextTokenizer

    model_dir = tmp_path / "m"
    shutil.copytree(tiny_ckpt, model_dir)
    (model_dir / "train_recipe.yaml").write_text(yaml.safe_dump({"frame_word_slots": list(LAYOUT)}))
    report = probe(model_dir, words_set / "val.json")
    val = load_split(words_set / "val.json")
    assert report["clips"] == len({s.video for s in val}) and report["layout"] == list(LAYOUT)
    # Frames showing each colour, counted from the windows at the frames the data set samples.
    model = TraceModel(CFG).eval()
    model.load_state_dict(dict(random_tensors(CFG, 0)), strict=True, assign=True)
    tok = TextTokenizer.from_dir(tiny_ckpt)
    clips = list({s.video: s for s in val}.values())
    ds = GroundingDataset(
        clips, CFG, tok, snap_times="cover", template="llama_2", answer_space=False,
        slot_targets=True, frame_word_slots=LAYOUT,
    )  # fmt: skip
    times = [ds.get(i).frame_times for i in range(len(clips))]
    for w in LAYOUT:
        shown = sum(a <= t < b for s, ts in zip(clips, times, strict=True)
                    for a, b, x in s.frame_words if x == w for t in ts)  # fmt: skip
        assert report["slots"][w]["shown"] == shown
        assert report["slots"][w]["frames"] == len(clips) * CFG.num_frames
    # All candidate embeddings equal: every slot reads as the first layout word (argmin's
    # first tie), right exactly where that word is shown, in its own slot only.
    with torch.no_grad():
        ids = [tok.encode(w)[0] for w in (*LAYOUT, FRAME_WORDS_FILLER)]
        model.model.embed_tokens.weight[ids] = model.model.embed_tokens.weight[ids[-1]].clone()
    got = slot_readings(model, ds, LAYOUT, tok)
    assert got[LAYOUT[0]]["right"] == got[LAYOUT[0]]["found"] == got[LAYOUT[0]]["shown"]
    assert all(got[w]["right"] == got[w]["found"] == 0 for w in LAYOUT[1:])
    (model_dir / "train_recipe.yaml").write_text(yaml.safe_dump({"frame_word_slots": []}))
    with pytest.raises(ValueError, match="no frame_word_slots layout"):
        probe(model_dir, words_set / "val.json")
