"""The spectral emulator: a Payne-style fully connected network, labels → normalized flux.

Architecture (Ting et al. 2019, The Payne; Imig et al. 2022 §3.1): min–max scaled labels
→ hidden → hidden → one output per pixel. The activation is configurable; the default
is SiLU, because with piecewise-linear activations (LeakyReLU) the emulated spectrum is
piecewise linear in the labels and χ² fits land in shallow spurious minima (DESIGN.md,
"Smooth activations fit better"); a smooth network also has a smooth exact Jacobian,
which the batched fitter uses.

The model is a small :class:`Emulator` object (numpy weights, label names and scaling,
wavelength grid, training configuration and metrics) that can be sent to Dask workers
once, saved without pickle (safetensors + JSON, verified by content hash on load), and
exported to/imported from The Payne's ``NN_normalized_spectra.npz`` layout.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .errors import ArtifactError

__all__ = [
    "ACTIVATIONS",
    "Emulator",
    "TrainConfig",
    "TrainResult",
    "train_emulator",
    "measure_pixel_error",
    "save_emulator",
    "load_emulator",
    "export_payne_npz",
    "import_payne_npz",
    "split_indices",
    "flux_accuracy",
    "emulator_diagnostic",
    "format_diagnostic",
]

log = logging.getLogger(__name__)

ACTIVATIONS = ("silu", "leakyrelu", "sigmoid", "tanh", "gelu")
ARTIFACT_FORMAT = 1


def _act_numpy(name: str, x: NDArray) -> NDArray:
    if name == "silu":
        return x / (1.0 + np.exp(-x))
    if name == "leakyrelu":
        return np.where(x > 0, x, 0.01 * x)
    if name == "sigmoid":
        return 1.0 / (1.0 + np.exp(-x))
    if name == "tanh":
        return np.tanh(x)
    if name == "gelu":
        from scipy.special import erf

        return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))
    raise ValueError(f"unknown activation {name!r}; choose from {ACTIVATIONS}")


@dataclass
class Emulator:
    """A trained emulator: weights plus everything needed to use it correctly.

    ``weights`` holds ``w0 (h, L), b0 (h), w1 (h, h), b1 (h), w2 (P, h), b2 (P)`` in
    ``torch.nn.Linear`` orientation (out, in), float32.
    """

    label_names: list[str]
    x_min: NDArray[np.float64]
    x_max: NDArray[np.float64]
    wave: NDArray[np.float64]
    weights: dict[str, NDArray[np.float32]]
    activation: str = "silu"
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    pixel_mask: NDArray[np.bool_] | None = None  # pixels the emulator was trained on
    # labels the network sees as log10 (x_min/x_max are then in log10 units). Teff spans
    # 3,000–40,000 K: linear min–max scaling would squeeze every cool star into a few
    # per cent of the input range, where the spectrum changes fastest.
    log_labels: tuple[str, ...] = ()
    # The emulator's own error per pixel, measured on the test stars (never trained on):
    # row 0 over all of them, row b+1 over those in Teff bin b of ``pixel_error_edges``
    # (interior bin edges in K). The fit adds it to the noise (FitConfig.emulator_error),
    # so pixels the network cannot reproduce for such a star weigh less.
    pixel_error: NDArray[np.float32] | None = None
    pixel_error_edges: NDArray[np.float64] | None = None
    # The reference LSF the network's output is at: σ_ref per pixel of ``wave``, in
    # pixels of ``wave``. A fit with ``[fit] lsf = "forward"`` broadens the output by each
    # visit's differential kernel (mastar_vac.lsf.differential_kernel) and needs it.
    lsf_sigma_ref: NDArray[np.float64] | None = None

    def __post_init__(self) -> None:
        self.x_min = np.asarray(self.x_min, np.float64)
        self.x_max = np.asarray(self.x_max, np.float64)
        self.wave = np.asarray(self.wave, np.float64)
        self.weights = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in self.weights.items()}
        if self.pixel_mask is None:
            self.pixel_mask = np.ones(len(self.wave), bool)
        self.pixel_mask = np.asarray(self.pixel_mask, bool)
        if self.pixel_error is not None:
            self.pixel_error = np.asarray(self.pixel_error, np.float32)
            self.pixel_error_edges = np.asarray(
                self.pixel_error_edges if self.pixel_error_edges is not None else [], np.float64)
        if self.lsf_sigma_ref is not None:
            self.lsf_sigma_ref = np.asarray(self.lsf_sigma_ref, np.float64)
        self.validate()
        self._cache: dict[Any, Any] = {}

    # Derived objects (torch tensors, start-grid spectra) are cached per process on the
    # instance and dropped when it is pickled to a Dask worker.
    def __getstate__(self) -> dict[str, Any]:
        d = self.__dict__.copy()
        d.pop("_cache", None)
        return d

    def __setstate__(self, d: dict[str, Any]) -> None:
        self.__dict__.update(d)
        self._cache = {}

    def cached(self, key: Any, factory: Any) -> Any:
        """``factory()`` computed once per process for this emulator and ``key``."""
        if key not in self._cache:
            self._cache[key] = factory()
        return self._cache[key]

    # -- shape checks ---------------------------------------------------------
    def validate(self) -> None:
        L, P = len(self.label_names), len(self.wave)
        need = {"w0", "b0", "w1", "b1", "w2", "b2"}
        if set(self.weights) != need:
            raise ArtifactError(f"emulator weights must be {sorted(need)}, got {sorted(self.weights)}")
        h = self.weights["w0"].shape[0]
        expect = {"w0": (h, L), "b0": (h,), "w1": (h, h), "b1": (h,), "w2": (P, h), "b2": (P,)}
        for k, shp in expect.items():
            if self.weights[k].shape != shp:
                raise ArtifactError(f"emulator weight {k} has shape {self.weights[k].shape}, expected {shp} "
                                    f"({L} labels, {h} hidden, {P} pixels)")
        if self.x_min.shape != (L,) or self.x_max.shape != (L,):
            raise ArtifactError(f"label scaling has shape {self.x_min.shape}/{self.x_max.shape}, expected ({L},)")
        if np.any(self.x_max <= self.x_min):
            raise ArtifactError("label scaling: x_max must exceed x_min for every label")
        if self.activation not in ACTIVATIONS:
            raise ArtifactError(f"unknown activation {self.activation!r}")
        if self.pixel_mask is not None and self.pixel_mask.shape != (P,):
            raise ArtifactError(f"pixel mask has shape {self.pixel_mask.shape}, expected ({P},)")
        if self.pixel_error is not None:
            assert self.pixel_error_edges is not None
            nb = len(self.pixel_error_edges) + 2
            if self.pixel_error.shape != (nb, P):
                raise ArtifactError(f"pixel error table has shape {self.pixel_error.shape}, expected ({nb}, {P}): "
                                    f"one row for all stars and one per Teff bin of {len(self.pixel_error_edges)} edges")
            if not (np.isfinite(self.pixel_error).all() and (self.pixel_error >= 0).all()):
                raise ArtifactError("pixel error table must be finite and non-negative")
            if np.any(np.diff(self.pixel_error_edges) <= 0):
                raise ArtifactError("pixel error Teff edges must increase")
        if self.lsf_sigma_ref is not None:
            if self.lsf_sigma_ref.shape != (P,):
                raise ArtifactError(f"lsf_sigma_ref has shape {self.lsf_sigma_ref.shape}, expected ({P},)")
            if not (np.isfinite(self.lsf_sigma_ref).all() and (self.lsf_sigma_ref >= 0).all()):
                raise ArtifactError("lsf_sigma_ref must be finite and non-negative (pixels)")
        unknown = set(self.log_labels) - set(self.label_names)
        if unknown:
            raise ArtifactError(f"log_labels {sorted(unknown)} are not labels of this emulator")

    @property
    def n_labels(self) -> int:
        return len(self.label_names)

    @property
    def n_hidden(self) -> int:
        return int(self.weights["w0"].shape[0])

    @property
    def n_pixels(self) -> int:
        return len(self.wave)

    def pixel_error_for(self, teff: NDArray | None) -> NDArray[np.float32] | None:
        """The emulator error (n, P) for stars of Teff ``teff`` (n,): the row of their Teff
        bin, or the all-star row where Teff is NaN or ``teff`` is None (then shape (1, P))."""
        if self.pixel_error is None:
            return None
        if teff is None:
            return self.pixel_error[:1]
        return self.pixel_error[self.pixel_error_row(teff)]

    def pixel_error_row(self, teff: NDArray) -> NDArray[np.int64]:
        """The row of ``pixel_error`` for stars of Teff ``teff``: 1 + their Teff bin, 0
        (all stars) where Teff is NaN."""
        teff = np.asarray(teff, np.float64)
        assert self.pixel_error_edges is not None
        row = np.searchsorted(self.pixel_error_edges, teff, side="right") + 1
        return np.where(np.isfinite(teff), row, 0)

    # -- label transforms ------------------------------------------------------
    @property
    def _is_log(self) -> NDArray[np.bool_]:
        return np.array([n in self.log_labels for n in self.label_names])

    def transform(self, labels: NDArray) -> NDArray:
        """Physical labels → the units the scaling is defined in (log10 where asked)."""
        x = np.array(labels, np.float64)
        lg = self._is_log
        if lg.any():
            with np.errstate(divide="ignore", invalid="ignore"):
                x[..., lg] = np.log10(np.where(x[..., lg] > 0, x[..., lg], np.nan))
        return x

    def untransform(self, t: NDArray) -> NDArray:
        x = np.array(t, np.float64)
        lg = self._is_log
        if lg.any():
            x[..., lg] = 10.0 ** x[..., lg]
        return x

    # -- evaluation -----------------------------------------------------------
    def scale(self, labels: NDArray) -> NDArray:
        """Physical labels → the network's input, (t − t_min)/(t_max − t_min) − 0.5 with
        t the (possibly log10) label."""
        return (self.transform(labels) - self.x_min) / (self.x_max - self.x_min) - 0.5

    def unscale(self, scaled: NDArray) -> NDArray:
        return self.untransform((np.asarray(scaled, np.float64) + 0.5) * (self.x_max - self.x_min) + self.x_min)

    def dlabel_dscaled(self, scaled: NDArray) -> NDArray:
        """∂(physical label)/∂(scaled input), per label, at ``scaled`` (n, L): the factors
        that carry a covariance from the fit's scaled space to physical units."""
        span = self.x_max - self.x_min
        d = np.broadcast_to(span, np.shape(scaled)).astype(np.float64).copy()
        lg = self._is_log
        if lg.any():
            d[..., lg] *= np.log(10.0) * self.unscale(scaled)[..., lg]
        return d

    def predict(self, labels: NDArray, lsf_sigma: NDArray | None = None) -> NDArray[np.float64]:
        """Normalized flux (n, P) for labels (n, L) or (L,), in numpy float64.

        The output is at the emulator's reference LSF (``lsf_sigma_ref``) when it has
        one. With ``lsf_sigma`` (n, P), each spectrum's LSF σ in pixels, the model of
        spectrum i is broadened by its differential kernel — what a forward fit and the
        training through the operator compare with that spectrum."""
        x = np.atleast_2d(self.scale(labels))
        w = self.weights
        h1 = _act_numpy(self.activation, x @ w["w0"].T.astype(np.float64) + w["b0"])
        h2 = _act_numpy(self.activation, h1 @ w["w1"].T.astype(np.float64) + w["b1"])
        out = h2 @ w["w2"].T.astype(np.float64) + w["b2"]
        if lsf_sigma is not None and len(out):
            if self.lsf_sigma_ref is None:
                raise ValueError("predict(lsf_sigma=...): this emulator records no reference LSF (lsf_sigma_ref); "
                                 "its output is at no definite LSF and cannot be broadened to a visit's")
            from .lsf import band_kernels

            sig = np.atleast_2d(np.asarray(lsf_sigma, np.float64))
            if sig.shape != out.shape:
                raise ValueError(f"lsf_sigma has shape {sig.shape}, the model {out.shape}")
            out = band_kernels(sig, self.lsf_sigma_ref, self.pixel_mask).apply(out)
        return out[0] if np.ndim(labels) == 1 else out

    def torch_module(self, device: str = "cpu", dtype: Any = None) -> Any:
        """The network as a ``torch.nn.Module`` on ``device`` (float32 by default)."""
        import torch

        m = PayneMLP(self.n_labels, self.n_hidden, self.n_pixels, self.activation)
        with torch.no_grad():
            for i, layer in enumerate((m.l0, m.l1, m.l2)):
                layer.weight.copy_(torch.from_numpy(self.weights[f"w{i}"]))
                layer.bias.copy_(torch.from_numpy(self.weights[f"b{i}"]))
        return m.to(device=device, dtype=dtype or torch.float32).eval()

    def content_hash(self) -> str:
        """SHA-256 of everything that steers a fit: weights, scaling, grid, labels, the
        per-pixel error table, the reference LSF (when recorded) and the configuration
        (which holds the start grid), so a tampered start grid is detected like a tampered
        weight."""
        h = hashlib.sha256()
        for k in sorted(self.weights):
            h.update(k.encode())
            h.update(np.ascontiguousarray(self.weights[k], np.float32).tobytes())
        for arr in (self.x_min, self.x_max, self.wave):
            h.update(np.ascontiguousarray(arr, np.float64).tobytes())
        h.update(np.ascontiguousarray(self.pixel_mask, np.uint8).tobytes())
        h.update(json.dumps([self.label_names, self.activation, sorted(self.log_labels)]).encode())
        if self.pixel_error is not None:  # (absent: the hash of older artifacts is unchanged)
            assert self.pixel_error_edges is not None
            h.update(np.ascontiguousarray(self.pixel_error, np.float32).tobytes())
            h.update(np.ascontiguousarray(self.pixel_error_edges, np.float64).tobytes())
        if self.lsf_sigma_ref is not None:  # the LSF the output is at steers a forward fit
            h.update(b"lsf_sigma_ref")
            h.update(np.ascontiguousarray(self.lsf_sigma_ref, np.float64).tobytes())
        # the same JSON form the artifact stores (save_emulator), so a loaded copy hashes alike
        h.update(json.dumps(self.config, sort_keys=True, default=_json_default).encode())
        return h.hexdigest()


def _torch_activation(name: str) -> Any:
    import torch

    return {"silu": torch.nn.SiLU, "leakyrelu": lambda: torch.nn.LeakyReLU(0.01), "sigmoid": torch.nn.Sigmoid,
            "tanh": torch.nn.Tanh, "gelu": torch.nn.GELU}[name]()


def _payne_mlp_class() -> type:
    import torch

    class _PayneMLP(torch.nn.Module):
        """labels (scaled) → Linear → act → Linear → act → Linear → flux."""

        def __init__(self, n_labels: int, n_hidden: int, n_pixels: int, activation: str = "silu") -> None:
            super().__init__()
            self.l0 = torch.nn.Linear(n_labels, n_hidden)
            self.l1 = torch.nn.Linear(n_hidden, n_hidden)
            self.l2 = torch.nn.Linear(n_hidden, n_pixels)
            self.act = _torch_activation(activation)
            self.activation = activation

        def hidden(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(self.l1(self.act(self.l0(x))))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.l2(self.hidden(x))

    return _PayneMLP


def PayneMLP(n_labels: int, n_hidden: int, n_pixels: int, activation: str = "silu") -> Any:  # noqa: N802
    """Construct the torch network (a factory, so that importing this module needs no torch)."""
    return _payne_mlp_class()(n_labels, n_hidden, n_pixels, activation)


# ---------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainConfig:
    """Emulator settings (the ``[emulator]`` section of a run configuration).

    ``labels`` are allStar column names, or the derived ``ALPHA_FE`` ([α/M] + [M/H] −
    [Fe/H]) and ``LOG10_VMICRO`` (log10 VMICRO); see :mod:`mastar_vac.reference`.
    """

    labels: tuple[str, ...] = ("TEFF", "LOGG", "FE_H", "ALPHA_FE", "LOG10_VMICRO")
    hidden: int = 256
    activation: str = "silu"
    log_labels: tuple[str, ...] = ("TEFF",)  # labels the network sees as log10
    learning_rate: float = 3e-3
    weight_decay: float = 1e-5
    # Updates per epoch matter more than batch size: a DR17-size set (~2,700 training
    # stars) gets 11 per epoch at 256. The demo's ~600 stars get 2 at 256, and demo.toml
    # sets 64 (measured there). At DR17 size, 64 ran into the 9-minute cap (bench_emulator).
    batch_size: int = 256
    max_epochs: int = 3000
    patience: int = 200  # epochs without improvement of the test loss before stopping
    # "plateau": the learning rate halves when the test loss stalls, training stops after
    # `patience` epochs without a gain (up to max_epochs). "cosine": the rate falls from
    # learning_rate to 1/100 of it along a half cosine over exactly `cosine_epochs`
    # epochs, and the best test-loss state is kept (no patience: the schedule decides the
    # length). bench_validation compares the two on the same folds (README).
    lr_schedule: str = "plateau"
    cosine_epochs: int = 400
    # a warm start (the label-outlier retraining): the second emulator starts from the
    # first one's weights and runs this fraction of the first one's schedule
    warm_fraction: float = 0.3
    # an exponential moving average of the weights over the optimizer steps (decay per
    # step; 0 = off; torch.optim.swa_utils), bias-corrected as Adam's moments are, which
    # smooths out the last steps' noise: the test loss, early stopping and the emulator
    # kept use the averaged weights. (Keeping the better of the averaged and the current
    # weights by the test loss was tried: it gave the held-out gains back.)
    ema_decay: float = 0.0
    max_minutes: float = 9.0  # wall-clock cap on training
    error_floor: float = 0.01  # σ added in quadrature to the pixel errors in the loss weights
    # "huber": quadratic within huber_delta σ, linear beyond, so that stars with wrong
    # catalogue labels pull less; against "mse" it raised held-out MILES pixels within
    # 2%/4% from 78.0/90.6% to 80.2/91.5%, and the MADs below 6,000 K from 92 K / 0.23 /
    # 0.13 dex to 78 K / 0.21 / 0.12 (5-fold bench_validation, same reference set and folds)
    loss: str = "huber"
    huber_delta: float = 1.0  # in units of √(σ² + floor²)
    # Teff bin edges (K) of the emulator-error table measured on the test stars; bins
    # with fewer than 5 test stars use the all-star row (bench_validation measures it)
    pixel_error_teff_edges: tuple[float, ...] = (5000.0, 8000.0)
    # pixels at each end of the covered range left out of training and fitting: the
    # running-median continuum is one-sided there and the emulator is worst (DESIGN.md)
    edge_pixels: int = 200
    test_fraction: float = 0.1
    validation_fraction: float = 0.1
    seed: int = 20221
    device: str = "auto"  # "auto" = a GPU when present, else CPU; or "cpu", "cuda", "cuda:N"
    threads: int = 0  # torch threads; 0 = leave torch's default

    def __post_init__(self) -> None:
        check_device(self.device, "emulator.device")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"emulator.lr_schedule: unknown schedule {self.lr_schedule!r}; use one of {LR_SCHEDULES}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"emulator.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.cosine_epochs < 1 or not 0 < self.warm_fraction <= 1:
            raise ValueError(f"emulator.cosine_epochs must be ≥ 1 and emulator.warm_fraction in (0, 1], got "
                             f"{self.cosine_epochs} and {self.warm_fraction}")


@dataclass
class TrainResult:
    emulator: Emulator
    history: dict[str, list[float]]
    split: dict[str, NDArray[np.int64]]
    seconds: float
    epochs: int


def split_indices(n: int, *, test_fraction: float = 0.1, validation_fraction: float = 0.1,
                  seed: int = 20221) -> dict[str, NDArray[np.int64]]:
    """Seeded 80/10/10 split: ``train``, ``test`` (early stopping), ``validation`` (held out)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    n_val = int(round(validation_fraction * n))
    n_test = int(round(test_fraction * n))
    return {"validation": np.sort(order[:n_val]), "test": np.sort(order[n_val:n_val + n_test]),
            "train": np.sort(order[n_val + n_test:])}


DEVICES = ("auto", "cpu", "cuda")
LR_SCHEDULES = ("plateau", "cosine")


def check_device(name: str, key: str) -> None:
    """A ``device`` setting must be "auto", "cpu", "cuda" or "cuda:N" (``key`` names it)."""
    base, _, index = str(name).partition(":")
    if base not in DEVICES or (index and (base != "cuda" or not index.isdigit())):
        raise ValueError(f"{key}: unknown device {name!r}; use one of \"auto\", \"cpu\", \"cuda\" (or \"cuda:N\")")


def resolve_device(name: str, key: str = "device") -> str:
    """The torch device for a ``device`` setting: "auto" is CUDA when torch sees a GPU,
    else the CPU; "cuda" without one is a :class:`~mastar_vac.errors.ConfigError` (raised
    where the work runs: a Dask worker may have a GPU that the client lacks)."""
    import torch

    from .errors import ConfigError

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{key} = {name!r}, but torch sees no CUDA device here (torch {torch.__version__}, "
                          f"torch.cuda.is_available() is False); use \"auto\" or \"cpu\"")
    return name


def _pick_device(name: str) -> str:
    return resolve_device(name, "emulator.device")


def loss_weights(ivar: NDArray, error_floor: float) -> NDArray[np.float32]:
    """Per-pixel loss weights: 0 where ivar = 0, else 1/(σ² + floor²) normalized to the
    floor (so a pixel at infinite S/N weighs 1). The floor keeps very high S/N spectra
    from dominating and absorbs the emulator's own systematic error."""
    ivar = np.asarray(ivar, np.float64)
    with np.errstate(divide="ignore"):
        var = np.where(ivar > 0, 1.0 / np.maximum(ivar, 1e-30), np.inf)
    w = error_floor**2 / (var + error_floor**2)
    return np.where(ivar > 0, w, 0.0).astype(np.float32)


LOSSES = ("mse", "huber")


def training_loss(pred: Any, flux: Any, weights: Any, *, error_floor: float, kind: str = "mse",
                  delta: float = 1.0) -> Any:
    """The training loss on torch tensors: Σ floor²·ρ(z) / Σ w, with z the residual in
    units of √(σ² + floor²) (``weights`` are :func:`loss_weights`, so w·r²/floor² = z²).

    ``kind="mse"``: ρ = z², the weighted mean squared residual. ``kind="huber"``: ρ = z²
    within ``delta`` and 2·delta·|z| − delta² beyond — the same near the model, but a
    star whose catalogue labels are wrong pulls the fit with a bounded force instead of
    one growing with its residual. Catalogue labels have such stars (DESIGN.md: MILES
    labels are not all right). The gain on the demo, measured with ``bench_validation``
    on the same reference set and folds, is quoted at ``TrainConfig.loss``.
    """
    sw = weights.sqrt() / error_floor
    return whitened_loss(sw * pred, sw * flux, weights.sum(), error_floor=error_floor, kind=kind, delta=delta)


def whitened_loss(a: Any, b: Any, weight_sum: Any, *, error_floor: float, kind: str = "mse",
                  delta: float = 1.0) -> Any:
    """:func:`training_loss` of model and flux already scaled by √w/floor (``a``, ``b``;
    z = a − b), with ``weight_sum`` = Σ w: one fused torch loss op, forward and backward.
    The training loop scales the flux once; spelled out in elementwise ops, the Huber
    loss and its gradient cost as much as the network's output layer did (a step of the
    DR17-size network took 55–70 ms against 28–32 ms, one thread)."""
    import torch.nn.functional as F

    if kind == "huber":  # F.huber_loss: ½z² within delta, delta·(|z| − ½delta) beyond
        total = 2.0 * F.huber_loss(a, b, reduction="sum", delta=delta)
    elif kind == "mse":
        total = F.mse_loss(a, b, reduction="sum")
    else:
        raise ValueError(f"unknown loss {kind!r}; choose from {LOSSES}")
    return error_floor**2 * total / weight_sum.clamp_min(1e-12)


def edge_mask(covered: NDArray[np.bool_], n: int) -> NDArray[np.bool_]:
    """The first and last ``n`` covered pixels (True there)."""
    idx = np.flatnonzero(covered)
    out = np.zeros(len(covered), bool)
    if len(idx):
        out[idx[:n]] = True
        out[idx[-n:]] = True
    return out


def train_emulator(labels: NDArray, flux: NDArray, ivar: NDArray, *, label_names: Sequence[str],
                   wave: NDArray, config: TrainConfig = TrainConfig(),
                   split: Mapping[str, NDArray[np.int64]] | None = None,
                   label_bounds: tuple[NDArray, NDArray] | None = None,
                   init: Emulator | None = None, progress: bool = True,
                   lsf_sigma: NDArray | None = None, lsf_sigma_ref: NDArray | None = None) -> TrainResult:
    """Train an emulator on a reference set.

    Parameters
    ----------
    labels, flux, ivar
        (n, L) labels and (n, P) normalized flux and inverse variance. Pixels with
        ``ivar == 0`` carry no weight in the loss.
    split
        Indices ``train``/``test``/``validation``; default :func:`split_indices`. The test
        set drives early stopping; the validation set is never touched here.
    label_bounds
        (x_min, x_max) for the min–max scaling; default: the training labels' range.
    init
        A warm start: an emulator with the same labels, pixels and architecture whose
        weights (and label scaling, unless ``label_bounds`` is given) training starts
        from; it then runs ``config.warm_fraction`` of the schedule at a third of the
        learning rate. The label-outlier retraining (:mod:`mastar_vac.train`) uses it: the
        cleaned set differs from the first by a few percent of its stars.
    lsf_sigma, lsf_sigma_ref
        Training through the LSF operator (issue 14): each spectrum's LSF σ (n, P) and
        the reference LSF σ_ref (P,), both in pixels of ``wave``. The network's output
        is then the spectrum at σ_ref, and the loss compares that output broadened by
        each spectrum's differential kernel (σ_k² = σ² − σ_ref², the operator the fit
        with ``[fit] lsf = "forward"`` uses, :func:`mastar_vac.lsf.band_kernels`) with
        the spectrum — instead of fitting one network output to spectra of different
        resolution. The emulator records σ_ref.
    """
    import torch

    from .progress import progress_bar

    t0 = time.perf_counter()
    labels = np.asarray(labels, np.float64)
    flux = np.asarray(flux, np.float32)
    ivar = np.asarray(ivar, np.float32)
    n, L = labels.shape
    P = flux.shape[1]
    if flux.shape != (n, P) or ivar.shape != (n, P) or len(label_names) != L or len(wave) != P:
        raise ValueError(f"shapes disagree: labels {labels.shape}, flux {flux.shape}, ivar {ivar.shape}, "
                         f"{len(label_names)} label names, {len(wave)} wavelengths")
    if not np.isfinite(labels).all():
        raise ValueError("labels contain NaN/inf: clean the reference set first")
    if config.activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {config.activation!r}; choose from {ACTIVATIONS}")
    if config.loss not in LOSSES or not config.huber_delta > 0:
        raise ValueError(f"loss must be one of {LOSSES} with huber_delta > 0, got {config.loss!r} "
                         f"and {config.huber_delta}")
    split = dict(split) if split is not None else split_indices(
        n, test_fraction=config.test_fraction, validation_fraction=config.validation_fraction, seed=config.seed)
    tr, te = split["train"], split["test"]
    if len(tr) == 0 or len(te) == 0:
        raise ValueError(f"need training and test spectra, got {len(tr)} and {len(te)}")
    log_labels = tuple(n for n in config.log_labels if n in label_names)
    is_log = np.array([n in log_labels for n in label_names])
    if np.any(labels[:, is_log] <= 0):
        raise ValueError(f"labels {list(log_labels)} are scaled as log10 and must be positive")
    tlabels = labels.copy()
    tlabels[:, is_log] = np.log10(labels[:, is_log])
    if init is not None:
        if (list(init.label_names) != list(label_names) or init.n_pixels != P or init.n_hidden != config.hidden
                or init.activation != config.activation):
            raise ValueError(f"warm start: the emulator given has labels {init.label_names}, {init.n_pixels} pixels, "
                             f"{init.n_hidden} hidden ({init.activation}); this training has {list(label_names)}, {P}, "
                             f"{config.hidden} ({config.activation})")
        if tuple(init.log_labels) != log_labels:
            raise ValueError(f"warm start: log-scaled labels differ ({init.log_labels} vs {log_labels})")
    if label_bounds is None and init is not None:  # the warm start's scaling, so its weights mean the same
        x_min, x_max = np.array(init.x_min, np.float64), np.array(init.x_max, np.float64)  # already log10 where so
    elif label_bounds is None:
        x_min, x_max = tlabels[tr].min(axis=0), tlabels[tr].max(axis=0)
    else:
        x_min, x_max = (np.array(b, np.float64) for b in label_bounds)
        x_min[is_log], x_max[is_log] = np.log10(x_min[is_log]), np.log10(x_max[is_log])
    span = np.where(x_max > x_min, x_max - x_min, 1.0)
    x_max = x_min + span
    scaled = ((tlabels - x_min) / span - 0.5).astype(np.float32)
    weights = loss_weights(ivar, config.error_floor)
    pixel_mask = (weights[tr] > 0).any(axis=0)
    if config.edge_pixels > 0:
        pixel_mask &= ~edge_mask(pixel_mask, config.edge_pixels)
        weights = weights * pixel_mask[None, :]
    flux_filled = np.where(weights > 0, flux, 0.0).astype(np.float32)  # no NaN into the graph
    kern = None
    if lsf_sigma_ref is not None:
        from .lsf import band_kernels

        lsf_sigma_ref = np.asarray(lsf_sigma_ref, np.float64)
        if lsf_sigma is None or np.shape(lsf_sigma) != (n, P) or lsf_sigma_ref.shape != (P,):
            raise ValueError(f"training through the LSF operator needs lsf_sigma ({n}, {P}) and lsf_sigma_ref "
                             f"({P},); got {None if lsf_sigma is None else np.shape(lsf_sigma)} and "
                             f"{lsf_sigma_ref.shape}")
        if init is not None and (init.lsf_sigma_ref is None or not np.allclose(init.lsf_sigma_ref, lsf_sigma_ref)):
            raise ValueError("warm start: the emulator given predicts at another reference LSF")
        rows = np.concatenate([tr, te])
        kern = band_kernels(np.asarray(lsf_sigma, np.float64)[rows], lsf_sigma_ref, pixel_mask)
        log.info("training through the LSF operator: %d-tap differential kernels, %d of %d spectra sharper than "
                 "σ_ref somewhere", len(kern.offsets), int((kern.n_sharper > 0).sum()), len(rows))
    elif lsf_sigma is not None:
        raise ValueError("lsf_sigma without lsf_sigma_ref: give the reference LSF the network is to predict at")

    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    device = _pick_device(config.device)
    # the network is trained on the modelled pixels only (pixel_mask): the others carry
    # no weight in any loss, and their outputs (zero weights, the mean spectrum as bias)
    # would only cost output-layer FLOPs — a tenth of them with the demo's edge cut
    pix = np.flatnonzero(pixel_mask)
    wsum = weights[tr].sum(axis=0)
    mean = np.where(wsum > 0, (flux_filled[tr] * weights[tr]).sum(axis=0) / np.maximum(wsum, 1e-12), 1.0)
    model = PayneMLP(L, config.hidden, len(pix), config.activation).to(device)
    with torch.no_grad():
        if init is not None:
            for name, key in (("l0.weight", "w0"), ("l0.bias", "b0"), ("l1.weight", "w1"), ("l1.bias", "b1")):
                model.get_parameter(name).copy_(torch.from_numpy(np.asarray(init.weights[key], np.float32)))
            model.l2.weight.copy_(torch.from_numpy(np.asarray(init.weights["w2"], np.float32)[pix]))
            model.l2.bias.copy_(torch.from_numpy(np.asarray(init.weights["b2"], np.float32)[pix]))
        else:  # start the output bias at the mean spectrum: faster convergence
            model.l2.bias.copy_(torch.from_numpy(mean[pix].astype(np.float32)))
    lr = config.learning_rate / 3 if init is not None else config.learning_rate
    # fused AdamW: one kernel for all parameters, 5× faster per step than the default
    # on the CPU (where the step was a third of an epoch's time); not every build has it
    try:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=config.weight_decay, fused=True)
    except (RuntimeError, TypeError):
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=config.weight_decay)
    frac = config.warm_fraction if init is not None else 1.0
    patience = max(10, int(round(config.patience * frac)))
    if config.lr_schedule == "cosine":
        n_epochs = max(1, int(round(config.cosine_epochs * frac)))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=n_epochs, eta_min=lr / 100)
    else:
        n_epochs = config.max_epochs
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=max(10, patience // 4),
                                                           min_lr=lr / 100)

    def tensors(idx: NDArray[np.int64]) -> tuple[Any, Any, Any, Any]:
        """Labels, the weights' √w/floor and the flux scaled by it, and Σw per spectrum
        (the loss in :func:`whitened_loss` form: the scaling done once, not per step)."""
        w = torch.from_numpy(np.ascontiguousarray(weights[idx][:, pix])).to(device)
        sw = w.sqrt() / config.error_floor
        y = torch.from_numpy(np.ascontiguousarray(flux_filled[idx][:, pix])).to(device)
        return torch.from_numpy(scaled[idx]).to(device), sw, sw * y, w.sum(1)

    Xtr, SWtr, Btr, WStr = tensors(tr)
    Xte, SWte, Bte, WSte = tensors(te)
    if kern is not None:  # the kernels of the training and test spectra, in that order
        Ktr = torch.from_numpy(kern.weights[:len(tr)]).to(device)
        Kte = torch.from_numpy(kern.weights[len(tr):]).to(device)
        rel = None if kern.rel is None else torch.as_tensor(kern.rel, dtype=torch.long, device=device)
        offsets = [int(k) for k in kern.offsets]
    else:
        Ktr = Kte = None

    bs = min(config.batch_size, len(tr))
    # the averaged weights (ema_decay > 0): a copy updated after every step
    ema = None
    if config.ema_decay > 0:
        from torch.optim.swa_utils import AveragedModel

        decay = config.ema_decay

        def average(avg: list[Any], p: list[Any], n: Any) -> None:
            # e_t = d·e_{t−1} + (1 − d)·w_t from e_0 = 0, divided by 1 − dᵗ: the average of
            # the steps so far with weights ∝ dᵗ⁻ⁱ (AveragedModel copies w_1 at n = 0);
            # over ≫ 1/(1 − d) steps the correction vanishes. One fused pass over all the
            # parameters (per parameter, the update made the training ~40% slower)
            t = float(n) + 1.0
            norm = 1.0 - decay**t
            torch._foreach_mul_(avg, decay * (1.0 - decay ** (t - 1)) / norm)
            torch._foreach_add_(avg, p, alpha=(1.0 - decay) / norm)

        ema = AveragedModel(model, multi_avg_fn=average, use_buffers=False)
        per_epoch = -(-len(tr) // bs)
        steps = n_epochs * per_epoch
        # the averaged weights lag the current ones by ~1/(1 − d) steps: early stopping waits
        # at least twice that (a warm start's shorter patience otherwise stopped it before
        # the average had moved from its starting weights)
        patience = max(patience, int(np.ceil(2.0 / (1.0 - decay) / per_epoch)))
        if steps < 3.0 / (1.0 - decay):
            log.warning("emulator.ema_decay = %g averages over ~%d optimizer steps, and this training has at most %d: "
                        "the average will still hold the first steps' weights", decay, round(1 / (1 - decay)), steps)

    def loss_fn(x: Any, sw: Any, b: Any, ws: Any, kw: Any = None, net: Any = model) -> Any:
        out = net(x)
        if kw is not None:
            out = broaden_band_torch(out, kw, offsets, rel)
        return whitened_loss(sw * out, b, ws.sum(), error_floor=config.error_floor, kind=config.loss,
                             delta=config.huber_delta)
    history: dict[str, list[float]] = {"train": [], "test": [], "lr": []}
    best = (np.inf, 0, None)
    gen = torch.Generator(device="cpu").manual_seed(config.seed)
    epochs_run = 0
    bar = progress_bar(range(n_epochs), desc="train emulator", unit="epoch", disable=not progress)
    for epoch in bar:
        model.train()
        perm = torch.randperm(len(tr), generator=gen).to(device)
        tot = 0.0
        for s in range(0, len(tr), bs):
            b = perm[s:s + bs]
            loss = loss_fn(Xtr[b], SWtr[b], Btr[b], WStr[b], None if Ktr is None else Ktr[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if ema is not None:
                ema.update_parameters(model)
            tot += float(loss.detach()) * len(b)
        model.eval()
        with torch.no_grad():
            kept = model if ema is None else ema.module
            te_loss = float(loss_fn(Xte, SWte, Bte, WSte, Kte, net=kept))
        history["train"].append(tot / len(tr))
        history["test"].append(te_loss)
        history["lr"].append(opt.param_groups[0]["lr"])
        if config.lr_schedule == "cosine":
            sched.step()
        else:
            sched.step(te_loss)
        epochs_run = epoch + 1
        if te_loss < best[0]:
            best = (te_loss, epoch, {k: v.detach().cpu().clone() for k, v in kept.state_dict().items()})
        elif config.lr_schedule == "plateau" and epoch - best[1] >= patience:
            log.info("early stop at epoch %d (best test loss %.3g at epoch %d)", epoch, best[0], best[1])
            break
        if (time.perf_counter() - t0) / 60 > config.max_minutes:
            log.warning("training stopped at the %.1f-minute cap (epoch %d)", config.max_minutes, epoch)
            break
    else:
        log.info("%d epochs (best test loss %.3g at epoch %d)", epochs_run, best[0], best[1])
    assert best[2] is not None
    state = best[2]
    w = {"w0": state["l0.weight"], "b0": state["l0.bias"], "w1": state["l1.weight"], "b1": state["l1.bias"]}
    w = {k: v.numpy() for k, v in w.items()}
    w["w2"] = np.zeros((P, config.hidden), np.float32)  # back to every pixel (see above)
    w["w2"][pix] = state["l2.weight"].numpy()
    w["b2"] = mean.astype(np.float32)
    w["b2"][pix] = state["l2.bias"].numpy()
    emu = Emulator(
        label_names=list(label_names), x_min=x_min, x_max=x_max, wave=np.asarray(wave, np.float64),
        weights=w, activation=config.activation,
        config=dataclasses.asdict(config) | {"device_used": device, "n_train": int(len(tr)),
                                             "n_test": int(len(te)),
                                             "n_validation": int(len(split.get("validation", [])))},
        metrics={"best_test_loss": best[0], "best_epoch": best[1], "epochs": epochs_run,
                 "warm_start": init is not None, "averaged_weights": ema is not None},
        pixel_mask=pixel_mask, log_labels=log_labels, lsf_sigma_ref=lsf_sigma_ref,
    )
    # Teff bins need a Teff label; without one, the all-star row alone
    edges = tuple(config.pixel_error_teff_edges) if "TEFF" in emu.label_names else ()
    emu.pixel_error_edges = np.asarray(edges, np.float64)
    emu.pixel_error = measure_pixel_error(emu, labels[te], flux[te], ivar[te], teff_edges=edges,
                                          lsf_sigma=None if kern is None else np.asarray(lsf_sigma)[te])
    emu.validate()
    seconds = time.perf_counter() - t0
    emu.metrics["train_seconds"] = seconds
    return TrainResult(emu, history, {k: np.asarray(v) for k, v in split.items()}, seconds, epochs_run)


def _band_rows(y: Any, w: Any, offsets: Sequence[int], transpose: bool = False) -> Any:
    """C·y (or Cᵀ·y) for banded per-row kernels ``w`` (B, T, S) and rows ``y`` (B, S):
    (C·y)[i] = Σ_t w[t, i]·y[i + k_t] and (Cᵀ·y)[j] = Σ_t w[t, j − k_t]·y[j − k_t], taps
    beyond the ends reading 0. One in-place multiply-add per tap, no temporaries."""
    S = y.shape[1]
    out = y * w[:, list(offsets).index(0)]
    for t, k in enumerate(offsets):
        if k == 0:
            continue
        if not transpose:
            dst, src, wt = ((slice(0, S - k), slice(k, S), slice(0, S - k)) if k > 0 else
                            (slice(-k, S), slice(0, S + k), slice(-k, S)))
        else:
            dst, src, wt = ((slice(k, S), slice(0, S - k), slice(0, S - k)) if k > 0 else
                            (slice(0, S + k), slice(-k, S), slice(-k, S)))
        out[:, dst].addcmul_(y[:, src], w[:, t, wt])
    return out


@functools.cache
def _band_function() -> type:
    """The autograd function of :func:`broaden_band_torch` (made once, on first use:
    torch is imported lazily)."""
    import torch

    class _BandOp(torch.autograd.Function):
        """The banded operator with its exact adjoint as the backward pass: autograd
        through per-tap slices would allocate and add a padded gradient per tap (that
        made a training step of the demo network 2.5× slower than without the operator;
        this, 1.8×)."""

        @staticmethod
        def forward(ctx: Any, y: Any, w: Any, offsets: tuple[int, ...]) -> Any:  # noqa: ANN401
            ctx.save_for_backward(w)
            ctx.offsets = offsets
            return _band_rows(y, w, offsets)

        @staticmethod
        def backward(ctx: Any, g: Any) -> tuple[Any, None, None]:  # noqa: ANN401
            (w,) = ctx.saved_tensors
            return _band_rows(g.contiguous(), w, ctx.offsets, transpose=True), None, None

    return _BandOp


def broaden_band_torch(y: Any, weights: Any, offsets: Sequence[int], rel: Any | None) -> Any:
    """The banded LSF operator on a batch of network outputs, differentiable: ``y``
    (B, N) on the modelled pixels, ``weights`` (B, T, S) the rows' kernels over the
    span S of those pixels (:class:`mastar_vac.lsf.BandKernels`, taps beyond the span
    or onto unmodelled pixels already weighing 0), ``rel`` the modelled pixels'
    positions in the span (None: the whole span). out[i] = Σ_t w[t, i]·y[i + offsets[t]].
    One multiply-add per tap over the batch, forward and backward."""
    S = weights.shape[-1]
    span = y if rel is None else y.new_zeros(y.shape[0], S).index_copy(1, rel, y)
    out = _band_function().apply(span.contiguous(), weights, tuple(int(k) for k in offsets))
    return out if rel is None else out[:, rel]


def measure_pixel_error(emu: Emulator, labels: NDArray, flux: NDArray, ivar: NDArray, *,
                        teff_edges: Sequence[float] = (), min_stars: int = 5,
                        lsf_sigma: NDArray | None = None) -> NDArray[np.float32]:
    """The emulator's own error per pixel on spectra it was not trained on: the rms of
    (model − flux) with the noise variance taken out, √max(⟨r²⟩ − ⟨σ²⟩, 0), over all
    spectra (row 0) and per Teff bin (rows 1…; a bin with fewer than ``min_stars``
    spectra, or a pixel without data in it, gets the all-star value). With
    ``lsf_sigma`` the model is broadened to each spectrum's LSF (:meth:`Emulator.predict`)."""
    labels = np.asarray(labels, np.float64)
    flux = np.asarray(flux, np.float64)
    ivar = np.asarray(ivar, np.float64)
    good = (ivar > 0) & np.isfinite(flux) & emu.pixel_mask[None, :]
    model = emu.predict(labels, lsf_sigma) if len(labels) else np.empty_like(flux)
    with np.errstate(divide="ignore", invalid="ignore"):
        excess = np.where(good, (model - np.where(good, flux, 0.0)) ** 2 - 1.0 / np.where(good, ivar, 1.0), 0.0)

    def rms(sel: NDArray[np.bool_]) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
        n = good[sel].sum(0)
        v = excess[sel].sum(0) / np.maximum(n, 1)
        return np.sqrt(np.clip(v, 0.0, None)), n > 0

    all_row, _ = rms(np.ones(len(labels), bool))
    rows = [all_row]
    if len(teff_edges):
        t = labels[:, emu.label_names.index("TEFF")]
        b = np.searchsorted(np.asarray(teff_edges, np.float64), t, side="right")
        for k in range(len(teff_edges) + 1):
            sel = b == k
            if sel.sum() < min_stars:
                rows.append(all_row)
                continue
            r, has = rms(sel)
            rows.append(np.where(has, r, all_row))
    else:  # one Teff bin holding every star (the table always has a row per bin after row 0)
        rows.append(all_row)
    return np.stack(rows).astype(np.float32)


# ---------------------------------------------------------------------------
# saving and loading
# ---------------------------------------------------------------------------

_WEIGHTS_FILE = "weights.safetensors"
_META_FILE = "emulator.json"


def _json_default(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o)}")


def save_emulator(emu: Emulator, directory: str | os.PathLike[str]) -> Path:
    """Save to ``directory`` (weights.safetensors + emulator.json), atomically; no pickle."""
    from safetensors.numpy import save_file

    from .io.atomic import atomic_dir

    directory = Path(directory)
    tensors = {**{k: v for k, v in emu.weights.items()},
               "x_min": emu.x_min, "x_max": emu.x_max, "wave": emu.wave,
               "pixel_mask": emu.pixel_mask.astype(np.uint8)}
    if emu.pixel_error is not None:
        tensors["pixel_error"] = emu.pixel_error
        tensors["pixel_error_edges"] = emu.pixel_error_edges
    if emu.lsf_sigma_ref is not None:
        tensors["lsf_sigma_ref"] = emu.lsf_sigma_ref
    meta = {
        "format": ARTIFACT_FORMAT,
        "label_names": emu.label_names,
        "activation": emu.activation,
        "log_labels": list(emu.log_labels),
        "n_hidden": emu.n_hidden,
        "n_pixels": emu.n_pixels,
        "config": emu.config,
        "metrics": emu.metrics,
        "content_hash": emu.content_hash(),
    }
    with atomic_dir(directory) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp / _WEIGHTS_FILE))
        meta["weights_sha256"] = hashlib.sha256((tmp / _WEIGHTS_FILE).read_bytes()).hexdigest()
        (tmp / _META_FILE).write_text(json.dumps(meta, indent=1, default=_json_default))
    return directory


def load_emulator(directory: str | os.PathLike[str], *, expected_hash: str | None = None) -> Emulator:
    """Load a saved emulator, verifying the file hash, shapes and content hash.

    Any mismatch (a changed or truncated weights file, edited metadata, a hash other
    than ``expected_hash``) raises :class:`~mastar_vac.errors.ArtifactError`.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    directory = Path(directory)
    mpath, wpath = directory / _META_FILE, directory / _WEIGHTS_FILE
    if not mpath.exists() or not wpath.exists():
        raise ArtifactError(f"{directory}: not an emulator artifact (needs {_META_FILE} and {_WEIGHTS_FILE})")
    try:
        meta = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{mpath}: unreadable metadata ({exc})") from None
    if meta.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(f"{mpath}: artifact format {meta.get('format')!r}, this version reads {ARTIFACT_FORMAT}")
    digest = hashlib.sha256(wpath.read_bytes()).hexdigest()
    if digest != meta.get("weights_sha256"):
        raise ArtifactError(f"{wpath}: SHA-256 {digest[:12]}… does not match the recorded "
                            f"{str(meta.get('weights_sha256'))[:12]}… (file changed or corrupt)")
    try:
        t = load_file(str(wpath))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"{wpath}: unreadable weights ({exc})") from None
    try:
        emu = Emulator(
            label_names=list(meta["label_names"]), x_min=t["x_min"], x_max=t["x_max"], wave=t["wave"],
            weights={k: t[k] for k in ("w0", "b0", "w1", "b1", "w2", "b2")}, activation=meta["activation"],
            config=meta.get("config", {}), metrics=meta.get("metrics", {}),
            pixel_mask=t["pixel_mask"].astype(bool) if "pixel_mask" in t else None,
            log_labels=tuple(meta.get("log_labels", ())),
            pixel_error=t.get("pixel_error"), pixel_error_edges=t.get("pixel_error_edges"),
            lsf_sigma_ref=t.get("lsf_sigma_ref"),
        )
    except KeyError as exc:
        raise ArtifactError(f"{directory}: artifact lacks {exc}") from None
    h = emu.content_hash()
    if h != meta.get("content_hash"):
        raise ArtifactError(f"{directory}: content hash {h[:12]}… differs from the recorded "
                            f"{str(meta.get('content_hash'))[:12]}… (metadata edited?)")
    if expected_hash is not None and h != expected_hash:
        raise ArtifactError(f"{directory}: emulator {h[:12]}… is not the expected {expected_hash[:12]}…")
    return emu


def export_payne_npz(emu: Emulator, path: str | os.PathLike[str]) -> Path:
    """Write The Payne's ``NN_normalized_spectra.npz`` layout (datamodels.md §6).

    The layout stores neither the activation nor the wavelength grid nor label names:
    keep the emulator.json beside it, or pass them again to :func:`import_payne_npz`.
    It cannot say that a label is scaled in log10 either, so such an emulator is
    refused rather than exported into a file that other code would misread.
    """
    if emu.log_labels:
        raise ArtifactError(f"The Payne's npz layout has no place for log-scaled labels {list(emu.log_labels)}; "
                            "train with log_labels=() to export")
    w = emu.weights
    path = Path(path)
    np.savez(path, w_array_0=w["w0"], b_array_0=w["b0"], w_array_1=w["w1"], b_array_1=w["b1"],
             w_array_2=w["w2"], b_array_2=w["b2"], x_min=emu.x_min, x_max=emu.x_max)
    return path


def import_payne_npz(path: str | os.PathLike[str], *, label_names: Sequence[str], wave: NDArray,
                     activation: str = "leakyrelu") -> Emulator:
    """Read a network saved by The Payne (``NN_normalized_spectra.npz``).

    The current Payne code uses LeakyReLU (slope 0.01); older versions used sigmoid —
    the file does not say which, so ``activation`` must be right for the file.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            d = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise ArtifactError(f"{path}: file not found") from None
    except (ValueError, OSError) as exc:
        raise ArtifactError(f"{path}: not a readable npz file ({exc})") from None
    need = ["w_array_0", "b_array_0", "w_array_1", "b_array_1", "w_array_2", "b_array_2", "x_min", "x_max"]
    missing = [k for k in need if k not in d]
    if missing:
        raise ArtifactError(f"{path}: missing {missing} (The Payne layout has {need})")
    return Emulator(
        label_names=list(label_names), x_min=d["x_min"], x_max=d["x_max"], wave=np.asarray(wave),
        weights={"w0": d["w_array_0"], "b0": d["b_array_0"], "w1": d["w_array_1"], "b1": d["b_array_1"],
                 "w2": d["w_array_2"], "b2": d["b_array_2"]},
        activation=activation, config={"imported_from": str(path)},
    )


# ---------------------------------------------------------------------------
# the Figure 5 diagnostic
# ---------------------------------------------------------------------------

TEFF_BINS = ((0.0, 5000.0, "< 5000 K"), (5000.0, 8000.0, "5000-8000 K"), (8000.0, np.inf, "> 8000 K"))


def flux_accuracy(emu: Emulator, labels: NDArray, flux: NDArray, ivar: NDArray, *,
                  thresholds: Sequence[float] = (0.02, 0.04), lsf_sigma: NDArray | None = None) -> dict[str, Any]:
    """Fraction of pixels whose emulated flux is within each threshold of the observed
    normalized flux, over all pixels with ivar > 0 that the emulator was trained on —
    overall and per Teff bin (Imig et al. 2022, Figure 5). With ``lsf_sigma`` the model
    is broadened to each spectrum's LSF first (an emulator trained through the LSF
    operator predicts at its σ_ref, sharper than the spectra)."""
    labels = np.asarray(labels, np.float64)
    model = emu.predict(labels, lsf_sigma)
    good = (np.asarray(ivar) > 0) & emu.pixel_mask[None, :]
    diff = np.abs(model - np.asarray(flux))
    teff = labels[:, emu.label_names.index("TEFF")] if "TEFF" in emu.label_names else np.full(len(labels), np.nan)

    def fractions(sel: NDArray[np.bool_]) -> dict[str, Any]:
        g = good & sel[:, None]
        n = int(g.sum())
        out: dict[str, Any] = {"n_spectra": int(sel.sum()), "n_pixels": n}
        for t in thresholds:
            out[f"within_{round(t * 100)}pct"] = float((diff[g] < t).mean()) if n else float("nan")
        return out

    res = {"all": fractions(np.ones(len(labels), bool))}
    for lo, hi, name in TEFF_BINS:
        res[name] = fractions((teff >= lo) & (teff < hi))
    return res


def emulator_diagnostic(emu: Emulator, labels: NDArray, flux: NDArray, ivar: NDArray,
                        split: Mapping[str, NDArray[np.int64]], source: NDArray | None = None,
                        lsf_sigma: NDArray | None = None) -> dict[str, Any]:
    """:func:`flux_accuracy` for the training, test and held-out (validation) sets, per
    source and never pooled across sources: real (empirical) spectra under the set's own
    name, synthetic ones under ``"<set> (synthetic)"``. Synthetic spectra are reproduced
    far better than real ones (~99.7% within 4%), so a pooled number would hide how the
    emulator does on real stars. ``lsf_sigma`` (n, P): see :func:`flux_accuracy`."""
    src = np.full(len(labels), "empirical") if source is None else np.asarray(source).astype(str)
    out: dict[str, Any] = {}
    for kind, suffix in (("empirical", ""), ("synthetic", " (synthetic)")):
        for name, idx in split.items():
            idx = np.asarray(idx, np.int64)
            idx = idx[src[idx] == kind]
            if len(idx):
                out[name + suffix] = flux_accuracy(emu, labels[idx], flux[idx], ivar[idx],
                                                   lsf_sigma=None if lsf_sigma is None else lsf_sigma[idx])
    return out


def format_diagnostic(diag: Mapping[str, Any]) -> str:
    """The Figure 5 numbers as a small text table (one block per set and source)."""
    lines = [f"{'set':<24}{'Teff bin':<13}{'spectra':>8}{'pixels':>10}{'<2%':>8}{'<4%':>8}"]
    for set_name, bins in diag.items():
        for bin_name, d in bins.items():
            if not d["n_spectra"]:
                continue
            lines.append(f"{set_name:<24}{bin_name:<13}{d['n_spectra']:>8}{d['n_pixels']:>10}"
                         f"{100 * d['within_2pct']:>7.1f}%{100 * d['within_4pct']:>7.1f}%")
    return "\n".join(lines)
