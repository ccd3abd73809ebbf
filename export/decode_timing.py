"""Prefill and decode-step timing of an artifact's decoder variants, each in its own
process.

Used by ``python -m export optimize`` (:func:`record_default`: which variant onnxruntime
runs by default, and for ``int4``/``int8``) and by ``benchmarks/decode_variants.py`` (the
recorded comparison). A worker process (``python -m export.decode_timing``) loads one
variant's decoder, as the runtime would, and per round prefills it to the same past
length (timed), then times single decode steps (the backend's own ``decode_step``: KV
pool binding included) in the text head and in the time head. Variants run one after
another in two passes, forward then backward, so that a loaded machine's drift lands on
all of them alike; figures are the faster pass's median (:func:`time_decode` says why).

Why one process per variant: onnxruntime's intra-op workers spin for a while after each
run, and with every variant's session in one process the idle sessions' spinning
workers took the CPUs from the one being timed. Measured on `small`, 2 cores, 12
variants loaded at once: the dynamic int8 prefill at 333 ms against 185 ms alone, which
hid its lead over MatMulNBits (369 ms). Turning spinning off in one process removes that
but charges every op a worker wake-up the runtime does not pay. One process at a time
also holds one decoder in memory, not all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from export.files import write_json
from export.fuse import CONTRIB, DYNAMIC, FUSED, fused_name
from trace_rt.backends.onnxruntime_backend import OnnxRuntimeBackend
from trace_rt.graphs import DECODER, MANIFEST_FILE
from trace_rt.tokens import VIDEO_PLACEHOLDER_ID, Head, head_base
from trace_rt.variants import BY_PRECISION, PORTABLE, variant_names

HEADS = (Head.TEXT, Head.TIME)
KEYS = tuple(h.name.lower() for h in HEADS)  # the step figures, by head
# A default is picked by the time of one request: a prefill of the timed length plus this
# many decode steps (the bench's default request), so a variant that decodes a little
# slower but prefills much faster can win.
REQUEST_STEPS = 64


def time_decode(
    artifact: str | Path,
    variants: list[str],
    *,
    past: int = 400,
    rounds: int = 5,
    steps: int = 8,
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, dict[str, float]]:
    """{variant: {"prefill": p50 ms, "text": p50 ms, "time": p50 ms}}: a prefill of ~*past*
    positions and one decode step after it, in the text and the time head.

    Names are exact (``int4`` is ``decoder.int4.onnx``, not the fastest int4);
    ``portable`` names ``decoder.onnx`` itself. *rounds* are split over the two passes
    (at least one each). *progress* gets a line before each worker starts.

    Each figure is the faster of the two workers' medians. On the 2-core VM a process
    settles in one of two speeds and keeps it: six fresh processes timing the same
    ``contrib`` prefill gave medians of 430, 427, 430, 358, 363, 359 ms (each within ~3%
    across its own rounds). Pooling two workers' samples put a variant's figure in
    whichever mode it drew, a 20% swing that decided between forms differing by 5%; the
    faster worker is the variant's speed when the machine does not slow it.
    """
    per_pass = max(1, (rounds + 1) // 2)
    medians: dict[str, dict[str, list[float]]] = {
        v: {k: [] for k in ("prefill", *KEYS)} for v in variants
    }
    done, total = 0, 2 * len(variants)
    for order in (variants, variants[::-1]):
        for v in order:
            done += 1
            if progress is not None:
                progress(f"timing {v} ({done}/{total}: prefill {past} positions, then steps)")
            got = _worker(artifact, v, past=past, rounds=per_pass, steps=steps, threads=threads)
            for k, xs in got.items():
                medians[v][k].append(statistics.median(xs))
    return {v: {k: round(min(xs), 3) for k, xs in s.items()} for v, s in medians.items()}


def _worker(artifact: str | Path, variant: str, **kw: Any) -> dict[str, list[float]]:
    """Run :func:`time_one` in a fresh process; its samples."""
    args = [sys.executable, "-m", "export.decode_timing", str(artifact), variant]
    for k, v in kw.items():
        if v is not None:
            args += [f"--{k}", str(v)]
    # The worker imports `export` as this process did, wherever the caller's cwd is.
    root = str(Path(__file__).resolve().parents[1])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(args, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(
            f"timing {variant} failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}"
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


def time_one(
    artifact: str | Path,
    variant: str,
    *,
    past: int = 400,
    rounds: int = 3,
    steps: int = 8,
    threads: int | None = None,
) -> dict[str, list[float]]:
    """Samples (ms) of one variant in this process: ``prefill``, ``text``, ``time``.
    A first round warms up (allocations, first-run paths) and is not kept."""
    be = OnnxRuntimeBackend(
        artifact, decoder_variant=variant, exact_variant=True, video_graphs=False, threads=threads
    )
    cfg = be.config
    rng = np.random.default_rng(0)
    video = (rng.standard_normal((past - 2, cfg.hidden_size)) * 0.02).astype(np.float32)
    prompt = [1, VIDEO_PLACEHOLDER_ID, 2]
    out: dict[str, list[float]] = {k: [] for k in ("prefill", *KEYS)}
    for r in range(rounds + 1):
        for head in HEADS:
            t0 = time.perf_counter()
            be.prefill(prompt, video, head)
            if r:
                out["prefill"].append((time.perf_counter() - t0) * 1e3)
            token = head_base(cfg.ids, head)
            for _ in range(steps):
                t0 = time.perf_counter()
                be.decode_step(token, head)
                if r:
                    out[head.name.lower()].append((time.perf_counter() - t0) * 1e3)
    return out


def request_ms(timing: dict[str, float]) -> float:
    """One request's time from :func:`time_decode`'s figures: a prefill and
    :data:`REQUEST_STEPS` steps, half in each head (the rewritten forms skip lm_head in
    time-head steps, so both count)."""
    step = (timing["text"] + timing["time"]) / 2
    return timing["prefill"] + REQUEST_STEPS * step


# ---- the default onnxruntime decoder ----------------------------------------------------
def default_candidates(manifest: dict[str, Any]) -> dict[str, list[str]]:
    """Per precision (``float``: the graph's own, ``int4``, ``int8``), the decoders that
    compete for its default: the portable graph or plain quantised variant, then the
    ``fused`` and ``contrib`` forms of it that the manifest has (untagged ones only), and
    for int8 the dynamic (per-token activation) forms too."""
    have = set(variant_names(manifest))
    groups = {"float": [PORTABLE, *(f for f in (FUSED, CONTRIB) if f in have)]}
    for b in (4, 8):
        names = [f"int{b}", fused_name(b), fused_name(b, form=CONTRIB)]
        if b == 8:  # activations quantised per token (export/w8a8.py)
            d = f"-{DYNAMIC}"
            names += [f"int8{d}", fused_name(8, d), fused_name(8, d, form=CONTRIB)]
        groups[f"int{b}"] = [n for n in names if n in have]
    plain = {"float": PORTABLE, "int4": "int4", "int8": "int8"}
    # Only groups where a rewritten form is there: otherwise the plain name already runs.
    return {k: v for k, v in groups.items() if any(n != plain[k] for n in v)}


def record_default(
    artifact: str | Path,
    *,
    measure: bool = True,
    past: int = 400,
    progress: Callable[[str], None] | None = None,
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
    timing = time_decode(root, timed, past=past, progress=progress) if measure and timed else {}

    def pick(names: list[str]) -> str:
        if all(n in timing for n in names):
            return min(names, key=lambda n: request_ms(timing[n]))
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


def main(argv: list[str] | None = None) -> int:
    """The worker: one variant's samples as one JSON line on stdout."""
    p = argparse.ArgumentParser(prog="python -m export.decode_timing", description=main.__doc__)
    p.add_argument("artifact", type=Path)
    p.add_argument("variant")
    p.add_argument("--past", type=int, default=400)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int)
    a = p.parse_args(argv)
    got = time_one(
        a.artifact, a.variant, past=a.past, rounds=a.rounds, steps=a.steps, threads=a.threads
    )
    print(json.dumps(got))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
