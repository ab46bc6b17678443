"""Where the advisor keeps things on disk, and the file lock that guards them.

The default directories, the one rule that turns a study name into a file name, and an
exclusive ``flock`` for processes of one machine (the data cache, the SQLite storage).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import re
from collections.abc import Iterator
from pathlib import Path

CACHE_DIR = "studies/cache"  # data maps, baseline weights, logs, the compiler cache
DASHBOARD_DIR = "dashboards"


def safe_name(name: str) -> str:
    """``name`` with every run of characters a file name should not hold made one ``-``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip(".-") or "study"


def unique_name(name: str, limit: int = 60) -> str:
    """:func:`safe_name`, at most ``limit`` characters, with a short hash of ``name`` when
    that changed it, so two names never share a directory."""
    safe = safe_name(name)[:limit]
    return safe if safe == name else f"{safe}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


@contextlib.contextmanager
def flock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) against this machine's processes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
