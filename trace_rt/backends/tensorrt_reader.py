"""Engine files fed to TensorRT piece by piece: its stream reader over a memory map.

``IRuntime::deserializeCudaEngine(IStreamReaderV2&)`` (TensorRT 10.7+, NvInferRuntime.h;
``IStreamReader`` from 10.0, deprecated in 11) lets the runtime pull an engine in chunks
instead of taking one host buffer holding the whole file. Python's ``read`` returns a
buffer that the bindings copy into TensorRT's destination (python/src/infer/pyCore.cpp,
``PyStreamReaderV2::read``); returning slices of a read-only ``mmap`` means the only host
copy is the file's page cache, which the kernel can drop, rather than an anonymous
``bytes`` of the engine's size: on a unified-memory Jetson a second 4 GB copy does not fit.
"""

from __future__ import annotations

import contextlib
import mmap
from pathlib import Path
from typing import Any

import tensorrt as trt

_Reader = getattr(trt, "IStreamReaderV2", None) or trt.IStreamReader


class EngineReader(_Reader):
    """Feeds an engine file to ``deserialize_cuda_engine`` piece by piece from a memory map.

    TensorRT >= 10.7 takes an ``IStreamReaderV2`` (``read(nbytes, stream)`` and ``seek``),
    10.3-10.6 an ``IStreamReader`` (``read(nbytes)``); the Python bindings copy each
    returned buffer into TensorRT's destination. Slices of the map are returned, not bytes,
    so no anonymous copy of the engine is made: what is read is file-backed page cache.
    """

    def __init__(self, path: Path):
        _Reader.__init__(self)
        self._file = open(path, "rb")  # noqa: SIM115 - closed in close()
        size = path.stat().st_size
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        self._view = memoryview(self._map) if self._map is not None else memoryview(b"")
        self._pos = 0

    def read(self, nbytes: int, stream: int = 0) -> memoryview:
        end = min(self._pos + int(nbytes), len(self._view))
        chunk, self._pos = self._view[self._pos : end], end
        return chunk

    def seek(self, offset: int, where: Any) -> bool:
        base = {0: 0, 1: self._pos, 2: len(self._view)}[_whence(where)]
        if not 0 <= base + offset <= len(self._view):
            return False
        self._pos = base + offset
        return True

    def close(self) -> None:
        # A slice TensorRT still holds keeps the map open until it is collected.
        with contextlib.suppress(BufferError):
            self._view.release()
            if self._map is not None:
                self._map.close()
        self._file.close()

    def __enter__(self) -> EngineReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _whence(where: Any) -> int:
    seek = getattr(trt, "SeekPosition", None)
    if seek is not None:
        for i, name in enumerate(("SET", "CUR", "END")):
            if where == getattr(seek, name):
                return i
    return int(where)
