"""Decode-step timing of an artifact's decoder variants, alternating in one process.

Used by ``python -m export optimize`` (:func:`record_default`: which variant onnxruntime
runs by default, and for ``int4``/``int8``) and by ``benchmarks/decode_variants.py`` (the
recorded comparison). Each round
prefills every variant's backend to the same past length, then times single decode
steps (the backend's own ``decode_step``: KV pool binding included) in the text head and
in the time head, one step of each variant in turn (order alternating), so that a loaded
machine's drift lands on all of them alike. Figures are medians over rounds and steps.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from export.files import write_json
from export.fuse import CONTRIB, FUSED, fused_name
from trace_rt.backends.onnxruntime_backend import OnnxRuntimeBackend
from trace_rt.graphs import DECODER, MANIFEST_FILE
from trace_rt.tokens import VIDEO_PLACEHOLDER_ID, Head, head_base
from trace_rt.variants import BY_PRECISION, PORTABLE, variant_names

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

    Names are exact (``int4`` is ``decoder.int4.onnx``, not the fastest int4);
    ``portable`` names ``decoder.onnx`` itself.
    """
    backends = {
        v: OnnxRuntimeBackend(
            artifact, decoder_variant=v, exact_variant=True, video_graphs=False, threads=threads
        )
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


# ---- the default onnxruntime decoder ----------------------------------------------------
def default_candidates(manifest: dict[str, Any]) -> dict[str, list[str]]:
    """Per precision (``float``: the graph's own, ``int4``, ``int8``), the decoders that
    compete for its default: the portable graph or plain quantised variant, then the
    ``fused`` and ``contrib`` forms of it that the manifest has (untagged ones only)."""
    have = set(variant_names(manifest))
    groups = {"float": [PORTABLE, *(f for f in (FUSED, CONTRIB) if f in have)]}
    for b in (4, 8):
        names = [f"int{b}", fused_name(b), fused_name(b, form=CONTRIB)]
        groups[f"int{b}"] = [n for n in names if n in have]
    plain = {"float": PORTABLE, "int4": "int4", "int8": "int8"}
    # Only groups where a rewritten form is there: otherwise the plain name already runs.
    return {k: v for k, v in groups.items() if any(n != plain[k] for n in v)}


def record_default(
    artifact: str | Path, *, measure: bool = True, past: int = 400
) -> tuple[dict[str, str], dict[str, dict[str, float]]]:
    """Time each precision's candidates (:func:`default_candidates`), all in one run, and
    record the fastest: the float one as onnxruntime's default decoder
    (``manifest["defaults"]["onnxruntime"]["decoder"]``), the quantised ones as what
    asking for ``int4``/``int8`` runs (``["decoder_by_precision"]``); returns
    ({"decoder" or precision: chosen}, {variant: p50 ms}).

    A default never changes the precision a user gets without asking: only the float
    forms compete for ``decoder``; quantised variants stay opt-in (``--quant int4``).
    Unmeasured (*measure* false, or a precision with one candidate), the ``fused`` form
    is taken (else ``contrib``).
    """
    root = Path(artifact)
    path = root / MANIFEST_FILE
    groups = default_candidates(json.loads(path.read_text()))
    timed = [n for names in groups.values() if len(names) > 1 for n in names]
    timing = time_decode(root, timed, past=past) if measure and timed else {}

    def pick(names: list[str]) -> str:
        if all(n in timing for n in names):
            # A text step and a time step each: the rewritten forms skip lm_head in the
            # second, so the sum weighs that in rather than hinging on the text step alone.
            return min(names, key=lambda n: sum(timing[n].values()))
        return next((n for n in names if n.startswith(FUSED)), names[-1])

    chosen = {k: pick(v) for k, v in groups.items()}
    manifest = json.loads(path.read_text())
    defaults = manifest.setdefault("defaults", {}).setdefault("onnxruntime", {})
    before = defaults.get(DECODER)
    if "float" in chosen:
        defaults[DECODER] = chosen.pop("float")
    elif before in chosen:  # a layer-streamed artifact's default is a quantised decoder
        defaults[DECODER] = chosen[before]
    else:
        defaults.setdefault(DECODER, PORTABLE)
    defaults[BY_PRECISION] = chosen
    defaults["measured"] = {"past": past, "p50_ms": timing} if timing else None
    write_json(path, manifest)
    return {DECODER: defaults[DECODER], **chosen}, timing
