"""``python -m training``: make checkpoints (training recipes arrive with their issue)."""

from __future__ import annotations

import argparse
import sys

from training.presets import preset_names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training", description="Produce TRACE checkpoints (HF format)."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    mk = sub.add_parser(
        "make-checkpoint",
        help="write a checkpoint with random weights and the real Mistral tokenizer",
        description="Write an HF-format TRACE checkpoint with random weights: config.json, "
        "safetensors (sharded when large), tokenizer.model and a clip_vision/ directory.",
    )
    mk.add_argument("out", help="output checkpoint directory")
    mk.add_argument("--preset", choices=preset_names(), default="tiny")
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
    args = parser.parse_args(argv)

    if args.command == "make-checkpoint":
        from training.make_checkpoint import make_checkpoint

        out = make_checkpoint(
            args.out,
            args.preset,
            seed=args.seed,
            dtype=args.dtype,
            separate_vision_tower=args.separate_vision_tower,
            max_shard_gb=args.max_shard_gb,
            progress=sys.stderr.isatty(),
        )
        print(out)
    return 0
