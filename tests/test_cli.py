"""The command lines' shared shape (trace_rt.cliutil) and `trace-rt run`'s user errors:
one line naming the problem and an exit code, never a traceback or a usage block."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trace_rt.cli import main as trace_rt_main
from trace_rt.cliutil import (
    EXIT_BROKEN_PIPE,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    Parser,
    run_command,
)
from trace_rt.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def artifact(tiny_ckpt, tmp_path_factory) -> Path:
    from export import export_onnx

    return export_onnx(tiny_ckpt, tmp_path_factory.mktemp("cli") / "art", progress=False)


def _main(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = trace_rt_main([str(a) for a in argv])
    except SystemExit as e:  # argparse's errors
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_line(err: str) -> str:
    assert "Traceback" not in err and "usage:" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# ---- the shared helper ---------------------------------------------------------------
def test_choice_typo_is_one_line(capsys):
    p = Parser(prog="tool")
    p.add_argument("--task", choices=["dvc", "mr", "vhd"])
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--task", "dcv"])
    assert e.value.code == EXIT_USAGE
    assert _one_line(capsys.readouterr().err) == (
        "tool: error: unknown task 'dcv'; choose dvc, mr, vhd"
    )
    sub = p.add_subparsers(dest="cmd")
    s = sub.add_parser("go")
    s.add_argument("--on-bad-sample", choices=["fail", "skip"])
    with pytest.raises(SystemExit):
        p.parse_args(["go", "--on-bad-sample", "x"])
    assert _one_line(capsys.readouterr().err) == (
        "tool go: error: unknown --on-bad-sample value 'x'; choose fail, skip"
    )


def test_help_shows_defaults():
    p = Parser(prog="tool")
    p.add_argument("--runs", type=int, default=10, help="timed runs")
    p.add_argument("--threads", type=int, default=0, help="threads")
    p.add_argument("--label", help="a label")
    p.add_argument("--flag", action="store_true", help="a flag")
    p.add_argument("--url", default="x:1", help="endpoint (default %(default)s)")
    text = " ".join(p.format_help().split())
    assert "timed runs (default: 10)" in text and "threads (default: 0)" in text
    assert "a label (default" not in text and "a flag (default" not in text
    assert text.count("default") == 3  # the url's own wording is kept, not doubled


@pytest.mark.parametrize(
    ("exc", "code", "message"),
    [
        (InputError("missing query"), EXIT_USAGE, "tool: error: missing query"),
        (FileNotFoundError(2, "No such file or directory", "a.yaml"), EXIT_USAGE,
         "tool: error: No such file or directory: a.yaml"),
        (PermissionError(13, "Permission denied", "v.mp4"), 1,
         "tool: error: Permission denied: v.mp4"),
        (KeyboardInterrupt(), EXIT_INTERRUPTED, "tool: interrupted"),
        (ImportError("the tensorrt backend needs the `tensorrt` package"), 1,
         "tool: error: the tensorrt backend needs the `tensorrt` package"),
        (ValueError("a recipe key"), EXIT_USAGE, "tool: error: a recipe key"),
    ],
)  # fmt: skip
def test_run_command_maps_errors(capsys, exc, code, message):
    def body():
        raise exc

    assert run_command("tool", body, user_errors=(ValueError,)) == code
    assert _one_line(capsys.readouterr().err) == message


def test_run_command_lets_bugs_through():
    def body():
        raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        run_command("tool", body)


def test_broken_pipe_is_quiet():
    code = (
        "import sys\nfrom trace_rt.cliutil import run_command\n"
        "def body():\n    for _ in range(10000):\n        print('x' * 1000)\n"
        "sys.exit(run_command('tool', body))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={"PYTHONPATH": str(ROOT)},
    )
    proc.stdout.read(10)
    proc.stdout.close()  # like `| head -c 10`
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == EXIT_BROKEN_PIPE
    assert err == "", err


# ---- trace-rt run ----------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["checkpoint", "artifact"])
def test_cuda_without_cuda_is_one_line(capsys, tiny_ckpt, artifact, clip_video, kind):
    if kind == "checkpoint":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
        model = tiny_ckpt
    else:
        import onnxruntime as ort

        if "CUDAExecutionProvider" in ort.get_available_providers():
            pytest.skip("this onnxruntime has CUDA")
        model = artifact
    code, out, err = _main(capsys, "run", clip_video, "--model", model, "--device", "cuda")
    assert code == EXIT_USAGE and out == ""
    assert "cuda" in _one_line(err).lower()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seed", "-1"], "seed must be a non-negative integer, got -1"),
        (["--task", "dcv"], "unknown task 'dcv'; choose dvc, mr, vhd, custom"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--task", "custom"], "question"),
    ],
)
def test_run_user_errors_are_one_line(capsys, tiny_ckpt, clip_video, args, message):
    code, _, err = _main(capsys, "run", clip_video, "--model", tiny_ckpt, *args)
    assert code == EXIT_USAGE
    assert message in _one_line(err)


def test_backend_follows_the_model_directory(capsys, tiny_ckpt, artifact, clip_video):
    args = ["--task", "mr", "--query", "a red circle", "--max-new-tokens", "12"]
    code, out, err = _main(capsys, "run", clip_video, "--model", artifact, *args)
    assert code == 0, err
    inferred = json.loads(out)
    code, out, err = _main(capsys, "run", clip_video, "--model", tiny_ckpt, *args)
    assert code == 0, err
    assert inferred["token_ids"] == json.loads(out)["token_ids"]  # ort == torch on tiny
    from trace_rt.pipeline import Pipeline

    assert Pipeline.from_dir(artifact, cache_dir=False).backend.name == "onnxruntime"
    assert Pipeline.from_dir(tiny_ckpt).backend.name == "torch"
    # A backend that cannot read the directory says which flag to use.
    code, _, err = _main(capsys, "run", clip_video, "--model", artifact, "--backend", "torch")
    assert code == EXIT_USAGE and "--backend onnxruntime" in _one_line(err)
    code, _, err = _main(capsys, "run", clip_video, "--model", tiny_ckpt,
                         "--backend", "onnxruntime")  # fmt: skip
    assert code == EXIT_USAGE and "--backend torch" in _one_line(err)
    assert "python -m export onnx" in err


def test_free_question(capsys, tiny_ckpt, clip_video):
    from trace_rt.tokenizer import TextTokenizer

    question = "When does the red circle move?"
    code, out, err = _main(capsys, "run", clip_video, "--model", tiny_ckpt, "--question",
                           question, "--max-new-tokens", "16")  # fmt: skip
    assert code == 0, err
    res = json.loads(out)
    assert res["task"] == "custom"
    assert res["answer"] == (res["events"][0]["caption"] if res["events"] else "")
    # The question itself is in the prompt (the library's custom-question path).
    ids = TextTokenizer.from_dir(tiny_ckpt).encode(question)[1:]  # without the dummy prefix
    prompt = res["prompt_ids"]
    assert any(prompt[i : i + len(ids)] == ids for i in range(len(prompt)))
    code, out2, _ = _main(capsys, "run", clip_video, "--model", tiny_ckpt, "--task", "custom",
                          "--question", question, "--max-new-tokens", "16")  # fmt: skip
    assert code == 0 and json.loads(out2)["token_ids"] == res["token_ids"]


def test_several_questions_one_call(capsys, tiny_ckpt, clip_video):
    # --query repeated: one JSON line per question, each the ids a lone run gives, the
    # video encoded and prefilled up to the question once.
    base = ["run", clip_video, "--model", tiny_ckpt, "--max-new-tokens", "12"]
    queries = ["a red circle", "the blue square"]
    code, out, err = _main(capsys, *base, "--task", "mr", "--query", queries[0],
                           "--query", queries[1], "--task", "dvc")  # fmt: skip
    assert code == EXIT_USAGE and "need 1 --query" in err and out == ""
    args = [x for q in queries for x in ("--query", q)]
    code, out, err = _main(capsys, *base, "--task", "mr", *args)
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [r["query"] for r in lines] == queries
    assert [r["cache"]["prefix"] for r in lines] == [False, True]
    for q, r in zip(queries, lines, strict=True):
        code, out, err = _main(capsys, *base, "--task", "mr", "--query", q)
        assert code == 0 and json.loads(out)["token_ids"] == r["token_ids"]
    # Several tasks: each mr/vhd task takes the next query; dvc takes none.
    code, out, err = _main(capsys, *base, "--task", "dvc", "--task", "vhd", "--query", "x")
    assert code == 0, err
    assert [json.loads(line)["task"] for line in out.splitlines()] == ["dvc", "vhd"]


# ---- every command line ----------------------------------------------------------------
def _parsers():
    from export.cli import build_parser as export_parser
    from trace_rt.bench.cli import build_parser as bench_parser
    from trace_rt.cli import build_parser as trace_rt_parser
    from trace_rt.evaluation.cli import build_parser as eval_parser
    from trace_rt.evaluation.cli import build_score_parser as eval_score_parser
    from training.cli import _parser as training_parser
    from triton_repo.__main__ import build_parser as triton_repo_parser

    every = (trace_rt_parser, export_parser, training_parser, triton_repo_parser, bench_parser,
             eval_parser, eval_score_parser)  # fmt: skip
    for parser in (make() for make in every):
        yield parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                yield from action.choices.values()


def test_every_option_with_a_default_says_it():
    missing = []
    for parser in _parsers():
        assert isinstance(parser, Parser), parser.prog  # one-line errors everywhere
        for action in parser._actions:
            if not action.option_strings or action.default in (None, False, argparse.SUPPRESS):
                continue
            entry = parser._get_formatter()._format_action(action)  # the option's help lines
            if "default" not in entry:
                missing.append(f"{parser.prog} {action.option_strings[-1]}")
    assert not missing, missing


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-m", "export", "onnx", "nope", "out"], "checkpoint directory not found: nope"),
        (["-m", "export", "onnx", "nope", "out", "--dtype", "fp64"],
         "unknown dtype 'fp64'; choose fp32, fp16, bf16"),
        (["-m", "triton_repo", "build", "nope", "out"], "no manifest.json"),
        (["-m", "training", "make-checkpoint", "c", "--preset", "huge"], "unknown preset 'huge'"),
        (["-m", "trace_rt", "run", "v.mp4", "--model", "m", "--task", "dcv"], "unknown task"),
    ],
)  # fmt: skip
def test_command_line_errors_are_one_line(tmp_path, argv, message):
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert proc.returncode == EXIT_USAGE
    assert message in _one_line(proc.stderr)
    assert not (tmp_path / "out").exists()
