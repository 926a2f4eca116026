"""``[fit] device`` and ``[emulator] device``: "auto" | "cpu" | "cuda".

Tolerance on a GPU: labels within 1 K in Teff and 1e-3 dex in log g / [Fe/H] of the
CPU's (float32 on both; a GPU sums in another order, and LM stops within Δχ² = 0.05),
emulator training within 2% of the CPU's test loss.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mastar_vac.config import load_config
from mastar_vac.emulator import TrainConfig, train_emulator
from mastar_vac.errors import ConfigError
from mastar_vac.fit import FitConfig, fit_spectra
from mastar_vac.wavegrid import mastar_wavelength

from .toy import LABELS, toy_emulator, toy_labels, toy_spectra

HAS_CUDA = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device: torch.cuda.is_available() is False here")


def _spectra(n: int = 40, seed: int = 3):
    emu = toy_emulator()
    lab = toy_labels(n, seed=seed)
    lab[:, 0] = np.clip(lab[:, 0], 4500, 8500)
    rng = np.random.default_rng(seed)
    f = emu.predict(lab) + rng.normal(0, 0.02, (n, emu.n_pixels))
    return emu, f, np.full(f.shape, 2500.0)


@pytest.mark.parametrize("section, key", [("fit", "fit.device"), ("emulator", "emulator.device")])
def test_unknown_device_is_a_config_error_naming_the_key(tmp_path, section, key):
    p = tmp_path / "c.toml"
    p.write_text(f"[inputs]\ndemo = true\n[{section}]\ndevice = \"gpu\"\n")
    with pytest.raises(ConfigError, match=rf"{key}: unknown device 'gpu'"):
        load_config(p)
    p.write_text(f"[inputs]\ndemo = true\n[{section}]\ndevice = \"cuda:0\"\n")
    assert getattr(load_config(p), section).device == "cuda:0"


def test_defaults_are_auto():
    assert FitConfig().device == "auto" and TrainConfig().device == "auto"


@pytest.mark.skipif(HAS_CUDA, reason="with a GPU, auto is CUDA: see test_fit_on_gpu_agrees_with_cpu")
def test_auto_without_a_gpu_is_the_cpu_and_cuda_is_a_clear_error():
    emu, f, iv = _spectra()
    cpu = fit_spectra(emu, f, iv, config=FitConfig(device="cpu"))
    auto = fit_spectra(emu, f, iv, config=FitConfig(device="auto"))
    np.testing.assert_array_equal(auto.labels, cpu.labels)
    np.testing.assert_array_equal(auto.chi2, cpu.chi2)
    np.testing.assert_array_equal(auto.status, cpu.status)
    with pytest.raises(ConfigError, match=r"fit.device = 'cuda', but torch sees no CUDA device"):
        fit_spectra(emu, f, iv, config=FitConfig(device="cuda"))
    lab = toy_labels(60)
    with pytest.raises(ConfigError, match=r"emulator.device = 'cuda', but torch sees no CUDA device"):
        train_emulator(lab, toy_spectra(lab), np.full((60, len(mastar_wavelength())), 1e4), label_names=LABELS,
                       wave=mastar_wavelength(), config=TrainConfig(device="cuda", max_epochs=2), progress=False)


@needs_gpu
def test_fit_on_gpu_agrees_with_cpu():
    emu, f, iv = _spectra()
    cpu = fit_spectra(emu, f, iv, config=FitConfig(device="cpu"))
    gpu = fit_spectra(emu, f, iv, config=FitConfig(device="cuda"))
    auto = fit_spectra(emu, f, iv, config=FitConfig(device="auto"))
    np.testing.assert_array_equal(auto.labels, gpu.labels)
    np.testing.assert_array_equal(gpu.status, cpu.status)
    ok = cpu.status == 0
    np.testing.assert_allclose(gpu.labels[ok, 0], cpu.labels[ok, 0], atol=1.0)
    np.testing.assert_allclose(gpu.labels[ok, 1:], cpu.labels[ok, 1:], atol=1e-3)


@needs_gpu
def test_training_on_gpu_agrees_with_cpu():
    lab = toy_labels(300)
    flux = toy_spectra(lab)
    iv = np.full_like(flux, 1e4)
    res = {d: train_emulator(lab, flux, iv, label_names=LABELS, wave=mastar_wavelength(),
                             config=TrainConfig(hidden=32, max_epochs=60, patience=60, seed=1, device=d),
                             progress=False) for d in ("cpu", "cuda")}
    assert res["cuda"].emulator.config["device_used"] == "cuda"
    loss = {d: r.emulator.metrics["best_test_loss"] for d, r in res.items()}
    assert loss["cuda"] == pytest.approx(loss["cpu"], rel=0.02)
