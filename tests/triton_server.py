"""Helpers for tests against a real tritonserver (the binary bundled in nvidia-pytriton)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

from trace_rt.serving.server import TritonServer, free_ports

__all__ = ["free_ports", "long_gop_video", "running_server"]


@contextlib.contextmanager
def running_server(repo: Path, log_file: Path | None = None) -> Iterator[TritonServer]:
    """A started server on free ports; stopped on exit, whatever happened inside."""
    grpc, http, metrics = free_ports(3)
    server = TritonServer(
        repo, grpc_port=grpc, http_port=http, metrics_port=metrics, log_file=log_file
    )
    try:
        server.start(timeout=180)
        yield server
    finally:
        server.close()


def long_gop_video(path: str | os.PathLike, n_frames: int = 200_000) -> Path:
    """A valid but pathological video: *n_frames* 2x2 frames in one group of pictures
    (only the first is a keyframe), 1000 per second. ~6 MB for 200k frames, and sampling
    it decodes every frame: over ten seconds here, checked between every two packets."""
    import av

    with av.open(os.fspath(path), "w", format="matroska") as out:
        s = out.add_stream("rawvideo", rate=1000)
        s.width, s.height, s.pix_fmt = 2, 2, "gray"
        payload, tb = bytes(4), Fraction(1, 1000)
        for i in range(n_frames):
            p = av.Packet(payload)
            p.stream, p.pts, p.dts, p.time_base, p.is_keyframe = s, i, i, tb, i == 0
            out.mux(p)
    return Path(path)
