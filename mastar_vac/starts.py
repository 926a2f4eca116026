"""Photometric starting points for the fit (Imig et al. 2022 §3.2).

A star's dereddened Gaia colour (BP−RP)₀ and absolute magnitude M_G are matched to the
nearest PARSEC isochrone point, whose (Teff, log g, [M/H]) start the χ² fit. The Gaia
crossmatch VAC already carries both (``BPRPC``, ``M_G``, datamodels.md §1.10); where
they are missing they are computed from the Gaia magnitudes, the parallax (or the
Bailer-Jones distance) and the VAC's E(B−V). Stars without usable photometry get no
photometric start (NaN) and the fitter relies on its grid starts.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd
from numpy.typing import NDArray

__all__ = ["dereddened_cmd", "photometric_starts", "A_G_PER_EBV", "E_BPRP_PER_EBV"]

log = logging.getLogger(__name__)

# Extinction coefficients relative to E(B−V) for Gaia passbands (Casagrande &
# VandenBerg 2018, for a solar-like SED; the colour dependence is ignored here).
A_G_PER_EBV = 2.740
E_BPRP_PER_EBV = 1.339


def _col(df: pd.DataFrame, name: str) -> NDArray[np.float64]:
    if name not in df:
        return np.full(len(df), np.nan)
    v = np.array(pd.to_numeric(df[name], errors="coerce"), dtype=np.float64)  # a writable copy
    v[(v <= -999) | ~np.isfinite(v)] = np.nan
    return v


def dereddened_cmd(gaia: pd.DataFrame) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """(BP−RP)₀ and M_G per row: the VAC's BPRPC/M_G, else computed from magnitudes."""
    bprp0 = _col(gaia, "BPRPC")
    mg = _col(gaia, "M_G")
    ebv = _col(gaia, "EBV")
    ebv_ok = np.where(np.isfinite(ebv), ebv, np.nan)
    g = _col(gaia, "PHOT_G_MEAN_MAG")
    bprp = _col(gaia, "BP_RP")
    bp, rp = _col(gaia, "PHOT_BP_MEAN_MAG"), _col(gaia, "PHOT_RP_MEAN_MAG")
    bprp = np.where(np.isfinite(bprp), bprp, bp - rp)
    plx = _col(gaia, "PARALLAX")
    plx_err = _col(gaia, "PARALLAX_ERROR")
    dist = _col(gaia, "R_MED_GEO")
    good_plx = np.isfinite(plx) & (plx > 0) & (~np.isfinite(plx_err) | (plx / plx_err > 5))
    with np.errstate(divide="ignore", invalid="ignore"):
        dm = np.where(good_plx, 5 * np.log10(100.0 / plx), 5 * np.log10(dist / 10.0))
    mg_calc = g - dm - A_G_PER_EBV * ebv_ok
    bprp_calc = bprp - E_BPRP_PER_EBV * ebv_ok
    bprp0 = np.where(np.isfinite(bprp0), bprp0, bprp_calc)
    mg = np.where(np.isfinite(mg), mg, mg_calc)
    return bprp0, mg


def photometric_starts(gaia: pd.DataFrame, mangaids: Sequence[str], label_names: Sequence[str], *,
                       defaults: dict[str, float] | None = None, max_cmd_distance: float = 0.25,
                       isochrones: str = "parsec_v1.25") -> NDArray[np.float64]:
    """Start labels (n, L) for each entry of ``mangaids`` (visits may repeat a star).

    Teff, LOGG and FE_H/M_H come from the nearest isochrone point in the
    (BP−RP)₀–M_G plane; other labels from ``defaults`` (e.g. {"ALPHA_FE": 0.0,
    "LOG10_VMICRO": 0.1}). Rows without photometry, or whose nearest isochrone point is
    further than ``max_cmd_distance`` (in the scaled CMD metric), are NaN.
    """
    from .isochrones import nearest_isochrone_point

    defaults = {"ALPHA_FE": 0.0, "ALPHA_M": 0.0, "LOG10_VMICRO": 0.1, **(defaults or {})}
    out = np.full((len(mangaids), len(label_names)), np.nan)
    if gaia is None or len(gaia) == 0 or "MANGAID" not in gaia:
        return out
    g = gaia.drop_duplicates("MANGAID").set_index("MANGAID")
    bprp0, mg = dereddened_cmd(g)
    ok = np.isfinite(bprp0) & np.isfinite(mg)
    if not ok.any():
        log.info("photometric starts: no star has usable Gaia photometry; grid starts only")
        return out
    iso = nearest_isochrone_point(bprp0[ok], mg[ok], name=isochrones)
    dist = np.asarray(iso["cmd_distance"], float)
    per_star = pd.DataFrame({"teff": np.asarray(iso["teff"], float), "logg": np.asarray(iso["logg"], float),
                             "feh": np.asarray(iso["feh"], float)}, index=g.index[ok])
    per_star[dist > max_cmd_distance] = np.nan
    rows = per_star.reindex(list(mangaids))
    for j, name in enumerate(label_names):
        if name == "TEFF":
            out[:, j] = rows["teff"].to_numpy()
        elif name == "LOGG":
            out[:, j] = rows["logg"].to_numpy()
        elif name in ("FE_H", "M_H"):
            out[:, j] = rows["feh"].to_numpy()
        else:
            out[:, j] = np.where(rows["teff"].notna(), defaults.get(name, np.nan), np.nan)
    n_ok = int(np.isfinite(out[:, 0]).sum())
    log.info("photometric starts for %d of %d spectra (%d stars with photometry, %d rejected as off the "
             "isochrones)", n_ok, len(mangaids), int(ok.sum()), int((dist > max_cmd_distance).sum()))
    return out

