"""The TensorRT backend's KV pool: device K/V for up to ``slots`` sequences.

Layout (the export's ``pooled-position-major`` contract, trace_rt/graphs.py): per cache
tensor (per layer K, then V) one ``[max_seq, slots, kv, hd]`` block. All blocks live in
one allocation at a 256-byte-aligned stride, so a strided copy (``cudaMemcpy2DAsync``,
one row per tensor) moves a position of one slot for every layer at once.

Buffers (every base 256-byte aligned, as TensorRT requires of tensor addresses):

- ``pool``: the blocks. A batch step binds ``block[:P]`` as each ``past_*`` input
  ``[P, slots, kv, hd]`` (contiguous in this layout; P = the longest sequence's length).
- ``seq``: one sequence's contiguous K/V ``[max_seq, 1, kv, hd]`` per tensor, where a
  prefill runs (past = ``seq[:start]``, new rows written to ``seq[start:start+T]``). With
  one slot this *is* the pool: the single-sequence layout, nothing copied. With several
  slots a prefilled sequence is then copied into its strided slot (one 2D copy per
  tensor, once per prompt), as a slot's positions are ``slots`` rows apart.
- ``new``: a batch step's new rows ``[1, slots, kv, hd]`` per tensor (also the
  fixed-shape step engine's output), scattered into each stepped slot's next position:
  one 2D copy per slot, covering every tensor.
- ``fixed``: only for a fixed-past decoder (``export trt --fixed-past``): a prefill's
  new rows, copied into the pool after the run (its past input is the whole pool).
- ``stage``: only when a position's bytes (``kv * hd * itemsize``) are not a multiple of
  256 (small models; the 7B model's are 2 KiB): new rows at a position whose address is
  misaligned are written here, then copied into place after the run.

Memory: pool ``2L * max_seq * slots * row`` bytes plus, with several slots, one more
sequence's worth for ``seq`` (7B fp16, 4096 positions: 512 MiB per slot).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from trace_rt.backends import cuda_rt
from trace_rt.errors import CheckpointError
from trace_rt.graphs import BATCH_DIM, GraphSpec, TensorSpec, dtype_itemsize

ALIGN = 256  # TensorRT's tensor address alignment (NvInferRuntime.h, setTensorAddress)
# cudaMemcpy2D's pitch limit (cudaDevAttrMaxPitch: 2^31 - 1 on current GPUs); a pool whose
# per-tensor block is larger scatters tensor by tensor instead.
MAX_PITCH = 2**31 - 1


@dataclass(frozen=True)
class KVTensor:
    """One cache tensor of the decoder: its ``past_X`` input and ``X`` output."""

    past: str  # input name, e.g. past_key.0
    out: str  # output name, e.g. key.0
    spec: TensorSpec  # the past input's spec, [past, batch, kv, hd]


def kv_tensors(spec: GraphSpec, *plain: str) -> tuple[list[KVTensor], tuple[int, ...], int]:
    """The decoder's cache tensors from its I/O spec (no names or sizes hard-coded): every
    input but *plain* is a ``past_X`` ``[past, batch, ...]`` (position-major) paired with
    an output ``X`` of the new positions. Returns them, one position's shape of one
    sequence (``(kv, hd)``) and its bytes."""
    outputs = set(spec.output_names)
    tensors, shapes, sizes = [], set(), set()
    for t in spec.inputs:
        if t.name in plain:
            continue
        stem = t.name.removeprefix("past_")
        if stem == t.name or stem not in outputs or t.shape[:2] != ("past", BATCH_DIM):
            raise CheckpointError(
                f"decoder input {t.name} {t.shape}: expected past_X [past, batch, ...] "
                "(position-major) with an output X of the new positions"
            )
        shape = tuple(int(d) for d in t.shape[2:])
        shapes.add(shape)
        sizes.add(int(np.prod(shape)) * dtype_itemsize(t.dtype))  # bf16: not a numpy name
        tensors.append(KVTensor(t.name, stem, t))
    if len(shapes) != 1 or len(sizes) != 1:
        raise CheckpointError(f"decoder cache tensors differ in row shape: {sorted(shapes)}")
    return tensors, shapes.pop(), sizes.pop()


def aligned(nbytes: int) -> int:
    """*nbytes* rounded up to TensorRT's 256-byte alignment."""
    return -(-nbytes // ALIGN) * ALIGN


class DeviceKVPool:
    """K/V of up to *slots* sequences of up to *max_seq* positions, on the device.

    ``lengths[s]`` positions of slot s are filled. All copies are queued on *stream*.

    Args:
        tensors: the decoder's cache tensors, in spec order (per layer K then V).
        slots: sequences the pool holds (the backend's ``max_sequences``).
        max_seq: positions per sequence (the engines' ``--max-seq``).
        row_bytes: bytes of one position of one sequence (``kv * hd * itemsize``).
        dtype: the host dtype of prefix copies (bf16: uint16 bit patterns).
        stream: the backend's stream.
        fixed_out: allocate ``fixed``, where a fixed-past decoder's prefill writes its new
            rows (its past input is the whole pool, which it must not also write).
    """

    def __init__(
        self,
        tensors: Sequence[KVTensor],
        slots: int,
        max_seq: int,
        row_bytes: int,
        dtype: np.dtype,
        stream: cuda_rt.Stream,
        fixed_out: bool = False,
    ):
        self.tensors, self.slots, self.max_seq = list(tensors), slots, max_seq
        self.row_bytes, self.dtype, self.stream = row_bytes, np.dtype(dtype), stream
        self.lengths = np.zeros(slots, np.int64)
        n = len(self.tensors)
        self.pos_bytes = slots * row_bytes  # one position of every slot
        self.pool_stride = aligned(max_seq * self.pos_bytes)
        self.pool = cuda_rt.DeviceBuffer(n * self.pool_stride)
        if slots == 1:
            self.seq, self.seq_stride = self.pool, self.pool_stride
        else:
            self.seq_stride = aligned(max_seq * row_bytes)
            self.seq = cuda_rt.DeviceBuffer(n * self.seq_stride)
        self.new_stride = aligned(self.pos_bytes)
        self.new = cuda_rt.DeviceBuffer(n * self.new_stride)
        self.stage = cuda_rt.DeviceBuffer(n * self.seq_stride) if row_bytes % ALIGN else None
        self.fixed = cuda_rt.DeviceBuffer(n * self.seq_stride) if fixed_out else None
        # Zero-filled: a batch step reads every slot's rows below P, and a masked row still
        # meets 0 * value in the attention, so they must be finite (cudaMalloc's aren't).
        cuda_rt.memset(self.pool.ptr, 0, self.pool.nbytes, stream)

    # ---- addresses ------------------------------------------------------------------
    def past(self, t: int) -> int:
        """Tensor *t*'s pool block: bound as ``past_*`` ``[P, slots, kv, hd]``."""
        return self.pool.ptr + t * self.pool_stride

    def seq_at(self, t: int, pos: int = 0) -> int:
        """Position *pos* of tensor *t* in the one-sequence buffer."""
        return self.seq.ptr + t * self.seq_stride + pos * self.row_bytes

    def new_at(self, t: int) -> int:
        """Tensor *t*'s rows of a batch step (``[1, slots, kv, hd]``)."""
        return self.new.ptr + t * self.new_stride

    def staged(self, start: int) -> bool:
        """Whether new rows at *start* of ``seq`` go through the staging buffer."""
        return (start * self.row_bytes) % ALIGN != 0

    def out_at(self, t: int, start: int) -> int:
        """Where a one-sequence run writes tensor *t*'s new rows from position *start*."""
        if self.staged(start):
            return self.stage.ptr + t * self.seq_stride
        return self.seq_at(t, start)

    def fixed_at(self, t: int) -> int:
        """Where a fixed-past prefill writes tensor *t*'s new rows (``fixed_out``)."""
        return self.fixed.ptr + t * self.seq_stride

    # ---- copies ----------------------------------------------------------------------
    def place(self, start: int, rows: int) -> None:
        """After a fixed-past prefill: its *rows* new rows into positions start.. of the
        one-sequence buffer (one 2D copy for every tensor)."""
        cuda_rt.copy_2d(
            self.seq_at(0, start), self.seq_stride, self.fixed.ptr, self.seq_stride,
            rows * self.row_bytes, len(self.tensors), self.stream,
        )  # fmt: skip

    def unstage(self, start: int, rows: int) -> None:
        """After a run at misaligned *start*: its *rows* new rows into place (one copy)."""
        if self.staged(start):
            width = rows * self.row_bytes
            cuda_rt.copy_2d(
                self.seq_at(0, start), self.seq_stride, self.stage.ptr, self.seq_stride,
                width, len(self.tensors), self.stream,
            )  # fmt: skip

    def commit(self, slot: int, length: int) -> None:
        """The one-sequence buffer's first *length* positions into pool *slot* (a no-op
        with one slot, where they are the same memory)."""
        if self.seq is self.pool:
            return
        for t in range(len(self.tensors)):
            dst = self.past(t) + slot * self.row_bytes
            cuda_rt.copy_2d(
                dst, self.pos_bytes, self.seq_at(t), self.row_bytes, self.row_bytes, length,
                self.stream,
            )  # fmt: skip

    def scatter(self, slots: Sequence[int]) -> None:
        """Each stepped slot's row of ``new`` to its next position (``lengths[s]``)."""
        n = len(self.tensors)
        for s in slots:
            at = int(self.lengths[s])
            if at >= self.max_seq:  # the step engine's last position: no slot to keep it
                continue
            dst = self.past(0) + at * self.pos_bytes + s * self.row_bytes
            src = self.new.ptr + s * self.row_bytes
            if self.pool_stride <= MAX_PITCH:
                cuda_rt.copy_2d(
                    dst, self.pool_stride, src, self.new_stride, self.row_bytes, n, self.stream
                )
                continue
            for t in range(n):
                off_dst, off_src = t * self.pool_stride, t * self.new_stride
                cuda_rt.copy_dtod(dst + off_dst, src + off_src, self.row_bytes, self.stream)

    def load(self, kv: Sequence[np.ndarray]) -> None:
        """A prefix's host K/V (per tensor ``[L, 1, kv, hd]``) into the one-sequence buffer."""
        if len(kv) != len(self.tensors):
            n = len(self.tensors)
            raise ValueError(f"the KV prefix has {len(kv)} tensors, the decoder {n}")
        for t, arr in enumerate(kv):
            arr = np.ascontiguousarray(arr, self.dtype)
            if arr.nbytes != arr.shape[0] * self.row_bytes or arr.shape[0] > self.max_seq:
                raise ValueError(f"KV prefix tensor {t} {arr.shape} does not fit this pool")
            # Pageable source: CUDA has staged it when the call returns.
            cuda_rt.copy_htod(self.seq_at(t), arr.ctypes.data, arr.nbytes, self.stream)

    def read(self, length: int, shape: tuple[int, ...]) -> list[np.ndarray]:
        """Host copies of the one-sequence buffer's first *length* positions, per tensor
        ``[length, 1, *shape]`` (what :class:`~trace_rt.backends.base.KVPrefix` holds)."""
        out = []
        for t in range(len(self.tensors)):
            arr = np.empty((length, 1, *shape), self.dtype)
            cuda_rt.copy_dtoh(arr.ctypes.data, self.seq_at(t), arr.nbytes, self.stream)
            out.append(arr)
        self.stream.synchronize()
        return out

    def free(self) -> None:
        for buf in (self.pool, self.seq, self.new, self.stage, self.fixed):
            if buf is not None:
                buf.free()
