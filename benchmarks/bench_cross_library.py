"""Benchmark: the cross-library test — train on one real library, fit the other.

    python -m benchmarks.bench_cross_library             # both directions, the demo build in output/demo
    python -m benchmarks.bench_cross_library --train MILES

The same kind of test as the paper's LAMOST/SEGUE comparison, but with labels that are
not ours: an emulator is trained on one library's stars only (their visits in the demo
cube co-added per star, with *that library's* labels, cleaned of label outliers like the
build's — on the training side only), and every visit of the *other* library is fitted
at its own S/N and compared with the other library's own labels. Table 1 analogue per
Teff range; failures count as catastrophic.

Headline: the stars the training library does not hold at all. About half the STELIB
stars are MILES stars (same demo star, one MANGAID): their other-library spectrum is new
to the emulator but their star is not, so they are shown on a second line.

Needs the demo build (``python -m mastar_vac.build``; its ``cube.zarr``) and the demo's
``visit_sources.csv`` and ``miles_labels.csv``.
"""

from __future__ import annotations

import os

os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")  # before distributed is imported

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

LIBRARIES = ("MILES", "STELIB")
KEY = ["MANGAID", "PLATE", "IFUDESIGN", "MJD"]


def library_visits(cube, sources: pd.DataFrame) -> pd.DataFrame:  # noqa: ANN001
    """The cube's visits (cube order) with the library each is made from."""
    v = pd.DataFrame({"MANGAID": cube["mangaid"].values.astype(str), "PLATE": cube["plate"].values.astype(int),
                      "IFUDESIGN": cube["ifudesign"].values.astype(str), "MJD": cube["mjd"].values.astype(int)})
    v["ROW"] = np.arange(len(v))
    s = sources.astype({"MANGAID": str, "PLATE": int, "IFUDESIGN": str, "MJD": int})
    out = v.merge(s[[*KEY, "LIBRARY"]], on=KEY, how="left", validate="one_to_one")
    if out["LIBRARY"].isna().any():
        raise SystemExit(f"{int(out['LIBRARY'].isna().sum())} cube visits are not in visit_sources.csv: "
                         "is the build's cube from this demo?")
    return out


def library_reference(cube, visits: pd.DataFrame, labels: pd.DataFrame, library: str):  # noqa: ANN001, ANN201
    """A reference set from one library's visits: co-added per star, that library's labels."""
    from mastar_vac.reference import ReferenceSet, coadd
    from mastar_vac.validate import median_snr

    col = library.lower()
    lab = labels.dropna(subset=[f"{col}_teff", f"{col}_logg", f"{col}_fe_h"])
    vis = visits[(visits["LIBRARY"] == library) & visits["MANGAID"].isin(lab["mangaid"])]
    ids = np.array(sorted(set(vis["MANGAID"])))
    group = np.searchsorted(ids, vis["MANGAID"].to_numpy())
    rows = vis["ROW"].to_numpy()
    f, iv = coadd(cube["norm_flux"].isel(visit=rows).values, cube["norm_ivar"].isel(visit=rows).values, group,
                  len(ids))
    by = lab.set_index("mangaid")
    y = by.loc[ids, [f"{col}_teff", f"{col}_logg", f"{col}_fe_h"]].to_numpy(np.float64)
    return ReferenceSet(["TEFF", "LOGG", "FE_H"], y, f, iv, np.asarray(cube["wave"].values, np.float64), ids,
                        np.full(len(ids), "empirical"), np.bincount(group, minlength=len(ids)).astype(np.int64),
                        median_snr(f, iv))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo-output", type=Path, default=Path("output/demo"))
    ap.add_argument("--config", type=Path, default=None, help="the build's configuration (default demo.toml)")
    ap.add_argument("--train", choices=LIBRARIES, default=None, help="one direction only")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("MASTAR_VAC_PROGRESS", "0")
    from mastar_vac.config import load_config
    from mastar_vac.demo import demo_files
    from mastar_vac.io.cube import open_cube
    from mastar_vac.train import train_reference_emulator
    from mastar_vac.validate import format_table1, label_residuals, validate_visits

    cfg = load_config(args.config)
    files = demo_files(seed=cfg.run.seed, n_stars=cfg.inputs.demo_stars)
    cube_path = args.demo_output / "cube.zarr"
    if not cube_path.exists():
        raise SystemExit(f"{cube_path} not found: run `python -m mastar_vac.build` first")
    cube = open_cube(cube_path)
    visits = library_visits(cube, pd.read_csv(files.visit_sources))
    labels = pd.read_csv(files.labels, dtype={"mangaid": str})
    # the build's split proportions, with no validation part: the other library is the test
    tcfg = dataclasses.replace(cfg.emulator, validation_fraction=0.0)
    for train_lib in ([args.train] if args.train else list(LIBRARIES)):
        fit_lib = next(x for x in LIBRARIES if x != train_lib)
        t0 = time.perf_counter()
        ref = library_reference(cube, visits, labels, train_lib)
        trained = train_reference_emulator(ref, train_config=tcfg, fit_config=cfg.fit,
                                           outlier_chi2_ratio=cfg.reference.outlier_chi2_ratio, progress=False)
        emu = trained.result.emulator
        col = fit_lib.lower()
        lab = labels.dropna(subset=[f"{col}_teff", f"{col}_logg", f"{col}_fe_h"]).set_index("mangaid")
        vis = visits[(visits["LIBRARY"] == fit_lib) & visits["MANGAID"].isin(lab.index)]
        rows = vis["ROW"].to_numpy()
        truth = lab.loc[vis["MANGAID"], [f"{col}_teff", f"{col}_logg", f"{col}_fe_h"]].to_numpy(np.float64)
        table, df = validate_visits(emu, cube["norm_flux"].isel(visit=rows).values,
                                    cube["norm_ivar"].isel(visit=rows).values, truth, config=cfg.fit)
        fitted = df[[f"FIT_{n}" for n in emu.label_names]].to_numpy()
        seen = vis["MANGAID"].isin(ref.ids).to_numpy()
        n_px = int(emu.pixel_mask.sum())
        print(f"\n=== trained on {train_lib} ({len(trained.reference)} stars after removing "
              f"{len(ref) - len(trained.reference)} label outliers; {n_px} pixels modelled, "
              f"{emu.wave[emu.pixel_mask].min():.0f}–{emu.wave[emu.pixel_mask].max():.0f} Å), "
              f"fitting {fit_lib} visits against {fit_lib}'s labels [{time.perf_counter() - t0:.0f} s]")
        print(format_table1(label_residuals(fitted[~seen], truth[~seen], emu.label_names), emu.label_names,
                            f"{int((~seen).sum())} visits of {vis.loc[~seen, 'MANGAID'].nunique()} {fit_lib} stars "
                            f"that {train_lib} does not hold (the headline)"))
        if seen.any():
            print(format_table1(label_residuals(fitted[seen], truth[seen], emu.label_names), emu.label_names,
                                f"{int(seen.sum())} visits of {vis.loc[seen, 'MANGAID'].nunique()} stars in both "
                                f"libraries (their {train_lib} spectrum was in training, with {train_lib}'s labels)"))


if __name__ == "__main__":
    main()
