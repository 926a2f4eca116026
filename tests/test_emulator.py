"""The emulator: training behaviour, the saved artifact, tampering, The Payne's npz."""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest
import torch

from mastar_vac.emulator import (
    Emulator,
    TrainConfig,
    export_payne_npz,
    import_payne_npz,
    load_emulator,
    loss_weights,
    measure_pixel_error,
    save_emulator,
    split_indices,
    train_emulator,
    training_loss,
)
from mastar_vac.errors import ArtifactError
from mastar_vac.wavegrid import mastar_wavelength

from .toy import LABELS, toy_emulator, toy_labels, toy_spectra


def test_split_is_seeded_disjoint_and_80_10_10():
    s = split_indices(1000, seed=3)
    assert {k: len(v) for k, v in s.items()} == {"validation": 100, "test": 100, "train": 800}
    allidx = np.concatenate(list(s.values()))
    assert len(np.unique(allidx)) == 1000
    s2 = split_indices(1000, seed=3)
    assert all(np.array_equal(s[k], s2[k]) for k in s)
    assert not np.array_equal(split_indices(1000, seed=4)["validation"], s["validation"])


def test_trained_emulator_reproduces_unseen_spectra():
    emu = toy_emulator()
    lab = toy_labels(50, seed=99)  # never seen
    err = np.abs(emu.predict(lab) - toy_spectra(lab))
    assert np.mean(err < 0.02) > 0.95
    # numpy and torch forward passes agree
    with torch.no_grad():
        t = emu.torch_module()(torch.as_tensor(emu.scale(lab), dtype=torch.float32)).numpy()
    np.testing.assert_allclose(t, emu.predict(lab), atol=1e-4)


def test_training_is_reproducible_and_ignores_masked_pixels():
    lab = toy_labels(200, seed=5)
    flux = toy_spectra(lab)
    ivar = np.full_like(flux, 1e4)
    ivar[:, :100] = 0
    flux[:, :100] = 1e6  # garbage where ivar = 0 must not matter
    cfg = TrainConfig(hidden=16, max_epochs=15, patience=100, seed=7, edge_pixels=0)
    a = train_emulator(lab, flux, ivar, label_names=LABELS, wave=mastar_wavelength(), config=cfg, progress=False)
    b = train_emulator(lab, flux, ivar, label_names=LABELS, wave=mastar_wavelength(), config=cfg, progress=False)
    assert a.emulator.content_hash() == b.emulator.content_hash()
    assert not a.emulator.pixel_mask[:100].any() and a.emulator.pixel_mask[100:].all()
    # with edge masking, the first and last 40 *covered* pixels are left out as well
    e = train_emulator(lab, flux, ivar, label_names=LABELS, wave=mastar_wavelength(),
                       config=TrainConfig(hidden=16, max_epochs=2, seed=7, edge_pixels=40), progress=False)
    pm = e.emulator.pixel_mask
    assert not pm[:140].any() and pm[140:-40].all() and not pm[-40:].any()
    assert np.all(np.abs(a.emulator.predict(lab[:3])[:, 100:]) < 10)
    assert set(a.split) == {"train", "test", "validation"}


def test_cosine_schedule_runs_its_length_and_keeps_the_best_state():
    lab = toy_labels(300, seed=5)
    flux, ivar = toy_spectra(lab), np.full((300, len(mastar_wavelength())), 1e4)
    cfg = TrainConfig(hidden=32, lr_schedule="cosine", cosine_epochs=40, patience=1, seed=3)
    r = train_emulator(lab, flux, ivar, label_names=LABELS, wave=mastar_wavelength(), config=cfg, progress=False)
    # the schedule decides the length (patience does not stop it) and the rate falls to 1/100
    assert r.epochs == 40 and len(r.history["lr"]) == 40
    assert r.history["lr"][0] == pytest.approx(cfg.learning_rate)
    assert r.history["lr"][-1] < cfg.learning_rate / 50
    assert r.emulator.metrics["best_test_loss"] == pytest.approx(min(r.history["test"]))
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="step")



def test_weight_average_keeps_the_averaged_weights_and_generalizes_better(caplog):
    """With ema_decay the emulator kept is the moving average of the weights, which on
    noisy spectra and a fast learning rate is closer to the noiseless truth on stars it
    never saw than the last weights are."""
    lab = toy_labels(300, seed=5)
    clean = toy_spectra(lab)
    flux = clean + np.random.default_rng(1).normal(0, 0.05, clean.shape)
    ivar = np.full_like(flux, 400.0)
    cfg = TrainConfig(hidden=32, max_epochs=60, patience=200, seed=3, learning_rate=1e-2, batch_size=32)
    rms = {}
    for decay in (0.0, 0.98):
        r = train_emulator(lab, flux, ivar, label_names=LABELS, wave=mastar_wavelength(),
                           config=dataclasses.replace(cfg, ema_decay=decay), progress=False)
        v = r.split["validation"]
        err = (r.emulator.predict(lab[v]) - clean[v])[:, r.emulator.pixel_mask]
        rms[decay] = float(np.sqrt((err**2).mean()))
        assert r.emulator.config["ema_decay"] == decay
        assert r.emulator.metrics["averaged_weights"] == (decay > 0)
    assert rms[0.98] < 0.95 * rms[0.0], rms
    # a training too short for the average: said, not silently kept
    with caplog.at_level(logging.WARNING, logger="mastar_vac.emulator"):
        train_emulator(lab, flux, ivar, label_names=LABELS, wave=mastar_wavelength(),
                       config=dataclasses.replace(cfg, max_epochs=3, ema_decay=0.999), progress=False)
    assert "ema_decay = 0.999 averages over ~1000 optimizer steps" in caplog.text
    with pytest.raises(ValueError, match="ema_decay"):
        TrainConfig(ema_decay=1.0)

def test_warm_start_begins_where_the_first_emulator_ended():
    lab = toy_labels(400, seed=6)
    flux, ivar = toy_spectra(lab), np.full((400, len(mastar_wavelength())), 1e4)
    cfg = TrainConfig(hidden=32, lr_schedule="cosine", cosine_epochs=60, warm_fraction=0.25, seed=4)
    wave = mastar_wavelength()
    first = train_emulator(lab, flux, ivar, label_names=LABELS, wave=wave, config=cfg, progress=False)
    keep = np.arange(20, 400)  # a few stars fewer, as after the label-outlier cut
    split = {k: v[v >= 20] - 20 for k, v in first.split.items()}
    warm = train_emulator(lab[keep], flux[keep], ivar[keep], label_names=LABELS, wave=wave, config=cfg,
                          split=split, init=first.emulator, progress=False)
    cold = train_emulator(lab[keep], flux[keep], ivar[keep], label_names=LABELS, wave=wave,
                          config=dataclasses.replace(cfg, cosine_epochs=15), split=split, progress=False)
    assert warm.epochs == 15 and warm.emulator.metrics["warm_start"]
    # the same label scaling as the first, so its weights mean the same
    np.testing.assert_array_equal(warm.emulator.x_min, first.emulator.x_min)
    # its first epoch is already about as good as the first emulator's end; a cold start
    # of the same length is far worse
    assert warm.history["test"][0] < 3 * first.emulator.metrics["best_test_loss"]
    assert warm.emulator.metrics["best_test_loss"] < 0.5 * cold.emulator.metrics["best_test_loss"]
    with pytest.raises(ValueError, match="warm start"):
        train_emulator(lab, flux, ivar, label_names=LABELS, wave=wave, config=dataclasses.replace(cfg, hidden=16),
                       init=first.emulator, progress=False)


def test_unmodelled_pixels_predict_the_mean_spectrum():
    """The network is trained on the modelled pixels only; elsewhere it returns the
    training set's mean spectrum (zero weights), not what an untrained layer gives."""
    lab = toy_labels(200, seed=5)
    flux = toy_spectra(lab)
    ivar = np.full_like(flux, 1e4)
    r = train_emulator(lab, flux, ivar, label_names=LABELS, wave=mastar_wavelength(),
                       config=TrainConfig(hidden=16, max_epochs=3, seed=7, edge_pixels=30), progress=False)
    emu = r.emulator
    out = ~emu.pixel_mask
    assert out.sum() == 60
    assert np.all(emu.weights["w2"][out] == 0)
    pred = emu.predict(lab[:5])
    np.testing.assert_allclose(pred[:, out], np.broadcast_to(flux[r.split["train"]].mean(0)[out], (5, 60)), atol=1e-5)


def test_loss_weights():
    w = loss_weights(np.array([[0.0, 1e4, 1e12]]), 0.01)
    assert w[0, 0] == 0 and w[0, 1] == pytest.approx(0.5) and w[0, 2] == pytest.approx(1.0, rel=1e-6)


def test_save_load_round_trip(tmp_path):
    emu = toy_emulator()
    d = save_emulator(emu, tmp_path / "emu")
    back = load_emulator(d, expected_hash=emu.content_hash())
    assert back.content_hash() == emu.content_hash()
    assert back.label_names == LABELS and back.activation == emu.activation
    np.testing.assert_array_equal(back.predict(toy_labels(3)), emu.predict(toy_labels(3)))
    assert not any(p.suffix in (".pkl", ".pt", ".pickle") for p in d.iterdir())


def test_tampered_weights_are_refused(tmp_path):
    d = save_emulator(toy_emulator(), tmp_path / "emu")
    wfile = d / "weights.safetensors"
    raw = bytearray(wfile.read_bytes())
    raw[-10] ^= 0xFF
    wfile.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="SHA-256"):
        load_emulator(d)


def test_edited_metadata_is_refused(tmp_path):
    d = save_emulator(toy_emulator(), tmp_path / "emu")
    meta = json.loads((d / "emulator.json").read_text())
    meta["label_names"] = ["LOGG", "TEFF", "FE_H"]  # swapped: would silently mislabel
    (d / "emulator.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="content hash"):
        load_emulator(d)
    with pytest.raises(ArtifactError, match="not the expected"):
        load_emulator(save_emulator(toy_emulator(), tmp_path / "e2"), expected_hash="0" * 64)
    with pytest.raises(ArtifactError, match="not an emulator artifact"):
        load_emulator(tmp_path)


def test_log_teff_scaling_round_trips():
    emu = toy_emulator()
    assert emu.log_labels == ("TEFF",)
    lab = toy_labels(5)
    np.testing.assert_allclose(emu.unscale(emu.scale(lab)), lab, rtol=1e-12)
    # the chain-rule factor of the covariance equals a finite difference
    x = emu.scale(lab)
    h = 1e-6
    fd = (emu.unscale(x + h) - emu.unscale(x - h)) / (2 * h)
    np.testing.assert_allclose(emu.dlabel_dscaled(x), fd, rtol=1e-6)


def test_shape_mismatch_is_refused():
    emu = toy_emulator()
    w = dict(emu.weights)
    w["w2"] = w["w2"][:-1]
    with pytest.raises(ArtifactError, match="w2 has shape"):
        Emulator(LABELS, emu.x_min, emu.x_max, emu.wave, w)


def test_payne_npz_round_trip(tmp_path):
    with pytest.raises(ArtifactError, match="log-scaled"):
        export_payne_npz(toy_emulator(), tmp_path / "x.npz")
    emu = dataclasses.replace(toy_emulator(), log_labels=())  # the layout knows linear scaling only
    p = export_payne_npz(emu, tmp_path / "NN_normalized_spectra.npz")
    with np.load(p) as z:
        assert set(z.files) == {"w_array_0", "b_array_0", "w_array_1", "b_array_1", "w_array_2", "b_array_2",
                                "x_min", "x_max"}
        assert z["w_array_2"].shape == (emu.n_pixels, emu.n_hidden)
    back = import_payne_npz(p, label_names=LABELS, wave=emu.wave, activation=emu.activation)
    np.testing.assert_allclose(back.predict(toy_labels(4)), emu.predict(toy_labels(4)), rtol=1e-12)
    # The Payne's own forward pass (LeakyReLU layout) on the same weights
    lab = toy_labels(2)
    leaky = import_payne_npz(p, label_names=LABELS, wave=emu.wave)  # default activation: LeakyReLU
    with np.load(p) as z:
        x = (lab - z["x_min"]) / (z["x_max"] - z["x_min"]) - 0.5
        h = x @ z["w_array_0"].T + z["b_array_0"]
        h = np.where(h > 0, h, 0.01 * h)
        h = h @ z["w_array_1"].T + z["b_array_1"]
        h = np.where(h > 0, h, 0.01 * h)
        ref = h @ z["w_array_2"].T + z["b_array_2"]
    np.testing.assert_allclose(leaky.predict(lab), ref, rtol=1e-5, atol=1e-6)
    bad = tmp_path / "bad.npz"
    np.savez(bad, w_array_0=np.zeros(3))
    with pytest.raises(ArtifactError, match="missing"):
        import_payne_npz(bad, label_names=LABELS, wave=emu.wave)


def test_pixel_error_is_measured_per_teff_bin_without_the_noise():
    emu = toy_emulator()
    lab = toy_labels(300, seed=8)
    m = emu.predict(lab)
    rng = np.random.default_rng(2)
    sigma = 0.02
    flux = m + rng.normal(0, sigma, m.shape)
    hot = lab[:, 0] >= 6500
    flux[np.ix_(hot, np.arange(1000, 1100))] += 0.05  # the emulator misses this for hot stars
    ivar = np.full_like(flux, sigma**-2)
    ivar[:, 2000:2010] = 0  # no data: the all-star row stands in (here 0 too)
    err = measure_pixel_error(emu, lab, flux, ivar, teff_edges=(6500.0,))
    assert err.shape == (3, emu.n_pixels) and err.dtype == np.float32
    modelled = emu.pixel_mask
    quiet = modelled.copy()
    quiet[1000:1100] = False
    # the noise (2%) is taken out: what is left of it is a small fraction of σ
    assert np.median(err[:, quiet]) < 0.3 * sigma
    assert np.median(err[2, 1000:1100]) == pytest.approx(0.05, rel=0.15)  # hot bin
    assert np.median(err[1, 1000:1100]) < 0.3 * sigma  # cool bin: nothing missed
    assert 0.2 < np.median(err[0, 1000:1100]) / 0.05 < 0.9  # all stars: diluted
    # a bin with too few stars falls back to the all-star row
    assert 0 < (lab[:, 0] >= 8990).sum() < 5
    sparse = measure_pixel_error(emu, lab, flux, ivar, teff_edges=(8990.0,))
    np.testing.assert_array_equal(sparse[2], sparse[0])


def test_trained_emulator_carries_its_error_and_the_artifact_keeps_it(tmp_path):
    emu = toy_emulator()
    assert emu.pixel_error is not None and emu.pixel_error.shape == (4, emu.n_pixels)
    np.testing.assert_array_equal(emu.pixel_error_edges, [5000.0, 8000.0])
    d = save_emulator(emu, tmp_path / "emu")
    back = load_emulator(d, expected_hash=emu.content_hash())
    np.testing.assert_array_equal(back.pixel_error, emu.pixel_error)
    # the error table is part of the content hash
    other = dataclasses.replace(emu, pixel_error=emu.pixel_error * 2)
    assert other.content_hash() != emu.content_hash()
    with pytest.raises(ArtifactError, match="pixel error table has shape"):
        dataclasses.replace(emu, pixel_error=emu.pixel_error[:2])


def test_huber_loss_is_the_weighted_mse_near_the_model_and_linear_beyond():
    w = torch.tensor([[0.5, 0.5, 0.5, 0.0]])  # σ = floor for the first three pixels, last one masked
    flux = torch.zeros(1, 4)
    floor = 0.01
    near = torch.tensor([[0.001, -0.002, 0.0, 9.0]])  # |z| < 1: both losses agree, masked pixel ignored
    mse = training_loss(near, flux, w, error_floor=floor)
    assert float(mse) == pytest.approx(float((w * near**2).sum() / w.sum()))
    assert float(training_loss(near, flux, w, error_floor=floor, kind="huber", delta=1.0)) == pytest.approx(float(mse))
    # far off (z = 0.5/0.01·√0.5 ≈ 35): the Huber gradient is bounded by delta, the MSE one is not
    far = torch.tensor([[0.5, 0.0, 0.0, 0.0]], requires_grad=True)
    training_loss(far, flux, w, error_floor=floor, kind="huber", delta=1.0).backward()
    g_huber = float(far.grad[0, 0])
    far.grad = None
    training_loss(far, flux, w, error_floor=floor).backward()
    z = 0.5 * np.sqrt(0.5) / floor
    assert float(far.grad[0, 0]) / g_huber == pytest.approx(z, rel=1e-4)
    # and its value there is floor²·(2·delta·z − delta²) / Σw
    huber_far = training_loss(far.detach(), flux, w, error_floor=floor, kind="huber", delta=1.0)
    assert float(huber_far) == pytest.approx(floor**2 * (2 * z - 1) / 1.5, rel=1e-5)
    with pytest.raises(ValueError, match="unknown loss"):
        training_loss(near, flux, w, error_floor=floor, kind="l3")


def test_huber_training_resists_stars_with_wrong_labels():
    # 15% of the training stars carry the labels of other stars (as some catalogue
    # labels are wrong); the robust loss keeps the emulator closer to the true spectra
    wave = mastar_wavelength()[::4]  # a quarter of the pixels keeps the test quick
    lab = toy_labels(600, seed=11)
    flux = toy_spectra(lab, wave)
    ivar = np.full_like(flux, 1e4)
    rng = np.random.default_rng(3)
    wrong = rng.choice(600, 90, replace=False)
    bad_labels = lab.copy()
    bad_labels[wrong] = lab[rng.permutation(wrong)]
    unseen = toy_labels(60, seed=12)
    err = {}
    for loss in ("mse", "huber"):
        cfg = TrainConfig(hidden=48, max_epochs=150, patience=50, seed=2, loss=loss, edge_pixels=50)
        emu = train_emulator(bad_labels, flux, ivar, label_names=LABELS, wave=wave, config=cfg,
                             progress=False).emulator
        m = emu.pixel_mask
        err[loss] = np.mean(np.abs(emu.predict(unseen) - toy_spectra(unseen, wave))[:, m])
    assert err["huber"] < 0.75 * err["mse"], err  # measured 0.58–0.61 over two seeds
    with pytest.raises(ValueError, match="loss must be one of"):
        train_emulator(lab, flux, ivar, label_names=LABELS, wave=wave, config=TrainConfig(loss="cauchy"),
                       progress=False)


def test_content_hash_covers_start_grid_and_error_table():
    """A tampered start grid (in the configuration) or error table changes the hash."""
    import dataclasses

    from .toy import toy_emulator

    emu = toy_emulator()
    grid = np.array([[5000.0, 4.0, 0.0], [6000.0, 4.5, -0.5]])
    a = dataclasses.replace(emu, config={**emu.config, "start_grid": grid.tolist()})
    tampered = grid.copy()
    tampered[1, 0] = 9000.0
    b = dataclasses.replace(emu, config={**emu.config, "start_grid": tampered.tolist()})
    assert a.content_hash() != b.content_hash()
    assert a.content_hash() == dataclasses.replace(emu, config={**emu.config, "start_grid": grid}).content_hash()
    err = np.full((3, emu.n_pixels), 0.01, np.float32)  # all stars + two Teff bins
    c = dataclasses.replace(a, pixel_error=err, pixel_error_edges=np.array([6000.0]))
    d = dataclasses.replace(a, pixel_error=err * 2, pixel_error_edges=np.array([6000.0]))
    assert c.content_hash() != d.content_hash() != a.content_hash()
