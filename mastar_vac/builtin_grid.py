"""The built-in synthetic grid: a FERRE grid made from thedoppler's hot-dwarf Cannon model.

``[inputs] synthetic_grid = "builtin"`` gives the theoretical extension (paper §2.4) a
physical grid without any file from the user. What it is, plainly: **a Cannon model of
synthetic spectra** — the cubic Cannon model ``cannongrid_3000_18000_hotdwarfs_norm_cubic_model.pkl``
that the PyPI package ``thedoppler`` (MIT, pinned to :data:`DOPPLER_VERSION`) ships, trained
on 613 synthetic spectra (Teff 8,000–40,000 K, log g 2.5–5.0, [Fe/H] −2.5…+0.5, only 8 of them
below [Fe/H] = −1.5). It is *not* the Allende Prieto et al. (2018) grid the paper used, and
a model of a grid, not the grid: where the cubic polynomial is a poor fit the spectra are
too.

The model (read with :func:`load_cannon_pickle`, a restricted unpickler that admits numpy
arrays and plain containers only; thedoppler's own code is never imported, so none of
its dependencies is needed):

* normalized flux f(λ) = θ(λ) · v(s), v = [1, terms(s)] the 20 monomials of degree ≤ 3
  of the scaled labels s = (label − fiducial) / scale; fiducial = median of the training
  labels, scale = the 2.5–97.5 percentile range of them (AnniesLasso/thecannon, the
  library thedoppler reads the file with, computes both from ``training_set_labels``
  when it loads a model; they are not stored in the file). 150,001 pixels of 0.1 Å in
  **air**, 3,000–18,000 Å, unresolved (fwhm 0.001 Å);
* a continuum sub-model of the same form on 2,000 log-spaced pixels giving log10 of the
  continuum (``logflux``); as thedoppler does, it is raised to the power of ten and
  interpolated linearly in λ onto the flux pixels.

So the model covers the whole MaStar range (3,622–10,354 Å vacuum) and the grid's WAVE
covers it with a margin; no pixel is invalid and no INVALID_CODE is written.

How a grid model is made (:func:`build_grid`), per (Teff, log g, [Fe/H]) node:

1. the normalized Cannon flux, **clipped** to ``[0, 1.05]``: the cubic model overshoots
   (emission bumps of a few per cent at He I lines, negative cores of strong lines at
   the edges of its label range). thedoppler itself clips at 1.0; 1.05 keeps the small
   real excursions of its normalization above 1 while removing the unphysical bumps;
2. × the continuum model, so that the pipeline's running-median normalization sees a
   spectrum with a continuum as on real spectra; each model is then divided by its
   median continuum over the grid's range (absolute flux means nothing here and values
   near 1 interpolate gently between nodes);
3. air → vacuum (:func:`mastar_vac.wavegrid.air_to_vacuum`), resampled (linearly) onto a
   fine grid uniform in log λ, i.e. in velocity (``fine_dlogw``, 2.8 km/s by default);
4. for every v sin i node, the standard limb-darkened rotation profile (Gray, *The
   Observation and Analysis of Stellar Photospheres*, eq. 18.14; ε = 0.6) convolved
   with a Gaussian of resolving power ``resolution`` — one kernel, applied by FFT in
   velocity space, normalized to unit sum so equivalent widths are kept;
5. sampled at the grid's log10 λ pixels (vacuum).

The v sin i axis is there because A/B stars rotate at 100–250 km/s, which MaStar's
R ≈ 1,800 (≈ 170 km/s FWHM) resolves: without it this grid was measured to pull real hot
stars ≈ 1,100 K cool. :mod:`mastar_vac.synthetic` draws it per synthetic spectrum
(``synthetic.vsini``).

Steps: the Cannon flux is a polynomial of degree ≤ 3 in each label, which the cubic
Lagrange interpolation of :func:`mastar_vac.io.ferre.interpolate` reproduces exactly from
any four nodes, so the label steps only have to follow the continuum (10^cubic, smooth)
and the clipping; the default is Teff 8,000–30,000 K in 1,000 K, log g 2.5–5.0 in 0.5,
[Fe/H] −2.5…+0.5 in 1.0, v sin i 0–250 km/s in 50: 23 × 6 × 4 × 6 = 3,312 models ×
9,254 pixels (log10 λ step 5e-5, 3,590–10,400 Å vacuum) = 123 MB of float32. Teff stops at
30,000 K: above it the training set thins out to 10–15 spectra per node.

The grid is built once per (spec, model file) into ``<cache>/builtin-grid-v<FORMAT>-<key>/``
(``$MASTAR_VAC_CACHE`` or ``~/.cache/mastar_vac``, as the demo), in a temporary directory
moved into place when complete, with a ``manifest.json`` (spec, model file and its
SHA-256, thedoppler version, file checksums, build time, how many pixels were clipped).
The same spec and model file give byte-identical files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import pickle
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .errors import ConfigError, InputFileError
from .io.atomic import atomic_dir
from .io.ferre import write_ferre
from .io.provenance import sha256_file
from .wavegrid import air_to_vacuum

__all__ = [
    "BUILTIN",
    "DOPPLER_VERSION",
    "INSTALL_HINT",
    "HOTDWARFS_MODEL",
    "FORMAT_VERSION",
    "GridSpec",
    "CannonModel",
    "RestrictedUnpickler",
    "load_cannon_pickle",
    "load_cannon_model",
    "doppler_data_dir",
    "rotation_kernel",
    "build_grid",
    "builtin_grid_id",
    "builtin_grid_path",
    "describe",
]

log = logging.getLogger(__name__)

BUILTIN = "builtin"  # the value of [inputs] synthetic_grid that selects this grid
DOPPLER_VERSION = "1.1.32"
INSTALL_HINT = f"pip install --no-deps thedoppler=={DOPPLER_VERSION}"
HOTDWARFS_MODEL = "cannongrid_3000_18000_hotdwarfs_norm_cubic_model.pkl"
FORMAT_VERSION = 1
C_KMS = 299792.458
GRID_STEM = "f_builtin_hotdwarfs"


# ============================================================================ restricted unpickling

# The globals a pickle of numpy arrays needs (both spellings: numpy < 2 wrote numpy.core).
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


def _numpy_global(module: str, name: str) -> Any:
    for mod in (module, module.replace("numpy.core", "numpy._core"), module.replace("numpy._core", "numpy.core")):
        try:
            return getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError):
            continue
    raise AttributeError(f"{module}.{name} not found in this numpy")


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays, dtypes and scalars and plain Python
    containers, and refuses every other global (a pickle can name any callable, e.g.
    ``os.system``, and loading it would call it)."""

    def __init__(self, file: Any, *, path: str | os.PathLike[str] = "<pickle>") -> None:
        super().__init__(file, encoding="latin1")  # python-2-era numpy pickles need latin1
        self._path = os.fspath(path)

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return _numpy_global(module, name)
        raise InputFileError(self._path, f"the pickle refers to the global {module}.{name}, which is not allowed",
                             expected="numpy arrays and plain containers only (numpy ndarray, dtype, scalar, "
                                      "_reconstruct)")


def load_cannon_pickle(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The plain dict stored in a Cannon model pickle, read with :class:`RestrictedUnpickler`."""
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            obj = RestrictedUnpickler(fh, path=p).load()
    except FileNotFoundError:
        raise InputFileError(p, "file not found", expected="a Cannon model pickle") from None
    except InputFileError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise InputFileError(p, f"cannot be unpickled ({exc})", expected="a Cannon model pickle") from None
    if not isinstance(obj, dict):
        raise InputFileError(p, f"the pickle holds a {type(obj).__name__}", expected="a dict (a Cannon model state)")
    return obj


# ============================================================================ the Cannon model


@dataclass(frozen=True)
class CannonModel:
    """A polynomial Cannon model: ``value(λ) = θ(λ) · [1, terms((labels − fiducials) / scales)]``."""

    label_names: tuple[str, ...]
    terms: tuple[tuple[tuple[int, float], ...], ...]
    theta: NDArray[np.float64]  # (npix, 1 + len(terms))
    dispersion: NDArray[np.float64]  # Å, air
    fiducials: NDArray[np.float64]
    scales: NDArray[np.float64]
    training_labels: NDArray[np.float64]
    logflux: bool = False
    continuum: CannonModel | None = None

    @classmethod
    def from_state(cls, state: dict[str, Any], path: str | os.PathLike[str]) -> CannonModel:
        """Build from the dict a thecannon ``CannonModel.write`` stored (checked key by key)."""

        def need(key: str) -> Any:
            if key not in state:
                raise InputFileError(path, f"Cannon model state has no {key!r}", expected="a thecannon model pickle")
            return state[key]

        vec = need("vectorizer")
        if not (isinstance(vec, tuple) and len(vec) == 2 and vec[0] == "PolynomialVectorizer"
                and isinstance(vec[1], dict) and "terms" in vec[1]):
            raise InputFileError(path, f"vectorizer = {str(vec)[:80]!r}",
                                 expected="('PolynomialVectorizer', {'terms': ...})")
        tsl = np.asarray(need("training_set_labels"), np.float64)
        if tsl.ndim != 2 or tsl.shape[0] < 2 or not np.isfinite(tsl).all():
            raise InputFileError(path, f"training_set_labels has shape {tsl.shape}",
                                 expected="(n_stars, n_labels), finite")
        names = vec[1].get("label_names") or need("censors").get("label_names")
        names = tuple(str(n) for n in names)
        if len(names) != tsl.shape[1]:
            raise InputFileError(path, f"{len(names)} label names but training_set_labels has {tsl.shape[1]} columns")
        terms = tuple(tuple((int(i), float(o)) for i, o in t) for t in vec[1]["terms"])
        if any(not 0 <= i < len(names) for t in terms for i, _ in t):
            raise InputFileError(path, "a vectorizer term names a label index out of range")
        theta = np.asarray(need("theta"), np.float64)
        disp = np.asarray(need("dispersion"), np.float64)
        if theta.ndim != 2 or theta.shape != (disp.size, 1 + len(terms)):
            raise InputFileError(path, f"theta has shape {theta.shape}",
                                 expected=f"({disp.size} pixels, 1 + {len(terms)} terms)")
        if not (np.isfinite(theta).all() and np.all(np.diff(disp) > 0)):
            raise InputFileError(path, "theta has non-finite values or the dispersion is not increasing")
        # thecannon (AnniesLasso) derives these when it loads a model (CannonModel.__init__):
        # fiducial = median, scale = np.ptp of the 2.5 and 97.5 percentiles, per label
        fid = np.percentile(tsl, 50, axis=0)
        scales = np.ptp(np.percentile(tsl, [2.5, 97.5], axis=0), axis=0)
        if not np.all(scales > 0):
            raise InputFileError(path, f"a label has no spread in training_set_labels (scales {scales})")
        cont = None
        if isinstance(state.get("continuum"), dict):
            cont = cls.from_state(state["continuum"], path)
        return cls(label_names=names, terms=terms, theta=theta, dispersion=disp, fiducials=fid, scales=scales,
                   training_labels=tsl, logflux=bool(state.get("logflux", False)), continuum=cont)

    def design(self, labels: ArrayLike) -> NDArray[np.float64]:
        """(n, 1 + n_terms) label vectors of the (n, n_labels) physical labels."""
        x = (np.atleast_2d(np.asarray(labels, np.float64)) - self.fiducials) / self.scales
        cols = [np.ones(x.shape[0])]
        for term in self.terms:
            c = np.ones(x.shape[0])
            for i, order in term:
                c = c * x[:, i] ** order
            cols.append(c)
        return np.stack(cols, axis=1)

    def __call__(self, labels: ArrayLike, pixels: slice = slice(None)) -> NDArray[np.float64]:
        """Model values (n, npix) at ``labels`` (in ``label_names`` order), optionally on a pixel range."""
        return self.design(labels) @ self.theta[pixels].T

    def continuum_flux(self, labels: ArrayLike, wave: ArrayLike) -> NDArray[np.float64]:
        """The continuum (linear flux) at air wavelengths ``wave``, as thedoppler makes it:
        the continuum model (10^ when logflux) interpolated linearly in λ."""
        if self.continuum is None:
            raise ValueError("this Cannon model has no continuum sub-model")
        c = self.continuum(labels)
        if self.continuum.logflux:
            c = 10.0**c
        w = np.asarray(wave, np.float64)
        return np.stack([np.interp(w, self.continuum.dispersion, row) for row in c])


def doppler_data_dir() -> Path:
    """``doppler/data`` of the installed thedoppler, found without importing it (its
    ``__init__`` needs packages this project does not install)."""
    try:
        spec = importlib.util.find_spec("doppler")
    except (ImportError, ValueError):
        spec = None
    locs = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locs:
        d = Path(loc) / "data"
        if (d / HOTDWARFS_MODEL).is_file():
            found = _doppler_version()
            if found != DOPPLER_VERSION:  # the grid's cache key hashes the model file, so this is safe
                log.warning("thedoppler %s is installed, not the pinned %s (%s); its model file is used as it is",
                            found, DOPPLER_VERSION, INSTALL_HINT)
            return d
    where = f" (found doppler at {locs[0]}, but without data/{HOTDWARFS_MODEL})" if locs else ""
    raise ConfigError(f"synthetic_grid = 'builtin' needs the package thedoppler{where}; install it without its "
                      f"dependencies (reading its model file needs none of them): {INSTALL_HINT}")


def load_cannon_model(path: str | os.PathLike[str] | None = None) -> CannonModel:
    """The hot-dwarf Cannon model of thedoppler (or the model pickle at ``path``)."""
    p = Path(path) if path is not None else doppler_data_dir() / HOTDWARFS_MODEL
    return CannonModel.from_state(load_cannon_pickle(p), p)


# ============================================================================ rotation


def rotation_kernel(vsini: float, dv: float, epsilon: float = 0.6, *, oversample: int = 21) -> NDArray[np.float64]:
    """The limb-darkened rotation profile (Gray eq. 18.14) on a velocity grid of step
    ``dv`` km/s, averaged over each pixel (so v sin i of a few pixels is still right),
    odd length, centred, unit sum. v sin i = 0 gives the identity [1]."""
    if not (vsini >= 0 and dv > 0 and 0 <= epsilon <= 1):
        raise ValueError(f"need vsini >= 0, dv > 0, 0 <= epsilon <= 1; got {vsini}, {dv}, {epsilon}")
    if vsini < 1e-3 * dv:
        return np.ones(1)
    k = int(np.ceil(vsini / dv))
    # sub-samples of every pixel, then the pixel means
    sub = (np.arange(-k, k + 1)[:, None] + (np.arange(oversample) + 0.5)[None, :] / oversample - 0.5) * dv
    x2 = np.clip(1.0 - (sub / vsini) ** 2, 0.0, None)
    g = 2.0 * (1.0 - epsilon) * np.sqrt(x2) + 0.5 * np.pi * epsilon * x2
    w = g.mean(axis=1)
    return w / w.sum()


def _gaussian_kernel(sigma_pix: float) -> NDArray[np.float64]:
    if sigma_pix <= 0:
        return np.ones(1)
    k = int(np.ceil(6.0 * sigma_pix))
    x = np.arange(-k, k + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma_pix) ** 2)
    return w / w.sum()


def _convolve_rows(flux: NDArray[np.float64], kernels: Sequence[NDArray[np.float64]]) -> list[NDArray[np.float64]]:
    """Each row of ``flux`` convolved with each kernel (odd, centred), edges padded with the
    end values; one forward FFT per row shared by all kernels."""
    n = flux.shape[1]
    kmax = max(len(k) for k in kernels) // 2
    padded = np.pad(flux, ((0, 0), (kmax, kmax)), mode="edge")
    nfft = 1 << int(np.ceil(np.log2(padded.shape[1] + 2 * kmax + 1)))
    fx = np.fft.rfft(padded, nfft, axis=1)
    out = []
    for kern in kernels:
        h = len(kern) // 2
        y = np.fft.irfft(fx * np.fft.rfft(kern, nfft)[None, :], nfft, axis=1)
        # full convolution: the centre of padded pixel j lands at j + h
        out.append(y[:, kmax + h: kmax + h + n])
    return out


# ============================================================================ the grid


def _nodes(axis: tuple[float, float, float], name: str) -> NDArray[np.float64]:
    first, last, step = (float(v) for v in axis)
    if step <= 0 and last != first:
        raise ValueError(f"{name}: step must be > 0, got {step}")
    n = 1 if last == first else int(round((last - first) / step)) + 1
    if n < 1 or abs(first + (n - 1) * step - last) > 1e-6 * max(1.0, abs(step)):
        raise ValueError(f"{name}: ({first}, {last}) is not a whole number of steps of {step}")
    return first + step * np.arange(n)


@dataclass(frozen=True)
class GridSpec:
    """What the built-in grid holds (defaults: the module docstring). Each axis is
    ``(first, last, step)``; ``wave_vac`` the vacuum range (Å) the grid covers."""

    teff: tuple[float, float, float] = (8000.0, 30000.0, 1000.0)
    logg: tuple[float, float, float] = (2.5, 5.0, 0.5)
    feh: tuple[float, float, float] = (-2.5, 0.5, 1.0)
    vsini: tuple[float, float, float] = (0.0, 250.0, 50.0)  # km/s
    wave_vac: tuple[float, float] = (3590.0, 10400.0)  # MaStar's 3,622–10,354 Å plus room for its LSF
    dlogw: float = 5.0e-5  # grid pixel (log10 λ); 2.2 pixels per FWHM at R = 4000
    # sharper than MaStar (R ≈ 1,400–2,600) so the extension's LSF matcher has room to
    # broaden to each pixel's target: 4000 leaves σ_target² − σ_grid² − d²/6 − w²/12 > 0
    # wherever R_MaStar < ~3,000
    resolution: float = 4000.0
    clip: tuple[float, float] = (0.0, 1.05)  # bounds on the normalized Cannon flux
    epsilon: float = 0.6  # limb darkening of the rotation profile
    fine_dlogw: float = 4.0e-6  # the velocity grid of the convolution (2.76 km/s)
    model: str = HOTDWARFS_MODEL

    def __post_init__(self) -> None:
        for name in ("teff", "logg", "feh", "vsini"):
            _nodes(getattr(self, name), name)
        if _nodes(self.vsini, "vsini").min() < 0:
            raise ValueError("vsini nodes must be >= 0")
        if not 0 < self.wave_vac[0] < self.wave_vac[1]:
            raise ValueError(f"wave_vac must be increasing, got {self.wave_vac}")
        if not (0 < self.fine_dlogw < self.dlogw and self.resolution > 0 and self.clip[0] < self.clip[1]):
            raise ValueError("need 0 < fine_dlogw < dlogw, resolution > 0 and clip[0] < clip[1]")

    def axes(self) -> list[tuple[str, NDArray[np.float64]]]:
        """(FERRE label, nodes) in file order: LABEL(1) varies slowest."""
        return [("TEFF", _nodes(self.teff, "teff")), ("LOGG", _nodes(self.logg, "logg")),
                ("METALS", _nodes(self.feh, "feh")), ("VSINI", _nodes(self.vsini, "vsini"))]

    def log_wave(self) -> NDArray[np.float64]:
        x0 = np.log10(self.wave_vac[0])
        n = int(np.ceil((np.log10(self.wave_vac[1]) - x0) / self.dlogw)) + 1
        return x0 + self.dlogw * np.arange(n)

    def shape(self) -> tuple[int, ...]:
        return tuple(len(n) for _, n in self.axes()) + (self.log_wave().size,)

    def nbytes(self) -> int:
        return 4 * int(np.prod(self.shape()))


def build_grid(out_stem: str | os.PathLike[str], spec: GridSpec = GridSpec(), *,
               model: CannonModel | None = None, model_path: str | os.PathLike[str] | None = None
               ) -> tuple[Path, dict[str, Any]]:
    """Write the grid as ``<out_stem>.hdr`` + ``.unf``; return (header path, build facts)."""
    t0 = time.perf_counter()
    if model is None:
        model = load_cannon_model(model_path)
    if model.continuum is None:
        raise InputFileError(model_path or spec.model, "the Cannon model has no continuum sub-model",
                             expected="a normalized-flux model with a 'continuum' model (thedoppler's)")
    axes = spec.axes()
    (_, teffs), (_, loggs), (_, fehs), (_, vsinis) = axes
    logw = spec.log_wave()
    w_out = 10.0**logw
    # the fine velocity grid, wide enough for the broadest kernel at both ends
    vmax = vsinis.max() + 8.0 * C_KMS / spec.resolution / 2.3548
    pad = vmax / C_KMS / np.log(10.0) + 5 * spec.dlogw
    fine_x = np.arange(logw[0] - pad, logw[-1] + pad + spec.fine_dlogw, spec.fine_dlogw)
    fine_w = 10.0**fine_x
    w_air = model.dispersion
    w_vac = air_to_vacuum(w_air)
    if w_vac[0] > fine_w[0] or w_vac[-1] < fine_w[-1]:
        raise ConfigError(f"the Cannon model covers {w_vac[0]:.0f}–{w_vac[-1]:.0f} Å (vacuum), less than the grid's "
                          f"{fine_w[0]:.0f}–{fine_w[-1]:.0f} Å (with room for its kernels)")
    i0 = max(0, int(np.searchsorted(w_vac, fine_w[0])) - 2)
    i1 = min(w_vac.size, int(np.searchsorted(w_vac, fine_w[-1])) + 2)
    pix = slice(i0, i1)
    w_vac_c, w_air_c = w_vac[pix], w_air[pix]
    dv = spec.fine_dlogw * np.log(10.0) * C_KMS
    gauss = _gaussian_kernel(C_KMS / spec.resolution / 2.3548 / dv)
    kernels = [np.convolve(rotation_kernel(float(v), dv, spec.epsilon), gauss) for v in vsinis]
    in_range = (w_vac_c >= w_out[0]) & (w_vac_c <= w_out[-1])

    out = np.empty(spec.shape(), np.float32)
    n_low = n_high = n_tot = 0
    for it, teff in enumerate(teffs):
        lab = np.array([(teff, g, m) for g in loggs for m in fehs])
        norm = model(lab, pix)
        lo, hi = spec.clip
        n_low += int((norm < lo).sum())
        n_high += int((norm > hi).sum())
        n_tot += norm.size
        norm = np.clip(norm, lo, hi)
        cont = model.continuum_flux(lab, w_air_c)
        level = np.median(cont[:, in_range], axis=1, keepdims=True)
        flux = norm * (cont / level)
        fine = np.stack([np.interp(fine_x, np.log10(w_vac_c), row) for row in flux])
        for iv, conv in enumerate(_convolve_rows(fine, kernels)):
            sampled = np.stack([np.interp(logw, fine_x, row) for row in conv])
            out[it, :, :, iv, :] = sampled.reshape(len(loggs), len(fehs), -1)
    facts = {"clipped_below": n_low / n_tot, "clipped_above": n_high / n_tot,
             "build_seconds": round(time.perf_counter() - t0, 1)}
    hi_lab = model.training_labels.max(axis=0)
    header = {
        "ID": "mastar_vac builtin hot-dwarf grid",
        "WAVE": [float(logw[0]), float(spec.dlogw)], "LOGW": 1, "VACUUM": 1,
        "RESOLUTION": float(spec.resolution),
        "COMMENTS1": f"A Cannon model of synthetic spectra (thedoppler {DOPPLER_VERSION} {spec.model}), "
                     f"not the Allende Prieto et al. 2018 grid",
        "COMMENTS2": f"normalized Cannon flux clipped to [{spec.clip[0]:g}, {spec.clip[1]:g}] (cubic overshoots: "
                     f"{100 * facts['clipped_below']:.3f}% of pixels below, {100 * facts['clipped_above']:.3f}% above)",
        "COMMENTS3": "times the Cannon continuum model; each model divided by its median continuum; air to vacuum",
        "COMMENTS4": f"VSINI (km/s): Gray limb-darkened rotation profile, epsilon {spec.epsilon:g}, in velocity, "
                     f"then a Gaussian of R = {spec.resolution:g}",
        "COMMENTS5": f"training labels of the model reach Teff {hi_lab[0]:g}; [Fe/H] < -1.5 has few training spectra",
    }
    parts = {"flux": out, "llimits": [float(n[0]) for _, n in axes],
             "steps": [float(n[1] - n[0]) if len(n) > 1 else 1.0 for _, n in axes],
             "labels": [a for a, _ in axes], "header": header}
    hdr = write_ferre(out_stem, parts, binary=True)
    log.info("builtin grid: %s models × %d pixels written to %s in %.1f s (%.0f MB); clipped %.3f%% / %.3f%% of "
             "the normalized pixels below %g / above %g", "×".join(str(len(n)) for _, n in axes), logw.size, hdr,
             facts["build_seconds"], spec.nbytes() / 1e6, 100 * facts["clipped_below"],
             100 * facts["clipped_above"], spec.clip[0], spec.clip[1])
    return hdr, facts


# ============================================================================ the cache



def _doppler_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("thedoppler")
    except PackageNotFoundError:
        return "unknown"


def builtin_grid_id(spec: GridSpec = GridSpec(), *, model_path: str | os.PathLike[str] | None = None) -> str:
    """The cache directory name of a grid: format version and a hash of the spec and of
    the model file's bytes (so a different thedoppler model file is a different grid)."""
    p = Path(model_path) if model_path is not None else doppler_data_dir() / spec.model
    if not p.is_file():
        raise InputFileError(p, "file not found", expected="a Cannon model pickle")
    text = json.dumps({"spec": dataclasses.asdict(spec), "model_sha256": sha256_file(p)}, sort_keys=True)
    return f"builtin-grid-v{FORMAT_VERSION}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def builtin_grid_path(cache_dir: str | os.PathLike[str] | None = None, spec: GridSpec = GridSpec(), *,
                      model_path: str | os.PathLike[str] | None = None, force: bool = False) -> Path:
    """The ``.hdr`` of the built-in grid, built on first use (see the module docstring)."""
    from .demo import default_cache_dir

    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    p = Path(model_path) if model_path is not None else doppler_data_dir() / spec.model
    final = cache / builtin_grid_id(spec, model_path=p)
    manifest_path = final / "manifest.json"
    if not force and manifest_path.is_file():
        try:
            files = json.loads(manifest_path.read_text())["files"]
            if all((final / f).is_file() for f in files.values()):
                return final / files["hdr"]
        except (OSError, ValueError, KeyError):
            pass  # an unreadable manifest: build again
    log.info("builtin grid: building %s from %s", final, p)
    with atomic_dir(final) as tmp:
        hdr, facts = build_grid(tmp / GRID_STEM, spec, model_path=p)
        unf = hdr.with_suffix(".unf")
        manifest = {
            "format_version": FORMAT_VERSION,
            "what": "FERRE grid from a Cannon model of synthetic spectra (thedoppler), not Allende Prieto 2018",
            "spec": dataclasses.asdict(spec),
            "model_file": str(p), "model_sha256": sha256_file(p), "thedoppler_version": _doppler_version(),
            "shape": list(spec.shape()), "labels": [a for a, _ in spec.axes()],
            "files": {"hdr": hdr.name, "unf": unf.name},
            "sha256": {"hdr": sha256_file(hdr), "unf": sha256_file(unf)},
            "bytes": unf.stat().st_size, **facts,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it owner-only; a shared cache needs the umask's
    return final / f"{GRID_STEM}.hdr"


def describe(spec: GridSpec = GridSpec()) -> str:
    """One line: axes, ranges, steps and size of a grid spec."""
    parts = [f"{a} {n[0]:g}–{n[-1]:g}" + (f" step {n[1] - n[0]:g}" if len(n) > 1 else "") + f" ({len(n)})"
             for a, n in spec.axes()]
    return "; ".join(parts) + f"; {spec.log_wave().size} px; {spec.nbytes() / 1e6:.0f} MB"

