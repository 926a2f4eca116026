"""The theoretical extension of the reference set (mastar_vac.synthetic, paper §2.4)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import curve_fit

from mastar_vac import lsf
from mastar_vac.errors import ConfigError
from mastar_vac.io.ferre import FerreGrid, interpolate, read_ferre, write_ferre
from mastar_vac.normalize import normalize_spectra
from mastar_vac.reference import ReferenceSet
from mastar_vac.synthetic import (
    LsfMatcher,
    SyntheticConfig,
    _Interpolator,
    grid_sigma_aa,
    make_synthetic_reference,
    median_mastar_lsf,
    n_synthetic,
    plan_labels,
    recognize_grid_label,
    synthetic_extension,
)
from mastar_vac.wavegrid import air_to_vacuum, mastar_wavelength, vacuum_to_air

LABELS5 = ["TEFF", "LOGG", "FE_H", "ALPHA_FE", "LOG10_VMICRO"]
APOGEE_NAMES = ["TEFF", "LOGG", "METALS", "O Mg Si S Ca Ti", "LOG10VDOP"]
AXES = [(6000.0, 1000.0, 7), (3.0, 0.5, 5), (-1.0, 0.5, 4), (-0.25, 0.25, 4), (-0.3, 0.3, 4)]

WAVE = mastar_wavelength()
# a MaStar-like target: R from 1500 (blue) to 2200 (red)
SIGMA_T = lsf.sigma_from_resolution(WAVE, 1500.0 + 700.0 * (WAVE - WAVE[0]) / (WAVE[-1] - WAVE[0]))

# air wavelengths (Å) and kind of the lines of the analytic spectrum: 0 H, 1 α element, 2 iron peak
LINES = np.array([3934.8, 3969.6, 4101.7, 4226.7, 4340.5, 4383.5, 4861.3, 5167.3, 5183.6, 5269.5, 5895.9,
                  6562.8, 6867.0, 7699.0, 8498.0, 8542.1, 8662.1, 9229.0, 10049.4])
KIND = np.array([1, 1, 0, 2, 0, 2, 0, 1, 1, 2, 2, 0, 2, 2, 1, 1, 1, 0, 0])


def analytic(lam, teff, logg, mh, am, lvt):  # noqa: ANN001, ANN201
    """Planck continuum × Gaussian lines whose depths and widths follow the labels."""
    t, g, m, a, v = (np.asarray(x, np.float64)[..., None] for x in (teff, logg, mh, am, lvt))
    c2 = 1.4388e8  # hc/k in Å K
    f = (lam / 5000.0) ** -5 / np.expm1(c2 / (lam * t)) * np.expm1(c2 / (5000.0 * t))
    for lc, k in zip(LINES, KIND):
        if k == 0:
            depth = 0.6 * np.exp(-(((t - 9500.0) / 3500.0) ** 2)) * (1 + 0.05 * (g - 4))
            width = 3.0 + 0.8 * (5 - g)
        else:
            base = 0.5 * 10 ** (0.4 * m + (0.4 * a if k == 1 else 0.0)) * (6000.0 / t) ** 2
            depth = base / (1 + base)
            width = 1.0 + 0.3 * 10**v
        f = f * (1 - depth * np.exp(-0.5 * ((lam - lc) / width) ** 2))
    return f


def grid_parts(axes=AXES, names=APOGEE_NAMES, *, npix=3000, w0=3600.0, w1=10400.0,  # noqa: ANN001
               resolution=10000.0) -> dict:
    x0 = np.log10(w0)
    step = (np.log10(w1) - x0) / (npix - 1)
    lam = 10 ** (x0 + step * np.arange(npix))  # air
    nodes = [lo + st * np.arange(k) for lo, st, k in axes]
    mesh = np.meshgrid(*nodes, indexing="ij")
    flux = analytic(lam, *mesh).astype(np.float32)
    header = {"WAVE": [x0, step], "LOGW": 1, "VACUUM": 0}
    if resolution is not None:
        header["RESOLUTION"] = resolution
    return {"flux": flux, "llimits": [a[0] for a in axes], "steps": [a[1] for a in axes], "labels": list(names),
            "header": header}


@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> FerreGrid:  # noqa: ANN001
    path = write_ferre(tmp_path_factory.mktemp("grid") / "f_test", grid_parts(), binary=True)
    return read_ferre(path)


@pytest.fixture(scope="module")
def ref(grid: FerreGrid) -> ReferenceSet:
    return make_synthetic_reference(grid, 60, LABELS5, lsf_sigma_aa=SIGMA_T, rng=7)


def _gauss(x, a, mu, s, c):  # noqa: ANN001, ANN202
    return c - a * np.exp(-0.5 * ((x - mu) / s) ** 2)


# --------------------------------------------------------------------------- configuration and labels


def test_config_validation() -> None:
    for bad in ({"lsf_sigma": "mean"}, {"snr": 0.0}, {"n_spectra": -1}, {"axis_scale": {"X": "ln"}},
                {"fixed_labels": {"ALPHA_FE": "zero"}}, {"metals_jitter": -0.1}):
        with pytest.raises(ConfigError):
            SyntheticConfig(**bad)
    assert n_synthetic(SyntheticConfig(), 1675) == 1675
    assert n_synthetic(SyntheticConfig(n_spectra=10), 1675) == 10


def test_recognize_grid_labels() -> None:
    assert recognize_grid_label("Teff") == ("teff", "linear")
    assert recognize_grid_label("[M/H]") == ("metals", "linear")
    assert recognize_grid_label("O Mg Si S Ca Ti") == ("alpha", "linear")
    assert recognize_grid_label("[alpha/M]") == ("alpha", "linear")
    assert recognize_grid_label("LOG10VDOP") == ("vmicro", "log10")
    assert recognize_grid_label("vmicro") == ("vmicro", "linear")
    assert recognize_grid_label("C") is None


def test_plan_apogee_names(grid: FerreGrid) -> None:
    plan = plan_labels(grid, LABELS5)
    assert [a.source for a in plan.axes] == ["isochrone"] * 3 + ["random"] * 2
    assert plan.label_axis == {"TEFF": 0, "LOGG": 1, "FE_H": 2, "ALPHA_FE": 3, "LOG10_VMICRO": 4}
    assert plan.axes[4].scale == "log10"


def test_unfitted_axes_take_middle_node_or_config(grid: FerreGrid) -> None:
    plan = plan_labels(grid, ["TEFF", "LOGG", "FE_H"])
    assert [(a.source, a.value) for a in plan.axes[3:]] == [("default", 0.0), ("default", 0.0)]
    plan = plan_labels(grid, ["TEFF", "LOGG", "FE_H"],
                       SyntheticConfig(grid_defaults={"o mg si s ca ti": 0.25, "LOG10VDOP": 0.3}))
    assert [a.value for a in plan.axes[3:]] == [0.25, 0.3]
    with pytest.raises(ConfigError, match="outside"):
        plan_labels(grid, ["TEFF", "LOGG", "FE_H"], SyntheticConfig(grid_defaults={"LOG10VDOP": 2.0}))
    with pytest.raises(ConfigError, match="fixed_labels"):  # a fitted label's axis is pinned via fixed_labels
        plan_labels(grid, LABELS5, SyntheticConfig(grid_defaults={"LOG10VDOP": 0.3}))


def test_missing_label_needs_fixed_value(grid: FerreGrid) -> None:
    with pytest.raises(ConfigError, match="C_FE"):
        make_synthetic_reference(grid, 3, LABELS5 + ["C_FE"], lsf_sigma_aa=SIGMA_T, rng=1)
    r = make_synthetic_reference(grid, 3, LABELS5 + ["C_FE"], lsf_sigma_aa=SIGMA_T, rng=1,
                                 config=SyntheticConfig(fixed_labels={"C_FE": 0.1}))
    assert np.all(r.labels[:, -1] == 0.1)
    # a grid without an α axis
    g3 = FerreGrid(labels=["TEFF", "LOGG", "METALS"], llimits=grid.llimits[:3], steps=grid.steps[:3],
                   n_p=grid.n_p[:3], wave=grid.wave, flux=grid.flux[:, :, :, 0, 0], header=dict(grid.header))
    with pytest.raises(ConfigError, match="ALPHA_FE"):
        plan_labels(g3, ["TEFF", "LOGG", "FE_H", "ALPHA_FE"])
    r = make_synthetic_reference(g3, 3, ["TEFF", "LOGG", "FE_H", "ALPHA_FE"], lsf_sigma_aa=SIGMA_T, rng=1,
                                 config=SyntheticConfig(fixed_labels={"ALPHA_FE": 0.0}))
    assert np.all(r.labels[:, 3] == 0.0) and np.all(r.labels[:, 0] > 6000)


def test_other_label_names_and_linear_vmicro() -> None:
    axes = [(5000.0, 3000.0, 3), (2.5, 1.5, 3), (-1.5, 1.0, 3), (-0.2, 0.6, 2), (0.5, 1.75, 3)]
    names = ["Teff", "logg", "[M/H]", "[alpha/M]", "VMICRO"]
    p = grid_parts(axes, names, npix=1500)
    g = FerreGrid(labels=names, llimits=np.array(p["llimits"]), steps=np.array(p["steps"]), n_p=p["flux"].shape[:-1],
                  wave=air_to_vacuum(10 ** (p["header"]["WAVE"][0] + p["header"]["WAVE"][1] * np.arange(1500))),
                  flux=p["flux"], header={"RESOLUTION": 10000.0})
    labels = ["LOG10_VMICRO", "M_H", "TEFF", "LOGG", "ALPHA_M"]
    r = make_synthetic_reference(g, 40, labels, lsf_sigma_aa=SIGMA_T, rng=3)
    vm = r.labels[:, 0]
    assert np.all((vm >= np.log10(0.5) - 1e-12) & (vm <= np.log10(4.0) + 1e-12))
    assert np.all((r.labels[:, 1] >= -1.5) & (r.labels[:, 1] <= 0.5))
    assert np.all((r.labels[:, 2] > 6000) & (r.labels[:, 2] <= 11000))
    assert np.all((r.labels[:, 4] >= -0.2) & (r.labels[:, 4] <= 0.4))
    # label_map overrides the recognition (and a wrong name is reported)
    with pytest.raises(ConfigError, match="nope"):
        plan_labels(g, labels, SyntheticConfig(label_map={"ALPHA_M": "nope"}))


# --------------------------------------------------------------------------- the reference set


def test_reference_set_shape_and_labels(grid: FerreGrid, ref: ReferenceSet) -> None:
    assert len(ref) == 60 and ref.labels.shape == (60, 5) and ref.flux.shape == (60, WAVE.size)
    assert ref.flux.dtype == np.float32 and ref.ivar.dtype == np.float32
    assert ref.label_names == LABELS5
    assert list(ref.ids[:2]) == ["synth-00001", "synth-00002"]
    assert set(ref.source) == {"synthetic"} and np.all(ref.n_visits == 0) and np.all(ref.snr == 500.0)
    lo, hi = grid.label_range
    assert np.all(ref.labels >= lo - 1e-9) and np.all(ref.labels <= hi + 1e-9)
    assert np.all(ref.labels[:, 0] > 6000.0)
    assert len(np.unique(ref.labels[:, 2])) > 11  # [M/H] not only PARSEC's 0.25-dex values
    assert np.all(np.isfinite(ref.flux)) and np.all(np.isfinite(ref.ivar))


def test_spectra_belong_to_their_labels(grid: FerreGrid, ref: ReferenceSet) -> None:
    """Each spectrum is the grid interpolated at its own labels, LSF-matched and normalized."""
    idx = [0, 17, 59]
    m = LsfMatcher(grid.wave, grid_sigma_aa(grid), WAVE, SIGMA_T)
    f = m(interpolate(grid, ref.labels[idx]))  # the grid's axes are our labels here
    level = np.nanmedian(f, axis=1)
    ok = np.isfinite(f)
    nf, ni = normalize_spectra(np.where(ok, f, 0.0), np.where(ok, (500.0 / level[:, None]) ** 2, 0.0),
                               window=400, min_count=40)
    np.testing.assert_allclose(ref.flux[idx], nf, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(ref.ivar[idx], ni, rtol=1e-4)


def test_concat_with_empirical(ref: ReferenceSet) -> None:
    n = 4
    emp = ReferenceSet(LABELS5, np.tile([5000.0, 4.5, 0.0, 0.0, 0.0], (n, 1)), np.ones((n, WAVE.size), np.float32),
                       np.ones((n, WAVE.size), np.float32), WAVE, np.array([f"7-{i}" for i in range(n)]),
                       np.full(n, "empirical"), np.ones(n, np.int64), np.full(n, 80.0), np.full(n, "2M0"),
                       {"kept": n})
    both = emp.concat(ref)
    assert len(both) == n + len(ref)
    assert list(both.source).count("synthetic") == len(ref)
    assert both.cut_report["synthetic_kept"] == len(ref)
    syn = synthetic_extension(emp, read_grid_like(ref), lsf_sigma_aa=SIGMA_T, rng=2)
    assert len(syn) == n and syn.label_names == emp.label_names


def read_grid_like(ref: ReferenceSet) -> FerreGrid:  # a tiny in-memory grid for synthetic_extension
    axes = [(6000.0, 3000.0, 3), (3.0, 1.0, 3), (-1.0, 1.0, 2), (0.0, 0.5, 2), (0.0, 0.3, 2)]
    p = grid_parts(axes, npix=1200)
    return FerreGrid(labels=APOGEE_NAMES, llimits=np.array(p["llimits"]), steps=np.array(p["steps"]),
                     n_p=p["flux"].shape[:-1],
                     wave=air_to_vacuum(10 ** (p["header"]["WAVE"][0] + p["header"]["WAVE"][1] * np.arange(1200))),
                     flux=p["flux"], header={})


def test_continuum_is_one(ref: ReferenceSet) -> None:
    air = vacuum_to_air(WAVE)
    far = np.all(np.abs(air[:, None] - LINES[None, :]) > 40.0, axis=1)
    far[:300] = far[-300:] = False
    c = ref.flux[:, far]
    assert abs(float(np.median(c)) - 1.0) < 0.005
    assert float(np.percentile(np.abs(c - 1.0), 99)) < 0.03


def test_pixels_outside_the_grid_get_no_weight(tmp_path) -> None:  # noqa: ANN001
    axes = [(6000.0, 3000.0, 3), (3.0, 1.0, 3), (-1.0, 1.0, 2), (0.0, 0.5, 2), (0.0, 0.3, 2)]
    g = read_ferre(write_ferre(tmp_path / "narrow", grid_parts(axes, npix=1500, w0=4000.0, w1=9000.0), binary=True))
    r = make_synthetic_reference(g, 5, LABELS5, lsf_sigma_aa=SIGMA_T, rng=0)
    outside = (WAVE < g.wave[0]) | (WAVE > g.wave[-1])
    assert outside.sum() > 500
    assert np.all(r.ivar[:, outside] == 0) and np.all(r.flux[:, outside] == 0)
    inside = (WAVE > g.wave[0] + 30) & (WAVE < g.wave[-1] - 30)
    assert np.all(r.ivar[:, inside] > 0)


# --------------------------------------------------------------------------- LSF


def _line_grid(logw: int, step: float) -> FerreGrid:
    """2×2×2 grid of one spectrum: flat with three narrow lines at the grid's resolution R = 10,000."""
    x0 = np.log10(3550.0) if logw else 3550.0
    npix = int(((np.log10(10500.0) if logw else 10500.0) - x0) / step)
    lam = 10 ** (x0 + step * np.arange(npix)) if logw else x0 + step * np.arange(npix)
    f = np.ones(npix)
    for lc in vacuum_to_air(np.array([4000.0, 6500.0, 9500.0])):
        f -= 0.5 * np.exp(-0.5 * ((lam - lc) / (lc / 10000.0 * lsf.FWHM_TO_SIGMA)) ** 2)
    return FerreGrid(labels=["TEFF", "LOGG", "METALS"], llimits=np.array([6000.0, 3.0, -1.0]),
                     steps=np.array([6000.0, 2.0, 1.0]), n_p=(2, 2, 2), wave=air_to_vacuum(lam),
                     flux=np.broadcast_to(f.astype(np.float32), (2, 2, 2, npix)).copy(),
                     header={"RESOLUTION": 10000.0, "LOGW": logw, "VACUUM": 0})


@pytest.mark.parametrize("logw,step", [(1, 1e-5), (0, 0.1), (1, 2.5e-6)],
                         ids=["log-lambda", "linear-lambda", "very-fine(binned)"])
@pytest.mark.parametrize("pixelized", [True, False])
def test_narrow_line_gets_target_width(logw: int, step: float, pixelized: bool) -> None:
    g = _line_grid(logw, step)
    r = make_synthetic_reference(g, 1, ["TEFF", "LOGG", "FE_H"], lsf_sigma_aa=SIGMA_T, rng=0,
                                 config=SyntheticConfig(target_pixelized=pixelized))
    dw = np.gradient(WAVE)
    for lv in (4000.0, 6500.0, 9500.0):
        j = int(np.argmin(np.abs(WAVE - lv)))
        sl = slice(j - 15, j + 16)
        p, _ = curve_fit(_gauss, WAVE[sl], r.flux[0, sl], p0=[0.1, lv, SIGMA_T[j], 1.0])
        # the width a Gaussian fit to the pixel values measures is the target (post-pixel DISP);
        # with a pre-pixel target the MaStar pixel's box adds w²/12
        want = SIGMA_T[j] if pixelized else np.hypot(SIGMA_T[j], dw[j] / np.sqrt(12.0))
        assert p[2] == pytest.approx(want, rel=0.01), (lv, p[2] / want)
        assert p[1] == pytest.approx(lv, abs=0.05)


# --------------------------------------------------------------------------- determinism, noise


def test_seeded_determinism(grid: FerreGrid) -> None:
    a = make_synthetic_reference(grid, 8, LABELS5, lsf_sigma_aa=SIGMA_T, rng=11)
    b = make_synthetic_reference(grid, 8, LABELS5, lsf_sigma_aa=SIGMA_T, rng=11)
    c = make_synthetic_reference(grid, 8, LABELS5, lsf_sigma_aa=SIGMA_T, rng=12)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.flux, b.flux)
    assert not np.array_equal(a.labels, c.labels)
    cfg = SyntheticConfig(seed=5, snr=50.0)
    d = make_synthetic_reference(grid, 8, LABELS5, lsf_sigma_aa=SIGMA_T, config=cfg)
    e = make_synthetic_reference(grid, 8, LABELS5, lsf_sigma_aa=SIGMA_T, config=cfg)
    np.testing.assert_array_equal(d.flux, e.flux)


def test_noise_at_requested_snr(grid: FerreGrid) -> None:
    cfg = SyntheticConfig(snr=50.0)
    clean = make_synthetic_reference(grid, 20, LABELS5, lsf_sigma_aa=SIGMA_T, rng=4)
    noisy = make_synthetic_reference(grid, 20, LABELS5, lsf_sigma_aa=SIGMA_T, rng=4, config=cfg)
    np.testing.assert_array_equal(clean.labels, noisy.labels)
    assert np.all(noisy.snr == 50.0)
    ok = noisy.ivar > 0
    pulls = (noisy.flux - clean.flux)[ok] * np.sqrt(noisy.ivar[ok])
    assert 0.9 < float(np.std(pulls)) < 1.1
    mid = slice(1000, 3500)
    assert float(np.median(np.sqrt(clean.ivar[:, mid]) * clean.flux[:, mid])) == pytest.approx(500, rel=0.05)


def test_dense_interpolation_matches_ferre_interpolate(grid: FerreGrid) -> None:
    it = _Interpolator(grid)
    assert it.dense
    rng = np.random.default_rng(0)
    lo, hi = grid.label_range
    pts = lo + (hi - lo) * rng.random((9, grid.ndim))
    pts[0] = grid.llimits + grid.steps * np.array([2, 1, 3, 0, 2])  # a node
    np.testing.assert_allclose(it(pts), interpolate(grid, pts), rtol=2e-5, atol=1e-6 * float(grid.flux.max()))


# --------------------------------------------------------------------------- the target LSF


def test_median_mastar_lsf_ignores_bad_values() -> None:
    rng = np.random.default_rng(0)
    disp = np.tile(np.linspace(1.0, 2.5, 50), (7, 1)) * rng.uniform(0.95, 1.05, (7, 1))
    truth = np.median(disp, axis=0)
    bad = disp.copy()
    bad[0, :10] = np.nan
    bad[1, 5:20] = 0.0
    bad[2, 30] = -1.0
    bad[3, 40] = np.inf
    want = np.array([np.median(c[np.isfinite(c) & (c > 0)]) for c in bad.T])
    np.testing.assert_allclose(median_mastar_lsf(bad), want)
    assert np.max(np.abs(want / truth - 1)) < 0.05
    # a pixel without any usable value is interpolated from its neighbours
    hole = disp.copy()
    hole[:, 25] = np.nan
    out = median_mastar_lsf(hole)
    assert np.isfinite(out).all() and out[25] == pytest.approx(0.5 * (out[24] + out[26]))


def test_median_mastar_lsf_xarray_and_dask() -> None:
    import xarray as xr  # hard dependencies (with dask): no skip
    rng = np.random.default_rng(1)
    disp = rng.uniform(1.0, 2.0, (40, 30)).astype(np.float32)
    disp[3, 4] = np.nan
    want = median_mastar_lsf(disp)
    da_np = xr.DataArray(disp, dims=("visit", "wave"))
    np.testing.assert_allclose(median_mastar_lsf(da_np), want)
    np.testing.assert_allclose(median_mastar_lsf(da_np.chunk({"visit": 7})), want)
    np.testing.assert_allclose(median_mastar_lsf(xr.DataArray(disp.T, dims=("wave", "visit"))), want)


def test_median_mastar_lsf_falls_back_to_mastarhc() -> None:
    from mastar_vac.demo import load_mastarhc

    out = median_mastar_lsf(np.full((3, WAVE.size), np.nan))
    want = lsf.sigma_from_resolution(WAVE, np.median(load_mastarhc().sres, axis=0))
    np.testing.assert_allclose(out, want)
    assert 0.5 < out.min() and out.max() < 4.0


def test_models_with_invalid_code_are_redrawn(grid: FerreGrid) -> None:
    flux = grid.flux.copy()
    flux[4:, :2] = -999.0  # no models for Teff >= 10,000 K with log g <= 3.5 (a hole, as in APOGEE grids)
    g = FerreGrid(labels=grid.labels, llimits=grid.llimits, steps=grid.steps, n_p=grid.n_p, wave=grid.wave,
                  flux=flux, header={**grid.header, "INVALID_CODE": -999.0})
    r = make_synthetic_reference(g, 30, LABELS5, lsf_sigma_aa=SIGMA_T, rng=3)
    assert r.cut_report.get("redrawn_invalid", 0) > 0
    assert len(r) + r.cut_report.get("dropped_invalid", 0) == 30
    assert np.all(np.isfinite(r.flux)) and len(r) > 0
    assert np.all(np.isfinite(interpolate(g, r.labels)))


def test_spectra_at_given_labels(grid: FerreGrid, ref: ReferenceSet) -> None:
    """``at_labels`` (the §5.2 synthetic-only set with the empirical label distribution):
    spectra at exactly those labels, equal to the drawn ones at the same labels."""
    at = ref.labels[[3, 11, 40]]
    s = make_synthetic_reference(grid, 3, LABELS5, lsf_sigma_aa=SIGMA_T, at_labels=at)
    np.testing.assert_allclose(s.labels, at, rtol=1e-12)
    np.testing.assert_allclose(s.flux, ref.flux[[3, 11, 40]], rtol=2e-5, atol=2e-5)
    with pytest.raises(ValueError, match="at_labels has shape"):
        make_synthetic_reference(grid, 2, LABELS5, lsf_sigma_aa=SIGMA_T, at_labels=at)
