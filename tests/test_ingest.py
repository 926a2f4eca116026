"""Ingest into the Zarr cube: contents, resumption, per-pixel problems, bad files."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import zarr

from mastar_vac.errors import ArtifactError, InputFileError
from mastar_vac.ingest import INGEST_FLAGS, ingest_spectra, sanitize_block
from mastar_vac.io.cube import open_cube
from mastar_vac.io.goodspec import write_goodspec
from mastar_vac.io.mastarall import write_mastarall
from mastar_vac.normalize import normalize_cube, normalize_spectra


def test_ingest_round_trip_and_coords(tmp_path, visits):
    gs = write_goodspec(tmp_path / "gs.fits.gz", visits)
    gv = {k: visits[k] for k in ("MANGAID", "PLATE", "IFUDESIGN", "MJD")}
    gv["VELVARFLAG"] = (np.arange(12) == 5).astype(np.int16)
    gv["S2N"] = np.full(12, 77.0, np.float32)
    ma = write_mastarall(tmp_path / "ma.fits", {"MANGAID": np.unique(visits["MANGAID"])}, gv)
    s = ingest_spectra(gs, tmp_path / "cube.zarr", mastarall=ma, chunk=5)
    assert s.nvisit == 12 and s.chunks_written == 3 and not s.resumed
    ds = open_cube(tmp_path / "cube.zarr")
    assert ds.flux.chunks == ((5, 5, 2), (4563,))
    np.testing.assert_array_equal(ds.flux.values, visits["FLUX"])
    assert ds.mask.dtype == np.int32
    assert list(ds.mangaid.values) == list(visits["MANGAID"])
    assert list(ds.ifudesign.values) == list(visits["IFUDESIGN"])
    assert ds.velvarflag.values.tolist() == gv["VELVARFLAG"].tolist()
    np.testing.assert_array_equal(ds.s2n.values, 77.0)  # the survey's S2N wins
    assert (ds.ingest_flags.values == 0).all()
    assert ds.source_row.values.tolist() == list(range(12))


def test_ingest_resumes_after_interruption(tmp_path, visits, monkeypatch):
    gs = write_goodspec(tmp_path / "gs.fits", visits)
    store = tmp_path / "cube.zarr"
    from mastar_vac.io import cube as cube_mod

    real = cube_mod.CubeStore.write_chunk
    calls = {"n": 0}

    def dying(self, i, arrays):
        if calls["n"] == 2:
            raise KeyboardInterrupt  # killed while writing the third chunk
        calls["n"] += 1
        real(self, i, arrays)

    monkeypatch.setattr(cube_mod.CubeStore, "write_chunk", dying)
    with pytest.raises(KeyboardInterrupt):
        ingest_spectra(gs, store, chunk=3)
    with pytest.raises(ArtifactError, match="did not finish"):
        open_cube(store)
    monkeypatch.setattr(cube_mod.CubeStore, "write_chunk", real)
    s = ingest_spectra(gs, store, chunk=3)
    assert s.resumed and s.chunks_skipped == 2 and s.chunks_written == 2
    np.testing.assert_array_equal(open_cube(store).flux.values, visits["FLUX"])
    # a changed input file is not "resumed" into the old store
    visits["FLUX"][0, 0] += 1
    write_goodspec(gs, visits)
    s2 = ingest_spectra(gs, store, chunk=3)
    assert not s2.resumed
    assert open_cube(store).flux.values[0, 0] == visits["FLUX"][0, 0]


def test_bad_pixels_masked_and_reported(tmp_path, visits, caplog):
    visits["FLUX"][2, 100:103] = np.nan
    visits["FLUX"][3, 5] = np.inf
    visits["IVAR"][4, 50] = -1.0
    visits["IVAR"][5, 60] = np.nan
    visits["IVAR"][6, :] = 0.0  # nothing usable
    gs = write_goodspec(tmp_path / "gs.fits", visits)
    with caplog.at_level(logging.WARNING):
        ingest_spectra(gs, tmp_path / "c.zarr", chunk=4)
    ds = open_cube(tmp_path / "c.zarr")
    f = ds.ingest_flags.values
    assert f[2] & INGEST_FLAGS["NONFINITE_FLUX"] and f[3] & INGEST_FLAGS["NONFINITE_FLUX"]
    assert f[4] & INGEST_FLAGS["NEGATIVE_IVAR"] and f[5] & INGEST_FLAGS["NONFINITE_IVAR"]
    assert f[6] & INGEST_FLAGS["NO_USABLE_PIXELS"]
    assert ds.sizes["visit"] == 12  # nothing dropped
    assert (ds.ivar.values[2, 100:103] == 0).all() and np.isfinite(ds.flux.values).all()
    assert ds.n_good_pixels.values[6] == 0
    text = caplog.text
    assert "gs.fits row 2 column FLUX: 3 non-finite values" in text
    assert "row 4 column IVAR: 1 negative values" in text
    assert "row 6" in text and "no usable pixel" in text


def test_sanitize_block_is_pure():
    flux = np.ones((2, 10), np.float32)
    flux[0, 0] = np.nan
    ivar = np.ones((2, 10), np.float32)
    out = sanitize_block(flux, ivar, np.zeros((2, 10), np.int32), np.ones((2, 10), np.float32))
    assert np.isnan(flux[0, 0])  # input untouched
    assert out.ivar[0, 0] == 0 and out.flux[0, 0] == 0
    assert out.n_good.tolist() == [9, 10]
    assert out.snr.tolist() == [1.0, 1.0]


def test_missing_and_corrupt_files(tmp_path, visits):
    with pytest.raises(InputFileError, match="file not found"):
        ingest_spectra(tmp_path / "none.fits", tmp_path / "c.zarr")
    gs = write_goodspec(tmp_path / "gs.fits", visits)
    data = gs.read_bytes()
    (tmp_path / "trunc.fits").write_bytes(data[: len(data) - 200000])
    with pytest.raises(InputFileError, match=r"row \d+.*truncated"):
        ingest_spectra(tmp_path / "trunc.fits", tmp_path / "c2.zarr", chunk=4)


def test_normalize_cube_writes_and_reuses(tmp_path, visits):
    gs = write_goodspec(tmp_path / "gs.fits", visits)
    store = tmp_path / "c.zarr"
    ingest_spectra(gs, store, chunk=5)
    assert normalize_cube(store, window=400)
    ds = open_cube(store)
    ref_f, ref_i = normalize_spectra(visits["FLUX"], visits["IVAR"], visits["MASK"])
    np.testing.assert_array_equal(ds.norm_flux.values, ref_f)
    np.testing.assert_array_equal(ds.norm_ivar.values, ref_i)
    assert not normalize_cube(store, window=400)  # up to date: skipped
    assert normalize_cube(store, window=200)  # other settings: recomputed
    assert zarr.open_group(str(store), mode="r").attrs["normalized"]["window"] == 200


def test_ingest_combspec_per_star_spectra(tmp_path, visits):
    """The LSF-homogenised per-star file (paper §5.1) goes into a cube like goodspec."""
    from mastar_vac.io.combspec import write_combspec

    cols = {k: visits[k] for k in ("FLUX", "IVAR", "MASK", "DISP", "RA", "DEC")}
    cols["MANGAID"] = np.array([f"7-{9000 + i}" for i in range(12)])  # one row per star
    p = write_combspec(tmp_path / "mastar-combspec-v3_1_1-v1_7_7-lsfpercent99.5.fits", cols)
    s = ingest_spectra(p, tmp_path / "comb.zarr", kind="combspec", chunk=5)
    ds = open_cube(tmp_path / "comb.zarr")
    assert s.nvisit == 12 and list(ds.mangaid.values) == list(cols["MANGAID"])
    assert (ds.plate.values == -1).all() and (ds.mjd.values == -1).all()
    np.testing.assert_array_equal(ds.flux.values, visits["FLUX"])
