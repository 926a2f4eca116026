"""The pipeline's stages as the build runs them: inputs read, the science function
called, products written, provenance recorded.

Each stage method returns ``(status, detail)`` with status "ran" or "reused". A stage is
reused when its product exists and was recorded with the same key — a hash of the
stage's input fingerprints, the upstream stage's key and its own settings
(:mod:`mastar_vac.io.provenance`).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import Config
from .errors import InputFileError
from .io.cube import file_fingerprint
from .io.provenance import is_current, read_record, record, stage_key

__all__ = ["StageContext"]

log = logging.getLogger(__name__)

# the fitter's own version in the keys of the stages that fit: raised when a change of
# mastar_vac.fit changes its results (2: Nielsen damping, one-pass emulator error), so
# that a build after an upgrade fits again instead of reusing the old fits
FIT_VERSION = 2

ALLSTAR_BASE_COLUMNS = ("APOGEE_ID", "RA", "DEC", "ASPCAPFLAG", "STARFLAG", "EXTRATARG", "GAIAEDR3_SOURCE_ID")
ALLSTAR_OPTIONAL_COLUMNS = ("SNR", "VSCATTER")  # used by the duplicate and binary cuts when present


@dataclass
class StageContext:
    cfg: Config
    outdir: Path
    progress: bool = True
    keys: dict[str, str] = field(default_factory=dict)

    # -- product paths -------------------------------------------------------
    @property
    def cube_path(self) -> Path:
        return self.outdir / "cube.zarr"

    @property
    def reference_path(self) -> Path:
        return self.outdir / "reference" / "reference_set.npz"

    @property
    def emulator_path(self) -> Path:
        return self.outdir / "emulator"

    @property
    def training_dir(self) -> Path:
        return self.outdir / "training"

    @property
    def diagnostic_path(self) -> Path:
        return self.training_dir / "emulator_diagnostic.json"

    @property
    def fits_path(self) -> Path:
        return self.outdir / "fit" / "fits.parquet"

    @property
    def validation_path(self) -> Path:
        return self.outdir / "validation" / "table1.json"

    @property
    def catalog_dir(self) -> Path:
        return self.outdir / "catalog"

    @property
    def vac_fits_path(self) -> Path:
        return self.catalog_dir / "mastar_vac_params.fits"

    @property
    def vac_parquet_path(self) -> Path:
        return self.catalog_dir / "mastar_vac_params.parquet"

    @property
    def compare_path(self) -> Path:
        return self.outdir / "compare" / "comparisons.json"

    @property
    def report_dir(self) -> Path:
        return self.outdir / "report"

    def emulator_in_use(self) -> Path:
        return Path(self.cfg.inputs.emulator) if self.cfg.inputs.emulator is not None else self.emulator_path

    # -- stages ----------------------------------------------------------------
    def ingest(self) -> tuple[str, str]:
        from .ingest import ingest_spectra

        c = self.cfg
        s = ingest_spectra(c.inputs.goodspec, self.cube_path, mastarall=c.inputs.mastarall, chunk=c.cube.chunk,
                           bad_mask_bits=c.cube.bad_mask_bits, progress=self.progress)
        status = "reused" if s.resumed and s.chunks_written == 0 else "ran"
        flagged = {k: v for k, v in s.flag_counts.items() if v}
        return status, f"{s.nvisit} visits, {s.chunks_written} chunks written; visit flags {flagged or 'none'}"

    def normalize(self) -> tuple[str, str]:
        from .normalize import normalize_cube

        c = self.cfg
        ran = normalize_cube(self.cube_path, window=c.normalize.window, min_count=c.normalize.min_count,
                             bad_mask_bits=c.cube.bad_mask_bits)
        self.keys["cube"] = stage_key(cube=self._cube_attrs())
        return ("ran" if ran else "reused"), f"window {c.normalize.window} px → norm_flux, norm_ivar"

    def _cube_attrs(self) -> dict[str, Any]:
        import zarr

        a = zarr.open_group(str(self.cube_path), mode="r", zarr_format=2, use_consolidated=False).attrs
        return {"source_tag": a.get("source_tag"), "normalized": a.get("normalized")}

    def reference(self) -> tuple[str, str]:
        from .io.allstar import read_allstar
        from .io.cube import open_cube
        from .io.gaia_xmatch import read_gaia_xmatch
        from .reference import allstar_columns_for, build_reference_set

        c = self.cfg
        sgrid = c.inputs.synthetic_grid
        if sgrid == "builtin":
            from .builtin_grid import builtin_grid_id

            # the cache name hashes the grid spec and the model file's bytes: the built grid
            # is deterministic, so it identifies the grid without building it first
            grid_id: Any = {"builtin": builtin_grid_id()}
        else:
            grid_id = file_fingerprint(sgrid)
        key = stage_key(cube=self.keys["cube"], allstar=file_fingerprint(c.inputs.allstar),
                        gaia=file_fingerprint(c.inputs.gaia_xmatch), reference=c.reference,
                        labels=c.emulator.labels, synthetic_grid=grid_id,
                        synthetic=c.synthetic if sgrid else None, lsf=c.fit.lsf, version=2)
        self.keys["reference"] = key
        if is_current(self.reference_path, key):
            return "reused", self._reference_detail()
        cube = open_cube(self.cube_path)
        cols = list(dict.fromkeys([*ALLSTAR_BASE_COLUMNS, *allstar_columns_for(c.emulator.labels)]))
        allstar = read_allstar(c.inputs.allstar, cols, optional=ALLSTAR_OPTIONAL_COLUMNS)
        gaia = read_gaia_xmatch(c.inputs.gaia_xmatch) if c.inputs.gaia_xmatch else None
        try:
            ref = build_reference_set(cube, allstar, gaia, c.emulator.labels, c.reference)
        except ValueError as exc:  # e.g. no star matched: a problem of the inputs, said plainly
            raise InputFileError(c.inputs.allstar, str(exc)) from None
        if len(ref) < 10:
            raise InputFileError(c.inputs.allstar, f"only {len(ref)} reference stars survive the match and cuts "
                                 f"({ref.cut_report}); at least 10 are needed to train",
                                 expected="APOGEE stars with valid labels among the MaStar targets")
        # the LSF an emulator trained through the LSF operator predicts at (and the
        # synthetic spectra's, with [synthetic] lsf_sigma = "reference")
        if c.fit.lsf == "forward" or (sgrid is not None and c.synthetic.lsf_sigma == "reference"):
            from .reference import reference_lsf

            try:
                ref.lsf_sigma_ref = reference_lsf(cube["disp"], cube["wave"].values)
            except ValueError as exc:
                raise InputFileError(self.cube_path, str(exc)) from None
            log.info("reference LSF σ_ref: the 1st percentile of the visits' DISP, %.2f–%.2f pixels",
                     float(ref.lsf_sigma_ref.min()), float(ref.lsf_sigma_ref.max()))
        if sgrid is not None:
            from .io.ferre import read_ferre
            from .synthetic import synthetic_extension, target_lsf

            if sgrid == "builtin":
                from .builtin_grid import builtin_grid_path

                grid_path = builtin_grid_path()
            else:
                grid_path = sgrid
            grid = read_ferre(grid_path)
            sref_aa = (ref.lsf_sigma_ref * cube["wave"].values * np.gradient(np.log(cube["wave"].values))
                       if len(ref.lsf_sigma_ref) else None)  # σ_ref back to Å
            target = target_lsf(c.synthetic, cube["disp"], fit_lsf=c.fit.lsf, sigma_ref_aa=sref_aa)
            synth = synthetic_extension(ref, grid, lsf_sigma_aa=target,
                                        config=c.synthetic, window=c.normalize.window,
                                        min_count=c.normalize.min_count)
            log.info("theoretical extension: %d synthetic spectra from %s", len(synth), grid_path)
            ref = ref.concat(synth)
        self.reference_path.parent.mkdir(parents=True, exist_ok=True)
        ref.save(self.reference_path)
        record(self.reference_path, key, n=len(ref), cuts=ref.cut_report)
        return "ran", self._reference_detail()

    def _reference_detail(self) -> str:
        rec = read_record(self.reference_path) or {}
        cuts = rec.get("cuts", {})
        shown = ", ".join(f"{k} {v}" for k, v in cuts.items() if k not in ("matched", "kept"))
        return f"{rec.get('n')} spectra ({cuts.get('matched')} matched to APOGEE; cuts: {shown})"

    def emulator(self) -> tuple[str, str]:
        from .emulator import emulator_diagnostic, format_diagnostic, save_emulator
        from .plots import plot_emulator_diagnostic
        from .reference import ReferenceSet
        from .train import train_reference_emulator

        c = self.cfg
        key = stage_key(reference=self.keys["reference"], emulator=c.emulator, fit=c.fit,
                        outlier_ratio=c.reference.outlier_chi2_ratio)
        self.keys["emulator"] = key
        if is_current(self.emulator_path, key):
            from .emulator import load_emulator as _load
            from .errors import ArtifactError

            try:  # reuse only an artifact that still matches its recorded hash and shapes
                _load(self.emulator_path, expected_hash=(read_record(self.emulator_path) or {}).get("hash"))
                return "reused", self._emulator_detail()
            except ArtifactError as exc:
                log.warning("the saved emulator fails its checks (%s); training it again", exc)
        ref = ReferenceSet.load(self.reference_path)
        trained = train_reference_emulator(ref, train_config=c.emulator, fit_config=c.fit,
                                           outlier_chi2_ratio=c.reference.outlier_chi2_ratio, progress=self.progress)
        emu = trained.result.emulator
        clean, split = trained.reference, trained.split
        # an emulator trained through the LSF operator predicts at σ_ref: its model is
        # broadened to each spectrum's LSF before it is compared
        sig = clean.lsf_sigma if emu.lsf_sigma_ref is not None else None
        diag = emulator_diagnostic(emu, clean.labels, clean.flux, clean.ivar, split, source=clean.source,
                                   lsf_sigma=sig)
        emu.metrics["diagnostic"] = diag
        log.info("emulator accuracy (fraction of pixels within 2%% / 4%%):\n%s", format_diagnostic(diag))
        d = self.training_dir
        d.mkdir(parents=True, exist_ok=True)
        clean.save(d / "reference_clean.npz")
        np.savez(d / "split.npz", **split)
        if trained.outliers is not None:
            trained.outliers.to_csv(d / "label_outliers.csv", index=False)
        self.diagnostic_path.write_text(json.dumps(diag, indent=1))
        (d / "emulator_diagnostic.txt").write_text(format_diagnostic(diag) + "\n")
        sets = {}  # the figure shows real spectra only: synthetic ones are not pooled with them
        for name, idx in split.items():
            idx = idx[clean.source[idx] == "empirical"]
            if len(idx):
                sets[name] = (emu.predict(clean.labels[idx], None if sig is None else sig[idx]), clean.flux[idx],
                              (clean.ivar[idx] > 0) & emu.pixel_mask[None, :])
        plot_emulator_diagnostic(sets, d / "emulator_diagnostic.png")
        save_emulator(emu, self.emulator_path)
        out = trained.outliers
        record(self.emulator_path, key, hash=emu.content_hash(), diagnostic=diag,
               n_outliers=int(out["removed"].sum()) if out is not None and "removed" in out else 0,
               n_flagged_validation=int((out["outlier"] & out["validation"]).sum())
               if out is not None and "validation" in out else 0,
               train_seconds=trained.result.seconds)
        return "ran", self._emulator_detail()

    def _emulator_detail(self) -> str:
        rec = read_record(self.emulator_path) or {}
        v = (rec.get("diagnostic") or {}).get("validation", {}).get("all", {})
        acc = (f"held-out real pixels within 2%: {100 * v['within_2pct']:.1f}%, within 4%: {100 * v['within_4pct']:.1f}%"
               if v else "")
        return (f"{rec.get('n_outliers', 0)} label outliers removed from training/test, "
                f"{rec.get('n_flagged_validation', 0)} held-out stars flagged and kept; {acc}")

    def use_given_emulator(self) -> tuple[str, str]:
        from .emulator import load_emulator

        emu = load_emulator(self.cfg.inputs.emulator)
        self.keys["emulator"] = emu.content_hash()[:20]
        return "reused", f"given emulator {self.cfg.inputs.emulator} ({emu.content_hash()[:12]})"


    def fit(self) -> tuple[str, str]:
        """Fit every visit on Dask; the per-visit results go to fit/fits.parquet."""
        from .emulator import load_emulator
        from .fit import STATUS, fit_cube
        from .io.atomic import atomic_path
        from .io.cube import open_cube
        from .io.gaia_xmatch import read_gaia_xmatch
        from .progress import compute
        from .starts import photometric_starts

        c = self.cfg
        key = stage_key(cube=self.keys["cube"], emulator=self.keys["emulator"], fit=c.fit,
                        gaia=file_fingerprint(c.inputs.gaia_xmatch), version=FIT_VERSION)
        self.keys["fit"] = key
        if is_current(self.fits_path, key):
            return "reused", self._fit_detail()
        emu_path = self.emulator_in_use()
        recorded = (read_record(emu_path) or {}).get("hash") if self.cfg.inputs.emulator is None else None
        emu = load_emulator(emu_path, expected_hash=recorded)
        cube = open_cube(self.cube_path)
        gaia = read_gaia_xmatch(c.inputs.gaia_xmatch) if c.inputs.gaia_xmatch else None
        starts = photometric_starts(gaia, cube["mangaid"].values.astype(str), emu.label_names)
        # per-block checkpoints: a killed fit resumes with the blocks it finished
        parts = self.fits_path.parent / f".blocks-{key}"
        ddf = fit_cube(cube, emu_path, config=c.fit, starts=starts, emulator_hash=emu.content_hash(),
                       parts_dir=parts)
        # ~30 numbers per visit: the table itself is small, the work was in the blocks
        df = compute(ddf, enabled=self.progress).reset_index(drop=True)
        df.insert(0, "VISIT_INDEX", np.arange(len(df), dtype=np.int64))
        with atomic_path(self.fits_path) as tmp:
            df.to_parquet(tmp, index=False)
        for old in self.fits_path.parent.glob(".blocks-*"):
            shutil.rmtree(old, ignore_errors=True)  # the product is complete: checkpoints go
        st = df["STATUS"].to_numpy()
        counts = {name: int((st == code).sum()) for name, code in STATUS.items()}
        record(self.fits_path, key, n=int(len(st)), status=counts, emulator=emu.content_hash())
        return "ran", self._fit_detail()

    def _fit_detail(self) -> str:
        rec = read_record(self.fits_path) or {}
        st = {k: v for k, v in (rec.get("status") or {}).items() if v}
        return f"{rec.get('n')} visits fitted; status {st}"

    def validation(self) -> tuple[str, str]:
        """Table 1 on the held-out reference stars: every visit at its own S/N (the
        headline), and the co-adds at S/N 50; all held-out stars, and separately those
        the label-outlier test flagged (they are never removed: see mastar_vac.train)."""
        from .emulator import load_emulator
        from .io.cube import open_cube
        from .reference import ReferenceSet
        from .validate import format_table1, label_residuals, validate_fit, validate_visits, visits_of

        c = self.cfg
        key = stage_key(emulator=self.keys["emulator"], fit=c.fit, cube=self.keys["cube"], version=(2, FIT_VERSION))
        if is_current(self.validation_path, key):
            return "reused", self._validation_detail()
        emu = load_emulator(self.emulator_path)
        ref = ReferenceSet.load(self.training_dir / "reference_clean.npz")
        split = dict(np.load(self.training_dir / "split.npz"))
        idx = split["validation"][ref.source[split["validation"]] == "empirical"]
        if len(idx) == 0:
            return "ran", "no held-out empirical stars"
        ids = ref.ids[idx]
        flagged_ids = set(self._flagged_validation_ids())
        flagged = np.isin(ids, list(flagged_ids))
        d = self.validation_path.parent
        d.mkdir(parents=True, exist_ok=True)
        names = emu.label_names
        tables: dict[str, Any] = {}
        texts: list[str] = []

        # 1. the headline: every visit of the held-out stars, as observed
        cube = open_cube(self.cube_path)
        mid = cube["mangaid"].values.astype(str)
        vsel, vis_ref = visits_of(mid, ids, ref.labels[idx])
        if len(vsel):
            from .fit import disp_to_pixels

            vsig = disp_to_pixels(cube["disp"].isel(visit=vsel).values, emu.wave) if c.fit.lsf == "forward" else None
            vt, vdf = validate_visits(emu, cube["norm_flux"].isel(visit=vsel).values,
                                      cube["norm_ivar"].isel(visit=vsel).values, vis_ref, config=c.fit,
                                      lsf_sigma=vsig)
            vflag = np.isin(mid[vsel], list(flagged_ids))
            vdf.insert(0, "MANGAID", mid[vsel])
            vdf.insert(1, "VISIT_INDEX", vsel)
            vdf.insert(2, "S2N", cube["s2n"].values[vsel])
            vdf["OUTLIER_FLAGGED"] = vflag
            vdf.to_csv(d / "validation_visits.csv", index=False)
            tables["visits"] = vt
            texts.append(format_table1(vt, names, f"Held-out reference stars ({len(ids)} stars, drawn before any "
                                       f"cleaning): all {len(vsel)} individual visits as observed, each at its own "
                                       f"S/N (median {np.nanmedian(cube['s2n'].values[vsel]):.0f})"))
            if vflag.any():
                ft = label_residuals(vdf.loc[vflag, [f"FIT_{n}" for n in names]].to_numpy(), vis_ref[vflag], names)
                tables["visits_flagged"] = ft
                texts.append(format_table1(ft, names, f"  of which the {int(vflag.sum())} visits of the "
                                           f"{int(flagged.sum())} held-out stars the label-outlier test flags "
                                           f"(kept above; catalogue labels likely wrong)"))
        # 2. the co-adds at a fixed S/N, comparable between runs
        table, df = validate_fit(emu, ref.labels[idx], ref.flux[idx], ref.ivar[idx], config=c.fit, snr=50.0,
                                 seed=c.run.seed, lsf_sigma=ref.lsf_sigma[idx] if ref.has_lsf else None)
        df.insert(0, "MANGAID", ids)
        df["OUTLIER_FLAGGED"] = flagged
        df.to_csv(d / "validation_snr50.csv", index=False)
        tables["snr50"] = table
        texts.append(format_table1(table, names, f"The same {len(ids)} stars' co-adds degraded to S/N "
                                   f"{table['median_snr']:.0f}"))
        if flagged.any():
            ft = label_residuals(df.loc[flagged, [f"FIT_{n}" for n in names]].to_numpy(), ref.labels[idx][flagged],
                                 names)
            tables["snr50_flagged"] = ft
            texts.append(format_table1(ft, names, f"  of which the {int(flagged.sum())} flagged stars"))
        text = "\n\n".join(texts)
        (d / "table1.txt").write_text(text + "\n")
        log.info("validation (Table 1 analogue):\n%s", text)
        self.validation_path.write_text(json.dumps(tables, indent=1, default=_json_default))
        record(self.validation_path, key, **{k: v for k, v in tables.items()})
        return "ran", self._validation_detail()

    def _flagged_validation_ids(self) -> list[str]:
        """MANGAIDs of held-out stars the label-outlier test flagged (kept in validation)."""
        import pandas as pd

        p = self.training_dir / "label_outliers.csv"
        if not p.exists():
            return []
        t = pd.read_csv(p, dtype={"id": str})
        if "validation" not in t.columns:
            return []
        return t.loc[t["validation"].astype(bool) & t["outlier"].astype(bool), "id"].astype(str).tolist()

    def _validation_detail(self) -> str:
        rec = read_record(self.validation_path) or {}
        t = rec.get("visits") or rec.get("snr50") or {}
        what = "per visit" if rec.get("visits") else "co-adds at S/N 50"
        parts = []
        for rng in ("Teff < 6000 K", "Teff > 6000 K", "Teff > 8000 K"):
            r = t.get(rng)
            if r and "TEFF" in r and r.get("n"):
                parts.append(f"{rng}: MAD Teff {r['TEFF']['mad']:.0f} K (N={r['n']}, failed {r.get('n_failed', 0)})")
        return (what + ": " + "; ".join(parts)) if parts else "see validation/table1.txt"


    # -- catalogue ---------------------------------------------------------------
    def catalog(self) -> tuple[str, str]:
        """Uncertainties, quality flags, the FITS VAC and the Parquet dataset."""
        import pandas as pd

        from . import __version__
        from .catalog import VAC_KEY, assemble_catalog
        from .emulator import load_emulator
        from .io.cube import open_cube
        from .io.vac import write_vac_fits, write_vac_parquet
        from .quality import coverage_distance, describe_bits, training_range_from_emulator
        from .uncertainty import format_precision_table

        c = self.cfg
        key = stage_key(fit=self.keys["fit"], uncertainty=c.uncertainty, quality=c.quality, version=__version__)
        self.keys["catalog"] = key
        if is_current(self.vac_parquet_path, key) and self.vac_fits_path.exists():
            return "reused", self._catalog_detail()
        emu = load_emulator(self.emulator_in_use())
        fits = pd.read_parquet(self.fits_path).sort_values("VISIT_INDEX").reset_index(drop=True)
        fits["COVERAGE_DIST"] = coverage_distance(emu, fits[list(emu.label_names)].to_numpy(np.float64),
                                                  k=c.quality.coverage_neighbours)
        visits = visit_table(open_cube(self.cube_path))
        vac, report = assemble_catalog(fits, visits, emu.label_names,
                                       training_range=training_range_from_emulator(emu, emu.label_names),
                                       uncertainty=c.uncertainty, quality=c.quality)
        # integrity: one row per input visit, unique keys (checked again on what was written)
        if len(vac) != len(visits) or vac.duplicated(list(VAC_KEY)).any():
            raise RuntimeError(f"catalogue integrity: {len(vac)} rows for {len(visits)} visits, keys unique: "
                               f"{not vac.duplicated(list(VAC_KEY)).any()}")
        bits = describe_bits(c.quality)
        prov = {"package_version": __version__, "emulator_hash": emu.content_hash(), "config": c.to_dict(),
                "inputs": {k: str(v) for k, v in c.to_dict()["inputs"].items() if isinstance(v, str)}}
        self.catalog_dir.mkdir(parents=True, exist_ok=True)
        write_vac_fits(self.vac_fits_path, vac, provenance=prov, flag_bits=bits, fitted_labels=emu.label_names)
        write_vac_parquet(self.vac_parquet_path, vac, provenance=prov, flag_bits=bits,
                          fitted_labels=emu.label_names)
        back = pd.read_parquet(self.vac_parquet_path, columns=list(VAC_KEY))
        if len(back) != len(visits) or back.duplicated(list(VAC_KEY)).any():
            raise RuntimeError(f"{self.vac_parquet_path}: {len(back)} rows written for {len(visits)} visits")
        (self.catalog_dir / "uncertainty.json").write_text(json.dumps(report, indent=1, default=_json_default))
        table3 = format_precision_table(pd.DataFrame(report["uncertainty"]["precision_table"]))
        widths = report["uncertainty"].get("calibration_width", {})
        text = (table3 + "\n\ncalibration: robust width of (x1 - x2)/sqrt(s1^2 + s2^2) over repeat pairs: "
                + ", ".join(f"{k} {v:.3f}" for k, v in widths.items()))
        (self.catalog_dir / "uncertainty.txt").write_text(text + "\n")
        log.info("uncertainties (Table 3 analogue):\n%s", text)
        from .quality import flag_counts

        record(self.vac_parquet_path, key, n=len(vac), n_visits=len(visits), n_valid=int(vac["VALID"].sum()),
               keys_unique=True, flags={k: v for k, v in flag_counts(vac["FLAG"].to_numpy()).items() if v},
               calibration_widths=widths)
        return "ran", self._catalog_detail()

    def _catalog_detail(self) -> str:
        rec = read_record(self.vac_parquet_path) or {}
        w = ", ".join(f"{k} {v:.2f}" for k, v in (rec.get("calibration_widths") or {}).items())
        return (f"{rec.get('n')} rows = {rec.get('n_visits')} input visits, keys unique; "
                f"{rec.get('n_valid')} VALID; repeat-pair widths {w}")

    def compare(self) -> tuple[str, str]:
        """Cross-match with LAMOST / SEGUE / Gaia DR3 / a labels table; Table 2; CMD."""
        import dask.dataframe as dd
        import pandas as pd

        from .compare import cmd_table, comparison_table, crossmatch, format_comparison_tables
        from .io.catalogs import iter_external_blocks, read_gaia_dr3
        from .plots import plot_cmd, plot_comparison

        c = self.cfg
        ext = {"LAMOST": c.inputs.lamost, "SEGUE": c.inputs.segue, "GAIA": c.inputs.gaia_dr3}
        key = stage_key(catalog=self.keys["catalog"], **{k: file_fingerprint(v) for k, v in ext.items()},
                        labels=file_fingerprint(c.inputs.comparison_labels),
                        gaia_xmatch=file_fingerprint(c.inputs.gaia_xmatch))
        if is_current(self.compare_path, key):
            return "reused", self._compare_detail()
        d = self.compare_path.parent
        d.mkdir(parents=True, exist_ok=True)
        vac = dd.read_parquet(str(self.vac_parquet_path))
        tables: dict[str, pd.DataFrame] = {}
        figures: list[str] = []
        for survey, path in (("LAMOST", c.inputs.lamost), ("SEGUE", c.inputs.segue)):
            if path is None:
                continue
            joined = crossmatch(vac, iter_external_blocks(path, survey.lower()), prefix=survey,
                                ext_filter=lambda b: b["TEFF"].notna()).compute()
            tables[survey] = comparison_table(joined, survey)
            figures.append(str(plot_comparison(joined, survey, d / f"compare_{survey.lower()}.png")))
        gaia_cmd = None
        if c.inputs.gaia_dr3 is not None:
            from .io.gaia_xmatch import read_gaia_xmatch

            g3 = read_gaia_dr3(c.inputs.gaia_dr3)
            vac_ids = vac
            if c.inputs.gaia_xmatch is not None:  # EDR3 ids from the crossmatch VAC = DR3 ids
                sid = read_gaia_xmatch(c.inputs.gaia_xmatch)[["MANGAID", "SOURCE_ID"]].dropna()
                sid["SOURCE_ID"] = sid["SOURCE_ID"].astype("int64").astype(str)
                vac_ids = vac.merge(sid, on="MANGAID", how="left")
                joined = crossmatch(vac_ids, g3, id_match=("SOURCE_ID", "SOURCE_ID"), prefix="GAIA").compute()
            else:
                joined = crossmatch(vac, g3, prefix="GAIA").compute()
            tables["GAIA"] = comparison_table(joined, "GAIA", labels=("TEFF", "LOGG", "FEH"))
            figures.append(str(plot_comparison(joined, "GAIA", d / "compare_gaia.png", labels=("TEFF", "LOGG", "FEH"))))
            gaia_cmd = cmd_table(joined)
        elif c.inputs.gaia_xmatch is not None:
            from .io.gaia_xmatch import read_gaia_xmatch

            gx = read_gaia_xmatch(c.inputs.gaia_xmatch)
            if gx[["PARALLAX", "PHOT_G_MEAN_MAG"]].notna().all(axis=1).any():
                gaia_cmd = cmd_table(vac.compute(), gx)
        if gaia_cmd is not None and len(gaia_cmd):
            figures.append(str(plot_cmd(gaia_cmd, d / "cmd_by_label.png")))
        if c.inputs.comparison_labels is not None:
            lab = read_labels_table(c.inputs.comparison_labels)
            joined = crossmatch(vac, lab, id_match=("MANGAID", "ext_id"), prefix="PUBLISHED").compute()
            tables["PUBLISHED"] = comparison_table(joined, "PUBLISHED", labels=("TEFF", "LOGG", "FEH"))
            figures.append(str(plot_comparison(joined, "PUBLISHED", d / "compare_published.png",
                                               labels=("TEFF", "LOGG", "FEH"))))
        text = format_comparison_tables(tables) if tables else "no comparison catalogue configured"
        (d / "table2.txt").write_text(text + "\n")
        log.info("comparisons (Table 2 analogue):\n%s", text)
        out = {k: v.to_dict(orient="records") for k, v in tables.items()}
        self.compare_path.write_text(json.dumps({"tables": out, "figures": figures}, indent=1,
                                                default=_json_default))
        record(self.compare_path, key, surveys=list(tables), figures=figures)
        return "ran", self._compare_detail()

    def _compare_detail(self) -> str:
        rec = read_record(self.compare_path) or {}
        s = rec.get("surveys") or []
        return f"compared with {', '.join(s)}" if s else "no comparison catalogue configured"

    def report(self) -> tuple[str, str]:
        """Figures and the report (Markdown + HTML) with every table of the run."""
        from .report_build import build_report

        key = stage_key(**{k: v for k, v in self.keys.items()}, compare=(read_record(self.compare_path) or {})
                        .get("key"))
        target = self.report_dir / "report.html"
        if is_current(target, key):
            return "reused", str(target)
        build_report(self)
        record(target, key)
        return "ran", str(target)


def visit_table(cube) -> Any:  # noqa: ANN001
    """The cube's per-visit coordinates the catalogue needs, in cube order."""
    import pandas as pd

    return pd.DataFrame({
        "MANGAID": cube["mangaid"].values.astype(str), "PLATE": cube["plate"].values.astype(np.int32),
        "IFUDESIGN": cube["ifudesign"].values.astype(str), "MJD": cube["mjd"].values.astype(np.int32),
        "RA": cube["ra"].values, "DEC": cube["dec"].values, "S2N": cube["s2n"].values.astype(np.float32),
        "MJDQUAL": cube["mjdqual"].values.astype(np.int64),
    })


def read_labels_table(path: Path) -> Any:
    """A table of published labels keyed by MANGAID (CSV with columns mangaid, teff,
    logg, fe_h — the demo's MILES catalogue), in the standardized external schema."""
    import pandas as pd

    from .errors import InputFileError

    try:
        t = pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise InputFileError(path, f"cannot be read as CSV ({exc})") from None
    cols = {c.lower(): c for c in t.columns}
    need = ["mangaid", "teff", "logg"]
    missing = [n for n in need if n not in cols]
    if missing:
        raise InputFileError(path, "required column(s) missing", column=",".join(missing),
                             expected="mangaid, teff, logg and fe_h (or feh)")
    feh = cols.get("fe_h") or cols.get("feh")
    return pd.DataFrame({
        "survey": "PUBLISHED", "ext_id": t[cols["mangaid"]].astype(str).str.strip(),
        "RA": np.nan, "DEC": np.nan,
        "TEFF": pd.to_numeric(t[cols["teff"]], errors="coerce"),
        "LOGG": pd.to_numeric(t[cols["logg"]], errors="coerce"),
        "FEH": pd.to_numeric(t[feh], errors="coerce") if feh else np.nan,
    })


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)

