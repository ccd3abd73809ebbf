"""Frame preprocessing, identical to the release's VideoLLaMA2 + CLIPImageProcessor path.

The release pads every frame to a square filled with the CLIP mean colour
(VideoLLaMA2's ``expand2square``), then runs transformers' ``CLIPImageProcessor``:
resize the short side with PIL bicubic, centre-crop, rescale, normalise, channels first.
This module does the same with numpy only (serving images carry no PIL or torch).

Pillow's resize output is uint8, so a one-level difference would shift a normalised pixel
by ~0.015. :func:`resize_bicubic` therefore re-implements Pillow's two-pass fixed-point
convolution (``libImaging/Resample.c``) and is bit-exact with
``Image.resize(size, Image.BICUBIC)``. Each pass is a banded integer convolution that is
evaluated as float64 matrix products over narrow column blocks: every product and partial
sum is an integer far below 2**53, so the float arithmetic is exact.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass

import numpy as np

from trace_rt.config import PreprocessConfig
from trace_rt.errors import CheckpointError, InputError

PIL_BICUBIC = 3
_PRECISION_BITS = 22  # Pillow: 32 - 8 - 2
_ONE = float(1 << _PRECISION_BITS)
_HALF = float(1 << (_PRECISION_BITS - 1))
_BLOCK = 48  # most output columns/rows per matrix product (keeps the band narrow)
# float64 working set per product. Below glibc's 32 MB ceiling for its mmap threshold, so
# a freed chunk goes back to the heap and the next one reuses it: at 48 MB every chunk was
# a fresh mapping the kernel zeroed, 13 s of system time for 128 4K frames (10 s total now).
_CHUNK_BYTES = 16 << 20
# The release ran on Pillow < 13, which always resamples horizontally first. The order
# only matters without square padding, for frames more than about twice as tall as wide.
RELEASE_PASS_ORDER_LEGACY = True


def _bicubic(x: np.ndarray) -> np.ndarray:
    """Pillow's ``bicubic_filter`` (a = -0.5), evaluated in the same operation order."""
    x = np.abs(x)
    near = ((-0.5 + 2.0) * x - (-0.5 + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * -0.5
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _coeffs(in_size: int, out_size: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's ``precompute_coeffs`` + ``normalize_coeffs_8bpc`` for outputs ``lo..hi-1``.

    Returns:
        ``(first, kk)``: the first input index of each output and its fixed-point taps
        ``[hi - lo, ksize]`` (int64, zero past the output's support).
    """
    scale = in_size / out_size  # (double)(in1 - in0) / outSize, box = (0, in_size)
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale  # bicubic support 2
    center = (np.arange(lo, hi, dtype=np.float64) + 0.5) * scale
    xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    xmax = np.minimum(np.trunc(center + support + 0.5), in_size).astype(np.int64) - xmin
    ksize = max(int(xmax.max(initial=1)), 1)
    taps = np.arange(ksize)
    arg = ((taps[None, :] + xmin[:, None]) - center[:, None] + 0.5) * (1.0 / filterscale)
    w = np.where(taps[None, :] < xmax[:, None], _bicubic(arg), 0.0)
    ww = np.zeros(len(center))
    for t in range(ksize):  # sequential sum, as in C (numpy's pairwise sum may differ)
        ww += w[:, t]
    w = w / np.where(ww != 0.0, ww, 1.0)[:, None]
    kk = np.where(w < 0, np.trunc(-0.5 + w * _ONE), np.trunc(0.5 + w * _ONE))
    return xmin, kk.astype(np.int64)


def _shift_clip(acc: np.ndarray) -> np.ndarray:
    """``clip8`` in place: (acc + 2**21) >> 22 clipped to 0..255 (exact: acc is integral)."""
    acc += _HALF
    acc *= 1.0 / _ONE
    np.floor(acc, out=acc)
    return np.clip(acc, 0, 255, out=acc)


def _blocks(first: np.ndarray, kk: np.ndarray, in_size: int):
    """Split outputs into blocks; yield (o0, o1, i0, i1, dense float64 taps [i1-i0, o1-o0])."""
    n, ksize = kk.shape
    # Narrower blocks for strong downscales keep the band (and wasted products) small.
    scale = (first[-1] - first[0]) / (n - 1) if n > 1 else 1.0
    block = int(np.clip(_BLOCK / max(scale, 1.0), 8, _BLOCK))
    for o0 in range(0, n, block):
        o1 = min(o0 + block, n)
        i0 = int(first[o0])
        i1 = min(in_size, int(first[o0:o1].max()) + ksize)
        dense = np.zeros((i1 - i0, o1 - o0))
        rows = first[o0:o1, None] - i0 + np.arange(ksize)[None, :]
        cols = np.broadcast_to(np.arange(o1 - o0)[:, None], rows.shape)
        nz = kk[o0:o1] != 0
        dense[rows[nz], cols[nz]] = kk[o0:o1][nz]
        yield o0, o1, i0, i1, dense


def _hpass(
    x: np.ndarray,
    first: np.ndarray,
    kk: np.ndarray,
    width: int | None = None,
    left: int = 0,
    fill: np.ndarray | None = None,
) -> np.ndarray:
    """Horizontal pass over ``x [N, C, R, w]``; output column j reads ``first[j]`` onwards.

    ``x`` may sit at column ``left`` of a wider canvas (``width``) whose other columns
    hold ``fill[c]``: the padding is built on the fly, chunk by chunk.
    """
    n, c, r, w = x.shape
    width = width or w
    nout = len(first)
    out = np.empty((n, c, r, nout), np.uint8)
    blocks = list(_blocks(first, kk, width))
    rows_per = max(1, _CHUNK_BYTES // (8 * width))  # canvas rows per float64 chunk
    frames_per = max(1, rows_per // (c * r))
    row_step = r if c * r <= rows_per else max(1, rows_per // c)  # a frame over budget
    for s in range(0, n, frames_per):
        for r0 in range(0, r, row_step):
            src = x[s : s + frames_per, :, r0 : r0 + row_step]
            buf = np.empty((*src.shape[:3], width))
            if width > w:
                buf[...] = fill[:, None, None]
            buf[..., left : left + w] = src
            flat = buf.reshape(-1, width)
            dst = out[s : s + frames_per, :, r0 : r0 + row_step]
            res = np.empty((flat.shape[0], nout))
            for o0, o1, i0, i1, dense in blocks:
                np.matmul(flat[:, i0:i1], dense, out=res[:, o0:o1])
            _shift_clip(res)  # once per chunk, not per block: fewer small ufunc calls
            dst[...] = res.reshape(dst.shape)
    return out


def _vpass(x: np.ndarray, first: np.ndarray, kk: np.ndarray) -> np.ndarray:
    """Vertical pass over ``x [N, C, H, W]``; output row i reads ``first[i]`` onwards."""
    n, c, h, w = x.shape
    out = np.empty((n, c, len(first), w), np.uint8)
    blocks = [
        (o0, o1, i0, i1, np.ascontiguousarray(d.T)) for o0, o1, i0, i1, d in _blocks(first, kk, h)
    ]
    lo, hi = blocks[0][2], max(b[3] for b in blocks)
    per = max(1, _CHUNK_BYTES // (8 * c * (hi - lo) * w))
    # A frame over the budget (a 4K canvas: 3840 rows x 336 columns x 3 is 31 MB as
    # float64) goes in column slices; each column is resampled on its own anyway.
    cols = w if per > 1 else max(1, _CHUNK_BYTES // (8 * c * (hi - lo)))
    for s in range(0, n, per):
        for w0 in range(0, w, cols):
            part = x[s : s + per, :, lo:hi, w0 : w0 + cols].astype(np.float64)
            acc = np.empty((*part.shape[:2], len(first), part.shape[3]))
            for o0, o1, i0, i1, taps in blocks:  # taps: [rows out, rows in]
                np.matmul(taps, part[:, :, i0 - lo : i1 - lo], out=acc[:, :, o0:o1])
            out[s : s + per, :, :, w0 : w0 + cols] = _shift_clip(acc)
    return out


def _canvas_cols(
    x: np.ndarray, width: int, left: int, fill: np.ndarray, c0: int, c1: int
) -> np.ndarray:
    """Columns ``c0:c1`` of the canvas holding ``x [N, C, R, w]`` at column ``left``."""
    w = x.shape[-1]
    if left == 0 and width == w:
        return x[..., c0:c1]
    out = np.empty((*x.shape[:3], c1 - c0), np.uint8)
    out[...] = np.asarray(fill, np.uint8)[:, None, None]
    a, e = max(c0, left), min(c1, left + w)
    if e > a:
        out[..., a - c0 : e - c0] = x[..., a - left : e - left]
    return out


def _resize(
    x: np.ndarray,
    out_hw: tuple[int, int],
    rows: tuple[int, int],
    cols: tuple[int, int],
    canvas: tuple[int, int] | None = None,
    offset: tuple[int, int] = (0, 0),
    fill: tuple[int, ...] | None = None,
    legacy_order: bool = False,
) -> np.ndarray:
    """Pillow bicubic resize of ``x [N, C, h, w]`` uint8 to ``out_hw``.

    ``x`` may be placed at ``offset`` (top, left) on a larger ``canvas`` (height, width)
    filled with ``fill`` per channel, which is never materialised: padding rows are
    resampled once and broadcast. Only output rows ``rows[0]:rows[1]`` and columns
    ``cols[0]:cols[1]`` are computed (a centre crop needs no more); each equals what the
    full resize gives there. A pass whose size is unchanged is skipped, as Pillow does.

    Returns:
        ``[N, C, rows[1] - rows[0], cols[1] - cols[0]]`` uint8.
    """
    n, c, h, w = x.shape
    hh, ww = canvas or (h, w)
    top, left = offset
    out_h, out_w = out_hw
    (r0, r1), (c0, c1) = rows, cols
    fillv = np.asarray(fill if fill is not None else (0,) * c, np.float64)
    need_h, need_v = out_w != ww, out_h != hh
    y_first, y_kk = _coeffs(hh, out_h, r0, r1) if need_v else (None, None)
    x_first, x_kk = _coeffs(ww, out_w, c0, c1) if need_h else (None, None)
    # Pillow >= 13 runs the vertical pass first when the height shrinks by more than
    # twice as many pixels as the width (libImaging/Resample.c, ImagingResampleInner).
    if not legacy_order and hh - out_h > 0 and hh - out_h > 2 * (ww - out_w):
        if (hh, ww) != (h, w):  # materialise the canvas (not a path preprocessing takes)
            full = np.empty((n, c, hh, ww), np.uint8)
            full[...] = fillv.astype(np.uint8)[:, None, None]
            full[:, :, top : top + h, left : left + w] = x
            x = full
        if need_h:  # keep only the source columns the horizontal pass reads
            a, e = int(x_first.min()), min(ww, int(x_first.max()) + x_kk.shape[1])
            x, x_first = x[..., a:e], x_first - a
        else:
            x = x[..., c0:c1]
        x = _vpass(x, y_first, y_kk)
        return _hpass(x, x_first, x_kk) if need_h else np.ascontiguousarray(x)
    # Horizontal pass first, over the canvas rows the vertical pass reads.
    if need_v:
        a, e = int(y_first.min()), min(hh, int(y_first.max()) + y_kk.shape[1])
        y_first = y_first - a
    else:
        a, e = r0, r1
    ncols = c1 - c0
    tmp = np.empty((n, c, e - a, ncols), np.uint8)
    ca, ce = max(a, top), min(e, top + h)  # canvas rows that hold the frame
    if (hh, ww) != (h, w):  # padding: what a row of pure fill resamples to
        row = np.broadcast_to(fillv.astype(np.uint8)[None, :, None, None], (1, c, 1, ww))
        row = _hpass(row, x_first, x_kk) if need_h else row[..., c0:c1]
        tmp[...] = row
    if ce > ca:
        src = x[:, :, ca - top : ce - top]
        if need_h:  # output columns that read the frame; the others equal ``row``
            cols_read = x_first[:, None] + np.arange(x_kk.shape[1])[None, :]
            hit = ((x_kk != 0) & (cols_read >= left) & (cols_read < left + w)).any(axis=1)
            j0, j1 = int(np.argmax(hit)), len(hit) - int(np.argmax(hit[::-1]))
            if hit.any():
                tmp[:, :, ca - a : ce - a, j0:j1] = _hpass(
                    src, x_first[j0:j1], x_kk[j0:j1], ww, left, fillv
                )
        else:
            tmp[:, :, ca - a : ce - a] = _canvas_cols(src, ww, left, fillv, c0, c1)
    return _vpass(tmp, y_first, y_kk) if need_v else tmp


def _as_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise InputError(
            f"frames must be a uint8 array [N, H, W, 3]; got {frames.dtype} {frames.shape}"
        )
    if min(frames.shape[1:3]) < 1:
        raise InputError(f"frames have an empty size {frames.shape[1:3]}")
    return frames


def resize_bicubic(
    frames: np.ndarray, out_h: int, out_w: int, *, legacy_order: bool = False
) -> np.ndarray:
    """Resize ``[N, H, W, C]`` (or ``[H, W, C]``) uint8 images, bit-exact with Pillow.

    Equals ``Image.resize((out_w, out_h), Image.BICUBIC)`` (``reducing_gap=None``) applied
    to each image.

    Args:
        legacy_order: Pillow < 13 always resamples horizontally first; Pillow >= 13 goes
            vertically first when the height loses more than twice as many pixels as the
            width. The order changes rounding (by one level here and there), so pick the
            Pillow to match. Resizing a square never meets that condition.
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim not in (3, 4):
        raise InputError(f"expected uint8 [N, H, W, C] images; got {frames.dtype} {frames.shape}")
    if out_h < 1 or out_w < 1:
        raise InputError(f"output size must be positive; got {out_h}x{out_w}")
    single = frames.ndim == 3
    f = frames[None] if single else frames
    x = f.transpose(0, 3, 1, 2)
    out = _resize(x, (out_h, out_w), (0, out_h), (0, out_w), legacy_order=legacy_order)
    out = out.transpose(0, 2, 3, 1)
    return np.ascontiguousarray(out[0] if single else out)


def pad_to_square(frames: np.ndarray, fill: tuple[int, int, int]) -> np.ndarray:
    """VideoLLaMA2's ``expand2square`` on ``[N, H, W, 3]`` frames.

    The square has side ``max(H, W)``, is filled with ``fill`` and holds the frame at
    ``((side - W) // 2, (side - H) // 2)``. Square frames are returned unchanged.
    """
    frames = _as_frames(frames)
    n, h, w, _ = frames.shape
    if h == w:
        return frames
    side = max(h, w)
    out = np.empty((n, side, side, 3), np.uint8)
    out[...] = np.asarray(fill, dtype=np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    out[:, top : top + h, left : left + w] = frames
    return out


def resize_output_size(h: int, w: int, shortest_edge: int) -> tuple[int, int]:
    """transformers' ``get_resize_output_image_size(default_to_square=False)``: (h, w)."""
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = shortest_edge, int(shortest_edge * long / short)
    return (new_long, new_short) if w <= h else (new_short, new_long)


def resize_crop(frames: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """``[N, H, W, 3]`` uint8 RGB -> ``[N, 3, crop_h, crop_w]`` uint8: the release's
    geometry, bit-exact with its Pillow path.

    Pad to square (if ``cfg.pad_to_square``), bicubic resize of the short side to
    ``cfg.shortest_edge``, centre crop (zero-padded where the crop is larger, as
    transformers does). The resize follows Pillow < 13's pass order (the release's); see
    :func:`resize_bicubic`.
    """
    if cfg.resample != PIL_BICUBIC:
        raise CheckpointError(
            f"preprocessor resample={cfg.resample} is not supported (only 3, PIL bicubic)"
        )
    frames = _as_frames(frames)
    _, h, w, _ = frames.shape
    x = frames.transpose(0, 3, 1, 2)  # a view; the passes read it channel-first
    if cfg.pad_to_square and h != w:  # expand2square, done virtually (never materialised)
        side = max(h, w)
        pad = {
            "canvas": (side, side),
            "offset": ((side - h) // 2, (side - w) // 2),
            "fill": pad_colour(cfg),
        }
        h = w = side
    else:
        pad = {}
    rh, rw = resize_output_size(h, w, cfg.shortest_edge)
    ch, cw = cfg.crop_height, cfg.crop_width
    top, left = (rh - ch) // 2, (rw - cw) // 2
    order = {"legacy_order": RELEASE_PASS_ORDER_LEGACY}
    if top >= 0 and left >= 0 and top + ch <= rh and left + cw <= rw:
        return _resize(x, (rh, rw), (top, top + ch), (left, left + cw), **pad, **order)
    # crop larger than the resized image: transformers pads with zeros
    return center_crop(_resize(x, (rh, rw), (0, rh), (0, rw), **pad, **order), ch, cw)


def center_crop(x: np.ndarray, ch: int, cw: int) -> np.ndarray:
    """transformers' ``center_crop`` of ``[..., H, W]``: zero-padded where the crop is
    larger than the image (the padding split as transformers splits it)."""
    rh, rw = x.shape[-2:]
    top, left = (rh - ch) // 2, (rw - cw) // 2
    if top >= 0 and left >= 0:
        return x[..., top : top + ch, left : left + cw]
    nh, nw = max(ch, rh), max(cw, rw)
    canvas = np.zeros((*x.shape[:-2], nh, nw), x.dtype)
    tp, lp = math.ceil((nh - rh) / 2), math.ceil((nw - rw) / 2)
    canvas[..., tp : tp + rh, lp : lp + rw] = x
    t, lf = top + tp, left + lp
    return canvas[..., max(0, t) : min(nh, t + ch), max(0, lf) : min(nw, lf + cw)]


def pad_colour(cfg: PreprocessConfig) -> tuple[int, int, int]:
    """expand2square's fill: the CLIP mean colour as uint8 (truncated, as the release)."""
    return tuple(int(m * 255) for m in cfg.image_mean)


def normalize(crop: np.ndarray, cfg: PreprocessConfig, out: np.ndarray | None = None) -> np.ndarray:
    """``[..., 3, h, w]`` uint8 -> float32 CLIP pixel values (rescale, normalise).

    transformers rescales in float64, casts to float32 and normalises in float32; a
    256-entry table per channel gives the very same numbers.
    """
    levels = (np.arange(256, dtype=np.float64) * cfg.rescale_factor).astype(np.float32)
    mean = np.asarray(cfg.image_mean, dtype=np.float32)[:, None]
    std = np.asarray(cfg.image_std, dtype=np.float32)[:, None]
    table = (levels[None, :] - mean) / std  # [3, 256] float32
    if out is None:
        out = fresh_array(crop.shape, np.float32)
    elif out.shape != crop.shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous float32 {crop.shape}")
    # Image by image: take() turns its indices into int64, 8 bytes per pixel of the batch
    # at once otherwise (115 MB per channel for 128 frames at 336 x 336).
    flat_in, flat_out = crop.reshape(-1, *crop.shape[-3:]), out.reshape(-1, *out.shape[-3:])
    for img, dst in zip(flat_in, flat_out, strict=True):
        for c in range(3):
            np.take(table[c], img[c], out=dst[c], mode="clip")  # uint8 never clips
    return out


def fresh_array(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised array on its own anonymous mapping of ordinary 4 KiB pages.

    numpy asks for transparent huge pages on large arrays (``madvise``). Where the kernel
    defragments on such faults (``/sys/kernel/mm/transparent_hugepage/defrag`` =
    ``madvise``, a common default), the first touch of a fresh 173 MB array right after a
    video decoder freed its buffers stalled in memory compaction: 0.40-0.44 s of system
    time for the pixel values of 128 frames at 336 x 336, against 0.11 s on small pages
    (2-core VM). The mapping is unmapped when the array is freed.
    """
    dtype = np.dtype(dtype)
    count = math.prod(shape)
    if count == 0:
        return np.empty(shape, dtype)
    return np.frombuffer(mmap.mmap(-1, count * dtype.itemsize), dtype, count).reshape(shape)


def preprocess_frames(frames: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """``[N, H, W, 3]`` uint8 RGB -> ``[N, 3, crop_h, crop_w]`` float32 CLIP pixel values:
    :func:`resize_crop` then :func:`normalize`, the release's numbers."""
    return normalize(resize_crop(frames, cfg), cfg)


@dataclass(frozen=True)
class Layout:
    """Where a whole frame lands for a resampler that scales it to an integer size
    (libswscale): scale to ``scaled``, place at ``offset`` on a ``canvas`` filled with
    ``fill`` (the resized padded square), blend its outer rows and columns with the fill
    by ``cover``, then :func:`center_crop`."""

    scaled: tuple[int, int]  # (h, w)
    canvas: tuple[int, int]  # (h, w): the resized image before the crop
    offset: tuple[int, int]  # (top, left) of the scaled frame on the canvas
    fill: tuple[int, int, int] | None  # None: the frame covers the canvas
    # Share of the first/last row and first/last column that the frame covers (1.0: all).
    cover: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)


def layout(h: int, w: int, cfg: PreprocessConfig) -> Layout:
    """The :class:`Layout` of an ``h x w`` frame.

    Padded, the release's resize puts the frame's edges at fractional output positions
    (a 16:9 frame's top edge at row 73.5 of 336). A resampler that scales whole frames
    cannot start mid-pixel, so the frame is scaled over the whole rows it touches
    (stretched by under one pixel, centred) and the partly covered outer rows are blended
    with the fill by the share covered: edges within a few levels of the release's
    instead of half a pixel off.
    """
    if not (cfg.pad_to_square and h != w):
        rh, rw = resize_output_size(h, w, cfg.shortest_edge)
        return Layout((rh, rw), (rh, rw), (0, 0), None)
    side = max(h, w)
    rh, rw = resize_output_size(side, side, cfg.shortest_edge)

    def edges(pad: int, size: int, out: int) -> tuple[int, int, float, float]:
        a, b = pad * out / side, (pad + size) * out / side
        t, e = math.floor(a), max(math.ceil(b), math.floor(a) + 1)
        if e - t == 1:  # the whole frame within one output pixel: blend it once
            return t, e, b - a, 1.0
        return t, e, t + 1 - a, b - (e - 1)

    t, b, c_top, c_bottom = edges((side - h) // 2, h, rh)
    le, r, c_left, c_right = edges((side - w) // 2, w, rw)
    cover = (c_top, c_bottom, c_left, c_right)
    return Layout((b - t, r - le), (rh, rw), (t, le), pad_colour(cfg), cover)


def preprocess_frame(frame: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """One ``[H, W, 3]`` uint8 RGB frame -> ``[3, crop_h, crop_w]`` float32.

    Equals ``preprocess_frames(frame[None], cfg)[0]`` (frames are processed independently),
    so a decoder can reduce each sampled frame to model size as soon as it has it.
    """
    return preprocess_frames(np.asarray(frame)[None], cfg)[0]
