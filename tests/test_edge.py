"""The edge install: the runtime's whole path without torch, transformers or safetensors'
torch API; and the aarch64 emulation (deploy/jetson/emulate.sh) where qemu is installed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Importing any of these fails in the child (a None entry in sys.modules), so a lazy import
# on the edge path is caught even if the module is installed here.
BLOCK = (
    "import sys\n"
    "for m in ('torch', 'transformers', 'safetensors.torch'):\n"
    "    sys.modules[m] = None\n"
)


# JetPack 6's Python: a 3.10 venv with the edge install (deploy/jetson/py310.sh makes it).
PY310 = Path(
    os.environ.get("TRACE_RT_EDGE_PYTHON")
    or Path.home() / ".cache" / "trace-rt" / "py310-edge" / "bin" / "python"
)


def _child(code: str, python: str = sys.executable) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [python, "-c", BLOCK + code], capture_output=True, text=True, env=env, cwd=REPO
    )


@pytest.fixture(scope="module")
def edge_art(tiny_ckpt, tmp_path_factory) -> Path:
    from export import export_onnx
    from export.quantize import quantize_artifact
    from export.trt_step import make_step

    # What a workstation hands the board: graphs, the int4 QDQ decoder and the decode step.
    art = export_onnx(tiny_ckpt, tmp_path_factory.mktemp("edge") / "art", progress=False)
    quantize_artifact(art, 4, forms=["qdq"])
    make_step(tiny_ckpt, art, 512)
    return art


@pytest.fixture(params=["host", "py310"])
def edge_python(request) -> tuple[str, tuple[int, int] | None]:
    """(interpreter, the version it must be): this venv's, and the Python 3.10 edge venv."""
    if request.param == "host":
        return sys.executable, None
    if not PY310.is_file():
        pytest.skip(f"no Python 3.10 edge venv at {PY310}: bash deploy/jetson/py310.sh")
    return str(PY310), (3, 10)


def test_edge_path_imports_no_torch(edge_art, clip_video, edge_python):
    # What a Jetson runs: run (onnxruntime), plan, watch over a file, `python -m export
    # trt --int4` (with the int4 decode step, then --fixed-past) and the TensorRT backend
    # (on the CPU stand-ins for tensorrt and cuda-python).
    code = f"""
import json
from trace_rt.cli import main
assert main(['run', {str(clip_video)!r}, '--model', {str(edge_art)!r}, '--backend',
             'onnxruntime', '--task', 'dvc', '--max-new-tokens', '8']) == 0
assert main(['plan', '--preset', 'trace-7b', '--device', 'orin-nx-16gb', '--frames', '64']) == 0
assert main(['watch', {str(clip_video)!r}, '--model', {str(edge_art)!r}, '--window', '2',
             '--stride', '2', '--frames', '4', '--max-new-tokens', '4']) == 0
from tests.fake_tensorrt import make_modules
sys.modules.update(make_modules())
from export.cli import main as export_main  # engines are built on the device
assert export_main(['trt', {str(edge_art)!r}, '--int4', '--max-batch', '1']) == 0
from trace_rt.pipeline import Pipeline
from trace_rt.generate import GenerationConfig
pipe = Pipeline.from_dir({str(edge_art)!r}, 'tensorrt', device='cuda')
assert pipe.backend.step is not None
pipe.run({str(clip_video)!r}, 'dvc', gen=GenerationConfig(max_new_tokens=4))
assert pipe.backend.step.graph is not None
# The memory-tight form: the step graph as the one decoder engine.
assert export_main(['trt', {str(edge_art)!r}, '--int4', '--max-batch', '1', '--fixed-past']) == 0
pipe = Pipeline.from_dir({str(edge_art)!r}, 'tensorrt', device='cuda')
assert pipe.backend.fixed_past
pipe.run({str(clip_video)!r}, 'dvc', gen=GenerationConfig(max_new_tokens=4))
bad = sorted(m for m, mod in sys.modules.items() if mod is not None and (
    m.split('.')[0] in ('torch', 'transformers') or m == 'safetensors.torch'))
print(json.dumps([bad, list(sys.version_info[:2])]), file=sys.stderr)
"""
    python, version = edge_python
    out = _child(code, python)
    assert out.returncode == 0, out.stderr[-3000:]
    bad, ran = json.loads(out.stderr.strip().splitlines()[-1])
    assert bad == []
    assert version is None or tuple(ran) == version


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("qemu-aarch64-static") is None,
    reason="qemu-user is not installed (apt-get install qemu-user-static); "
    "deploy/jetson/emulate.sh installs it when run as root",
)
def test_aarch64_emulation_matches_x86():
    # Downloads an arm64 Python (Debian packages) and aarch64 wheels once into
    # ~/.cache/trace-rt/arm64, then runs three requests on both architectures.
    out = subprocess.run(
        ["bash", str(REPO / "deploy" / "jetson" / "emulate.sh")],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.strip().endswith("aarch64 == x86")
