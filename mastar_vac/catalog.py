"""The value-added catalogue: one row per input visit, in the DR17 per-visit VAC layout.

Column order and meaning follow the DR17 ``mastar-goodvisits-…-params`` VAC
(datamodels.md §1.8): identifiers, then the labels with their reported (repeat-visit
calibrated) and formal errors, χ², VALID and the FLAG bitmask. The layout is the same
whatever labels were fitted: a label the run did not fit (e.g. [α/Fe] in the MILES demo)
is a NaN column, and the header says which labels were fitted.

:data:`VAC_COLUMNS` is the single definition used by the FITS and Parquet writers, the
report and the tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray

if TYPE_CHECKING:
    from .quality import QualityConfig
    from .uncertainty import UncertaintyConfig

__all__ = ["VacColumn", "VAC_COLUMNS", "LABEL_TO_VAC", "VAC_KEY", "vac_column", "assemble_catalog"]


@dataclass(frozen=True)
class VacColumn:
    name: str
    dtype: str  # numpy dtype; "U<n>" for strings
    unit: str | None
    description: str


# internal label name → VAC column stem
LABEL_TO_VAC = {"TEFF": "TEFF", "LOGG": "LOGG", "FE_H": "FEH", "M_H": "FEH", "ALPHA_FE": "ALPHA",
                "ALPHA_M": "ALPHA", "LOG10_VMICRO": "VMICRO"}

VAC_KEY = ("MANGAID", "PLATE", "IFUDESIGN", "MJD")

_LABEL_COLS = (
    ("TEFF", "K", "effective temperature"),
    ("LOGG", "dex", "surface gravity, log10(g / cm s^-2)"),
    ("FEH", "dex", "iron abundance [Fe/H]"),
    ("ALPHA", "dex", "alpha-element abundance [alpha/Fe]"),
    ("VMICRO", "dex", "microturbulence, log10(v_micro / km s^-1)"),
)

VAC_COLUMNS: tuple[VacColumn, ...] = (
    VacColumn("MANGAID", "U22", None, "MaNGA ID of the star"),
    VacColumn("PLATE", "i4", None, "plate of the visit"),
    VacColumn("IFUDESIGN", "U5", None, "IFU design of the visit"),
    VacColumn("MJD", "i4", None, "MJD of the visit"),
    VacColumn("RA", "f8", "deg", "right ascension (J2000)"),
    VacColumn("DEC", "f8", "deg", "declination (J2000)"),
    VacColumn("S2N", "f4", None, "median S/N per pixel of the visit spectrum"),
    *(c for stem, unit, desc in _LABEL_COLS for c in (
        VacColumn(stem, "f4", unit, desc),
        VacColumn(f"{stem}_ERR", "f4", unit, f"uncertainty of {stem} from the repeat-visit model"),
        VacColumn(f"{stem}_FORMAL_ERR", "f4", unit, f"formal uncertainty of {stem} from the fit covariance"),
    )),
    VacColumn("CHISQ", "f4", None, "reduced chi-square of the best fit under the data noise alone "
              "(the paper's statistic; FLAG bit CHI2_HIGH cuts it)"),
    VacColumn("CHISQ_EMU", "f4", None, "reduced chi-square with the emulator's per-pixel error variance "
              "added to the noise (the statistic the fit minimizes)"),
    VacColumn("NPIX", "i4", None, "pixels used in the fit"),
    VacColumn("N_ITER", "i4", None, "Levenberg-Marquardt iterations (summed over starts)"),
    VacColumn("FIT_STATUS", "i2", None, "fitter status: 0 ok, 1 max iter, 2 no data, 3 bad fit, 4 error, 5 non-finite"),
    VacColumn("VALID", "i2", None, "1 = parameters valid, 0 = flagged (see FLAG)"),
    VacColumn("FLAG", "i4", None, "quality bitmask (see the FLAGBITn header cards)"),
)


def vac_column(name: str) -> VacColumn:
    for c in VAC_COLUMNS:
        if c.name == name:
            return c
    raise KeyError(name)


def assemble_catalog(fits: pd.DataFrame, visits: pd.DataFrame, label_names: Sequence[str], *,
                     training_range: tuple[NDArray, NDArray] | None = None,
                     uncertainty: UncertaintyConfig | None = None,
                     quality: QualityConfig | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Per-visit fit results + visit metadata → the VAC table (one row per visit).

    ``fits`` is the fit stage's table (:func:`mastar_vac.fit.result_columns` plus the
    visit key); ``visits`` the cube's per-visit coordinates (MANGAID, PLATE, IFUDESIGN,
    MJD, RA, DEC, S2N, MJDQUAL) in the same order. Errors are calibrated on repeat
    visits, flags set; nothing is dropped. Raises ``ValueError`` if the two tables do
    not describe the same visits or a visit key repeats.
    """
    from .quality import QualityConfig, quality_flags
    from .uncertainty import UncertaintyConfig, calibrate_uncertainties

    key = list(VAC_KEY)
    if len(fits) != len(visits):
        raise ValueError(f"{len(fits)} fit rows but {len(visits)} visits: every visit must have a fit row")
    f = fits.reset_index(drop=True)
    v = visits.reset_index(drop=True)
    for k in key:
        if not np.array_equal(f[k].astype(str).to_numpy(), v[k].astype(str).to_numpy()):
            raise ValueError(f"fit rows and visits disagree in {k}: they must be in the same (cube) order")
    dup = v.duplicated(key)
    if dup.any():
        i = int(np.flatnonzero(dup.to_numpy())[0])
        raise ValueError(f"visit key repeats at row {i}: {tuple(v.loc[i, key])}")
    work = f.copy()
    work["S2N"] = v["S2N"].to_numpy()
    work["MJDQUAL"] = v["MJDQUAL"].to_numpy()
    # flags first: the repeat-visit model learns from visits that pass the quality cuts
    # only (a pair pinned at a bound has Δ ≈ 0, a χ²-failed one is noise; both bias σ)
    flag, valid = quality_flags(work, list(label_names), training_range=training_range,
                                config=quality or QualityConfig())
    work, model, unc_report = calibrate_uncertainties(work, list(label_names), uncertainty or UncertaintyConfig(),
                                                      valid=np.asarray(valid, bool))
    n = len(work)
    out: dict[str, Any] = {}
    for c in VAC_COLUMNS:
        if c.name in ("MANGAID", "IFUDESIGN"):
            out[c.name] = v[c.name].astype(str).to_numpy()
        elif c.name in ("PLATE", "MJD", "RA", "DEC", "S2N"):
            out[c.name] = v[c.name].to_numpy().astype(c.dtype)
        elif c.dtype.startswith("f"):
            out[c.name] = np.full(n, np.nan, c.dtype)
    for lab in label_names:
        stem = LABEL_TO_VAC.get(lab)
        if stem is None:
            continue
        out[stem] = work[lab].to_numpy().astype("f4")
        out[f"{stem}_ERR"] = work[f"{lab}_REPEAT_ERR"].to_numpy().astype("f4")
        out[f"{stem}_FORMAL_ERR"] = work[f"{lab}_ERR"].to_numpy().astype("f4")
    out["CHISQ"] = work["CHISQ_RED"].to_numpy().astype("f4")
    if "CHISQ_EMU_RED" in work:  # fit tables written before the column existed lack it (NaN)
        out["CHISQ_EMU"] = work["CHISQ_EMU_RED"].to_numpy().astype("f4")
    out["NPIX"] = (work["DOF"].fillna(0).to_numpy() + len(label_names) * (work["DOF"].fillna(0).to_numpy() > 0)
                   ).astype("i4")
    out["N_ITER"] = work["N_ITER"].fillna(0).to_numpy().astype("i4")
    out["FIT_STATUS"] = work["STATUS"].fillna(-1).to_numpy().astype("i2")
    out["VALID"] = valid.astype("i2")
    out["FLAG"] = flag.astype("i4")
    vac = pd.DataFrame({c.name: out[c.name] for c in VAC_COLUMNS})
    report = {"uncertainty": unc_report, "error_model": model.to_dict(), "n_rows": n,
              "n_valid": int(valid.sum()), "fitted_labels": list(label_names)}
    return vac, report
