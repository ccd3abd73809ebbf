"""A/B of one decoder graph from two artifact directories (two exports of the same weights,
before and after a change): prefill and decode-step time, sessions alternated in one process.

    python -m benchmarks.decoder_ab OLD_ART NEW_ART decoder.onnx decoder.fused.int4.onnx

Why in one process: this VM settles each new process in one of two speed modes
(export/decode_timing.py), so two bench runs can differ by more than a change does;
alternating the two sessions round by round in one process cancels that out. (An idle
session's spinning intra-op workers slow the other one's next run, export/decode_timing.py;
the order flips every round, so each session runs second as often and both pay alike.)
Each round
runs a prefill of ``--positions`` positions (no past) and ``--steps`` single-position steps
over a past of that length (text head on where the graph has the input); the first two
rounds are warm-up. Prints old and new medians and their ratio per graph.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

WARMUP_ROUNDS = 2


def _session(path: Path, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _feeds(sess: ort.InferenceSession, emb: np.ndarray, past: np.ndarray, start: int, n: int):
    """Feeds for n new positions from *start* over the first *start* past slots."""
    feeds = {}
    for i in sess.get_inputs():
        if i.name == "inputs_embeds":
            feeds[i.name] = emb[:, :n]
        elif i.name == "position_ids":
            feeds[i.name] = np.arange(start, start + n, dtype=np.int64)[None]
        elif i.name.startswith("past_"):
            feeds[i.name] = past[:start]
        elif i.name == "text_head":
            feeds[i.name] = np.array(True)
        else:
            raise SystemExit(f"{i.name}: an input this A/B does not know how to fill")
    return feeds


def _shapes(sess: ort.InferenceSession) -> tuple[int, tuple[int, int]]:
    """(hidden size, (kv heads, head dim)) from the graph's static input dims."""
    ins = {i.name: i.shape for i in sess.get_inputs()}
    past = next(s for n, s in ins.items() if n.startswith("past_"))
    return int(ins["inputs_embeds"][-1]), (int(past[2]), int(past[3]))


def time_graph(old: Path, new: Path, positions: int, steps: int, rounds: int, threads: int):
    """{"old"|"new": {"prefill"|"step": [seconds per round]}} for one graph."""
    a, b = _session(old, threads), _session(new, threads)
    hidden, (kv, hd) = _shapes(a)
    rng = np.random.default_rng(0)
    emb = (rng.standard_normal((1, positions, hidden)) * 0.02).astype(np.float32)
    past = (rng.standard_normal((positions, 1, kv, hd)) * 0.1).astype(np.float32)
    got = {k: {"prefill": [], "step": []} for k in ("old", "new")}
    for r in range(rounds):
        order = (("old", a), ("new", b)) if r % 2 == 0 else (("new", b), ("old", a))
        for tag, sess in order:
            f = _feeds(sess, emb, past, 0, positions)
            t = time.perf_counter()
            sess.run(None, f)
            got[tag]["prefill"].append(time.perf_counter() - t)
            f = _feeds(sess, emb, past, positions, 1)
            ts = []
            for _ in range(steps):
                t = time.perf_counter()
                sess.run(None, f)
                ts.append(time.perf_counter() - t)
            got[tag]["step"].append(statistics.median(ts))
    return got


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old", type=Path, help="artifact directory before the change")
    ap.add_argument("new", type=Path, help="artifact directory after it")
    ap.add_argument("graphs", nargs="+", help="decoder graph file names in both")
    ap.add_argument("--positions", type=int, default=385, help="prefill length and past")
    ap.add_argument("--steps", type=int, default=20, help="decode steps per round")
    ap.add_argument("--rounds", type=int, default=12, help="rounds, 2 of them warm-up")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads per session")
    args = ap.parse_args(argv)
    if args.rounds <= WARMUP_ROUNDS:
        ap.error(f"--rounds must be more than the {WARMUP_ROUNDS} warm-up rounds")
    for g in args.graphs:
        for d in (args.old, args.new):
            if not (d / g).is_file():
                ap.error(f"no {g} in {d}")
    print("| graph | prefill old -> new ms | new/old | step old -> new ms | new/old |")
    print("|---|---|---:|---|---:|")
    for g in args.graphs:
        got = time_graph(args.old / g, args.new / g, args.positions, args.steps, args.rounds,
                         args.threads)  # fmt: skip
        cells = []
        for k in ("prefill", "step"):
            o = statistics.median(got["old"][k][WARMUP_ROUNDS:]) * 1e3
            n = statistics.median(got["new"][k][WARMUP_ROUNDS:]) * 1e3
            cells += [f"{o:.2f} -> {n:.2f}", f"{n / o:.3f}"]
        print(f"| `{g}` | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
