"""``trace-rt eval BENCHMARK ...`` and ``trace-rt eval score BENCHMARK ...``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from trace_rt.cliutil import Parser, run_command
from trace_rt.evaluation.benchmarks import BENCHMARKS
from trace_rt.evaluation.reformat import RULES

BENCH_HELP = "; ".join(f"{b.name}: {b.files}" for b in BENCHMARKS.values())
RULES_HELP = (
    "how generations become predictions: 'original' (default; the original's reformat "
    "scripts, e.g. only events with exactly two timestamps, a reversed span scores 0, "
    "highlight clip int(t/2)-1) or 'lenient' (our parser: first two timestamps sorted, "
    "clip int(t/2), every timestamp/score pair); see trace_rt/evaluation/reformat.py"
)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("benchmark", choices=sorted(BENCHMARKS), help=BENCH_HELP)
    p.add_argument(
        "--annotations",
        required=True,
        action="append",
        help="the benchmark's annotation file as published (repeat for ActivityNet's "
        "val_1.json and val_2.json)",
    )
    p.add_argument(
        "--task", choices=["mr", "dvc", "vhd", "qa"], help="activitynet-captions: dvc or mr"
    )
    p.add_argument("--rules", choices=RULES, default="original", help=RULES_HELP)
    p.add_argument(
        "--no-java",
        action="store_true",
        help="do not run the Java scorers (METEOR, SODA_c and the PTB tokenizer)",
    )


def build_parser() -> argparse.ArgumentParser:
    from trace_rt.backends import BACKENDS

    p = Parser(
        prog="trace-rt eval",
        description="Run a TRACE benchmark with the original's settings and score it with "
        "the original's metrics; `trace-rt eval score ...` scores predictions only.",
    )
    _common(p)
    p.add_argument("--videos", required=True, type=Path, help="directory of the videos")
    p.add_argument(
        "--model", required=True, type=Path, help="checkpoint or artifact directory (with "
        "--url: the served model's directory, for its tokenizer)"
    )  # fmt: skip
    p.add_argument(
        "--backend",
        choices=sorted(BACKENDS),
        help="default: onnxruntime for an artifact directory (manifest.json), else torch",
    )
    p.add_argument("--url", help="send requests to a running `trace-rt serve` (HOST:PORT)")
    p.add_argument("--out", type=Path, default=Path("eval-out"), help="output dir (eval-out)")
    p.add_argument("--limit", type=int, help="only the first N queries (videos for dvc)")
    p.add_argument("--concurrency", type=int, default=1, help="requests in flight (--url)")
    p.add_argument("--frames", type=int, help="frames per video (default: the model's)")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        help="token budget (default: 128 for mvbench/videomme, the original's; else 512)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="torch dtype (cuda: fp16)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--report-items",
        choices=["best-worst", "all", "none"],
        default="best-worst",
        help="report.html: which items get a timeline page under items/ (best-worst)",
    )
    p.add_argument(
        "--report-n", type=int, default=5, help="report.html: best and worst items shown (5)"
    )
    p.add_argument(
        "--link",
        action="append",
        default=[],
        help="link this report (e.g. a bench's markdown or PNG) from report.html; repeatable",
    )
    return p


def build_score_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="trace-rt eval score",
        description="Score predictions: our predictions.jsonl, or the original's result "
        "files (fmt_*_result.json, refmt_*_result.json).",
    )
    _common(p)
    p.add_argument("--predictions", required=True, type=Path, help="predictions file")
    p.add_argument("--out", type=Path, help="also write metrics.json and metrics.md here")
    return p


def main(argv: list[str]) -> int:
    if argv[:1] == ["score"]:
        args = build_score_parser().parse_args(argv[1:])
        return run_command("trace-rt eval score", lambda: _score(args))
    args = build_parser().parse_args(argv)
    return run_command("trace-rt eval", lambda: _run(args))


def _run(a: argparse.Namespace) -> int:
    from trace_rt.evaluation.runner import EvalSettings, run_eval

    s = EvalSettings(
        benchmark=a.benchmark,
        annotations=a.annotations,
        videos=str(a.videos),
        model=str(a.model),
        out=str(a.out),
        backend=a.backend,
        url=a.url,
        task=a.task,
        limit=a.limit,
        concurrency=a.concurrency,
        frames=a.frames,
        max_new_tokens=a.max_new_tokens,
        device=a.device,
        dtype=a.dtype,
        rules=a.rules,
        use_java=False if a.no_java else None,
        progress=False if a.no_progress else None,
        report_items=a.report_items,
        report_n=a.report_n,
        links=tuple(a.link),
    )
    metrics = run_eval(s)
    print((Path(a.out) / "metrics.md").read_text(), end="")
    print(json.dumps({"out": str(a.out), "metrics": _brief(metrics)}))
    return 0


def _score(a: argparse.Namespace) -> int:
    from trace_rt.evaluation import benchmarks as bm
    from trace_rt.evaluation.report import markdown, write_report
    from trace_rt.evaluation.scoring import load_predictions, score

    bench = bm.get_benchmark(a.benchmark)
    task, items = bm.load(bench, a.annotations, a.task)
    kind, preds = load_predictions(a.predictions, task)
    use_java = False if a.no_java else None
    if task == "qa":
        from trace_rt.evaluation.videoqa import score_qa

        if kind != "records":
            raise bm.ann.AnnotationError([f"{a.predictions}: video QA scores predictions.jsonl"])
        metrics = score_qa(bench.name, items, preds)
    else:
        metrics = score(task, items, preds, kind=kind, rules=a.rules, use_java=use_java)
    if a.out is not None:
        a.out.mkdir(parents=True, exist_ok=True)
        write_report(a.out, bench.name, task, metrics, {"predictions": str(a.predictions)})
    print(markdown(bench.name, task, metrics), end="")
    print(json.dumps({"metrics": _brief(metrics)}))
    return 0


def _brief(m: dict) -> dict:
    return {k: v for k, v in m.items() if not isinstance(v, dict)}
