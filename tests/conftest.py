from __future__ import annotations

import os

import numpy as np
import pytest

from mastar_vac.wavegrid import MASTAR_NPIX, mastar_wavelength

os.environ.setdefault("MASTAR_VAC_PROGRESS", "0")


def make_visits(n: int, *, seed: int = 0, npix: int = MASTAR_NPIX) -> dict[str, np.ndarray]:
    """Columns of ``n`` plausible visits (3 per star) in the goodspec layout."""
    rng = np.random.default_rng(seed)
    wave = mastar_wavelength(npix)
    level = rng.uniform(20, 200, (n, 1))
    cont = level * (1 + 0.2 * np.sin(wave / 900.0))[None, :]
    lines = 1 - 0.3 * np.exp(-0.5 * ((wave - 6564.6) / 3.0) ** 2) - 0.2 * np.exp(-0.5 * ((wave - 4862.7) / 3.0) ** 2)
    sn = rng.uniform(30, 100, (n, 1))
    sigma = cont / sn
    flux = (cont * lines[None, :] + rng.standard_normal((n, npix)) * sigma).astype(np.float32)
    return {
        "MANGAID": np.array([f"7-{1000 + i // 3}" for i in range(n)]),
        "PLATE": np.full(n, 9000, np.int32) + (np.arange(n) % 2).astype(np.int32),
        "IFUDESIGN": np.array([str(3701 + i % 3) for i in range(n)]),
        "MJD": (57000 + np.arange(n)).astype(np.int32),
        "RA": rng.uniform(0, 360, n),
        "DEC": rng.uniform(-30, 60, n),
        "FLUX": flux,
        "IVAR": (1.0 / sigma**2).astype(np.float32) * np.ones((1, npix), np.float32),
        "MASK": np.zeros((n, npix), np.int32),
        "DISP": np.full((n, npix), 1.1, np.float32),
        "S2N": sn[:, 0].astype(np.float32),
    }


@pytest.fixture
def visits() -> dict[str, np.ndarray]:
    return make_visits(12)
