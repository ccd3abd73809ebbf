"""``python -m trace_rt.bench``: every backend on the same request, stage by stage.

Example (CPU, the recorded ``small`` result; see benchmarks/README.md)::

    python -m trace_rt.bench --model ckpt-small --artifacts art-small \\
        --plugin reference=benchmarks.reference.backend:ReferenceBackend \\
        --backends reference,torch,onnxruntime,onnxruntime-int4 \\
        --frames 16 --decode-steps 64 --warmup 1 --runs 5 --repeat 3 --repeat-gap 60 \\
        --json out.json --markdown out.md --plot out.png

``--repeat N`` runs the whole bench N times (invocations) and reports each stage's median
over invocations with the spread between them; ratios are computed within an invocation
(:mod:`trace_rt.bench.summary`), and the machine's load is kept for each
(:mod:`trace_rt.bench.load`).

With ``triton`` among the backends, ``--url HOST:PORT`` names a running ``trace-rt serve``
(gRPC); after the in-process backends, the bench measures it from C concurrent clients for
each C in ``--concurrency`` (:mod:`trace_rt.bench.triton`)::

    python -m trace_rt.bench --model ckpt-small --artifacts art-small \\
        --backends onnxruntime,triton --url 127.0.0.1:8001 --concurrency 1,2,4

For in-process backends with KV-slot pools, ``--concurrency`` also measures each level's
requests at once through one engine against one at a time, and ``--queries-per-video N``
N ``mr`` queries about one video, independent vs cached vs one ``run_many`` call
(:mod:`trace_rt.bench.batching`)::

    python -m trace_rt.bench --model ckpt-small --artifacts art-small \\
        --backends onnxruntime --frames 16 --concurrency 1,2,4,8 --queries-per-video 4

Backends load one at a time (each freed before the next), so peak memory is per backend
and one backend's caches cannot slow another's. torch/transformers are imported only by
the backends that need them; this module and the rest of ``trace_rt.bench`` need numpy and
rich only (matplotlib for ``--plot``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from trace_rt.bench import (
    batching,
    batching_report,
    invocation,
    machine,
    mdreport,
    peer_table,
    plugins,
    render,
    report,
)
from trace_rt.bench import floor as floor_mod
from trace_rt.bench import peaks as peaks_mod
from trace_rt.bench import triton as triton_mod
from trace_rt.bench.runner import Request
from trace_rt.bench.video import (
    DESCRIPTION,
    add_ffmpeg_ratios,
    ffmpeg_baseline,
    synthetic_video,
)
from trace_rt.cliutil import Parser, run_command
from trace_rt.config import TraceConfig

DEFAULT_BACKENDS = "reference,torch,onnxruntime"
TRITON_CONCURRENCY = "1,2,4,8"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m trace_rt.bench",
        description="Per-stage latency of TRACE backends side by side, against the floor.",
    )
    p.add_argument("--model", required=True, type=Path, help="checkpoint or artifact directory")
    p.add_argument(
        "--artifacts",
        type=Path,
        help="artifact directory (python -m export onnx) for onnxruntime*/tensorrt when "
        "--model is a checkpoint",
    )
    p.add_argument(
        "--backends",
        default=DEFAULT_BACKENDS,
        help="comma-separated: reference, torch, onnxruntime, onnxruntime-int4, "
        "onnxruntime-int8, tensorrt, triton, or a --plugin name; onnxruntime@VARIANT runs "
        "that decoder variant of the artifact, e.g. onnxruntime@fused-int4-b128 (`export "
        "optimize --tag`) (default: %(default)s)",
    )
    p.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="NAME=module:Class",
        help=f"an out-of-tree backend, e.g. {plugins.REFERENCE_SPEC} "
        f"(repeatable; also ${plugins.ENV_VAR}, comma-separated)",
    )
    p.add_argument("--frames", type=int, help="frames sampled (default: the model's num_frames)")
    p.add_argument(
        "--decode-steps",
        type=int,
        default=64,
        help="decode steps per request, EOS ignored (default: %(default)s)",
    )
    p.add_argument(
        "--no-text-steps",
        dest="text_steps",
        action="store_false",
        help="skip decode_step_text (as many steps again, each in the text head so lm_head "
        "runs, after one more untimed prefill per request: what to hold against a peer's "
        "decode step)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="unmeasured requests per backend and invocation (default: %(default)s)",
    )
    p.add_argument(
        "--runs",
        type=int,
        default=5,
        help="measured requests per backend and invocation (default: %(default)s)",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="invocations: the whole bench (every backend, warmup + runs) this many times, "
        "to measure the spread between them; figures are medians over invocations, "
        "verdicts 'within noise' unless a margin exceeds the spread (default: %(default)s)",
    )
    p.add_argument(
        "--repeat-gap",
        type=float,
        default=0.0,
        metavar="S",
        help="seconds to wait between invocations, to spread them over time (default: %(default)s)",
    )
    p.add_argument(
        "--video", help="input video (default: a synthetic 8 s 320x240 25 fps H.264 clip)"
    )
    p.add_argument("--task", default="dvc", choices=("dvc", "mr", "vhd"), help="the request")
    p.add_argument("--query", help="query for mr/vhd")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="torch/reference dtype")
    p.add_argument("--peak-gbps", type=float, help="device memory bandwidth, GB/s")
    p.add_argument("--peak-tflops", type=float, help="device peak compute, TFLOP/s")
    p.add_argument(
        "--url",
        help="the triton backend's server: gRPC HOST:PORT of a running `trace-rt serve` "
        "(required with --backends ...,triton)",
    )
    p.add_argument(
        "--concurrency",
        help="concurrent requests per level, comma-separated, e.g. 1,2,4,8. In-process "
        "backends with KV-slot pools: each level's requests at once through one engine "
        "(max_sequences = level) vs one at a time, once, after the per-stage runs. triton: "
        "clients per level, --warmup + --runs rounds each (triton's default: "
        f"{TRITON_CONCURRENCY}; in-process levels only when given)",
    )
    p.add_argument(
        "--queries-per-video",
        type=int,
        metavar="N",
        help="in-process backends: N mr queries about the video, independent vs cached one "
        "at a time vs batched in one run_many call (once, after the per-stage runs)",
    )
    p.add_argument("--json", type=Path, help="write every sample and the summary here")
    p.add_argument("--markdown", type=Path, help="write a markdown report here")
    p.add_argument("--plot", type=Path, help="write a PNG (stage breakdown, per-token latency)")
    p.add_argument("--note", help="free text recorded with the result (conditions, purpose)")
    p.add_argument("--quick-peaks", action="store_true", help=argparse.SUPPRESS)  # tests
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(stderr=True)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(stderr=True, width=180)  # logs and CI: the wide table, unsqueezed
    argv = argv if argv is not None else sys.argv[1:]
    return run_command(
        "python -m trace_rt.bench", lambda: _main(args, console, argv), user_errors=(ValueError,)
    )


def _main(args: argparse.Namespace, console: Console, argv: list[str]) -> int:
    for flag in ("decode_steps", "runs", "repeat"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.warmup < 0 or args.repeat_gap < 0:
        raise ValueError("--warmup and --repeat-gap must be >= 0")
    batching.check_args(args.concurrency, args.queries_per_video)  # fail before measuring
    names = [n.strip() for n in args.backends.split(",") if n.strip()]
    specs, skipped = plugins.resolve(names, args.plugin)
    cfg = TraceConfig.from_dir(args.model)
    frames = cfg.num_frames if args.frames is None else args.frames
    server: dict[str, Any] | None = None
    if triton_mod.NAME in names and not any(s.name == triton_mod.NAME for s in specs):
        concurrency = triton_mod.parse_concurrency(args.concurrency or TRITON_CONCURRENCY)
        console.print(f"[bold]trace-rt bench[/bold]: checking the Triton server {args.url} …")
        server = triton_mod.check_server(args.url)  # fails fast, before any measuring
        server["concurrency"] = concurrency

    with tempfile.TemporaryDirectory(prefix="trace-rt-bench-") as tmp:
        video = args.video or synthetic_video(Path(tmp) / "synthetic.mp4")
        request = Request(
            str(video), args.task, args.query, frames, args.decode_steps, args.text_steps
        )
        info = machine.machine_info()
        rounds = [
            invocation.run_invocation(k, specs, skipped, args, cfg, request, console, server)
            for k in range(args.repeat)
        ]
        peaks = peaks_mod.best_of([r.peaks for r in rounds])
        entries, by_inv = invocation.entries_of(rounds, cfg, peaks, args.decode_steps)
        engine = batching.run_section(specs, skipped, args, request, entries, console)
        console.print("[bold]trace-rt bench[/bold]: the ffmpeg CLI on the same video …")
        ffmpeg = ffmpeg_baseline(video, cfg.preprocess, frames, runs=args.runs)
    info["load_average_end"] = list(os.getloadavg())
    config = _config(args, argv, cfg, frames, peaks, names)
    config["video"] = DESCRIPTION if args.video is None else args.video
    section = None
    if server and all(r.levels is not None for r in rounds):
        levels = triton_mod.pool_levels([r.levels for r in rounds if r.levels is not None])
        section = {**server["section"], "levels": levels}
    invocations = [r.record for r in rounds]
    doc = report.build_report(
        info, config, entries, skipped, section, by_invocation=by_inv, invocations=invocations
    )
    if engine is not None:
        # Issue 10's targets are stated for `small` on CPU, like issue 5's.
        apply = report.targets_apply(config)
        engine["targets"] = batching_report.engine_targets(engine) if apply else []
        doc["engine"] = engine
    add_ffmpeg_ratios(doc, ffmpeg)
    console.print(render.console_table(doc["backends"], _title(config), console.width))
    if peer_table.has_peers(doc["backends"]):
        console.print(peer_table.console(doc["backends"]))
    if section:
        console.print(render.triton_table(section))
    for table in batching_report.console_tables(doc.get("engine") or {}):
        console.print(table)
    for t in (doc.get("engine") or {}).get("targets", []):
        console.print(escape(batching_report.target_line(t)), highlight=False)
    for name, why in skipped.items():
        console.print(f"[yellow]skipped {name}[/yellow]: {escape(why)}")
    for line in render.notes(doc):
        console.print(escape(line), highlight=False)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(mdreport.markdown(doc))
    if args.plot:
        from trace_rt.bench.plot import plot  # matplotlib only when asked for

        plot(doc, args.plot)
    return 0


def _config(
    args: argparse.Namespace,
    argv: list[str],
    cfg: TraceConfig,
    frames: int,
    peaks: floor_mod.Peaks,
    names: list[str],
) -> dict[str, Any]:
    return {
        "command": "python -m trace_rt.bench " + shlex.join(argv),
        "note": args.note,
        "model": str(args.model),
        "model_name": args.model.name,
        "artifacts": str(args.artifacts) if args.artifacts else None,
        "backends": names,
        "plugins": args.plugin,
        "frames": frames,
        "decode_steps": args.decode_steps,
        "text_steps": args.text_steps,
        "warmup": args.warmup,
        "runs": args.runs,
        "repeat": args.repeat,
        "repeat_gap_s": args.repeat_gap,
        "task": args.task,
        "query": args.query,
        "device": args.device,
        "dtype": args.dtype,
        "peaks": peaks.to_dict(),
        "triton": {"url": args.url, "concurrency": args.concurrency},
        "model_config": {
            "hidden_size": cfg.hidden_size,
            "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads,
            "intermediate_size": cfg.intermediate_size,
            "vocab_size": cfg.vocab_size,
            "vision_hidden_size": cfg.vision.hidden_size,
            "vision_layers_used": cfg.vision_layers_used,
            "image_size": cfg.vision.image_size,
            "tokens_per_frame": cfg.tokens_per_frame,
            "decoder_params": floor_mod.decoder_params(cfg),
            "vision_params": floor_mod.vision_params(cfg),
        },
    }


def _title(config: dict[str, Any]) -> str:
    rep = config.get("repeat", 1)
    return (
        f"{config['model_name']}: {config['frames']} frames, {config['decode_steps']} decode "
        f"steps, {config['runs']} runs after {config['warmup']} warmup"
        f"{f' x {rep} invocations' if rep > 1 else ''} ({config['device']}); p50 ms"
    )
