"""The video cache: a video's encoded block and its prompt-prefix K/V, keyed by content.

TRACE's prompt puts the video before the question, so everything up to the end of the
video block is the same for every question about one video (for one template and system
text). An entry keeps what a second question would otherwise recompute: the video block
(the projector's output) and, per prompt prefix, the K/V of those positions
(:class:`~trace_rt.backends.base.KVPrefix`).

Key (:func:`video_key`): sha256 of the video's bytes, plus frame count, sampling,
preprocessing and the model's fingerprint, so the same bytes sampled differently, or a
changed checkpoint, miss. The key's hex digest is the ``video_id`` a server returns.

Bounded by bytes, least recently used first; entries in use (pinned by a running request)
are never evicted, and concurrent requests for the same new video encode it once
(:meth:`VideoCache.entry` blocks the later ones until the first has filled it).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trace_rt.backends.base import KVPrefix
from trace_rt.errors import InputError

DEFAULT_CACHE_MB = 1024


class UnknownVideoError(InputError):
    """A ``video_id`` the cache does not hold (never seen, or evicted)."""


@dataclass(eq=False)
class VideoEntry:
    """One video's cached encoding."""

    key: str
    video: Any = None  # the backend's video handle (None until encoded)
    meta: dict[str, Any] = field(default_factory=dict)  # duration, frame times, ...
    video_bytes: int = 0
    prefixes: PrefixTable = None  # type: ignore[assignment]
    pins: int = 0
    ready: threading.Event = field(default_factory=threading.Event)
    failed: BaseException | None = None

    def __post_init__(self) -> None:
        if self.prefixes is None:
            self.prefixes = PrefixTable()

    @property
    def nbytes(self) -> int:
        return self.video_bytes + self.prefixes.nbytes


class PrefixTable(dict):
    """KV prefixes of one video, keyed by the prompt ids before the video (a dict that
    counts its bytes; the engine reads and writes it like any dict)."""

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in list(self.values()) if isinstance(p, KVPrefix))


class VideoCache:
    """LRU over :class:`VideoEntry`, bounded by *max_bytes* (0 disables caching).

    Thread-safe: a server's request threads look entries up while the engine thread
    fills prefix tables.
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_MB << 20):
        if max_bytes < 0:
            raise InputError(f"the video cache size must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, VideoEntry] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    @contextmanager
    def entry(self, key: str, fill: Callable[[VideoEntry], None]) -> Iterator[VideoEntry]:
        """The entry for *key*, pinned while the ``with`` block runs.

        A miss creates it and calls ``fill(entry)`` (which sets ``video``, ``meta`` and
        ``video_bytes``) outside the lock; concurrent callers for the same key wait for
        that fill instead of encoding the video again. A failed fill is re-raised to every
        waiter and the entry dropped.
        """
        with self._lock:
            e = self._entries.get(key)
            owner = e is None
            if owner:
                e = self._entries[key] = VideoEntry(key)
                self.misses += 1
            else:
                self._entries.move_to_end(key)
                self.hits += 1
            e.pins += 1
        try:
            if owner:
                try:
                    fill(e)
                except BaseException as err:
                    e.failed = err
                    with self._lock:
                        self._entries.pop(key, None)
                    raise
                finally:
                    e.ready.set()
            else:
                e.ready.wait()
                if e.failed is not None:
                    raise e.failed
            yield e
        finally:
            with self._lock:
                e.pins -= 1
            self.trim()

    @contextmanager
    def pinned(self, key: str) -> Iterator[VideoEntry]:
        """The existing entry for ``video_id`` *key*, pinned; :class:`UnknownVideoError`
        when it is not (or no longer) cached."""
        with self._lock:
            e = self._entries.get(key)
            if e is None or (e.ready.is_set() and e.failed is not None):
                raise UnknownVideoError(
                    f"video_id {key!r} is not in this server's video cache (never sent, or "
                    "evicted): send the video bytes again"
                )
            self._entries.move_to_end(key)
            self.hits += 1
            e.pins += 1
        try:
            e.ready.wait()
            if e.failed is not None:
                raise UnknownVideoError(f"video_id {key!r} failed to encode: send the bytes again")
            yield e
        finally:
            with self._lock:
                e.pins -= 1
            self.trim()

    def trim(self) -> None:
        """Evict least recently used, unpinned entries until within the budget."""
        with self._lock:
            total = sum(e.nbytes for e in self._entries.values())
            for key in list(self._entries):
                if total <= self.max_bytes:
                    break
                e = self._entries[key]
                if e.pins or not e.ready.is_set():
                    continue  # in use: never evicted
                total -= e.nbytes
                del self._entries[key]
                self.evictions += 1

    def stats(self) -> dict[str, int]:
        return {
            "entries": len(self._entries),
            "bytes": self.nbytes,
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
        }


# ---- keys ---------------------------------------------------------------------------------
def video_key(content: str, frames: int, sampling: str, preprocess: Any, model: str) -> str:
    """The cache key (and ``video_id``): a hash of everything the encoding depends on.

    Args:
        content: sha256 hex of the video's bytes (:func:`content_hash`).
        frames: frames sampled.
        sampling: the frame sampler's name (``uniform`` for the release's).
        preprocess: the preprocessing settings (any JSON-able or dataclass repr).
        model: :func:`model_fingerprint` of the model.
    """
    parts = {
        "content": content,
        "frames": int(frames),
        "sampling": sampling,
        "preprocess": repr(preprocess),
        "model": model,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def content_hash(video: Any, chunk: int = 1 << 22) -> str | None:
    """sha256 hex of a video's bytes: a path, bytes-like or seekable binary file (its
    position is restored); None for a source that can only be read once (a pipe)."""
    h = hashlib.sha256()
    if isinstance(video, (bytes, bytearray, memoryview)):
        h.update(video)
        return h.hexdigest()
    if isinstance(video, (str, os.PathLike)):
        p = Path(video)
        if not p.is_file():
            return None  # "-", FIFOs: read once by the decoder
        with open(p, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
        return h.hexdigest()
    seekable = getattr(video, "seekable", None)
    if callable(seekable) and seekable():
        start = video.tell()
        while block := video.read(chunk):
            h.update(block)
        video.seek(start)
        return h.hexdigest()
    return None


def model_fingerprint(model_dir: str | Path, extra: str = "") -> str:
    """A fingerprint of a checkpoint or artifact directory: its ``manifest.json`` (which
    holds every file's sha256) or, for a checkpoint, ``config.json`` and the weight files'
    names, sizes and modification times (hashing 15 GB at every load would take minutes).
    *extra* adds the backend and variant (an int4 decoder's K/V differ from fp32's)."""
    root = Path(model_dir)
    h = hashlib.sha256(extra.encode())
    manifest = root / "manifest.json"
    if manifest.is_file():
        h.update(manifest.read_bytes())
    else:
        cfg = root / "config.json"
        if cfg.is_file():
            h.update(cfg.read_bytes())
        for f in sorted(root.glob("*.safetensors*")):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]
