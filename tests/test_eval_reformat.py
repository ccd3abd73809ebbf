"""Generated id streams -> the original's lists and predictions (and the lenient rules)."""

from __future__ import annotations

import pytest

from trace_rt.config import TraceConfig
from trace_rt.evaluation import reformat as rf
from trace_rt.tokenizer import TextTokenizer
from trace_rt.tokens import DIGIT0, DOT, SEP, format_score, format_time


@pytest.fixture(scope="module")
def env(tiny_ckpt):
    return TextTokenizer.from_dir(tiny_ckpt), TraceConfig.from_dir(tiny_ckpt).ids


class Stream:
    """Builds id streams in the unified id space."""

    def __init__(self, tok, ids):
        self.tok, self.ids, self.out = tok, ids, []

    def _num(self, base, text):
        self.out += [base + (DOT if c == "." else DIGIT0 + int(c)) for c in text]
        return self

    def t(self, *values, close=True):
        for k, v in enumerate(values):
            if k:
                self.out.append(self.ids.time_base + SEP)
            self._num(self.ids.time_base, format_time(v))
        if close:
            self.out.append(self.ids.time_sync)
        return self

    def raw_time(self, text):
        return self._num(self.ids.time_base, text)

    def s(self, *values):
        for k, v in enumerate(values):
            if k:
                self.out.append(self.ids.score_base + SEP)
            self._num(self.ids.score_base, format_score(v))
        self.out.append(self.ids.score_sync)
        return self

    def text(self, words, close=True):
        self.out += self.tok.encode(words) if words else []
        if close:
            self.out.append(self.ids.text_sync)
        return self

    def eos(self):
        self.out.append(self.tok.eos_id)
        return self


def _rec(env, ids):
    tok, space = env
    return {
        "release": rf.release_output(ids, tok, space).to_dict(),
        "events": rf.lenient_events(ids, tok, space),
    }


def test_complete_moment_stream(env):
    ids = Stream(*env).t(1.5, 4.0).s().eos().out
    rec = _rec(env, ids)
    assert rec["release"] == {"timestamps": [[1.5, 4.0]], "scores": [[]], "captions": [""],
                              "kept": True, "malformed": 0}  # fmt: skip
    assert rf.to_moment(rec) == [1.5, 4.0] and rf.to_moment(rec, "lenient") == [1.5, 4.0]
    assert not rf.is_dropped(rec)


def test_truncated_streams(env):
    # Cut inside a number: no list closed, no caption -> the original keeps no result.
    s = Stream(*env).t(1.5, close=False)
    s.out.append(env[1].time_base + SEP)
    cut = _rec(env, s.raw_time("000").out)
    assert cut["release"]["timestamps"] == [] and rf.is_dropped(cut)
    assert cut["events"] == [{"timestamps": [1.5], "scores": [], "caption": ""}]
    assert rf.to_moment(cut, "lenient") is None and not rf.is_dropped(cut, "lenient")
    # Cut right after the time <sync>: a span, but no trailing text -> dropped by the original.
    after = _rec(env, Stream(*env).t(1.5, 4.0).out)
    assert rf.is_dropped(after) and rf.to_moment(after, "lenient") == [1.5, 4.0]


def test_malformed_and_out_of_space_ids(env):
    tok, ids = env
    s = Stream(tok, ids).raw_time("00.1.2")
    s.out.append(ids.time_base + SEP)
    s.t(2.0, 3.0).eos()
    rec = _rec(env, [-5, *s.out, ids.size + 3])
    assert rec["release"]["malformed"] == 1  # the original's float() would abort the run
    assert rec["release"]["timestamps"] == [[2.0, 3.0]] and rf.to_moment(rec) == [2.0, 3.0]


def test_reversed_span(env):
    rec = _rec(env, Stream(*env).t(4.0, 1.5).eos().out)
    assert rf.to_moment(rec) == [4.0, 1.5]  # kept reversed: scores IoU 0 in eval_tvg
    assert rf.to_moment(rec, "lenient") == [1.5, 4.0]


def test_exactly_two_timestamps_rule_and_zip(env):
    ids = Stream(*env).t(1.0, 2.0, 3.0).text("a").t(5.0, 6.0).eos().out
    rec = _rec(env, ids)
    assert rf.to_moment(rec) == [5.0, 6.0]  # the first list of exactly two
    assert rf.to_moment(rec, "lenient") == [1.0, 2.0]
    # Two time lists, one caption: zip pairs only the first (the original's dense rule).
    ids = Stream(*env).t(1.0, 2.0).t(3.0, 4.0).text("cut onions", close=False).eos().out
    rec = _rec(env, ids)
    assert rec["release"]["captions"] == ["cut onions"]
    assert rf.to_dense_events(rec) == [{"timestamp": [1.0, 2.0], "caption": "cut onions"}]
    lenient = rf.to_dense_events(rec, "lenient")
    assert [e["timestamp"] for e in lenient] == [[1.0, 2.0], [3.0, 4.0]]
    assert lenient[1]["caption"] == "cut onions"


def test_dense_stream(env):
    ids = Stream(*env).t(0.0, 2.5).text("a man cuts onions").t(3.0).text("x")
    ids = ids.t(6.0, 4.0).text("he fries them", close=False).eos().out
    rec = _rec(env, ids)
    assert rf.to_dense_events(rec) == [
        {"timestamp": [0.0, 2.5], "caption": "a man cuts onions"},
        {"timestamp": [6.0, 4.0], "caption": "he fries them"},
    ]
    assert rf.to_dense_events(rec, "lenient")[1]["timestamp"] == [4.0, 6.0]


def test_highlight_stream_clip_rules_and_past_the_end(env):
    s = Stream(*env).t(3.0).s(4.0).text("")
    s.t(12.0).s(5.0).text("")  # past the 10 s video: ignored
    s.t(0.5).s(2.0).text("")
    s.t(7.0, 9.0).s(1.0, 3.0).eos()
    rec = _rec(env, s.out)
    # Original: clip max(0, int(t/2) - 1), first pair per event: 3.0 -> 0, 0.5 -> 0, 7.0 -> 2.
    assert rf.to_clip_scores(rec, 10.0) == [3.0, 0.0, 1.0, 0.0, 0.0]
    # Lenient: clip int(t/2), every pair: 3.0 -> 1, 0.5 -> 0, 7.0 -> 3, 9.0 -> 4.
    assert rf.to_clip_scores(rec, 10.0, "lenient") == [2.0, 4.0, 0.0, 1.0, 3.0]
    assert rf.to_clip_scores(rec, 1.5) == []  # under one clip


def test_highlight_missing_scores(env):
    # An event with a timestamp but no score list: the original pads with 0.0 (then fails
    # on len(0.0)); here it averages as score 0. Lenient skips the event.
    s = Stream(*env).t(4.0).s(4.0).text("").t(5.0).text("", close=False).eos()
    rec = _rec(env, s.out)
    assert rec["release"]["scores"] == [[4.0]] and len(rec["release"]["timestamps"]) == 2
    assert rf.to_clip_scores(rec, 8.0) == [0.0, 2.0, 0.0, 0.0]
    assert rf.to_clip_scores(rec, 8.0, "lenient") == [0.0, 0.0, 4.0, 0.0]
    no_scores = _rec(env, Stream(*env).t(4.0).text("", close=False).eos().out)
    assert rf.to_clip_scores(no_scores, 8.0) == [0.0] * 4  # no score list at all


def test_original_raw_results_round_trip():
    item = {"video": "/d/v1.mp4", "id": 3, "timestamps": [[1.0, 2.0], [3.0]],
            "scores": [], "captions": ["a", "b"]}  # fmt: skip
    rec = rf.release_from_original(item)
    assert rf.to_moment(rec) == [1.0, 2.0]
    assert rf.to_dense_events(rec) == [{"timestamp": [1.0, 2.0], "caption": "a"}]
    assert [e["timestamps"] for e in rec["events"]] == [[1.0, 2.0], [3.0]]
    with pytest.raises(ValueError, match="rules"):
        rf.to_moment(rec, "strict")
