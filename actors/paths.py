"""Where specray keeps what it builds (converted models, compiled kernels, measured
kernel choices), and the lock that lets processes share it. Imports nothing of ours:
every layer that caches something can use it."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path

CACHE_ENV = "SPECRAY_CACHE"


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "specray"))


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive lock held on `path` (created) for the `with` block, across processes."""
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def durable_replace(tmp: Path, dest: Path) -> None:
    """Rename `tmp` onto `dest` so that a crash or a power cut leaves the old file or the new
    one whole, never a short one under the final name: the data reaches the disk before the
    rename, and the rename before we return."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dest)
    fsync_dir(dest.parent)


def fsync_dir(path: Path) -> None:
    """Make the names created or renamed in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def safetensors_whole(path: Path) -> bool:
    """Whether a safetensors file is as long as its own header says: a file cut short (a crash,
    a full disk) is caught before its tensors are trusted. Reads the header only."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= 100 << 20:
                return False
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        return os.path.getsize(path) == 8 + n + end
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return False
