"""``python -m training``: checkpoints, data and training for TRACE.

Sub-commands: ``make-checkpoint`` (random weights), ``synth-data`` (a synthetic
temporal-grounding set), ``convert`` (official or VTG-IT-style annotations -> training format),
``train`` (a recipe on a data set; our format or the release's training JSON),
``convert-checkpoint`` (a sharded FSDP step checkpoint -> release format), ``eval``
(moment retrieval through the serving pipeline) and ``demo`` (all three tasks on a
generated clip with random weights: what ``setup.sh`` shows). Heavy imports happen
inside each command.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from trace_rt.cliutil import Parser, run_command
from training.presets import preset_names

PROG = "python -m training"


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog=PROG, description="Produce TRACE checkpoints (HF format).")
    sub = parser.add_subparsers(dest="command", required=True)
    adders = (_add_make_checkpoint, _add_synth_data, _add_convert, _add_train,
              _add_convert_checkpoint, _add_eval, _add_demo)  # fmt: skip
    for add in adders:
        add(sub)
    return parser


def _add_make_checkpoint(sub: argparse._SubParsersAction) -> None:
    mk = sub.add_parser(
        "make-checkpoint",
        help="write a checkpoint with random weights and the real Mistral tokenizer",
        description="Write an HF-format TRACE checkpoint with random weights: config.json, "
        "safetensors (sharded when large), tokenizer.model and a clip_vision/ directory.",
    )
    mk.add_argument("out", help="output checkpoint directory")
    mk.add_argument("--preset", choices=preset_names(), default="tiny", help="model size")
    mk.add_argument("--seed", type=int, default=0, help="weights are a function of the seed")
    mk.add_argument(
        "--dtype", choices=["fp32", "fp16", "bf16"], help="storage dtype (default: the preset's)"
    )
    mk.add_argument(
        "--separate-vision-tower",
        action="store_true",
        help="store the CLIP weights in clip_vision/ instead of the checkpoint",
    )
    mk.add_argument("--max-shard-gb", type=float, default=4.0, help="shard size limit (GiB)")
    mk.add_argument("--force", action="store_true", help="overwrite a checkpoint already in OUT")


def _add_synth_data(sub: argparse._SubParsersAction) -> None:
    sd = sub.add_parser(
        "synth-data",
        help="write a synthetic temporal-grounding set (mp4 videos + train/val JSON)",
        description="Coloured shapes appear, move and vanish in known windows; captions, "
        "moment-retrieval queries and per-clip saliency in the training format.",
    )
    sd.add_argument("out", help="output directory")
    sd.add_argument("--videos", type=int, default=200, help="number of clips")
    sd.add_argument("--seed", type=int, default=0, help="the set is a function of the seed")
    sd.add_argument("--val-fraction", type=float, default=0.2, help="share of clips in val.json")
    sd.add_argument("--max-shapes", type=int, default=2, help="shapes per video: 1..N")
    sd.add_argument("--min-shapes", type=int, default=1, help="at least this many shapes")
    sd.add_argument(
        "--frame-words",
        action="store_true",
        help="also write each clip's shapes as timed colour words (frame_words), which a "
        "recipe's frame_words share shows in place of the frames",
    )
    sd.add_argument(
        "--kind-words",
        action="store_true",
        help="with --frame-words: the shapes' kind words (circle, square, triangle) too",
    )
    sd.add_argument("--fps", type=int, default=8, help="frame rate of the clips")
    sd.add_argument("--size", type=int, default=64, help="frame side in pixels")
    sd.add_argument("--min-duration", type=float, default=8.0, help="shortest clip (s)")
    sd.add_argument("--max-duration", type=float, default=12.0, help="longest clip (s)")
    sd.add_argument("--tasks", default="mr,dvc,vhd", help="comma-separated: mr,dvc,vhd")


def _add_convert(sub: argparse._SubParsersAction) -> None:
    cv = sub.add_parser(
        "convert", help="convert official or VTG-IT-style annotations to the training format"
    )
    cv.add_argument(
        "src", help="annotation file (charades_sta_*.txt, QVHighlights *.jsonl, YouCook2, "
        "ActivityNet Captions, coco-format json, or VTG-IT-style json)"
    )  # fmt: skip
    cv.add_argument(
        "--format",
        dest="fmt",
        default="auto",
        choices=["auto", "vtg-it", "charades-sta", "qvhighlights", "youcook2",
                 "activitynet-captions", "coco-format"],
        help="the file's format (auto: by name and layout)",
    )  # fmt: skip
    cv.add_argument("--subset", default="training", help="youcook2: the subset")
    cv.add_argument("dst", help="output split file (e.g. data/train.json)")
    cv.add_argument(
        "--kind", choices=["auto", "dvc", "mr", "vhd"], default="auto", help="annotation kind"
    )
    cv.add_argument("--video-root", default=".", help="directory of the videos")
    cv.add_argument("--video-ext", default=".mp4", help="appended to ids without extension")
    cv.add_argument(
        "--on-bad-sample",
        choices=["fail", "skip"],
        default="fail",
        help="a bad record stops or is skipped",
    )


def _add_train(sub: argparse._SubParsersAction) -> None:
    tr = sub.add_parser(
        "train",
        help="train a recipe (torchrun for several processes)",
        description="Train TRACE with the sum of the three heads' cross-entropies; writes a "
        "release-format checkpoint to OUT and resumable checkpoints to OUT/.train/.",
    )
    tr.add_argument(
        "--config",
        required=True,
        help="recipe YAML, or a shipped recipe's name (tiny-synthetic, stage1, stage2, finetune)",
    )
    tr.add_argument(
        "--data",
        required=True,
        help="data directory (train.json), split file, or the release's training JSON "
        "(a list of records with 'conversations', e.g. VTG-IT stage-2.json)",
    )
    tr.add_argument(
        "--data-folder",
        help="where the release JSON's video/image paths start (its --data_folder; "
        "default: the JSON file's directory)",
    )
    tr.add_argument("--out", required=True, help="output checkpoint directory")
    init = tr.add_mutually_exclusive_group()
    init.add_argument("--init", help="start from this checkpoint")
    init.add_argument("--preset", choices=preset_names(), help="start from random weights")
    tr.add_argument(
        "--max-steps", type=int, help="override the recipe's max_steps (and its epochs)"
    )
    tr.add_argument(
        "--num-workers", type=int, help="override the recipe's data-loader worker processes"
    )
    tr.add_argument("--resume", action="store_true", help="continue from OUT's latest checkpoint")
    tr.add_argument(
        "--until",
        type=int,
        metavar="STEP",
        help="pause after STEP steps of the schedule (a step checkpoint, no final model); "
        "--resume continues the same run, e.g. after comparing several starts at STEP",
    )
    tr.add_argument("--device", choices=["auto", "cpu", "cuda", "npu"], help="override device")
    tr.add_argument("--dtype", choices=["fp32", "bf16"], help="override the recipe's dtype")
    tr.add_argument(
        "--on-bad-sample",
        choices=["fail", "skip"],
        help="a bad sample (missing video, malformed targets, timestamps past the end) stops "
        "training (fail, the default) or is reported and skipped (skip)",
    )
    tr.add_argument("--seed", type=int, help="override the recipe's seed")
    tr.add_argument("--no-progress", action="store_true", help="log lines instead of a bar")


def _add_convert_checkpoint(sub: argparse._SubParsersAction) -> None:
    cc = sub.add_parser(
        "convert-checkpoint",
        help="a sharded (FSDP) step checkpoint -> a release-format checkpoint",
        description="Gather the shards of OUT/.train/step-N (written by parallel: fsdp) into "
        "one release-format checkpoint directory, on one machine, without a process group.",
    )
    cc.add_argument("step", help="a step checkpoint directory, e.g. OUT/.train/step-0005000")
    cc.add_argument("out", help="output checkpoint directory")
    cc.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="storage dtype (fp32)")


def _convert_checkpoint(args: argparse.Namespace) -> None:
    from training.sharded import convert_sharded

    print(json.dumps({"out": str(convert_sharded(args.step, args.out, dtype=args.dtype))}))


def _add_eval(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser(
        "eval",
        help="moment-retrieval R@0.3/0.5/0.7 and mIoU on a split (trace-rt eval's metrics), "
        "or dense captions event by event (--task dvc)",
    )
    ev.add_argument("model", help="checkpoint or exported artifact directory")
    ev.add_argument("--data", required=True, help="split file (e.g. DATA/val.json)")
    ev.add_argument(
        "--backend",
        help="default: onnxruntime for an artifact directory (manifest.json), else torch",
    )
    ev.add_argument(
        "--task",
        choices=["mr", "dvc"],
        default="mr",
        help="mr: the split's moment-retrieval queries (default); dvc: its dense-caption "
        "samples, each true event paired with the predicted one overlapping it most "
        "(located@0.5, caption words, exact captions)",
    )
    ev.add_argument("--constrained", action="store_true", help="well-formed numbers only (mr)")
    ev.add_argument(
        "--max-new-tokens", type=int, help="token budget per sample (default: mr 32, dvc 96)"
    )
    ev.add_argument("--limit", type=int, help="only the first N queries (dvc: samples)")
    ev.add_argument(
        "--template",
        choices=["llama_2", "mistral_instruct"],
        default="llama_2",
        help="chat template of the prompt: llama_2 (the release's evaluation; default) or "
        "mistral_instruct (the release's training template, for models trained only on it)",
    )
    ev.add_argument(
        "--rules",
        choices=["original", "lenient"],
        default="original",
        help="generation -> span: the original's reformat rules or lenient "
        "(trace_rt/evaluation/reformat.py)",
    )
    ev.add_argument("--out", help="also write the full report (predictions) as JSON here")


def _add_demo(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser(
        "demo",
        help="run all three tasks on a generated clip with a random-weight tiny checkpoint",
        description="Make a tiny checkpoint (real tokenizer, random weights) and a short "
        "generated clip in OUT, answer dvc, mr and vhd through the runtime and print the "
        "events. The weights are random: the events are noise. setup.sh runs this.",
    )
    d.add_argument("--out", default="demo", help="where the checkpoint and the clip go")
    d.add_argument("--max-new-tokens", type=int, default=40, help="token budget per task")


def _demo(args: argparse.Namespace) -> None:
    from training.demo import run_demo

    run_demo(args.out, max_new_tokens=args.max_new_tokens)


def _make_checkpoint(args: argparse.Namespace) -> None:
    from training.make_checkpoint import make_checkpoint

    out = make_checkpoint(
        args.out,
        args.preset,
        seed=args.seed,
        dtype=args.dtype,
        separate_vision_tower=args.separate_vision_tower,
        max_shard_gb=args.max_shard_gb,
        progress=sys.stderr.isatty(),
        force=args.force,
    )
    print(out)


def _synth_data(args: argparse.Namespace) -> None:
    from training.synth import SynthConfig, make_synth_data

    cfg = SynthConfig(
        videos=args.videos,
        seed=args.seed,
        val_fraction=args.val_fraction,
        size=args.size,
        fps=args.fps,
        min_duration=args.min_duration,
        max_duration=args.max_duration,
        max_shapes=args.max_shapes,
        min_shapes=args.min_shapes,
        frame_words=args.frame_words,
        kind_words=args.kind_words,
        tasks=tuple(t for t in args.tasks.split(",") if t),
    )
    print(json.dumps({"out": args.out, "samples": make_synth_data(args.out, cfg)}))


def _convert(args: argparse.Namespace) -> None:
    from training.convert import convert

    n = convert(
        args.src,
        args.dst,
        kind=args.kind,
        video_root=args.video_root,
        video_ext=args.video_ext,
        on_bad=args.on_bad_sample,
        fmt=args.fmt,
        subset=args.subset,
    )
    print(json.dumps({"out": args.dst, "samples": n}))


def _train(args: argparse.Namespace) -> int:
    from training.recipe import TrainConfig
    from training.trainer import train

    if args.init is None and args.preset is None and not args.resume:
        print(f"{PROG} train: error: give --init CKPT or --preset NAME (or --resume)",
              file=sys.stderr)  # fmt: skip
        return 2
    rc = TrainConfig.load(
        args.config,
        max_steps=args.max_steps,
        device=args.device,
        dtype=args.dtype,
        on_bad_sample=args.on_bad_sample,
        seed=args.seed,
        num_workers=args.num_workers,
    )
    if args.max_steps is not None:
        rc = rc.replace(epochs=None)  # an explicit step count wins over the recipe's epochs
    summary = train(
        rc,
        args.data,
        args.out,
        init=args.init,
        preset=args.preset,
        resume=args.resume,
        progress=False if args.no_progress else None,
        data_folder=args.data_folder,
        until=args.until,
    )
    losses = summary.pop("losses")
    if losses:
        summary.update(first_loss=losses[0], last_loss=losses[-1])
    if os.environ.get("RANK", "0") == "0":  # one summary per run, not per process
        print(json.dumps({"out": args.out, **summary}))
    return 0


def _eval(args: argparse.Namespace) -> None:
    from trace_rt.errors import InputError
    from training.evaluate import evaluate_dvc, evaluate_mr

    if not os.path.exists(args.data):
        raise InputError(f"--data {args.data} does not exist")
    opts = dict(backend=args.backend, limit=args.limit, rules=args.rules, template=args.template)
    if args.max_new_tokens is not None:
        opts["max_new_tokens"] = args.max_new_tokens
    if args.task == "dvc":
        if args.constrained:
            raise ValueError("--constrained applies to --task mr only")
        report = evaluate_dvc(args.model, args.data, **opts)
    else:
        report = evaluate_mr(args.model, args.data, constrained=args.constrained, **opts)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    report.pop("predictions")
    print(json.dumps(report))


COMMANDS = {
    "make-checkpoint": _make_checkpoint,
    "synth-data": _synth_data,
    "convert": _convert,
    "train": _train,
    "convert-checkpoint": _convert_checkpoint,
    "eval": _eval,
    "demo": _demo,
}
# Mistakes in a recipe, a data set or a directory raise these; they are the user's to fix
# (one line, exit code 2), not tracebacks. BadSampleError is a ValueError.
USER_ERRORS = (ValueError, FileExistsError, NotImplementedError)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_command(PROG, lambda: COMMANDS[args.command](args), user_errors=USER_ERRORS)
