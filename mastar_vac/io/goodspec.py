"""The per-visit spectra file ``mastar-goodspec-v3_1_1-v1_7_7.fits(.gz)`` (datamodels.md §1.2).

One row per good visit: WAVE/FLUX/IVAR/MASK/DISP vectors of 4,563 pixels plus the
visit's identifiers. Read in row blocks so that memory is bounded by the block, not by
the 5 GB file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import GridMismatchError, InputFileError
from ..wavegrid import MASTAR_NPIX, mastar_wavelength, same_grid
from .fitstable import BinTableReader, FitsWriter
from .layouts import (
    GOODSPEC,
    NUMERIC,
    Layout,
    _check_layout_kind,
    check_column_kind,
    check_vector_column,
    clean_ifudesign,
    clean_mangaid,
    resolve_column,
)

__all__ = ["SpectraBlock", "SpectraReader", "read_goodspec", "write_goodspec", "VISIT_KEY"]

VISIT_KEY = ("MANGAID", "PLATE", "IFUDESIGN", "MJD")
_VECTORS = ("WAVE", "FLUX", "IVAR", "MASK", "DISP", "PREDISP")


@dataclass
class SpectraBlock:
    """Consecutive rows of a spectra file: metadata columns and pixel arrays."""

    first_row: int
    meta: dict[str, np.ndarray]
    flux: np.ndarray  # (n, npix) float32
    ivar: np.ndarray  # (n, npix) float32
    mask: np.ndarray  # (n, npix) int32
    disp: np.ndarray  # (n, npix) float32, NaN where the file has no DISP

    def __len__(self) -> int:
        return self.flux.shape[0]


class SpectraReader:
    """Row-block reader for files of one visit (or star) spectrum per row.

    Checks on opening, each failing with the file and column named: the HDU is a binary
    table; the required columns exist (accepting RA/OBJRA, S2N/SNR, ...); every spectral
    vector has ``npix`` elements; the first row's WAVE is the MaStar grid (or ``wave``).
    While reading: every row's WAVE equals the first (else :class:`GridMismatchError`
    naming the row).
    """

    layout: Layout = GOODSPEC

    def __init__(self, path: str | os.PathLike[str], *, hdu: int | str = 1,
                 wave: np.ndarray | None = None, npix: int = MASTAR_NPIX) -> None:
        self.path = Path(path)
        self._r = BinTableReader(self.path, hdu)
        try:
            self._setup(wave, npix)
        except BaseException:
            self._r.close()
            raise

    def _setup(self, wave: np.ndarray | None, npix: int) -> None:
        r = self._r
        for name in self.layout.required:
            resolve_column(r, name)
        self.vectors = [v for v in _VECTORS if v in r.names]
        for v in self.vectors:
            check_column_kind(r, v, NUMERIC)
            check_vector_column(r, v, npix)
        self.meta_columns: dict[str, str] = {}
        for col in self.layout.columns:
            if col.name in _VECTORS:
                continue
            actual = resolve_column(r, col.name, required=col.name in self.layout.required)
            if actual is not None:
                _check_layout_kind(r, actual, col)
                if col.shape and r.column(actual).shape != col.shape:
                    raise InputFileError(self.path, f"per-row shape {r.column(actual).shape}",
                                         hdu=r.hdu_name or r.hdu_index, column=actual, expected=str(col.shape))
                self.meta_columns[col.name] = actual
        self.nrows = r.nrows
        self.npix = npix
        if self.nrows == 0:
            raise InputFileError(self.path, "table has no rows", hdu=r.hdu_name or r.hdu_index,
                                 expected="at least one spectrum")
        first = r.read(["WAVE"], 0, 1)["WAVE"][0].astype(np.float64)
        expected = mastar_wavelength(npix) if wave is None else np.asarray(wave, np.float64)
        if not same_grid(first, expected):
            raise GridMismatchError(
                self.path, f"wavelength grid {first[0]:.2f}-{first[-1]:.2f} A differs from the cube's",
                hdu=r.hdu_name or r.hdu_index, row=0, column="WAVE",
                expected=f"{expected[0]:.2f}-{expected[-1]:.2f} A on {len(expected)} log-spaced pixels")
        self.wave = first

    def __enter__(self) -> SpectraReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._r.close()

    def read_meta(self) -> dict[str, np.ndarray]:
        """Metadata columns of every row (streams the file once; spectra are discarded)."""
        parts: list[dict[str, np.ndarray]] = []
        for _, cols in self._r.iter_blocks(2048, columns=list(dict.fromkeys(self.meta_columns.values()))):
            parts.append(cols)
        return self._clean_meta({k: np.concatenate([p[a] for p in parts]) for k, a in self.meta_columns.items()},
                                self.nrows)

    def _clean_meta(self, meta: Mapping[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
        out = self.layout.fill({k: v for k, v in meta.items()}, n)
        out = {k: v for k, v in out.items() if k not in _VECTORS}
        out["MANGAID"] = clean_mangaid(out["MANGAID"])
        if "IFUDESIGN" in out:
            out["IFUDESIGN"] = clean_ifudesign(out["IFUDESIGN"])
        return out

    def iter_blocks(self, rows: int = 1024, *, start: int = 0,
                    stop: int | None = None) -> Iterator[SpectraBlock]:
        names = list(dict.fromkeys([*self.meta_columns.values(), *self.vectors]))
        for s, cols in self._r.iter_blocks(rows, columns=names, start=start, stop=stop):
            n = len(cols["FLUX"])
            wave = cols["WAVE"]
            bad = ~np.all(np.isclose(wave, self.wave[None, :], rtol=1e-6, atol=0.0), axis=1)
            if bad.any():
                i = int(np.argmax(bad))
                raise GridMismatchError(self.path, "wavelength grid differs from that of row 0",
                                        row=s + i, column="WAVE", expected="the same WAVE vector in every row")
            meta = self._clean_meta({k: cols[a] for k, a in self.meta_columns.items()}, n)
            yield SpectraBlock(
                first_row=s,
                meta=meta,
                flux=cols["FLUX"].astype(np.float32, copy=False),
                ivar=cols["IVAR"].astype(np.float32, copy=False),
                mask=(cols["MASK"].astype(np.int32, copy=False) if "MASK" in cols
                      else np.zeros((n, self.npix), np.int32)),
                disp=(cols["DISP"].astype(np.float32, copy=False) if "DISP" in cols
                      else np.full((n, self.npix), np.nan, np.float32)),
            )


def read_goodspec(path: str | os.PathLike[str], **kwargs: object) -> SpectraReader:
    """Open a goodspec file for block reading (see :class:`SpectraReader`)."""
    return SpectraReader(path, **kwargs)  # type: ignore[arg-type]


def _write_spectra(path: str | os.PathLike[str], layout: Layout, columns: Mapping[str, np.ndarray], *,
                   rows_per_write: int = 512, header: Mapping[str, object] | None = None) -> Path:
    n = len(columns["FLUX"])
    data = dict(columns)
    if "WAVE" not in data:
        data["WAVE"] = np.broadcast_to(mastar_wavelength(), (n, MASTAR_NPIX))
    full_schema = {c.name: (np.dtype(c.dtype), c.shape) if not c.dtype.startswith("U") else np.array([""])
                   for c in layout.columns}
    with FitsWriter(path, primary_header=header) as w:
        with w.begin_table(full_schema, n, extname=layout.extname, units=layout.units,
                           descriptions=layout.descriptions, string_widths=layout.string_widths) as t:
            for s in range(0, n, rows_per_write):
                e = min(n, s + rows_per_write)
                block = {k: np.asarray(v)[s:e] for k, v in data.items()}
                t.write(layout.fill(block, e - s))
    return Path(path)


def write_goodspec(path: str | os.PathLike[str], columns: Mapping[str, np.ndarray], **kwargs: object) -> Path:
    """Write visits in the goodspec layout; absent columns get the layout's fill values.

    ``columns`` needs at least FLUX and IVAR (n, 4563) and the visit key; WAVE defaults
    to the MaStar grid. A ``.gz`` name writes gzip, as the survey ships it.
    """
    return _write_spectra(path, GOODSPEC, columns, **kwargs)  # type: ignore[arg-type]
