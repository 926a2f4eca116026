"""Catalogue figures: each writes a PNG atomically and survives empty or all-NaN input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mastar_vac import plots

from .test_vac import make_vac_frame

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    return path.exists() and path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 1000


def _no_leftovers(directory) -> None:
    assert not [p for p in directory.iterdir() if ".part-" in p.name]


@pytest.fixture
def catalog() -> pd.DataFrame:
    df = make_vac_frame(300, seed=3, fitted=("TEFF", "LOGG", "FEH", "ALPHA"))
    rng = np.random.default_rng(0)
    df["BPRPC"] = 4.0 - 0.9 * np.log10(df["TEFF"]) + rng.normal(0, 0.02, len(df))
    df["M_G"] = 2 * (df["LOGG"] - 1) + rng.normal(0, 0.3, len(df))
    for label, noise in (("TEFF", 100), ("LOGG", 0.1), ("FEH", 0.1)):
        df[f"LAMOST_{label}"] = df[label] + rng.normal(0, noise, len(df))
    return df


def _variants(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    nan = df.copy()
    nan[["TEFF", "LOGG", "FEH", "ALPHA", "CHISQ", "BPRPC", "M_G", "LAMOST_TEFF"]] = np.nan
    return {"full": df, "empty": df.iloc[:0], "all_nan": nan,
            "no_valid": df.assign(VALID=0), "bare": df[["MANGAID", "PLATE"]]}


@pytest.mark.parametrize("variant", ["full", "empty", "all_nan", "no_valid", "bare"])
def test_catalogue_figures(tmp_path, catalog, variant):
    df = _variants(catalog)[variant]
    outs = [
        plots.plot_kiel(df, tmp_path / "kiel.png"),
        plots.plot_kiel(df, tmp_path / "kiel_alpha.png", color="ALPHA"),
        plots.plot_alpha_feh(df, tmp_path / "alpha_feh.png"),
        plots.plot_kiel_chi2(df, tmp_path / "kiel_chi2.png"),
        plots.plot_cmd(df, tmp_path / "cmd.png"),
        plots.plot_cmd(df, tmp_path / "cmd3.png", labels=("TEFF", "LOGG", "FEH")),
        plots.plot_comparison(df, "LAMOST", tmp_path / "lamost.png", labels=("TEFF", "LOGG", "FEH", "ALPHA")),
        plots.plot_comparison(df, "SEGUE", tmp_path / "segue.png"),  # no SEGUE columns at all
    ]
    for p in outs:
        assert _is_png(p), p
    _no_leftovers(tmp_path)


def test_alpha_not_fitted_and_hot_stars(tmp_path, catalog):
    df = catalog.assign(ALPHA=np.nan)
    df.loc[:20, "TEFF"] = 25000.0  # B stars: the Teff axis becomes logarithmic
    assert _is_png(plots.plot_alpha_feh(df, tmp_path / "a.png"))
    assert _is_png(plots.plot_kiel(df, tmp_path / "k.png"))
    assert _is_png(plots.plot_cmd(df, tmp_path / "c.png"))


def test_comparison_stats():
    n, off, std, mad = plots._robust_stats(np.r_[np.full(99, 2.0) + np.linspace(-1, 1, 99), [1e6]])
    assert n == 100 and off == pytest.approx(2.0, abs=0.05) and mad < 1.0 and std > 1e4
    assert plots._robust_stats(np.array([np.nan]))[0] == 0


@pytest.mark.parametrize("n", [0, 1, 3, 12])
def test_example_fits(tmp_path, n):
    rng = np.random.default_rng(1)
    wave = np.geomspace(3622, 10354, 500)
    model = 1 - 0.3 * np.exp(-0.5 * ((wave - 6564.6) / 4) ** 2)[None, :].repeat(n, 0)
    flux = model + rng.normal(0, 0.01, model.shape)
    ivar = np.full_like(flux, 1e4)
    if n:
        ivar[0, :50] = 0  # masked pixels are not drawn
        flux[0, 60] = np.nan
    if n > 1:
        ivar[1] = 0  # a spectrum with no usable pixel
    labels = [f"Teff = {4000 + 1000 * i} K" for i in range(n)]
    p = plots.plot_example_fits(wave, flux, ivar, model, labels, tmp_path / "ex.png", max_spectra=5)
    assert _is_png(p)
    _no_leftovers(tmp_path)


def test_overwrite_is_atomic(tmp_path, catalog):
    p = plots.plot_kiel(catalog, tmp_path / "kiel.png")
    first = p.read_bytes()
    plots.plot_kiel(catalog.iloc[:10], p)
    assert p.read_bytes() != first and _is_png(p)
    _no_leftovers(tmp_path)


def test_teff_log_ticks_never_crowd():
    """On a 3–30 kK log axis the old ticks put 5000 and 6000 0.08 dex apart (labels ran
    together as "60005000"): neighbours are now at least a factor 1.3 apart."""
    for lo, hi in [(2850, 31500), (3000, 12000), (4000, 25000), (2900, 6300)]:
        t = plots.teff_log_ticks(lo, hi)
        assert len(t) >= 2 and all(lo <= v <= hi for v in t)
        assert all(b / a >= 1.3 for a, b in zip(t, t[1:])), t
    assert 5000 not in plots.teff_log_ticks(2850, 31500) or 6000 not in plots.teff_log_ticks(2850, 31500)


def test_report_omits_alpha_panel_when_not_fitted():
    from mastar_vac.report_build import catalogue_text

    assert "did not fit [α/Fe]" in catalogue_text(False) and "[α/Fe]–[Fe/H] coloured" not in catalogue_text(False)
    assert "[α/Fe]–[Fe/H] coloured by Teff" in catalogue_text(True)


def test_example_fit_captions_and_legend_sit_outside_the_spectra(tmp_path, monkeypatch):
    """Each caption is its panel's title and the legend sits above the first panel, so
    neither covers the spectrum (inside the frame they hid the absorption lines); every
    block shows the same wavelength range, so the spectra line up."""
    figs = []
    real = plots.save_figure

    def keep(fig, path, dpi=110):
        fig.canvas.draw()
        figs.append((fig, fig.canvas.get_renderer()))
        return real(fig, path, dpi)

    monkeypatch.setattr(plots, "save_figure", keep)
    wave = np.geomspace(3622, 10354, 400)
    model = np.tile(1 - 0.6 * np.exp(-0.5 * ((wave - 6564.6) / 30) ** 2), (3, 1))
    flux = model + np.random.default_rng(2).normal(0, 0.01, model.shape)
    ivar = np.full_like(flux, 1e4)
    ivar[2, 250:] = 0  # one spectrum stops early (like MILES at 7500 Å)
    captions = [f"star {i}: Teff {4000 + 1000 * i} K, log g 4.5" for i in range(3)]
    plots.plot_example_fits(wave, flux, ivar, model, captions, tmp_path / "ex.png")
    fig, renderer = figs[0]
    tops = [ax for ax in fig.axes if ax.get_ylabel() == "norm. flux"]
    assert [ax.get_title(loc="left") for ax in tops] == captions
    frames = [ax.get_window_extent(renderer) for ax in fig.axes]
    covering = [t for ax in fig.axes for t in ax.texts if t.get_text()]
    assert not covering, [t.get_text() for t in covering]  # no text drawn inside a frame
    legend = tops[0].get_legend().get_window_extent(renderer)
    assert not any(legend.overlaps(f) for f in frames)
    for ax in tops:
        title = ax.title if ax.title.get_text() else ax._left_title
        box = title.get_window_extent(renderer)
        assert not any(box.overlaps(f) for f in frames), ax.get_title(loc="left")
    assert len({tuple(np.round(ax.get_xlim(), 3)) for ax in fig.axes}) == 1
