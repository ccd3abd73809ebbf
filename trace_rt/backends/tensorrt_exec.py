"""Execution-context plumbing of the TensorRT backend: engine loading, checked setters,
CUDA graphs per past length (:class:`PastGraphs`) and the fixed-shape decode step
(:class:`StepEngine`).

TensorRT's setters return False (and log why) for what they refuse: an unknown tensor, a
shape outside the active optimisation profile, an address that is not 256-byte aligned
(``IExecutionContext::setTensorAddress``: "The pointer must have at least 256-byte
alignment", NvInferRuntime.h since TensorRT 10.0). Running on after a refusal computes
with the previous shape or address, so every call here checks and names the tensor.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trace_rt.backends import cuda_rt
from trace_rt.backends import tensorrt_manifest as tm
from trace_rt.backends.tensorrt_kv import ALIGN, DeviceKVPool, KVTensor
from trace_rt.errors import CheckpointError, InputError
from trace_rt.graphs import BATCH_DIM, GraphSpec, TensorSpec

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


def bind(
    ctx: Any,
    plain: list[TensorSpec],
    kv: list[tuple[KVTensor, int, int]],
    dims: dict[str, int],
    graph: str,
) -> None:
    """Shapes for *dims* of the *plain* inputs and the cache tensors, and each cache
    tensor's ``(tensor, past address, output address)`` in *kv*."""
    for t in plain:
        set_shape(ctx, t.name, shape_of(t, dims), graph)
    for t, past, out in kv:
        set_shape(ctx, t.past, shape_of(t.spec, dims), graph)
        set_address(ctx, t.past, past)
        set_address(ctx, t.out, out)


def execute(ctx: Any, stream: cuda_rt.Stream, graph: str) -> None:
    if not ctx.execute_async_v3(stream.handle):
        raise RuntimeError(f"TensorRT failed to enqueue {graph} (see its log above)")


def load_engine(runtime: Any, root: Path, rec: dict[str, Any], spec: GraphSpec, graph: str) -> Any:
    """Deserialise engine *rec* of artifact *root*, checking its tensors against *spec*.

    Through a stream reader over a memory map of the file
    (:mod:`~trace_rt.backends.tensorrt_reader`), so the engine is never held as a second,
    anonymous copy in host memory.
    """
    import tensorrt as trt

    from trace_rt.backends.tensorrt_reader import EngineReader

    with EngineReader(root / rec["file"]) as reader:
        engine = runtime.deserialize_cuda_engine(reader)
    if engine is None:
        raise CheckpointError(
            f"{root}: TensorRT {trt.__version__} cannot load {rec['file']}; "
            f"rebuild with `python -m export trt {root}`"
        )
    names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
    if names != {*spec.input_names, *spec.output_names}:
        raise CheckpointError(
            f"{rec['file']}: tensors {sorted(names)} differ from the manifest's spec of "
            f"{graph}; rebuild with `python -m export trt {root}`"
        )
    return engine


def user_managed_context(engine: Any, memory: cuda_rt.DeviceBuffer, strategy: Any) -> Any:
    """A context running in *memory* (activation memory shared by contexts that never run
    at once, on one stream); *strategy* is ``ExecutionContextAllocationStrategy.USER_MANAGED``."""
    ctx = engine.create_execution_context(strategy)
    if hasattr(ctx, "set_device_memory"):
        ctx.set_device_memory(memory.ptr, memory.nbytes)
    else:  # TensorRT 10.0
        ctx.device_memory = memory.ptr
    return ctx


def memory_size(engine: Any) -> int:
    """Activation memory *engine* needs (``device_memory_size_v2`` from TensorRT 10.1)."""
    return int(getattr(engine, "device_memory_size_v2", None) or engine.device_memory_size)


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


class StepEngine:
    """The fixed-shape decode step (export/trt_step.py) of a one-slot pool, bound once.

    Its past input is the whole cache but the last row (masked inside the engine by
    ``position_ids``: the past length is data), its new K/V go to the pool's aligned
    ``new`` rows and are scattered into place after each step; embeddings, positions and
    logits are the decoder's buffers. So every step of every request has the same shapes
    and addresses, and one CUDA graph, captured at the first step, replays them all.

    Args:
        ctx: a user-managed context of the step engine, on its ``decode`` profile.
        plain_inputs: the decoder's ``inputs_embeds`` and ``position_ids`` specs.
        addresses: the decoder's embeds, positions and logits buffers by tensor name.
        kv: the backend's one-slot pool (zero-filled: masked rows meet 0 * value).
        graphs: the backend's graph bookkeeping (its capacity turns capture on and off).
    """

    NAME = tm.STEP

    def __init__(
        self,
        ctx: Any,
        plain_inputs: list[TensorSpec],
        addresses: dict[str, int],
        kv: DeviceKVPool,
        graphs: PastGraphs,
    ):
        if kv.slots != 1:
            raise ValueError("the fixed-shape decode step is built for one sequence")
        self.ctx, self.kv, self.graphs = ctx, kv, graphs
        self.graph: cuda_rt.Graph | None = None
        dims = {"past": kv.max_seq - 1, "seq": 1, BATCH_DIM: 1}
        for name, ptr in addresses.items():
            set_address(ctx, name, ptr)
        rows = [(t, kv.past(i), kv.new_at(i)) for i, t in enumerate(kv.tensors)]
        bind(ctx, plain_inputs, rows, dims, self.NAME)

    def run(self) -> None:
        """One step (inputs already in the decoder's buffers): replayed, or run and then
        captured; the new row goes to slot 0's next position."""
        if self.graph is not None:
            self.graph.launch(self.graphs.stream)
        else:
            execute(self.ctx, self.graphs.stream, self.NAME)
            if self.graphs.capacity:
                self.graph = self.graphs.capture(
                    lambda: execute(self.ctx, self.graphs.stream, self.NAME)
                )
        self.kv.scatter([0])

    def clear(self) -> None:
        if self.graph is not None:
            self.graph.close()
            self.graph = None
