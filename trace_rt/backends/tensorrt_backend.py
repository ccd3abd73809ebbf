"""TensorRT backend: runs the engines ``python -m export trt`` built into an artifact dir.

Needs ``tensorrt`` >= 10.3 and ``cuda-python`` (``pip install 'trace-rt[tensorrt]'``, or on a
Jetson JetPack's ``python3-libnvinfer``: deploy/jetson/); nothing else
in trace_rt imports this module, so the rest of the runtime works without them.

Memory: every device buffer is allocated once, at load, for the largest request the
engines admit (``manifest["tensorrt"]["limits"]``) and ``max_sequences`` sequences, and
bound to the engines by address; requests only copy their inputs in and the heads' logits
out. Ids are embedded on the host from ``embeddings.npy`` (as in the onnxruntime backend).
A video block is kept in a device buffer of its own (:class:`DeviceVideo`), so handles of
several videos stay valid together (a batch, the video cache).

KV cache (the export's ``kv_cache: pooled-position-major`` contract, trace_rt/graphs.py):
:class:`~trace_rt.backends.tensorrt_kv.DeviceKVPool` (layout, copies and memory there),
derived from the decoder's I/O spec, no names or sizes hard-coded. A prefill runs one
sequence over a contiguous buffer (with one slot the pool itself, the engine writing new
K/V in place) and is copied into its slot; a batched decode step binds the first P
positions of every slot (P: the longest; rows attend only below their own position), runs
every slot's row (unused ones at position 0) and scatters the stepped slots' new rows. A
:class:`~trace_rt.backends.base.KVPrefix` is copied in from host memory (skipped when the
buffer still holds it) and :meth:`TensorRTBackend.save_prefix` returns host copies; why
copies rather than shared pages: trace_rt/engine/scheduler.py.

Addresses must be 256-byte aligned (:mod:`~trace_rt.backends.tensorrt_exec`): positions
are copied into an aligned ``position_ids`` buffer rather than bound as a slice of a
device ``arange``; new K/V at a misaligned position go through the pool's staging buffer.

CUDA graphs. With one slot and a fixed-past graph (export/trt_step.py: the past is the
whole cache but the last row, masked inside the engine by ``position_ids``), every decode
step has the same shapes and addresses, so one graph, captured at the first step, serves
every step and request (new K/V land in an aligned row, copied into place after each
step). That graph is either the decode step engine (``engines["decoder_step"]``, beside
the dynamic decoder, which runs prefill: a second copy of the weights) or, built with
``export trt --fixed-past``, the decoder itself, whose prefill also runs over the masked
cache (new rows to the pool's ``fixed`` buffer, then into place). Otherwise a step's
shapes depend on its past length P and graphs are kept per P
(:class:`~trace_rt.backends.tensorrt_exec.PastGraphs`), each with its own context, all
sharing one activation-memory block. ``cuda_graphs=N`` bounds how many are kept, ``0``
turns graphs off; a failed capture warns and turns them off.

Profiles: prefill (batch 1), ``decode`` (batch 1, the one-slot path, tuned for one row)
and, in engines built with ``--max-batch`` > 1, ``decode_batch`` (batch up to max_batch,
the several-slot path; every step binds ``max_sequences`` rows).
"""

from __future__ import annotations

from collections.abc import Sequence
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
from trace_rt.backends.base import KVPrefix, check_decode, check_prefix, check_slots, split_prompt
from trace_rt.backends.tensorrt_exec import (
    ITEMSIZE,
    PastGraphs,
    StepEngine,
    bind,
    execute,
    load_engine,
    memory_size,
    set_address,
    user_managed_context,
)
from trace_rt.backends.tensorrt_kv import ALIGN, DeviceKVPool, kv_tensors
from trace_rt.backends.tensorrt_video import DeviceVideo, VideoEngines
from trace_rt.config import TraceConfig
from trace_rt.errors import CheckpointError, InputError, PromptTooLongError
from trace_rt.graphs import (
    BATCH_DIM,
    DECODER,
    GRAPH_NAMES,
    KV_CACHE,
    GraphSpec,
    embed_ids,
    load_embeddings,
    load_manifest,
    manifest_specs,
)
from trace_rt.tokens import VIDEO_PLACEHOLDER_ID, Head, head_base, head_size

__all__ = ["ALIGN", "DeviceVideo", "TensorRTBackend", "set_address"]
_USER_MANAGED = trt.ExecutionContextAllocationStrategy.USER_MANAGED
_set_address = set_address  # the name the tests and earlier callers use


class TensorRTBackend:
    """Runs the TensorRT engines listed in an artifact directory's manifest.

    Args:
        model_dir: artifact directory with ``manifest["tensorrt"]`` (``python -m export trt``).
        device: ``cuda`` or ``cuda:N`` (``auto`` means ``cuda``).
        verify: ``sha256`` (default) or ``size``: how engines and support files are checked.
        cuda_graphs: 0: no CUDA graphs. Otherwise, with one slot and the fixed-shape decode
            step, one graph for every step; else at most this many (one per past length).
        video_graphs: load the vision encoder and projector engines too (False: decoder
            only, for a Triton pipeline whose encoders are their own tensorrt_plan models;
            prefill then takes the video block as a host array).
        max_sequences: KV slots, sequences one decode step advances (at most the engines'
            ``--max-batch``).
    """

    name = "tensorrt"

    def __init__(
        self,
        model_dir: str | Path,
        device: str = "cuda",
        verify: str = "sha256",
        cuda_graphs: int = 256,
        video_graphs: bool = True,
        max_sequences: int = 1,
    ):
        self.model_dir = Path(model_dir)
        kind, _, index = device.partition(":")
        if kind not in ("cuda", "auto"):
            raise InputError(
                f"the tensorrt backend runs on a CUDA GPU: pass --device cuda, not {device!r}"
            )
        if isinstance(max_sequences, bool) or not isinstance(max_sequences, int):
            raise InputError(f"max_sequences must be a positive integer, got {max_sequences!r}")
        self.device_id = int(index or 0)
        # Engines replace the ONNX graphs: only the other files are checked.
        self.manifest = load_manifest(self.model_dir, verify, graphs=False)
        self.section = tm.read_section(self.manifest, self.model_dir)
        limits = self.section["limits"]
        self.max_frames, self.max_seq = int(limits["max_frames"]), int(limits["max_seq"])
        self.max_batch = int(limits.get("max_batch", 1))
        if not 1 <= max_sequences <= self.max_batch:
            raise InputError(
                f"max_sequences {max_sequences}: these engines decode at most {self.max_batch} "
                f"sequences at once; rebuild with `python -m export trt {self.model_dir} "
                "--max-batch N` for more"
            )
        self.max_sequences = max_sequences
        # A fixed-past decoder (`export trt --fixed-past`): prefill and decode steps both
        # run the step graph over the whole cache; one engine, one copy of the weights.
        self.fixed_past = "fixed" in self.section["engines"][DECODER]
        tm.verify_engines(self.section, self.model_dir, verify)
        cuda_rt.set_device(self.device_id)
        self.gpu = cuda_rt.device_info(self.device_id)
        tm.check_tensorrt_version(trt.__version__)
        tm.check_compatible(self.section, trt.__version__, self.gpu)
        self.config = TraceConfig.from_dir(self.model_dir)
        self.specs: dict[str, GraphSpec] = manifest_specs(self.manifest)
        self.embeddings = load_embeddings(self.model_dir, self.config)
        self.dtype = self.embeddings.dtype

        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        graphs = GRAPH_NAMES if video_graphs else (DECODER,)
        self.engines = {g: self._engine(g) for g in graphs}
        self.stream = cuda_rt.Stream()
        self._buffers: dict[str, cuda_rt.DeviceBuffer] = {}
        self._contexts: dict[str, Any] = {}
        self._row_bytes = self.config.hidden_size * self.dtype.itemsize
        self.video = None
        if video_graphs:
            self.video = VideoEngines(
                self.engines, self.specs, self.max_frames, self._row_bytes, self.stream
            )
        self._setup_decoder()
        self.past_graphs = PastGraphs(
            cuda_graphs, self.stream, lambda: self._new_decoder_context("decode")
        )
        self.step = self._setup_step()

    # ---- Backend protocol ----------------------------------------------------------
    def encode_video(self, pixel_values: np.ndarray, time_ids: np.ndarray) -> DeviceVideo:
        if self.video is None:
            raise RuntimeError("the video engines were not loaded (video_graphs=False)")
        return self.video.encode(pixel_values, time_ids, self.config.hidden_size)

    def prefill(
        self,
        prompt_ids: Sequence[int],
        video: DeviceVideo | np.ndarray | None,
        head: Head,
        *,
        slot: int = 0,
        prefix: KVPrefix | None = None,
    ) -> np.ndarray:
        check_slots([slot], self.max_sequences)
        before, after = split_prompt(prompt_ids, VIDEO_PLACEHOLDER_ID)
        if prefix is None:
            start, rows = 0, _rows(video)
            self._check_length(len(before) + rows + len(after))
            at = self._put_embeds(before, 0)
            at = self._put_video(video, at)
            self._put_embeds(after, at)
            t = len(before) + rows + len(after)
        else:
            check_prefix(prefix, before)
            if not after:
                raise ValueError("the prompt has no ids after the video to run over the prefix")
            start, t = prefix.length, len(after)
            self._check_length(start + t)
            self._put_embeds(after, 0)
        self.kv.lengths[slot] = 0
        if prefix is not None and prefix is not self._seq_prefix:
            self.kv.load(prefix.kv)
        self._seq_prefix = None  # until the run has written the positions after it
        self._fill(slot, start, t)
        self._seq_prefix = prefix
        return self._read_logits([0], [head])[0]

    def save_prefix(
        self, prompt_ids: Sequence[int], video: DeviceVideo | np.ndarray, *, slot: int = 0
    ) -> KVPrefix:
        check_slots([slot], self.max_sequences)
        before, _ = split_prompt(prompt_ids, VIDEO_PLACEHOLDER_ID)
        rows = _rows(video)
        n = len(before) + rows
        self._check_length(n)
        self._put_video(video, self._put_embeds(before, 0))
        self.kv.lengths[slot] = 0
        self._seq_prefix = None
        self._fill(slot, 0, n)
        prefix = KVPrefix(tuple(before), rows, tuple(self.kv.read(n, self._kv_row_shape)))
        self._seq_prefix = prefix
        return prefix

    def decode(
        self, slots: Sequence[int], token_ids: Sequence[int], heads: Sequence[Head]
    ) -> list[np.ndarray]:
        check_decode(slots, token_ids, heads, self.max_sequences)
        rows = np.asarray(slots, np.int64)
        past = int(self.kv.lengths[rows].max())
        limit = min(self.max_seq, self.config.max_position_embeddings)
        if past >= limit:
            raise PromptTooLongError(f"generation reached the engines' context of {limit}")
        if self.max_sequences == 1:
            self._decode_one(token_ids[0], past)
        else:
            self._decode_batch(rows, token_ids, past)
        self.kv.lengths[rows] += 1
        # Batch row b is slot b (a one-slot step's row 0 is slot 0).
        return self._read_logits(list(slots), heads)

    def decode_step(self, token_id: int, head: Head, *, slot: int = 0) -> np.ndarray:
        return self.decode([slot], [token_id], [head])[0]

    def release(self, slot: int) -> None:
        check_slots([slot], self.max_sequences)
        self.kv.lengths[slot] = 0

    def synchronize(self) -> None:
        self.stream.synchronize()

    def clear_cuda_graphs(self) -> None:
        """Drop the captured decode-step graphs (and their contexts), e.g. when the
        traffic's prompt lengths change."""
        self.past_graphs.clear()
        if self.step is not None:
            self.step.clear()

    def video_to_host(self, video: DeviceVideo) -> np.ndarray:
        """The video block [rows, hidden] in host memory (parity checks, debugging)."""
        out = np.empty(video.shape, self.dtype)
        cuda_rt.copy_dtoh(out.ctypes.data, video.buf.ptr, out.nbytes, self.stream)
        self.stream.synchronize()
        return out

    def close(self) -> None:
        """Free device memory now (otherwise it goes with the object)."""
        self.stream.synchronize()
        self.clear_cuda_graphs()
        self.kv.free()
        if self.video is not None:
            self.video.free()
        for buf in [*self._buffers.values(), self._arange, self._scratch]:
            buf.free()
        if self._step_scratch is not None:
            self._step_scratch.free()

    # ---- decoder runs -----------------------------------------------------------------
    def _fill(self, slot: int, start: int, t: int) -> None:
        """Run the *t* embeddings at the embeds buffer's start as positions start.. of one
        sequence over the ``seq`` buffer's first *start* (a loaded prefix), into *slot*."""
        self._positions_from(start, t)
        ctx = self._contexts[f"{DECODER}.prefill"]
        if self.fixed_past:
            self._bind_fixed(ctx, t)
            execute(ctx, self.stream, DECODER)
            self.kv.place(start, t)
        else:
            self._bind_one(ctx, start, t)
            execute(ctx, self.stream, DECODER)
            self.kv.unstage(start, t)
        self.kv.commit(slot, start + t)
        self.kv.lengths[slot] = start + t

    def _decode_one(self, token_id: int, past: int) -> None:
        """The one-slot step: new K/V straight into the pool (or via the staging rows)."""
        self._host_embeds.array[0] = self._embed([token_id])[0]
        cuda_rt.copy_htod(
            self._buffers[self._embeds].ptr, self._host_embeds.ptr, self._row_bytes, self.stream
        )
        self._positions_from(past, 1)
        if self.step is not None:
            self.step.run()
            return
        plain = self._contexts[f"{DECODER}.decode"]
        self.past_graphs.run(past, plain, lambda ctx: self._bind_one(ctx, past, 1), DECODER)
        self.kv.unstage(past, 1)

    def _decode_batch(self, rows: np.ndarray, token_ids: Sequence[int], past: int) -> None:
        """A step of every slot's row over the pool's first *past* positions; the rows of
        *rows* are the stepped sequences', the others run at position 0 and are dropped."""
        s = self.max_sequences
        x, pos = self._host_embeds.array, self._host_positions.array
        x[:s] = 0
        x[rows] = self._embed(token_ids)
        pos[:s] = 0
        pos[rows, 0] = self.kv.lengths[rows]
        cuda_rt.copy_htod(
            self._buffers[self._embeds].ptr, self._host_embeds.ptr, s * self._row_bytes, self.stream
        )
        cuda_rt.copy_htod(
            self._buffers[self._positions].ptr, self._host_positions.ptr, 8 * s, self.stream
        )
        plain = self._contexts[f"{DECODER}.decode"]
        self.past_graphs.run(past, plain, lambda ctx: self._bind_batch(ctx, past), DECODER)
        self.kv.scatter(rows)

    def _read_logits(self, rows: Sequence[int], heads: Sequence[Head]) -> list[np.ndarray]:
        """Each row's logits in its head, to host memory (one small copy per row)."""
        v, logits, host = self.config.ids.size, self._buffers[self._logits], self._host_logits
        sizes = []
        for i, (row, head) in enumerate(zip(rows, heads, strict=True)):
            base, size = head_base(self.config.ids, head), head_size(self.config.ids, head)
            src = logits.ptr + 4 * (row * v + base)
            cuda_rt.copy_dtoh(host.ptr + 4 * i * v, src, 4 * size, self.stream)
            sizes.append(size)
        self.stream.synchronize()
        return [host.array[i, :size].copy() for i, size in enumerate(sizes)]

    def _bind_one(self, ctx: Any, past: int, seq: int) -> None:
        """One sequence: past = the ``seq`` buffer's first *past*, new rows after it."""
        kv = [(t, self.kv.seq_at(i), self.kv.out_at(i, past)) for i, t in enumerate(self._kv)]
        bind(ctx, self._plain_inputs, kv, {"past": past, "seq": seq, BATCH_DIM: 1}, DECODER)

    def _bind_fixed(self, ctx: Any, seq: int) -> None:
        """A fixed-past prefill: past = the whole pool (masked by position), new rows out
        to the pool's ``fixed`` buffer."""
        kv = [(t, self.kv.past(i), self.kv.fixed_at(i)) for i, t in enumerate(self._kv)]
        dims = {"past": self.max_seq - 1, "seq": seq, BATCH_DIM: 1}
        bind(ctx, self._plain_inputs, kv, dims, DECODER)

    def _bind_batch(self, ctx: Any, past: int) -> None:
        """Every slot: past = the pool's first *past* positions, new rows into ``new``."""
        kv = [(t, self.kv.past(i), self.kv.new_at(i)) for i, t in enumerate(self._kv)]
        dims = {"past": past, "seq": 1, BATCH_DIM: self.max_sequences}
        bind(ctx, self._plain_inputs, kv, dims, DECODER)

    # ---- inputs -------------------------------------------------------------------------
    def _check_length(self, n: int) -> None:
        limit = min(self.max_seq, self.config.max_position_embeddings)
        if n > limit:
            raise PromptTooLongError(
                f"prompt of {n} positions exceeds the engines' --max-seq {self.max_seq}"
                if n <= self.config.max_position_embeddings
                else f"prompt of {n} positions exceeds the model's context"
            )

    def _put_embeds(self, ids: Sequence[int], at: int) -> int:
        """Embeddings of *ids* into the embeds buffer from row *at*; returns the next row."""
        self._htod_at(self._buffers[self._embeds].ptr + at * self._row_bytes, self._embed(ids))
        return at + len(ids)

    def _put_video(self, video: DeviceVideo | np.ndarray, at: int) -> int:
        dst = self._buffers[self._embeds].ptr + at * self._row_bytes
        if isinstance(video, DeviceVideo):
            cuda_rt.copy_dtod(dst, video.buf.ptr, video.rows * self._row_bytes, self.stream)
        else:
            self._htod_at(dst, np.ascontiguousarray(video, self.dtype))
        return at + _rows(video)

    def _positions_from(self, start: int, t: int) -> None:
        # This run's positions into the aligned position_ids buffer (a slice of the device
        # arange at ptr + 8 * start would be misaligned for 31 start positions in 32).
        cuda_rt.copy_dtod(
            self._buffers[self._positions].ptr, self._arange.ptr + 8 * start, 8 * t, self.stream
        )

    # ---- setup ----------------------------------------------------------------------------
    def _setup_decoder(self) -> None:
        spec = self.specs[DECODER]
        self._embeds, self._positions, self._logits = "inputs_embeds", "position_ids", "logits"
        for name in (self._embeds, self._positions):
            if name not in spec.input_names:
                raise CheckpointError(f"decoder spec has no input {name!r}: {spec.input_names}")
        self._plain_inputs = [spec.input(self._embeds), spec.input(self._positions)]
        scheme = self.manifest["export"].get("kv_cache")
        if scheme != KV_CACHE:
            raise CheckpointError(
                f"{self.model_dir}: decoder KV cache {scheme!r}, this runtime needs "
                f"{KV_CACHE!r}; re-export with `python -m export onnx`, then `export trt`"
            )
        tensors, self._kv_row_shape, row_bytes = kv_tensors(spec, self._embeds, self._positions)
        s, hidden = self.max_sequences, self.config.hidden_size
        self.kv = DeviceKVPool(
            tensors, s, self.max_seq, row_bytes, self.dtype, self.stream, self.fixed_past
        )
        self._kv = self.kv.tensors
        # The prefix whose K/V the one-sequence buffer's first positions hold (a prefill
        # from position 0 overwrites them; decode steps and later prefixed prefills write
        # only after them): a cached question right after another on the same video, or
        # right after save_prefix, skips the host-to-device copy of the prefix.
        self._seq_prefix: KVPrefix | None = None
        self._buffers[self._embeds] = self._alloc(max(self.max_seq, s) * self._row_bytes)
        positions = np.arange(self.max_seq + 1, dtype=np.int64)
        self._arange = self._alloc(positions.nbytes)
        self._htod_at(self._arange.ptr, positions)
        self._buffers[self._positions] = self._alloc(max(positions.nbytes, 8 * s))
        self._buffers[self._logits] = self._alloc(4 * s * self.config.ids.size)
        self._host_embeds = cuda_rt.PinnedArray((s, hidden), self.dtype)
        self._host_positions = cuda_rt.PinnedArray((s, 1), np.int64)
        self._host_logits = cuda_rt.PinnedArray((s, self.config.ids.size), np.float32)
        engine = self.engines[DECODER]
        for name, want in ((self._embeds, self.dtype.itemsize), (self._logits, 4)):
            got = ITEMSIZE.get(engine.get_tensor_dtype(name).name)
            if got != want:
                raise CheckpointError(
                    f"decoder engine's {name} is {engine.get_tensor_dtype(name)}, expected "
                    f"{want}-byte elements (embeddings.npy is {self.dtype}, logits float32)"
                )
        # Prefill, decode and graph contexts never run at once (one stream): they share one
        # block of activation memory instead of holding one each.
        self._scratch = self._alloc(memory_size(engine))
        for phase in ("prefill", "decode"):
            self._contexts[f"{DECODER}.{phase}"] = self._new_decoder_context(phase)
        self.stream.synchronize()

    def _setup_step(self) -> StepEngine | None:
        """The fixed-shape decode step (``engines["decoder_step"]``, or the fixed-past
        decoder's ``decode`` profile), when the build has one and the pool has one slot
        (the step is built for batch 1)."""
        self._step_scratch = None
        rec = self.section["engines"].get(DECODER if self.fixed_past else tm.STEP)
        if self.fixed_past and self.max_sequences > 1:
            raise InputError("a fixed-past decoder (export trt --fixed-past) runs one sequence")
        if rec is None or self.max_sequences > 1:
            return None
        if rec.get("fixed", {}).get("past") != self.max_seq - 1:
            raise CheckpointError(
                f"{rec['file']}: decode step fixed to {rec.get('fixed')}, the build's max_seq "
                f"is {self.max_seq}; rebuild with `python -m export trt {self.model_dir}`"
            )
        if self.fixed_past:  # its decode profile over the decoder's activation memory
            ctx = user_managed_context(self.engines[DECODER], self._scratch, _USER_MANAGED)
            return self._step_engine(ctx, rec)
        # Prefill runs the decoder engine, decode steps the step engine: one set of weights.
        decoder_variant = self.section["engines"][DECODER].get("variant")
        if rec.get("variant") != decoder_variant:
            raise CheckpointError(
                f"{rec['file']}: decode step built from decoder variant {rec.get('variant')!r}, "
                f"the decoder engine from {decoder_variant!r}; rebuild both with "
                f"`python -m export trt {self.model_dir}`"
            )
        engine = self._engine(tm.STEP, DECODER)
        self._step_scratch = self._alloc(memory_size(engine))
        ctx = user_managed_context(engine, self._step_scratch, _USER_MANAGED)
        return self._step_engine(ctx, rec)

    def _step_engine(self, ctx: Any, rec: dict[str, Any]) -> StepEngine:
        if not ctx.set_optimization_profile_async(
            tm.profile_index(rec, "decode"), self.stream.handle
        ):
            raise CheckpointError(f"{rec['file']}: TensorRT refused its decode profile")
        names = (self._embeds, self._positions, self._logits)
        addresses = {n: self._buffers[n].ptr for n in names}
        step = StepEngine(ctx, self._plain_inputs, addresses, self.kv, self.past_graphs)
        self.stream.synchronize()
        return step

    def _new_decoder_context(self, phase: str) -> Any:
        """A context on *phase*'s profile (``decode`` means ``decode_batch`` when the pool
        has several slots) over the shared activation memory."""
        engine, rec = self.engines[DECODER], self.section["engines"][DECODER]
        profile = "decode_batch" if phase == "decode" and self.max_sequences > 1 else phase
        index = tm.profile_index(rec, profile)  # an engine without the profile: an error
        ctx = user_managed_context(engine, self._scratch, _USER_MANAGED)
        if not ctx.set_optimization_profile_async(index, self.stream.handle):
            raise CheckpointError(f"{rec['file']}: TensorRT refused profile {profile!r} ({index})")
        for name in (self._embeds, self._positions, self._logits):
            set_address(ctx, name, self._buffers[name].ptr)
        return ctx

    # ---- helpers ---------------------------------------------------------------------
    def _engine(self, graph: str, spec_of: str | None = None) -> Any:
        rec, spec = self.section["engines"][graph], self.specs[spec_of or graph]
        return load_engine(self._runtime, self.model_dir, rec, spec, graph)

    def _alloc(self, nbytes: int) -> cuda_rt.DeviceBuffer:
        return cuda_rt.DeviceBuffer(nbytes)

    def _htod_at(self, ptr: int, arr: np.ndarray) -> None:
        # Pageable source: the copy has been staged when the call returns, so *arr* may go.
        cuda_rt.copy_htod(ptr, arr.ctypes.data, arr.nbytes, self.stream)

    def _embed(self, ids: Sequence[int]) -> np.ndarray:
        return embed_ids(self.embeddings, ids)  # [n, H]


def _rows(video: DeviceVideo | np.ndarray | None) -> int:
    if video is None:
        raise ValueError("prefill without a KV prefix needs the video block")
    return video.rows if isinstance(video, DeviceVideo) else int(video.shape[0])
