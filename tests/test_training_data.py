"""Training data: the sample format, synthetic set, converter, labels and bad-data policy."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from trace_rt.prompts import PromptSet, prompt_ids
from trace_rt.tokenizer import default_tokenizer_model
from trace_rt.tokens import VIDEO_PLACEHOLDER_ID
from trace_rt.video import load_video
from training.convert import convert
from training.data import BadSampleError, EventTarget, Sample, load_split
from training.dataset import (
    IGNORE,
    GroundingDataset,
    collate,
    decode_video,
    frame_indices,
    sample_turns,
    snap_span,
)
from training.presets import load_preset
from training.render import expand_video, render
from training.synth import SynthConfig, make_synth_data

CFG = load_preset("tiny")
IDS = CFG.ids


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    cfg = SynthConfig(videos=4, seed=3, min_duration=4.0, max_duration=6.0, min_window=1.5,
                      max_window=3.0)  # fmt: skip
    counts = make_synth_data(root, cfg)
    return root, counts


def test_synth_data_layout(synth):
    root, counts = synth
    train, val = load_split(root / "train.json"), load_split(root / "val.json")
    assert counts == {"train": len(train), "val": len(val)} and val
    assert not {s.video for s in train} & {s.video for s in val}  # split by video
    truth = json.loads((root / "synth.json").read_text())
    for s in train + val:
        assert s.video.is_file() and s.task in ("mr", "dvc", "vhd")
        v = decode_video(s.video)
        assert abs(v.duration - s.duration) < 1e-6
        if s.task == "mr":
            start, end = s.events[0].timestamps
            assert 0 <= start < end <= s.duration
            shapes = [x for t in truth["videos"] for x in t["shapes"] if x["caption"] == s.query]
            assert any((x["start"], x["end"]) == (start, end) for x in shapes)
    # A shape is visible exactly inside its window (the frames are real, decoded pixels).
    s = next(s for s in train if s.task == "mr")
    v = decode_video(s.video)
    start, end = s.events[0].timestamps
    bright = v.frames.reshape(len(v.times), -1).max(axis=1) > 150
    inside = (v.times >= start + 0.2) & (v.times < end - 0.2)
    assert bright[inside].all()


def test_uniform_sampling_matches_the_runtime(synth):
    root, _ = synth
    path = sorted((root / "videos").glob("*.mp4"))[0]
    v = decode_video(path)
    ref = load_video(path, 8)
    idx = frame_indices(len(v.times), 8, "uniform", None)
    np.testing.assert_allclose(v.times[idx], ref.times, atol=1e-6)
    assert np.abs(v.frames[idx].astype(int) - ref.frames).max() <= 2
    assert abs(v.duration - ref.duration) < 1e-6
    jit = frame_indices(len(v.times), 8, "jitter", np.random.default_rng(0))
    assert (np.diff(jit) >= 0).all() and len(jit) == 8


def test_labels_hand_checked(tok):
    """Every answer token carries its head's label at its own position; nothing else does."""
    sample = Sample(
        "s1",
        default_tokenizer_model(),  # unused: no video is read here
        "dvc",
        (EventTarget((1.0, 2.5), (4.0,), "a red circle"), EventTarget((3.0, 4.0), (), "")),
    )
    prompts = PromptSet.load()
    turns = sample_turns(sample, prompts)
    seq, labels = render(turns, tok, IDS, prompts, "mistral_instruct")
    cap = tok.encode("a red circle")
    t, s = IDS.time_base, IDS.score_base
    # <sync> | "0001.0" <sep> "0002.5" <sync> | "4.0" <sync> | caption <sync> |
    # "0003.0" <sep> "0004.0" <sync> | <sync> | "▁▁" EOS
    time1 = [2, 2, 2, 3, 12, 2, 1, 2, 2, 2, 4, 12, 7, 0]
    time2 = [2, 2, 2, 5, 12, 2, 1, 2, 2, 2, 6, 12, 2, 0]
    answer = [
        28705, 32000, *[t + i for i in time1], *[s + i for i in (6, 12, 2, 0)], *cap, 32000,
        *[t + i for i in time2], s + 0, 259, tok.eos_id,
    ]  # fmt: skip
    n = len(seq) - len(answer)
    assert seq[n:] == answer
    assert seq[:n] == prompt_ids("dvc", tok=tok, ids=IDS, template="mistral_instruct")[:-1]
    video_len = 3 * CFG.tokens_per_frame
    input_ids, labels, start = expand_video(seq, labels, video_len)
    at = seq.index(VIDEO_PLACEHOLDER_ID)
    assert start == at and (input_ids[at : at + video_len] == VIDEO_PLACEHOLDER_ID).all()
    n_prompt = n - 1 + video_len
    assert input_ids[n_prompt:].tolist() == answer
    assert (labels[:, :n_prompt] == IGNORE).all()
    text, time, score = (labels[h, n_prompt:].tolist() for h in range(3))
    ign = IGNORE
    n1, n2 = len(time1), len(time2)
    assert time == [ign, ign, *time1, *[ign] * (4 + len(cap) + 1), *time2, ign, ign, ign]
    assert score == [*[ign] * (2 + n1), 6, 12, 2, 0, *[ign] * (len(cap) + 1 + n2), 0, ign, ign]
    assert text == [28705, 32000, *[ign] * (n1 + 4), *cap, 32000, *[ign] * (n2 + 1), 259,
                    tok.eos_id]  # fmt: skip
    # Exactly one head labels each answer position.
    assert ((labels[:, n_prompt:] != IGNORE).sum(0) == 1).all()


def test_timestamps_snap_to_frames():
    frames = np.array([0.0, 0.9, 2.1, 3.0])
    # "cover" brackets the span with frames: 1.6 -> 0.9 (nearest: 2.1), 2.2 -> 3.0 (2.1).
    assert snap_span([1.6, 2.2], frames, "nearest") == [2.1, 2.1]
    assert snap_span([1.6, 2.2], frames, "cover") == [0.9, 3.0]
    assert snap_span([1.0, 2.9], frames, "cover") == [0.9, 3.0]
    assert snap_span([1.6, 7.0], frames, "none") == [1.6, 3.0]  # never past the last frame


def test_dataset_and_collator(synth, tok):
    root, _ = synth
    samples = load_split(root / "train.json")
    ds = GroundingDataset(samples, CFG, tok, num_frames=4, sampling="jitter", seed=1)
    a, b = ds.get(0, epoch=0), ds.get(1, epoch=0)
    assert a.pixel_values.shape == (4, 3, 56, 56) and a.time_ids.shape == (4, 6)
    assert ds.get(0, epoch=0).frame_times.tolist() == a.frame_times.tolist()  # reproducible
    batch = collate([a, b])
    n = max(len(a.input_ids), len(b.input_ids))
    assert batch.input_ids.shape == (2, n) and batch.labels.shape == (3, 2, n)
    for i, e in enumerate((a, b)):
        m = len(e.input_ids)
        assert batch.attention_mask[i].tolist() == [True] * m + [False] * (n - m)
        assert (batch.labels[:, i, m:] == IGNORE).all()


def test_frame_cache_decodes_each_video_once(synth, tok, monkeypatch):
    root, _ = synth
    samples = load_split(root / "train.json")
    plain = GroundingDataset(samples, CFG, tok, num_frames=4)
    cached = GroundingDataset(samples, CFG, tok, num_frames=4, cache_frames=True)
    import training.dataset as dataset_mod

    opened = []
    real = dataset_mod.load_video
    monkeypatch.setattr(dataset_mod, "load_video", lambda p, *a, **k: opened.append(p) or
                        real(p, *a, **k))  # fmt: skip
    for epoch in (0, 1):
        for i in range(len(samples)):
            a, b = plain.get(i, epoch), cached.get(i, epoch)
            assert a.frame_times.tolist() == b.frame_times.tolist()
            assert np.array_equal(a.pixel_values.numpy(), b.pixel_values.numpy())
            assert a.input_ids.tolist() == b.input_ids.tolist()
            # The second epoch's ids, labels and time ids are the first's, kept.
            assert torch.equal(a.labels, b.labels) and torch.equal(a.time_ids, b.time_ids)
            assert a.video_start == b.video_start
    videos = {s.video for s in samples}
    # plain: every get decodes; cached: each video once, whatever its number of samples.
    assert len(opened) == 2 * len(samples) + len(videos) and len(videos) < len(samples)
    with pytest.raises(ValueError, match="cache_frames needs sampling 'uniform'"):
        GroundingDataset(samples, CFG, tok, sampling="rand", cache_frames=True)


def _write(path, samples):
    path.write_text(json.dumps({"format": "trace-rt-train/1", "samples": samples}))
    return path


def test_bad_samples_are_named(synth, tok, tmp_path, caplog):
    root, _ = synth
    video = str(sorted((root / "videos").glob("*.mp4"))[0])
    ok = {"id": "good", "video": video, "task": "mr", "query": "a red circle moves left",
          "events": [{"timestamps": [0.5, 1.5]}]}  # fmt: skip
    static = [
        ({**ok, "id": "bad-task", "task": "nope"}, "unknown task"),
        ({**ok, "id": "no-query", "query": None}, "needs a non-empty 'query'"),
        ({**ok, "id": "bad-events", "events": [{"timestamps": ["x", 2]}]}, "non-number"),
        ({**ok, "id": "one-stamp", "events": [{"timestamps": [1.0]}]}, "exactly 2"),
        ({**ok, "id": "neg", "events": [{"timestamps": [-1.0, 2]}]}, "outside"),
    ]
    for raw, msg in static:
        f = _write(tmp_path / "s.json", [ok, raw])
        with pytest.raises(BadSampleError, match=f"sample '{raw['id']}'.*{msg}"):
            load_split(f)
        with caplog.at_level("WARNING"):
            assert [s.id for s in load_split(f, "skip")] == ["good"]
        assert raw["id"] in caplog.text

    dynamic = [
        ({**ok, "id": "missing-video", "video": str(tmp_path / "gone.mp4")}, "does not exist"),
        ({**ok, "id": "too-late", "events": [{"timestamps": [1.0, 99.0]}]}, "beyond the video"),
    ]
    for raw, msg in dynamic:
        samples = load_split(_write(tmp_path / "d.json", [ok, raw]))
        with pytest.raises(BadSampleError, match=f"sample '{raw['id']}'.*{msg}"):
            GroundingDataset(samples, CFG, tok)
        with caplog.at_level("WARNING"):
            ds = GroundingDataset(samples, CFG, tok, on_bad="skip")
        assert [s.id for s in ds.samples] == ["good"] and raw["id"] in caplog.text


def test_converter(synth, tmp_path):
    root, _ = synth
    vids = root / "videos"
    name = sorted(vids.glob("*.mp4"))[0].stem
    dvc = {name: {"duration": 4.0, "timestamps": [[0.5, 1.5], [2.0, 3.0]],
                  "sentences": ["a red circle moves left", "a blue square moves up"]}}  # fmt: skip
    mr = [{"video": name, "query": "a red circle moves left", "timestamp": [0.5, 1.5]},
          {"video": name, "query": "broken", "timestamp": [2.0]}]  # fmt: skip
    vhd = [{"qid": 7, "vid": name, "query": "q", "relevant_clip_ids": [0, 1],
            "saliency_scores": [[4, 3, 2], [1, 1, 1]]}]  # fmt: skip
    for kind, raw in (("dvc", dvc), ("mr", mr), ("vhd", vhd)):
        (tmp_path / f"{kind}-in.json").write_text(json.dumps(raw))
    out = tmp_path / "data"
    out.mkdir()
    assert convert(tmp_path / "dvc-in.json", out / "dvc.json", video_root=vids) == 1
    with pytest.raises(BadSampleError, match="exactly 2"):
        convert(tmp_path / "mr-in.json", out / "mr.json", video_root=vids)
    assert convert(tmp_path / "mr-in.json", out / "mr.json", video_root=vids, on_bad="skip") == 1
    assert convert(tmp_path / "vhd-in.json", out / "vhd.json", video_root=vids) == 1
    (d,), (m,), (h,) = (load_split(out / f"{k}.json") for k in ("dvc", "mr", "vhd"))
    assert d.task == "dvc" and [e.caption for e in d.events][1] == "a blue square moves up"
    assert m.query == "a red circle moves left" and m.events[0].timestamps == (0.5, 1.5)
    assert h.id == "7" and [(e.timestamps, e.scores) for e in h.events] == [
        ((1.0,), (4.0,)),
        ((3.0,), (2.0,)),
    ]
    assert d.video == m.video == (vids / f"{name}.mp4").resolve()
    shutil.rmtree(out)


def test_synth_data_cli(tmp_path, capsys):
    from training.cli import main

    args = ["synth-data", str(tmp_path / "s"), "--videos", "2", "--seed", "1", "--tasks", "mr",
            "--min-duration", "3", "--max-duration", "3", "--max-shapes", "1"]  # fmt: skip
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["samples"] == {"train": 1, "val": 1}
    assert len(list((tmp_path / "s" / "videos").glob("*.mp4"))) == 2


def test_shipped_recipes_load():
    from pathlib import Path

    from training.recipe import TrainConfig

    recipes = sorted((Path(__file__).parents[1] / "training" / "recipes").glob("*.yaml"))
    assert {p.stem for p in recipes} >= {"stage1", "stage2", "finetune", "tiny-synthetic"}
    for p in recipes:
        TrainConfig.load(p)
    with pytest.raises(ValueError, match="unknown keys"):
        TrainConfig.from_dict({"learning_rate": 1.0})
