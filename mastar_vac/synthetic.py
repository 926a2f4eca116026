"""The theoretical extension of the reference set (Imig et al. 2022 §2.4).

Above 6,000 K the empirical reference set is thin, so the paper adds synthetic spectra:
as many as there are empirical stars, at PARSEC isochrone points with Teff > 6,000 K,
interpolated in a synthetic grid (FERRE format), with random [α/Fe] and v_micro inside
the grid, convolved to the median MaStar LSF. :func:`make_synthetic_reference` does that
and returns a :class:`~mastar_vac.reference.ReferenceSet` (``source = "synthetic"``) on the
MaStar grid, normalized exactly like the data, ready for
:meth:`ReferenceSet.concat <mastar_vac.reference.ReferenceSet.concat>`.

Labels
    Our label names are allStar-style (``TEFF``, ``LOGG``, ``FE_H``, ``ALPHA_FE``,
    ``LOG10_VMICRO``; also ``M_H``, ``ALPHA_M``, ``VMICRO``). Each is read from one grid
    axis, found by :attr:`SyntheticConfig.label_map` or recognized from common FERRE label
    names, case-insensitively and ignoring punctuation (:func:`recognize_grid_label`):
    TEFF/Teff (LOGTEFF: log10 K); LOGG; METALS/[M/H]/M_H/[Fe/H] → FE_H or M_H;
    'O Mg Si S Ca Ti'/ALPHA/ALPHA_M/[alpha/M] → ALPHA_FE or ALPHA_M; LOG10VDOP/LOGVMICRO
    (log10 km/s) or VMICRO/VDOP/VTURB (km/s) → LOG10_VMICRO. A grid axis in log10 feeding
    a linear label (or the reverse) is converted. In APOGEE/FERRE grids iron follows
    METALS and the α axis is [α/M], so METALS = [Fe/H] and [α/M] = [α/Fe] there.

How each grid axis gets its values
    * Teff, log g, [M/H]: from the isochrone point (PARSEC's [M/H] takes only 11 values,
      −2 … +0.5 in 0.25 dex, so by default each point's [M/H] is moved by up to ±0.125 dex,
      uniformly, inside the grid: ``metals_jitter``; 0 keeps the isochrone's own value).
    * other axes that a fitted label reads ([α/Fe], v_micro): uniform over the grid's range,
      uniform along the grid's own axis (so uniform in log v_micro for LOG10VDOP);
    * a fitted label in ``fixed_labels``: that value (on any axis but Teff and log g);
    * a rotation axis (VSINI, VROT in km/s; LGVSINI, LOG10VSINI in log10 km/s) that no
      fitted label reads: drawn per spectrum from ``vsini`` (km/s): uniform between its two
      values (``vsini_draw = "uniform"``, default 50–250 km/s) or one of its values, equally
      likely (``"choice"``). The default follows the A/B stars that dominate the extension
      above 8,000 K, which rotate at 100–250 km/s (mean v sin i ≈ 150 km/s), a width MaStar's
      R ≈ 1,800 resolves; slow rotators (Am/Ap) are the minority. For F stars or an
      APOGEE-like grid of cool stars set it lower, or pin the axis with ``grid_defaults``.
      A range reaching outside the grid's axis is an error, not a silent clip;
    * other axes no fitted label reads that are known quantities (α or v_micro when
      fitting three labels): the value in ``grid_defaults`` (keyed by the grid's label),
      else the grid's middle node (node (N−1)//2);
    * an axis whose name is none of these (C, N, or anything else): the value in
      ``grid_defaults``; without one it is an error naming the axis, since no default
      can be guessed (e.g. APOGEE's C and N middle nodes are not solar).

    A fitted label the grid lacks is an error (:class:`~mastar_vac.errors.ConfigError`)
    unless ``fixed_labels`` gives it (e.g. ``{"ALPHA_FE": 0.0}``): the label is then that
    constant for every synthetic spectrum.

LSF (:class:`LsfMatcher`)
    The target σ per MaStar pixel is the median DISP of the cube (:func:`median_mastar_lsf`).
    MaStar's DISP is the *post-pixelization* LSF (Law et al. 2021; PREDISP is the other),
    i.e. the width a Gaussian fit to the pixel values gives, so the matcher makes the
    width measured on the MaStar pixels equal the target. Second moments add, so the extra
    Gaussian applied on the grid's pixels has

        σ_extra² = σ_target² − σ_grid² − d_grid²/6 − (w_MaStar²/12 if target_pixelized)

    with σ_grid from the header's RESOLUTION (R = λ/FWHM; absent: 0, i.e. the grid is
    assumed to be at much higher resolution, which is logged), d_grid²/6 the variance the
    piecewise-linear resampling (:func:`mastar_vac.lsf.rebin`) adds, and w²/12 the MaStar
    pixel's box. The kernel is applied with :func:`mastar_vac.lsf.broaden` (exact discrete
    variance, per pixel) in the grid's own pixel units, converting Å with the local pixel
    width, so linear-λ and log-λ grids are both handled. Very fine grids (σ_target > 10
    grid pixels) are first block-averaged by an integer factor (the box variance is
    counted). Where σ_target² is already smaller than the other terms nothing can be done:
    the spectrum stays a bit broader than the target there (logged).

Coverage and weights
    MaStar pixels outside the grid's coverage, or within 3σ of its ends (where the kernel
    is truncated), get flux 0 and ivar 0. With ``snr = None`` the spectra are noise-free
    with ivar = (S/N_nominal / median flux)², S/N_nominal = ``noise_free_snr`` (500): large
    but finite, so that they weigh like very good empirical spectra rather than dominating
    any χ²-weighted loss. With ``snr`` given, Gaussian noise of that S/N (constant σ per
    spectrum = median flux / snr) is added. ``ReferenceSet.snr`` holds the nominal S/N.

Draws follow from the seed (``rng`` or ``config.seed``): the same seed and grid give
identical spectra and labels.
"""

from __future__ import annotations

import logging
import re
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from . import lsf
from .errors import ConfigError, InputFileError
from .io.ferre import FerreGrid, _axis_stencil, interpolate
from .normalize import DEFAULT_WINDOW, normalize_spectra
from .reference import ReferenceSet
from .wavegrid import MASTAR_NPIX, mastar_wavelength

__all__ = [
    "SyntheticConfig",
    "AxisRole",
    "SyntheticPlan",
    "recognize_grid_label",
    "plan_labels",
    "n_synthetic",
    "grid_sigma_aa",
    "LsfMatcher",
    "make_synthetic_reference",
    "synthetic_extension",
    "median_mastar_lsf",
    "mastarhc_lsf_sigma",
    "target_lsf",
]

log = logging.getLogger(__name__)

LSF_SOURCES = ("auto", "median", "reference", "mastarhc")
VSINI_DRAWS = ("uniform", "choice")
SCALES = ("linear", "log10")


# ============================================================================ configuration


@dataclass(frozen=True)
class SyntheticConfig:
    """The ``[synthetic]`` section: how the theoretical extension is drawn.

    The grid's path is the caller's (``inputs.synthetic_grid``). Mapping fields are plain
    dicts so that a TOML table loads into them.
    """

    n_spectra: int | None = None  # None: as many as there are empirical stars (the paper)
    teff_min: float = 6000.0  # K; isochrone points strictly hotter than this
    # OUR label name -> the grid's LABEL name; overrides the automatic recognition
    label_map: dict[str, str] = field(default_factory=dict)
    # grid LABEL name -> "linear" | "log10": how the axis is scaled, when the name does not say
    axis_scale: dict[str, str] = field(default_factory=dict)
    # OUR label name -> constant value, for labels the grid lacks (or to pin an axis)
    fixed_labels: dict[str, float] = field(default_factory=dict)
    # grid LABEL name -> value (grid units) for axes no fitted label reads; default: middle node
    grid_defaults: dict[str, float] = field(default_factory=dict)
    snr: float | None = None  # None: noise-free, ivar at noise_free_snr
    noise_free_snr: float = 500.0
    # the LSF the synthetic spectra are convolved to. "median": the median DISP of the
    # cube (the paper); "reference": the emulator's reference LSF σ_ref, the 1st
    # percentile of the visits (training through the LSF operator, issue 14);
    # "mastarhc": the median SRES of MaStarHC; "auto": "reference" with [fit] lsf =
    # "forward", else "median". Every synthetic spectrum records the σ it was given.
    lsf_sigma: str = "auto"
    target_pixelized: bool = True  # the target σ is post-pixelization (MaStar DISP); False: pre-pixel
    metals_jitter: float = 0.125  # dex; uniform shift of the isochrone [M/H] (PARSEC steps 0.25)
    isochrones: str = "parsec_v1.25"
    isochrone_weighting: str = "logteff"  # see mastar_vac.isochrones.sample_isochrone_points
    max_redraws: int = 5  # points whose model holds INVALID_CODE are drawn again up to this often
    # km/s, for a rotation axis no fitted label reads (module docstring: A/B stars rotate at
    # 100–250 km/s); "uniform": between the two values; "choice": one of the values
    vsini: tuple[float, ...] = (50.0, 250.0)
    vsini_draw: str = "uniform"
    seed: int = 20221

    def __post_init__(self) -> None:
        if self.n_spectra is not None and self.n_spectra < 0:
            raise ConfigError(f"synthetic.n_spectra must be >= 0 (or unset), got {self.n_spectra}")
        if self.snr is not None and not self.snr > 0:
            raise ConfigError(f"synthetic.snr must be > 0 (or unset for noise-free spectra), got {self.snr}")
        if not self.noise_free_snr > 0:
            raise ConfigError(f"synthetic.noise_free_snr must be > 0, got {self.noise_free_snr}")
        if self.lsf_sigma not in LSF_SOURCES:
            raise ConfigError(f"synthetic.lsf_sigma must be one of {LSF_SOURCES}, got {self.lsf_sigma!r}")
        if not self.metals_jitter >= 0:
            raise ConfigError(f"synthetic.metals_jitter must be >= 0, got {self.metals_jitter}")
        if self.max_redraws < 0:
            raise ConfigError(f"synthetic.max_redraws must be >= 0, got {self.max_redraws}")
        if self.vsini_draw not in VSINI_DRAWS:
            raise ConfigError(f"synthetic.vsini_draw must be one of {VSINI_DRAWS}, got {self.vsini_draw!r}")
        v = tuple(self.vsini)
        if (not v or any(isinstance(x, bool) or not isinstance(x, (int, float)) or not np.isfinite(x) or x < 0
                         for x in v)):
            raise ConfigError(f"synthetic.vsini must be finite numbers >= 0 (km/s), got {list(v)}")
        if self.vsini_draw == "uniform" and (len(v) != 2 or v[0] > v[1]):
            raise ConfigError(f"synthetic.vsini with vsini_draw = 'uniform' must be [min, max], got {list(v)}")
        bad = {k: v for k, v in self.axis_scale.items() if v not in SCALES}
        if bad:
            raise ConfigError(f"synthetic.axis_scale: {bad} — each value must be one of {SCALES}")
        for name, mapping in (("label_map", self.label_map),):
            bad = {k: v for k, v in mapping.items() if not isinstance(v, str) or not v.strip()}
            if bad:
                raise ConfigError(f"synthetic.{name}: {bad} — values must be grid label names")
        for name, mapping in (("fixed_labels", self.fixed_labels), ("grid_defaults", self.grid_defaults)):
            bad = {k: v for k, v in mapping.items()
                   if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v)}
            if bad:
                raise ConfigError(f"synthetic.{name}: {bad} — values must be finite numbers")


def n_synthetic(config: SyntheticConfig, n_empirical: int) -> int:
    """How many synthetic spectra to draw: ``config.n_spectra``, else ``n_empirical``."""
    return int(n_empirical if config.n_spectra is None else config.n_spectra)


# ============================================================================ label planning


def _norm(name: str) -> str:
    s = str(name).replace("α", "ALPHA").replace("Α", "ALPHA").upper()
    return re.sub(r"[^A-Z0-9]", "", s)


_GRID_NAMES: dict[str, tuple[str, str]] = {}


def _register(quantity: str, scale: str, *names: str) -> None:
    for n in names:
        _GRID_NAMES[_norm(n)] = (quantity, scale)


_register("teff", "linear", "TEFF", "T_EFF", "TEMPERATURE")
_register("teff", "log10", "LOGTEFF", "LOG10TEFF", "LGTEFF")
_register("logg", "linear", "LOGG", "LOG_G", "LGG", "GRAVITY")
_register("metals", "linear", "METALS", "[M/H]", "M_H", "[Fe/H]", "FE_H", "METALLICITY", "[Z/H]", "Z_H",
          "LOGZ", "MET")
_register("alpha", "linear", "O Mg Si S Ca Ti", "ALPHA", "ALPHA_M", "[alpha/M]", "[A/M]", "ALPHA_FE",
          "[alpha/Fe]", "[A/Fe]", "ALPHAFE", "AM", "AFE")
_register("vmicro", "log10", "LOG10VDOP", "LOGVDOP", "LGVDOP", "LOGVMICRO", "LOG10VMICRO", "LGVMICRO",
          "LOGVMIC", "LOG10VMIC", "LOGVTURB", "LOG10VTURB", "LOGXI", "LOG10XI")
_register("vmicro", "linear", "VMICRO", "VDOP", "VTURB", "VMIC", "XI", "MICRO", "MICROTURBULENCE", "VT")
_register("vsini", "linear", "VSINI", "VROT", "V_SINI", "VSIN_I")
_register("vsini", "log10", "LGVSINI", "LOGVSINI", "LOG10VSINI", "LGVROT", "LOGVROT")

# our (allStar-style) label names: quantity and scale
_OUR_NAMES: dict[str, tuple[str, str]] = {
    "TEFF": ("teff", "linear"),
    "LOGG": ("logg", "linear"),
    "FE_H": ("metals", "linear"),
    "M_H": ("metals", "linear"),
    "ALPHA_FE": ("alpha", "linear"),
    "ALPHA_M": ("alpha", "linear"),
    "LOG10_VMICRO": ("vmicro", "log10"),
    "VMICRO": ("vmicro", "linear"),
}

_ISOCHRONE_QUANTITIES = ("teff", "logg", "metals")


def recognize_grid_label(name: str) -> tuple[str, str] | None:
    """(quantity, scale) of a FERRE label name, or None when it is not a known one.

    Quantities: teff, logg, metals, alpha, vmicro; scale "linear" or "log10" (e.g.
    ``recognize_grid_label("LOG10VDOP") == ("vmicro", "log10")``).
    """
    return _GRID_NAMES.get(_norm(name))


def _our_quantity(label: str) -> tuple[str, str]:
    return _OUR_NAMES.get(label.strip().upper(), (f"label:{_norm(label)}", "linear"))


def _convert(values: ArrayLike, from_scale: str, to_scale: str) -> NDArray[np.float64]:
    v = np.asarray(values, np.float64)
    if from_scale == to_scale:
        return v
    if from_scale == "linear" and to_scale == "log10":
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.log10(v)
    return 10.0**v


@dataclass(frozen=True)
class AxisRole:
    """How one grid axis gets its values."""

    grid_label: str
    quantity: str  # teff, logg, metals, alpha, vmicro, vsini, or "label:NAME"/"axis:NAME"
    scale: str  # "linear" | "log10": what the grid's axis values are
    source: str  # "isochrone" | "random" | "fixed" | "default" | "rotation" (drawn from config.vsini)
    value: float | None  # grid units, for "fixed" and "default"
    labels: tuple[str, ...]  # our labels read from this axis


@dataclass(frozen=True)
class SyntheticPlan:
    """Which grid axis (or constant) provides each of our labels."""

    label_names: tuple[str, ...]
    axes: tuple[AxisRole, ...]  # in grid order
    label_axis: dict[str, int]  # our label -> grid axis
    fixed: dict[str, float]  # our label -> constant (labels the grid lacks)

    def axis_of(self, quantity: str) -> int | None:
        hits = [i for i, a in enumerate(self.axes) if a.quantity == quantity]
        return hits[0] if hits else None

    def describe(self) -> str:
        parts = []
        for a in self.axes:
            s = f"{a.grid_label}[{a.scale}]: {a.source}"
            if a.value is not None:
                s += f" {a.value:g}"
            if a.labels:
                s += f" -> {','.join(a.labels)}"
            parts.append(s)
        parts += [f"{k} fixed at {v:g} (not in grid)" for k, v in self.fixed.items()]
        return "; ".join(parts)


def _find_axis(grid: FerreGrid, name: str) -> int | None:
    key = _norm(name)
    hits = [i for i, g in enumerate(grid.labels) if _norm(g) == key]
    return hits[0] if hits else None


def _grid_name(grid: FerreGrid) -> str:
    return str(grid.path) if grid.path is not None else "the synthetic grid"


def plan_labels(grid: FerreGrid, label_names: Sequence[str], config: SyntheticConfig = SyntheticConfig()
                ) -> SyntheticPlan:
    """Map our labels onto the grid's axes (see the module docstring); raises ConfigError.

    Entries of ``label_map`` and ``fixed_labels`` for labels not in ``label_names`` are
    ignored (one configuration serves runs that fit 3 or 5 labels); unknown grid label
    names in ``label_map``, ``axis_scale`` or ``grid_defaults`` are errors.
    """
    labels = [str(x) for x in label_names]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"duplicate label names in {labels}")
    gname = _grid_name(grid)
    nd = grid.ndim

    # axis quantity and scale from the name, then config.axis_scale
    qty: list[str] = []
    scale: list[str | None] = []
    for g in grid.labels:
        r = recognize_grid_label(g)
        qty.append(r[0] if r else f"axis:{_norm(g)}")
        scale.append(r[1] if r else None)
    for g, sc in config.axis_scale.items():
        a = _find_axis(grid, g)
        if a is None:
            raise ConfigError(f"synthetic.axis_scale names {g!r}, which is not a label of {gname} "
                              f"(labels: {grid.labels})")
        scale[a] = sc

    # our label -> axis
    label_axis: dict[str, int] = {}
    fixed: dict[str, float] = {}
    missing: list[str] = []
    for lab in labels:
        our_q, _ = _our_quantity(lab)
        if lab in config.label_map:
            a = _find_axis(grid, config.label_map[lab])
            if a is None:
                raise ConfigError(f"synthetic.label_map maps {lab} to {config.label_map[lab]!r}, which is not a "
                                  f"label of {gname} (labels: {grid.labels})")
        else:
            hits = [i for i in range(nd) if qty[i] == our_q or _norm(grid.labels[i]) == _norm(lab)]
            if len(hits) > 1:
                raise ConfigError(f"label {lab} matches several axes of {gname}: "
                                  f"{[grid.labels[i] for i in hits]}; choose one with synthetic.label_map")
            a = hits[0] if hits else None
        if a is None:
            if lab in config.fixed_labels:
                fixed[lab] = float(config.fixed_labels[lab])
            else:
                missing.append(lab)
            continue
        label_axis[lab] = a
    if missing:
        raise ConfigError(
            f"label(s) {', '.join(missing)} requested but {gname} has no axis for them (its labels: "
            f"{grid.labels}); give each a constant in synthetic.fixed_labels (e.g. "
            f"{{{', '.join(repr(m) + ': 0.0' for m in missing)}}}) or name its axis in synthetic.label_map")

    # an axis read by our labels takes their quantity (an explicit map wins over the name)
    readers: dict[int, list[str]] = {}
    for lab, a in label_axis.items():
        readers.setdefault(a, []).append(lab)
    for a, labs in readers.items():
        qs = {_our_quantity(lb)[0] for lb in labs}
        if len(qs) > 1:
            raise ConfigError(f"labels {labs} of different kinds all read axis {grid.labels[a]} of {gname}")
        q = qs.pop()
        if not q.startswith("label:"):
            if qty[a] != q and not qty[a].startswith("axis:"):
                log.warning("synthetic: %s is read from grid axis %r, which looks like %s", labs, grid.labels[a],
                            qty[a])
            qty[a] = q
        if scale[a] is None:
            scale[a] = _our_quantity(labs[0])[1]

    defaults = {}
    for g, v in config.grid_defaults.items():
        a = _find_axis(grid, g)
        if a is None:
            raise ConfigError(f"synthetic.grid_defaults names {g!r}, which is not a label of {gname} "
                              f"(labels: {grid.labels})")
        if a in readers:
            raise ConfigError(f"synthetic.grid_defaults sets {grid.labels[a]}, which the fitted label(s) "
                              f"{readers[a]} read; use synthetic.fixed_labels to pin a fitted label")
        defaults[a] = float(v)

    for q in ("teff", "logg"):
        hits = [i for i in range(nd) if qty[i] == q]
        if len(hits) != 1:
            raise ConfigError(f"{gname} needs exactly one {q.upper()} axis to place isochrone points, found "
                              f"{[grid.labels[i] for i in hits] or 'none'} among {grid.labels} "
                              f"(name it with synthetic.label_map)")
    metal_axes = [g for g, q in zip(grid.labels, qty) if q == "metals"]
    if len(metal_axes) > 1:
        raise ConfigError(f"{gname} has several metallicity axes {metal_axes}; grids with one are supported")

    lo, hi = grid.label_range
    roles = []
    for a in range(nd):
        labs = tuple(readers.get(a, ()))
        sc = scale[a] or "linear"
        val: float | None = None
        pinned = [lb for lb in labs if lb in config.fixed_labels]
        if pinned:
            vals = {float(_convert(config.fixed_labels[lb], _our_quantity(lb)[1], sc)) for lb in pinned}
            if len(vals) > 1:
                raise ConfigError(f"synthetic.fixed_labels gives {pinned} different values for axis {grid.labels[a]}")
            val = vals.pop()
            source = "fixed"
        elif a in defaults:
            val, source = defaults[a], "fixed" if qty[a] == "metals" else "default"
        elif qty[a] in _ISOCHRONE_QUANTITIES:
            source = "isochrone"
        elif labs:
            source = "random"
        elif qty[a] == "vsini":
            source = "rotation"
            v = _convert(np.asarray(config.vsini, np.float64), "linear", sc)
            tol = 1e-9 * max(1.0, abs(grid.steps[a]))
            if not (np.all(np.isfinite(v)) and v.min() >= lo[a] - tol and v.max() <= hi[a] + tol):
                unit = "log10 km/s" if sc == "log10" else "km/s"
                raise ConfigError(f"synthetic.vsini = {list(config.vsini)} km/s reaches outside the rotation axis "
                                  f"{grid.labels[a]} of {gname} ([{lo[a]:g}, {hi[a]:g}] {unit}); choose values "
                                  f"inside it, or pin the axis with synthetic.grid_defaults")
        elif qty[a].startswith("axis:"):
            example = f"{grid.labels[a]!r} = {float(grid.nodes(a)[0]):g}"
            raise ConfigError(f"{gname} has an axis {grid.labels[a]!r} that the theoretical extension does not know "
                              f"how to draw (known: Teff, log g, metallicity, alpha, v_micro, v sin i); give it a "
                              f"value in synthetic.grid_defaults (e.g. {{{example}}}) or map a fitted label onto it "
                              f"with synthetic.label_map")
        else:
            nodes = grid.nodes(a)
            val, source = float(np.sort(nodes)[(len(nodes) - 1) // 2]), "default"
        if val is not None:
            if qty[a] in ("teff", "logg"):
                raise ConfigError(f"{grid.labels[a]} cannot be fixed: it comes from the isochrone points")
            tol = 1e-9 * max(1.0, abs(grid.steps[a]))
            if not (lo[a] - tol <= val <= hi[a] + tol):
                raise ConfigError(f"{grid.labels[a]} = {val:g} is outside {gname}'s range [{lo[a]:g}, {hi[a]:g}]")
            val = float(np.clip(val, lo[a], hi[a]))
        roles.append(AxisRole(grid.labels[a], qty[a], sc, source, val, labs))
    return SyntheticPlan(tuple(labels), tuple(roles), label_axis, fixed)


# ============================================================================ drawing


def _draw_points(grid: FerreGrid, plan: SyntheticPlan, n: int, config: SyntheticConfig,
                 rng: np.random.Generator) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """(labels (n, L) in our units, points (n, ndim) in grid units)."""
    from .isochrones import sample_isochrone_points

    lo, hi = grid.label_range
    ti, gi, mi = plan.axis_of("teff"), plan.axis_of("logg"), plan.axis_of("metals")
    assert ti is not None and gi is not None
    t_rng = np.sort(_convert([lo[ti], hi[ti]], plan.axes[ti].scale, "linear"))
    g_rng = (float(lo[gi]), float(hi[gi]))
    if mi is None or plan.axes[mi].source == "fixed":
        # a grid at one metallicity: isochrone points near it
        if mi is not None:
            m0 = float(plan.axes[mi].value)  # type: ignore[arg-type]
        else:
            m0 = next((v for k, v in plan.fixed.items() if _our_quantity(k)[0] == "metals"), 0.0)
        feh_range = (m0 - 0.13, m0 + 0.13)
        jitter = False
    else:
        feh_range = (float(lo[mi]), float(hi[mi]))
        jitter = config.metals_jitter > 0
    teff_min = max(config.teff_min, float(t_rng[0]))
    try:
        pts = sample_isochrone_points(n, teff_min=teff_min, teff_max=float(t_rng[1]), logg_range=g_rng,
                                      feh_range=feh_range, weighting=config.isochrone_weighting,
                                      name=config.isochrones, rng=rng)
    except ValueError as exc:
        raise ConfigError(f"isochrone draw for {_grid_name(grid)} (Teff {teff_min:g}–{t_rng[1]:g} K, "
                          f"log g {g_rng[0]:g}–{g_rng[1]:g}, [M/H] {feh_range[0]:g}–{feh_range[1]:g}): {exc}"
                          ) from None
    x = np.empty((n, grid.ndim))
    x[:, ti] = _convert(pts["teff"].to_numpy(np.float64), "linear", plan.axes[ti].scale)
    x[:, gi] = pts["logg"].to_numpy(np.float64)
    if mi is not None and plan.axes[mi].source != "fixed":
        feh = pts["feh"].to_numpy(np.float64)
        if jitter:
            j = config.metals_jitter
            a = np.maximum(-j, lo[mi] - feh)
            b = np.minimum(j, hi[mi] - feh)
            feh = feh + a + (b - a) * rng.random(n)
        x[:, mi] = feh
    for i, role in enumerate(plan.axes):
        if role.source == "random":
            x[:, i] = rng.uniform(lo[i], hi[i], n)
        elif role.source == "rotation":
            v = np.asarray(config.vsini, np.float64)
            kms = rng.uniform(v[0], v[1], n) if config.vsini_draw == "uniform" else rng.choice(v, n)
            with np.errstate(divide="ignore"):  # log10(0) = -inf is clipped to the grid below
                x[:, i] = _convert(kms, "linear", role.scale)
        elif role.source in ("fixed", "default"):
            x[:, i] = role.value
    x = np.clip(x, lo, hi)
    return _labels_of_points(plan, x), x


def _labels_of_points(plan: SyntheticPlan, x: NDArray[np.float64]) -> NDArray[np.float64]:
    """Our labels (physical units, ``plan.label_names`` order) of grid points ``x``."""
    lab = np.empty((len(x), len(plan.label_names)))
    for j, name in enumerate(plan.label_names):
        if name in plan.fixed:
            lab[:, j] = plan.fixed[name]
        else:
            a = plan.label_axis[name]
            lab[:, j] = _convert(x[:, a], plan.axes[a].scale, _our_quantity(name)[1])
    return lab


def _points_at(grid: FerreGrid, plan: SyntheticPlan, labels: NDArray[np.float64], drawn: NDArray[np.float64]
               ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Grid points at the given labels: the axes our labels read take the labels (in the
    axis's scale, clipped to the grid); the other axes keep the ``drawn`` values."""
    if labels.shape != (len(drawn), len(plan.label_names)):
        raise ValueError(f"at_labels has shape {labels.shape}, expected ({len(drawn)}, {len(plan.label_names)})")
    lo, hi = grid.label_range
    x = drawn.copy()
    for j, name in enumerate(plan.label_names):
        if name in plan.label_axis:
            a = plan.label_axis[name]
            x[:, a] = _convert(labels[:, j], _our_quantity(name)[1], plan.axes[a].scale)
    x = np.clip(x, lo, hi)
    return _labels_of_points(plan, x), x


# ============================================================================ interpolation

_DENSE_RATIO = 16  # dense GEMM when the grid has at most this many times the models of one stencil


class _Interpolator:
    """:func:`mastar_vac.io.ferre.interpolate` for many points, as a dense GEMM when that is cheaper.

    ``interpolate`` gathers the 4^ndim stencil models of every point (32 MB per point for a
    5-D grid of 8,000 pixels) and is bound by memory bandwidth. When the whole grid has
    only a few times more models than one stencil, multiplying a dense (points × models)
    weight matrix — the same separable cubic/linear Lagrange weights, zero off the
    stencil — by the (models × pixels) grid is compute-bound BLAS (1.5–4× faster for
    1,675 points in a 5-D grid of 10⁴ models × 8,000 pixels on 2 cores). Grids with
    INVALID_CODE or non-finite values always go through ``interpolate`` (its NaN
    poisoning of invalid stencil nodes is the contract).
    """

    def __init__(self, grid: FerreGrid) -> None:
        self.grid = grid
        n_models = int(np.prod(grid.n_p))
        stencil = int(np.prod([4 if k >= 4 else min(k, 2) for k in grid.n_p]))
        self.models = np.asarray(grid.flux).reshape(n_models, grid.npix)
        self.dense = (n_models <= _DENSE_RATIO * stencil and grid.invalid_code is None
                      and bool(np.isfinite(self.models).all()))

    def __call__(self, points: NDArray[np.float64]) -> NDArray[np.float32]:
        g = self.grid
        if not self.dense:
            return interpolate(g, points)
        lo, hi = g.label_range
        x = np.clip(np.atleast_2d(np.asarray(points, np.float64)), lo, hi)
        n = x.shape[0]
        rows = np.arange(n)[:, None]
        w = np.ones((n, 1))
        for a, k in enumerate(g.n_p):
            t = np.clip((x[:, a] - g.llimits[a]) / g.steps[a], 0.0, k - 1.0) if k > 1 else np.zeros(n)
            ii, ww = _axis_stencil(t, k)
            wa = np.zeros((n, k))
            wa[rows, ii] = ww
            w = (w[:, :, None] * wa[:, None, :]).reshape(n, -1)
        return w.astype(np.float32) @ self.models


# ============================================================================ LSF


def grid_sigma_aa(grid: FerreGrid) -> NDArray[np.float64]:
    """The grid's own LSF σ (Å) per grid pixel, from RESOLUTION (R = λ/FWHM); 0 without it."""
    if grid.wave is None:
        raise InputFileError(_grid_name(grid), "the grid has no wavelengths (WAVE)", expected="WAVE = start step")
    r = grid.header.get("RESOLUTION")
    if r is None:
        log.info("synthetic: %s has no RESOLUTION; assuming its resolution is much higher than MaStar's "
                 "(grid σ = 0)", _grid_name(grid))
        return np.zeros(grid.npix)
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not np.isfinite(r) or r <= 0:
        raise InputFileError(_grid_name(grid), f"RESOLUTION = {r!r}", expected="one positive number (λ/FWHM)")
    return lsf.sigma_from_resolution(grid.wave, float(r))


class LsfMatcher:
    """Take spectra on one grid (σ_in per pixel) to ``wave_out`` with σ_out (Å) per pixel.

    ``valid`` marks output pixels that are inside the input coverage and farther than
    ``edge_nsigma`` kernel σ from its ends. Calling the matcher on an (n, npix_in) array
    gives (n, npix_out) with NaN at invalid pixels. See the module docstring for the
    variance budget.
    """

    def __init__(self, wave_in: ArrayLike, sigma_in: ArrayLike, wave_out: ArrayLike, sigma_out: ArrayLike, *,
                 target_pixelized: bool = True, max_sigma_pix: float = 10.0, edge_nsigma: float = 3.0,
                 chunk: int = 128) -> None:
        w_in = np.asarray(wave_in, np.float64)
        s_in = np.broadcast_to(np.asarray(sigma_in, np.float64), w_in.shape)
        w_out = np.asarray(wave_out, np.float64)
        s_out = np.asarray(sigma_out, np.float64)
        if s_out.shape != w_out.shape:
            raise ValueError(f"sigma_out has shape {s_out.shape} but wave_out {w_out.shape}")
        if not (np.all(np.isfinite(s_out)) and np.all(s_out > 0)):
            raise ValueError("the target LSF σ must be finite and > 0 at every pixel")
        if w_in.size < 4 or not np.all(np.diff(w_in) > 0):
            raise ValueError("wave_in must be increasing with at least 4 pixels")
        dw_out = np.gradient(w_out)
        self.wave_out = w_out
        self.chunk = int(chunk)

        # crop the input to the output range plus a margin wider than any kernel
        margin = 10.0 * s_out.max() + 5.0 * dw_out.max()
        i0 = max(0, int(np.searchsorted(w_in, w_out[0] - margin)) - 1)
        i1 = min(w_in.size, int(np.searchsorted(w_in, w_out[-1] + margin, side="right")) + 1)
        if i1 - i0 < 4:
            raise ValueError(f"the input grid ({w_in[0]:.1f}–{w_in[-1]:.1f} Å) does not overlap the output "
                             f"({w_out[0]:.1f}–{w_out[-1]:.1f} Å)")
        self.crop = slice(i0, i1)
        w = w_in[i0:i1]
        var_in = s_in[i0:i1] ** 2
        d = np.gradient(w)

        # block-average very fine grids: that is a box of m taps, variance (m² − 1)/12 d²
        ratio = np.interp(w, w_out, s_out) / d
        m = 1
        if ratio.max() > max_sigma_pix:
            m = max(1, int(np.floor(ratio.min() / 3.0)))
        self.m = m
        if m > 1:
            nb = w.size // m
            w_b = w[: nb * m].reshape(nb, m).mean(axis=1)
            var_in = (var_in[: nb * m].reshape(nb, m).mean(axis=1)
                      + (m * m - 1) / 12.0 * d[: nb * m].reshape(nb, m).mean(axis=1) ** 2)
            w = w_b
            d = np.gradient(w)
        self.wave = w

        s_t = np.interp(w, w_out, s_out)
        var = s_t**2 - var_in - d**2 / 6.0
        if target_pixelized:
            var -= np.interp(w, w_out, dw_out) ** 2 / 12.0
        inside = (w >= w_out[0]) & (w <= w_out[-1])
        short = inside & (var < 0)
        if short.any():
            worst = float(np.max(np.sqrt(s_t[short] ** 2 - var[short]) / s_t[short]))
            log.warning("synthetic LSF: at %d of %d grid pixels (%.0f–%.0f Å) the grid's own LSF and sampling "
                        "are already broader than the target; the spectra stay up to %.1f%% broader there",
                        int(short.sum()), int(inside.sum()), float(w[short].min()), float(w[short].max()),
                        100.0 * (worst - 1.0))
        self.sigma_pix = np.sqrt(np.maximum(var, 0.0)) / d
        if self.sigma_pix.max() > 50:
            raise ValueError(f"kernel σ up to {self.sigma_pix.max():.0f} input pixels: the input grid is too "
                             f"coarse for this target or the target too broad")

        # pixels whose kernel would reach past the ends of the input
        k_edge = np.ceil(edge_nsigma * self.sigma_pix).astype(np.int64) + 1
        idx = np.arange(w.size)
        edge = (idx < k_edge) | (idx > w.size - 1 - k_edge)
        touched = lsf.rebin(w, edge.astype(np.float64), w_out)
        self.valid = np.isfinite(touched) & (touched == 0.0)

    def __call__(self, flux: ArrayLike) -> NDArray[np.float64]:
        f = np.atleast_2d(np.asarray(flux))[:, self.crop].astype(np.float64)
        if self.m > 1:
            nb = f.shape[1] // self.m
            f = f[:, : nb * self.m].reshape(f.shape[0], nb, self.m).mean(axis=2)
        out = np.empty((f.shape[0], self.wave_out.size))
        for s in range(0, f.shape[0], self.chunk):
            b = lsf.broaden(f[s:s + self.chunk], self.sigma_pix)
            out[s:s + self.chunk] = lsf.rebin(self.wave, b, self.wave_out)
        out[:, ~self.valid] = np.nan
        return out


# ============================================================================ the reference set


def _empty(label_names: Sequence[str], wave: NDArray[np.float64], report: dict[str, int]) -> ReferenceSet:
    P = wave.size
    return ReferenceSet(list(label_names), np.empty((0, len(label_names))), np.empty((0, P), np.float32),
                        np.empty((0, P), np.float32), wave, np.array([], str), np.array([], str),
                        np.array([], np.int64), np.array([], np.float64), np.array([], str), report,
                        lsf_sigma=np.empty((0, P), np.float32))  # "recorded" for none: concat keeps the others'


def make_synthetic_reference(grid: FerreGrid, n: int, label_names: Sequence[str], *,
                             lsf_sigma_aa: ArrayLike, config: SyntheticConfig = SyntheticConfig(),
                             rng: np.random.Generator | int | None = None, wave: ArrayLike | None = None,
                             window: int = DEFAULT_WINDOW, min_count: int | None = 40,
                             chunk: int = 256, at_labels: ArrayLike | None = None) -> ReferenceSet:
    """``n`` synthetic reference spectra from ``grid`` (paper §2.4).

    Parameters
    ----------
    grid
        A FERRE grid (:func:`mastar_vac.io.ferre.read_ferre`); ``grid.wave`` is vacuum Å.
    n
        How many spectra (:func:`n_synthetic` gives the paper's choice).
    label_names
        Our labels, in the order of the empirical reference set; the returned labels are
        in this order and in physical units (Teff in K, log10 v_micro in log10 km/s).
    lsf_sigma_aa
        The target LSF σ (Å) at every pixel of ``wave`` (:func:`median_mastar_lsf`).
    config, rng
        Drawing options; ``rng`` (a Generator or seed) defaults to ``config.seed``.
    wave
        Output wavelengths (vacuum Å); default the MaStar grid of ``len(lsf_sigma_aa)`` pixels.
    window, min_count
        The normalization of the data (:func:`mastar_vac.normalize.normalize_spectra`).
    chunk
        Spectra processed at once (bounds the memory: chunk × grid pixels × 8 bytes).
    at_labels
        (n, L) labels (our units, ``label_names`` order) to make the spectra at instead of
        drawing isochrone points — e.g. the empirical training labels, for a synthetic-only
        emulator with the empirical label distribution (paper §5.2). The grid axes no label
        reads are drawn as usual; labels outside the grid are clipped to it, so pass only
        rows inside its range. Models with INVALID_CODE are dropped, not redrawn.
    """
    t0 = time.perf_counter()
    if n < 0:
        raise ValueError("n must be >= 0")
    sig_out = np.asarray(lsf_sigma_aa, np.float64)
    w_out = mastar_wavelength(sig_out.size) if wave is None else np.asarray(wave, np.float64)
    if w_out.shape != sig_out.shape:
        raise ValueError(f"lsf_sigma_aa has {sig_out.size} pixels but the output grid {w_out.size}")
    gen = np.random.default_rng(config.seed if rng is None else rng)
    plan = plan_labels(grid, label_names, config)
    log.info("synthetic: %d spectra from %s; %s", n, _grid_name(grid), plan.describe())
    if any(r.source == "rotation" for r in plan.axes):
        log.info("synthetic: v sin i drawn per spectrum, %s %s km/s", config.vsini_draw, list(config.vsini))
    report: dict[str, int] = {"requested": int(n)}
    if n == 0:
        return _empty(label_names, w_out, report)

    sig_in = grid_sigma_aa(grid)  # also refuses a grid without wavelengths
    assert grid.wave is not None
    if grid.wave[-1] <= w_out[0] or grid.wave[0] >= w_out[-1]:
        raise ConfigError(f"{_grid_name(grid)} covers {grid.wave[0]:.0f}–{grid.wave[-1]:.0f} Å (vacuum), outside "
                          f"the output grid ({w_out[0]:.0f}–{w_out[-1]:.0f} Å)")
    matcher = LsfMatcher(grid.wave, sig_in, w_out, sig_out, target_pixelized=config.target_pixelized)
    if not matcher.valid.any():
        raise ConfigError(f"{_grid_name(grid)} covers {grid.wave[0]:.0f}–{grid.wave[-1]:.0f} Å (vacuum): no "
                          f"output pixel ({w_out[0]:.0f}–{w_out[-1]:.0f} Å) lies inside it")
    frac = float(matcher.valid.mean())
    if frac < 0.99:
        log.warning("synthetic: %s covers only %.1f%% of the output pixels; the rest get ivar 0",
                    _grid_name(grid), 100 * frac)
    # the grid restricted to the pixels used, when that saves a lot of gathering
    g = grid
    cs = matcher.crop
    if (cs.stop - cs.start) < 0.8 * grid.npix:
        g = replace(grid, flux=np.ascontiguousarray(np.asarray(grid.flux)[..., cs]), wave=grid.wave[cs])
        full = slice(0, cs.stop - cs.start)
        matcher.crop = full
    interp = _Interpolator(g)
    noise_rng = np.random.default_rng(gen.integers(2**63))

    labels, points = _draw_points(grid, plan, n, config, gen)
    if at_labels is not None:
        labels, points = _points_at(grid, plan, np.asarray(at_labels, np.float64), points)
    flux = np.empty((n, w_out.size))
    redrawn = 0
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        f = interp(points[s:e])
        bad = ~np.isfinite(f).all(axis=1)
        tries = 0
        while bad.any() and tries < config.max_redraws and at_labels is None:
            k = int(bad.sum())
            redrawn += k
            lab_k, pts_k = _draw_points(grid, plan, k, config, gen)
            rows = np.flatnonzero(bad)
            labels[s + rows], points[s + rows] = lab_k, pts_k
            f[rows] = interp(pts_k)
            bad = ~np.isfinite(f).all(axis=1)
            tries += 1
        if bad.any():
            f[bad] = np.nan
        flux[s:e] = matcher(f)
    keep = np.isfinite(flux[:, matcher.valid]).all(axis=1)
    if redrawn:
        report["redrawn_invalid"] = redrawn
        log.info("synthetic: %d draws fell on models with INVALID_CODE and were drawn again", redrawn)
    if not keep.all():
        report["dropped_invalid"] = int((~keep).sum())
        log.warning("synthetic: %d spectra still invalid after %d redraws; dropped", int((~keep).sum()),
                    config.max_redraws)
        labels, flux = labels[keep], flux[keep]
    m = len(labels)

    valid = np.broadcast_to(matcher.valid, flux.shape)
    snr = config.snr if config.snr is not None else config.noise_free_snr
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        level = np.nanmedian(np.where(valid, flux, np.nan), axis=1)
    if np.any(~(level > 0)):
        raise InputFileError(_grid_name(grid), "interpolated models have a non-positive median flux",
                             expected="positive fluxes")
    sigma = level / snr
    if config.snr is not None:
        flux = flux + noise_rng.standard_normal(flux.shape) * sigma[:, None]
    flux = np.where(valid, flux, 0.0)
    ivar = np.where(valid, 1.0 / sigma[:, None] ** 2, 0.0)
    nflux, nivar = normalize_spectra(flux, ivar, window=window, min_count=min_count)
    report["kept"] = m
    log.info("synthetic: %d spectra made in %.1f s", m, time.perf_counter() - t0)
    return ReferenceSet(
        label_names=list(label_names), labels=labels, flux=nflux, ivar=nivar, wave=w_out,
        ids=np.array([f"synth-{i + 1:05d}" for i in range(m)]), source=np.full(m, "synthetic"),
        n_visits=np.zeros(m, np.int64), snr=np.full(m, float(snr)), apogee_id=np.full(m, ""),
        cut_report=report,
        lsf_sigma=np.broadcast_to(lsf.sigma_to_pixels(sig_out, w_out).astype(np.float32), (m, w_out.size)).copy())


def synthetic_extension(empirical: ReferenceSet, grid: FerreGrid, *, lsf_sigma_aa: ArrayLike,
                        config: SyntheticConfig = SyntheticConfig(), rng: np.random.Generator | int | None = None,
                        window: int = DEFAULT_WINDOW, min_count: int | None = 40) -> ReferenceSet:
    """The synthetic set that extends ``empirical``: its labels, its wavelength grid, and
    ``n_synthetic(config, len(empirical))`` spectra. Concatenate with ``empirical.concat``."""
    return make_synthetic_reference(grid, n_synthetic(config, len(empirical)), empirical.label_names,
                                    lsf_sigma_aa=lsf_sigma_aa, config=config, rng=rng, wave=empirical.wave,
                                    window=window, min_count=min_count)


# ============================================================================ the target LSF


def mastarhc_lsf_sigma() -> NDArray[np.float64]:
    """σ (Å) on the MaStar grid from the median resolving power (SRES) of the MaStarHC
    spectra shipped with sdss-mangadap (as the demo's target LSF)."""
    from .demo import load_mastarhc

    hc = load_mastarhc()
    sres = np.where(np.isfinite(hc.sres) & (hc.sres > 0), hc.sres, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        r = np.nanmedian(sres, axis=0)
    return lsf.sigma_from_resolution(mastar_wavelength(), r)


def median_mastar_lsf(cube_disp: Any, *, visit_dim: str = "visit") -> NDArray[np.float64]:
    """The median over visits of DISP (Å) per pixel, ignoring non-finite and ≤ 0 values.

    ``cube_disp`` is an (nvisit, npix) array or an xarray DataArray (numpy- or
    dask-backed; the median over ``visit_dim``, else the first dimension). A pixel where
    no visit has a usable DISP is interpolated from its neighbours; when no pixel has
    one, the σ of the median MaStarHC SRES (:func:`mastarhc_lsf_sigma`) is returned.
    """
    axis = 0
    data = cube_disp
    if hasattr(cube_disp, "dims") and hasattr(cube_disp, "data"):  # xarray DataArray
        if visit_dim in cube_disp.dims:
            axis = cube_disp.get_axis_num(visit_dim)
        data = cube_disp.data
    if type(data).__module__.split(".")[0] == "dask":
        import dask.array as da

        if data.ndim != 2:
            raise ValueError(f"DISP must be 2-D (visit, wave), got shape {data.shape}")
        x = data.astype(np.float64)
        x = da.where(da.isfinite(x) & (x > 0), x, np.nan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            med = np.asarray(da.nanmedian(x, axis=axis).compute(), np.float64)
    else:
        x = np.asarray(data, np.float64)
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2:
            raise ValueError(f"DISP must be 2-D (visit, wave), got shape {x.shape}")
        x = np.where(np.isfinite(x) & (x > 0), x, np.nan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            med = np.nanmedian(x, axis=axis) if x.shape[axis] else np.full(x.shape[1 - axis], np.nan)
    ok = np.isfinite(med)
    if not ok.any():
        if med.size != MASTAR_NPIX:
            raise ValueError(f"no visit has a usable DISP and the grid has {med.size} pixels, not MaStar's "
                             f"{MASTAR_NPIX}: cannot fall back to the MaStarHC resolution")
        log.warning("synthetic: no visit has a usable DISP; the target LSF is the median MaStarHC SRES")
        return mastarhc_lsf_sigma()
    if not ok.all():
        log.info("synthetic: %d pixels have no usable DISP in any visit; interpolated", int((~ok).sum()))
        idx = np.arange(med.size)
        med = np.interp(idx, idx[ok], med[ok])
    return med


def target_lsf(config: SyntheticConfig, cube_disp: Any = None, *, fit_lsf: str = "ignore",
               sigma_ref_aa: ArrayLike | None = None) -> NDArray[np.float64]:
    """The target σ (Å) per MaStar pixel that ``config.lsf_sigma`` asks for; ``fit_lsf``
    is ``[fit] lsf`` (it decides "auto"), ``sigma_ref_aa`` the reference LSF in Å (for
    "reference")."""
    source = config.lsf_sigma
    if source == "auto":
        source = "reference" if fit_lsf == "forward" else "median"
    if source == "mastarhc":
        return mastarhc_lsf_sigma()
    if source == "reference":
        if sigma_ref_aa is None:
            raise ValueError("lsf_sigma = 'reference' needs the reference LSF (sigma_ref_aa)")
        return np.asarray(sigma_ref_aa, np.float64)
    if cube_disp is None:
        raise ValueError("lsf_sigma = 'median' needs the cube's DISP")
    return median_mastar_lsf(cube_disp)
