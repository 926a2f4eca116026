"""Progress bars for long stages (tqdm), quiet when not attached to a terminal."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

__all__ = ["progress_bar"]


def progress_bar(items: Iterable[T], *, desc: str, unit: str = "it", disable: bool = False,
                 total: int | None = None) -> Iterator[T]:
    """``tqdm`` over ``items``; off when disabled, under pytest, or when
    ``MASTAR_VAC_PROGRESS=0``. Writes to stderr so stdout stays clean for tables."""
    off = disable or os.environ.get("MASTAR_VAC_PROGRESS", "1") == "0" or "PYTEST_CURRENT_TEST" in os.environ
    return iter(tqdm(items, desc=desc, unit=unit, disable=off, total=total, file=sys.stderr,
                     dynamic_ncols=True, mininterval=1.0))
