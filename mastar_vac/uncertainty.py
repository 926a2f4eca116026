"""Empirical label uncertainties from repeat visits (paper §4.4).

The formal errors of the fit (from its covariance) only know about photon noise; the
emulator's imperfections, normalization and LSF mismatch add scatter they do not see.
Stars observed more than once measure the real scatter: for every pair of usable
visits of the same star the paper takes

    σ_pair = (√π/2)·|x₁ − x₂|,

which is an unbiased estimate of the per-visit σ when both visits share it (for
Δ ~ N(0, 2σ²), E|Δ| = 2σ/√π). It then models log σ as a quadratic function of
(Teff, log g, [Fe/H], S/N) so that every visit — including stars seen once — gets an
error from its own labels and S/N.

Why the coefficients are *not* fitted by least squares on log σ_pair
--------------------------------------------------------------------
σ_pair of one pair is (√π/2)·√2·σ·|Z| with Z ~ N(0, 1), and E[ln|Z|] = −(γ + ln 2)/2
≈ −0.635, so E[ln σ_pair] = ln σ + ln√(π/2) − 0.635 ≈ ln σ − 0.41: a least-squares
fit in log space underestimates σ by a factor ≈ 1.5 everywhere (and the log of a
near-zero |Δ| has huge leverage). Here the coefficients maximise the likelihood of the
pair *differences* themselves,

    Δ = x₁ − x₂ ~ N(0, σ(f₁)² + σ(f₂)²),

which is unbiased, lets the two visits of a pair have different S/N (and so different
σ), and keeps the √π/2 estimator for what it is good at: the per-pair precision in
the Table 3 analogue (:func:`precision_table`).

Robustness: real repeat pairs contain a few catastrophic pairs (a fit that fell into
another minimum). The default likelihood is a Student-t with ν = 5 whose scale is made
*Fisher-consistent at the Gaussian* (the t scale that Gaussian data would give is
s*(ν)·σ, with s*(5) ≈ 0.857, and the model is parametrised so that its σ is the Gaussian
σ). A t(5) alone still gives a 10σ outlier ~10% of a good pair's weight (σ +12% with 2%
bad visits in the tests), so after a first t fit on every pair, pairs beyond
``clip_sigma`` (5) model σ are dropped and the configured likelihood ("student_t" or
``"gaussian"``) is refitted until the kept set is stable.

Features
--------
Per visit: log10 Teff, log g, [Fe/H] (or [M/H] when that is the run's metallicity
label) and log10 S/N, standardized by the mean and standard deviation over the repeat
pairs (so the quadratic's coefficients are O(1) and the optimizer well conditioned);
log10 because the errors scale multiplicatively with Teff and with 1/S/N over a
factor ~10 in each. The model is a full quadratic with cross terms (15 coefficients
for 4 features) for ln σ.

In the likelihood, both visits of a pair use the *pair-mean* labels (they are the same
star: the mean is the better estimate of where it sits in label space) and *their
own* S/N (which genuinely differs between visits). :func:`ErrorModel.predict` uses each
visit's own labels and S/N. For the per-pair table the pair's features are the mean
labels and the geometric mean of the two S/N.

Before the quadratic is evaluated the standardized features are clipped to the range
seen in the pairs (per label), so the quadratic never extrapolates, and a floor is added
in quadrature (σ = √(exp(2·q) + floor²)) so that σ never collapses to zero.

Fallbacks: with fewer than ``min_pairs`` pairs (or fewer than two per coefficient) for a
label, a constant σ is fitted (same likelihood); with fewer than
``min_pairs_constant`` (5), the formal errors (with the floor) are reported. Both are
logged as warnings naming the label.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray
from scipy.stats import median_abs_deviation

__all__ = [
    "DEFAULT_FLOORS",
    "DEFAULT_TEFF_BINS",
    "PAIR_FACTOR",
    "UncertaintyConfig",
    "LabelErrorModel",
    "ErrorModel",
    "build_pairs",
    "quadratic_terms",
    "t_consistency",
    "fit_error_model",
    "calibration_widths",
    "precision_table",
    "format_precision_table",
    "calibrate_uncertainties",
]

log = logging.getLogger(__name__)

#: √π/2: σ = PAIR_FACTOR·|x₁ − x₂| is unbiased for the per-visit σ of a Gaussian pair.
PAIR_FACTOR = math.sqrt(math.pi) / 2.0

#: The smallest σ the model reports, added in quadrature, by label (physical units).
DEFAULT_FLOORS: dict[str, float] = {
    "TEFF": 1.0,
    "LOGG": 0.001,
    "FE_H": 0.001,
    "M_H": 0.001,
    "ALPHA_FE": 0.001,
    "ALPHA_M": 0.001,
    "LOG10_VMICRO": 0.001,
}

#: Teff bins of the Table 3 analogue (K); a visit is in [lo, hi).
DEFAULT_TEFF_BINS: tuple[tuple[float, float], ...] = (
    (3000.0, 5000.0), (5000.0, 8000.0), (8000.0, 12000.0), (12000.0, 20000.0), (20000.0, math.inf),
)

# a label feature absent from the run is replaced by its alias when that was fitted
_FEATURE_ALIASES: dict[str, tuple[str, ...]] = {"FE_H": ("M_H",), "M_H": ("FE_H",)}
_LIKELIHOODS = ("student_t", "gaussian")
_KINDS = ("quadratic", "constant", "formal")
_ETA_MAX = 60.0  # |ln σ| beyond which the optimizer's trial steps are clipped (exp(120) is still finite)


@dataclass(frozen=True)
class UncertaintyConfig:
    """The ``[uncertainty]`` section of a run configuration.

    ``floor`` names only the labels it changes; the others keep :data:`DEFAULT_FLOORS`
    (a label in neither gets a floor of 0).
    """

    min_pairs: int = 30  # below this (per label): constant σ instead of the quadratic
    min_pairs_constant: int = 5  # below this: the formal errors
    floor: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_FLOORS))
    likelihood: str = "student_t"  # "student_t" (robust, default) or "gaussian" (with clipping)
    nu: float = 5.0  # Student-t degrees of freedom
    clip_sigma: float = 5.0  # drop pairs beyond this many σ and refit (either likelihood); 0 = no clipping
    ridge: float = 1e-3  # L2 penalty on the non-constant coefficients (standardized features)
    features: tuple[str, ...] = ("TEFF", "LOGG", "FE_H", "S2N")
    log_features: tuple[str, ...] = ("TEFF", "S2N")  # features used as log10
    snr_column: str = "S2N"
    usable_status: tuple[int, ...] = (0,)  # fit STATUS values whose visits form pairs
    teff_bins: tuple[tuple[float, float], ...] = DEFAULT_TEFF_BINS
    max_iter: int = 2000  # optimizer iterations per label

    def __post_init__(self) -> None:
        merged = {**DEFAULT_FLOORS, **{str(k): float(v) for k, v in dict(self.floor).items()}}
        bad = {k: v for k, v in merged.items() if not (np.isfinite(v) and v >= 0)}
        if bad:
            raise ValueError(f"uncertainty.floor must be finite and >= 0, got {bad}")
        object.__setattr__(self, "floor", merged)
        if self.likelihood not in _LIKELIHOODS:
            raise ValueError(f"uncertainty.likelihood must be one of {list(_LIKELIHOODS)}, got {self.likelihood!r}")
        if not self.nu > 0:
            raise ValueError(f"uncertainty.nu must be > 0, got {self.nu}")
        if self.clip_sigma < 0:
            raise ValueError(f"uncertainty.clip_sigma must be >= 0 (0 disables clipping), got {self.clip_sigma}")
        if self.ridge < 0:
            raise ValueError(f"uncertainty.ridge must be >= 0, got {self.ridge}")
        if self.min_pairs_constant < 1 or self.min_pairs < self.min_pairs_constant:
            raise ValueError(f"uncertainty: need 1 <= min_pairs_constant ({self.min_pairs_constant}) "
                             f"<= min_pairs ({self.min_pairs})")
        if not self.usable_status:
            raise ValueError("uncertainty.usable_status must name at least one fit STATUS")
        unknown_log = set(self.log_features) - set(self.features)
        if unknown_log:
            raise ValueError(f"uncertainty.log_features {sorted(unknown_log)} are not in features "
                             f"{list(self.features)}")
        bins = tuple((float(a), float(b)) for a, b in self.teff_bins)
        for a, b in bins:
            if not a < b:
                raise ValueError(f"uncertainty.teff_bins: lower edge {a} must be below upper edge {b}")
        object.__setattr__(self, "teff_bins", bins)

    def floor_for(self, label: str) -> float:
        return float(self.floor.get(label, 0.0))


# ---------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------

def quadratic_terms(z: NDArray[np.float64]) -> NDArray[np.float64]:
    """Design matrix of a full quadratic in the columns of ``z`` (n, d):
    [1, z₁ … z_d, z_i·z_j for i ≤ j] — 1 + d + d(d+1)/2 columns. With d = 0 it is the
    constant model, so the constant fallback shares all the machinery."""
    z = np.asarray(z, np.float64)
    n, d = z.shape
    iu, ju = np.triu_indices(d)
    return np.concatenate([np.ones((n, 1)), z, z[:, iu] * z[:, ju]], axis=1)


def t_consistency(nu: float) -> float:
    """s*(ν): the Student-t(ν) maximum-likelihood scale of N(0, 1) data.

    It solves E[(ν+1)·z²/(ν·s² + z²)] = 1 for z ~ N(0, 1). Multiplying the model's
    Gaussian σ by s* inside the t likelihood makes the fitted σ the Gaussian σ, so a
    robust fit on clean data returns the same σ as a Gaussian one (s*(5) ≈ 0.857;
    without this the t fit would report σ ~14% too small).
    """
    from scipy.optimize import brentq

    if not np.isfinite(nu):
        return 1.0
    x, w = np.polynomial.hermite_e.hermegauss(120)
    w = w / w.sum()

    def eq(s: float) -> float:
        return float(np.sum(w * (nu + 1) * x * x / (nu * s * s + x * x))) - 1.0

    return float(brentq(eq, 1e-3, 10.0, xtol=1e-12))


@dataclass(frozen=True)
class LabelErrorModel:
    """ln σ of one label: coefficients over :func:`quadratic_terms` of the standardized
    features (``kind`` quadratic), one coefficient (constant) or none (formal errors).
    ``z_lo``/``z_hi`` bound the standardized features seen in the pairs."""

    kind: str
    coef: tuple[float, ...]
    floor: float
    n_pairs: int
    z_lo: tuple[float, ...] = ()
    z_hi: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"LabelErrorModel.kind must be one of {list(_KINDS)}, got {self.kind!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "coef": [float(c) for c in self.coef], "floor": float(self.floor),
                "n_pairs": int(self.n_pairs), "z_lo": [float(v) for v in self.z_lo],
                "z_hi": [float(v) for v in self.z_hi]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LabelErrorModel:
        return cls(kind=str(d["kind"]), coef=tuple(float(c) for c in d["coef"]), floor=float(d["floor"]),
                   n_pairs=int(d["n_pairs"]), z_lo=tuple(float(v) for v in d.get("z_lo", ())),
                   z_hi=tuple(float(v) for v in d.get("z_hi", ())))


@dataclass
class ErrorModel:
    """Per-label models of the per-visit σ and the feature scaling they share.

    ``features`` are column names of the fits frame (labels and the S/N column); those in
    ``log_features`` enter as log10; all are standardized as (f − center)/scale.
    """

    features: tuple[str, ...]
    log_features: tuple[str, ...]
    center: NDArray[np.float64]
    scale: NDArray[np.float64]
    labels: dict[str, LabelErrorModel]
    likelihood: str = "student_t"
    nu: float = 5.0

    def __post_init__(self) -> None:
        self.features = tuple(self.features)
        self.log_features = tuple(self.log_features)
        self.center = np.asarray(self.center, np.float64).reshape(-1)
        self.scale = np.asarray(self.scale, np.float64).reshape(-1)
        d = len(self.features)
        if self.center.shape != (d,) or self.scale.shape != (d,):
            raise ValueError(f"ErrorModel: center/scale have shapes {self.center.shape}/{self.scale.shape}, "
                             f"expected ({d},) for features {list(self.features)}")
        if np.any(~np.isfinite(self.scale)) or np.any(self.scale <= 0):
            raise ValueError(f"ErrorModel: feature scales must be finite and > 0, got {self.scale.tolist()}")
        nq = 1 + d + d * (d + 1) // 2
        for name, m in self.labels.items():
            want = {"quadratic": nq, "constant": 1, "formal": 0}[m.kind]
            if len(m.coef) != want:
                raise ValueError(f"ErrorModel: label {name!r} ({m.kind}) has {len(m.coef)} coefficients, "
                                 f"expected {want}")
            if m.kind == "quadratic" and (len(m.z_lo) != d or len(m.z_hi) != d):
                raise ValueError(f"ErrorModel: label {name!r} needs z_lo/z_hi of length {d}")

    # -- features ---------------------------------------------------------------
    def raw_features(self, df: pd.DataFrame) -> NDArray[np.float64]:
        """(n, d) features in model units (log10 where asked; non-positive → NaN)."""
        missing = [f for f in self.features if f not in df.columns]
        if missing:
            raise KeyError(f"error model needs feature column(s) {missing}; the frame has {list(df.columns)}")
        return _feature_values(df, self.features, self.log_features)

    def standardize(self, raw: NDArray[np.float64]) -> NDArray[np.float64]:
        return (np.asarray(raw, np.float64) - self.center) / self.scale

    # -- prediction -----------------------------------------------------------
    def predict_label(self, df: pd.DataFrame, label: str) -> NDArray[np.float64]:
        """σ of ``label`` for every row of ``df`` from that row's own labels and S/N;
        NaN where the label (or a feature) is not finite."""
        if label not in self.labels:
            raise KeyError(f"error model has no label {label!r}; it has {list(self.labels)}")
        if label not in df.columns:
            raise KeyError(f"cannot predict the error of {label!r}: no such column in the frame")
        m = self.labels[label]
        x = pd.to_numeric(df[label], errors="coerce").to_numpy(np.float64)
        ok = np.isfinite(x)
        if m.kind == "formal":
            col = f"{label}_ERR"
            if col not in df.columns:
                raise KeyError(f"the error model of {label!r} falls back to the formal errors, "
                               f"but the frame has no {col!r} column")
            formal = pd.to_numeric(df[col], errors="coerce").to_numpy(np.float64)
            return np.where(ok, np.sqrt(formal**2 + m.floor**2), np.nan)
        coef = np.asarray(m.coef, np.float64)
        if m.kind == "constant":
            eta = np.full(len(df), coef[0])
        else:
            z = self.standardize(self.raw_features(df))
            ok &= np.isfinite(z).all(axis=1)
            z = np.clip(np.where(np.isfinite(z), z, 0.0), np.asarray(m.z_lo), np.asarray(m.z_hi))
            eta = quadratic_terms(z) @ coef
        sigma = np.sqrt(np.exp(2.0 * np.clip(eta, -_ETA_MAX, _ETA_MAX)) + m.floor**2)
        return np.where(ok, sigma, np.nan)

    def predict(self, df: pd.DataFrame) -> dict[str, NDArray[np.float64]]:
        """σ for every visit of ``df``, by label (NaN where the label is NaN)."""
        return {name: self.predict_label(df, name) for name in self.labels}

    # -- serialization -------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-able description (all numbers finite), for the FITS header and the report."""
        return {
            "features": list(self.features),
            "log_features": list(self.log_features),
            "center": [float(v) for v in self.center],
            "scale": [float(v) for v in self.scale],
            "likelihood": self.likelihood,
            "nu": float(self.nu),
            "labels": {k: m.to_dict() for k, m in self.labels.items()},
            "model": "ln sigma_model = quadratic_terms((f - center)/scale clipped to [z_lo, z_hi]) . coef; "
                     "sigma = sqrt(exp(2 ln sigma_model) + floor^2)",
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ErrorModel:
        try:
            return cls(features=tuple(d["features"]), log_features=tuple(d["log_features"]),
                       center=np.asarray(d["center"], np.float64), scale=np.asarray(d["scale"], np.float64),
                       labels={str(k): LabelErrorModel.from_dict(v) for k, v in d["labels"].items()},
                       likelihood=str(d.get("likelihood", "student_t")), nu=float(d.get("nu", 5.0)))
        except KeyError as exc:
            raise ValueError(f"ErrorModel.from_dict: missing key {exc.args[0]!r}") from None


def _feature_values(df: pd.DataFrame, features: Sequence[str], log_features: Sequence[str]) -> NDArray[np.float64]:
    cols = []
    for f in features:
        v = pd.to_numeric(df[f], errors="coerce").to_numpy(np.float64)
        if f in log_features:
            with np.errstate(divide="ignore", invalid="ignore"):
                v = np.log10(np.where(v > 0, v, np.nan))
        cols.append(v)
    return np.column_stack(cols) if cols else np.zeros((len(df), 0))


def _resolve_features(columns: Sequence[str], label_names: Sequence[str], config: UncertaintyConfig) -> tuple[str, ...]:
    """The configured features this run can provide: a label feature the run did not fit
    is replaced by its alias (FE_H ↔ M_H) or dropped with a warning; a non-label feature
    (the S/N) must be a column."""
    out: list[str] = []
    for f in config.features:
        if f in label_names:
            out.append(f)
            continue
        alias = next((a for a in _FEATURE_ALIASES.get(f, ()) if a in label_names), None)
        if alias is not None:
            out.append(alias)
        elif f in DEFAULT_FLOORS:  # a label the run does not fit
            log.warning("error model: label feature %s was not fitted in this run; the model omits it", f)
        elif f in columns:
            out.append(f)
        else:
            raise KeyError(f"error model feature {f!r} is neither a fitted label ({list(label_names)}) "
                           f"nor a column of the fits frame")
    return tuple(dict.fromkeys(out))


# ---------------------------------------------------------------------------
# repeat pairs
# ---------------------------------------------------------------------------

def build_pairs(fits: pd.DataFrame, label_names: Sequence[str], *, usable_status: Sequence[int] = (0,),
                extra_columns: Sequence[str] = ("S2N",), valid: NDArray[np.bool_] | None = None) -> pd.DataFrame:
    """Every pair of usable visits of the same star (same MANGAID).

    A visit is usable when its STATUS is in ``usable_status``, all its labels are
    finite and, when ``valid`` (one bool per row: passes the quality cuts) is given,
    it is valid. A star with k usable visits gives k(k−1)/2 pairs (not independent, but each
    is a fair draw of the difference). The frame has ``MANGAID``, ``ROW_1``/``ROW_2``
    (positions in ``fits``), ``<col>_1``/``<col>_2`` for every label, its ``_ERR``
    column (when present) and ``extra_columns``, and per label ``<label>_DIFF`` = x₁ − x₂
    and ``<label>_PAIR_SIGMA`` = (√π/2)·|x₁ − x₂|. Rows are in a deterministic order
    (star, then visit order).
    """
    need = ["MANGAID", "STATUS", *label_names]
    missing = [c for c in need if c not in fits.columns]
    if missing:
        raise KeyError(f"build_pairs: the fits frame lacks column(s) {missing}")
    carry = [c for c in dict.fromkeys([*label_names, *(f"{n}_ERR" for n in label_names), *extra_columns])
             if c in fits.columns]
    status = pd.to_numeric(fits["STATUS"], errors="coerce").to_numpy(np.float64)
    labels = fits[list(label_names)].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    usable = np.isin(status, np.asarray(usable_status, np.float64)) & np.isfinite(labels).all(axis=1)
    if valid is not None:
        usable &= _valid_mask(valid, len(fits))
    idx = np.flatnonzero(usable)
    ids = fits["MANGAID"].astype(str).to_numpy()[idx]
    order = np.argsort(ids, kind="stable")
    idx, ids = idx[order], ids[order]
    _, start, counts = np.unique(ids, return_index=True, return_counts=True)
    p1: list[NDArray[np.int64]] = []
    p2: list[NDArray[np.int64]] = []
    for k in np.unique(counts[counts >= 2]):
        a, b = np.triu_indices(int(k), 1)
        s = start[counts == k][:, None]
        p1.append((s + a[None, :]).ravel())
        p2.append((s + b[None, :]).ravel())
    if p1:
        q1, q2 = np.concatenate(p1), np.concatenate(p2)
        o = np.lexsort((q2, q1))
        r1, r2 = idx[q1[o]], idx[q2[o]]
    else:
        r1 = r2 = np.zeros(0, np.int64)
    out: dict[str, Any] = {"MANGAID": fits["MANGAID"].astype(str).to_numpy()[r1], "ROW_1": r1, "ROW_2": r2}
    for c in carry:
        v = fits[c].to_numpy()
        out[f"{c}_1"], out[f"{c}_2"] = v[r1], v[r2]
    pairs = pd.DataFrame(out)
    for n in label_names:
        d = pairs[f"{n}_1"].to_numpy(np.float64) - pairs[f"{n}_2"].to_numpy(np.float64)
        pairs[f"{n}_DIFF"] = d
        pairs[f"{n}_PAIR_SIGMA"] = PAIR_FACTOR * np.abs(d)
    return pairs


def _valid_mask(valid: NDArray[np.bool_], n: int) -> NDArray[np.bool_]:
    v = np.asarray(valid, bool)
    if v.shape != (n,):
        raise ValueError(f"valid has shape {v.shape}, the fits frame {n} rows: one flag per visit is needed")
    return v


def _side(pairs: pd.DataFrame, side: int) -> pd.DataFrame:
    """One visit of every pair as a frame with the fits' column names."""
    suf = f"_{side}"
    cols = {c: c[: -len(suf)] for c in pairs.columns if c.endswith(suf) and c not in ("ROW_1", "ROW_2")}
    return pairs[list(cols)].rename(columns=cols)


def _pair_feature_frames(pairs: pd.DataFrame, features: Sequence[str],
                         label_like: Sequence[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Feature frames of the two visits for the likelihood: pair-mean labels, own S/N."""
    s1, s2 = _side(pairs, 1), _side(pairs, 2)
    f1, f2 = pd.DataFrame(index=pairs.index), pd.DataFrame(index=pairs.index)
    for f in features:
        a = pd.to_numeric(s1[f], errors="coerce").to_numpy(np.float64)
        b = pd.to_numeric(s2[f], errors="coerce").to_numpy(np.float64)
        if f in label_like:
            a = b = 0.5 * (a + b)
        f1[f], f2[f] = a, b
    return f1, f2


# ---------------------------------------------------------------------------
# maximum likelihood
# ---------------------------------------------------------------------------

def _nll(theta: NDArray, phi1: NDArray, phi2: NDArray, d2: NDArray, w: NDArray, floor2: float,
         c2: float, nu: float, gaussian: bool, ridge: float) -> tuple[float, NDArray]:
    """Mean negative log-likelihood of the pair differences and its gradient.

    S = c²·(σ₁² + σ₂²) with σᵢ² = exp(2ηᵢ) + floor², ηᵢ = φᵢ·θ (c = s*(ν) for the t)."""
    e1 = np.clip(phi1 @ theta, -_ETA_MAX, _ETA_MAX)
    e2 = np.clip(phi2 @ theta, -_ETA_MAX, _ETA_MAX)
    v1, v2 = np.exp(2 * e1), np.exp(2 * e2)
    S = c2 * (v1 + v2 + 2 * floor2)
    S = np.maximum(S, 1e-300)
    if gaussian:
        nll = 0.5 * np.log(S) + 0.5 * d2 / S
        dS = 0.5 / S - 0.5 * d2 / (S * S)
    else:
        nll = 0.5 * np.log(S) + 0.5 * (nu + 1) * np.log1p(d2 / (nu * S))
        dS = 0.5 / S - 0.5 * (nu + 1) * d2 / (S * (nu * S + d2))
    wsum = max(float(w.sum()), 1.0)
    g_e1 = w * dS * c2 * 2 * v1
    g_e2 = w * dS * c2 * 2 * v2
    grad = (phi1.T @ g_e1 + phi2.T @ g_e2) / wsum
    val = float(np.sum(w * nll) / wsum)
    if ridge > 0 and theta.size > 1:
        val += ridge * float(np.sum(theta[1:] ** 2))
        grad[1:] += 2 * ridge * theta[1:]
    return val, grad


def _fit_ml(delta: NDArray, z1: NDArray, z2: NDArray, floor: float, config: UncertaintyConfig,
            label: str) -> NDArray[np.float64]:
    """ML coefficients of ln σ over quadratic_terms(z) (z with 0 columns → constant).

    The first pass is always the Student-t likelihood on every pair (a robust start: a
    Gaussian first pass would be inflated by the outliers and then clip nothing). With
    ``clip_sigma`` > 0, pairs with |Δ| > clip_sigma·√(σ₁² + σ₂²) are then dropped and the
    configured likelihood refitted, until the kept set no longer changes (≤ 10 rounds);
    dropping Gaussian pairs beyond 5σ biases σ by < 1e-5.
    """
    from scipy.optimize import minimize

    phi1, phi2 = quadratic_terms(z1), quadratic_terms(z2)
    d2 = delta * delta
    floor2 = floor * floor

    def fit(theta: NDArray, w: NDArray, gaussian: bool) -> NDArray:
        c2 = 1.0 if gaussian else t_consistency(config.nu) ** 2
        res = minimize(_nll, theta, jac=True, method="L-BFGS-B",
                       args=(phi1, phi2, d2, w, floor2, c2, config.nu, gaussian, config.ridge),
                       options={"maxiter": config.max_iter, "gtol": 1e-9, "ftol": 1e-13})
        if not np.all(np.isfinite(res.x)):
            raise FloatingPointError(f"error model for {label}: the optimizer returned non-finite coefficients")
        if not res.success:
            log.warning("error model for %s: optimizer stopped without converging (%s); using its last point",
                        label, res.message)
        return res.x

    # start: a constant σ from the robust width of the differences (Δ has variance 2σ²)
    s0 = 1.4826 * float(median_abs_deviation(delta)) / math.sqrt(2.0)
    if not s0 > 0:
        s0 = PAIR_FACTOR * float(np.mean(np.abs(delta)))
    s0 = max(s0, floor, 1e-12)
    theta = np.zeros(phi1.shape[1])
    theta[0] = math.log(s0)
    gaussian = config.likelihood == "gaussian"
    w = np.ones(len(delta))
    theta = fit(theta, w, gaussian=False)
    if config.clip_sigma <= 0:
        return fit(theta, w, gaussian=True) if gaussian else theta
    for rnd in range(10):
        s = np.sqrt(np.exp(2 * np.clip(phi1 @ theta, -_ETA_MAX, _ETA_MAX))
                    + np.exp(2 * np.clip(phi2 @ theta, -_ETA_MAX, _ETA_MAX)) + 2 * floor2)
        w_new = (np.abs(delta) <= config.clip_sigma * s).astype(np.float64)
        if rnd > 0 and np.array_equal(w_new, w):
            break
        w = w_new
        theta = fit(theta, w, gaussian)
    n_clip = int((w == 0).sum())
    if n_clip:
        log.info("error model for %s: %d of %d repeat pairs beyond %.1f sigma left out", label, n_clip,
                 len(delta), config.clip_sigma)
    return theta


def fit_error_model(pairs: pd.DataFrame, label_names: Sequence[str],
                    config: UncertaintyConfig = UncertaintyConfig()) -> ErrorModel:
    """Fit the per-label σ models to the repeat pairs of :func:`build_pairs`.

    Per label, a pair is used when both values and all features of both visits are
    finite. Enough pairs (≥ ``min_pairs`` and ≥ 2 per coefficient): the quadratic; at
    least ``min_pairs_constant``: a constant σ; fewer: the formal errors.
    """
    snr = config.snr_column
    cols = [c[:-2] for c in pairs.columns if c.endswith("_1")]
    features = _resolve_features(cols, label_names, config)
    log_features = tuple(f for f in features if f in config.log_features
                         or any(f in _FEATURE_ALIASES.get(g, ()) for g in config.log_features))
    missing = [f for f in features if f"{f}_1" not in pairs.columns]
    if missing:
        raise KeyError(f"fit_error_model: the pairs frame lacks feature column(s) {missing} "
                       "(build_pairs(..., extra_columns=...) must carry them)")
    label_like = [f for f in features if f != snr]
    f1, f2 = _pair_feature_frames(pairs, features, label_like)
    raw1 = _feature_values(f1, features, log_features)
    raw2 = _feature_values(f2, features, log_features)
    both = np.vstack([raw1, raw2])
    okf = np.isfinite(both).all(axis=1)
    d = len(features)
    if okf.sum() >= 2:
        center = both[okf].mean(axis=0)
        scale = both[okf].std(axis=0)
    else:
        center, scale = np.zeros(d), np.ones(d)
    scale = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)
    z1, z2 = (raw1 - center) / scale, (raw2 - center) / scale
    feat_ok = np.isfinite(z1).all(axis=1) & np.isfinite(z2).all(axis=1)
    nq = 1 + d + d * (d + 1) // 2

    models: dict[str, LabelErrorModel] = {}
    for name in label_names:
        floor = config.floor_for(name)
        delta = pairs[f"{name}_DIFF"].to_numpy(np.float64) if len(pairs) else np.zeros(0)
        ok = np.isfinite(delta) & feat_ok
        n = int(ok.sum())
        if n >= max(config.min_pairs, 2 * nq):
            zz = np.vstack([z1[ok], z2[ok]])
            theta = _fit_ml(delta[ok], z1[ok], z2[ok], floor, config, name)
            models[name] = LabelErrorModel("quadratic", tuple(map(float, theta)), floor, n,
                                           tuple(map(float, zz.min(0))), tuple(map(float, zz.max(0))))
            log.info("error model for %s: quadratic in %s from %d repeat pairs", name, list(features), n)
            continue
        n_any = int(np.isfinite(delta).sum())
        if n_any >= config.min_pairs_constant:
            okc = np.isfinite(delta)
            theta = _fit_ml(delta[okc], np.zeros((n_any, 0)), np.zeros((n_any, 0)), floor, config, name)
            models[name] = LabelErrorModel("constant", (float(theta[0]),), floor, n_any)
            log.warning("error model for %s: only %d usable repeat pairs (< %d needed for the %d-term quadratic); "
                        "using a constant sigma = %.4g for every visit", name, n,
                        max(config.min_pairs, 2 * nq), nq, math.sqrt(math.exp(2 * theta[0]) + floor**2))
        else:
            models[name] = LabelErrorModel("formal", (), floor, n_any)
            log.warning("error model for %s: only %d repeat pairs (< %d); reporting the formal fit errors",
                        name, n_any, config.min_pairs_constant)
    return ErrorModel(features=features, log_features=log_features, center=center, scale=scale, labels=models,
                      likelihood=config.likelihood, nu=config.nu)


# ---------------------------------------------------------------------------
# diagnostics
# ---------------------------------------------------------------------------

def _robust_width(x: NDArray[np.float64]) -> float:
    x = x[np.isfinite(x)]
    if x.size == 0:
        return float("nan")
    return float(1.4826 * median_abs_deviation(x))


def calibration_widths(pairs: pd.DataFrame, model: ErrorModel) -> dict[str, float]:
    """Robust width (1.4826·MAD) of (x₁ − x₂)/√(σ₁² + σ₂²) over the repeat pairs, by
    label, with σ from ``model`` at each visit's own labels and S/N: ≈ 1 when the model
    describes the repeat scatter (NaN without pairs)."""
    s1, s2 = _side(pairs, 1), _side(pairs, 2)
    out: dict[str, float] = {}
    for name in model.labels:
        if len(pairs) == 0 or f"{name}_DIFF" not in pairs.columns:
            out[name] = float("nan")
            continue
        sig = np.sqrt(model.predict_label(s1, name) ** 2 + model.predict_label(s2, name) ** 2)
        with np.errstate(divide="ignore", invalid="ignore"):
            out[name] = _robust_width(pairs[f"{name}_DIFF"].to_numpy(np.float64) / sig)
    return out


def precision_table(fits_with_errors: pd.DataFrame, label_names: Sequence[str],
                    teff_bins: Sequence[tuple[float, float]] = DEFAULT_TEFF_BINS, *,
                    pairs: pd.DataFrame | None = None, usable_status: Sequence[int] = (0,),
                    valid: NDArray[np.bool_] | None = None) -> pd.DataFrame:
    """The Table 3 analogue: per Teff bin and label, the precision of the catalogue.

    Columns: TEFF_LO, TEFF_HI, LABEL, N_VISITS (usable — and, with ``valid``, valid —
    visits with Teff in [lo, hi)),
    N_PAIRS (repeat pairs whose mean Teff is in the bin), FORMAL_ERR (median formal
    error), REPEAT_PREC (median of (√π/2)·|Δ| — the paper's per-pair estimator; note
    the median of it is ≈ 0.85 σ for Gaussian pairs), REPEAT_PREC_MEAN (its mean, the
    unbiased estimate of σ where σ is constant within the bin) and MODEL_ERR (median
    ``<label>_REPEAT_ERR``; NaN when the column is absent).
    """
    if "TEFF" not in fits_with_errors.columns:
        raise KeyError("precision_table bins by Teff: the frame has no TEFF column")
    if pairs is None:
        pairs = build_pairs(fits_with_errors, label_names, usable_status=usable_status, extra_columns=("TEFF",),
                            valid=valid)
    status = pd.to_numeric(fits_with_errors["STATUS"], errors="coerce").to_numpy(np.float64)
    usable = np.isin(status, np.asarray(usable_status, np.float64))
    if valid is not None:
        usable &= _valid_mask(valid, len(fits_with_errors))
    teff = pd.to_numeric(fits_with_errors["TEFF"], errors="coerce").to_numpy(np.float64)
    if len(pairs):
        pteff = 0.5 * (pairs["TEFF_1"].to_numpy(np.float64) + pairs["TEFF_2"].to_numpy(np.float64))
    else:
        pteff = np.zeros(0)

    def med(v: NDArray) -> float:
        v = v[np.isfinite(v)]
        return float(np.median(v)) if v.size else float("nan")

    def col(name: str) -> NDArray[np.float64]:
        if name in fits_with_errors.columns:
            return pd.to_numeric(fits_with_errors[name], errors="coerce").to_numpy(np.float64)
        return np.full(len(fits_with_errors), np.nan)

    rows = []
    for lo, hi in teff_bins:
        vin = usable & (teff >= lo) & (teff < hi)
        pin = (pteff >= lo) & (pteff < hi)
        for name in label_names:
            x = col(name)
            vsel = vin & np.isfinite(x)
            ps = pairs[f"{name}_PAIR_SIGMA"].to_numpy(np.float64)[pin] if len(pairs) else np.zeros(0)
            ps = ps[np.isfinite(ps)]
            rows.append({
                "TEFF_LO": float(lo), "TEFF_HI": float(hi), "LABEL": name,
                "N_VISITS": int(vsel.sum()), "N_PAIRS": int(ps.size),
                "FORMAL_ERR": med(col(f"{name}_ERR")[vsel]),
                "REPEAT_PREC": med(ps),
                "REPEAT_PREC_MEAN": float(ps.mean()) if ps.size else float("nan"),
                "MODEL_ERR": med(col(f"{name}_REPEAT_ERR")[vsel]),
            })
    return pd.DataFrame(rows, columns=["TEFF_LO", "TEFF_HI", "LABEL", "N_VISITS", "N_PAIRS", "FORMAL_ERR",
                                       "REPEAT_PREC", "REPEAT_PREC_MEAN", "MODEL_ERR"])


def format_precision_table(df: pd.DataFrame) -> str:
    """Plain-text rendering of :func:`precision_table` for logs and the report."""
    head = (f"{'Teff bin (K)':>15} {'label':>13} {'N_vis':>7} {'N_pair':>7} {'formal':>9} "
            f"{'repeat':>9} {'rep.mean':>9} {'model':>9}")
    lines = [head, "-" * len(head)]

    def fmt(v: float, label: str) -> str:
        if not np.isfinite(v):
            return f"{'—':>9}"
        return f"{v:9.0f}" if label == "TEFF" else f"{v:9.3f}"

    for r in df.itertuples(index=False):
        hi = "inf" if not np.isfinite(r.TEFF_HI) else f"{r.TEFF_HI:.0f}"
        lines.append(f"{f'{r.TEFF_LO:.0f}-{hi}':>15} {r.LABEL:>13} {r.N_VISITS:7d} {r.N_PAIRS:7d} "
                     f"{fmt(r.FORMAL_ERR, r.LABEL)} {fmt(r.REPEAT_PREC, r.LABEL)} "
                     f"{fmt(r.REPEAT_PREC_MEAN, r.LABEL)} {fmt(r.MODEL_ERR, r.LABEL)}")
    return "\n".join(lines)


def _json_safe(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v) if np.isfinite(v) else None
    return v


def calibrate_uncertainties(fits: pd.DataFrame, label_names: Sequence[str],
                            config: UncertaintyConfig = UncertaintyConfig(), *,
                            valid: NDArray[np.bool_] | None = None
                            ) -> tuple[pd.DataFrame, ErrorModel, dict[str, Any]]:
    """Repeat-visit error model for a fit table: returns a copy of ``fits`` with
    ``<label>_REPEAT_ERR`` for every visit, the :class:`ErrorModel`, and a JSON-able
    report (pairs per label, model kind, calibration widths, the precision table, the
    model itself; non-finite numbers as null).

    ``valid`` (one bool per row, the quality cuts' verdict) restricts the pairs and the
    precision table to visits that pass the cuts; every visit still gets its error."""
    label_names = list(label_names)
    extra = list(dict.fromkeys([config.snr_column, *(f for f in config.features if f in fits.columns)]))
    pairs = build_pairs(fits, label_names, usable_status=config.usable_status, extra_columns=extra, valid=valid)
    model = fit_error_model(pairs, label_names, config)
    out = fits.copy()
    for name, sigma in model.predict(fits).items():
        out[f"{name}_REPEAT_ERR"] = sigma
    widths = calibration_widths(pairs, model)
    table = None
    if "TEFF" in label_names:
        table = precision_table(out, label_names, config.teff_bins, pairs=pairs, usable_status=config.usable_status,
                                valid=valid)
        log.info("repeat-visit precision:\n%s", format_precision_table(table))
    else:
        log.warning("no TEFF label: the precision table (binned by Teff) is skipped")
    n_stars = int(pairs["MANGAID"].nunique()) if len(pairs) else 0
    for name in label_names:
        m = model.labels[name]
        log.info("uncertainty %s: %s model from %d pairs, calibration width %.3f", name, m.kind, m.n_pairs,
                 widths[name])
    report = {
        "n_pairs_total": int(len(pairs)),
        "pairs_from": "visits passing the quality cuts" if valid is not None else "every usable visit",
        "n_stars_with_pairs": n_stars,
        "n_pairs": {n: model.labels[n].n_pairs for n in label_names},
        "kind": {n: model.labels[n].kind for n in label_names},
        "calibration_width": widths,
        "likelihood": config.likelihood,
        "nu": config.nu,
        "model": model.to_dict(),
        "precision_table": table.to_dict(orient="records") if table is not None else None,
    }
    return out, model, _json_safe(report)
