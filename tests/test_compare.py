"""Cross-match (Dask, streamed blocks), the Table 2 analogue and the CMD table.

A small VAC (150 stars, ~375 visits, known labels) is matched to LAMOST, SEGUE and
Gaia DR3 files written in the surveys' own layouts, with a known LAMOST Teff offset
(+50 K: VAC − LAMOST = −50 K), a known SEGUE [Fe/H] offset (−0.1 dex: VAC − SEGUE =
+0.1 dex), rows just outside the radius, duplicate and tied rows near single stars, a
decoy Gaia source nearer than the right one, and external files streamed in 37-row
blocks. Every match is checked against a brute-force all-pairs search.
"""

from __future__ import annotations

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest

from mastar_vac.compare import (
    absolute_magnitude,
    best_per_star,
    cmd_table,
    comparison_table,
    crossmatch,
    format_comparison_tables,
)
from mastar_vac.io.catalogs import (
    dask_external,
    iter_gaia_dr3_blocks,
    iter_lamost_blocks,
    iter_segue_blocks,
    read_gaia_dr3,
    read_lamost,
    read_segue,
    write_gaia_dr3,
    write_lamost,
    write_segue,
)

NSTAR = 150
RADIUS = 1.5
LAMOST_TEFF_OFFSET = 50.0   # LAMOST = truth + 50 K
SEGUE_FEH_OFFSET = -0.1     # SEGUE = truth - 0.1 dex
DUP_STAR, TIE_STAR, DECOY_STAR = 7, 8, 1
OUTSIDE = range(120, 130)   # stars whose only LAMOST row is 1.6-2.5" away
ARCSEC = 1 / 3600.0


@pytest.fixture(autouse=True)
def _sync_scheduler():
    with dask.config.set(scheduler="synchronous"):
        yield


def _offset(ra, dec, r_arcsec, pa):
    """Positions r arcsec away at position angle pa (small-angle; fine at these scales)."""
    ddec = r_arcsec * ARCSEC * np.cos(pa)
    dra = r_arcsec * ARCSEC * np.sin(pa) / np.cos(np.radians(dec))
    return ra + dra, dec + ddec


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    rng = np.random.default_rng(2022)
    star = pd.DataFrame({
        "MANGAID": [f"3-{100000 + i}" for i in range(NSTAR)],
        "RA": rng.uniform(150, 152, NSTAR), "DEC": rng.uniform(10, 12, NSTAR),
        "TEFF": rng.uniform(4000, 7000, NSTAR), "LOGG": rng.uniform(1, 5, NSTAR),
        "FEH": rng.uniform(-2, 0.4, NSTAR), "ALPHA": rng.uniform(-0.1, 0.4, NSTAR),
    })
    star["SOURCE_ID"] = pd.array([4000000000000000000 + 1000003 * i if i % 15 else None for i in range(NSTAR)],
                                 dtype="Int64")  # 140 stars with a Gaia EDR3 id
    # -- the VAC: 1-4 visits per star, per-visit noise, 8% invalid (wild) fits ---------
    nvis = rng.integers(1, 5, NSTAR)
    rows = star.loc[np.repeat(np.arange(NSTAR), nvis)].reset_index(drop=True)
    n = len(rows)
    vac = pd.DataFrame({
        "MANGAID": rows["MANGAID"], "PLATE": 9000 + rng.integers(0, 50, n),
        "IFUDESIGN": rng.choice(["3701", "3702", "12701"], n), "MJD": 57000 + np.arange(n),
        "RA": rows["RA"], "DEC": rows["DEC"],
        "TEFF": rows["TEFF"] + rng.normal(0, 30, n), "TEFF_ERR": 30.0,
        "LOGG": rows["LOGG"] + rng.normal(0, 0.05, n), "LOGG_ERR": 0.05,
        "FEH": rows["FEH"] + rng.normal(0, 0.03, n), "FEH_ERR": 0.03,
        "ALPHA": rows["ALPHA"] + rng.normal(0, 0.03, n), "ALPHA_ERR": 0.03,
        "VMICRO": rng.normal(0.1, 0.1, n), "VMICRO_ERR": 0.1,
        "SOURCE_ID": rows["SOURCE_ID"],
    })
    bad = rng.random(n) < 0.08
    vac["VALID"] = np.where(bad, 0, 1).astype(np.int16)
    vac["FLAG"] = np.where(bad, 4, 0).astype(np.int32)
    vac.loc[bad, "TEFF"] += 3000.0
    vac.loc[bad, "FEH"] += 1.0

    # -- LAMOST: 120 matched stars, duplicates, a tie, rows just outside, field -------
    def lam_row(i, r, pa, obsid, snr=None, dteff=None):
        ra, dec = _offset(star.RA[i], star.DEC[i], r, pa)
        return {"ext_id": str(obsid), "RA": ra, "DEC": dec,
                "TEFF": star.TEFF[i] + LAMOST_TEFF_OFFSET + (rng.normal(0, 60) if dteff is None else dteff),
                "TEFF_ERR": 60.0, "LOGG": star.LOGG[i] + rng.normal(0, 0.1), "LOGG_ERR": 0.1,
                "FEH": star.FEH[i] + rng.normal(0, 0.08), "FEH_ERR": 0.08,
                "ALPHA": star.ALPHA[i] + rng.normal(0, 0.05), "ALPHA_ERR": 0.05,
                "SNR": rng.uniform(20, 200) if snr is None else snr}
    lam = [lam_row(i, rng.uniform(0, 1.0), rng.uniform(0, 2 * np.pi), 500000000 + i)
           for i in range(120) if i not in (DUP_STAR, TIE_STAR)]
    lam += [lam_row(i, rng.uniform(1.6, 2.5), rng.uniform(0, 2 * np.pi), 510000000 + i) for i in OUTSIDE]
    nf = 1500
    field = pd.DataFrame({"ext_id": [str(520000000 + k) for k in range(nf)],
                          "RA": rng.uniform(149.5, 152.5, nf), "DEC": rng.uniform(9.5, 12.5, nf),
                          "TEFF": rng.uniform(4000, 7000, nf), "LOGG": rng.uniform(1, 5, nf),
                          "FEH": rng.uniform(-2, 0.4, nf), "SNR": rng.uniform(5, 100, nf)})
    lamost = pd.concat([pd.DataFrame(lam), field], ignore_index=True)
    lamost = lamost.sample(frac=1, random_state=1).reset_index(drop=True)
    # duplicates around DUP_STAR (nearest = 0.25") and an exact tie at TIE_STAR (same
    # input position, the S/N 80 observation must win), spread over different blocks
    dups = [lam_row(DUP_STAR, 1.3, 0.3, 530000001), lam_row(DUP_STAR, 0.25, 2.0, 530000002),
            lam_row(DUP_STAR, 0.8, 4.0, 530000003)]
    tie_ra, tie_dec = _offset(star.RA[TIE_STAR], star.DEC[TIE_STAR], 0.4, 1.0)
    ties = [dict(lam_row(TIE_STAR, 0.0, 0.0, 540000001, snr=50.0), RA=tie_ra, DEC=tie_dec),
            dict(lam_row(TIE_STAR, 0.0, 0.0, 540000002, snr=80.0), RA=tie_ra, DEC=tie_dec)]
    parts, cuts = [], [3, 600, 1200, len(lamost)]
    prev = 0
    for extra, cut in zip([[dups[0], ties[0]], [dups[1]], [dups[2], ties[1]], []], cuts):
        parts += [lamost.iloc[prev:cut], pd.DataFrame(extra)]
        prev = cut
    lamost = pd.concat(parts, ignore_index=True)
    lamost_path = write_lamost(tmp / "dr10_v2.0_LRS_stellar.fits.gz", lamost)

    # -- SEGUE: stars 30-149 within 1.2", [Fe/H] offset ---------------------------------
    seg = []
    for i in range(30, NSTAR):
        ra, dec = _offset(star.RA[i], star.DEC[i], rng.uniform(0, 1.2), rng.uniform(0, 2 * np.pi))
        seg.append({"ext_id": str(3000000000000000000 + i * 4096), "RA": ra, "DEC": dec,
                    "TEFF": star.TEFF[i] + rng.normal(0, 100), "TEFF_ERR": 100.0,
                    "LOGG": star.LOGG[i] + rng.normal(0, 0.2), "LOGG_ERR": 0.2,
                    "FEH": star.FEH[i] + SEGUE_FEH_OFFSET + rng.normal(0, 0.1), "FEH_ERR": 0.1,
                    "ALPHA": star.ALPHA[i] + rng.normal(0, 0.08), "ALPHA_ERR": 0.08, "SNR": rng.uniform(10, 80),
                    "PLATE": 2500 + i % 9, "MJD": 54500 + i % 4, "FIBER": 1 + i, "FLAG": "nnnn"})
    nf = 800
    seg_field = pd.DataFrame({"ext_id": [str(3100000000000000000 + k) for k in range(nf)],
                              "RA": rng.uniform(149.5, 152.5, nf), "DEC": rng.uniform(9.5, 12.5, nf),
                              "TEFF": rng.uniform(4000, 7000, nf), "LOGG": 4.0, "FEH": -0.5, "SNR": 20.0,
                              "PLATE": 2600, "MJD": 54600, "FIBER": 1 + np.arange(nf) % 640})
    segue = pd.concat([pd.DataFrame(seg), seg_field], ignore_index=True).sample(frac=1, random_state=2)
    segue_path = write_segue(tmp / "ssppOut-dr12.fits", segue.reset_index(drop=True))

    # -- Gaia DR3: ids of most stars, a decoy nearer than the right source ---------------
    have = [i for i in range(NSTAR) if star.SOURCE_ID.notna()[i] and i not in (11, 22, 33, 44, 55)]
    gai = []
    for i in have:
        r = 0.45 if i == DECOY_STAR else rng.uniform(0, 0.5)
        ra, dec = _offset(star.RA[i], star.DEC[i], r, rng.uniform(0, 2 * np.pi))
        plx = rng.uniform(0.2, 10)
        gai.append({"SOURCE_ID": int(star.SOURCE_ID[i]), "RA": ra, "DEC": dec, "PARALLAX": plx,
                    "PARALLAX_ERROR": rng.uniform(0.02, 0.4), "G": rng.uniform(9, 17),
                    "BP_RP": rng.uniform(0.2, 2.5), "RUWE": 1.0,
                    "TEFF": star.TEFF[i] + rng.normal(0, 150), "TEFF_ERR": 150.0,
                    "LOGG": star.LOGG[i] + rng.normal(0, 0.2), "FEH": star.FEH[i] + rng.normal(0, 0.2)})
    ra, dec = _offset(star.RA[DECOY_STAR], star.DEC[DECOY_STAR], 0.1, 0.0)
    gai.append({"SOURCE_ID": 4100000000000000001, "RA": ra, "DEC": dec, "PARALLAX": 1.0, "PARALLAX_ERROR": 0.1,
                "G": 19.0, "BP_RP": 1.0, "RUWE": 1.0})
    nf = 500
    gaia_field = pd.DataFrame({"SOURCE_ID": 4200000000000000000 + np.arange(nf) * 7,
                               "RA": rng.uniform(149.5, 152.5, nf), "DEC": rng.uniform(9.5, 12.5, nf),
                               "PARALLAX": rng.uniform(0.1, 3, nf), "PARALLAX_ERROR": 0.1,
                               "G": rng.uniform(12, 20, nf), "BP_RP": rng.uniform(0, 3, nf)})
    gaia = pd.concat([pd.DataFrame(gai), gaia_field], ignore_index=True).sample(frac=1, random_state=3)
    gaia_path = write_gaia_dr3(tmp / "gaia_dr3_subset.parquet", gaia.reset_index(drop=True))
    return {"vac": vac, "star": star, "lamost": lamost_path, "segue": segue_path, "gaia": gaia_path,
            "gaia_ids": {int(star.SOURCE_ID[i]) for i in have}}


# -- brute force ----------------------------------------------------------------

def _haversine_arcsec(ra1, dec1, ra2, dec2):
    ra1, dec1, ra2, dec2 = map(np.radians, (ra1, dec1, ra2, dec2))
    a = np.sin((dec2 - dec1) / 2) ** 2 + np.cos(dec1) * np.cos(dec2) * np.sin((ra2 - ra1) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(a, 0, 1)))) * 3600


def _brute(vac: pd.DataFrame, ext: pd.DataFrame, prefix: str, radius: float = RADIUS) -> pd.DataFrame:
    """All pairs; per star the nearest (to 1 mas), then the higher S/N, then the smaller id."""
    stars = vac.groupby("MANGAID", sort=True)[["RA", "DEC"]].first()
    sep = _haversine_arcsec(stars.RA.to_numpy()[:, None], stars.DEC.to_numpy()[:, None],
                            ext.RA.to_numpy()[None, :], ext.DEC.to_numpy()[None, :])
    mas = np.round(sep * 1000)
    chosen = {}
    for k, mid in enumerate(stars.index):
        if sep[k].min() >= radius:
            continue
        cand = np.flatnonzero(mas[k] == mas[k].min())
        snr = ext.SNR.to_numpy()[cand]
        cand = cand[np.where(np.isfinite(snr), snr, -np.inf) == np.nanmax(np.append(snr, -np.inf))] \
            if np.isfinite(snr).any() else cand
        cand = sorted(cand, key=lambda j: str(ext.ext_id.iloc[j]))
        chosen[mid] = cand[0]
    best = ext.iloc[list(chosen.values())].copy()
    best.insert(0, "MANGAID", list(chosen.keys()))
    best = best.drop(columns=["survey"]).rename(columns=lambda c: c if c == "MANGAID" else
                                                ("%s_ID" % prefix if c == "ext_id" else f"{prefix}_{c}"))
    return vac.merge(best, on="MANGAID", how="inner")


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(["MANGAID", "MJD"]).reset_index(drop=True)


def _vac_dd(vac: pd.DataFrame) -> dd.DataFrame:
    return dd.from_pandas(vac, npartitions=3)


# -- cross-match ------------------------------------------------------------------

def test_lamost_streamed_blocks_equal_brute_force(world):
    vac = world["vac"]
    joined = crossmatch(_vac_dd(vac), iter_lamost_blocks(world["lamost"], rows=37), radius_arcsec=RADIUS)
    assert isinstance(joined, dd.DataFrame)
    got = _sorted(joined.compute())
    want = _sorted(_brute(vac, read_lamost(world["lamost"]), "LAMOST"))
    assert len(got) == len(want) > 250
    assert list(got["LAMOST_ID"]) == list(want["LAMOST_ID"])
    for c in ("LAMOST_TEFF", "LAMOST_FEH", "LAMOST_RA", "TEFF", "VALID"):
        np.testing.assert_allclose(got[c].to_numpy(float), want[c].to_numpy(float))
    sep = _haversine_arcsec(got.RA, got.DEC, got.LAMOST_RA, got.LAMOST_DEC)
    np.testing.assert_allclose(got["LAMOST_SEP_ARCSEC"], sep, atol=1e-6)
    assert (got["LAMOST_SEP_ARCSEC"] < RADIUS).all()
    # one row per VAC visit of every matched star, each carrying its star's match
    assert got.groupby("MANGAID")["LAMOST_ID"].nunique().max() == 1
    matched = set(got.MANGAID)
    assert len(got) == vac.MANGAID.isin(matched).sum()


def test_nearest_duplicate_wins_ties_break_on_snr_and_outside_rows_do_not_match(world):
    vac, star = world["vac"], world["star"]
    got = crossmatch(_vac_dd(vac), iter_lamost_blocks(world["lamost"], rows=37)).compute()
    per_star = got.groupby("MANGAID")["LAMOST_ID"].first()
    assert per_star[star.MANGAID[DUP_STAR]] == "530000002"   # the 0.25" row, not 0.8" or 1.3"
    assert per_star[star.MANGAID[TIE_STAR]] == "540000002"   # same position: S/N 80 beats S/N 50
    assert not set(star.MANGAID[list(OUTSIDE)]) & set(per_star.index)
    wider = crossmatch(_vac_dd(vac), iter_lamost_blocks(world["lamost"], rows=37), radius_arcsec=2.6).compute()
    assert set(star.MANGAID[list(OUTSIDE)]) <= set(wider.MANGAID)


def test_block_size_and_path_do_not_change_the_answer(world):
    vac = world["vac"]
    ref = _sorted(crossmatch(vac, read_lamost(world["lamost"])).compute())
    for ext in (iter_lamost_blocks(world["lamost"], rows=5), iter_lamost_blocks(world["lamost"], rows=100000),
                dask_external(world["lamost"], "LAMOST", rows=37)):
        got = _sorted(crossmatch(_vac_dd(vac), ext, blocks_in_flight=3).compute())
        assert list(got["LAMOST_ID"]) == list(ref["LAMOST_ID"])
        assert list(got.columns) == list(ref.columns)


def test_dask_partitions_of_the_external_file(world):
    ext = dask_external(world["segue"], "SEGUE", rows=37)
    assert ext.npartitions > 20
    vac = world["vac"]
    got = _sorted(crossmatch(_vac_dd(vac), ext).compute())
    want = _sorted(_brute(vac, read_segue(world["segue"]), "SEGUE"))
    assert list(got["SEGUE_ID"]) == list(want["SEGUE_ID"])
    assert len(set(got.MANGAID)) == NSTAR - 30


def test_gaia_id_match_uses_ids_not_positions(world):
    vac, star = world["vac"], world["star"]
    joined = crossmatch(_vac_dd(vac), iter_gaia_dr3_blocks(world["gaia"], rows=37),
                        id_match=("SOURCE_ID", "SOURCE_ID")).compute()
    per_star = joined.groupby("MANGAID").first()
    expected = {m for m, s in zip(star.MANGAID, star.SOURCE_ID) if pd.notna(s) and int(s) in world["gaia_ids"]}
    assert set(per_star.index) == expected and len(expected) == 135
    assert (per_star["GAIA_SOURCE_ID"].astype("int64") == per_star["SOURCE_ID"].astype("int64")).all()
    decoy = star.MANGAID[DECOY_STAR]
    assert per_star.loc[decoy, "GAIA_SEP_ARCSEC"] == pytest.approx(0.45, abs=1e-3)
    positional = crossmatch(vac, read_gaia_dr3(world["gaia"])).compute().groupby("MANGAID").first()
    assert positional.loc[decoy, "GAIA_SOURCE_ID"] == 4100000000000000001  # the nearer, wrong source


def test_chained_matches_and_left_join(world):
    vac = world["vac"]
    both = crossmatch(crossmatch(_vac_dd(vac), iter_lamost_blocks(world["lamost"], rows=200)),
                      iter_segue_blocks(world["segue"], rows=200))
    got = both.compute()
    assert {"LAMOST_TEFF", "SEGUE_TEFF", "LAMOST_SEP_ARCSEC", "SEGUE_ID"} <= set(got.columns)
    left = crossmatch(vac, read_lamost(world["lamost"]), how="left", prefix="LM").compute()
    assert len(left) == len(vac) and left["LM_TEFF"].isna().sum() > 0
    with pytest.raises(ValueError, match="already has"):
        crossmatch(left, read_lamost(world["lamost"]), prefix="LM")


def test_best_per_star_is_a_total_order():
    cands = pd.DataFrame({"MANGAID": ["a", "a", "a", "b"], "ext_id": ["3", "2", "1", "9"],
                          "SNR": [10.0, 10.0, np.nan, 1.0], "SEP_ARCSEC": [0.5, 0.5, 0.5, 1.0]})
    for perm in ([0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]):
        best = best_per_star(cands.iloc[perm])
        assert dict(zip(best.MANGAID, best.ext_id)) == {"a": "2", "b": "9"}


# -- Table 2 analogue ------------------------------------------------------------

def _numpy_stats(j: pd.DataFrame, lab: str, prefix: str, valid_only: bool = True):
    if valid_only:
        j = j[j.VALID == 1]
    d = (j[lab] - j[f"{prefix}_{lab}"]).dropna().to_numpy()
    return len(d), np.median(d), np.std(d, ddof=1), 1.4826 * np.median(np.abs(d - np.median(d)))


def test_comparison_tables_recover_the_offsets(world):
    vac = world["vac"]
    lam = crossmatch(_vac_dd(vac), iter_lamost_blocks(world["lamost"], rows=37)).compute()
    seg = crossmatch(_vac_dd(vac), iter_segue_blocks(world["segue"], rows=37)).compute()
    t_lam = comparison_table(lam, "LAMOST")
    t_seg = comparison_table(seg, "SEGUE")
    assert list(t_lam.index) == ["TEFF", "LOGG", "FEH", "ALPHA"]
    assert t_lam.loc["TEFF", "MEDIAN_OFFSET"] == pytest.approx(-LAMOST_TEFF_OFFSET, abs=20)
    assert t_lam.loc["TEFF", "STD"] == pytest.approx(np.hypot(30, 60), rel=0.2)
    assert abs(t_lam.loc["FEH", "MEDIAN_OFFSET"]) < 0.03
    assert t_seg.loc["FEH", "MEDIAN_OFFSET"] == pytest.approx(-SEGUE_FEH_OFFSET, abs=0.03)
    assert t_seg.loc["FEH", "STD"] == pytest.approx(np.hypot(0.03, 0.1), rel=0.25)
    assert abs(t_seg.loc["TEFF", "MEDIAN_OFFSET"]) < 30
    # exactly the statistics of the brute-force join
    for joined, table, prefix, ext in ((lam, t_lam, "LAMOST", read_lamost(world["lamost"])),
                                       (seg, t_seg, "SEGUE", read_segue(world["segue"]))):
        brute = _brute(vac, ext, prefix)
        for lab in ("TEFF", "LOGG", "FEH", "ALPHA"):
            n, med, std, mad = _numpy_stats(brute, lab, prefix)
            assert table.loc[lab, "N"] == n
            np.testing.assert_allclose(table.loc[lab, ["MEDIAN_OFFSET", "STD", "MAD_STD"]].to_numpy(float),
                                       [med, std, mad], rtol=1e-10)
    text = format_comparison_tables({"LAMOST": t_lam, "SEGUE": t_seg})
    assert "LAMOST" in text and "SEGUE" in text and "Teff [K]" in text and "[Fe/H] [dex]" in text
    assert f"{t_lam.loc['TEFF', 'MEDIAN_OFFSET']:+.0f}" in text


def test_valid_only_excludes_flagged_visits(world):
    lam = crossmatch(world["vac"], read_lamost(world["lamost"])).compute()
    assert (lam.VALID == 0).sum() > 5
    valid = comparison_table(lam, "LAMOST")
    every = comparison_table(lam, "LAMOST", valid_only=False)
    assert valid.loc["TEFF", "N"] == ((lam.VALID == 1) & lam.LAMOST_TEFF.notna()).sum()
    assert every.loc["TEFF", "N"] == lam.LAMOST_TEFF.notna().sum() > valid.loc["TEFF", "N"]
    assert every.loc["TEFF", "STD"] > 300 > valid.loc["TEFF", "STD"]  # the +3000 K bad fits
    per_star = comparison_table(lam, "LAMOST", per_star=True)
    assert per_star.loc["TEFF", "N"] == lam[lam.VALID == 1].MANGAID.nunique()


def test_gaia_table_has_no_alpha(world):
    g = crossmatch(world["vac"], read_gaia_dr3(world["gaia"]), id_match=("SOURCE_ID", "SOURCE_ID")).compute()
    t = comparison_table(g, "GAIA")
    assert t.loc["ALPHA", "N"] == 0 and np.isnan(t.loc["ALPHA", "MEDIAN_OFFSET"])
    assert t.loc["TEFF", "N"] > 200
    assert "-" in format_comparison_tables({"GAIA": t}).splitlines()[-1]


# -- colour-magnitude diagram -------------------------------------------------------

def test_cmd_table(world):
    vac = world["vac"]
    gaia = read_gaia_dr3(world["gaia"])
    cmd = cmd_table(vac, gaia)  # joined on SOURCE_ID
    assert len(cmd) > 100
    assert (cmd["PARALLAX_OVER_ERROR"] >= 5).all() and (cmd["VALID"] == 1).all()
    assert {"MANGAID", "BP_RP", "M_G", "TEFF", "LOGG", "FEH", "ALPHA", "VMICRO"} <= set(cmd.columns)
    g = gaia.set_index("SOURCE_ID")
    row = cmd.iloc[0]
    sid = vac.loc[vac.MANGAID == row.MANGAID, "SOURCE_ID"].iloc[0]
    assert row.M_G == pytest.approx(g.loc[sid, "G"] + 5 * np.log10(g.loc[sid, "PARALLAX"] / 100.0))
    # fewer rows than matched visits: parallax S/N < 5 and invalid fits are dropped
    merged = vac.merge(gaia[["SOURCE_ID", "PARALLAX", "PARALLAX_ERROR"]], on="SOURCE_ID")
    keep = (merged.PARALLAX / merged.PARALLAX_ERROR >= 5) & (merged.VALID == 1)
    assert len(cmd) == keep.sum() < len(merged)
    # the same from a crossmatch output (GAIA_* columns already joined)
    joined = crossmatch(vac, gaia, id_match=("SOURCE_ID", "SOURCE_ID")).compute()
    again = cmd_table(joined)
    pd.testing.assert_frame_equal(_sorted(again)[["MANGAID", "M_G", "BP_RP", "TEFF"]],
                                  _sorted(cmd)[["MANGAID", "M_G", "BP_RP", "TEFF"]])
    assert absolute_magnitude(np.array([10.0]), np.array([10.0]))[0] == pytest.approx(5.0)
