"""What the numbers were measured on, and peak memory per backend.

Peak host RSS: Linux keeps a process's high-water mark (``VmHWM``) and lets the process
reset it by writing ``5`` to ``/proc/self/clear_refs``; the bench resets it before loading
each backend, so each backend's figure is the process's peak while that backend was
loaded and running (interpreter and shared libraries included; earlier backends are freed
first). Without that file (not Linux) ``ru_maxrss`` is used: a lifetime peak, so later
backends can only report at least the earlier ones' peak (flagged in the JSON).
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import resource
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from trace_rt.bench.floor import cpu_threads

LIBRARIES = (
    "trace-rt",
    "numpy",
    "onnxruntime",
    "onnxruntime-gpu",
    "torch",
    "transformers",
    "tensorrt",
    "tensorrt-cu12",
    "av",
    "tritonclient",
)


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def cpu_model() -> str:
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def physical_cores() -> int | None:
    """Distinct (package, core) pairs among the CPUs this process may use."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    cores = set()
    for cpu in allowed or range(os.cpu_count() or 0):
        base = f"/sys/devices/system/cpu/cpu{cpu}/topology/"
        pkg, core = _read(base + "physical_package_id").strip(), _read(base + "core_id").strip()
        if not core:
            return None
        cores.add((pkg, core))
    return len(cores) or None


def gpus() -> list[dict[str, Any]]:
    """GPUs as nvidia-smi reports them (none when it is absent)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    rows = [[c.strip() for c in line.split(",")] for line in out.strip().splitlines()]
    return [{"name": r[0], "memory": r[1], "driver": r[2]} for r in rows if len(r) == 3]


def library_versions() -> dict[str, str]:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def git_commit(repo: Path) -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(
                ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=20
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def memory_total_gb() -> float | None:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / 2**20, 2)
    return None


def machine_info() -> dict[str, Any]:
    """CPU, cores, threads, GPUs, library versions, git commit, load when measured."""
    repo = Path(__file__).resolve().parents[2]
    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_model": cpu_model(),
        "cores": physical_cores(),
        "threads": cpu_threads(),
        "host_cpus": os.cpu_count(),
        "memory_gb": memory_total_gb(),
        "gpu": gpus(),
        "libraries": library_versions(),
        "git": git_commit(repo),
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


# ---- peak memory ---------------------------------------------------------------------------
def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def status_mb(field: str) -> float | None:
    """A memory field of ``/proc/self/status`` in MB (``VmRSS``, ``VmHWM``, ``RssAnon``:
    allocated, ``RssFile``: mapped files); None where there is no such field."""
    for line in _read("/proc/self/status").splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return None


def peak_rss_mb() -> float:
    """Peak resident set since the last reset (VmHWM), else the lifetime peak."""
    if (hwm := status_mb("VmHWM")) is not None:
        return round(hwm, 1)
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kb / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


class GpuMemory:
    """Peak GPU memory of this process: torch's allocator peak when torch drives CUDA, else
    the device's used memory sampled by NVML (other processes included) when pynvml is
    installed; None when neither applies."""

    def __init__(self, device: str):
        self.device = device
        self._torch = None
        self._nvml = None
        self._baseline = 0.0
        self._peak = 0.0
        if not device.startswith("cuda"):
            return
        if "torch" in sys.modules:
            import torch

            if torch.cuda.is_available():
                self._torch = torch
        try:
            import pynvml

            pynvml.nvmlInit()
            index = int(device.partition(":")[2] or 0)
            self._nvml = (pynvml, pynvml.nvmlDeviceGetHandleByIndex(index))
        except Exception:  # no pynvml / no driver: NVML sampling is optional
            self._nvml = None

    def reset(self) -> None:
        if self._torch is not None:
            self._torch.cuda.reset_peak_memory_stats(self.device)
        self._peak = self._baseline = self._nvml_used() or 0.0

    def sample(self) -> None:
        used = self._nvml_used()
        if used is not None:
            self._peak = max(self._peak, used)

    def peak_mb(self) -> float | None:
        if self._torch is not None and self._torch.cuda.max_memory_reserved(self.device):
            return round(self._torch.cuda.max_memory_reserved(self.device) / 2**20, 1)
        if self._nvml is not None:
            return round((self._peak - self._baseline) / 2**20, 1)
        return None

    def _nvml_used(self) -> float | None:
        if self._nvml is None:
            return None
        pynvml, handle = self._nvml
        return float(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
