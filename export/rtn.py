"""Symmetric round-to-nearest integer weights with a searched scale (the QDQ forms).

TensorRT's DequantizeLinear takes no zero point and only strictly positive scales, so a
group of weights (a block of ``block_size`` along K in one output column for int4, a whole
column for int8) maps to ``q * s`` with ``q`` in ``[-2^(b-1), 2^(b-1) - 1]`` and ``s > 0``.

Two choices, each measured on one ``gate`` projection of Gaussian weights (output error
relative to fp32, int4 blocks of 32, 64 Gaussian rows; ``tests/test_quantize.py`` checks
that the searched scales beat ``amax / 7`` and land within 3% of MatMulNBits' error):

- **Both ends of the range.** ``s = amax / 7`` leaves -8 unused; the smallest ``s`` that
  fits the group is ``max(-min / 8, max / 7)``, so a group whose extreme is negative uses
  all 16 levels: 9.7% -> 9.2%.
- **A searched scale.** Rounding error, not range, dominates: a slightly smaller scale
  clips a group's one or two extreme weights and rounds all the others finer. Each group
  takes the candidate ``s * f``, ``f`` in :data:`SEARCH`, with the least squared error of
  its own weights: 9.2% -> 8.65%, where onnxruntime's MatMulNBits quantiser (a signed
  scale, the extreme always at -8, as llama.cpp's Q4_0) gives 8.6%, so both runtimes'
  int4 forms carry about the same error. For int8 per column both steps together move
  the error from 0.87% to 0.85%.

Cost: ``len(SEARCH)`` passes over the weights, ~0.03 s per million here (~3.5 minutes
for a 7B's layers at int4, single-threaded numpy).
"""

from __future__ import annotations

import numpy as np

SEARCH = np.linspace(0.80, 1.0, 11)  # scale factors tried per group (1.0: no clipping)
_COLUMNS = 256  # columns per pass: a 7B matrix's temporaries stay at a few MB each


def symmetric_rtn(
    w: np.ndarray, bits: int, block_size: int | None, scale_dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """Quantise ``w`` [K, N] per group; returns ``(q, scale)``.

    Args:
        w: the weight, K rows (the MatMul's reduction axis) by N output columns.
        bits: 4 or 8.
        block_size: rows per group (K must be a multiple); ``None``: one group per column.
        scale_dtype: the scales' stored type (the weight's); ``q`` is computed with the
            stored scale, so dequantising reproduces exactly what was rounded.

    Returns:
        ``q`` int8 [K, N] in ``[-2^(bits-1), 2^(bits-1) - 1]`` and ``scale`` [K / block, N]
        (``[N]`` per column), every scale > 0.
    """
    k, n = w.shape
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    group = block_size or k
    q = np.empty((k, n), np.int8)
    scales = np.empty((k // group, n), scale_dtype)
    # The smallest positive normal of the stored type (bf16 has fp32's exponent range): a
    # scale that rounds to 0 there would be rejected by TensorRT and divide by zero here.
    tiny = np.finfo(np.float16 if np.dtype(scale_dtype) == np.float16 else np.float32).tiny
    for c0 in range(0, n, _COLUMNS):
        wb = w[:, c0 : c0 + _COLUMNS].astype(np.float32).reshape(k // group, group, -1)
        fit = np.maximum(wb.min(axis=1) / lo, wb.max(axis=1) / hi)[:, None, :]  # [G, 1, n]
        fit = np.where(fit > 0, fit, 1.0)  # an all-zero group: any scale
        best_s, best_e = fit, np.full_like(fit, np.inf)
        r = np.empty_like(wb)  # reused: the passes stay in cache-sized buffers
        for f in SEARCH:
            s = fit * np.float32(f)
            np.divide(wb, s, out=r)
            np.rint(r, out=r)
            np.clip(r, lo, hi, out=r)
            np.multiply(r, s, out=r)
            np.subtract(r, wb, out=r)
            np.square(r, out=r)
            e = r.sum(axis=1, keepdims=True)
            better = e < best_e
            best_s, best_e = np.where(better, s, best_s), np.where(better, e, best_e)
        stored = np.maximum(best_s, tiny).astype(scale_dtype)
        s32 = stored.astype(np.float32)
        q[:, c0 : c0 + _COLUMNS] = np.clip(np.rint(wb / s32), lo, hi).reshape(k, -1)
        scales[:, c0 : c0 + _COLUMNS] = stored[:, 0, :]
    return q, (scales if block_size else scales[0])
