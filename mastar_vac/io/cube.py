"""The spectra cube: a Zarr store chunked along ``visit`` only, opened as xarray.

Layout (Zarr format 2, readable by any Zarr library and by ``xarray.open_zarr``):

- data variables ``flux``, ``ivar``, ``disp`` (float32) and ``mask`` (int32) with dims
  ``(visit, wave)``; after normalization also ``norm_flux`` and ``norm_ivar``;
- coordinate ``wave`` (vacuum Å) and per-visit coordinates (identifiers, position, S/N,
  photometry, ingest bookkeeping), listed in :data:`VISIT_COORDS`;
- attributes: the source file fingerprint, chunking, and completion state.

Writes go chunk by chunk; a chunk is recorded as done (an empty marker file inside the
store's ``ingest_chunk_done`` array) only after its data are on disk, so an interrupted ingest resumes where it
stopped and never trusts a half-written chunk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr
import zarr

from ..errors import ArtifactError, OutputError

# Every read of the store's own state bypasses consolidated metadata (.zmetadata): it is
# written once at the end and a killed or damaged run could have left it stale.

__all__ = ["VISIT_COORDS", "CubeStore", "open_cube", "file_fingerprint"]

log = logging.getLogger(__name__)

# name -> (dtype, extra per-visit shape, fill)
VISIT_COORDS: dict[str, tuple[str, tuple[int, ...], object]] = {
    "mangaid": ("U22", (), ""),
    "plate": ("i4", (), -1),
    "ifudesign": ("U5", (), ""),
    "mjd": ("i4", (), -1),
    "ra": ("f8", (), np.nan),
    "dec": ("f8", (), np.nan),
    "epoch": ("f4", (), np.nan),
    "ifura": ("f8", (), np.nan),
    "ifudec": ("f8", (), np.nan),
    "psfmag": ("f4", (5,), np.nan),
    "mngtarg2": ("i4", (), 0),
    "mjdqual": ("i4", (), 0),
    "heliov": ("f4", (), np.nan),
    "exptime": ("f4", (), np.nan),
    "s2n": ("f4", (), np.nan),
    "velvarflag": ("i2", (), -1),
    "n_good_pixels": ("i4", (), 0),
    "ingest_flags": ("i4", (), 0),
    "source_row": ("i8", (), -1),
}
SPECTRAL_VARS = {"flux": "f4", "ivar": "f4", "mask": "i4", "disp": "f4"}
_PROGRESS = "ingest_chunk_done"


def file_fingerprint(path: str | os.PathLike[str] | None) -> dict[str, object] | None:
    """Identity of an input file (path, size, mtime) used to decide whether to redo work."""
    if path is None:
        return None
    p = Path(path).resolve()
    st = p.stat()
    return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


@dataclass
class CubeStore:
    """A cube store being written (or resumed). Use :meth:`create_or_resume`."""

    path: Path
    nvisit: int
    npix: int
    chunk: int

    @property
    def nchunks(self) -> int:
        return (self.nvisit + self.chunk - 1) // self.chunk

    def chunk_slice(self, i: int) -> slice:
        return slice(i * self.chunk, min(self.nvisit, (i + 1) * self.chunk))

    @classmethod
    def create_or_resume(cls, path: str | os.PathLike[str], *, nvisit: int, wave: np.ndarray, chunk: int,
                         source: Mapping[str, object]) -> tuple[CubeStore, bool]:
        """Open ``path`` for writing. Returns ``(store, resumed)``.

        An existing store made from the same ``source`` (fingerprints and settings) is
        resumed; any other store at ``path`` is replaced.
        """
        path = Path(path)
        npix = len(wave)
        tag = _source_tag(source)
        if path.exists():
            try:
                attrs = dict(zarr.open_group(str(path), mode="r", zarr_format=2, use_consolidated=False).attrs)
            except Exception:  # not a readable store: rebuild it
                attrs = {}
            if (attrs.get("source_tag") == tag and attrs.get("nvisit") == nvisit
                    and attrs.get("chunk") == chunk and attrs.get("npix") == npix):
                if _shapes_ok(path, nvisit, npix, (nvisit + chunk - 1) // chunk):
                    return cls(path, nvisit, npix, chunk), True
                log.warning("%s: arrays do not have their recorded shapes; rebuilding the cube", path)
            shutil.rmtree(path)
        store = cls(path, nvisit, npix, chunk)
        store._create(wave, source, tag)
        return store, False

    def _create(self, wave: np.ndarray, source: Mapping[str, object], tag: str) -> None:
        g = zarr.open_group(str(self.path), mode="w", zarr_format=2)
        n, p, c = self.nvisit, self.npix, self.chunk
        for name, dt in SPECTRAL_VARS.items():
            fill = 0 if dt.startswith("i") else np.nan
            a = g.create_array(name, shape=(n, p), chunks=(c, p), dtype=dt, fill_value=fill)
            a.attrs["_ARRAY_DIMENSIONS"] = ["visit", "wave"]
        w = g.create_array("wave", shape=(p,), chunks=(p,), dtype="f8", fill_value=np.nan)
        w[:] = wave
        w.attrs.update({"_ARRAY_DIMENSIONS": ["wave"], "units": "Angstrom", "long_name": "vacuum wavelength"})
        for name, (dt, shape, fill) in VISIT_COORDS.items():
            a = g.create_array(name, shape=(n, *shape), chunks=(c, *shape), dtype=dt,
                               fill_value=fill if not dt.startswith("U") else "")
            a.attrs["_ARRAY_DIMENSIONS"] = ["visit", *(["band"] if shape else [])]
        g.attrs.update({
            "source": json.loads(json.dumps(source, default=str)),
            "source_tag": tag,
            "nvisit": n,
            "npix": p,
            "chunk": c,
            "complete": False,
            "coordinates": " ".join(["wave", *VISIT_COORDS]),
            "cube_format": 1,
        })
        nchunks = self.nchunks
        a = g.create_array(_PROGRESS, shape=(nchunks,), chunks=(1,), dtype="u1", fill_value=0)
        a.attrs["_ARRAY_DIMENSIONS"] = ["ingest_chunk"]

    # -- chunk bookkeeping ------------------------------------------------
    def done_chunks(self) -> set[int]:
        g = zarr.open_group(str(self.path), mode="r", zarr_format=2, use_consolidated=False)
        return set(np.flatnonzero(g[_PROGRESS][:]).tolist())

    def write_chunk(self, i: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Write every variable of chunk ``i`` and then mark it done."""
        sl = self.chunk_slice(i)
        try:
            g = zarr.open_group(str(self.path), mode="r+", zarr_format=2, use_consolidated=False)
            for name, values in arrays.items():
                g[name][sl] = values
            g[_PROGRESS][i] = 1  # one tiny chunk file per data chunk: written last
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot write chunk {i} of the cube ({exc.strerror or exc}); "
                              "the chunks written so far are kept and a rerun resumes") from exc

    def finalize(self, **attrs: object) -> None:
        g = zarr.open_group(str(self.path), mode="r+", zarr_format=2, use_consolidated=False)
        g.attrs.update({"complete": True, **attrs})
        zarr.consolidate_metadata(str(self.path), zarr_format=2)


def _shapes_ok(path: Path, nvisit: int, npix: int, nchunks: int) -> bool:
    try:
        g = zarr.open_group(str(path), mode="r", zarr_format=2, use_consolidated=False)
        ok = all(g[name].shape == (nvisit, npix) for name in SPECTRAL_VARS)
        ok &= all(g[name].shape[0] == nvisit for name in VISIT_COORDS)
        return bool(ok and g[_PROGRESS].shape == (nchunks,))
    except Exception:  # a damaged store: rebuild it
        return False


def _source_tag(source: Mapping[str, object]) -> str:
    return hashlib.sha256(json.dumps(source, sort_keys=True, default=str).encode()).hexdigest()[:16]


def open_cube(path: str | os.PathLike[str], *, require_complete: bool = True) -> xr.Dataset:
    """Open a cube store lazily (dask arrays chunked like the store).

    Checks that the store is complete and that its arrays have the recorded shapes;
    raises :class:`~mastar_vac.errors.ArtifactError` otherwise.
    """
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path}: no spectra cube here (run the ingest stage first)")
    try:
        # mask_and_scale=False: integer arrays keep their dtype (no NaN fill decoding)
        # consolidated=False: never trust a .zmetadata that a killed run may have left stale
        ds = xr.open_zarr(str(path), consolidated=False, zarr_format=2, mask_and_scale=False)
    except Exception as exc:
        raise ArtifactError(f"{path}: not a readable Zarr cube ({exc})") from exc
    attrs = ds.attrs
    if require_complete and not attrs.get("complete", False):
        raise ArtifactError(f"{path}: the ingest did not finish (resume it by running the ingest again)")
    n, p = attrs.get("nvisit"), attrs.get("npix")
    for name in SPECTRAL_VARS:
        if name not in ds or ds[name].shape != (n, p):
            got = None if name not in ds else ds[name].shape
            raise ArtifactError(f"{path}: variable {name} has shape {got}, recorded ({n}, {p})")
    ds = ds.drop_vars(_PROGRESS, errors="ignore")
    coords = [c for c in VISIT_COORDS if c in ds.data_vars]
    if coords:
        ds = ds.set_coords(coords)
    return ds
