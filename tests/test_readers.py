"""Round trips of every survey-layout reader and writer, and their bad-input errors."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

from mastar_vac.errors import GridMismatchError, InputFileError
from mastar_vac.io.allstar import read_allstar, write_allstar
from mastar_vac.io.combspec import read_combspec, write_combspec
from mastar_vac.io.fitstable import FitsWriter
from mastar_vac.io.gaia_xmatch import read_gaia_xmatch, write_gaia_xmatch
from mastar_vac.io.goodspec import read_goodspec, write_goodspec
from mastar_vac.io.layouts import GOODSPEC
from mastar_vac.io.mastarall import read_goodstars, read_goodvisits, write_mastarall
from mastar_vac.wavegrid import mastar_wavelength


@pytest.mark.parametrize("name", ["mastar-goodspec-v3_1_1-v1_7_7.fits", "mastar-goodspec-v3_1_1-v1_7_7.fits.gz"])
def test_goodspec_round_trip(tmp_path, visits, name):
    p = write_goodspec(tmp_path / name, visits)
    with fits.open(p) as h:
        h.verify("exception")
        assert h[1].header["EXTNAME"] == "GOODSPEC"
        assert h[1].columns["FLUX"].format == "4563E"
    with read_goodspec(p) as r:
        assert r.nrows == 12
        np.testing.assert_allclose(r.wave, mastar_wavelength())
        blocks = list(r.iter_blocks(5))
        assert [b.first_row for b in blocks] == [0, 5, 10]
        flux = np.concatenate([b.flux for b in blocks])
        np.testing.assert_array_equal(flux, visits["FLUX"])
        np.testing.assert_array_equal(np.concatenate([b.ivar for b in blocks]), visits["IVAR"])
        meta = blocks[0].meta
        assert list(meta["MANGAID"][:3]) == list(visits["MANGAID"][:3])
        assert meta["IFUDESIGN"].dtype.kind == "U"
        assert set(meta) >= {"MANGAID", "PLATE", "IFUDESIGN", "MJD", "RA", "DEC", "S2N"}
        full = r.read_meta()
        assert len(full["MJD"]) == 12


def _write_raw(path, columns):
    with FitsWriter(path) as w:
        w.add_table(columns, extname="GOODSPEC")


def test_goodspec_name_variants(tmp_path, visits):
    """OBJRA/OBJDEC/SNR (DR15/16 names), integer IFUDESIGN and space-padded MANGAID."""
    cols = {k: v for k, v in visits.items() if k not in ("RA", "DEC", "S2N", "IFUDESIGN", "MANGAID")}
    cols["MANGAID"] = np.array([f"  {m}  " for m in visits["MANGAID"]])
    cols["IFUDESIGN"] = visits["IFUDESIGN"].astype(np.int32)
    cols["OBJRA"] = visits["RA"]
    cols["OBJDEC"] = visits["DEC"]
    cols["SNR"] = visits["S2N"]
    cols["WAVE"] = np.broadcast_to(mastar_wavelength(), visits["FLUX"].shape)
    p = tmp_path / "old.fits"
    _write_raw(p, cols)
    with read_goodspec(p) as r:
        b = next(r.iter_blocks(100))
    assert list(b.meta["MANGAID"]) == list(visits["MANGAID"])
    assert list(b.meta["IFUDESIGN"]) == list(visits["IFUDESIGN"])
    np.testing.assert_array_equal(b.meta["RA"], visits["RA"])
    np.testing.assert_array_equal(b.meta["S2N"], visits["S2N"])


def test_goodspec_missing_column(tmp_path, visits):
    cols = {k: v for k, v in visits.items() if k != "FLUX"}
    cols["WAVE"] = np.broadcast_to(mastar_wavelength(), visits["IVAR"].shape)
    p = tmp_path / "nof.fits"
    _write_raw(p, cols)
    with pytest.raises(InputFileError, match="column FLUX") as e:
        read_goodspec(p)
    assert "nof.fits" in str(e.value)


def test_goodspec_wrong_vector_length(tmp_path, visits):
    cols = dict(visits)
    cols["FLUX"] = visits["FLUX"][:, :4000]
    cols["WAVE"] = np.broadcast_to(mastar_wavelength(), visits["IVAR"].shape)
    p = tmp_path / "short.fits"
    _write_raw(p, cols)
    with pytest.raises(InputFileError, match=r"column FLUX.*4000.*4563"):
        read_goodspec(p)


def test_goodspec_other_wavelength_grid(tmp_path, visits):
    cols = dict(visits)
    cols["WAVE"] = np.broadcast_to(mastar_wavelength() * 1.001, visits["IVAR"].shape)
    p = tmp_path / "shifted.fits"
    _write_raw(p, cols)
    with pytest.raises(GridMismatchError, match="row 0.*WAVE"):
        read_goodspec(p)
    # and a grid that changes in one row only
    wave = np.array(np.broadcast_to(mastar_wavelength(), visits["IVAR"].shape))
    wave[7] *= 1.0005
    cols["WAVE"] = wave
    p2 = tmp_path / "row7.fits"
    _write_raw(p2, cols)
    with read_goodspec(p2) as r:
        with pytest.raises(GridMismatchError, match="row 7"):
            list(r.iter_blocks(4))


def test_goodspec_wrong_hdu_kind(tmp_path):
    p = tmp_path / "image.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.zeros((3, 3)))]).writeto(p)
    with pytest.raises(InputFileError, match="not a binary table"):
        read_goodspec(p)


def test_goodspec_empty_table(tmp_path):
    p = tmp_path / "empty.fits"
    with FitsWriter(p) as w:
        w.add_table(GOODSPEC.fill({}, 0), extname="GOODSPEC")
    with pytest.raises(InputFileError, match="no rows"):
        read_goodspec(p)


def test_mastarall_round_trip(tmp_path, visits):
    stars = {"MANGAID": np.unique(visits["MANGAID"]), "INPUT_TEFF": np.array([5000, 6000, 7000, 8000], "f4")}
    gv = {k: visits[k] for k in ("MANGAID", "PLATE", "IFUDESIGN", "MJD", "RA", "DEC", "S2N")}
    gv["VELVARFLAG"] = (np.arange(12) == 3).astype(np.int16)
    p = write_mastarall(tmp_path / "mastarall-v3_1_1-v1_7_7.fits", stars, gv)
    with fits.open(p) as h:
        h.verify("exception")
        assert [x.name for x in h] == ["PRIMARY", "GOODSTARS", "GOODVISITS"]
    s = read_goodstars(p)
    v = read_goodvisits(p)
    assert list(s["MANGAID"]) == list(stars["MANGAID"])
    np.testing.assert_array_equal(s["INPUT_TEFF"], stars["INPUT_TEFF"])
    assert {"PSFMAG_0", "PSFMAG_4"} <= set(s.columns)
    assert len(v) == 12 and v["VELVARFLAG"].sum() == 1
    np.testing.assert_array_equal(v["S2N"], visits["S2N"])


def test_mastarall_duplicate_visit_key(tmp_path, visits):
    gv = {k: visits[k] for k in ("MANGAID", "PLATE", "IFUDESIGN", "MJD")}
    gv = {k: np.concatenate([v, v[:1]]) for k, v in gv.items()}
    p = write_mastarall(tmp_path / "dup.fits", {"MANGAID": np.array(["7-1"])}, gv)
    with pytest.raises(InputFileError, match="row 12.*duplicate visit key"):
        read_goodvisits(p)


def test_gaia_xmatch_round_trip(tmp_path):
    cols = {"MANGAID": np.array(["7-1", "7-2", "7-3"]), "SOURCE_ID": np.array([123456789012, -999, 5]),
            "BPRPC": np.array([0.8, -999, 1.2], "f4"), "M_G": np.array([4.6, 3.0, -999], "f4")}
    p = write_gaia_xmatch(tmp_path / "x.fits", cols)
    df = read_gaia_xmatch(p)
    assert df["SOURCE_ID"].isna().tolist() == [False, True, False]
    assert int(df["SOURCE_ID"][0]) == 123456789012
    assert np.isnan(df["BPRPC"][1]) and np.isnan(df["M_G"][2])
    assert df["BPRPC"][0] == pytest.approx(0.8)


def test_combspec_round_trip(tmp_path, visits):
    cols = {k: visits[k] for k in ("MANGAID", "FLUX", "IVAR", "MASK", "DISP")}
    p = write_combspec(tmp_path / "mastar-combspec-v3_1_1-v1_7_7-lsfpercent99.5.fits", cols)
    with read_combspec(p) as r:
        b = next(r.iter_blocks(100))
    np.testing.assert_array_equal(b.flux, visits["FLUX"])
    assert "PLATE" not in b.meta


def test_allstar_round_trip_and_sentinels(tmp_path):
    cols = {"APOGEE_ID": np.array(["2M1", "2M2"]), "RA": np.array([1.0, 2.0]), "DEC": np.array([3.0, 4.0]),
            "TEFF": np.array([5000.0, -9999.0], "f4"), "LOGG": np.array([np.nan, 2.5], "f4"),
            "ASPCAPFLAG": np.array([0, 2**23]), "GAIAEDR3_SOURCE_ID": np.array([11, 0])}
    p = write_allstar(tmp_path / "allStar-dr17-synspec_rev1.fits", cols)
    df = read_allstar(p, ["APOGEE_ID", "RA", "DEC", "TEFF", "LOGG", "ASPCAPFLAG", "STARFLAG", "GAIAEDR3_SOURCE_ID"])
    assert df["TEFF"].isna().tolist() == [False, True]
    assert df["LOGG"].isna().tolist() == [True, False]
    assert df["ASPCAPFLAG"].tolist() == [0, 2**23]
    with pytest.raises(InputFileError, match="column NOPE"):
        read_allstar(p, ["APOGEE_ID", "NOPE"])
