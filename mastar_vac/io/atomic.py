"""Atomic file and directory outputs: written under a temporary name, moved into place.

A run that fails (or is killed) leaves at most a ``*.part-*`` file beside the target,
never a half-written catalogue under the real name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "atomic_dir", "remove_stale_parts"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.part-", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    else:
        os.replace(tmp_path, path)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Like :func:`atomic_path` for a directory (e.g. a partitioned Parquet dataset)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = Path(tempfile.mkdtemp(prefix=f".{path.name}.part-", dir=path.parent))
    try:
        yield tmp_path
    except BaseException:
        shutil.rmtree(tmp_path, ignore_errors=True)
        raise
    else:
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp_path, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)


def remove_stale_parts(directory: str | os.PathLike[str]) -> int:
    """Delete ``.*.part-*`` leftovers of killed runs anywhere under ``directory`` (the
    stages write into subfolders: fit/, catalog/, training/, …); return how many."""
    d = Path(directory)
    if not d.is_dir():
        return 0
    found = sorted(d.rglob(".*.part-*"), key=lambda p: len(p.parts))
    removed: list[Path] = []
    for p in found:
        if any(r in p.parents for r in removed):
            continue  # inside a partial folder already removed
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        removed.append(p)
    return len(removed)
