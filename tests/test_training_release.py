"""Training matches the release: the golden sequence/labels test, frame sampling, and the
reader for the release's training JSON.

The golden test re-implements the original's rules here, independently of
``training.render``, from a reading of gyxxyg/TRACE: ``conversation.py`` (LLAMA_2 sep
style, ``mistral_instruct``: sep "", sep2 "</s>"), ``train_mt.py``
(``preprocess_multimodal``, ``preprocess_llama_2`` with its ``- 2`` instruction length and
its mismatch check, the nearest-frame snapping of ``times``), ``mm_utils.py``
(``tokenizer_MMODAL_token_all``), the towers' ``encode`` and ``trace_arch.py``
(``prepare_inputs_labels_for_multimodal``). The HF tokenizer is stood in for by the same
sentencepiece model plus what a ``LlamaTokenizer`` adds: BOS first, ``</s>`` as EOS.
"""

from __future__ import annotations

import itertools
import json
import re

import numpy as np
import pytest
import sentencepiece as spm
import torch

from trace_rt.tokenizer import default_tokenizer_model
from training.data import BadSampleError, EventTarget, Sample, load_split
from training.dataset import GroundingDataset, frame_indices, sample_turns, snapped
from training.presets import load_preset
from training.render import expand_video, render
from training.synth import SynthConfig, make_synth_data

CFG = load_preset("tiny")
IDS = CFG.ids
SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
MR = (
    "Localize the visual content described by the given textual query '{}' in the video, "
    "and output the start and end timestamps in seconds."
)
MARK = {"<image>": -200, "<video>": -201, "<time>": -203, "<score>": -204, "<sync>": -205}


# ---- the original's rules, re-implemented -------------------------------------------
class HFLlamaTokenizer:
    """``tokenizer(text).input_ids``: BOS, then sentencepiece pieces; ``</s>`` is EOS."""

    def __init__(self):
        self.sp = spm.SentencePieceProcessor(model_file=str(default_tokenizer_model()))

    def __call__(self, text: str) -> list[int]:
        ids = [1]
        for i, part in enumerate(text.split("</s>")):
            if i:
                ids.append(2)
            if part:
                ids += self.sp.encode(part)
        return ids


def mmodal_token_all(prompt: str, tok: HFLlamaTokenizer) -> list[int]:
    pattern = "|".join(map(re.escape, MARK))
    chunks = [tok(c) for c in re.split(pattern, prompt)]
    seps = [MARK[m] for m in re.findall(pattern, prompt)]
    offset = 1 if chunks and chunks[0] and chunks[0][0] == 1 else 0
    out = list(chunks[0])
    for c, s in zip(chunks[1:], seps, strict=True):
        out += [s, *c[offset:]]
    return out


def release_conversation(human: str, gpt: str) -> str:
    human = "<video>\n" + human.replace("<video>", "").strip()  # preprocess_multimodal
    first = f"<<SYS>>\n{SYSTEM}\n<</SYS>>\n\n" + human
    return f"[INST] {first} [/INST]" + " " + gpt + " " + "</s>"


def release_text_labels(conv: str, ids: list[int], tok: HFLlamaTokenizer) -> list[int]:
    target = list(ids)
    cur = 1
    target[:cur] = [-100] * cur
    for rou in conv.split("</s>"):
        if rou == "":
            break
        parts = rou.split("[/INST] ")
        if len(parts) != 2:
            break
        parts[0] += "[/INST] "
        round_len = len(mmodal_token_all(rou, tok))
        inst_len = len(mmodal_token_all(parts[0], tok)) - 2
        target[cur : cur + inst_len] = [-100] * inst_len
        cur += round_len
    target[cur:] = [-100] * (len(target) - cur)
    assert cur == len([t for t in ids if t != 0]), "the release would drop this sample"
    return target


def tower_encode(values: list[float], fmt: str) -> list[int]:
    vocab = {"<sync>": 0, "<sep>": 1, ".": 12, **{str(d): d + 2 for d in range(10)}}
    out: list[int] = []
    for i, v in enumerate(values):
        if i:
            out.append(vocab["<sep>"])
        out += [vocab[c] for c in format(v, fmt)]
    return [*out, vocab["<sync>"]]


def release_render(human, gpt, times, scores, video_len, frame_ts):
    """(unified input ids, labels [3, L]) by the original's rules."""
    tok = HFLlamaTokenizer()
    times = [[min(frame_ts, key=lambda x: abs(x - t)) for t in ev] for ev in times]  # snap
    conv = release_conversation(human, gpt)
    ids = mmodal_token_all(conv, tok)
    text = release_text_labels(conv, ids, tok)
    at = ids.index(-201)
    ids = ids[:at] + [-201] * video_len + ids[at + 1 :]
    text = text[:at] + [-100] * video_len + text[at + 1 :]
    text = [-100 if i < 0 else t for i, t in zip(ids, text, strict=True)]
    text = [32000 if i == -205 else t for i, t in zip(ids, text, strict=True)]
    tt = [t for ev in times for t in tower_encode(ev, "0>6.1f")]
    st = [t for ev in scores for t in tower_encode(ev, "0>3.1f")]
    time_l, score_l = [-100] * len(ids), [-100] * len(ids)
    for p in [p for p, i in enumerate(ids) if i == -203]:
        time_l[p] = tt.pop(0)
    for p in [p for p, i in enumerate(ids) if i == -204]:
        score_l[p] = st.pop(0)
    assert not tt and not st
    # The model embeds -203/-204/-205 by its towers: as unified ids, time/score/sync.
    uni = [IDS.time_base + time_l[p] if i == -203 else IDS.score_base + score_l[p]
           if i == -204 else 32000 if i == -205 else i for p, i in enumerate(ids)]  # fmt: skip
    return uni, [text, time_l, score_l]


# ---- tests ---------------------------------------------------------------------------


def _ours(sample, tok, frame_ts, video_len):
    from trace_rt.prompts import PromptSet

    prompts = PromptSet.load()
    turns = snapped(sample_turns(sample, prompts), np.asarray(frame_ts), "nearest")
    seq, labels = render(turns, tok, IDS, prompts, "mistral_instruct")
    ids, labels, _ = expand_video(seq, labels, video_len)
    return ids.tolist(), labels.tolist()


@pytest.mark.parametrize("case", ["dvc", "mr", "vhd"])
def test_golden_sequence_and_labels_match_the_release(tok, case):
    """Ids and the three label rows, position by position, for each task's answer form."""
    frame_ts = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    video_len = len(frame_ts) * CFG.tokens_per_frame
    if case == "dvc":
        q = "Examine the video and locate a number of events, stating their commencement and "
        q += "completion timestamps and a succinct explanation."
        events = (EventTarget((0.4, 2.6), (), "a red circle moves left"),
                  EventTarget((3.2, 4.9), (), "it stops"))  # fmt: skip
        gpt = "<sync>" + "<time>" * 14 + "<score>" + "a red circle moves left<sync>"
        gpt += "<time>" * 14 + "<score>" + "it stops"
        sample = Sample("g", default_tokenizer_model(), "dvc", events)
    elif case == "mr":
        q = MR.format("a blue square")
        events = (EventTarget((1.2, 3.7)),)
        gpt = "<sync>" + "<time>" * 14 + "<score>"
        sample = Sample("g", default_tokenizer_model(), "mr", events, query="a blue square")
    else:
        q = None
        events = (EventTarget((1.0,), (4.0,)), EventTarget((2.0, 3.0), (2.5, 1.0)))
        gpt = "<sync>" + "<time>" * 7 + "<score>" * 4 + "<sync>" + "<time>" * 14
        gpt += "<score>" * 8
        sample = Sample("g", default_tokenizer_model(), "vhd", events, query="a dog")
        from trace_rt.prompts import PromptSet

        q = PromptSet.load().question("vhd", "a dog")
    times = [list(e.timestamps) for e in events]
    scores = [list(e.scores) for e in events]
    want_ids, want_labels = release_render(f"<video>\n{q}", gpt, times, scores, video_len,
                                           frame_ts)  # fmt: skip
    got_ids, got_labels = _ours(sample, tok, frame_ts, video_len)
    assert got_ids == want_ids
    for row in range(3):
        assert got_labels[row] == want_labels[row], ("text", "time", "score")[row]
    # The release's details that matter, stated: the space before the answer is a
    # labelled "▁", every <sync> is labelled 32000, and the answer ends "▁▁"/"▁", EOS.
    first = next(p for p, t in enumerate(want_labels[0]) if t != -100)
    assert want_ids[first] == 28705 and want_ids[first + 1] == 32000
    syncs = [p for p, i in enumerate(want_ids) if i == 32000]
    assert all(want_labels[0][p] == 32000 for p in syncs)
    assert want_ids[-1] == 2 and want_labels[0][-1] == 2


@pytest.mark.parametrize("extra", ["", " Answer after <sync>."])
def test_release_json_sample_renders_like_the_release(tok, tmp_path, extra):
    """A record of the release's JSON, turns kept verbatim (video moved first); a <sync>
    on the prompt side is labelled 32000 too, as trace_arch.py labels every one."""
    q = MR.format("a man jumps") + extra
    gpt = "<sync>" + "<time>" * 14 + "<score>"
    rec = {"video": "v.mp4", "times": [[2.2, 4.1]], "scores": [[]],
           "conversations": [{"from": "human", "value": f"{q}\n<video>"},
                             {"from": "gpt", "value": gpt}]}  # fmt: skip
    (tmp_path / "d.json").write_text(json.dumps([rec]))
    (s,) = load_split(tmp_path / "d.json")
    frame_ts = [0.0, 1.5, 3.0, 4.5]
    video_len = 4 * CFG.tokens_per_frame
    want = release_render(rec["conversations"][0]["value"], rec["conversations"][1]["value"],
                          rec["times"], rec["scores"], video_len, frame_ts)  # fmt: skip
    got = _ours(s, tok, frame_ts, video_len)
    assert got[0] == want[0] and got[1] == want[1]
    n_sync = sum(1 for i, lab in zip(got[0], got[1][0], strict=True) if i == lab == 32000)
    assert n_sync == 1 + bool(extra)


def test_rand_sampling_is_the_releases(tok):
    """Each pick lies among its bin's 5 candidates; over seeds every candidate occurs."""
    n, num = 103, 8
    edges = np.linspace(0, n - 1, num + 1).astype(int)
    cands = [set(np.linspace(a, b - 1, 6).astype(int)[:-1]) for a, b in itertools.pairwise(edges)]
    seen = [set() for _ in range(num)]
    for seed in range(60):
        idx = frame_indices(n, num, "rand", np.random.default_rng(seed))
        for k, i in enumerate(idx):
            assert i in cands[k]
            seen[k].add(int(i))
    assert seen == cands
    assert (frame_indices(n, num, "uniform", None) == np.linspace(0, n - 1, num).astype(int)).all()


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("rel")
    make_synth_data(root, SynthConfig(videos=2, seed=4, min_duration=4.0, max_duration=5.0,
                                      min_window=1.5, max_window=2.5, tasks=("mr",)))  # fmt: skip
    return root, sorted((root / "videos").glob("*.mp4"))


def _record(video: str, times, n_time=None, gpt_extra="", **kw):
    n_time = 14 if n_time is None else n_time
    return {"video": video, "times": times, "scores": [[]],
            "conversations": [{"from": "human", "value": "<video>\n" + MR.format("x")},
                              {"from": "gpt", "value": "<sync>" + "<time>" * n_time + "<score>"
                               + gpt_extra}], **kw}  # fmt: skip


def test_release_json_trains_and_reports_bad_records(clips, tok, tmp_path, caplog):
    root, videos = clips
    rel = [str(v.relative_to(root)) for v in videos]
    good = [_record(rel[0], [[0.5, 2.0]], id="a"), _record(rel[1], [[1.0, 3.0]], id="b")]
    bad = [
        _record(rel[0], [[0.5, 2.0]], n_time=13, id="count"),  # 13 <time> for 14 tokens
        _record("missing.mp4", [[0.5, 2.0]], id="nofile"),
        _record(rel[0], [[0.5, 99.0]], id="late"),  # past the end
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}],
         "id": "textonly"},
    ]  # fmt: skip
    data = tmp_path / "stage-2.json"
    data.write_text(json.dumps(good + bad))
    with pytest.raises(BadSampleError, match=r"textonly.*text-only"):
        load_split(data, data_folder=root)
    caplog.set_level("WARNING")
    samples = load_split(data, "skip", data_folder=root)
    assert [s.id for s in samples] == ["a", "b", "count", "nofile", "late"]
    ds = GroundingDataset(samples, CFG, tok, num_frames=4, sampling="rand", on_bad="skip")
    assert [s.id for s in ds.samples] == ["a", "b"]
    msgs = caplog.text
    assert "'count'" in msgs and "13 <time> placeholders for 14" in msgs
    assert "'nofile'" in msgs and "'late'" in msgs and "beyond the video's end" in msgs
    # out_of_range: snap keeps the late record (as the release) and still reports it.
    caplog.clear()
    ds = GroundingDataset(samples[:3] + samples[4:], CFG, tok, num_frames=4,
                          out_of_range="snap", on_bad="skip")  # fmt: skip
    assert [s.id for s in ds.samples] == ["a", "b", "late"]
    assert "'late'" in caplog.text and "snapped" in caplog.text
    ex = ds.get(2)
    t = ex.labels[1][ex.labels[1] != -100].tolist()
    last = float(ex.frame_times[-1])
    assert t[7:13] == tower_encode([last], "0>6.1f")[:6]  # 99.0 -> the last frame's time
    assert ex.pixel_values.shape[:2] == (4, 3) and torch.isfinite(ex.pixel_values).all()


def test_loader_decodes_only_the_sampled_frames(clips, tok, monkeypatch):
    """Start-up decodes nothing (a demux pass); get() converts only the N sampled frames."""
    import trace_rt.video.decode as dec

    _, videos = clips
    converted = []
    real = dec._rgb
    monkeypatch.setattr(dec, "_rgb", lambda f, size: converted.append(f.pts) or real(f, size))
    s = Sample("a", videos[0], "mr", (EventTarget((0.5, 2.0)),), query="x")
    ds = GroundingDataset([s], CFG, tok, num_frames=4)
    assert converted == []
    ex = ds.get(0)
    assert len(converted) == 4 and ex.pixel_values.shape[0] == 4
    assert torch.isfinite(ex.pixel_values).all()


def test_worker_processes_give_the_same_batches(clips, tok):
    """Frames decoded in 2 data-loader processes: the same micro-batches, in the same
    order, as in the main process (so resume and the loss curve do not depend on it)."""
    from training.recipe import TrainConfig
    from training.trainer import Dist, batch_loader

    _, videos = clips
    samples = [Sample(f"s{i}", v, "mr", (EventTarget((0.5, 2.0)),), query="x")
               for i, v in enumerate(videos * 2)]  # fmt: skip
    ds = GroundingDataset(samples, CFG, tok, num_frames=4, sampling="rand")
    rc = TrainConfig.from_dict({"batch_size": 2, "grad_accum": 2, "max_steps": 3})
    seen = []
    for workers in (0, 2):
        it = batch_loader(ds, rc.replace(num_workers=workers), Dist(), start_step=1)
        seen.append([next(it) for _ in range(4)])
    for a, b in zip(*seen, strict=True):
        assert a.sample_ids == b.sample_ids
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
        assert torch.equal(a.pixel_values, b.pixel_values)


def test_start_up_probes_each_video_once_in_worker_processes(clips, tok, tmp_path, caplog):
    _, videos = clips
    samples = [Sample(f"s{i}", v, "mr", (EventTarget((0.5, 2.0)),), query="x")
               for i, v in enumerate(videos * 3)]  # fmt: skip
    samples.append(Sample("gone", tmp_path / "gone.mp4", "mr", (EventTarget((0.5, 2.0)),),
                          query="x"))  # fmt: skip
    caplog.set_level("INFO")
    kept = []
    for workers in (0, 2):
        ds = GroundingDataset(samples, CFG, tok, num_frames=4, on_bad="skip",
                              probe_workers=workers)  # fmt: skip
        kept.append([s.id for s in ds.samples])
    assert kept[0] == kept[1] == [f"s{i}" for i in range(6)]
    assert caplog.text.count("probed 3 videos") == 2  # 7 samples, 3 distinct videos
    assert "'gone'" in caplog.text and "does not exist" in caplog.text


@pytest.mark.parametrize("template", ["llama_2", "mistral_instruct"])
def test_without_the_answer_space_the_sequence_starts_like_the_runtime_prompt(tok, template):
    """answer_space: false (models trained from scratch for this runtime): everything up to
    the answer's first <sync> is the runtime's inference prompt, id for id."""
    from trace_rt.prompts import PromptSet, prompt_ids

    prompts = PromptSet.load()
    s = Sample("g", default_tokenizer_model(), "mr", (EventTarget((1.0, 2.0)),), query="a cat")
    turns = sample_turns(s, prompts)
    runtime = prompt_ids("mr", tok=tok, ids=IDS, query="a cat", template=template)
    seq, labels = render(turns, tok, IDS, prompts, template, answer_space=False)
    assert seq[: len(runtime)] == runtime and runtime[-1] == 32000
    assert labels[0, len(runtime) - 1] == 32000  # that <sync> is still a labelled target
    spaced, _ = render(turns, tok, IDS, prompts, template)
    assert spaced[: len(runtime) - 1] == runtime[:-1] and spaced[len(runtime) - 1] == 28705
