"""Prefill and decode-step p50 of an artifact's decoder variants: portable vs fused,
fp32/int8/int4, MatMulNBits int8 vs int8 with activations quantised per token.

    python -m benchmarks.decode_variants ART [--past 400] [--threads 1] [--out FILE.json]

Makes the variants it times (``python -m export quantize`` / ``optimize`` forms; int4 at
several block sizes, with ``lm_head`` in int8 as optimize makes it by default, in fp32
(``-lm32``) and in int4 (``-lm``)), then times them with
:func:`export.decode_timing.time_decode`: each variant in its own process (one decoder
loaded, as the runtime runs it), a prefill and single decode steps at ~``--past``
positions, variants one after another in two passes (forward, then backward), so a
loaded machine's drift falls on all alike. Reports p50 per variant (the faster of its two
worker processes': the VM's per-process speed modes, ``time_decode``) of a prefill of
``--past`` positions, of a step in the text head (lm_head runs) and in the time head
(the fused graphs skip it), and the ratios of the pairs below: on a shared machine the
absolute figures move with the load, the ratios much less.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import onnxruntime as ort

from export.decode_timing import time_decode
from export.fuse import optimize_artifact
from export.quantize import quantize_artifact
from trace_rt.graphs import DECODER, load_manifest

BLOCK_SIZES = (32, 64, 128)  # int4 blocks compared (32: the default, llama.cpp's Q4_0)
PAIRS = (
    ("portable", "fused"),
    ("int8", "fused-int8"),
    ("int4", "fused-int4"),
    # onnxruntime's RotaryEmbedding on top of the fused graph (export/contrib.py)
    ("fused", "contrib"),
    ("fused-int8", "contrib-int8"),
    ("fused-int4", "contrib-int4"),
    # MatMulNBits int8 vs int8 x int8 with per-token activation scales (export/w8a8.py)
    ("contrib-int8", "contrib-int8-dynamic"),
    # lm_head in fp32 vs in int8 (optimize's default, export/fuse.py DEFAULT_LM_HEAD)
    ("fused-int4-lm32", "fused-int4"),
)


def make_variants(art: Path) -> list[str]:
    """Write the variants timed here (skipping ones the manifest already has)."""
    have = load_manifest(art).get("variants", {}).get(DECODER, {})
    if "int4" not in have:
        quantize_artifact(art, 4, forms=("nbits",))
    if "int8" not in have:
        quantize_artifact(art, 8, forms=("nbits",))
    if "fused-int4" not in have:
        optimize_artifact(art, (None, 4, 8))
    if "contrib-int4" not in have:
        optimize_artifact(art, (None, 4, 8), forms=("contrib",))
    if "contrib-int8-dynamic" not in have:
        optimize_artifact(art, (), forms=("contrib",), int8_dynamic=True)
    for b in BLOCK_SIZES[1:]:
        if f"fused-int4-b{b}" not in have:
            optimize_artifact(art, (4,), block_size=b, tag=f"-b{b}")
    if "fused-int4-lm" not in have:
        optimize_artifact(art, (4,), lm_head=True, tag="-lm")
    if "fused-int4-lm32" not in have:
        optimize_artifact(art, (4,), lm_head=False, tag="-lm32")
    extra = [f"fused-int4-b{b}" for b in BLOCK_SIZES[1:]] + ["fused-int4-lm"]
    return list(dict.fromkeys(v for pair in PAIRS for v in pair)) + extra


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.decode_variants")
    p.add_argument("artifact", type=Path)
    p.add_argument("--past", type=int, default=400)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    p.add_argument(
        "--only", help="comma-separated variants to time (default: all it makes); more rounds fit"
    )
    args = p.parse_args(argv)
    variants = make_variants(args.artifact)
    if args.only:
        variants = [v for v in variants if v in args.only.split(",")]
    load = [os.getloadavg()]
    t0 = time.time()
    p50 = time_decode(
        args.artifact,
        variants,
        past=args.past,
        rounds=args.rounds,
        steps=args.steps,
        threads=args.threads,
        progress=lambda m: print(m, file=sys.stderr),
    )
    load.append(os.getloadavg())
    ratios = {
        f"{a}/{b}": {h: round(p50[a][h] / p50[b][h], 3) for h in ("prefill", "text", "time")}
        for a, b in PAIRS
        if a in p50 and b in p50
    }
    result = {
        "past": args.past,
        "rounds": args.rounds,
        "steps": args.steps,
        "threads": args.threads,
        "p50_ms": p50,
        "ratios": ratios,
        "seconds": round(time.time() - t0, 1),
        "load_average_1_5_15": {"start": load[0], "end": load[1]},
        "onnxruntime": ort.__version__,
        "machine": platform.machine(),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
