"""Fitting every spectrum: batched Levenberg–Marquardt on the emulator (paper §3.2).

The paper fits each spectrum with ``scipy.optimize.curve_fit``. Here thousands of
spectra are fitted at once as tensors:

- the model and its **exact Jacobian** come from the closed form of the two-layer MLP,
  sharing one forward pass: J = W2 · diag(σ'(a1)) · W1 · diag(σ'(a0)) · W0, and the
  model and J are produced by a single GEMM of W2 with [h2 | M];
- the χ² uses the inverse variances (masked pixels weigh 0) with the emulator's own
  per-pixel error added to the noise: measured on the test stars (which it was not
  trained on) per Teff bin, it is largest where a star's spectrum is hardest to emulate
  (the blue end of cool stars on the demo). The error of the best grid start's Teff bin
  is used, and where the fit lands in another bin it is fitted again from there with
  that bin's error;
- box bounds are kept by projection, and a parameter that sits on its bound and is
  pushed outward is frozen for that step (a plain clamp lets fits creep along a bound);
- several starts per spectrum (photometric start and the best emulator spectra on the
  training labels), the lowest χ² wins;
- with ``[fit] lsf = "forward"`` each visit's model is the emulator's spectrum (at the
  emulator's reference LSF σ_ref) broadened by the visit's differential kernel
  σ_k² = σ_visit² − σ_ref², one banded operator per spectrum applied in torch to the
  model-and-Jacobian block, so the derivatives stay exact (:class:`_Band`);
- per spectrum: labels, formal covariance and errors, χ², reduced χ², iterations and a
  status code; spectra that cannot be fit get NaN labels and a status, never an
  exception that takes their block down.

:func:`fit_spectra` is the numpy-in / numpy-out core; :func:`fit_cube` runs it as
``map_blocks`` over the Zarr cube on Dask with the emulator loaded once per worker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from .emulator import Emulator, resolve_device
from .lsf import TAP_TOL, BandKernels, run_slice

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

START_POLICIES = ("staged", "all")
LSF_MODES = ("forward", "ignore")

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
    # "all": LM from every start, the lowest χ² kept. "staged": LM from the start with
    # the lowest χ² at its start point first; the other starts run only for spectra whose
    # first fit is unsettled (≥ staged_min_iter iterations, a label on a bound, or not
    # converged), and the lowest χ² is kept. On the 2,807 fittable demo visits (one pass,
    # the demo emulator) "all" took 7.63 iterations per spectrum and "staged" 4.61 (123
    # spectra ran a second start); χ² came out worse than "all" by > 1 for 4 spectra and
    # by > 10 for 3 (a threshold of 6 iterations: 5.13 and 3/3; only bounds and
    # non-convergence: 3.82 and 9/4).
    starts: str = "staged"
    staged_min_iter: int = 15
    max_iter: int = 80
    # stop when an undamped accepted step improves χ² by less than this: a Δχ² of 0.05
    # moves the labels by a few hundredths of their formal error (bench_fit measures it)
    chi2_abs_tol: float = 0.05
    chi2_rel_tol: float = 1e-7
    lambda0: float = 1e-2
    batch_size: int = 2048  # spectra (× starts) per tensor batch
    dtype: str = "float32"  # float32 gives the same labels within 0.5 K and is 2.5× faster on CPU
    chi2_fail: float = 1000.0  # reduced χ² beyond which labels are set to NaN (status BAD_FIT)
    min_pixels: int = 100
    model_error: float = 0.0  # fractional error added in quadrature to the flux errors
    # add the emulator's own per-pixel error (measured on its test stars, per Teff bin) to
    # the noise: the error of the best grid start's Teff bin, and a second fit with the
    # bin's error where the first lands in another bin (an earlier version found the bin
    # with a first fit under the all-star error: bench_validation within 1 K of it, at twice
    # the cost). On the demo's 5-fold validation (bench_validation) it takes the MADs
    # above 6,000 K from 171 K / 0.29 / 0.23 dex to 162 K / 0.23 / 0.18 dex (Teff, log g,
    # [Fe/H]), and [Fe/H] below 6,000 K from 0.144 to 0.130 dex (with an MSE-trained
    # emulator; the Huber-trained default's numbers are in the README).
    emulator_error: bool = True
    device: str = "auto"  # "auto" = CUDA when torch sees a GPU (on the worker), else CPU; "cpu"; "cuda"
    threads: int = 0  # torch threads inside one task; 0 = leave as set (cluster plugin)
    # the visit's line-spread function: "ignore" fits the emulator's spectrum as it is (the
    # paper, §2.2); "forward" broadens it by each visit's differential kernel
    # σ_k² = σ_visit² − σ_ref² (the cube's DISP against the emulator's lsf_sigma_ref), model
    # and Jacobian alike (issue 14)
    lsf: Literal["forward", "ignore"] = "ignore"

    def __post_init__(self) -> None:
        # a [fit.bounds] table names only the labels it changes
        merged = {**DEFAULT_BOUNDS, **{k: (float(v[0]), float(v[1])) for k, v in dict(self.bounds).items()}}
        for k, (a, b) in merged.items():
            if not a < b:
                raise ValueError(f"fit.bounds.{k}: lower bound {a} must be below upper bound {b}")
        object.__setattr__(self, "bounds", merged)
        if self.lsf not in LSF_MODES:
            raise ValueError(f"fit.lsf: expected one of {list(LSF_MODES)}, got {self.lsf!r}")
        from .emulator import check_device

        check_device(self.device, "fit.device")
        if self.starts not in START_POLICIES:
            raise ValueError(f"fit.starts: unknown policy {self.starts!r}; use one of {START_POLICIES}")

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
    chi2: NDArray[np.float64]  # χ² under the data noise alone: the paper's statistic (§4.2)
    dof: NDArray[np.int64]
    n_iter: NDArray[np.int64]
    status: NDArray[np.int64]
    start_index: NDArray[np.int64]  # which start won (0 … K−1)
    at_bound: NDArray[np.bool_]  # (n, L): label on a fit bound
    model: NDArray[np.float32] | None = None  # (n, P) best-fit model, on request
    messages: dict[int, str] = field(default_factory=dict)
    # χ² with the emulator's per-pixel error variance added to the noise: the statistic
    # the fit minimizes; None (= chi2) when no emulator error was used
    chi2_emu: NDArray[np.float64] | None = None

    @property
    def chi2_red(self) -> NDArray[np.float64]:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.dof > 0, self.chi2 / np.maximum(self.dof, 1), np.nan)

    @property
    def chi2_emu_red(self) -> NDArray[np.float64]:
        c = self.chi2 if self.chi2_emu is None else self.chi2_emu
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.dof > 0, c / np.maximum(self.dof, 1), np.nan)


# ---------------------------------------------------------------------------
# the network, its derivative, and the batched LM
# ---------------------------------------------------------------------------

class _TorchNet:
    """Emulator weights as tensors with a fused model+Jacobian evaluation."""

    def __init__(self, emu: Emulator, device: str, dtype: Any, span: bool = False) -> None:
        import torch

        t = functools.partial(torch.as_tensor, device=device, dtype=dtype)
        w = emu.weights
        # only the pixels the emulator models: the others weigh nothing in any χ², so
        # the output layer is cut to them (a third fewer FLOPs for the MILES demo).
        # ``span``: every pixel from the first modelled one to the last, the others
        # inside that range output as 0 (zero weights and bias) — the layout the LSF
        # operator reads (BandKernels' span), so the forward fit needs no scatter onto
        # the span and gather back at every evaluation (the gaps are ~5% of the span)
        modelled = np.flatnonzero(emu.pixel_mask)
        self.pixels = np.arange(modelled[0], modelled[-1] + 1) if span else modelled
        w2, b2 = np.array(w["w2"][self.pixels]), np.array(w["b2"][self.pixels])
        if span:
            off = ~emu.pixel_mask[self.pixels]
            w2[off], b2[off] = 0.0, 0.0
        self.W0, self.b0 = t(w["w0"]), t(w["b0"])
        self.W1, self.b1 = t(w["w1"]), t(w["b1"])
        self.W2, self.b2 = t(w2), t(b2)
        # transposed copies, contiguous, for the (B, ·, H) @ (H, ·) products of model_jac
        self.W0T = self.W0.T.contiguous()
        self.W1T = self.W1.T.contiguous()
        self.W2T = self.W2.T.contiguous()
        self.act = emu.activation
        self.H = emu.n_hidden
        self.P = len(self.pixels)
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
        """Model (B, P) and Jacobian (B, L, P) w.r.t. the scaled labels, from one GEMM
        (:meth:`model_jac_block`); the model is returned as its own contiguous tensor —
        as a strided view into the block, the χ² products downstream ran ~30% slower."""
        out = self.model_jac_block(x, add_bias=False)
        return out[:, 0, :] + self.b2, out[:, 1:, :]

    def model_jac_block(self, x: Any, add_bias: bool = True) -> Any:
        """Model and Jacobian as one (B, 1+L, P) block: row 0 the model, rows 1… ∂/∂x
        (the block the LSF operator is applied to in one go, :class:`_Band`).

        Mᵀ = W0ᵀ·diag(σ'(a0))·W1ᵀ·diag(σ'(a1)) per spectrum (L × H, small), stacked under
        h2 as [h2 | Mᵀ] of shape (B·(1+L), H); one GEMM with W2ᵀ gives the model and every
        column of the Jacobian with P innermost, the layout the χ² reductions want.
        """
        torch = self.torch
        B = x.shape[0]
        h1, d0 = self._act(x @ self.W0.T + self.b0)
        h2, d1 = self._act(h1 @ self.W1.T + self.b1)
        At = d0[:, None, :] * self.W0T[None]  # (B, L, H)
        Mt = torch.matmul(At, self.W1T) * d1[:, None, :]  # (B, L, H)
        Zt = torch.cat([h2[:, None, :], Mt], dim=1).reshape(B * (1 + self.L), self.H)
        out = (Zt @ self.W2T).reshape(B, 1 + self.L, self.P)  # (B, 1+L, P)
        if add_bias:
            out[:, 0, :] += self.b2
        return out

    def normal_equations(self, x: Any, f: Any, w: Any) -> tuple[Any, Any, Any]:
        """χ² (B,), JᵀW(f − m) (B, L) and JᵀWJ (B, L, L) at ``x``: everything an LM step
        needs, without keeping the (B, L, P) Jacobian."""
        m, J = self.model_jac(x)
        r = f - m
        chi2 = (w * r * r).sum(1)
        Jw = J * w[:, None, :]  # one weighted copy serves both products
        return chi2, torch_bmv(Jw, r), Jw @ J.transpose(1, 2)


def torch_bmv(J: Any, v: Any) -> Any:
    """Batched matrix–vector product (B, L, P) · (B, P) → (B, L)."""
    return (J @ v[:, :, None])[:, :, 0]


def _net_for(emu: Emulator, device: str, dtype: str, span: bool = False) -> _TorchNet:
    """The emulator's weights as tensors, converted once per process (a worker fits many
    blocks); ``span``: the output over the LSF operator's span (:class:`_TorchNet`)."""
    import torch

    return emu.cached(("net", device, dtype, span), lambda: _TorchNet(emu, device, getattr(torch, dtype), span))


def _lm(net: _TorchNet, x0: Any, f: Any, w: Any, lo: Any, hi: Any, cfg: FitConfig,
        band: _Band | None = None) -> tuple[Any, ...]:
    """Batched projected Levenberg–Marquardt in scaled label space.

    Only (B, L)-sized state is kept between iterations (labels, χ², JᵀWr, JᵀWJ, λ);
    rows that converge leave the working set, which is compacted so that finished
    spectra cost nothing. Returns x, χ², JᵀWJ at x (the Fisher matrix), iterations and a
    converged flag, for every row of ``x0``. With ``band`` (one LSF operator per row) the
    model and Jacobian are broadened before the χ² (:func:`_normal_equations_lsf`).
    """
    torch = net.torch
    evaluate = net.normal_equations
    if band is not None:
        # whitened once: the data become √w·f and the operator diag(√w)·C, which the
        # compaction below carries along like f and w
        f, w = _whiten(f, w, band)
        evaluate = functools.partial(_normal_equations_lsf, net)
    B, L = x0.shape
    dev, dt = x0.device, x0.dtype
    out_x = torch.clamp(x0, lo, hi)
    out_chi2 = torch.empty(B, dtype=dt, device=dev)
    out_H = torch.empty((B, L, L), dtype=dt, device=dev)
    out_it = torch.zeros(B, dtype=torch.int64, device=dev)
    out_conv = torch.zeros(B, dtype=torch.bool, device=dev)
    rows = torch.arange(B, device=dev)
    x = out_x.clone()
    chi2, g, Hm = evaluate(x, f, w)
    lam = torch.full((B,), cfg.lambda0, dtype=dt, device=dev)
    it = torch.zeros(B, dtype=torch.int64, device=dev)
    eye = torch.eye(L, dtype=dt, device=dev)
    eps = 1e-6
    nu = torch.full((B,), 2.0, dtype=dt, device=dev)  # λ's growth factor after a rejected step
    for _ in range(cfg.max_iter):
        if rows.numel() == 0:
            break
        # freeze a parameter on its bound that the gradient pushes outward (g = −½∂χ²/∂x)
        frozen = ((x <= lo + eps) & (g < 0)) | ((x >= hi - eps) & (g > 0))
        keep = (~frozen).to(dt)
        dg = torch.diagonal(Hm, dim1=1, dim2=2)
        A = Hm + lam[:, None, None] * torch.diag_embed(dg + 1e-9 * dg.amax(1, keepdim=True) + 1e-30)
        A = A * keep[:, :, None] * keep[:, None, :] + eye * (1 - keep)[:, :, None]
        rhs = g * keep
        try:
            delta = torch.linalg.solve(A, rhs)
        except RuntimeError:  # a singular system somewhere in the batch
            delta = (torch.linalg.pinv(A) @ rhs[:, :, None])[:, :, 0]
        delta = torch.nan_to_num(delta) * keep
        # the Gauss–Newton model predicts the χ² decrease of this step; when an undamped
        # step would gain less than the tolerance, the fit has converged: the step is
        # taken without evaluating the trial point (that evaluation — one GEMM — is what
        # an iteration costs). χ² is recomputed at the final labels afterwards.
        pred = 2 * (delta * g).sum(1) - (delta[:, None, :] @ Hm @ delta[:, :, None])[:, 0, 0]
        settled = (lam <= 1.0) & (pred < torch.clamp(cfg.chi2_rel_tol * chi2, min=cfg.chi2_abs_tol))
        if settled.any():
            done = rows[settled]
            out_x[done] = torch.clamp(x[settled] + delta[settled], lo, hi)
            out_chi2[done], out_H[done] = chi2[settled] - pred[settled], Hm[settled]
            out_it[done], out_conv[done] = it[settled], True
            live = ~settled
            rows, x, chi2, g, Hm, lam, it, nu = rows[live], x[live], chi2[live], g[live], Hm[live], lam[live], it[live], nu[live]
            f, w, delta, pred = f[live], w[live], delta[live], pred[live]
            if rows.numel() == 0:
                break
        xn = torch.clamp(x + delta, lo, hi)
        cn, gn, Hn = evaluate(xn, f, w)
        ok = torch.isfinite(cn) & (cn < chi2)
        improve = chi2 - cn
        it += 1
        x = torch.where(ok[:, None], xn, x)
        g = torch.where(ok[:, None], gn, g)
        Hm = torch.where(ok[:, None, None], Hn, Hm)
        small = improve < torch.clamp(cfg.chi2_rel_tol * chi2, min=cfg.chi2_abs_tol)
        chi2 = torch.where(ok, cn, chi2)
        conv = (ok & small & (lam <= 1.0)) | (~ok & (lam >= 1e8)) | (ok & (delta.abs().amax(1) < 1e-7))
        # Nielsen's damping update (Madsen, Nielsen & Tingleff 2004, eq. 3.14): λ shrinks
        # by up to 3× when the step gained what the Gauss–Newton model predicted (ρ ≈ 1)
        # and hardly at all when it gained much less; after a rejected step λ grows by ν,
        # and ν doubles. The fixed ×0.3 / ×4 it replaces cut λ after every marginal success
        # and then overshot across curved valleys (hot stars), zig-zagging for 20–80
        # iterations: on 1,200 real demo visits (staged starts, pixel noise only) the mean
        # fell from 5.12 to 3.74 iterations and the labels agree better with a float64
        # fit run to convergence (95th percentile 0.09 → 0.07σ in Teff)
        rho = improve / torch.clamp(pred, min=1e-30)
        shrink = torch.clamp(1 - (2 * rho - 1) ** 3, min=1 / 3)
        lam = torch.where(ok, torch.clamp(lam * shrink, min=1e-7), torch.clamp(lam * nu, max=1e12))
        nu = torch.where(ok, torch.full_like(nu, 2.0), nu * 2)
        if conv.any():
            done = rows[conv]
            out_x[done], out_chi2[done], out_H[done] = x[conv], chi2[conv], Hm[conv]
            out_it[done], out_conv[done] = it[conv], True
            live = ~conv
            rows, x, chi2, g, Hm, lam, it, nu = rows[live], x[live], chi2[live], g[live], Hm[live], lam[live], it[live], nu[live]
            f, w = f[live], w[live]
    if rows.numel():
        out_x[rows], out_chi2[rows], out_H[rows], out_it[rows] = x, chi2, Hm, it
    return out_x, out_chi2, out_H, out_it, out_conv


def grid_starts(emu: Emulator, flux: NDArray, w: NDArray, grid_labels: NDArray, grid_models: NDArray,
                k: int) -> NDArray[np.float64]:
    """The ``k`` start-grid label sets whose emulated spectra have the lowest χ² for
    each spectrum (a GEMM: χ² = Σwf² − 2(wf)·Mᵀ + w·(M²)ᵀ). Returns (n, k, L)."""
    if k <= 0 or len(grid_labels) == 0:
        return np.empty((len(flux), 0, emu.n_labels))
    # float32 GEMMs (2× float64's speed: with the DR17 start grid, ~2,700 training
    # stars, they cost more than the LM itself), and without the constant Σwf², which does
    # not change a spectrum's ranking; the ranking stays that of the float64 χ² but for
    # near-ties, which the LM from either start resolves
    w32 = np.asarray(w, np.float32)
    M = np.asarray(grid_models, np.float32)
    c = (w32 @ (M * M).T) - 2.0 * ((w32 * np.asarray(flux, np.float32)) @ M.T)
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
        w = _add_variance(w, cfg.model_error)
    return w


def _add_variance(w: NDArray, sigma: float | NDArray) -> NDArray[np.float64]:
    """Weights 1/σ² → 1/(σ² + sigma²); zero weights stay zero."""
    # = w / (1 + w·sigma²): no division by zero and 2–3× faster than forming σ²
    return w / (1.0 + w * np.square(sigma, dtype=np.float64))


def fit_spectra(emu: Emulator, flux: NDArray, ivar: NDArray, *, config: FitConfig = FitConfig(),
                starts: NDArray | None = None, return_model: bool = False,
                lsf_sigma: NDArray | None = None) -> FitResult:
    """Fit normalized spectra (n, P) with the emulator; see the module docstring.

    ``starts`` are extra starting labels (n, L) or (n, K, L) in physical units — e.g.
    the photometric start; rows of NaN are ignored. ``config.n_grid_starts`` more
    starts come from the start grid. Every spectrum gets a result row.

    With ``config.emulator_error`` and an emulator that carries its error table, the
    emulator's error for the Teff bin of the best grid start (found under the all-star
    error) is added to the noise; the spectra whose fit lands in another Teff bin are
    fitted again from that solution (and the grid starts) with that bin's error, and
    ``n_iter`` counts both. Every spectrum thus ends with the error of the bin its labels
    are in, as when every spectrum was fitted twice (first with the all-star error),
    at about half the cost. ``chi2`` is then the paper's χ² (data noise
    only) at the final labels and ``chi2_emu`` the one the fit minimized.

    With ``config.lsf == "forward"``, ``lsf_sigma`` (n, P) is each spectrum's LSF σ in
    pixels of the emulator's grid, and the model fitted to spectrum i is the emulator's
    spectrum broadened by its differential kernel against ``emu.lsf_sigma_ref``
    (:func:`lsf_kernels`); the returned ``model`` is broadened too. With "ignore",
    ``lsf_sigma`` is not used.
    """
    flux = np.asarray(flux, np.float64)
    ivar = np.asarray(ivar, np.float64)
    if flux.ndim != 2 or flux.shape != ivar.shape:
        raise ValueError(f"flux {flux.shape} and ivar {ivar.shape} must be the same (n, pixels) shape")
    if flux.shape[1] != emu.n_pixels:
        raise ValueError(f"spectra have {flux.shape[1]} pixels, the emulator {emu.n_pixels}")
    kern = _forward_kernels(emu, config, lsf_sigma, len(flux))
    w = _effective_weights(emu, flux, ivar, config)
    if not config.emulator_error or emu.pixel_error is None:
        return _fit_weighted(emu, flux, w, config, starts, return_model, kern=kern)
    if "TEFF" not in emu.label_names:
        return _fit_weighted(emu, flux, _add_variance(w, emu.pixel_error_for(None)), config, starts, return_model,
                             w_data=w, kern=kern)
    t = emu.label_names.index("TEFF")
    glabels, gmodels = _grid_models(emu)
    grid = grid_starts(emu, np.where(np.isfinite(flux), flux, 0.0), _add_variance(w, emu.pixel_error_for(None)),
                       glabels, gmodels, config.n_grid_starts)
    if grid.shape[1]:
        teff0 = grid[:, 0, t]
    elif starts is not None:  # only the caller's starts: their first
        s0 = np.asarray(starts, np.float64)
        teff0 = (s0 if s0.ndim == 2 else s0[:, 0])[:, t]
    else:  # no start at all: _fit_weighted refuses it, with the message that says so
        teff0 = np.full(len(flux), np.nan)
    first = _fit_weighted(emu, flux, _add_variance(w, emu.pixel_error_for(teff0)), config, starts, return_model,
                          w_data=w, kern=kern, grid=grid)
    teff1 = first.labels[:, t]
    moved = np.flatnonzero(np.isfinite(teff1) & (emu.pixel_error_row(teff1) != emu.pixel_error_row(teff0)))
    log.debug("emulator error: %d of %d spectra fitted again in the Teff bin their fit moved to", len(moved), len(flux))
    if not len(moved):
        return first
    again = _fit_weighted(emu, flux[moved], _add_variance(w[moved], emu.pixel_error_for(teff1[moved])), config,
                          first.labels[moved], return_model, w_data=w[moved],
                          kern=None if kern is None else kern.rows(moved))
    again.n_iter = again.n_iter + first.n_iter[moved]
    return _replace_rows(first, moved, again)


def _replace_rows(res: FitResult, rows: NDArray[np.int64], sub: FitResult) -> FitResult:
    """``res`` with its rows ``rows`` replaced by the results ``sub`` (fitted for those
    rows, in that order); messages are re-keyed to ``res``'s spectrum numbers."""
    for f in dataclasses.fields(FitResult):
        a, b = getattr(res, f.name), getattr(sub, f.name)
        if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
            a[rows] = b
    replaced = set(rows.tolist())
    res.messages = {**{k: v for k, v in res.messages.items() if k not in replaced},
                    **{int(rows[k]): v for k, v in sub.messages.items()}}
    return res


def _forward_kernels(emu: Emulator, config: FitConfig, lsf_sigma: NDArray | None, n: int) -> BandKernels | None:
    """The per-spectrum LSF kernels when ``config.lsf`` asks for the forward model."""
    if config.lsf == "ignore":
        return None
    if emu.lsf_sigma_ref is None:
        raise ValueError(_no_sigma_ref_message(emu))
    if lsf_sigma is None:
        raise ValueError("[fit] lsf = 'forward' needs each spectrum's LSF σ (lsf_sigma, in pixels); none was given")
    if np.shape(lsf_sigma)[0] != n:
        raise ValueError(f"lsf_sigma has {np.shape(lsf_sigma)[0]} rows for {n} spectra")
    return lsf_kernels(emu, lsf_sigma)


def _fit_weighted(emu: Emulator, flux: NDArray, w: NDArray, config: FitConfig, starts: NDArray | None,
                  return_model: bool, w_data: NDArray | None = None, kern: BandKernels | None = None,
                  grid: NDArray | None = None) -> FitResult:
    """The fit of :func:`fit_spectra` with the pixel weights (1/σ²) given (and, for the
    LSF forward model, the spectra's kernels ``kern``).

    With ``w_data`` (the data-only weights, when ``w`` includes the emulator error) the
    result's ``chi2`` is evaluated with ``w_data`` at the best fit and ``chi2_emu`` holds
    the χ² under ``w``; the BAD_FIT test uses the fitted (``w``) statistic. ``grid`` are
    the grid starts (n, n_grid_starts, L) when the caller has chosen them already.
    """
    import torch

    n, P = flux.shape
    L = emu.n_labels
    if config.threads:
        torch.set_num_threads(config.threads)
    # "auto" resolved here, where the work runs (a worker may have the GPU the client lacks)
    config = dataclasses.replace(config, device=resolve_device(config.device, "fit.device"))
    lo_p, hi_p = config.bounds_for(emu.label_names)
    lo_s, hi_s = emu.scale(lo_p), emu.scale(hi_p)
    fluxc = np.where(np.isfinite(flux), flux, 0.0)
    npix = (w > 0).sum(1)

    # starts: (n, K, L) physical
    parts = []
    if starts is not None:
        s = np.asarray(starts, np.float64)
        parts.append(s[:, None, :] if s.ndim == 2 else s)
    glabels, gmodels = _grid_models(emu)
    parts.append(grid_starts(emu, fluxc, w, glabels, gmodels, config.n_grid_starts) if grid is None else grid)
    S = np.concatenate(parts, axis=1) if parts else np.empty((n, 0, L))
    K = S.shape[1]
    if K == 0:
        raise ValueError("no starting points: give starts or set n_grid_starts ≥ 1")
    # a missing (NaN) start is replaced by a grid start so shapes stay rectangular
    fallback = S[:, -1:, :] if config.n_grid_starts > 0 else np.nanmedian(glabels, 0)[None, None, :]
    S = np.where(np.isfinite(S), S, fallback)

    status = np.zeros(n, np.int64)
    fittable = npix >= max(config.min_pixels, L + 1)
    status[~fittable] = STATUS["NO_DATA"]
    dtype = getattr(torch, config.dtype)
    net = _net_for(emu, config.device, config.dtype, span=kern is not None)
    best_x = np.full((n, L), np.nan)
    best_chi2 = np.full(n, np.inf)
    best_k = np.zeros(n, np.int64)
    n_iter = np.zeros(n, np.int64)
    conv = np.zeros(n, bool)
    best_H = np.full((n, L, L), np.nan)
    idx_fit = np.flatnonzero(fittable)
    lo_t = torch.as_tensor(lo_s, dtype=dtype, device=config.device)
    hi_t = torch.as_tensor(hi_s, dtype=dtype, device=config.device)
    per_batch = max(1, config.batch_size // K)
    messages: dict[int, str] = {}
    # the fit sees only the modelled pixels: cut them out once
    fluxp, wp = fluxc[:, net.pixels], w[:, net.pixels]
    chi2_data = None if w_data is None else np.full(n, np.nan)

    def run(idx: NDArray[np.int64], cols: NDArray[np.int64]) -> None:
        """LM for spectra ``idx`` from their starts ``cols`` (one column per spectrum, or
        shared); a result replaces the stored one only where its χ² is lower."""
        Sb = S[idx[:, None], cols] if cols.ndim == 2 else S[idx][:, cols]
        kmap = cols if cols.ndim == 2 else np.broadcast_to(cols, (len(idx), len(cols)))
        xb, cb, kb, itb, cvb, Hb = _fit_batch(net, emu, fluxp[idx], wp[idx], Sb, lo_t, hi_t, config, dtype,
                                              kern=None if kern is None else kern.rows(idx))
        n_iter[idx] += itb
        better = cb < best_chi2[idx]
        i = idx[better]
        best_x[i], best_chi2[i], best_k[i] = xb[better], cb[better], kmap[better, kb[better]]
        conv[i], best_H[i] = cvb[better], Hb[better]

    def run_all(idx_all: NDArray[np.int64], cols_of: Any) -> None:
        for b0 in range(0, len(idx_all), per_batch):
            ib = idx_all[b0:b0 + per_batch]
            try:
                run(ib, cols_of(ib))
                continue
            except Exception as exc:  # noqa: BLE001 - isolate the spectrum that breaks the batch
                log.warning("batch of %d spectra failed (%s); fitting them one by one", len(ib), exc)
            for i in ib:
                try:
                    run(np.array([i]), cols_of(np.array([i])))
                except Exception as exc:  # noqa: BLE001
                    status[i] = STATUS["ERROR"]
                    messages[int(i)] = f"{type(exc).__name__}: {exc}"
                    log.warning("spectrum %d: fit failed: %s", i, messages[int(i)])

    if config.starts == "all" or K == 1:
        run_all(idx_fit, lambda ib: np.arange(K))
    else:
        # staged: the start with the lowest χ² at its start point first, the others only
        # where that fit is unsettled (FitConfig.starts)
        order = _order_starts(net, emu, fluxp, wp, S, idx_fit, config, dtype, kern=kern)
        run_all(idx_fit, lambda ib: order[ib, :1])
        ok_rows = idx_fit[status[idx_fit] == 0]
        x_phys = emu.unscale(best_x[ok_rows])
        on_bound = _at_bound(x_phys, lo_p, hi_p).any(1)
        again = ok_rows[(n_iter[ok_rows] >= config.staged_min_iter) | on_bound | ~conv[ok_rows]
                        | ~np.isfinite(best_chi2[ok_rows])]
        if len(again):
            run_all(again, lambda ib: order[ib, 1:])
        log.debug("staged starts: %d of %d spectra fitted from more than their best start", len(again), len(idx_fit))

    # covariance: the inverse of JᵀWJ from the last LM evaluation (in scaled labels the
    # matrix is well conditioned, ~1e3, and float32 sums give the errors to ~1e-5), carried
    # to physical units; χ² is recomputed at the final labels with the model alone (the
    # last LM step may have been taken on the Gauss–Newton prediction)
    cov = np.full((n, L, L), np.nan)
    ok = fittable & (status == 0) & np.isfinite(best_chi2)
    rows = np.flatnonzero(ok)
    for s0 in range(0, len(rows), 1024):
        r_ = rows[s0:s0 + 1024]
        with torch.no_grad():
            m = net.model(torch.as_tensor(best_x[r_], dtype=dtype, device=config.device))
            if kern is not None:
                m = _Band.from_kernels(kern.rows(r_), 1, config.device, dtype).apply(m)
            m = m.double().cpu().numpy()
        best_chi2[r_] = (wp[r_] * (fluxp[r_] - m) ** 2).sum(1)
        if chi2_data is not None:
            chi2_data[r_] = (w_data[r_][:, net.pixels] * (fluxp[r_] - m) ** 2).sum(1)
        F = best_H[r_]
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
    at_bound = _at_bound(labels, lo_p, hi_p)
    model = None
    if return_model:
        model = np.full((n, P), np.nan, np.float32)
        good = ~bad
        if good.any():
            pred = emu.predict(labels[good])
            model[good] = (pred if kern is None else kern.rows(np.flatnonzero(good)).apply(pred)).astype(np.float32)
    if chi2_data is None:
        return FitResult(list(emu.label_names), labels, errors, cov, chi2, dof, n_iter, status, best_k, at_bound,
                         model, messages)
    return FitResult(list(emu.label_names), labels, errors, cov, chi2_data, dof, n_iter, status, best_k, at_bound,
                     model, messages, chi2_emu=chi2)


def _at_bound(labels: NDArray, lo: NDArray, hi: NDArray) -> NDArray[np.bool_]:
    """(n, L): a physical label within 1e-4 of the bound range from one of its bounds."""
    tol = 1e-4 * (hi - lo)
    return (np.abs(labels - lo) <= tol) | (np.abs(labels - hi) <= tol)


def _order_starts(net: _TorchNet, emu: Emulator, flux: NDArray, w: NDArray, S: NDArray, idx: NDArray[np.int64],
                  cfg: FitConfig, dtype: Any, kern: BandKernels | None = None) -> NDArray[np.int64]:
    """Per spectrum, its start columns ordered by χ² at the start point (lowest first),
    the starts clamped to the bounds as the LM clamps them. One model evaluation per
    start: a fraction of one LM iteration, which also evaluates the Jacobian. With
    ``kern`` the model is the LSF forward model the fit will use."""
    import torch

    n, K, L = S.shape
    chi2 = np.full((n, K), np.inf)
    lo, hi = (emu.scale(b) for b in cfg.bounds_for(emu.label_names))
    step = max(1, cfg.batch_size // K)
    for b0 in range(0, len(idx), step):
        ib = idx[b0:b0 + step]
        x = np.clip(emu.scale(S[ib].reshape(-1, L)), lo, hi)
        with torch.no_grad():
            m = net.model(torch.as_tensor(x, dtype=dtype, device=cfg.device))
            if kern is not None:  # the starts of a spectrum as channels of its one operator
                band = _Band.from_kernels(kern.rows(ib), 1, cfg.device, dtype)
                m = band.apply(m.reshape(len(ib), K, -1)).reshape(len(ib) * K, -1)
            fb = torch.as_tensor(flux[ib], dtype=dtype, device=cfg.device)[:, None, :]
            wb = torch.as_tensor(w[ib], dtype=dtype, device=cfg.device)[:, None, :]
            c = (wb * (fb - m.reshape(len(ib), K, -1)) ** 2).sum(2).double().cpu().numpy()
        chi2[ib] = np.where(np.isfinite(c), c, np.inf)
    return np.argsort(chi2, axis=1, kind="stable")


def _fit_batch(net: _TorchNet, emu: Emulator, flux: NDArray, w: NDArray, S: NDArray, lo_t: Any, hi_t: Any,
               cfg: FitConfig, dtype: Any, kern: BandKernels | None = None) -> tuple[NDArray, ...]:
    """LM from every start of each spectrum in the batch; keep the lowest χ².

    Returns the scaled labels, χ², start index, iterations (summed over starts), the
    converged flag and JᵀWJ at the solution, per spectrum."""
    import torch

    nb, K, L = S.shape
    xs = torch.as_tensor(emu.scale(S.reshape(nb * K, L)), dtype=dtype, device=cfg.device)
    # one row per spectrum and start; repeated after the cast to the (float32) fit dtype
    f = torch.as_tensor(flux, dtype=dtype, device=cfg.device)
    wt = torch.as_tensor(w, dtype=dtype, device=cfg.device)
    if K > 1:
        f, wt = f.repeat_interleave(K, 0), wt.repeat_interleave(K, 0)
    band = None if kern is None else _Band.from_kernels(kern, K, cfg.device, dtype)
    with torch.no_grad():
        x, chi2, H, it, done = _lm(net, xs, f, wt, lo_t, hi_t, cfg, band=band)
    chi2 = chi2.double().cpu().numpy().reshape(nb, K)
    chi2 = np.where(np.isfinite(chi2), chi2, np.inf)
    k = chi2.argmin(1)
    sel = np.arange(nb) * K + k
    return (x.double().cpu().numpy()[sel], chi2[np.arange(nb), k], k, it.cpu().numpy().reshape(nb, K).sum(1),
            done.cpu().numpy()[sel], H.double().cpu().numpy()[sel])


# ---------------------------------------------------------------------------
# the line-spread forward model (issue 14): one banded kernel per visit
# ---------------------------------------------------------------------------

def lsf_kernels(emu: Emulator, lsf_sigma: NDArray, *, tol: float = TAP_TOL) -> BandKernels:
    """The differential kernels of spectra whose LSF σ is ``lsf_sigma`` (n, P), in pixels
    of the emulator's grid, against the emulator's σ_ref (``emu.lsf_sigma_ref``), on the
    pixels it models (:func:`mastar_vac.lsf.band_kernels`, where unusable σ are filled
    and sharper visits counted)."""
    from . import lsf

    if emu.lsf_sigma_ref is None:
        raise ValueError(_no_sigma_ref_message(emu))
    return lsf.band_kernels(lsf_sigma, emu.lsf_sigma_ref, emu.pixel_mask, tol=tol)


def _no_sigma_ref_message(emu: Emulator) -> str:
    return (f"[fit] lsf = 'forward' needs the reference LSF the emulator predicts at, and emulator "
            f"{emu.content_hash()[:12]}… (labels {', '.join(emu.label_names)}) records none (lsf_sigma_ref); "
            f"use lsf = 'ignore' or an emulator trained with a reference LSF")


@contextlib.contextmanager
def _single_threaded(device: Any) -> Iterator[None]:
    """Torch on one thread (CPU only) for the LSF operator's small, memory-bound ops on
    chunks that stay in cache. Split over threads (above torch's grain of 32,768
    elements) they spent their time synchronizing — 6 ms per op instead of 0.06 ms on a
    loaded 2-core machine — and kept below the grain, the chunks were so small (1–2
    rows) that the ops' fixed cost dominated. The network's GEMM, outside, keeps its
    threads. Switching costs ~0.3 µs. (The setting is the process's: a fit running at
    the same time in another thread may see one thread for that while; only its speed
    changes.)"""
    import torch

    n = torch.get_num_threads()
    if device.type != "cpu" or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class _Band:
    """One banded operator per row on the span of the net's modelled pixels (the output
    of a net made with ``span=True``, :class:`_TorchNet`), in torch:
    out[i] = s[i]·Σ_t w[t, i]·x[i + offsets[t]] (gather form; taps beyond the span, or onto
    an unmodelled pixel inside it, weigh 0 — the weights are renormalized for that, as
    :func:`mastar_vac.lsf.broaden` does; ``s`` the whitening √w, 1 when not whitened).

    Applied to the model-and-Jacobian block it broadens the model and every column of
    the Jacobian by the same linear operator, so the derivatives stay exact. Each tap is
    one fused multiply-add over a chunk of rows. On the CPU that pass is memory-bound,
    so rows go through in small chunks that stay in cache and are reduced to χ², JᵀWr
    and JᵀWJ before the next chunk (:func:`_normal_equations_lsf`, :meth:`chunk_rows`);
    on a GPU in one go.

    What keeps it cheap, each measured on the demo's real visits (600 visits, the
    build's fit, 2 threads; with all of it the forward fit went from 2.96× to 1.81× the
    ignore fit in ``bench_fit``):

    - The kernels are held once per spectrum (``weights``, never copied): the rows (a
      spectrum's starts, the rows the LM keeps as others converge) point into them
      (``row_of``), and the whitening scales the chunk's output. Scaling and compacting
      the (rows, T, S) weights at every step instead was a third of the forward fit's
      extra cost.
    - Each chunk is copied into buffers whose per-tap views are made once
      (:meth:`_buffers`): slicing input and output for every tap of every chunk cost
      more than the arithmetic (~200 against ~65 µs per row and evaluation).
    - A chunk runs only the taps its widest kernel reaches (``half_width``: a sharp
      visit's kernel is narrower; on the demo a third of the taps are skipped).
    - The chunks run on one thread, ~9 rows at a time (:func:`_single_threaded`).

    The buffers are written in place, so there is no autograd through this class (the
    fit runs without it; the training's operator is
    :func:`mastar_vac.emulator.broaden_band_torch`).
    """

    def __init__(self, weights: Any, offsets: Sequence[int], ranges: list[tuple[int, int, int, int]],
                 half_width: NDArray[np.int64], row_of: NDArray[np.int64] | None = None, sw: Any = None,
                 buffers: dict[tuple[int, int], tuple] | None = None) -> None:
        self.weights = weights  # (n, T, S), one kernel per spectrum
        self.offsets = [int(k) for k in offsets]
        self.centre = self.offsets.index(0)  # offsets are −K … K: the centre tap writes, the others add
        # per tap but the centre, by |offset|: (tap, offset, i0, i1), the pixels some kernel writes
        self.ranges = sorted(ranges, key=lambda r: abs(r[1]))
        # the number of those taps with |offset| ≤ K, for K = 0 … max
        K = (len(self.offsets) - 1) // 2
        self.n_taps = [sum(abs(r[1]) <= k for r in self.ranges) for k in range(K + 1)]
        self.half_width = half_width  # (n,) per spectrum: its taps beyond ±K weigh 0
        self.row_of = row_of  # (B,) the spectrum of each row; None: row i is spectrum i
        self.sw = sw  # (B, S) the rows' whitening √w, or None
        self._bufs = {} if buffers is None else buffers  # shared by the operators made from this one

    @classmethod
    def from_kernels(cls, kern: BandKernels, repeat: int, device: str, dtype: Any) -> _Band:
        """The operator of ``kern``'s spectra, each for ``repeat`` consecutive rows (its
        starts)."""
        import torch

        S = kern.weights.shape[2]
        ranges = []
        for t, k in enumerate(kern.offsets.tolist()):
            # the pixels where some kernel's tap t weighs something and its source exists
            lo = max(int(kern.reach[t, 0]), -k, 0)
            hi = min(int(kern.reach[t, 1]), S - k, S)
            if k != 0 and hi > lo:
                ranges.append((t, k, lo, hi))
        row_of = None if repeat == 1 else np.repeat(np.arange(len(kern.weights)), repeat)
        return cls(torch.as_tensor(kern.weights, dtype=dtype, device=device), kern.offsets, ranges, kern.half_width,
                   row_of)

    @property
    def n_rows(self) -> int:
        return len(self.weights) if self.row_of is None else len(self.row_of)

    def _derived(self, row_of: NDArray[np.int64] | None, sw: Any) -> _Band:
        return _Band(self.weights, self.offsets, self.ranges, self.half_width, row_of, sw, self._bufs)

    def __getitem__(self, rows: Any) -> _Band:
        """The operator of the rows ``rows`` (a torch index or mask over the rows)."""
        sel = rows.cpu().numpy() if hasattr(rows, "cpu") else np.asarray(rows)
        row_of = np.arange(len(self.weights)) if self.row_of is None else self.row_of
        return self._derived(row_of[sel], None if self.sw is None else self.sw[rows])

    def scaled(self, s: Any) -> _Band:
        """diag(s)·C, ``s`` (B, S) on the span, one row per row of the operator."""
        return self._derived(self.row_of, s if self.sw is None else self.sw * s)

    def chunk_rows(self, C: int, device: Any) -> int:
        """Rows per chunk: the whole batch on a GPU; on the CPU ~0.5 MB of block, which
        stays in cache through the taps (run on one thread, :func:`_single_threaded`)."""
        S = self.weights.shape[2]
        if device.type != "cpu":
            return max(self.n_rows, 1)
        return max(1, (1 << 17) // max(C * S, 1))

    def _buffers(self, rows: int, C: int, like: Any) -> tuple:
        """Input and output buffers for a chunk of ``rows`` rows of ``C`` channels, with
        every tap's two views of them made once (the kernels' view is one slice)."""
        key = (rows, C)
        buf = self._bufs.get(key)
        if buf is None:
            if len(self._bufs) > 8:  # a GPU's whole-batch chunks shrink as rows converge
                self._bufs.clear()
            S = self.weights.shape[2]
            X, out = like.new_empty((rows, C, S)), like.new_empty((rows, C, S))
            taps = [(out[..., i0:i1], X[..., i0 + k:i1 + k]) for _, k, i0, i1 in self.ranges]
            buf = self._bufs[key] = (X, out, taps)
        return buf

    def _chunk_kernels(self, a: int, b: int) -> tuple[Any, int]:
        """Rows a … b's kernels (b − a, T, S), a view where they are a run of spectra
        (or one spectrum's starts, broadcast), and how many of :attr:`ranges` their
        widest kernel reaches."""
        import torch

        if self.row_of is None:
            return self.weights[a:b], self.n_taps[int(self.half_width[a:b].max())]
        ids = self.row_of[a:b]
        K = self.n_taps[int(self.half_width[ids].max())]
        run = run_slice(ids)
        if run is not None:
            return self.weights[run], K
        if np.all(ids == ids[0]):  # one spectrum's starts
            return self.weights[int(ids[0]):int(ids[0]) + 1], K
        return self.weights.index_select(0, torch.as_tensor(ids, device=self.weights.device)), K

    def apply_rows(self, x: Any, a: int, b: int) -> Any:
        """C·x (whitened when :attr:`sw` is set) for rows a … b, ``x`` (b − a, C, S) on
        the span. Returns a buffer (b − a, C, S), overwritten by the next call for a
        chunk of the same shape."""
        import torch

        X, out, taps = self._buffers(b - a, x.shape[1], x)
        X.copy_(x)
        w, n_taps = self._chunk_kernels(a, b)
        torch.mul(X, w[:, None, self.centre], out=out)
        for (t, _, i0, i1), (o, src) in zip(self.ranges[:n_taps], taps):  # the taps its kernels reach
            o.addcmul_(src, w[:, None, t, i0:i1])
        if self.sw is not None:  # diag(√w)·C: every channel of an output pixel alike
            out.mul_(self.sw[a:b, None, :])
        return out

    def apply(self, x: Any) -> Any:
        """C·x for x (B, S) or (B, C, S) on the span; returns the same shape."""
        import torch

        xb = x[:, None, :] if x.ndim == 2 else x
        out = torch.empty_like(xb)
        B, C = xb.shape[:2]
        step = self.chunk_rows(C, x.device)
        with _single_threaded(x.device):
            for a in range(0, B, step):
                b = min(B, a + step)
                out[a:b] = self.apply_rows(xb[a:b], a, b)
        return out[:, 0, :] if x.ndim == 2 else out


def _whiten(f: Any, w: Any, band: _Band) -> tuple[Any, _Band]:
    """√w·f and diag(√w)·C: the χ² and its normal equations then need no weight pass."""
    sw = w.sqrt()
    return sw * f, band.scaled(sw)


def _normal_equations_lsf(net: _TorchNet, x: Any, sf: Any, band_w: _Band) -> tuple[Any, Any, Any]:
    """:meth:`_TorchNet.normal_equations` with the model and Jacobian broadened by each
    row's kernel C: with R = diag(√w)·C·[m | J] (one operator pass over the block) and
    Y = [√w·f − R₀ | R_J], the Gram matrix YYᵀ holds χ² (its corner), JᵀW(f − m) (its
    first column) and JᵀWJ (the rest) — one small product per chunk of rows
    (:meth:`_Band.chunk_rows`); R is never stored whole."""
    import torch

    blk = net.model_jac_block(x)  # (B, 1+L, S): the net outputs the span
    B, C = blk.shape[:2]
    G = x.new_empty(B, C, C)
    step = band_w.chunk_rows(C, x.device)
    with _single_threaded(x.device):
        for a in range(0, B, step):
            b = min(B, a + step)
            R = band_w.apply_rows(blk[a:b], a, b)
            r = R[:, 0]
            torch.sub(sf[a:b], r, out=r)  # the residual in place of the model
            torch.matmul(R, R.transpose(1, 2), out=G[a:b])
    return G[:, 0, 0].contiguous(), G[:, 1:, 0].contiguous(), G[:, 1:, 1:].contiguous()


# ---------------------------------------------------------------------------
# the paper's method, for comparison: curve_fit per spectrum
# ---------------------------------------------------------------------------

def fit_curve_fit(emu: Emulator, flux: NDArray, ivar: NDArray, start: NDArray, *,
                  config: FitConfig = FitConfig(), analytic_jacobian: bool = False,
                  lsf_sigma: NDArray | None = None) -> tuple[NDArray, NDArray, float]:
    """One spectrum with ``scipy.optimize.curve_fit`` (trust-region reflective, bounds),
    as in Imig et al. 2022 §3.2. Returns (labels, covariance, χ²) in physical units.

    With ``config.lsf == "forward"`` the model is the one the batched fitter uses: the
    emulator's spectrum broadened by the visit's differential kernel (``lsf_sigma`` (P,),
    σ in pixels), in float64 numpy."""
    from scipy.optimize import curve_fit

    kern = _forward_kernels(emu, config, None if lsf_sigma is None else np.atleast_2d(lsf_sigma), 1)
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
        if kern is not None:  # broadened on the whole grid, then the fitted pixels taken
            return kern.apply((W["w2"] @ h2 + W["b2"])[None])[0][good]
        return (W["w2"][good] @ h2 + W["b2"][good])

    jac = None
    if analytic_jacobian:
        net = _net_for(emu, "cpu", "float64")

        def jac(_x: Any, *p: float) -> NDArray:  # noqa: F811
            import torch

            J = np.zeros((emu.n_pixels, emu.n_labels))
            J[net.pixels] = net.model_jac(torch.as_tensor(np.asarray(p)[None], dtype=torch.float64))[1][0].numpy().T
            if kern is not None:  # the same operator on every column: exact derivatives
                J = kern.rows(np.zeros(emu.n_labels, np.int64)).apply(J.T).T
            return J[good]

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
    # CHISQ/CHISQ_RED: data noise only (the paper's, cut at 100); *_EMU: with the
    # emulator error variance, as minimized
    cols += ["CHISQ_EMU", "CHISQ_EMU_RED"]
    return cols


def result_table(res: FitResult) -> NDArray[np.float64]:
    """FitResult → (n, ncols) float64 array in :func:`result_columns` order."""
    L = len(res.label_names)
    iu = np.triu_indices(L, 1)
    covs = res.covariance[:, iu[0], iu[1]]
    bound_bits = (res.at_bound * (1 << np.arange(L))).sum(1)
    chi2_emu = res.chi2 if res.chi2_emu is None else res.chi2_emu
    return np.column_stack([res.labels, res.errors, covs, res.chi2, res.dof, res.chi2_red, res.n_iter, res.status,
                            res.start_index, bound_bits, chi2_emu, res.chi2_emu_red]).astype(np.float64)


def _block_fingerprint(norm_flux: NDArray, norm_ivar: NDArray, disp: NDArray | None = None) -> str:
    """SHA-256 of a block's spectra (and, for the LSF forward model, their DISP): a
    checkpoint is reused only for the same data."""
    h = hashlib.sha256()
    for a in (norm_flux, norm_ivar) + (() if disp is None else (disp,)):
        a = np.ascontiguousarray(a)
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _fit_block(norm_flux: NDArray, norm_ivar: NDArray, starts: NDArray, emu: Emulator, config: FitConfig,
               parts_dir: str | None = None, block_info: dict | None = None,
               disp: NDArray | None = None) -> NDArray[np.float64]:
    """Fit one block; with ``parts_dir``, keep the result as a checkpoint file.

    A block whose checkpoint exists is read back instead of refitted: a killed run
    resumes with the blocks it finished. The directory is specific to the emulator, the
    cube and the fit settings; each checkpoint also records the cube rows it covers and
    a fingerprint of those rows' spectra, and is reused only when both match — so a
    resume with another chunking (or another cube under the same name) never takes a
    checkpoint of other rows. ``disp``: the block's DISP (LSF σ in Å), for the LSF
    forward model.
    """
    part = None
    if parts_dir is not None and block_info is not None:
        start, stop = (int(x) for x in block_info[0]["array-location"][0])
        fingerprint = _block_fingerprint(norm_flux, norm_ivar, disp)
        part = Path(parts_dir) / f"rows-{start:09d}-{stop:09d}.npz"
        if part.exists():
            try:
                with np.load(part, allow_pickle=False) as z:
                    same = (int(z["start"]), int(z["stop"]), str(z["fingerprint"])) == (start, stop, fingerprint)
                    if same and z["table"].shape[0] == len(norm_flux):
                        return np.array(z["table"])
                log.info("fit checkpoint %s is for other data; rows %d-%d are fitted again", part, start, stop)
            except (OSError, ValueError, KeyError):
                pass  # a damaged checkpoint is recomputed
    t0 = time.perf_counter()
    res = fit_spectra(emu, norm_flux, norm_ivar, config=config,
                      starts=starts if np.isfinite(starts).any() else None,
                      lsf_sigma=None if disp is None else disp_to_pixels(disp, emu.wave))
    table = result_table(res)
    log.debug("fitted %d spectra in %.1fs", len(norm_flux), time.perf_counter() - t0)
    if part is not None:
        from .io.atomic import atomic_path

        with atomic_path(part) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, table=table, start=start, stop=stop, fingerprint=fingerprint)
    return table


def disp_to_pixels(disp: NDArray, wave: NDArray) -> NDArray[np.float64]:
    """The cube's DISP (LSF 1σ in Å per pixel, as MaStar's goodspec and the MaNGA RSS
    files carry it, datamodels.md §1.2/§1.9) → σ in pixels of the fit's grid ``wave``.
    Unusable values stay non-finite or ≤ 0 and are filled by :func:`lsf_kernels`."""
    from .lsf import sigma_to_pixels

    d = np.asarray(disp, np.float64)
    if d.shape[-1] != len(wave):
        raise ValueError(f"DISP has {d.shape[-1]} pixels, the fit's grid {len(wave)}")
    with np.errstate(invalid="ignore"):
        return sigma_to_pixels(d, wave)


def _fit_block_lsf(norm_flux: NDArray, norm_ivar: NDArray, starts: NDArray, disp: NDArray, emu: Emulator,
                   config: FitConfig, parts_dir: str | None = None,
                   block_info: dict | None = None) -> NDArray[np.float64]:
    """:func:`_fit_block` with the block's DISP (the map_blocks form for lsf = "forward")."""
    return _fit_block(norm_flux, norm_ivar, starts, emu, config, parts_dir, block_info, disp=disp)


def _load_emulator_on_worker(path: str, expected_hash: str | None = None) -> Emulator:
    """``load_emulator`` in a Dask task: a worker that cannot open the artifact says
    which worker and which path (it may not see the storage the client wrote it to)."""
    from .cluster import worker_name
    from .emulator import load_emulator
    from .errors import ArtifactError, WorkerStorageError

    try:
        return load_emulator(path, expected_hash=expected_hash)
    except (ArtifactError, OSError) as exc:
        if isinstance(exc, ArtifactError) and "not an emulator artifact" not in str(exc):
            raise  # a damaged or tampered artifact, not a storage problem: its own message says so
        raise WorkerStorageError(path, worker_name(), str(exc)) from None


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

    With ``config.lsf == "forward"`` each block's ``disp`` (LSF σ in Å) goes to the fit,
    converted to pixels of the emulator's grid (:func:`disp_to_pixels`).
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
        emu_here = emulator
    else:
        emu_d = dask.delayed(_load_emulator_on_worker, pure=True)(str(emulator), expected_hash=emulator_hash)
        emu_here = load_emulator(emulator, expected_hash=emulator_hash)
        names = emu_here.label_names
    if config.lsf == "forward":  # refused here, before any task runs
        if emu_here.lsf_sigma_ref is None:
            raise ValueError(_no_sigma_ref_message(emu_here))
        if "disp" not in cube:
            raise ValueError("[fit] lsf = 'forward' needs the cube's per-visit LSF (the 'disp' variable); "
                             "this cube has none")
    nf = cube["norm_flux"].data
    ni = cube["norm_ivar"].data
    L = len(names)
    if starts is None:
        starts = np.full((nf.shape[0], L), np.nan)
    st = da.from_array(np.asarray(starts, np.float64), chunks=(nf.chunks[0], (L,)))
    cols = result_columns(names)
    if parts_dir is not None:
        Path(parts_dir).mkdir(parents=True, exist_ok=True)
    pdir = None if parts_dir is None else str(parts_dir)
    if config.lsf == "forward":
        dp = cube["disp"].data
        dp = dp.rechunk((nf.chunks[0], dp.shape[1])) if isinstance(dp, da.Array) else \
            da.from_array(np.asarray(dp), chunks=(nf.chunks[0], dp.shape[1]))
        out = da.map_blocks(_fit_block_lsf, nf, ni, st, dp, emu_d, config, pdir,
                            dtype=np.float64, chunks=(nf.chunks[0], (len(cols),)), name="fit-spectra-lsf",
                            meta=np.empty((0, len(cols)), np.float64))
    else:
        out = da.map_blocks(_fit_block, nf, ni, st, emu_d, config, pdir,
                            dtype=np.float64, chunks=(nf.chunks[0], (len(cols),)), name="fit-spectra",
                            meta=np.empty((0, len(cols)), np.float64))  # no trial call on empty arrays
    ddf = dd.from_dask_array(out, columns=cols)
    keys = {"MANGAID": cube["mangaid"].data, "PLATE": cube["plate"].data, "IFUDESIGN": cube["ifudesign"].data,
            "MJD": cube["mjd"].data}
    kdf = dd.concat([dd.from_dask_array(v.rechunk(nf.chunks[0]), columns=k) for k, v in keys.items()], axis=1)
    return dd.concat([kdf, ddf], axis=1)

