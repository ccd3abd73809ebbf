"""In-process or BLS encoders in ``trace_pipeline``: which is faster? (measured, not assumed)

Builds two repositories from one artifact directory, ``--encoders in-process`` and
``--encoders bls``, serves both at once (two real tritonservers) and sends them the same
requests in alternating rounds, so both see the same machine noise. For each
concurrency, a round is C clients each sending the benchmark video at once; recorded:
end-to-end latency (client) and the server's own ``vision`` stage (video block from
pixels: in-process onnxruntime, or BLS calls with dynamic batching).

    python -m benchmarks.triton_encoders ARTIFACTS --out benchmarks/results/X.md

The repository's default (``--encoders`` of ``python -m triton_repo build``) follows this
measurement; see benchmarks/results/triton-encoders-cpu.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

from trace_rt.bench.triton import TritonRequest, one_round
from trace_rt.serving.client import TraceClient
from trace_rt.serving.server import TritonServer, free_ports
from triton_repo.build import build_repository

MODES = ("in-process", "bls")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.triton_encoders")
    p.add_argument("artifacts", type=Path)
    p.add_argument("--video", type=Path, help="default: a synthetic 8 s 320x240 clip")
    p.add_argument("--concurrency", default="1,4,8")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--instances", type=int, default=1)
    p.add_argument("--out", type=Path, required=True, help="markdown report (+ .json beside)")
    args = p.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        video_path = args.video
        if video_path is None:
            from trace_rt.bench.video import synthetic_video

            video_path = synthetic_video(Path(tmp) / "clip.mp4")
        video = video_path.read_bytes()
        repos = {
            m: build_repository(
                args.artifacts, Path(tmp) / m, encoders=m, instances=args.instances,
                progress=False,
            )
            for m in MODES
        }  # fmt: skip
        samples: dict[str, dict[int, list[dict]]] = {m: {c: [] for c in levels} for m in MODES}
        servers = {}
        for m in MODES:
            g, h, x = free_ports(3)
            servers[m] = TritonServer(repos[m], grpc_port=g, http_port=h, metrics_port=x)
        with servers["in-process"] as a, servers["bls"] as b:
            urls = {"in-process": a.grpc_url, "bls": b.grpc_url}
            req = TritonRequest(str(video_path), "dvc", None, args.decode_steps)

            def measure(mode: str, clients: int) -> list[dict]:
                conns = [TraceClient(urls[mode]) for _ in range(clients)]
                try:
                    return one_round(conns, video, req, time.perf_counter)[0]
                finally:
                    for conn in conns:
                        conn.close()

            for m in MODES:  # warm-up: first requests pay for onnxruntime's first runs
                measure(m, max(levels))
            for c in levels:
                for r in range(args.rounds):
                    order = MODES if r % 2 == 0 else MODES[::-1]
                    for m in order:
                        samples[m][c] += measure(m, c)
    rows = []
    for c in levels:
        for m in MODES:
            s = samples[m][c]
            rows.append({
                "concurrency": c, "encoders": m,
                "e2e_p50_ms": statistics.median(x["end_to_end_ms"] for x in s),
                "vision_p50_ms": statistics.median(x["server_ms"]["vision"] for x in s),
                "video_p50_ms": statistics.median(x["server_ms"]["video"] for x in s),
                "n": len(s),
            })  # fmt: skip
    _write(args, rows, samples)
    return 0


def _write(args: argparse.Namespace, rows: list[dict], samples: dict) -> None:
    today = datetime.date.today().isoformat()
    lines = [
        f"# trace_pipeline encoders: in-process vs BLS ({today})",
        "",
        f"Artifacts `{args.artifacts.name}`, {args.decode_steps} decode steps (EOS ignored), "
        f"{args.rounds} rounds per concurrency, {args.instances} instance(s) per model, both "
        f"repositories served at once and measured in alternating rounds. Machine: "
        f"{platform.processor() or platform.machine()}, measured on this host's CPU.",
        "",
        "| clients | encoders | end-to-end p50 ms | vision stage p50 ms | video decode p50 ms |",
        "|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['concurrency']} | {r['encoders']} | {r['e2e_p50_ms']:.1f} | "
            f"{r['vision_p50_ms']:.1f} | {r['video_p50_ms']:.1f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(
        json.dumps({"rows": rows, "samples": samples}, indent=1) + "\n"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
