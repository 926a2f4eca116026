"""The paper's §5.1 study: how the catalogue moves with the spectra's resolution.

    python -m mastar_vac.build                                        # lsf = "ignore" (the paper)
    python -m mastar_vac.build --config pipelines/demo_forward.toml   # lsf = "forward"
    python -m mastar_vac.studies.resolution                           # the study, on both builds

The library at four homogenized resolutions — the 60th, 75th, 90th and 99.5th
percentile LSF curves of the visits' DISP, per pixel — as the LSF-homogenized MaStar
catalogues (``mastar-combspec-…-lsfpercentP.fits``) hold it: for each curve, the visits
sharper than it at every wavelength, each broadened to it (:func:`mastar_vac.lsf.homogenize`)
and co-added per star. Each of the four catalogues is then fitted by each build's
emulator, with that build's ``[fit]`` settings: ``"ignore"`` fits the network's output as
it is, ``"forward"`` broadens it to the curve. The Figure 14 analogue
(``resolution.png``): per star present in all four, each catalogue's deviation from the
star's median over the four, against Teff, per label, for both modes; ``table.txt`` /
``table.json``: the median |deviation| per label and Teff range, and the median
deviation per catalogue (the sign says which way a sharper catalogue moves).

The real catalogues, when you have them, are read instead (``--combspec FILE …``, one
file per percentile, P from the name ``…-lsfpercentP.fits``): one row per star, MANGAID,
WAVE, FLUX, IVAR and MASK required (datamodels.md §1.11; the layout is unconfirmed, so
the reader checks each file's columns, vector lengths and wavelength grid — it must be
the cube's — and names the file, row and column of what it refuses). Their flux is
continuum-normalized as the build normalizes visits (``[normalize]``). A file with a
``DISP`` column gives each star's target LSF; without one the target is the P-th
percentile curve of the cube's visits' DISP, the catalogue's definition. Stars are
matched by MANGAID; a star twice in one file is an error. (The build still refuses
``[inputs] combspec``: a catalogue of co-added stars is this study's input, not a run's.)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["PERCENTILES", "combspec_catalogue", "homogenized_catalogues", "percentile_curve", "run_study", "main"]

log = logging.getLogger(__name__)

PERCENTILES = (60.0, 75.0, 90.0, 99.5)
MODES = ("ignore", "forward")
TEFF_RANGES = (("all", 0.0, np.inf), ("Teff < 6000 K", 0.0, 6000.0), ("Teff > 6000 K", 6000.0, np.inf))


def percentile_curve(sigma: NDArray, p: float) -> NDArray[np.float64]:
    """The per-pixel P-th percentile of the visits' LSF σ (n, P), over the visits whose σ
    is usable (finite, > 0) at every pixel: the curve a catalogue is homogenized to."""
    from ..lsf import reference_sigma

    usable = (np.isfinite(sigma) & (sigma > 0)).all(axis=1)
    return reference_sigma(sigma[usable], p)


def homogenized_catalogues(star_ids: NDArray, flux: NDArray, ivar: NDArray, sigma: NDArray, *,
                           percentiles: Sequence[float] = PERCENTILES, tolerance: float = 1e-3
                           ) -> dict[float, dict[str, Any]]:
    """The per-star spectra at each percentile LSF curve (all σ in pixels).

    ``flux``, ``ivar`` (n, P) normalized visits of stars ``star_ids`` (n,), ``sigma`` (n, P)
    their LSF σ. For each percentile P the curve is the per-pixel P-th percentile of
    ``sigma``; the visits no broader than it anywhere (within ``tolerance``, relative)
    are broadened to it and co-added per star (inverse-variance weights). Returns per P
    a dict with ``ids`` (stars), ``flux``, ``ivar``, ``curve`` (P,), ``n_visits``."""
    from ..lsf import homogenize
    from ..reference import coadd

    sig = np.where(np.isfinite(sigma) & (sigma > 0), sigma, np.nan)
    usable = np.isfinite(sig).all(axis=1)
    out: dict[float, dict[str, Any]] = {}
    for p in percentiles:
        curve = percentile_curve(sigma, p)
        sel = np.flatnonzero(usable & (sig <= curve[None, :] * (1 + tolerance)).all(axis=1))
        f, iv = homogenize(flux[sel], ivar[sel], np.minimum(sig[sel], curve[None, :]), curve)
        ids, groups = np.unique(np.asarray(star_ids)[sel], return_inverse=True)
        cf, ci = coadd(f, iv, groups, len(ids))
        out[p] = {"ids": ids, "flux": cf, "ivar": ci, "curve": curve, "sigma": np.broadcast_to(curve, cf.shape),
                  "n_visits": int(len(sel)), "n_visits_total": int(len(sig)), "source": "cube"}
        log.info("LSF percentile %g: %d of %d visits sharper than the curve everywhere, %d stars", p, len(sel),
                 len(sig), len(ids))
    return out


_PERCENT = re.compile(r"lsfpercent(\d+(?:\.\d+)?)")


def combspec_catalogue(path: Path, *, wave: NDArray, visit_sigma: NDArray, normalize: Any,
                       bad_mask_bits: int = -1) -> tuple[float, dict[str, Any]]:
    """One real LSF-homogenized catalogue (``mastar-combspec-…-lsfpercentP.fits``): its
    percentile P from the file name, its stars' spectra continuum-normalized as the build
    normalizes (``normalize``: the ``[normalize]`` settings), and each star's target LSF
    σ in pixels of ``wave`` — the file's DISP where it has one, else the P-th percentile
    curve of ``visit_sigma`` (the visits' σ in pixels, (n, P)). Same keys as
    :func:`homogenized_catalogues`' entries."""
    from ..errors import InputFileError
    from ..fit import disp_to_pixels
    from ..io.combspec import CombspecReader
    from ..normalize import normalize_spectra

    path = Path(path)
    m = _PERCENT.search(path.name)
    if m is None:
        raise InputFileError(path, "the file name does not say which LSF percentile it holds",
                             expected="a name containing lsfpercentP, e.g. mastar-combspec-v3_1_1-v1_7_7-"
                                      "lsfpercent99.5.fits")
    p = float(m.group(1))
    parts: dict[str, list] = {"ids": [], "flux": [], "ivar": [], "mask": [], "disp": []}
    with CombspecReader(path, wave=np.asarray(wave), npix=len(wave)) as r:
        for blk in r.iter_blocks(1024):
            parts["ids"].append(blk.meta["MANGAID"])
            for k in ("flux", "ivar", "mask", "disp"):
                parts[k].append(getattr(blk, k))
    ids = np.concatenate(parts["ids"]).astype(str)
    uniq, first, counts = np.unique(ids, return_index=True, return_counts=True)
    if (counts > 1).any():
        dup = uniq[counts > 1][0]
        rows = np.flatnonzero(ids == dup)
        raise InputFileError(path, f"MANGAID {dup} is in rows {rows.tolist()}", row=int(rows[1]), column="MANGAID",
                             expected="one row per star")
    flux, ivar, mask, disp = (np.concatenate(parts[k])[first] for k in ("flux", "ivar", "mask", "disp"))
    nf, ni = normalize_spectra(flux, ivar, mask, window=normalize.window, min_count=normalize.min_count,
                               bad_mask_bits=bad_mask_bits)
    curve = percentile_curve(visit_sigma, p)
    sigma = disp_to_pixels(disp, np.asarray(wave))
    has = (np.isfinite(sigma) & (sigma > 0)).all(axis=1)
    sigma = np.where(has[:, None], sigma, curve[None, :])
    log.info("%s: LSF percentile %g, %d stars; target LSF from its DISP for %d, from the visits' %g percentile "
             "curve for %d", path.name, p, len(uniq), int(has.sum()), p, int((~has).sum()))
    return p, {"ids": uniq, "flux": nf, "ivar": ni, "curve": curve, "sigma": sigma, "n_visits": None,
               "n_visits_total": int(len(visit_sigma)), "source": str(path)}


def deviations(fits: dict[float, NDArray]) -> NDArray[np.float64]:
    """(n_catalogues, n_stars, L): each catalogue's labels minus the star's median over them."""
    stack = np.stack([fits[p] for p in sorted(fits)])
    with np.errstate(invalid="ignore"):
        return stack - np.nanmedian(stack, axis=0, keepdims=True)


def median_teff(fitted: dict[float, NDArray], t: int) -> NDArray[np.float64]:
    """Per star, the median over the catalogues of fitted Teff (column ``t``): the x axis."""
    with np.errstate(invalid="ignore"):
        return np.nanmedian(np.stack([fitted[p][:, t] for p in sorted(fitted)]), axis=0)


def run_study(ignore_output: Path, forward_output: Path, *, ignore_config: Any, forward_config: Any,
              out_dir: Path, combspec: Sequence[Path] = ()) -> dict[str, Any]:
    """Make the four catalogues from the ignore build's cube (or read them from the real
    ``combspec`` files), fit them with both builds' emulators, write the table and the
    figure."""
    from ..emulator import load_emulator
    from ..fit import disp_to_pixels, fit_spectra
    from ..io.cube import open_cube

    for need in (ignore_output / "cube.zarr", ignore_output / "emulator", forward_output / "emulator"):
        if not need.exists():
            raise SystemExit(f"{need} not found: run both builds first (see `python -m mastar_vac.studies.resolution "
                             f"--help`)")
    emus = {"ignore": load_emulator(ignore_output / "emulator"), "forward": load_emulator(forward_output / "emulator")}
    if emus["forward"].lsf_sigma_ref is None:
        raise SystemExit(f"{forward_output / 'emulator'} records no reference LSF: it is not a build with "
                         f"[fit] lsf = 'forward'")
    fit_cfg = {"ignore": dataclasses.replace(ignore_config.fit, lsf="ignore"),
               "forward": dataclasses.replace(forward_config.fit, lsf="forward")}
    cube = open_cube(ignore_output / "cube.zarr")
    wave = cube["wave"].values
    sigma = disp_to_pixels(cube["disp"].values, wave)
    if combspec:
        cats = dict(combspec_catalogue(f, wave=wave, visit_sigma=sigma, normalize=ignore_config.normalize,
                                       bad_mask_bits=ignore_config.cube.bad_mask_bits) for f in combspec)
        if len(cats) < 2:
            raise SystemExit(f"--combspec: {len(combspec)} file(s) for {len(cats)} percentile(s); the study compares "
                             f"at least two")
    else:
        cats = homogenized_catalogues(cube["mangaid"].values.astype(str), cube["norm_flux"].values,
                                      cube["norm_ivar"].values, sigma)
    percentiles = sorted(cats)
    cats = {p: cats[p] for p in percentiles}
    common = sorted(set.intersection(*(set(c["ids"].tolist()) for c in cats.values())))
    log.info("%d stars are in all %d catalogues", len(common), len(cats))
    fitted: dict[str, dict[float, NDArray]] = {m: {} for m in MODES}
    failed: dict[str, dict[str, int]] = {m: {} for m in MODES}  # fits that gave no labels, per catalogue
    for p, c in cats.items():
        rows = np.searchsorted(c["ids"], common)
        for mode in MODES:
            lsf_sigma = c["sigma"][rows] if mode == "forward" else None
            res = fit_spectra(emus[mode], c["flux"][rows], c["ivar"][rows], config=fit_cfg[mode], lsf_sigma=lsf_sigma)
            fitted[mode][p] = res.labels
            failed[mode][f"{p:g}"] = int((~np.isfinite(res.labels).all(axis=1)).sum())
    names = emus["ignore"].label_names
    t = names.index("TEFF")
    summary: dict[str, Any] = {"n_stars": len(common), "percentiles": percentiles,
                               "sources": {str(p): c["source"] for p, c in cats.items()},
                               "visits_used": {str(p): c["n_visits"] for p, c in cats.items()},
                               "n_visits": cats[percentiles[0]]["n_visits_total"], "failed_fits": failed,
                               "modes": {}}
    if combspec:
        made = "read from " + ", ".join(Path(c["source"]).name for c in cats.values())
    else:
        made = ("built from the cube; visits used per percentile: "
                + ", ".join(f"{p:g}: {c['n_visits']}" for p, c in cats.items()) + f" of {summary['n_visits']}")
    lines = [f"§5.1: {len(common)} stars in all {len(cats)} LSF-homogenized catalogues ({made})",
             "failed fits (no labels; left out of the medians) per catalogue: "
             + "; ".join(f"{m} " + ", ".join(f"P{p} {k}" for p, k in failed[m].items()) for m in MODES),
             "median |deviation from the star's median over the catalogues|"]
    lines.append(f"{'mode':<9}{'Teff range':<16}{'N':>5}" + "".join(f"{n:>12}" for n in names))
    for mode in MODES:
        dev = deviations(fitted[mode])
        teff = median_teff(fitted[mode], t)
        ms: dict[str, Any] = {}
        for rng_name, lo, hi in TEFF_RANGES:
            sel = (teff >= lo) & (teff < hi)
            ms[rng_name] = {"n": int(sel.sum()), **{n: float(np.nanmedian(np.abs(dev[:, sel, j])))
                                                    for j, n in enumerate(names)}}
            lines.append(f"{mode:<9}{rng_name:<16}{int(sel.sum()):>5}"
                         + "".join(f"{ms[rng_name][n]:>12.4g}" for n in names))
        ms["median_deviation_per_catalogue"] = {str(p): {n: float(np.nanmedian(dev[k, :, j])) for j, n in
                                                         enumerate(names)} for k, p in enumerate(percentiles)}
        summary["modes"][mode] = ms
    lines.append("median deviation per catalogue (sharpest first): a trend with the percentile is the LSF's effect")
    for mode in MODES:
        for p in percentiles:
            d = summary["modes"][mode]["median_deviation_per_catalogue"][str(p)]
            lines.append(f"{mode:<9}{'P' + format(p, 'g'):<16}{'':>5}" + "".join(f"{d[n]:>+12.4g}" for n in names))
    ratio = {n: summary["modes"]["ignore"]["all"][n] / max(summary["modes"]["forward"]["all"][n], 1e-12)
             for n in names}
    summary["spread_ratio_ignore_over_forward"] = ratio
    lines.append("spread ratio ignore / forward (all stars): "
                 + ", ".join(f"{n} {r:.2f}×" for n, r in ratio.items()))
    text = "\n".join(lines)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "table.txt").write_text(text + "\n")
    (out_dir / "table.json").write_text(json.dumps(summary, indent=1))
    _figure(out_dir / "resolution.png", fitted, names)
    print(text)
    return summary


def _figure(path: Path, fitted: dict[str, dict[float, NDArray]], names: Sequence[str]) -> Path:
    """Figure 14 analogue: deviation from the star's median against Teff, per label, one
    row per mode, one colour per catalogue."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..plots import _teff_axis, save_figure

    t = list(names).index("TEFF")
    fig, axes = plt.subplots(len(MODES), len(names), figsize=(4.2 * len(names), 3.2 * len(MODES)), squeeze=False)
    percentiles = sorted(fitted[MODES[0]])
    colours = plt.cm.viridis(np.linspace(0, 0.9, len(percentiles)))
    devs = {mode: deviations(fitted[mode]) for mode in MODES}
    for r, mode in enumerate(MODES):
        dev = devs[mode]
        teff = median_teff(fitted[mode], t)
        for j, n in enumerate(names):
            ax = axes[r, j]
            for k, p in enumerate(percentiles):
                ax.scatter(teff, dev[k, :, j], s=3, alpha=0.5, color=colours[k], label=f"P{p:g}")
            ax.axhline(0, color="k", lw=0.5)
            _teff_axis(ax, teff)
            # the same scale in both rows: the "ignore" row's spread
            d0 = devs[MODES[0]][:, :, j]
            lim = 1.2 * np.nanpercentile(np.abs(d0), 99) if np.isfinite(d0).any() else 1.0
            ax.set_ylim(-lim, lim)
            ax.set_title(f"{n}, lsf = {mode!r}", fontsize=9)
            if r == len(MODES) - 1:
                ax.set_xlabel("Teff (K), median over the catalogues")
            if j == 0:
                ax.set_ylabel("catalogue − star median")
    axes[0, 0].legend(fontsize=7, markerscale=3)
    fig.tight_layout()
    return save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    from ..config import load_config
    from ..errors import MastarVacError

    ap = argparse.ArgumentParser(prog="python -m mastar_vac.studies.resolution", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=None, help="the lsf = 'ignore' build's configuration (demo.toml)")
    ap.add_argument("--forward-config", type=Path, default=Path("pipelines/demo_forward.toml"),
                    help="the lsf = 'forward' build's configuration")
    ap.add_argument("--out", type=Path, default=None, help="where to write (default <ignore output>/studies/resolution)")
    ap.add_argument("--combspec", type=Path, nargs="+", default=(), metavar="FILE",
                    help="real mastar-combspec-…-lsfpercentP.fits files to fit instead of catalogues built from the cube")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        ci = load_config(args.config)
        cf = load_config(args.forward_config)
        if cf.fit.lsf != "forward":
            raise SystemExit(f"{args.forward_config}: [fit] lsf is {cf.fit.lsf!r}, not 'forward'")
        oi, of = Path(ci.output.dir), Path(cf.output.dir)
        run_study(oi, of, ignore_config=ci, forward_config=cf, out_dir=args.out or oi / "studies" / "resolution",
                  combspec=args.combspec)
    except MastarVacError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
