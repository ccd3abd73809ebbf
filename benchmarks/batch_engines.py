"""trace-rt batch: local engine vs Ray Data with N actors, on the same manifest.

Makes a random-weight checkpoint (or takes --model), N synthetic clips and a manifest of
Q ``mr`` queries per clip, then runs ``run_batch`` with ``--engine local`` and with
``--engine ray`` (a local Ray cluster of --ray-cpus CPUs, started first and timed apart),
checks both answered every item identically (timings aside), and writes a markdown report.

    python -m benchmarks.batch_engines --out benchmarks/results/batch-engines-cpu.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from trace_rt.batch import comparable, run_batch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.batch_engines")
    p.add_argument("--model", type=Path, help="default: a random-weight `tiny` checkpoint")
    p.add_argument("--videos", type=int, default=8)
    p.add_argument("--queries", type=int, default=2, help="mr queries per video")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--ray-cpus", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="alternating local/ray rounds")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    import ray

    from tests.media import write_video

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model
        if model is None:
            from training.make_checkpoint import make_checkpoint

            model = make_checkpoint(tmp / "tiny", "tiny", seed=0, progress=False)
        lines = []
        for i in range(args.videos):
            write_video(tmp / f"v{i}.mp4", width=160, height=120, fps=10, n_frames=40 + 4 * i)
            qs = [f"object {j} moves across the frame" for j in range(args.queries)]
            lines.append(json.dumps({"video": f"v{i}.mp4", "task": "mr", "queries": qs}))
        manifest = tmp / "manifest.jsonl"
        manifest.write_text("\n".join(lines) + "\n")
        opts = {"max_new_tokens": args.max_new_tokens}
        share = args.ray_cpus / (2 * args.actors)  # half the CPUs to actors, half to decode
        ray_opts = {"actors": args.actors, "cpus_per_actor": share, "decode_cpus": share}
        t_local, t_ray = [], []
        t0 = time.perf_counter()
        ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
        t_init = time.perf_counter() - t0
        try:
            # Alternating rounds, so that both engines see the same (shared) machine.
            for r in range(args.rounds):
                t0 = time.perf_counter()
                local = run_batch(manifest, tmp / f"local{r}", model, **opts)
                t_local.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                remote = run_batch(
                    manifest, tmp / f"ray{r}", model, engine="ray", ray_options=ray_opts, **opts
                )
                t_ray.append(time.perf_counter() - t0)
        finally:
            ray.shutdown()

        def read(d: str) -> dict:
            rows = (tmp / d / "results.jsonl").read_text().splitlines()
            return {r["key"]: comparable(r) for r in map(json.loads, rows)}

        torch = sys.modules.get("torch")
        threads = torch.get_num_threads() if torch is not None else "n/a"
        same = all(read(f"local{r}") == read(f"ray{r}") for r in range(args.rounds))
    items = local["items"]

    def row(name: str, c: dict, t: list[float]) -> str:
        walls = ", ".join(f"{x:.1f}" for x in t)
        return f"| {name} | {c['ok']} / {c['failed']} | {walls} | {items / min(t):.2f} |"

    report = f"""# trace-rt batch: local engine vs Ray Data ({args.actors} actors), CPU

{datetime.date.today()}, {platform.processor() or platform.machine()}, `python -m
benchmarks.batch_engines --out ...` (model: {"random `tiny`" if args.model is None else args.model};
{args.videos} synthetic 160x120 clips of 4-6.8 s, {args.queries} `mr` queries each =
{items} items, {args.max_new_tokens} new tokens at most), {args.rounds} alternating rounds.
Wall-clock s of `run_batch`, model loading included (local: once; Ray: once per actor);
the Ray cluster's start ({args.ray_cpus} CPUs) is timed apart. A 2-core machine shared
with other jobs: read the ratio loosely.

| engine | items ok / failed | wall s, each round | items/s (best round) |
|---|---:|---:|---:|
{row("local (one run_many per video)", local, t_local)}
{row(f"ray, {args.actors} actors", remote, t_ray)}

Ray cluster start: {t_init:.1f} s. Results identical (timings aside): **{same}**.
Threads: the local process ran with OMP_NUM_THREADS={os.environ.get("OMP_NUM_THREADS", "unset")}
(torch intra-op threads: {threads}); Ray sets each actor's OMP_NUM_THREADS from its CPU
share ({max(1, int(share))} here).

Both engines run on the same cores here: Ray's actors split them rather than add any, and
Ray pays per-actor model loads, pickled clips through the object store and its scheduler;
its decode tasks overlap with the actors' work, where the local engine decodes in turn.
"""
    args.out.write_text(report)
    print(report)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
