"""Quality flags and VALID for every fitted visit (paper §4.2).

The paper marks a visit invalid when its reduced χ² exceeds 100, the fit did not
converge, or a label sits on a fit bound. Here every such condition — and a few more a
user of the catalogue wants to cut on (S/N, emission lines, MaStar's own quality bits,
extrapolation beyond the emulator's training labels) — is a bit of ``FLAG``, and
``VALID`` = 0 when any of the *invalidating* bits (configurable) is set. Nothing is
dropped: every input row gets a flag and a VALID value, so the catalogue keeps one row
per visit and users can make their own cuts.

Missing values never raise: a NaN S/N counts as low S/N (it cannot be vouched for), a
NaN χ², AT_BOUND or MJDQUAL sets nothing, an unknown or NaN STATUS is FIT_FAILED, and
labels that are not finite on a row whose STATUS claims success are FIT_FAILED too. A
row whose labels are not all finite is never VALID, whatever ``invalidating`` says.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from .fit import STATUS

__all__ = [
    "QUALITY_BITS",
    "QualityConfig",
    "quality_flags",
    "describe_bits",
    "flag_counts",
    "flag_names",
    "training_range_from_emulator",
    "coverage_distance",
]

log = logging.getLogger(__name__)

#: FLAG bits, name → bit. The order is part of the data model (FLAGBITn header cards).
QUALITY_BITS: dict[str, int] = {
    "CHI2_HIGH": 0,
    "NOT_CONVERGED": 1,
    "AT_BOUND": 2,
    "OUTSIDE_TRAINING": 3,
    "LOW_SNR": 4,
    "EMISSION_LINE": 5,
    "NO_DATA": 6,
    "FIT_FAILED": 7,
    "MASTAR_QUAL": 8,
    "OUTSIDE_COVERAGE": 9,
}

# MASTAR_QUAL bit names (datamodels.md §1.5), for the descriptions
_MASTAR_QUAL_NAMES = {0: "NODATA", 1: "SKYSUBBAD", 2: "HIGHSCAT", 3: "BADFLUX", 4: "LOWCOV", 5: "POORCAL",
                      6: "BADHELIORV", 7: "MANUAL", 8: "EMLINE", 9: "LOWSN", 10: "MULTIFIBER", 11: "BLOWTORCH",
                      12: "SEVEREBT", 13: "UPTURNRISK", 14: "UPTURNMANUAL", 30: "CRITICAL"}

_FAILED_STATUS = (STATUS["BAD_FIT"], STATUS["ERROR"], STATUS["NONFINITE"])


@dataclass(frozen=True)
class QualityConfig:
    """The ``[quality]`` section of a run configuration."""

    chi2_max: float = 100.0  # reduced χ² above this → CHI2_HIGH (paper §4.2)
    low_snr: float = 15.0  # S/N per pixel below this → LOW_SNR (MaStar's own LOWSN cut is ≤ 15)
    # OUTSIDE_TRAINING when a label is beyond the training range by more than this
    # fraction of the range's span (0.01 = 1%): a fit a hair past the edge is not an extrapolation
    training_range_tolerance: float = 0.01
    # OUTSIDE_COVERAGE when the fitted labels are farther than this from the
    # `coverage_neighbours`-th nearest training star, in the emulator's scaled label space
    # (each label's training span = 1; Teff in log10 when the emulator models log Teff).
    # Inside the training *box* there are holes — supergiants at 8–10 kK, metal-poor hot
    # stars — where the network extrapolates as freely as outside it. 0.1 is a tenth of
    # each span: about 0.65 dex of log g or 0.4 dex of [Fe/H] from the third neighbour.
    coverage_radius: float = 0.1
    coverage_neighbours: int = 3
    mastar_bad_bits: tuple[int, ...] = (1, 4, 5, 6, 7)  # SKYSUBBAD LOWCOV POORCAL BADHELIORV MANUAL
    emission_line_bit: int = 8  # MASTAR_QUAL EMLINE
    invalidating: tuple[str, ...] = ("CHI2_HIGH", "NOT_CONVERGED", "AT_BOUND", "NO_DATA", "FIT_FAILED")
    snr_column: str = "S2N"

    def __post_init__(self) -> None:
        unknown = [n for n in self.invalidating if n not in QUALITY_BITS]
        if unknown:
            raise ValueError(f"quality.invalidating: unknown flag name(s) {unknown}; known: {list(QUALITY_BITS)}")
        bad_bits = [b for b in (*self.mastar_bad_bits, self.emission_line_bit) if not 0 <= int(b) < 63]
        if bad_bits:
            raise ValueError(f"quality: MASTAR_QUAL bits must be in [0, 62], got {bad_bits}")
        if not self.training_range_tolerance >= 0:
            raise ValueError(f"quality.training_range_tolerance must be >= 0, got {self.training_range_tolerance}")
        if not self.coverage_radius > 0 or self.coverage_neighbours < 1:
            raise ValueError(f"quality.coverage_radius must be > 0 and coverage_neighbours >= 1, got "
                             f"{self.coverage_radius}, {self.coverage_neighbours}")
        if not self.chi2_max > 0:
            raise ValueError(f"quality.chi2_max must be > 0, got {self.chi2_max}")

    @property
    def mastar_bad_mask(self) -> int:
        return int(sum(1 << int(b) for b in set(self.mastar_bad_bits)))

    @property
    def invalidating_mask(self) -> int:
        return int(sum(1 << QUALITY_BITS[n] for n in set(self.invalidating)))


def describe_bits(config: QualityConfig = QualityConfig()) -> list[tuple[int, str, str]]:
    """(bit, name, description) of every FLAG bit with the thresholds of ``config``, for
    the FLAGBITn header cards and the report. ``f"{name}: {description}"`` fits a FITS
    string value (≤ 68 characters) with the default config; each says whether the bit
    clears VALID."""
    bad = ",".join(_MASTAR_QUAL_NAMES.get(b, str(b)) for b in sorted(set(config.mastar_bad_bits)))
    text = {
        "CHI2_HIGH": f"reduced chi2 > {config.chi2_max:g}",
        "NOT_CONVERGED": "fit hit the iteration limit (STATUS 1)",
        "AT_BOUND": "a label is on a fit bound",
        "OUTSIDE_TRAINING": f"label beyond training range by > {config.training_range_tolerance:g} of span",
        "LOW_SNR": f"S/N per pixel < {config.low_snr:g} (or unknown)",
        "EMISSION_LINE": f"MASTAR_QUAL bit {config.emission_line_bit} (EMLINE) set",
        "NO_DATA": "too few usable pixels to fit (STATUS 2)",
        "FIT_FAILED": "bad fit, error or non-finite (STATUS 3-5)",
        "MASTAR_QUAL": f"MJDQUAL has {bad or 'no bits'}" if len(bad) <= 50 else
                       f"MJDQUAL bits {','.join(map(str, sorted(set(config.mastar_bad_bits))))}",
        "OUTSIDE_COVERAGE": f"no {config.coverage_neighbours} training stars within "
                            f"{config.coverage_radius:g} (scaled)",
    }
    inval = set(config.invalidating)
    return [(bit, name, text[name] + ("; VALID=0" if name in inval else ""))
            for name, bit in sorted(QUALITY_BITS.items(), key=lambda kv: kv[1])]


def flag_names(flag: int) -> list[str]:
    """The names of the bits set in one FLAG value."""
    return [n for n, b in sorted(QUALITY_BITS.items(), key=lambda kv: kv[1]) if int(flag) >> b & 1]


def flag_counts(flag: NDArray[np.integer] | Sequence[int]) -> dict[str, int]:
    """How many rows have each bit set (every bit listed, zeros included), in bit order."""
    f = np.asarray(flag, np.int64)
    return {n: int(((f >> b) & 1).sum()) for n, b in sorted(QUALITY_BITS.items(), key=lambda kv: kv[1])}


def training_range_from_emulator(emu: Any, label_names: Sequence[str]
                                 ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """The emulator's training label range in physical units, aligned with
    ``label_names``; NaN for a label the emulator does not have (it is then not checked).

    The scaling limits x_min/x_max are in the emulator's internal units (log10 for
    ``emu.log_labels``); ``untransform`` brings them back to physical units.
    """
    lo_all = np.asarray(emu.untransform(emu.x_min), np.float64)
    hi_all = np.asarray(emu.untransform(emu.x_max), np.float64)
    idx = {n: i for i, n in enumerate(emu.label_names)}
    lo = np.array([lo_all[idx[n]] if n in idx else np.nan for n in label_names])
    hi = np.array([hi_all[idx[n]] if n in idx else np.nan for n in label_names])
    return lo, hi


def coverage_distance(emu: Any, labels: NDArray, *, k: int = 3) -> NDArray[np.float64]:
    """Distance from each row of ``labels`` (physical units, the emulator's label order)
    to its ``k``-th nearest training star, in the emulator's scaled label space (each
    label's training span is 1). NaN for rows with a non-finite label, and for all rows
    when the emulator carries no training labels (``config["start_grid"]``).
    """
    from scipy.spatial import cKDTree

    labels = np.asarray(labels, np.float64).reshape(-1, emu.n_labels)
    train = np.asarray(emu.config.get("start_grid") or [], np.float64).reshape(-1, emu.n_labels)
    out = np.full(len(labels), np.nan)
    ok = np.isfinite(labels).all(axis=1)
    if not len(train) or not ok.any():
        return out
    k = min(int(k), len(train))
    d, _ = cKDTree(emu.scale(train)).query(emu.scale(labels[ok]), k=k)
    out[ok] = d if k == 1 else d[:, -1]
    return out


def _numeric(fits: pd.DataFrame, col: str) -> NDArray[np.float64]:
    return pd.to_numeric(fits[col], errors="coerce").to_numpy(np.float64)


def _int_bits(fits: pd.DataFrame, col: str) -> NDArray[np.int64]:
    """An integer bitmask column; NaN/missing → 0 (nothing known, nothing flagged)."""
    v = _numeric(fits, col)
    return np.where(np.isfinite(v), v, 0).astype(np.int64)


def quality_flags(fits: pd.DataFrame, label_names: Sequence[str], *,
                  training_range: tuple[Sequence[float], Sequence[float]] | None = None,
                  config: QualityConfig = QualityConfig()) -> tuple[NDArray[np.int32], NDArray[np.int16]]:
    """FLAG (int32) and VALID (int16) for every row of the fit table, in row order.

    ``fits`` needs STATUS, CHISQ_RED, AT_BOUND, MJDQUAL, the S/N column and the labels.
    ``training_range`` is (lo, hi) in physical units aligned with ``label_names`` (NaN:
    not checked), e.g. from :func:`training_range_from_emulator`; None skips
    OUTSIDE_TRAINING. An optional ``COVERAGE_DIST`` column (:func:`coverage_distance`)
    sets OUTSIDE_COVERAGE where it exceeds ``config.coverage_radius``.
    """
    label_names = list(label_names)
    need = ["STATUS", "CHISQ_RED", "AT_BOUND", "MJDQUAL", config.snr_column, *label_names]
    missing = [c for c in need if c not in fits.columns]
    if missing:
        raise KeyError(f"quality_flags: the fit table lacks column(s) {missing}; it has {list(fits.columns)}")
    n = len(fits)
    flag = np.zeros(n, np.int64)

    def setbit(name: str, cond: NDArray[np.bool_]) -> None:
        flag[cond] |= 1 << QUALITY_BITS[name]

    status = _numeric(fits, "STATUS")
    labels = fits[label_names].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64).reshape(n, len(label_names))
    finite = np.isfinite(labels).all(axis=1)
    with np.errstate(invalid="ignore"):
        setbit("CHI2_HIGH", _numeric(fits, "CHISQ_RED") > config.chi2_max)
        snr = _numeric(fits, config.snr_column)
        setbit("LOW_SNR", ~(snr >= config.low_snr))  # NaN S/N is flagged
    setbit("NOT_CONVERGED", status == STATUS["MAX_ITER"])
    setbit("AT_BOUND", _int_bits(fits, "AT_BOUND") != 0)
    setbit("NO_DATA", status == STATUS["NO_DATA"])
    known = np.isin(status, list(STATUS.values()))
    claims_ok = np.isin(status, (STATUS["OK"], STATUS["MAX_ITER"]))
    setbit("FIT_FAILED", np.isin(status, _FAILED_STATUS) | ~known | (claims_ok & ~finite))
    q = _int_bits(fits, "MJDQUAL")
    setbit("EMISSION_LINE", ((q >> config.emission_line_bit) & 1) == 1)
    setbit("MASTAR_QUAL", (q & config.mastar_bad_mask) != 0)

    if training_range is not None:
        lo = np.asarray(training_range[0], np.float64).reshape(-1)
        hi = np.asarray(training_range[1], np.float64).reshape(-1)
        if lo.shape != (len(label_names),) or hi.shape != (len(label_names),):
            raise ValueError(f"quality_flags: training_range has {lo.size}/{hi.size} values, expected "
                             f"{len(label_names)} (one per label {label_names})")
        tol = config.training_range_tolerance * (hi - lo)
        with np.errstate(invalid="ignore"):
            out = (labels < (lo - tol)[None, :]) | (labels > (hi + tol)[None, :])  # NaN label or range: False
        setbit("OUTSIDE_TRAINING", out.any(axis=1))

    if "COVERAGE_DIST" in fits.columns:
        with np.errstate(invalid="ignore"):
            setbit("OUTSIDE_COVERAGE", _numeric(fits, "COVERAGE_DIST") > config.coverage_radius)

    valid = ((flag & config.invalidating_mask) == 0) & finite
    counts = flag_counts(flag)
    log.info("quality: %d of %d visits valid; flags set: %s", int(valid.sum()), n,
             ", ".join(f"{k}={v}" for k, v in counts.items() if v) or "none")
    return flag.astype(np.int32), valid.astype(np.int16)
