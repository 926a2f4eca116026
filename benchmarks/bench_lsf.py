"""Benchmark: the LSF forward model against the paper's "ignore", on the same folds (issue 14).

    python -m benchmarks.bench_lsf              # 5 folds, both modes
    python -m benchmarks.bench_lsf --folds 3
    python -m benchmarks.bench_lsf --per-visit --max-folds 2   # + training on visits, not co-adds

Every star of the demo reference set (as it was before any cleaning; run the build
first) is held out once, with the folds of ``bench_validation``. Per fold two emulators
are trained on the same stars with the build's settings:

- **ignore** (the paper, §2.2): the network is fitted to the co-adds as they are, whatever
  their resolution, and each visit is fitted with the network's output unbroadened;
- **forward**: the network predicts the spectrum at the reference LSF σ_ref (the 1st
  percentile of the visits' DISP) and is trained through each co-add's differential
  kernel; each visit is fitted with that output broadened by its own DISP;
- **forward-visits** (``--per-visit``): as forward, but trained on the training stars'
  individual visits (the reference stage's visit cuts applied), each through its own
  DISP, instead of on co-adds (issue 14 asks which is better). Two to three times as
  many training spectra: ``--max-folds`` bounds the run.

Printed, over all visits of the held-out stars, each at its own S/N:

1. Table 1 per mode.
2. The slope of fitted − catalogue label against the visit's LSF width (the visit's
   median σ / the median visit's σ, per pixel; 1.1 = 10% broader than the median), per
   label — the width measured over all pixels, and over 6,300–9,000 Å only, where every
   demo library is sharper than MaStar and DISP is the visit's own LSF (blueward, a
   STELIB or MILES spectrum coarser than the visit sets DISP: a property of the library
   the spectrum came from, not of the visit): over all visits (Theil–Sen, what issue 14 asks), and within stars (each star's
   mean residual and mean width taken out first, so that a star's catalogue-label
   error does not enter) — and the ratio ignore / forward; then the same per library
   the visits were made from (demo's ``visit_sources.csv``): MILES and STELIB visits
   of one star differ in library as well as in LSF (STELIB is coarser than MaStar in
   the blue, so its visits are "broader"), which the pooled slope mixes in.
3. The training time per emulator in each mode, side by side in the same run.
"""

from __future__ import annotations

import os

os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")  # before distributed is imported

import dataclasses  # noqa: E402
import itertools  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

MODES = ("ignore", "forward")
PER_VISIT = "forward-visits"


def visit_width(sigma: np.ndarray, pixels: np.ndarray | None = None) -> np.ndarray:
    """Each visit's LSF width relative to the median visit: the median over ``pixels``
    (default all) of σ_visit / (the per-pixel median σ over all visits given)."""
    s = np.where(np.isfinite(sigma) & (sigma > 0), sigma, np.nan)
    if pixels is not None:
        s = s[:, pixels]
    with np.errstate(invalid="ignore"):
        med = np.nanmedian(s, axis=0)
        return np.nanmedian(s / med[None, :], axis=1)


def slopes(delta: np.ndarray, width: np.ndarray, star: np.ndarray) -> tuple[float, float]:
    """(over all visits, within stars): Theil–Sen slope of ``delta`` against ``width``."""
    from scipy.stats import theilslopes

    ok = np.isfinite(delta) & np.isfinite(width)
    d, w, s = delta[ok], width[ok], star[ok]
    plain = float(theilslopes(d, w)[0]) if len(d) > 2 else float("nan")
    # within stars: each star's mean taken out (stars with ≥ 2 visits of different widths)
    _, inv, cnt = np.unique(s, return_inverse=True, return_counts=True)
    keep = cnt[inv] >= 2
    if keep.sum() < 3:
        return plain, float("nan")
    dm = d - (np.bincount(inv, d) / cnt)[inv]
    wm = w - (np.bincount(inv, w) / cnt)[inv]
    within = float(theilslopes(dm[keep], wm[keep])[0])
    return plain, within


def _ratio(a: float, b: float) -> str:
    """|a| / |b| as text ("—" where it is not defined)."""
    if not (np.isfinite(a) and np.isfinite(b)) or abs(b) < 1e-9 * max(abs(a), 1e-12):
        return "—"
    return f"{abs(a) / abs(b):.1f}×"


def _visit_library(n_visits: int) -> np.ndarray | None:
    """Per cube visit, the library its demo spectrum was made from (None if unknown)."""
    import pandas as pd

    from mastar_vac.demo import demo_files

    try:
        s = pd.read_csv(demo_files().visit_sources, dtype={"IFUDESIGN": str})
    except Exception:  # noqa: BLE001 - not the demo, or no cache: no breakdown
        return None
    return s["LIBRARY"].to_numpy().astype(str) if len(s) == n_visits else None


def main() -> None:
    from benchmarks.bench_validation import cv_arguments, cv_inputs, fold_splits

    ap = cv_arguments(__doc__)
    ap.add_argument("--per-visit", action="store_true", help="also train the forward emulator on visits")
    ap.add_argument("--max-folds", type=int, default=None, help="run only the first N folds")
    args = ap.parse_args()
    cfg, ref, _, flagged, emp = cv_inputs(args)
    from mastar_vac.emulator import train_emulator
    from mastar_vac.fit import disp_to_pixels, fit_spectra
    from mastar_vac.io.cube import open_cube
    from mastar_vac.reference import reference_lsf, visit_cuts
    from mastar_vac.validate import format_table1, label_residuals, visits_of

    if not ref.has_lsf:
        raise SystemExit(f"{args.demo_output}: the reference set records no LSF per spectrum (made by an older "
                         f"version): run the build again")
    cube = open_cube(args.demo_output / "cube.zarr")
    wave = cube["wave"].values
    sigma_ref = reference_lsf(cube["disp"], wave)  # as the build's reference stage sets it
    ref_lsf = ref.lsf_sigma.copy()
    synth = ref.source == "synthetic"
    ref_lsf[synth] = sigma_ref  # synthetic spectra, if any, as a forward build makes them ("auto")
    visit_ids = cube["mangaid"].values.astype(str)
    vsel, vref = visits_of(visit_ids, ref.ids[emp], ref.labels[emp])
    vflux = cube["norm_flux"].isel(visit=vsel).values
    vivar = cube["norm_ivar"].isel(visit=vsel).values
    vsig = disp_to_pixels(cube["disp"].isel(visit=vsel).values, wave)
    width = visit_width(vsig)
    width_red = visit_width(vsig, (wave > 6300) & (wave < 9000))
    v_star = visit_ids[vsel]
    names = ref.label_names
    modes = MODES + ((PER_VISIT,) if args.per_visit else ())
    fitted = {m: np.full(vref.shape, np.nan) for m in modes}
    train_s: dict[str, list[float]] = {m: [] for m in modes}
    epochs: dict[str, list[int]] = {m: [] for m in modes}
    fit_ms: dict[str, list[float]] = {m: [] for m in modes}
    if args.per_visit:
        if synth.any():
            raise SystemExit("--per-visit: the reference set has synthetic spectra; this comparison is for "
                             "empirical sets")
        # the reference stage's visit cuts, so the visits are those its co-adds were made of
        cuts = visit_cuts(cube["mjdqual"].values[vsel], cube["s2n"].values[vsel], cube["n_good_pixels"].values[vsel],
                          cfg.reference)
        v_ok = ~np.logical_or.reduce([np.zeros(len(vsel), bool), *cuts.values()])
        row_of = {m: k for k, m in enumerate(ref.ids.astype(str))}
        v_row = np.array([row_of[m] for m in visit_ids[vsel]])  # each visit's reference-set row
    print(f"{len(emp)} reference stars, {len(vsel)} visits; visit LSF width (σ / median σ): "
          f"5–95% {np.nanpercentile(width, 5):.3f}–{np.nanpercentile(width, 95):.3f}; "
          f"σ_ref {sigma_ref.min():.2f}–{sigma_ref.max():.2f} px", flush=True)
    t0 = time.perf_counter()
    n_folds, held_run = 0, []
    for k, held, split in fold_splits(ref, flagged, args.folds, cfg.run.seed):
        if args.max_folds is not None and k >= args.max_folds:
            break
        n_folds += 1
        held_run.append(held)
        vs = np.flatnonzero(np.isin(v_star, ref.ids[held]))
        for mode in modes:
            fwd = mode != "ignore"
            t = time.perf_counter()
            if mode == PER_VISIT:  # the training and test stars' visits, each through its own DISP
                vsplit = {name: np.flatnonzero(v_ok & np.isin(v_row, split[name])) for name in ("train", "test")}
                r = train_emulator(ref.labels[v_row], vflux, vivar, label_names=names, wave=ref.wave,
                                   config=cfg.emulator, split=vsplit, progress=False, lsf_sigma=vsig,
                                   lsf_sigma_ref=sigma_ref)
            else:
                r = train_emulator(ref.labels, ref.flux, ref.ivar, label_names=names, wave=ref.wave,
                                   config=cfg.emulator, split=split, progress=False,
                                   lsf_sigma=ref_lsf if fwd else None, lsf_sigma_ref=sigma_ref if fwd else None)
            train_s[mode].append(time.perf_counter() - t)
            epochs[mode].append(r.epochs)
            emu = r.emulator
            emu.config["start_grid"] = ref.labels[split["train"]].tolist()
            fc = dataclasses.replace(cfg.fit, lsf="forward" if fwd else "ignore")
            t = time.perf_counter()
            res = fit_spectra(emu, vflux[vs], vivar[vs], config=fc, lsf_sigma=vsig[vs] if fwd else None)
            fit_ms[mode].append(1e3 * (time.perf_counter() - t) / max(len(vs), 1))
            fitted[mode][vs] = res.labels
        print(f"fold {k + 1}/{args.folds}: {len(held)} stars, {len(vs)} visits; training "
              + ", ".join(f"{train_s[m][-1]:.0f} s / {epochs[m][-1]} epochs ({m})" for m in modes)
              + f"  [{time.perf_counter() - t0:.0f} s]", flush=True)

    done = np.isin(v_star, ref.ids[np.concatenate(held_run)])  # the visits of the stars held out so far
    for mode in modes:
        print()
        print(format_table1(label_residuals(fitted[mode][done], vref[done], names), names,
                            f"{mode}: {args.folds}-fold cross-validation ({n_folds} folds run), the "
                            f"{int(done.sum())} visits of their held-out stars, each at its own S/N"))
    library = _visit_library(len(visit_ids))
    groups = {"all visits": done}
    if library is not None:
        for lib in ("MILES", "STELIB"):
            groups[f"{lib} visits"] = done & (library[vsel] == lib)
    print("\nslope of fitted − catalogue label against the visit's LSF width (per unit of σ/σ_median; "
          "×0.1 = per 10% broader); 'within': each star's mean taken out")
    for (gname, gsel), (wname, wv) in itertools.product(groups.items(), (("all pixels", width),
                                                                          ("6,300–9,000 Å", width_red))):
        print(f"{gname} ({int(gsel.sum())}), width over {wname} (5–95% {np.nanpercentile(wv[gsel], 5):.3f}–"
              f"{np.nanpercentile(wv[gsel], 95):.3f})")
        print(f"  {'label':<12}" + "".join(f"{m + ': all':>22}{'within':>10}" for m in modes)
              + f"{'ignore/forward: all':>21}{'within':>9}")
        for j, n in enumerate(names):
            s = {m: slopes(fitted[m][gsel, j] - vref[gsel, j], wv[gsel], v_star[gsel]) for m in modes}
            print(f"  {n:<12}" + "".join(f"{s[m][0]:>+22.4g}{s[m][1]:>+10.4g}" for m in modes)
                  + f"{_ratio(s['ignore'][0], s['forward'][0]):>21}{_ratio(s['ignore'][1], s['forward'][1]):>9}")
    if args.save is not None:
        import pandas as pd

        out = pd.DataFrame({"MANGAID": v_star, "VISIT_INDEX": vsel, "WIDTH": width, "WIDTH_RED": width_red,
                            "LIBRARY": library[vsel] if library is not None else ""})
        for j, n in enumerate(names):
            out[f"REF_{n}"] = vref[:, j]
            for m in modes:
                out[f"FIT_{m.upper().replace('-', '_')}_{n}"] = fitted[m][:, j]
        out.to_csv(args.save, index=False)
    per_epoch = {m: np.sum(train_s[m]) / max(np.sum(epochs[m]), 1) for m in modes}
    print("\ntraining per emulator (same run, same folds): " + ", ".join(
        f"{m} {np.mean(train_s[m]):.0f} s, {1e3 * per_epoch[m]:.0f} ms per epoch "
        f"({per_epoch[m] / per_epoch['ignore']:.2f}×)" for m in modes)
        + "; fit per visit: " + ", ".join(f"{m} {np.mean(fit_ms[m]):.2f} ms" for m in modes))


if __name__ == "__main__":
    main()
