"""Teacher-forced logits of one request, for comparing two machines (emulate.sh).

Greedy decoding on random-weight checkpoints meets near-ties (two logits within float
rounding of each other), where kernels that sum in another order (NEON vs AVX2) may pick
the other token; from there the two token streams differ. Comparing tokens alone cannot
tell that from a real fault, so this feeds a fixed token stream (the other machine's) and
writes each step's logits: the two machines must agree to float rounding at every step, and
may pick different tokens only where the margin between the top two is that small.

    python forced_logits.py ART VIDEO RESULT.json OUT.npz [PIXELS.npz]
      RESULT.json: a `trace-rt run` result (its prompt_ids and token_ids are replayed)
      PIXELS.npz: another run's OUT.npz: use its preprocessed frames instead of decoding
      VIDEO (isolates the model from video decoding)

Torch-free: runs on the edge install (onnxruntime backend only).
"""

from __future__ import annotations

import json
import sys

import numpy as np

from trace_rt.pipeline import Pipeline
from trace_rt.tokens import Head, next_head


def main(art: str, video: str, result_json: str, out: str, pixels: str | None = None) -> None:
    with open(result_json) as f:
        result = json.load(f)
    pipe = Pipeline.from_dir(art, "onnxruntime", cache_dir=False)
    req = pipe.prepare(video, "dvc", frames=result["frames"])  # pixels; prompt replayed
    backend = pipe.backend
    px = req.pixel_values if pixels is None else np.load(pixels)["pixels"]
    handle = backend.encode_video(px, req.time_ids)
    head = Head.TIME
    steps = [backend.prefill(result["prompt_ids"], handle, head)]
    for token in result["token_ids"][:-1]:
        head = next_head(backend.config.ids, head, token)
        steps.append(backend.decode_step(token, head))
    # The preprocessed frames too: video decoding (libswscale's colour conversion has
    # per-architecture SIMD code) is the other place the machines may differ.
    np.savez(out, *[np.asarray(s, np.float32) for s in steps], pixels=px)


if __name__ == "__main__":
    main(*sys.argv[1:6])
