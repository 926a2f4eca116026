"""End to end: `python -m mastar_vac.build` on a small demo."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _config(tmp_path: Path, stars: int = 25) -> Path:
    text = (ROOT / "pipelines" / "demo.toml").read_text()
    text = text.replace("demo = true", f"demo = true\ndemo_stars = {stars}")
    text = text.replace('dir = "output/demo"', f'dir = "{tmp_path / "out"}"')
    # a tiny, quick emulator: this test is about the plumbing, not the accuracy
    text = text.replace("hidden = 256", "hidden = 32\nmax_epochs = 40\npatience = 20")
    text = text.replace("ema_decay = 0.999", "ema_decay = 0.0")  # 40 epochs: too short to average over
    p = tmp_path / "small.toml"
    p.write_text(text)
    return p


@pytest.fixture(scope="module")
def small_build(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("build")
    env = dict(os.environ, MASTAR_VAC_CACHE=str(tmp / "cache"), MASTAR_VAC_PROGRESS="0")
    cfg = _config(tmp)
    proc = subprocess.run([sys.executable, "-m", "mastar_vac.build", "--config", str(cfg)], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=900)
    return tmp, cfg, env, proc


def test_build_runs_and_reports(small_build):
    tmp, _, _, proc = small_build
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in ("ingest", "normalize", "reference", "emulator", "fit", "validation"):
        assert any(ln.startswith(stage) for ln in proc.stdout.splitlines()), stage
    out = tmp / "out"
    assert (out / "cube.zarr").is_dir()
    assert (out / "emulator" / "weights.safetensors").exists()
    assert (out / "training" / "emulator_diagnostic.png").exists()
    assert (out / "validation" / "table1.txt").exists()
    import pandas as pd

    fits = pd.read_parquet(out / "fit" / "fits.parquet")
    import xarray as xr

    n = xr.open_zarr(out / "cube.zarr").sizes["visit"]
    assert len(fits) == n and not fits.duplicated(["MANGAID", "PLATE", "IFUDESIGN", "MJD"]).any()


def test_report_html_renders_tables_and_figures(small_build):
    """What a reader opens: the FLAG table is an HTML table, every figure the page links
    exists (and has a caption), no Markdown markup is left as text, and the [α/Fe] panel
    is left out (with a sentence saying why) when [α/Fe] was not fitted."""
    import html.parser
    from urllib.parse import unquote

    tmp, _, _, proc = small_build
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = tmp / "out" / "report"
    page = (report / "report.html").read_text()

    class Tags(html.parser.HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.tags: list[tuple[str, dict]] = []
            self.text: list[str] = []

        def handle_starttag(self, tag, attrs):  # noqa: ANN001
            self.tags.append((tag, dict(attrs)))

        def handle_data(self, data):  # noqa: ANN001
            self.text.append(data)

    doc = Tags()
    doc.feed(page)
    tags = [t for t, _ in doc.tags]
    assert tags.count("table") >= 1 and tags.count("td") >= 4 * 10  # 10 FLAG bits x 4 columns
    imgs = [a["src"] for t, a in doc.tags if t == "img"]
    assert imgs and tags.count("figcaption") == len(imgs)
    missing = [s for s in imgs if not (report / unquote(s)).is_file()]
    assert not missing, missing
    text = "".join(doc.text)
    for markup in ("|---", "**", "![", "](", "```"):
        assert markup not in text, markup
    assert not any("alpha_feh" in s for s in imgs) and "did not fit [α/Fe]" in text


def test_second_build_reuses_stages(small_build):
    tmp, cfg, env, first = small_build
    assert first.returncode == 0
    proc = subprocess.run([sys.executable, "-m", "mastar_vac.build", "--config", str(cfg)], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in ("ingest", "normalize", "reference", "emulator", "fit", "validation"):
        line = next(ln for ln in proc.stdout.splitlines() if ln.startswith(stage))
        assert "reused" in line, line


def test_bad_config_exits_with_a_clear_message(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[inputs]\ngoodspec = 'missing.fits'\n[normalize]\nwindow = 'x'\n")
    proc = subprocess.run([sys.executable, "-m", "mastar_vac.build", "--config", str(p)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "normalize.window: expected an integer" in proc.stderr


def test_missing_input_file_exits_with_its_name(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text(f"[inputs]\ngoodspec = '{tmp_path / 'nope.fits.gz'}'\nallstar = '{tmp_path / 'a.fits'}'\n"
                 f"[output]\ndir = '{tmp_path / 'o'}'\n")
    proc = subprocess.run([sys.executable, "-m", "mastar_vac.build", "--config", str(p)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "nope.fits.gz: file not found" in proc.stderr


def test_build_with_a_synthetic_grid_adds_the_theoretical_extension(tmp_path):
    """Paper §2.4 end to end: a FERRE grid in [inputs] adds synthetic Teff > 6000 K spectra."""
    import numpy as np

    from mastar_vac.io.ferre import write_ferre
    from mastar_vac.reference import ReferenceSet

    from .test_synthetic import analytic

    # a 3-D grid (Teff, log g, [M/H]) of analytic spectra, log-λ in air, R = 10000
    x0, npix = np.log10(3600.0), 4000
    step = (np.log10(10400.0) - x0) / (npix - 1)
    lam = 10 ** (x0 + step * np.arange(npix))
    axes = [(6000.0, 1000.0, 7), (3.0, 0.5, 5), (-1.0, 0.5, 4)]
    mesh = np.meshgrid(*[lo + st * np.arange(k) for lo, st, k in axes], indexing="ij")
    flux = analytic(lam, *mesh, 0.0, 0.1).astype(np.float32)
    grid = write_ferre(tmp_path / "f_demo", {
        "flux": flux, "llimits": [a[0] for a in axes], "steps": [a[1] for a in axes],
        "labels": ["TEFF", "LOGG", "METALS"],
        "header": {"WAVE": [x0, step], "LOGW": 1, "VACUUM": 0, "RESOLUTION": 10000.0}}, binary=True)
    cfg = _config(tmp_path)
    text = cfg.read_text().replace("demo = true", f"demo = true\nsynthetic_grid = '{grid}'")
    text += "\n[synthetic]\nn_spectra = 15\n"
    cfg.write_text(text)
    env = dict(os.environ, MASTAR_VAC_CACHE=str(tmp_path / "cache"), MASTAR_VAC_PROGRESS="0")
    proc = subprocess.run([sys.executable, "-m", "mastar_vac.build", "--config", str(cfg)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = ReferenceSet.load(tmp_path / "out" / "reference" / "reference_set.npz")
    synth = ref.source == "synthetic"
    assert synth.sum() == 15 and (~synth).sum() > 10
    assert (ref.labels[synth, 0] > 6000).all()
    assert np.isfinite(ref.flux[synth]).all()


def test_build_with_the_lsf_forward_model_trains_and_fits_through_the_operator(tmp_path):
    """Issue 14 end to end: with [fit] lsf = "forward" the reference set records each
    co-add's LSF and σ_ref, the emulator is trained through the operator and records
    σ_ref, the synthetic extension is convolved to σ_ref ("auto"), and every visit is
    fitted with its own DISP; the VAC header says which."""
    import numpy as np
    from astropy.io import fits

    from mastar_vac.emulator import load_emulator
    from mastar_vac.lsf import sigma_to_pixels
    from mastar_vac.reference import ReferenceSet

    from .test_synthetic import analytic

    x0, npix = np.log10(3600.0), 4000
    step = (np.log10(10400.0) - x0) / (npix - 1)
    lam = 10 ** (x0 + step * np.arange(npix))
    axes = [(6000.0, 1000.0, 7), (3.0, 0.5, 5), (-1.0, 0.5, 4)]
    mesh = np.meshgrid(*[lo + st * np.arange(k) for lo, st, k in axes], indexing="ij")
    from mastar_vac.io.ferre import write_ferre

    grid = write_ferre(tmp_path / "f_demo", {
        "flux": analytic(lam, *mesh, 0.0, 0.1).astype(np.float32), "llimits": [a[0] for a in axes],
        "steps": [a[1] for a in axes], "labels": ["TEFF", "LOGG", "METALS"],
        "header": {"WAVE": [x0, step], "LOGW": 1, "VACUUM": 0, "RESOLUTION": 10000.0}}, binary=True)
    cfg = _config(tmp_path)
    text = cfg.read_text().replace("demo = true", f"demo = true\nsynthetic_grid = '{grid}'")
    text = text.replace("[fit]\n", "[fit]\nlsf = \"forward\"\n")
    cfg.write_text(text + "\n[synthetic]\nn_spectra = 10\n")
    env = dict(os.environ, MASTAR_VAC_CACHE=str(tmp_path / "cache"), MASTAR_VAC_PROGRESS="0")
    proc = subprocess.run([sys.executable, "-m", "mastar_vac.build", "--config", str(cfg)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    ref = ReferenceSet.load(out / "reference" / "reference_set.npz")
    assert ref.has_lsf and len(ref.lsf_sigma_ref) == len(ref.wave)
    emp, synth = ref.source == "empirical", ref.source == "synthetic"
    assert synth.sum() == 10
    # every co-add is at least as broad as σ_ref nearly everywhere; the synthetic ones are at σ_ref
    ok = np.isfinite(ref.lsf_sigma[emp])
    assert (ref.lsf_sigma[emp][ok] >= ref.lsf_sigma_ref[None, :].repeat(emp.sum(), 0)[ok] * 0.999).mean() > 0.95
    np.testing.assert_allclose(ref.lsf_sigma[synth], np.broadcast_to(ref.lsf_sigma_ref, (10, len(ref.wave))),
                               rtol=1e-5)
    emu = load_emulator(out / "emulator")
    np.testing.assert_allclose(emu.lsf_sigma_ref, ref.lsf_sigma_ref)
    assert emu.lsf_sigma_ref.min() > 0 and np.all(np.isfinite(sigma_to_pixels(1.0, ref.wave)))
    with fits.open(out / "catalog" / "mastar_vac_params.fits") as h:
        assert h[0].header["LSFMODE"] == "forward"
        assert len(h[1].data) > 0
    assert (out / "validation" / "table1.json").exists()
