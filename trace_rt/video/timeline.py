"""Presentation timestamps: telling a corrupt one from a real gap.

A flipped bit in one PES header of an MPEG-TS gives one frame a timestamp 25 minutes
away, and the 4 s video reads as 1510 s long. A real variable-frame-rate gap (a screen
recording that paused) looks different: the timestamps jump once and stay. So a
timestamp is corrupt when it lies far from its neighbours in file order on *both* sides
while those neighbours agree with each other ("far": more than :data:`JUMP_FRAMES` frame
intervals and more than :data:`JUMP_S` seconds). The first or last timestamp has
neighbours on one side only: it is corrupt when it lies far from them and further away
than the container's stated duration, or than :data:`END_SPANS` times the span of the
rest (the container's duration is itself computed from timestamps in some formats).

Corrupt timestamps are replaced by interpolating their neighbours; the caller then samples
by rank (frames in the decoder's presentation order) instead of trusting the frames'
timestamps, and stamps them from the repaired table.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np

JUMP_FRAMES = 64  # B-frame reordering moves a timestamp by a few frames, never this far
JUMP_S = 2.0
_SIDE = 4  # neighbours on each side whose median is the local reference
END_SPANS = 100  # an end this many spans of the rest away is corrupt even without a duration


def repair_timestamps(
    pts: np.ndarray, time_base: Fraction, stated_duration_s: float | None = None
) -> tuple[np.ndarray, int]:
    """Sorted presentation timestamps with corrupt ones replaced.

    Args:
        pts: packet timestamps in file (decode) order, ``time_base`` units.
        time_base: seconds per unit.
        stated_duration_s: the container's duration, if it states one.

    Returns:
        ``(table, repaired)``: the sorted unique timestamps (float64 where any was
        repaired) and how many were repaired.
    """
    p = np.asarray(pts, np.int64)
    uniq = np.unique(p)
    if len(uniq) < 3:
        return uniq, 0
    step = float(np.median(np.diff(uniq)))
    far = max(JUMP_FRAMES * step, JUMP_S / float(time_base))
    bad = np.zeros(len(p), bool)
    for i in _suspects(p, far):
        left, right = p[max(0, i - _SIDE) : i], p[i + 1 : i + 1 + _SIDE]
        if len(left) and len(right):
            lm, rm = float(np.median(left)), float(np.median(right))
            bad[i] = abs(p[i] - lm) > far and abs(p[i] - rm) > far and abs(lm - rm) <= far
        else:  # an end: compare with the span of the rest and the stated duration
            rest = np.delete(p, i)
            gap = float(min(abs(p[i] - rest.min()), abs(p[i] - rest.max())))
            span = float(rest.max() - rest.min())
            stated = None if stated_duration_s is None else stated_duration_s / float(time_base)
            beyond = stated is not None and gap > stated + far
            bad[i] = gap > far and (beyond or gap > END_SPANS * span)
    if not bad.any():
        return uniq, 0
    good = np.flatnonzero(~bad)
    fixed = p.astype(np.float64)
    # Interpolate over file order between the nearest trusted timestamps.
    fixed[bad] = np.interp(np.flatnonzero(bad), good, p[good].astype(np.float64))
    table = np.concatenate([np.unique(p[good]).astype(np.float64), fixed[bad]])
    return np.sort(table), int(bad.sum())


def _suspects(p: np.ndarray, far: float) -> np.ndarray:
    """Indices next to a jump of more than ``far``: the only ones worth a closer look."""
    jump = np.abs(np.diff(p)) > far
    near = np.zeros(len(p), bool)
    near[:-1] |= jump
    near[1:] |= jump
    return np.flatnonzero(near)
