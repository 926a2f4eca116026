"""Figures. Each function takes arrays, draws one figure, saves it atomically as PNG.

matplotlib runs headless (Agg); nothing here changes data. Catalogue figures take a
frame with the VAC column names (:data:`mastar_vac.catalog.VAC_COLUMNS`). Every
function copes with empty or all-NaN input by drawing the empty panel with a note: a
report built from a failed or tiny run should still show *that* it is empty rather
than lose all its figures to one exception.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import NullFormatter, ScalarFormatter  # noqa: E402
from numpy.typing import ArrayLike, NDArray  # noqa: E402
from scipy.stats import median_abs_deviation  # noqa: E402

from .io.atomic import atomic_path  # noqa: E402

__all__ = [
    "save_figure",
    "plot_emulator_diagnostic",
    "plot_kiel",
    "plot_alpha_feh",
    "teff_log_ticks",
    "plot_kiel_chi2",
    "plot_example_fits",
    "plot_cmd",
    "plot_comparison",
    "LABEL_TEXT",
]

log = logging.getLogger(__name__)

# axis text of the VAC label columns
LABEL_TEXT = {
    "TEFF": r"$T_\mathrm{eff}$ [K]",
    "LOGG": r"$\log g$ [dex]",
    "FEH": "[Fe/H] [dex]",
    "ALPHA": r"[$\alpha$/Fe] [dex]",
    "VMICRO": r"$\log v_\mathrm{micro}$ [dex]",
    "CHISQ": r"reduced $\chi^2$",
}


def save_figure(fig: plt.Figure, path: str | os.PathLike[str], dpi: int = 110) -> Path:
    """Save ``fig`` as PNG atomically (no half-written image under the real name) and close it."""
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


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def _column(df: pd.DataFrame | None, name: str) -> NDArray[np.float64]:
    """A column as float64, all-NaN when absent (a label that was not fitted)."""
    if df is None or name not in df.columns:
        return np.full(0 if df is None else len(df), np.nan)
    return pd.to_numeric(df[name], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)


def _valid(df: pd.DataFrame) -> NDArray[np.bool_]:
    """Rows the catalogue calls valid (all rows when there is no VALID column)."""
    if "VALID" not in df.columns:
        return np.ones(len(df), bool)
    return _column(df, "VALID") == 1


def _flagged(df: pd.DataFrame) -> NDArray[np.bool_]:
    """Rows with VALID = 0 or any FLAG bit set."""
    out = np.zeros(len(df), bool)
    if "VALID" in df.columns:
        out |= _column(df, "VALID") == 0
    if "FLAG" in df.columns:
        flag = _column(df, "FLAG")
        out |= np.isfinite(flag) & (flag != 0)
    return out


def _note(ax: plt.Axes, text: str) -> None:
    """Write ``text`` in the middle of an (empty) panel."""
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=11, color="0.35",
            wrap=True)


def _limits(values: NDArray[np.float64], lo: float = 1.0, hi: float = 99.0) -> tuple[float, float] | None:
    """Robust colour limits (percentiles), None when nothing is finite."""
    v = values[np.isfinite(values)]
    if not v.size:
        return None
    a, b = np.percentile(v, [lo, hi])
    if a == b:
        a, b = a - 0.5, b + 0.5
    return float(a), float(b)


def teff_log_ticks(lo: float, hi: float, max_ticks: int = 6) -> list[int]:
    """Round Teff ticks inside [lo, hi] at least a factor ``(hi/lo)^(1/max_ticks)`` (≥ 1.3)
    apart, so that four-digit labels on a log axis never run into each other
    (5000 and 6000 are 0.08 dex apart: on a 3–30 kK panel their labels touched)."""
    candidates = (3000, 4000, 5000, 6000, 8000, 10000, 15000, 20000, 30000)
    inside = [v for v in candidates if lo <= v <= hi]
    ratio = max(1.3, (hi / lo) ** (1.0 / max_ticks)) if lo > 0 else 1.3
    ticks: list[int] = []
    for v in inside:
        if not ticks or v / ticks[-1] >= ratio:
            ticks.append(v)
    return ticks


def _teff_axis(ax: plt.Axes, teff: NDArray[np.float64]) -> None:
    """Teff axis reversed (hot on the left); logarithmic when the stars span B to M types."""
    t = teff[np.isfinite(teff) & (teff > 0)]
    if t.size and t.max() / t.min() > 3.0:
        ax.set_xscale("log")
        ax.set_xticks(teff_log_ticks(t.min() * 0.95, t.max() * 1.05))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    if not t.size:
        ax.invert_xaxis()
    elif ax.get_xscale() == "log":
        ax.set_xlim(t.max() * 1.05, t.min() * 0.95)
    else:
        pad = max(0.03 * (t.max() - t.min()), 50.0)
        ax.set_xlim(t.max() + pad, t.min() - pad)


def _scatter(ax: plt.Axes, x: NDArray, y: NDArray, c: NDArray | None, *, label: str | None,
             cmap: str = "viridis", s: float | None = None, **kw: object) -> None:
    """Scatter with a colour bar; grey points when the colour is all NaN."""
    n = x.size
    size = s if s is not None else (12.0 if n < 500 else 4.0 if n < 5000 else 1.5)
    lim = _limits(c) if c is not None else None
    if c is None or lim is None:
        ax.scatter(x, y, s=size, color="0.4", rasterized=True, lw=0, **kw)
        if c is not None and label:
            ax.text(0.02, 0.02, f"{label}: no finite values", transform=ax.transAxes, fontsize=8, color="0.35")
        return
    good = np.isfinite(c)
    if (~good).any():
        ax.scatter(x[~good], y[~good], s=size, color="0.75", rasterized=True, lw=0, **kw)
    sc = ax.scatter(x[good], y[good], c=c[good], s=size, cmap=cmap, vmin=lim[0], vmax=lim[1], rasterized=True,
                    lw=0, **kw)
    cb = ax.figure.colorbar(sc, ax=ax, pad=0.01)
    if label:
        cb.set_label(label)


# ---------------------------------------------------------------------------
# catalogue figures
# ---------------------------------------------------------------------------

def plot_kiel(df: pd.DataFrame, path: str | os.PathLike[str], color: str = "FEH", *,
              title: str = "Kiel diagram") -> Path:
    """Teff vs log g of the VALID rows, coloured by ``color`` (Imig et al. 2022, Fig. 9).

    Both axes are reversed as usual (hot and low-gravity stars up and left). Only VALID
    rows are shown, because flagged fits are exactly the ones whose labels are not to be
    trusted; :func:`plot_kiel_chi2` shows them.
    """
    fig, ax = plt.subplots(figsize=(7, 5.5))
    teff, logg = _column(df, "TEFF"), _column(df, "LOGG")
    keep = _valid(df) & np.isfinite(teff) & np.isfinite(logg) if len(df) else np.zeros(0, bool)
    n = int(keep.sum())
    if n:
        _scatter(ax, teff[keep], logg[keep], _column(df, color)[keep], label=LABEL_TEXT.get(color, color))
        _teff_axis(ax, teff[keep])
    else:
        _note(ax, "no valid rows with Teff and log g")
        ax.invert_xaxis()
    ax.invert_yaxis()
    ax.set(xlabel=LABEL_TEXT["TEFF"], ylabel=LABEL_TEXT["LOGG"], title=f"{title} (N = {n:,} valid)")
    return save_figure(fig, path)


def plot_alpha_feh(df: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """[α/Fe] vs [Fe/H] of the VALID rows coloured by Teff (Imig et al. 2022, Fig. 10).

    A run that did not fit [α/Fe] (e.g. the MILES demo) has an all-NaN ALPHA column; the
    panel then says "not fitted" instead of looking like an empty selection.
    """
    fig, ax = plt.subplots(figsize=(7, 5))
    feh, alpha = _column(df, "FEH"), _column(df, "ALPHA")
    keep = _valid(df) & np.isfinite(feh) & np.isfinite(alpha) if len(df) else np.zeros(0, bool)
    n = int(keep.sum())
    if n:
        _scatter(ax, feh[keep], alpha[keep], _column(df, "TEFF")[keep], label=LABEL_TEXT["TEFF"], cmap="plasma")
    elif len(df) and not np.isfinite(alpha).any():
        _note(ax, r"[$\alpha$/Fe] not fitted in this run")
    else:
        _note(ax, "no valid rows with [Fe/H] and [alpha/Fe]")
    ax.set(xlabel=LABEL_TEXT["FEH"], ylabel=LABEL_TEXT["ALPHA"], title=f"[alpha/Fe] vs [Fe/H] (N = {n:,} valid)")
    return save_figure(fig, path)


def plot_kiel_chi2(df: pd.DataFrame, path: str | os.PathLike[str], *, chi2_threshold: float | None = 100.0) -> Path:
    """Kiel diagram of every fitted row coloured by log10 reduced χ², and the χ² histogram.

    Flagged rows (VALID = 0 or FLAG ≠ 0) are included and ringed in red, so one sees
    where in the diagram the fit fails (cf. Imig et al. 2022, §4.3). The histogram is on
    a log scale, with the flagging threshold marked.
    """
    fig, (ax, hx) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [1.4, 1]})
    teff, logg, chi2 = _column(df, "TEFF"), _column(df, "LOGG"), _column(df, "CHISQ")
    fitted = np.isfinite(teff) & np.isfinite(logg) if len(df) else np.zeros(0, bool)
    flagged = _flagged(df) if len(df) else np.zeros(0, bool)
    n, nflag = int(fitted.sum()), int((fitted & flagged).sum())
    if n:
        with np.errstate(divide="ignore", invalid="ignore"):
            logchi = np.where(chi2 > 0, np.log10(chi2), np.nan)
        _scatter(ax, teff[fitted], logg[fitted], logchi[fitted], label=r"$\log_{10}$ reduced $\chi^2$",
                 cmap="magma")
        f = fitted & flagged
        if f.any():
            ax.scatter(teff[f], logg[f], s=30 if n < 500 else 12, facecolors="none", edgecolors="red", lw=0.7,
                       label=f"flagged ({nflag:,})", rasterized=True)
            ax.legend(loc="lower left", fontsize=8)
        _teff_axis(ax, teff[fitted])
    else:
        _note(ax, "no fitted rows")
        ax.invert_xaxis()
    ax.invert_yaxis()
    ax.set(xlabel=LABEL_TEXT["TEFF"], ylabel=LABEL_TEXT["LOGG"],
           title=f"fit quality (N = {n:,} fitted, {nflag:,} flagged)")
    c = chi2[np.isfinite(chi2) & (chi2 > 0)]
    if c.size:
        lo, hi = np.log10(c.min()), np.log10(c.max())
        if hi - lo < 0.5:
            lo, hi = lo - 0.25, hi + 0.25
        bins = np.logspace(lo, hi, 60)
        hx.hist(c, bins=bins, histtype="stepfilled", color="0.6", label="all")
        cf = chi2[np.isfinite(chi2) & (chi2 > 0) & flagged]
        if cf.size:
            hx.hist(cf, bins=bins, histtype="step", color="red", label="flagged")
        if chi2_threshold is not None:
            hx.axvline(chi2_threshold, color="k", ls=":", label=f"threshold {chi2_threshold:g}")
        hx.set_xscale("log")
        hx.legend(fontsize=8)
        hx.set(title=rf"median reduced $\chi^2$ = {np.median(c):.3g}")
    else:
        _note(hx, "no finite reduced chi-square")
    hx.set(xlabel=LABEL_TEXT["CHISQ"], ylabel="visits")
    return save_figure(fig, path)


def plot_example_fits(wave: ArrayLike, flux: ArrayLike, ivar: ArrayLike, model: ArrayLike,
                      labels_text: Sequence[str], path: str | os.PathLike[str], *,
                      max_spectra: int = 8) -> Path:
    """A few normalized spectra with their best-fit model, residuals below each (cf. Fig. 7).

    ``wave`` is the common grid (npix,) or one per spectrum (n, npix); ``flux``, ``ivar``
    and ``model`` are (n, npix). Pixels with ivar ≤ 0 are not drawn (they did not enter
    the fit). The residual panel shows data − model with the ±1σ noise band, so a misfit
    is judged against the noise, not by eye. The caller chooses the spectra (e.g. across
    Teff) and their captions; more than ``max_spectra`` are thinned evenly.
    """
    flux = np.atleast_2d(np.asarray(flux, dtype=np.float64))
    n = flux.shape[0] if flux.size else 0
    if n == 0:
        fig, ax = plt.subplots(figsize=(10, 3))
        _note(ax, "no spectra to show")
        ax.set(xlabel=r"wavelength [$\AA$]", ylabel="normalized flux")
        return save_figure(fig, path)
    ivar = np.broadcast_to(np.asarray(ivar, dtype=np.float64), flux.shape)
    model = np.broadcast_to(np.asarray(model, dtype=np.float64), flux.shape)
    wave = np.broadcast_to(np.asarray(wave, dtype=np.float64), flux.shape)
    texts = list(labels_text) + [""] * max(0, n - len(labels_text))
    pick = np.arange(n)
    if n > max_spectra:
        pick = np.unique(np.linspace(0, n - 1, max_spectra).round().astype(int))
        log.info("plot_example_fits: %d spectra given, showing %d", n, pick.size)
    height = 2.9 * pick.size + 0.7
    fig = plt.figure(figsize=(12, height))
    # room between blocks for each block's caption, drawn above its panel: a caption inside
    # the panel sat on the spectrum (the absorption lines reach the bottom of the frame)
    outer = fig.add_gridspec(pick.size, 1, hspace=0.38, top=1 - 0.75 / height, bottom=0.45 / height)
    axes: list[plt.Axes] = []
    span = [np.inf, -np.inf]
    for k, i in enumerate(pick):
        inner = outer[k].subgridspec(2, 1, height_ratios=[3, 1], hspace=0.0)
        top = fig.add_subplot(inner[0])
        bot = fig.add_subplot(inner[1], sharex=top)
        axes += [top, bot]
        good = np.isfinite(flux[i]) & np.isfinite(ivar[i]) & (ivar[i] > 0)
        if not good.any():
            _note(top, "no usable pixels")
        else:
            f = np.where(good, flux[i], np.nan)
            m = np.where(np.isfinite(model[i]), model[i], np.nan)
            sig = np.where(good, 1.0 / np.sqrt(np.where(good, ivar[i], 1.0)), np.nan)
            top.plot(wave[i], f, color="k", lw=0.5, label="data")
            top.plot(wave[i], m, color="tab:red", lw=0.6, label="model")
            r = f - m
            bot.fill_between(wave[i], -sig, sig, color="0.85", lw=0, step="mid")
            bot.plot(wave[i], r, color="k", lw=0.4)
            bot.axhline(0, color="tab:red", lw=0.6)
            lim = np.nanpercentile(np.abs(r), 99) if np.isfinite(r).any() else 0.1
            bot.set_ylim(-1.2 * lim - 1e-3, 1.2 * lim + 1e-3)
            fin = f[np.isfinite(f)]
            mod = m[good & np.isfinite(m)]
            lo = min(np.percentile(fin, 0.5), mod.min() if mod.size else np.inf)
            hi = max(np.percentile(fin, 99.5), mod.max() if mod.size else -np.inf)
            top.set_ylim(max(-0.05, lo - 0.05), hi + 0.08)
            drawn = wave[i][good | np.isfinite(m)]
            span = [min(span[0], float(drawn.min())), max(span[1], float(drawn.max()))]
        top.set_title(texts[i], loc="left", fontsize=9)
        top.set_ylabel("norm. flux")
        bot.set_ylabel("resid.")
        top.tick_params(labelbottom=False)
        if k == 0 and good.any():
            # above the frame, right of the caption: inside it the legend hid the spectrum
            top.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize=8, ncol=2, frameon=False,
                       borderaxespad=0.1)
        bot.set_xlabel(r"vacuum wavelength [$\AA$]" if k == pick.size - 1 else "")
    if np.isfinite(span).all():
        # one wavelength range for every block, so the spectra line up for comparison
        pad = 0.01 * (span[1] - span[0])
        for ax in axes:
            ax.set_xlim(span[0] - pad, span[1] + pad)
    fig.suptitle("Example fits (residual = data - model; grey: the 1-sigma noise band)", y=1 - 0.2 / height,
                 va="top")
    return save_figure(fig, path)


_CMD_COLOURS = ("BPRPC", "BP_RP0", "BPRP0", "BP_RP")
_CMD_MAGS = ("M_G", "MG", "ABS_G")


def plot_cmd(cmd_df: pd.DataFrame, path: str | os.PathLike[str],
             labels: Sequence[str] = ("TEFF", "LOGG", "FEH", "ALPHA"), *,
             colour: str | None = None, mag: str | None = None, valid_only: bool = True) -> Path:
    """Gaia colour–magnitude diagram coloured by each label, one panel per label (Imig et al. Fig. 11).

    ``cmd_df`` is the VAC joined to the Gaia crossmatch: the dereddened colour
    (``BPRPC`` by default, else ``BP_RP0``/``BPRP0``/``BP_RP``) and absolute magnitude
    (``M_G``), plus the label columns. The CMD is independent of the spectra, so smooth
    colour gradients along the sequences are a check of the labels.
    """
    labels = list(labels) or ["TEFF"]
    colour = colour or next((c for c in _CMD_COLOURS if c in cmd_df.columns), _CMD_COLOURS[0])
    mag = mag or next((c for c in _CMD_MAGS if c in cmd_df.columns), _CMD_MAGS[0])
    ncol = min(2, len(labels))
    nrow = int(np.ceil(len(labels) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(6.2 * ncol, 5.2 * nrow), squeeze=False)
    x, y = _column(cmd_df, colour), _column(cmd_df, mag)
    keep = np.isfinite(x) & np.isfinite(y)
    if valid_only and len(cmd_df):
        keep &= _valid(cmd_df)
    n = int(keep.sum())
    cmaps = {"TEFF": "plasma", "LOGG": "viridis", "FEH": "coolwarm", "ALPHA": "cividis", "VMICRO": "magma"}
    for k, ax in enumerate(axes.flat):
        if k >= len(labels):
            ax.set_visible(False)
            continue
        label = labels[k]
        c = _column(cmd_df, label)
        if not n:
            _note(ax, "no stars with Gaia colour and M_G")
        elif not np.isfinite(c[keep]).any():
            _scatter(ax, x[keep], y[keep], None, label=None)
            _note(ax, f"{label} not fitted" if not np.isfinite(c).any() else f"no finite {label}")
        else:
            _scatter(ax, x[keep], y[keep], c[keep], label=LABEL_TEXT.get(label, label),
                     cmap=cmaps.get(label, "viridis"))
        ax.invert_yaxis()
        ax.set(xlabel=r"$(G_\mathrm{BP} - G_\mathrm{RP})_0$" if colour != "BP_RP" else r"$G_\mathrm{BP} - G_\mathrm{RP}$",
               ylabel=r"$M_G$", title=f"coloured by {label}")
    fig.suptitle(f"Gaia colour-magnitude diagram (N = {n:,})")
    fig.tight_layout()
    return save_figure(fig, path)


def _robust_stats(d: NDArray[np.float64]) -> tuple[int, float, float, float]:
    """N, median offset, standard deviation (ddof=1) and 1.4826 × MAD of the finite differences.

    The same numbers as :func:`mastar_vac.compare.comparison_table`, so a panel and the
    report's table never disagree.
    """
    d = d[np.isfinite(d)]
    if not d.size:
        return 0, float("nan"), float("nan"), float("nan")
    med = float(np.median(d))
    std = float(np.std(d, ddof=1)) if d.size > 1 else float("nan")
    return int(d.size), med, std, float(1.4826 * median_abs_deviation(d))


def plot_comparison(joined_df: pd.DataFrame, survey: str, path: str | os.PathLike[str],
                    labels: Sequence[str] = ("TEFF", "LOGG", "FEH", "ALPHA"), *,
                    column_template: str = "{SURVEY}_{label}", valid_only: bool = True) -> Path:
    """One-to-one panels of VAC against another survey, with N, offset and scatter in each.

    ``joined_df`` is the output of :func:`mastar_vac.compare.crossmatch`: the VAC labels
    under their VAC names (``TEFF``) and the survey's under ``column_template``
    (default ``<SURVEY>_<label>``, e.g. ``LAMOST_TEFF``, as the crossmatch prefixes them).
    The offset is the median of VAC − survey; the scatter is given both as the standard
    deviation (as in Imig et al. 2022, Table 2) and as 1.4826 × MAD, because a few gross
    mismatches (wrong cross-matches, binaries) inflate the former. With ``valid_only``
    only VALID rows enter, as in the comparison tables.
    """
    labels = list(labels) or ["TEFF"]
    fig, axes = plt.subplots(1, len(labels), figsize=(4.6 * len(labels), 4.8), squeeze=False)
    keep_rows = _valid(joined_df) if (valid_only and len(joined_df)) else np.ones(len(joined_df), bool)
    for ax, label in zip(axes.flat, labels):
        ext = column_template.format(SURVEY=survey.upper(), survey=survey, label=label)
        v, s = _column(joined_df, label), _column(joined_df, ext)
        ok = keep_rows & np.isfinite(v) & np.isfinite(s)
        text = LABEL_TEXT.get(label, label)
        ax.set(xlabel=f"{survey} {text}", ylabel=f"VAC {text}")
        if not ok.any():
            why = (f"{label} not fitted" if len(joined_df) and not np.isfinite(v).any()
                   else f"no {survey} {label}" if len(joined_df) and not np.isfinite(s).any()
                   else "no stars in common")
            _note(ax, why)
            continue
        x, y = s[ok], v[ok]
        size = 10 if ok.sum() < 500 else 3 if ok.sum() < 5000 else 1
        ax.scatter(x, y, s=size, color="k", alpha=0.6, lw=0, rasterized=True)
        lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
        pad = 0.03 * (hi - lo) if hi > lo else 0.5
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="tab:red", lw=0.8)
        ax.set(xlim=(lo - pad, hi + pad), ylim=(lo - pad, hi + pad))
        ax.set_aspect("equal", adjustable="box")
        nn, off, std, mad = _robust_stats(y - x)
        fmt = ".0f" if label == "TEFF" else ".3f"
        ax.text(0.04, 0.96, f"N = {nn:,}\noffset = {off + 0.0:{fmt}}\nstd = {std:{fmt}}\n1.4826 MAD = {mad:{fmt}}",
                transform=ax.transAxes, va="top", fontsize=9, bbox={"facecolor": "white", "alpha": 0.8, "lw": 0})
    fig.suptitle(f"VAC vs {survey} (offset = median of VAC - {survey})")
    fig.tight_layout()
    return save_figure(fig, path)
