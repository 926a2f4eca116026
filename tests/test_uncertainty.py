"""Repeat-visit error model (paper §4.4) on simulated catalogues with a known σ."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pandas as pd
import pytest

from mastar_vac.uncertainty import (
    PAIR_FACTOR,
    ErrorModel,
    UncertaintyConfig,
    build_pairs,
    calibrate_uncertainties,
    calibration_widths,
    fit_error_model,
    format_precision_table,
    precision_table,
    quadratic_terms,
    t_consistency,
)

LABELS = ["TEFF", "LOGG", "FE_H"]


def true_sigma(teff, logg, feh, snr):
    """The simulated per-visit σ: multiplicative in S/N and Teff, quadratic in ln for log g."""
    s = 100.0 / snr
    return {
        "TEFF": 30.0 * s * (teff / 5000.0),
        "LOGG": 0.05 * s * np.exp(0.1 * (logg - 3.0) ** 2),
        "FE_H": 0.03 * s * np.exp(-0.3 * feh),
    }


def simulate(n_star: int = 3000, *, seed: int = 1, n_single: int = 0, outlier_frac: float = 0.0
             ) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """A fit table: 2–4 visits per star (plus ``n_single`` one-visit stars), labels drawn
    around the truth with the σ of :func:`true_sigma`. Returns it and the true σ per visit."""
    rng = np.random.default_rng(seed)
    nv = np.concatenate([rng.integers(2, 5, n_star), np.ones(n_single, int)])
    star = np.repeat(np.arange(len(nv)), nv)
    n = len(star)
    teff = 10 ** rng.uniform(np.log10(3500), np.log10(25000), len(nv))[star]
    logg = rng.uniform(1.0, 5.0, len(nv))[star]
    feh = rng.uniform(-2.0, 0.5, len(nv))[star]
    snr = 10 ** rng.uniform(np.log10(15), np.log10(300), n)
    sig = true_sigma(teff, logg, feh, snr)
    truth = {"TEFF": teff, "LOGG": logg, "FE_H": feh}
    df = pd.DataFrame({
        "MANGAID": np.array([f"1-{i:06d}" for i in star]),
        "PLATE": 9000 + np.arange(n) % 7,
        "IFUDESIGN": np.array([str(3701 + i % 5) for i in range(n)]),
        "MJD": 57000 + np.arange(n),
        "S2N": snr,
        "MJDQUAL": np.zeros(n, int),
    })
    for k in LABELS:
        x = truth[k] + sig[k] * rng.standard_normal(n)
        if outlier_frac:
            bad = rng.random(n) < outlier_frac
            x[bad] += 10 * sig[k][bad] * rng.choice([-1, 1], bad.sum())  # a fit in another minimum
        df[k] = x
        df[f"{k}_ERR"] = 0.5 * sig[k]  # formal errors that underestimate, as real ones do
    df["CHISQ_RED"] = 1.0
    df["DOF"] = 3000
    df["N_ITER"] = 10
    df["STATUS"] = 0
    df["AT_BOUND"] = 0
    return df, sig


@pytest.fixture(scope="module")
def catalogue():
    return simulate(3000, seed=1, n_single=300)


@pytest.fixture(scope="module")
def calibrated(catalogue):
    df, sig = catalogue
    out, model, report = calibrate_uncertainties(df, LABELS, UncertaintyConfig())
    return df, sig, out, model, report


def _ratio_stats(pred: np.ndarray, true: np.ndarray) -> tuple[float, ...]:
    return tuple(float(v) for v in np.quantile(pred / true, [0.5, 0.05, 0.1, 0.9, 0.95]))


def test_recovers_sigma_and_calibration(calibrated):
    df, sig, out, model, report = calibrated
    for k in LABELS:
        # σ predicted from each visit's own (noisy) labels and S/N against the true σ:
        # the spread is the model's statistical error plus the label noise in the features
        med, q05, q10, q90, q95 = _ratio_stats(out[f"{k}_REPEAT_ERR"].to_numpy(), sig[k])
        logging.getLogger(__name__).info("%s: model/true median %.3f, 10-90%% [%.3f, %.3f], 5-95%% [%.3f, %.3f]",
                                         k, med, q10, q90, q05, q95)
        assert abs(med - 1) < 0.03, (k, med)
        assert 0.9 < q10 and q90 < 1.1, (k, q10, q90)
        assert 0.85 < q05 and q95 < 1.15, (k, q05, q95)
        assert 0.9 <= report["calibration_width"][k] <= 1.1, (k, report["calibration_width"][k])
        assert model.labels[k].kind == "quadratic"
    assert report["n_pairs_total"] > 8000
    json.dumps(report)  # the report is JSON-able


def test_naive_log_least_squares_is_biased(calibrated):
    """Least squares on ln((√π/2)|Δ|) is biased low: E[ln|Z|] = −(γ + ln 2)/2, so its
    σ is e^{-0.41} ≈ 0.66 of the pair's rms σ — the reason the model is fitted by
    maximum likelihood of the differences. (Per visit the naive model looks less biased,
    ≈ 0.8, only because with unequal S/N in a pair the rms σ exceeds the σ at the
    geometric-mean S/N it is evaluated at: two errors that partly cancel.)"""
    df, sig, out, model, report = calibrated
    pairs = build_pairs(df, LABELS)
    s1 = pairs[[f"{c}_1" for c in LABELS + ["S2N"]]].set_axis(LABELS + ["S2N"], axis=1)
    s2 = pairs[[f"{c}_2" for c in LABELS + ["S2N"]]].set_axis(LABELS + ["S2N"], axis=1)
    # pair features as in the paper: mean labels, geometric-mean S/N
    feat = pd.DataFrame({"TEFF": 0.5 * (s1.TEFF + s2.TEFF), "LOGG": 0.5 * (s1.LOGG + s2.LOGG),
                         "FE_H": 0.5 * (s1.FE_H + s2.FE_H), "S2N": np.sqrt(s1.S2N * s2.S2N)})
    phi = quadratic_terms(model.standardize(model.raw_features(feat)))
    y = np.log(pairs["TEFF_PAIR_SIGMA"].to_numpy())
    coef, *_ = np.linalg.lstsq(phi, y, rcond=None)
    naive_pair = np.exp(phi @ coef)
    rms_true = np.sqrt(0.5 * (sig["TEFF"][pairs.ROW_1] ** 2 + sig["TEFF"][pairs.ROW_2] ** 2))
    ratio = float(np.exp(np.mean(np.log(naive_pair / rms_true))))
    expected = math.sqrt(math.pi / 2) * math.exp(-(np.euler_gamma + math.log(2)) / 2)  # 0.664
    assert ratio == pytest.approx(expected, rel=0.03)
    naive_visit = np.exp(quadratic_terms(model.standardize(model.raw_features(df))) @ coef)
    assert float(np.median(naive_visit / sig["TEFF"])) < 0.85
    # the ML fit is not biased, on the pairs nor per visit
    ml_pair = np.sqrt(0.5 * (out["TEFF_REPEAT_ERR"].to_numpy()[pairs.ROW_1] ** 2
                             + out["TEFF_REPEAT_ERR"].to_numpy()[pairs.ROW_2] ** 2))
    assert float(np.exp(np.mean(np.log(ml_pair / rms_true)))) == pytest.approx(1.0, abs=0.03)
    assert float(np.median(out["TEFF_REPEAT_ERR"] / sig["TEFF"])) == pytest.approx(1.0, abs=0.03)


def test_pairs_only_within_stars_and_single_visits_give_none(catalogue):
    df, _ = catalogue
    pairs = build_pairs(df, LABELS)
    counts = df.groupby("MANGAID").size()
    expected = int((counts * (counts - 1) // 2).sum())
    assert len(pairs) == expected
    assert (df["MANGAID"].to_numpy()[pairs.ROW_1] == df["MANGAID"].to_numpy()[pairs.ROW_2]).all()
    singles = set(counts.index[counts == 1])
    assert singles and not singles & set(pairs.MANGAID)
    assert (pairs.ROW_1 != pairs.ROW_2).all()
    d = pairs["TEFF_1"] - pairs["TEFF_2"]
    np.testing.assert_allclose(pairs["TEFF_PAIR_SIGMA"], PAIR_FACTOR * d.abs())


def test_single_visit_stars_still_get_errors(calibrated):
    df, sig, out, model, report = calibrated
    counts = df.groupby("MANGAID")["MANGAID"].transform("size")
    single = (counts == 1).to_numpy()
    assert single.sum() == 300
    assert np.isfinite(out.loc[single, "TEFF_REPEAT_ERR"]).all()


def test_failed_fits_excluded_and_nan_only_where_labels_nan():
    df, sig = simulate(800, seed=3)
    rng = np.random.default_rng(0)
    failed = rng.random(len(df)) < 0.1
    maxit = ~failed & (rng.random(len(df)) < 0.1)
    df.loc[failed, "STATUS"] = 3
    df.loc[failed, LABELS] = np.nan
    df.loc[maxit, "STATUS"] = 1  # labels kept, but not used in pairs
    out, model, report = calibrate_uncertainties(df, LABELS, UncertaintyConfig())
    pairs = build_pairs(df, LABELS)
    used = set(pairs.ROW_1) | set(pairs.ROW_2)
    assert not used & set(np.flatnonzero(failed | maxit))
    for k in LABELS:
        e = out[f"{k}_REPEAT_ERR"].to_numpy()
        assert np.isnan(e[failed]).all()
        assert np.isfinite(e[~failed]).all()  # including the MAX_ITER visits


def test_missing_snr_gives_nan_not_error():
    df, _ = simulate(300, seed=4)
    df.loc[5, "S2N"] = np.nan
    out, model, _ = calibrate_uncertainties(df, LABELS)
    assert np.isnan(out.loc[5, "TEFF_REPEAT_ERR"])
    assert np.isfinite(out.drop(index=5)["TEFF_REPEAT_ERR"]).all()


def test_few_pairs_fall_back_to_constant(caplog):
    df, sig = simulate(12, seed=5)  # ~40 pairs < 2 per coefficient of the quadratic
    df = df[df.MANGAID.isin(sorted(df.MANGAID.unique())[:8])]
    with caplog.at_level(logging.WARNING, logger="mastar_vac.uncertainty"):
        out, model, report = calibrate_uncertainties(df, LABELS, UncertaintyConfig(min_pairs=30))
    assert all(model.labels[k].kind == "constant" for k in LABELS)
    assert "constant sigma" in caplog.text and "TEFF" in caplog.text
    e = out["TEFF_REPEAT_ERR"].to_numpy()
    assert np.isfinite(e).all() and np.ptp(e) == 0


def test_very_few_pairs_fall_back_to_formal(caplog):
    df, sig = simulate(2, seed=6)
    df = df[df.MANGAID == df.MANGAID.iloc[0]].head(2)  # one pair
    with caplog.at_level(logging.WARNING, logger="mastar_vac.uncertainty"):
        out, model, report = calibrate_uncertainties(df, LABELS)
    assert all(model.labels[k].kind == "formal" for k in LABELS)
    assert "formal fit errors" in caplog.text
    floor = UncertaintyConfig().floor_for("TEFF")
    np.testing.assert_allclose(out["TEFF_REPEAT_ERR"], np.sqrt(df["TEFF_ERR"] ** 2 + floor**2))


def test_no_pairs_at_all():
    df, _ = simulate(0, seed=7, n_single=20)
    out, model, report = calibrate_uncertainties(df, LABELS)
    assert report["n_pairs_total"] == 0
    assert all(m.kind == "formal" for m in model.labels.values())
    assert report["calibration_width"]["TEFF"] is None  # NaN → null in the JSON-able report


def test_constant_model_is_ml_over_pairs():
    """With a constant true σ the constant fallback returns it (not the biased log mean)."""
    rng = np.random.default_rng(8)
    n = 2000
    d = 50.0 * math.sqrt(2) * rng.standard_normal(n)
    pairs = pd.DataFrame({"MANGAID": [f"s{i}" for i in range(n)], "ROW_1": np.arange(n), "ROW_2": np.arange(n),
                          "TEFF_1": 5000.0 + d, "TEFF_2": np.full(n, 5000.0), "S2N_1": 50.0, "S2N_2": 50.0,
                          "TEFF_DIFF": d, "TEFF_PAIR_SIGMA": PAIR_FACTOR * np.abs(d)})
    cfg = UncertaintyConfig(min_pairs=10**6, features=("TEFF", "S2N"))
    model = fit_error_model(pairs, ["TEFF"], cfg)
    assert model.labels["TEFF"].kind == "constant"
    sigma = model.predict_label(pd.DataFrame({"TEFF": [5000.0], "S2N": [50.0]}), "TEFF")[0]
    assert sigma == pytest.approx(50.0, rel=0.05)


def test_robust_to_outlier_pairs():
    """2% of visits 10σ off (≈5% of pairs): the default (t(5) + 5σ clipping) is unmoved;
    a Gaussian likelihood is pulled up, less so with clipping."""
    df, sig = simulate(2500, seed=9, outlier_frac=0.02)

    def bias(cfg: UncertaintyConfig) -> tuple[dict[str, float], dict[str, float]]:
        out, _, report = calibrate_uncertainties(df, LABELS, cfg)
        return ({k: float(np.median(out[f"{k}_REPEAT_ERR"] / sig[k])) for k in LABELS}, report["calibration_width"])

    med, width = bias(UncertaintyConfig())
    for k in LABELS:
        assert med[k] == pytest.approx(1.0, abs=0.04), (k, med[k])
        assert 0.9 <= width[k] <= 1.1, (k, width[k])
    med_clip, _ = bias(UncertaintyConfig(likelihood="gaussian", clip_sigma=5))
    med_raw, _ = bias(UncertaintyConfig(likelihood="gaussian", clip_sigma=0))
    for k in LABELS:
        assert med_raw[k] > 1.3, (k, med_raw[k])
        assert med_clip[k] < 1.1 and med_clip[k] < med_raw[k], (k, med_clip[k])


def test_t_consistency():
    # the t(5) ML scale of N(0, 1) data (scipy.stats.t.fit on 4e5 normal draws: 0.858)
    assert t_consistency(5.0) == pytest.approx(0.857, abs=0.002)
    assert t_consistency(1e6) == pytest.approx(1.0, abs=1e-4)
    assert t_consistency(float("inf")) == 1.0


def test_floor_and_feature_clipping(calibrated):
    df, sig, out, model, report = calibrated
    probe = pd.DataFrame({"TEFF": [5000.0, 5000.0, 5000.0], "LOGG": [4.0, 4.0, 4.0], "FE_H": [0.0, 0.0, 0.0],
                          "S2N": [300.0, 1e5, 1e9]})
    e = model.predict_label(probe, "TEFF")
    # beyond the S/N range of the pairs the quadratic is not extrapolated
    assert e[1] == pytest.approx(e[2]) and e[1] <= e[0]
    assert (e >= model.labels["TEFF"].floor).all()
    cfg = UncertaintyConfig(floor={"TEFF": 500.0})
    assert cfg.floor["LOGG"] == 0.001  # the others keep their defaults
    _, m2, _ = calibrate_uncertainties(df, LABELS, cfg)
    assert (m2.predict_label(probe, "TEFF") >= 500.0).all()


def test_deterministic_and_json_round_trip(catalogue):
    df, _ = catalogue
    out1, m1, r1 = calibrate_uncertainties(df, LABELS)
    out2, m2, r2 = calibrate_uncertainties(df.copy(), LABELS)
    for k in LABELS:
        np.testing.assert_array_equal(out1[f"{k}_REPEAT_ERR"], out2[f"{k}_REPEAT_ERR"])
    assert json.dumps(r1, sort_keys=True) == json.dumps(r2, sort_keys=True)
    m3 = ErrorModel.from_dict(json.loads(json.dumps(m1.to_dict())))
    for k in LABELS:
        np.testing.assert_allclose(m3.predict_label(df, k), out1[f"{k}_REPEAT_ERR"], rtol=1e-12)
    with pytest.raises(ValueError, match="missing key"):
        ErrorModel.from_dict({"features": []})


def test_calibration_width_detects_wrong_model(calibrated):
    df, sig, out, model, report = calibrated
    pairs = build_pairs(df, LABELS)
    d = model.to_dict()
    d["labels"]["TEFF"]["coef"][0] -= math.log(2.0)  # σ halved
    w = calibration_widths(pairs, ErrorModel.from_dict(d))
    assert w["TEFF"] == pytest.approx(2.0, rel=0.1)


def test_precision_table(calibrated):
    df, sig, out, model, report = calibrated
    t = precision_table(out, LABELS)
    assert list(t.columns) == ["TEFF_LO", "TEFF_HI", "LABEL", "N_VISITS", "N_PAIRS", "FORMAL_ERR", "REPEAT_PREC",
                               "REPEAT_PREC_MEAN", "MODEL_ERR"]
    assert len(t) == 5 * len(LABELS)
    assert t.groupby("LABEL").N_VISITS.sum()["TEFF"] == len(df)  # every visit in 3000–∞ falls in one bin
    assert t.groupby("LABEL").N_PAIRS.sum()["TEFF"] == report["n_pairs_total"]
    teff = t[(t.LABEL == "TEFF") & (t.N_PAIRS > 0)]
    assert (teff.MODEL_ERR > teff.FORMAL_ERR).all()  # the simulated formal errors are half the truth
    assert teff.MODEL_ERR.is_monotonic_increasing  # the simulated σ grows with Teff
    # the mean of (√π/2)|Δ| is unbiased for the pairs' rms σ, √((σ₁² + σ₂²)/2): compare
    # it per bin with the model's (a median per visit would not do: σ varies with S/N)
    pairs = build_pairs(out, LABELS, extra_columns=("S2N", "TEFF_REPEAT_ERR"))
    rms = np.sqrt(0.5 * (pairs.TEFF_REPEAT_ERR_1**2 + pairs.TEFF_REPEAT_ERR_2**2))
    bins = pd.cut(0.5 * (pairs.TEFF_1 + pairs.TEFF_2), [3000, 5000, 8000, 12000, 20000, np.inf], right=False)
    model_rms = rms.groupby(bins, observed=False).mean().to_numpy()
    np.testing.assert_allclose(teff.REPEAT_PREC_MEAN.to_numpy(), model_rms, rtol=0.08)
    text = format_precision_table(t)
    assert "20000-inf" in text and "FE_H" in text
    assert report["precision_table"][0]["LABEL"] == "TEFF"


def test_five_labels_and_m_h_alias():
    df, sig = simulate(600, seed=10)
    rng = np.random.default_rng(1)
    df = df.rename(columns={"FE_H": "M_H", "FE_H_ERR": "M_H_ERR"})
    for k, s in (("ALPHA_M", 0.03), ("LOG10_VMICRO", 0.05)):
        df[k] = rng.normal(0.1, 0.05, len(df)).round(3) + s * rng.standard_normal(len(df))
        df[f"{k}_ERR"] = s
    labels = ["TEFF", "LOGG", "M_H", "ALPHA_M", "LOG10_VMICRO"]
    out, model, report = calibrate_uncertainties(df, labels)
    assert model.features == ("TEFF", "LOGG", "M_H", "S2N")
    assert all(np.isfinite(out[f"{k}_REPEAT_ERR"]).all() for k in labels)


def test_config_validation():
    with pytest.raises(ValueError, match="likelihood"):
        UncertaintyConfig(likelihood="cauchy")
    with pytest.raises(ValueError, match="floor"):
        UncertaintyConfig(floor={"TEFF": -1.0})
    with pytest.raises(ValueError, match="teff_bins"):
        UncertaintyConfig(teff_bins=((5000.0, 3000.0),))
    with pytest.raises(ValueError, match="min_pairs"):
        UncertaintyConfig(min_pairs=2, min_pairs_constant=5)
    with pytest.raises(KeyError, match="SNR"):
        df, _ = simulate(50, seed=2)
        calibrate_uncertainties(df, LABELS, UncertaintyConfig(features=("TEFF", "SNR"), log_features=()))
