"""Writing into an artifact directory without modifying a published file in place.

A model repository (``python -m triton_repo build``) hard-links the artifact's files and a
running server memory-maps ``embeddings.npy``; rewriting a file in place would change
what that server reads under it. So every writer in ``export/`` writes a new file beside
the old one and renames it over the old name (``os.replace``): a reader (or a hard link)
keeps the old inode and its old bytes, and the new name is never seen half-written.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import onnx

from trace_rt.graphs import EXTERNAL_DATA_THRESHOLD  # protobuf's 2 GiB cap, with margin


@contextmanager
def new_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside *path*; on success it replaces *path* atomically.

    On an error the temporary file is removed and *path* is left as it was.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _usual_mode(tmp_path)
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def replace_bytes(path: Path, data: bytes) -> None:
    """Write *data* to *path* as a new file (see the module docstring)."""
    with new_file(path) as tmp:
        tmp.write_bytes(data)


def replace_with_copy(src: Path, path: Path) -> None:
    """Copy *src* to *path* as a new file (*src* may be on another file system)."""
    with new_file(path) as tmp:
        shutil.copyfile(src, tmp)


def replace_text(path: Path, text: str) -> None:
    replace_bytes(path, text.encode("utf-8"))


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """A manifest: sorted keys, indented, as a new file."""
    replace_text(path, json.dumps(doc, indent=2, sort_keys=True) + "\n")


def save_onnx(
    proto: onnx.ModelProto, path: Path, threshold: int = EXTERNAL_DATA_THRESHOLD
) -> dict[str, str]:
    """Save *proto* to *path* as new files; returns {file name: role}.

    Graphs over *threshold* bytes keep their weights in ``<name>.data`` (which the graph
    names, so it is written under its final name in a temporary directory and renamed in,
    data first). A stale ``<name>.data`` of an earlier, larger graph is removed.
    """
    data = path.with_name(path.name + ".data")
    # The weights' bytes first: protobuf's ByteSize() encodes the whole message, which for
    # a 7B graph in memory means gigabytes more (and fails past 2 GB).
    weights = sum(len(t.raw_data) for t in proto.graph.initializer)
    if weights <= threshold and proto.ByteSize() <= threshold:
        buf = io.BytesIO()
        onnx.save_model(proto, buf)
        replace_bytes(path, buf.getvalue())
        data.unlink(missing_ok=True)
        return {path.name: "graph"}
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as tmp:
        staged = Path(tmp) / path.name
        onnx.save_model(
            proto,
            str(staged),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data.name,
            size_threshold=1024,
        )
        for f in (staged.with_name(data.name), staged):
            _usual_mode(f)
            os.replace(f, path.parent / f.name)
    return {path.name: "graph", data.name: "external_data"}


def publish_tree(staging: Path, out: Path) -> list[str]:
    """Move every file under *staging* to the same place under *out* (``os.replace``, so
    old files are replaced, never rewritten); returns the relative paths moved."""
    moved = []
    for f in sorted(p for p in staging.rglob("*") if p.is_file()):
        rel = f.relative_to(staging)
        dst = out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(f, dst)
        moved.append(rel.as_posix())
    return moved


def _usual_mode(path: Path) -> None:
    # mkstemp makes 0600 files; published files get 0666 minus the umask like any other.
    mask = os.umask(0)
    os.umask(mask)
    path.chmod(0o666 & ~mask)
