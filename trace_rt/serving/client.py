"""gRPC client of the ``trace_pipeline`` model (``trace-rt client``).

``trace_pipeline`` is decoupled, so every request goes over Triton's bidirectional gRPC
stream: the client sends the video's bytes and gets one response per event as the
server completes it, then the final ``trace-rt run`` JSON. Needs ``tritonclient[grpc]``
(the ``serve`` extra), imported only here.
"""

from __future__ import annotations

import json
import os
import queue
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from trace_rt.errors import InputError, TraceError
from trace_rt.serving.protocol import TRACE_PIPELINE


class ServingError(TraceError):
    """The server answered a request with an error (its message says why)."""


class TraceClient:
    """Talks to a Triton server that serves a ``python -m triton_repo build`` repository.

    Args:
        url: the server's gRPC endpoint, ``host:port``.
        model: the pipeline model's name.
    """

    def __init__(self, url: str = "127.0.0.1:8001", model: str = TRACE_PIPELINE):
        try:
            import tritonclient.grpc as grpcclient
        except ImportError as e:
            raise TraceError(
                "trace-rt client needs tritonclient: pip install 'trace-rt[serve]'"
            ) from e
        from tritonclient.utils import InferenceServerException

        self._grpc = grpcclient
        self._errors = (InferenceServerException,)
        self.url, self.model = url, model
        self.client = grpcclient.InferenceServerClient(url)

    def ready(self) -> bool:
        try:
            return bool(self.client.is_server_ready() and self.client.is_model_ready(self.model))
        except Exception:  # connection refused and friends
            return False

    def infer(
        self,
        video: str | os.PathLike | bytes | None = None,
        *,
        task: str | None = "dvc",
        query: str | None = None,
        question: str | None = None,
        frames: np.ndarray | None = None,
        timestamps: np.ndarray | None = None,
        duration: float | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        constrained: bool | None = None,
        ignore_eos: bool | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        timeout: float = 600.0,
    ) -> dict[str, Any]:
        """Send one request; returns the final result (the ``trace-rt run`` JSON).

        Args:
            video: a local file (read here and sent as bytes) or the file's bytes.
            frames, timestamps, duration: preprocessed frames instead of *video*.
            max_new_tokens, temperature, top_p, seed, constrained: generation settings
                (None: the server's default); ignore_eos decodes the whole budget past EOS
                (benchmarks).
            on_event: called with each event (``{"index", "timestamps", "scores",
                "caption"}``) as it streams in, before the final result.
            timeout: seconds to wait for the final response.

        Raises:
            ServingError: the server's error message (bad video, unknown task, ...).
        """
        g = self._grpc
        inputs: list[Any] = []

        def add(name: str, value: np.ndarray, triton_type: str) -> None:
            t = g.InferInput(name, list(value.shape), triton_type)
            t.set_data_from_numpy(value)
            inputs.append(t)

        if video is not None:
            data = video if isinstance(video, bytes) else Path(video).read_bytes()
            add("video", np.frombuffer(data, dtype=np.uint8), "UINT8")
        if frames is not None:
            add("frames", np.ascontiguousarray(frames, dtype=np.float32), "FP32")
        if timestamps is not None:
            add("timestamps", np.asarray(timestamps, dtype=np.float32).reshape(-1), "FP32")
        for name, text in (("task", task), ("query", query), ("question", question)):
            if text is not None:
                add(name, np.array([text.encode("utf-8")], dtype=np.object_), "BYTES")
        scalars = [
            ("duration", duration, np.float32, "FP32"),
            ("max_new_tokens", max_new_tokens, np.int32, "INT32"),
            ("temperature", temperature, np.float32, "FP32"),
            ("top_p", top_p, np.float32, "FP32"),
            ("seed", seed, np.int64, "INT64"),
            ("constrained", constrained, np.bool_, "BOOL"),
            ("ignore_eos", ignore_eos, np.bool_, "BOOL"),
        ]
        for name, value, dtype, triton_type in scalars:
            if value is not None:
                add(name, np.array([value], dtype=dtype), triton_type)

        responses: queue.Queue = queue.Queue()
        request_id = uuid.uuid4().hex
        self.client.start_stream(callback=lambda result, error: responses.put((result, error)))
        try:
            try:
                self.client.async_stream_infer(self.model, inputs, request_id=request_id)
            except self._errors as e:  # a broken stream; its callback holds the reason
                try:
                    _, why = responses.get(timeout=5)
                except queue.Empty:
                    why = e
                raise ServingError(self._describe(why)) from None
            while True:
                try:
                    result, error = responses.get(timeout=timeout)
                except queue.Empty:
                    raise ServingError(f"no final response within {timeout:.0f} s") from None
                if error is not None:
                    raise ServingError(self._describe(error))
                got = result.get_response().id
                if got != request_id:  # one stream per call, so this would be a server bug
                    raise ServingError(f"response for request {got!r}, expected {request_id!r}")
                final = result.as_numpy("result")
                if final is not None:
                    return json.loads(final.reshape(-1)[0])
                event = result.as_numpy("event")
                if event is not None and on_event is not None:
                    on_event(json.loads(event.reshape(-1)[0]))
        finally:
            self.client.stop_stream()

    def _describe(self, error: Exception) -> str:
        """The server's message; for a server that cannot be reached, which one."""
        status = str(error.status()) if hasattr(error, "status") else ""
        if "UNAVAILABLE" in status:
            return f"cannot reach the Triton server at {self.url}: {_message(error)}"
        return _message(error)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> TraceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _message(error: Exception) -> str:
    msg = error.message() if hasattr(error, "message") else str(error)
    return msg or str(error)


def check_url(url: str) -> str:
    """``host:port`` (the gRPC endpoint); a clear error for anything else."""
    host, sep, port = url.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise InputError(f"--url must be HOST:PORT (the gRPC endpoint), got {url!r}")
    return url
