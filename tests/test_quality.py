"""Quality flags and VALID (paper §4.2)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mastar_vac.emulator import Emulator
from mastar_vac.fit import STATUS
from mastar_vac.quality import (
    QUALITY_BITS,
    QualityConfig,
    describe_bits,
    flag_counts,
    flag_names,
    quality_flags,
    training_range_from_emulator,
)

LABELS = ["TEFF", "LOGG", "FE_H"]
RANGE = (np.array([3500.0, 0.0, -2.5]), np.array([20000.0, 5.0, 0.5]))


def row(**kw) -> dict:
    """A clean visit; keywords override."""
    r = {"MANGAID": "1-1", "PLATE": 9000, "IFUDESIGN": "3701", "MJD": 57000, "S2N": 80.0, "MJDQUAL": 0,
         "TEFF": 5500.0, "LOGG": 4.2, "FE_H": -0.2, "TEFF_ERR": 20.0, "LOGG_ERR": 0.05, "FE_H_ERR": 0.03,
         "CHISQ_RED": 1.5, "DOF": 3000, "N_ITER": 12, "STATUS": STATUS["OK"], "AT_BOUND": 0}
    r.update(kw)
    return r


def flags_of(*rows: dict, config: QualityConfig = QualityConfig(), training_range=RANGE):
    df = pd.DataFrame(list(rows))
    return quality_flags(df, LABELS, training_range=training_range, config=config)


def bit(name: str) -> int:
    return 1 << QUALITY_BITS[name]


def test_clean_row_is_valid_and_unflagged():
    flag, valid = flags_of(row())
    assert flag.dtype == np.int32 and valid.dtype == np.int16
    assert flag.tolist() == [0] and valid.tolist() == [1]


@pytest.mark.parametrize("kw, name, invalid", [
    ({"CHISQ_RED": 150.0}, "CHI2_HIGH", True),
    ({"STATUS": STATUS["MAX_ITER"]}, "NOT_CONVERGED", True),
    ({"AT_BOUND": 0b100}, "AT_BOUND", True),
    ({"TEFF": 25000.0}, "OUTSIDE_TRAINING", False),
    ({"FE_H": -2.8}, "OUTSIDE_TRAINING", False),
    ({"S2N": 10.0}, "LOW_SNR", False),
    ({"MJDQUAL": 1 << 8}, "EMISSION_LINE", False),
    ({"STATUS": STATUS["NO_DATA"], "TEFF": np.nan, "LOGG": np.nan, "FE_H": np.nan}, "NO_DATA", True),
    ({"STATUS": STATUS["BAD_FIT"], "TEFF": np.nan, "LOGG": np.nan, "FE_H": np.nan}, "FIT_FAILED", True),
    ({"STATUS": STATUS["ERROR"], "TEFF": np.nan, "LOGG": np.nan, "FE_H": np.nan}, "FIT_FAILED", True),
    ({"STATUS": STATUS["NONFINITE"], "TEFF": np.nan, "LOGG": np.nan, "FE_H": np.nan}, "FIT_FAILED", True),
    ({"MJDQUAL": 1 << 1}, "MASTAR_QUAL", False),
    ({"MJDQUAL": 1 << 7}, "MASTAR_QUAL", False),
])
def test_each_bit(kw, name, invalid):
    flag, valid = flags_of(row(**kw))
    assert flag_names(flag[0]) == [name]
    assert flag[0] == bit(name)
    assert valid[0] == (0 if invalid else 1)


def test_thresholds_are_strict_and_edges_tolerated():
    flag, _ = flags_of(row(CHISQ_RED=100.0), row(S2N=15.0), row(TEFF=20000.0 + 0.005 * 16500), row(S2N=14.99),
                       row(TEFF=20000.0 + 0.02 * 16500))
    assert flag.tolist() == [0, 0, 0, bit("LOW_SNR"), bit("OUTSIDE_TRAINING")]


def test_mastar_bits_not_in_mask_are_ignored():
    flag, valid = flags_of(row(MJDQUAL=(1 << 2) | (1 << 9) | (1 << 13)))
    assert flag[0] == 0 and valid[0] == 1


def test_bits_combine():
    flag, valid = flags_of(row(CHISQ_RED=300.0, S2N=5.0, MJDQUAL=(1 << 8) | (1 << 4), AT_BOUND=1))
    assert set(flag_names(flag[0])) == {"CHI2_HIGH", "LOW_SNR", "EMISSION_LINE", "MASTAR_QUAL", "AT_BOUND"}
    assert valid[0] == 0


def test_nan_and_failed_rows_are_flagged_not_raised():
    rows = [
        row(S2N=np.nan),  # unknown S/N → LOW_SNR
        row(CHISQ_RED=np.nan, AT_BOUND=np.nan, MJDQUAL=np.nan),  # unknown: nothing set
        row(STATUS=np.nan),  # unknown status → FIT_FAILED
        row(STATUS=99),
        row(TEFF=np.nan),  # claims OK but a label is NaN → FIT_FAILED
        row(STATUS=STATUS["ERROR"], TEFF=np.nan, LOGG=np.nan, FE_H=np.nan, CHISQ_RED=np.nan, S2N=np.nan),
    ]
    flag, valid = flags_of(*rows)
    assert len(flag) == len(rows) == len(valid)
    assert flag[0] == bit("LOW_SNR") and valid[0] == 1
    assert flag[1] == 0 and valid[1] == 1
    assert flag[2] == bit("FIT_FAILED") and valid[2] == 0
    assert flag[3] == bit("FIT_FAILED") and valid[3] == 0
    assert flag[4] == bit("FIT_FAILED") and valid[4] == 0
    assert flag[5] == bit("FIT_FAILED") | bit("LOW_SNR") and valid[5] == 0


def test_nan_labels_never_valid_even_if_not_invalidating():
    cfg = QualityConfig(invalidating=("CHI2_HIGH",))
    flag, valid = flags_of(row(STATUS=STATUS["BAD_FIT"], TEFF=np.nan, LOGG=np.nan, FE_H=np.nan),
                           row(STATUS=STATUS["MAX_ITER"]), config=cfg)
    assert valid.tolist() == [0, 1]


def test_configurable():
    r = [row(CHISQ_RED=50.0, S2N=25.0, MJDQUAL=1 << 2, TEFF=21000.0)]
    flag, valid = flags_of(*r)
    assert flag[0] == bit("OUTSIDE_TRAINING") and valid[0] == 1
    cfg = QualityConfig(chi2_max=20.0, low_snr=30.0, mastar_bad_bits=(2,), training_range_tolerance=0.1,
                        invalidating=("CHI2_HIGH", "LOW_SNR"))
    flag, valid = flags_of(*r, config=cfg)
    assert set(flag_names(flag[0])) == {"CHI2_HIGH", "LOW_SNR", "MASTAR_QUAL"}
    assert valid[0] == 0
    cfg = QualityConfig(invalidating=("EMISSION_LINE",))
    _, valid = flags_of(row(MJDQUAL=1 << 8), row(CHISQ_RED=1e4), config=cfg)
    assert valid.tolist() == [0, 1]
    _, valid = flags_of(row(MJDQUAL=1 << 3), config=QualityConfig(emission_line_bit=3,
                                                                  invalidating=("EMISSION_LINE",)))
    assert valid.tolist() == [0]


def test_training_range_optional_and_partial():
    flag, _ = flags_of(row(TEFF=1e5), training_range=None)
    assert flag[0] == 0
    lo, hi = RANGE[0].copy(), RANGE[1].copy()
    lo[0] = hi[0] = np.nan  # Teff not checked
    flag, _ = flags_of(row(TEFF=1e5), row(LOGG=6.0), training_range=(lo, hi))
    assert flag.tolist() == [0, bit("OUTSIDE_TRAINING")]
    with pytest.raises(ValueError, match="expected 3"):
        flags_of(row(), training_range=(lo[:2], hi[:2]))


def test_training_range_from_emulator_physical_units():
    L, h, P = 3, 2, 4
    rng = np.random.default_rng(0)
    w = {"w0": rng.normal(size=(h, L)), "b0": np.zeros(h), "w1": rng.normal(size=(h, h)), "b1": np.zeros(h),
         "w2": rng.normal(size=(P, h)), "b2": np.zeros(P)}
    emu = Emulator(label_names=["FE_H", "TEFF", "LOGG"], x_min=np.array([-2.0, np.log10(3500), 0.5]),
                   x_max=np.array([0.5, np.log10(30000), 5.0]), wave=np.linspace(4000, 5000, P), weights=w,
                   log_labels=("TEFF",))
    lo, hi = training_range_from_emulator(emu, ["TEFF", "LOGG", "FE_H", "ALPHA_FE"])
    np.testing.assert_allclose(lo[:3], [3500.0, 0.5, -2.0])
    np.testing.assert_allclose(hi[:3], [30000.0, 5.0, 0.5])
    assert np.isnan(lo[3]) and np.isnan(hi[3])


def test_missing_columns_named():
    df = pd.DataFrame([row()]).drop(columns=["MJDQUAL", "CHISQ_RED"])
    with pytest.raises(KeyError, match=r"MJDQUAL"):
        quality_flags(df, LABELS)


def test_vectorized_and_order_preserved():
    rng = np.random.default_rng(3)
    n = 20000
    df = pd.DataFrame([row()] * n)
    df["S2N"] = rng.uniform(1, 100, n)
    df["CHISQ_RED"] = rng.uniform(0, 200, n)
    flag, valid = quality_flags(df, LABELS, training_range=RANGE)
    np.testing.assert_array_equal((flag & bit("LOW_SNR")) != 0, df.S2N < 15)
    np.testing.assert_array_equal(valid == 1, df.CHISQ_RED <= 100)


def test_config_validation():
    with pytest.raises(ValueError, match="unknown flag"):
        QualityConfig(invalidating=("CHI2_HIGH", "BOGUS"))
    with pytest.raises(ValueError, match="bits"):
        QualityConfig(mastar_bad_bits=(70,))
    with pytest.raises(ValueError, match="tolerance"):
        QualityConfig(training_range_tolerance=-0.1)


def test_describe_and_counts():
    d = describe_bits()
    assert [b for b, _, _ in d] == sorted(QUALITY_BITS.values())
    assert {n for _, n, _ in d} == set(QUALITY_BITS)
    text = dict((n, t) for _, n, t in d)
    assert "100" in text["CHI2_HIGH"] and "VALID=0" in text["CHI2_HIGH"]
    assert "VALID=0" not in text["LOW_SNR"]
    assert "SKYSUBBAD" in text["MASTAR_QUAL"] and "MANUAL" in text["MASTAR_QUAL"]
    assert all(len(f"FLAGBIT{b}") <= 8 and len(f"{n}: {t}") <= 68 for b, n, t in d)  # fits one header card
    assert "chi2 > 20" in dict((n, t) for _, n, t in describe_bits(QualityConfig(chi2_max=20)))["CHI2_HIGH"]
    flag, _ = flags_of(row(S2N=5.0), row(S2N=5.0, CHISQ_RED=500.0), row())
    c = flag_counts(flag)
    assert list(c) == [n for _, n, _ in d]
    assert c["LOW_SNR"] == 2 and c["CHI2_HIGH"] == 1 and c["FIT_FAILED"] == 0


def test_outside_coverage_finds_holes_inside_the_training_box():
    """A supergiant at 8,300 K, log g 1.5 lies inside the training box (Teff 3,500–30,000,
    log g 0.5–5) but far from every training star: flagged. A dwarf among them is not."""
    from mastar_vac.quality import coverage_distance

    L, h, P = 3, 2, 4
    rng = np.random.default_rng(0)
    w = {"w0": rng.normal(size=(h, L)), "b0": np.zeros(h), "w1": rng.normal(size=(h, h)), "b1": np.zeros(h),
         "w2": rng.normal(size=(P, h)), "b2": np.zeros(P)}
    emu = Emulator(label_names=["TEFF", "LOGG", "FE_H"], x_min=np.array([np.log10(3500), 0.5, -2.0]),
                   x_max=np.array([np.log10(30000), 5.0, 0.5]), wave=np.linspace(4000, 5000, P), weights=w,
                   log_labels=("TEFF",))
    cool_giants = np.column_stack([rng.uniform(3500, 5500, 200), rng.uniform(0.5, 3.0, 200), rng.uniform(-2, 0.5, 200)])
    hot_dwarfs = np.column_stack([rng.uniform(7000, 30000, 200), rng.uniform(3.8, 5.0, 200), rng.uniform(-1, 0.5, 200)])
    emu.config["start_grid"] = np.vstack([cool_giants, hot_dwarfs]).tolist()
    fitted = np.array([[8300.0, 1.5, 0.0], [12000.0, 4.3, 0.0], [np.nan, 4.0, 0.0]])
    d = coverage_distance(emu, fitted, k=3)
    assert d[0] > 0.1 > d[1] and np.isnan(d[2])
    flag, valid = flags_of(row(TEFF=8300.0, LOGG=1.5, FE_H=0.0, COVERAGE_DIST=d[0]),
                           row(TEFF=12000.0, LOGG=4.3, FE_H=0.0, COVERAGE_DIST=d[1]))
    assert flag.tolist() == [bit("OUTSIDE_COVERAGE"), 0]
    assert valid.tolist() == [1, 1]  # a warning, not an invalidating bit by default
    emu.config["start_grid"] = []
    assert np.isnan(coverage_distance(emu, fitted)).all()  # no training labels: nothing is claimed
