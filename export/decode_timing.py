"""Decode-step timing of an artifact's decoder variants, alternating in one process.

Used by ``python -m export optimize`` (to record which variant onnxruntime runs by
default) and by ``benchmarks/decode_variants.py`` (the recorded comparison). Each round
prefills every variant's backend to the same past length, then times single decode
steps (the backend's own ``decode_step``: KV pool binding included) in the text head and
in the time head, one step of each variant in turn (order alternating), so that a loaded
machine's drift lands on all of them alike. Figures are medians over rounds and steps.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

from trace_rt.backends.onnxruntime_backend import OnnxRuntimeBackend
from trace_rt.tokens import VIDEO_PLACEHOLDER_ID, Head, head_base

HEADS = (Head.TEXT, Head.TIME)


def time_decode(
    artifact: str | Path,
    variants: list[str],
    *,
    past: int = 400,
    rounds: int = 5,
    steps: int = 8,
    threads: int | None = None,
) -> dict[str, dict[str, float]]:
    """{variant: {"text": p50 ms, "time": p50 ms}} of one decode step at ~*past* positions.

    ``portable`` names ``decoder.onnx`` itself.
    """
    backends = {
        v: OnnxRuntimeBackend(artifact, decoder_variant=v, video_graphs=False, threads=threads)
        for v in variants
    }
    cfg = next(iter(backends.values())).config
    rng = np.random.default_rng(0)
    video = (rng.standard_normal((past - 2, cfg.hidden_size)) * 0.02).astype(np.float32)
    prompt = [1, VIDEO_PLACEHOLDER_ID, 2]
    samples: dict[str, dict[Head, list[float]]] = {v: {h: [] for h in HEADS} for v in variants}
    for r in range(rounds + 1):  # round 0 warms up (allocations, first-run paths)
        for head in HEADS:
            for be in backends.values():
                be.prefill(prompt, video, head)
            token = head_base(cfg.ids, head)
            for s in range(steps):
                # Step by step, in alternating order: neighbouring samples of different
                # variants see the same machine load.
                for v in variants if (r + s) % 2 else variants[::-1]:
                    t0 = time.perf_counter()
                    backends[v].decode_step(token, head)
                    if r:
                        samples[v][head].append((time.perf_counter() - t0) * 1e3)
    return {
        v: {h.name.lower(): round(statistics.median(s[h]), 3) for h in HEADS}
        for v, s in samples.items()
    }
