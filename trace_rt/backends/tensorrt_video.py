"""The TensorRT backend's video path: vision encoder and projector engines.

Their device buffers are allocated once, for the largest video the engines admit, and
shared by name between the two engines (the features never leave the device). Each
encoded video block is then copied into a buffer of its own (:class:`DeviceVideo`), so
the handles of several videos stay valid together: sequences batched in one engine, and
the video cache's entries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from trace_rt.backends import cuda_rt
from trace_rt.backends.tensorrt_exec import ITEMSIZE, execute, set_address, set_shape, shape_of
from trace_rt.errors import InputError
from trace_rt.graphs import PROJECTOR, VISION_ENCODER, GraphSpec


@dataclass(eq=False)
class DeviceVideo:
    """A video block ``[rows, hidden]`` in a device buffer of its own (freed with it)."""

    rows: int
    hidden: int
    buf: cuda_rt.DeviceBuffer

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.hidden)

    @property
    def nbytes(self) -> int:
        return self.buf.nbytes


class VideoEngines:
    """Runs frames through the vision encoder and projector engines.

    Args:
        engines: deserialised engines by graph name (both video graphs).
        specs: the manifest's graph specs.
        max_frames: the engines' ``--max-frames`` (the buffers' size).
        row_bytes: bytes of one embedding row (hidden * the export's itemsize).
        stream: the backend's stream.
    """

    def __init__(
        self,
        engines: dict[str, Any],
        specs: dict[str, GraphSpec],
        max_frames: int,
        row_bytes: int,
        stream: cuda_rt.Stream,
    ):
        self.specs, self.max_frames, self.row_bytes, self.stream = (
            specs, max_frames, row_bytes, stream,
        )  # fmt: skip
        vis, proj = specs[VISION_ENCODER], specs[PROJECTOR]
        produced = set(vis.output_names)
        self.inputs = (vis.inputs[0], next(t for t in proj.inputs if t.name not in produced))
        self.buffers: dict[str, cuda_rt.DeviceBuffer] = {}
        self.contexts: dict[str, Any] = {}
        for graph in (VISION_ENCODER, PROJECTOR):
            ctx = engines[graph].create_execution_context()
            for t in specs[graph].inputs:
                set_shape(ctx, t.name, shape_of(t, {"frames": max_frames}), graph)
            for name in [*specs[graph].input_names, *specs[graph].output_names]:
                if name not in self.buffers:
                    shape = tuple(ctx.get_tensor_shape(name))  # outputs: inferred at max
                    dtype = engines[graph].get_tensor_dtype(name)
                    nbytes = int(np.prod(shape)) * ITEMSIZE[dtype.name]
                    self.buffers[name] = cuda_rt.DeviceBuffer(nbytes)
                set_address(ctx, name, self.buffers[name].ptr)
            self.contexts[graph] = ctx

    def encode(self, pixel_values: np.ndarray, time_ids: np.ndarray, hidden: int) -> DeviceVideo:
        """Frames ``[F, 3, H, W]`` + time ids ``[F, 6]`` -> the video block, on the device."""
        frames = pixel_values.shape[0]
        if frames > self.max_frames:
            raise InputError(
                f"{frames} frames exceed the engines' limit of {self.max_frames}; rebuild "
                "with `python -m export trt OUT --max-frames N` or sample fewer frames"
            )
        px_in, tid_in = self.inputs
        self._htod(px_in.name, np.ascontiguousarray(pixel_values, np.float32))
        self._htod(tid_in.name, np.ascontiguousarray(time_ids, np.int64))
        for graph in (VISION_ENCODER, PROJECTOR):
            ctx = self.contexts[graph]
            for t in self.specs[graph].inputs:
                set_shape(ctx, t.name, shape_of(t, {"frames": frames}), graph)
            execute(ctx, self.stream, graph)
        out = self.specs[PROJECTOR].outputs[0].name
        rows = int(self.contexts[PROJECTOR].get_tensor_shape(out)[0])
        video = DeviceVideo(rows, hidden, cuda_rt.DeviceBuffer(rows * self.row_bytes))
        cuda_rt.copy_dtod(video.buf.ptr, self.buffers[out].ptr, video.nbytes, self.stream)
        return video

    def free(self) -> None:
        for buf in self.buffers.values():
            buf.free()

    def _htod(self, name: str, arr: np.ndarray) -> None:
        buf = self.buffers[name]
        if arr.nbytes > buf.nbytes:
            raise ValueError(f"{arr.nbytes} bytes do not fit the {buf.nbytes}-byte {name}")
        # Pageable source: the copy has been staged when the call returns.
        cuda_rt.copy_htod(buf.ptr, arr.ctypes.data, arr.nbytes, self.stream)
