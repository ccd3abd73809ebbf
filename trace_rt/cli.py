"""The ``trace-rt`` command line: one entry, subcommands mapped to typed functions."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from trace_rt.errors import InputError, TraceError

TASK_HELP = (
    "dvc: dense video captioning; mr: moment retrieval (needs --query); "
    "vhd: highlight detection (needs --query)"
)


def run(
    video: str,
    model: Path,
    *,
    task: str | None = "dvc",
    query: str | None = None,
    question: str | None = None,
    frames: int | None = None,
    max_new_tokens: int = 512,
    backend: str = "torch",
    device: str = "cpu",
    dtype: str | None = None,
    constrained: bool = False,
    seed: int = 0,
    temperature: float = 0.0,
    top_p: float = 1.0,
    template: str = "llama_2",
    prompts: Path | None = None,
    quant: str | None = None,
) -> dict:
    """``trace-rt run``: one video, one request, the result as a JSON-ready dict."""
    from trace_rt.generate import GenerationConfig
    from trace_rt.pipeline import Pipeline

    # Settings are checked before the (slow) model load, so a typo fails fast.
    gen = GenerationConfig(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        constrained=constrained,
    )
    # The artifact fixes an onnxruntime model's dtype; --device picks its execution provider.
    options = {"device": device, "dtype": dtype} if backend == "torch" else {"device": device}
    if quant is not None:
        if not backend.startswith("onnxruntime"):
            raise InputError(f"--quant picks an onnxruntime decoder variant; not for {backend!r}")
        options["decoder_variant"] = quant
    pipe = Pipeline.from_dir(model, backend, prompts_file=prompts, template=template, **options)
    return pipe.run(video, task, query=query, question=question, frames=frames, gen=gen)


def serve(
    repo: Path,
    *,
    host: str = "127.0.0.1",
    grpc_port: int = 8001,
    http_port: int = 8000,
    metrics_port: int = 8002,
    log_file: Path | None = None,
    timeout: float = 300.0,
) -> int:
    """``trace-rt serve``: run tritonserver on *repo* until Ctrl-C (or SIGTERM)."""
    import signal

    from trace_rt.serving.server import ServerError, TritonServer

    server = TritonServer(
        repo,
        host=host,
        grpc_port=grpc_port,
        http_port=http_port,
        metrics_port=metrics_port,
        log_file=log_file,
    )
    # SIGTERM (docker stop, systemd) stops the server as cleanly as Ctrl-C does; SIGINT is
    # set explicitly because a shell starts background jobs with it ignored.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        print(f"starting tritonserver on {repo} (log: {server.log_file}) ...", file=sys.stderr)
        server.start(timeout=timeout)
        print(
            f"ready: gRPC {server.grpc_url}  HTTP {server.http_url}  "
            f"metrics {server.metrics_url}\nCtrl-C stops the server.",
            file=sys.stderr,
            flush=True,
        )
        code = server.proc.wait() if server.proc is not None else 1
        raise ServerError(f"tritonserver exited with code {code}:\n{server.log_tail()}")
    except KeyboardInterrupt:
        print("stopping tritonserver ...", file=sys.stderr)
        return 0
    finally:
        server.close()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def client(
    video: str,
    url: str,
    *,
    task: str | None = "dvc",
    query: str | None = None,
    question: str | None = None,
    stream: bool = False,
    indent: int | None = None,
    **params: object,
) -> dict:
    """``trace-rt client``: send *video* to a server over gRPC; returns the final result.

    With *stream*, each event is printed (one JSON line) as soon as it arrives.
    """
    from trace_rt.serving.client import TraceClient, check_url

    def show(event: dict) -> None:
        print(json.dumps({"event": event}), flush=True)

    path = Path(video)
    if not path.is_file():
        raise InputError(f"video file not found: {video}")
    with TraceClient(check_url(url)) as c:
        return c.infer(
            path,
            task=task,
            query=query,
            question=question,
            on_event=show if stream else None,
            **params,
        )


def plan_command(args: argparse.Namespace) -> int:
    """``trace-rt plan``: memory plan, floor latencies and fitting settings for a device."""
    from trace_rt.config import TraceConfig
    from trace_rt.devices import get_device
    from trace_rt.plan import Settings, plan, render
    from trace_rt.presets import load_preset

    if args.model is not None:
        cfg = TraceConfig.from_dir(args.model)
    else:
        try:
            cfg = load_preset(args.preset)
        except ValueError as e:
            raise InputError(str(e)) from None
    device = get_device(args.device, gbps=args.peak_gbps, tflops=args.peak_tflops)
    height, _, width = (args.source_size or "720x1280").partition("x")
    try:
        source = (int(height), int(width))
    except ValueError:
        raise InputError(f"--source-size HxW, e.g. 720x1280; got {args.source_size!r}") from None
    settings = Settings(
        precision=args.precision or ("int4" if device.gpu else "fp32"),
        frames=args.frames or cfg.num_frames,
        max_new_tokens=args.max_new_tokens,
        concurrency=args.concurrency,
        source_size=source,
    )
    result = plan(cfg, device, settings)
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0 if result["memory"]["fits"] else 1


def add_plan_parser(sub: argparse._SubParsersAction) -> None:
    from trace_rt.devices import DEVICES
    from trace_rt.plan import PRECISIONS

    p = sub.add_parser(
        "plan",
        help="will a model fit a device: memory plan, floor latency, settings that fit",
        description="Memory per item (weights per graph, KV cache, activations and TensorRT "
        "workspace, video buffers, runtime), whether it fits with a 10%% margin, the floor "
        "latency of each stage from the device's bandwidth and FLOP rate, and the best "
        "settings that fit. Exit status 0: fits; 1: does not fit.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, help="checkpoint or artifact directory")
    src.add_argument("--preset", help="a preset: tiny, small, trace-7b")
    p.add_argument(
        "--device",
        required=True,
        choices=["cpu", *DEVICES],
        help="target (cpu: this machine, onnxruntime backend)",
    )
    p.add_argument("--frames", type=int, help="frames per request (default: the model's)")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="decoder weights (default: int4 on GPUs and Jetsons, fp32 on cpu)",
    )
    p.add_argument("--max-new-tokens", type=int, default=512, help="token budget (512)")
    p.add_argument("--concurrency", type=int, default=1, help="pipeline instances (1)")
    p.add_argument("--source-size", metavar="HxW", help="decoded video size (720x1280)")
    p.add_argument("--peak-gbps", type=float, help="cpu: bandwidth instead of measuring it")
    p.add_argument("--peak-tflops", type=float, help="cpu: FLOP rate instead of measuring it")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def watch_command(args: argparse.Namespace) -> int:
    """``trace-rt watch``: events of each sliding window of a live source, one JSON line each."""
    from trace_rt.config import TraceConfig
    from trace_rt.generate import GenerationConfig
    from trace_rt.preprocess import preprocess_frames
    from trace_rt.watch import run_watch

    task = args.task or (None if args.question else "dvc")
    gen = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
        constrained=args.constrained,
    )
    cfg = TraceConfig.from_dir(args.model)
    n_frames = args.frames or cfg.num_frames
    common = {"task": task, "query": args.query, "question": args.question}
    if args.url:
        from trace_rt.serving.client import TraceClient, check_url

        client = TraceClient(check_url(args.url))

        def infer(frames, times, duration):
            pixels = preprocess_frames(frames, cfg.preprocess)
            return client.infer(
                frames=pixels,
                timestamps=times,
                duration=duration,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                seed=args.seed,
                constrained=args.constrained or None,
                **common,
            )
    else:
        from trace_rt.pipeline import Pipeline

        pipe = Pipeline.from_dir(args.model, args.backend, device=args.device)

        def infer(frames, times, duration):
            pixels = preprocess_frames(frames, cfg.preprocess)
            req = pipe.prepare_frames(pixels, times, duration=duration, gen=gen, **common)
            return pipe.run_prepared(req, gen)

    # Check the request once before the source opens, so a missing query fails fast.
    if task in ("mr", "vhd") and not args.query:
        raise InputError(f"missing query (task {task!r} needs --query)")
    status = run_watch(
        args.source,
        infer,
        window=args.window,
        stride=args.stride,
        n_frames=n_frames,
        realtime=args.realtime,
        drop=None if args.on_behind == "auto" else args.on_behind == "drop",
        timeout=args.timeout,
        max_windows=args.max_windows,
    )
    return 0 if status["end"] in ("stream ended",) or status["end"].startswith("stopped") else 1


def add_watch_parser(sub: argparse._SubParsersAction) -> None:
    from trace_rt.backends import BACKENDS

    p = sub.add_parser(
        "watch",
        help="run TRACE over a camera, a live stream or a file, window by window",
        description="Cut the source into windows of --window seconds every --stride seconds "
        "and print each window's events as one JSON line (stream times and wall clock). "
        "SOURCE: /dev/videoN (V4L2), rtsp:// http(s):// tcp:// udp:// srt:// streams (the "
        "only place trace-rt reads video from the network), or a file (--realtime plays it "
        "at its own speed). When inference falls behind a live source, windows are dropped "
        "and reported, never queued without bound.",
    )
    p.add_argument("source", help="camera device, stream URL or video file")
    p.add_argument("--model", required=True, type=Path, help="checkpoint or artifact directory "
                   "(with --url: only its preprocessing config is read)")  # fmt: skip
    p.add_argument("--task", choices=["dvc", "mr", "vhd"], help=TASK_HELP)
    p.add_argument("--query", help="the sentence to localise (mr, vhd)")
    p.add_argument("--question", help="a free question instead of a task")
    p.add_argument("--window", type=float, default=10.0, help="window length, s (10)")
    p.add_argument("--stride", type=float, default=5.0, help="window start spacing, s (5)")
    p.add_argument("--frames", type=int, help="frames per window (default: the model's)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="token budget (256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--constrained", action="store_true", help="well-formed numbers only")
    p.add_argument("--backend", choices=sorted(BACKENDS), default="onnxruntime")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--url", help="send windows to a `trace-rt serve` server (HOST:PORT)")
    p.add_argument("--realtime", action="store_true", help="play a file at its own speed")
    p.add_argument(
        "--on-behind",
        choices=["auto", "drop", "wait"],
        default="auto",
        help="when inference is slower than the source: drop windows (auto: for cameras, "
        "streams and --realtime files) or wait (files)",
    )
    p.add_argument("--timeout", type=float, default=10.0, help="seconds a stream may stall (10)")
    p.add_argument("--max-windows", type=int, help="stop after this many windows")


def build_parser() -> argparse.ArgumentParser:
    from trace_rt import __version__
    from trace_rt.backends import BACKENDS

    parser = argparse.ArgumentParser(
        prog="trace-rt",
        description="Run TRACE, a video LLM that finds when things happen in a video.",
    )
    parser.add_argument("--version", action="version", version=f"trace-rt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "run",
        help="answer one request on one video and print the result as JSON",
        description="Decode and sample the video, run TRACE's interleaved time/score/text "
        "decoding and print one JSON object with the events, ids and timings.",
    )
    p.add_argument("video", help="video file (anything PyAV/FFmpeg can open)")
    p.add_argument("--model", required=True, type=Path, help="checkpoint or artifact directory")
    p.add_argument("--task", choices=["dvc", "mr", "vhd"], help=TASK_HELP)
    p.add_argument("--query", help="the sentence to localise (mr, vhd)")
    p.add_argument("--question", help="a free question instead of a task")
    p.add_argument("--frames", type=int, help="frames to sample (default: the model's num_frames)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="token budget (default 512)")
    p.add_argument("--backend", choices=sorted(BACKENDS), default="torch")
    p.add_argument(
        "--quant",
        metavar="VARIANT",
        help="onnxruntime: run a quantised decoder made by `python -m export quantize` "
        "(int4, int8, int4-qdq, int8-qdq)",
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
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument(
        "--template",
        choices=["llama_2", "mistral_instruct"],
        default="llama_2",
        help="chat template (llama_2: the release's evaluation prompt)",
    )
    p.add_argument("--prompts", type=Path, help="JSON file overriding system text and questions")
    p.add_argument("--indent", type=int, default=None, help="indent the JSON output")

    p = sub.add_parser(
        "serve",
        help="serve a model repository with Triton Inference Server (gRPC, HTTP, metrics)",
        description="Start tritonserver (the binary bundled in nvidia-pytriton) on a "
        "repository from `python -m triton_repo build`, wait until every model is ready, "
        "print the endpoints and serve until Ctrl-C.",
    )
    p.add_argument("--repo", required=True, type=Path, help="the model repository")
    p.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default 8001)")
    p.add_argument("--http-port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--metrics-port", type=int, default=8002, help="metrics port (default 8002)")
    p.add_argument("--log-file", type=Path, help="tritonserver's log (default: a temp file)")
    p.add_argument(
        "--timeout", type=float, default=300.0, help="seconds to wait for readiness (300)"
    )

    p = sub.add_parser(
        "client",
        help="send a video to a `trace-rt serve` server over gRPC and print the result",
        description="Send the video's bytes to the server's trace_pipeline model over "
        "gRPC; prints the final `trace-rt run` JSON (with --stream, each event first, as "
        "it arrives).",
    )
    p.add_argument("video", help="local video file (its bytes are sent)")
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
    p.add_argument("--indent", type=int, default=None, help="indent the JSON output")

    add_plan_parser(sub)
    add_watch_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            # No task: a free --question if given, else dense captioning.
            task = args.task or (None if args.question else "dvc")
            result = run(
                args.video,
                args.model,
                task=task,
                query=args.query,
                question=args.question,
                frames=args.frames,
                max_new_tokens=args.max_new_tokens,
                backend=args.backend,
                device=args.device,
                dtype=args.dtype,
                constrained=args.constrained,
                seed=args.seed,
                temperature=args.temperature,
                top_p=args.top_p,
                template=args.template,
                prompts=args.prompts,
                quant=args.quant,
            )
            print(json.dumps(result, indent=args.indent))
        elif args.command == "serve":
            return serve(
                args.repo,
                host=args.host,
                grpc_port=args.grpc_port,
                http_port=args.http_port,
                metrics_port=args.metrics_port,
                log_file=args.log_file,
                timeout=args.timeout,
            )
        elif args.command == "client":
            result = client(
                args.video,
                args.url,
                task=args.task or (None if args.question else "dvc"),
                query=args.query,
                question=args.question,
                stream=args.stream,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                seed=args.seed,
                constrained=args.constrained or None,
            )
            print(json.dumps(result, indent=args.indent))
        elif args.command == "plan":
            return plan_command(args)
        elif args.command == "watch":
            return watch_command(args)
    except TraceError as e:
        print(f"trace-rt: error: {e}", file=sys.stderr)
        return 2
    return 0
