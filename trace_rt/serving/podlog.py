"""What ``trace-rt serve`` needs in a pod: structured logs and a drain on SIGTERM.

``--log-format json``: every line on stderr is one JSON object (``time``, ``level``,
``source``, ``msg``, and fields), for log collectors (Loki, Cloud Logging, Elasticsearch).
tritonserver's own log (which Triton writes as text: ``I1130 07:04:54.393681 19514
server.cc:321] "message"``) is followed and re-emitted line by line in the same form, with
``source: tritonserver`` and Triton's level, pid and source location.

The drain itself is Triton's: on SIGTERM it refuses new requests at once (the model is
being unloaded: clients get an error and, through a balancer, go elsewhere), lets running
ones finish for up to ``--exit-timeout-secs`` (``trace-rt serve --drain-timeout``), then
exits. ``trace-rt serve`` forwards the signal, waits that long plus a margin, logs what
happened, and kills the server only past it.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

LEVELS = {"I": "info", "W": "warning", "E": "error", "V": "debug"}
# I1130 07:04:54.393681 19514 server.cc:321] "message"
_TRITON_LINE = re.compile(
    r"^(?P<lvl>[IWEV])(?P<md>\d{4}) (?P<t>\d\d:\d\d:\d\d\.\d+) +(?P<pid>\d+) "
    r"(?P<loc>[^\]\s]+)\] (?P<msg>.*)$"
)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


class ServeLog:
    """``trace-rt serve``'s messages: plain text (the default) or JSON lines."""

    def __init__(self, fmt: str = "text", stream: TextIO | None = None):
        if fmt not in ("text", "json"):
            raise ValueError(f"log format must be text or json, not {fmt!r}")
        self.json = fmt == "json"
        self.stream = stream or sys.stderr
        self._lock = threading.Lock()

    def __call__(self, msg: str, level: str = "info", **fields: Any) -> None:
        if self.json:
            rec = {"time": _now(), "level": level, "source": "trace-rt", "msg": msg, **fields}
            line = json.dumps(rec, ensure_ascii=False, default=str)
        else:
            line = msg if level == "info" else f"trace-rt: {level}: {msg}"
        with self._lock:
            print(line, file=self.stream, flush=True)

    def triton(self, line: str, last_level: str = "info") -> str:
        """Re-emit one line of tritonserver's log (JSON mode); returns its level (a
        continuation line of a multi-line message keeps the level of the line before)."""
        m = _TRITON_LINE.match(line)
        if m is None:
            rec = {"time": _now(), "level": last_level, "source": "tritonserver", "msg": line}
        else:
            msg = m["msg"]
            if len(msg) >= 2 and msg[0] == msg[-1] == '"':
                msg = msg[1:-1]
            last_level = LEVELS[m["lvl"]]
            rec = {
                "time": _now(),
                "level": last_level,
                "source": "tritonserver",
                "msg": msg,
                "pid": int(m["pid"]),
                "at": m["loc"],
            }
        with self._lock:
            print(json.dumps(rec, ensure_ascii=False), file=self.stream, flush=True)
        return last_level


class LogFollower(threading.Thread):
    """Follows tritonserver's log file and re-emits each complete line through *log*
    until :meth:`stop` (which first reads what is left)."""

    def __init__(self, path: Path, log: ServeLog, poll: float = 0.2):
        super().__init__(name="triton-log", daemon=True)
        self.path, self.log, self.poll = path, log, poll
        self._done = threading.Event()
        self._pos = 0
        self._level = "info"

    def run(self) -> None:
        while not self._done.is_set():
            self._drain()
            self._done.wait(self.poll)
        self._drain()

    def _drain(self) -> None:
        try:
            with open(self.path, "rb") as f:
                if os.fstat(f.fileno()).st_size < self._pos:
                    self._pos = 0  # truncated (the server rewrote it): from the start
                f.seek(self._pos)
                data = f.read()
        except OSError:
            return
        end = data.rfind(b"\n") + 1  # whole lines only; the rest waits for its newline
        self._pos += end
        for raw in data[:end].decode("utf-8", "replace").splitlines():
            if raw.strip():
                self._level = self.log.triton(raw, self._level)

    def stop(self) -> None:
        self._done.set()
        self.join(timeout=5)


def drain(server: Any, log: ServeLog, grace: float, margin: float = 15.0) -> bool:
    """Stop *server* (a :class:`~trace_rt.serving.server.TritonServer` started with
    ``exit_timeout=grace``) as a pod must: SIGTERM, Triton refuses new requests and finishes
    running ones within *grace* s; killed after *grace* + *margin*. True if it exited by
    itself."""
    proc = server.proc
    log("draining: new requests are refused, running ones finish", grace_s=grace)
    t0 = time.monotonic()
    server.stop(timeout=grace + margin)
    spent = time.monotonic() - t0
    clean = proc is None or proc.returncode in (0, -15)
    code = None if proc is None else proc.returncode
    log("stopped" if clean else "stopped (forced)", seconds=round(spent, 3), exit_code=code)
    return clean
