"""The decoding loop and sampler, driven by a scripted backend.

The real backends are exercised end to end in test_run.py; here a backend that replays
chosen logits pins down the loop's own rules: head switching, stops, sampling, constraints.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from trace_rt.config import IdSpace
from trace_rt.errors import InputError
from trace_rt.generate import GenerationConfig, Sampler, generate
from trace_rt.tokens import Head, head_size

IDS = IdSpace(32000, 13, 13)


class _Cfg:
    ids = IDS
    eos_token_id = 2


class ScriptedBackend:
    """Emits, at each step, logits that favour the next id of *script* (unified ids)."""

    name = "scripted"
    config = _Cfg()

    def __init__(self, script: list[int], noise_seed: int | None = None):
        self.script = list(script)
        self.heads: list[Head] = []
        self.fed: list[int] = []
        self.rng = np.random.default_rng(noise_seed) if noise_seed is not None else None

    def _logits(self, head: Head) -> np.ndarray:
        self.heads.append(head)
        n = head_size(IDS, head)
        if self.rng is not None:
            logits = self.rng.normal(size=n).astype(np.float32) * 5
            if head is Head.TEXT:
                # Captions end: the text <sync> wins about half the text steps (over the
                # max of 32000 noisy logits, ~20), so 300 tokens hold many events; EOS
                # never wins, so the budget, not chance, ends the stream.
                logits[IDS.text_sync] += 21.0
                logits[self.config.eos_token_id] = -1e9
            return logits
        logits = np.zeros(n, np.float32)
        want = self.script[len(self.heads) - 1]
        base = {Head.TEXT: 0, Head.TIME: IDS.time_base, Head.SCORE: IDS.score_base}[head]
        assert 0 <= want - base < n, f"script id {want} is not in the {head.name} head"
        logits[want - base] = 10.0
        return logits

    def encode_video(self, pixel_values, time_ids):
        return None

    max_sequences = 1

    def prefill(self, prompt_ids, video, head, *, slot=0, prefix=None):
        return self._logits(head)

    def decode(self, slots, token_ids, heads):
        assert list(slots) == [0]
        self.fed.extend(token_ids)
        return [self._logits(h) for h in heads]

    def release(self, slot):
        pass

    def synchronize(self):
        pass


def t(s: str) -> list[int]:  # time tokens of "0012.3|<sep>|<sync>"
    table = {"<sync>": 0, "<sep>": 1, ".": 12, **{str(d): 2 + d for d in range(10)}}
    parts = re.findall(r"<sync>|<sep>|.", s)
    return [IDS.time_base + table[p] for p in parts]


def sc(s: str) -> list[int]:
    return [i - IDS.time_base + IDS.score_base for i in t(s)]


def test_head_switching_and_eos():
    script = t("0001.0<sep>0002.5<sync>") + sc("4.0<sync>") + [330, 32000] + t("0003.0<sync>")
    script += [*sc("1.0<sync>"), 2]
    b = ScriptedBackend(script)
    res = generate(b, [1, -201, 32000], None, GenerationConfig(max_new_tokens=100))
    assert res.token_ids == script
    assert res.stop_reason == "eos"
    n1 = len(t("0001.0<sep>0002.5<sync>"))
    assert b.heads[:n1] == [Head.TIME] * n1
    assert b.heads[n1 : n1 + 4] == [Head.SCORE] * 4
    assert b.heads[n1 + 4 : n1 + 6] == [Head.TEXT] * 2
    assert b.heads[n1 + 6] == Head.TIME
    assert b.fed == script[:-1]  # every id but the last is fed back


def test_budget_stops_without_extra_step():
    b = ScriptedBackend(t("0001.0<sep>0002.0<sep>"))
    res = generate(b, [1, -201, 32000], None, GenerationConfig(max_new_tokens=5))
    assert len(res.token_ids) == 5 and res.stop_reason == "max_new_tokens"
    assert len(b.heads) == 5  # no decode step whose logits nobody reads


def test_eos_only_from_text_head():
    # id 2 in the time head is a digit ('0'), not EOS: generation must go on.
    b = ScriptedBackend(t("0000.0<sync>"))
    res = generate(b, [1, -201, 32000], None, GenerationConfig(max_new_tokens=7))
    assert res.stop_reason == "max_new_tokens"


@pytest.mark.parametrize("duration", [0.0, 3.7, 125.0, 20000.0])
def test_constrained_with_noise_is_well_formed(duration):
    """300 noisy tokens under constraints: many time and score segments, each well formed
    and in range, and only an unfinished last segment (cut by the budget) left over."""
    for seed in range(5):
        b = ScriptedBackend([], noise_seed=seed)
        gen = GenerationConfig(max_new_tokens=300, constrained=True)
        res = generate(b, [1, -201, 32000], None, gen, duration=duration)
        assert len(res.token_ids) == 300 and res.stop_reason == "max_new_tokens"
        time_text = "".join(_char(i - IDS.time_base) for i in res.token_ids if _is_time(i))
        score_text = "".join(_char(i - IDS.score_base) for i in res.token_ids if _is_score(i))
        time_segs = re.findall(r".*?<sync>", time_text)
        score_segs = re.findall(r".*?<sync>", score_text)
        assert len(time_segs) >= 8 and len(score_segs) >= 8, (len(time_segs), len(score_segs))
        for seg in time_segs:
            assert re.fullmatch(r"\d{4}\.\d(<sep>\d{4}\.\d)*<sync>", seg), seg
            for v in re.findall(r"\d{4}\.\d", seg):
                assert float(v) <= min(duration, 9999.9) + 1e-9
        for seg in score_segs:
            assert re.fullmatch(r"\d\.\d(<sep>\d\.\d)*<sync>", seg), seg
        # what follows the last <sync> is a prefix of a well-formed segment
        time_tail = time_text[len("".join(time_segs)) :]
        score_tail = score_text[len("".join(score_segs)) :]
        assert re.fullmatch(r"(\d{4}\.\d<sep>)*\d{0,4}\.?\d?", time_tail), time_tail
        assert re.fullmatch(r"(\d\.\d<sep>)*\d?\.?\d?", score_tail), score_tail


def _is_time(i: int) -> bool:
    return IDS.time_base <= i < IDS.score_base


def _is_score(i: int) -> bool:
    return IDS.score_base <= i < IDS.size


def _char(local: int) -> str:
    return ("<sync>", "<sep>", *"0123456789.")[local]


def test_sampler_greedy_and_seeded():
    logits = np.array([0.0, 1.0, 3.0, 2.0], np.float32)
    assert Sampler(GenerationConfig())(logits) == 2
    a = Sampler(GenerationConfig(temperature=1.0, seed=7))
    b = Sampler(GenerationConfig(temperature=1.0, seed=7))
    assert [a(logits) for _ in range(50)] == [b(logits) for _ in range(50)]
    s = Sampler(GenerationConfig(temperature=1.0, seed=0))
    assert len({s(logits) for _ in range(200)}) == 4  # all tokens reachable at T=1


def test_top_p_keeps_the_nucleus():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    s = Sampler(GenerationConfig(temperature=1.0, top_p=0.7, seed=0))
    assert {s(logits) for _ in range(300)} == {0, 1}  # 0.5 + 0.3 reaches 0.7
    s = Sampler(GenerationConfig(temperature=1.0, top_p=0.01, seed=0))
    assert {s(logits) for _ in range(50)} == {0}


def test_low_temperature_approaches_greedy():
    logits = np.array([0.0, 1.0, 1.5, 2.0])
    s = Sampler(GenerationConfig(temperature=0.01, seed=3))
    assert {s(logits) for _ in range(100)} == {3}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_new_tokens": 0},
        {"max_new_tokens": -3},
        {"temperature": -1.0},
        {"top_p": 0.0},
        {"top_p": 1.5},
    ],
)
def test_bad_generation_settings(kwargs):
    with pytest.raises(InputError):
        GenerationConfig(**kwargs)


def test_ignore_eos_runs_the_whole_budget():
    # Benchmarks need a fixed number of steps: EOS from the text head is fed back like any id.
    script = [*t("<sync>"), *sc("<sync>"), 330, 2, 331, 2]
    b = ScriptedBackend(script)
    gen = GenerationConfig(max_new_tokens=6, ignore_eos=True)
    res = generate(b, [1, -201, 32000], None, gen)
    assert res.token_ids == script
    assert res.stop_reason == "max_new_tokens"
    assert b.fed == res.token_ids[:-1]
