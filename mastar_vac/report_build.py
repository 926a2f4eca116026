"""The run's report: figures drawn from the products, and every table, in one place.

Reads what the stages wrote (catalogue, emulator diagnostic, Table 1 validation,
uncertainty calibration, comparisons) and writes ``report/report.md`` and
``report/report.html`` with the figures beside them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .plots import plot_alpha_feh, plot_example_fits, plot_kiel, plot_kiel_chi2
from .report import Section, write_report

if TYPE_CHECKING:
    from .stages import StageContext

__all__ = ["build_report", "catalogue_text", "comparison_figures", "example_fit_rows", "flag_table"]

log = logging.getLogger(__name__)


def _read(path: Path) -> str:
    return path.read_text().rstrip() if path.exists() else ""


def example_fit_rows(vac: pd.DataFrame, n: int = 6) -> np.ndarray:
    """Row indices of ``n`` VALID visits spread evenly in log Teff (for Figure 7)."""
    ok = np.flatnonzero((vac["VALID"].to_numpy() == 1) & np.isfinite(vac["TEFF"].to_numpy()))
    if len(ok) == 0:
        return ok
    order = ok[np.argsort(vac["TEFF"].to_numpy()[ok])]
    pick = np.unique(np.linspace(0, len(order) - 1, min(n, len(order))).round().astype(int))
    return order[pick]


def catalogue_text(alpha_fitted: bool) -> str:
    """The Catalogue section's text: which diagrams there are, and why one is missing."""
    chi2 = ("the reduced χ² of every fit (the paper's χ², data noise only: the CHISQ column; CHISQ_EMU adds "
            "the emulator's own error)")
    if alpha_fitted:
        return f"Kiel diagram coloured by [Fe/H], [α/Fe]–[Fe/H] coloured by Teff, and {chi2}."
    return (f"Kiel diagram coloured by [Fe/H] and {chi2}. This run did not fit [α/Fe] (the ALPHA columns are "
            "NaN), so there is no [α/Fe]–[Fe/H] diagram.")


def flag_table(bits: Sequence[tuple[int, str, str]], counts: Mapping[str, int]) -> str:
    """The FLAG bits as a Markdown pipe table (a real table in the HTML, readable in report.md)."""
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|")

    rows = ["| bit | name | visits | meaning |", "|---:|:---|---:|:---|"]
    rows += [f"| {bit} | `{cell(name)}` | {counts.get(name, 0):,} | {cell(desc)} |" for bit, name, desc in bits]
    return "\n".join(rows)


def comparison_figures(compare_dir: Path, recorded: Sequence[str]) -> list[tuple[Path, str]]:
    """The comparison stage's figures, found in ``compare_dir``, each with a caption.

    The stage records the paths as it wrote them, relative to the directory the build ran
    in; taken by name from the stage's own folder they are found whatever the report's
    working directory (resolved from the current one, they pointed nowhere when the
    report was rebuilt from elsewhere)."""
    out: list[tuple[Path, str]] = []
    for f in recorded:
        name = Path(f).name
        stem = Path(name).stem
        if stem.startswith("compare_"):
            survey = stem.removeprefix("compare_").upper()
            caption = (f"VAC vs {survey}, per label (VALID visits): the red line is equality; each panel gives N, "
                       f"the median offset (VAC − {survey}), the standard deviation and 1.4826·MAD")
        elif stem == "cmd_by_label":
            caption = "Gaia colour–magnitude diagram coloured by each label (cf. Imig et al. 2022, Fig. 11)"
        else:
            caption = stem.replace("_", " ")
        out.append(((compare_dir / name).resolve(), caption))
    return out


def build_report(ctx: StageContext) -> tuple[Path, Path]:
    from . import __version__
    from .emulator import load_emulator
    from .io.cube import open_cube
    from .io.vac import read_vac_parquet
    from .quality import describe_bits, flag_counts

    d = ctx.report_dir.resolve()  # absolute: the report links figures relative to itself
    d.mkdir(parents=True, exist_ok=True)
    vac = read_vac_parquet(ctx.vac_parquet_path)
    emu = load_emulator(ctx.emulator_in_use())
    figs: dict[str, Any] = {}
    figs["kiel"] = plot_kiel(vac, d / "kiel_feh.png")
    # an [α/Fe]–[Fe/H] panel without [α/Fe] is an empty frame: say so in the text instead
    alpha_fitted = bool(np.isfinite(vac["ALPHA"].to_numpy(np.float64)).any()) if len(vac) else False
    if alpha_fitted:
        figs["alpha"] = plot_alpha_feh(vac, d / "alpha_feh.png")
    figs["chi2"] = plot_kiel_chi2(vac, d / "kiel_chi2.png", chi2_threshold=ctx.cfg.quality.chi2_max)
    rows = example_fit_rows(vac)
    if len(rows):
        cube = open_cube(ctx.cube_path)
        nf = cube["norm_flux"].isel(visit=rows).values
        ni = cube["norm_ivar"].isel(visit=rows).values * emu.pixel_mask[None, :]
        lab = np.column_stack([vac[{"TEFF": "TEFF", "LOGG": "LOGG", "FE_H": "FEH", "M_H": "FEH", "ALPHA_FE": "ALPHA",
                                    "ALPHA_M": "ALPHA", "LOG10_VMICRO": "VMICRO"}[n]].to_numpy()[rows]
                               for n in emu.label_names])
        # with lsf = "forward" the model shown is the one fitted: broadened to the visit's DISP
        sig = None
        if ctx.cfg.fit.lsf == "forward" and emu.lsf_sigma_ref is not None:
            from .fit import disp_to_pixels

            sig = disp_to_pixels(cube["disp"].isel(visit=rows).values, emu.wave)
        model = np.where(emu.pixel_mask[None, :], emu.predict(lab, sig), np.nan)  # only where the emulator is trained
        captions = [f"{vac['MANGAID'].iloc[i]} MJD {vac['MJD'].iloc[i]}: Teff {vac['TEFF'].iloc[i]:.0f} K, "
                    f"log g {vac['LOGG'].iloc[i]:.2f}, [Fe/H] {vac['FEH'].iloc[i]:+.2f}, "
                    f"reduced χ² {vac['CHISQ'].iloc[i]:.2f}" for i in rows]
        figs["fits"] = plot_example_fits(emu.wave, nf, ni, model, captions, d / "example_fits.png")
    n, nv = len(vac), int(vac["VALID"].sum())
    counts = flag_counts(vac["FLAG"].to_numpy())
    bits = describe_bits(ctx.cfg.quality)
    sections = [
        Section("Summary", text=(
            f"mastar_vac {__version__}; configuration `{ctx.cfg.source}`; emulator `{emu.content_hash()[:12]}` "
            f"({emu.n_hidden} hidden, {emu.activation}, labels {', '.join(emu.label_names)}).\n\n"
            f"**{n}** catalogue rows, one per input visit (keys unique); **{nv}** VALID "
            f"({100 * nv / max(n, 1):.1f}%). Products: `catalog/mastar_vac_params.fits` (FITS VAC) and "
            f"`catalog/mastar_vac_params.parquet` (Parquet dataset).\n\n"
            f"Visits per FLAG bit (a visit can carry several; VALID=0 marks the bits that invalidate a fit):\n\n"
            f"{flag_table(bits, counts)}")),
        Section("Catalogue", text=catalogue_text(alpha_fitted),
                figures=[(figs["kiel"], "Kiel diagram (VALID visits)"),
                         *([(figs["alpha"], "[α/Fe] vs [Fe/H]")] if alpha_fitted else []),
                         (figs["chi2"], "Kiel diagram coloured by reduced χ² (data noise only), and its "
                          "histogram")]),
        Section("Emulator (Figure 5)", text="Fraction of pixels whose emulated flux is within 2% and 4% of the "
                "observed normalized flux, for the training, test and held-out sets.",
                tables=[_read(ctx.training_dir / "emulator_diagnostic.txt")],
                figures=[((ctx.training_dir / "emulator_diagnostic.png").resolve(), "emulated vs observed flux")]
                if (ctx.training_dir / "emulator_diagnostic.png").exists() else []),
        Section("Validation (Table 1)", text="Held-out reference stars fitted like survey spectra; fitted − "
                "reference labels, median offset / median absolute deviation.",
                tables=[_read(ctx.validation_path.with_suffix(".txt"))]),
        Section("Uncertainties (Table 3)", text="Repeat-visit precision σ = (√π/2)|x₁ − x₂| per pair; the "
                "reported errors come from a quadratic model of log σ in (Teff, log g, [Fe/H], S/N) fitted by "
                "maximum likelihood; the calibration width should be ≈ 1.",
                tables=[_read(ctx.catalog_dir / "uncertainty.txt")]),
    ]
    cmp = json.loads(ctx.compare_path.read_text()) if ctx.compare_path.exists() else {}
    sections.append(Section("Comparisons (Table 2, Figure 11)",
                            text="VAC − external catalogue: median offset and scatter per label (VALID visits).",
                            tables=[_read(ctx.compare_path.parent / "table2.txt")],
                            figures=comparison_figures(ctx.compare_path.parent, cmp.get("figures", []))))
    if "fits" in figs:
        sections.append(Section("Example fits", figures=[(figs["fits"], "normalized spectra, best fits, residuals")]))
    study = ctx.outdir / "studies" / "semi_empirical"
    if (study / "table.txt").exists():  # written by `python -m mastar_vac.studies.semi_empirical`
        sections.append(Section(
            "Semi-empirical vs empirical vs synthetic emulators (paper §5.2)",
            text="The same held-out real stars, visit by visit, fitted with emulators trained on (a) the empirical "
                 "set only, (b) the semi-empirical set, (c) synthetic spectra only at the empirical labels.",
            tables=[_read(study / "table.txt")],
            figures=[((study / "example_fits.png").resolve(), "a cool dwarf, a warm dwarf and a hot star, each "
                      "fitted by the three emulators (Figure 15 analogue)")]
            if (study / "example_fits.png").exists() else []))
    return write_report(d, title=f"mastar_vac — {ctx.cfg.run.name}", sections=sections)
