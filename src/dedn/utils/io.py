"""Atomic file writes: a crash or a full disk never leaves a half-written result behind."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from dedn.errors import OutputError


def check_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Raise :class:`OutputError` if the folder ``path`` can never exist because a regular file is at the
    path or above it. Creates nothing: called before long work whose results go there."""
    path = Path(path)
    for part in (path, *path.parents):
        if part.exists() and not part.is_dir():
            where = "is" if part == path else f"lies under {part}, which is"
            raise OutputError(f"{what} {path}: it {where} a file, not a folder")
    return path


def make_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Create the folder ``path`` (and its parents) or raise :class:`OutputError` saying why not: a regular
    file at the path or above it, no permission, a read-only disk."""
    path = Path(path)
    if path.is_dir():
        return path
    check_dir(path, what)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{what} {path}: cannot be created ({e.strerror or e})") from None
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Write ``path`` by calling ``write(fileobj)`` on a temporary file in the same folder, then rename.

    The rename is atomic on POSIX, so readers see either the old file or the complete new one.
    """
    path = Path(path)
    make_dir(path.parent, "folder")
    if path.is_dir():
        raise OutputError(f"cannot write {path}: it is a folder")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates the file private (0600): give it the mode a plain open() would (0666 - umask)
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON (keys in insertion order, trailing newline) atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def cache_dir() -> Path:
    """Folder for caches (data set scans, generated benchmarks): ``$DEDN_CACHE_DIR`` or ``~/.cache/dedn``."""
    root = os.environ.get("DEDN_CACHE_DIR")
    path = Path(root) if root else Path.home() / ".cache" / "dedn"
    return path


def hash_file(path: str | os.PathLike, h=None):
    """Feed a file's bytes into ``h`` (a new SHA-1 if None) in 1 MiB blocks, and return ``h``."""
    h = hashlib.sha1() if h is None else h
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h
