"""The paper's §5.2 study: what the synthetic spectra do for the fit of real stars.

    python -m mastar_vac.studies.semi_empirical                       # the demo build, builtin grid
    python -m mastar_vac.studies.semi_empirical --output output/demo --grid path/to/grid.hdr

Three emulators, trained with the build's settings on the build's own split, fit the same
held-out real stars (the build's validation stars, drawn before any cleaning), visit by
visit at each visit's own S/N:

(a) **empirical**: the cleaned empirical training stars only;
(b) **semi-empirical**: those plus the theoretical extension (synthetic spectra at PARSEC
    isochrone points above ``[synthetic] teff_min``, paper §2.4), as the build makes it;
(c) **synthetic**: synthetic spectra only, at the empirical training stars' own labels
    (the empirical label distribution, as the paper), where the grid covers them.

Printed and written to ``<output>/studies/semi_empirical/``: Table 1 per model and Teff
range (``table.txt``, ``table.json``), and the Figure 15 analogue (``example_fits.png``):
a cool dwarf, a warm dwarf and a hot star, each with the three models' best fits. A
synthetic-only emulator knows nothing outside its grid: (c) is scored on the held-out
stars inside the grid's label range only, and the table says how many that is.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["run_study", "main"]

log = logging.getLogger(__name__)

MODELS = ("empirical", "semi-empirical", "synthetic")


def _split_train_test(idx: NDArray[np.int64], seed: int, test_fraction: float = 0.1
                      ) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    rng = np.random.default_rng(seed)
    p = rng.permutation(idx)
    n_test = max(1, int(round(test_fraction * len(p)))) if len(p) > 1 else 0
    return np.sort(p[n_test:]), np.sort(p[:n_test])


def _inside(labels: NDArray, grid: Any, plan: Any) -> NDArray[np.bool_]:
    """Rows whose labels lie inside the grid's range on every axis a label reads."""
    from ..synthetic import _convert, _our_quantity

    lo, hi = grid.label_range
    ok = np.ones(len(labels), bool)
    for j, name in enumerate(plan.label_names):
        a = plan.label_axis.get(name)
        if a is None:
            continue
        x = _convert(labels[:, j], _our_quantity(name)[1], plan.axes[a].scale)
        ok &= (x >= lo[a]) & (x <= hi[a])
    return ok


def run_study(output: Path, grid_path: Path, *, config: Any, progress: bool = False) -> dict[str, Any]:
    """Train the three emulators, fit the held-out visits, write the tables and figure."""
    from ..emulator import train_emulator
    from ..io.cube import open_cube
    from ..io.ferre import read_ferre
    from ..plots import plot_example_fits
    from ..reference import ReferenceSet
    from ..synthetic import make_synthetic_reference, n_synthetic, plan_labels, target_lsf
    from ..validate import format_table1, label_residuals, validate_visits, visits_of

    cfg = config
    tdir = output / "training"
    for need in (tdir / "reference_clean.npz", tdir / "split.npz", output / "cube.zarr"):
        if not need.exists():
            raise SystemExit(f"{need} not found: run `python -m mastar_vac.build` first (with --output {output})")
    ref = ReferenceSet.load(tdir / "reference_clean.npz")
    split = dict(np.load(tdir / "split.npz"))
    emp = ref.source == "empirical"
    train_idx = split["train"][emp[split["train"]]]
    test_idx = split["test"][emp[split["test"]]]
    held = split["validation"][emp[split["validation"]]]
    empirical = ref.subset(np.concatenate([train_idx, test_idx]))
    n_tr = len(train_idx)
    emp_split = {"train": np.arange(n_tr), "test": np.arange(n_tr, len(empirical)),
                 "validation": np.array([], np.int64)}

    cube = open_cube(output / "cube.zarr")
    grid = read_ferre(grid_path)
    lsf_sigma = target_lsf(cfg.synthetic, cube["disp"])
    plan = plan_labels(grid, ref.label_names, cfg.synthetic)
    synth_args = {"lsf_sigma_aa": lsf_sigma, "config": cfg.synthetic, "wave": ref.wave,
                  "window": cfg.normalize.window, "min_count": cfg.normalize.min_count}

    # (b) the theoretical extension, as the build makes it
    ext = make_synthetic_reference(grid, n_synthetic(cfg.synthetic, len(empirical)), ref.label_names, **synth_args)
    e_tr, e_te = _split_train_test(np.arange(len(ext)), cfg.run.seed)
    semi = empirical.concat(ext)
    semi_split = {"train": np.concatenate([emp_split["train"], len(empirical) + e_tr]),
                  "test": np.concatenate([emp_split["test"], len(empirical) + e_te]),
                  "validation": np.array([], np.int64)}
    # (c) synthetic spectra at the empirical training labels inside the grid
    inside = _inside(empirical.labels, grid, plan)
    at = empirical.labels[inside]
    syn = make_synthetic_reference(grid, len(at), ref.label_names, at_labels=at, **synth_args)
    s_tr, s_te = _split_train_test(np.arange(len(syn)), cfg.run.seed + 1)
    syn_split = {"train": s_tr, "test": s_te, "validation": np.array([], np.int64)}
    log.info("§5.2: %d empirical, %d + %d semi-empirical, %d synthetic-only spectra (%d empirical labels "
             "outside the grid)", len(empirical), len(empirical), len(ext), len(syn), int((~inside).sum()))

    sets = {"empirical": (empirical, emp_split), "semi-empirical": (semi, semi_split), "synthetic": (syn, syn_split)}
    mid = cube["mangaid"].values.astype(str)
    vsel, vref = visits_of(mid, ref.ids[held], ref.labels[held])
    vflux = cube["norm_flux"].isel(visit=vsel).values
    vivar = cube["norm_ivar"].isel(visit=vsel).values
    v_inside = _inside(vref, grid, plan)
    tables: dict[str, Any] = {}
    fitted: dict[str, NDArray] = {}
    emus: dict[str, Any] = {}
    texts = []
    for name in MODELS:
        r, s = sets[name]
        res = train_emulator(r.labels, r.flux, r.ivar, label_names=r.label_names, wave=r.wave, config=cfg.emulator,
                             split=s, progress=progress)
        emu = res.emulator
        emu.config["start_grid"] = r.labels[s["train"]].tolist()
        emus[name] = emu
        rows = np.flatnonzero(v_inside) if name == "synthetic" else np.arange(len(vsel))
        t, df = validate_visits(emu, vflux[rows], vivar[rows], vref[rows], config=cfg.fit)
        f = np.full(vref.shape, np.nan)
        f[rows] = df[[f"FIT_{n}" for n in ref.label_names]].to_numpy()
        fitted[name] = f
        tables[name] = t
        note = (f" — only the {len(rows)} visits inside the grid's label range" if name == "synthetic" else "")
        texts.append(format_table1(t, ref.label_names, f"({'abc'[MODELS.index(name)]}) {name} emulator "
                                   f"({len(s['train'])} training spectra): {len(rows)} held-out visits{note}"))
    # the same visits for all three, for a like-for-like line
    if v_inside.any():
        for name in ("empirical", "semi-empirical"):
            t = label_residuals(fitted[name][v_inside], vref[v_inside], ref.label_names)
            tables[f"{name} (inside grid)"] = t
            texts.append(format_table1(t, ref.label_names, f"    {name} emulator on the same {int(v_inside.sum())} "
                                       "visits as (c)"))
    text = (f"Paper §5.2 study on {len(held)} held-out real stars ({len(vsel)} visits, each at its own S/N); "
            f"grid {grid_path}\n\n" + "\n\n".join(texts))
    d = output / "studies" / "semi_empirical"
    d.mkdir(parents=True, exist_ok=True)
    (d / "table.txt").write_text(text + "\n")
    (d / "table.json").write_text(json.dumps(tables, indent=1, default=float))
    print(text)
    fig = _example_fits(d / "example_fits.png", emus, fitted, vflux, vivar, vref, mid[vsel], ref.label_names,
                        plot_example_fits)
    return {"tables": tables, "figure": fig, "text": text}


def _example_fits(path: Path, emus: dict[str, Any], fitted: dict[str, NDArray], flux: NDArray, ivar: NDArray,
                  ref_labels: NDArray, ids: NDArray, label_names: Sequence[str], plot: Any) -> Path:
    """Figure 15 analogue: a cool dwarf, a warm dwarf and a hot star (highest-S/N visit
    of each kind among the held-out stars), each with the three models' best fits."""
    from ..validate import median_snr

    t, g = ref_labels[:, label_names.index("TEFF")], ref_labels[:, label_names.index("LOGG")]
    snr = median_snr(flux, ivar)
    kinds = {"cool dwarf": (t < 5500) & (g > 4.0), "warm dwarf": (t >= 5500) & (t < 7500) & (g > 3.8),
             "hot star": t >= 9000}
    rows, models, captions = [], [], []
    for kind, sel in kinds.items():
        if not sel.any():
            continue
        i = int(np.flatnonzero(sel)[np.nanargmax(np.where(sel, snr, -np.inf)[sel])])
        for name, emu in emus.items():
            lab = fitted[name][i]
            if not np.isfinite(lab).all():
                continue
            rows.append(i)
            models.append(np.where(emu.pixel_mask, emu.predict(lab[None])[0], np.nan))
            captions.append(f"{kind} {ids[i]} (catalogue {ref_labels[i, 0]:.0f} K, {ref_labels[i, 1]:.2f}, "
                            f"{ref_labels[i, 2]:+.2f}) — {name}: {lab[0]:.0f} K, {lab[1]:.2f}, {lab[2]:+.2f}")
    wave = next(iter(emus.values())).wave
    return plot(wave, flux[rows], ivar[rows], np.array(models), captions, path, max_spectra=9)


def main(argv: Sequence[str] | None = None) -> int:
    import os

    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    ap = argparse.ArgumentParser(prog="python -m mastar_vac.studies.semi_empirical",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=None, help="the build's configuration (default demo.toml)")
    ap.add_argument("--output", type=Path, default=None, help="the build's output directory (default: its [output])")
    ap.add_argument("--grid", default=None,
                    help="FERRE grid, or 'builtin' (default: the configuration's synthetic_grid, else builtin)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    from ..config import load_config

    cfg = load_config(args.config)
    output = Path(args.output or cfg.output.dir)
    choice = args.grid or cfg.inputs.synthetic_grid or "builtin"
    if str(choice) == "builtin":
        from ..builtin_grid import builtin_grid_path

        grid = builtin_grid_path()  # built once into the cache, as the build does
    else:
        grid = Path(choice)
    run_study(output, grid, config=cfg)
    # the build's report gains the study's section (report_build looks for its files)
    from ..report_build import build_report
    from ..stages import StageContext

    paths = build_report(StageContext(cfg, output, progress=False))
    log.info("report updated: %s", ", ".join(map(str, paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
