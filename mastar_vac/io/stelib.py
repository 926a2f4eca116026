"""STELIB v3.2 spectra as shipped by ``sdss-mangadap`` (``spectral_templates/stelib/``).

Each ``STELIB_v3.2_<name>.fits`` holds one spectrum in its primary HDU: a linear air
wavelength scale (CRVAL1, CDELT1, CRPIX1; every file has its own, starting near
3,200 Å at ~1 Å per pixel), flux in erg/s/cm²/Å, zeros where the library has no data
(below ~3,460 Å, above ~9,600 Å and in some gaps). The labels are header cards TEFF,
LOG_G and FE_H, numbers when known and the string ``'-'`` when not; SPECTYPE is the
spectral type. The file name, not OBJECT, names the star: OBJECT is sometimes another
catalogue's name (``HD015318`` has OBJECT ``'HR718'``), and the one star observed twice
is ``HD053929lp`` and ``HD053929ss``. The spectra are corrected for interstellar
extinction (ISEXTINC: the A_V applied, > 0 in 112 of the 255 files, up to 2.1), which
MILES is not: their continua differ, their lines do not.

This module only reads: resolution matching and resampling live in
:mod:`mastar_vac.lsf` and :mod:`mastar_vac.wavegrid`.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from ..errors import InputFileError

__all__ = ["STELIB_PREFIX", "StelibSpectrum", "hd_key", "read_stelib_file", "read_stelib_dir"]

STELIB_PREFIX = "STELIB_v3.2_"

_HD = re.compile(r"HD\s*0*(\d+)([A-Z]?)(?:[a-z]*)")


@dataclass(frozen=True)
class StelibSpectrum:
    """One STELIB file: air wavelengths, flux and labels (NaN when unknown)."""

    name: str  # from the file name: "HD002857", "HD053929lp", "Feige110"
    hd: str | None  # HD number with component letter, e.g. "HD2857", "HD112033C"; None if not an HD star
    object: str  # the OBJECT card, as written
    spectype: str
    wave_air: NDArray[np.float64]  # pixel centres, air Å
    flux: NDArray[np.float64]  # erg/s/cm²/Å; 0 where the library has no data
    teff: float
    logg: float
    feh: float
    av_dereddened: float  # ISEXTINC: the A_V STELIB removed (0 when none; NaN if the card is absent)
    path: Path

    @property
    def labelled(self) -> bool:
        return bool(np.isfinite(self.teff) and np.isfinite(self.logg) and np.isfinite(self.feh))

    @property
    def covered(self) -> NDArray[np.bool_]:
        """Pixels with data: finite and positive flux (the gaps and ends are zeros)."""
        return np.isfinite(self.flux) & (self.flux > 0)


def hd_key(name: str) -> str | None:
    """``"HD" + number + component`` for an HD designation in any padding
    ("HD002857", "HD 2857", "HD53929lp" → "HD2857", "HD2857", "HD53929"); None otherwise.

    A trailing capital is a component of a multiple star and is kept (HD112033C is not
    HD112033); lower-case tails are observation tags (STELIB's "lp"/"ss") and dropped.
    """
    m = _HD.fullmatch(name.strip())
    return f"HD{int(m.group(1))}{m.group(2)}" if m else None


def _label(path: Path, header, card: str) -> float:  # noqa: ANN001 - astropy Header
    """A numeric label card; NaN for '-', blank or a missing card, an error for anything else."""
    value = header.get(card)
    if value is None or isinstance(value, bool):
        return np.nan
    if isinstance(value, (int, float)):
        return float(value) if np.isfinite(value) else np.nan
    s = str(value).strip()
    if s in ("", "-", "--", "nan", "NaN"):
        return np.nan
    try:
        return float(s)
    except ValueError:
        raise InputFileError(path, f"header card {card} = {value!r} is neither a number nor '-'", hdu=0,
                             column=card) from None


def read_stelib_file(path: str | os.PathLike[str]) -> StelibSpectrum:
    """One STELIB spectrum; :class:`InputFileError` naming the file when it is not one."""
    from astropy.io import fits

    p = Path(path)
    if not p.name.startswith(STELIB_PREFIX) or p.suffix != ".fits":
        raise InputFileError(p, "not a STELIB file name", expected=f"{STELIB_PREFIX}<star>.fits")
    name = p.name[len(STELIB_PREFIX):-len(".fits")]
    try:
        # The IRAF headers carry a non-standard APNUM1 card that astropy "fixes" with a
        # VerifyWarning on every file; it is harmless and not about the data.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", fits.verify.VerifyWarning)
            with fits.open(p, memmap=False) as h:
                header = h[0].header
                data = h[0].data
                data = None if data is None else np.asarray(data, np.float64)
    except (OSError, ValueError) as exc:
        raise InputFileError(p, f"cannot be read as FITS ({exc})") from None
    if data is None or data.ndim != 1 or data.size < 2:
        raise InputFileError(p, "primary HDU holds no 1-D spectrum", hdu=0,
                             expected="a 1-D flux array")
    try:
        crval = float(header["CRVAL1"])
        cdelt = float(header.get("CDELT1", header.get("CD1_1")))
        crpix = float(header.get("CRPIX1", 1.0))
    except (KeyError, TypeError, ValueError):
        raise InputFileError(p, "no linear wavelength scale in the header", hdu=0, column="CRVAL1/CDELT1",
                             expected="CRVAL1 and CDELT1 (Å)") from None
    if not (np.isfinite(crval) and np.isfinite(cdelt) and cdelt > 0 and 1000.0 < crval < 20000.0):
        raise InputFileError(p, f"implausible wavelength scale CRVAL1={crval}, CDELT1={cdelt}", hdu=0,
                             column="CRVAL1/CDELT1", expected="air wavelengths in Å, increasing")
    wave = crval + cdelt * (np.arange(data.size) + 1.0 - crpix)
    flux = np.where(np.isfinite(data), data, 0.0)
    if not (flux > 0).any():
        raise InputFileError(p, "the spectrum has no positive flux", hdu=0)
    obj = str(header.get("OBJECT", "")).strip()
    return StelibSpectrum(name=name, hd=hd_key(name), object=obj, spectype=str(header.get("SPECTYPE", "")).strip(),
                          wave_air=wave, flux=flux, teff=_label(p, header, "TEFF"),
                          logg=_label(p, header, "LOG_G"), feh=_label(p, header, "FE_H"),
                          av_dereddened=_label(p, header, "ISEXTINC"), path=p)


def read_stelib_dir(directory: str | os.PathLike[str]) -> list[StelibSpectrum]:
    """Every ``STELIB_v3.2_*.fits`` in ``directory``, sorted by file name."""
    d = Path(directory)
    paths = sorted(d.glob(f"{STELIB_PREFIX}*.fits"))
    if not paths:
        raise InputFileError(d, "no STELIB spectra found", expected=f"files {STELIB_PREFIX}*.fits")
    return [read_stelib_file(p) for p in paths]
