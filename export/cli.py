"""``python -m export``: subcommands mapped to typed functions."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from trace_rt.cliutil import Parser, run_command
from trace_rt.errors import InputError
from trace_rt.variants import BLOCK_SIZES, DEFAULT_BLOCK_SIZE

PROG = "python -m export"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=PROG, description="Export a TRACE checkpoint to deployable graphs.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "onnx",
        help="write an artifact directory with the vision-encoder, projector and decoder graphs",
        description="Export CKPT to ONNX graphs plus manifest.json, config and tokenizer in "
        "OUT; load the result with `trace-rt run VIDEO --model OUT --backend onnxruntime`.",
    )
    p.add_argument("checkpoint", type=Path, help="HF-format TRACE checkpoint directory")
    p.add_argument("out", type=Path, help="artifact directory to write")
    p.add_argument(
        "--dtype",
        choices=["fp32", "fp16", "bf16"],
        default="fp32",
        help="graph dtype (bf16: for TensorRT/CUDA; the onnxruntime backend refuses it)",
    )
    # onnx_export.DEFAULT_OPSET, not imported here: that module loads torch.
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (TensorRT 10 parses 9..20)")
    p.add_argument("--no-progress", action="store_true", help="no progress display")
    _add_stream_args(p)

    q = sub.add_parser(
        "quantize",
        help="add weight-only int4/int8/fp8 decoder variants to an artifact directory",
        description="Write decoder.int{4,8}.onnx (onnxruntime MatMulNBits) and "
        "decoder.int{4,8}.qdq.onnx (DequantizeLinear+MatMul, for TensorRT), or with --fp8 "
        "decoder.fp8.qdq.onnx (float8 E4M3FN weights, for `export trt --fp8`), into OUT and "
        "record them in its manifest; run one with "
        "`trace-rt run ... --backend onnxruntime --quant int4`.",
    )
    q.add_argument("out", type=Path, help="artifact directory written by `python -m export onnx`")
    bits = q.add_mutually_exclusive_group(required=True)
    bits.add_argument("--int4", dest="bits", action="store_const", const=4, help="4-bit weights")
    bits.add_argument("--int8", dest="bits", action="store_const", const=8, help="8-bit weights")
    bits.add_argument(
        "--fp8",
        dest="bits",
        action="store_const",
        const="fp8",
        help="float8 E4M3FN weights per output channel (QDQ form only, for TensorRT)",
    )
    _add_quant_settings(q)
    q.add_argument(
        "--forms",
        default=None,
        help="comma-separated: nbits (onnxruntime), qdq (TensorRT), dynamic (int8 only); "
        "default nbits,qdq (qdq for --fp8)",
    )
    _add_optimize_parser(sub)
    _add_trt_parser(sub)
    h = sub.add_parser(
        "hf-llm",
        help="write the checkpoint's LLM as a plain HF Mistral directory (for other engines)",
        description="Write CKPT's decoder (text embeddings, layers, norm, lm_head) and "
        "tokenizer to OUT as a MistralForCausalLM directory: what onnxruntime-genai's model "
        "builder, llama.cpp's convert_hf_to_gguf.py and transformers take. The TRACE heads, "
        "towers and vision parts are left out.",
    )
    h.add_argument("checkpoint", type=Path, help="HF-format TRACE checkpoint directory")
    h.add_argument("out", type=Path, help="directory to write")
    h.add_argument(
        "--dtype", choices=["fp32", "fp16", "bf16"], help="default: the checkpoint's torch_dtype"
    )
    from export.atc import add_atc_parser  # Ascend ATC variants (export/atc.py)

    add_atc_parser(sub)
    return parser


def _add_stream_args(p: argparse.ArgumentParser) -> None:
    stream = p.add_mutually_exclusive_group()
    stream.add_argument(
        "--stream",
        action="store_true",
        default=None,
        help="export layer by layer from the safetensors shards, never holding the model in "
        "fp32 (default: chosen when the whole model would not fit in memory)",
    )
    stream.add_argument(
        "--no-stream", dest="stream", action="store_false", help="export the whole model at once"
    )
    p.add_argument(
        "--decoders",
        default="fp32",
        help="comma-separated decoders to write: fp32 (decoder.onnx), int4, int8 (MatMulNBits "
        "variants, as `quantize --forms nbits`); without fp32 there is no decoder.onnx "
        "(default: fp32)",
    )
    _add_quant_settings(p)


def _add_quant_settings(
    p: argparse.ArgumentParser, accuracy_level: bool = True, optimize: bool = False
) -> None:
    """The quantiser's settings, the same in every command that quantises (*optimize*:
    ``lm_head`` defaults to int8 there, the source's choice on a layer-streamed artifact)."""
    p.add_argument(
        "--block-size",
        type=int,
        choices=BLOCK_SIZES,
        default=DEFAULT_BLOCK_SIZE,
        help="weights per quantisation block (int4: MatMulNBits and QDQ; int8: MatMulNBits)",
    )
    if accuracy_level:
        p.add_argument(
            "--accuracy-level",
            type=int,
            choices=[0, 1, 2, 3, 4],
            default=4,
            help="MatMulNBits compute type (4: int8 activations, fastest on CPU; 0: unset)",
        )
    p.add_argument(
        "--lm-head",
        nargs="?",
        const="same",
        default=None if optimize else False,
        type=_lm_head_arg,
        metavar="{fp32,same,int8,int4}",
        help="how to store lm_head, the text head: "
        + (
            "int8 (the default here: measured to cost no agreement the layers' quantisation "
            "does not already cost; on a layer-streamed artifact the default keeps what its "
            "export chose), fp32, "
            if optimize
            else "fp32 (kept; the default), "
        )
        + "same (quantised "
        "like the layers; also what a bare --lm-head means), int8 or int4 (that width "
        "whatever the layers' width: MatMulNBits, or QDQ in TensorRT's form)",
    )


def _lm_head_arg(value: str) -> bool | int:
    """``--lm-head``'s value as export.quantize takes it (False, True, 8 or 4)."""
    choices: dict[str, bool | int] = {"fp32": False, "same": True, "int8": 8, "int4": 4}
    if value not in choices:
        raise argparse.ArgumentTypeError(f"{value!r}: choose from {', '.join(choices)}")
    return choices[value]


def _add_optimize_parser(sub: argparse._SubParsersAction) -> None:
    o = sub.add_parser(
        "optimize",
        help="add onnxruntime-specific fused decoder variants (packed matmuls, gated lm_head)",
        description="Write decoder.fused.onnx (and with --int4/--int8 decoder.fused.int{4,8}"
        ".onnx, MatMulNBits) into OUT: the portable decoder rewritten for onnxruntime with "
        "the same I/O (export/fuse.py). Then time a prefill and a decode step of each "
        "precision's graphs (portable/int4/int8 against their fused forms), each in its own "
        "process on this machine, and record the fastest request in the manifest: the float "
        "one as onnxruntime's default decoder (`--backend onnxruntime` loads it unless "
        "--quant names another), the others as what --quant int4/int8 and the "
        "onnxruntime-int4/int8 backends run.",
    )
    o.add_argument("out", type=Path, help="artifact directory written by `python -m export onnx`")
    o.add_argument("--int4", action="store_true", help="also a fused int4 (MatMulNBits) variant")
    o.add_argument("--int8", action="store_true", help="also a fused int8 (MatMulNBits) variant")
    o.add_argument(
        "--int8-dynamic",
        action="store_true",
        help="also fused int8 variants with activations quantised per token "
        "(MatMulIntegerToFloat, export/w8a8.py; faster prefill on x86), timed against "
        "MatMulNBits int8",
    )
    _add_quant_settings(o, accuracy_level=False, optimize=True)
    o.add_argument(
        "--contrib",
        action="store_true",
        help="also contrib variants (decoder.contrib*.onnx: fused + onnxruntime's "
        "RotaryEmbedding op), timed against the others",
    )
    o.add_argument(
        "--no-measure",
        action="store_true",
        help="make the fused forms the defaults without timing them against the others",
    )
    o.add_argument(
        "--tag",
        default="",
        help="appended after a dash to the quantised variants' names and files (--tag b128: "
        "fused-int4-b128): forms made to compare settings, never made a default; the bench "
        "runs one as onnxruntime@fused-int4-b128",
    )


def _add_trt_parser(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser(
        "trt",
        help="build TensorRT engines (one per graph) from an artifact directory's ONNX graphs",
        description="Build OUT's graphs into TensorRT engines on this GPU (profiles from the "
        "graph specs, a timing cache kept in OUT, metadata in manifest.json); run them with "
        "`trace-rt run VIDEO --model OUT --backend tensorrt --device cuda`.",
    )
    t.add_argument("out", type=Path, help="artifact directory written by `python -m export onnx`")
    prec = t.add_mutually_exclusive_group()
    for p in ("fp32", "fp16", "bf16", "fp8", "int8", "int4"):
        prec.add_argument(
            f"--{p}", dest="precision", action="store_const", const=p, help=f"{p} engines"
        )
    t.add_argument(
        "--max-frames", type=int, default=None, help="most frames (default: the model's num_frames)"
    )
    t.add_argument(
        "--max-seq", type=int, default=None, help="decoder context (default: min(4096, model's))"
    )
    t.add_argument(
        "--max-batch",
        type=int,
        default=None,
        help="most sequences one decode step advances, the TensorRT backend's largest "
        "max_sequences (default 8; 1: single-sequence engine, no decode_batch profile)",
    )
    t.add_argument("--workspace-gb", type=float, default=None, help="builder workspace limit")
    t.add_argument("--decoder-variant", help="a QDQ decoder from `python -m export quantize`")
    t.add_argument(
        "--checkpoint",
        type=Path,
        help="the checkpoint OUT was exported from: (re)make the fixed-shape decode step "
        "first, as `export step` does (needs torch)",
    )
    t.add_argument(
        "--no-step",
        action="store_true",
        help="do not build the decode step `export step` recorded (default: build it, "
        "quantised like the decoder, so one CUDA graph serves every decode step)",
    )
    t.add_argument(
        "--fixed-past",
        action="store_true",
        help="build the decoder itself from the decode step graph (prefill and decode over "
        "the fixed past): one engine, one copy of the weights, one CUDA graph for every "
        "step; one sequence (--max-batch 1). For memory-tight boards",
    )
    t.add_argument("--no-progress", action="store_true", help="no progress display")
    s = sub.add_parser(
        "step",
        help="write the fixed-shape decode step `export trt` builds (one CUDA graph per step)",
        description="Re-export CKPT's decoder as one decode step over a fixed past of "
        "MAX_SEQ - 1 masked slots (past length as data) into OUT, quantised like each of "
        "OUT's QDQ decoder variants, and record it in the manifest. Needs torch and onnx; "
        "`python -m export trt OUT` then builds it where only TensorRT is installed (a Jetson), "
        "beside the decoder or, with --fixed-past, as the decoder itself.",
    )
    s.add_argument("out", type=Path, help="artifact directory written by `python -m export onnx`")
    s.add_argument("--checkpoint", type=Path, required=True, help="the checkpoint OUT came from")
    s.add_argument(
        "--max-seq",
        type=int,
        required=True,
        help="the context `export trt --max-seq` will build (the step's past is MAX_SEQ - 1)",
    )


def _onnx(args: argparse.Namespace) -> None:
    decoders = tuple(d.strip() for d in args.decoders.split(",") if d.strip())
    kinds = ("fp32", "int4", "int8")
    if not decoders or set(decoders) - set(kinds):
        raise InputError(f"--decoders takes some of {', '.join(kinds)}, got {args.decoders!r}")
    stream, reason = args.stream, None
    if stream is None and args.dtype == "fp32" and args.checkpoint.is_dir():
        from export.stream import stream_reason
        from trace_rt.config import TraceConfig

        reason = stream_reason(TraceConfig.from_dir(args.checkpoint))
        stream = reason is not None
        if reason:
            print(reason)
    if stream:
        if args.dtype != "fp32":
            raise InputError(f"--stream exports fp32 graphs (+ int4/int8), not {args.dtype}")
        from export.stream import export_streamed

        out = export_streamed(
            args.checkpoint,
            args.out,
            decoders=decoders,
            opset=args.opset,
            block_size=args.block_size,
            accuracy_level=args.accuracy_level,
            lm_head=args.lm_head,
            progress=not args.no_progress,
            reason=reason or "--stream",
        )
        _print_stream_figures(out)
        print(f"wrote {out}")
        return
    if "fp32" not in decoders:
        raise InputError("a whole-model export always writes decoder.onnx: add fp32 or --stream")
    from export.onnx_export import export_onnx

    out = export_onnx(
        args.checkpoint,
        args.out,
        dtype=args.dtype,
        opset=args.opset,
        progress=not args.no_progress,
    )
    for bits in (4, 8):
        if f"int{bits}" in decoders:
            from export.quantize import quantize_artifact

            quantize_artifact(
                out,
                bits,
                block_size=args.block_size,
                accuracy_level=args.accuracy_level,
                lm_head=args.lm_head,
                forms=("nbits",),
            )
    print(f"wrote {out}")


def _print_stream_figures(out: Path) -> None:
    import json

    from trace_rt.graphs import MANIFEST_FILE

    fig = json.loads((out / MANIFEST_FILE).read_text())["export"]["stream"]
    print(f"layer-streamed export: {fig['seconds']} s, peak RSS {fig['peak_rss_mb']} MB")


def _quantize(args: argparse.Namespace) -> None:
    from export.quantize import quantize_artifact

    forms = None
    if args.forms is not None:
        forms = [f.strip() for f in args.forms.split(",") if f.strip()]
    records = quantize_artifact(
        args.out,
        args.bits,
        block_size=args.block_size,
        accuracy_level=args.accuracy_level,
        lm_head=args.lm_head,
        forms=forms,
    )
    for name, rec in records.items():
        print(f"wrote {args.out / rec['file']} (variant {name}: {rec['scheme']})")


def _hf_llm(args: argparse.Namespace) -> None:
    from export.hf_llm import export_hf_llm

    print(f"wrote {export_hf_llm(args.checkpoint, args.out, dtype=args.dtype)}")


def _optimize(args: argparse.Namespace) -> None:
    from export.decode_timing import record_default
    from export.fuse import optimize_artifact

    quantised = tuple(b for b, on in ((4, args.int4), (8, args.int8)) if on)
    # A layer-streamed artifact has no float decoder: only its quantised forms are made.
    bits = ((None,) if _has_float_decoder(args.out) else ()) + quantised
    if not bits:
        raise InputError(
            f"{args.out} has no float decoder (a layer-streamed export): name the quantised "
            "decoders to fuse, --int4 and/or --int8"
        )
    forms = ("fused", "contrib") if args.contrib else ("fused",)
    records = optimize_artifact(
        args.out,
        bits,
        block_size=args.block_size,
        lm_head=args.lm_head,
        forms=forms,
        int8_dynamic=args.int8_dynamic,
        tag=f"-{args.tag.lstrip('-')}" if args.tag else "",
    )
    for name, rec in records.items():
        print(f"wrote {args.out / rec['file']} (variant {name})")
    chosen, timing = record_default(
        args.out, measure=not args.no_measure, progress=lambda m: print(m, file=sys.stderr)
    )
    for name, t in timing.items():
        print(
            f"{name}: prefill {t['prefill']} ms, decode step: text head {t['text']} ms, "
            f"time head {t['time']} ms (p50)"
        )
    print(f"onnxruntime's default decoder: {chosen.pop('decoder')}")
    for precision, name in chosen.items():
        print(f"--quant {precision} (and onnxruntime-{precision}) runs: {name}")


def _has_float_decoder(out: Path) -> bool:
    from trace_rt.graphs import MANIFEST_FILE
    from trace_rt.variants import has_portable_decoder

    try:
        manifest = json.loads((out / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return True  # optimize_artifact reports the missing or broken manifest
    return has_portable_decoder(manifest)


def _trt(args: argparse.Namespace) -> None:
    from export.trt import build_engines

    section = build_engines(
        args.out,
        precision=args.precision,
        max_frames=args.max_frames,
        max_seq=args.max_seq,
        max_batch=args.max_batch,
        workspace_gb=args.workspace_gb,
        decoder_variant=args.decoder_variant,
        checkpoint=args.checkpoint,
        step=not args.no_step,
        fixed_past=args.fixed_past,
        progress=not args.no_progress,
    )
    for graph, rec in section["engines"].items():
        print(f"wrote {args.out / rec['file']} ({graph}, {rec['build_s']} s)")
    step = section["engines"].get("decoder_step")
    if step is not None:
        print(
            f"note: the decode step engine holds its own copy of the decoder's weights "
            f"({step['bytes'] / 1e9:.2f} GB); where memory is tight (`trace-rt plan`), "
            "rebuild with --no-step"
        )


def _step(args: argparse.Namespace) -> None:
    from export.trt_step import make_step

    rec = make_step(args.checkpoint, args.out, args.max_seq)
    for file in [rec["file"], *(v["file"] for v in rec["variants"].values())]:
        print(f"wrote {args.out / file}")


def _atc(args: argparse.Namespace) -> None:
    from export.atc import run_atc

    run_atc(args)


COMMANDS = {
    "onnx": _onnx,
    "quantize": _quantize,
    "optimize": _optimize,
    "trt": _trt,
    "step": _step,
    "atc": _atc,
    "hf-llm": _hf_llm,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(PROG, lambda: COMMANDS[args.command](args))
