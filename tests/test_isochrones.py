"""PARSEC isochrones from lachesis-grids, Gaia photometry, CMD look-up (mastar_vac.isochrones)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mastar_vac import isochrones as iso

# hard dependencies: a broken install must fail here, not skip
import h5py  # noqa: E402
import lachesis_grids  # noqa: E402


@pytest.fixture(scope="module")
def parsec() -> pd.DataFrame:
    return iso.load_isochrones("parsec_v1.25")


# ----------------------------------------------------------------------------- loading


def test_load_columns_and_ranges(parsec: pd.DataFrame) -> None:
    for col in ("feh", "log_age", "eep", "mass", "teff", "logg", "logl", "mbol", "phase", "pms", "stage_ok"):
        assert col in parsec.columns
    assert len(parsec) == 700_889
    assert np.all(np.isfinite(parsec[["teff", "logg", "logl", "mbol", "mass"]].to_numpy()))
    assert 2250 < parsec["teff"].min() < 2400 and 200_000 < parsec["teff"].max() < 230_000
    assert -1.0 < parsec["logg"].min() < 0.0 and 5.5 < parsec["logg"].max() < 6.5
    np.testing.assert_allclose(np.sort(parsec["feh"].unique()), np.arange(-2.0, 0.51, 0.25))
    assert parsec["log_age"].min() >= 5.0 and parsec["log_age"].max() == pytest.approx(10.25)
    assert 0.08 < parsec["mass"].min() < 0.1
    assert parsec.attrs["mbol_sun"] == pytest.approx(4.74)
    np.testing.assert_allclose(parsec["mbol"] + 2.5 * parsec["logl"], 4.74, atol=1e-4)


def test_load_is_cached_and_returns_copies(parsec: pd.DataFrame) -> None:
    a = iso.load_isochrones()
    a.loc[0, "teff"] = -1.0
    assert iso.load_isochrones().loc[0, "teff"] > 0
    with pytest.raises(ValueError, match="unknown isochrone grid"):
        iso.load_isochrones("nope")


def test_sparse_indexing_matches_the_raw_blocks(parsec: pd.DataFrame) -> None:
    """Block k = i_feh·n_age + i_age starts at cumsum(lengths)[k−1]; offsets index the EEP axis."""
    with h5py.File(lachesis_grids.grid_path("parsec_v1.25.h5"), "r") as f:
        feh_v, age_v, eep_v = f["feh_values"][:], f["age_values"][:], f["eep_values"][:]
        lengths, offsets = f["lengths"][:], f["offsets"][:]
        cols = list(f.attrs["columns"])
        i_feh, i_age = int(np.argmin(np.abs(feh_v))), int(np.argmin(np.abs(age_v - 9.65)))
        k = i_feh * len(age_v) + i_age
        start = int(lengths[:k].sum())
        block = f["values"][start:start + lengths[k]]
    mine = parsec[(parsec["feh"] == feh_v[i_feh]) & (parsec["log_age"] == age_v[i_age])]
    assert len(mine) == lengths[k] > 100
    np.testing.assert_array_equal(mine["eep"].to_numpy(), eep_v[offsets[k]:offsets[k] + lengths[k]])
    np.testing.assert_allclose(mine["teff"].to_numpy(), block[:, cols.index("Teff")])
    np.testing.assert_allclose(block[:, cols.index("age")], age_v[i_age], atol=1e-5)


def test_solar_isochrone_has_the_sun(parsec: pd.DataFrame) -> None:
    """[M/H] = 0, log age 9.65 (4.5 Gyr): a 1 M⊙ main-sequence point at 5,770 K, log g 4.44."""
    sol = parsec[(parsec["feh"] == 0.0) & np.isclose(parsec["log_age"], 9.65)]
    d = np.hypot((sol["teff"] - 5772.0) / 100.0, (sol["logg"] - 4.44) / 0.1)
    best = sol.loc[d.idxmin()]
    assert abs(best["teff"] - 5772.0) < 60 and abs(best["logg"] - 4.44) < 0.05
    assert 0.9 < best["mass"] < 1.1 and best["phase"] == 1.0 and best["stage_ok"]
    assert abs(best["logl"]) < 0.1
    # eeps increase along an isochrone and mass with them
    assert np.all(np.diff(sol["eep"].to_numpy()) == 1)
    assert np.all(np.diff(sol["mass"].to_numpy()) >= -1e-6)


def test_phase_flags(parsec: pd.DataFrame) -> None:
    young = parsec[(parsec["feh"] == 0.0) & np.isclose(parsec["log_age"], 6.5)]
    assert young["pms"].iloc[0] and not young["pms"].iloc[-1]  # low masses still contracting
    assert not young.loc[young["pms"], "stage_ok"].any()
    old = parsec[(parsec["feh"] == 0.0) & np.isclose(parsec["log_age"], 10.0)]
    bridge = (old["phase"] > 3) & (old["phase"] < 4)  # RGB tip → ZAHB across the He flash
    assert bridge.sum() > 10 and not old.loc[bridge, "stage_ok"].any()
    assert old.loc[(old["phase"] == 1.0), "stage_ok"].all()
    assert parsec.loc[parsec["log_age"] >= 9.0, "pms"].mean() < 0.1


def test_mist_loads_with_same_layout() -> None:
    mist = iso.load_isochrones("mist_v2.5_vvcrit0.4")
    assert len(mist) > 1_000_000 and np.all(np.isfinite(mist["teff"]))
    assert mist.attrs["mbol_sun"] == pytest.approx(4.74)
    assert mist.loc[np.isclose(mist["phase"], -1.0), "pms"].all()


# ----------------------------------------------------------------------------- sampling


def test_sampling_respects_cuts_and_is_seeded() -> None:
    a = iso.sample_isochrone_points(500, rng=42)
    b = iso.sample_isochrone_points(500, rng=np.random.default_rng(42))
    c = iso.sample_isochrone_points(500, rng=43)
    assert len(a) == 500 and (a["teff"] > 6000).all() and a["stage_ok"].all()
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(c)
    assert not a.duplicated(["feh", "log_age", "eep"]).any()  # drawn without replacement
    s = iso.sample_isochrone_points(300, teff_min=7000, teff_max=30000, logg_range=(3.0, 5.0),
                                    feh_range=(-1.0, 0.25), rng=0)
    assert s["teff"].between(7000, 30000).all() and s["logg"].between(3.0, 5.0).all()
    assert s["feh"].between(-1.0, 0.25).all()


def test_logteff_weighting_covers_the_hot_end() -> None:
    kw = dict(teff_max=32000.0, rng=5)
    flat = iso.sample_isochrone_points(2000, weighting="logteff", **kw)
    unif = iso.sample_isochrone_points(2000, weighting="uniform", **kw)
    lt = np.log10(flat["teff"])
    counts, _ = np.histogram(lt, bins=5, range=(np.log10(6000), np.log10(32000)))
    assert counts.min() > 0.6 * counts.max()  # ≈ flat in log Teff
    assert (flat["teff"] > 15000).mean() > (unif["teff"] > 15000).mean()


def test_sampling_errors() -> None:
    with pytest.raises(ValueError, match="only"):
        iso.sample_isochrone_points(10, teff_min=6000, teff_max=6001, logg_range=(5.9, 6.0), rng=0)
    with pytest.raises(ValueError, match="weighting"):
        iso.sample_isochrone_points(10, weighting="mass", rng=0)
    assert len(iso.sample_isochrone_points(0, rng=0)) == 0


# ----------------------------------------------------------------------------- photometry


def test_sun_photometry() -> None:
    bprp, mg, flags = iso.gaia_photometry(5772.0, 4.44, 0.0, 4.74, return_flags=True)
    assert bprp == pytest.approx(0.82, abs=0.05)
    assert mg == pytest.approx(4.67, abs=0.1)
    assert flags == 0
    assert iso.bc_g(5772.0) == pytest.approx(0.06, abs=1e-12)  # Andrae et al. 2018 zero point
    # another M_bol zero point is moved onto the 4.74 scale
    _, mg77 = iso.gaia_photometry(5772.0, 4.44, 0.0, 4.77, mbol_sun=4.77)
    assert mg77 == pytest.approx(mg)


@pytest.mark.parametrize("spt, teff, logg, bprp", [  # Pecaut & Mamajek (2013) dwarf sequence
    ("F5V", 6550, 4.3, 0.587), ("G0V", 5930, 4.4, 0.784), ("K0V", 5290, 4.5, 0.983), ("K5V", 4440, 4.6, 1.43),
])
def test_colours_agree_with_the_dwarf_sequence(spt: str, teff: float, logg: float, bprp: float) -> None:
    assert iso.bp_rp_from_teff(teff, logg, 0.0) == pytest.approx(bprp, abs=0.06), spt


def test_red_clump_colour() -> None:
    assert 1.1 < iso.bp_rp_from_teff(4750.0, 2.4, 0.0) < 1.3


def test_photometry_vectorised_continuous_and_flagged() -> None:
    teff = np.geomspace(2400, 45000, 4000)
    for logg, feh in [(4.5, 0.0), (4.0, -1.5), (2.0, 0.0), (1.0, -2.0)]:
        c, mg, fl = iso.gaia_photometry(teff, logg, feh, 4.74, return_flags=True)
        assert c.shape == mg.shape == fl.shape == teff.shape
        assert np.all(np.isfinite(c)) and np.all(np.isfinite(mg))
        assert np.all(np.diff(c) < 1e-3)  # colour gets bluer as Teff rises
        assert np.max(np.abs(np.diff(c))) < 0.05  # no jumps where the relations join
        assert np.max(np.abs(np.diff(mg))) < 0.05
    _, _, fl = iso.gaia_photometry([5000.0, 12000.0, 3000.0], 4.5, 0.0, 5.0, return_flags=True)
    assert fl[0] == 0
    assert fl[1] & iso.PHOT_COLOUR_FALLBACK and fl[1] & iso.PHOT_COLOUR_EXTRAPOLATED and fl[1] & iso.PHOT_BC_FALLBACK
    assert fl[2] & iso.PHOT_BC_FALLBACK
    c, mg = iso.gaia_photometry([np.nan, 5000.0], [4.5, np.nan], 0.0, 5.0)
    assert np.isnan(c).all() and np.isnan(mg[0])


def test_hot_and_cool_ends_are_plausible() -> None:
    # B0V: (BP−RP)₀ near −0.35…−0.45; M5V near 3.3; BC_G of a B0V ≈ −3
    assert -0.5 < iso.bp_rp_from_teff(31400.0, 4.1, 0.0) < -0.3
    assert 3.0 < iso.bp_rp_from_teff(3060.0, 5.0, 0.0) < 3.8
    assert -3.3 < iso.bc_g(31400.0) < -2.7


# ----------------------------------------------------------------------------- CMD look-up


def test_nearest_point_inverts_the_sun() -> None:
    bprp, mg = iso.gaia_photometry(5772.0, 4.44, 0.0, 4.74)
    res = iso.nearest_isochrone_point(bprp, mg)
    assert len(res) == 1
    assert abs(res["teff"][0] - 5772.0) < 150 and abs(res["logg"][0] - 4.44) < 0.2
    assert res["cmd_distance"][0] < 0.01
    res2 = iso.nearest_isochrone_point(0.82, 4.67)
    assert abs(res2["teff"][0] - 5772.0) < 150 and abs(res2["logg"][0] - 4.44) < 0.2


def test_nearest_point_many_stars_and_custom_table() -> None:
    tab = iso.isochrone_photometry()
    assert {"bp_rp", "M_G", "phot_flags"} <= set(tab.columns) and tab["stage_ok"].all()
    rng = np.random.default_rng(3)
    rows = tab.iloc[rng.choice(len(tab), 300, replace=False)]
    res = iso.nearest_isochrone_point(rows["bp_rp"].to_numpy(), rows["M_G"].to_numpy())
    assert len(res) == 300
    assert np.all(res["cmd_distance"] < 1e-9)  # every input is itself an isochrone point
    np.testing.assert_allclose(res["bp_rp"], rows["bp_rp"], atol=1e-9)
    # one metallicity only
    solar = tab[tab["feh"] == 0.0]
    r = iso.nearest_isochrone_point([0.82, 1.2], [4.67, 0.5], table=solar)
    assert (r["feh"] == 0.0).all()
    assert r["logg"][1] < 3.5  # a red-clump-like star is matched to a giant
    # non-finite input → NaN row, index −1
    r = iso.nearest_isochrone_point([np.nan, 0.82], [4.0, np.inf])
    assert np.isnan(r["teff"]).all() and (r["index"] == -1).all()
    with pytest.raises(ValueError, match="lacks"):
        iso.nearest_isochrone_point(0.8, 4.0, table=solar.drop(columns=["M_G"]))


def test_poor_match_has_large_distance() -> None:
    # a white dwarf (blue and faint) is far from every isochrone point
    r = iso.nearest_isochrone_point(0.0, 11.0)
    assert r["cmd_distance"][0] > 0.5
