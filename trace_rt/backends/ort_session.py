"""onnxruntime sessions' surroundings for the backend: the execution providers a
``--device`` maps to, the optimised-graph cache directory, the graph I/O check, the
installed version (:mod:`trace_rt.backends.onnxruntime_backend` builds the sessions)."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any

import onnxruntime as ort

from trace_rt.errors import CheckpointError, DeviceError, InputError
from trace_rt.graphs import GraphSpec

CPU_EP = "CPUExecutionProvider"
CUDA_EP = "CUDAExecutionProvider"


def ort_version() -> tuple[int, int]:
    """(major, minor) of the installed onnxruntime (``1.23.2`` -> (1, 23))."""
    major, minor = re.findall(r"\d+", ort.__version__)[:2]
    return int(major), int(minor)


def providers_for(device: str) -> tuple[list[Any], str, int]:
    """(providers, OrtValue device type, device id) for a ``--device`` string."""
    available = ort.get_available_providers()
    kind, _, index = device.partition(":")
    if kind == "auto":
        kind = "cuda" if CUDA_EP in available else "cpu"
    if kind == "cpu":
        return [CPU_EP], "cpu", 0
    if kind == "cuda":
        if CUDA_EP not in available:
            raise DeviceError(
                f"--device {device} needs onnxruntime's CUDA execution provider "
                f"(pip install onnxruntime-gpu); this onnxruntime has {available}"
            )
        dev = int(index or 0)
        return [(CUDA_EP, {"device_id": dev}), CPU_EP], "cuda", dev
    raise InputError(f"unknown device {device!r}; use cpu, cuda[:N] or auto")


WARNED: set[str] = set()


def warn_once(key: Path | str | None, message: str) -> None:
    """A RuntimeWarning for *key* (a cache directory), once per process."""
    if str(key) not in WARNED:
        WARNED.add(str(key))
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def cache_dir_for(model_dir: Path, option: str | Path | bool | None) -> Path | None:
    """The optimised-graph cache directory: the one named (which must be usable), else the
    first writable default; None if caching is off or no default is writable (warned)."""
    if option is False:
        return None
    if option not in (None, True):
        d = Path(option)
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"cache_dir {d}: cannot create it ({e})") from e
        if not os.access(d, os.W_OK):
            raise InputError(f"cache_dir {d}: not writable")
        return d
    candidates = [model_dir / ".ort_cache", Path.home() / ".cache" / "trace-rt" / "ort"]
    problems = []
    for d in candidates:
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            problems.append(f"{d}: {e}")
            continue
        if os.access(d, os.W_OK):
            return d
        problems.append(f"{d}: not writable")
    warn_once(
        "no-cache-dir",
        f"no writable optimised-graph cache ({'; '.join(problems)}); graphs are optimised at "
        "every load (name a cache_dir, or pass cache_dir=False to silence this)",
    )
    return None


def check_io(sess: ort.InferenceSession, spec: GraphSpec, path: Path) -> None:
    """The graph's inputs/outputs must be the spec's (catches a graph from another export)."""
    got_in = [i.name for i in sess.get_inputs()]
    got_out = [o.name for o in sess.get_outputs()]
    if got_in != spec.input_names or got_out != spec.output_names:
        raise CheckpointError(
            f"{path}: inputs {got_in} / outputs {got_out} differ from the manifest's "
            f"{spec.input_names} / {spec.output_names}"
        )
