"""Ingest: survey spectra files → the chunked Zarr spectra cube.

The pure part is :func:`sanitize_block`: non-finite flux or inverse variance and negative
inverse variance are masked (ivar set to 0) and counted per visit, never fatal; a visit
with no usable pixel is kept and flagged. :func:`ingest_spectra` streams a goodspec (or
combspec) file block by block into a :class:`~mastar_vac.io.cube.CubeStore`, resuming a
store left by an interrupted run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .io.combspec import CombspecReader
from .io.cube import VISIT_COORDS, CubeStore, file_fingerprint
from .io.goodspec import SpectraBlock, SpectraReader
from .io.mastarall import read_goodvisits
from .normalize import usable_pixels
from .progress import progress_bar

__all__ = ["INGEST_FLAGS", "sanitize_block", "ingest_spectra", "IngestSummary", "decode_ingest_flags",
           "summarize_flags"]

log = logging.getLogger(__name__)

INGEST_FLAGS = {
    "NONFINITE_FLUX": 1,  # some FLUX pixels NaN/inf (masked)
    "NONFINITE_IVAR": 2,  # some IVAR pixels NaN/inf (masked)
    "NEGATIVE_IVAR": 4,  # some IVAR pixels < 0 (masked)
    "NONFINITE_DISP": 8,  # some DISP pixels NaN/inf/<=0 where DISP exists
    "NO_USABLE_PIXELS": 16,  # nothing left to fit: kept, flagged
    "NO_MASTARALL_ROW": 32,  # visit key not found in mastarall GOODVISITS
}


def decode_ingest_flags(value: int) -> list[str]:
    return [name for name, bit in INGEST_FLAGS.items() if int(value) & bit]


@dataclass
class SanitizedBlock:
    flux: np.ndarray
    ivar: np.ndarray
    mask: np.ndarray
    disp: np.ndarray
    flags: np.ndarray  # int32 per visit
    n_good: np.ndarray  # int32 per visit
    snr: np.ndarray  # float32 per visit: median flux*sqrt(ivar) over usable pixels
    problems: list[tuple[int, str, str]] = field(default_factory=list)  # (row in block, column, text)


def sanitize_block(flux: np.ndarray, ivar: np.ndarray, mask: np.ndarray, disp: np.ndarray, *,
                   bad_mask_bits: int = -1, has_disp: bool = True) -> SanitizedBlock:
    """Mask bad pixels of a block of spectra and flag each visit (pure, no I/O)."""
    flux = np.array(flux, dtype=np.float32)
    ivar = np.array(ivar, dtype=np.float32)
    disp = np.array(disp, dtype=np.float32)
    n = flux.shape[0]
    flags = np.zeros(n, np.int32)
    problems: list[tuple[int, str, str]] = []

    def note(bad: np.ndarray, flag: str, column: str, text: str) -> None:
        rows = bad.any(axis=1)
        flags[rows] |= INGEST_FLAGS[flag]
        for i in np.flatnonzero(rows):
            problems.append((int(i), column, f"{int(bad[i].sum())} {text}; masked"))

    bad_f = ~np.isfinite(flux)
    note(bad_f, "NONFINITE_FLUX", "FLUX", "non-finite values")
    bad_i = ~np.isfinite(ivar)
    note(bad_i, "NONFINITE_IVAR", "IVAR", "non-finite values")
    with np.errstate(invalid="ignore"):
        neg = ivar < 0
    note(neg, "NEGATIVE_IVAR", "IVAR", "negative values")
    kill = bad_f | bad_i | neg
    flux[kill] = 0.0
    ivar[kill] = 0.0
    if has_disp:
        with np.errstate(invalid="ignore"):
            bad_d = ~(np.isfinite(disp) & (disp > 0))
        flags[bad_d.any(axis=1)] |= INGEST_FLAGS["NONFINITE_DISP"]
    good = usable_pixels(flux, ivar, mask, bad_mask_bits=bad_mask_bits)
    n_good = good.sum(axis=1).astype(np.int32)
    empty = n_good == 0
    flags[empty] |= INGEST_FLAGS["NO_USABLE_PIXELS"]
    for i in np.flatnonzero(empty):
        problems.append((int(i), "FLUX/IVAR", "no usable pixel; visit kept and flagged"))
    with np.errstate(invalid="ignore"):
        sn = np.where(good, flux * np.sqrt(ivar), np.nan)
    snr = np.full(n, np.nan, np.float32)
    if (~empty).any():
        snr[~empty] = np.nanmedian(sn[~empty], axis=1)
    return SanitizedBlock(flux, ivar, np.asarray(mask, np.int32), disp, flags, n_good, snr, problems)


@dataclass
class IngestSummary:
    store: Path
    nvisit: int
    resumed: bool
    chunks_written: int
    chunks_skipped: int
    flag_counts: dict[str, int]

    def __str__(self) -> str:
        flags = ", ".join(f"{k}={v}" for k, v in self.flag_counts.items() if v) or "none"
        how = f"resumed, {self.chunks_skipped} chunks already done" if self.resumed else "new"
        return (f"cube {self.store}: {self.nvisit} visits ({how}; {self.chunks_written} chunks written); "
                f"visit flags: {flags}")


_META_TO_COORD = {
    "MANGAID": "mangaid", "PLATE": "plate", "IFUDESIGN": "ifudesign", "MJD": "mjd", "RA": "ra", "DEC": "dec",
    "EPOCH": "epoch", "IFURA": "ifura", "IFUDEC": "ifudec", "PSFMAG": "psfmag", "MNGTARG2": "mngtarg2",
    "MJDQUAL": "mjdqual", "HELIOV": "heliov", "EXPTIME": "exptime", "S2N": "s2n",
}


def _coords_for_block(block: SpectraBlock, clean: SanitizedBlock,
                      visits: pd.DataFrame | None) -> dict[str, np.ndarray]:
    n = len(block)
    out: dict[str, np.ndarray] = {}
    for name, (dt, shape, fill) in VISIT_COORDS.items():
        out[name] = np.full((n, *shape), fill, dtype=dt)
    for meta_name, coord in _META_TO_COORD.items():
        if meta_name in block.meta:
            dt = VISIT_COORDS[coord][0]
            out[coord] = np.asarray(block.meta[meta_name]).astype(dt)
    flags = clean.flags.copy()
    if visits is not None:
        key = pd.MultiIndex.from_arrays([out["mangaid"], out["plate"], out["ifudesign"], out["mjd"]])
        idx = visits.index.get_indexer(key)
        found = idx >= 0
        flags[~found] |= INGEST_FLAGS["NO_MASTARALL_ROW"]
        if found.any():
            rows = visits.iloc[idx[found]]
            for col, coord in (("S2N", "s2n"), ("VELVARFLAG", "velvarflag"), ("MJDQUAL", "mjdqual")):
                if col in rows:
                    v = out[coord]
                    v[found] = rows[col].to_numpy().astype(v.dtype)
    # the survey's S/N where it has one, else the median per-pixel S/N measured here
    s2n = out["s2n"]
    missing = ~np.isfinite(s2n) | (s2n <= 0)
    s2n[missing] = clean.snr[missing]
    out["n_good_pixels"] = clean.n_good
    out["ingest_flags"] = flags
    out["source_row"] = np.arange(block.first_row, block.first_row + n, dtype=np.int64)
    return out


def ingest_spectra(source: str | os.PathLike[str], store: str | os.PathLike[str], *,
                   kind: str = "goodspec", mastarall: str | os.PathLike[str] | None = None,
                   chunk: int = 1024, bad_mask_bits: int = -1, progress: bool = True,
                   max_logged_problems: int = 20) -> IngestSummary:
    """Stream a spectra file into a Zarr cube chunked along ``visit``.

    Parameters
    ----------
    source
        ``mastar-goodspec-*.fits(.gz)`` (``kind="goodspec"``) or a combspec file
        (``kind="combspec"``).
    store
        Zarr directory to write. A store left by an interrupted ingest of the same
        inputs is resumed; one made from other inputs is replaced.
    mastarall
        Optional ``mastarall`` file: its GOODVISITS S2N, VELVARFLAG and MJDQUAL are
        joined onto the visits by (MANGAID, PLATE, IFUDESIGN, MJD).
    chunk
        Visits per Zarr chunk (and per read block): memory is bounded by it.
    """
    if chunk < 1:
        raise ValueError("chunk must be >= 1")
    source = Path(source)
    reader_cls = {"goodspec": SpectraReader, "combspec": CombspecReader}.get(kind)
    if reader_cls is None:
        raise ValueError(f"kind must be 'goodspec' or 'combspec', not {kind!r}")
    visits = None
    if mastarall is not None:
        gv = read_goodvisits(mastarall)
        visits = gv.set_index(["MANGAID", "PLATE", "IFUDESIGN", "MJD"])
    with reader_cls(source) as reader:
        fingerprint = {
            "kind": kind,
            "file": file_fingerprint(source),
            "mastarall": file_fingerprint(mastarall),
            "bad_mask_bits": bad_mask_bits,
        }
        cube, resumed = CubeStore.create_or_resume(store, nvisit=reader.nrows, wave=reader.wave, chunk=chunk,
                                                   source=fingerprint)
        done = cube.done_chunks() if resumed else set()
        todo = [i for i in range(cube.nchunks) if i not in done]
        if resumed:
            log.info("resuming ingest into %s: %d of %d chunks already done", store, len(done), cube.nchunks)
        logged = 0
        has_disp = "DISP" in reader.vectors
        for i in progress_bar(todo, desc="ingest", unit="chunk", disable=not progress):
            sl = cube.chunk_slice(i)
            block = next(reader.iter_blocks(sl.stop - sl.start, start=sl.start, stop=sl.stop))
            clean = sanitize_block(block.flux, block.ivar, block.mask, block.disp,
                                   bad_mask_bits=bad_mask_bits, has_disp=has_disp)
            for r, col, text in clean.problems:
                if logged < max_logged_problems:
                    log.warning("%s row %d column %s: %s", source, block.first_row + r, col, text)
                logged += 1
            arrays: dict[str, np.ndarray] = {"flux": clean.flux, "ivar": clean.ivar, "mask": clean.mask,
                                             "disp": clean.disp}
            arrays.update(_coords_for_block(block, clean, visits))
            cube.write_chunk(i, arrays)
        if logged > max_logged_problems:
            log.warning("%s: %d more pixel-level problems not shown (see ingest_flags in the cube)",
                        source, logged - max_logged_problems)
    _check_unique_keys(cube.path, source)
    counts = summarize_flags(_read_flags(cube.path))
    cube.finalize(ingest_flag_counts=counts, ingest_flag_bits=INGEST_FLAGS)
    summary = IngestSummary(cube.path, cube.nvisit, resumed, len(todo), cube.nchunks - len(todo), counts)
    log.info("%s", summary)
    return summary


def _check_unique_keys(path: Path, source: Path) -> None:
    """Every visit key (MANGAID, PLATE, IFUDESIGN, MJD) must be unique: the catalogue
    promises one row per visit, and a repeated key would make two rows indistinguishable."""
    import zarr

    from .errors import InputFileError

    g = zarr.open_group(str(path), mode="r", zarr_format=2, use_consolidated=False)
    keys = pd.DataFrame({k: g[k][:] for k in ("mangaid", "plate", "ifudesign", "mjd")})
    dup = keys.duplicated(keep=False)
    if dup.any():
        rows = np.asarray(g["source_row"][:])[dup.to_numpy()]
        first = keys[dup].iloc[0]
        raise InputFileError(source, f"visit key {tuple(first)} repeats ({int(dup.sum())} rows share keys)",
                             row=int(rows[0]), column="MANGAID,PLATE,IFUDESIGN,MJD",
                             expected=f"unique visits; repeated at rows {rows[:10].tolist()}")


def _read_flags(path: Path) -> np.ndarray:
    import zarr

    return np.asarray(zarr.open_group(str(path), mode="r", zarr_format=2, use_consolidated=False)["ingest_flags"][:])


def summarize_flags(flags: np.ndarray, bits: Mapping[str, int] = INGEST_FLAGS) -> dict[str, int]:
    return {name: int(((flags & bit) != 0).sum()) for name, bit in bits.items()}
