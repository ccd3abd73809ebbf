"""Frame-aligned timestamps (``timestamps="frames"``): the time head spells only frame times.

The loop's rule is pinned with the scripted backend of test_generate.py (chosen logits:
complying streams pass unchanged, others are bent onto frame times); the real backends
(torch and onnxruntime on `tiny`, greedy and sampled) show it holds end to end.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from tests.test_generate import IDS, ScriptedBackend, sc, t
from trace_rt.constrained import SegmentGrammar, constrain_logits, frame_time_strings
from trace_rt.errors import InputError
from trace_rt.generate import GenerationConfig, generate
from trace_rt.tokens import LOCAL_VOCAB, Head

FRAMES = [0.0, 1.25, 2.5, 3.75, 5.0, 12.34]  # spelt 0000.0 0001.2 0002.5 0003.8 0005.0 0012.3
PROMPT = [1, -201, 32000]


def time_values(token_ids, time_base: int, score_base: int) -> list[str]:
    """Every complete ``dddd.d`` the time head spelt in *token_ids*."""
    text = "".join(
        LOCAL_VOCAB[i - time_base] if time_base <= i < score_base else "|" for i in token_ids
    )
    return re.findall(r"\d{4}\.\d", text.replace("<sep>", "|").replace("<sync>", "|"))


def test_frame_time_strings_use_the_release_rounding():
    assert frame_time_strings(FRAMES) == [format(x, "0>6.1f") for x in sorted(FRAMES)]
    assert frame_time_strings([1.25, 1.25, 0.04]) == ["0000.0", "0001.2"]
    with pytest.raises(ValueError, match="at least one"):
        frame_time_strings([])
    with pytest.raises(ValueError, match="finite"):
        frame_time_strings([float("nan")])


def test_grammar_walks_only_the_trie():
    g = SegmentGrammar(Head.TIME, frame_times=FRAMES)
    allowed = [LOCAL_VOCAB[i] for i in np.flatnonzero(g.allowed())]
    assert allowed == ["0"]
    for ch in "001":
        g.advance(LOCAL_VOCAB.index(ch))
    assert [LOCAL_VOCAB[i] for i in np.flatnonzero(g.allowed())] == ["2"]  # only 0012.3
    with pytest.raises(ValueError, match="not allowed"):
        g.advance(LOCAL_VOCAB.index("3"))


def test_complying_stream_is_unchanged():
    """A model that already spells frame times decodes the same ids in both modes."""
    script = t("0001.2<sep>0003.8<sync>") + sc("4.0<sync>") + [330, 32000]
    script += [*t("0012.3<sync>"), *sc("1.0<sync>"), 2]
    free = generate(ScriptedBackend(script), PROMPT, None, GenerationConfig(max_new_tokens=99))
    gen = GenerationConfig(max_new_tokens=99, timestamps="frames")
    aligned = generate(ScriptedBackend(script), PROMPT, None, gen, frame_times=FRAMES)
    assert free.token_ids == script
    assert aligned.token_ids == free.token_ids


def test_non_frame_time_is_bent_onto_a_frame_time():
    # 0002.7 is no frame time: after "0002." only "5" (0002.5) may follow.
    script = t("0002.7<sync>") + sc("4.0<sync>") + [330, 2]
    gen = GenerationConfig(max_new_tokens=99, timestamps="frames")
    res = generate(ScriptedBackend(script), PROMPT, None, gen, frame_times=FRAMES)
    assert time_values(res.token_ids, IDS.time_base, IDS.score_base) == ["0002.5"]
    assert res.token_ids[6:] == script[6:]  # the rest of the stream follows the model


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("constrained", [False, True])
def test_noisy_stream_spells_only_frame_times(temperature, constrained):
    allowed = set(frame_time_strings(FRAMES))
    for seed in range(4):
        b = ScriptedBackend([], noise_seed=seed)
        gen = GenerationConfig(
            max_new_tokens=300,
            timestamps="frames",
            temperature=temperature,
            seed=seed,
            constrained=constrained,
        )
        res = generate(b, PROMPT, None, gen, frame_times=FRAMES)
        values = time_values(res.token_ids, IDS.time_base, IDS.score_base)
        assert len(values) >= 8 and set(values) <= allowed, values


def test_frames_mode_needs_frame_times_and_a_known_mode():
    with pytest.raises(InputError, match="frame"):
        generate(ScriptedBackend([]), PROMPT, None, GenerationConfig(timestamps="frames"))
    with pytest.raises(InputError, match="timestamps must be one of free, frames"):
        GenerationConfig(timestamps="frame")


def test_constrain_logits_keeps_argmax_on_trie():
    g = SegmentGrammar(Head.TIME, frame_times=[7.0])
    row = np.zeros(len(LOCAL_VOCAB), np.float32)
    row[LOCAL_VOCAB.index("9")] = 1e9
    assert LOCAL_VOCAB[int(np.argmax(constrain_logits(row, g.allowed())))] == "0"


@pytest.fixture(scope="module")
def tiny_artifact(tiny_ckpt, tmp_path_factory):
    from export import export_onnx

    return export_onnx(tiny_ckpt, tmp_path_factory.mktemp("art") / "tiny", progress=False)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
@pytest.mark.parametrize("temperature", [0.0, 1.5])
def test_backends_spell_only_frame_times(
    tiny_ckpt, tiny_artifact, clip_video, backend, temperature
):
    from trace_rt.pipeline import Pipeline

    model = tiny_ckpt if backend == "torch" else tiny_artifact
    pipe = Pipeline.from_dir(model, backend)
    ids = pipe.config.ids
    seen = 0
    for seed in range(3):
        gen = GenerationConfig(
            max_new_tokens=64, temperature=temperature, seed=seed, timestamps="frames"
        )
        res = pipe.run(clip_video, "dvc", frames=5, gen=gen)
        allowed = set(frame_time_strings(res["frame_times"]))
        values = time_values(res["token_ids"], ids.time_base, ids.score_base)
        assert set(values) <= allowed, (values, allowed)
        for ev in res["events"]:
            assert {format(x, "0>6.1f") for x in ev["timestamps"]} <= allowed
        seen += len(values)
    assert seen > 0, "the random model spelt no complete timestamp: the test proves nothing"


def test_cli_run_question_with_frame_timestamps(capsys, tiny_ckpt, clip_video):
    """`trace-rt run --question ... --timestamps frames`: braces and quotes reach the prompt
    literally, the answer is the first caption, timestamps are frame times."""
    from tests.test_cli import _main
    from trace_rt.pipeline import Pipeline

    question = 'Does "{}" or {0} or {question} appear?'
    code, out, err = _main(capsys, "run", clip_video, "--model", tiny_ckpt, "--question",
                           question, "--timestamps", "frames", "--frames", "5",
                           "--max-new-tokens", "48")  # fmt: skip
    assert code == 0, err
    res = json.loads(out)
    assert res["task"] == "custom"
    assert res["answer"] == (res["events"][0]["caption"] if res["events"] else "")
    pipe = Pipeline.from_dir(tiny_ckpt)
    assert res["prompt_ids"] == pipe.prepare(clip_video, None, question=question).prompt_ids
    text = pipe.tokenizer.decode([i for i in res["prompt_ids"] if 0 <= i < 32000])
    assert question in text
    gen = GenerationConfig(max_new_tokens=48, timestamps="frames")
    assert res["token_ids"] == pipe.run(clip_video, None, question=question, frames=5,
                                        gen=gen)["token_ids"]  # fmt: skip
    allowed = set(frame_time_strings(res["frame_times"]))
    assert set(time_values(res["token_ids"], 32000, 32013)) <= allowed
