"""Stage bookkeeping: what a product was made from, so unchanged stages are reused.

Each product ``P`` gets a sidecar ``P.stage.json`` holding a key — a hash of the stage's
inputs (file fingerprints, upstream keys) and settings — written only after ``P`` is
complete. A later run recomputes the key and reuses ``P`` when both agree.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .atomic import atomic_path

__all__ = ["stage_key", "is_current", "record", "read_record", "sha256_file"]


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The SHA-256 hex digest of a file's bytes, read in 1 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _plain(v: Any) -> Any:
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: _plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def stage_key(**parts: Any) -> str:
    """A stable hash of the given inputs and settings."""
    text = json.dumps(_plain(parts), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _sidecar(product: Path) -> Path:
    return product.with_name(product.name + ".stage.json")


def read_record(product: str | os.PathLike[str]) -> dict[str, Any] | None:
    p = _sidecar(Path(product))
    try:
        return json.loads(p.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def is_current(product: str | os.PathLike[str], key: str) -> bool:
    """True when ``product`` exists and was recorded with ``key``."""
    product = Path(product)
    rec = read_record(product)
    return product.exists() and rec is not None and rec.get("key") == key


def record(product: str | os.PathLike[str], key: str, **info: Any) -> None:
    """Mark ``product`` complete for ``key`` (atomically), with optional details."""
    product = Path(product)
    with atomic_path(_sidecar(product)) as tmp:
        tmp.write_text(json.dumps({"key": key, **_plain(info)}, indent=1, default=str))
