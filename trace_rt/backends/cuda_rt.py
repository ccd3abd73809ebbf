"""The few CUDA runtime calls the TensorRT backend needs, through ``cuda-python``.

Why cuda-python (``cuda.bindings.runtime``) rather than CuPy: the backend needs raw device
allocations, pinned host memory, async copies on one stream and stream capture into CUDA
graphs, and nothing else. cuda-python is NVIDIA's thin 1:1 binding of exactly those calls
(the one TensorRT's own Python samples use), a small wheel with no CUDA toolkit or NVRTC
at run time; CuPy would add an array library and a JIT compiler we never call. Torch is
not an option: the serving image has no torch.

Everything here takes and returns plain ints (device pointers, stream handles), because
that is what TensorRT's ``set_tensor_address`` / ``execute_async_v3`` take.
"""

from __future__ import annotations

import contextlib
import ctypes
from typing import Any

import numpy as np

try:  # cuda-python >= 12.6 ships the bindings as cuda.bindings; older releases as cuda.cudart
    from cuda.bindings import runtime as cudart
except ImportError:  # pragma: no cover - depends on the installed cuda-python
    try:
        from cuda import cudart  # type: ignore[no-redef]
    except ImportError as e:
        raise ImportError(
            "the TensorRT backend needs the `cuda-python` package for device memory and "
            "streams (pip install 'trace-rt[tensorrt]', or the cuda-python wheel matching "
            f"your CUDA major version): {e}"
        ) from e


class CudaError(RuntimeError):
    """A CUDA runtime call failed."""


def check(result: Any) -> Any:
    """Unpack a cuda-python ``(err, *values)`` tuple; raise on error."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        _, msg = cudart.cudaGetErrorString(err)
        raise CudaError(f"CUDA error {int(err)}: {msg.decode() if msg else err}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def set_device(device: int) -> None:
    check(cudart.cudaSetDevice(device))


def device_info(device: int = 0) -> dict[str, Any]:
    """Name, compute capability and memory of *device* (what engines are tied to)."""
    prop = check(cudart.cudaGetDeviceProperties(device))
    name = prop.name.decode() if isinstance(prop.name, bytes) else str(prop.name)
    return {
        "name": name.rstrip("\x00").strip(),
        "compute_capability": f"{prop.major}.{prop.minor}",
        "memory_bytes": int(prop.totalGlobalMem),
    }


class Stream:
    """One non-blocking stream; all the backend's work is ordered on it."""

    def __init__(self) -> None:
        # The cuda-python object goes to cuda-python calls, the int to TensorRT.
        self.obj = check(cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking))
        self.handle = int(self.obj)

    def synchronize(self) -> None:
        check(cudart.cudaStreamSynchronize(self.obj))

    def close(self) -> None:
        if self.obj is not None:
            check(cudart.cudaStreamDestroy(self.obj))
            self.obj = None


class DeviceBuffer:
    """``nbytes`` of device memory, freed on :meth:`free` (or at garbage collection)."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = int(nbytes)
        # cudaMalloc(0) returns a null pointer; TensorRT wants a real address even for
        # empty tensors, so every buffer holds at least 256 bytes (the alignment unit).
        self.ptr = int(check(cudart.cudaMalloc(max(self.nbytes, 256))))

    def free(self) -> None:
        if self.ptr:
            check(cudart.cudaFree(self.ptr))
            self.ptr = 0

    def __del__(self) -> None:  # best effort: the context may already be gone at exit
        with contextlib.suppress(Exception):
            self.free()


class PinnedArray:
    """Page-locked host memory viewed as a numpy array (async copies need pinned memory)."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype | str) -> None:
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        self.ptr = int(check(cudart.cudaMallocHost(max(nbytes, 1))))
        raw = (ctypes.c_uint8 * max(nbytes, 1)).from_address(self.ptr)
        self.array = np.frombuffer(raw, dtype=np.uint8, count=nbytes).view(dtype).reshape(shape)

    def free(self) -> None:
        if self.ptr:
            self.array = np.empty(0)
            check(cudart.cudaFreeHost(self.ptr))
            self.ptr = 0

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.free()


def copy_htod(dst: int, src: int, nbytes: int, stream: Stream) -> None:
    if nbytes:
        kind = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        check(cudart.cudaMemcpyAsync(dst, src, nbytes, kind, stream.obj))


def copy_dtoh(dst: int, src: int, nbytes: int, stream: Stream) -> None:
    if nbytes:
        kind = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        check(cudart.cudaMemcpyAsync(dst, src, nbytes, kind, stream.obj))


def copy_dtod(dst: int, src: int, nbytes: int, stream: Stream) -> None:
    if nbytes:
        kind = cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        check(cudart.cudaMemcpyAsync(dst, src, nbytes, kind, stream.obj))


def copy_2d(
    dst: int, dpitch: int, src: int, spitch: int, width: int, height: int, stream: Stream
) -> None:
    """Device-to-device copy of *height* rows of *width* bytes between strided layouts
    (``cudaMemcpy2DAsync``): one call moves a KV row of every layer, or a sequence's
    positions into its strided pool slot."""
    if width and height:
        kind = cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        check(cudart.cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, height, kind, stream.obj))


def memset(ptr: int, value: int, nbytes: int, stream: Stream) -> None:
    if nbytes:
        check(cudart.cudaMemsetAsync(ptr, value, nbytes, stream.obj))


class Graph:
    """A CUDA graph captured from *stream* around ``record()``; replay with :meth:`launch`."""

    def __init__(self, stream: Stream, record: Any) -> None:
        # Thread-local mode: only this thread's unsafe calls break the capture, so another
        # thread of a server doing cudaMalloc cannot invalidate it.
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self._graph = self._exec = None
        check(cudart.cudaStreamBeginCapture(stream.obj, mode))
        try:
            try:
                record()
            finally:  # always end the capture, or the stream stays in capture mode
                err, graph = cudart.cudaStreamEndCapture(stream.obj)
                self._graph = graph if graph is not None and int(graph) else None
            check((err,))
            self._exec = check(cudart.cudaGraphInstantiate(self._graph, 0))
        except Exception:
            # A failed capture or instantiation: release what was made and clear the error
            # it left in the CUDA runtime's state, which TensorRT would otherwise report as
            # the failure of its next, unrelated enqueue.
            if self._graph is not None:
                cudart.cudaGraphDestroy(self._graph)
                self._graph = None
            cudart.cudaGetLastError()
            raise

    def launch(self, stream: Stream) -> None:
        check(cudart.cudaGraphLaunch(self._exec, stream.obj))

    def close(self) -> None:
        if self._exec is not None:
            check(cudart.cudaGraphExecDestroy(self._exec))
        if self._graph is not None:
            check(cudart.cudaGraphDestroy(self._graph))
        self._exec = self._graph = None
