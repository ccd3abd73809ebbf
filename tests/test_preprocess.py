"""preprocess.py against Pillow and transformers' PIL-backed CLIP image processor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tests.data.make_pillow12_reference as P12
import trace_rt.preprocess as pp
from tests.media import write_video
from trace_rt.config import _CLIP_L_336, PreprocessConfig
from trace_rt.errors import CheckpointError, InputError
from trace_rt.preprocess import pad_to_square, preprocess_frames, resize_bicubic
from trace_rt.video import load_video

try:  # transformers >= 5: the PIL backend has its own class
    from transformers.models.clip.image_processing_pil_clip import (
        CLIPImageProcessorPil as HFProcessor,
    )
except ImportError:  # transformers 4.x: CLIPImageProcessor itself uses PIL
    from transformers import CLIPImageProcessor as HFProcessor

RNG = np.random.default_rng(1234)


def pil_resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    if img.shape[-1] == 1:
        return np.asarray(Image.fromarray(img[..., 0]).resize((w, h), Image.BICUBIC))[..., None]
    return np.asarray(Image.fromarray(img).resize((w, h), Image.BICUBIC, reducing_gap=None))


def pillow_goes_vertical_first(h: int, w: int, out_h: int, out_w: int) -> bool:
    """Pillow >= 13's pass-order rule (libImaging/Resample.c)."""
    return h - out_h > 0 and h - out_h > 2 * (w - out_w)


FIXED_SIZES = [
    (1, 1, 1, 1), (1, 1, 5, 3), (3, 5, 336, 336), (5, 3, 7, 2), (2, 2, 1, 1), (17, 1, 4, 9),
    (191, 333, 336, 585), (333, 191, 585, 336), (360, 640, 336, 597), (640, 640, 336, 336),
    (333, 333, 336, 336), (48, 64, 32, 42), (100, 100, 100, 37), (100, 100, 37, 100),
    (1000, 30, 13, 2), (123, 17, 31, 7), (338, 210, 150, 124), (253, 217, 224, 374),
    (720, 1280, 336, 597), (50, 700, 20, 700),
]  # fmt: skip
RANDOM_SIZES = [tuple(int(v) for v in RNG.integers(1, 420, 4)) for _ in range(40)]


@pytest.mark.parametrize("h,w,oh,ow", FIXED_SIZES + RANDOM_SIZES)
def test_resize_bit_exact_with_pillow(h, w, oh, ow):
    noise = RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)
    # Hard edges overshoot, so the clipping of the intermediate image matters too.
    edges = (RNG.integers(0, 2, (h, w, 3)) * 255).astype(np.uint8)
    frames = np.stack([noise, edges])
    got = resize_bicubic(frames, oh, ow)
    assert got.shape == (2, oh, ow, 3) and got.dtype == np.uint8
    for f, g in zip(frames, got, strict=True):
        np.testing.assert_array_equal(g, pil_resize(f, oh, ow))
    if not pillow_goes_vertical_first(h, w, oh, ow):  # then both orders are the same
        np.testing.assert_array_equal(resize_bicubic(frames, oh, ow, legacy_order=True), got)


def test_resize_single_image_and_one_channel():
    img = RNG.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    np.testing.assert_array_equal(resize_bicubic(img, 20, 81), pil_resize(img, 20, 81))
    gray = RNG.integers(0, 256, (2, 37, 53, 1), dtype=np.uint8)
    got = resize_bicubic(gray, 64, 30)
    for f, g in zip(gray, got, strict=True):
        np.testing.assert_array_equal(g, pil_resize(f, 64, 30))


def test_resize_in_small_chunks(monkeypatch):
    """Force the float64 working set below one frame so rows are chunked."""
    monkeypatch.setattr(pp, "_CHUNK_BYTES", 4096)
    frames = RNG.integers(0, 256, (3, 61, 97, 3), dtype=np.uint8)
    for oh, ow in [(40, 50), (90, 150), (200, 30)]:
        got = resize_bicubic(frames, oh, ow)
        for f, g in zip(frames, got, strict=True):
            np.testing.assert_array_equal(g, pil_resize(f, oh, ow))


def test_resize_rejects_bad_input():
    with pytest.raises(InputError, match="uint8"):
        resize_bicubic(np.zeros((2, 4, 4, 3), np.float32), 2, 2)
    with pytest.raises(InputError, match="positive"):
        resize_bicubic(np.zeros((2, 4, 4, 3), np.uint8), 0, 2)


def expand2square(img: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """VideoLLaMA2's helper, as the release runs it."""
    w, h = img.size
    if w == h:
        return img
    out = Image.new(img.mode, (max(w, h), max(w, h)), fill)
    out.paste(img, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
    return out


@pytest.mark.parametrize("h,w", [(191, 333), (333, 191), (48, 64), (7, 3), (5, 5)])
def test_pad_to_square_matches_expand2square(h, w):
    frames = RNG.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
    fill = (122, 116, 104)
    got = pad_to_square(frames, fill)
    for f, g in zip(frames, got, strict=True):
        np.testing.assert_array_equal(g, np.asarray(expand2square(Image.fromarray(f), fill)))


CLIP = _CLIP_L_336["preprocess"]
TINY = dict(CLIP, size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
BIG_CROP = dict(CLIP, size={"shortest_edge": 224}, crop_size={"height": 336, "width": 300})


def reference(frames: np.ndarray, prep: dict, pad: bool) -> np.ndarray:
    """The release's path: expand2square in PIL, then the PIL-backed CLIP processor."""
    images = [Image.fromarray(f) for f in frames]
    if pad:
        fill = tuple(int(x * 255) for x in prep["image_mean"])
        images = [expand2square(i, fill) for i in images]
    return HFProcessor(**prep)(images, return_tensors="np")["pixel_values"]


@pytest.fixture(scope="module")
def decoded(tmp_path_factory) -> dict[tuple[int, int], np.ndarray]:
    """Real decoded frames of odd sizes (H.264, 4:4:4 where the size is odd)."""
    d = tmp_path_factory.mktemp("pre")
    sizes = [(191, 333), (333, 191), (48, 64), (360, 640)]
    return {(h, w): load_video(write_video(d / f"{h}x{w}.mp4", w, h, n_frames=6), 3).frames
            for h, w in sizes}  # fmt: skip


@pytest.mark.parametrize("size", [(191, 333), (333, 191), (48, 64), (360, 640)])
@pytest.mark.parametrize("prep", [CLIP, TINY, BIG_CROP], ids=["clip336", "tiny32", "bigcrop"])
def test_preprocess_matches_transformers_with_pad(decoded, size, prep):
    frames = decoded[size]
    cfg = PreprocessConfig.from_dict(prep, pad_to_square=True)
    got = preprocess_frames(frames, cfg)
    ref = reference(frames, prep, pad=True)
    assert got.shape == ref.shape == (3, 3, cfg.crop_height, cfg.crop_width)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("size", [(191, 333), (333, 191), (48, 64), (360, 640)])
@pytest.mark.parametrize("prep", [CLIP, TINY, BIG_CROP], ids=["clip336", "tiny32", "bigcrop"])
def test_preprocess_matches_transformers_without_pad(decoded, size, prep):
    frames = decoded[size]
    got = preprocess_frames(frames, PreprocessConfig.from_dict(prep, pad_to_square=False))
    np.testing.assert_allclose(got, reference(frames, prep, pad=False), atol=1e-4, rtol=0)


@pytest.mark.parametrize("size", [(191, 333), (333, 191)])
def test_preprocess_padded_in_small_chunks(monkeypatch, decoded, size):
    """The padding is built chunk by chunk; force many tiny chunks."""
    monkeypatch.setattr(pp, "_CHUNK_BYTES", 4096)
    frames = decoded[size]
    got = preprocess_frames(frames, PreprocessConfig.from_dict(CLIP, pad_to_square=True))
    np.testing.assert_allclose(got, reference(frames, CLIP, pad=True), atol=1e-4, rtol=0)


# Recorded on Pillow 12 + transformers 4.40 (the release's stack; Pillow 13 changed the
# pass order) by tests/data/make_pillow12_reference.py, which also makes the inputs.
PILLOW12 = np.load(Path(__file__).parent / "data" / "pillow12_reference.npz")


def test_pillow12_record_is_what_it_claims():
    assert int(str(PILLOW12["pillow_version"]).split(".")[0]) < 13
    assert str(PILLOW12["transformers_version"]) == "4.40.0"


@pytest.mark.parametrize("case", range(len(P12.RESIZES)))
def test_legacy_order_matches_pillow12(case):
    h, w, oh, ow = P12.RESIZES[case]
    img = P12.synthetic_image(h, w, case)
    want = PILLOW12[f"resize_{h}x{w}_to_{oh}x{ow}"]
    assert pillow_goes_vertical_first(h, w, oh, ow)  # where the two Pillows differ
    np.testing.assert_array_equal(resize_bicubic(img, oh, ow, legacy_order=True), want)
    # The record tells the orders apart: the other order (Pillow 13's) misses it.
    assert (resize_bicubic(img, oh, ow, legacy_order=False) != want).any()


def test_preprocess_tall_unpadded_uses_release_pass_order():
    """Without padding, a frame over twice as tall as wide is where Pillow >= 13 changed
    its pass order; preprocessing keeps the release's (Pillow < 13): the recorded numbers
    of the release's CLIPImageProcessor on Pillow 12."""
    frame = P12.synthetic_image(*P12.FRAME_HW, len(P12.RESIZES))
    cfg = PreprocessConfig.from_dict(P12.PROCESSOR, pad_to_square=False)
    got = preprocess_frames(frame[None], cfg)
    np.testing.assert_array_equal(got, PILLOW12["clip_unpadded_80x20"])


def test_preprocess_square_and_tiny_frames():
    for h, w in [(336, 336), (1, 1), (2, 9)]:
        frames = RNG.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
        for pad in (True, False):
            got = preprocess_frames(frames, PreprocessConfig.from_dict(CLIP, pad_to_square=pad))
            np.testing.assert_allclose(got, reference(frames, CLIP, pad), atol=1e-4, rtol=0)


def test_preprocess_rejects_bad_input():
    cfg = PreprocessConfig.from_dict(CLIP, pad_to_square=True)
    with pytest.raises(InputError, match=r"\[N, H, W, 3\]"):
        preprocess_frames(np.zeros((4, 4, 3), np.uint8), cfg)
    with pytest.raises(InputError, match="uint8"):
        preprocess_frames(np.zeros((1, 4, 4, 3), np.float32), cfg)
    with pytest.raises(CheckpointError, match="resample"):
        preprocess_frames(np.zeros((1, 4, 4, 3), np.uint8), PreprocessConfig.from_dict(
            dict(CLIP, resample=2), pad_to_square=True))  # fmt: skip
