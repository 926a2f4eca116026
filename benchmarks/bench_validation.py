"""Benchmark: Table 1 by k-fold cross-validation over the whole demo reference set.

    python -m benchmarks.bench_validation            # 5 folds
    python -m benchmarks.bench_validation --folds 10  # 80/10/10 per fold, the build's proportions

The build's Table 1 and Figure 5 use one held-out tenth of the reference set (~70 MILES
stars): their numbers move with the draw (by tens of kelvin, by points of per cent).
Here every star of the cleaned demo reference set
(``output/demo/training/reference_clean.npz``; run the build first) is held out once:
the set is cut into ``--folds`` parts, an emulator is trained on the others (with the
build's settings; a ninth of them for early stopping), and the held-out part is

- fitted at S/N 50 exactly as in the build (Table 1), and
- emulated at its reference labels and compared with the real library spectra of those
  stars at MaStar resolution (MILES; STELIB for STELIB-only stars) (Figure 5 fractions, as in bench_emulator).

Printed: both over all stars, and the spread of the per-fold values.
"""

from __future__ import annotations

import os

os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")  # before distributed is imported

import argparse  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--demo-output", type=Path, default=Path("output/demo"))
    ap.add_argument("--config", type=Path, default=None, help="the build's configuration (default demo.toml)")
    ap.add_argument("--save", type=Path, default=None, help="write every held-out star's fit to this CSV")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("MASTAR_VAC_PROGRESS", "0")
    from mastar_vac.config import load_config
    from mastar_vac.emulator import TEFF_BINS, flux_accuracy, train_emulator
    from mastar_vac.reference import ReferenceSet
    from mastar_vac.validate import format_table1, label_residuals, validate_fit

    cfg = load_config(args.config)
    path = args.demo_output / "training" / "reference_clean.npz"
    if not path.exists():
        raise SystemExit(f"{path} not found: run `python -m mastar_vac.build` first")
    ref = ReferenceSet.load(path)
    emp = np.flatnonzero(ref.source == "empirical")
    rng = np.random.default_rng(cfg.run.seed)
    folds = np.array_split(rng.permutation(emp), args.folds)
    from benchmarks.bench_emulator import library_at_mastar_resolution
    from mastar_vac.demo import demo_files

    miles_flux, miles_ivar = library_at_mastar_resolution(ref.ids, demo_files().root)
    fitted = np.full(ref.labels.shape, np.nan)
    per_fold = []
    accuracy = []  # flux_accuracy per fold (Figure 5 fractions)
    t0 = time.perf_counter()
    for k, held in enumerate(folds):
        rest = np.setdiff1d(np.arange(len(ref)), held)
        rest = rng.permutation(rest)
        n_test = max(1, len(rest) // 9)
        split = {"train": np.sort(rest[n_test:]), "test": np.sort(rest[:n_test]), "validation": np.sort(held)}
        r = train_emulator(ref.labels, ref.flux, ref.ivar, label_names=ref.label_names, wave=ref.wave,
                           config=cfg.emulator, split=split, progress=False)
        emu = r.emulator
        emu.config["start_grid"] = ref.labels[split["train"]].tolist()
        table, df = validate_fit(emu, ref.labels[held], ref.flux[held], ref.ivar[held], config=cfg.fit, snr=50.0,
                                 seed=cfg.run.seed + k)
        fitted[held] = df[[f"FIT_{n}" for n in ref.label_names]].to_numpy()
        per_fold.append(table)
        accuracy.append(flux_accuracy(emu, ref.labels[held], miles_flux[held], miles_ivar[held]))
        print(f"fold {k + 1}/{args.folds}: {len(held)} held-out stars, "
              f"MAD Teff {table['Teff < 6000 K']['TEFF']['mad']:.0f} K (< 6000 K) / "
              f"{table['Teff > 6000 K']['TEFF']['mad']:.0f} K (> 6000 K)  [{time.perf_counter() - t0:.0f} s]",
              flush=True)
    table = label_residuals(fitted[emp], ref.labels[emp], ref.label_names)
    if args.save is not None:
        import pandas as pd

        out = pd.DataFrame({"id": ref.ids[emp]})
        for j, name in enumerate(ref.label_names):
            out[f"REF_{name}"] = ref.labels[emp, j]
            out[f"FIT_{name}"] = fitted[emp, j]
        out.to_csv(args.save, index=False)
    print()
    print(format_table1(table, ref.label_names, f"{args.folds}-fold cross-validation, every one of {len(emp)} "
                        f"reference stars held out once, co-adds at S/N 50"))
    # pooled over folds: each fold's fraction weighted by its pixel count
    n_pix = {b: sum(a[b]["n_pixels"] for a in accuracy) for b in ["all", *(name for _, _, name in TEFF_BINS)]}

    def pooled(b: str, key: str) -> float:
        return 100 * sum(a[b][key] * a[b]["n_pixels"] for a in accuracy if a[b]["n_pixels"]) / max(n_pix[b], 1)

    print(f"\nFigure 5 fractions, every star held out once, against the real library spectra at MaStar resolution "
          f"({n_pix['all']} pixels):")
    for b in n_pix:
        print(f"  {b:<12} within 2%: {pooled(b, 'within_2pct'):5.1f}%   within 4%: {pooled(b, 'within_4pct'):5.1f}%")
    print("\nspread over folds (min–max of the per-fold value):")
    f2 = [100 * a["all"]["within_2pct"] for a in accuracy]
    f4 = [100 * a["all"]["within_4pct"] for a in accuracy]
    print(f"  Figure 5, all Teff: within 2% {min(f2):.1f}–{max(f2):.1f}%, within 4% {min(f4):.1f}–{max(f4):.1f}%")
    for rng_name in ("Teff < 6000 K", "Teff > 6000 K"):
        cells = []
        for n in ref.label_names:
            v = [t[rng_name][n]["mad"] for t in per_fold]
            cells.append(f"{n} {min(v):.3g}–{max(v):.3g}")
        print(f"  {rng_name} MAD: " + ", ".join(cells))


if __name__ == "__main__":
    main()
