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
import stat
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from trace_rt.errors import InputError, TraceError
from trace_rt.serving.protocol import TRACE_PIPELINE


class ServingError(TraceError):
    """The server answered a request with an error (its message says why)."""


# Scalar inputs: numpy dtype and Triton type (trace_rt.serving.protocol.pipeline_inputs).
_SCALARS = {
    "duration": (np.float32, "FP32"),
    "max_new_tokens": (np.int32, "INT32"),
    "temperature": (np.float32, "FP32"),
    "top_p": (np.float32, "FP32"),
    "seed": (np.int64, "INT64"),
    "constrained": (np.bool_, "BOOL"),
    "ignore_eos": (np.bool_, "BOOL"),
}


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
        self._limits: dict[str, int] | None = None

    def ready(self) -> bool:
        try:
            return bool(self.client.is_server_ready() and self.client.is_model_ready(self.model))
        except Exception:  # connection refused and friends
            return False

    def limits(self) -> dict[str, int]:
        """The server's request limits from ``trace_pipeline``'s model config (parameters
        ``max_video_bytes``, ``max_new_tokens``); empty for a repository without them."""
        if self._limits is None:
            try:
                config = self.client.get_model_config(self.model, as_json=True)["config"]
            except self._errors as e:
                raise ServingError(self._describe(e)) from None
            params = config.get("parameters", {})
            self._limits = {
                k: int(v["string_value"])
                for k, v in params.items()
                if k in ("max_video_bytes", "max_new_tokens")
            }
        return self._limits

    def infer(
        self,
        video: str | os.PathLike | bytes | None = None,
        *,
        video_id: str | None = None,
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
        timestamp_mode: str | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        timeout: float = 600.0,
    ) -> dict[str, Any]:
        """Send one request; returns the final result (the ``trace-rt run`` JSON).

        Args:
            video: a local file (its size checked against the server's limit, then read
                and sent; the result's ``video`` is its path) or the file's bytes.
            video_id: instead of *video*: the ``video_id`` of an earlier result; the server
                answers from its video cache (an unknown or evicted id is a
                :class:`ServingError` that asks for the bytes again).
            frames, timestamps, duration: preprocessed frames instead of *video*.
            max_new_tokens, temperature, top_p, seed, constrained: generation settings
                (None: the server's default); ignore_eos decodes the whole budget past EOS
                (benchmarks); timestamp_mode ``frames`` lets timestamps spell only the
                sampled frames' times.
            on_event: called with each event (``{"index", "timestamps", "scores",
                "caption"}``) as it streams in, before the final result.
            timeout: seconds until the final response, for the whole request; past it the
                request is cancelled.

        Raises:
            ServingError: the server's error message (bad video, unknown task, ...), or
                no final response within *timeout*.
            InputError: the file is missing, unreadable or over the server's limit.
        """
        data = None if video is None or isinstance(video, bytes) else self._read(video)
        values = {
            "video": video if isinstance(video, bytes) else data,
            "video_id": video_id,
            "frames": frames,
            "timestamps": timestamps,
            "task": task,
            "query": query,
            "question": question,
            "duration": duration,
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "seed": seed,
            "constrained": constrained,
            "ignore_eos": ignore_eos,
            "timestamp_mode": timestamp_mode,
        }
        inputs = [self._tensor(name, value) for name, value in values.items() if value is not None]
        result = self._stream(inputs, on_event, timeout)
        if data is not None:
            result["video"] = str(video)  # as `trace-rt run` names it
        return result

    def _read(self, path: str | os.PathLike) -> bytes:
        """A local video's bytes, refused before reading when over the server's limit."""
        info = check_video_file(path)
        limit = self.limits().get("max_video_bytes")
        if limit is not None and info.st_size > limit:
            raise InputError(
                f"{path} is {info.st_size} bytes, over the server's limit of {limit} bytes "
                "(max_video_bytes)"
            )
        try:
            return Path(path).read_bytes()
        except OSError as e:
            raise InputError(f"cannot read {path}: {e.strerror}") from None

    def _tensor(self, name: str, value: Any) -> Any:
        """One named input as a Triton tensor of the contract's type."""
        if isinstance(value, str):
            array, kind = np.array([value.encode("utf-8")], dtype=np.object_), "BYTES"
        elif name == "video":
            array, kind = np.frombuffer(value, dtype=np.uint8), "UINT8"
        elif name in ("frames", "timestamps"):
            array = np.ascontiguousarray(value, dtype=np.float32)
            array, kind = (array if name == "frames" else array.reshape(-1)), "FP32"
        else:
            dtype, kind = _SCALARS[name]
            array = np.array([value], dtype=dtype)
        tensor = self._grpc.InferInput(name, list(array.shape), kind)
        tensor.set_data_from_numpy(array)
        return tensor

    def _stream(
        self,
        inputs: list[Any],
        on_event: Callable[[dict[str, Any]], None] | None,
        timeout: float,
    ) -> dict[str, Any]:
        """Send *inputs* over a new stream; events go to *on_event*, the result returns.
        The whole exchange must end within *timeout* s, however the events keep coming."""
        responses: queue.Queue = queue.Queue()
        request_id = uuid.uuid4().hex
        deadline = time.monotonic() + timeout
        self.client.start_stream(callback=lambda result, error: responses.put((result, error)))
        done = False
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
                # Checked before each response: queued ones would otherwise be handed out
                # past the deadline (Queue.get returns what it holds whatever the timeout).
                left = deadline - time.monotonic()
                try:
                    if left <= 0:
                        raise queue.Empty
                    result, error = responses.get(timeout=left)
                except queue.Empty:
                    raise ServingError(f"no final response within {timeout:g} s") from None
                if error is not None:
                    raise ServingError(self._describe(error))
                got = result.get_response().id
                if got != request_id:  # one stream per call, so this would be a server bug
                    raise ServingError(f"response for request {got!r}, expected {request_id!r}")
                final = result.as_numpy("result")
                if final is not None:
                    done = True
                    return json.loads(final.reshape(-1)[0])
                event = result.as_numpy("event")
                if event is not None and on_event is not None:
                    on_event(json.loads(event.reshape(-1)[0]))
        finally:
            # A request left unfinished (deadline, error in on_event) is cancelled, so
            # that the server stops decoding for it.
            self.client.stop_stream(cancel_requests=not done)

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


def check_video_file(path: str | os.PathLike) -> os.stat_result:
    """A local video file's ``stat``; a clear error for anything that is not one."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise InputError(f"video file not found: {path}") from None
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror}") from None
    kinds = [
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a device"),
        (stat.S_ISBLK, "a device"),
    ]
    for test, what in kinds:
        if test(info.st_mode):
            raise InputError(f"{path} is {what}, not a regular video file")
    if not os.access(path, os.R_OK):
        raise InputError(f"cannot read {path}: permission denied")
    return info
