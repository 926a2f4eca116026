"""The reference-set builder on files in the DR17 layouts, with traps in them."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mastar_vac.errors import ConfigError
from mastar_vac.ingest import ingest_spectra
from mastar_vac.io.allstar import read_allstar, write_allstar
from mastar_vac.io.cube import open_cube
from mastar_vac.io.gaia_xmatch import read_gaia_xmatch, write_gaia_xmatch
from mastar_vac.io.goodspec import write_goodspec
from mastar_vac.io.mastarall import write_mastarall
from mastar_vac.normalize import normalize_cube
from mastar_vac.reference import (
    ReferenceConfig,
    ReferenceSet,
    allstar_columns_for,
    build_reference_set,
    coadd,
    derive_labels,
    match_stars,
)
from mastar_vac.wavegrid import mastar_wavelength

from .toy import toy_spectra

LABELS = ["TEFF", "LOGG", "FE_H"]
N_STARS = 12


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    """12 MaStar stars × 2 visits; stars 0–9 observed by APOGEE. Traps:
    star 1 a flagged binary (STARFLAG bit 21), star 2 has a duplicate allStar row
    (EXTRATARG bit 4, different labels), star 3 NaN labels, star 4 both visits
    emission-line (MJDQUAL bit 8), star 5 one visit emission-line, star 6 ASPCAP
    STAR_BAD, star 7 VELVARFLAG in mastarall, star 8 matched by position only (no Gaia
    id in allStar), star 9 −9999 in TEFF."""
    tmp = tmp_path_factory.mktemp("survey")
    rng = np.random.default_rng(1)
    teff = rng.uniform(4500, 8000, N_STARS)
    logg = rng.uniform(2, 4.5, N_STARS)
    feh = rng.uniform(-1, 0.3, N_STARS)
    ra = rng.uniform(10, 50, N_STARS)
    dec = rng.uniform(-5, 40, N_STARS)
    ids = np.array([f"7-{5000 + i}" for i in range(N_STARS)])
    vis = np.repeat(np.arange(N_STARS), 2)
    n = len(vis)
    spec = toy_spectra(np.column_stack([teff, logg, feh])[vis])
    level = 100.0 * (1 + 0.3 * np.sin(mastar_wavelength() / 800))
    flux = (spec * level).astype(np.float32)
    ivar = np.full_like(flux, 1 / (level / 80.0) ** 2)
    mjdqual = np.zeros(n, np.int32)
    mjdqual[vis == 4] = 1 << 8
    mjdqual[np.flatnonzero(vis == 5)[0]] = 1 << 8
    key = {"MANGAID": ids[vis], "PLATE": np.full(n, 9100, np.int32), "IFUDESIGN": np.array(["3701"] * n),
           "MJD": (58000 + np.arange(n)).astype(np.int32)}
    gs = write_goodspec(tmp / "mastar-goodspec-v3_1_1-v1_7_7.fits.gz",
                        {**key, "RA": ra[vis], "DEC": dec[vis], "FLUX": flux, "IVAR": ivar, "MJDQUAL": mjdqual,
                         "DISP": np.full_like(flux, 1.2), "S2N": np.full(n, 80.0, np.float32)})
    velvar = np.zeros(n, np.int16)
    velvar[vis == 7] = 1
    ma = write_mastarall(tmp / "mastarall-v3_1_1-v1_7_7.fits", {"MANGAID": ids, "RA": ra, "DEC": dec},
                         {**key, "VELVARFLAG": velvar, "MJDQUAL": mjdqual, "S2N": np.full(n, 80.0, np.float32)})
    source_id = 10**15 + np.arange(N_STARS)
    gx = write_gaia_xmatch(tmp / "xmatch.fits", {"MANGAID": ids, "RA": ra, "DEC": dec, "SOURCE_ID": source_id})
    ap = np.arange(10)
    rows = {
        "APOGEE_ID": np.array([f"2M{i:08d}" for i in ap]),
        "RA": ra[ap] + 0.1 / 3600, "DEC": dec[ap],
        "TEFF": teff[ap].astype(np.float32), "LOGG": logg[ap].astype(np.float32), "FE_H": feh[ap].astype(np.float32),
        "ASPCAPFLAG": np.zeros(10, np.int64), "STARFLAG": np.zeros(10, np.int64), "EXTRATARG": np.zeros(10, np.int32),
        "GAIAEDR3_SOURCE_ID": source_id[ap].copy(), "SNR": np.full(10, 100.0, np.float32),
    }
    rows["STARFLAG"][1] = 1 << 21
    rows["TEFF"][3] = np.nan
    rows["ASPCAPFLAG"][6] = 1 << 23
    rows["GAIAEDR3_SOURCE_ID"][8] = 0
    rows["TEFF"][9] = -9999.0
    # the duplicate row of star 2: other labels, DUPLICATE bit, lower S/N
    dup = {k: np.concatenate([v, v[2:3]]) for k, v in rows.items()}
    dup["EXTRATARG"][-1] = 1 << 4
    dup["TEFF"][-1] = 3500.0
    dup["SNR"][-1] = 20.0
    al = write_allstar(tmp / "allStar-dr17-synspec_rev1.fits", dup)
    store = tmp / "cube.zarr"
    ingest_spectra(gs, store, mastarall=ma, chunk=7)
    normalize_cube(store)
    return {"cube": open_cube(store), "allstar": read_allstar(al, ["APOGEE_ID", "RA", "DEC", "SNR", "ASPCAPFLAG",
                                                                    "STARFLAG", "EXTRATARG", "GAIAEDR3_SOURCE_ID",
                                                                    *allstar_columns_for(LABELS)]),
            "gaia": read_gaia_xmatch(gx), "ids": ids, "labels": np.column_stack([teff, logg, feh])}


def test_traps_are_removed_and_counted(survey):
    ref = build_reference_set(survey["cube"], survey["allstar"], survey["gaia"], LABELS)
    ids = survey["ids"]
    assert sorted(ref.ids) == sorted(ids[[0, 2, 5, 8]])
    r = ref.cut_report
    assert r["duplicate"] == 1 and r["matched"] == 10
    assert r["aspcap_bad"] == 1 and r["missing_labels"] == 2 and r["binary"] == 2
    assert r["emission_line"] == 1 and r["kept"] == 4
    # star 2 keeps its primary row's labels, not the duplicate's
    np.testing.assert_allclose(ref.labels[list(ref.ids).index(ids[2])], survey["labels"][2], rtol=1e-6)
    # star 5 co-adds only its clean visit, the others both visits
    nv = dict(zip(ref.ids, ref.n_visits))
    assert nv[ids[5]] == 1 and nv[ids[0]] == 2
    assert np.isfinite(ref.flux).all() and (ref.ivar > 0).mean() > 0.99


def test_cuts_are_configurable(survey):
    cfg = ReferenceConfig(cuts=("duplicate", "missing_labels"))
    ref = build_reference_set(survey["cube"], survey["allstar"], survey["gaia"], LABELS, cfg)
    assert sorted(ref.ids) == sorted(survey["ids"][[0, 1, 2, 4, 5, 6, 7, 8]])
    with pytest.raises(ConfigError, match="unknown cut"):
        ReferenceConfig(cuts=("binary", "nonsense"))


def test_match_by_gaia_id_then_position():
    stars = pd.DataFrame({"MANGAID": ["a", "b", "c", "d"], "RA": [10.0, 20.0, 30.0, 40.0],
                          "DEC": [0.0, 0.0, 0.0, 0.0], "SOURCE_ID": pd.array([111, pd.NA, 333, pd.NA], "Int64")})
    allstar = pd.DataFrame({"RA": [10.0 + 5 / 3600, 20.0 + 1 / 3600, 30.0, 40.0 + 3 / 3600],
                            "DEC": [0.0, 0.0, 0.0, 0.0], "GAIAEDR3_SOURCE_ID": [111, 0, 999, 0]})
    m = match_stars(stars, allstar, radius_arcsec=1.5).set_index("MANGAID")
    assert m.loc["a", "match"] == "gaia" and m.loc["a", "allstar_row"] == 0  # 5″ away but same Gaia source
    assert m.loc["b", "match"] == "position" and m.loc["b", "sep_arcsec"] == pytest.approx(1.0, abs=0.01)
    assert m.loc["c", "match"] == "position"  # its Gaia id is not in allStar: position decides
    assert "d" not in m.index  # 3″: outside the radius


def test_two_stars_claiming_one_apogee_row_get_none():
    stars = pd.DataFrame({"MANGAID": ["a", "b"], "RA": [10.0, 10.0 + 0.5 / 3600], "DEC": [0.0, 0.0]})
    allstar = pd.DataFrame({"RA": [10.0 + 0.25 / 3600], "DEC": [0.0]})
    assert len(match_stars(stars, allstar)) == 0


def test_coadd_inverse_variance():
    f = np.array([[1.0, 2.0, 5.0], [3.0, 4.0, 7.0], [9.0, 9.0, 9.0]])
    iv = np.array([[1.0, 1.0, 0.0], [3.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    flux, ivar = coadd(f, iv, np.array([0, 0, 1]), 2)
    np.testing.assert_allclose(flux[0], [(1 * 1 + 3 * 3) / 4, 2.0, 0.0])
    np.testing.assert_allclose(ivar[0], [4.0, 1.0, 0.0])
    np.testing.assert_allclose(flux[1], 9.0)


def test_derived_labels():
    a = pd.DataFrame({"ALPHA_M": [0.2], "M_H": [-0.5], "FE_H": [-0.6], "VMICRO": [1.5]})
    got = derive_labels(a, ["ALPHA_FE", "LOG10_VMICRO"])
    np.testing.assert_allclose(got, [[0.3, np.log10(1.5)]])
    assert allstar_columns_for(["TEFF", "ALPHA_FE"]) == ["TEFF", "ALPHA_M", "M_H", "FE_H"]


def test_save_load_round_trip(survey, tmp_path):
    ref = build_reference_set(survey["cube"], survey["allstar"], survey["gaia"], LABELS)
    back = ReferenceSet.load(ref.save(tmp_path / "r.npz"))
    np.testing.assert_array_equal(back.flux, ref.flux)
    assert back.cut_report == ref.cut_report and list(back.ids) == list(ref.ids)
