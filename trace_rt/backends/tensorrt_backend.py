"""TensorRT backend: runs the engines ``python -m export trt`` built into an artifact dir.

Needs ``tensorrt`` >= 10.3 and ``cuda-python`` (``pip install 'trace-rt[tensorrt]'``, or on a
Jetson JetPack's ``python3-libnvinfer``: deploy/jetson/); nothing else
in trace_rt imports this module, so the rest of the runtime works without them.

Memory: every device buffer is allocated once, at load, for the largest request the
engines admit (``manifest["tensorrt"]["limits"]``), and bound to the engines by address;
requests only copy their inputs in and the head's logits out. Ids are embedded on the host
from ``embeddings.npy`` (as in the onnxruntime backend); positions are sliced from a
device-resident ``arange(max_seq)`` into an aligned ``position_ids`` buffer.

KV cache (the export's ``kv_cache: preallocated-seq-major`` contract, trace_rt/graphs.py),
derived from the decoder's I/O spec in the manifest, no names or sizes hard-coded: every
``past_X`` input ``[1, past, ...]`` (sequence-major) pairs with the output ``X``
``[1, seq, ...]`` holding only the new positions. The backend allocates one
``[max_seq, ...]`` buffer per pair; each run binds the buffer's first ``past`` rows as
the input and the next ``seq`` rows as the output, so the engine writes its new K/V
straight into place and nothing is concatenated (a misaligned row goes through a staging
row, below).

Addresses: TensorRT requires every tensor address to be 256-byte aligned
(``IExecutionContext::setTensorAddress``: "The pointer must have at least 256-byte
alignment", NvInferRuntime.h since TensorRT 10.0) and a setter that is refused returns
False. So positions are not bound as a slice of a device ``arange`` (``ptr + 8 * past`` is
aligned for one past length in 32): each run copies its slice into an aligned
``position_ids`` buffer (one small device-to-device copy). A new K/V slot
``buf + past * row_bytes`` is aligned only when ``row_bytes % 256 == 0`` (true for the 7B
model's 2 KiB rows, not for small models): when it is not, the engine writes the step's row
into an aligned staging row, copied into place right after. Every setter's result is
checked and a refusal names the tensor.

Engines are deserialised through a stream reader (``IStreamReaderV2`` from TensorRT 10.7,
``IStreamReader`` before) over a memory map of the file, so the engine is never held as a
second, anonymous copy in host memory (on a unified-memory Jetson a 4 GB engine's extra
copy does not fit); the pages it reads are clean page cache the kernel can drop.

CUDA graphs, with the fixed-shape decode step (``engines["decoder_step"]``, built by
``export trt --checkpoint``, export/trt_step.py): its past is the whole cache but the last
row, masked inside the engine by ``position_ids`` (the past length is data), so every decode
step has the same shapes and addresses. Its context is bound once at load (the cache
zero-filled, since masked slots still meet 0 * value; new K/V into one aligned row per
tensor, copied into slot ``past`` after each step), one graph is captured at the first
decode step and replayed by every later step and request; before each replay only the
embedding and position buffers' contents change. Prefill stays on the dynamic decoder.

Without the step engine, a decode step's shapes and output addresses depend on its past
length P, and a captured graph is valid only for the shapes, addresses and execution
context it was captured with. So graphs are kept per P, each with its own
execution context (all sharing one activation-memory block): the first decode at a given P
runs normally, the second runs once more (TensorRT requires one normal run after a shape
change before capture), synchronises, then captures a graph; later ones replay it. Within
one request P never repeats, so graphs pay off across requests of equal prompt length
(e.g. ``dvc`` over many videos with the same frame count, or benchmarks); one graph for
every step needs a fixed-shape decode engine (past length as data, as the ATC decode variant
does), which the exported decoder is not. ``cuda_graphs=N`` bounds how many are kept; once
full, no more are captured (the first N are kept: a least-recently-used policy would evict
exactly the lengths the next request needs first, as every request walks P upwards), and
:meth:`clear_cuda_graphs` starts over; ``0`` turns them off. If a capture fails, its graph is
released, the CUDA error state it left is cleared (TensorRT would report it at the next
enqueue), and the backend warns and runs without graphs from then on.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

try:
    import tensorrt as trt
except ImportError as e:  # the module's one hard requirement, named plainly
    raise ImportError(
        "the tensorrt backend needs the `tensorrt` package (NVIDIA TensorRT 10+ Python "
        "wheels, e.g. pip install 'trace-rt[tensorrt]'); it is not installed: " + str(e)
    ) from e

from trace_rt.backends import cuda_rt
from trace_rt.backends import tensorrt_manifest as tm
from trace_rt.backends.base import split_prompt
from trace_rt.backends.tensorrt_reader import EngineReader
from trace_rt.config import TraceConfig
from trace_rt.errors import CheckpointError, InputError, PromptTooLongError
from trace_rt.graphs import (
    DECODER,
    GRAPH_NAMES,
    KV_CACHE,
    PROJECTOR,
    VISION_ENCODER,
    GraphSpec,
    TensorSpec,
    dtype_itemsize,
    embed_ids,
    load_embeddings,
    load_manifest,
    manifest_specs,
)
from trace_rt.tokens import VIDEO_PLACEHOLDER_ID, Head, head_base, head_size

ALIGN = 256  # TensorRT's tensor address alignment (NvInferRuntime.h, setTensorAddress)
_ITEMSIZE = {"FLOAT": 4, "HALF": 2, "BF16": 2, "INT64": 8, "INT32": 4, "INT8": 1, "BOOL": 1}


@dataclass
class _KV:
    """One cache tensor: the ``past`` input, the output of its new rows, their buffer."""

    past: str  # input name, e.g. past_key.0
    out: str  # output name, e.g. key.0
    spec: TensorSpec  # the past input's spec
    row_bytes: int  # bytes of one position
    buf: cuda_rt.DeviceBuffer  # [max_seq, ...]
    stage: cuda_rt.DeviceBuffer | None  # one aligned row, when rows are not 256-aligned

    def slot(self, past: int) -> int:
        """Address of row *past* in the cache."""
        return self.buf.ptr + past * self.row_bytes

    def staged(self, past: int) -> bool:
        """Whether the new row at *past* goes through the staging row (misaligned slot)."""
        return self.slot(past) % ALIGN != 0


@dataclass(frozen=True)
class DeviceVideo:
    """Handle to a video block left in device memory by :meth:`encode_video`."""

    rows: int
    generation: int


class TensorRTBackend:
    """Runs the TensorRT engines listed in an artifact directory's manifest.

    Args:
        model_dir: artifact directory with ``manifest["tensorrt"]`` (``python -m export trt``).
        device: ``cuda`` or ``cuda:N`` (``auto`` means ``cuda``).
        verify: ``sha256`` (default) or ``size``: how engines and support files are checked.
        cuda_graphs: 0: no CUDA graphs. Otherwise, with the fixed-shape decode step, one
            graph for every step; without it, at most this many (one per past length).
        video_graphs: load the vision encoder and projector engines too (False: decoder
            only, for a Triton pipeline whose encoders are their own tensorrt_plan models;
            prefill then takes the video block as a host array).
    """

    name = "tensorrt"

    def __init__(
        self,
        model_dir: str | Path,
        device: str = "cuda",
        verify: str = "sha256",
        cuda_graphs: int = 256,
        video_graphs: bool = True,
    ):
        self.model_dir = Path(model_dir)
        kind, _, index = device.partition(":")
        if kind not in ("cuda", "auto"):
            raise InputError(
                f"the tensorrt backend runs on a CUDA GPU: pass --device cuda, not {device!r}"
            )
        self.device_id = int(index or 0)
        # Engines replace the ONNX graphs: only the other files are checked.
        self.manifest = load_manifest(self.model_dir, verify, graphs=False)
        self.section = tm.read_section(self.manifest, self.model_dir)
        tm.verify_engines(self.section, self.model_dir, verify)
        cuda_rt.set_device(self.device_id)
        self.gpu = cuda_rt.device_info(self.device_id)
        tm.check_tensorrt_version(trt.__version__)
        tm.check_compatible(self.section, trt.__version__, self.gpu)
        self.config = TraceConfig.from_dir(self.model_dir)
        self.specs: dict[str, GraphSpec] = manifest_specs(self.manifest)
        self.max_frames = int(self.section["limits"]["max_frames"])
        self.max_seq = int(self.section["limits"]["max_seq"])
        self.embeddings = load_embeddings(self.model_dir, self.config)
        self.dtype = self.embeddings.dtype

        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        graphs = GRAPH_NAMES if video_graphs else (DECODER,)
        self.engines = {g: self._engine(g) for g in graphs}
        self.stream = cuda_rt.Stream()
        self._buffers: dict[str, cuda_rt.DeviceBuffer] = {}
        self._contexts: dict[str, Any] = {}
        if video_graphs:
            self._setup_video()
        self._setup_decoder()
        self._setup_step()
        self._graph_capacity = max(0, int(cuda_graphs))
        self._graphs: dict[int, tuple[Any, cuda_rt.Graph]] = {}
        self._seen: set[int] = set()
        self._pos = 0
        self._generation = 0

    # ---- Backend protocol ----------------------------------------------------------
    def encode_video(self, pixel_values: np.ndarray, time_ids: np.ndarray) -> DeviceVideo:
        if VISION_ENCODER not in self.engines:
            raise RuntimeError("the video engines were not loaded (video_graphs=False)")
        frames = pixel_values.shape[0]
        if frames > self.max_frames:
            raise InputError(
                f"{frames} frames exceed the engines' limit of {self.max_frames}; rebuild "
                "with `python -m export trt OUT --max-frames N` or sample fewer frames"
            )
        px_in, tid_in = self._video_inputs
        self._htod(self._buffers[px_in.name], np.ascontiguousarray(pixel_values, np.float32))
        self._htod(self._buffers[tid_in.name], np.ascontiguousarray(time_ids, np.int64))
        # Features stay in device memory between the two engines (one buffer, bound to both).
        for graph in (VISION_ENCODER, PROJECTOR):
            ctx = self._contexts[graph]
            for t in self.specs[graph].inputs:
                _set_shape(ctx, t.name, _shape(t, {"frames": frames}), graph)
            self._execute(ctx, graph)
        video = self.specs[PROJECTOR].outputs[0].name
        rows = int(self._contexts[PROJECTOR].get_tensor_shape(video)[0])
        self._generation += 1
        return DeviceVideo(rows, self._generation)

    def prefill(
        self, prompt_ids: Sequence[int], video: DeviceVideo | np.ndarray, head: Head
    ) -> np.ndarray:
        before, after = split_prompt(prompt_ids, VIDEO_PLACEHOLDER_ID)
        rows = video.rows if isinstance(video, DeviceVideo) else int(video.shape[0])
        n = len(before) + rows + len(after)
        limit = min(self.max_seq, self.config.max_position_embeddings)
        if n > limit:
            raise PromptTooLongError(
                f"prompt of {n} positions exceeds the engines' --max-seq {self.max_seq}"
                if n <= self.config.max_position_embeddings
                else f"prompt of {n} positions exceeds the model's context"
            )
        emb, row = self._buffers[self._embeds], self._row_bytes
        self._htod(emb, self._embed(before))
        at = emb.ptr + len(before) * row
        if isinstance(video, DeviceVideo):
            if video.generation != self._generation:
                raise ValueError("stale video handle: encode_video ran again since")
            src = self._buffers[self.specs[PROJECTOR].outputs[0].name]
            cuda_rt.copy_dtod(at, src.ptr, rows * row, self.stream)
        else:
            self._htod_at(at, np.ascontiguousarray(video, self.dtype))
        self._htod_at(at + rows * row, self._embed(after))
        self._pos = 0
        return self._decode(n, head, phase="prefill")

    def decode_step(self, token_id: int, head: Head) -> np.ndarray:
        limit = min(self.max_seq, self.config.max_position_embeddings)
        if self._pos >= limit:
            raise PromptTooLongError(f"generation reached the engines' context of {limit}")
        self._staging.array[0] = self._embed([token_id])[0]
        cuda_rt.copy_htod(
            self._buffers[self._embeds].ptr, self._staging.ptr, self._row_bytes, self.stream
        )
        return self._decode(1, head, phase="decode")

    def synchronize(self) -> None:
        self.stream.synchronize()

    def clear_cuda_graphs(self) -> None:
        """Drop the captured decode-step graphs (and their contexts), e.g. when the
        traffic's prompt lengths change."""
        self.stream.synchronize()
        for _, graph in self._graphs.values():
            graph.close()
        self._graphs.clear()
        self._seen.clear()
        if self._step_graph is not None:
            self._step_graph.close()
            self._step_graph = None

    def video_to_host(self, video: DeviceVideo) -> np.ndarray:
        """The video block [rows, hidden] in host memory (parity checks, debugging)."""
        if video.generation != self._generation:
            raise ValueError("stale video handle: encode_video ran again since")
        out = np.empty((video.rows, self.config.hidden_size), self.dtype)
        src = self._buffers[self.specs[PROJECTOR].outputs[0].name]
        cuda_rt.copy_dtoh(out.ctypes.data, src.ptr, out.nbytes, self.stream)
        self.stream.synchronize()
        return out

    def close(self) -> None:
        """Free device memory now (otherwise it goes with the object)."""
        self.stream.synchronize()
        self.clear_cuda_graphs()
        stages = [kv.stage for kv in self._kv if kv.stage is not None]
        stages += self._step_rows + ([self._step_scratch] if self._step is not None else [])
        for buf in [*self._buffers.values(), self._arange, *(kv.buf for kv in self._kv), *stages]:
            buf.free()

    # ---- decoder ----------------------------------------------------------------------
    def _decode(self, seq: int, head: Head, phase: str) -> np.ndarray:
        past = self._pos
        # This run's positions into the aligned position_ids buffer (a slice of the device
        # arange at ptr + 8 * past would be misaligned for 31 past lengths in 32).
        cuda_rt.copy_dtod(
            self._buffers[self._positions].ptr, self._arange.ptr + 8 * past, 8 * seq, self.stream
        )
        if phase == "decode" and self._step is not None:
            self._decode_step_engine(past)
        else:
            if phase == "decode" and self._graph_capacity:
                self._decode_with_graphs(past)
            else:
                ctx = self._contexts[f"{DECODER}.{phase}"]
                self._bind_decoder(ctx, past, seq)
                self._execute(ctx, DECODER)
            for kv in self._kv:  # rows written to a staging row go to their slot
                if kv.staged(past):
                    cuda_rt.copy_dtod(kv.slot(past), kv.stage.ptr, seq * kv.row_bytes, self.stream)
        self._pos += seq
        base, size = head_base(self.config.ids, head), head_size(self.config.ids, head)
        logits = self._buffers[self._logits]
        cuda_rt.copy_dtoh(self._host_logits.ptr, logits.ptr + 4 * base, 4 * size, self.stream)
        self.stream.synchronize()
        return self._host_logits.array[:size].copy()

    def _decode_step_engine(self, past: int) -> None:
        """A decode step on the fixed-shape engine: one CUDA graph for every step.

        Its shapes and addresses never change (the past length is the data in
        ``position_ids``), so the graph captured at the first step replays for every later
        step and request; only the embedding and position buffers' contents differ.
        """
        if self._step_graph is not None:
            self._step_graph.launch(self.stream)
        else:
            self._execute(self._step, tm.STEP)
            if self._graph_capacity:
                self.stream.synchronize()  # capture from an idle stream, as above
                try:
                    self._step_graph = cuda_rt.Graph(
                        self.stream, lambda: self._execute(self._step, tm.STEP)
                    )
                except (cuda_rt.CudaError, RuntimeError) as e:
                    warnings.warn(
                        f"CUDA graph capture failed, running without graphs: {e}", stacklevel=3
                    )
                    self._graph_capacity = 0
        if past < self.max_seq - 1:  # the last slot's step still runs; its K/V have no slot
            for kv, row in zip(self._kv, self._step_rows, strict=True):
                cuda_rt.copy_dtod(kv.slot(past), row.ptr, kv.row_bytes, self.stream)

    def _decode_with_graphs(self, past: int) -> None:
        """A decode step at past length *past*, through a CUDA graph when there is one."""
        if past in self._graphs:
            self._graphs[past][1].launch(self.stream)
            return
        if past not in self._seen or len(self._graphs) >= self._graph_capacity:
            self._seen.add(past)
            ctx = self._contexts[f"{DECODER}.decode"]
            self._bind_decoder(ctx, past, 1)
            self._execute(ctx, DECODER)
            return
        ctx = self._new_decoder_context("decode")
        self._bind_decoder(ctx, past, 1)
        self._execute(ctx, DECODER)  # this step's result; also settles the new shapes
        # Capture from an idle stream: the warm-up run (and any lazy work TensorRT did in
        # it) must be finished, as trtexec does before it captures.
        self.stream.synchronize()
        try:
            graph = cuda_rt.Graph(self.stream, lambda: self._execute(ctx, DECODER))
        except (cuda_rt.CudaError, RuntimeError) as e:  # Graph released it, error cleared
            warnings.warn(f"CUDA graph capture failed, running without graphs: {e}", stacklevel=3)
            self._graph_capacity = 0
            return
        self._graphs[past] = (ctx, graph)

    def _bind_decoder(self, ctx: Any, past: int, seq: int) -> None:
        """Shapes for (past, seq) and the addresses that depend on them."""
        dims = {"past": past, "seq": seq}
        for t in self._plain_inputs:
            _set_shape(ctx, t.name, _shape(t, dims), DECODER)
        for kv in self._kv:  # the filled prefix in, the next rows out: same buffer
            _set_shape(ctx, kv.past, _shape(kv.spec, dims), DECODER)
            _set_address(ctx, kv.past, kv.buf.ptr)
            if kv.staged(past):
                if seq > 1:  # prefill starts at past 0, an aligned slot
                    raise RuntimeError(f"{seq} new rows at misaligned past {past}")
                _set_address(ctx, kv.out, kv.stage.ptr)
            else:
                _set_address(ctx, kv.out, kv.slot(past))

    def _setup_decoder(self) -> None:
        spec = self.specs[DECODER]
        outputs = {t.name: t for t in spec.outputs}
        self._embeds, self._positions, self._logits = "inputs_embeds", "position_ids", "logits"
        for name in (self._embeds, self._positions):
            if name not in spec.input_names:
                raise CheckpointError(f"decoder spec has no input {name!r}: {spec.input_names}")
        self._plain_inputs = [spec.input(self._embeds), spec.input(self._positions)]
        hidden = self.config.hidden_size
        self._row_bytes = hidden * self.dtype.itemsize
        self._kv: list[_KV] = []
        scheme = self.manifest["export"].get("kv_cache")
        if scheme != KV_CACHE:
            raise CheckpointError(
                f"{self.model_dir}: decoder KV cache {scheme!r}, this runtime needs "
                f"{KV_CACHE!r}; re-export with `python -m export onnx`, then `export trt`"
            )
        for t in spec.inputs:
            if t.name in (self._embeds, self._positions):
                continue
            stem = t.name.removeprefix("past_")
            axes = [i for i, d in enumerate(t.shape) if isinstance(d, str)]
            if stem == t.name or stem not in outputs or len(axes) != 1:
                raise CheckpointError(
                    f"decoder input {t.name} {t.shape}: expected past_X [1, past, ...] "
                    "with an output X of the new positions"
                )
            if any(d != 1 for d in t.shape[: axes[0]]):  # else the prefix is strided
                raise CheckpointError(f"{t.name} {t.shape} is not sequence-major")
            row = int(np.prod([d for d in t.shape if not isinstance(d, str)]))
            row *= dtype_itemsize(t.dtype)  # bf16 specs: "bfloat16", not a numpy name
            stage = self._alloc(row) if row % ALIGN else None
            self._kv.append(_KV(t.name, stem, t, row, self._alloc(self.max_seq * row), stage))
        max_seq = self.max_seq
        self._buffers[self._embeds] = self._alloc(max_seq * self._row_bytes)
        positions = np.arange(max_seq + 1, dtype=np.int64)
        self._arange = self._alloc(positions.nbytes)
        self._htod(self._arange, positions)
        self._buffers[self._positions] = self._alloc(positions.nbytes)
        self._buffers[self._logits] = self._alloc(4 * self.config.ids.size)
        self._staging = cuda_rt.PinnedArray((1, hidden), self.dtype)
        self._host_logits = cuda_rt.PinnedArray((self.config.ids.size,), np.float32)
        engine = self.engines[DECODER]
        for name, want in ((self._embeds, self.dtype.itemsize), (self._logits, 4)):
            got = _ITEMSIZE.get(engine.get_tensor_dtype(name).name)
            if got != want:
                raise CheckpointError(
                    f"decoder engine's {name} is {engine.get_tensor_dtype(name)}, expected "
                    f"{want}-byte elements (embeddings.npy is {self.dtype}, logits float32)"
                )
        # Prefill, decode and graph contexts never run at once (one stream): they share one
        # block of activation memory instead of holding one each.
        size = getattr(engine, "device_memory_size_v2", None) or engine.device_memory_size
        self._scratch = self._alloc(int(size))
        for phase in ("prefill", "decode"):
            self._contexts[f"{DECODER}.{phase}"] = self._new_decoder_context(phase)
        self.stream.synchronize()

    def _setup_step(self) -> None:
        """Bind the fixed-shape decode step (``manifest["tensorrt"]["engines"]["decoder_step"]``)
        once and for all, when the build has one: past input = the whole cache but its last
        row, new K/V into one aligned row per tensor (copied into slot ``past`` after each
        step), embeddings, positions and logits in the decoder's buffers."""
        self._step, self._step_graph, self._step_rows = None, None, []
        rec = self.section["engines"].get(tm.STEP)
        if rec is None:
            return
        cap = self.max_seq - 1
        if rec.get("fixed", {}).get("past") != cap:
            raise CheckpointError(
                f"{rec['file']}: decode step fixed to {rec.get('fixed')}, the build's max_seq "
                f"is {self.max_seq}; rebuild with `python -m export trt {self.model_dir}`"
            )
        engine = self._engine(tm.STEP, DECODER)
        size = getattr(engine, "device_memory_size_v2", None) or engine.device_memory_size
        self._step_scratch = self._alloc(int(size))
        ctx = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if hasattr(ctx, "set_device_memory"):
            ctx.set_device_memory(self._step_scratch.ptr, self._step_scratch.nbytes)
        else:  # TensorRT 10.0
            ctx.device_memory = self._step_scratch.ptr
        if not ctx.set_optimization_profile_async(
            tm.profile_index(rec, "decode"), self.stream.handle
        ):
            raise CheckpointError(f"{rec['file']}: TensorRT refused its decode profile")
        dims = {"past": cap, "seq": 1}
        for t in self._plain_inputs:
            _set_shape(ctx, t.name, _shape(t, dims), tm.STEP)
        for name in (self._embeds, self._positions, self._logits):
            _set_address(ctx, name, self._buffers[name].ptr)
        for kv in self._kv:
            _set_shape(ctx, kv.past, _shape(kv.spec, dims), tm.STEP)
            _set_address(ctx, kv.past, kv.buf.ptr)
            self._step_rows.append(self._alloc(kv.row_bytes))
            _set_address(ctx, kv.out, self._step_rows[-1].ptr)
            # The step reads every slot; the unfilled ones are masked, but a masked slot
            # still meets 0 * value, so they must hold finite values (cudaMalloc's don't).
            self._htod(kv.buf, np.zeros(kv.buf.nbytes, np.uint8))
        self._step = ctx
        self.stream.synchronize()

    def _new_decoder_context(self, phase: str) -> Any:
        engine, rec = self.engines[DECODER], self.section["engines"][DECODER]
        index = tm.profile_index(rec, phase)  # an engine without the phase's profile: an error
        ctx = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if hasattr(ctx, "set_device_memory"):
            ctx.set_device_memory(self._scratch.ptr, self._scratch.nbytes)
        else:  # TensorRT 10.0
            ctx.device_memory = self._scratch.ptr
        if not ctx.set_optimization_profile_async(index, self.stream.handle):
            raise CheckpointError(f"{rec['file']}: TensorRT refused profile {phase!r} ({index})")
        for name in (self._embeds, self._positions, self._logits):
            _set_address(ctx, name, self._buffers[name].ptr)
        return ctx

    # ---- vision encoder + projector ----------------------------------------------------
    def _setup_video(self) -> None:
        """Buffers for the largest video, shared by name between the two engines."""
        vis, proj = self.specs[VISION_ENCODER], self.specs[PROJECTOR]
        produced = set(vis.output_names)
        self._video_inputs = (vis.inputs[0], next(t for t in proj.inputs if t.name not in produced))
        for graph in (VISION_ENCODER, PROJECTOR):
            ctx = self.engines[graph].create_execution_context()
            for t in self.specs[graph].inputs:
                _set_shape(ctx, t.name, _shape(t, {"frames": self.max_frames}), graph)
            for name in [*self.specs[graph].input_names, *self.specs[graph].output_names]:
                if name not in self._buffers:
                    shape = tuple(ctx.get_tensor_shape(name))  # outputs: inferred at max
                    dtype = self.engines[graph].get_tensor_dtype(name)
                    nbytes = int(np.prod(shape)) * _ITEMSIZE[dtype.name]
                    self._buffers[name] = self._alloc(nbytes)
                _set_address(ctx, name, self._buffers[name].ptr)
            self._contexts[graph] = ctx

    # ---- helpers ---------------------------------------------------------------------
    def _engine(self, graph: str, spec_of: str | None = None) -> Any:
        rec = self.section["engines"][graph]
        with EngineReader(self.model_dir / rec["file"]) as reader:
            engine = self._runtime.deserialize_cuda_engine(reader)
        if engine is None:
            raise CheckpointError(
                f"{self.model_dir}: TensorRT {trt.__version__} cannot load {rec['file']}; "
                f"rebuild with `python -m export trt {self.model_dir}`"
            )
        names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        spec = self.specs[spec_of or graph]
        if names != {*spec.input_names, *spec.output_names}:
            raise CheckpointError(
                f"{rec['file']}: tensors {sorted(names)} differ from the manifest's spec of "
                f"{graph}; rebuild with `python -m export trt {self.model_dir}`"
            )
        return engine

    def _execute(self, ctx: Any, graph: str) -> None:
        if not ctx.execute_async_v3(self.stream.handle):
            raise RuntimeError(f"TensorRT failed to enqueue {graph} (see its log above)")

    def _alloc(self, nbytes: int) -> cuda_rt.DeviceBuffer:
        return cuda_rt.DeviceBuffer(nbytes)

    def _htod(self, buf: cuda_rt.DeviceBuffer, arr: np.ndarray) -> None:
        if arr.nbytes > buf.nbytes:
            raise ValueError(f"{arr.nbytes} bytes do not fit a {buf.nbytes}-byte buffer")
        self._htod_at(buf.ptr, arr)

    def _htod_at(self, ptr: int, arr: np.ndarray) -> None:
        # Pageable source: the copy has been staged when the call returns, so *arr* may go.
        cuda_rt.copy_htod(ptr, arr.ctypes.data, arr.nbytes, self.stream)

    def _embed(self, ids: Sequence[int]) -> np.ndarray:
        return embed_ids(self.embeddings, ids)  # [n, H]


def _shape(t: TensorSpec, dims: dict[str, int]) -> tuple[int, ...]:
    return tuple(dims[d] if isinstance(d, str) else d for d in t.shape)


def _set_shape(ctx: Any, name: str, shape: tuple[int, ...], graph: str) -> None:
    # TensorRT returns False (and logs why) for an unknown input or a shape outside the
    # active optimisation profile; running on would compute with the previous shape.
    if not ctx.set_input_shape(name, shape):
        raise InputError(
            f"TensorRT refused shape {list(shape)} for {graph} input {name!r} (outside the "
            "engine's optimisation profile? rebuild with larger `export trt` limits)"
        )


def _set_address(ctx: Any, name: str, ptr: int) -> None:
    if not ctx.set_tensor_address(name, ptr):
        raise RuntimeError(
            f"TensorRT refused address {ptr:#x} for tensor {name!r}"
            + (f" (not {ALIGN}-byte aligned)" if ptr % ALIGN else "")
        )
