"""The per-visit LSF forward model: differential kernels, the torch banded operator, and
the fit with ``[fit] lsf = "forward"`` (issue 14, points 1 and 3)."""

from __future__ import annotations

import dataclasses
import functools
import json

import numpy as np
import pytest
import torch

from mastar_vac import lsf
from mastar_vac.emulator import Emulator, load_emulator, save_emulator
from mastar_vac.fit import (STATUS, FitConfig, _Band, _net_for, _normal_equations_lsf, _whiten, disp_to_pixels,
                            fit_cube, fit_curve_fit, fit_spectra, lsf_kernels)
from mastar_vac.wavegrid import mastar_wavelength

from .toy import toy_cube, toy_emulator, toy_labels

P = 4563


def _random_emulator(pixel_mask: np.ndarray | None = None, hidden: int = 16, seed: int = 0) -> Emulator:
    """An untrained network on the MaStar grid: enough for operator and Jacobian checks."""
    rng = np.random.default_rng(seed)
    L = 3
    w = {"w0": rng.normal(0, 1, (hidden, L)), "b0": rng.normal(0, 0.1, hidden),
         "w1": rng.normal(0, 0.3, (hidden, hidden)), "b1": rng.normal(0, 0.1, hidden),
         "w2": rng.normal(0, 0.05, (P, hidden)), "b2": np.ones(P)}
    return Emulator(["TEFF", "LOGG", "FE_H"], np.array([3.5, 0.0, -2.0]), np.array([4.0, 5.0, 0.5]),
                    mastar_wavelength(), w, pixel_mask=pixel_mask, log_labels=("TEFF",),
                    lsf_sigma_ref=np.full(P, 0.8))


# --- lsf.py: the differential kernel -------------------------------------------------

def test_differential_kernel_has_exact_variance_and_is_the_identity_where_the_visit_is_sharper():
    rng = np.random.default_rng(1)
    ref = rng.uniform(0.7, 1.0, 300)
    visit = np.stack([ref * rng.uniform(0.9, 1.4, 300), ref * 1.2])
    k = lsf.differential_kernel(visit, ref)
    assert k.weights.shape == (2, 300, len(k.offsets))
    np.testing.assert_allclose(k.weights.sum(-1), 1.0, rtol=1e-12)
    var = (k.weights * k.offsets**2).sum(-1)
    want = np.maximum(visit**2 - ref**2, 0.0)
    np.testing.assert_allclose(var, want, atol=2e-6)
    sharper = visit < ref
    # the model cannot be sharpened: identity kernel there, and the pixels are counted
    centre = k.weights[..., k.offsets == 0][..., 0]
    assert np.all(centre[sharper] == 1.0)
    assert k.n_sharper.tolist() == [int(sharper[0].sum()), 0] and k.n_sharper[0] > 0
    # a shorter support keeps the variance exact (the width is re-solved for it)
    kt = lsf.differential_kernel(visit, ref, kmax=lsf.band_halfwidth(float(np.sqrt(want.max())), 1e-5))
    assert len(kt.offsets) < len(k.offsets)
    np.testing.assert_allclose((kt.weights * kt.offsets**2).sum(-1), want, atol=2e-6)
    # the kernels are interpolated in σ_k² from discrete_gaussian_weights: the same to ~1e-6
    sk = np.sqrt(want)
    direct, off = lsf.discrete_gaussian_weights(sk.reshape(-1), kmax=int(k.offsets[-1]))
    assert np.abs(k.weights.reshape(direct.shape) - direct).max() < 3e-6
    # without truncation the kernel is broaden's, applied in gather form
    f = rng.normal(1, 0.1, (2, 300))
    got = lsf.apply_band(f, lsf.restrict_band(k.weights, k.offsets), k.offsets)
    for i in range(2):
        np.testing.assert_allclose(got[i], lsf.broaden(f[i], sk[i]), atol=3e-6)
    # the layout a batched operator reads: taps first, float32
    kf = lsf.differential_kernel(visit, ref, taps_first=True, dtype=np.float32)
    np.testing.assert_allclose(np.swapaxes(kf.weights, 1, 2), k.weights, atol=1e-7)


def test_reference_sigma_fill_and_units():
    rng = np.random.default_rng(2)
    s = rng.uniform(1.0, 1.5, (200, 50))
    ref = lsf.reference_sigma(s, 1.0)
    assert np.mean(s < ref) == pytest.approx(0.01, abs=0.005)
    bad = s.copy()
    bad[3, 10:20] = np.nan
    bad[4] = 0.0
    filled, n = lsf.fill_sigma(bad, ref)
    assert n[3] == 10 and n[4] == 50 and n.sum() == 60
    assert np.all(np.isfinite(filled)) and np.array_equal(filled[4], ref)
    np.testing.assert_allclose(filled[3, 10:20], np.interp(np.arange(10, 20), [9, 20], s[3, [9, 20]]))
    wave = mastar_wavelength()
    # DISP in Å → pixels of the log grid: one pixel is λ·ln10·1e-4 Å wide
    np.testing.assert_allclose(disp_to_pixels(wave * np.log(10) * 1e-4, wave), 1.0, rtol=1e-6)


# --- the torch operator ---------------------------------------------------------------

@pytest.mark.parametrize("holes", [False, True])
def test_torch_band_equals_broaden(holes):
    mask = np.zeros(P, bool)
    mask[200:4300] = True
    if holes:
        mask[1000:1040] = False  # a masked band inside the modelled range
    emu = _random_emulator(mask)
    rng = np.random.default_rng(3)
    sig = emu.lsf_sigma_ref * rng.uniform(0.95, 1.6, (5, P))
    kern = lsf_kernels(emu, sig, tol=0.0)  # the full 5σ support: broaden's kernel
    x = rng.normal(1, 0.1, (5, P))
    # the operator reads the span of the modelled pixels (0 where unmodelled, as the
    # fit's span net outputs it); compared on the modelled pixels
    span = np.where(mask, x, 0.0)[:, 200:4300]
    inside = mask[200:4300]
    got = _Band.from_kernels(kern, 1, "cpu", torch.float64).apply(torch.as_tensor(span)).numpy()[:, inside]
    # exactly the gather form with the same (float32) weights
    exact = lsf.apply_band(span, np.swapaxes(kern.weights, 1, 2), kern.offsets)[:, mask[200:4300]]
    np.testing.assert_allclose(got, exact, atol=1e-12)
    sk, _ = lsf.differential_sigma(sig, emu.lsf_sigma_ref)
    if not holes:  # the span of the modelled pixels, renormalized at its ends
        want = np.stack([lsf.broaden(x[i, mask], sk[i, mask]) for i in range(5)])
    else:  # renormalized over the modelled pixels: the hole reads nothing
        w, k = lsf.discrete_gaussian_weights(sk[:, 200:4300].reshape(-1))
        w = lsf.restrict_band(w.reshape(5, 4100, -1), k, mask[200:4300])
        want = lsf.apply_band(span, w, k)[:, mask[200:4300]]
    # float32 weights interpolated in σ_k²: broaden to ~1e-6
    np.testing.assert_allclose(got, want, atol=5e-6)
    # the numpy operator of the same kernels (curve_fit, return_model) agrees
    np.testing.assert_allclose(kern.apply(x)[:, mask], got, atol=1e-6)
    # the default support (taps ≥ 1e-5) changes the result by ~1e-5 of the flux only
    short = lsf_kernels(emu, sig)
    assert len(short.offsets) < len(kern.offsets)
    g2 = _Band.from_kernels(short, 1, "cpu", torch.float64).apply(torch.as_tensor(span)).numpy()[:, inside]
    assert np.abs(g2 - got).max() < 1e-4


def test_jacobian_through_the_operator_is_exact():
    emu = _random_emulator()
    net = _net_for(emu, "cpu", "float64", span=True)
    rng = np.random.default_rng(4)
    sig = emu.lsf_sigma_ref * rng.uniform(1.0, 1.5, (3, P))
    band = _Band.from_kernels(lsf_kernels(emu, sig), 1, "cpu", torch.float64)
    x = torch.as_tensor(rng.uniform(-0.3, 0.3, (3, 3)))
    blk = net.model_jac_block(x)
    CJ = band.apply(blk[:, 1:, :])
    h = 1e-6
    for j in range(3):
        e = torch.zeros_like(x)
        e[:, j] = h
        fd = (band.apply(net.model(x + e)) - band.apply(net.model(x - e))) / (2 * h)
        np.testing.assert_allclose(CJ[:, j].numpy(), fd.numpy(), atol=1e-7)
    # the operator is the matrix of the kernels: C·J from the dense matrix (rows C·e_i)
    S = blk.shape[2]
    D = band[torch.zeros(S, dtype=torch.int64)].apply(torch.eye(S, dtype=torch.float64))  # D[i] = C·e_i
    np.testing.assert_allclose((blk[0, 1:] @ D).numpy(), CJ[0].numpy(), atol=1e-10)
    # the fused, chunked normal equations equal the plain formulas with the broadened model
    f = torch.as_tensor(rng.normal(1, 0.05, (3, P)))
    w = torch.as_tensor(rng.uniform(100, 400, (3, P)))
    sf, bw = _whiten(f, w, band)
    chi2, g, H = _normal_equations_lsf(net, x, sf, bw)
    m = band.apply(blk[:, 0, :])
    r = f - m
    np.testing.assert_allclose(chi2.numpy(), (w * r * r).sum(1).numpy(), rtol=1e-10)
    np.testing.assert_allclose(g.numpy(), torch.einsum("blp,bp->bl", CJ, w * r).numpy(), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(H.numpy(), torch.einsum("blp,bp,bmp->blm", CJ, w, CJ).numpy(), rtol=1e-10)



def test_operator_rows_point_into_the_kernels_through_starts_and_compaction():
    """The LM's rows (a spectrum's starts, the rows left as others converge) share their
    spectrum's kernel; chunks that skip the taps a narrow kernel does not reach, and the
    whitening applied after the taps, give the per-row formulas exactly."""
    emu = _random_emulator()
    net = _net_for(emu, "cpu", "float64", span=True)
    rng = np.random.default_rng(6)
    # one visit at σ_ref (identity kernel, half-width 0), narrow and broad ones
    sig = emu.lsf_sigma_ref * np.array([1.0, 1.05, 1.5, 1.2, 1.6, 1.1])[:, None]
    kern = lsf_kernels(emu, sig)
    assert kern.half_width[0] == 0 and kern.half_width.max() == (len(kern.offsets) - 1) // 2
    assert len(set(kern.half_width.tolist())) > 2
    band = _Band.from_kernels(kern, 2, "cpu", torch.float64)  # two starts per spectrum
    x = torch.as_tensor(rng.uniform(-0.3, 0.3, (12, 3)))
    f = torch.as_tensor(rng.normal(1, 0.05, (12, net.P)))
    w = torch.as_tensor(rng.uniform(100, 400, (12, net.P)))
    keep = torch.tensor([0, 1, 3, 4, 5, 8, 9, 11])  # rows left after some converged
    sf, bw = _whiten(f, w, band)
    chi2, g, H = _normal_equations_lsf(net, x[keep], sf[keep], bw[keep])
    blk = net.model_jac_block(x[keep])
    spec = keep.numpy() // 2
    one = [_Band.from_kernels(kern.rows(np.array([i])), 1, "cpu", torch.float64) for i in spec]
    R = torch.stack([one[j].apply(blk[j:j + 1])[0] for j in range(len(spec))])  # C·[m | J] per row
    r = f[keep] - R[:, 0]
    wk = w[keep]
    np.testing.assert_allclose(chi2.numpy(), (wk * r * r).sum(1).numpy(), rtol=1e-10)
    np.testing.assert_allclose(g.numpy(), torch.einsum("blp,bp->bl", R[:, 1:], wk * r).numpy(), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(H.numpy(), torch.einsum("blp,bp,bmp->blm", R[:, 1:], wk, R[:, 1:]).numpy(),
                               rtol=1e-10)
    # and each row's operator is its spectrum's kernel in the gather form
    for j, i in enumerate(spec):
        want = lsf.apply_band(blk[j].numpy(), np.swapaxes(kern.weights[i], 0, 1), kern.offsets)
        np.testing.assert_allclose(R[j].numpy(), want, atol=1e-12)

# --- the fit --------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _forward_setup():
    """The toy emulator with a reference LSF, and spectra observed at broader visit LSFs:
    broaden(emulator(labels), σ_k) plus noise at S/N 100."""
    emu = dataclasses.replace(toy_emulator(), lsf_sigma_ref=np.full(P, 0.9))
    truth = toy_labels(40, seed=31)
    truth[:, 0] = np.clip(truth[:, 0], 4500, 8500)
    rng = np.random.default_rng(5)
    factor = rng.uniform(1.3, 1.8, len(truth))  # broad visits: the ignore fit is pushed
    sig = emu.lsf_sigma_ref[None, :] * factor[:, None] * (1 + 0.1 * np.sin(np.arange(P) / 700))[None, :]
    sk, _ = lsf.differential_sigma(sig, emu.lsf_sigma_ref)
    model = emu.predict(truth)
    obs = np.stack([lsf.broaden(model[i], sk[i]) for i in range(len(truth))])
    flux = obs + rng.normal(0, 0.01, obs.shape)
    return emu, truth, sig, flux, np.full(flux.shape, 1e4)


def test_forward_fit_recovers_the_labels_and_ignore_is_biased():
    emu, truth, sig, flux, ivar = _forward_setup()
    cfg = FitConfig(emulator_error=False)
    fwd = fit_spectra(emu, flux, ivar, config=dataclasses.replace(cfg, lsf="forward"), lsf_sigma=sig,
                      return_model=True)
    ign = fit_spectra(emu, flux, ivar, config=cfg, lsf_sigma=sig)
    assert (fwd.status == STATUS["OK"]).mean() > 0.95
    z = (fwd.labels - truth) / fwd.errors
    assert np.all(np.median(np.abs(z), axis=0) < 1.0)  # unit-normal pulls: median |z| 0.67
    assert np.median(fwd.chi2_red) == pytest.approx(1.0, abs=0.05)
    # the returned model is the broadened one: the residuals are the noise
    resid = (flux - fwd.model)[:, emu.pixel_mask]
    assert np.std(resid) == pytest.approx(0.01, rel=0.05)
    # ignoring the LSF explains the shallower lines with the labels: biased, worse χ²
    bias_ign = np.median(ign.labels - truth, axis=0)
    bias_fwd = np.median(fwd.labels - truth, axis=0)
    assert abs(bias_ign[2]) > 5 * max(abs(bias_fwd[2]), np.median(fwd.errors[:, 2]))
    assert np.median(ign.chi2_red) > np.median(fwd.chi2_red) + 0.03


def test_ignore_is_todays_fit_and_the_identity_kernel_changes_nothing():
    emu, truth, sig, flux, ivar = _forward_setup()
    cfg = FitConfig(emulator_error=False)
    a = fit_spectra(emu, flux[:8], ivar[:8], config=cfg)
    b = fit_spectra(emu, flux[:8], ivar[:8], config=cfg, lsf_sigma=sig[:8])  # "ignore": σ unused
    np.testing.assert_array_equal(a.labels, b.labels)
    # visits exactly at σ_ref: the forward model is the emulator's spectrum itself
    same = np.broadcast_to(emu.lsf_sigma_ref, (8, P))
    c = fit_spectra(emu, flux[:8], ivar[:8], config=dataclasses.replace(cfg, lsf="forward"), lsf_sigma=same)
    assert np.all(np.abs(c.labels - a.labels) < 0.01 * a.errors)


def test_batched_forward_fit_agrees_with_curve_fit_on_the_same_model():
    emu, truth, sig, flux, ivar = _forward_setup()
    cfg = FitConfig(n_grid_starts=0, emulator_error=False, lsf="forward")
    idx = np.arange(6)
    start = truth[idx] + np.array([250.0, 0.25, 0.15])
    res = fit_spectra(emu, flux[idx], ivar[idx], starts=start, config=cfg, lsf_sigma=sig[idx])
    for i in idx:
        lab, cov, chi2 = fit_curve_fit(emu, flux[i], ivar[i], start[i], config=cfg, lsf_sigma=sig[i],
                                       analytic_jacobian=True)
        err = np.sqrt(np.diag(cov))
        assert np.all(np.abs(res.labels[i] - lab) < 0.1 * err), (res.labels[i], lab, err)
        assert res.chi2[i] <= chi2 * (1 + 1e-5) + 0.05
        np.testing.assert_allclose(res.errors[i], err, rtol=0.02)


def test_forward_without_a_reference_lsf_or_visit_lsf_is_a_clear_error(tmp_path):
    emu = toy_emulator()  # records no lsf_sigma_ref
    f = np.ones((2, P))
    iv = np.full((2, P), 1e4)
    cfg = FitConfig(lsf="forward")
    with pytest.raises(ValueError, match=rf"emulator {emu.content_hash()[:12]}.*records none \(lsf_sigma_ref\)"):
        fit_spectra(emu, f, iv, config=cfg, lsf_sigma=np.ones((2, P)))
    with pytest.raises(ValueError, match="records none"):
        fit_curve_fit(emu, f[0], iv[0], np.array([6000.0, 3.0, 0.0]), config=cfg, lsf_sigma=np.ones(P))
    with pytest.raises(ValueError, match="records none"):
        fit_cube(toy_cube(f, iv, 2), emu, config=cfg)
    ref = dataclasses.replace(emu, lsf_sigma_ref=np.full(P, 0.9))
    with pytest.raises(ValueError, match="needs each spectrum's LSF"):
        fit_spectra(ref, f, iv, config=cfg)
    with pytest.raises(ValueError, match="'disp' variable"):
        fit_cube(toy_cube(f, iv, 2), ref, config=cfg)


def test_config_refuses_other_lsf_values(tmp_path):
    from mastar_vac.config import load_config
    from mastar_vac.errors import ConfigError

    assert FitConfig().lsf == "ignore"
    with pytest.raises(ValueError, match="fit.lsf"):
        FitConfig(lsf="gaussian")
    p = tmp_path / "c.toml"
    p.write_text("[inputs]\ndemo = true\n[fit]\nlsf = 'gaussian'\n")
    with pytest.raises(ConfigError, match="fit.lsf: expected one of"):
        load_config(p)
    p.write_text("[inputs]\ndemo = true\n[fit]\nlsf = 'forward'\n")
    assert load_config(p).fit.lsf == "forward"


def test_reference_lsf_is_saved_loaded_and_hashed(tmp_path):
    emu = _random_emulator()
    plain = dataclasses.replace(emu, lsf_sigma_ref=None)
    assert emu.content_hash() != plain.content_hash()
    back = load_emulator(save_emulator(emu, tmp_path / "e"))
    np.testing.assert_array_equal(back.lsf_sigma_ref, emu.lsf_sigma_ref)
    assert back.content_hash() == emu.content_hash()
    assert load_emulator(save_emulator(plain, tmp_path / "p")).lsf_sigma_ref is None
    other = dataclasses.replace(emu, lsf_sigma_ref=emu.lsf_sigma_ref * 1.01)
    assert other.content_hash() != emu.content_hash()
    # a σ_ref edited in the metadata's place is caught by the recorded content hash
    meta = json.loads((tmp_path / "e" / "emulator.json").read_text())
    meta["content_hash"] = other.content_hash()
    (tmp_path / "e" / "emulator.json").write_text(json.dumps(meta))
    from mastar_vac.errors import ArtifactError

    with pytest.raises(ArtifactError, match="content hash"):
        load_emulator(tmp_path / "e")


def test_fit_cube_passes_the_visits_disp_in_pixels():
    emu, truth, sig, flux, ivar = _forward_setup()
    n = 10
    wave = emu.wave
    disp_aa = (sig[:n] * wave * np.log(10) * 1e-4).astype(np.float32)  # DISP: σ in Å, as the cube holds it
    cube = toy_cube(flux[:n], ivar[:n], 4)
    cube["disp"] = (("visit", "wave"), disp_aa)
    cube = cube.chunk({"visit": 4})
    cfg = FitConfig(emulator_error=False, lsf="forward")
    df = fit_cube(cube, emu, config=cfg).compute(scheduler="sync")
    direct = fit_spectra(emu, flux[:n], ivar[:n], config=cfg, lsf_sigma=disp_to_pixels(disp_aa, wave))
    dz = np.abs(df["FE_H"].to_numpy() - direct.labels[:, 2]) / direct.errors[:, 2]
    assert dz.max() < 0.05
    ign = fit_cube(cube, emu, config=dataclasses.replace(cfg, lsf="ignore")).compute(scheduler="sync")
    assert np.median(np.abs(ign["FE_H"].to_numpy() - df["FE_H"].to_numpy())) > 3 * np.median(direct.errors[:, 2])


def test_vac_header_records_the_lsf_mode(tmp_path):
    from astropy.io import fits

    from mastar_vac.config import Config
    from mastar_vac.io.vac import write_vac_fits

    from .test_vac import make_vac_frame

    df = make_vac_frame(3)
    cfg = Config().replace("fit", lsf="forward").to_dict()
    p = write_vac_fits(tmp_path / "v.fits", df, provenance={"config": cfg}, flag_bits=[],
                       fitted_labels=["TEFF", "LOGG", "FEH"])
    q = write_vac_fits(tmp_path / "w.fits", df, provenance={"config": Config().to_dict()}, flag_bits=[],
                       fitted_labels=["TEFF", "LOGG", "FEH"])
    with fits.open(p) as a, fits.open(q) as b:
        assert a[0].header["LSFMODE"] == "forward" and a[1].header["LSFMODE"] == "forward"
        assert b[0].header["LSFMODE"] == "ignore"
        assert json.loads(a[0].header["CONFIG"])["fit"]["lsf"] == "forward"


# --- training through the operator (issue 14, point 2) --------------------------------

def _lsf_training_set(n: int = 240, P: int = 300, seed: int = 3):
    """Spectra of one label t ∈ [0, 1]: lines whose depth grows with t, given at a
    reference LSF of 0.7 px (the "sharp" truth) and observed broadened by a differential
    kernel of σ_k up to 1.2 px (σ_visit from 1 to 2 × σ_ref, per spectrum)."""
    rng = np.random.default_rng(seed)
    wave = mastar_wavelength()[1000:1000 + P]
    ref = np.full(P, 0.7)
    x = np.arange(P)
    centres = np.arange(25, P - 25, 17)
    t = rng.uniform(0, 1, n)

    def sharp(tt):
        prof = np.exp(-0.5 * ((x[None, :] - centres[:, None]) / 0.7) ** 2).sum(0)
        return 1.0 - (0.15 + 0.5 * np.asarray(tt)[:, None]) * prof[None, :]

    f = rng.uniform(1.0, 2.0, n)
    sig = f[:, None] * ref[None, :]
    sk = np.sqrt(sig**2 - ref**2)
    obs = np.stack([lsf.broaden(s, k) for s, k in zip(sharp(t), sk)])
    return wave, ref, t[:, None], sharp, sig, obs


def test_training_through_the_lsf_operator_learns_the_sharp_spectrum():
    from mastar_vac.emulator import TrainConfig, train_emulator

    wave, ref, t, sharp, sig, obs = _lsf_training_set()
    ivar = np.full(obs.shape, 1e4, np.float32)
    cfg = TrainConfig(labels=("X",), hidden=32, log_labels=(), batch_size=32, lr_schedule="cosine",
                      cosine_epochs=300, edge_pixels=5, error_floor=0.01, pixel_error_teff_edges=(), seed=1)
    split = {"train": np.arange(200), "test": np.arange(200, 240), "validation": np.array([], np.int64)}
    kw = dict(label_names=["X"], wave=wave, config=cfg, split=split, progress=False)
    fwd = train_emulator(t, obs, ivar, lsf_sigma=sig, lsf_sigma_ref=ref, **kw).emulator
    plain = train_emulator(t, obs, ivar, **kw).emulator
    np.testing.assert_array_equal(fwd.lsf_sigma_ref, ref)  # the artifact records σ_ref
    assert plain.lsf_sigma_ref is None
    te = split["test"]
    m = fwd.pixel_mask
    # broadened to each held-out spectrum's own LSF, the forward emulator reproduces it;
    # the plain one can only give one compromise resolution for all of them
    r_fwd = np.abs(fwd.predict(t[te], sig[te]) - obs[te])[:, m]
    r_plain = np.abs(plain.predict(t[te]) - obs[te])[:, m]
    assert np.median(r_fwd.max(1)) < 0.5 * np.median(r_plain.max(1)), (r_fwd.max(1).mean(), r_plain.max(1).mean())
    # and its own output is the spectrum at σ_ref: sharper than any spectrum it saw
    truth = sharp(t[te, 0])
    assert np.abs(fwd.predict(t[te]) - truth)[:, m].max(1).mean() < 0.5 * np.abs(obs[te] - truth)[:, m].max(1).mean()
    # the emulator error table is measured against the broadened model too
    assert fwd.pixel_error[0][m].mean() < plain.pixel_error[0][m].mean()
    # the plain emulator's output has no definite LSF: it cannot be broadened to a visit's
    with pytest.raises(ValueError, match="no reference LSF"):
        plain.predict(t[te], sig[te])
    with pytest.raises(ValueError, match="lsf_sigma_ref"):
        train_emulator(t, obs, ivar, lsf_sigma=sig, **kw)


def test_coadd_lsf_is_the_weighted_second_moment_and_reference_lsf_a_low_percentile():
    from mastar_vac.reference import coadd_lsf, reference_lsf

    wave = mastar_wavelength()
    px = wave * np.gradient(np.log(wave))  # Å per pixel
    disp = np.stack([1.0 * px, 2.0 * px, 3.0 * px])  # σ = 1, 2, 3 pixels
    ivar = np.stack([np.full(P, 1.0), np.full(P, 3.0), np.zeros(P)])
    ivar[0, :10] = 0.0  # no weight anywhere in the first 10 pixels of star 0: the plain mean
    ivar[1, :10] = 0.0
    s = coadd_lsf(disp, ivar, np.array([0, 0, 1]), 2, wave)
    np.testing.assert_allclose(s[0, 10:], np.sqrt((1 * 1 + 3 * 4) / 4), rtol=1e-6)
    np.testing.assert_allclose(s[0, :10], np.sqrt((1 + 4) / 2), rtol=1e-6)
    np.testing.assert_allclose(s[1], 3.0, rtol=1e-6)  # a star with no weight at all: its visit's σ
    assert np.isnan(coadd_lsf(None, ivar, np.array([0, 0, 1]), 2, wave)).all()
    rng = np.random.default_rng(0)
    d = px[None, :] * rng.uniform(0.8, 1.2, (500, 1))
    d[:, 100] = np.nan  # no usable DISP at one pixel: interpolated
    r = reference_lsf(d, wave, percentile=1.0)
    assert np.isfinite(r).all() and 0.8 <= r.min() and r.max() < 0.82
    with pytest.raises(ValueError, match="no visit has a usable DISP"):
        reference_lsf(np.zeros((3, P)), wave)


def test_reference_set_keeps_the_lsf_through_save_subset_and_concat(tmp_path):
    from mastar_vac.reference import ReferenceSet

    wave = mastar_wavelength()[:50]
    n = 4

    def make(src: str, with_lsf: bool = True) -> ReferenceSet:
        return ReferenceSet(["TEFF"], np.full((n, 1), 5000.0), np.ones((n, 50), np.float32),
                            np.ones((n, 50), np.float32), wave, np.array([f"{src}{i}" for i in range(n)]),
                            np.full(n, src), np.ones(n, np.int64), np.full(n, 50.0),
                            lsf_sigma=(np.arange(n * 50, dtype=np.float32).reshape(n, 50) if with_lsf
                                       else np.zeros((0, 0), np.float32)),
                            lsf_sigma_ref=np.full(50, 0.7) if src == "empirical" else np.zeros(0))

    a = make("empirical")
    back = ReferenceSet.load(a.save(tmp_path / "r.npz"))
    np.testing.assert_array_equal(back.lsf_sigma, a.lsf_sigma)
    np.testing.assert_array_equal(back.lsf_sigma_ref, a.lsf_sigma_ref)
    np.testing.assert_array_equal(a.subset(np.array([2, 0])).lsf_sigma, a.lsf_sigma[[2, 0]])
    both = a.concat(make("synthetic"))
    assert both.has_lsf and len(both.lsf_sigma) == 2 * n and len(both.lsf_sigma_ref) == 50
    assert not a.concat(make("synthetic", with_lsf=False)).has_lsf  # not half-known


def test_training_operator_matches_the_fit_operator_and_has_exact_gradients():
    from mastar_vac.emulator import broaden_band_torch

    rng = np.random.default_rng(0)
    n_pix = 200
    mask = np.ones(n_pix, bool)
    mask[:7] = mask[90:95] = mask[-4:] = False  # unmodelled ends and a gap: the rel mapping
    k = lsf.band_kernels(rng.uniform(0.8, 1.6, (3, n_pix)), np.full(n_pix, 0.7), mask)
    pix = np.flatnonzero(mask)
    y = torch.tensor(rng.normal(size=(3, len(pix))), requires_grad=True)
    w = torch.tensor(k.weights, dtype=torch.float64)
    rel = torch.tensor(k.rel)
    full = np.zeros((3, n_pix))
    full[:, pix] = y.detach().numpy()
    out = broaden_band_torch(y, w, k.offsets, rel)
    np.testing.assert_allclose(out.detach().numpy(), k.apply(full)[:, pix], atol=1e-14)
    # the backward pass is the operator's exact adjoint
    assert torch.autograd.gradcheck(lambda yy: broaden_band_torch(yy, w, k.offsets, rel), (y,))


def test_a_visit_at_sigma_ref_but_for_float32_rounding_is_at_sigma_ref():
    """Synthetic spectra made at σ_ref record it in float32: no kernel, none 'sharper'."""
    ref = np.linspace(0.6, 1.3, P)
    sig = np.stack([ref.astype(np.float32), ref * 1.2]).astype(np.float64)
    k = lsf.band_kernels(sig[:1], ref, np.ones(P, bool))
    assert len(k.offsets) == 1 and (k.weights == 1).all() and k.n_sharper[0] == 0
    k2 = lsf.band_kernels(sig, ref, np.ones(P, bool))
    assert k2.n_sharper.tolist() == [0, 0] and len(k2.offsets) > 1
    np.testing.assert_array_equal(k2.weights[0, k2.offsets == 0], 1.0)
