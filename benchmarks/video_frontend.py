"""The video stage against the ffmpeg CLI, and the two resize paths against each other.

``python -m benchmarks.video_frontend CLIP_DIR [--out results.md] [--frames 128]``
measures each clip written by :mod:`benchmarks.video_clips` (generate them first):

- the video stage (:func:`trace_rt.pipeline.video_inputs`: decode, sample, scale to the
  release's 336 x 336 input, normalise) with ``resize=fast`` and ``resize=exact`` (the
  default: the release's pixels), each first in a fresh process for its peak RSS above the
  process's baseline (VmHWM, reset after the imports);
- the ffmpeg CLI doing the same job (:func:`trace_rt.bench.video.ffmpeg_baseline`), then
  both paths, in ``--rounds`` back-to-back rounds;
- how far ``fast`` is from ``exact``: uint8 levels per pixel.

Each path's ratio is taken against the ffmpeg run of its own round, so a change in the
machine's load touches both sides of it. (Until 2026-12-01 the paired runs were the
default path, ``exact``, reported under ``fast``.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

from trace_rt.bench.machine import status_mb
from trace_rt.config import _CLIP_L_336, PreprocessConfig
from trace_rt.video.convert import DEFAULT_RESIZE, RESIZE_MODES

CFG = PreprocessConfig.from_dict(_CLIP_L_336["preprocess"], pad_to_square=True)


def child(video: str, frames: int, resize: str, runs: int, save: str | None) -> dict:
    """One process: the stage once for its peak, then *runs* timed runs."""
    import dataclasses

    from trace_rt.pipeline import video_inputs
    from trace_rt.video import DEFAULT_LIMITS

    # exact on a loaded machine can pass the default 120 s budget: measure, don't stop
    limits = dataclasses.replace(DEFAULT_LIMITS, time_budget_s=None)

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS: imports are not counted
    base = status_mb("VmRSS")
    t = time.perf_counter()
    clip, px = video_inputs(video, frames, CFG, resize, limits=limits)
    first = (time.perf_counter() - t) * 1e3
    peak = status_mb("VmHWM") - base
    if save:
        np.save(save, clip.frames)
    del clip, px
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        video_inputs(video, frames, CFG, resize, limits=limits)
        times.append((time.perf_counter() - t) * 1e3)
    return {"first_ms": first, "runs_ms": times, "peak_mb": peak}


def _run_child(video: Path, frames: int, resize: str, runs: int, save: Path | None) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.video_frontend", "--child", str(video)]
    cmd += ["--frames", str(frames), "--resize", resize, "--runs", str(runs)]
    if save:
        cmd += ["--save", str(save)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(video: Path, frames: int, tmp: Path, rounds: int) -> dict:
    """Peaks in fresh processes; then *rounds* back-to-back (ffmpeg, fast, exact) runs in
    this process, whose per-round ratios share the machine's load."""
    from trace_rt.bench.video import ffmpeg_baseline
    from trace_rt.pipeline import video_inputs

    peaks = {m: _run_child(video, frames, m, 0, tmp / f"{m}.npy") for m in RESIZE_MODES}
    a, b = np.load(tmp / "fast.npy").astype(int), np.load(tmp / "exact.npy").astype(int)
    d = np.abs(a - b)
    video_inputs(video, frames, CFG, "fast")  # warm: file cache, libraries
    ffmpeg = ffmpeg_baseline(video, CFG, frames, runs=1)  # warm, and its settings
    ff_ms: list[float] = []
    ms: dict[str, list[float]] = {m: [] for m in RESIZE_MODES}
    for _ in range(rounds if "ms" in ffmpeg else 0):
        ff_ms.append(ffmpeg_baseline(video, CFG, frames, runs=1, warmup=False)["ms"])
        for m in RESIZE_MODES:
            t = time.perf_counter()
            video_inputs(video, frames, CFG, m)
            ms[m].append((time.perf_counter() - t) * 1e3)
    out: dict = {
        "ffmpeg": {**ffmpeg, "ms": float(np.median(ff_ms)), "runs_ms": ff_ms} if ff_ms else ffmpeg,
        "diff": {
            "max": int(d.max()),
            "mean": float(d.mean()),
            "p99": float(np.percentile(d, 99)),
            "share_within_2": float((d <= 2).mean()),
        },
    }
    for m in RESIZE_MODES:
        ratios = [x / f for x, f in zip(ms[m], ff_ms, strict=True)]
        out[m] = {
            "ms": float(np.median(ms[m])) if ms[m] else peaks[m]["first_ms"],
            "runs_ms": ms[m],
            "peak_mb": peaks[m]["peak_mb"],
            "ratio": float(np.median(ratios)) if ratios else None,
            "ratio_range": [min(ratios), max(ratios)] if ratios else None,
        }
    return out


def smooth_diffs() -> dict[str, dict]:
    """``fast`` against ``exact`` on smooth synthetic pictures (gradients and waves, as
    camera footage mostly is), YUV 4:2:0 like a decoder's output: the clips' random-block
    texture is a worst case for any two resamplers."""
    import av

    from trace_rt.video.convert import ModelFrames

    out = {}
    for h, w in ((2160, 3840), (1920, 1080), (720, 1280)):
        y, x = np.mgrid[0:h, 0:w] / max(h, w)
        img = np.stack(
            [
                128 + 100 * np.sin(6 * x + 2 * y),
                128 + 100 * np.cos(5 * y),
                128 + 80 * np.sin(3 * x * y + 1),
            ],
            -1,
        )
        frame = av.VideoFrame.from_ndarray(img.clip(0, 255).astype(np.uint8), format="rgb24")
        frame = frame.reformat(format="yuv420p")
        a = ModelFrames(CFG, "fast")(frame, (h, w)).astype(int)
        b = ModelFrames(CFG, "exact")(frame, (h, w)).astype(int)
        d = np.abs(a - b)
        out[f"{w}x{h}"] = {"max": int(d.max()), "mean": float(d.mean())}
    return out


def _describe(video: Path) -> str:
    import av

    with av.open(str(video)) as c:
        s = c.streams.video[0]
        rot = getattr(next(c.decode(video=0)), "rotation", 0) or 0
        size, codec, rate = (
            (s.codec_context.width, s.codec_context.height),
            s.codec_context.name,
            s.guessed_rate,
        )
    with av.open(str(video)) as c:
        n = sum(1 for p in c.demux(video=0) if p.size)
    mb = video.stat().st_size / 1e6
    return (
        f"{size[0]}x{size[1]} {codec} {float(rate or 0):.0f} fps, rotation {rot}, "
        f"{n} frames, {mb:.1f} MB"
    )


def markdown(results: dict[str, dict], info: dict) -> str:
    dflt = {m: " (the default)" if m == DEFAULT_RESIZE else "" for m in RESIZE_MODES}
    lines = [
        f"# Video front end, CPU ({date.today().isoformat()})",
        "",
        f"- machine: {info['cpus']} cores; load average {info['load_start']} at the start, "
        f"{info['load_end']} at the end",
        f"- {info['frames']} frames sampled as the release does, to the release's 336 x 336 "
        "input (pad to square with the CLIP mean colour, bicubic, centre crop, normalise)",
        "- stage: `trace_rt.pipeline.video_inputs` (what `Pipeline.prepare` runs); peak RSS: "
        "a fresh process's first run (VmHWM reset after the imports, minus the RSS before "
        "it); times: rounds of back-to-back runs (ffmpeg, fast, exact), medians, and the "
        "median and range of the per-round ratios to that round's ffmpeg run",
        "- ffmpeg: Debian's ffmpeg CLI, same decoder threads, `select` of the same frames, "
        "`scale` bicubic + `pad` + `crop`, raw RGB to a file (command below)",
        "",
        f"| clip | ffmpeg ms | fast ms | fast / ffmpeg | fast peak MB | exact ms{dflt['exact']} "
        f"| exact / ffmpeg | exact peak MB | fast vs exact: max / mean / p99 levels, share "
        "within 2 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in results.items():
        ff = r["ffmpeg"]
        cells = [f"{name}: {r['describe']}", f"{ff['ms']:.0f}" if "ms" in ff else "skipped"]
        for m in RESIZE_MODES:
            ratio = "-"
            if r[m]["ratio"] is not None:
                lo, hi = r[m]["ratio_range"]
                ratio = f"{r[m]['ratio']:.2f}x ({lo:.2f}-{hi:.2f})"
            cells += [f"{r[m]['ms']:.0f}", ratio, f"{r[m]['peak_mb']:.0f}"]
        d = r["diff"]
        cells.append(
            f"{d['max']} / {d['mean']:.2f} / {d['p99']:.0f}, {100 * d['share_within_2']:.1f}%"
        )
        lines.append("| " + " | ".join(cells) + " |")
    smooth = info.get("smooth")
    if smooth:
        lines += [
            "",
            "fast vs exact on smooth synthetic pictures (levels, max / mean): "
            + ", ".join(f"{k} {v['max']} / {v['mean']:.2f}" for k, v in smooth.items()),
        ]
    for name, r in results.items():
        if "command" in r["ffmpeg"]:  # the same shape for every clip: show one
            cmd = r["ffmpeg"]["command"]
            lines += ["", f"ffmpeg command ({name}; the select is cut short): `{cmd[:300]}...`"]
            break
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("clips", type=Path)
    ap.add_argument("--frames", type=int, default=128)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--which", default="4k,portrait,long720")
    ap.add_argument(
        "--rounds", type=int, default=5, help="(ffmpeg, fast, exact) run rounds per clip"
    )
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--resize", default="fast", help=argparse.SUPPRESS)
    ap.add_argument("--runs", type=int, default=3, help=argparse.SUPPRESS)
    ap.add_argument("--save", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(str(args.clips), args.frames, args.resize, args.runs, args.save)))
        return 0
    import tempfile

    info = {"cpus": os.cpu_count(), "frames": args.frames}
    info["load_start"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    results = {}
    with tempfile.TemporaryDirectory(prefix="video-frontend-") as tmp:
        for name in args.which.split(","):
            video = args.clips / f"{name}.mp4"
            r = measure(video, args.frames, Path(tmp), args.rounds)
            r["describe"] = _describe(video)
            results[name] = r
            print(name, json.dumps(r), file=sys.stderr)
    info["load_end"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    info["smooth"] = smooth_diffs()
    text = markdown(results, info)
    if args.json:
        args.json.write_text(json.dumps({"info": info, "results": results}, indent=1) + "\n")
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
