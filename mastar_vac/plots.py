"""Figures. Each function takes arrays, draws one figure, saves it atomically as PNG.

matplotlib runs headless (Agg); nothing here changes data.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from numpy.typing import NDArray  # noqa: E402

from .io.atomic import atomic_path  # noqa: E402

__all__ = ["save_figure", "plot_emulator_diagnostic"]


def save_figure(fig: plt.Figure, path: str | os.PathLike[str], dpi: int = 110) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png", bbox_inches="tight")
    plt.close(fig)
    return path


def plot_emulator_diagnostic(sets: Mapping[str, tuple[NDArray, NDArray, NDArray]], path: str | os.PathLike[str],
                             *, max_points: int = 200_000, seed: int = 0) -> Path:
    """Imig et al. 2022 Figure 5: emulated vs observed normalized flux.

    ``sets`` maps a set name (train/test/validation) to (model, observed, good-pixel
    mask) arrays of equal shape. Panels: one-to-one (held-out set), error histograms,
    and the cumulative distribution of |model − observed| with the 2% and 4% marks.
    """
    rng = np.random.default_rng(seed)
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.5))
    held = "validation" if "validation" in sets else next(iter(sets))
    m, o, g = sets[held]
    x, y = o[g], m[g]
    if x.size > max_points:
        pick = rng.choice(x.size, max_points, replace=False)
        x, y = x[pick], y[pick]
    ax[0].hexbin(x, y, gridsize=120, bins="log", extent=(0, 1.4, 0, 1.4), cmap="viridis", mincnt=1)
    ax[0].plot([0, 1.4], [0, 1.4], "r-", lw=0.8)
    ax[0].set(xlabel="observed normalized flux", ylabel="emulated normalized flux", title=f"{held} set",
              xlim=(0, 1.4), ylim=(0, 1.4))
    bins = np.linspace(-0.1, 0.1, 201)
    for name, (m, o, g) in sets.items():
        d = (m - o)[g]
        ax[1].hist(d, bins=bins, histtype="step", density=True, label=name)
        a = np.sort(np.abs(d))
        if a.size > max_points:
            a = a[np.linspace(0, a.size - 1, max_points).astype(int)]
        ax[2].plot(a, np.linspace(0, 1, a.size), label=name)
    ax[1].set(xlabel="emulated − observed", ylabel="density", yscale="log")
    ax[1].legend()
    for t in (0.02, 0.04):
        ax[2].axvline(t, color="0.5", ls=":")
    ax[2].set(xlabel="|emulated − observed|", ylabel="cumulative fraction of pixels", xscale="log", xlim=(1e-4, 0.3))
    ax[2].legend()
    fig.suptitle("Emulator accuracy (cf. Imig et al. 2022, Fig. 5)")
    return save_figure(fig, path)
