"""The built-in synthetic grid (mastar_vac.builtin_grid) and its use by the extension."""

from __future__ import annotations

import importlib.util
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from mastar_vac import builtin_grid as bg
from mastar_vac.errors import ConfigError, InputFileError
from mastar_vac.io.ferre import read_ferre, write_ferre
from mastar_vac.synthetic import SyntheticConfig, make_synthetic_reference, plan_labels, recognize_grid_label
from mastar_vac.wavegrid import mastar_wavelength

needs_doppler = pytest.mark.skipif(importlib.util.find_spec("doppler") is None,
                                   reason=f"thedoppler not installed ({bg.INSTALL_HINT})")

# a tiny grid: three Teff nodes, one gravity and metallicity, three rotations, the blue third
TINY = bg.GridSpec(teff=(10000.0, 30000.0, 10000.0), logg=(4.0, 4.0, 0.5), feh=(0.0, 0.0, 1.0),
                   vsini=(0.0, 200.0, 100.0), wave_vac=(3800.0, 5200.0))


@pytest.fixture(scope="module")
def model() -> bg.CannonModel:
    if importlib.util.find_spec("doppler") is None:
        pytest.skip(f"thedoppler not installed ({bg.INSTALL_HINT})")
    return bg.load_cannon_model()


@pytest.fixture(scope="module")
def tiny(model: bg.CannonModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    hdr, _ = bg.build_grid(tmp_path_factory.mktemp("tiny") / "g", TINY, model=model)
    return hdr


# --------------------------------------------------------------------------- the unpickler


class _Evil:
    def __reduce__(self):  # noqa: ANN204 - the classic payload: calling os.system on load
        return (os.system, ("echo should-not-run",))


def test_restricted_unpickler_refuses_other_globals(tmp_path: Path) -> None:
    p = tmp_path / "evil.pkl"
    p.write_bytes(pickle.dumps({"theta": np.zeros(3), "x": _Evil()}, protocol=3))
    with pytest.raises(InputFileError, match=r"evil\.pkl.*(posix|os|nt)\.system.*not allowed"):
        bg.load_cannon_pickle(p)
    # numpy arrays and plain containers pass, in any protocol
    q = tmp_path / "ok.pkl"
    q.write_bytes(pickle.dumps({"a": np.arange(4.0), "t": (1, "x"), "d": {"k": [np.float32(2)]}}, protocol=4))
    d = bg.load_cannon_pickle(q)
    assert np.array_equal(d["a"], np.arange(4.0)) and d["t"] == (1, "x") and d["d"]["k"][0] == 2
    with pytest.raises(InputFileError, match="not found"):
        bg.load_cannon_pickle(tmp_path / "missing.pkl")


@needs_doppler
def test_real_model_loads_with_thecannon_scaling(model: bg.CannonModel) -> None:
    assert model.label_names == ("TEFF", "LOGG", "FEH")
    assert model.theta.shape == (150001, 20) and model.continuum is not None and model.continuum.logflux
    assert model.dispersion[0] == 3000.0 and abs(model.dispersion[-1] - 18000.0) < 1e-6
    # thecannon: fiducial = median, scale = ptp of the 2.5/97.5 percentiles of the training labels
    assert np.allclose(model.fiducials, [17000.0, 4.0, -0.5])
    assert np.allclose(model.scales, [29500.0, 2.5, 2.0])
    # at the fiducial the scaled labels are 0: the flux is theta's first column
    assert np.allclose(model(model.fiducials[None, :])[0], model.theta[:, 0])


@needs_doppler
def test_balmer_lines_deepen_to_cooler_stars_and_he_i_in_b_stars(model: bg.CannonModel) -> None:
    w = model.dispersion
    teff = np.array([30000.0, 20000.0, 15000.0, 10000.0])
    f = model(np.stack([teff, np.full(4, 4.0), np.zeros(4)], axis=1))

    def ew(lo: float, hi: float) -> np.ndarray:
        s = (w > lo) & (w < hi)
        return np.trapezoid(1.0 - f[:, s], w[s], axis=1)

    hbeta = ew(4841.0, 4881.0)
    assert np.all(np.diff(hbeta) > 0) and hbeta[-1] > 3 * hbeta[0]  # 30 kK → 10 kK
    he4471 = ew(4465.0, 4478.0)
    assert he4471[1] > 0.5 and he4471[1] > 2 * he4471[3]  # strong at 20 kK (B2), weak at 10 kK (A0)


# --------------------------------------------------------------------------- the grid


def test_rotation_kernel_is_normalized_and_as_wide_as_vsini() -> None:
    k = bg.rotation_kernel(100.0, 2.0)
    assert abs(k.sum() - 1.0) < 1e-12 and len(k) == 2 * 50 + 1 and np.allclose(k, k[::-1])
    assert np.array_equal(bg.rotation_kernel(0.0, 2.0), [1.0])
    x = np.arange(-50, 51) * 2.0 / 100.0
    # Gray's profile with ε = 0.6: ⟨x²⟩ = (0.1π + 0.08π) / (0.4π + 0.4π) = 0.225 analytically
    assert (k * x**2).sum() == pytest.approx(0.225, rel=0.01)


def test_rotation_broadens_a_line_keeping_its_equivalent_width() -> None:
    dv = 2.0
    v = (np.arange(4001) - 2000) * dv
    line = 1.0 - 0.6 * np.exp(-0.5 * (v / 15.0) ** 2)
    depths, ews = [], []
    for vsini in (0.0, 50.0, 150.0, 250.0):
        (out,) = bg._convolve_rows(line[None, :], [bg.rotation_kernel(vsini, dv)])
        depths.append(1.0 - out[0].min())
        ews.append(((1.0 - out[0]) * dv).sum())
    assert np.all(np.diff(depths) < 0)
    assert np.allclose(ews, ews[0], rtol=1e-6)


@needs_doppler
def test_built_grid_is_read_with_its_axes_and_ranges(tiny: Path) -> None:
    g = read_ferre(tiny)
    assert g.labels == ["TEFF", "LOGG", "METALS", "VSINI"]
    assert g.n_p == (3, 1, 1, 3) and g.flux.dtype == np.float32 and g.flux.shape == TINY.shape()
    lo, hi = g.label_range
    assert list(lo) == [10000.0, 4.0, 0.0, 0.0] and list(hi) == [30000.0, 4.0, 0.0, 200.0]
    assert g.header["VACUUM"] == 1 and g.header["LOGW"] == 1 and g.header["RESOLUTION"] == TINY.resolution
    assert g.wave[0] == pytest.approx(3800.0) and g.wave[-1] >= 5200.0
    assert "not the Allende Prieto" in g.header["COMMENTS1"] and "clipped" in g.header["COMMENTS2"]
    assert np.isfinite(g.flux).all() and g.flux.min() >= 0


@needs_doppler
def test_grid_is_deterministic(model: bg.CannonModel, tiny: Path, tmp_path: Path) -> None:
    again, _ = bg.build_grid(tmp_path / "g", TINY, model=model)
    assert again.read_bytes() == tiny.read_bytes()
    assert again.with_suffix(".unf").read_bytes() == tiny.with_suffix(".unf").read_bytes()


@needs_doppler
def test_rotation_in_the_grid_makes_hbeta_shallower(tiny: Path) -> None:
    g = read_ferre(tiny)
    s = (g.wave > 4790.0) & (g.wave < 4940.0)  # Hβ (vacuum 4862.7 Å) with its wings
    w = g.wave[s]
    depth, ew = [], []
    for iv in range(3):
        f = g.flux[0, 0, 0, iv, s].astype(np.float64)  # 10,000 K
        r = f / np.interp(w, [w[0], w[-1]], [f[0], f[-1]])
        depth.append(1.0 - r.min())
        ew.append(np.trapezoid(1.0 - r, w))
    assert depth[0] > depth[1] > depth[2]
    # the straight pseudo-continuum through 4790/4940 Å sits in Hβ's far wings at 10 kK,
    # which the broadening spreads a little: 14.8 → 15.4 Å at 200 km/s
    assert np.allclose(ew, ew[0], rtol=0.05)


@needs_doppler
def test_clipping_bounds_hold(model: bg.CannonModel, tmp_path: Path) -> None:
    # the cubic model's worst corner: cool, low gravity, metal-poor (negative cores, bumps)
    spec = bg.GridSpec(teff=(8000.0, 8000.0, 1.0), logg=(2.5, 2.5, 1.0), feh=(-2.5, -2.5, 1.0),
                       vsini=(0.0, 0.0, 1.0), wave_vac=(3800.0, 4400.0), clip=(0.0, 1.05))
    raw = model(np.array([[8000.0, 2.5, -2.5]]))[0]
    assert raw.min() < 0 or raw.max() > 1.05  # there is something to clip
    hdr, facts = bg.build_grid(tmp_path / "c", spec, model=model)
    assert facts["clipped_below"] + facts["clipped_above"] > 0
    g = read_ferre(hdr)
    # flux = clipped normalized × continuum / its median: within the clip times the continuum
    wa = model.dispersion
    cont = model.continuum_flux(np.array([[8000.0, 2.5, -2.5]]), wa)[0]
    from mastar_vac.wavegrid import vacuum_to_air

    c = np.interp(vacuum_to_air(g.wave), wa, cont)
    c /= np.median(c)
    ratio = g.flux[0, 0, 0, 0] / c
    assert ratio.min() >= -1e-3 and ratio.max() <= 1.05 + 2e-3


def test_default_spec_size_and_steps() -> None:
    spec = bg.GridSpec()
    assert [(a, n[0], n[-1], len(n)) for a, n in spec.axes()] == [
        ("TEFF", 8000.0, 30000.0, 23), ("LOGG", 2.5, 5.0, 6), ("METALS", -2.5, 0.5, 4), ("VSINI", 0.0, 250.0, 6)]
    assert spec.nbytes() < 150e6
    w = 10 ** spec.log_wave()
    mw = mastar_wavelength()
    assert w[0] < mw[0] - 20 and w[-1] > mw[-1] + 20  # MaStar plus room for its LSF kernel
    with pytest.raises(ValueError, match="whole number"):
        bg.GridSpec(teff=(8000.0, 8500.0, 1000.0))


@needs_doppler
def test_cache_builds_once_with_a_manifest(model: bg.CannonModel, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    calls = []
    real = bg.build_grid

    def counting(*a, **k):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        return real(*a, model=model, **{x: y for x, y in k.items() if x != "model_path"})

    monkeypatch.setattr(bg, "build_grid", counting)
    p1 = bg.builtin_grid_path(tmp_path, TINY)
    p2 = bg.builtin_grid_path(tmp_path, TINY)
    assert p1 == p2 and len(calls) == 1 and read_ferre(p1).n_p == (3, 1, 1, 3)
    import json

    man = json.loads((p1.parent / "manifest.json").read_text())
    assert man["spec"]["teff"] == [10000.0, 30000.0, 10000.0] and len(man["model_sha256"]) == 64
    assert p1.parent.name == bg.builtin_grid_id(TINY)
    assert not list(tmp_path.glob(".*part-*"))


def test_missing_thedoppler_says_how_to_install(monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ConfigError, match=r"pip install --no-deps thedoppler==1\.1\.32"):
        bg.doppler_data_dir()


# --------------------------------------------------------------------------- configuration and the extension


def test_config_builtin_round_trip(tmp_path: Path) -> None:
    from mastar_vac.config import load_config

    p = tmp_path / "c.toml"
    p.write_text('[inputs]\ndemo = true\nsynthetic_grid = "builtin"\n[synthetic]\nvsini = [100.0, 200.0]\n')
    if importlib.util.find_spec("doppler") is None:
        with pytest.raises(ConfigError, match="pip install --no-deps"):
            load_config(p)
        return
    cfg = load_config(p)
    assert cfg.inputs.synthetic_grid == "builtin" and cfg.synthetic.vsini == (100.0, 200.0)
    assert cfg.to_dict()["inputs"]["synthetic_grid"] == "builtin"
    # a path is still a path; an unknown key is still an error
    p.write_text(f'[inputs]\ndemo = true\nsynthetic_grid = "{tmp_path / "f.hdr"}"\n')
    assert load_config(p).inputs.synthetic_grid == tmp_path / "f.hdr"
    p.write_text('[inputs]\ndemo = true\n[synthetic]\nvsini_range = [1.0, 2.0]\n')
    with pytest.raises(ConfigError, match="vsini_range"):
        load_config(p)


def test_vsini_config_validation() -> None:
    for bad in ({"vsini": (250.0, 50.0)}, {"vsini": (50.0,)}, {"vsini": (-1.0, 5.0)}, {"vsini_draw": "normal"}):
        with pytest.raises(ConfigError, match="vsini"):
            SyntheticConfig(**bad)
    SyntheticConfig(vsini=(0.0, 100.0, 200.0), vsini_draw="choice")
    assert recognize_grid_label("VSINI") == ("vsini", "linear")
    assert recognize_grid_label("LGVSINI") == ("vsini", "log10")


def _rot_grid(tmp_path: Path, labels: list[str], vs: tuple[float, float, int] = (0.0, 100.0, 4)) -> Path:
    """A flat-continuum grid with one Gaussian line whose depth encodes the v sin i node."""
    x0, npix = np.log10(3600.0), 2000
    step = (np.log10(10400.0) - x0) / (npix - 1)
    lam = 10 ** (x0 + step * np.arange(npix))
    axes = [(8000.0, 2000.0, 4), (3.0, 0.5, 4), (-1.0, 0.5, 4), vs]
    mesh = np.meshgrid(*[lo + st * np.arange(k) for lo, st, k in axes], indexing="ij")
    flux = 1.0 - 0.001 * mesh[3][..., None] * np.exp(-0.5 * ((lam - 5000.0) / 3.0) ** 2)
    return write_ferre(tmp_path / "f_rot", {"flux": np.broadcast_to(flux, flux.shape).astype(np.float32),
                                            "llimits": [a[0] for a in axes], "steps": [a[1] for a in axes],
                                            "labels": labels, "header": {"WAVE": [x0, step], "LOGW": 1, "VACUUM": 1}},
                       binary=True)


def test_extension_draws_the_rotation_axis_within_its_range(tmp_path: Path) -> None:
    g = read_ferre(_rot_grid(tmp_path, ["TEFF", "LOGG", "METALS", "VSINI"], (0.0, 100.0, 4)))  # 0–300 km/s
    cfg = SyntheticConfig(vsini=(120.0, 180.0))
    plan = plan_labels(g, ["TEFF", "LOGG", "FE_H"], cfg)
    assert plan.axes[3].source == "rotation" and plan.axes[3].labels == ()
    from mastar_vac.synthetic import _draw_points

    labels, pts = _draw_points(g, plan, 400, cfg, np.random.default_rng(3))
    assert labels.shape == (400, 3)  # v sin i is no emulator label
    assert pts[:, 3].min() >= 120.0 and pts[:, 3].max() <= 180.0 and pts[:, 3].std() > 10.0
    choice = SyntheticConfig(vsini=(0.0, 300.0), vsini_draw="choice")
    _, pts = _draw_points(g, plan_labels(g, ["TEFF", "LOGG", "FE_H"], choice), 200, choice, np.random.default_rng(4))
    assert set(np.unique(pts[:, 3])) == {0.0, 300.0}
    with pytest.raises(ConfigError, match="reaches outside the rotation axis VSINI"):
        plan_labels(g, ["TEFF", "LOGG", "FE_H"], SyntheticConfig(vsini=(50.0, 400.0)))
    # pinned with grid_defaults: no draw
    pinned = plan_labels(g, ["TEFF", "LOGG", "FE_H"], SyntheticConfig(grid_defaults={"VSINI": 0.0}))
    assert (pinned.axes[3].source, pinned.axes[3].value) == ("default", 0.0)
    # the spectra follow: a line whose depth grows with the node value
    sig = np.full(mastar_wavelength().size, 1.5)
    ref = make_synthetic_reference(g, 30, ["TEFF", "LOGG", "FE_H"], lsf_sigma_aa=sig, config=cfg, rng=5)
    assert len(ref) == 30 and np.isfinite(ref.flux).all()


def test_unknown_grid_axis_is_an_error_unless_given_a_value(tmp_path: Path) -> None:
    g = read_ferre(_rot_grid(tmp_path, ["TEFF", "LOGG", "METALS", "C"]))
    with pytest.raises(ConfigError, match=r"axis 'C'.*does not know how to draw.*grid_defaults"):
        plan_labels(g, ["TEFF", "LOGG", "FE_H"])
    plan = plan_labels(g, ["TEFF", "LOGG", "FE_H"], SyntheticConfig(grid_defaults={"C": 0.0}))
    assert (plan.axes[3].source, plan.axes[3].value) == ("default", 0.0)


@needs_doppler
@pytest.mark.slow
def test_build_with_the_builtin_grid_end_to_end(tmp_path: Path) -> None:
    """`synthetic_grid = "builtin"` on a small demo: the grid is built into the cache
    (~10 s, 122 MB), the extension draws from it, and a second run reuses every stage."""
    import subprocess
    import sys

    from mastar_vac.reference import ReferenceSet

    from .test_build import _config

    cfg = _config(tmp_path, stars=40)
    cfg.write_text(cfg.read_text().replace("demo = true", 'demo = true\nsynthetic_grid = "builtin"')
                   + "\n[synthetic]\nn_spectra = 20\n")
    env = dict(os.environ, MASTAR_VAC_CACHE=str(tmp_path / "cache"), MASTAR_VAC_PROGRESS="0")
    cmd = [sys.executable, "-m", "mastar_vac.build", "--config", str(cfg)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "VSINI[linear]: rotation" in proc.stderr
    ref = ReferenceSet.load(tmp_path / "out" / "reference" / "reference_set.npz")
    synth = ref.source == "synthetic"
    assert synth.sum() == 20 and (ref.labels[synth, 0] >= 8000).all() and np.isfinite(ref.flux[synth]).all()
    assert len(list((tmp_path / "cache").glob("builtin-grid-v*/f_builtin_hotdwarfs.unf"))) == 1
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    line = next(ln for ln in again.stdout.splitlines() if ln.startswith("reference"))
    assert "reused" in line, line
