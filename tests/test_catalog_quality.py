"""The catalogue's χ² columns and the repeat-visit error model on valid visits only."""

from __future__ import annotations

import numpy as np
import pandas as pd

from mastar_vac.catalog import assemble_catalog, vac_column
from mastar_vac.quality import QUALITY_BITS
from mastar_vac.uncertainty import calibrate_uncertainties

from .test_uncertainty import LABELS, simulate

VISIT_COLS = ["MANGAID", "PLATE", "IFUDESIGN", "MJD", "RA", "DEC", "S2N", "MJDQUAL"]


def _split(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    df = df.copy()
    df["RA"], df["DEC"] = 10.0, 20.0
    return df.drop(columns=["S2N", "MJDQUAL", "RA", "DEC"]), df[VISIT_COLS]


def test_chisq_is_the_papers_and_the_cut_uses_it():
    """CHISQ is the data-noise χ² (cut at 100); CHISQ_EMU, with the emulator error, is
    its own column: a visit at 150 / 40 is flagged CHI2_HIGH and invalid."""
    df, _ = simulate(50, seed=3)
    df["CHISQ_RED"] = 2.0
    df["CHISQ_EMU_RED"] = 1.5
    df.loc[0, ["CHISQ_RED", "CHISQ_EMU_RED"]] = [150.0, 40.0]
    fits, visits = _split(df)
    vac, _ = assemble_catalog(fits, visits, LABELS)
    assert vac.loc[0, "CHISQ"] == np.float32(150.0) and vac.loc[0, "CHISQ_EMU"] == np.float32(40.0)
    assert vac.loc[0, "FLAG"] >> QUALITY_BITS["CHI2_HIGH"] & 1 and vac.loc[0, "VALID"] == 0
    assert not ((vac["FLAG"].to_numpy()[1:] >> QUALITY_BITS["CHI2_HIGH"]) & 1).any()
    assert "data noise alone" in vac_column("CHISQ").description
    assert "emulator" in vac_column("CHISQ_EMU").description


def test_error_model_learns_from_valid_visits_only():
    """Stars whose visits are pinned at a fit bound (Δ = 0 between visits) must not pull
    the repeat-visit σ down: the catalogue's model equals the one fitted without them."""
    df, sig = simulate(1500, seed=7)
    rng = np.random.default_rng(0)
    stars = df["MANGAID"].unique()
    pinned = df["MANGAID"].isin(rng.choice(stars, len(stars) * 2 // 5, replace=False)).to_numpy()
    for k in LABELS:  # every visit of a pinned star sits on the same bound value
        df.loc[pinned, k] = df.loc[pinned].groupby("MANGAID")[k].transform("first")
    df.loc[pinned, "AT_BOUND"] = 1
    fits, visits = _split(df)
    vac, report = assemble_catalog(fits, visits, LABELS)
    clean, _, clean_report = calibrate_uncertainties(df[~pinned].reset_index(drop=True), LABELS)
    assert report["uncertainty"]["n_pairs_total"] == clean_report["n_pairs_total"]
    got = vac.loc[~pinned, "TEFF_ERR"].to_numpy(np.float64)
    np.testing.assert_allclose(got, clean["TEFF_REPEAT_ERR"].to_numpy(), rtol=1e-4)
    # the old behaviour: pairs from every STATUS 0 visit shrink σ well below the truth
    _, _, everything = calibrate_uncertainties(df, LABELS)
    assert everything["n_pairs_total"] > report["uncertainty"]["n_pairs_total"]
    ratio = np.median(got / sig["TEFF"][~pinned])
    assert 0.85 < ratio < 1.15, ratio
