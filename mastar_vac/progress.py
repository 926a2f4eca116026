"""Progress bars for long stages (tqdm), quiet when not attached to a terminal."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

__all__ = ["progress_bar"]

log = logging.getLogger(__name__)


def _is_tty(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _logged(items: Iterable[T], desc: str, unit: str, total: int | None, steps: int = 4) -> Iterator[T]:
    """A few log lines (every 1/``steps`` of the total) instead of a bar: a log file gets
    no carriage-return updates, and a long stage still shows it is moving."""
    n_total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    marks = {max(1, round(n_total * k / steps)) for k in range(1, steps + 1)} if n_total else set()
    i = 0
    for i, item in enumerate(items, 1):
        yield item
        if i in marks:
            log.info("%s: %d/%d %s (%.0fs)", desc, i, n_total, unit, time.perf_counter() - t0)
    if not marks:
        log.info("%s: %d %s (%.0fs)", desc, i, unit, time.perf_counter() - t0)


def progress_bar(items: Iterable[T], *, desc: str, unit: str = "it", disable: bool = False,
                 total: int | None = None, stream: IO[str] | None = None) -> Iterator[T]:
    """``tqdm`` over ``items`` on a terminal; when ``stream`` (default stderr) is not a
    terminal, a few INFO log lines instead. Off when disabled, under pytest, or when
    ``MASTAR_VAC_PROGRESS=0``. Writes to stderr so stdout stays clean for tables."""
    off = disable or os.environ.get("MASTAR_VAC_PROGRESS", "1") == "0" or "PYTEST_CURRENT_TEST" in os.environ
    stream = sys.stderr if stream is None else stream
    if off:
        return iter(items)
    if not _is_tty(stream):
        return _logged(items, desc, unit, total)
    return iter(tqdm(items, desc=desc, unit=unit, total=total, file=stream, dynamic_ncols=True, mininterval=1.0))



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
    if not off and not _is_tty(sys.stderr):  # a log file: no bar, one line at each end
        log.info("%s: computing", desc)
        t0 = time.perf_counter()
        out = client.compute(collection).result() if client is not None else collection.compute()
        log.info("%s: done in %.0fs", desc, time.perf_counter() - t0)
        return out
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
