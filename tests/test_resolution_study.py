"""The §5.1 study's pieces: LSF homogenization and the per-star deviations (issue 14, point 5)."""

from __future__ import annotations

import numpy as np

from mastar_vac import lsf
from mastar_vac.studies.resolution import deviations, homogenized_catalogues


def _lines(P: int, width: float) -> np.ndarray:
    x = np.arange(P)
    return 1.0 - 0.5 * np.exp(-0.5 * ((x[None, :] - np.arange(20, P - 20, 25)[:, None]) / width) ** 2).sum(0)


def test_homogenize_broadens_to_the_target_and_propagates_variance():
    P = 300
    sharp = 0.8
    sig = np.array([np.full(P, 1.0), np.full(P, 1.5)])
    target = np.full(P, 2.0)
    # a line of intrinsic width 0 observed at σ = 1.0 and 1.5 → both should come out at 2.0
    flux = np.stack([lsf.broaden(_lines(P, sharp), np.sqrt(s**2 - sharp**2)) for s in sig[:, 0]])
    ivar = np.full((2, P), 1e4)
    ivar[0, 150] = 0.0  # a masked pixel: bridged, and its neighbours flagged where they lean on it
    out, oiv = lsf.homogenize(flux, ivar, sig, target)
    want = lsf.broaden(_lines(P, sharp), np.sqrt(2.0**2 - sharp**2))
    ok = oiv[0] > 0
    assert np.abs(out[0][ok] - want[ok]).max() < 2e-3 and np.abs(out[1] - want).max() < 2e-3
    assert oiv[0, 150] == 0 and ok.sum() > P - 10
    # white noise through a kernel of Σw² < 1: the variance falls, as Σ w² σ² says
    k = lsf.differential_kernel(target, sig[1])
    np.testing.assert_allclose(oiv[1, 100], 1e4 / (k.weights[100] ** 2).sum(), rtol=1e-5)


def test_homogenized_catalogues_take_only_visits_sharper_than_the_curve():
    rng = np.random.default_rng(0)
    P, n = 120, 40
    ids = np.repeat(np.arange(20), 2).astype(str)
    factor = rng.uniform(0.9, 1.1, n)
    sig = factor[:, None] * np.full((n, P), 1.2)
    flux = np.ones((n, P))
    ivar = np.full((n, P), 100.0)
    cats = homogenized_catalogues(ids, flux, ivar, sig, percentiles=(60.0, 99.5))
    c60, c99 = cats[60.0], cats[99.5]
    np.testing.assert_allclose(c60["curve"], np.percentile(sig, 60, axis=0))
    assert c60["n_visits"] == int((factor <= np.percentile(factor, 60) * (1 + 1e-3)).sum())
    assert c99["n_visits"] > c60["n_visits"] and len(c99["ids"]) >= len(c60["ids"])
    np.testing.assert_allclose(c99["flux"], 1.0, atol=1e-6)  # a flat spectrum stays flat


def test_deviations_are_from_each_stars_median():
    fits = {60.0: np.array([[5000.0, 4.0]]), 75.0: np.array([[5100.0, 4.1]]), 99.5: np.array([[5300.0, 4.0]])}
    d = deviations(fits)
    np.testing.assert_allclose(d[:, 0, 0], [-100.0, 0.0, 200.0])
    np.testing.assert_allclose(d[:, 0, 1], [0.0, 0.1, 0.0], atol=1e-12)


def test_a_real_combspec_catalogue_is_read_normalized_and_checked(tmp_path):
    """A mastar-combspec file: its percentile from the name, its flux continuum-normalized
    as the build does, each star's target LSF from its DISP where it has one and from the
    visits' percentile curve where not; a star twice, a name without the percentile and a
    foreign wavelength grid are refused with the file named."""
    from types import SimpleNamespace

    import pytest

    from mastar_vac.errors import MastarVacError
    from mastar_vac.fit import disp_to_pixels
    from mastar_vac.io.combspec import write_combspec
    from mastar_vac.studies.resolution import combspec_catalogue
    from mastar_vac.wavegrid import mastar_wavelength

    wave = mastar_wavelength()
    P = len(wave)
    rng = np.random.default_rng(1)
    flux = np.full((3, P), 5.0, np.float32) * np.array([1.0, 2.0, 3.0], np.float32)[:, None]
    disp = np.full((3, P), np.nan, np.float32)
    disp[1] = (wave / 1800 / 2.355).astype(np.float32)  # one star with its own target LSF (Å)
    cols = {"MANGAID": np.array(["1-3", "1-1", "1-2"]), "FLUX": flux, "IVAR": np.full((3, P), 4.0, np.float32),
            "MASK": np.zeros((3, P), np.int32), "DISP": disp}
    path = write_combspec(tmp_path / "mastar-combspec-v3_1_1-v1_7_7-lsfpercent90.fits", cols)
    visit_sigma = rng.uniform(1.0, 1.4, (50, P))
    norm = SimpleNamespace(window=400, min_count=40)
    p, cat = combspec_catalogue(path, wave=wave, visit_sigma=visit_sigma, normalize=norm)
    assert p == 90.0 and cat["ids"].tolist() == ["1-1", "1-2", "1-3"]  # sorted by MANGAID
    np.testing.assert_allclose(cat["flux"], 1.0, atol=1e-6)  # flat spectra normalize to 1
    np.testing.assert_allclose(cat["ivar"][0], 4.0 * 10.0**2, rtol=1e-5)  # ivar × continuum²
    np.testing.assert_allclose(cat["sigma"][0], disp_to_pixels(disp[1:2], wave)[0], rtol=1e-6)  # its DISP
    np.testing.assert_allclose(cat["sigma"][1], np.percentile(visit_sigma, 90, axis=0))  # the curve
    # refused, with the file named
    twice = dict(cols, MANGAID=np.array(["1-3", "1-1", "1-3"]))
    bad = write_combspec(tmp_path / "mastar-combspec-lsfpercent60.fits", twice)
    with pytest.raises(MastarVacError, match=r"lsfpercent60.*MANGAID 1-3 is in rows \[0, 2\]"):
        combspec_catalogue(bad, wave=wave, visit_sigma=visit_sigma, normalize=norm)
    noname = write_combspec(tmp_path / "combined.fits", cols)
    with pytest.raises(MastarVacError, match="combined.fits.*percentile"):
        combspec_catalogue(noname, wave=wave, visit_sigma=visit_sigma, normalize=norm)
    other = write_combspec(tmp_path / "x-lsfpercent75.fits", dict(cols, WAVE=np.broadcast_to(wave * 1.001, (3, P))))
    with pytest.raises(MastarVacError, match="x-lsfpercent75.fits"):
        combspec_catalogue(other, wave=wave, visit_sigma=visit_sigma, normalize=norm)
