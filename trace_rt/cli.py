"""The ``trace-rt`` command line: one entry, subcommands mapped to typed functions."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from trace_rt.batch import add_batch_parser, batch_command
from trace_rt.cliutil import Parser, run_command
from trace_rt.edge_cli import add_plan_parser, add_watch_parser, plan_command, watch_command
from trace_rt.errors import InputError
from trace_rt.prompts import CUSTOM_TASK
from trace_rt.run_api import run, run_many, run_questions
from trace_rt.serving.remote import add_fetch_parser, add_repository_args, fetch_command

TASK_HELP = (
    "dvc: dense video captioning; mr: moment retrieval (needs --query); "
    "vhd: highlight detection (needs --query); custom: a free --question "
    "(default: custom with --question, else dvc)"
)


def serve(
    repo: str | Path,
    *,
    host: str = "127.0.0.1",
    grpc_port: int = 8001,
    http_port: int = 8000,
    metrics_port: int = 8002,
    log_file: Path | None = None,
    timeout: float = 300.0,
    admin_key: str | None = None,
    log_format: str = "text",
    drain_timeout: float = 30.0,
    cache_dir: Path | None = None,
) -> int:
    """``trace-rt serve``: run tritonserver on *repo* (a directory, or a URL fetched into
    *cache_dir* first: :mod:`trace_rt.serving.remote`) until Ctrl-C (or SIGTERM: drained,
    see :mod:`trace_rt.serving.podlog`)."""
    import math
    import signal

    from trace_rt.serving.podlog import LogFollower, ServeLog, drain
    from trace_rt.serving.remote import resolve_repository
    from trace_rt.serving.server import (
        ADMIN_HEADER,
        ADMIN_KEY_ENV,
        GRPC_ADMIN_HEADER,
        ServerError,
        TritonServer,
        is_loopback,
    )

    admin_key = admin_key or os.environ.get(ADMIN_KEY_ENV) or None
    log = ServeLog(log_format)
    repo = resolve_repository(repo, cache_dir, log=log)
    server = TritonServer(
        repo,
        host=host,
        grpc_port=grpc_port,
        http_port=http_port,
        metrics_port=metrics_port,
        log_file=log_file,
        admin_key=admin_key,
        exit_timeout=max(1, math.ceil(drain_timeout)),
    )
    follower = LogFollower(server.log_file, log) if log.json else None
    if not is_loopback(host):
        log(
            f"listening on {host}: anyone who can reach these ports can "
            "send requests, unauthenticated and unencrypted. Put a TLS-terminating, "
            "authenticating proxy in front, or bind 127.0.0.1 (README: Serving, security).",
            "warning",
        )
    admin = (
        f"admin APIs need the admin key (HTTP header {ADMIN_HEADER}, gRPC metadata "
        f"{GRPC_ADMIN_HEADER})"
        if admin_key
        else "admin APIs (shared memory, model control, trace, log settings) are off"
    )
    # SIGTERM (docker stop, systemd) stops the server as cleanly as Ctrl-C does; SIGINT is
    # set explicitly because a shell starts background jobs with it ignored.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        log(f"starting tritonserver on {repo} (log: {server.log_file}) ...")
        if follower is not None:
            server.log_file.write_bytes(b"")  # as the server will: no old lines replayed
            follower.start()
        server.start(timeout=timeout)
        ready = (
            f"ready: gRPC {server.grpc_url}  HTTP {server.http_url}  metrics {server.metrics_url}"
        )
        if log.json:
            log(ready, grpc=server.grpc_url, http=server.http_url, metrics=server.metrics_url)
            log(admin)
        else:
            log(f"{ready}\n{admin}\nCtrl-C stops the server.")
        code = server.proc.wait() if server.proc is not None else 1
        raise ServerError(f"tritonserver exited with code {code}:\n{server.log_tail()}")
    except KeyboardInterrupt:
        return 0 if drain(server, log, drain_timeout) else 1
    finally:
        server.close()
        if follower is not None:
            follower.stop()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def client(
    video: str | None,
    url: str,
    *,
    video_id: str | None = None,
    task: str | None = "dvc",
    query: str | None = None,
    question: str | None = None,
    stream: bool = False,
    indent: int | None = None,
    **params: object,
) -> dict:
    """``trace-rt client``: send *video* (or the *video_id* of an earlier response) to a
    server over gRPC; returns the final result.

    With *stream*, each event is printed (one JSON line) as soon as it arrives.
    """
    from trace_rt.serving.client import TraceClient, check_url

    def show(event: dict) -> None:
        print(json.dumps({"event": event}), flush=True)

    from trace_rt.serving.client import check_video_file

    if (video is None) == (video_id is None):
        raise InputError("give either a video file or --video-id ID (from an earlier result)")
    if video is not None:
        check_video_file(video)  # a directory, pipe or unreadable file: say so, send nothing
    with TraceClient(check_url(url)) as c:
        return c.infer(
            video,
            video_id=video_id,
            task=task,
            query=query,
            question=question,
            on_event=show if stream else None,
            **params,
        )


def _add_run_parser(sub: argparse._SubParsersAction, backends: list[str]) -> None:
    p = sub.add_parser(
        "run",
        help="answer one request on one video and print the result as JSON",
        description="Decode and sample the video, run TRACE's interleaved time/score/text "
        "decoding and print one JSON object with the events, ids and timings.",
    )
    p.add_argument(
        "video",
        help="video file (mp4/mov, mkv/webm, avi, ts, mpeg-ps, flv, ogg, gif, raw h264/hevc), "
        "a named pipe, or - to read the video from standard input",
    )
    p.add_argument("--model", required=True, type=Path, help="checkpoint or artifact directory")
    p.add_argument(
        "--task",
        action="append",
        choices=["dvc", "mr", "vhd", CUSTOM_TASK],
        help=TASK_HELP + ". Repeat it to ask several things about the video in one call",
    )
    p.add_argument(
        "--query",
        action="append",
        help="the sentence to localise (mr, vhd). Repeat it for several queries about the "
        "same video: the video is encoded and prefilled once, and one JSON result per "
        "question is printed, one per line",
    )
    p.add_argument(
        "--question",
        help="a free question instead of a task (task custom; the result's `answer` is the "
        "first event's caption)",
    )
    p.add_argument("--frames", type=int, help="frames to sample (default: the model's num_frames)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="token budget")
    p.add_argument(
        "--backend",
        choices=backends,
        help="default: from the model directory (artifact directory with manifest.json: "
        "onnxruntime; checkpoint: torch)",
    )
    p.add_argument(
        "--quant",
        metavar="VARIANT",
        help="onnxruntime: run a decoder variant made by `python -m export quantize` "
        "(int4, int8, int4-qdq, int8-qdq) or `python -m export optimize` (fused, contrib, "
        "fused-int4, ...); int4/int8 run the fastest variant of that precision where "
        "`optimize` measured one (e.g. fused-int4); `portable`: decoder.onnx even where "
        "the manifest names a faster default",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="cpu or cuda[:N] (torch device; onnxruntime: CPU or CUDA execution provider, or auto)",
    )
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="torch compute dtype")
    p.add_argument(
        "--constrained",
        action="store_true",
        help="time/score heads may only emit well-formed numbers within the video",
    )
    _timestamps_arg(p, "the model card's, else free")
    p.add_argument(
        "--preset",
        metavar="CARD",
        help="the model card of a released checkpoint (trace, trace-uni, trace-retrieval, "
        "trace-ft-*): its template, frames and timestamps mode become the defaults "
        "(default: the card the checkpoint's config.json names, if any)",
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument(
        "--template",
        choices=["llama_2", "mistral_instruct"],
        help="chat template (default: the model card's, else llama_2, the release's "
        "evaluation prompt)",
    )
    p.add_argument(
        "--prompts",
        type=Path,
        help="JSON file of system text and questions (default: the model's own prompts.json, "
        "where training left one, else the release's strings)",
    )
    p.add_argument(
        "--resize",
        choices=["exact", "fast"],
        default="exact",
        help="frames to the model's size: exact (the release's Pillow bicubic bit for bit: "
        "the same ids as the original code) or fast (libswscale while converting from YUV: "
        "several times faster and lighter on large videos, pixels within a few levels) "
        "(default: %(default)s)",
    )
    p.add_argument("--indent", type=int, default=None, help="indent the JSON output")
    _report_args(p)


def build_parser() -> argparse.ArgumentParser:
    from trace_rt import __version__
    from trace_rt.backends import BACKENDS

    parser = Parser(
        prog="trace-rt",
        description="Run TRACE, a video LLM that finds when things happen in a video.",
    )
    parser.add_argument("--version", action="version", version=f"trace-rt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    _add_run_parser(sub, sorted(BACKENDS))

    p = sub.add_parser(
        "serve",
        help="serve a model repository with Triton Inference Server (gRPC, HTTP, metrics)",
        description="Start tritonserver (the binary bundled in nvidia-pytriton) on a "
        "repository from `python -m triton_repo build`, wait until every model is ready, "
        "print the endpoints and serve until Ctrl-C.",
    )
    add_repository_args(p)
    p.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default 8001)")
    p.add_argument("--http-port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--metrics-port", type=int, default=8002, help="metrics port (default 8002)")
    p.add_argument("--log-file", type=Path, help="tritonserver's log (default: a temp file)")
    p.add_argument(
        "--log-format",
        choices=["text", "json"],
        default="text",
        help="json: every stderr line a JSON object, tritonserver's log included (for pods)",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM/Ctrl-C: new requests are refused at once and running ones get this "
        "many seconds to finish before the server exits (keep it under the pod's "
        "terminationGracePeriodSeconds)",
    )
    p.add_argument(
        "--timeout", type=float, default=300.0, help="seconds to wait for readiness (300)"
    )
    p.add_argument(
        "--admin-key",
        help="enable Triton's admin APIs (shared-memory registration, model control, trace "
        "and log settings) for requests that carry it (HTTP header admin-key, gRPC metadata "
        "triton-grpc-protocol-admin-key; default: $TRACE_RT_ADMIN_KEY; unset: those APIs are "
        "refused)",
    )

    p = sub.add_parser(
        "client",
        help="send a video to a `trace-rt serve` server over gRPC and print the result",
        description="Send the video's bytes (or the video_id of an earlier result, whose "
        "encoded video the server has cached) to the server's trace_pipeline model over "
        "gRPC; prints the final `trace-rt run` JSON (with --stream, each event first, as "
        "it arrives).",
    )
    p.add_argument("video", nargs="?", help="local video file (its bytes are sent)")
    p.add_argument(
        "--video-id",
        metavar="ID",
        help="instead of a file: the video_id of an earlier result (the server answers from "
        "its video cache; an evicted id is an error asking for the file again)",
    )
    p.add_argument(
        "--url", default="127.0.0.1:8001", help="gRPC endpoint HOST:PORT (default %(default)s)"
    )
    p.add_argument("--task", choices=["dvc", "mr", "vhd"], help=TASK_HELP)
    p.add_argument("--query", help="the sentence to localise (mr, vhd)")
    p.add_argument("--question", help="a free question instead of a task")
    p.add_argument("--stream", action="store_true", help="print events as they stream in")
    p.add_argument("--max-new-tokens", type=int, help="token budget (server default if unset)")
    p.add_argument("--temperature", type=float, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, help="sampling seed")
    p.add_argument("--constrained", action="store_true", help="well-formed numbers only")
    _timestamps_arg(p, "free")
    p.add_argument("--indent", type=int, default=None, help="indent the JSON output")
    _report_args(p)
    add_plan_parser(sub)
    add_watch_parser(sub)
    add_batch_parser(sub)
    add_fetch_parser(sub)
    _add_eval_parser(sub)
    return parser


def _timestamps_arg(p: argparse.ArgumentParser, default_note: str) -> None:
    p.add_argument(
        "--timestamps",
        choices=["free", "frames"],
        help="free: any timestamp within the video; frames: only the sampled frames' times "
        f"(dddd.d, what trace-retrieval was trained to emit; default: {default_note})",
    )


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--report",
        type=Path,
        metavar="HTML",
        help="also write a self-contained HTML timeline of the answer (frames, events, "
        "player) to this file",
    )
    p.add_argument(
        "--embed-video",
        action="store_true",
        help="with --report: put the video inside the page (files up to 16 MiB); by "
        "default the page plays the video only when it sits next to the page",
    )


def _first(value: list[str] | str | None) -> str | None:
    """An option given once (``client``) or repeatable (``run``): its first value."""
    return value[0] if isinstance(value, list) else value


def _write_report(args: argparse.Namespace, result: dict, backend: str) -> None:
    """--report: the timeline page of *result* (thumbnails decoded from the local video)."""
    if args.report is None:
        return
    from trace_rt.timeline import write_report

    request = {
        "task": result.get("task"),
        "query": result.get("query", _first(args.query)),
        "question": args.question,
        "model": str(getattr(args, "model", "") or ""),
        "backend": backend,
    }
    # Standard input was consumed by the request: that page has no filmstrip or player.
    video = None if args.video == "-" else args.video
    out = write_report(
        args.report, result, video=video, request=request, embed_video=args.embed_video
    )
    print(f"trace-rt: report written to {out}", file=sys.stderr)


def _add_eval_parser(sub: argparse._SubParsersAction) -> None:
    # Listed here for `trace-rt --help`; main() hands `eval ...` to its own parser.
    sub.add_parser(
        "eval",
        help="run a benchmark (charades-sta, qvhighlights, youcook2, activitynet-captions, "
        "coco-format, mvbench, videomme) and score it with the original's metrics; "
        "`eval score` scores only",
        add_help=False,
    )


def _eval(argv: list[str]) -> int:
    from trace_rt.evaluation.cli import main as eval_main

    return eval_main(argv)


def _run_command(args: argparse.Namespace) -> int:
    questions = run_questions(args.task, args.query, args.question)
    options = {
        "frames": args.frames,
        "max_new_tokens": args.max_new_tokens,
        "backend": args.backend,
        "device": args.device,
        "dtype": args.dtype,
        "constrained": args.constrained,
        "timestamps": args.timestamps,
        "seed": args.seed,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "template": args.template,
        "prompts": args.prompts,
        "quant": args.quant,
        "preset": args.preset,
        "resize": args.resize,
    }
    if len(questions) == 1:
        q = questions[0]
        results = [
            run(args.video, args.model, task=q.task, query=q.query, question=q.question, **options)
        ]
    else:
        results = run_many(args.video, args.model, questions, **options)
    for result in results:
        print(json.dumps(result, indent=args.indent))
    if args.report is not None and len(results) > 1:
        print("trace-rt: --report shows the first question's result", file=sys.stderr)
    _write_report(args, results[0], args.backend or "from the model directory")
    return 0


def _serve_command(args: argparse.Namespace) -> int:
    return serve(
        args.repo,
        host=args.host,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        log_file=args.log_file,
        timeout=args.timeout,
        admin_key=args.admin_key,
        log_format=args.log_format,
        drain_timeout=args.drain_timeout,
        cache_dir=args.cache_dir,
    )


def _client_command(args: argparse.Namespace) -> int:
    result = client(
        args.video,
        args.url,
        video_id=args.video_id,
        task=args.task or (None if args.question else "dvc"),
        query=args.query,
        question=args.question,
        stream=args.stream,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        constrained=args.constrained or None,
        timestamp_mode=args.timestamps,
    )
    print(json.dumps(result, indent=args.indent))
    _write_report(args, result, f"trace-rt serve at {args.url}")
    return 0


COMMANDS = {
    "run": _run_command,
    "serve": _serve_command,
    "client": _client_command,
    "plan": plan_command,
    "watch": watch_command,
    "batch": batch_command,
    "fetch-repo": fetch_command,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["eval"]:
        return _eval(argv[1:])
    args = build_parser().parse_args(argv)
    return run_command("trace-rt", lambda: COMMANDS[args.command](args))
