"""``trace-rt plan`` and ``trace-rt watch``: the edge subcommands of the ``trace-rt`` CLI
(:mod:`trace_rt.cli` maps them; heavy imports happen inside each command)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from trace_rt.errors import InputError


def plan_command(args: argparse.Namespace) -> int:
    """``trace-rt plan``: memory plan, floor latencies and fitting settings for a device."""
    from trace_rt.config import TraceConfig
    from trace_rt.devices import get_device
    from trace_rt.plan import Settings, built_engines, manifest_records, plan
    from trace_rt.presets import load_preset
    from trace_rt.variants import DEFAULT_BLOCK_SIZE

    device = get_device(args.device, gbps=args.peak_gbps, tflops=args.peak_tflops)
    step, precision, built = args.decode_step, args.precision, None
    fixed = args.fixed_past
    manifest = manifest_records(args.model) if args.model is not None else {}
    if args.model is not None:
        cfg = TraceConfig.from_dir(args.model)
        built = built_engines(args.model) if device.gpu else None
        if built is not None:  # what was built decides; a contrary flag is a mistake
            has_step = "decoder_step" in built.engine_bytes
            if (
                precision not in (None, built.precision)
                or step not in (None, has_step)
                or fixed not in (None, built.fixed_past)
            ):
                kind = "fixed-past" if built.fixed_past else "with" if has_step else "without"
                raise InputError(
                    f"{args.model}: the engines are {built.precision}, {kind} the decode step"
                    "; plan without --precision/--decode-step/--fixed-past, or rebuild with "
                    "`python -m export trt`"
                )
            step, precision, fixed = has_step, built.precision, built.fixed_past
        elif step is None and not fixed:
            step = _has_decode_step(manifest)
    else:
        try:
            cfg = load_preset(args.preset)
        except ValueError as e:
            raise InputError(str(e)) from None
    height, _, width = (args.source_size or "720x1280").partition("x")
    try:
        source = (int(height), int(width))
    except ValueError:
        raise InputError(f"--source-size HxW, e.g. 720x1280; got {args.source_size!r}") from None
    precision = precision or ("int4" if device.gpu else "fp32")
    lm_head, block = args.lm_head, args.block_size
    if built is None and not device.gpu:
        if lm_head is None:
            lm_head = _artifact_lm_head(manifest, precision)
        if block is None:
            block = _artifact_block_size(manifest, precision)
    settings = Settings(
        precision=precision,
        frames=args.frames or cfg.num_frames,
        max_new_tokens=args.max_new_tokens,
        concurrency=args.concurrency,
        source_size=source,
        decode_step=bool(step) and device.gpu,
        fixed_past=bool(fixed),
        built=built,
        lm_head=None if lm_head == "float" else lm_head,
        block_size=block or DEFAULT_BLOCK_SIZE,
    )
    result = plan(cfg, device, settings)
    print(json.dumps(result, indent=2) if args.json else render_plan(result))
    return 0 if result["memory"]["fits"] else 1


def _artifact_decoder(manifest: dict[str, Any], precision: str) -> dict[str, Any]:
    """The manifest record of the decoder the onnxruntime backend runs for an int8/int4
    *precision* in an artifact (its *manifest*); {} for other precisions or no artifact."""
    from trace_rt.plan import LM_HEAD_PRECISIONS
    from trace_rt.variants import resolve_variant, variant_record

    if precision not in LM_HEAD_PRECISIONS:
        return {}
    return variant_record(manifest, resolve_variant(manifest, "onnxruntime", precision))


def _artifact_lm_head(manifest: dict[str, Any], precision: str) -> str | None:
    """How that decoder holds ``lm_head``: ``int8``/``int4``, or None (float, or none)."""
    from trace_rt.variants import recorded_head_bits

    rec = _artifact_decoder(manifest, precision)
    bits = recorded_head_bits(rec.get("weights", {}), rec.get("bits"))
    return None if bits is None else f"int{bits}"


def _artifact_block_size(manifest: dict[str, Any], precision: str) -> int | None:
    """That decoder's weights per quantisation block; None when it has none."""
    return _artifact_decoder(manifest, precision).get("block_size")


def _has_decode_step(manifest: dict[str, Any]) -> bool:
    """Whether an artifact (its *manifest*) has the fixed-shape decode step, made by
    ``python -m export step`` or built by ``export trt``."""
    engines = (manifest.get("tensorrt") or {}).get("engines", {})
    return "decode_step" in manifest or "decoder_step" in engines


def render_plan(result: dict[str, Any]) -> str:
    """The plan (:func:`trace_rt.plan.plan`) as text: memory table, verdict, floors,
    suggestions."""
    from trace_rt.plan import MARGIN

    dev, mem, fl = result["device"], result["memory"], result["floor_ms"]
    s = mem["settings"]
    gb = 1e9
    lines = [
        f"{dev['name']}: {dev['memory_gb']:g} GB ({dev['usable_gb']:g} GB usable"
        f"{', unified CPU+GPU memory' if dev['unified'] and dev['gpu'] else ''}), "
        f"{dev['gbps']:g} GB/s, {dev['tflops']:g} TFLOP/s  [{dev['source']}]",
        f"{s['precision']}, {s['frames']} frames, {s['max_new_tokens']} new tokens, "
        f"{s['concurrency']} instance(s): context {mem['positions']['context']} positions "
        f"(prompt {mem['positions']['prompt']})"
        + (", with the decode step engine" if s["decode_step"] else "")
        + (", fixed-past decoder" if s["fixed_past"] else "")
        + (f", lm_head {s['lm_head']}" if s.get("lm_head") else "")
        + (f", blocks of {s['block_size']}" if s["precision"] in ("int4", "int8") else ""),
        "",
        f"{'memory':<36}{'GB':>10}",
    ]
    for name, value in mem["items"].items():
        lines.append(f"  {name:<34}{value / gb:>10.3f}")
    if mem["per_instance_items_times"] > 1:
        lines.append(f"  (all but the process runtime x {mem['per_instance_items_times']})")
    if dev["gpu"]:
        lines.append(f"{'device total':<36}{mem['device_bytes'] / gb:>10.3f}")
        lines.append(f"{'host total':<36}{mem['host_bytes'] / gb:>10.3f}")
    counted = "device + host (unified)" if dev["unified"] else "device"
    lines.append(f"{'counted: ' + counted:<36}{mem['counted_bytes'] / gb:>10.3f}")
    if mem["weights_from"] == "engine files":
        lines.append("(weights: the built engines' files; KV and activations: their limits)")
    for reason in mem["exceeds_engines"]:
        lines.append(f"DOES NOT RUN on these engines: {reason}; rebuild with `export trt`")
    verdict = "FITS" if mem["fits"] else "DOES NOT FIT"
    if mem["exceeds_engines"]:
        verdict = "DOES NOT FIT the engines' limits; memory"
    lines.append(
        f"{verdict}: {mem['margin_bytes'] / gb:+.2f} GB left of {mem['usable_bytes'] / gb:.2f} "
        f"GB usable ({100 * mem['margin_fraction']:.0f}%; a plan fits with >= "
        f"{100 * MARGIN:.0f}% left)"
    )
    alone = result.get("without_decode_step")
    if alone is not None and not mem["fits"]:
        lines.append(
            f"without the decode step engine (export trt --no-step): "
            f"{'fits' if alone['fits'] else 'does not fit either'}, "
            f"{alone['margin_gb']:+.2f} GB left"
        )
        fixed = alone.get("fixed_past")
        if fixed is not None:
            lines.append(
                f"a fixed-past decoder instead (export trt --fixed-past, one CUDA graph per "
                f"step too): {'fits' if fixed['fits'] else 'does not fit'}, "
                f"{fixed['margin_gb']:+.2f} GB left"
            )
    lines += ["", "floor latency (roofline, data-sheet peaks; real runs are slower):"]
    for stage in ("vision", "projector", "prefill", "ttft", "decode_step", "end_to_end"):
        lines.append(f"  {stage:<14}{fl[stage]:>12.1f} ms")
    lines.append(f"  {'decode':<14}{fl['decode_tokens_per_s']:>12.1f} tokens/s at most")
    lines += ["", "settings that fit (per precision, the most frames then tokens; best first):"]
    if not result["suggestions"]:
        lines.append("  none: this model does not fit this device at any setting tried")
    for sug in result["suggestions"]:
        lines.append(
            f"  {sug['precision']:<5} {sug['frames']:>4} frames {sug['max_new_tokens']:>5} tokens"
            f"  {sug['counted_gb']:>7.2f} GB ({sug['margin_gb']:+.2f} left)"
            f"  <= {sug['decode_tokens_per_s_floor']:.0f} tok/s"
        )
    return "\n".join(lines)


def add_plan_parser(sub: argparse._SubParsersAction) -> None:
    from trace_rt.devices import DEVICES
    from trace_rt.plan import LM_HEAD_PRECISIONS, PRECISIONS
    from trace_rt.variants import BLOCK_SIZES

    p = sub.add_parser(
        "plan",
        help="will a model fit a device: memory plan, floor latency, settings that fit",
        description="Memory per item (weights per graph, KV cache, activations and TensorRT "
        "workspace, video buffers, runtime), whether it fits with a 10%% margin, the floor "
        "latency of each stage from the device's bandwidth and FLOP rate, and the best "
        "settings that fit. For an artifact with TensorRT engines (on a GPU device): what "
        "the backend allocates for them (engine files, KV and activations at the build's "
        "--max-seq/--max-frames). Exit status 0: fits; 1: does not fit.",
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
    p.add_argument(
        "--lm-head",
        choices=["float", *LM_HEAD_PRECISIONS],
        help="lm_head of an int8/int4 decoder (`export quantize --lm-head`; `export optimize` "
        "makes int8). Default: as the artifact's decoder for --precision holds it, else float",
    )
    p.add_argument(
        "--block-size",
        type=int,
        choices=BLOCK_SIZES,
        help="weights per quantisation block of an int4/int8 decoder (`export quantize "
        "--block-size`). Default: the artifact's decoder for --precision, else 32",
    )
    p.add_argument("--max-new-tokens", type=int, default=512, help="token budget (512)")
    p.add_argument("--concurrency", type=int, default=1, help="pipeline instances (1)")
    p.add_argument("--source-size", metavar="HxW", help="decoded video size (720x1280)")
    p.add_argument(
        "--decode-step",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="count the TensorRT decode step engine (one CUDA graph per step; a second copy "
        "of the decoder's weights). Default: when --model has one (`export step`)",
    )
    p.add_argument(
        "--fixed-past",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a fixed-past decoder (`export trt --fixed-past`: the step graph is the one "
        "decoder engine; its prefill scores the whole cache). Default: as --model was built",
    )
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
        timestamps=args.timestamps,
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
                timestamp_mode=args.timestamps,
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
    p.add_argument(
        "--task",
        choices=["dvc", "mr", "vhd"],
        help="dvc: dense captions; mr, vhd: moment retrieval, highlights (need --query)",
    )
    p.add_argument("--query", help="the sentence to localise (mr, vhd)")
    p.add_argument("--question", help="a free question instead of a task")
    p.add_argument("--window", type=float, default=10.0, help="window length, s (10)")
    p.add_argument("--stride", type=float, default=5.0, help="window start spacing, s (5)")
    p.add_argument("--frames", type=int, help="frames per window (default: the model's)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="token budget (256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--constrained", action="store_true", help="well-formed numbers only")
    p.add_argument(
        "--timestamps",
        choices=["free", "frames"],
        default="free",
        help="free: any timestamp within the window; frames: only its sampled frames' times",
    )
    p.add_argument(
        "--backend",
        choices=sorted(BACKENDS),
        help="default: from the model directory (manifest.json: onnxruntime; checkpoint: torch)",
    )
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
