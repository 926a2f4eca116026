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



def compute(collection, *, enabled: bool = True, desc: str = "compute"):  # noqa: ANN001, ANN201
    """Compute a Dask collection with a progress bar on long work.

    On a distributed cluster the tasks' futures are watched (``distributed.progress``);
    otherwise dask's local ``ProgressBar`` is used. Quiet under pytest or with
    ``MASTAR_VAC_PROGRESS=0``.
    """
    import contextlib

    off = not enabled or os.environ.get("MASTAR_VAC_PROGRESS", "1") == "0" or "PYTEST_CURRENT_TEST" in os.environ
    try:
        from distributed import get_client, progress

        client = get_client()
    except (ImportError, ValueError):
        client = None
    if client is not None:
        fut = client.compute(collection)
        if not off:
            progress(fut)
            sys.stderr.write("\n")
        return fut.result()
    if off:
        return collection.compute()
    from dask.diagnostics import ProgressBar

    with ProgressBar(minimum=2.0, out=sys.stderr) if not off else contextlib.nullcontext():
        return collection.compute()
