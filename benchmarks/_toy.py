"""Analytic spectra with five labels, for timing benchmarks at DR17 sizes.

Only throughput is measured with them: 80 absorption lines whose depths depend
smoothly on Teff, log g, [Fe/H], [α/Fe] and log v_micro, on the MaStar grid.
"""

from __future__ import annotations

import numpy as np

LABELS5 = ["TEFF", "LOGG", "FE_H", "ALPHA_FE", "LOG10_VMICRO"]


def toy5_labels(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.column_stack([rng.uniform(3500, 9000, n), rng.uniform(0.5, 5, n), rng.uniform(-2, 0.5, n),
                            rng.uniform(-0.2, 0.5, n), rng.uniform(-0.3, 0.5, n)])


def toy5_spectra(lab: np.ndarray, wave: np.ndarray) -> np.ndarray:
    t = (np.log10(lab[:, 0:1]) - 3.75) / 0.2
    g = (lab[:, 1:2] - 3) / 2
    z, a, v = lab[:, 2:3], lab[:, 3:4], lab[:, 4:5]
    centers = np.linspace(3700, 10200, 80)
    kind = np.arange(80) % 3
    depth = 0.35 * np.exp(-((t - np.sin(centers / 500)) ** 2)) * (1 + 0.3 * z + 0.4 * a * (kind == 1)) \
        * (1 + 0.2 * g * np.cos(centers / 300)) * (1 + 0.2 * v * (kind == 2))
    out = np.ones((len(lab), len(wave)))
    for s in range(0, len(wave), 512):  # bounded memory: (n, 512, 80) at a time
        prof = np.exp(-0.5 * ((wave[None, s:s + 512, None] - centers[None, None, :]) / 2.5) ** 2)
        out[:, s:s + 512] -= (depth[:, None, :] * prof).sum(2)
    return out
