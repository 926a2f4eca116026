"""Embedded demo data: survey-layout files built from real spectra, deterministically.

Nothing is downloaded. The spectra are real and ship with the PyPI package
``sdss-mangadap`` (``mangadap/data/spectral_templates``):

* ``miles/``: the MILES stellar library (0.9 Å pixels, FWHM 2.5 Å, air wavelengths) and
  its catalogue labels (Teff, log g, [Fe/H]) in ``MILES_params.db``;
* ``stelib/``: the STELIB v3.2 library (255 files, ~1 Å pixels, FWHM ≈ 3.4 Å, air,
  3,460–~9,600 Å with gaps, not telluric-corrected), labels in its FITS headers;
* ``mastarhc/``: real MaStar spectra on the exact MaStar grid with their resolution
  (``SRES``), which give the target line-spread function.

Each MILES star becomes a MaStar "star" with 1–5 visits: wavelengths air → vacuum,
broadened to the MaStar LSF scaled by a per-visit factor (``LSF_FACTOR_SIGMA``: the
real library's spread, recorded in DISP),
resampled onto the MaStar grid, scaled to a plausible flux and given noise at a drawn
S/N. STELIB adds the red half of the MaStar range (to ~9,600 Å): a STELIB star that is
also a MILES star (117 of them, matched by HD number) is the *same* demo star, its
STELIB spectrum 1–3 more visits of it, so a star is in the training or the validation
set whichever library a spectrum comes from; each labelled STELIB-only star (88) is a
star of its own with 1–5 visits and STELIB's labels. STELIB is broadened only where it
is sharper than the visit's LSF (redward of ~6,300 Å); where it is coarser it is left
as it is and DISP records its σ. Its telluric bands (``TELLURIC_BANDS_AIR``) are masked
with IVAR 0 and MASK bit 27 (BADFLUXFACTOR), its gaps and ends with NODATA. The
MaStarHC spectra join as extra unlabelled targets. Around them the demo writes the
catalogues the pipeline reads, in the DR17 layouts (``mastar_vac.io.layouts``):

* ``mastar-goodspec-v3_1_1-v1_7_7.fits.gz``: the per-visit spectra;
* ``mastarall-v3_1_1-v1_7_7.fits``: GOODSTARS and GOODVISITS;
* ``allStar-dr17-synspec_rev1.fits``: the "APOGEE overlap", most labelled MILES stars
  with their catalogue labels as ASPCAP values, with realistic flags, duplicates and
  missing values;
* ``mastarall-gaiaedr3-extcorr-simbad-ps1-v3_1_1-v1_7_7-v1.fits``: the Gaia crossmatch
  (identifiers and positions only; no photometry is invented);
* ``miles_labels.csv``: one row per labelled-library star (MILES stars, then
  STELIB-only stars): MANGAID, library (MILES, MILES+STELIB, STELIB), ids, the adopted
  labels (teff, logg, fe_h: MILES's where the star is a MILES star) and each library's
  own labels (miles_*, stelib_*), for validation and cross-library tests;
* ``visit_sources.csv``: per goodspec row, the library (MILES, STELIB, MASTARHC) and
  spectrum the visit is made from, and COARSER_BELOW: the reddest MaStar wavelength
  (vacuum Å) where that spectrum's LSF is coarser than the visit's (0: nowhere);
* ``manifest.json``: seed, versions, counts, file names and checksums.

Everything follows from the seed: the same seed gives byte-identical files. Star-level
draws (visits, S/N, LSF factors, noise) come from a generator seeded by
``(seed, star)``, so a demo limited to the first ``n_stars`` stars draws the same visits,
S/N, LSF factors and noise for those stars as the full demo; ``n_stars`` counts MILES
stars: such a demo holds the first ``n_stars`` MILES stars (by id) with the STELIB
visits of those among them that are STELIB stars, plus the first
⌈n_stars·88/984⌉ labelled STELIB-only stars (by name), so that even a small test demo
has STELIB-only stars; population-level choices
(which visits get pixel problems, the flags, the APOGEE overlap) come from
``default_rng(seed)`` and do depend on ``n_stars``.

Usage::

    from mastar_vac.demo import demo_files
    files = demo_files()          # built once into ~/.cache/mastar_vac, then reused
    files.goodspec, files.mastarall, files.allstar, files.gaia_xmatch

or ``python -m mastar_vac.demo [--cache DIR] [--seed N] [--n-stars N] [--force]``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from scipy.special import ndtr, ndtri

from . import __version__, lsf
from .errors import MastarVacError
from .io.allstar import write_allstar
from .io.provenance import sha256_file
from .io.gaia_xmatch import write_gaia_xmatch
from .io.goodspec import write_goodspec
from .io.mastarall import write_mastarall
from .io.stelib import StelibSpectrum, hd_key, read_stelib_dir
from .wavegrid import MASTAR_NPIX, air_to_vacuum, mastar_wavelength

__all__ = [
    "FORMAT_VERSION",
    "DEFAULT_SEED",
    "FILE_NAMES",
    "MASK_BITS",
    "MJDQUAL_BITS",
    "ASPCAPFLAG_BITS",
    "STARFLAG_BITS",
    "EXTRATARG_DUPLICATE",
    "MILES_FWHM",
    "MILES_SIGMA_PIX",
    "STELIB_FWHM",
    "TELLURIC_BANDS_AIR",
    "TELLURIC_MASK_BIT",
    "DemoFiles",
    "MilesLibrary",
    "MaStarHC",
    "LsfModel",
    "default_cache_dir",
    "templates_dir",
    "read_miles_params",
    "read_miles_names",
    "StelibStars",
    "select_stelib",
    "degrade_stelib",
    "load_miles",
    "load_mastarhc",
    "degrade_miles",
    "demo_files",
    "build_demo",
    "main",
]

log = logging.getLogger(__name__)

#: Bumped whenever the content of the demo changes for a given seed (it names the cache dir).
FORMAT_VERSION = 3

#: Each visit's LSF is the MaStarHC median σ(λ) times a factor drawn from
#: 1 + N(0, LSF_FACTOR_SIGMA), clipped to LSF_FACTOR_RANGE. Real MaStar visits differ
#: from fibre to fibre and night to night by of order ±10% in σ around the median, some
#: sharper and some broader (issue 14; MaStarHC's SRES is one median curve for every
#: spectrum, so it gives the shape, not the spread). Assumed here: one factor for the
#: whole visit (the real LSF also changes shape along λ a little, which this leaves out).
#: Where a factor asks for a sharper LSF than the library spectrum has (MILES in the
#: bluest pixels, STELIB blueward of ~6,300 Å), DISP records the library's σ instead.
LSF_FACTOR_SIGMA = 0.08
LSF_FACTOR_RANGE = (0.8, 1.25)
DEFAULT_SEED = 20221

FILE_NAMES = {
    "goodspec": "mastar-goodspec-v3_1_1-v1_7_7.fits.gz",
    "mastarall": "mastarall-v3_1_1-v1_7_7.fits",
    "allstar": "allStar-dr17-synspec_rev1.fits",
    "gaia_xmatch": "mastarall-gaiaedr3-extcorr-simbad-ps1-v3_1_1-v1_7_7-v1.fits",
    "labels": "miles_labels.csv",
    "visit_sources": "visit_sources.csv",
    "manifest": "manifest.json",
}

#: MANGA_DRP2PIXMASK bits the demo sets (datamodels.md §1.6).
MASK_BITS = {"BADPIX": 15, "COSMIC": 16, "FULLREJECT": 19, "NODATA": 25, "BADFLUXFACTOR": 27}
#: MASTAR_QUAL bits the demo sets in MJDQUAL (datamodels.md §1.5).
MJDQUAL_BITS = {"EMLINE": 8, "LOWSN": 9}
#: APOGEE bits the demo sets (datamodels.md §2).
ASPCAPFLAG_BITS = {"TEFF_BAD": 16, "STAR_BAD": 23, "CHI2_BAD": 24, "NO_ASPCAP_RESULT": 31,
                   "MULTIPLE_SUSPECT": 41}
STARFLAG_BITS = {"SUSPECT_RV_COMBINATION": 16, "BAD_RV_COMBINATION": 18, "MULTIPLE_SUSPECT": 21}
EXTRATARG_DUPLICATE = 4

#: MILES: FWHM 2.5 Å at every wavelength, 0.9 Å pixels (air). In pixel units the LSF
#: does not change when the wavelengths move to vacuum (both scale by the same factor).
MILES_FWHM = 2.5
MILES_CDELT = 0.9
MILES_SIGMA_PIX = MILES_FWHM * lsf.FWHM_TO_SIGMA / MILES_CDELT

#: STELIB v3.2: FWHM ≈ 3.4 Å (air) at every wavelength, ~1 Å pixels, each file its own scale.
#: Coarser than the MaStar LSF blueward of ~6,300 Å, finer redward.
STELIB_FWHM = 3.4
#: Telluric absorption bands (air Å) that STELIB, unlike MILES, is not corrected for.
#: Masked (IVAR 0) in STELIB visits. Measured as the median STELIB/MILES ratio (both at
#: 3.4 Å, continuum-normalized) over the shared stars: O₂ γ 4%, O₂ B 27%, H₂O at 7,186 Å
#: 4% deep, nothing else above 1.5% redward of 5,000 Å. Beyond MILES (7,400 Å) the bands
#: are the standard ones (O₂ A is deeper than B; H₂O 8,130–8,350 Å ~10%, 8,940–9,800 Å
#: tens of %). At the 2–4% accuracy the emulator is judged by, each would be learnt as
#: stellar.
TELLURIC_BANDS_AIR: tuple[tuple[float, float, str], ...] = (
    (6270.0, 6330.0, "O2 gamma"),
    (6860.0, 6960.0, "O2 B"),
    (7160.0, 7340.0, "H2O"),
    (7590.0, 7700.0, "O2 A"),
    (8130.0, 8350.0, "H2O"),
    (8940.0, 9800.0, "H2O"),
)
#: The mask bit of telluric pixels: MANGA_DRP2PIXMASK 27 BADFLUXFACTOR. The DRP applies
#: its telluric correction as part of the flux-calibration factor, so "no usable fluxing
#: factor here" is what an uncorrected telluric pixel is; none of the other bits (sky,
#: cosmic, coverage) describes it, and NODATA would claim the pixel was not observed.
TELLURIC_MASK_BIT = MASK_BITS["BADFLUXFACTOR"]

_MILES_FILE = "MILES_res2.50_star_m{:04d}V.fits"
_MILES_PLACEHOLDERS = (99999.0, 9999.0)
# Science IFUs of the MaNGA/MaStar plates (19- to 127-fibre bundles).
_IFUDESIGNS = ("1901", "1902", "3701", "3702", "3703", "3704", "6101", "6102", "6103", "6104",
               "9101", "9102", "12701", "12702", "12703", "12704", "12705")


# --------------------------------------------------------------------------------------
# Where things live
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoFiles:
    """Paths of one built demo (all inside ``root``)."""

    root: Path
    goodspec: Path
    mastarall: Path
    allstar: Path
    gaia_xmatch: Path
    labels: Path
    visit_sources: Path
    manifest: Path

    @classmethod
    def at(cls, root: Path) -> DemoFiles:
        return cls(root=root, **{k: root / v for k, v in FILE_NAMES.items()})

    def complete(self) -> bool:
        """True when the manifest and every file it lists exist."""
        if not self.manifest.is_file():
            return False
        try:
            manifest = json.loads(self.manifest.read_text())
        except (OSError, ValueError):
            return False
        names = manifest.get("files", {}).values()
        return bool(names) and all((self.root / n).is_file() for n in names)


def default_cache_dir() -> Path:
    """``$MASTAR_VAC_CACHE`` if set, else ``~/.cache/mastar_vac``."""
    env = os.environ.get("MASTAR_VAC_CACHE")
    # absolute: the demo's paths go to Dask workers, whose working directory is their own
    return Path(env).expanduser().absolute() if env else Path.home() / ".cache" / "mastar_vac"


def templates_dir() -> Path:
    """The spectral templates shipped by ``sdss-mangadap``."""
    try:
        import mangadap
    except ImportError as exc:  # pragma: no cover - it is a dependency
        raise MastarVacError("the demo needs the package sdss-mangadap (pip install sdss-mangadap)") from exc
    d = Path(mangadap.__file__).parent / "data" / "spectral_templates"
    for sub in ("miles", "mastarhc", "stelib"):
        if not (d / sub).is_dir():
            raise MastarVacError(f"{d / sub}: not found; the installed sdss-mangadap lacks its template data")
    return d


def _demo_dirname(seed: int, n_stars: int | None) -> str:
    return f"demo-v{FORMAT_VERSION}-s{seed}" + (f"-n{n_stars}" if n_stars is not None else "")


# --------------------------------------------------------------------------------------
# Real inputs
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MilesLibrary:
    """MILES spectra (air wavelengths, arbitrary flux units) and catalogue labels."""

    ids: NDArray[np.int64]  # MILES numbers (m0001 → 1)
    wave_air: NDArray[np.float64]  # (4300,)
    flux: NDArray[np.float64]  # (n, 4300)
    teff: NDArray[np.float64]  # NaN where the catalogue has a placeholder
    logg: NDArray[np.float64]
    feh: NDArray[np.float64]

    @property
    def bad(self) -> NDArray[np.bool_]:
        """Pixels with zero, negative or non-finite flux (a few dozen spectra have them)."""
        return ~(np.isfinite(self.flux) & (self.flux > 0))

    @property
    def labelled(self) -> NDArray[np.bool_]:
        """Stars whose Teff, log g and [Fe/H] are all real catalogue values."""
        return np.isfinite(self.teff) & np.isfinite(self.logg) & np.isfinite(self.feh)


@dataclass(frozen=True)
class MaStarHC:
    """Real MaStar spectra on the MaStar grid, with their resolving power."""

    names: tuple[str, ...]  # "00", "01", ...
    flux: NDArray[np.float64]  # (n, 4563)
    ivar: NDArray[np.float64]
    sres: NDArray[np.float64]  # resolving power R per pixel


def read_miles_params(path: str | os.PathLike[str],
                      known_ids: Sequence[int] | None = None) -> dict[int, tuple[float, float, float]]:
    """MILES catalogue labels: id → (Teff, log g, [Fe/H]); placeholders become NaN.

    The file marks unknown values with 99999 (Teff) and 9999 (log g, [Fe/H]). One id is
    misprinted with a '.' for a digit ("022." for 0221); such an id is resolved against
    ``known_ids`` (the spectra that exist) when exactly one unclaimed id fits it, and
    dropped with a warning otherwise.
    """
    rows: list[tuple[str, float, float, float]] = []
    for line in Path(path).read_text().splitlines():
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        parts = s.split()
        if len(parts) < 4:
            continue
        vals = []
        for p in parts[1:4]:
            v = float(p)
            vals.append(np.nan if v in _MILES_PLACEHOLDERS else v)
        rows.append((parts[0], *vals))
    return _resolve_miles_ids([(tok, tuple(vals)) for tok, *vals in rows], known_ids,  # type: ignore[return-value]
                              "MILES_params.db")


def _resolve_miles_ids(rows: Sequence[tuple[str, object]], known_ids: Sequence[int] | None,
                       what: str) -> dict[int, object]:
    """id token → value, with misprinted ids ("022.") resolved against ``known_ids``."""
    out: dict[int, object] = {}
    odd: list[tuple[str, object]] = []
    for tok, val in rows:
        if tok.isdigit():
            out[int(tok)] = val
        else:
            odd.append((tok, val))
    for tok, val in odd:
        pattern = re.compile(re.escape(tok).replace(r"\.", r"\d"))
        pool = [i for i in (known_ids or []) if i not in out and pattern.fullmatch(f"{i:04d}")]
        if len(pool) == 1:
            log.debug("%s: id %r read as %04d", what, tok, pool[0])
            out[pool[0]] = val
        else:
            log.warning("%s: cannot resolve the id %r (candidates %s); row dropped", what, tok, pool)
    return out


def read_miles_names(path: str | os.PathLike[str], known_ids: Sequence[int] | None = None) -> dict[int, str]:
    """MILES id → star name ("HD000004", "BD+002058A", "NGC 7789 468(589) Cl") from
    ``paramsMILES_v9.1.txt``.

    The file is fixed-width: the name in columns 1–23 (it may hold spaces and digits, so
    it cannot be split on blanks), the MILES id in columns 24–27. The misprinted id is
    resolved as in :func:`read_miles_params`.
    """
    from .errors import InputFileError

    p = Path(path)
    rows: list[tuple[str, object]] = []
    for n, line in enumerate(p.read_text().splitlines()):
        if n < 3 or not line.strip():  # two header lines and a rule
            continue
        tok = line[23:27]
        if not re.fullmatch(r"[\d.]{4}", tok):
            raise InputFileError(p, f"line {n + 1}: no MILES id in columns 24-27 ({line[:40]!r})", row=n,
                                 column="MILES", expected="the fixed-width layout of paramsMILES_v9.1.txt")
        rows.append((tok, line[:23].strip()))
    return _resolve_miles_ids(rows, known_ids, p.name)  # type: ignore[return-value]


def _miles_files(d: Path) -> dict[int, Path]:
    files = {int(m.group(1)): p for p in d.glob("MILES_res2.50_star_m*V.fits")
             if (m := re.fullmatch(r"MILES_res2\.50_star_m(\d{4})V\.fits", p.name))}
    if not files:
        raise MastarVacError(f"{d}: no MILES spectra found")
    return files


def load_miles(n_stars: int | None = None, *, directory: Path | None = None) -> MilesLibrary:
    """The MILES spectra shipped by sdss-mangadap, sorted by id; the first ``n_stars``.

    Spectra in ``miles/omit`` (m0970: short wavelength range and a red artefact, as the
    package's README says) are left out, so the full library has 984 stars.
    """
    from astropy.io import fits

    d = (directory or templates_dir()) / "miles"
    files = _miles_files(d)
    ids = sorted(files)
    if n_stars is not None:
        if n_stars < 1:
            raise ValueError(f"n_stars must be >= 1, got {n_stars}")
        ids = ids[:n_stars]
    params = read_miles_params(d / "MILES_params.db", known_ids=sorted(files))
    flux = np.empty((len(ids), 4300))
    wave_air: NDArray[np.float64] | None = None
    for k, i in enumerate(ids):
        with fits.open(files[i], memmap=False) as h:
            hdr = h[0].header
            data = np.asarray(h[0].data, dtype=np.float64)
        w = float(hdr["CRVAL1"]) + float(hdr["CDELT1"]) * (np.arange(data.size) + 1 - float(hdr.get("CRPIX1", 1)))
        if wave_air is None:
            wave_air = w
        elif data.size != wave_air.size or not np.allclose(w, wave_air, rtol=0, atol=1e-6):
            raise MastarVacError(f"{files[i]}: wavelength grid differs from that of the other MILES spectra")
        flux[k] = data
    labels = np.array([params.get(i, (np.nan, np.nan, np.nan)) for i in ids], dtype=np.float64).reshape(-1, 3)
    missing = [i for i in ids if i not in params]
    if missing:
        log.warning("MILES: %d spectra have no catalogue row (%s...)", len(missing), missing[:5])
    assert wave_air is not None
    return MilesLibrary(ids=np.array(ids, dtype=np.int64), wave_air=wave_air, flux=flux,
                        teff=labels[:, 0], logg=labels[:, 1], feh=labels[:, 2])


def load_mastarhc(*, directory: Path | None = None) -> MaStarHC:
    """The MaStarHC spectra (``mastarhc/MaStarHC_NN.fits``): FLUX, IVAR, SRES."""
    from astropy.io import fits

    d = (directory or templates_dir()) / "mastarhc"
    paths = sorted(d.glob("MaStarHC_*.fits"))
    if not paths:
        raise MastarVacError(f"{d}: no MaStarHC spectra found")
    names, flux, ivar, sres = [], [], [], []
    for p in paths:
        with fits.open(p, memmap=False) as h:
            f = np.asarray(h[0].data, np.float64)
            if f.shape != (MASTAR_NPIX,) or abs(float(h[0].header["CRVAL1"]) - 3.5589) > 1e-9:
                raise MastarVacError(f"{p}: not on the MaStar grid")
            flux.append(f)
            ivar.append(np.asarray(h["IVAR"].data, np.float64))
            sres.append(np.asarray(h["SRES"].data, np.float64))
        names.append(p.stem.split("_")[-1])
    return MaStarHC(tuple(names), np.array(flux), np.array(ivar), np.array(sres))


# --------------------------------------------------------------------------------------
# MILES → MaStar
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LsfModel:
    """The MILES and MaStar LSFs on both grids (σ in Å, vacuum wavelengths).

    The MaStar target σ(λ) = λ / (2.3548 R) comes from the median SRES of the MaStarHC
    spectra. A visit with LSF factor ``f`` has σ = f·σ_target.
    """

    miles_wave: NDArray[np.float64]  # MILES pixel centres, vacuum (Å)
    miles_dlam: NDArray[np.float64]  # MILES pixel width in vacuum Å (~0.90025)
    target_sigma_miles: NDArray[np.float64]  # σ_target at the MILES pixels (Å)
    wave: NDArray[np.float64]  # the MaStar grid (Å)
    target_sigma: NDArray[np.float64]  # σ_target on the MaStar grid (Å)
    miles_sigma: NDArray[np.float64]  # MILES σ on the MaStar grid (Å, vacuum)

    @classmethod
    def from_resolution(cls, wave_air_miles: NDArray[np.float64], resolution: NDArray[np.float64]) -> LsfModel:
        wave = mastar_wavelength()
        target = lsf.sigma_from_resolution(wave, resolution)
        mw = air_to_vacuum(wave_air_miles)
        dlam = np.gradient(mw)
        return cls(miles_wave=mw, miles_dlam=dlam,
                   target_sigma_miles=np.interp(mw, wave, target),  # flat beyond the MaStar ends
                   wave=wave, target_sigma=target,
                   miles_sigma=MILES_SIGMA_PIX * np.interp(wave, mw, dlam))

    def extra_sigma_pix(self, factor: float = 1.0) -> NDArray[np.float64]:
        """σ (in MILES pixels) of the kernel that takes MILES to ``factor``·σ_target.

        Where the target is sharper than MILES (the bluest pixels of a visit with a factor
        below one) nothing can be done: the extra σ is 0 and the LSF stays MILES's.
        """
        tgt = self.target_sigma_miles * factor / self.miles_dlam
        return np.sqrt(np.maximum(tgt**2 - MILES_SIGMA_PIX**2, 0.0))

    def disp(self, factor: float = 1.0) -> NDArray[np.float64]:
        """The LSF σ (Å) of a degraded spectrum on the MaStar grid: max(f·σ_target, σ_MILES)."""
        return np.maximum(self.target_sigma * factor, self.miles_sigma)


def degrade_miles(flux: NDArray[np.float64], model: LsfModel,
                  factors: Sequence[float] | NDArray[np.float64]) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    """One MILES spectrum (air, 4300 px) → noiseless MaStar-grid spectra, one per factor.

    Non-positive or non-finite MILES pixels are bridged by linear interpolation before
    broadening (so they do not leak dips into their neighbours) and reported back as
    ``bad``: MaStar pixels that draw more than 5% of their broadened flux from them.
    Returns ``(spectra, bad)`` of shape (len(factors), 4563); pixels outside the MILES
    range are NaN in ``spectra``.
    """
    f = np.asarray(flux, np.float64)
    badm = ~(np.isfinite(f) & (f > 0))
    if badm.any():
        idx = np.arange(f.size)
        good = ~badm
        f = f.copy()
        f[badm] = np.interp(idx[badm], idx[good], f[good])
    sig = [model.extra_sigma_pix(float(x)) for x in factors]
    b = np.stack([lsf.broaden(f, s) for s in sig])
    out = lsf.rebin(model.miles_wave, b, model.wave)
    if badm.any():
        bb = np.stack([lsf.broaden(badm.astype(np.float64), s) for s in sig])
        frac = lsf.rebin(model.miles_wave, bb, model.wave)
        bad = np.nan_to_num(frac, nan=0.0) > 0.05
    else:
        bad = np.zeros(out.shape, bool)
    return out, bad


# --------------------------------------------------------------------------------------
# STELIB → MaStar
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StelibStars:
    """The STELIB spectra a demo uses, grouped into demo stars.

    ``shared`` maps a MILES id to the STELIB spectra of that same star (matched by HD
    number and component); ``only`` lists the STELIB-only stars as (key, name, spectra),
    ``key`` being the star's position among all labelled STELIB-only stars (it seeds the
    star's draws, so a star's data do not depend on ``n_stars``).
    """

    spectra: tuple[StelibSpectrum, ...]
    shared: dict[int, list[int]]
    only: list[tuple[int, str, list[int]]]
    library_files: int  # STELIB files shipped
    library_overlap_stars: int  # STELIB stars that are MILES stars (whole libraries)
    library_only_labelled: int  # labelled STELIB-only stars (whole library)


def _star_name(spec: StelibSpectrum) -> str:
    """A STELIB star's name without the observation tag ("HD053929lp" → "HD053929")."""
    return re.sub(r"[a-z]+$", "", spec.name) if spec.hd else spec.name


def select_stelib(spectra: Sequence[StelibSpectrum], miles_names: dict[int, str], demo_miles_ids: Sequence[int],
                  n_stars: int | None) -> StelibStars:
    """Which STELIB spectra join a demo of ``n_stars`` MILES stars, and as which stars.

    * A STELIB spectrum of a MILES star (``miles_names`` covers the whole MILES library,
      so a match is never mistaken for a STELIB-only star) joins when that MILES star is
      in the demo, labelled in STELIB or not: it is more visits of the MILES star.
    * A STELIB-only star joins when STELIB gives all of Teff, log g and [Fe/H]: it is
      in the demo to be learnt and fitted. The full demo has all of them; a demo of the
      first ``n_stars`` MILES stars has the first ⌈n_stars·N_only/N_MILES⌉ (by file
      name), so small test demos still hold one.
    """
    hd_to_miles: dict[str, int] = {}
    for i, name in miles_names.items():
        k = hd_key(name)
        if k is not None:
            if k in hd_to_miles:
                log.warning("MILES: HD designation %s names two spectra (m%04d, m%04d); the first is used", k,
                            hd_to_miles[k], i)
                continue
            hd_to_miles[k] = i
    in_demo = set(int(i) for i in demo_miles_ids)
    shared: dict[int, list[int]] = {}
    only_groups: dict[str, list[StelibSpectrum]] = {}
    used: list[StelibSpectrum] = []
    overlap: set[int] = set()
    for spec in spectra:
        mid = hd_to_miles.get(spec.hd) if spec.hd else None
        if mid is not None:
            overlap.add(mid)
            if mid in in_demo:
                shared.setdefault(mid, []).append(len(used))
                used.append(spec)
        elif spec.labelled:
            only_groups.setdefault(_star_name(spec), []).append(spec)
    names = sorted(only_groups)
    n_only = len(names)
    if n_stars is not None:
        n_only = min(n_only, int(np.ceil(len(names) * min(len(in_demo), len(miles_names)) / max(len(miles_names), 1))))
    only: list[tuple[int, str, list[int]]] = []
    for key, name in enumerate(names[:n_only]):
        group = only_groups[name]
        only.append((key, name, list(range(len(used), len(used) + len(group)))))
        used.extend(group)
    return StelibStars(tuple(used), shared, only, library_files=len(spectra), library_overlap_stars=len(overlap),
                       library_only_labelled=len(names))


def _telluric_pixels(wave_vac: NDArray[np.float64]) -> NDArray[np.bool_]:
    """MaStar pixels inside a telluric band (the bands are in air, the grid in vacuum)."""
    out = np.zeros(wave_vac.shape, bool)
    for lo, hi, _ in TELLURIC_BANDS_AIR:
        a, b = air_to_vacuum(np.array([lo, hi]))
        out |= (wave_vac >= a) & (wave_vac <= b)
    return out


def degrade_stelib(spec: StelibSpectrum, model: LsfModel, factors: Sequence[float] | NDArray[np.float64]
                   ) -> tuple[NDArray[np.float64], NDArray[np.bool_], NDArray[np.float64], NDArray[np.float64]]:
    """One STELIB spectrum → noiseless MaStar-grid spectra, one per LSF factor.

    Wavelengths air → vacuum; broadened with the exact-discrete-variance kernel only
    where STELIB (σ = 3.4 Å FWHM) is sharper than ``factor``·σ_target; where it is
    coarser (the blue) it is left as it is. Gaps and ends (zero flux) are bridged before
    broadening, so they leak no dips, and reported as ``nodata``: MaStar pixels outside
    the spectrum or drawing more than 5% of their broadened flux from a gap.

    Returns ``(spectra, nodata, disp, coarser_below)``: spectra (len(factors), 4563), NaN
    outside the STELIB range; the per-visit DISP = max(factor·σ_target, σ_STELIB) in
    vacuum Å; and per visit the reddest MaStar wavelength where STELIB is coarser than
    factor·σ_target (0 if nowhere).
    """
    wv = air_to_vacuum(spec.wave_air)
    dlam_vac = np.gradient(wv)
    sig_air_pix = STELIB_FWHM * lsf.FWHM_TO_SIGMA / np.gradient(spec.wave_air)
    target_pix = np.interp(wv, model.wave, model.target_sigma) / dlam_vac  # flat beyond the MaStar ends
    # STELIB's σ in vacuum Å on the MaStar grid: the same in pixels, so it scales with the pixel width.
    stelib_sigma = np.interp(model.wave, wv, sig_air_pix * dlam_vac)
    cov = spec.covered
    f = spec.flux.copy()
    idx = np.arange(f.size)
    f[~cov] = np.interp(idx[~cov], idx[cov], f[cov])
    out, nodata = [], []
    disp, coarser = [], []
    for x in factors:
        extra = np.sqrt(np.maximum((float(x) * target_pix) ** 2 - sig_air_pix**2, 0.0))
        b = lsf.rebin(wv, lsf.broaden(f, extra), model.wave)
        gap = lsf.rebin(wv, lsf.broaden((~cov).astype(np.float64), extra), model.wave)
        out.append(b)
        nodata.append(~np.isfinite(b) | (np.nan_to_num(gap, nan=1.0) > 0.05))
        tgt = model.target_sigma * float(x)
        disp.append(np.maximum(tgt, stelib_sigma))
        c = np.flatnonzero(stelib_sigma > tgt)
        coarser.append(float(model.wave[c[-1]]) if len(c) else 0.0)
    return np.array(out), np.array(nodata), np.array(disp), np.array(coarser)


# --------------------------------------------------------------------------------------
# Draws
# --------------------------------------------------------------------------------------


def _draw_snr(rng: np.random.Generator, n: int) -> NDArray[np.float64]:
    """Per-visit S/N: ~89% lognormal (median 90, truncated to [50, 400]), ~10% uniform in
    [15, 50), ~1% uniform in [8, 15] (these get the LOWSN bit)."""
    u = rng.random(n)
    z_lo, z_hi = (np.log(50.0 / 90.0) / 0.45, np.log(400.0 / 90.0) / 0.45)
    v = rng.random(n)
    lognormal = 90.0 * np.exp(0.45 * ndtri(ndtr(z_lo) + v * (ndtr(z_hi) - ndtr(z_lo))))
    tail = 15.0 + 35.0 * v
    low = 8.0 + 7.0 * v
    return np.where(u < 0.01, low, np.where(u < 0.11, tail, lognormal))


@dataclass
class _Star:
    mangaid: str
    kind: str  # "miles" | "stelib" (a STELIB-only star) | "hc"
    index: int  # into the MILES library, the StelibStars.only list or the HC list
    ra: float
    dec: float
    scale: float  # median flux level, 1e-17 erg/s/cm2/A
    plates: NDArray[np.int64]
    ifus: list[str]
    mjds: NDArray[np.int64]
    snr: NDArray[np.float64]
    factor: NDArray[np.float64]
    nexp: NDArray[np.int64]
    rv: float
    rv_err: NDArray[np.float64]
    rng: np.random.Generator  # continues with the noise of this star's visits
    # Per visit: the library and the spectrum (index into the MILES library, the
    # StelibStars spectra or the HC list) it is made from.
    library: list[str] = field(default_factory=list)
    source: list[int] = field(default_factory=list)
    # The generator of the STELIB visits added to a MILES star (their noise), kept apart
    # so that the MILES visits of a shared star are those of a MILES-only demo.
    extra_rng: np.random.Generator | None = None

    @property
    def nvis(self) -> int:
        return len(self.mjds)

    def noise_rng(self, library: str) -> np.random.Generator:
        return self.extra_rng if (library == "STELIB" and self.kind == "miles" and self.extra_rng is not None) \
            else self.rng


def _lsf_factor(rng: np.random.Generator, n: int) -> NDArray[np.float64]:
    """Per-visit LSF widths relative to the MaStarHC median (σ_visit = f·σ_target)."""
    return np.clip(1.0 + LSF_FACTOR_SIGMA * rng.standard_normal(n), *LSF_FACTOR_RANGE)


def _draw_star(seed: int, kind: str, key: int, index: int, mangaid: str, nvis: int | None) -> _Star:
    # One generator per star, so that a star's data does not depend on how many stars
    # the demo holds (n_stars) or on the order they are built in.
    rng = np.random.default_rng([seed, {"miles": 1, "hc": 2, "stelib": 3}[kind], key])
    n = min(1 + int(rng.poisson(1.4)), 5) if nvis is None else nvis
    scale = 10.0 ** rng.uniform(0.5, 2.5)
    ra = float(rng.uniform(0.0, 360.0))
    dec = float(np.degrees(np.arcsin(rng.uniform(-1.0, 1.0))))
    snr = _draw_snr(rng, n)
    factor = _lsf_factor(rng, n)
    nexp = rng.integers(3, 9, n)
    # Plates: a repeat visit sometimes re-observes the same plate (then the same IFU).
    plates = rng.integers(8000, 12000, n)
    ifus = list(rng.choice(_IFUDESIGNS, n))
    same = rng.random(n) < 0.35
    for j in range(1, n):
        if same[j]:
            plates[j], ifus[j] = plates[j - 1], ifus[j - 1]
    mjds = np.sort(rng.choice(np.arange(57000, 59001), n, replace=False))
    rv = float(rng.normal(0.0, 40.0))
    rv_err = rng.uniform(0.3, 3.0, n)
    library = {"miles": "MILES", "hc": "MASTARHC", "stelib": "STELIB"}[kind]
    return _Star(mangaid, kind, index, ra, dec, scale, plates, [str(x) for x in ifus], mjds, snr, factor,
                 nexp, rv, rv_err, rng, library=[library] * n, source=[index] * n)


def _add_stelib_visits(st: _Star, seed: int, miles_id: int, spectra: Sequence[int]) -> None:
    """Give a MILES star 1–3 more visits per STELIB spectrum of it (new plates and MJDs)."""
    rng = np.random.default_rng([seed, 4, miles_id])
    n_each = np.minimum(1 + rng.poisson(0.5, len(spectra)), 3)
    n = int(n_each.sum())
    free = np.setdiff1d(np.arange(57000, 59001), st.mjds)
    mjds = np.sort(rng.choice(free, n, replace=False))
    st.mjds = np.concatenate([st.mjds, mjds])
    st.snr = np.concatenate([st.snr, _draw_snr(rng, n)])
    st.factor = np.concatenate([st.factor, _lsf_factor(rng, n)])
    st.nexp = np.concatenate([st.nexp, rng.integers(3, 9, n)])
    st.plates = np.concatenate([st.plates, rng.integers(8000, 12000, n)])
    st.ifus = st.ifus + [str(x) for x in rng.choice(_IFUDESIGNS, n)]
    st.rv_err = np.concatenate([st.rv_err, rng.uniform(0.3, 3.0, n)])
    st.library = st.library + ["STELIB"] * n
    st.source = st.source + [int(s) for s, k in zip(spectra, n_each) for _ in range(int(k))]
    st.extra_rng = rng


def _assign_stelib_spectra(st: _Star, spectra: Sequence[int]) -> None:
    """A STELIB-only star's visits cycle through its spectra (HD053929 has two); it gets
    at least one visit per spectrum."""
    if st.nvis < len(spectra):  # redraw nothing: repeat the last visit's setup on new MJDs
        extra = len(spectra) - st.nvis
        free = np.setdiff1d(np.arange(57000, 59001), st.mjds)
        st.mjds = np.concatenate([st.mjds, free[-extra:]])
        for name in ("snr", "factor", "nexp", "plates", "rv_err"):
            a = getattr(st, name)
            setattr(st, name, np.concatenate([a, np.repeat(a[-1:], extra)]))
        st.ifus = st.ifus + st.ifus[-1:] * extra
    st.library = ["STELIB"] * st.nvis
    st.source = [int(spectra[j % len(spectra)]) for j in range(st.nvis)]


def _round_mantissa(a: NDArray, bits: int) -> NDArray[np.float32]:
    """float32 values rounded to ``bits`` mantissa bits (relative precision 2**-bits).

    Used for DISP: 0.1% is far finer than the LSF is known, and the zeroed low bits let
    gzip shrink the goodspec file by about a third.
    """
    u = np.ascontiguousarray(a, np.float32).view(np.uint32)
    shift = 23 - bits
    keep = np.uint32((0xFFFFFFFF << shift) & 0xFFFFFFFF)
    return ((u + np.uint32(1 << (shift - 1))) & keep).view(np.float32)


def _at_least(frac: float, n: int, minimum: int = 1) -> int:
    return min(n, max(minimum, int(round(frac * n)))) if n else 0


def _miles_mangaid(miles_id: int) -> str:
    return f"3-{100000000 + (int(miles_id) * 137) % 9000000}"


def _stelib_mangaid(key: int) -> str:
    # Apart from the MILES range (100000000–108999999), so the two never collide.
    return f"3-{120000000 + (int(key) * 7919) % 9000000}"


def _apogee_id(ra: float, dec: float) -> str:
    """A 2MASS-style designation 2MHHMMSSss±DDMMSSs."""
    h = ra / 15.0
    hh, rem = divmod(h * 3600.0, 3600.0)
    mm, ss = divmod(rem, 60.0)
    sign = "+" if dec >= 0 else "-"
    d = abs(dec) * 3600.0
    dd, drem = divmod(d, 3600.0)
    dm, ds = divmod(drem, 60.0)
    return (f"2M{int(hh):02d}{int(mm):02d}{int(ss * 100):04d}"
            f"{sign}{int(dd):02d}{int(dm):02d}{int(ds * 10):03d}")


# --------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Specials:
    """Population-level choices: which stars/visits carry flags or pixel problems."""

    emline_stars: NDArray[np.int64]
    velvar_stars: NDArray[np.int64]
    zero_ivar_visit: int
    cosmic_visits: NDArray[np.int64]
    nan_visits: NDArray[np.int64]


def _choose_specials(rng: np.random.Generator, stars: list[_Star], n_miles: int,
                     star_of_visit: NDArray[np.int64]) -> _Specials:
    is_miles = star_of_visit < n_miles
    multi = np.flatnonzero([st.nvis >= 2 for st in stars[:n_miles]])
    emline = rng.choice(n_miles, _at_least(0.01, n_miles), replace=False)
    k = _at_least(0.02, n_miles)
    velvar = rng.choice(multi, k, replace=False) if len(multi) >= k else multi
    # The all-zero-IVAR visit belongs to a star with other visits, so the star stays usable.
    pool = np.flatnonzero(is_miles & np.isin(star_of_visit, multi))
    zero = int(rng.choice(pool if len(pool) else np.flatnonzero(is_miles)))
    rest = np.setdiff1d(np.flatnonzero(is_miles), [zero])
    n_cr = _at_least(0.005, len(rest), 2)
    picks = rng.permutation(rest)
    return _Specials(np.sort(emline), np.sort(velvar), zero, np.sort(picks[:n_cr]), np.sort(picks[n_cr:n_cr + 3]))


@dataclass
class _Spectra:
    flux: NDArray[np.float32]
    ivar: NDArray[np.float32]
    mask: NDArray[np.int32]
    disp: NDArray[np.float32]
    s2n: NDArray[np.float32]
    coarser_below: NDArray[np.float64]  # per visit: reddest λ where the library LSF is coarser (0: nowhere)

    def take(self, order: NDArray[np.int64]) -> None:
        for name in ("flux", "ivar", "mask", "disp", "s2n", "coarser_below"):
            setattr(self, name, getattr(self, name)[order])


def _simulate_spectra(stars: list[_Star], lib: MilesLibrary, stelib: StelibStars, hc: MaStarHC,
                      model: LsfModel) -> _Spectra:
    """Every visit's FLUX, IVAR, MASK, DISP and S2N, in star order."""
    nv = sum(st.nvis for st in stars)
    sp = _Spectra(np.zeros((nv, MASTAR_NPIX), np.float32), np.zeros((nv, MASTAR_NPIX), np.float32),
                  np.zeros((nv, MASTAR_NPIX), np.int32), np.zeros((nv, MASTAR_NPIX), np.float32),
                  np.zeros(nv, np.float32), np.zeros(nv))
    nodata_bit = np.int32(1 << MASK_BITS["NODATA"])
    badpix = np.int32(1 << MASK_BITS["BADPIX"])
    telluric = _telluric_pixels(model.wave)
    # The flux scale of every labelled visit is set on the MILES range (vacuum), so that a
    # star's MILES and STELIB visits have the same level where both have data.
    miles_range = model.wave <= model.miles_wave[-1]
    row = 0
    for st in stars:
        rows = slice(row, row + st.nvis)
        row0 = row
        row += st.nvis
        if st.kind == "hc":
            k = st.index
            a = st.scale / np.median(hc.flux[k][hc.ivar[k] > 0])  # keeps the real S/N
            fl, iv = hc.flux[k] * a, hc.ivar[k] / a**2
            ok = iv > 0
            sp.flux[rows], sp.ivar[rows] = fl, iv
            sp.mask[rows] = np.where(ok, 0, 1 << MASK_BITS["FULLREJECT"])
            sp.disp[rows] = _round_mantissa(lsf.sigma_from_resolution(model.wave, hc.sres[k]), 10)
            sp.s2n[rows] = np.median(fl[ok] * np.sqrt(iv[ok])) if ok.any() else 0.0
            continue
        # One group per source spectrum, in the order the visits were drawn (MILES first),
        # so that the noise each group draws is the same whatever else the star has.
        groups = list(dict.fromkeys(zip(st.library, st.source)))
        for library, src in groups:
            j = np.array([i for i, key in enumerate(zip(st.library, st.source)) if key == (library, src)])
            factors, snr = st.factor[j], st.snr[j]
            if library == "MILES":
                true, bad = degrade_miles(lib.flux[src], model, factors)
                covered = np.isfinite(true)
                use = covered & ~bad
                disp = np.stack([model.disp(f) for f in factors])
                mask = np.where(covered, 0, nodata_bit) | np.where(bad & covered, badpix, 0)
                coarser = np.array([float(model.wave[c[-1]]) if len(c := np.flatnonzero(
                    model.miles_sigma > model.target_sigma * f)) else 0.0 for f in factors])
            else:
                true, nodata, disp, coarser = degrade_stelib(stelib.spectra[src], model, factors)
                covered = ~nodata
                tell = covered & telluric
                use = covered & ~tell
                mask = np.where(covered, 0, nodata_bit) | np.where(tell, np.int32(1 << TELLURIC_MASK_BIT), 0)
            norm = use & miles_range
            true = np.where(covered, true, 0.0) * (st.scale / np.median(true[0][norm[0]]))
            noise = st.noise_rng(library).standard_normal(true.shape)
            fmed = np.array([np.median(t[u]) for t, u in zip(true, use)])[:, None]
            # median per-pixel S/N = snr: σ² = (F_med/snr)² (0.5 + 0.5 F/F_med), Poisson part ≥ 0
            var = (fmed / snr[:, None]) ** 2 * (0.5 + 0.5 * np.maximum(true, 0.0) / fmed)
            r = row0 + j
            sp.flux[r] = np.where(covered, true + np.sqrt(var) * noise, 0.0)
            sp.ivar[r] = np.where(use, 1.0 / var, 0.0)
            sp.mask[r] = mask
            sp.disp[r] = np.stack([_round_mantissa(d, 10) for d in disp])
            sp.s2n[r] = snr
            sp.coarser_below[r] = coarser
    return sp


def _add_pixel_problems(rng: np.random.Generator, sp: _Spectra, specials: _Specials) -> None:
    """Cosmic-ray segments (masked), NaN flux pixels (not masked) and one dead visit."""
    for v in specials.cosmic_visits:
        good = np.flatnonzero(sp.ivar[v] > 0)
        start = int(rng.choice(good[: max(1, len(good) - 6)]))
        length = int(rng.integers(2, 6))
        seg = slice(start, start + length)
        sigma = 1.0 / np.sqrt(np.maximum(sp.ivar[v, seg], 1e-30))
        sp.flux[v, seg] += (rng.uniform(10.0, 80.0, length) * sigma).astype(np.float32)
        sp.ivar[v, seg] = 0.0
        sp.mask[v, seg] |= 1 << MASK_BITS["COSMIC"]
    for v in specials.nan_visits:
        good = np.flatnonzero(sp.ivar[v] > 0)
        px = rng.choice(good, int(rng.integers(1, 3)), replace=False)
        sp.flux[v, px] = np.nan  # IVAR left as it is: readers must not trust a NaN pixel
    z = specials.zero_ivar_visit
    sp.ivar[z] = 0.0
    sp.mask[z] |= 1 << MASK_BITS["FULLREJECT"]
    sp.s2n[z] = 0.0


def _velocities(stars: list[_Star], velvar: set[int]) -> tuple[NDArray[np.float64], ...]:
    """Per visit: HELIOV_VISIT, VERR_VISIT, HELIOV (star median), VERR, DV_MAXSIG."""
    out: list[list[NDArray[np.float64]]] = [[], [], [], [], []]
    for s, st in enumerate(stars):
        e = st.rv_err
        v = st.rv + e * st.rng.standard_normal(st.nvis)
        if s in velvar:  # a binary: alternate sides of the systemic velocity, ≥ 10 km/s apart
            amp = st.rng.uniform(10.0, 40.0)
            v = v + amp * np.where(np.arange(st.nvis) % 2 == 0, 0.5, -0.5) * st.rng.uniform(1.0, 2.0, st.nvis)
        dvmax = 0.0
        if st.nvis > 1:
            dvmax = float((np.abs(v[:, None] - v[None, :]) / np.hypot(e[:, None], e[None, :])).max())
        n = st.nvis
        for lst, val in zip(out, (v, e, np.full(n, np.median(v)),
                                  np.full(n, 1.2533 * np.sqrt(np.sum(e**2)) / n), np.full(n, dvmax))):
            lst.append(val)
    return tuple(np.concatenate(x) for x in out)


def build_demo(out_dir: str | os.PathLike[str], *, seed: int = DEFAULT_SEED, n_stars: int | None = None) -> dict:
    """Write every demo file into the (existing, empty) ``out_dir``; return the manifest.

    This is the non-caching core of :func:`demo_files`, which should normally be used.
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    tdir = templates_dir()
    lib = load_miles(n_stars, directory=tdir)
    hc = load_mastarhc(directory=tdir)
    all_miles = sorted(_miles_files(tdir / "miles"))
    miles_names = {i: n for i, n in read_miles_names(tdir / "miles" / "paramsMILES_v9.1.txt", all_miles).items()
                   if i in set(all_miles)}
    stelib = select_stelib(read_stelib_dir(tdir / "stelib"), miles_names, lib.ids, n_stars)
    model = LsfModel.from_resolution(lib.wave_air, np.median(hc.sres, axis=0))
    log.info("demo: %d MILES stars, %d STELIB spectra (%d of MILES stars, %d STELIB-only stars), %d MaStarHC "
             "spectra (%.1f s to load)", len(lib.ids), len(stelib.spectra), len(stelib.shared), len(stelib.only),
             len(hc.names), time.perf_counter() - t0)

    # ---- stars, visits, spectra ----------------------------------------------------------
    # Star order: MILES stars (with the STELIB visits of the shared ones), STELIB-only
    # stars, MaStarHC targets. The first n_lab stars are the labelled-library stars.
    stars = [_draw_star(seed, "miles", int(i), k, _miles_mangaid(int(i)), None) for k, i in enumerate(lib.ids)]
    for k, i in enumerate(lib.ids):
        if int(i) in stelib.shared:
            _add_stelib_visits(stars[k], seed, int(i), stelib.shared[int(i)])
    for k, (key, _name, spectra) in enumerate(stelib.only):
        st = _draw_star(seed, "stelib", key, k, _stelib_mangaid(key), None)
        _assign_stelib_spectra(st, spectra)
        stars.append(st)
    stars += [_draw_star(seed, "hc", int(nm), k, f"hc-{nm}", 1) for k, nm in enumerate(hc.names)]
    n_miles, ns = len(lib.ids), len(stars)
    n_lab = n_miles + len(stelib.only)
    star_of_visit = np.repeat(np.arange(ns), [st.nvis for st in stars])
    visit_in_star = np.concatenate([np.arange(st.nvis) for st in stars])
    nv = len(star_of_visit)
    specials = _choose_specials(rng, stars, n_lab, star_of_visit)
    t1 = time.perf_counter()
    sp = _simulate_spectra(stars, lib, stelib, hc, model)
    _add_pixel_problems(rng, sp, specials)
    log.info("demo: %d visit spectra simulated in %.1f s", nv, time.perf_counter() - t1)

    # ---- per-visit metadata --------------------------------------------------------------
    sv = [stars[s] for s in star_of_visit]
    mjdqual = np.zeros(nv, np.int32)
    mjdqual[np.isin(star_of_visit, specials.emline_stars)] |= 1 << MJDQUAL_BITS["EMLINE"]
    mjdqual[sp.s2n <= 15.0] |= 1 << MJDQUAL_BITS["LOWSN"]
    rv_visit, rv_err_visit, heliov, verr, dvmax = _velocities(stars, set(specials.velvar_stars.tolist()))
    good_px = (sp.ivar > 0) & np.isfinite(sp.flux)
    s2n10 = np.zeros(nv, np.float32)
    for v in np.flatnonzero(good_px.any(axis=1)):
        s2n10[v] = np.percentile(sp.flux[v][good_px[v]] * np.sqrt(sp.ivar[v][good_px[v]]), 90)
    ra = np.array([st.ra for st in sv])
    dec = np.array([st.dec for st in sv])
    jit = rng.normal(0.0, 0.5 / 3600.0, (2, nv))
    nexp = np.array([st.nexp[j] for st, j in zip(sv, visit_in_star)], np.int16)
    visits = {
        "MANGAID": np.array([st.mangaid for st in sv]),
        "PLATE": np.array([st.plates[j] for st, j in zip(sv, visit_in_star)], np.int32),
        "IFUDESIGN": np.array([st.ifus[j] for st, j in zip(sv, visit_in_star)]),
        "MJD": np.array([st.mjds[j] for st, j in zip(sv, visit_in_star)], np.int32),
        "IFURA": ra + jit[0] / np.cos(np.radians(dec)), "IFUDEC": dec + jit[1],
        "RA": ra, "DEC": dec,
        "EXPTIME": 900.0 * nexp, "NEXP_VISIT": nexp,
        "HELIOV": heliov, "VERR": verr,
        "MJDQUAL": mjdqual,
        # GOODVISITS only:
        "NVELGOOD": nexp, "NEXP_USED": nexp, "HELIOV_VISIT": rv_visit, "VERR_VISIT": rv_err_visit,
        "VELVARFLAG": np.isin(star_of_visit, specials.velvar_stars).astype(np.int16), "DV_MAXSIG": dvmax,
        "S2N10": s2n10, "BADPIXFRAC": (sp.ivar <= 0).mean(axis=1).astype(np.float32),
    }
    # Survey order: by MJD, plate, IFU (a star's visits are not adjacent).
    order = np.lexsort((visits["IFUDESIGN"], visits["PLATE"], visits["MJD"]))
    visits = {k: np.asarray(v)[order] for k, v in visits.items()}
    sp.take(order)
    visits["S2N"] = sp.s2n
    row_of = np.empty(nv, np.int64)
    row_of[order] = np.arange(nv)

    # ---- per-star tables -------------------------------------------------------------------
    labels = np.full((ns, 3), np.nan)
    labels[:n_miles] = np.column_stack([lib.teff, lib.logg, lib.feh])
    for k, (_key, _name, spectra) in enumerate(stelib.only):
        first = stelib.spectra[spectra[0]]
        labels[n_miles + k] = (first.teff, first.logg, first.feh)
    source_name = np.array(["MILES"] * n_miles + ["STELIB"] * len(stelib.only) + [""] * (ns - n_lab))
    mangaid = np.array([st.mangaid for st in stars])
    star_ra = np.array([st.ra for st in stars])
    star_dec = np.array([st.dec for st in stars])
    goodstars = {
        "MANGAID": mangaid,
        "MINMJD": np.array([st.mjds.min() for st in stars], np.int32),
        "MAXMJD": np.array([st.mjds.max() for st in stars], np.int32),
        "NVISITS": np.array([st.nvis for st in stars], np.int32),
        "NPLATES": np.array([len(set(st.plates.tolist())) for st in stars], np.int32),
        "RA": star_ra, "DEC": star_dec,
        "INPUT_TEFF": np.where(np.isfinite(labels[:, 0]), labels[:, 0], -999.0),
        "INPUT_LOGG": np.where(np.isfinite(labels[:, 1]), labels[:, 1], -999.0),
        "INPUT_FE_H": np.where(np.isfinite(labels[:, 2]), labels[:, 2], -999.0),
        "INPUT_SOURCE": np.where(np.isfinite(labels).any(axis=1), source_name, ""),
    }
    star_order = np.argsort(mangaid, kind="stable")

    # Gaia crossmatch: one row per star, unique positive source ids, no photometry.
    source_id = np.zeros(ns, np.int64)
    while True:
        source_id[:] = rng.integers(10**15, 7 * 10**18, ns, dtype=np.int64)
        if len(np.unique(source_id)) == ns:
            break
    gj = rng.normal(0.0, 0.05 / 3600.0, (2, ns))
    gaia = {
        "MANGAID": mangaid, "RA": star_ra, "DEC": star_dec,
        "SOURCE_ID": source_id,
        "GAIARA": star_ra + gj[0] / np.cos(np.radians(star_dec)), "GAIADEC": star_dec + gj[1],
        "GAIA_CLEANMATCH": (rng.random(ns) < 0.95).astype(np.int16),
    }

    allstar, astats = _allstar(rng, labels[:n_lab], stars[:n_lab], source_id[:n_lab])

    # ---- write -----------------------------------------------------------------------------
    t2 = time.perf_counter()
    hdr = {"DEMO": (True, "mastar_vac demo data, not survey data"), "DEMOSEED": seed,
           "DEMOVER": FORMAT_VERSION, "DEMOSRC": "MILES + STELIB + MaStarHC (sdss-mangadap)"}
    files = DemoFiles.at(out)
    write_goodspec(files.goodspec, {**visits, "FLUX": sp.flux, "IVAR": sp.ivar, "MASK": sp.mask,
                                    "DISP": sp.disp, "PREDISP": sp.disp}, header=hdr)
    write_mastarall(files.mastarall, {k: v[star_order] for k, v in goodstars.items()}, visits, header=hdr)
    write_allstar(files.allstar, allstar)
    write_gaia_xmatch(files.gaia_xmatch, {k: v[star_order] for k, v in gaia.items()})
    _write_labels(files.labels, lib, miles_names, stelib, stars[:n_lab])
    _write_visit_sources(files.visit_sources, visits, stars, star_of_visit[order], visit_in_star[order],
                         stelib, lib, hc, sp.coarser_below)
    log.info("demo: files written in %.1f s", time.perf_counter() - t2)

    def nbit(values: NDArray, bit: int) -> int:
        return int(((values & (1 << bit)) != 0).sum())

    vis_lib = np.array([stars[s].library[j] for s, j in zip(star_of_visit, visit_in_star)])
    counts = {
        "stars": ns, "miles_stars": n_miles, "hc_stars": len(hc.names),
        "miles_labelled": int(lib.labelled.sum()),
        "stelib_spectra": len(stelib.spectra), "stelib_shared_stars": len(stelib.shared),
        "stelib_only_stars": len(stelib.only),
        "stelib_library_files": stelib.library_files, "stelib_library_overlap_stars": stelib.library_overlap_stars,
        "stelib_library_only_labelled_stars": stelib.library_only_labelled,
        "visits": nv, "miles_visits": int((vis_lib == "MILES").sum()),
        "stelib_visits": int((vis_lib == "STELIB").sum()), "hc_visits": int((vis_lib == "MASTARHC").sum()),
        "visits_snr_ge_50": int((sp.s2n >= 50).sum()),
        "visits_lowsn": nbit(mjdqual, MJDQUAL_BITS["LOWSN"]),
        "visits_emline": nbit(mjdqual, MJDQUAL_BITS["EMLINE"]),
        "stars_velvar": int(len(specials.velvar_stars)),
        "visits_zero_ivar": 1, "visits_cosmic": int(len(specials.cosmic_visits)),
        "visits_nan_flux": int(len(specials.nan_visits)),
        **astats,
    }
    manifest = {
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "n_stars": n_stars,
        "mastar_vac_version": __version__,
        "sdss_mangadap_version": _version("sdss-mangadap"),
        "files": {k: v for k, v in FILE_NAMES.items() if k != "manifest"},
        "sha256": {k: sha256_file(out / v) for k, v in FILE_NAMES.items() if k != "manifest"},
        "counts": counts,
        "special_rows": {  # rows of the goodspec file / GOODVISITS
            "zero_ivar_visit_row": int(row_of[specials.zero_ivar_visit]),
            "cosmic_visit_rows": sorted(int(row_of[v]) for v in specials.cosmic_visits),
            "nan_flux_visit_rows": sorted(int(row_of[v]) for v in specials.nan_visits),
        },
        "lsf": {"target": "median SRES of the MaStarHC spectra",
                "visit_factor": f"1 + N(0, {LSF_FACTOR_SIGMA}), clipped to {list(LSF_FACTOR_RANGE)}",
                "miles_fwhm_angstrom": MILES_FWHM,
                "stelib_fwhm_angstrom": STELIB_FWHM,
                "stelib": "broadened where sharper than the visit's LSF; left as is where coarser, DISP = "
                          "max(factor*target, STELIB sigma); COARSER_BELOW in visit_sources.csv"},
        "telluric": {"mask_bit": TELLURIC_MASK_BIT, "mask_bit_name": "BADFLUXFACTOR", "applies_to": "STELIB visits",
                     "bands_air_angstrom": [[lo, hi, name] for lo, hi, name in TELLURIC_BANDS_AIR]},
    }
    (out / FILE_NAMES["manifest"]).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    log.info("demo: built in %.1f s: %d stars, %d visits, %d allStar rows", time.perf_counter() - t0, ns, nv,
             astats["allstar_rows"])
    return manifest


def _allstar(rng: np.random.Generator, labels: NDArray[np.float64], stars: list[_Star],
             source_id: NDArray[np.int64]) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """The APOGEE-overlap rows (allStar layout) for the labelled-library stars (MILES,
    then STELIB-only; ``labels`` (n, 3) are their Teff, log g, [Fe/H]), and their counts."""
    labelled = np.isfinite(labels).all(axis=1)
    chosen = np.flatnonzero(labelled & (rng.random(len(labelled)) < 0.9))
    unlab = np.flatnonzero(~labelled)
    # Stars with placeholder labels: a few appear, but only with missing labels.
    unlab_in = unlab[rng.random(len(unlab)) < 0.3]
    nrow = len(chosen)
    perm = rng.permutation(nrow)
    sizes = [_at_least(0.03, nrow), _at_least(0.02, nrow), _at_least(0.01, nrow, 2), _at_least(0.01, nrow)]
    cuts = np.cumsum([0, *sizes])
    star_bad, binary, bad_label, dup = (perm[cuts[i]:cuts[i + 1]] for i in range(4))

    idx = np.concatenate([chosen, unlab_in])
    n = len(idx)
    teff = labels[idx, 0].astype(np.float64)
    logg = labels[idx, 1].astype(np.float64)
    feh = labels[idx, 2].astype(np.float64)
    aspcap = np.zeros(n, np.int64)
    starflag = np.zeros(n, np.int64)
    vscatter = np.abs(rng.normal(0.0, 0.3, n))
    chi2 = rng.lognormal(np.log(3.0), 0.5, n)
    snr = 10.0 ** rng.uniform(np.log10(60.0), np.log10(800.0), n)

    b = np.int64(1)
    aspcap[star_bad] |= (b << ASPCAPFLAG_BITS["STAR_BAD"]) | np.where(
        rng.random(len(star_bad)) < 0.5, b << ASPCAPFLAG_BITS["TEFF_BAD"], b << ASPCAPFLAG_BITS["CHI2_BAD"])
    chi2[star_bad] *= 10.0
    kinds = rng.integers(0, 4, len(binary))
    for r, kind in zip(binary, kinds):
        if kind == 0:
            aspcap[r] |= b << ASPCAPFLAG_BITS["MULTIPLE_SUSPECT"]
        else:
            bit = list(STARFLAG_BITS.values())[kind - 1]
            starflag[r] |= b << bit
        vscatter[r] = rng.uniform(1.0, 20.0)
    # Missing labels: NaN (no ASPCAP result) or the −9999 fill, alternately.
    for k, r in enumerate(np.concatenate([bad_label, np.arange(len(chosen), n)])):
        fill = np.nan if k % 2 == 0 else -9999.0
        teff[r] = logg[r] = feh[r] = fill
        aspcap[r] |= (b << ASPCAPFLAG_BITS["STAR_BAD"]) | (b << ASPCAPFLAG_BITS["NO_ASPCAP_RESULT"])

    st = [stars[i] for i in idx]
    pos = np.array([[s.ra, s.dec] for s in st]).reshape(-1, 2)
    jit = rng.normal(0.0, 0.2 / 3600.0, (2, n))
    ra = (pos[:, 0] + jit[0] / np.cos(np.radians(pos[:, 1]))) % 360.0
    dec = pos[:, 1] + jit[1]
    has_gaia = rng.random(n) < 0.85
    if n >= 2:  # both kinds of match always occur
        has_gaia[0], has_gaia[-1] = True, False
    finite = np.isfinite(teff) & (teff > 0)
    err_t = np.where(finite, np.abs(teff) * rng.uniform(0.01, 0.02, n), np.nan)
    err_g = np.where(finite, rng.uniform(0.03, 0.10, n), np.nan)
    err_m = np.where(finite, rng.uniform(0.01, 0.05, n), np.nan)
    param = np.full((n, 9), np.nan)
    param[:, 0], param[:, 1], param[:, 3] = teff, logg, feh
    cols: dict[str, np.ndarray] = {
        "APOGEE_ID": np.array([_apogee_id(s.ra, s.dec) for s in st]),
        "TELESCOPE": np.where(rng.random(n) < 0.8, "apo25m", "lco25m"),
        "FIELD": np.array([f"{int(s.ra):03d}{int(round(s.dec)):+03d}" for s in st]),
        "RA": ra, "DEC": dec, "SNR": snr,
        "NVISITS": rng.integers(1, 12, n),
        "VHELIO_AVG": np.array([s.rv for s in st]), "VSCATTER": vscatter,
        "VERR": rng.uniform(0.02, 0.3, n),
        "TEFF": teff, "TEFF_ERR": err_t, "LOGG": logg, "LOGG_ERR": err_g,
        "M_H": feh, "M_H_ERR": err_m, "FE_H": feh, "FE_H_ERR": err_m,
        "ASPCAPFLAG": aspcap, "STARFLAG": starflag, "EXTRATARG": np.zeros(n, np.int32),
        "ASPCAP_CHI2": chi2, "PARAM": param,
        "GAIAEDR3_SOURCE_ID": np.where(has_gaia, source_id[idx], 0),
        "SURVEY": np.where(rng.random(n) < 0.5, "apogee2-manga", "manga-apogee2"),
    }
    # Duplicates: a second row of the same star (another telescope/field, lower S/N,
    # labels a little different) flagged EXTRATARG bit 4, as DR17 does.
    d = np.asarray(dup, np.int64)
    extra = {k: np.asarray(v)[d].copy() for k, v in cols.items()}
    if len(d):
        extra["TELESCOPE"] = np.where(extra["TELESCOPE"] == "apo25m", "lco25m", "apo25m")
        extra["FIELD"] = np.char.add(extra["FIELD"].astype(str), "_2")
        extra["SNR"] = extra["SNR"] * rng.uniform(0.3, 0.8, len(d))
        extra["TEFF"] = extra["TEFF"] + rng.normal(0.0, 40.0, len(d))
        extra["LOGG"] = extra["LOGG"] + rng.normal(0.0, 0.05, len(d))
        extra["FE_H"] = extra["FE_H"] + rng.normal(0.0, 0.03, len(d))
        extra["M_H"] = extra["FE_H"]
        extra["PARAM"][:, 0], extra["PARAM"][:, 1], extra["PARAM"][:, 3] = extra["TEFF"], extra["LOGG"], extra["FE_H"]
        extra["EXTRATARG"] = extra["EXTRATARG"] | np.int32(1 << EXTRATARG_DUPLICATE)
    allstar = {k: np.concatenate([np.asarray(cols[k]), extra[k]]) for k in cols}
    order = rng.permutation(len(allstar["APOGEE_ID"]))
    allstar = {k: v[order] for k, v in allstar.items()}
    binflag = ((allstar["ASPCAPFLAG"] & (b << ASPCAPFLAG_BITS["MULTIPLE_SUSPECT"])) != 0) | (
        (allstar["STARFLAG"] & sum(b << x for x in STARFLAG_BITS.values())) != 0)
    stats = {
        "allstar_rows": int(len(order)),
        "allstar_stars": int(n),
        "allstar_valid_label_stars": int(len(chosen) - len(bad_label)),
        "allstar_star_bad": int(((allstar["ASPCAPFLAG"] & (b << ASPCAPFLAG_BITS["STAR_BAD"])) != 0).sum()),
        "allstar_binary": int(binflag.sum()),
        "allstar_duplicates": int(len(d)),
        "allstar_missing_labels": int((~(np.isfinite(allstar["TEFF"]) & (allstar["TEFF"] > 0))).sum()),
        "allstar_no_gaia_id": int((allstar["GAIAEDR3_SOURCE_ID"] == 0).sum()),
    }
    return allstar, stats


LABEL_COLUMNS = ("mangaid", "library", "star_name", "miles_id", "miles_name", "stelib_id", "teff", "logg", "fe_h",
                 "miles_teff", "miles_logg", "miles_fe_h", "stelib_teff", "stelib_logg", "stelib_fe_h")


def _write_labels(path: Path, lib: MilesLibrary, miles_names: dict[int, str], stelib: StelibStars,
                  stars: list[_Star]) -> None:
    """One row per labelled-library demo star (MILES stars, then STELIB-only stars).

    ``teff, logg, fe_h`` are the star's adopted labels (its allStar/INPUT labels): MILES's
    for a MILES star, shared or not, STELIB's for a STELIB-only one; ``miles_*`` and
    ``stelib_*`` are each library's own (NaN where the star is not in it or the library
    gives none), for comparisons across libraries. ``library`` is MILES, STELIB or
    MILES+STELIB; ``stelib_id`` the STELIB file stem(s), ';'-joined for HD053929.
    """
    def fmt(x: float) -> str:
        return "nan" if not np.isfinite(x) else format(float(x), ".6g")

    def stelib_cols(idx: Sequence[int]) -> tuple[str, list[str]]:
        if not idx:
            return "", ["nan"] * 3
        first = stelib.spectra[idx[0]]
        return ";".join(stelib.spectra[i].name for i in idx), [fmt(first.teff), fmt(first.logg), fmt(first.feh)]

    with open(path, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(LABEL_COLUMNS)
        for st in stars:
            if st.kind == "miles":
                i = int(lib.ids[st.index])
                miles = [fmt(lib.teff[st.index]), fmt(lib.logg[st.index]), fmt(lib.feh[st.index])]
                sid, sl = stelib_cols(stelib.shared.get(i, []))
                w.writerow([st.mangaid, "MILES+STELIB" if sid else "MILES", miles_names.get(i, ""), i, f"m{i:04d}", sid,
                            *miles, *miles, *sl])
            else:
                _key, name, idx = stelib.only[st.index]
                sid, sl = stelib_cols(idx)
                w.writerow([st.mangaid, "STELIB", name, "", "", sid, *sl, "nan", "nan", "nan", *sl])


def _write_visit_sources(path: Path, visits: dict[str, np.ndarray], stars: list[_Star],
                         star_of_row: NDArray[np.int64], visit_of_row: NDArray[np.int64], stelib: StelibStars,
                         lib: MilesLibrary, hc: MaStarHC, coarser_below: NDArray[np.float64]) -> None:
    """Per goodspec row: which library and spectrum the visit is made from, and the
    reddest MaStar wavelength (vacuum Å) where that spectrum's LSF is coarser than the
    visit's (so DISP there is the library's σ, not the MaStar one; 0 = nowhere)."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["MANGAID", "PLATE", "IFUDESIGN", "MJD", "LIBRARY", "LIBRARY_ID", "COARSER_BELOW"])
        for r, (s, j) in enumerate(zip(star_of_row, visit_of_row)):
            st = stars[int(s)]
            library, src = st.library[int(j)], st.source[int(j)]
            ident = {"MILES": lambda: f"m{int(lib.ids[src]):04d}", "STELIB": lambda: stelib.spectra[src].name,
                     "MASTARHC": lambda: f"MaStarHC_{hc.names[src]}"}[library]()
            w.writerow([visits["MANGAID"][r], int(visits["PLATE"][r]), visits["IFUDESIGN"][r], int(visits["MJD"][r]),
                        library, ident, format(float(coarser_below[r]), ".1f")])



def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


# --------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------


def demo_files(cache_dir: str | Path | None = None, *, seed: int = DEFAULT_SEED, n_stars: int | None = None,
               force: bool = False) -> DemoFiles:
    """The demo files, built on first use under ``<cache>/demo-v<FORMAT>-s<seed>[-n<n>]/``.

    A complete demo (manifest present, every file it lists present) is returned as it is
    unless ``force``. A build goes into a temporary sibling directory that is moved into
    place only when finished, so a killed build never leaves a half demo behind.
    """
    if n_stars is not None and n_stars < 1:
        raise ValueError(f"n_stars must be >= 1, got {n_stars}")
    cache = Path(cache_dir).expanduser().absolute() if cache_dir is not None else default_cache_dir()
    final = cache / _demo_dirname(seed, n_stars)
    files = DemoFiles.at(final)
    if not force and files.complete():
        log.debug("demo: using %s", final)
        return files
    cache.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(cache, final.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.part-", dir=cache))
    try:
        log.info("demo: building %s (seed %d%s)", final, seed, f", {n_stars} MILES stars" if n_stars else "")
        build_demo(tmp, seed=seed, n_stars=n_stars)
        _usual_permissions(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        if not force and files.complete():  # another process finished first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
            return files
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        shutil.rmtree(old, ignore_errors=True)
    try:
        os.replace(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not files.complete():
            raise
    return files


def _usual_permissions(directory: Path) -> None:
    """Give the build the umask's permissions: mkdtemp/mkstemp make them owner-only,
    which would hide a shared cache from its other users."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for p in directory.iterdir():
        p.chmod(0o666 & ~umask)


def _remove_stale_builds(cache: Path, name: str, max_age_s: float = 6 * 3600.0) -> None:
    """Remove temporary build dirs of this demo left by killed runs (old ones only, so
    that a build running in another process is not pulled from under it)."""
    now = time.time()
    for p in cache.glob(f".{name}.part-*"):
        try:
            if now - p.stat().st_mtime > max_age_s:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mastar_vac.demo",
                                     description="Build (once) and show the embedded MaStar demo data.")
    parser.add_argument("--cache", default=None, help="cache directory (default $MASTAR_VAC_CACHE or "
                        "~/.cache/mastar_vac)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--n-stars", type=int, default=None, help="only the first N MILES stars (by id)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the demo exists")
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    try:
        files = demo_files(args.cache, seed=args.seed, n_stars=args.n_stars, force=args.force)
    except (MastarVacError, ValueError) as exc:
        log.error("%s", exc)
        return 1
    counts = json.loads(files.manifest.read_text())["counts"]
    for k in ("goodspec", "mastarall", "allstar", "gaia_xmatch", "labels", "visit_sources", "manifest"):
        print(f"{k:12s} {getattr(files, k)}")
    print(f"demo: {counts['stars']} stars, {counts['visits']} visits ({counts['miles_visits']} MILES, "
          f"{counts['stelib_visits']} STELIB, {counts['hc_visits']} MaStarHC), {counts['allstar_rows']} allStar rows "
          f"({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
