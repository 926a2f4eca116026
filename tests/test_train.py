"""The training stage: per-source split, label-outlier rejection, validation helpers."""

from __future__ import annotations

import numpy as np
import pytest

from mastar_vac.emulator import TrainConfig
from mastar_vac.fit import FitConfig
from mastar_vac.reference import ReferenceSet
from mastar_vac.train import reference_split, train_reference_emulator
from mastar_vac.validate import degrade_to_snr, format_table1, label_residuals, median_snr
from mastar_vac.wavegrid import mastar_wavelength

from .toy import LABELS, toy_labels, toy_spectra


def _toy_reference(n: int, *, seed: int = 0, sn: float = 200.0) -> ReferenceSet:
    rng = np.random.default_rng(seed)
    lab = toy_labels(n, seed=seed)
    flux = toy_spectra(lab) + rng.normal(0, 1 / sn, (n, len(mastar_wavelength())))
    ivar = np.full(flux.shape, sn**2, np.float32)
    src = np.where(np.arange(n) < n - 40, "empirical", "synthetic")
    return ReferenceSet(LABELS, lab, flux.astype(np.float32), ivar, mastar_wavelength(),
                        np.array([f"s{i}" for i in range(n)]), src, np.ones(n, int), np.full(n, sn))


def test_split_per_source():
    ref = _toy_reference(440)
    s = reference_split(ref, TrainConfig())
    for name, frac in (("validation", 0.1), ("test", 0.1)):
        for src, total in (("empirical", 400), ("synthetic", 40)):
            assert (ref.source[s[name]] == src).sum() == round(frac * total)
    assert len(np.unique(np.concatenate(list(s.values())))) == 440


def test_mislabelled_stars_are_found_and_dropped():
    ref = _toy_reference(400, seed=3)
    truth = ref.labels.copy()
    # three stars with wrong catalogue labels (cf. MILES m0386: an A star catalogued at 5,538 K)
    cfg = TrainConfig(hidden=48, max_epochs=100, patience=40, seed=2)
    held = reference_split(ref, cfg)["validation"]
    held_bad = int(next(i for i in held if ref.source[i] == "empirical"))
    bad = [5, 77, 300, held_bad]  # one of them a held-out star: flagged, never removed
    for i in bad:
        ref.labels[i, 0] = 4300.0 if truth[i, 0] > 6500 else 8700.0
    ref.labels[380, 0] += 3000  # a synthetic spectrum is never an outlier
    out = train_reference_emulator(ref, train_config=cfg, fit_config=FitConfig(), outlier_chi2_ratio=4.0,
                                   progress=False)
    flagged = set(np.flatnonzero(out.outliers["outlier"].to_numpy()))
    assert set(bad) <= flagged
    assert len(flagged) <= len(bad) + 5  # a handful at most beyond the planted ones
    assert 380 not in flagged
    # validation stars are flagged but never removed: they were drawn before the cleaning
    in_val = out.outliers["validation"].to_numpy()
    removed = set(np.flatnonzero(out.outliers["removed"].to_numpy()))
    assert removed == {i for i in flagged if not in_val[i]}
    assert len(out.reference) == 400 - len(removed)
    assert out.reference.cut_report["label_outliers"] == len(removed)
    kept_ids = set(out.reference.ids[out.split["validation"]])
    assert set(ref.ids[in_val]) == kept_ids  # every held-out star is still held out
    assert held_bad in flagged and held_bad not in removed
    assert out.flagged.sum() == len(flagged) - len(removed)
    assert out.result.emulator.config["start_grid"]
    # the split survives the cleaning: still disjoint, validation never trained on
    s = out.split
    assert not set(s["validation"]) & set(s["train"])


def test_degrade_to_snr():
    rng = np.random.default_rng(0)
    flux = 1 + rng.normal(0, 0.005, (20, 3000))
    ivar = np.full(flux.shape, 1 / 0.005**2)
    ivar[:, :100] = 0
    f, iv, sn = degrade_to_snr(flux, ivar, 50.0, seed=1)
    np.testing.assert_allclose(sn, 50.0, rtol=0.02)
    resid = (f - 1)[:, 100:]
    assert np.std(resid) == pytest.approx(1 / 50, rel=0.05)  # the added noise is real, not just ivar
    assert (iv[:, :100] == 0).all()
    low = degrade_to_snr(flux, ivar / 100**2, 50.0)  # S/N 2 already: unchanged
    np.testing.assert_array_equal(low[0], flux)
    assert median_snr(flux, ivar)[0] == pytest.approx(200, rel=0.02)


def test_label_residuals_and_table():
    ref = np.array([[5000.0, 4.0, 0.0], [5200, 4.2, -0.1], [7000, 3.0, -0.5], [9000, 4.0, 0.1]])
    fit = ref + np.array([[50, 0.1, 0.05], [-50, -0.1, 0.0], [100, 0.0, 0.1], [2000, 0.2, 0.3]])
    r = label_residuals(fit, ref, LABELS)
    assert r["Teff < 6000 K"]["n"] == 2 and r["Teff < 6000 K"]["TEFF"]["offset"] == 0
    assert r["Teff > 6000 K"]["frac_teff_off_15pct"] == 0.5
    text = format_table1(r, LABELS, "t")
    assert "paper MAD" in text and "169.5" in text


def test_failed_fits_are_catastrophic_not_dropped():
    ref = np.array([[5000.0, 4.0, 0.0], [5200, 4.2, -0.1], [9000, 4.0, 0.1], [10000, 4.2, 0.0], [12000, 4.0, 0.0]])
    fit = ref + np.array([[50, 0.1, 0.05], [-50, -0.1, 0.0], [270, 0.2, 0.3], [-300, 0.0, 0.1], [0, 0, 0]])
    fit[4] = np.nan  # the fitter gave up on this hot star (status BAD_FIT/ERROR: NaN labels)
    r = label_residuals(fit, ref, LABELS)
    hot = r["Teff > 8000 K"]
    assert hot["n"] == 2 and hot["n_failed"] == 1 and hot["n_total"] == 3
    assert hot["frac_catastrophic"] == pytest.approx(1 / 3)  # the failure counts, it is not left out
    assert hot["teff_rel_abs"] == pytest.approx(np.median([0.03, 0.03]))
    assert hot["teff_rel_offset"] == pytest.approx(np.median([0.03, -0.03]))
    assert r["all"]["n_failed"] == 1 and r["Teff < 6000 K"]["n_failed"] == 0
    text = format_table1(r, LABELS, "t")
    assert "Teff > 8000 K" in text and "failed" in text
