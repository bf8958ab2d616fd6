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


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Write ``path`` by calling ``write(fileobj)`` on a temporary file in the same folder, then rename.

    The rename is atomic on POSIX, so readers see either the old file or the complete new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
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
