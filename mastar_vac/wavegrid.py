"""The MaStar wavelength grid and air/vacuum conversion.

MaStar spectra share the MaNGA LOG grid: 4,563 pixels, log10 λ from 3.5589 in steps of
1e-4 dex, vacuum wavelengths (datamodels.md §1.9; the ``mastarhc`` templates shipped by
sdss-mangadap carry exactly this grid in their WCS).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "MASTAR_NPIX",
    "MASTAR_LOGLAM0",
    "MASTAR_DLOGLAM",
    "mastar_wavelength",
    "air_to_vacuum",
    "vacuum_to_air",
    "same_grid",
]

MASTAR_NPIX = 4563
MASTAR_LOGLAM0 = 3.5589
MASTAR_DLOGLAM = 1.0e-4


def mastar_wavelength(npix: int = MASTAR_NPIX) -> NDArray[np.float64]:
    """Vacuum wavelengths (Å) of the MaStar grid."""
    return 10.0 ** (MASTAR_LOGLAM0 + MASTAR_DLOGLAM * np.arange(npix))


def _refractive_index(sigma2: NDArray[np.float64]) -> NDArray[np.float64]:
    # Ciddor (1996) as used by idlutils' vactoair/airtovac; sigma2 in μm^-2.
    return 1.0 + 5.792105e-2 / (238.0185 - sigma2) + 1.67917e-3 / (57.362 - sigma2)


def vacuum_to_air(wave_vac: ArrayLike) -> NDArray[np.float64]:
    """Vacuum → air wavelengths (Å), Ciddor (1996); unchanged below 2000 Å."""
    w = np.asarray(wave_vac, dtype=np.float64)
    sigma2 = (1.0e4 / w) ** 2
    out = w / _refractive_index(sigma2)
    return np.where(w < 2000.0, w, out)


def air_to_vacuum(wave_air: ArrayLike) -> NDArray[np.float64]:
    """Air → vacuum wavelengths (Å), inverting :func:`vacuum_to_air` by fixed point."""
    w_air = np.asarray(wave_air, dtype=np.float64)
    w = w_air.copy()
    for _ in range(4):  # converges to < 1e-10 Å in three iterations
        w = w_air * _refractive_index((1.0e4 / w) ** 2)
    return np.where(w_air < 2000.0, w_air, w)


def same_grid(a: ArrayLike, b: ArrayLike, *, rtol: float = 1e-6) -> bool:
    """True when two wavelength vectors are the same grid (float32 storage tolerated)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=rtol, atol=0.0))
