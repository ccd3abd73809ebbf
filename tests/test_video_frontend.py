"""The video stage as Pipeline.prepare runs it: decoded frames straight to the model's input.

Both resize paths against the release's preprocessing (expand2square + transformers'
CLIPImageProcessor on the full-resolution RGB frames), on odd sizes, display rotation,
variable frame rate and 4K; ``exact`` to the bit, ``fast`` (libswscale) within a few levels;
and the stage's peak memory, which must not grow with the frames' source resolution.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import trace_rt.video.decode as dec
from benchmarks.video_clips import write_clip
from tests.media import write_video
from tests.test_preprocess import CLIP, reference
from trace_rt.config import PreprocessConfig
from trace_rt.errors import InputError
from trace_rt.pipeline import video_inputs
from trace_rt.preprocess import layout
from trace_rt.video import load_video
from trace_rt.video.convert import ModelFrames

CFG = PreprocessConfig.from_dict(CLIP, pad_to_square=True)
STD = np.asarray(CFG.image_std, np.float32)[:, None, None]

CASES = {
    "odd-4:4:4": dict(width=333, height=191, n_frames=9),
    "rotated-90": dict(width=320, height=180, rotation=90, n_frames=6),
    "rotated-270-odd": dict(width=191, height=333, rotation=-90, n_frames=6),
    "vfr": dict(width=640, height=360, pts=[0, 40, 80, 200, 210, 400, 900, 950]),
    "tall": dict(width=100, height=400, n_frames=5),
    "4k": dict(width=3840, height=2160, n_frames=3, gop=1),
}


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("frontend")
    return {name: write_video(d / f"{name}.mp4", **kw) for name, kw in CASES.items()}


def levels(px: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Absolute difference of pixel values in uint8 levels."""
    return np.abs(px - ref) * STD * 255


@pytest.mark.parametrize("name", list(CASES))
def test_both_paths_against_the_release_preprocessing(videos, name):
    rgb = load_video(videos[name], 4)  # full-resolution RGB frames, rotation applied
    ref = reference(rgb.frames, CLIP, pad=True)
    exact_clip, exact = video_inputs(videos[name], 4, CFG, "exact")
    np.testing.assert_allclose(exact, ref, atol=1e-4, rtol=0)  # the release's numbers
    fast_clip, fast = video_inputs(videos[name], 4, CFG, "fast")
    assert fast.shape == ref.shape == (4, 3, 336, 336) and fast.dtype == np.float32
    d = levels(fast, ref)
    # Different cubic (libswscale's B=0, C=0.6 against Pillow's a=-0.5), chroma resampled
    # at the target size, padded edges on whole pixels: a level or so on average, a few
    # at most for nearly all pixels. Sharp synthetic edges (the index band) differ more.
    assert d.mean() < 1.5 and np.percentile(d, 99) <= 10, (d.mean(), np.percentile(d, 99))
    for clip in (exact_clip, fast_clip):  # the same frames, at the same times
        assert np.array_equal(clip.times, rgb.times) and clip.total_frames == rgb.total_frames
        assert clip.frames.shape == (4, 3, 336, 336) and clip.frames.dtype == np.uint8


def test_fast_path_never_makes_full_resolution_rgb(videos, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a full-resolution RGB conversion")

    monkeypatch.setattr(dec, "_rgb", refuse)
    _, px = video_inputs(videos["4k"], 3, CFG, "fast")
    assert px.shape == (3, 3, 336, 336)
    with pytest.raises(AssertionError, match="full-resolution"):
        video_inputs(videos["4k"], 3, CFG, "exact")


def test_fast_unpadded_and_larger_crop(videos):
    """Without padding the short side is scaled and centre-cropped; a crop larger than
    the resized image is zero-padded as transformers does."""
    rgb = load_video(videos["odd-4:4:4"], 3)
    for prep in (CLIP, dict(CLIP, size={"shortest_edge": 224}, crop_size=336)):
        cfg = PreprocessConfig.from_dict(prep, pad_to_square=False)
        _, fast = video_inputs(videos["odd-4:4:4"], 3, cfg, "fast")
        ref = reference(rgb.frames, prep, pad=False)
        assert fast.shape == ref.shape
        d = levels(fast, ref)
        assert d.mean() < 1.5 and np.percentile(d, 99) <= 10


def test_layout_places_the_frame_where_the_release_resize_does():
    lay = layout(2160, 3840, CFG)  # 16:9 in a 336 square: rows 73.5 .. 262.5
    assert lay.canvas == (336, 336) and lay.offset == (73, 0) and lay.scaled == (190, 336)
    assert lay.cover == pytest.approx((0.5, 0.5, 1.0, 1.0))
    assert layout(336, 336, CFG).fill is None  # square: nothing to pad
    tiny = layout(1, 2000, CFG)  # a sliver still covers one output row, partly
    assert tiny.scaled[0] == 1 and 0 < tiny.cover[0] < 1


def test_bad_resize_mode():
    with pytest.raises(InputError, match="resize must be one of"):
        ModelFrames(CFG, "nearest")


PEAK = textwrap.dedent(
    """
    import json, sys
    from trace_rt.config import _CLIP_L_336, PreprocessConfig
    from trace_rt.pipeline import video_inputs
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    cfg = PreprocessConfig.from_dict(_CLIP_L_336["preprocess"], pad_to_square=True)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS: imports are not counted
    base = status("VmRSS")
    clip, px = video_inputs(sys.argv[1], int(sys.argv[2]), cfg, sys.argv[3])
    print(json.dumps({"peak_mb": status("VmHWM") - base, "shape": list(px.shape)}))
    """
)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("resize", ["fast", "exact"])
def test_peak_memory_follows_model_size_not_source_size(tmp_path, resize):
    """1440p frames are 11 MB each as RGB, 0.34 MB at model size (+1.35 MB as float32
    pixels). Sampling 16 frames instead of 2 may add the latter, never the former (exact
    makes one full-resolution RGB frame at a time, and frees it)."""
    video = write_video(tmp_path / "qhd.mp4", 2560, 1440, n_frames=16, gop=4)

    def peak(n: int) -> float:
        out = subprocess.run(
            [sys.executable, "-c", PEAK, video, str(n), resize],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent.parent,
        )
        res = json.loads(out.stdout.strip().splitlines()[-1])
        assert res["shape"] == [n, 3, 336, 336]
        return res["peak_mb"]

    few, many = peak(2), peak(16)
    per_frame = 336 * 336 * 3 * 5 / 2**20  # uint8 frame + float32 pixels
    assert many - few < 14 * per_frame + 40, (few, many)  # 14 full RGB frames: 155 MB
    assert many < 300, many  # the bound for the whole stage


def test_ffmpeg_baseline_does_the_same_job(videos, tmp_path, monkeypatch):
    """The bench's ffmpeg run writes the frames the stage samples, at the model's size
    (rotated as displayed); without ffmpeg the figure is skipped with the reason."""
    from trace_rt.bench import video as bv

    if shutil.which("ffmpeg") is None:
        pytest.skip("no ffmpeg on PATH (Debian: apt-get install ffmpeg)")
    name = "rotated-90"
    res = bv.ffmpeg_baseline(videos[name], CFG, 4, runs=1, keep=tmp_path / "f.rgb")
    assert res["frames"] == 4 and res["size"] == [336, 336] and res["ms"] > 0
    theirs = np.fromfile(tmp_path / "f.rgb", np.uint8).reshape(4, 336, 336, 3)
    clip, _ = video_inputs(videos[name], 4, CFG, "fast")
    d = np.abs(theirs.transpose(0, 3, 1, 2).astype(int) - clip.frames)
    assert d.mean() < 3  # the same frames, scaled alike (another frame: tens of levels)
    report = {"backends": {"torch": {"stages": {"video": {"p50_ms": 2 * res["ms"]}}}}}
    bv.add_ffmpeg_ratios(report, res)
    assert report["video_ffmpeg"]["ratios"]["torch"] == pytest.approx(2.0)
    assert "torch 2.00x (misses <= 1.2x)" in bv.ffmpeg_lines(report)[0]
    monkeypatch.setattr(bv.shutil, "which", lambda name: None)
    res = bv.ffmpeg_baseline(videos[name], CFG, 4)
    assert res == {"skipped": "no ffmpeg on PATH (Debian: apt-get install ffmpeg)"}
    bv.add_ffmpeg_ratios(report, res)
    assert bv.ffmpeg_lines(report) == [f"video stage vs ffmpeg CLI: skipped ({res['skipped']})"]


def test_frontend_benchmark_times_each_path_as_labelled(videos, tmp_path, monkeypatch):
    """benchmarks/video_frontend.py: each resize path's runs are that path's (until
    2026-12-01 the default path's runs were reported as ``fast``)."""
    if shutil.which("ffmpeg") is None:
        pytest.skip("no ffmpeg on PATH (Debian: apt-get install ffmpeg)")
    import benchmarks.video_frontend as vf
    import trace_rt.pipeline as pipeline

    seen: list[str] = []
    real = pipeline.video_inputs

    def spy(video, n, pp, resize=pipeline.DEFAULT_RESIZE, **kw):
        seen.append(resize)
        return real(video, n, pp, resize, **kw)

    monkeypatch.setattr(pipeline, "video_inputs", spy)
    r = vf.measure(Path(videos["rotated-90"]), 4, tmp_path, rounds=2)
    assert seen == ["fast"] + ["fast", "exact"] * 2  # warm-up, then each round's two paths
    for m in ("fast", "exact"):
        assert len(r[m]["runs_ms"]) == 2 and r[m]["ratio"] > 0 and r[m]["peak_mb"] > 0
    assert r["diff"]["max"] >= 0 and len(r["ffmpeg"]["runs_ms"]) == 2
    text = vf.markdown({"clip": {**r, "describe": "320x180"}}, {"cpus": 2, "frames": 4,
                       "load_start": "0", "load_end": "0"})  # fmt: skip
    assert "exact ms (the default)" in text and "| clip: 320x180 |" in text


def test_unwanted_non_reference_frames_are_skipped_not_decoded(tmp_path, monkeypatch):
    """The benchmark clips' encoding (x264 veryfast, B-frames) at a small size: many
    non-reference pictures. Skipping the unwanted ones changes no frame and no time."""
    video = str(write_clip(tmp_path / "b.mp4", 160, 96, 25, 3, None))
    decoded: list[int] = []
    frames = dec._frames

    def counting(*args, **kwargs):
        for f in frames(*args, **kwargs):
            decoded.append(f.pts)
            yield f

    monkeypatch.setattr(dec, "_frames", counting)
    got = load_video(video, 9)
    with_skip = len(decoded)
    decoded.clear()
    monkeypatch.setattr(dec, "_ONE_FRAME_PER_PACKET", frozenset())  # decode everything
    ref = load_video(video, 9)
    assert np.array_equal(ref.frames, got.frames) and np.array_equal(ref.times, got.times)
    assert with_skip < len(decoded) * 0.8, (with_skip, len(decoded))


@pytest.mark.parametrize("resize", ["fast", "exact"])
def test_cli_run_passes_resize(tiny_ckpt, clip_video, resize, monkeypatch):
    """``trace-rt run --resize`` reaches the pipeline: the result is that pipeline's."""
    from trace_rt.cli import main
    from trace_rt.pipeline import Pipeline

    made = []
    from_dir = Pipeline.from_dir.__func__

    def spy(cls, *args, **kwargs):
        made.append(kwargs.get("resize"))
        return from_dir(cls, *args, **kwargs)

    monkeypatch.setattr(Pipeline, "from_dir", classmethod(spy))
    args = ["run", str(clip_video), "--model", str(tiny_ckpt), "--frames", "4"]
    assert main([*args, "--max-new-tokens", "6", "--resize", resize]) == 0
    assert made == [resize]
    with pytest.raises(SystemExit):  # argparse: not a choice
        main([*args, "--resize", "nearest"])
    want = from_dir(Pipeline, tiny_ckpt, resize=resize).prepare(clip_video, frames=4)
    got = from_dir(Pipeline, tiny_ckpt).prepare(clip_video, frames=4)  # the default: exact
    assert np.array_equal(want.pixel_values, got.pixel_values) == (resize == "exact")
