"""The batched LM fitter: agreement with curve_fit, bounds, unfittable spectra, Dask."""

from __future__ import annotations

import numpy as np
import pytest

from mastar_vac.fit import STATUS, FitConfig, fit_cube, fit_curve_fit, fit_spectra, result_columns

from .toy import toy_cube, toy_emulator, toy_labels


def _noisy(emu, labels, sn=50, seed=0):
    rng = np.random.default_rng(seed)
    m = emu.predict(labels)
    return m + rng.normal(0, 1 / sn, m.shape), np.full(m.shape, float(sn) ** 2)


def test_recovers_labels_within_errors():
    emu = toy_emulator()
    truth = toy_labels(200, seed=11)
    truth[:, 0] = np.clip(truth[:, 0], 4300, 8700)
    f, iv = _noisy(emu, truth)
    # spectra made by the emulator itself: the noise alone is the whole error
    res = fit_spectra(emu, f, iv, config=FitConfig(emulator_error=False))
    assert (res.status == STATUS["OK"]).mean() > 0.97
    z = (res.labels - truth) / res.errors
    # pulls are unit normal: the formal errors are right
    assert np.all(np.abs(np.median(np.abs(z), axis=0) - 0.674) < 0.15)
    assert np.median(res.chi2_red) == pytest.approx(1.0, abs=0.05)


def test_agrees_with_curve_fit_from_the_same_start():
    emu = toy_emulator()
    truth = toy_labels(12, seed=21)
    truth[:, 0] = np.clip(truth[:, 0], 4500, 8500)
    f, iv = _noisy(emu, truth, seed=2)
    start = truth + np.array([250.0, 0.25, 0.15])
    # the same χ² as curve_fit's: the pixel noise alone
    res = fit_spectra(emu, f, iv, starts=start, config=FitConfig(n_grid_starts=0, emulator_error=False))
    for i in range(len(truth)):
        lab, cov, chi2 = fit_curve_fit(emu, f[i], iv[i], start[i])
        err = np.sqrt(np.diag(cov))
        assert np.all(np.abs(res.labels[i] - lab) < 0.1 * err), (res.labels[i], lab, err)
        assert res.chi2[i] <= chi2 * (1 + 1e-5) + 0.05
        np.testing.assert_allclose(res.errors[i], err, rtol=0.02)


def test_staged_starts_reach_the_minimum_of_all_starts_with_fewer_iterations():
    emu = toy_emulator()
    truth = toy_labels(150, seed=13)
    f, iv = _noisy(emu, truth, seed=4)
    every = fit_spectra(emu, f, iv, config=FitConfig(emulator_error=False, n_grid_starts=3, starts="all"))
    staged = fit_spectra(emu, f, iv, config=FitConfig(emulator_error=False, n_grid_starts=3, starts="staged"))
    assert staged.n_iter.mean() < 0.6 * every.n_iter.mean()
    assert np.mean(staged.chi2 > every.chi2 + 1.0) < 0.02
    # the first stage takes each spectrum's start with the lowest χ² at its start point:
    # a far-off start given first (column 0) is passed over for the grid's
    bad = np.column_stack([np.full(len(truth), 8800.0), np.full(len(truth), 1.2), np.full(len(truth), 0.4)])
    r = fit_spectra(emu, f, iv, starts=bad, config=FitConfig(emulator_error=False, n_grid_starts=1))
    assert np.mean(r.start_index == 1) > 0.9
    # every spectrum unsettled (threshold 0): all starts run, as with "all"
    forced = fit_spectra(emu, f, iv, config=FitConfig(emulator_error=False, n_grid_starts=3, staged_min_iter=0))
    np.testing.assert_allclose(forced.chi2, every.chi2, rtol=1e-6)
    np.testing.assert_array_equal(forced.n_iter, every.n_iter)
    with pytest.raises(ValueError, match="fit.starts"):
        FitConfig(starts="best")


def test_bounds_hold_and_are_reported():
    emu = toy_emulator()
    truth = np.array([[6000.0, 3.0, -0.5]])
    f, iv = _noisy(emu, truth)
    cfg = FitConfig(bounds={"TEFF": (3000, 32000), "LOGG": (-1, 5.5), "FE_H": (-0.2, 1.0)})
    res = fit_spectra(emu, f, iv, config=cfg)
    assert res.labels[0, 2] == pytest.approx(-0.2)
    assert res.at_bound[0].tolist() == [False, False, True]
    assert res.n_iter[0] < cfg.max_iter * 3  # frozen at the bound, not creeping


def test_unfittable_spectra_are_flagged_and_do_not_disturb_the_others():
    emu = toy_emulator()
    truth = toy_labels(6, seed=4)
    truth[:, 0] = np.clip(truth[:, 0], 4500, 8500)
    f, iv = _noisy(emu, truth, seed=9)
    ref = fit_spectra(emu, f, iv)
    f2, iv2 = f.copy(), iv.copy()
    iv2[1] = 0.0  # all masked
    f2[2] = np.nan  # non-finite everywhere
    f2[3] = 5.0 + np.sin(np.arange(f.shape[1]) / 3.0)  # nothing like a star: far outside the emulator
    res = fit_spectra(emu, f2, iv2, return_model=True)
    assert res.status[1] == STATUS["NO_DATA"] and res.status[2] == STATUS["NO_DATA"]
    assert res.status[3] == STATUS["BAD_FIT"]
    for i in (1, 2, 3):
        assert np.isnan(res.labels[i]).all() and np.isnan(res.model[i]).all()
    for i in (0, 4, 5):
        # the same fit; the batch holds other spectra, so float32 sums run in another order
        assert np.all(np.abs(res.labels[i] - ref.labels[i]) < 0.01 * ref.errors[i])
        assert res.status[i] == STATUS["OK"]
        assert np.nanmax(np.abs(res.model[i] - emu.predict(res.labels[i]))) < 1e-4


def test_an_exception_inside_a_batch_is_isolated(monkeypatch):
    import mastar_vac.fit as fitmod

    emu = toy_emulator()
    truth = toy_labels(4, seed=8)
    truth[:, 0] = np.clip(truth[:, 0], 4500, 8500)
    f, iv = _noisy(emu, truth, seed=3)
    real = fitmod._fit_batch
    f[2, 2000] = 1.2345678  # a marker inside the modelled pixels: this spectrum breaks its batch

    def flaky(net, emu_, flux, w, S, *a, **k):
        if np.isclose(flux, 1.2345678).any():
            raise RuntimeError("solver exploded")
        return real(net, emu_, flux, w, S, *a, **k)

    monkeypatch.setattr(fitmod, "_fit_batch", flaky)
    res = fit_spectra(emu, f, iv)
    assert res.status.tolist() == [0, 0, STATUS["ERROR"], 0]
    assert "solver exploded" in res.messages[2]
    assert np.isfinite(res.labels[[0, 1, 3]]).all()


def test_fit_cube_on_dask_loads_the_emulator_once(tmp_path):
    from mastar_vac.emulator import save_emulator

    emu = toy_emulator()
    path = save_emulator(emu, tmp_path / "emu")
    truth = toy_labels(30, seed=12)
    truth[:, 0] = np.clip(truth[:, 0], 4500, 8500)
    f, iv = _noisy(emu, truth, seed=5)
    iv[7] = 0
    n = len(f)
    cube = toy_cube(f, iv, 8)
    ddf = fit_cube(cube, path, config=FitConfig())
    graph = dict(ddf.__dask_graph__())
    loads = [k for k in graph if "load_emulator" in str(k)]
    assert len(loads) == 1
    df = ddf.compute(scheduler="sync")
    assert list(df.columns[:4]) == ["MANGAID", "PLATE", "IFUDESIGN", "MJD"]
    assert len(df) == n and df["MANGAID"].is_unique
    assert set(result_columns(emu.label_names)) <= set(df.columns)
    assert df["STATUS"].iloc[7] == STATUS["NO_DATA"] and np.isnan(df["TEFF"].iloc[7])
    direct = fit_spectra(emu, f, iv)
    keep = np.arange(n) != 7
    # blocks of 8 vs one batch of 30: float32 sums in another order, the same minimum
    dz = np.abs(df["TEFF"].to_numpy()[keep] - direct.labels[keep, 0]) / direct.errors[keep, 0]
    assert dz.max() < 0.05


def test_fit_cube_resumes_from_block_checkpoints(tmp_path, monkeypatch):
    import mastar_vac.fit as fitmod

    emu = toy_emulator()
    truth = toy_labels(24, seed=13)
    truth[:, 0] = np.clip(truth[:, 0], 4500, 8500)
    f, iv = _noisy(emu, truth, seed=6)
    cube = toy_cube(f, iv, 8)
    parts = tmp_path / "parts"
    calls = {"n": 0}
    real = fitmod.fit_spectra

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")  # the run dies in its third block
        return real(*a, **k)

    monkeypatch.setattr(fitmod, "fit_spectra", dying)
    with pytest.raises(KeyboardInterrupt):
        fit_cube(cube, emu, parts_dir=parts).compute(scheduler="sync")
    n_done = len(list(parts.glob("rows-*.npz")))
    assert n_done == 2
    calls["n"] = -100
    df = fit_cube(cube, emu, parts_dir=parts).compute(scheduler="sync")
    assert calls["n"] == -100 + (3 - n_done)  # only the unfinished blocks were fitted again
    assert len(list(parts.glob("rows-*.npz"))) == 3
    ref = fit_cube(cube, emu).compute(scheduler="sync")
    np.testing.assert_array_equal(df["TEFF"].to_numpy(), ref["TEFF"].to_numpy())


def test_resume_never_takes_a_checkpoint_of_other_rows(tmp_path):
    """A resume with another chunking, or another cube in the same checkpoint folder,
    refits the rows instead of reusing a checkpoint made for other rows (the old
    checkpoints were found by block index and checked by row count only)."""
    emu = toy_emulator()
    truth = toy_labels(24, seed=21)
    truth[:, 0] = np.clip(truth[:, 0], 4500, 8500)
    f, iv = _noisy(emu, truth, seed=8)
    parts = tmp_path / "parts"
    ref = fit_cube(toy_cube(f, iv, 8), emu).compute(scheduler="sync")
    fit_cube(toy_cube(f, iv, 8), emu, parts_dir=parts).compute(scheduler="sync")
    # the same folder, the rows in another order, the same chunk sizes: every row count matches
    order = np.arange(24)[::-1]
    df = fit_cube(toy_cube(f[order], iv[order], 8), emu, parts_dir=parts).compute(scheduler="sync")
    # float32 fits of a different batch agree to ~0.01 K; a checkpoint of other rows is off by 1000s
    np.testing.assert_allclose(df["TEFF"].to_numpy(), ref["TEFF"].to_numpy()[order], atol=1.0)
    # rechunked (12 per block): rows 0-11 and 12-23 have no checkpoint of their own
    df = fit_cube(toy_cube(f, iv, 12), emu, parts_dir=parts).compute(scheduler="sync")
    np.testing.assert_allclose(df["TEFF"].to_numpy(), ref["TEFF"].to_numpy(), atol=1.0)
    assert (parts / "rows-000000000-000000012.npz").exists()


def test_emulator_error_downweights_pixels_the_emulator_cannot_reproduce():
    """Stars whose spectra depart from the emulator over a stretch of pixels (as cool
    stars' blue ends do on the demo) are fitted better when the emulator's measured error
    there is added to the noise, and each star ends with the error of its Teff bin: the
    bin of its best start, or, where the fit moves to another bin, that one's in a
    second fit from the first one's solution."""
    import dataclasses

    base = toy_emulator()
    P = base.n_pixels
    bump = np.zeros(P)
    bump[300:1300] = 0.08 * np.sin(np.arange(1000) / 15.0)  # structure the emulator lacks
    err = np.zeros((4, P), np.float32)
    err[0] = np.abs(bump) / 2  # all stars: a diluted version
    err[1] = np.abs(bump) + 0.01  # the cool bin (< 6000 K): where the misfit is
    emu = dataclasses.replace(base, pixel_error=err, pixel_error_edges=np.array([6000.0, 8000.0]))
    truth = toy_labels(40, seed=31)
    truth[:, 0] = np.clip(truth[:, 0], 4300, 5700)
    f, iv = _noisy(emu, truth, sn=100, seed=5)
    f = f + bump
    plain = fit_spectra(emu, f, iv, config=FitConfig(emulator_error=False))
    weighted = fit_spectra(emu, f, iv)
    d_plain = np.median(np.abs(plain.labels - truth), axis=0)
    d_weighted = np.median(np.abs(weighted.labels - truth), axis=0)
    assert np.all(d_weighted < 0.5 * d_plain), (d_plain, d_weighted)
    # the minimized χ² (emulator error included) describes the misfit; the data-only one
    # cannot fall below the plain fit's, which minimized it
    assert np.median(weighted.chi2_emu_red) < 2.0 < np.median(plain.chi2_red) <= np.median(weighted.chi2_red)
    # starts in the wrong bin (7000 K: its error row is 0, as no emulator error): the fit
    # moves to the cool bin and is fitted again there, and lands where starts in the
    # right bin (5000 K) do, at the cost of more iterations
    cfg = FitConfig(n_grid_starts=0)
    wrong = fit_spectra(emu, f, iv, config=cfg, starts=np.column_stack([np.full(40, 7000.0), truth[:, 1:]]))
    right = fit_spectra(emu, f, iv, config=cfg, starts=np.column_stack([np.full(40, 5000.0), truth[:, 1:]]))
    assert np.all(np.abs(wrong.labels - right.labels) < [3.0, 0.01, 0.005]), np.abs(wrong.labels - right.labels).max(0)
    assert np.all(np.median(np.abs(wrong.labels - truth), axis=0) < 0.5 * d_plain)
    assert wrong.n_iter.sum() > right.n_iter.sum()
    # no start at all is refused with the same message with or without the emulator error
    with pytest.raises(ValueError, match="no starting points"):
        fit_spectra(emu, f, iv, config=cfg)
    np.testing.assert_allclose(wrong.chi2_emu, right.chi2_emu, rtol=1e-4)
    # the error of the bin the star falls in is used, the all-star row where Teff is NaN
    rows = emu.pixel_error_for(np.array([5000.0, 7000.0, 9000.0, np.nan]))
    np.testing.assert_array_equal(rows, err[[1, 2, 3, 0]])


def test_chi2_is_data_noise_only_and_chi2_emu_has_the_emulator_error():
    """The paper's χ² (data noise alone) is ``chi2``; the one the fit minimized, with the
    emulator's per-pixel error variance added, is ``chi2_emu``; both go to the table."""
    import dataclasses

    base = toy_emulator()
    err = np.full((4, base.n_pixels), 0.02, np.float32)
    emu = dataclasses.replace(base, pixel_error=err, pixel_error_edges=np.array([6000.0, 8000.0]))
    truth = toy_labels(20, seed=4)
    f, iv = _noisy(emu, truth, sn=100, seed=2)
    res = fit_spectra(emu, f, iv, return_model=True)
    ok = res.status == STATUS["OK"]
    assert ok.sum() >= 15
    w = np.where(emu.pixel_mask[None, :], iv, 0.0)
    direct = (w * (f - res.model) ** 2).sum(1)
    np.testing.assert_allclose(res.chi2[ok], direct[ok], rtol=1e-3)
    direct_emu = (w / (1 + w * 0.02 ** 2) * (f - res.model) ** 2).sum(1)
    np.testing.assert_allclose(res.chi2_emu[ok], direct_emu[ok], rtol=1e-3)
    assert np.all(res.chi2_emu[ok] < res.chi2[ok])
    cols = result_columns(emu.label_names)
    from mastar_vac.fit import result_table

    table = result_table(res)
    np.testing.assert_allclose(table[ok, cols.index("CHISQ_RED")], res.chi2_red[ok])
    np.testing.assert_allclose(table[ok, cols.index("CHISQ_EMU_RED")], res.chi2_emu_red[ok])
