"""Heads, the time/score token codecs and the mapping into the unified id space.

The time and score vocabularies are 13 tokens each: ``<sync>``=0, ``<sep>``=1, digits
'0'..'9' = 2..11 and '.' = 12. A timestamp is written ``format(t, '0>6.1f')`` (6 tokens),
a score ``format(s, '0>3.1f')``; both formats are those of the released code.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

from trace_rt.config import IdSpace

VIDEO_PLACEHOLDER_ID = -201  # where the video block goes in prompt ids (release constant)

SYNC, SEP, DOT = 0, 1, 12
DIGIT0 = 2
LOCAL_VOCAB = ("<sync>", "<sep>", *"0123456789", ".")

TIME_FORMAT = "0>6.1f"
SCORE_FORMAT = "0>3.1f"
TIME_TOKENS_PER_STAMP = 6
MAX_TIMESTAMP = 9999.9  # the largest value TIME_FORMAT writes in 6 characters


class Head(enum.IntEnum):
    """Output heads; values are those the released code passes as ``heads``."""

    TEXT = 0
    TIME = 1
    SCORE = 2


def format_time(t: float) -> str:
    return format(t, TIME_FORMAT)


def format_score(s: float) -> str:
    return format(s, SCORE_FORMAT)


def encode_number(text: str) -> list[int]:
    """'0012.3' -> local token ids (digits and '.')."""
    out = []
    for ch in text:
        if ch == ".":
            out.append(DOT)
        elif ch.isdigit():
            out.append(DIGIT0 + int(ch))
        else:
            raise ValueError(f"cannot encode {ch!r} of {text!r} as a time/score token")
    return out


def encode_timestamp(t: float) -> list[int]:
    """One timestamp as 6 local time-vocabulary ids (no <sync>)."""
    if not 0 <= t <= MAX_TIMESTAMP:
        raise ValueError(f"timestamp {t} s is outside 0..{MAX_TIMESTAMP} s")
    return encode_number(format_time(t))


def encode_values(values: list[float], fmt: str) -> list[int]:
    """Values joined by <sep> and closed by <sync>, as local ids (the towers' encode())."""
    out: list[int] = []
    for i, v in enumerate(values):
        if i:
            out.append(SEP)
        out.extend(encode_number(format(v, fmt)))
    out.append(SYNC)
    return out


def head_base(ids: IdSpace, head: Head) -> int:
    """First id of *head*'s range in the unified id space."""
    return {Head.TEXT: 0, Head.TIME: ids.time_base, Head.SCORE: ids.score_base}[head]


def head_size(ids: IdSpace, head: Head) -> int:
    """Number of logits *head* produces (text: lm_head + sync_head)."""
    return {Head.TEXT: ids.text_vocab + 1, Head.TIME: ids.time_vocab, Head.SCORE: ids.score_vocab}[
        head
    ]


def head_of(ids: IdSpace, token_id: int) -> Head:
    """Which head emitted *token_id* of the unified id space."""
    if 0 <= token_id <= ids.text_sync:
        return Head.TEXT
    if ids.time_base <= token_id < ids.score_base:
        return Head.TIME
    if ids.score_base <= token_id < ids.size:
        return Head.SCORE
    raise ValueError(f"token id {token_id} is outside the id space 0..{ids.size - 1}")


def next_head(ids: IdSpace, head: Head, token_id: int) -> Head:
    """The head after *token_id*: each head's <sync> hands over to the next one."""
    if token_id == ids.time_sync:
        return Head.SCORE
    if token_id == ids.score_sync:
        return Head.TEXT
    if token_id == ids.text_sync:
        return Head.TIME
    return head


def heads_along(ids: IdSpace, token_ids: Sequence[int]) -> list[Head]:
    """The head each of *token_ids* was chosen from, replaying :func:`next_head` from the
    time head, where generation starts (the prompt ends with the text ``<sync>``): entry k
    is the head the prefill (k = 0) or the decode step fed token k-1 ran in (at least the
    prefill's, for no tokens)."""
    heads = [Head.TIME]
    for tok in token_ids[:-1]:
        heads.append(next_head(ids, heads[-1], tok))
    return heads
