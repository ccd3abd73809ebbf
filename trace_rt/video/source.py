"""Where the video's bytes come from, and what FFmpeg may do with them.

Every input reaches FFmpeg as a Python file object (a path is opened here, a pipe is read
once into memory), never as a name that FFmpeg resolves itself, so no protocol (``file:``,
``http:``, ``udp:``...) is used for the input. The container is opened with FFmpeg's
``format_whitelist`` (only the media demuxers of :data:`ALLOWED_FORMATS`: no playlists,
concat scripts, SDP descriptions or image patterns, which would open other files or
sockets) and a ``protocol_whitelist`` that names no protocol, so anything a demuxer tries to
open on its own (an MP4's external data reference, say) fails too.
"""

from __future__ import annotations

import io
import os
import re
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO

import av

from trace_rt.errors import (
    DecodeCancelledError,
    NotAVideoError,
    UnsupportedFormatError,
    VideoError,
    VideoNotFoundError,
    VideoTimeoutError,
    VideoTooLargeError,
)

VideoSource = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO

# FFmpeg demuxer names, as ``container.format.name`` spells them, of formats that read
# nothing but their own bytes. Raw H.264/HEVC elementary streams are plain bytes too; WAV
# and MP3 are listed so that an audio file says "no video stream", not "unsupported".
ALLOWED_FORMATS = frozenset(
    {
        "mov,mp4,m4a,3gp,3g2,mj2",
        "matroska,webm",
        "avi",
        "mpegts",
        "mpeg",
        "flv",
        "ogg",
        "gif",
        "h264",
        "hevc",
        "wav",
        "mp3",
    }
)
ALLOWED_HELP = "mp4/mov, matroska/webm, avi, mpegts, mpeg-ps, flv, ogg, gif, raw h264/hevc"

# A pipe, a FIFO or a non-seekable file object is read once into memory, up to this size.
MAX_STREAM_BYTES = 1 << 30

_NO_PROTOCOL = "none"  # a protocol whitelist that no protocol matches
# Scheme-like prefixes FFmpeg would treat as a protocol (``file:``, ``http://``...). One
# letter is left alone: ``C:\\video.mp4`` is a Windows path.
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+):")
_PROTOCOL_NAMES = (  # FFmpeg's protocols
    "async bluray cache concat concatf crypto data fd ffrtmpcrypt ffrtmphttp file ftp "
    "gopher gophers hls http httpproxy https icecast ipfs ipns md5 mmsh mmst pipe "
    "prompeg rist rtmp rtmpe rtmps rtmpt rtmpte rtmpts rtp rtsp sftp smb srt srtp "
    "subfile tcp tee tls udp udplite unix zmq"
)
_PROTOCOLS = frozenset(_PROTOCOL_NAMES.split())
_CANCEL_EVERY_S = 0.01  # ask ``cancelled`` at most this often (it may be a remote call)


@dataclass(frozen=True)
class DecodeLimits:
    """What decoding one video may cost.

    Attributes:
        max_pixels: Largest frame (width x height) that is decoded; a larger one raises
            :class:`VideoTooLargeError`, from the stream header where it states the size.
        time_budget_s: Wall-clock seconds for the whole decode (opening, both passes,
            preprocessing); over budget raises :class:`VideoTimeoutError`. None: no limit.
        allow_formats: FFmpeg demuxer names that may be opened (see
            :data:`ALLOWED_FORMATS`); any other raises :class:`UnsupportedFormatError`.
    """

    max_pixels: int
    time_budget_s: float | None
    allow_formats: frozenset[str]


# DCI 8K (8192 x 4320, 35.4 MP) is the largest standard video frame: 8K and 4K footage in
# either orientation passes; one decoded frame is then at most ~53 MB of YUV 4:2:0 and
# ~106 MB of RGB. The budget is generous for a real video on a CPU (sampling decodes only
# the groups of pictures that hold chosen frames) and bounds a pathological one.
DEFAULT_LIMITS = DecodeLimits(
    max_pixels=8192 * 4320,
    time_budget_s=120.0,
    allow_formats=ALLOWED_FORMATS,
)


def _looks_like_url(path: str) -> bool:
    m = _URL.match(path)
    return bool(m) and ("://" in path or m.group(1).lower() in _PROTOCOLS)


def read_stream(f: BinaryIO, name: str) -> bytes:
    """Read a pipe or stream once into memory, up to :data:`MAX_STREAM_BYTES`."""
    limit, chunks, size = MAX_STREAM_BYTES, [], 0
    while size <= limit:  # a raw stream's read(n) may return less than n before the end
        chunk = f.read(min(1 << 20, limit + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size > limit:
        raise VideoError(
            f"{name}: more than {limit >> 20} MiB from a pipe or stream; save it to a file "
            "and pass the file"
        )
    return b"".join(chunks)


class Source:
    """Whatever the caller gave, re-openable for each pass, with the request's limits.

    Args:
        source: a path, bytes-like, or a binary file object.
        limits: the request's :class:`DecodeLimits`.
        cancelled: asked between packets; True stops the decode.
    """

    def __init__(
        self,
        source: VideoSource,
        limits: DecodeLimits | None = None,
        cancelled: Callable[[], bool] | None = None,
    ):
        self.limits = limits or DEFAULT_LIMITS
        self.cancelled = cancelled
        budget = self.limits.time_budget_s
        self.deadline = None if budget is None else time.monotonic() + budget
        self._asked = float("-inf")
        self.format: str | None = None  # the demuxer the first open found
        self.path: str | None = None
        self.data: bytes | None = None
        self.file: BinaryIO | None = None
        if isinstance(source, (str, os.PathLike)):
            self._from_path(os.fsdecode(source))
        elif isinstance(source, (bytes, bytearray, memoryview)):
            self.data, self.name = bytes(source), "<video bytes>"
        elif callable(getattr(source, "read", None)):
            self.name = f"<{getattr(source, 'name', type(source).__name__)}>"
            seekable = callable(getattr(source, "seekable", None)) and source.seekable()
            if seekable and source.tell() == 0:
                self.file, self.start = source, 0
                if source.seek(0, io.SEEK_END) == 0:
                    raise NotAVideoError(f"{self.name}: the video data is empty (0 bytes)")
                source.seek(0)
            else:  # FFmpeg seeks in absolute offsets: give it the rest as bytes
                self.data = read_stream(source, self.name)
        else:
            raise TypeError(
                "video source must be a path, bytes-like or a binary file object; "
                f"got {type(source).__name__}"
            )
        if self.data is not None and not self.data:
            raise NotAVideoError(f"{self.name}: the video data is empty (0 bytes)")

    def _from_path(self, path: str) -> None:
        self.name = path
        try:
            st = os.stat(path)
        except FileNotFoundError:
            if _looks_like_url(path):
                raise VideoError(
                    f"{path}: URLs are not supported; download the video and pass the file"
                ) from None
            raise VideoNotFoundError(f"video file not found: {path}") from None
        except PermissionError as e:
            raise VideoError(f"{path}: permission denied") from e
        except OSError as e:  # a name too long, a loop of links...
            raise VideoError(f"{path}: cannot be read ({e.strerror or e})") from e
        if stat.S_ISDIR(st.st_mode):
            raise NotAVideoError(f"{path} is a directory, not a video file")
        if stat.S_ISREG(st.st_mode):
            if st.st_size == 0:
                raise NotAVideoError(f"{path}: the file is empty (0 bytes)")
            self.path = path
            return
        # A FIFO, /dev/stdin from a pipe, a character device: it can be read only once.
        try:
            with open(path, "rb") as f:
                self.data = read_stream(f, path)
        except PermissionError as e:
            raise VideoError(f"{path}: permission denied") from e
        except OSError as e:
            raise VideoError(f"{path}: cannot be read ({e.strerror or e})") from e

    @contextmanager
    def open(self, probe_decodes: bool = True) -> Iterator[av.container.InputContainer]:
        """The container, opened under the allow-list; closed (with its file) on exit.

        Args:
            probe_decodes: let FFmpeg's stream probe decode frames (up to the pixel
                limit); False skips every frame there, keeping the declared frame size
                that an over-limit probe decoder would zero.
        """
        opts = {
            "protocol_whitelist": _NO_PROTOCOL,
            "format_whitelist": ",".join(sorted(self.limits.allow_formats)),
        }
        # Also handed to the decoders FFmpeg's stream probe runs (for formats that declare
        # their streams in a header), so a bomb is not decoded even there.
        opts.update({"max_pixels": str(self.limits.max_pixels)} if probe_decodes else {})
        opts.update({} if probe_decodes else {"skip_frame": "all"})
        self.check()
        own = None
        try:
            if self.path is not None:
                f = own = open(self.path, "rb")  # noqa: SIM115 (closed below)
            elif self.file is not None:
                self.file.seek(self.start)
                f = self.file
            else:
                f = io.BytesIO(self.data)
            # After the first pass the demuxer is known: do not probe again.
            fmt = self.format.split(",")[0] if self.format else None
            container = av.open(f, format=fmt, options=opts)
        except (av.error.FFmpegError, OSError, ValueError) as e:
            if own is not None:
                own.close()
            raise self._open_error(e) from e
        except BaseException:
            if own is not None:
                own.close()
            raise
        try:
            with container:
                name = container.format.name
                allowed = {a for f in self.limits.allow_formats for a in f.split(",")}
                if not allowed.intersection(name.split(",")):  # FFmpeg checked; so do we
                    raise UnsupportedFormatError(f"{self.name}: {name} {self._refused()}")
                self.format = self.format or name
                yield container
        finally:
            if own is not None:
                own.close()

    def _refused(self) -> str:
        return f"is not a supported video container (allowed: {ALLOWED_HELP})"

    def _open_error(self, e: Exception) -> VideoError:
        if isinstance(e, av.error.ArgumentError):  # EINVAL: not on the format whitelist
            return UnsupportedFormatError(f"{self.name}: the data {self._refused()}")
        if isinstance(e, FileNotFoundError):
            return VideoNotFoundError(f"video file not found: {self.name}")
        if isinstance(e, PermissionError):
            return VideoError(f"{self.name}: permission denied")
        why = getattr(e, "strerror", None) or str(e)  # not FFmpeg's errno and file name
        return NotAVideoError(f"{self.name}: not a video PyAV can read ({why})")

    def rewind(self) -> None:
        if self.file is not None:
            self.file.seek(self.start)

    def check(self) -> None:
        """Raise if the request was cancelled or its time budget is spent."""
        now = time.monotonic()
        if self.deadline is not None and now > self.deadline:
            raise VideoTimeoutError(
                f"{self.name}: decoding took longer than the time budget of "
                f"{self.limits.time_budget_s:g} s"
            )
        if self.cancelled is not None and now - self._asked >= _CANCEL_EVERY_S:
            self._asked = now
            if self.cancelled():
                raise DecodeCancelledError(f"{self.name}: cancelled while decoding the video")

    def check_size(self, width: int | None, height: int | None) -> None:
        """Raise :class:`VideoTooLargeError` if a ``width`` x ``height`` frame is too big."""
        w, h = int(width or 0), int(height or 0)
        if w * h > self.limits.max_pixels:
            raise VideoTooLargeError(
                f"{self.name}: frames are {w}x{h} ({w * h / 1e6:.1f} megapixels), above the "
                f"limit of {self.limits.max_pixels / 1e6:.1f} megapixels"
            )
