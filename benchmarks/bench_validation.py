"""Benchmark: Table 1 and Figure 5 by k-fold cross-validation over the whole demo reference set.

    python -m benchmarks.bench_validation            # 5 folds
    python -m benchmarks.bench_validation --folds 10  # 80/10/10 per fold, the build's proportions

The build's Table 1 and Figure 5 use one held-out tenth of the reference set (~80 stars):
their numbers move with the draw. Here every star of the demo reference set *as it was
before any cleaning* (``output/demo/reference/reference_set.npz``; run the build first)
is held out once: the set is cut into ``--folds`` parts; an emulator is trained on the
others (the build's settings, a ninth of them for early stopping) and the held-out part is

- fitted **visit by visit, each at its own S/N** (the headline: what catalogue users
  get), failures counted as catastrophic;
- fitted as co-adds degraded to S/N 50 (a second line, comparable with the paper);
- emulated at its reference labels and compared with the real MILES and STELIB spectra
  of those stars at MaStar resolution, each library on its own (Figure 5; a star in
  both is compared with both; synthetic spectra, when the build used a grid, are
  reported on their own line and never pooled with real ones).

Cleaning touches the training part only: the build's label-outlier flags
(``training/label_outliers.csv``) remove flagged stars from each fold's training part,
never from the held-out part, whose flagged stars are also shown on their own. (The flags
come from the build's first emulator, which saw some of each fold's held-out stars in
training; that only decides which *training* stars are dropped.)

Printed: the pooled tables, and the spread of the per-fold values.
"""

from __future__ import annotations

import os

os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")  # before distributed is imported

import argparse  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def _flagged_ids(demo_output: Path) -> set[str]:
    p = demo_output / "training" / "label_outliers.csv"
    if not p.exists():
        return set()
    t = pd.read_csv(p, dtype={"id": str})
    return set(t.loc[t["outlier"].astype(bool), "id"].astype(str))


def fold_splits(ref, flagged: np.ndarray, n_folds: int, seed: int):  # noqa: ANN001, ANN201
    """The cross-validation folds: every empirical star held out once (``n_folds`` parts
    of a seeded permutation); per fold, the other stars less the ``flagged`` ones and the
    synthetic spectra, a ninth of each for early stopping. Yields (k, held, split)."""
    emp = np.flatnonzero(ref.source == "empirical")
    synth = np.flatnonzero(ref.source == "synthetic")
    rng = np.random.default_rng(seed)
    for k, held in enumerate(np.array_split(rng.permutation(emp), n_folds)):
        train_pool = np.setdiff1d(emp, held)
        train_pool = train_pool[~flagged[train_pool]]  # cleaning: training part only
        parts: dict[str, list] = {"train": [], "test": []}
        for pool in (train_pool, synth):
            pool = rng.permutation(pool)
            n_test = max(1, len(pool) // 9) if len(pool) else 0
            parts["test"].append(pool[:n_test])
            parts["train"].append(pool[n_test:])
        yield k, held, {"train": np.sort(np.concatenate(parts["train"])),
                        "test": np.sort(np.concatenate(parts["test"])), "validation": np.sort(held)}


def cv_arguments(doc: str | None) -> argparse.ArgumentParser:
    """The command-line arguments every cross-validation benchmark takes."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--demo-output", type=Path, default=Path("output/demo"))
    ap.add_argument("--config", type=Path, default=None, help="the build's configuration (default demo.toml)")
    ap.add_argument("--save", type=Path, default=None, help="write every held-out visit's fit to this CSV")
    return ap


def cv_inputs(args: argparse.Namespace):  # noqa: ANN201
    """The build's configuration and reference set (as before any cleaning), the
    label-outlier flags, and the empirical rows: (cfg, ref, flagged_ids, flagged, emp)."""
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("MASTAR_VAC_PROGRESS", "0")
    from mastar_vac.config import load_config
    from mastar_vac.reference import ReferenceSet

    cfg = load_config(args.config)
    path = args.demo_output / "reference" / "reference_set.npz"
    if not path.exists():
        raise SystemExit(f"{path} not found: run `python -m mastar_vac.build` first")
    ref = ReferenceSet.load(path)
    flagged_ids = _flagged_ids(args.demo_output)
    flagged = np.isin(ref.ids.astype(str), list(flagged_ids)) & (ref.source == "empirical")
    return cfg, ref, flagged_ids, flagged, np.flatnonzero(ref.source == "empirical")


def main() -> None:
    args = cv_arguments(__doc__).parse_args()
    cfg, ref, flagged_ids, flagged, emp = cv_inputs(args)
    from mastar_vac.emulator import TEFF_BINS, flux_accuracy, train_emulator
    from mastar_vac.fit import fit_spectra
    from mastar_vac.io.cube import open_cube
    from mastar_vac.validate import format_table1, label_residuals, validate_fit, visits_of

    from benchmarks.bench_emulator import library_at_mastar_resolution
    from mastar_vac.demo import demo_files

    real = {lib: library_at_mastar_resolution(ref.ids[emp], demo_files().root, library=lib)
            for lib in ("MILES", "STELIB")}
    emp_row = {int(i): k for k, i in enumerate(emp)}  # rows of the library spectra (emp order)
    cube = open_cube(args.demo_output / "cube.zarr")
    visit_ids = cube["mangaid"].values.astype(str)
    vsel_all, vref_all = visits_of(visit_ids, ref.ids[emp], ref.labels[emp])
    vflux = cube["norm_flux"].isel(visit=vsel_all).values
    vivar = cube["norm_ivar"].isel(visit=vsel_all).values
    v_star = visit_ids[vsel_all]
    v_fit = np.full(vref_all.shape, np.nan)
    coadd_fit = np.full(ref.labels.shape, np.nan)
    per_fold_visits, accuracy_synth = [], []
    accuracy: dict[str, list] = {lib: [] for lib in real}
    t0 = time.perf_counter()
    for k, held, split in fold_splits(ref, flagged, args.folds, cfg.run.seed):
        r = train_emulator(ref.labels, ref.flux, ref.ivar, label_names=ref.label_names, wave=ref.wave,
                           config=cfg.emulator, split=split, progress=False)
        emu = r.emulator
        emu.config["start_grid"] = ref.labels[split["train"]].tolist()
        # the headline: every visit of the held-out stars at its own S/N
        vs = np.flatnonzero(np.isin(v_star, ref.ids[held]))
        res = fit_spectra(emu, vflux[vs], vivar[vs], config=cfg.fit)
        v_fit[vs] = res.labels
        per_fold_visits.append(label_residuals(res.labels, vref_all[vs], ref.label_names))
        _, df = validate_fit(emu, ref.labels[held], ref.flux[held], ref.ivar[held], config=cfg.fit, snr=50.0,
                             seed=cfg.run.seed + k)
        coadd_fit[held] = df[[f"FIT_{n}" for n in ref.label_names]].to_numpy()
        rows = [emp_row[int(i)] for i in held]
        for lib, (lf, li) in real.items():
            accuracy[lib].append(flux_accuracy(emu, ref.labels[held], lf[rows], li[rows]))
        st = split["test"][ref.source[split["test"]] == "synthetic"]  # never pooled with real ones
        if len(st):
            accuracy_synth.append(flux_accuracy(emu, ref.labels[st], ref.flux[st], ref.ivar[st]))
        t = per_fold_visits[-1]
        print(f"fold {k + 1}/{args.folds}: {len(held)} held-out stars, {len(vs)} visits; per visit MAD Teff "
              f"{t['Teff < 6000 K']['TEFF']['mad']:.0f} K (< 6000 K) / {t['Teff > 6000 K']['TEFF']['mad']:.0f} K "
              f"(> 6000 K), failed {t['all']['n_failed']}  [{time.perf_counter() - t0:.0f} s]", flush=True)

    names = ref.label_names
    vflag = np.isin(v_star, list(flagged_ids))
    print()
    print(format_table1(label_residuals(v_fit, vref_all, names), names,
                        f"{args.folds}-fold cross-validation: all {len(emp)} reference stars (before any cleaning) "
                        f"held out once; their {len(vsel_all)} visits fitted one by one at their own S/N "
                        f"(median {np.nanmedian(cube['s2n'].values[vsel_all]):.0f})"))
    if vflag.any():
        print()
        print(format_table1(label_residuals(v_fit[vflag], vref_all[vflag], names), names,
                            f"  of which the {int(vflag.sum())} visits of the {int(flagged.sum())} stars the "
                            "label-outlier test flags (catalogue labels likely wrong)"))
        print()
        print(format_table1(label_residuals(v_fit[~vflag], vref_all[~vflag], names), names,
                            f"  and the other {int((~vflag).sum())} visits"))
    print()
    print(format_table1(label_residuals(coadd_fit[emp], ref.labels[emp], names), names,
                        "The same stars' co-adds degraded to S/N 50 (second line)"))
    if args.save is not None:
        out = pd.DataFrame({"MANGAID": v_star, "VISIT_INDEX": vsel_all, "S2N": cube["s2n"].values[vsel_all],
                            "OUTLIER_FLAGGED": vflag})
        for j, name in enumerate(names):
            out[f"REF_{name}"] = vref_all[:, j]
            out[f"FIT_{name}"] = v_fit[:, j]
        out.to_csv(args.save, index=False)

    def pooled(accs: list[dict], b: str, key: str) -> float:
        n = sum(a[b]["n_pixels"] for a in accs)
        return 100 * sum(a[b][key] * a[b]["n_pixels"] for a in accs if a[b]["n_pixels"]) / max(n, 1)

    bins = ["all", *(name for _, _, name in TEFF_BINS)]

    def print_bins(accs: list[dict]) -> None:
        for b in bins:
            if not sum(a[b]["n_pixels"] for a in accs):  # e.g. no synthetic spectra below 8000 K
                print(f"  {b:<12} no spectra")
                continue
            print(f"  {b:<12} within 2%: {pooled(accs, b, 'within_2pct'):5.1f}%   "
                  f"within 4%: {pooled(accs, b, 'within_4pct'):5.1f}%")

    for lib, accs in accuracy.items():
        print(f"\nFigure 5, real {lib} spectra of the held-out stars at MaStar resolution (no simulated noise), "
              f"every star held out once ({sum(a['all']['n_pixels'] for a in accs)} pixels):")
        print_bins(accs)
    if accuracy_synth:
        print("Figure 5, synthetic spectra (each fold's synthetic test spectra; never pooled with the real ones):")
        print_bins(accuracy_synth)
    print("\nspread over folds (min–max of the per-fold value):")
    for lib, accs in accuracy.items():
        f2 = [100 * a["all"]["within_2pct"] for a in accs if a["all"]["n_pixels"]]
        f4 = [100 * a["all"]["within_4pct"] for a in accs if a["all"]["n_pixels"]]
        if f2:
            print(f"  Figure 5 ({lib}), all Teff: within 2% {min(f2):.1f}–{max(f2):.1f}%, "
                  f"within 4% {min(f4):.1f}–{max(f4):.1f}%")
    for rng_name in ("Teff < 6000 K", "Teff > 6000 K", "Teff > 8000 K"):
        cells = []
        for n in names:
            v = [t[rng_name][n]["mad"] for t in per_fold_visits if t[rng_name]["n"]]
            if v:
                cells.append(f"{n} {min(v):.3g}–{max(v):.3g}")
        print(f"  {rng_name} per-visit MAD: " + ", ".join(cells))


if __name__ == "__main__":
    main()
