"""Exceptions with messages that name the problem.

Everything a user can get wrong (their video, their request, their checkpoint) raises a
subclass of :class:`TraceError`, so servers can turn it into a clean error response
without catching unrelated bugs.
"""

from __future__ import annotations


class TraceError(Exception):
    """Base class of trace-rt's user-facing errors."""


class InputError(TraceError, ValueError):
    """A request is malformed: wrong types, unknown task, missing query, bad parameters."""


class VideoError(InputError):
    """The video could not be used."""


class VideoNotFoundError(VideoError, FileNotFoundError):
    """The video path does not exist."""


class NotAVideoError(VideoError):
    """The bytes are not a container PyAV can open."""


class NoVideoStreamError(VideoError):
    """The container opened but holds no video stream."""


class NoDecodableFramesError(VideoError):
    """The video stream yielded no frame."""


class VideoTooLongError(VideoError):
    """The video is longer than TRACE's time format can express (9999.9 s)."""


class UnsupportedFormatError(NotAVideoError):
    """The bytes are a format outside the allow-list of media containers (a playlist, a
    concat script, an SDP description, a URL...): formats that can open other files or
    sockets are never demuxed."""


class VideoTooLargeError(VideoError):
    """The video's frames are larger than the decode limit (a decompression bomb)."""


class VideoTimeoutError(VideoError):
    """Decoding the video took longer than the request's time budget."""


class DecodeCancelledError(TraceError):
    """The caller cancelled the request while its video was being decoded."""


class PromptTooLongError(InputError):
    """Prompt plus video block plus token budget exceeds the model's context."""


class CheckpointError(TraceError):
    """A checkpoint or artifact directory is missing, incomplete or inconsistent."""


class DeviceError(TraceError, RuntimeError):
    """The requested device (``--device cuda``) or its runtime is not available here."""
