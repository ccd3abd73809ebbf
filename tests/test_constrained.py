"""The time/score grammar of constrained decoding."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from trace_rt.constrained import SegmentGrammar, constrain_logits, time_limit_tenths
from trace_rt.tokens import DIGIT0, DOT, LOCAL_VOCAB, SEP, SYNC, Head

TIME_RE = re.compile(r"^\d{4}\.\d(<sep>\d{4}\.\d)*<sync>$")
SCORE_RE = re.compile(r"^\d\.\d(<sep>\d\.\d)*<sync>$")
V = len(LOCAL_VOCAB)

# Logit rows: random, huge, infinite; plus adversarial rows that push one token hard.
finite = st.floats(-(2.0**100), 2.0**100, allow_nan=False, width=32)
rows = st.one_of(
    arrays(np.float32, V, elements=finite),
    arrays(
        np.float32, V, elements=st.sampled_from([0.0, 1.0, -np.inf, np.inf, 2.0**127, -(2.0**127)])
    ),
    st.sampled_from([SYNC, SEP, DOT, DIGIT0, DIGIT0 + 9]).map(
        lambda k: np.where(np.arange(V) == k, 1e9, 0.0).astype(np.float32)
    ),
)
durations = st.one_of(
    st.sampled_from([0.0, 0.04, 0.05, 0.1, 12.34, 59.99, 100.0, 9999.9, 9999.95, 12000.0]),
    st.floats(0, 20000, allow_nan=False),
)


def render(tokens: list[int]) -> str:
    return "".join(LOCAL_VOCAB[t] for t in tokens)


def run_greedy(g: SegmentGrammar, logit_rows: list[np.ndarray], max_steps: int = 60) -> str:
    """Greedy decoding after masking; once the rows run out, push towards <sync>."""
    push_sync = np.where(np.arange(V) == SYNC, 1e9, 0.0)
    for step in range(max_steps + 8):
        if g.done:
            break
        row = logit_rows[step % len(logit_rows)] if step < max_steps else push_sync
        pick = int(np.argmax(constrain_logits(row, g.allowed())))
        g.advance(pick)
    assert g.done, "the grammar must always be able to finish"
    return render(g.tokens)


@settings(max_examples=200, deadline=None)
@given(durations, st.lists(rows, min_size=1, max_size=12), st.integers(5, 60))
def test_time_segments_are_well_formed(duration: float, logit_rows, steps: int) -> None:
    text = run_greedy(SegmentGrammar(Head.TIME, duration), logit_rows, steps)
    assert TIME_RE.match(text), text
    limit = min(duration, 9999.9)
    for value in re.findall(r"\d{4}\.\d", text):
        assert float(value) <= limit + 1e-9, (value, duration)


@settings(max_examples=100, deadline=None)
@given(st.lists(rows, min_size=1, max_size=12), st.integers(3, 60))
def test_score_segments_are_well_formed(logit_rows, steps: int) -> None:
    text = run_greedy(SegmentGrammar(Head.SCORE), logit_rows, steps)
    assert SCORE_RE.match(text), text


@settings(max_examples=50, deadline=None)
@given(st.lists(rows, min_size=1, max_size=8), st.integers(1, 3))
def test_max_values(logit_rows, n: int) -> None:
    g = SegmentGrammar(Head.TIME, 60.0, max_values=n)
    text = run_greedy(g, logit_rows)
    assert 1 <= text.count(".") <= n and len(g.values) == text.count(".")


def walk(g: SegmentGrammar, text: str) -> None:
    i = 0
    while i < len(text):
        n = next(k for k, p in enumerate(LOCAL_VOCAB) if text.startswith(p, i))
        g.advance(n)
        i += len(LOCAL_VOCAB[n])


def allowed_chars(g: SegmentGrammar) -> str:
    return "".join(LOCAL_VOCAB[k] for k in np.flatnonzero(g.allowed()))


def test_duration_zero_allows_only_zero() -> None:
    g = SegmentGrammar(Head.TIME, 0.0)
    for expected in ("0", "0", "0", "0", ".", "0"):
        assert allowed_chars(g) == expected
        walk(g, expected)
    assert allowed_chars(g) == "<sync><sep>"
    walk(g, "<sep>0000.0<sync>")
    assert g.done and g.values == [0.0, 0.0] and not g.allowed().any()


def test_duration_12_34() -> None:
    g = SegmentGrammar(Head.TIME, 12.34)
    assert g.limit == 123
    assert allowed_chars(g) == "0"
    walk(g, "00")
    assert allowed_chars(g) == "01"
    walk(g, "1")
    assert allowed_chars(g) == "012"
    walk(g, "2.")
    assert allowed_chars(g) == "0123"
    walk(g, "3<sep>001")
    assert allowed_chars(g) == "012"
    walk(g, "1.")
    assert allowed_chars(g) == "0123456789"  # 0011.x is fine for any x
    walk(g, "9<sep>000")
    assert allowed_chars(g) == "0123456789"
    walk(g, "9.9<sync>")
    assert g.values == [12.3, 11.9, 9.9]
    with pytest.raises(ValueError, match="not allowed"):
        SegmentGrammar(Head.TIME, 12.34).advance(DIGIT0 + 1)  # "1xxx.x" > 12.3


@pytest.mark.parametrize("duration", [9999.9, 9999.95, 10000.0, 1e9, float("inf"), None])
def test_large_durations_cap_at_format(duration) -> None:
    g = SegmentGrammar(Head.TIME, duration)
    assert g.limit == 99999
    walk(g, "9999.9<sync>")
    assert g.values == [9999.9]


def test_limit_rounding() -> None:
    assert time_limit_tenths(0.3) == 3  # 0.3 * 10 = 2.9999999999999996
    assert time_limit_tenths(59.99) == 599
    assert time_limit_tenths(0.09) == 0
    for bad in (-1.0, float("nan"), "x"):
        with pytest.raises(ValueError):
            time_limit_tenths(bad)  # type: ignore[arg-type]


def test_score_grammar() -> None:
    g = SegmentGrammar(Head.SCORE, max_time=1.0)  # max_time is ignored for scores
    assert allowed_chars(g) == "0123456789"
    walk(g, "9")
    assert allowed_chars(g) == "."
    walk(g, ".9<sep>4.0")
    assert allowed_chars(g) == "<sync><sep>"
    walk(g, "<sync>")
    assert g.done and g.values == [9.9, 4.0]


def test_invalid_uses() -> None:
    with pytest.raises(ValueError, match="time and score"):
        SegmentGrammar(Head.TEXT)
    with pytest.raises(ValueError, match="max_values"):
        SegmentGrammar(Head.TIME, max_values=0)
    g = SegmentGrammar(Head.SCORE)
    for bad in (SYNC, SEP, DOT, -1, 13):
        with pytest.raises(ValueError):
            g.advance(bad)
    walk(g, "1.0<sync>")
    with pytest.raises(ValueError, match="after <sync>"):
        g.advance(SYNC)


def test_constrain_logits() -> None:
    logits = np.array([5.0, np.nan, -np.inf, np.inf, 1.0], dtype=np.float32)
    mask = np.array([False, True, True, False, True])
    out = constrain_logits(logits, mask)
    assert out.dtype == np.float32 and logits[0] == 5.0  # a copy
    assert np.isneginf(out[[0, 3]]).all() and np.isfinite(out[[1, 2, 4]]).all()
    assert int(np.argmax(out)) == 4
    # All allowed entries -inf: argmax still picks an allowed one.
    out = constrain_logits(np.full(5, -np.inf), np.array([False, False, True, False, False]))
    assert int(np.argmax(out)) == 2
    # Batched logits, integer logits.
    batch = constrain_logits(np.zeros((3, 5)), mask)
    assert batch.shape == (3, 5) and np.isneginf(batch[:, 0]).all()
    assert constrain_logits(np.arange(5), mask).dtype == np.float32
    with pytest.raises(ValueError, match="do not match"):
        constrain_logits(np.zeros(4), mask)
    with pytest.raises(ValueError, match="no token"):
        constrain_logits(np.zeros(5), np.zeros(5, dtype=bool))
