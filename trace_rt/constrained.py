"""Constrained decoding for the time and score heads (opt-in).

The grammar of a head segment, over the local 13-token vocabulary:

* time:  ``dddd.d (<sep> dddd.d)* <sync>`` with every value ≤ the video's duration
  (and ≤ 9999.9, the format's cap);
* score: ``d.d (<sep> d.d)* <sync>`` (0.0 .. 9.9).

The duration bound is applied digit by digit in integer tenths: a digit is allowed only
if the smallest completion of the number (the remaining digits all 0) stays within
``floor(duration * 10 + 1e-6)``. Since 0 is always allowed, every state has a legal
completion. The text head is never constrained.

Frame-aligned timestamps (``timestamps="frames"``, what ``trace-retrieval`` was trained
to emit) bound the time head further to the sampled frames' times as the release spells
them (``format(t, "0>6.1f")``): the allowed digits follow a trie of those strings.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from trace_rt.tokens import DIGIT0, DOT, LOCAL_VOCAB, MAX_TIMESTAMP, SEP, SYNC, Head

_LAYOUT = {Head.TIME: (6, 4), Head.SCORE: (3, 1)}  # (characters per number, index of '.')


def time_limit_tenths(max_time: float | None) -> int:
    """The largest timestamp in tenths of a second the time grammar allows."""
    cap = round(MAX_TIMESTAMP * 10)
    if max_time is None:
        return cap
    try:
        max_time = float(max_time)
    except (TypeError, ValueError):
        raise ValueError(f"max_time must be a duration in seconds, not {max_time!r}") from None
    if math.isnan(max_time) or max_time < 0:
        raise ValueError(f"max_time must be a duration ≥ 0 s, not {max_time!r}")
    if math.isinf(max_time):
        return cap
    return min(cap, math.floor(max_time * 10 + 1e-6))


def frame_time_strings(times: Iterable[float]) -> list[str]:
    """The release's spelling (``dddd.d``) of each frame time, sorted and de-duplicated."""
    out = set()
    for t in times:
        t = float(t)
        if not math.isfinite(t) or t < 0:
            raise ValueError(f"frame times must be finite and ≥ 0, not {t!r}")
        out.add(format(min(t, MAX_TIMESTAMP), "0>6.1f"))
    if not out:
        raise ValueError("frame-aligned timestamps need at least one frame time")
    return sorted(out)


def _prefix_trie(strings: Iterable[str]) -> dict[str, frozenset[str]]:
    """prefix -> the characters that may follow it (a trie flattened to a dict)."""
    trie: dict[str, set[str]] = {}
    for s in strings:
        for i in range(len(s)):
            trie.setdefault(s[:i], set()).add(s[i])
    return {k: frozenset(v) for k, v in trie.items()}


class SegmentGrammar:
    """State of one time or score segment, from its first token to its ``<sync>``.

    Args:
        head: ``Head.TIME`` or ``Head.SCORE``.
        max_time: Upper bound of timestamps in seconds (the video's duration); ``None``
            for the format's cap. Ignored for scores.
        max_values: If set, at most this many numbers: then only ``<sync>`` may follow.
        frame_times: If set (time head only), every timestamp must spell one of these
            times (seconds) as the release rounds them; *max_time* is then not needed.
    """

    def __init__(
        self,
        head: Head,
        max_time: float | None = None,
        *,
        max_values: int | None = None,
        frame_times: Iterable[float] | None = None,
    ):
        if head not in _LAYOUT:
            raise ValueError(f"only the time and score heads are constrained, not {head!r}")
        if max_values is not None and max_values < 1:
            raise ValueError(f"max_values must be ≥ 1, not {max_values}")
        self.head = Head(head)
        self.width, self.dot = _LAYOUT[self.head]
        self.limit = time_limit_tenths(max_time) if self.head is Head.TIME else None
        self.max_values = max_values
        self._trie = None
        if frame_times is not None:
            if self.head is not Head.TIME:
                raise ValueError("frame_times constrain only the time head")
            self._trie = _prefix_trie(frame_time_strings(frame_times))
        self._chars = ""  # the current number's characters (for the trie)
        self.tokens: list[int] = []  # local ids accepted so far
        self._pos = 0  # characters of the current number written
        self._prefix = 0  # its digits so far, as an integer
        self._count = 0  # numbers completed
        self._done = False

    @property
    def done(self) -> bool:
        """True once the segment's ``<sync>`` was accepted."""
        return self._done

    @property
    def values(self) -> list[float]:
        """The completed numbers so far."""
        text = "".join(LOCAL_VOCAB[t] if t >= DIGIT0 else " " for t in self.tokens)
        return [float(v) for v in text.split() if len(v) == self.width]

    def allowed(self) -> np.ndarray:
        """Boolean mask over the head's local vocabulary: the tokens that may come next."""
        mask = np.zeros(len(LOCAL_VOCAB), dtype=bool)
        if self._done:
            return mask
        if self._pos == self.width:
            mask[SYNC] = True
            mask[SEP] = self.max_values is None or self._count < self.max_values
        elif self._trie is not None:
            for ch in self._trie[self._chars]:
                mask[DOT if ch == "." else DIGIT0 + int(ch)] = True
        elif self._pos == self.dot:
            mask[DOT] = True
        elif self.limit is None:
            mask[DIGIT0 : DIGIT0 + 10] = True
        else:
            digits_left = self.width - 1 - self._pos + (self._pos > self.dot)
            scale = 10 ** (digits_left - 1)  # value of the digit chosen now
            for d in range(10):
                mask[DIGIT0 + d] = (self._prefix * 10 + d) * scale <= self.limit
        return mask

    def advance(self, local_id: int) -> None:
        """Accept *local_id*; raises ValueError if the grammar does not allow it."""
        local_id = int(local_id)
        if not 0 <= local_id < len(LOCAL_VOCAB) or not self.allowed()[local_id]:
            where = "after <sync>" if self._done else f"at {self._render()!r}"
            raise ValueError(f"{self.head.name.lower()} token {local_id} is not allowed {where}")
        self.tokens.append(local_id)
        if local_id == SYNC:
            self._done = True
        elif local_id == SEP:
            self._pos, self._prefix, self._chars = 0, 0, ""
        else:
            self._chars += LOCAL_VOCAB[local_id]
            if local_id != DOT:
                self._prefix = self._prefix * 10 + (local_id - DIGIT0)
            self._pos += 1
            self._count += self._pos == self.width

    def _render(self) -> str:
        return "".join(LOCAL_VOCAB[t] for t in self.tokens)


def constrain_logits(logits: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A copy of *logits* with disallowed entries set to -inf.

    Allowed entries that are NaN or ±inf are clamped to the dtype's finite range, so that
    argmax always lands on an allowed token and softmax stays finite. *logits* may carry
    leading batch dimensions; the mask applies to the last one.
    """
    logits = np.asarray(logits)
    mask = np.asarray(mask, dtype=bool)
    if logits.shape[-1:] != mask.shape:
        raise ValueError(f"logits of shape {logits.shape} do not match a mask of {mask.shape}")
    if not mask.any():
        raise ValueError("the mask allows no token")
    dtype = logits.dtype if np.issubdtype(logits.dtype, np.floating) else np.float32
    info = np.finfo(dtype)
    out = np.nan_to_num(
        logits.astype(dtype, copy=True), nan=info.min, posinf=info.max, neginf=info.min
    )
    out[..., ~mask] = -np.inf
    return out
