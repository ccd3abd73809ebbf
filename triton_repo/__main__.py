"""``python -m triton_repo build ARTIFACTS OUT``: see :mod:`triton_repo.build`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trace_rt.cliutil import Parser, run_command
from trace_rt.serving.protocol import ServingSettings

PROG = "python -m triton_repo"


def add_decode_arguments(p: argparse.ArgumentParser, d: ServingSettings) -> None:
    """How each instance decodes request videos (ServingSettings' decode fields)."""
    p.add_argument(
        "--decode-workers",
        type=int,
        default=d.decode_workers,
        help="videos each instance decodes and encodes at once, beside its engine's decoding "
        f"(default {d.decode_workers})",
    )
    p.add_argument(
        "--video-time-budget",
        type=float,
        default=d.video_time_budget_s,
        metavar="SECONDS",
        help="wall-clock limit on decoding one request's video "
        f"(default {d.video_time_budget_s:g})",
    )
    p.add_argument(
        "--max-frame-pixels",
        type=int,
        default=d.max_frame_pixels,
        help=f"largest frame (width x height) decoded (default {d.max_frame_pixels}, DCI 8K)",
    )
    p.add_argument(
        "--max-sequences",
        type=int,
        default=d.max_sequences,
        help="KV slots per instance: requests decoded together, the rest wait; KV memory "
        "up to 2 x layers x kv heads x head dim x dtype bytes x context x slots (build "
        f"prints it) (default {d.max_sequences})",
    )
    p.add_argument(
        "--video-cache-mb",
        type=int,
        default=d.video_cache_mb,
        help="video cache per instance (encoded videos and prompt-prefix K/V, LRU; a "
        f"response's video_id names its entry; 0: no reuse) (default {d.video_cache_mb})",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=PROG, description="Generate a Triton Inference Server model repository for TRACE."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "build",
        help="write a model repository (vision_encoder, projector, trace_pipeline)",
        description="Write a ready model repository from an export artifact directory; "
        "serve it with `trace-rt serve --repo OUT`. A rebuild replaces OUT.",
    )
    p.add_argument("artifacts", type=Path, help="artifact directory from `python -m export onnx`")
    p.add_argument("out", type=Path, help="the model repository to write")
    p.add_argument(
        "--backend",
        choices=["onnxruntime", "tensorrt"],
        default="onnxruntime",
        help="onnxruntime: Python-backend models (CPU); tensorrt: tensorrt_plan encoders and "
        "a TensorRT decoder (needs `python -m export trt` engines)",
    )
    p.add_argument("--instances", type=int, default=1, help="instances of each model")
    p.add_argument(
        "--max-batch-frames",
        type=int,
        help="the vision encoder's largest batch of frames (default: the model's num_frames)",
    )
    p.add_argument(
        "--encoders",
        choices=["in-process", "bls"],
        default="in-process",
        help="trace_pipeline runs the encoders itself (in-process, the default: measured "
        "faster, benchmarks/results/triton-encoders-cpu.md) or calls the encoder models by BLS",
    )
    d = ServingSettings()
    p.add_argument(
        "--max-video-bytes",
        type=int,
        default=d.max_video_bytes,
        help=f"largest video a request may send (default {d.max_video_bytes})",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=d.max_new_tokens,
        help=f"largest token budget a request may ask for (default {d.max_new_tokens})",
    )
    p.add_argument(
        "--default-max-new-tokens",
        type=int,
        default=d.default_max_new_tokens,
        help=f"budget of requests that name none (default {d.default_max_new_tokens})",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="onnxruntime threads per session (0: onnxruntime's choice)",
    )
    p.add_argument(
        "--server-tensorrt",
        metavar="VERSION",
        help="--backend tensorrt: the serving tritonserver's TensorRT version, checked "
        "against the engines' (default: the tensorrt importable here)",
    )
    add_decode_arguments(p, d)
    p.add_argument("--no-progress", action="store_true", help="print nothing while building")
    return parser


def _build(args: argparse.Namespace) -> None:
    from triton_repo.build import build_repository

    out = build_repository(
        args.artifacts,
        args.out,
        backend=args.backend,
        instances=args.instances,
        max_batch_frames=args.max_batch_frames,
        encoders=args.encoders,
        max_video_bytes=args.max_video_bytes,
        max_new_tokens=args.max_new_tokens,
        server_tensorrt=args.server_tensorrt,
        default_max_new_tokens=args.default_max_new_tokens,
        threads=args.threads,
        decode_workers=args.decode_workers,
        video_time_budget_s=args.video_time_budget,
        max_frame_pixels=args.max_frame_pixels,
        max_sequences=args.max_sequences,
        video_cache_mb=args.video_cache_mb,
        progress=not args.no_progress,
    )
    print(f"model repository ready: {out}\nserve it with: trace-rt serve --repo {out}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(PROG, lambda: _build(args))


if __name__ == "__main__":
    sys.exit(main())
