"""Helpers for tests against a real tritonserver (the binary bundled in nvidia-pytriton)."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path

from trace_rt.serving.server import TritonServer


def free_ports(n: int) -> list[int]:
    """*n* distinct ports free right now on 127.0.0.1."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


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
