"""`trace-rt run` end to end on `tiny`: greedy tokens equal the oracle's, JSON contract, errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from benchmarks.reference import ReferenceTrace
from trace_rt.errors import InputError, PromptTooLongError, VideoNotFoundError
from trace_rt.generate import GenerationConfig
from trace_rt.pipeline import Pipeline
from trace_rt.video import load_video

QUERY = "a red circle moves left"
BUDGET = 48


@pytest.fixture(scope="module")
def pipelines(tiny_ckpts):
    # exact: these tests hold the whole pipeline to the oracle, preprocessing included
    return {s: Pipeline.from_dir(p, resize="exact") for s, p in tiny_ckpts.items()}


@pytest.fixture(scope="module")
def oracles(tiny_ckpts):
    return {s: ReferenceTrace.from_pretrained(p) for s, p in tiny_ckpts.items()}


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("task", ["dvc", "mr", "vhd"])
@pytest.mark.parametrize("frames", [3, 8])
def test_tokens_equal_oracle(pipelines, oracles, clip_video, seed, task, frames):
    query = None if task == "dvc" else QUERY
    res = pipelines[seed].run(
        clip_video, task, query=query, frames=frames, gen=GenerationConfig(max_new_tokens=BUDGET)
    )
    clip = load_video(clip_video, frames)
    # The oracle preprocesses the decoded frames itself (expand2square + CLIPImageProcessor).
    pixels = oracles[seed].preprocess(clip.frames)
    want = oracles[seed].generate(res["prompt_ids"], pixels, list(clip.times), BUDGET)
    assert res["token_ids"] == want
    assert res["frames"] == frames and res["frame_times"] == pytest.approx(list(clip.times))


def test_json_contract(pipelines, clip_video):
    res = pipelines[1].run(clip_video, "mr", query=QUERY, gen=GenerationConfig(max_new_tokens=24))
    assert set(res) == {
        "video", "task", "duration", "frames", "events", "token_ids", "prompt_ids",
        "frame_times", "stop_reason", "timing_ms",
    }  # fmt: skip
    assert res["stop_reason"] in ("eos", "max_new_tokens")
    assert set(res["timing_ms"]) == {"video", "vision", "prefill", "decode", "total"}
    assert res["frames"] == 8  # tiny's num_frames is the default
    assert res["duration"] == pytest.approx(4.0, abs=0.11)
    ids = res["prompt_ids"]
    assert ids[:4] == [1, 733, 16289, 28793]  # BOS "[INST]"
    i = ids.index(-201)
    assert ids[i + 1 : i + 3] == [28705, 13] and ids[-1] == 32000 and ids.count(-201) == 1
    for e in res["events"]:
        assert set(e) == {"timestamps", "scores", "caption"}
    json.dumps(res)


def test_constrained_run_is_well_formed(pipelines, clip_video):
    gen = GenerationConfig(max_new_tokens=120, constrained=True)
    res = pipelines[2].run(clip_video, "dvc", gen=gen)
    ids = res["token_ids"]
    assert ids[0] != 32001  # at least one timestamp before the time <sync>
    for e in res["events"]:
        for t in e["timestamps"]:
            assert 0 <= t <= res["duration"]
    chars = "".join(
        "|" if i == 32001 else "," if i == 32002 else "0123456789."[i - 32003]
        for i in ids
        if 32001 <= i <= 32013
    )
    for seg in chars.split("|")[:-1]:
        assert re.fullmatch(r"\d{4}\.\d(,\d{4}\.\d)*", seg), seg


def test_sampling_is_seeded(pipelines, clip_video):
    def run(seed):
        gen = GenerationConfig(max_new_tokens=32, temperature=1.0, top_p=0.9, seed=seed)
        return pipelines[1].run(clip_video, "dvc", gen=gen)["token_ids"]

    assert run(5) == run(5)
    assert any(run(s) != run(5) for s in (6, 7, 8))


def test_request_errors(pipelines, clip_video, tmp_path):
    p = pipelines[1]
    with pytest.raises(InputError, match="query"):
        p.run(clip_video, "mr")
    with pytest.raises(InputError, match="task"):
        p.run(clip_video, "summarise")
    with pytest.raises(VideoNotFoundError, match=r"nope\.mp4"):
        p.run(tmp_path / "nope.mp4", "dvc")
    with pytest.raises(PromptTooLongError, match="context"):
        p.run(clip_video, "dvc", frames=400)


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "trace_rt", "run", *map(str, args)], capture_output=True, text=True
    )


def test_cli_run(tiny_ckpts, pipelines, clip_video):
    out = _cli(clip_video, "--model", tiny_ckpts[3], "--task", "vhd", "--query", QUERY,
               "--max-new-tokens", 20, "--frames", 4)  # fmt: skip
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    direct = pipelines[3].run(
        clip_video, "vhd", query=QUERY, frames=4, gen=GenerationConfig(max_new_tokens=20)
    )
    assert res["token_ids"] == direct["token_ids"] and res["events"] == direct["events"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "mr"], "query"),
        (["--task", "dvc", "--max-new-tokens", "0"], "max_new_tokens"),
        (["--task", "dvc", "--frames", "0"], "frames"),
    ],
)
def test_cli_errors(tiny_ckpt, clip_video, args, message):
    out = _cli(clip_video, "--model", tiny_ckpt, *args)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr


def test_cli_missing_video_and_model(tiny_ckpt, tmp_path):
    out = _cli(tmp_path / "missing.mp4", "--model", tiny_ckpt)
    assert out.returncode == 2 and "missing.mp4" in out.stderr
    out = _cli(tmp_path / "missing.mp4", "--model", tmp_path)
    assert out.returncode == 2 and "config.json" in out.stderr


@pytest.fixture(scope="module")
def walkers(tiny_ckpt, tmp_path_factory):
    from tests.walker import make_walker

    root = tmp_path_factory.mktemp("walkers")
    return {
        eos: make_walker(tiny_ckpt, root / f"walker-{eos}", end_with_eos=eos)
        for eos in (False, True)
    }


@pytest.mark.parametrize("eos", [False, True])
@pytest.mark.parametrize("task", ["dvc", "mr", "vhd"])
def test_walker_switches_heads_like_the_oracle(walkers, clip_video, eos, task):
    from tests.walker import answer_path

    pipe = Pipeline.from_dir(walkers[eos], resize="exact")
    query = None if task == "dvc" else QUERY
    res = pipe.run(clip_video, task, query=query, gen=GenerationConfig(max_new_tokens=40))
    path = answer_path(pipe.tokenizer, eos)
    if eos:
        assert res["token_ids"] == path
    else:
        cycle = [*path[:-1], 32000]
        assert res["token_ids"] == (cycle * 4)[:40]
    clip = load_video(clip_video, pipe.config.num_frames)
    oracle = ReferenceTrace.from_pretrained(walkers[eos])
    pixels = oracle.preprocess(clip.frames)
    assert res["token_ids"] == oracle.generate(res["prompt_ids"], pixels, list(clip.times), 40)
    first = res["events"][0]
    assert first == {"timestamps": [123.4], "scores": [4.5], "caption": "a dog"}
    assert len(res["events"]) == (1 if eos else 3)


def test_walker_constrained_keeps_timestamps_inside(walkers, clip_video):
    pipe = Pipeline.from_dir(walkers[True])
    gen = GenerationConfig(max_new_tokens=40, constrained=True)
    res = pipe.run(clip_video, "dvc", gen=gen)
    # Unconstrained the model says 123.4 s; the clip is 4 s long.
    stamps = [t for e in res["events"] for t in e["timestamps"]]
    assert stamps and all(0 <= t <= res["duration"] for t in stamps)
    assert res["events"][0]["scores"] == [4.5]
