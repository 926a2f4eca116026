"""A small analytic spectral model and a quickly trained emulator, shared by tests."""

from __future__ import annotations

import functools

import numpy as np

from mastar_vac.emulator import Emulator, TrainConfig, train_emulator
from mastar_vac.wavegrid import mastar_wavelength

LABELS = ["TEFF", "LOGG", "FE_H"]


def toy_spectra(labels: np.ndarray, wave: np.ndarray | None = None) -> np.ndarray:
    """Normalized spectra with 60 lines whose depths depend smoothly on the labels."""
    wave = mastar_wavelength() if wave is None else wave
    lab = np.atleast_2d(labels)
    t = (lab[:, 0:1] - 6000) / 3000
    g = (lab[:, 1:2] - 3) / 2
    z = lab[:, 2:3]
    centers = np.linspace(3700, 10200, 60)
    depth = 0.3 * np.exp(-((t - np.sin(centers / 500)) ** 2)) * (1 + 0.3 * z) * (1 + 0.2 * g * np.cos(centers / 300))
    prof = np.exp(-0.5 * ((wave[None, :, None] - centers[None, None, :]) / 3) ** 2)
    return 1 - (depth[:, None, :] * prof).sum(2)


def toy_labels(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.column_stack([rng.uniform(4000, 9000, n), rng.uniform(1, 5, n), rng.uniform(-2, 0.5, n)])


@functools.lru_cache(maxsize=1)
def toy_emulator() -> Emulator:
    lab = toy_labels(1200)
    flux = toy_spectra(lab)
    ivar = np.full_like(flux, 1e4)
    r = train_emulator(lab, flux, ivar, label_names=LABELS, wave=mastar_wavelength(),
                       config=TrainConfig(hidden=48, max_epochs=120, patience=40, seed=1), progress=False)
    emu = r.emulator
    emu.config["start_grid"] = lab[r.split["train"]].tolist()
    return emu


def toy_cube(flux: np.ndarray, ivar: np.ndarray, chunk: int):  # noqa: ANN201
    """A normalized cube (xarray, chunked along visit) holding the given spectra, with
    made-up visit keys — what ``fit_cube`` reads from a real cube."""
    import xarray as xr

    n = len(flux)
    return xr.Dataset(
        {"norm_flux": (("visit", "wave"), np.asarray(flux, np.float32)),
         "norm_ivar": (("visit", "wave"), np.asarray(ivar, np.float32))},
        coords={"mangaid": ("visit", np.array([f"7-{i}" for i in range(n)])), "plate": ("visit", np.full(n, 9000)),
                "ifudesign": ("visit", np.array(["3701"] * n)), "mjd": ("visit", 57000 + np.arange(n))},
    ).chunk({"visit": chunk})
