"""A client for replicas behind a gRPC load balancer (deploy/local, a Kubernetes ingress).

Two things a single-server client does not need:

- Routing: every request carries the video's id in the ``x-video-id`` header (default: the
  sha256 of its bytes, what the server's video cache keys on), so a balancer hashing on it
  (nginx ``hash $http_x_video_id consistent``) sends a video's follow-up questions to the
  replica that has it cached.
- One retry on a retryable status: a replica that dies or drains mid-request surfaces as
  gRPC ``UNAVAILABLE`` (nginx answers 502 for the broken upstream), a request a server
  refuses for load as ``RESOURCE_EXHAUSTED``, and one that is draining (``trace-rt serve``
  after SIGTERM: Triton is unloading the model) as ``NOT_FOUND`` "... has no available
  versions" (a misspelt model name is ``NOT_FOUND`` "... is not found", and is not retried).
  Such a request did not complete, so sending it again (the balancer picks a live replica)
  cannot answer it twice. Any other error is the request's own (bad video, bad parameters)
  and is not retried.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trace_rt.serving.client import ServingError, TraceClient

VIDEO_ID_HEADER = "x-video-id"
RETRYABLE = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")
DRAINING = ("NOT_FOUND", "has no available versions")  # status, message of a draining replica


def retryable(status: str, message: str) -> bool:
    """Whether an error with gRPC *status* (``StatusCode.X``) and *message* means the
    request did not run and may go to another replica."""
    if any(s in status for s in RETRYABLE):
        return True
    return DRAINING[0] in status and DRAINING[1] in message


class RetryableError(ServingError):
    """The request failed with a retryable status (and was retried, if allowed, and failed
    again)."""


def video_id(video: bytes | str | os.PathLike) -> str:
    """The routing key of a video: the sha256 hex of its bytes."""
    data = video if isinstance(video, bytes) else Path(video).read_bytes()
    return hashlib.sha256(data).hexdigest()


class RoutedClient(TraceClient):
    """:class:`TraceClient` that names the video in a header and retries once.

    Args:
        url: the balancer's gRPC endpoint.
        retries: how many times a request failing with a retryable status is sent again.
        on_retry: called with (attempt, error message) before each retry (for counting).
    """

    def __init__(
        self,
        url: str,
        *,
        retries: int = 1,
        on_retry: Callable[[int, str], None] | None = None,
        **kw: Any,
    ):
        super().__init__(url, **kw)
        self.retries = retries
        self.on_retry = on_retry
        self._headers: dict[str, str] = {}
        self.last_status = ""  # the gRPC status of the last error ("StatusCode.UNAVAILABLE")
        start = self.client.start_stream

        def start_stream(**kwargs: Any) -> Any:  # every stream carries the routing header
            return start(headers=dict(self._headers) or None, **kwargs)

        self.client.start_stream = start_stream

    def _describe(self, error: Exception) -> str:
        self.last_status = str(error.status()) if hasattr(error, "status") else ""
        return super()._describe(error)

    def infer(  # type: ignore[override]
        self,
        video: bytes | str | os.PathLike | None = None,
        *,
        video_id: str | None = None,
        **kw: Any,
    ) -> dict[str, Any]:
        """:meth:`TraceClient.infer` through the balancer; *video_id* defaults to the
        content hash of *video*."""
        vid = video_id or _video_id_of(video)
        self._headers = {VIDEO_ID_HEADER: vid} if vid else {}
        attempt = 0
        try:
            while True:
                self.last_status = ""
                try:
                    return super().infer(video, **kw)
                except ServingError as e:
                    if not retryable(self.last_status, str(e)):
                        raise
                    if attempt >= self.retries:
                        raise RetryableError(f"{e} (after {attempt + 1} attempts)") from None
                    attempt += 1
                    if self.on_retry is not None:
                        self.on_retry(attempt, str(e))
        finally:
            self._headers = {}


def _video_id_of(video: bytes | str | os.PathLike | None) -> str:
    if video is None:
        return ""  # frames sent instead: name the video with video_id=
    try:
        return video_id(video)
    except OSError:
        return ""  # the base client reports the unreadable file
