"""Start and stop a real ``tritonserver`` for a generated model repository.

Here (no GPU, no container) the server is the genuine ``tritonserver`` binary bundled in
the ``nvidia-pytriton`` wheel, with its Python backend; :func:`find_bundled` locates it
without importing ``pytriton``. On a GPU host the same repository is served by NVIDIA's
Triton container instead (``triton_repo/README.md`` has the command).

The bundled Python backend's stub embeds the system's ``libpython`` in isolated mode: it
ignores ``PYTHONPATH`` and sees only the system's site-packages. :class:`TritonServer`
therefore passes this interpreter's package directories in ``TRACE_RT_SITE_DIRS``, and the
generated ``model.py`` files add them to ``sys.path`` before importing ``trace_rt``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import importlib.util
import ipaddress
import os
import re
import secrets
import shlex
import shutil
import signal
import site
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from trace_rt.errors import TraceError

SITE_DIRS_ENV = "TRACE_RT_SITE_DIRS"
# Triton's endpoints that change the server rather than ask it: shared-memory
# registration (a client maps server memory), model load/unload, trace and log settings.
ADMIN_APIS = ("shared-memory", "model-repository", "trace", "logging")
ADMIN_HEADER = "admin-key"  # HTTP header; gRPC clients send GRPC_ADMIN_HEADER
GRPC_ADMIN_HEADER = "triton-grpc-protocol-" + ADMIN_HEADER  # Triton's prefix for gRPC
ADMIN_KEY_ENV = "TRACE_RT_ADMIN_KEY"
PR_SET_PDEATHSIG = 1
DEATH_SIGNAL = signal.SIGKILL
# glibc keeps freed memory in per-thread arenas and pooled request objects keep their
# largest payload: one refused 1 GB request stayed held for good. One arena, trimmed, with
# buffers from 64 KiB up mmapped, gives the memory back. Measured here, tritonserver's
# anonymous memory after a refused payload: +288 MB for 200 MB before; +1 to +3 MB for
# 48 to 100 MB with this and --grpc-infer-allocation-pool-size=0, once the client has gone.
# For tritonserver only: the Python stubs (onnxruntime, numpy) ran a tiny request ~1.5x
# slower with it, and they hold no payload (the model frees its shared memory itself).
MALLOC_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_TRIM_THRESHOLD_": str(1 << 20),
    "MALLOC_MMAP_THRESHOLD_": str(64 << 10),
}


class ServerError(TraceError):
    """tritonserver could not be found, started, or did not become ready."""


@dataclass(frozen=True)
class Bundle:
    """The parts of the ``nvidia-pytriton`` wheel that make a working server."""

    binary: Path
    python_backend: Path  # libtriton_python.so + triton_python_backend_utils.py
    stub: Path  # triton_python_backend_stub for this Python version
    libs: Path  # shared libraries the binary and the stub link against


def find_bundled() -> Bundle:
    """Locate tritonserver in the installed ``nvidia-pytriton`` wheel."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServerError(
            "tritonserver not found: install the serving extra (`pip install "
            "'trace-rt[serve]'`, which brings nvidia-pytriton's bundled tritonserver), or "
            "on a GPU host run NVIDIA's Triton container (triton_repo/README.md)"
        )
    pkg = Path(next(iter(spec.submodule_search_locations)))
    root = pkg / "tritonserver"
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    bundle = Bundle(
        binary=root / "bin" / "tritonserver",
        python_backend=root / "backends" / "python",
        stub=root / "python_backend_stubs" / py / "triton_python_backend_stub",
        libs=pkg.parent / "nvidia_pytriton.libs",
    )
    for what, path in [
        ("tritonserver binary", bundle.binary),
        ("Python backend", bundle.python_backend / "libtriton_python.so"),
        (f"Python {py} backend stub", bundle.stub),
    ]:
        if not path.exists():
            raise ServerError(f"nvidia-pytriton is installed but has no {what} at {path}")
    return bundle


def backend_dir(bundle: Bundle, dest: Path, stub_unset: tuple[str, ...] = ()) -> Path:
    """A ``--backend-directory`` holding the Python backend and this Python's stub.

    Args:
        stub_unset: environment variables the stubs must not inherit from tritonserver;
            the stub is then a small script that drops them and runs the real one.
    """
    python = dest / "python"
    python.mkdir(parents=True, exist_ok=True)
    for src in [
        bundle.python_backend / "libtriton_python.so",
        bundle.python_backend / "triton_python_backend_utils.py",
    ]:
        target = python / src.name
        if not target.exists():
            shutil.copy2(src, target)
    stub = python / bundle.stub.name
    stub.unlink(missing_ok=True)
    if stub_unset:
        stub.write_text(
            f'#!/bin/sh\nunset {" ".join(stub_unset)}\nexec {shlex.quote(str(bundle.stub))} "$@"\n'
        )
        stub.chmod(0o755)
    else:
        shutil.copy2(bundle.stub, stub)
    return dest


def site_dirs() -> list[str]:
    """This interpreter's package directories (site-packages, and trace_rt's own root
    for a source checkout), for the Python backend's stub."""
    dirs = [*site.getsitepackages()]
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    root = Path(__file__).resolve().parents[2]  # .../trace_rt/serving/server.py
    dirs.append(str(root))
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def _die_with_parent() -> None:
    # Linux: SIGKILL the server when the process that started it dies, however it dies
    # (a killed test run must not leave a server holding ports). Runs in the child
    # between fork and exec; a failure raises there, and Popen raises SubprocessError.
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, DEATH_SIGNAL) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def is_loopback(host: str) -> bool:
    """Whether *host* is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def busy_ports(host: str, ports: dict[str, int]) -> list[str]:
    """Which of *ports* (name -> port) cannot be bound on *host* now, as messages."""
    busy = []
    for name, port in ports.items():
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            # As a server binds: a listener holds the port, a closed connection does not.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as e:
                why = "already in use" if e.errno == errno.EADDRINUSE else e.strerror
                busy.append(f"{name} port {port} on {host} is {why}")
    return busy


# The lines of a tritonserver log that say why it stopped (E: error severity), and the
# error lines that a machine without a GPU always logs.
_CAUSE = re.compile(r"^E\d{4} |^Bad option|^error:|already in use", re.IGNORECASE)
_NO_GPU_NOISE = re.compile(r"Cuda|CUDA|NVML|DCGM|GPU|pinned", re.IGNORECASE)


def failure_cause(log: str) -> str | None:
    """The first line of a tritonserver log that names an error, without its prefix."""
    for line in log.splitlines():
        if _CAUSE.search(line) and not _NO_GPU_NOISE.search(line):
            # 'E1130 03:10:19.123 1234 file.cc:56] "message\n\nAt:..."' -> 'message'
            message = line.split("] ", 1)[-1].strip().strip('"')
            return message.split("\\n", 1)[0].strip()
    return None


class TritonServer:
    """A ``tritonserver`` process serving *repo*; use as a context manager.

    Args:
        repo: the model repository (``python -m triton_repo build``).
        host: address the three endpoints listen on.
        grpc_port, http_port, metrics_port: their ports.
        log_file: where the server's output goes (default: a temporary file).
        verbose: tritonserver's ``--log-verbose`` level.
        admin_key: the admin APIs (:data:`ADMIN_APIS`, HTTP and gRPC) answer only
            requests carrying header :data:`ADMIN_HEADER` with this value; None: a random
            key nobody knows, so they answer no one.
        exit_timeout: seconds Triton lets running requests finish after SIGTERM (its
            ``--exit-timeout-secs``; ``trace-rt serve --drain-timeout``).
    """

    def __init__(
        self,
        repo: str | Path,
        *,
        host: str = "127.0.0.1",
        grpc_port: int = 8001,
        http_port: int = 8000,
        metrics_port: int = 8002,
        log_file: str | Path | None = None,
        verbose: int = 0,
        admin_key: str | None = None,
        exit_timeout: int = 10,
    ):
        self.repo = Path(repo).resolve()
        if not (self.repo.is_dir() and any(self.repo.glob("*/config.pbtxt"))):
            raise ServerError(
                f"{self.repo} is not a model repository (no */config.pbtxt); make one with "
                "`python -m triton_repo build ARTIFACTS OUT`"
            )
        self.host = host
        self.grpc_port, self.http_port, self.metrics_port = grpc_port, http_port, metrics_port
        self.verbose = verbose
        self.exit_timeout = exit_timeout
        if admin_key is not None and not re.fullmatch(r"[A-Za-z0-9._~-]{16,}", admin_key):
            raise ServerError("the admin key must be at least 16 characters of A-Z a-z 0-9 . _ ~ -")
        self.admin_key = admin_key or secrets.token_urlsafe(24)
        self._tmp = tempfile.TemporaryDirectory(prefix="trace-rt-triton-")
        self.log_file = Path(log_file) if log_file else Path(self._tmp.name) / "tritonserver.log"
        self.proc: subprocess.Popen | None = None

    @property
    def grpc_url(self) -> str:
        return f"{_client_host(self.host)}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{_client_host(self.host)}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{_client_host(self.host)}:{self.metrics_port}/metrics"

    def command(self, bundle: Bundle) -> list[str]:
        # The malloc settings this server adds are tritonserver's alone (MALLOC_ENV).
        added = tuple(k for k in MALLOC_ENV if k not in os.environ)
        backends = backend_dir(bundle, Path(self._tmp.name) / "backends", added)
        restricted = f"{','.join(ADMIN_APIS)}:{ADMIN_HEADER}={self.admin_key}"
        return [
            str(bundle.binary),
            f"--model-repository={self.repo}",
            f"--backend-directory={backends}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            f"--http-restricted-api={restricted}",
            f"--grpc-restricted-protocol={restricted}",
            # No pooled request objects: a pooled one keeps its largest payload's memory.
            "--grpc-infer-allocation-pool-size=0",
            "--allow-gpu-metrics=false",
            f"--exit-timeout-secs={self.exit_timeout}",
            f"--log-verbose={self.verbose}",
        ]

    def start(self, timeout: float = 180.0) -> TritonServer:
        """Start the server and wait until it and every model are ready."""
        bundle = find_bundled()
        plans = sorted(
            c.parent.name
            for c in self.repo.glob("*/config.pbtxt")
            if 'platform: "tensorrt_plan"' in c.read_text()
        )
        if plans:
            raise ServerError(
                f"{self.repo}: {', '.join(plans)} are tensorrt_plan models, and the "
                "tritonserver bundled in nvidia-pytriton has no TensorRT backend; serve a "
                "--backend tensorrt repository with NVIDIA's Triton container "
                "(triton_repo/README.md)"
            )
        busy = busy_ports(
            self.host,
            {"gRPC": self.grpc_port, "HTTP": self.http_port, "metrics": self.metrics_port},
        )
        if busy:
            raise ServerError(
                "; ".join(busy) + " (pick free ones with --grpc-port/--http-port/"
                "--metrics-port, or stop the server holding them)"
            )
        env = {**MALLOC_ENV, **os.environ}
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (str(bundle.libs), env.get("LD_LIBRARY_PATH", "")) if p
        )
        env[SITE_DIRS_ENV] = os.pathsep.join(site_dirs())
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_file, "wb")  # noqa: SIM115 - the server writes it until stop()
        try:
            self.proc = subprocess.Popen(
                self.command(bundle),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # Ctrl-C reaches us, and we stop the server in order
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
        except subprocess.SubprocessError as e:  # from _die_with_parent, in the child
            raise ServerError(
                f"could not start tritonserver so that it dies with this process "
                f"(prctl PR_SET_PDEATHSIG failed: {e})"
            ) from None
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(self.failure(f"exited with code {self.proc.returncode}"))
            if self.ready():
                return self
            time.sleep(0.25)
        self.stop()
        raise ServerError(self.failure(f"not ready after {timeout:.0f} s"))

    def failure(self, what: str) -> str:
        """A start failure's message: the cause first, then the log's last lines."""
        tail = self.log_tail()
        try:
            cause = failure_cause(self.log_file.read_text(errors="replace"))
        except OSError:
            cause = None
        head = f"tritonserver {what}" + (f": {cause}" if cause else "")
        return f"{head}\n--- last lines of {self.log_file} ---\n{tail}"

    def ready(self) -> bool:
        """The server answers and all its models are ready (HTTP health endpoint)."""
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server (SIGTERM: in-flight requests finish; SIGKILL after *timeout*)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def close(self) -> None:
        self.stop()
        self._tmp.cleanup()

    def __enter__(self) -> TritonServer:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """*n* distinct ports free on *host* right now (for tests and benchmarks)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else host
