"""Finding a benchmark's videos under ``--videos`` by their annotation ids.

Ids come from annotation files a user downloaded, so they are untrusted: an id must be a
plain file name (no directory separators, no ``..``, no leading dot, no NUL), and the
path built from it stays under the videos directory. Lookup order for id ``X``:

1. ``DIR/X`` when ``X`` already ends in a video extension;
2. ``DIR/X.EXT`` for each extension in :data:`VIDEO_EXTENSIONS` (``X`` without its
   extension, if it had one);
3. ActivityNet's two spellings: ``v_ID`` is also looked up as ``ID`` and vice versa;
4. anywhere below ``DIR`` (YouCook2's ``raw_videos/validation/<recipe>/<id>.mp4``): the
   directory tree is indexed once, by file stem; the first match in sorted order wins.

Symbolic links inside ``DIR`` are followed (a videos directory of links is common); ids
themselves can never name a path outside it.
"""

from __future__ import annotations

import os
from pathlib import Path

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".flv")


class InvalidVideoIdError(ValueError):
    """An annotation's video id is not a plain file name."""


def check_video_id(video_id: str) -> str:
    """Return *video_id* if it is a plain file name, else raise :class:`InvalidVideoIdError`."""
    bad = (
        not isinstance(video_id, str)
        or not video_id
        or video_id.startswith(".")
        or any(c in video_id for c in ("/", "\\", "\0"))
        or len(video_id) > 255
    )
    if bad:
        raise InvalidVideoIdError(f"video id {video_id!r} is not a plain file name")
    return video_id


def strip_video_ext(name: str) -> str:
    """``"abc.mp4"`` -> ``"abc"``; other names unchanged."""
    root, ext = os.path.splitext(name)
    return root if ext.lower() in VIDEO_EXTENSIONS else name


class VideoIndex:
    """Resolves video ids to files under *root* (see the module rules)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise NotADirectoryError(f"videos directory {self.root} does not exist")
        self._by_stem: dict[str, Path] | None = None

    def _stems(self) -> dict[str, Path]:
        if self._by_stem is None:
            index: dict[str, Path] = {}
            for dirpath, dirnames, filenames in os.walk(self.root):
                dirnames.sort()
                for name in sorted(filenames):
                    stem, ext = os.path.splitext(name)
                    if ext.lower() in VIDEO_EXTENSIONS:
                        index.setdefault(stem, Path(dirpath) / name)
            self._by_stem = index
        return self._by_stem

    def _names(self, video_id: str) -> list[str]:
        stem = strip_video_ext(video_id)
        stems = [stem]
        if stem.startswith("v_"):
            stems.append(stem[2:])
        else:
            stems.append("v_" + stem)
        names = [video_id] if stem != video_id else []
        return names + [s + ext for s in stems for ext in VIDEO_EXTENSIONS]

    def find(self, video_id: str) -> Path | None:
        """The file of *video_id*, or None when there is none.

        Raises:
            InvalidVideoIdError: the id is not a plain file name.
        """
        check_video_id(video_id)
        for name in self._names(video_id):
            path = self.root / name
            if path.is_file():
                return path
        stems = self._stems()
        for name in self._names(video_id):
            hit = stems.get(os.path.splitext(name)[0])
            if hit is not None:
                return hit
        return None
