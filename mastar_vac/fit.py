"""Fitting every spectrum: batched Levenberg–Marquardt on the emulator (paper §3.2).

The paper fits each spectrum with ``scipy.optimize.curve_fit``. Here thousands of
spectra are fitted at once as tensors:

- the model and its **exact Jacobian** come from the closed form of the two-layer MLP,
  sharing one forward pass: J = W2 · diag(σ'(a1)) · W1 · diag(σ'(a0)) · W0, and the
  model and J are produced by a single GEMM of W2 with [h2 | M];
- the χ² uses the inverse variances (masked pixels weigh 0);
- box bounds are kept by projection, and a parameter that sits on its bound and is
  pushed outward is frozen for that step (a plain clamp lets fits creep along a bound);
- several starts per spectrum (photometric start and the best emulator spectra on the
  training labels), the lowest χ² wins;
- per spectrum: labels, formal covariance and errors, χ², reduced χ², iterations and a
  status code; spectra that cannot be fit get NaN labels and a status, never an
  exception that takes their block down.

:func:`fit_spectra` is the numpy-in / numpy-out core; :func:`fit_cube` runs it as
``map_blocks`` over the Zarr cube on Dask with the emulator loaded once per worker.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .emulator import Emulator

__all__ = [
    "DEFAULT_BOUNDS",
    "FitConfig",
    "FitResult",
    "STATUS",
    "fit_spectra",
    "fit_curve_fit",
    "grid_starts",
    "fit_cube",
    "result_columns",
    "result_table",
]

log = logging.getLogger(__name__)

# Fit bounds of §3.2, by label name.
DEFAULT_BOUNDS: dict[str, tuple[float, float]] = {
    "TEFF": (3000.0, 32000.0),
    "LOGG": (-1.0, 5.5),
    "FE_H": (-3.0, 1.0),
    "M_H": (-3.0, 1.0),
    "ALPHA_FE": (-1.0, 1.0),
    "ALPHA_M": (-1.0, 1.0),
    "LOG10_VMICRO": (-1.1, 1.1),
}

STATUS = {
    "OK": 0,  # converged
    "MAX_ITER": 1,  # iteration limit reached before convergence (labels kept)
    "NO_DATA": 2,  # fewer usable pixels than FitConfig.min_pixels: labels NaN
    "BAD_FIT": 3,  # reduced χ² above FitConfig.chi2_fail: the emulator cannot describe it; labels NaN
    "ERROR": 4,  # an exception while fitting this spectrum (logged): labels NaN
    "NONFINITE": 5,  # the fit produced non-finite numbers: labels NaN
}


@dataclass(frozen=True)
class FitConfig:
    """The ``[fit]`` section of a run configuration."""

    bounds: Mapping[str, tuple[float, float]] = field(default_factory=lambda: dict(DEFAULT_BOUNDS))
    n_grid_starts: int = 2  # best emulator spectra on the start grid used as starts
    max_iter: int = 80
    chi2_abs_tol: float = 1e-2  # stop when an undamped accepted step improves χ² by less than this
    chi2_rel_tol: float = 1e-7
    lambda0: float = 1e-2
    batch_size: int = 2048  # spectra (× starts) per tensor batch
    dtype: str = "float32"  # float32 gives the same labels within 0.5 K and is 2.5× faster on CPU
    chi2_fail: float = 1000.0  # reduced χ² beyond which labels are set to NaN (status BAD_FIT)
    min_pixels: int = 100
    model_error: float = 0.0  # fractional error added in quadrature to the flux errors
    device: str = "cpu"
    threads: int = 0  # torch threads inside one task; 0 = leave as set (cluster plugin)

    def __post_init__(self) -> None:
        # a [fit.bounds] table names only the labels it changes
        merged = {**DEFAULT_BOUNDS, **{k: (float(v[0]), float(v[1])) for k, v in dict(self.bounds).items()}}
        for k, (a, b) in merged.items():
            if not a < b:
                raise ValueError(f"fit.bounds.{k}: lower bound {a} must be below upper bound {b}")
        object.__setattr__(self, "bounds", merged)

    def bounds_for(self, label_names: Sequence[str]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        lo, hi = [], []
        for name in label_names:
            if name not in self.bounds:
                raise ValueError(f"no fit bounds for label {name!r}; add it to [fit] bounds")
            a, b = self.bounds[name]
            lo.append(a)
            hi.append(b)
        return np.array(lo, float), np.array(hi, float)


@dataclass
class FitResult:
    """Per-spectrum results of :func:`fit_spectra` (arrays of length n)."""

    label_names: list[str]
    labels: NDArray[np.float64]  # (n, L); NaN where status says so
    errors: NDArray[np.float64]  # (n, L) formal 1σ (absolute sigma: from the pixel errors alone)
    covariance: NDArray[np.float64]  # (n, L, L)
    chi2: NDArray[np.float64]
    dof: NDArray[np.int64]
    n_iter: NDArray[np.int64]
    status: NDArray[np.int64]
    start_index: NDArray[np.int64]  # which start won (0 … K−1)
    at_bound: NDArray[np.bool_]  # (n, L): label on a fit bound
    model: NDArray[np.float32] | None = None  # (n, P) best-fit model, on request
    messages: dict[int, str] = field(default_factory=dict)

    @property
    def chi2_red(self) -> NDArray[np.float64]:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.dof > 0, self.chi2 / np.maximum(self.dof, 1), np.nan)


# ---------------------------------------------------------------------------
# the network, its derivative, and the batched LM
# ---------------------------------------------------------------------------

class _TorchNet:
    """Emulator weights as tensors with a fused model+Jacobian evaluation."""

    def __init__(self, emu: Emulator, device: str, dtype: Any) -> None:
        import torch

        t = functools.partial(torch.as_tensor, device=device, dtype=dtype)
        w = emu.weights
        self.W0, self.b0 = t(w["w0"]), t(w["b0"])
        self.W1, self.b1 = t(w["w1"]), t(w["b1"])
        self.W2, self.b2 = t(w["w2"]), t(w["b2"])
        self.act = emu.activation
        self.H = emu.n_hidden
        self.P = emu.n_pixels
        self.L = emu.n_labels
        self.torch = torch

    def _act(self, a: Any) -> tuple[Any, Any]:
        torch = self.torch
        if self.act == "silu":
            s = torch.sigmoid(a)
            return a * s, s * (1 + a * (1 - s))
        if self.act == "leakyrelu":
            return torch.where(a > 0, a, 0.01 * a), torch.where(a > 0, 1.0, 0.01).to(a.dtype)
        if self.act == "sigmoid":
            s = torch.sigmoid(a)
            return s, s * (1 - s)
        if self.act == "tanh":
            th = torch.tanh(a)
            return th, 1 - th * th
        if self.act == "gelu":
            phi = torch.exp(-0.5 * a * a) / np.sqrt(2 * np.pi)
            cdf = 0.5 * (1 + torch.erf(a / np.sqrt(2.0)))
            return a * cdf, cdf + a * phi
        raise ValueError(self.act)

    def model(self, x: Any) -> Any:
        h1, _ = self._act(x @ self.W0.T + self.b0)
        h2, _ = self._act(h1 @ self.W1.T + self.b1)
        return h2 @ self.W2.T + self.b2

    def model_jac(self, x: Any) -> tuple[Any, Any]:
        """Model (B, P) and Jacobian (B, P, L) w.r.t. the scaled labels, one GEMM."""
        torch = self.torch
        B = x.shape[0]
        h1, d0 = self._act(x @ self.W0.T + self.b0)
        h2, d1 = self._act(h1 @ self.W1.T + self.b1)
        A = d0[:, :, None] * self.W0[None]  # (B, H, L)
        M = d1[:, :, None] * torch.matmul(self.W1, A)  # (B, H, L)
        Z = torch.cat([h2[:, :, None], M], dim=2)  # (B, H, 1+L)
        Zr = Z.permute(1, 0, 2).reshape(self.H, B * (1 + self.L))
        out = (self.W2 @ Zr).reshape(self.P, B, 1 + self.L).permute(1, 0, 2)  # (B, P, 1+L)
        return out[:, :, 0] + self.b2, out[:, :, 1:]


def _net_for(emu: Emulator, device: str, dtype: str) -> _TorchNet:
    """The emulator's weights as tensors, converted once per process (a worker fits many blocks)."""
    import torch

    return emu.cached(("net", device, dtype), lambda: _TorchNet(emu, device, getattr(torch, dtype)))


def _lm(net: _TorchNet, x0: Any, f: Any, w: Any, lo: Any, hi: Any, cfg: FitConfig) -> tuple[Any, ...]:
    """Batched projected LM in scaled label space. Returns x, chi2, n_iter, converged."""
    torch = net.torch
    B, L = x0.shape
    x = torch.clamp(x0, lo, hi)
    m, J = net.model_jac(x)
    r = f - m
    chi2 = (w * r * r).sum(1)
    lam = torch.full((B,), cfg.lambda0, dtype=x.dtype, device=x.device)
    n_iter = torch.zeros(B, dtype=torch.int64, device=x.device)
    done = torch.zeros(B, dtype=torch.bool, device=x.device)
    eye = torch.eye(L, dtype=x.dtype, device=x.device)
    span_eps = 1e-6
    for _ in range(cfg.max_iter):
        act = torch.nonzero(~done).squeeze(1)
        if act.numel() == 0:
            break
        xa, Ja, ra, wa, ca, la = x[act], J[act], r[act], w[act], chi2[act], lam[act]
        g = torch.einsum("bpl,bp->bl", Ja, wa * ra)  # = −½ ∂χ²/∂x
        Hm = torch.einsum("bpl,bpk->blk", Ja * wa[:, :, None], Ja)
        at_lo = (xa <= lo + span_eps) & (g < 0)
        at_hi = (xa >= hi - span_eps) & (g > 0)
        frozen = at_lo | at_hi
        keep = (~frozen).to(x.dtype)
        dg = torch.diagonal(Hm, dim1=1, dim2=2)
        A = Hm + la[:, None, None] * torch.diag_embed(dg + 1e-9 * dg.amax(1, keepdim=True) + 1e-30)
        A = A * keep[:, :, None] * keep[:, None, :] + eye * (1 - keep)[:, :, None]
        rhs = g * keep
        try:
            delta = torch.linalg.solve(A, rhs)
        except RuntimeError:  # a singular system in the batch: fall back to the pseudo-inverse
            delta = (torch.linalg.pinv(A) @ rhs[:, :, None]).squeeze(2)
        delta = torch.nan_to_num(delta) * keep
        xn = torch.clamp(xa + delta, lo, hi)
        mn, Jn = net.model_jac(xn)
        rn = f[act] - mn
        cn = (wa * rn * rn).sum(1)
        ok = torch.isfinite(cn) & (cn < ca)
        improve = ca - cn
        n_iter[act] += 1
        # accept
        sel = act[ok]
        x[sel], J[sel], r[sel], chi2[sel] = xn[ok], Jn[ok], rn[ok], cn[ok]
        lam[act] = torch.where(ok, torch.clamp(la * 0.3, min=1e-7), torch.clamp(la * 4.0, max=1e12))
        small = improve < torch.clamp(cfg.chi2_rel_tol * ca, min=cfg.chi2_abs_tol)
        conv = (ok & small & (la <= 1.0)) | (~ok & (la >= 1e8)) | (ok & (delta.abs().amax(1) < 1e-7))
        done[act] = conv
    return x, chi2, n_iter, done, J


def grid_starts(emu: Emulator, flux: NDArray, w: NDArray, grid_labels: NDArray, grid_models: NDArray,
                k: int) -> NDArray[np.float64]:
    """The ``k`` start-grid label sets whose emulated spectra have the lowest χ² for
    each spectrum (a GEMM: χ² = Σwf² − 2(wf)·Mᵀ + w·(M²)ᵀ). Returns (n, k, L)."""
    if k <= 0 or len(grid_labels) == 0:
        return np.empty((len(flux), 0, emu.n_labels))
    wf = w * flux
    c = (wf * flux).sum(1)[:, None] - 2.0 * wf @ grid_models.T + w @ (grid_models**2).T
    k = min(k, len(grid_labels))
    best = np.argpartition(c, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(c, best, 1).argsort(1)
    best = np.take_along_axis(best, order, 1)
    return grid_labels[best]


def _grid_models(emu: Emulator) -> tuple[NDArray, NDArray]:
    def make() -> tuple[NDArray, NDArray]:
        labels = start_grid_labels(emu)
        return labels, emu.predict(labels).astype(np.float64)

    return emu.cached("start_grid", make)


def start_grid_labels(emu: Emulator) -> NDArray[np.float64]:
    """Labels of the start grid: the emulator's training labels when it recorded them
    (``emu.config['start_grid']``), else a coarse regular grid over its label range."""
    g = emu.config.get("start_grid")
    if g is not None and len(g):
        return np.asarray(g, np.float64)
    axes = [np.linspace(a, b, 6 if i < 3 else 3) for i, (a, b) in enumerate(zip(emu.x_min, emu.x_max))]
    mesh = np.meshgrid(*axes, indexing="ij")
    return np.stack([m.ravel() for m in mesh], axis=1)


def _effective_weights(emu: Emulator, flux: NDArray, ivar: NDArray, cfg: FitConfig) -> NDArray[np.float64]:
    w = np.where(np.isfinite(flux) & np.isfinite(ivar) & (ivar > 0), ivar, 0.0).astype(np.float64)
    w *= emu.pixel_mask[None, :]
    if cfg.model_error > 0:
        with np.errstate(divide="ignore"):
            var = np.where(w > 0, 1.0 / np.maximum(w, 1e-30), np.inf) + cfg.model_error**2
        w = np.where(w > 0, 1.0 / var, 0.0)
    return w


def fit_spectra(emu: Emulator, flux: NDArray, ivar: NDArray, *, config: FitConfig = FitConfig(),
                starts: NDArray | None = None, return_model: bool = False) -> FitResult:
    """Fit normalized spectra (n, P) with the emulator; see the module docstring.

    ``starts`` are extra starting labels (n, L) or (n, K, L) in physical units — e.g.
    the photometric start; rows of NaN are ignored. ``config.n_grid_starts`` more
    starts come from the start grid. Every spectrum gets a result row.
    """
    import torch

    flux = np.asarray(flux, np.float64)
    ivar = np.asarray(ivar, np.float64)
    n, P = flux.shape
    L = emu.n_labels
    if P != emu.n_pixels:
        raise ValueError(f"spectra have {P} pixels, the emulator {emu.n_pixels}")
    if config.threads:
        torch.set_num_threads(config.threads)
    lo_p, hi_p = config.bounds_for(emu.label_names)
    lo_s, hi_s = emu.scale(lo_p), emu.scale(hi_p)
    fluxc = np.where(np.isfinite(flux), flux, 0.0)
    w = _effective_weights(emu, flux, ivar, config)
    npix = (w > 0).sum(1)

    # starts: (n, K, L) physical
    parts = []
    if starts is not None:
        s = np.asarray(starts, np.float64)
        parts.append(s[:, None, :] if s.ndim == 2 else s)
    glabels, gmodels = _grid_models(emu)
    parts.append(grid_starts(emu, fluxc, w, glabels, gmodels, config.n_grid_starts))
    S = np.concatenate(parts, axis=1) if parts else np.empty((n, 0, L))
    K = S.shape[1]
    if K == 0:
        raise ValueError("no starting points: give starts or set n_grid_starts ≥ 1")
    # a missing (NaN) start is replaced by the first grid start so shapes stay rectangular
    fallback = S[:, -1:, :] if config.n_grid_starts > 0 else np.nanmedian(glabels, 0)[None, None, :]
    S = np.where(np.isfinite(S), S, fallback)

    status = np.zeros(n, np.int64)
    fittable = npix >= max(config.min_pixels, L + 1)
    status[~fittable] = STATUS["NO_DATA"]
    dtype = getattr(torch, config.dtype)
    net = _net_for(emu, config.device, config.dtype)
    best_x = np.full((n, L), np.nan)
    best_chi2 = np.full(n, np.inf)
    best_k = np.zeros(n, np.int64)
    n_iter = np.zeros(n, np.int64)
    conv = np.zeros(n, bool)
    best_J = np.zeros((n, P, L), np.float32) if n * P * L < 2e8 else None
    idx_fit = np.flatnonzero(fittable)
    lo_t = torch.as_tensor(lo_s, dtype=dtype, device=config.device)
    hi_t = torch.as_tensor(hi_s, dtype=dtype, device=config.device)
    per_batch = max(1, config.batch_size // K)
    messages: dict[int, str] = {}
    for b0 in range(0, len(idx_fit), per_batch):
        ib = idx_fit[b0:b0 + per_batch]
        try:
            out = _fit_batch(net, emu, fluxc[ib], w[ib], S[ib], lo_t, hi_t, config, dtype)
        except Exception as exc:  # noqa: BLE001 - isolate the spectrum that breaks the batch
            log.warning("batch of %d spectra failed (%s); fitting them one by one", len(ib), exc)
            out = None
        if out is not None:
            xb, cb, kb, itb, cvb, Jb = out
            best_x[ib], best_chi2[ib], best_k[ib], n_iter[ib], conv[ib] = xb, cb, kb, itb, cvb
            if best_J is not None:
                best_J[ib] = Jb
            continue
        for i in ib:
            try:
                xb, cb, kb, itb, cvb, Jb = _fit_batch(net, emu, fluxc[i:i + 1], w[i:i + 1], S[i:i + 1], lo_t, hi_t,
                                                      config, dtype)
                best_x[i], best_chi2[i], best_k[i], n_iter[i], conv[i] = xb[0], cb[0], kb[0], itb[0], cvb[0]
                if best_J is not None:
                    best_J[i] = Jb[0]
            except Exception as exc:  # noqa: BLE001
                status[i] = STATUS["ERROR"]
                messages[int(i)] = f"{type(exc).__name__}: {exc}"
                log.warning("spectrum %d: fit failed: %s", i, messages[int(i)])

    # covariance from JᵀWJ at the solution (in float64), scaled → physical
    cov = np.full((n, L, L), np.nan)
    ok = fittable & (status == 0) & np.isfinite(best_chi2)
    rows = np.flatnonzero(ok)
    for s0 in range(0, len(rows), 512):
        r_ = rows[s0:s0 + 512]
        if best_J is not None:
            Jr = best_J[r_].astype(np.float64)
        else:
            xt = torch.as_tensor(best_x[r_], dtype=torch.float64)
            Jr = _net_for(emu, "cpu", "float64").model_jac(xt)[1].numpy()
        F = np.einsum("npl,np,npk->nlk", Jr, w[r_], Jr)
        try:
            cs = np.linalg.inv(F)
        except np.linalg.LinAlgError:  # a singular Fisher matrix somewhere in the block
            cs = np.linalg.pinv(F)
        d = emu.dlabel_dscaled(best_x[r_])
        cov[r_] = cs * d[:, :, None] * d[:, None, :]
    labels = emu.unscale(best_x)
    dof = np.maximum(npix - L, 0).astype(np.int64)
    chi2 = np.where(np.isfinite(best_chi2), best_chi2, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        chi2_red = np.where(dof > 0, chi2 / np.maximum(dof, 1), np.nan)
    status[ok & ~conv] = STATUS["MAX_ITER"]
    nonfinite = fittable & (status <= 1) & ~(np.isfinite(labels).all(1) & np.isfinite(chi2))
    status[nonfinite] = STATUS["NONFINITE"]
    status[fittable & (status <= 1) & (chi2_red > config.chi2_fail)] = STATUS["BAD_FIT"]
    bad = status >= 2
    labels[bad] = np.nan
    cov[bad] = np.nan
    errors = np.sqrt(np.clip(np.diagonal(cov, axis1=1, axis2=2), 0, None))
    tol = 1e-4 * (hi_p - lo_p)
    at_bound = (np.abs(labels - lo_p) <= tol) | (np.abs(labels - hi_p) <= tol)
    model = None
    if return_model:
        model = np.full((n, P), np.nan, np.float32)
        good = ~bad
        if good.any():
            model[good] = emu.predict(labels[good]).astype(np.float32)
    return FitResult(list(emu.label_names), labels, errors, cov, chi2, dof, n_iter, status, best_k, at_bound,
                     model, messages)


def _fit_batch(net: _TorchNet, emu: Emulator, flux: NDArray, w: NDArray, S: NDArray, lo_t: Any, hi_t: Any,
               cfg: FitConfig, dtype: Any) -> tuple[NDArray, ...]:
    """LM from every start of each spectrum in the batch; keep the lowest χ²."""
    import torch

    nb, K, L = S.shape
    xs = torch.as_tensor(emu.scale(S.reshape(nb * K, L)), dtype=dtype, device=cfg.device)
    f = torch.as_tensor(np.repeat(flux, K, axis=0), dtype=dtype, device=cfg.device)
    wt = torch.as_tensor(np.repeat(w, K, axis=0), dtype=dtype, device=cfg.device)
    with torch.no_grad():
        x, chi2, it, done, J = _lm(net, xs, f, wt, lo_t, hi_t, cfg)
    chi2 = chi2.double().cpu().numpy().reshape(nb, K)
    chi2 = np.where(np.isfinite(chi2), chi2, np.inf)
    k = chi2.argmin(1)
    sel = np.arange(nb) * K + k
    x = x.double().cpu().numpy()[sel]
    return (x, chi2[np.arange(nb), k], k, it.cpu().numpy().reshape(nb, K).sum(1),
            done.cpu().numpy()[sel], J.float().cpu().numpy()[sel])


# ---------------------------------------------------------------------------
# the paper's method, for comparison: curve_fit per spectrum
# ---------------------------------------------------------------------------

def fit_curve_fit(emu: Emulator, flux: NDArray, ivar: NDArray, start: NDArray, *,
                  config: FitConfig = FitConfig(), analytic_jacobian: bool = False) -> tuple[NDArray, NDArray, float]:
    """One spectrum with ``scipy.optimize.curve_fit`` (trust-region reflective, bounds),
    as in Imig et al. 2022 §3.2. Returns (labels, covariance, χ²) in physical units."""
    from scipy.optimize import curve_fit

    w = _effective_weights(emu, np.atleast_2d(flux), np.atleast_2d(ivar), config)[0]
    good = w > 0
    lo_p, hi_p = config.bounds_for(emu.label_names)
    lo, hi = emu.scale(lo_p), emu.scale(hi_p)
    W = {k: v.astype(np.float64) for k, v in emu.weights.items()}
    act = emu.activation
    from .emulator import _act_numpy

    def model(_x: Any, *p: float) -> NDArray:
        x = np.asarray(p)
        h1 = _act_numpy(act, W["w0"] @ x + W["b0"])
        h2 = _act_numpy(act, W["w1"] @ h1 + W["b1"])
        return (W["w2"][good] @ h2 + W["b2"][good])

    jac = None
    if analytic_jacobian:
        net = _net_for(emu, "cpu", "float64")

        def jac(_x: Any, *p: float) -> NDArray:  # noqa: F811
            import torch

            return net.model_jac(torch.as_tensor(np.asarray(p)[None], dtype=torch.float64))[1][0].numpy()[good]

    p0 = np.clip(emu.scale(np.asarray(start, float)), lo + 1e-9, hi - 1e-9)
    sigma = 1.0 / np.sqrt(w[good])
    popt, pcov = curve_fit(model, np.zeros(good.sum()), np.asarray(flux, float)[good], p0=p0, sigma=sigma,
                           absolute_sigma=True, bounds=(lo, hi), jac=jac, method="trf")
    chi2 = float((((np.asarray(flux, float)[good] - model(None, *popt)) / sigma) ** 2).sum())
    d = emu.dlabel_dscaled(popt)
    return emu.unscale(popt), pcov * np.outer(d, d), chi2


# ---------------------------------------------------------------------------
# Dask layer
# ---------------------------------------------------------------------------

def result_columns(label_names: Sequence[str]) -> list[str]:
    cols = list(label_names) + [f"{n}_ERR" for n in label_names]
    cols += [f"COV_{a}_{b}" for i, a in enumerate(label_names) for b in label_names[i + 1:]]
    cols += ["CHISQ", "DOF", "CHISQ_RED", "N_ITER", "STATUS", "START", "AT_BOUND"]
    return cols


def result_table(res: FitResult) -> NDArray[np.float64]:
    """FitResult → (n, ncols) float64 array in :func:`result_columns` order."""
    L = len(res.label_names)
    iu = np.triu_indices(L, 1)
    covs = res.covariance[:, iu[0], iu[1]]
    bound_bits = (res.at_bound * (1 << np.arange(L))).sum(1)
    return np.column_stack([res.labels, res.errors, covs, res.chi2, res.dof, res.chi2_red, res.n_iter, res.status,
                            res.start_index, bound_bits]).astype(np.float64)


def _fit_block(norm_flux: NDArray, norm_ivar: NDArray, starts: NDArray, emu: Emulator, config: FitConfig,
               parts_dir: str | None = None, block_info: dict | None = None) -> NDArray[np.float64]:
    """Fit one block; with ``parts_dir``, keep the result as a checkpoint file.

    A block whose checkpoint exists is read back instead of refitted: a killed run
    resumes with the blocks it finished (the directory is specific to the emulator,
    the cube and the fit settings, so a checkpoint is never stale).
    """
    part = None
    if parts_dir is not None and block_info is not None:
        i = block_info[0]["chunk-location"][0]
        part = Path(parts_dir) / f"block-{i:05d}.npy"
        if part.exists():
            try:
                done = np.load(part, allow_pickle=False)
                if done.shape[0] == len(norm_flux):
                    return done
            except (OSError, ValueError):
                pass  # a damaged checkpoint is recomputed
    t0 = time.perf_counter()
    res = fit_spectra(emu, norm_flux, norm_ivar, config=config,
                      starts=starts if np.isfinite(starts).any() else None)
    table = result_table(res)
    log.debug("fitted %d spectra in %.1fs", len(norm_flux), time.perf_counter() - t0)
    if part is not None:
        from .io.atomic import atomic_path

        with atomic_path(part) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, table)
    return table


def fit_cube(cube, emulator: Any, *, config: FitConfig = FitConfig(),  # noqa: ANN001
             starts: NDArray | None = None, emulator_hash: str | None = None,
             parts_dir: str | os.PathLike[str] | None = None) -> Any:
    """Fit every visit of a normalized cube on Dask; returns a Dask DataFrame.

    The fit is ``map_blocks`` over the cube's visit chunks. ``emulator`` is a path to a
    saved emulator (loaded once per worker, through one ``dask.delayed`` task that every
    block depends on — not copied into each task) or an :class:`Emulator` (wrapped the
    same way). ``starts`` (nvisit, L): physical starting labels or NaN. ``parts_dir``:
    keep each block's result there as a checkpoint (see :func:`_fit_block`). The frame
    is keyed by (MANGAID, PLATE, IFUDESIGN, MJD), one row per visit, in cube order.
    """
    import dask
    import dask.array as da
    import dask.dataframe as dd

    from .emulator import load_emulator

    if "norm_flux" not in cube:
        raise ValueError("the cube is not normalized yet (run the normalize stage)")
    if isinstance(emulator, Emulator):
        emu_d = dask.delayed(emulator, pure=True)
        names = emulator.label_names
    else:
        emu_d = dask.delayed(load_emulator, pure=True)(str(emulator), expected_hash=emulator_hash)
        names = load_emulator(emulator, expected_hash=emulator_hash).label_names
    nf = cube["norm_flux"].data
    ni = cube["norm_ivar"].data
    L = len(names)
    if starts is None:
        starts = np.full((nf.shape[0], L), np.nan)
    st = da.from_array(np.asarray(starts, np.float64), chunks=(nf.chunks[0], (L,)))
    cols = result_columns(names)
    if parts_dir is not None:
        Path(parts_dir).mkdir(parents=True, exist_ok=True)
    out = da.map_blocks(_fit_block, nf, ni, st, emu_d, config, None if parts_dir is None else str(parts_dir),
                        dtype=np.float64, chunks=(nf.chunks[0], (len(cols),)), name="fit-spectra",
                        meta=np.empty((0, len(cols)), np.float64))  # no trial call on empty arrays
    ddf = dd.from_dask_array(out, columns=cols)
    keys = {"MANGAID": cube["mangaid"].data, "PLATE": cube["plate"].data, "IFUDESIGN": cube["ifudesign"].data,
            "MJD": cube["mjd"].data}
    kdf = dd.concat([dd.from_dask_array(v.rechunk(nf.chunks[0]), columns=k) for k, v in keys.items()], axis=1)
    return dd.concat([kdf, ddf], axis=1)


def config_from_dict(d: Mapping[str, Any]) -> FitConfig:
    known = {f.name for f in dataclasses.fields(FitConfig)}
    return FitConfig(**{k: v for k, v in d.items() if k in known})
