"""Pseudo-continuum normalization against a slow, obviously-correct reference."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from mastar_vac.normalize import (
    normalize_dask,
    normalize_spectra,
    running_median,
    running_median_reference,
    usable_pixels,
)


@pytest.mark.parametrize("window", [7, 40, 41, 400])
def test_running_median_matches_reference(window):
    rng = np.random.default_rng(window)
    x = rng.normal(5, 1, (3, 600))
    good = rng.random((3, 600)) > 0.3
    good[1, 100:400] = False  # a long masked stretch: windows with few or no good pixels
    good[2] = False
    fast = running_median(x, good, window, min_count=3)
    slow = running_median_reference(x, good, window, min_count=3)
    assert np.array_equal(np.isnan(fast), np.isnan(slow))
    np.testing.assert_allclose(fast[~np.isnan(fast)], slow[~np.isnan(slow)], rtol=0, atol=1e-12)
    assert np.isnan(fast[2]).all()


def test_masked_pixels_do_not_enter_median():
    x = np.ones((1, 500))
    good = np.ones((1, 500), bool)
    x[0, 200:300] = 1000.0  # a bad stretch, masked
    good[0, 200:300] = False
    med = running_median(x, good, 400)
    np.testing.assert_array_equal(med, 1.0)


def test_normalize_flat_and_sloped_continuum():
    wave = np.linspace(3600, 10000, 4563)
    cont = 50 + 0.01 * wave
    line = 1 - 0.5 * np.exp(-0.5 * ((wave - 6563) / 3) ** 2)
    flux = (cont * line)[None, :]
    ivar = np.full_like(flux, 4.0)
    nf, ni = normalize_spectra(flux, ivar)
    # away from the line and the edges the pseudo-continuum follows the (linear) continuum
    far = (np.abs(wave - 6563) > 200) & (np.arange(4563) > 250) & (np.arange(4563) < 4300)
    np.testing.assert_allclose(nf[0, far], 1.0, atol=2e-3)
    assert nf[0, np.argmin(np.abs(wave - 6563))] == pytest.approx(0.5, abs=0.01)
    # ivar rescaled by continuum^2: S/N per pixel preserved
    sn_before = flux * np.sqrt(ivar)
    sn_after = nf * np.sqrt(ni)
    np.testing.assert_allclose(sn_after, sn_before, rtol=1e-5)


def test_unusable_pixels_get_zero_weight_and_finite_flux():
    rng = np.random.default_rng(3)
    flux = rng.normal(10, 0.1, (2, 1000)).astype(np.float32)
    ivar = np.full_like(flux, 100.0)
    mask = np.zeros(flux.shape, np.int32)
    flux[0, 10] = np.nan
    ivar[0, 20] = 0
    mask[0, 30] = 2**16  # COSMIC
    ivar[1, :] = 0  # nothing usable
    nf, ni = normalize_spectra(flux, ivar, mask)
    assert np.isfinite(nf).all() and np.isfinite(ni).all()
    assert ni[0, 10] == ni[0, 20] == ni[0, 30] == 0
    assert (ni[0] > 0).sum() == 997
    assert (ni[1] == 0).all() and (nf[1] == 0).all()
    # mask bits can be ignored or selected
    _, ni_all = normalize_spectra(flux, ivar, mask, bad_mask_bits=0)
    assert ni_all[0, 30] > 0
    assert usable_pixels(flux, ivar, mask, bad_mask_bits=2**15)[0, 30]


def test_negative_continuum_is_not_used():
    flux = np.full((1, 800), -5.0)
    ivar = np.ones_like(flux)
    nf, ni = normalize_spectra(flux, ivar)
    assert (ni == 0).all() and np.isfinite(nf).all()


def test_dask_map_blocks_equals_numpy():
    rng = np.random.default_rng(0)
    flux = rng.normal(10, 1, (37, 1200)).astype(np.float32)
    ivar = np.ones_like(flux)
    mask = (rng.random(flux.shape) > 0.95).astype(np.int32)
    nf, ni = normalize_dask(da.from_array(flux, chunks=(10, -1)), da.from_array(ivar, chunks=(10, -1)),
                            da.from_array(mask, chunks=(10, -1)), window=100)
    assert nf.chunks == ((10, 10, 10, 7), (1200,))
    ref_f, ref_i = normalize_spectra(flux, ivar, mask, window=100)
    np.testing.assert_array_equal(nf.compute(scheduler="sync"), ref_f)
    np.testing.assert_array_equal(ni.compute(scheduler="sync"), ref_i)
    with pytest.raises(ValueError, match="single chunk"):
        normalize_dask(da.from_array(flux, chunks=(10, 600)), da.from_array(ivar, chunks=(10, 600)),
                       da.from_array(mask, chunks=(10, 600)))
