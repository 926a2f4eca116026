"""Isochrones (PARSEC v1.25, MIST) and Gaia photometry for them.

Used twice by the pipeline (Imig et al. 2022):

* §2.4 — the theoretical extension of the reference set draws synthetic spectra at
  PARSEC isochrone points with Teff > 6,000 K (:func:`sample_isochrone_points`);
* §3.2 — fits start from the isochrone point nearest to a star's dereddened Gaia
  BP−RP and M_G (:func:`nearest_isochrone_point`).

The grids ship in the PyPI package ``lachesis-grids`` as HDF5 in a ``sparse_v1`` layout,
decoded here and verified on load:

* ``feh_values`` (n_feh), ``age_values`` (n_age, log10 yr), ``eep_values`` (n_eep);
* ``lengths`` and ``offsets`` (n_feh·n_age each, flat index k = i_feh·n_age + i_age):
  isochrone k holds ``lengths[k]`` points, the EEPs ``eep_values[offsets[k]:offsets[k]+lengths[k]]``.
  ``offsets`` index the EEP axis, *not* ``values``;
* ``values`` (Σ lengths, n_col): the isochrones' rows concatenated in k order, so
  isochrone k starts at row ``cumsum(lengths)[k-1]`` (verified: the ``age`` and ``eep``
  columns of every block equal ``age_values[i_age]`` and the EEPs above). MIST pads some
  blocks with all-NaN rows (EEPs missing inside a range); those are dropped.

Evolutionary phases. PARSEC's ``phase`` column follows the CMD labels (0 PMS, 1 MS,
2 SGB, 3 RGB, 4–6 core-He burning; this grid stops before the AGB) but is interpolated,
so it takes fractional values, and between EEP 606 and 631 of low-mass isochrones
(3 < phase < 4) it marks a straight line from the RGB tip to the zero-age horizontal
branch that is no stellar model (the He flash). ``pms`` marks the leading run of each
isochrone (lowest masses) before phase first reaches 1; a phase < 1 after that is an
interpolation artefact (massive post-MS stars show it) and is not PMS. MIST labels
phases −1 PMS, 0 MS, 2 RGB, 3 CHeB, 4 EAGB, 5 TPAGB, 6 post-AGB, 9 WR, −9 undefined.
``stage_ok`` is False for PMS, the He-flash bridge, MIST post-AGB and undefined points.

Both grids use M_bol,⊙ = 4.74 (checked on load: Mbol + 2.5 log L is 4.740 for every
row; stored as ``DataFrame.attrs["mbol_sun"]``), the zero point of the Andrae et al.
(2018) bolometric corrections used by :func:`gaia_photometry`.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "GRIDS",
    "load_isochrones",
    "sample_isochrone_points",
    "gaia_photometry",
    "bc_g",
    "bp_rp_from_teff",
    "isochrone_photometry",
    "nearest_isochrone_point",
    "PHOT_COLOUR_FALLBACK",
    "PHOT_COLOUR_EXTRAPOLATED",
    "PHOT_BC_FALLBACK",
    "PHOT_CLAMPED",
    "PHOT_INPUT_CLIPPED",
]

GRIDS = {
    "parsec_v1.25": "parsec_v1.25.h5",
    "mist_v2.5_vvcrit0.4": "mist_v2.5_vvcrit0.4.h5",
}

MBOL_SUN = 4.74  # IAU 2015 B2; the zero point of Andrae et al. (2018) BC_G


# ============================================================================ isochrones


def _grid_name(name: str) -> str:
    key = name[:-3] if name.endswith(".h5") else name
    if key not in GRIDS:
        raise ValueError(f"unknown isochrone grid {name!r}; known: {sorted(GRIDS)}")
    return key


def _grid_file(name: str):  # noqa: ANN202
    try:
        import lachesis_grids
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise ImportError("isochrones need the 'lachesis-grids' package (pip install lachesis-grids)") from e
    return lachesis_grids.grid_path(GRIDS[_grid_name(name)])


def _load(name: str) -> pd.DataFrame:
    return _load_cached(_grid_name(name))


@functools.lru_cache(maxsize=4)
def _load_cached(name: str) -> pd.DataFrame:
    import h5py

    path = _grid_file(name)
    with h5py.File(path, "r") as f:
        storage = f.attrs.get("storage")
        if storage != "sparse_v1":
            raise ValueError(f"{path}: storage {storage!r} is not the 'sparse_v1' layout this reader knows")
        cols = [str(c) for c in f.attrs["columns"]]
        feh_v = f["feh_values"][:]
        age_v = f["age_values"][:]
        eep_v = f["eep_values"][:]
        lengths = f["lengths"][:].astype(np.int64)
        offsets = f["offsets"][:].astype(np.int64)
        values = f["values"][:]
    n_feh, n_age = len(feh_v), len(age_v)
    if lengths.size != n_feh * n_age or offsets.size != lengths.size:
        raise ValueError(f"{path}: {lengths.size} isochrone blocks for {n_feh} [Fe/H] × {n_age} ages")
    if int(lengths.sum()) != values.shape[0] or values.shape[1] != len(cols):
        raise ValueError(f"{path}: values {values.shape} do not match Σ lengths = {lengths.sum()} × {len(cols)} columns")
    if np.any(offsets + lengths > len(eep_v)):
        raise ValueError(f"{path}: an isochrone block runs past the EEP axis")

    k = np.repeat(np.arange(lengths.size), lengths)
    i_feh, i_age = np.divmod(k, n_age)
    first = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    pos = np.arange(values.shape[0]) - first[k]
    c = {name_: values[:, j] for j, name_ in enumerate(cols)}
    keep = np.isfinite(c["Teff"]) & np.isfinite(c["log_g"]) & np.isfinite(c["eep"])
    # verify the layout: every block's age and EEP columns are its grid values
    if not np.allclose(c["age"][keep], age_v[i_age][keep], atol=1e-4):
        raise ValueError(f"{path}: ages in 'values' disagree with age_values: not the expected sparse_v1 layout")
    if not np.array_equal(c["eep"][keep], eep_v[offsets[k] + pos][keep]):
        raise ValueError(f"{path}: EEPs in 'values' disagree with eep_values[offsets + i]")

    df = pd.DataFrame({
        "feh": feh_v[i_feh][keep],
        "log_age": age_v[i_age][keep],
        "eep": c["eep"][keep].astype(np.int32),
        "mass": c["initial_mass"][keep].astype(np.float64),
        "star_mass": c["star_mass"][keep].astype(np.float64),
        "teff": c["Teff"][keep].astype(np.float64),
        "logg": c["log_g"][keep].astype(np.float64),
        "logl": c["log_L"][keep].astype(np.float64),
        "mbol": c["Mbol"][keep].astype(np.float64),
        "phase": c["phase"][keep].astype(np.float64),
        "isochrone": k[keep].astype(np.int32),
    })

    phase = df["phase"].to_numpy()
    if name.startswith("parsec"):
        # leading run of each isochrone before phase first reaches 1
        reached = pd.Series(phase >= 1.0).groupby(df["isochrone"].to_numpy()).cummax().to_numpy()
        pms = ~reached
        bad = (phase > 3.0) & (phase < 4.0)  # RGB tip → ZAHB line across the He flash
    else:  # MIST
        pms = np.isclose(phase, -1.0)
        bad = np.isclose(phase, -9.0) | np.isclose(phase, 6.0)
    df["pms"] = pms
    df["stage_ok"] = ~pms & ~bad
    zp = df["mbol"] + 2.5 * df["logl"]
    df.attrs["mbol_sun"] = float(np.round(np.median(zp), 3))
    df.attrs["grid"] = name
    return df


def load_isochrones(name: str = "parsec_v1.25") -> pd.DataFrame:
    """All isochrone points of a grid, one row each.

    Columns: ``feh`` ([M/H] of the isochrone), ``log_age`` (log10 yr), ``eep``, ``mass``
    (initial, M⊙), ``star_mass`` (current), ``teff`` (K), ``logg``, ``logl`` (log L/L⊙),
    ``mbol`` (M_bol,⊙ = 4.74), ``phase`` (the grid's own phase code, see the module
    docstring), ``isochrone`` (block index), ``pms`` and ``stage_ok`` (bool).
    The grid is read once per process; each call returns a copy.
    """
    return _load(name).copy()


def sample_isochrone_points(n: int, *, teff_min: float = 6000.0, teff_max: float | None = None,
                            logg_range: tuple[float, float] | None = None,
                            feh_range: tuple[float, float] | None = None,
                            log_age_range: tuple[float, float] | None = None,
                            weighting: str = "logteff", nbins: int = 20, name: str = "parsec_v1.25",
                            rng: np.random.Generator | int | None = None) -> pd.DataFrame:
    """Draw ``n`` distinct isochrone points with ``teff > teff_min`` (paper §2.4).

    Only points with ``stage_ok`` are drawn (no PMS points, none of PARSEC's He-flash
    bridge). ``teff_max``, ``logg_range`` and ``feh_range`` (inclusive) restrict the draw
    to a synthetic grid's label range — pass the grid's range, since PARSEC reaches
    220,000 K and log g 6.

    ``weighting``:

    * ``"logteff"`` (default): equal total probability for each of ``nbins`` bins equally
      spaced in log Teff over the candidates, uniform over points inside a bin. The
      grid has ~3× fewer points per dex at 25,000 K than at 6,000 K (and ~8× fewer at
      35,000 K), so a uniform draw would starve the hot end, where the reference set has
      no empirical stars at all. Inside a bin the mix of dwarfs and giants is the grid's.
    * ``"uniform"``: every candidate point equally likely.

    Returns a DataFrame (the rows of :func:`load_isochrones`) sorted as drawn; the draw is
    deterministic for a given ``rng`` seed.
    """
    if n < 0:
        raise ValueError("n must be non-negative")
    rng = np.random.default_rng(rng)
    df = _load(name)
    m = df["stage_ok"].to_numpy() & (df["teff"].to_numpy() > teff_min)
    if teff_max is not None:
        m &= df["teff"].to_numpy() <= teff_max
    for col, rg in (("logg", logg_range), ("feh", feh_range), ("log_age", log_age_range)):
        if rg is not None:
            v = df[col].to_numpy()
            m &= (v >= rg[0]) & (v <= rg[1])
    cand = np.flatnonzero(m)
    if n > cand.size:
        raise ValueError(f"asked for {n} points but only {cand.size} isochrone points satisfy the cuts")
    if n == 0:
        return df.iloc[[]].copy()
    if weighting == "uniform":
        p = np.full(cand.size, 1.0 / cand.size)
    elif weighting == "logteff":
        lt = np.log10(df["teff"].to_numpy()[cand])
        edges = np.linspace(lt.min(), lt.max(), nbins + 1)
        b = np.clip(np.searchsorted(edges, lt, side="right") - 1, 0, nbins - 1)
        counts = np.bincount(b, minlength=nbins)
        p = 1.0 / counts[b]
        p /= p.sum()
    else:
        raise ValueError(f"weighting must be 'logteff' or 'uniform', not {weighting!r}")
    pick = rng.choice(cand, size=n, replace=False, p=p)
    return df.iloc[pick].reset_index(drop=True)


# ============================================================================ photometry

# Flags returned by gaia_photometry(..., return_flags=True), OR-ed.
PHOT_COLOUR_FALLBACK = 1      # BP−RP outside Casagrande et al. (2021) validity: dwarf-sequence shape
PHOT_COLOUR_EXTRAPOLATED = 2  # Teff > 10,700 K: BP−RP from the B−V-based extension of the dwarf sequence
PHOT_BC_FALLBACK = 4          # Teff outside 3,300–8,000 K: BC_G from the dwarf sequence, not Andrae et al.
PHOT_CLAMPED = 8              # Teff beyond the dwarf sequence (< 2,330 K or > 45,900 K): values held at its end
PHOT_INPUT_CLIPPED = 16       # log g or [Fe/H] clipped to the colour relation's range (0–5; −4…+0.6)

# Casagrande et al. (2021, MNRAS 507, 2684), Table 1 (Gaia DR3/EDR3 BP−RP row), as
# distributed by the first author in `colte` (github.com/casaluca/colte, DR3 branch):
#   Teff = c0 + c1 X + c2 X² + c3 X³ + c4 X⁵
#        + logg (c5 + c6 X + c7 X² + c8 X³ + c9 X⁵)
#        + [Fe/H] (c10 + c11 X + c12 X² + c13 X³) + c14 [Fe/H] logg X,   X = (BP−RP)₀.
# Valid 0.20 ≤ X ≤ 2.00 for log g > 3.2 and 0.20 ≤ X ≤ 2.55 for log g ≤ 3.2, log g 0–5,
# [Fe/H] ≤ 0.6 (colte clamps [Fe/H] < −4 to −4).
_C21 = np.array([7980.8845, -4138.3457, 1264.9366, -130.4388, 0.0,
                 285.8393, -324.2196, 106.8511, -4.9825, 0.0,
                 4.5138, -203.7774, 126.6981, -14.7442, 40.7376])
_C21_RANGE_DWARF = (0.20, 2.00)
_C21_RANGE_GIANT = (0.20, 2.55)
_C21_LOGG_SPLIT = 3.2
_C21_MIN_SLOPE = 250.0  # K per mag: used only where |dTeff/dX| exceeds this (see _bp_rp_chunk)

# Andrae et al. (2018, A&A 616, A8), Table 8: BC_G(Teff) = Σ a_i (Teff − 5772 K)^i, for
# M_bol,⊙ = 4.74 (so BC_G,⊙ = +0.06 and M_G,⊙ = 4.68); two pieces, 4000–8000 K and
# 3300–4000 K (they meet within 0.004 mag at 4000 K).
_A18_HOT = np.array([6.000e-02, 6.731e-05, -6.647e-08, 2.859e-11, -7.197e-15])
_A18_COOL = np.array([1.749e00, 1.977e-03, 3.737e-07, -8.966e-11, -4.183e-14])
_A18_RANGE = (3300.0, 8000.0)

# Dwarf sequence of Pecaut & Mamajek (2013, ApJS 208, 9), online table
# "A Modern Mean Dwarf Stellar Color and Effective Temperature Sequence", version
# 2024.05.15 (E. Mamajek; Gaia DR2 G/BP/RP). Columns: Teff, BCv, Mbol, B−V, G−V, BP−RP, M_G
# (NaN where the table has none). Used only outside the two relations above, for the
# shape of BP−RP(Teff) and BC_G(Teff), joined continuously to them (see gaia_photometry).
_NAN = np.nan
_PM13 = np.array([
    # Teff   BCv    Mbol    B-V     G-V     Bp-Rp   M_G
    (45900, -4.01, -9.81, -0.330, _NAN, _NAN, _NAN),     # O3V
    (41400, -3.76, -9.11, -0.323, 0.01, _NAN, _NAN),     # O5V
    (37900, -3.41, -8.21, -0.318, _NAN, _NAN, _NAN),     # O7V
    (35100, -3.24, -7.74, -0.315, 0.00, _NAN, _NAN),     # O8V
    (33300, -3.11, -7.31, -0.312, _NAN, _NAN, _NAN),     # O9V
    (31400, -2.99, -6.89, -0.301, 0.01, _NAN, _NAN),     # B0V
    (29000, -2.83, -6.33, -0.289, 0.01, _NAN, _NAN),     # B0.5V
    (26000, -2.58, -5.58, -0.278, 0.00, _NAN, _NAN),     # B1V
    (24500, -2.44, -5.04, -0.252, -0.021, _NAN, _NAN),   # B1.5V
    (20600, -2.03, -3.83, -0.215, 0.015, _NAN, _NAN),    # B2V
    (18500, -1.77, -3.27, -0.198, -0.003, _NAN, _NAN),   # B2.5V
    (17000, -1.54, -2.74, -0.178, 0.01, _NAN, -1.19),    # B3V
    (16400, -1.49, -2.49, -0.165, 0.015, _NAN, -0.99),   # B4V
    (15700, -1.34, -2.19, -0.156, 0.013, _NAN, -0.84),   # B5V
    (14500, -1.13, -1.68, -0.140, 0.020, _NAN, -0.54),   # B6V
    (14000, -1.05, -1.45, -0.128, 0.012, _NAN, -0.39),   # B7V
    (12300, -0.73, -0.73, -0.109, 0.02, _NAN, -0.01),    # B8V
    (10700, -0.42, 0.08, -0.070, 0.02, -0.120, 0.515),   # B9V
    (10400, -0.36, 0.24, -0.050, 0.017, -0.087, 0.615),  # B9.5V
    (9700, -0.21, 0.78, 0.000, 0.015, -0.037, 1.00),     # A0V
    (9300, -0.14, 1.02, 0.035, 0.01, 0.005, 1.16),       # A1V
    (8840, -0.07, 1.28, 0.070, 0.00, 0.068, 1.345),      # A2V
    (8600, -0.04, 1.66, 0.100, -0.005, 0.110, 1.69),     # A3V
    (8250, -0.02, 1.92, 0.140, -0.01, 0.166, 1.92),      # A4V
    (8100, 0.00, 2.01, 0.160, -0.015, 0.194, 1.98),      # A5V
    (7910, 0.005, 2.13, 0.185, -0.02, 0.222, 2.09),      # A6V
    (7760, 0.01, 2.24, 0.210, -0.03, 0.263, 2.19),       # A7V
    (7590, 0.02, 2.34, 0.250, -0.04, 0.320, 2.27),       # A8V
    (7400, 0.02, 2.45, 0.270, -0.05, 0.327, 2.37),       # A9V
    (7220, 0.01, 2.58, 0.295, -0.06, 0.377, 2.51),       # F0V
    (7020, 0.005, 2.77, 0.330, -0.07, 0.434, 2.69),      # F1V
    (6820, -0.005, 2.97, 0.370, -0.08, 0.490, 2.89),     # F2V
    (6550, -0.02, 3.35, 0.440, -0.11, 0.587, 3.26),      # F5V
    (6350, -0.03, 3.66, 0.486, -0.13, 0.640, 3.56),      # F6V
    (6180, -0.04, 4.01, 0.530, -0.127, 0.694, 3.90),     # F8V
    (5930, -0.065, 4.42, 0.595, -0.155, 0.784, 4.325),   # G0V
    (5770, -0.085, 4.72, 0.650, -0.155, 0.823, 4.635),   # G2V
    (5660, -0.105, 4.88, 0.680, -0.160, 0.850, 4.801),   # G5V
    (5480, -0.14, 5.16, 0.730, -0.200, 0.900, 5.098),    # G8V
    (5290, -0.195, 5.59, 0.816, -0.21, 0.983, 5.553),    # K0V
    (5100, -0.26, 5.81, 0.884, -0.25, 1.10, 5.83),       # K2V
    (4870, -0.365, 6.17, 0.990, -0.31, 1.19, 6.22),      # K3V
    (4600, -0.52, 6.46, 1.090, -0.39, 1.34, 6.59),       # K4V
    (4440, -0.63, 6.65, 1.150, -0.43, 1.43, 6.85),       # K5V
    (4300, -0.75, 6.89, 1.240, -0.49, 1.53, 7.15),       # K6V
    (4090, -0.93, 7.23, 1.340, -0.59, 1.70, 7.57),       # K7V
    (3930, -1.07, 7.49, 1.400, -0.68, 1.79, 7.90),       # K9V
    (3850, -1.15, 7.65, 1.420, -0.69, 1.84, 8.10),       # M0V
    (3660, -1.42, 8.22, 1.485, -0.81, 2.09, 8.82),       # M1V
    (3560, -1.62, 8.59, 1.505, -0.925, 2.23, 9.29),      # M2V
    (3430, -1.93, 9.21, 1.53, -1.10, 2.50, 10.05),       # M3V
    (3270, -2.28, 9.82, 1.60, -1.28, 2.78, 10.82),       # M3.5V
    (3210, -2.51, 10.10, 1.65, -1.40, 2.94, 11.21),      # M4V
    (3110, -2.84, 10.74, 1.69, -1.54, 3.16, 12.04),      # M4.5V
    (3060, -3.11, 11.04, 1.83, -1.70, 3.35, 12.45),      # M5V
    (2930, -3.58, 11.72, 1.94, -1.95, 3.71, 13.35),      # M5.5V
    (2810, -4.13, 12.19, 2.01, -2.37, 4.16, 14.26),      # M6V
    (2680, -4.99, 12.71, 2.12, -2.98, 4.65, 14.72),      # M7V
    (2570, -5.65, 12.95, 2.15, -3.11, 4.86, 15.20),      # M8V
    (2380, -5.86, 13.54, 2.17, -3.06, 4.78, 16.20),      # M9V
    (2330, -6.13, 13.67, _NAN, -3.10, 4.86, 16.40),      # M9.5V
], dtype=np.float64)


def _dwarf_sequence() -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64], float]:
    """(log Teff ascending, BP−RP, BC_G, hottest Teff with a tabulated BP−RP)."""
    t = _PM13[::-1]  # ascending Teff
    teff, bcv, mbol, bv, gv, bprp, mg = t.T
    lt = np.log10(teff)
    # BC_G = Mbol − M_G where the table gives both, else BC_V − (G−V), G−V interpolated in log Teff
    gv_f = np.interp(lt, lt[np.isfinite(gv)], gv[np.isfinite(gv)])
    bcg = np.where(np.isfinite(mg), mbol - mg, bcv - gv_f)
    # BP−RP hotter than B9V (no Gaia colours there): linear in B−V, fitted on B9V–A2V,
    # where BP−RP rises with B−V at ~1.2 mag/mag. An extrapolation, flagged as such.
    have = np.isfinite(bprp)
    hot_fit = have & (teff >= 8800) & (teff <= 10700)
    slope, icpt = np.polyfit(bv[hot_fit], bprp[hot_fit], 1)
    bprp_f = np.where(have, bprp, slope * bv + icpt)
    # M9.5V has no B−V: its tabulated BP−RP is used; nothing else is missing
    return lt, bprp_f, bcg, float(teff[have].max())


_DS_LOGT, _DS_BPRP, _DS_BCG, _DS_TEFF_BPRP_MAX = _dwarf_sequence()
_DS_TEFF_RANGE = (float(10 ** _DS_LOGT[0]), float(10 ** _DS_LOGT[-1]))


def _ds_bprp(teff: NDArray[np.float64]) -> NDArray[np.float64]:
    return np.interp(np.log10(teff), _DS_LOGT, _DS_BPRP)


def _ds_bcg(teff: NDArray[np.float64]) -> NDArray[np.float64]:
    return np.interp(np.log10(teff), _DS_LOGT, _DS_BCG)


def _andrae(teff: NDArray[np.float64]) -> NDArray[np.float64]:
    dt = teff - 5772.0
    hot = np.polyval(_A18_HOT[::-1], dt)
    cool = np.polyval(_A18_COOL[::-1], dt)
    return np.where(teff >= 4000.0, hot, cool)


def bc_g(teff: ArrayLike, *, return_flags: bool = False) -> Any:
    """Gaia G bolometric correction (M_bol,⊙ = 4.74 scale): BC_G = M_bol − M_G.

    3,300–8,000 K: Andrae et al. (2018) Table 8. Outside: the Pecaut & Mamajek dwarf
    sequence's BC_G (M_bol − M_G, or BC_V − (G−V)), shifted to meet Andrae's value at
    the boundary (offsets ≈ −0.02 mag at 8,000 K and −0.03 mag at 3,300 K), flagged
    ``PHOT_BC_FALLBACK``; beyond the sequence's ends (2,330 K, 45,900 K) held constant
    and flagged ``PHOT_CLAMPED``.
    """
    t = np.asarray(teff, dtype=np.float64)
    tc = np.clip(t, *_DS_TEFF_RANGE)
    lo, hi = _A18_RANGE
    out = _andrae(np.clip(t, lo, hi))
    off_hot = _andrae(np.array(hi)) - _ds_bcg(np.array(hi))
    off_cool = _andrae(np.array(lo)) - _ds_bcg(np.array(lo))
    out = np.where(t > hi, _ds_bcg(tc) + off_hot, out)
    out = np.where(t < lo, _ds_bcg(tc) + off_cool, out)
    if not return_flags:
        return out
    flags = np.where((t < lo) | (t > hi), PHOT_BC_FALLBACK, 0)
    flags |= np.where((t < _DS_TEFF_RANGE[0]) | (t > _DS_TEFF_RANGE[1]), PHOT_CLAMPED, 0)
    return out, flags.astype(np.int16)


def _c21_teff(x: NDArray[np.float64], logg: NDArray[np.float64], feh: NDArray[np.float64]) -> NDArray[np.float64]:
    c = _C21
    x2 = x * x
    x3 = x2 * x
    x5 = x3 * x2
    return (c[0] + c[1] * x + c[2] * x2 + c[3] * x3 + c[4] * x5
            + logg * (c[5] + c[6] * x + c[7] * x2 + c[8] * x3 + c[9] * x5)
            + feh * (c[10] + c[11] * x + c[12] * x2 + c[13] * x3) + c[14] * feh * logg * x)


def bp_rp_from_teff(teff: ArrayLike, logg: ArrayLike, feh: ArrayLike, *, return_flags: bool = False,
                    chunk: int = 100_000) -> Any:
    """Intrinsic Gaia (BP−RP)₀ for given Teff, log g, [Fe/H].

    Inside its validity the Casagrande et al. (2021) relation Teff(X, log g, [Fe/H]) is
    inverted for X (bracketed on a 0.05-mag grid, then bisection to 1e-7 mag). Its red
    end is X = 2.00 for log g > 3.2 and 2.55 otherwise, or, if sooner, where the
    polynomial flattens to |dTeff/dX| < 250 K/mag (it turns over near its red end for
    many log g, [Fe/H]). Hotter than the blue end (X = 0.20) or cooler than the red
    end, BP−RP = X_edge + S(Teff) − S(Teff_edge)
    with S the Pecaut & Mamajek dwarf sequence, so the colour is continuous in Teff;
    flagged ``PHOT_COLOUR_FALLBACK`` (and ``PHOT_COLOUR_EXTRAPOLATED`` above 10,700 K,
    where S itself comes from a B−V extension, ``PHOT_CLAMPED`` beyond S's ends).
    """
    t, g, z = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64) for v in (teff, logg, feh)))
    shape = t.shape
    t, g, z = t.ravel(), g.ravel(), z.ravel()
    out = np.full(t.size, np.nan)
    flags = np.zeros(t.size, np.int16)
    for s in range(0, t.size, chunk):
        sl = slice(s, s + chunk)
        out[sl], flags[sl] = _bp_rp_chunk(t[sl], g[sl], z[sl])
    out = out.reshape(shape)
    flags = flags.reshape(shape)
    return (out, flags) if return_flags else out


def _bp_rp_chunk(t: NDArray[np.float64], g: NDArray[np.float64], z: NDArray[np.float64]
                 ) -> tuple[NDArray[np.float64], NDArray[np.int16]]:
    flags = np.zeros(t.size, np.int16)
    finite = np.isfinite(t) & np.isfinite(g) & np.isfinite(z)
    gc = np.clip(np.where(finite, g, 4.0), 0.0, 5.0)
    zc = np.clip(np.where(finite, z, 0.0), -4.0, 0.6)
    t = np.where(finite, t, np.nan)
    flags |= np.where(finite & ((gc != g) | (zc != z)), PHOT_INPUT_CLIPPED, 0).astype(np.int16)
    dwarf = gc > _C21_LOGG_SPLIT
    xhi = np.where(dwarf, _C21_RANGE_DWARF[1], _C21_RANGE_GIANT[1])
    xlo = _C21_RANGE_DWARF[0]
    grid = np.arange(xlo, _C21_RANGE_GIANT[1] + 1e-9, 0.05)
    tg = _c21_teff(grid[None, :], gc[:, None], zc[:, None])  # (n, m) decreasing in X (mostly)
    tg = np.where(grid[None, :] <= xhi[:, None] + 1e-9, tg, np.nan)  # columns past the red end
    # The polynomial flattens towards its red end for some log g and [Fe/H] (for giants at
    # solar [Fe/H], Teff changes by 25 K from X = 2.3 to 2.55), where inverting it would
    # swing the colour by tenths of a magnitude per few K. Use it only while it is
    # steeper than _C21_MIN_SLOPE; redder than that the dwarf sequence takes over.
    slope = np.diff(tg, axis=1) / np.diff(grid)[None, :]
    flat = ~(slope <= -_C21_MIN_SLOPE)  # NaN (past the red end) counts as flat
    j_red = np.where(flat.any(axis=1), np.argmax(flat, axis=1), grid.size - 1)
    rows = np.arange(t.size)
    tg = np.where(np.arange(grid.size)[None, :] <= j_red[:, None], tg, np.nan)
    tmono = tg  # strictly decreasing up to j_red
    t_blue = tg[:, 0]
    t_red = tg[rows, j_red]
    inside = (t <= t_blue) & (t >= t_red) & np.isfinite(t)
    x = np.full(t.size, np.nan)
    if inside.any():
        ti = t[inside]
        tm = tmono[inside]
        # first column where Teff drops to ≤ target
        j = np.argmax(np.where(np.isfinite(tm), tm <= ti[:, None], False), axis=1)
        j = np.clip(j, 1, None)
        a = grid[j - 1]
        b = grid[j]
        gi, zi = gc[inside], zc[inside]
        for _ in range(22):  # bisection on the exact relation inside the bracket
            mid = 0.5 * (a + b)
            hot = _c21_teff(mid, gi, zi) > ti
            a = np.where(hot, mid, a)
            b = np.where(hot, b, mid)
        x[inside] = 0.5 * (a + b)
        exact_blue = ti == t_blue[inside]
        x[np.flatnonzero(inside)[exact_blue]] = xlo
    hot_side = np.isfinite(t) & (t > t_blue)
    cool_side = np.isfinite(t) & (t < t_red)
    tcl = np.clip(t, *_DS_TEFF_RANGE)
    x = np.where(hot_side, xlo + _ds_bprp(tcl) - _ds_bprp(t_blue), x)
    x_red = grid[j_red]
    x = np.where(cool_side, x_red + _ds_bprp(tcl) - _ds_bprp(np.clip(t_red, *_DS_TEFF_RANGE)), x)
    flags |= np.where(hot_side | cool_side, PHOT_COLOUR_FALLBACK, 0).astype(np.int16)
    flags |= np.where(hot_side & (t > _DS_TEFF_BPRP_MAX), PHOT_COLOUR_EXTRAPOLATED, 0).astype(np.int16)
    flags |= np.where((t < _DS_TEFF_RANGE[0]) | (t > _DS_TEFF_RANGE[1]), PHOT_CLAMPED, 0).astype(np.int16)
    return np.where(finite, x, np.nan), flags


def gaia_photometry(teff: ArrayLike, logg: ArrayLike, feh: ArrayLike, mbol: ArrayLike, *,
                    mbol_sun: float = MBOL_SUN, return_flags: bool = False) -> Any:
    """Intrinsic Gaia (BP−RP)₀ and absolute M_G for model stars.

    ``bp_rp`` from :func:`bp_rp_from_teff` (Casagrande et al. 2021), ``M_G = Mbol − BC_G``
    with BC_G from :func:`bc_g` (Andrae et al. 2018). ``mbol_sun`` is the zero point of
    the given Mbol (4.74 for the lachesis PARSEC and MIST grids); other zero points are
    moved onto Andrae's 4.74 scale. With ``return_flags`` a third array ORs the
    ``PHOT_*`` flags (0 = both relations inside their calibrated ranges).
    """
    t, g, z, mb = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64) for v in (teff, logg, feh, mbol)))
    bprp, f1 = bp_rp_from_teff(t, g, z, return_flags=True)
    bc, f2 = bc_g(t, return_flags=True)
    mg = (mb - (mbol_sun - MBOL_SUN)) - bc
    if return_flags:
        return bprp, mg, (f1 | f2).astype(np.int16)
    return bprp, mg


# ============================================================================ CMD look-up


def _cmd_table(name: str, log_age_range: tuple[float, float]) -> pd.DataFrame:
    return _cmd_table_cached(_grid_name(name), tuple(float(v) for v in log_age_range))


@functools.lru_cache(maxsize=4)
def _cmd_table_cached(name: str, log_age_range: tuple[float, float]) -> pd.DataFrame:
    df = _load(name)
    m = df["stage_ok"].to_numpy() & (df["log_age"].to_numpy() >= log_age_range[0]) \
        & (df["log_age"].to_numpy() <= log_age_range[1])
    tab = df[m].reset_index(drop=True)
    bprp, mg, fl = gaia_photometry(tab["teff"], tab["logg"], tab["feh"], tab["mbol"],
                                   mbol_sun=df.attrs["mbol_sun"], return_flags=True)
    tab["bp_rp"] = bprp
    tab["M_G"] = mg
    tab["phot_flags"] = fl
    tab.attrs.update(df.attrs)
    return tab


def isochrone_photometry(name: str = "parsec_v1.25", *, log_age_range: tuple[float, float] = (7.0, 10.13)
                         ) -> pd.DataFrame:
    """The ``stage_ok`` isochrone points within ``log_age_range`` with ``bp_rp``, ``M_G``
    and ``phot_flags`` columns (:func:`gaia_photometry`). Cached; returns a copy.

    The default ages run from 10 Myr (O/B stars need young isochrones) to 13.5 Gyr.
    """
    return _cmd_table(name, tuple(float(v) for v in log_age_range)).copy()


def _cmd_tree(name: str, log_age_range: tuple[float, float], mag_scale: float):  # noqa: ANN202
    return _cmd_tree_cached(_grid_name(name), tuple(float(v) for v in log_age_range), float(mag_scale))


@functools.lru_cache(maxsize=8)
def _cmd_tree_cached(name: str, log_age_range: tuple[float, float], mag_scale: float):  # noqa: ANN202
    from scipy.spatial import cKDTree

    tab = _cmd_table(name, log_age_range)
    return cKDTree(np.column_stack([tab["bp_rp"].to_numpy(), tab["M_G"].to_numpy() / mag_scale]))


def nearest_isochrone_point(bp_rp0: ArrayLike, M_G: ArrayLike, *, table: pd.DataFrame | None = None,  # noqa: N803
                            name: str = "parsec_v1.25", mag_scale: float = 5.0,
                            log_age_range: tuple[float, float] = (7.0, 10.13)) -> pd.DataFrame:
    """For each star, the isochrone point nearest in the Gaia CMD (paper §3.2).

    Distance is ``sqrt(Δ(BP−RP)² + (ΔM_G / mag_scale)²)`` in magnitudes of colour: with
    the default 5, 0.1 mag in M_G (a 5% parallax error) weighs as 0.02 mag in colour.
    ``table`` is any subset of :func:`isochrone_photometry` (e.g. one metallicity, when a
    spectroscopic [Fe/H] is known); by default every ``stage_ok`` point aged
    ``log_age_range`` of grid ``name``.

    Returns one row per star (in input order): ``teff``, ``logg``, ``feh``, ``log_age``,
    ``mass``, ``phase``, the matched ``bp_rp`` and ``M_G``, ``phot_flags``, ``cmd_distance``
    and ``index`` (row of the table). Stars with non-finite inputs get NaN, and −1 in the
    integer columns.
    Callers should reject matches whose ``cmd_distance`` is large (e.g. > 0.1: binaries,
    white dwarfs, bad photometry).
    """
    from scipy.spatial import cKDTree

    c = np.atleast_1d(np.asarray(bp_rp0, dtype=np.float64))
    mg = np.atleast_1d(np.asarray(M_G, dtype=np.float64))
    c, mg = np.broadcast_arrays(c, mg)
    c, mg = c.ravel(), mg.ravel()
    if table is None:
        ages = tuple(float(v) for v in log_age_range)
        tab = _cmd_table(name, ages)
        tree = _cmd_tree(name, ages, float(mag_scale))
    else:
        missing = {"bp_rp", "M_G", "teff", "logg", "feh"} - set(table.columns)
        if missing:
            raise ValueError(f"table lacks column(s) {sorted(missing)}; use isochrone_photometry() rows")
        tab = table.reset_index(drop=True)
        tree = cKDTree(np.column_stack([tab["bp_rp"].to_numpy(), tab["M_G"].to_numpy() / mag_scale]))
    ok = np.isfinite(c) & np.isfinite(mg)
    dist = np.full(c.size, np.nan)
    idx = np.full(c.size, -1, dtype=np.int64)
    if ok.any():
        d, i = tree.query(np.column_stack([c[ok], mg[ok] / mag_scale]))
        dist[ok] = d
        idx[ok] = i
    cols = ["teff", "logg", "feh", "log_age", "mass", "phase", "bp_rp", "M_G", "phot_flags"]
    cols = [col for col in cols if col in tab.columns]
    out = {}
    for col in cols:
        v = tab[col].to_numpy()
        arr = np.full(c.size, np.nan) if v.dtype.kind in "fc" else np.full(c.size, -1, dtype=v.dtype)
        arr[ok] = v[idx[ok]]
        out[col] = arr
    res = pd.DataFrame(out)
    res["cmd_distance"] = dist
    res["index"] = idx
    return res
