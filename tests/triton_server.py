"""Helpers for tests against a real tritonserver (the binary bundled in nvidia-pytriton)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from trace_rt.serving.server import TritonServer, free_ports

__all__ = ["free_ports", "running_server"]


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
