"""Decoded frames straight to the model's input size, one sampled frame at a time.

Two resamplers, chosen with ``resize``:

- ``fast``: libswscale, through PyAV's ``VideoFrame.reformat``, converts the
  decoder's YUV frame to RGB *and* scales it to its place in the model's input in one
  step, so per-frame work never touches a full-resolution RGB image; the padding and the
  centre crop are then done at model size.
- ``exact`` (the default): the frame is converted to full-resolution RGB and reduced with
  :func:`trace_rt.preprocess.resize_crop`, bit-exact with the release's Pillow path
  (expand2square + CLIPImageProcessor).

They differ by a few levels per pixel: libswscale's bicubic is a Catmull-Rom-like cubic
(B=0, C=0.6) where Pillow's is a=-0.5, it resamples chroma at the target size, rounds
differently, and places a padded frame's edges on whole output pixels, which can change
the model's ids. ``exact`` is the default so that answers stay the release's; the speed
and memory figures of both are in ``benchmarks/results/video-frontend-*.md``.
"""

from __future__ import annotations

import av
import numpy as np

from trace_rt.config import PreprocessConfig
from trace_rt.errors import InputError
from trace_rt.preprocess import Layout, center_crop, layout, resize_crop
from trace_rt.video import decode

RESIZE_MODES = ("fast", "exact")
DEFAULT_RESIZE = "exact"  # the release's pixels, so the original code's ids; fast is opt-in
_INTERP = av.video.reformatter.Interpolation.BICUBIC


# PyAV >= 17 threads reformatting itself (one thread per core by default); the decoder's
# frame threads already use the cores, so one. Older PyAV takes no ``threads``.
_THREADS = {"threads": 1}


def _reformat(frame: av.VideoFrame, **kwargs) -> av.VideoFrame:
    try:
        return frame.reformat(**kwargs, **_THREADS)
    except TypeError:
        if not _THREADS:
            raise
        _THREADS.clear()
        return frame.reformat(**kwargs)


def quarter_turns(frame: av.VideoFrame) -> int:
    """Counter-clockwise quarter turns of the frame's display rotation (0 when none or
    not a multiple of 90 degrees, as :func:`trace_rt.video.decode._rgb` applies it)."""
    rot = getattr(frame, "rotation", 0) or 0
    return int(rot // 90) % 4 if rot % 90 == 0 else 0


class ModelFrames:
    """Converts each decoded frame to ``[3, crop_h, crop_w]`` uint8 RGB at model size.

    Called by the decoder as ``convert(frame, size)``, ``size`` being the first frame's
    coded ``(height, width)``: a stream that changes size mid-way is scaled to it, as the
    RGB path does. :func:`trace_rt.preprocess.normalize` makes the pixel values.

    Args:
        cfg: the checkpoint's preprocessing.
        resize: ``fast`` (libswscale) or ``exact`` (the release's Pillow arithmetic).
    """

    def __init__(self, cfg: PreprocessConfig, resize: str = DEFAULT_RESIZE):
        if resize not in RESIZE_MODES:
            raise InputError(f"resize must be one of {', '.join(RESIZE_MODES)}; got {resize!r}")
        self.cfg = cfg
        self.resize = resize

    def __call__(self, frame: av.VideoFrame, size: tuple[int, int]) -> np.ndarray:
        if self.resize == "exact":
            return resize_crop(decode._rgb(frame, size)[None], self.cfg)[0]
        k = quarter_turns(frame)
        h, w = size
        lay = layout(*((w, h) if k % 2 else (h, w)), self.cfg)  # displayed orientation
        sh, sw = lay.scaled
        th, tw = (sw, sh) if k % 2 else (sh, sw)  # scaled, before the display rotation
        # Planar RGB: each plane lands in the channel-first canvas with one copy (and
        # libswscale computes full-resolution chroma for it, closer to the exact path).
        out = _reformat(frame, width=tw, height=th, format="gbrp", interpolation=_INTERP)
        canvas = np.empty((3, *lay.canvas), np.uint8)
        top, left = lay.offset
        for c, plane in enumerate((2, 0, 1)):  # gbrp stores G, B, R
            p = out.planes[plane]
            img = np.frombuffer(p, np.uint8).reshape(th, p.line_size)[:, :tw]
            if lay.fill is not None:
                canvas[c] = lay.fill[c]
            canvas[c, top : top + sh, left : left + sw] = np.rot90(img, k) if k else img
        if lay.fill is not None:
            _blend_edges(canvas[:, top : top + sh, left : left + sw], lay)
        crop = center_crop(canvas, self.cfg.crop_height, self.cfg.crop_width)
        return np.ascontiguousarray(crop)


def _blend_edges(img: np.ndarray, lay: Layout) -> None:
    """Mix the scaled frame's (``[3, h, w]``) partly covered outer rows and columns with
    the fill, in place."""
    fill = np.asarray(lay.fill, np.float64)[:, None]
    top, bottom, left, right = lay.cover
    for idx, share, axis in ((0, top, 1), (-1, bottom, 1), (0, left, 2), (-1, right, 2)):
        if share >= 1.0:
            continue
        line = img[:, idx] if axis == 1 else img[:, :, idx]
        line[...] = np.floor(line * share + fill * (1.0 - share) + 0.5)
