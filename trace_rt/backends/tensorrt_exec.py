"""Execution-context plumbing of the TensorRT backend: checked setters and CUDA graphs.

TensorRT's setters return False (and log why) for what they refuse: an unknown tensor, a
shape outside the active optimisation profile, an address that is not 256-byte aligned
(``IExecutionContext::setTensorAddress``: "The pointer must have at least 256-byte
alignment", NvInferRuntime.h since TensorRT 10.0). Running on after a refusal computes
with the previous shape or address, so every call here checks and names the tensor.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from trace_rt.backends import cuda_rt
from trace_rt.backends.tensorrt_kv import ALIGN
from trace_rt.errors import InputError
from trace_rt.graphs import TensorSpec

ITEMSIZE = {"FLOAT": 4, "HALF": 2, "BF16": 2, "INT64": 8, "INT32": 4, "INT8": 1, "BOOL": 1}


def shape_of(t: TensorSpec, dims: dict[str, int]) -> tuple[int, ...]:
    """*t*'s shape with its symbolic dims filled in from *dims*."""
    return tuple(dims[d] if isinstance(d, str) else d for d in t.shape)


def set_shape(ctx: Any, name: str, shape: tuple[int, ...], graph: str) -> None:
    if not ctx.set_input_shape(name, shape):
        raise InputError(
            f"TensorRT refused shape {list(shape)} for {graph} input {name!r} (outside the "
            "engine's optimisation profile? rebuild with larger `export trt` limits)"
        )


def set_address(ctx: Any, name: str, ptr: int) -> None:
    if not ctx.set_tensor_address(name, ptr):
        raise RuntimeError(
            f"TensorRT refused address {ptr:#x} for tensor {name!r}"
            + (f" (not {ALIGN}-byte aligned)" if ptr % ALIGN else "")
        )


def execute(ctx: Any, stream: cuda_rt.Stream, graph: str) -> None:
    if not ctx.execute_async_v3(stream.handle):
        raise RuntimeError(f"TensorRT failed to enqueue {graph} (see its log above)")


class PastGraphs:
    """Decode-step CUDA graphs keyed by past length P, for engines whose step shapes
    depend on P (the dynamic decoder; see the backend's docstring).

    The first step at a given P runs normally, the second runs once more on a context of
    its own (TensorRT needs one normal run after a shape change before capture),
    synchronises, then captures; later ones replay. At most *capacity* graphs are kept
    (the first ones: every request walks P upwards, so least-recently-used would evict
    exactly what the next request needs first). A failed capture is released, its CUDA
    error cleared (by :class:`cuda_rt.Graph`), and graphs are off from then on.

    Args:
        capacity: most graphs kept (0: none).
        stream: the backend's stream.
        new_context: makes a fresh execution context on the step's profile.
    """

    def __init__(self, capacity: int, stream: cuda_rt.Stream, new_context: Callable[[], Any]):
        self.capacity = max(0, int(capacity))
        self.stream, self._new_context = stream, new_context
        self.graphs: dict[int, tuple[Any, cuda_rt.Graph]] = {}
        self.seen: set[int] = set()

    def run(self, past: int, plain: Any, bind: Callable[[Any], None], graph: str) -> None:
        """One step at *past*: replayed, captured, or run on the *plain* context.

        *bind* sets a context's shapes and addresses for this step; *graph* names the
        engine in errors.
        """
        if past in self.graphs:
            self.graphs[past][1].launch(self.stream)
            return
        if not self.capacity or past not in self.seen or len(self.graphs) >= self.capacity:
            self.seen.add(past)
            bind(plain)
            execute(plain, self.stream, graph)
            return
        ctx = self._new_context()
        bind(ctx)
        execute(ctx, self.stream, graph)  # this step's result; also settles the new shapes
        captured = self.capture(lambda: execute(ctx, self.stream, graph))
        if captured is not None:
            self.graphs[past] = (ctx, captured)

    def capture(self, record: Callable[[], None]) -> cuda_rt.Graph | None:
        """A graph of *record*, captured from an idle stream (the warm-up run and any lazy
        work TensorRT did in it must be finished, as trtexec does before it captures);
        None, with a warning and graphs turned off, if the capture fails."""
        self.stream.synchronize()
        try:
            return cuda_rt.Graph(self.stream, record)
        except (cuda_rt.CudaError, RuntimeError) as e:  # Graph released it, error cleared
            warnings.warn(f"CUDA graph capture failed, running without graphs: {e}", stacklevel=4)
            self.capacity = 0
            return None

    def clear(self) -> None:
        self.stream.synchronize()
        for _, graph in self.graphs.values():
            graph.close()
        self.graphs.clear()
        self.seen.clear()
