"""Greedy-token agreement and decode speed of the quantised decoders vs fp32 (onnxruntime).

``python -m benchmarks.quant_agreement --preset small [--workdir DIR] [--tokens 64]
[--block-size 32] [--lm-head] [--variants a,b,...]
[--out benchmarks/results/quant-agreement-small-cpu.md]``

``--lm-head`` adds the onnxruntime defaults' form (``python -m export optimize --contrib``:
``contrib-int4``/``contrib-int8``/``contrib-int8-dynamic``, lm_head kept in fp32) beside
the same with lm_head quantised alike (``-lm``) and in int8 (``-lm8``): the measurement
behind the choice of how to store lm_head. ``--variants`` runs only those (fp32 always runs).

Makes (or reuses) a random-weight checkpoint of the preset, its artifact directory and the
int4/int8 variants (``python -m export quantize``), then runs a fixed set of inputs (3
synthetic videos from tests/media.py x dvc/mr/vhd) through the onnxruntime backend with
the fp32 decoder and every variant, variants interleaved per input so that speed is
compared under the same machine state. Reported per variant:

- free-running greedy decoding: prefix agreement (positions equal before the first
  divergence / fp32's length), overall agreement (positions equal / fp32's length) and
  the exact-match rate over inputs;
- teacher-forced top-1 agreement: the variant fed fp32's tokens, so one early flip does
  not hide every later position, and the logits' relative error on that path;
- decode ms per token and prefill ms (medians over inputs; every variant's pipeline is
  alive in one process, so these are rough);
- each variant alone in its own process (:mod:`export.decode_timing`): p50 of a prefill
  and of a decode step in the text and the time head, the figures to read for speed.

Random weights are a weak proxy for real accuracy: their logits have no learned margins,
so a flip here says little about a trained model and agreement here does not promise it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from trace_rt.generate import GenerationConfig
from trace_rt.pipeline import Pipeline
from trace_rt.preprocess import preprocess_frames
from trace_rt.tokens import Head, encode_timestamp, head_base, heads_along
from trace_rt.variants import variant_names
from trace_rt.video import load_video

QUERY = "a red square moves to the right"
TASKS = ("dvc", "mr", "vhd")
# (width, height, fps, frames): three different clips of tests/media.py's moving square.
VIDEOS = ((96, 64, 10, 40), (160, 120, 8, 64), (128, 96, 12, 30))
FP32 = "fp32"


@dataclass
class Stats:
    prefix: list[float] = field(default_factory=list)
    overall: list[float] = field(default_factory=list)
    exact: list[bool] = field(default_factory=list)
    forced: list[float] = field(default_factory=list)
    rel_err: list[float] = field(default_factory=list)
    abs_err: list[float] = field(default_factory=list)
    margin: list[float] = field(default_factory=list)  # fp32's top-1 minus top-2 logit
    text_top1: list[float] = field(default_factory=list)  # text head forced: argmax agreement
    text_err: list[float] = field(default_factory=list)  # ... and max rel. logit error
    decode_ms: list[float] = field(default_factory=list)
    prefill_ms: list[float] = field(default_factory=list)


def prepare(preset: str, workdir: Path, block_size: int, seed: int, lm_head: bool = False) -> Path:
    """Checkpoint -> artifact -> int4/int8 variants, each step skipped when present; with
    *lm_head*, the contrib forms with lm_head kept, quantised alike (tag ``-lm``) and in
    int8 (``-lm8``)."""
    from export import export_onnx
    from export.fuse import CONTRIB, optimize_artifact
    from export.quantize import quantize_artifact
    from trace_rt.graphs import load_manifest
    from training.make_checkpoint import make_checkpoint

    ckpt, art = workdir / f"ckpt-{preset}", workdir / f"art-{preset}"
    if not (ckpt / "config.json").is_file():
        make_checkpoint(ckpt, preset, seed=seed, progress=False)
    if not (art / "manifest.json").is_file():
        export_onnx(ckpt, art, progress=False)
    have = set(variant_names(load_manifest(art, verify="size")))
    if not {"int4", "int4-qdq"} <= have:
        quantize_artifact(art, 4, block_size=block_size)
    if not {"int8", "int8-qdq", "int8-dynamic"} <= have:
        quantize_artifact(art, 8, block_size=block_size, forms=("nbits", "qdq", "dynamic"))
    if lm_head:
        for quantise_lm, tag in ((False, ""), (True, "-lm"), (8, "-lm8")):
            if not {f"{CONTRIB}-int4{tag}", f"{CONTRIB}-int8-dynamic{tag}"} <= have:
                optimize_artifact(
                    art, (4, 8), block_size=block_size, lm_head=quantise_lm, tag=tag,
                    forms=(CONTRIB,), int8_dynamic=True,
                )  # fmt: skip
    return art


def write_videos(workdir: Path) -> list[Path]:
    from tests.media import write_video

    paths = []
    for i, (w, h, fps, n) in enumerate(VIDEOS):
        p = workdir / f"video{i}.mp4"
        if not p.is_file():
            write_video(p, width=w, height=h, fps=fps, n_frames=n)
        paths.append(p)
    return paths


def _encode(pipe: Pipeline, video: Path):
    cfg = pipe.config
    clip = load_video(video, cfg.num_frames)
    px = preprocess_frames(clip.frames, cfg.preprocess)
    tid = np.array([encode_timestamp(float(t)) for t in clip.times], dtype=np.int64)
    return pipe.backend.encode_video(px, tid)


def mean_rel_err(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    """Mean over steps of max|got - want| / max|want| (each step's own scale)."""
    return float(
        np.mean([np.abs(x - y).max() / np.abs(y).max() for x, y in zip(got, want, strict=True)])
    )


def text_forced(pipe: Pipeline, video: Path, prompt_ids: list[int], n: int, tokens=None):
    """Logits of a prefill and *n* decode steps all in the text head (``lm_head`` runs every
    step), fed *tokens*, or without them each step's own greedy text pick (fp32's run);
    returns (logits, the tokens fed). Random weights' greedy answers rarely leave the time
    head, so this is where a quantised ``lm_head`` shows."""
    b, base = pipe.backend, head_base(pipe.config.ids, Head.TEXT)
    logits = [b.prefill(prompt_ids, _encode(pipe, video), Head.TEXT)]
    fed: list[int] = []
    for k in range(n):
        fed.append(tokens[k] if tokens is not None else base + int(np.argmax(logits[-1])))
        logits.append(b.decode_step(fed[-1], Head.TEXT))
    return logits, fed


def teacher_forced(pipe: Pipeline, video: Path, prompt_ids: list[int], tokens: list[int]):
    """The variant's per-step logits when fed *tokens* (fp32's greedy answer)."""
    b = pipe.backend
    heads = heads_along(pipe.config.ids, tokens)
    logits = [b.prefill(prompt_ids, _encode(pipe, video), heads[0])]
    logits += [b.decode_step(tok, h) for tok, h in zip(tokens[:-1], heads[1:], strict=True)]
    return logits, heads


def step_latency(art: Path, names: list[str], past: int, rounds: int) -> dict[str, dict]:
    """p50 ms of a prefill of ~*past* positions and of one decode step after it (text and
    time head) per variant, each timed in its own process
    (:func:`export.decode_timing.time_decode`): with every variant's session in one process,
    the idle sessions' spinning workers take the CPUs from the one being timed."""
    from export.decode_timing import time_decode
    from trace_rt.variants import PORTABLE

    timed = time_decode(art, [PORTABLE if n == FP32 else n for n in names], past=past,
                        rounds=rounds)  # fmt: skip
    return {n: timed[PORTABLE if n == FP32 else n] for n in names}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.quant_agreement", description=__doc__)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/trace-rt-quant"))
    ap.add_argument("--tokens", type=int, default=64, help="greedy tokens per input")
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0, help="checkpoint seed")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads")
    ap.add_argument("--out", type=Path, help="write the markdown report here")
    ap.add_argument(
        "--lm-head",
        action="store_true",
        help="also the contrib forms with lm_head kept, quantised alike and in int8",
    )
    ap.add_argument("--variants", help="comma-separated variants to run (default: all)")
    ap.add_argument("--step-past", type=int, default=300, help="prompt length, step timing")
    ap.add_argument("--step-reps", type=int, default=6, help="rounds, step timing")
    args = ap.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    art = prepare(args.preset, args.workdir, args.block_size, args.seed, args.lm_head)
    videos = write_videos(args.workdir)
    from trace_rt.graphs import load_manifest

    manifest = load_manifest(art, verify="size")
    names = [FP32, *variant_names(manifest)]
    if args.variants:
        wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
        if unknown := sorted(set(wanted) - set(names)):
            ap.error(f"unknown variants {unknown}; this artifact has {names}")
        names = [FP32, *[n for n in wanted if n != FP32]]
    pipes = {
        n: Pipeline.from_dir(
            art,
            "onnxruntime",
            cache_dir=False,
            threads=args.threads,
            # Each variant by its own name (after `export optimize`, plain "int4" would
            # mean the fastest int4 form); fp32 is decoder.onnx itself.
            decoder_variant="portable" if n == FP32 else n,
            exact_variant=True,
        )
        for n in names
    }
    gen = GenerationConfig(max_new_tokens=args.tokens)
    for pipe in pipes.values():  # warm-up: first runs allocate and tune
        pipe.run(videos[0], "mr", query=QUERY, gen=GenerationConfig(max_new_tokens=4))
    stats = {n: Stats() for n in names}
    t0 = time.time()
    for video in videos:
        for task in TASKS:
            query = None if task == "dvc" else QUERY
            runs = {n: p.run(video, task, query=query, gen=gen) for n, p in pipes.items()}
            ref = runs[FP32]["token_ids"]
            ref_logits, heads = teacher_forced(pipes[FP32], video, runs[FP32]["prompt_ids"], ref)
            prompt = runs[FP32]["prompt_ids"]
            text_ref, text_fed = text_forced(pipes[FP32], video, prompt, args.tokens - 1)
            for n, r in runs.items():
                s, got = stats[n], r["token_ids"]
                n_tok = len(got)
                s.decode_ms.append(r["timing_ms"]["decode"] / max(1, n_tok - 1))
                s.prefill_ms.append(r["timing_ms"]["prefill"])
                same = [a == b for a, b in zip(got, ref, strict=False)]
                first = same.index(False) if False in same else len(same)
                s.prefix.append(first / len(ref))
                s.overall.append(sum(same) / len(ref))
                s.exact.append(got == ref)
                if n == FP32:
                    s.margin += [float(np.diff(np.sort(y)[-2:])[0]) for y in ref_logits]
                    continue
                lg, _ = teacher_forced(pipes[n], video, r["prompt_ids"], ref)
                ids = pipes[n].config.ids
                hits = [
                    head_base(ids, h) + int(np.argmax(x)) == t
                    for x, h, t in zip(lg, heads, ref, strict=True)
                ]
                s.forced.append(sum(hits) / len(ref))
                lt, _ = text_forced(pipes[n], video, prompt, args.tokens - 1, text_fed)
                agree = [np.argmax(x) == np.argmax(y) for x, y in zip(lt, text_ref, strict=True)]
                s.text_top1.append(float(np.mean(agree)))
                s.text_err.append(mean_rel_err(lt, text_ref))
                diffs = [np.abs(x - y).max() for x, y in zip(lg, ref_logits, strict=True)]
                s.abs_err.append(float(np.mean(diffs)))
                s.rel_err.append(mean_rel_err(lg, ref_logits))
            print(f"{video.name} {task}: {len(ref)} fp32 tokens", flush=True)
    steps = step_latency(art, names, args.step_past, args.step_reps)
    report = render(args, art, manifest, stats, steps, time.time() - t0, len(videos) * 3)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
    return 0


def render(
    args: argparse.Namespace,
    art: Path,
    manifest: dict[str, Any],
    stats: dict[str, Stats],
    steps: dict[str, dict],
    secs: float,
    runs_ref: int,
) -> str:
    from trace_rt.variants import recorded_head_bits

    variants = manifest.get("variants", {}).get("decoder", {})
    size = {FP32: (art / manifest["graphs"]["decoder"]["file"]).stat().st_size}
    for n, rec in variants.items():
        size[n] = sum(f["bytes"] for f in rec["files"].values())
    base_ms = statistics.median(stats[FP32].decode_ms)
    lines = [
        "| variant | form | decoder MB | prefix agr. | overall agr. | exact | forced top-1 "
        "| logit rel. err | max abs. err | text top-1 | text logit err | decode ms/tok "
        "| speed-up | prefill ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, s in stats.items():
        rec = variants.get(n, {})
        form = "fp32" if n == FP32 else f"{rec['scheme']} int{rec['bits']}"
        head = recorded_head_bits(rec.get("weights", {}), rec.get("bits"))
        if head is not None:  # quantised too
            form += ", lm_head too" if head == rec["bits"] else f", lm_head int{head}"
        ms = statistics.median(s.decode_ms)
        forced = f"{np.mean(s.forced):.3f}" if s.forced else "1"
        err = f"{np.mean(s.rel_err):.2e}" if s.rel_err else "0"
        abs_err = f"{np.mean(s.abs_err):.3f}" if s.abs_err else "0"
        t1 = f"{np.mean(s.text_top1):.3f}" if s.text_top1 else "1"
        t_err = f"{np.mean(s.text_err):.2e}" if s.text_err else "0"
        lines.append(
            f"| {n} | {form} | {size[n] / 1e6:.0f} | {np.mean(s.prefix):.3f} | "
            f"{np.mean(s.overall):.3f} | {sum(s.exact)}/{len(s.exact)} | {forced} | {err} | "
            f"{abs_err} | {t1} | {t_err} | "
            f"{ms:.1f} | {base_ms / ms:.2f}x | {statistics.median(s.prefill_ms):.0f} |"
        )
    some = next(iter(variants.values()), {})
    settings = {k: some.get(k) for k in ("block_size", "symmetric", "accuracy_level", "algorithm")}
    return "\n".join(
        [
            f"# Quantised decoders vs fp32: greedy agreement and speed (`{args.preset}`, CPU)",
            "",
            f"- date: {time.strftime('%Y-%m-%d', time.gmtime())}",
            f"- machine: {os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), "
            f"onnxruntime {ort.__version__} CPU EP, threads: {args.threads or 'default'}",
            f"- command: `python -m benchmarks.quant_agreement --preset {args.preset} "
            f"--tokens {args.tokens} --block-size {args.block_size}"
            + (" --lm-head" if args.lm_head else "")
            + (f" --variants {args.variants}" if args.variants else "")
            + f" --out {args.out}`",
            f"- inputs: {runs_ref} = 3 synthetic videos (tests/media.py) x dvc/mr/vhd, "
            f"{args.tokens} greedy tokens each, random-weight checkpoint (seed {args.seed})",
            f"- variant settings: {json.dumps(settings)}; heads (lm_head, time, score, sync) "
            f"in fp32 unless the form says `lm_head too`; wall time {secs:.0f} s; "
            "load average at the end "
            f"{os.getloadavg()[0]:.1f} (a shared machine: timings are rough)",
            "",
            *lines,
            "",
            "prefix agr. = positions equal before the first divergence / fp32 length; overall "
            "agr. = positions equal / fp32 length; exact = inputs with identical tokens; "
            "forced top-1 = argmax agreement when fed fp32's tokens; logit rel. err = mean "
            "over those steps of max|variant - fp32| / max|fp32| of the active head; max abs. "
            "err = mean of max|variant - fp32| (logit units); text top-1 / text logit err = the "
            "same with every step in the text head (a prefill and tokens-1 steps fed fp32's "
            "own greedy text picks), where lm_head runs each step; decode ms/tok and prefill "
            "ms are "
            "medians over inputs, timed with every variant's pipeline alive in one process "
            "(rough: read speed from the per-process table below).",
            "",
            f"fp32's own margin between its top-1 and top-2 logit is small on random weights: "
            f"median {np.median(stats[FP32].margin):.3f}, 10th percentile "
            f"{np.percentile(stats[FP32].margin, 10):.3f} (logit units), against the max abs. "
            "errors above: most flips are near ties, and since greedy decoding on random "
            "weights loops on one id, one flipped state repeats across many positions.",
            "",
            f"Each variant alone, in its own process (prefill of {args.step_past} positions, "
            f"then single steps; {args.step_reps} rounds over two worker processes; the faster "
            "worker's p50, ms; "
            "`export.decode_timing.time_decode`):",
            "",
            "| variant | prefill | step, text head | step, time head | step speed-up |",
            "|---|---|---|---|---|",
            *[
                f"| {n} | {t['prefill']:.1f} | {t['text']:.2f} | {t['time']:.2f} | "
                f"{(steps[FP32]['text'] + steps[FP32]['time']) / (t['text'] + t['time']):.2f}x |"
                for n, t in steps.items()
            ],
            "",
            "**Caveat: random weights are a weak proxy for real accuracy.** Their logits have "
            "no learned margins, so greedy decoding tends to loop on one id and a single flip "
            "can come from a near tie; neither the agreement nor the disagreement here "
            "predicts what quantisation does to the released TRACE weights.",
            "",
        ]
    )


if __name__ == "__main__":
    raise SystemExit(main())
