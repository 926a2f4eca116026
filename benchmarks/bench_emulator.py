"""Benchmark: emulator accuracy on real held-out spectra, and training time at DR17 size.

    python -m benchmarks.bench_emulator                 # both parts
    python -m benchmarks.bench_emulator --skip-timing   # accuracy only

Accuracy (Imig et al. 2022 Fig. 5). Uses the demo build in ``--demo-output`` (run
``python -m mastar_vac.build`` first): its emulator, its cleaned reference set and its
80/10/10 split. The validation stars were never seen in training. The emulated spectra
at their reference labels are compared with

1. the MILES spectra of the same stars at MaStar resolution — the real observed
   spectra, degraded to the MaStar LSF and resampled, without the simulated MaStar
   visit noise (the setting of the quick reference implementation: 77% / 89%);
2. the demo's co-added reference spectra, which also carry the simulated MaStar noise
   (median per-pixel S/N of the visits ~90); the fraction a perfect model would reach
   under that noise is printed beside it.

Fractions of pixels within 2% and 4%, over the pixels the emulator models (ivar > 0,
inside the emulator's pixel mask), per Teff bin and for the train/test/validation sets.

Timing: a DR17-size reference set (3,350 spectra × 4,563 pixels, 5 labels; analytic
spectra — only throughput matters here) trained with the default settings on this
machine: wall time, epochs, time per epoch, and whether early stopping ended it.
"""

from __future__ import annotations

import os

os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")  # before distributed is imported

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.special import erf

from benchmarks._toy import LABELS5, toy5_labels, toy5_spectra

log = logging.getLogger("bench_emulator")


def noise_ceiling(ivar: np.ndarray, good: np.ndarray, t: float) -> float:
    sig = 1.0 / np.sqrt(ivar[good])
    return float(erf(t / (sig * np.sqrt(2))).mean())


def library_at_mastar_resolution(ids: np.ndarray, demo_root: Path, library: str | None = None
                                 ) -> tuple[np.ndarray, np.ndarray]:
    """The library spectra of the demo stars ``ids`` at the nominal MaStar LSF, normalized
    exactly like the data, without the simulated visit noise: MILES for MILES stars (a
    star that is also in STELIB keeps its MILES spectrum, which stops at 7,400 Å), STELIB
    for STELIB-only stars (with its gaps and telluric bands masked, as in the demo).

    With ``library = "MILES"`` or ``"STELIB"`` every star gets that library's spectrum —
    shared stars their STELIB one too, which reaches the red half — and a star the
    library lacks gets ivar 0 everywhere (it then counts no pixel)."""
    from mastar_vac.demo import (
        LsfModel,
        _telluric_pixels,
        degrade_miles,
        degrade_stelib,
        load_mastarhc,
        load_miles,
        templates_dir,
    )
    from mastar_vac.io.stelib import read_stelib_dir
    from mastar_vac.normalize import normalize_spectra

    lab = pd.read_csv(demo_root / "miles_labels.csv")
    miles_of = {m: int(i) for m, i in zip(lab["mangaid"], lab["miles_id"]) if np.isfinite(i)}
    stelib_of = {m: str(s).split(";")[0] for m, s, lib in zip(lab["mangaid"], lab["stelib_id"], lab["library"])
                 if lib == "STELIB" or (library == "STELIB" and isinstance(s, str) and s)}
    if library == "STELIB":
        miles_of = {}
    elif library == "MILES":
        stelib_of = {}
    lib = load_miles()
    hc = load_mastarhc()
    stelib = {s.name: s for s in read_stelib_dir(templates_dir() / "stelib")}
    model = LsfModel.from_resolution(lib.wave_air, np.median(np.asarray(hc.sres), axis=0))
    tell = _telluric_pixels(model.wave)
    row = {int(i): k for k, i in enumerate(lib.ids)}
    flux, ivar = [], []
    for m in ids:
        if m in miles_of:
            spec, bad = degrade_miles(lib.flux[row[miles_of[m]]], model, [1.0])
        elif m in stelib_of:
            spec, bad = degrade_stelib(stelib[stelib_of[m]], model, [1.0])[:2]
            bad = bad | tell[None, :]
        elif library is not None:
            flux.append(np.zeros(model.wave.size))
            ivar.append(np.zeros(model.wave.size))
            continue
        else:
            raise SystemExit(f"{m}: neither a MILES nor a STELIB star of the demo")
        f = np.where(np.isfinite(spec[0]), spec[0], 0.0)
        # a nominal ivar only marks usable pixels (these spectra carry the library's own noise only)
        iv = np.where(np.isfinite(spec[0]) & ~bad[0], 1e6 / np.nanmedian(spec[0]) ** 2, 0.0)
        nf, ni = normalize_spectra(f[None], iv[None])
        flux.append(nf[0])
        ivar.append(ni[0])
    return np.array(flux), np.array(ivar)


def accuracy(demo_output: Path) -> None:
    from mastar_vac.emulator import emulator_diagnostic, format_diagnostic, load_emulator
    from mastar_vac.reference import ReferenceSet

    tdir = demo_output / "training"
    if not (tdir / "reference_clean.npz").exists() or not (demo_output / "emulator").exists():
        raise SystemExit(f"no demo build in {demo_output}: run `python -m mastar_vac.build` first")
    emu = load_emulator(demo_output / "emulator")
    ref = ReferenceSet.load(tdir / "reference_clean.npz")
    split = dict(np.load(tdir / "split.npz"))
    emp = ref.source == "empirical"
    split = {k: v[emp[v]] for k, v in split.items()}
    from mastar_vac.demo import demo_files

    root = demo_files().root
    flux, ivar = library_at_mastar_resolution(ref.ids, root)
    print(f"emulator {emu.content_hash()[:12]}: {emu.n_hidden} hidden, {emu.activation}, "
          f"{int(emu.pixel_mask.sum())} of {emu.n_pixels} pixels modelled; "
          f"{len(split['train'])} train / {len(split['test'])} test / {len(split['validation'])} held-out stars")
    print("\n1. against the real MILES/STELIB spectra at MaStar resolution (no simulated noise)")
    print(format_diagnostic(emulator_diagnostic(emu, ref.labels, flux, ivar, split)))
    print("\n2. against the demo's co-added reference spectra (with simulated MaStar noise)")
    print(format_diagnostic(emulator_diagnostic(emu, ref.labels, ref.flux, ref.ivar, split)))
    v = split["validation"]
    good = (ref.ivar[v] > 0) & emu.pixel_mask[None, :]
    print(f"   a perfect emulator under that noise would reach {100 * noise_ceiling(ref.ivar[v], good, 0.02):.1f}% "
          f"within 2% and {100 * noise_ceiling(ref.ivar[v], good, 0.04):.1f}% within 4% on the held-out stars")


def timing(n: int = 3350) -> None:
    import torch

    from mastar_vac.emulator import TrainConfig, train_emulator
    from mastar_vac.wavegrid import mastar_wavelength

    wave = mastar_wavelength()
    lab = toy5_labels(n, seed=3)
    rng = np.random.default_rng(4)
    flux = toy5_spectra(lab, wave) + rng.normal(0, 0.01, (n, len(wave)))
    ivar = np.full(flux.shape, 1e4, np.float32)
    cfg = TrainConfig(labels=tuple(LABELS5))
    print(f"\ntraining a DR17-size reference set: {n} spectra × {len(wave)} px, {len(LABELS5)} labels, "
          f"{cfg.hidden} hidden, {torch.get_num_threads()} torch threads, cap {cfg.max_minutes} min")
    t0 = time.perf_counter()
    r = train_emulator(lab, flux.astype(np.float32), ivar, label_names=LABELS5, wave=wave, config=cfg,
                       progress=False)
    dt = time.perf_counter() - t0
    stopped = "early stopping" if r.epochs < cfg.max_epochs and dt / 60 < cfg.max_minutes else (
        "the epoch limit" if r.epochs >= cfg.max_epochs else "the time cap")
    print(f"  wall time {dt / 60:.2f} min, {r.epochs} epochs ({dt / r.epochs:.3f} s/epoch), ended by {stopped}; "
          f"best test loss at epoch {r.emulator.metrics['best_epoch']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo-output", type=Path, default=Path("output/demo"))
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--skip-accuracy", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("distributed").setLevel(logging.WARNING)
    os.environ.setdefault("MASTAR_VAC_PROGRESS", "0")
    if not args.skip_accuracy:
        accuracy(args.demo_output)
    if not args.skip_timing:
        timing()


if __name__ == "__main__":
    main()
