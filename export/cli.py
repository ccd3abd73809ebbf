"""``python -m export``: subcommands mapped to typed functions."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trace_rt.errors import TraceError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m export", description="Export a TRACE checkpoint to deployable graphs."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "onnx",
        help="write an artifact directory with the vision-encoder, projector and decoder graphs",
        description="Export CKPT to ONNX graphs plus manifest.json, config and tokenizer in "
        "OUT; load the result with `trace-rt run VIDEO --model OUT --backend onnxruntime`.",
    )
    p.add_argument("checkpoint", type=Path, help="HF-format TRACE checkpoint directory")
    p.add_argument("out", type=Path, help="artifact directory to write")
    p.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32", help="graph dtype")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17)")
    p.add_argument("--no-progress", action="store_true", help="no progress display")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from export.onnx_export import DEFAULT_OPSET, export_onnx

    try:
        if args.command == "onnx":
            out = export_onnx(
                args.checkpoint,
                args.out,
                dtype=args.dtype,
                opset=args.opset or DEFAULT_OPSET,
                progress=not args.no_progress,
            )
            print(f"wrote {out}")
    except TraceError as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 2
    return 0
