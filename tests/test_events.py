"""The event parser on hand-written id streams."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trace_rt.config import IdSpace
from trace_rt.events import Event, EventParser, first_span, highlights, parse_events
from trace_rt.tokenizer import TextTokenizer
from trace_rt.tokens import (
    DIGIT0,
    DOT,
    LOCAL_VOCAB,
    SCORE_FORMAT,
    SEP,
    SYNC,
    TIME_FORMAT,
    Head,
    encode_values,
    head_base,
    heads_along,
)

IDS = IdSpace(32000, 13, 13)
TS, SS, XS = IDS.time_sync, IDS.score_sync, IDS.text_sync  # 32001, 32014, 32000
EOS = 2


def times(*values: float) -> list[int]:
    return [head_base(IDS, Head.TIME) + i for i in encode_values(list(values), TIME_FORMAT)]


def scores_(*values: float) -> list[int]:
    return [head_base(IDS, Head.SCORE) + i for i in encode_values(list(values), SCORE_FORMAT)]


def raw(head: Head, text: str) -> list[int]:
    """Local tokens spelled out: '<sep>', '<sync>', digits and '.'."""
    out, i = [], 0
    while i < len(text):
        for n, piece in enumerate(LOCAL_VOCAB):
            if text.startswith(piece, i):
                out.append(head_base(IDS, head) + n)
                i += len(piece)
                break
        else:
            raise ValueError(text[i:])
    return out


def caption(tok: TextTokenizer, text: str) -> list[int]:
    return [*tok.encode(text), XS]


def test_heads_along() -> None:
    """Each token's head, replayed from the time head: a <sync> hands over after itself."""
    t, s_, x = head_base(IDS, Head.TIME) + 3, head_base(IDS, Head.SCORE) + 4, 845
    stream = [t, TS, s_, SS, x, x, XS, t]
    want = ["TIME", "TIME", "SCORE", "SCORE", "TEXT", "TEXT", "TEXT", "TIME"]
    assert [h.name for h in heads_along(IDS, stream)] == want
    assert heads_along(IDS, []) == [Head.TIME]  # the prefill's, with no tokens


def test_stream_helpers() -> None:
    assert times(12.3, 18.0) == raw(Head.TIME, "0012.3<sep>0018.0<sync>")
    assert times(12.3)[-1] == 32001 and scores_(4.0) == [32020, 32026, 32016, 32014]


def test_dense_captioning_stream(tok) -> None:
    stream = [
        *times(0.0, 12.5), *scores_(4.0), *caption(tok, "a man walks in"),
        *times(12.5, 30.1), *scores_(3.5), *caption(tok, "he slices onions."),
        *times(30.1, 45.0), *scores_(2.0), *tok.encode(" he cooks"), EOS,
    ]  # fmt: skip
    events = parse_events(stream, tok, IDS)
    assert [e.to_dict() for e in events] == [
        {"timestamps": [0.0, 12.5], "scores": [4.0], "caption": "a man walks in"},
        {"timestamps": [12.5, 30.1], "scores": [3.5], "caption": "he slices onions."},
        {"timestamps": [30.1, 45.0], "scores": [2.0], "caption": "he cooks"},
    ]


def test_moment_retrieval_stream(tok) -> None:
    stream = [*times(18.0, 7.5), *scores_(5.0), *caption(tok, "the dog jumps"), EOS]
    events = parse_events(stream, tok, IDS)
    assert first_span(events) == (7.5, 18.0)


def test_highlight_stream(tok) -> None:
    stream = [*times(2.0), *scores_(4.0), XS, *times(6.0, 8.0), *scores_(2.5, 3.0), XS, EOS]
    events = parse_events(stream, tok, IDS)
    assert [e.caption for e in events] == ["", ""]
    assert highlights(events) == [(2.0, 4.0), (6.0, 2.5), (8.0, 3.0)]
    assert first_span(events) == (6.0, 8.0)  # the first event with two timestamps


def test_eos_ends_stream(tok) -> None:
    stream = [*times(1.0, 2.0), *scores_(1.0), *tok.encode("x"), EOS, *times(3.0, 4.0), EOS]
    events = parse_events(stream, tok, IDS)
    assert [e.to_dict() for e in events] == [
        {"timestamps": [1.0, 2.0], "scores": [1.0], "caption": "x"}
    ]


@pytest.mark.parametrize(
    ("cut", "timestamps", "scores"),
    [
        (6, [1.5], []),  # "0001.5": complete though unclosed
        (7, [1.5], []),
        (10, [1.5], []),  # "002" of "0020.0" is cut off: dropped
        (14, [1.5, 20.0], []),
        (16, [1.5, 20.0], []),  # "4." cut off
        (17, [1.5, 20.0], [4.5]),  # "4.5" complete
    ],
)
def test_truncated_streams_keep_partial_event(tok, cut, timestamps, scores) -> None:
    stream = [*times(1.5, 20.0), *scores_(4.5), *tok.encode("a cat")]
    events = parse_events(stream[:cut], tok, IDS)
    assert events == [Event(timestamps, scores, "")]


def test_truncated_first_number_gives_no_event(tok) -> None:
    assert parse_events(times(1.5)[:3], tok, IDS) == []


def test_truncated_in_caption(tok) -> None:
    stream = [*times(1.5, 20.0), *scores_(4.5), *tok.encode("a cat sits")]
    events = parse_events(stream, tok, IDS)
    assert events == [Event([1.5, 20.0], [4.5], "a cat sits")]


def test_malformed_numbers_are_dropped(tok) -> None:
    stream = [
        *raw(Head.TIME, "00.1.2<sep>0012.3<sep>.<sep>12<sync>"),
        *raw(Head.SCORE, "4..0<sep>3.0<sync>"),
        *caption(tok, "ok"),
    ]
    assert parse_events(stream, tok, IDS) == [Event([12.3, 12.0], [3.0], "ok")]


def test_empty_segments_and_stray_sep(tok) -> None:
    stream = [
        *raw(Head.TIME, "<sep><sep>0001.0<sep><sep>0002.0<sep><sync>"),
        *raw(Head.SCORE, "<sync>"),
        *caption(tok, "stray"),
        *raw(Head.TIME, "<sync>"),
        *raw(Head.SCORE, "<sep><sync>"),
        *caption(tok, "nothing timed"),
    ]
    assert parse_events(stream, tok, IDS) == [
        Event([1.0, 2.0], [], "stray"),
        Event([], [], "nothing timed"),
    ]


def test_empty_events_are_dropped(tok) -> None:
    assert parse_events([], tok, IDS) == []
    assert parse_events([XS, XS, EOS], tok, IDS) == []
    assert parse_events([*raw(Head.TIME, "<sync>"), *raw(Head.SCORE, "<sync>"), XS], tok, IDS) == []
    assert first_span([]) is None and highlights([]) == []


def test_unexpected_heads_are_routed_by_id(tok) -> None:
    # A text id inside the time segment joins the caption; a score id inside the time
    # segment joins the scores; the event stays one event.
    stream = [
        *raw(Head.TIME, "0001.0"), *tok.encode("hello"), *raw(Head.SCORE, "2.0<sep>"),
        *raw(Head.TIME, "<sep>0002.0<sync>"), *caption(tok, "world"),
    ]  # fmt: skip
    assert parse_events(stream, tok, IDS) == [Event([1.0, 2.0], [2.0], "hello world")]


def test_time_after_closed_time_segment_starts_new_event(tok) -> None:
    stream = [*times(1.0, 2.0), *scores_(3.0), *times(5.0, 6.0), *scores_(4.0), *caption(tok, "b")]
    assert parse_events(stream, tok, IDS) == [
        Event([1.0, 2.0], [3.0], ""),
        Event([5.0, 6.0], [4.0], "b"),
    ]
    stream = [*times(1.0), *times(2.0), *caption(tok, "c")]
    assert parse_events(stream, tok, IDS) == [Event([1.0], [], ""), Event([2.0], [], "c")]


def test_text_only_stream_and_specials(tok) -> None:
    stream = [1, *tok.encode("just text"), 0, *caption(tok, "more ")]
    assert parse_events(stream, tok, IDS) == [Event([], [], "just text more")]


def test_out_of_range_ids_ignored(tok) -> None:
    stream = [-201, -1, *times(3.0), IDS.size, 10**9, *scores_(1.0), *caption(tok, "z")]
    assert parse_events(stream, tok, IDS) == [Event([3.0], [1.0], "z")]


def test_numpy_ids(tok) -> None:
    np = pytest.importorskip("numpy")
    stream = np.array([*times(3.0, 4.0), *scores_(1.0), *caption(tok, "z")], dtype=np.int64)
    assert parse_events(stream, tok, IDS) == [Event([3.0, 4.0], [1.0], "z")]


def test_first_span_skips_events_without_two_timestamps(tok) -> None:
    events = [Event([5.0], [1.0], "a"), Event([9.0, 3.0, 1.0], [], "b")]
    assert first_span(events) == (3.0, 9.0)
    assert first_span([Event([5.0], [], "a")]) is None


def test_other_id_spaces(tok) -> None:
    """A checkpoint with another text vocab size moves every head's range."""
    ids = IdSpace(100, 13, 13)
    stream = [ids.time_base + 2 + 1, ids.time_base + 12, ids.time_base + 2 + 5, ids.time_sync]
    stream += [ids.score_base + 2 + 3, ids.score_sync, 50, ids.text_sync]
    events = parse_events(stream, tok, ids)
    assert [(e.timestamps, e.scores) for e in events] == [([1.5], [3.0])]


# Ids that make structure: every sync, EOS, digits, dots, separators, text, out of range.
_STRUCTURAL = sorted(
    {TS, SS, XS, EOS, -1, IDS.size, 415, 3914}
    | {head_base(IDS, h) + i for h in (Head.TIME, Head.SCORE) for i in range(13)}
)


def _numbers(chars: str, width: int) -> list[float]:
    """Numbers of one head's characters ('|' for <sep> and <sync>), per the module rules:
    closed numbers that float() reads; the unclosed tail only at its format's full width."""
    *closed, tail = chars.split("|")
    out = []
    for text in [*closed, tail] if len(tail) == width else closed:
        try:
            value = float(text)
        except ValueError:  # "00.1.2", ".", and "" (a stray <sep>)
            continue
        out.append(value)
    return out


def reference_events(stream: list[int], tok: TextTokenizer) -> list[dict]:
    """events.py's rules re-stated on strings, independently of EventParser: cut at EOS,
    split into events at text <sync> and where a time id follows a closed time segment,
    then read each head's characters."""
    ids = [int(t) for t in stream if 0 <= int(t) < IDS.size]
    ids = ids[: ids.index(EOS)] if EOS in ids else ids
    groups: list[list[int]] = [[]]
    for t in ids:
        in_time = IDS.time_base <= t < IDS.score_base
        if t == XS or (in_time and TS in groups[-1]):
            groups.append([])
        if t != XS:
            groups[-1].append(t)
    char = {SEP: "|", SYNC: "|", DOT: ".", **{DIGIT0 + d: str(d) for d in range(10)}}
    events = []
    for g in groups:
        time_chars = "".join(char[t - IDS.time_base] for t in g if TS <= t < SS)
        score_chars = "".join(char[t - IDS.score_base] for t in g if SS <= t < IDS.size)
        ev = {
            "timestamps": _numbers(time_chars, 6),
            "scores": _numbers(score_chars, 3),
            "caption": tok.decode([t for t in g if t < XS]).strip(),
        }
        if ev["timestamps"] or ev["scores"] or ev["caption"]:
            events.append(ev)
    return events


def test_reference_events_on_a_known_stream(tok) -> None:
    stream = [*times(1.0, 2.0), *scores_(3.0), *caption(tok, "a"), *times(5.0), XS, EOS, XS]
    assert reference_events(stream, tok) == [
        {"timestamps": [1.0, 2.0], "scores": [3.0], "caption": "a"},
        {"timestamps": [5.0], "scores": [], "caption": ""},
    ]


@settings(max_examples=300, deadline=None)
@given(stream=st.lists(st.sampled_from(_STRUCTURAL), max_size=80))
def test_parser_matches_independent_reference(tok, stream):
    """Batch and streaming parses both equal the string-based reference above."""
    want = reference_events(stream, tok)
    assert [e.to_dict() for e in parse_events(stream, tok, IDS)] == want
    parser = EventParser(tok, IDS)
    streamed = []
    for t in stream:
        done = parser.feed(t)
        assert len(done) <= 1
        streamed += done
    streamed += parser.finish()
    assert [e.to_dict() for e in streamed] == want


def test_streaming_parser_emits_at_text_sync(tok):
    parser = EventParser(tok, IDS)
    stream = times(1.5) + scores_(3.0) + tok.encode("a dog") + [XS]
    emitted = [parser.feed(t) for t in stream]
    assert not any(emitted[:-1]) and emitted[-1][0].caption == "a dog"
    assert parser.finish() == []
