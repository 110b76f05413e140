"""Pairing two folders of images by relative path without extension.

``before/a/x.jpg`` pairs with ``after/a/x.png``: the key is ``a/x``. Files are found recursively;
hidden files and non-image extensions are ignored. Files whose key exists on one side only are
reported, and a key that names two files on one side (``x.jpg`` and ``x.png``) is ambiguous.
Symlinked folders are not entered. Files are indexed by name only: whether one is a regular file
and an image is checked when it is opened (:func:`idc_lite.compose.load_image`), so a FIFO or a link
to a device becomes that pair's error, not a hang.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass
class FolderPairs:
    pairs: list[tuple[str, Path, Path]] = field(default_factory=list)  # (key, before, after), sorted by key
    only_before: list[Path] = field(default_factory=list)
    only_after: list[Path] = field(default_factory=list)
    ambiguous: list[tuple[str, list[Path]]] = field(default_factory=list)


def index_folder(folder: Path) -> dict[str, list[Path]]:
    """Image files below ``folder`` by key (relative path without extension, ``/``-separated)."""
    found: dict[str, list[Path]] = {}
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(root, name)
            if name.startswith(".") or path.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            key = path.relative_to(folder).with_suffix("").as_posix()
            found.setdefault(key, []).append(path)
    return found


def pair_folders(before_dir: str | os.PathLike, after_dir: str | os.PathLike) -> FolderPairs:
    """Match the images of two folders by key."""
    indexes = []
    for folder in (Path(before_dir), Path(after_dir)):
        if not folder.exists():
            raise InputError(folder, "no such folder")
        if not folder.is_dir():
            raise InputError(folder, "is a file, expected a folder of images")
        indexes.append(index_folder(folder))
    return pair_indexes(*indexes)


def index_names(names) -> dict[str, list[str]]:
    """Relative ``/``-separated names (a listing of object storage) by key, with the rules of :func:`index_folder`."""
    found: dict[str, list[str]] = {}
    for name in sorted(names):
        parts = name.split("/")
        if any(part.startswith(".") for part in parts) or Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        found.setdefault(Path(name).with_suffix("").as_posix(), []).append(name)
    return found


def pair_indexes(before: dict[str, list], after: dict[str, list]) -> FolderPairs:
    """Match two indexes (:func:`index_folder`, :func:`index_names`) by key."""
    result = FolderPairs()
    for key in sorted(before.keys() | after.keys()):
        b, a = before.get(key, []), after.get(key, [])
        if not a:
            result.only_before.extend(b)
        elif not b:
            result.only_after.extend(a)
        elif len(b) > 1 or len(a) > 1:
            result.ambiguous.append((key, b + a))
        else:
            result.pairs.append((key, b[0], a[0]))
    return result
