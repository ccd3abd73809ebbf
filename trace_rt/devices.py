"""Devices the memory planner knows: memory, bandwidth and FLOP rate, with their sources.

Figures are the vendors' data-sheet peaks (dense, no sparsity), so the floor latencies the
planner derives from them are bounds no program beats, not predictions. Jetson modules share
one LPDDR5 pool between the CPU and the GPU (``unified``): everything the process holds, host
and device, counts against the same memory, of which the OS and its services keep a part.

FP16 tensor rates of the Jetson modules are derived from NVIDIA's INT8 sparse TOPS of the
GPU (dense = sparse / 2, FP16 = INT8 / 2 on Ampere tensor cores): Orin Nano 8GB 40 TOPS
-> 10 TFLOPS; Orin NX 16GB GPU 60 TOPS (the rest of its 100 is DLA) -> 15; AGX Orin 32GB
GPU 108 -> 27; AGX Orin 64GB GPU 170 -> 42.5.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

GB = 1e9
JETSON_MODULES = (
    "https://developer.nvidia.com/embedded/jetson-modules "
    "(Jetson Orin series data sheet DS-10662, Orin Nano/NX DS-11105)"
)
# What JetPack 6 and its services keep of the shared memory: the measured Orin Nano
# 8 GB figure (~5.2 GB left to applications after boot, desktop disabled).
JETSON_OS_RESERVED_GB = 2.8


@dataclass(frozen=True)
class Device:
    """One target: memory, peaks, and where the numbers come from.

    Attributes:
        memory_gb: physical memory (the GPU's, or the whole module's when unified).
        usable_gb: what a process can count on (unified: minus the OS; discrete: minus the
            driver's reserve).
        unified: CPU and GPU share ``usable_gb`` (Jetson); else host memory is separate.
        gbps: peak memory bandwidth, GB/s (1e9 B/s).
        tflops: peak dense FP16 tensor rate (FP32 for ``cpu``), TFLOP/s.
        gpu: runs the TensorRT backend (False: the onnxruntime CPU backend).
        source: where the figures come from.
        host_runtime_bytes: the runtime's own host memory (the interpreter with numpy,
            PyAV, sentencepiece and onnxruntime imported), measured for ``cpu``; None: the
            planner's typical figure.
    """

    name: str
    memory_gb: float
    usable_gb: float
    unified: bool
    gbps: float
    tflops: float
    gpu: bool
    source: str
    host_runtime_bytes: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _jetson(name: str, memory_gb: float, gbps: float, tflops: float) -> Device:
    usable = memory_gb - JETSON_OS_RESERVED_GB
    return Device(name, memory_gb, usable, True, gbps, tflops, True, JETSON_MODULES)


def _gpu(name: str, memory_gb: float, gbps: float, tflops: float, source: str) -> Device:
    # The driver and ECC keep a few per cent of a data-centre GPU's memory (nvidia-smi
    # reports e.g. 81559 MiB of an 80 GB H100 as total, ~79.6 GiB usable).
    return Device(name, memory_gb, round(memory_gb * 0.97, 2), False, gbps, tflops, True, source)


DEVICES: dict[str, Device] = {
    d.name: d
    for d in (
        _jetson("orin-nano-8gb", 8, 68, 10.0),
        _jetson("orin-nx-16gb", 16, 102.4, 15.0),
        _jetson("agx-orin-32gb", 32, 204.8, 27.0),
        _jetson("agx-orin-64gb", 64, 204.8, 42.5),
        _gpu("l4", 24, 300, 121, "NVIDIA L4 data sheet (FP16 tensor 242 TFLOPS with sparsity)"),
        _gpu(
            "a10g",
            24,
            600,
            125,
            "NVIDIA A10 data sheet (FP16 tensor 250 with sparsity); the A10G is AWS's A10 "
            "variant at lower clocks, so this floor is optimistic for it",
        ),
        _gpu("l40s", 48, 864, 362, "NVIDIA L40S data sheet (FP16 tensor 733 with sparsity)"),
        _gpu("a100-80gb", 80, 2039, 312, "NVIDIA A100 data sheet, SXM4 80GB (FP16 tensor 312)"),
        _gpu("h100-80gb", 80, 3350, 989, "NVIDIA H100 data sheet, SXM5 (FP16 tensor 1979 sparse)"),
    )
}


def cpu_device(gbps: float | None = None, tflops: float | None = None) -> Device:
    """This machine as a target for the onnxruntime CPU backend.

    Memory: ``MemAvailable`` (what the kernel can give without swapping). Peaks: given, or
    measured quickly (the fastest of the bench's streaming and matmul kernels,
    trace_rt.bench.peaks).
    """
    from trace_rt.bench.peaks import resolve_peaks

    total = avail = None
    try:
        with open("/proc/meminfo") as f:
            info = {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f)}
        total, avail = info["MemTotal"], info.get("MemAvailable", info["MemTotal"])
    except (OSError, KeyError, ValueError):
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        total = avail = pages
    peaks = resolve_peaks(gbps, tflops, "cpu", quick=True)
    return Device(
        "cpu",
        round(total / GB, 2),
        round(avail / GB, 2),
        True,
        peaks.gbps,
        peaks.tflops,
        False,
        f"this machine: /proc/meminfo; peaks {peaks.source}; runtime baseline measured",
        runtime_baseline_bytes(),
    )


def get_device(name: str, **cpu_peaks: float | None) -> Device:
    """A device by name (``cpu``: this machine)."""
    if name == "cpu":
        return cpu_device(**cpu_peaks)
    if name not in DEVICES:
        from trace_rt.errors import InputError

        raise InputError(f"unknown device {name!r}; choose from {', '.join(['cpu', *DEVICES])}")
    return DEVICES[name]


def runtime_baseline_bytes() -> float | None:
    """Peak RSS (bytes) of a fresh interpreter that imported what the onnxruntime CPU
    pipeline imports, on this machine. It moves with the install (a freshly installed venv
    mapped ~25 MB more than an older one of the same packages here), so ``cpu`` plans use
    this measurement, not a constant. None where it cannot be measured (no /proc)."""
    import subprocess
    import sys

    code = (
        "import onnxruntime, trace_rt.pipeline\n"
        "print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])"
    )
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        return int(out.stdout.strip()) * 1024.0 if out.returncode == 0 else None
    except (OSError, ValueError):
        return None
