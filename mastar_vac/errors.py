"""Exception types of mastar_vac.

Every error a user can cause with their input is one of these, and its message names
the file, the HDU/row/column where that applies, and what was expected, so that a
problem in a 5 GB survey file can be found without a debugger.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = [
    "MastarVacError",
    "InputFileError",
    "ConfigError",
    "GridMismatchError",
    "ArtifactError",
    "OutputError",
    "ClusterError",
    "WorkerStorageError",
]


class MastarVacError(Exception):
    """Base class for every error raised on purpose by mastar_vac."""


class InputFileError(MastarVacError):
    """A survey or catalogue file that cannot be read as what it claims to be.

    Parameters
    ----------
    path
        The file.
    problem
        What is wrong, phrased so that it reads after "<path>: ".
    hdu, row, column
        Where, when known. ``row`` is 0-based (the FITS row number minus one).
    expected
        What the reader expected to find instead.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        problem: str,
        *,
        hdu: int | str | None = None,
        row: int | None = None,
        column: str | None = None,
        expected: str | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self.problem = problem
        self.hdu = hdu
        self.row = row
        self.column = column
        self.expected = expected
        where = []
        if hdu is not None:
            where.append(f"HDU {hdu}")
        if row is not None:
            where.append(f"row {row}")
        if column is not None:
            where.append(f"column {column}")
        loc = f" ({', '.join(where)})" if where else ""
        msg = f"{self.path}{loc}: {problem}"
        if expected:
            msg += f"; expected {expected}"
        super().__init__(msg)

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only arguments do not survive the default pickling, and these
        # errors cross process boundaries on a Dask cluster.
        return (
            _rebuild_input_error,
            (self.path, self.problem, self.hdu, self.row, self.column, self.expected),
        )


def _rebuild_input_error(path, problem, hdu, row, column, expected):  # noqa: ANN001, ANN202
    return InputFileError(path, problem, hdu=hdu, row=row, column=column, expected=expected)


class GridMismatchError(InputFileError):
    """A spectrum file whose wavelength grid differs from the one the cube holds."""


class ConfigError(MastarVacError):
    """A run configuration (TOML) that is missing, malformed or inconsistent."""


class ArtifactError(MastarVacError):
    """A saved artifact (emulator, cube) that fails its hash or shape checks."""


class OutputError(MastarVacError):
    """An output that could not be written (disk full, permissions, ...)."""


class ClusterError(MastarVacError):
    """A Dask cluster that cannot run the build (no worker started, a SLURM job refused, ...)."""


class WorkerStorageError(ClusterError):
    """A Dask worker that cannot open a path of the run (the cube, the emulator, the
    output directory): it is not on storage that worker sees.

    Parameters
    ----------
    path
        The path the worker could not open.
    worker
        The worker's address (and host, where known).
    problem
        What went wrong there.
    """

    def __init__(self, path: str | os.PathLike[str], worker: str, problem: str) -> None:
        self.path = os.fspath(path)
        self.worker = worker
        self.problem = problem
        super().__init__(f"{self.path}: Dask worker {worker} cannot open it ({problem}). The demo cache and every "
                         "product the workers read or write must be on storage all workers see "
                         "(a shared filesystem on HPC), under the same absolute path")

    def __reduce__(self) -> tuple[Any, ...]:  # raised on workers, re-raised on the client
        return (WorkerStorageError, (self.path, self.worker, self.problem))
