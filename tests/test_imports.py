"""The serving and edge images carry no torch: the runtime must not import it."""

from __future__ import annotations

import subprocess
import sys

import pytest

TORCH_FREE = [
    "trace_rt",
    "trace_rt.cli",
    "trace_rt.config",
    "trace_rt.video",
    "trace_rt.preprocess",
    "trace_rt.tokenizer",
    "trace_rt.prompts",
    "trace_rt.events",
    "trace_rt.constrained",
    "trace_rt.generate",
    "trace_rt.pipeline",
    "trace_rt.backends",
    "trace_rt.backends.onnxruntime_backend",
    "trace_rt.serving.protocol",
    "trace_rt.serving.server",
    "trace_rt.serving.client",
    "trace_rt.serving.engine_thread",
    "trace_rt.serving.jobs",
    "trace_rt.serving.metrics",
    "trace_rt.serving.remote",
    "triton_repo.build",
]


@pytest.mark.parametrize("module", TORCH_FREE)
def test_no_torch_or_transformers(module):
    code = (
        f"import sys, {module}; "
        "bad = sorted(m for m in ('torch', 'transformers') if m in sys.modules); "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"{module} imports {out.stdout.strip()}"


def test_cli_help_without_torch():
    out = subprocess.run(
        [sys.executable, "-m", "trace_rt", "run", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0
    assert "--constrained" in out.stdout and "--query" in out.stdout
