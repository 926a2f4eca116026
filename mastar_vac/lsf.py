"""Line-spread-function matching: broadening with exact discrete variance, and resampling.

MaStar's resolution is only 0.2–0.5 MILES pixels coarser than MILES in the blue. A
Gaussian *sampled* at such a small width does not broaden at all (its taps beyond the
centre are ~0), so the kernel width here is solved so that the kernel's *discrete*
variance Σ w_k k² equals the requested σ² exactly, at every pixel.

The per-visit forward model of the fit (issue 14) uses the same kernels: the emulator
predicts the spectrum at a reference LSF σ_ref(λ), and each visit's model is that
spectrum broadened by the visit's *differential* kernel, σ_k² = σ_visit² − σ_ref²
(:func:`differential_kernel`), applied in gather form (:func:`apply_band`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "FWHM_TO_SIGMA",
    "sigma_from_resolution",
    "discrete_gaussian_weights",
    "broaden",
    "rebin",
    "sigma_to_pixels",
    "reference_sigma",
    "differential_sigma",
    "differential_variance",
    "DifferentialKernel",
    "differential_kernel",
    "band_halfwidth",
    "restrict_band",
    "apply_band",
    "fill_sigma",
    "BandKernels",
    "band_kernels",
    "homogenize",
]

log = logging.getLogger(__name__)

FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))

_S_TABLE = np.concatenate([np.linspace(1e-3, 3.0, 3000), np.linspace(3.0, 60.0, 2000)[1:]])


def _discrete_variance(s: NDArray[np.float64], kmax: int) -> NDArray[np.float64]:
    k = np.arange(-kmax, kmax + 1, dtype=np.float64)
    w = np.exp(-0.5 * (k[None, :] / s[:, None]) ** 2)
    w /= w.sum(axis=1, keepdims=True)
    return (w * k[None, :] ** 2).sum(axis=1)


_V_TABLE = _discrete_variance(_S_TABLE, 400)


def sigma_from_resolution(wave: ArrayLike, resolution: ArrayLike) -> NDArray[np.float64]:
    """LSF σ (Å) from resolving power R = λ / FWHM."""
    return np.asarray(wave, np.float64) / np.asarray(resolution, np.float64) * FWHM_TO_SIGMA


def discrete_gaussian_weights(sigma_pix: ArrayLike, kmax: int | None = None
                              ) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    """Per-pixel kernels whose discrete variance equals ``sigma_pix**2`` exactly.

    Returns ``(weights, offsets)`` with weights of shape (n, 2K+1), each row summing to
    one, for offsets −K … K. σ = 0 gives the identity kernel. K is 5σ (+1) of the widest
    kernel, or ``kmax``: then the sampled Gaussian is truncated at ±kmax and its width
    solved for that support, so the variance stays exact (a σ beyond what the support
    can hold is refused).
    """
    sigma = np.atleast_1d(np.asarray(sigma_pix, np.float64))
    if np.any(~np.isfinite(sigma)) or np.any(sigma < 0):
        raise ValueError("sigma_pix must be finite and >= 0")
    if sigma.max() > 50:
        raise ValueError(f"sigma_pix up to {sigma.max():.1f} pixels: too wide for this kernel")
    if kmax is None:
        kmax = int(np.ceil(5.0 * max(sigma.max(), 0.2))) + 1
        v_table = _V_TABLE
    else:
        # the variance of the truncated kernel, as a function of s (monotonic up to the
        # flat kernel's K(K+1)/3); only the part that rises is usable
        v_table = _discrete_variance(_S_TABLE, kmax)
        top = int(np.argmax(v_table)) + 1
        if sigma.max() ** 2 > 0.999 * v_table[top - 1]:
            raise ValueError(f"sigma_pix up to {sigma.max():.2f} pixels does not fit a kernel of half-width {kmax}")
        v_table = v_table[:top]
    # width s of the sampled Gaussian whose discrete variance is sigma^2 (monotonic in s)
    s = np.interp(sigma**2, v_table, _S_TABLE[:len(v_table)])
    k = np.arange(-kmax, kmax + 1)
    with np.errstate(divide="ignore", over="ignore", under="ignore"):
        w = np.exp(-0.5 * (k[None, :] / np.maximum(s, 1e-6)[:, None]) ** 2)
    w[sigma == 0] = (k == 0).astype(np.float64)
    w /= w.sum(axis=1, keepdims=True)
    return w, k


def broaden(flux: ArrayLike, sigma_pix: ArrayLike) -> NDArray[np.float64]:
    """Convolve ``flux`` (last axis = pixels) with a Gaussian of per-pixel width ``sigma_pix``.

    Gather form: out[i] = Σ_k w_i(k) flux[i + k]. At the ends the kernel is renormalized
    over the pixels that exist, so the level of a flat spectrum is kept.
    """
    f = np.asarray(flux, np.float64)
    n = f.shape[-1]
    sig = np.broadcast_to(np.asarray(sigma_pix, np.float64), (n,))
    w, k = discrete_gaussian_weights(sig)
    kmax = int(k[-1])
    pad = [(0, 0)] * (f.ndim - 1) + [(kmax, kmax)]
    fp = np.pad(f, pad)
    valid = np.pad(np.ones(n), (kmax, kmax))
    out = np.zeros_like(f)
    norm = np.zeros(n)
    idx = np.arange(n)
    for j, off in enumerate(k):
        out += w[:, j] * fp[..., idx + off + kmax]
        norm += w[:, j] * valid[idx + off + kmax]
    return out / norm


def rebin(wave_in: ArrayLike, flux_in: ArrayLike, wave_out: ArrayLike) -> NDArray[np.float64]:
    """Flux-conserving resampling onto ``wave_out`` (pixel centres; edges at midpoints).

    The input is integrated as a piecewise-linear function; each output pixel gets the
    mean over its own edges. Output pixels not fully inside the input range are NaN.
    """
    x = np.asarray(wave_in, np.float64)
    f = np.asarray(flux_in, np.float64)
    xo = np.asarray(wave_out, np.float64)

    def edges(c: NDArray[np.float64]) -> NDArray[np.float64]:
        mid = 0.5 * (c[1:] + c[:-1])
        return np.concatenate([[c[0] - (mid[0] - c[0])], mid, [c[-1] + (c[-1] - mid[-1])]])

    # cumulative integral of the linear interpolant at the input nodes
    cum = np.concatenate([np.zeros(f.shape[:-1] + (1,)),
                          np.cumsum(0.5 * (f[..., 1:] + f[..., :-1]) * np.diff(x), axis=-1)], axis=-1)
    eo = edges(xo)
    inside = (eo[:-1] >= x[0]) & (eo[1:] <= x[-1])
    e = np.clip(eo, x[0], x[-1])
    j = np.clip(np.searchsorted(x, e, side="right") - 1, 0, len(x) - 2)
    t = (e - x[j]) / (x[j + 1] - x[j])
    fe = f[..., j] * (1 - t) + f[..., j + 1] * t  # flux at the edges
    ce = cum[..., j] + 0.5 * (f[..., j] + fe) * (e - x[j])  # integral up to each edge
    out = np.diff(ce, axis=-1) / np.diff(eo)
    return np.where(inside, out, np.nan)


# ---------------------------------------------------------------------------
# the per-visit differential kernel (the fit's LSF forward model)
# ---------------------------------------------------------------------------

def sigma_to_pixels(sigma_aa: ArrayLike, wave: ArrayLike) -> NDArray[np.float64]:
    """LSF σ in Å (as MaStar's DISP) → σ in pixels of the grid ``wave`` (last axis).

    The local pixel width is λ·d(ln λ)/d(pixel), the derivative taken as the centred
    difference of ln λ: on MaStar's log grid that is exactly λ·ln10·10⁻⁴, ends included."""
    w = np.asarray(wave, np.float64)
    return np.asarray(sigma_aa, np.float64) / (w * np.gradient(np.log(w)))


def reference_sigma(sigma_visits: ArrayLike, percentile: float = 1.0) -> NDArray[np.float64]:
    """A reference LSF σ_ref(λ) (P,) no broader than nearly every visit: the per-pixel
    ``percentile`` of the visits' σ (n, P), NaN ignored.

    A low percentile because a visit sharper than σ_ref cannot be modelled (the model is
    never sharpened, :func:`differential_kernel`): at the 1st percentile only 1% of the
    visits' pixels are; a lower σ_ref costs nothing in the fit but asks the emulator to
    resolve finer lines."""
    s = np.asarray(sigma_visits, np.float64)
    return np.nanpercentile(np.where(np.isfinite(s) & (s > 0), s, np.nan), percentile, axis=0)


def differential_sigma(sigma_visit: ArrayLike, sigma_ref: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    """σ_k = √max(σ_visit² − σ_ref², 0) and where the visit is sharper than σ_ref.

    Where σ_visit < σ_ref the differential kernel is the identity: a Gaussian cannot be
    deconvolved out of the model (the inverse operator amplifies noise without bound and
    is not a positive kernel), so the model stays at σ_ref there — slightly broader than
    the visit. That is why σ_ref is chosen low (:func:`reference_sigma`), and why the
    pixels where it happens are counted (the second return value)."""
    v, sharper = differential_variance(sigma_visit, sigma_ref)
    return np.sqrt(v), sharper


def differential_variance(sigma_visit: ArrayLike, sigma_ref: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    """σ_k² = max(σ_visit² − σ_ref², 0) and where the visit is sharper than σ_ref
    (:func:`differential_sigma` without its square root; the kernels need only σ_k²).

    A σ_visit equal to σ_ref but for float32 rounding (a synthetic spectrum made at
    σ_ref records it in float32) is σ_ref: neither sharper nor given a kernel of width
    ~1e-4 px."""
    sv = np.asarray(sigma_visit, np.float64)
    sr = np.broadcast_to(np.asarray(sigma_ref, np.float64), sv.shape)
    d2 = sv * sv - sr * sr
    d2[np.abs(d2) <= 1e-6 * sr * sr] = 0.0
    sharper = d2 < 0
    return np.maximum(d2, 0.0, out=d2), sharper


class DifferentialKernel(NamedTuple):
    """Banded per-pixel kernels: ``weights`` (..., P, 2K+1) for ``offsets`` −K … K, and
    per spectrum the number of pixels where the visit was sharper than σ_ref."""

    weights: NDArray[np.float64]
    offsets: NDArray[np.int64]
    n_sharper: NDArray[np.int64]


def band_halfwidth(sigma_max: float, tol: float) -> int:
    """The half-width K beyond which every tap of a kernel of σ ≤ ``sigma_max`` weighs
    less than ``tol`` (the outer taps of the widest kernel are the largest ones)."""
    if sigma_max <= 0:
        return 0
    w, k = discrete_gaussian_weights(np.array([sigma_max]))
    need = np.abs(k[w[0] >= tol])
    return int(need.max()) if need.size else 0


# nodes of σ_k² at which differential_kernel evaluates discrete_gaussian_weights
_N_VAR_NODES = 2048


def differential_kernel(sigma_visit: ArrayLike, sigma_ref: ArrayLike, *, kmax: int | None = None,
                        tol: float = 0.0, taps_first: bool = False, zero_below: float = 0.0,
                        dtype: type | np.dtype = np.float64) -> DifferentialKernel:
    """The visit's differential kernel on the fit's grid (both σ in pixels there).

    σ_k² = max(σ_visit² − σ_ref², 0), with exact discrete variance; where the visit is
    sharper than σ_ref the kernel is the identity (see :func:`differential_sigma`).
    ``sigma_visit`` is (P,) or (n, P); the weights are (…, P, 2K+1) — or (…, 2K+1, P)
    with ``taps_first``, the layout of a batched operator — every kernel summing to one.
    All spectra share one K: ``kmax`` when given, else the smallest K that keeps every
    tap of weight ≥ ``tol`` (``tol = 0``: the 5σ support of
    :func:`discrete_gaussian_weights`). With a shorter support the Gaussian's width is
    solved for it, so the variance stays exactly σ_k². ``zero_below``: taps lighter than
    this are set to exactly 0 (each kernel renormalized), so that an operator can skip
    them; the variance then moves by < 2·zero_below·K² px².

    The kernels come from :func:`discrete_gaussian_weights` at 2,048 values of σ_k²
    and are interpolated linearly in σ_k² between them: the variance is linear in the
    weights, so the interpolated kernel keeps the exact variance and sums to one, and
    its shape differs from the directly computed one by ~1e-6 (the precision of
    :func:`discrete_gaussian_weights` itself). A fit needs a kernel for every pixel of
    every visit; evaluated directly (an exp per tap) they cost more than the fit.
    """
    sv = np.asarray(sigma_visit, np.float64)
    if np.any(~np.isfinite(sv)) or np.any(sv < 0):
        raise ValueError("sigma_visit must be finite and >= 0 (fill or mask missing DISP first)")
    if not np.isfinite(np.asarray(sigma_ref, np.float64)).all():
        raise ValueError("sigma_ref must be finite")
    v, sharper = differential_variance(sv, sigma_ref)
    vmax = float(v.max()) if v.size else 0.0
    if kmax is None:
        smax = np.sqrt(vmax)
        kmax = band_halfwidth(smax, tol) if tol > 0 else (int(np.ceil(5.0 * max(smax, 0.2))) + 1 if smax > 0 else 0)
    T = 2 * kmax + 1
    out = np.zeros(v.shape[:-1] + ((T,) + v.shape[-1:] if taps_first else v.shape[-1:] + (T,)), dtype)
    # kmax = 0 with σ_k > 0: a caller's support (band_halfwidth) found every tap beyond the
    # centre below its tolerance — the identity, to that tolerance
    if vmax > 0 and kmax > 0:
        _interpolate_kernels(v, _kernel_table(vmax, kmax, zero_below, dtype), out, taps_first)
    elif taps_first:
        out[..., kmax, :] = 1.0
    else:
        out[..., kmax] = 1.0
    offsets = np.arange(-kmax, kmax + 1, dtype=np.int64)
    n_sharper = sharper.sum(axis=-1).astype(np.int64)
    return DifferentialKernel(out, offsets, n_sharper)


class _KernelTable(NamedTuple):
    """Kernels −K … 0 at ``_N_VAR_NODES`` values of σ_k² from 0 to ``vmax``, as per-tap
    bases and steps for linear interpolation in σ_k² (:func:`_interpolate_kernels`)."""

    vmax: float
    base: NDArray[np.float32]  # (K+1, N−1)
    step: NDArray[np.float32]  # (K+1, N−1)


def _kernel_table(vmax: float, kmax: int, zero_below: float, dtype: type | np.dtype = np.float32) -> _KernelTable:
    nodes = np.linspace(0.0, vmax, _N_VAR_NODES)
    table, _ = discrete_gaussian_weights(np.sqrt(nodes), kmax=kmax)  # (N, T)
    if zero_below > 0:
        table = np.where(table < zero_below, 0.0, table)
        table /= table.sum(axis=1, keepdims=True)
    table = table[:, :kmax + 1]  # the kernels are symmetric: taps −K … 0 say it all
    base = np.ascontiguousarray(table[:-1].T, dtype)
    return _KernelTable(vmax, base, np.ascontiguousarray(np.diff(table, axis=0).T, dtype))


def _interpolate_kernels(v: NDArray[np.float64], table: _KernelTable, out: NDArray, taps_first: bool) -> None:
    """The kernels of variances ``v`` (…, P), all ≤ ``table.vmax``, into ``out`` (…, T, P)
    with ``taps_first``, else (…, P, T): per tap w = base[j] + step[j]·t, from tables that
    stay in cache; taps 1 … K copied from their mirror."""
    kmax = table.base.shape[0] - 1
    T = 2 * kmax + 1
    pos = v * ((_N_VAR_NODES - 1) / table.vmax)
    j = np.minimum(pos.astype(np.int64), _N_VAR_NODES - 2)
    t = (pos - j).astype(out.dtype)
    for tap in range(T):
        if tap > kmax:
            w = out[..., T - 1 - tap, :] if taps_first else out[..., T - 1 - tap]
        else:
            w = np.take(table.step[tap], j)
            w *= t
            w += np.take(table.base[tap], j)
        if taps_first:
            out[..., tap, :] = w
        else:
            out[..., tap] = w


def restrict_band(weights: ArrayLike, offsets: ArrayLike, valid: ArrayLike | None = None, *,
                  taps_first: bool = False, copy: bool = True) -> NDArray[np.floating]:
    """The kernels renormalized over the pixels that exist: taps that land beyond the
    ends of the grid, or on a pixel where ``valid`` (P,) is False, get weight 0 and each
    kernel is rescaled to sum to one — as :func:`broaden` does at the ends, so the level
    of a flat spectrum is kept. A kernel with no valid tap is left at zero. Only the
    pixels within K of an end or an invalid pixel change. ``weights`` (…, P, T), or
    (…, T, P) with ``taps_first``; returned in the same layout and dtype (with
    ``copy=False`` an array ``weights`` is changed in place)."""
    w = np.array(weights, copy=True) if copy else np.asarray(weights)
    if taps_first:
        return np.swapaxes(restrict_band(np.swapaxes(w, -1, -2), offsets, valid, copy=False), -1, -2)
    off = np.asarray(offsets, np.int64)
    P = w.shape[-2]
    ok = np.ones(P, bool) if valid is None else np.asarray(valid, bool)
    src = np.arange(P)[:, None] + off[None, :]
    tap_ok = ((src >= 0) & (src < P)) & ok[np.clip(src, 0, P - 1)]
    rows = np.flatnonzero(~tap_ok.all(axis=1))  # the same for every spectrum
    if rows.size:
        sub = w[..., rows, :] * tap_ok[rows]
        norm = sub.sum(axis=-1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            w[..., rows, :] = np.where(norm > 0, sub / np.where(norm > 0, norm, 1.0), 0.0)
    return w


def apply_band(flux: ArrayLike, weights: ArrayLike, offsets: ArrayLike) -> NDArray[np.float64]:
    """Gather form out[…, i] = Σ_k w[…, i, k]·flux[…, i + offsets[k]], with taps beyond
    the ends reading zero: pass the weights through :func:`restrict_band` first (then
    the result equals :func:`broaden` for the same σ). ``weights`` (P, T) or (n, P, T)."""
    f = np.asarray(flux, np.float64)
    w = np.asarray(weights, np.float64)
    off = np.asarray(offsets, np.int64)
    P = f.shape[-1]
    out = np.zeros(np.broadcast_shapes(f.shape, w.shape[:-1]))
    for j, k in enumerate(off):
        if k >= 0:
            out[..., :P - k] += w[..., :P - k, j] * f[..., k:]
        else:
            out[..., -k:] += w[..., -k:, j] * f[..., :P + k]
    return out


# The kernels' support: the taps of the widest kernel that weigh at least this much.
# Every tap costs one pass over the (1+L, B, P) block, and the 5σ support would hold
# taps of 1e-9; the kernel's width is re-solved for the shorter support, so its
# variance stays exactly σ_k² and its shape changes by ~1e-5 of the flux — far below
# the emulator's own error (~1e-2).
TAP_TOL = 1e-5
# Within that support, taps lighter than this are set to 0 (each kernel renormalized):
# the narrower kernels' outer taps and the far wings, below 1e-6 of the flux. The
# operator then skips, per chunk of rows and per tap, the pixels where every weight is 0
# (a visit's σ_k varies along λ and from visit to visit, the common support is the
# widest one's). The variance moves by < 2·1e-7·K² ≈ 1e-5 px².
ZERO_TOL = 1e-7
# spectra per chunk when the kernels are built (bounds the temporaries)
_BUILD_ROWS = 32


def run_slice(idx: NDArray[np.int64]) -> slice | None:
    """``idx`` as a slice when it is a run of consecutive indices (so that rows can be
    taken as a view), else None."""
    if idx.size and idx[-1] - idx[0] == idx.size - 1 and np.all(np.diff(idx) == 1):
        return slice(int(idx[0]), int(idx[-1]) + 1)
    return None


@dataclass
class BandKernels:
    """Every spectrum's differential kernel on the modelled pixels, in the layout the
    torch operator reads: ``weights`` (n, T, S) float32 over the span S of the modelled
    pixels (from ``start``), for ``offsets`` (T,), renormalized over the modelled
    pixels (taps onto pixels the emulator does not model weigh 0); ``rel`` the modelled
    pixels' positions in the span, None where they are the whole span; ``reach``
    (T, 2) per tap the pixel range [lo, hi) outside which every spectrum's weights are
    0, and ``half_width`` per spectrum the K beyond which its taps are 0 (a sharp
    visit's kernel is narrower than the widest one): what an operator may skip."""

    weights: NDArray[np.float32]
    offsets: NDArray[np.int64]
    start: int
    rel: NDArray[np.int64] | None
    n_sharper: NDArray[np.int64]  # per spectrum: pixels where the visit is sharper than σ_ref
    reach: NDArray[np.int64]
    half_width: NDArray[np.int64]  # per spectrum: the largest |offset| of a tap that weighs something

    def rows(self, idx: NDArray[np.int64]) -> BandKernels:
        idx = np.asarray(idx, np.int64)
        # a batch is usually a run of consecutive spectra: a view, not a copy of its kernels
        run = run_slice(idx)
        sel: Any = idx if run is None else run
        return BandKernels(self.weights[sel], self.offsets, self.start, self.rel, self.n_sharper[sel], self.reach,
                           self.half_width[sel])

    def apply(self, model: NDArray) -> NDArray[np.float64]:
        """The operator on full-grid spectra (n, P) in numpy (the modelled pixels are
        broadened, the others returned as they are)."""
        out = np.array(model, np.float64)
        S = self.weights.shape[2]
        span = out[:, self.start:self.start + S]
        if self.rel is not None:
            span = np.where(np.isin(np.arange(S), self.rel)[None, :], span, 0.0)
        b = apply_band(span, np.swapaxes(self.weights, 1, 2), self.offsets)
        pix = np.arange(S) if self.rel is None else self.rel
        out[:, self.start + pix] = b[:, pix]
        return out


def band_kernels(lsf_sigma: ArrayLike, sigma_ref: ArrayLike, pixel_mask: ArrayLike, *,
                 tol: float = TAP_TOL) -> BandKernels:
    """Every spectrum's differential kernel against ``sigma_ref`` (P,) on the pixels
    ``pixel_mask`` (P,) models, for spectra of LSF σ ``lsf_sigma`` (n, P) (all σ in
    pixels of one grid), in the layout a batched operator reads (:class:`BandKernels`).
    The fit (``[fit] lsf = "forward"``) and the training through the same operator
    both build their kernels here.

    Unusable σ (non-finite, ≤ 0) are filled from the visit's other pixels
    (:func:`fill_sigma`; a visit without any gets σ_ref, i.e. no broadening, with a
    warning). Pixels where a visit is sharper than σ_ref get the identity (the model
    cannot be sharpened); they are counted, and logged."""
    ref = np.asarray(sigma_ref, np.float64)
    mask = np.asarray(pixel_mask, bool)
    P = len(ref)
    sig = np.asarray(lsf_sigma, np.float64)
    if sig.ndim != 2 or sig.shape[1] != P:
        raise ValueError(f"lsf_sigma has shape {sig.shape}, expected (n, {P}) (σ in pixels per visit)")
    sig, n_filled = fill_sigma(sig, ref)
    if n_filled.any():
        empty = int((n_filled == P).sum())
        log.warning("LSF σ unusable (non-finite or <= 0) in %d pixels of %d spectra, filled from the visit's "
                    "other pixels; %d spectra without any usable σ are fitted at σ_ref", int(n_filled.sum()),
                    int((n_filled > 0).sum()), empty)
    pix = np.flatnonzero(mask)
    p0, p1 = int(pix[0]), int(pix[-1]) + 1
    rel = None if len(pix) == p1 - p0 else pix - p0
    r2 = ref[p0:p1] ** 2
    d2max = max((float((sig[a:a + _BUILD_ROWS, p0:p1] ** 2 - r2).max()) for a in range(0, len(sig), _BUILD_ROWS)),
                default=0.0)
    kmax = band_halfwidth(np.sqrt(max(d2max, 0.0)), tol)
    n, S, T = len(sig), p1 - p0, 2 * kmax + 1
    weights = np.empty((n, T, S), np.float32)
    n_sharper = np.zeros(n, np.int64)
    valid = mask[p0:p1]
    offsets = np.arange(-kmax, kmax + 1, dtype=np.int64)
    # one table for all the spectra (made once, not per chunk), interpolated into the
    # output in chunks of rows whose temporaries stay in cache: at 256 rows the (rows, S)
    # float64 temporaries were fresh pages at every step, and building the kernels cost
    # 40% of the fit they serve (600 real demo visits; now ~20%)
    table = _kernel_table(d2max, kmax, ZERO_TOL if tol > 0 else 0.0) if d2max > 0 and kmax > 0 else None
    used = np.zeros((kmax + 1, S), bool)  # taps −K … 0: where some kernel weighs something
    half_width = np.zeros(n, np.int64)
    for a in range(0, n, _BUILD_ROWS):
        b = min(n, a + _BUILD_ROWS)
        v, sharper = differential_variance(sig[a:b, p0:p1], ref[p0:p1])
        w = weights[a:b]
        if table is None:  # every tap beyond the centre below the tolerance: the identity
            w[...] = 0.0
            w[:, kmax, :] = 1.0
        else:
            _interpolate_kernels(v, table, w, taps_first=True)
        n_sharper[a:b] = (sharper if rel is None else sharper[:, rel]).sum(1)  # the modelled pixels only
        # where each tap weighs something: the kernels are symmetric before restrict_band
        # (which only zeroes taps), so taps −K … 0 tell, and +k reaches where −k does
        nz = w[:, :kmax + 1] != 0
        used |= nz.any(axis=0)
        half_width[a:b] = kmax - nz.any(axis=2).argmax(axis=1)
        restrict_band(w, offsets, valid, taps_first=True, copy=False)
    has = used.any(axis=1)
    lo = np.where(has, used.argmax(axis=1), S)  # empty: [S, 0)
    hi = np.where(has, S - used[:, ::-1].argmax(axis=1), 0)
    reach = np.stack([np.concatenate([lo, lo[:kmax][::-1]]), np.concatenate([hi, hi[:kmax][::-1]])], axis=1)
    if n_sharper.any():
        log.info("LSF forward model: %d of %d spectra are sharper than σ_ref somewhere (%.2f%% of their modelled "
                 "pixels); the model is left at σ_ref there", int((n_sharper > 0).sum()), n,
                 100 * n_sharper.sum() / max(n * len(pix), 1))
    return BandKernels(weights, offsets, p0, rel, n_sharper, reach, half_width)


def homogenize(flux: ArrayLike, ivar: ArrayLike, sigma: ArrayLike, target: ArrayLike, *,
               bad_fraction: float = 0.05, rows: int = 128) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Spectra (n, P) of LSF σ ``sigma`` (n, P) broadened to the common LSF ``target``
    (P,) (all σ in pixels): each by its differential kernel √(target² − σ²), exact
    discrete variance, with the variance propagated (Σ w² σ²). The LSF-homogenized
    catalogues of the paper's §5.1 (``mastar-combspec-…-lsfpercentP``) are made this
    way from the visits sharper than the target at every wavelength; a pixel where a
    spectrum is broader than ``target`` is left as it is (it cannot be sharpened) — pass
    only spectra that are not. Unusable pixels (ivar ≤ 0, non-finite flux) are bridged
    by linear interpolation before broadening, and an output pixel that draws more than
    ``bad_fraction`` of its weight from them gets ivar 0. ``rows`` spectra at a time
    (bounds the kernels' memory)."""
    f = np.array(flux, np.float64)
    iv = np.asarray(ivar, np.float64)
    sig = np.asarray(sigma, np.float64)
    n, P = f.shape
    tgt = np.broadcast_to(np.asarray(target, np.float64), (P,))
    bad = ~(np.isfinite(f) & np.isfinite(iv) & (iv > 0))
    f = _bridge(f, bad, 0.0)
    var = np.where(bad, 0.0, 1.0 / np.where(bad, 1.0, iv))
    out_f = np.empty((n, P), np.float32)
    out_i = np.empty((n, P), np.float32)
    for a in range(0, n, rows):
        b = slice(a, min(n, a + rows))
        k = differential_kernel(np.broadcast_to(tgt, sig[b].shape), sig[b])
        w = restrict_band(k.weights, k.offsets)
        out_f[b] = apply_band(f[b], w, k.offsets)
        v = apply_band(var[b], w * w, k.offsets)
        frac = apply_band(bad[b].astype(np.float64), w, k.offsets)
        ok = (frac <= bad_fraction) & (v > 0)
        out_i[b] = np.where(ok, 1.0 / np.where(ok, v, 1.0), 0.0)
    return out_f, out_i


def fill_sigma(sigma: ArrayLike, fallback: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    """Per-visit LSF σ (n, P) with its unusable pixels (non-finite or ≤ 0: a missing or
    damaged DISP) filled by linear interpolation in pixel index over the visit's usable
    pixels; a visit with none gets ``fallback`` (P,) throughout. Returns the filled σ and,
    per visit, how many pixels were filled."""
    s = np.array(np.atleast_2d(sigma), np.float64)
    bad = ~(np.isfinite(s) & (s > 0))
    return _bridge(s, bad, fallback), bad.sum(axis=1).astype(np.int64)


def _bridge(values: NDArray[np.float64], bad: NDArray[np.bool_], fallback: ArrayLike) -> NDArray[np.float64]:
    """``values`` (n, P), changed in place, with each row's ``bad`` entries filled by
    linear interpolation in pixel index over its good ones; a row with none gets
    ``fallback`` (a scalar or (P,))."""
    fb = np.broadcast_to(np.asarray(fallback, np.float64), values.shape[-1:])
    idx = np.arange(values.shape[-1])
    for i in np.flatnonzero(bad.any(axis=1)):
        good = ~bad[i]
        values[i] = np.interp(idx, idx[good], values[i, good]) if good.any() else fb
    return values
