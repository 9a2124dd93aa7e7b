"""Where specray keeps what it builds (converted models, compiled kernels, measured
kernel choices), and the lock that lets processes share it. Imports nothing of ours:
every layer that caches something can use it."""

from __future__ import annotations

import contextlib
import fcntl
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
