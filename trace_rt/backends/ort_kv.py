"""The onnxruntime backend's KV pool: per-layer K/V buffers ``[capacity, slots, kv, hd]``.

Position-major (the export's ``pooled-position-major`` contract, trace_rt/graphs.py): the
first P positions of every slot are one contiguous block, so a batch step binds
``buf[:P]`` as each ``past_*`` input by pointer and onnxruntime reads the cache in place.
With one slot, a slot's filled prefix and the positions right after it are contiguous as
well, so a single sequence also has its new K/V written straight into the buffers (no copy
at all: the single-sequence path of earlier versions, byte for byte). With several slots a
slot's positions are strided, so new K/V come out into a small scratch and are scattered
into each slot's next row (one numpy assignment per tensor and step).

Width: a step computes every column of the buffers (a masked row costs as much as a real
one), so the buffers hold only as many columns as there are sequences, rounded up to a
power of two (up to ``slots``): a lone request on an 8-slot server decodes as fast as on a
one-slot backend. A slot is a logical name; its column may change when the pool widens
(a new sequence finds no free column) or narrows (at most a quarter of the columns in
use), each a copy of the pool's filled positions, rare next to the steps it speeds up.

On the CPU EP the buffers are numpy arrays shared with onnxruntime (``OrtValue`` over the
same memory), so scatters and prefix copies are plain numpy writes. On the CUDA EP they
live on the device and those writes round-trip through host memory (onnxruntime's Python
API has no device-to-device copy): correct, slow, and untested here (no GPU).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from trace_rt.graphs import kv_names


class KVPool:
    """K/V buffers for *slots* sequences of up to ``capacity`` positions each.

    ``lengths[s]`` positions of slot s are filled. Capacity is shared by all slots and
    grows (keeping every slot's data) when a sequence needs more.
    """

    def __init__(
        self,
        layers: int,
        slots: int,
        kv_heads: int,
        head_dim: int,
        dtype,
        device: str,
        dev_id: int,
    ):
        self.layers, self.slots, self.row = layers, slots, (kv_heads, head_dim)
        self.dtype = np.dtype(dtype)
        self.device, self.device_id = device, dev_id
        self.names = [kv_names(i) for i in range(layers)]
        self.capacity = 0
        self.width = 1  # columns in the buffers: a power of two <= slots
        self.lengths = np.zeros(slots, np.int64)
        self.cols: dict[int, int] = {}  # slot -> its column, for slots holding a sequence
        self._bufs: list[ort.OrtValue] = []  # K0, V0, K1, V1, ...
        self._host: list[np.ndarray] | None = [] if device == "cpu" else None

    @property
    def length(self) -> int:
        """Filled positions of slot 0 (the single-sequence case)."""
        return int(self.lengths[0])

    @property
    def pos_bytes(self) -> int:
        """One position of every column: the stride of the position axis."""
        return self.width * self.row[0] * self.row[1] * self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return 2 * self.layers * self.capacity * self.pos_bytes

    # ---- slots and columns --------------------------------------------------------------
    def assign(self, slot: int) -> int:
        """The column of *slot*, giving it one (widening the buffers if none is free)."""
        if slot in self.cols:
            return self.cols[slot]
        used = set(self.cols.values())
        free = [c for c in range(self.width) if c not in used]
        if not free:
            self._relayout(min(self.slots, 2 * self.width), dict(self.cols))
            free = [c for c in range(self.width) if c not in used]
        self.cols[slot] = free[0]
        return free[0]

    def release(self, slot: int) -> None:
        """Forget *slot*; narrow the buffers when at most a quarter of the columns are used."""
        self.lengths[slot] = 0
        self.cols.pop(slot, None)
        n = len(self.cols)
        if self.width > 1 and n <= self.width // 4:
            width = 1 << max(0, n - 1).bit_length()  # the next power of two >= n (1 for 0)
            self._relayout(width, {s: i for i, s in enumerate(sorted(self.cols))})

    def col_array(self, slots) -> np.ndarray:
        return np.fromiter((self.cols[s] for s in slots), np.int64, len(slots))

    # ---- capacity -----------------------------------------------------------------------
    def fit(self, needed: int, capacity: int) -> None:
        """Make room for *needed* positions (allocating *capacity* if it must grow).

        When no slot holds anything, oversized buffers (over 4x *capacity*) are replaced,
        as a long request should not pin its memory for every later short one.
        """
        empty = not self.lengths.any()
        if needed > self.capacity:
            self._allocate(max(capacity, needed), keep=not empty)
        elif empty and self.capacity > 4 * capacity:
            self._allocate(capacity, keep=False)

    def grow(self, capacity: int) -> None:
        """Enlarge to *capacity* positions, keeping every slot's filled positions."""
        if capacity > self.capacity:
            self._allocate(capacity, keep=True)

    # ---- binding ------------------------------------------------------------------------
    def bind_pool(self, binding: ort.IOBinding, past: int) -> None:
        """Bind ``buf[:past]`` of every column as the ``past_*`` inputs [past, width, kv, hd]."""
        for i, (pk, pv, _, _) in enumerate(self.names):
            for buf, name in ((self._bufs[2 * i], pk), (self._bufs[2 * i + 1], pv)):
                binding.bind_input(
                    name,
                    self.device,
                    self.device_id,
                    self.dtype,
                    [past, self.width, *self.row],
                    buf.data_ptr(),
                )

    def bind_new_in_place(self, binding: ort.IOBinding, start: int, t: int) -> None:
        """One column only: bind positions ``start .. start+t-1`` as the new K/V outputs."""
        assert self.width == 1, "in-place outputs need one column"
        if start + t > self.capacity:
            raise ValueError(f"KV cache of {self.capacity} positions cannot take {start}+{t}")
        for i, (_, _, nk, nv) in enumerate(self.names):
            for buf, name in ((self._bufs[2 * i], nk), (self._bufs[2 * i + 1], nv)):
                binding.bind_output(
                    name,
                    self.device,
                    self.device_id,
                    self.dtype,
                    [t, 1, *self.row],
                    buf.data_ptr() + start * self.pos_bytes,
                )

    # ---- host-side writes and reads -----------------------------------------------------
    def write(self, slot: int, start: int, rows: list[np.ndarray]) -> None:
        """Write K/V *rows* (per layer K then V, ``[T, 1, kv, hd]``) at ``start`` of *slot*."""
        t = rows[0].shape[0]
        if start + t > self.capacity:
            raise ValueError(f"KV cache of {self.capacity} positions cannot take {start}+{t}")
        col = self.cols[slot]
        for j, r in enumerate(rows):
            self._set(j, (slice(start, start + t), col), r[:, 0])

    def scatter(self, slots: np.ndarray, new: list[np.ndarray]) -> None:
        """Each slot's row (its column) of each ``[1, width, kv, hd]`` in *new* goes to that
        slot's next position (its current length)."""
        at, cols = self.lengths[slots], self.col_array(slots)
        for j, r in enumerate(new):
            self._set(j, (at, cols), r[0, cols])

    def read(self, slot: int, length: int) -> list[np.ndarray]:
        """Host copies of *slot*'s first *length* positions, ``[length, 1, kv, hd]`` each."""
        out = []
        col = self.cols[slot]
        for j in range(2 * self.layers):
            src = self._host[j] if self._host is not None else self._bufs[j].numpy()
            # A copy, never a view: the pool's rows are reused by the slot's next sequence
            # (with one column the slice is contiguous, and ascontiguousarray would alias).
            out.append(np.array(src[:length, col : col + 1], copy=True))
        return out

    def numpy(self, layer: int, slot: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Host copies of *layer*'s filled K and V of *slot*, ``[1, length, kv, hd]``."""
        n = int(self.lengths[slot])
        k, v = self.read(slot, n)[2 * layer : 2 * layer + 2]
        return k.transpose(1, 0, 2, 3), v.transpose(1, 0, 2, 3)

    def _set(self, j: int, index: tuple, values: np.ndarray) -> None:
        if self._host is not None:
            self._host[j][index] = values
            return
        # CUDA EP: no device-to-device copy in onnxruntime's Python API (untested here).
        host = self._bufs[j].numpy()
        host[index] = values
        self._bufs[j].update_inplace(host)

    def _allocate(self, capacity: int, keep: bool) -> None:
        n = min(self.capacity, capacity) if keep else 0
        if not keep:
            self.lengths[:] = 0
        self._rebuild(capacity, self.width, n, {c: c for c in self.cols.values()})

    def _relayout(self, width: int, new_cols: dict[int, int]) -> None:
        """Rebuild with *width* columns, slot s's data moving to ``new_cols[s]``."""
        moves = {self.cols[s]: c for s, c in new_cols.items()}
        n = int(max((self.lengths[s] for s in new_cols), default=0))
        self._rebuild(self.capacity, width, n, moves)
        self.cols = dict(new_cols)

    def _rebuild(self, capacity: int, width: int, n: int, moves: dict[int, int]) -> None:
        """New zeroed buffers [capacity, width, kv, hd]; the first *n* positions of old
        column c are copied to column ``moves[c]``."""
        shape = [capacity, width, *self.row]
        old_bufs, old_host = self._bufs, self._host
        self._bufs = []
        self._host = [] if self.device == "cpu" else None
        src_cols = np.fromiter(moves.keys(), np.int64, len(moves))
        dst_cols = np.fromiter(moves.values(), np.int64, len(moves))
        for j in range(2 * self.layers):
            # Zero-filled: a masked slot still meets 0 * value in the attention, and
            # uninitialised memory may hold NaN.
            host = np.zeros(shape, self.dtype)
            if n and len(moves):
                src = old_host[j] if old_host is not None else old_bufs[j].numpy()
                host[:n, dst_cols] = src[:n, src_cols]
            if j < len(old_bufs):  # free tensor by tensor: the peak is one extra tensor
                old_bufs[j] = None
                if old_host is not None:
                    old_host[j] = None
            buf = ort.OrtValue.ortvalue_from_numpy(host, self.device, self.device_id)
            if self._host is not None:
                self._host.append(host)  # the OrtValue shares this memory on the CPU EP
            self._bufs.append(buf)
        self.capacity, self.width = capacity, width
