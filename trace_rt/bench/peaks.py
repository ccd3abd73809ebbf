"""The device's peaks, taken from the best this machine does.

A floor is only a floor if nothing real beats it, so each peak is the fastest of several
kernels, not one library's take on one size:

- bandwidth (GB/s = 1e9 B/s): every usable CPU streams its own slice of arrays far larger
  than the caches (numpy releases the GIL in these loops, so the threads run in parallel):
  ``read`` (a sum: bytes read), ``copy`` (read + write counted), ``add`` (two reads and a
  write, triad-like); and, when onnxruntime is installed, ``onnxruntime_gemv`` (a 1-row
  MatMul over a large weight matrix: what a decode step does, weight bytes counted);
- compute (TFLOP/s, float32): a square matmul at several sizes through numpy's BLAS and,
  when onnxruntime and onnx are installed, onnxruntime's MatMul (MLAS), 2n³ FLOPs each;
- int8 compute (TOP/s, with onnxruntime): ``MatMulInteger`` (uint8 x int8, MLAS's QGEMM)
  at the same sizes. Quantised decoders (and llama.cpp's Q8_0/Q4_0) multiply in int8, which
  on AVX-512 VNNI runs several times faster than float32, so their linear layers get this
  peak (:func:`trace_rt.bench.floor.stage_floors`); otherwise an int8 prefill "beats" a
  float32 floor.

Each kernel is best-of-k; the peak is the maximum over kernels. Every kernel's figure is
kept (``Peaks.details``) so a report can show which one set the peak. onnxruntime and
onnx are imported lazily: without them those kernels are listed as skipped, with the
reason. On CUDA: a 256 MiB device copy and an 8192³ fp16 matmul through torch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from trace_rt.bench.floor import Peaks, cpu_threads


def _best(fn: Callable[[], Any], repeats: int) -> float:
    """Best wall time of *fn* in seconds, after one unmeasured call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bandwidth_kernels(mbytes: int = 512, repeats: int = 5) -> dict[str, float]:
    """GB/s of each numpy streaming kernel over arrays of *mbytes* MiB, all CPUs."""
    n = mbytes * 2**20 // 4
    a, b, c = np.ones(n, np.float32), np.ones(n, np.float32), np.empty(n, np.float32)
    parts = max(1, cpu_threads())
    sa, sb, sc = (np.array_split(x, parts) for x in (a, b, c))
    out = {}
    with ThreadPoolExecutor(parts) as pool:

        def each(fn: Callable[[int], Any]) -> Callable[[], None]:
            return lambda: list(pool.map(fn, range(parts)))

        kernels = {
            "read": (each(lambda i: np.add.reduce(sa[i])), a.nbytes),
            "copy": (each(lambda i: np.copyto(sc[i], sa[i])), 2 * a.nbytes),
            "add": (each(lambda i: np.add(sa[i], sb[i], out=sc[i])), 3 * a.nbytes),
        }
        for name, (fn, nbytes) in kernels.items():
            out[name] = round(nbytes / _best(fn, repeats) / 1e9, 3)
    return out


def compute_kernels(
    sizes: tuple[int, ...] = (512, 1024, 2048), repeats: int = 3
) -> dict[str, float]:
    """TFLOP/s of a float32 n x n matmul through numpy's BLAS, for each n in *sizes*."""
    rng = np.random.default_rng(0)
    out = {}
    for n in sizes:
        x = rng.random((n, n), dtype=np.float32)
        y = rng.random((n, n), dtype=np.float32)
        best = _best(lambda x=x, y=y: x @ y, repeats)
        out[f"numpy_matmul_{n}"] = round(2 * n**3 / best / 1e12, 5)
    return out


def _ort_one_node(op: str, x: np.ndarray, w: np.ndarray) -> Callable[[], Any]:
    """A session computing ``op(x, W)`` (W a constant initializer), and its run with x fed."""
    import onnxruntime as ort  # lazily: the bench runs without them; kernels are then skipped
    from onnx import helper, numpy_helper
    from onnx.helper import np_dtype_to_tensor_dtype as onnx_type

    out = np.int32 if op == "MatMulInteger" else np.float32
    graph = helper.make_graph(
        [helper.make_node(op, ["x", "W"], ["y"])],
        "peak",
        [helper.make_tensor_value_info("x", onnx_type(x.dtype), list(x.shape))],
        [helper.make_tensor_value_info("y", onnx_type(np.dtype(out)), [x.shape[0], w.shape[1]])],
        initializer=[numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 8)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return lambda: sess.run(None, {"x": x})


def _ort_matmul(rows: int, k: int, n: int) -> Callable[[], Any]:
    """float32 ``x [rows, k] @ W [k, n]`` through onnxruntime's MatMul."""
    rng = np.random.default_rng(0)
    w = rng.random((k, n), dtype=np.float32)
    return _ort_one_node("MatMul", rng.random((rows, k), dtype=np.float32), w)


def _ort_matmul_integer(n: int) -> Callable[[], Any]:
    """``MatMulInteger(x_u8, W_s8)`` for n x n operands."""
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (n, n), dtype=np.int8)
    return _ort_one_node("MatMulInteger", rng.integers(0, 256, (n, n), dtype=np.uint8), w)


def int8_kernels(sizes: tuple[int, ...], repeats: int) -> dict[str, float]:
    """TOP/s of onnxruntime's MatMulInteger (uint8 x int8) for each n in *sizes*."""
    return {
        f"onnxruntime_matmulinteger_{n}": round(
            2 * n**3 / _best(_ort_matmul_integer(n), repeats) / 1e12, 5
        )
        for n in sizes
    }


def onnxruntime_kernels(
    sizes: tuple[int, ...], gemv_mbytes: int, repeats: int
) -> tuple[dict[str, float], dict[str, float]]:
    """(bandwidth, compute) kernels through onnxruntime's own MatMul (MLAS)."""
    compute = {}
    for n in sizes:
        run = _ort_matmul(n, n, n)
        compute[f"onnxruntime_matmul_{n}"] = round(2 * n**3 / _best(run, repeats) / 1e12, 5)
    side = int((gemv_mbytes * 2**20 // 4) ** 0.5)
    run = _ort_matmul(1, side, side)
    bandwidth = {"onnxruntime_gemv": round(side * side * 4 / _best(run, repeats + 2) / 1e9, 3)}
    return bandwidth, compute


def measure_host_peaks(quick: bool = False) -> Peaks:
    """Every host kernel; the peaks are the fastest of each kind (see module docstring)."""
    mbytes, sizes = (64, (128, 256, 512)) if quick else (512, (512, 1024, 2048))
    bw = bandwidth_kernels(mbytes)
    fl = compute_kernels(sizes)
    skipped = {}
    i8: dict[str, float] = {}
    try:
        ort_bw, ort_fl = onnxruntime_kernels(sizes, mbytes // 2, repeats=3)
        bw.update(ort_bw)
        fl.update(ort_fl)
        i8 = int8_kernels(sizes, repeats=3)
    except ImportError as e:  # onnxruntime/onnx are optional for the bench
        skipped["onnxruntime"] = f"not measured: {e}"
    return peaks_from_kernels(bw, fl, i8, skipped=skipped, threads=cpu_threads())


def peaks_from_kernels(
    bandwidth: dict[str, float],
    compute: dict[str, float],
    int8: dict[str, float] | None = None,
    **extra: Any,
) -> Peaks:
    """The peaks as the maximum over measured kernels, naming the winners."""
    best_bw = max(bandwidth, key=bandwidth.__getitem__)
    best_fl = max(compute, key=compute.__getitem__)
    best_i8 = max(int8, key=int8.__getitem__) if int8 else None
    details = {
        "bandwidth": best_bw,
        "compute": best_fl,
        "int8": best_i8,
        "bandwidth_kernels_gbps": dict(bandwidth),
        "compute_kernels_tflops": dict(compute),
        "int8_kernels_tops": dict(int8 or {}),
        **extra,
    }
    i8_peak = int8[best_i8] if best_i8 else None
    return Peaks(bandwidth[best_bw], compute[best_fl], "measured", details, i8_peak)


def best_of(measured: list[Peaks]) -> Peaks:
    """Several measurements (one per invocation) into one: each kernel's best figure, and
    the peaks from those; the per-invocation peaks are kept in ``details``."""
    if len(measured) == 1 or any(p.details is None for p in measured):
        return measured[0] if len(measured) == 1 else max(measured, key=lambda p: p.gbps)

    def best(key: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for p in measured:
            for k, v in p.details[key].items():
                out[k] = max(out.get(k, 0.0), v)
        return out

    kinds = ("bandwidth_kernels_gbps", "compute_kernels_tflops", "int8_kernels_tops")
    out = peaks_from_kernels(*map(best, kinds), skipped=measured[0].details.get("skipped", {}))
    out.details["by_invocation"] = [
        {"gbps": p.gbps, "tflops": p.tflops, "int8_tops": p.int8_tops} for p in measured
    ]
    return out


def measure_cuda_peaks(device: str = "cuda", dtype: str = "fp16") -> tuple[float, float]:
    """(GB/s, TFLOP/s) of a CUDA device through torch: a large device-to-device copy
    (read + write counted) and an 8192^3 half-precision matmul. Imports torch lazily."""
    import torch

    dev = torch.device(device)
    dt = torch.float16 if dtype == "fp16" else torch.bfloat16
    x = torch.empty(2**28, dtype=torch.uint8, device=dev)  # 256 MiB
    y = torch.empty_like(x)
    m = torch.randn(8192, 8192, dtype=dt, device=dev)
    best_bw = best_mm = float("inf")
    for _ in range(5):
        torch.cuda.synchronize(dev)
        t = time.perf_counter()
        y.copy_(x)
        torch.cuda.synchronize(dev)
        best_bw = min(best_bw, time.perf_counter() - t)
        t = time.perf_counter()
        m @ m
        torch.cuda.synchronize(dev)
        best_mm = min(best_mm, time.perf_counter() - t)
    return 2 * x.numel() / best_bw / 1e9, 2 * 8192**3 / best_mm / 1e12


def resolve_peaks(
    gbps: float | None, tflops: float | None, device: str = "cpu", quick: bool = False
) -> Peaks:
    """Given peaks win; missing ones are measured on *device* (``quick``: smaller arrays,
    for tests)."""
    if gbps is not None and tflops is not None:
        return Peaks(gbps, tflops, "given")
    if device.startswith("cuda"):
        try:
            m_gbps, m_tflops = measure_cuda_peaks(device)
        except (ImportError, RuntimeError) as e:  # no torch, or torch without CUDA
            raise ValueError(
                f"cannot measure {device}'s peaks ({e}); pass --peak-gbps and --peak-tflops"
            ) from e
        measured = Peaks(
            round(m_gbps, 3),
            round(m_tflops, 4),
            "measured",
            {"bandwidth": "device copy, 256 MiB", "compute": "fp16 matmul 8192^3 (torch)"},
        )
    else:
        measured = measure_host_peaks(quick)
    if gbps is None and tflops is None:
        return measured
    return Peaks(
        gbps if gbps is not None else measured.gbps,
        tflops if tflops is not None else measured.tflops,
        "given+measured",
        measured.details,
        measured.int8_tops,
    )
