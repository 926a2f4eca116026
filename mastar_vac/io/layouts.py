"""Column layouts of the survey files, as declared data (datamodels.md §1–§2).

A layout lists every column a file of that kind carries, with dtype, per-row shape,
unit and the value a writer puts where no data is given. The writers use them to make
files exactly like the survey's (for tests and the demo); the readers use them to know
which columns they require and which name variants they accept.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputFileError
from ..wavegrid import MASTAR_NPIX
from .fitstable import BinTableReader

__all__ = [
    "Col",
    "Layout",
    "GOODSPEC",
    "GOODSTARS",
    "GOODVISITS",
    "GAIA_XMATCH",
    "COMBSPEC",
    "ALLSTAR",
    "ALIASES",
    "resolve_column",
    "clean_mangaid",
    "clean_ifudesign",
    "check_vector_column",
    "check_column_kind",
    "read_catalog",
]

FLUX_UNIT = "1e-17 erg / (Angstrom cm2 s)"


@dataclass(frozen=True)
class Col:
    name: str
    dtype: str  # numpy dtype string; "U<n>" for strings
    shape: tuple[int, ...] = ()
    unit: str | None = None
    fill: object = 0
    description: str | None = None

    def empty(self, n: int) -> np.ndarray:
        return np.full((n, *self.shape), self.fill, dtype=self.dtype)


@dataclass(frozen=True)
class Layout:
    extname: str
    columns: tuple[Col, ...]
    required: tuple[str, ...] = field(default=())

    def __getitem__(self, name: str) -> Col:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(name)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    def fill(self, data: Mapping[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
        """Columns of this layout, from ``data`` where given and the fill value elsewhere."""
        out: dict[str, np.ndarray] = {}
        for c in self.columns:
            if c.name in data:
                v = np.asarray(data[c.name])
                out[c.name] = v.astype(c.dtype) if not c.dtype.startswith("U") else v.astype(str)
            else:
                out[c.name] = c.empty(n)
        return out

    @property
    def units(self) -> dict[str, str]:
        return {c.name: c.unit for c in self.columns if c.unit}

    @property
    def descriptions(self) -> dict[str, str]:
        return {c.name: c.description for c in self.columns if c.description}

    @property
    def string_widths(self) -> dict[str, int]:
        return {c.name: int(c.dtype[1:]) for c in self.columns if c.dtype.startswith("U")}


V = (MASTAR_NPIX,)

_ID = (
    Col("DRPVER", "U6", fill="v3_1_1"),
    Col("MPROCVER", "U6", fill="v1_7_7"),
    Col("MANGAID", "U22", fill="", description="MaNGA ID"),
)

_VISIT_META = (
    Col("PLATE", "i4", fill=-1),
    Col("IFUDESIGN", "U5", fill="", description="IFU design (a string in DR17)"),
    Col("MJD", "i4", fill=-1),
    Col("IFURA", "f8", unit="deg", fill=np.nan),
    Col("IFUDEC", "f8", unit="deg", fill=np.nan),
    Col("RA", "f8", unit="deg", fill=np.nan),
    Col("DEC", "f8", unit="deg", fill=np.nan),
    Col("EPOCH", "f4", unit="yr", fill=2000.0),
    Col("PSFMAG", "f4", (5,), unit="mag", fill=np.nan),
    Col("MNGTARG2", "i4"),
    Col("EXPTIME", "f4", unit="s", fill=900.0),
    Col("NEXP_VISIT", "i2", fill=1),
    Col("HELIOV", "f4", unit="km/s", fill=0.0),
    Col("VERR", "f4", unit="km/s", fill=1.0),
    Col("V_ERRCODE", "i2"),
    Col("MJDQUAL", "i4", description="MASTAR_QUAL bitmask"),
)

GOODSPEC = Layout(
    "GOODSPEC",
    _ID + _VISIT_META + (
        Col("S2N", "f4", fill=np.nan, description="median S/N per pixel"),
        Col("WAVE", "f8", V, unit="Angstrom", description="vacuum wavelength"),
        Col("FLUX", "f4", V, unit=FLUX_UNIT),
        Col("IVAR", "f4", V, unit=None),
        Col("MASK", "i4", V, description="pixel mask (MANGA_DRP2PIXMASK assumed)"),
        Col("DISP", "f4", V, unit="Angstrom", description="LSF dispersion (1 sigma)"),
        Col("PREDISP", "f4", V, unit="Angstrom", description="pre-pixelisation LSF sigma"),
    ),
    required=("MANGAID", "PLATE", "IFUDESIGN", "MJD", "WAVE", "FLUX", "IVAR"),
)

GOODSTARS = Layout(
    "GOODSTARS",
    _ID + (
        Col("MINMJD", "i4"), Col("MAXMJD", "i4"), Col("NVISITS", "i4"), Col("NPLATES", "i4"),
        Col("RA", "f8", unit="deg", fill=np.nan), Col("DEC", "f8", unit="deg", fill=np.nan),
        Col("EPOCH", "f4", unit="yr", fill=2000.0), Col("PSFMAG", "f4", (5,), unit="mag", fill=np.nan),
        Col("MNGTARG2", "i4"),
        Col("INPUT_LOGG", "f4", fill=-999.0), Col("INPUT_TEFF", "f4", unit="K", fill=-999.0),
        Col("INPUT_FE_H", "f4", fill=-999.0), Col("INPUT_ALPHA_M", "f4", fill=-999.0),
        Col("INPUT_SOURCE", "U14", fill=""), Col("PHOTOCAT", "U9", fill=""),
    ),
    required=("MANGAID",),
)

GOODVISITS = Layout(
    "GOODVISITS",
    _ID + _VISIT_META + (
        Col("NVELGOOD", "i2", fill=1),
        Col("HELIOV_VISIT", "f4", unit="km/s"), Col("VERR_VISIT", "f4", unit="km/s", fill=1.0),
        Col("V_ERRCODE_VISIT", "i2"),
        Col("VELVARFLAG", "i2", description="1 = RV varies between visits (possible binary)"),
        Col("DV_MAXSIG", "f4"),
        Col("BPRPERR_SP", "f4", unit="mag"),
        Col("NEXP_USED", "i2", fill=1),
        Col("S2N", "f4", fill=np.nan), Col("S2N10", "f4", fill=np.nan),
        Col("BADPIXFRAC", "f4"),
        Col("COORD_SOURCE", "U9", fill=""), Col("PHOTOCAT", "U9", fill=""),
    ),
    required=("MANGAID", "PLATE", "IFUDESIGN", "MJD"),
)

GAIA_XMATCH = Layout(
    "GAIAXMATCH",  # real file: a single table in HDU 1; EXTNAME unconfirmed, read by index
    _ID + (
        Col("RA", "f8", unit="deg", fill=np.nan), Col("DEC", "f8", unit="deg", fill=np.nan),
        Col("EPOCH", "f4", unit="yr", fill=2000.0),
        Col("SOURCE_ID", "i8", fill=-999, description="Gaia EDR3 source_id"),
        Col("REF_EPOCH", "f8", unit="yr", fill=2016.0),
        Col("GAIARA", "f8", unit="deg", fill=np.nan), Col("GAIADEC", "f8", unit="deg", fill=np.nan),
        Col("PARALLAX", "f8", unit="mas", fill=-999.0), Col("PARALLAX_ERROR", "f4", unit="mas", fill=-999.0),
        Col("PMRA", "f8", unit="mas/yr", fill=-999.0), Col("PMDEC", "f8", unit="mas/yr", fill=-999.0),
        Col("PHOT_G_MEAN_MAG", "f4", unit="mag", fill=-999.0),
        Col("PHOT_BP_MEAN_MAG", "f4", unit="mag", fill=-999.0),
        Col("PHOT_RP_MEAN_MAG", "f4", unit="mag", fill=-999.0),
        Col("BP_RP", "f4", unit="mag", fill=-999.0),
        Col("R_MED_GEO", "f4", unit="pc", fill=-999.0), Col("R_MED_PHOTOGEO", "f4", unit="pc", fill=-999.0),
        Col("EBV", "f4", unit="mag", fill=-999.0),
        Col("M_G", "f4", unit="mag", fill=-999.0),
        Col("M_G_ERR_UP", "f4", unit="mag", fill=-999.0), Col("M_G_ERR_DN", "f4", unit="mag", fill=-999.0),
        Col("BPRPC", "f4", unit="mag", fill=-999.0, description="dereddened BP-RP"),
        Col("BPRPC_ERR_UP", "f4", unit="mag", fill=-999.0), Col("BPRPC_ERR_DN", "f4", unit="mag", fill=-999.0),
        Col("GAIA_CLEANMATCH", "i2"), Col("DUSTCLEAN", "i2"),
        Col("SIMBAD_MAIN_ID", "U24", fill=""), Col("OTYPE_S", "U16", fill=""), Col("SP_TYPE", "U16", fill=""),
    ),
    required=("MANGAID",),
)

COMBSPEC = Layout(
    "COMBSPEC",
    (
        Col("MANGAID", "U22", fill=""),
        Col("RA", "f8", unit="deg", fill=np.nan), Col("DEC", "f8", unit="deg", fill=np.nan),
        Col("WAVE", "f8", V, unit="Angstrom"),
        Col("FLUX", "f4", V, unit=FLUX_UNIT),
        Col("IVAR", "f4", V),
        Col("MASK", "i4", V),
        Col("DISP", "f4", V, unit="Angstrom", description="target LSF sigma"),
    ),
    required=("MANGAID", "WAVE", "FLUX", "IVAR"),
)

ALLSTAR = Layout(
    "ALLSTAR",
    (
        Col("APOGEE_ID", "U30", fill=""), Col("TELESCOPE", "U8", fill="apo25m"), Col("FIELD", "U20", fill=""),
        Col("RA", "f8", unit="deg", fill=np.nan), Col("DEC", "f8", unit="deg", fill=np.nan),
        Col("SNR", "f4", fill=100.0), Col("NVISITS", "i4", fill=3),
        Col("VHELIO_AVG", "f4", unit="km/s"), Col("VSCATTER", "f4", unit="km/s"), Col("VERR", "f4", unit="km/s"),
        Col("TEFF", "f4", unit="K", fill=np.nan), Col("TEFF_ERR", "f4", unit="K", fill=np.nan),
        Col("LOGG", "f4", unit="dex", fill=np.nan), Col("LOGG_ERR", "f4", unit="dex", fill=np.nan),
        Col("M_H", "f4", unit="dex", fill=np.nan), Col("M_H_ERR", "f4", unit="dex", fill=np.nan),
        Col("ALPHA_M", "f4", unit="dex", fill=np.nan), Col("ALPHA_M_ERR", "f4", unit="dex", fill=np.nan),
        Col("FE_H", "f4", unit="dex", fill=np.nan), Col("FE_H_ERR", "f4", unit="dex", fill=np.nan),
        Col("FE_H_FLAG", "i4"),
        Col("VMICRO", "f4", unit="km/s", fill=np.nan), Col("VMACRO", "f4", unit="km/s", fill=np.nan),
        Col("VSINI", "f4", unit="km/s", fill=np.nan),
        Col("ASPCAPFLAG", "i8"), Col("STARFLAG", "i8"), Col("EXTRATARG", "i4"),
        Col("ASPCAP_CHI2", "f4", fill=1.0),
        Col("PARAM", "f4", (9,), fill=np.nan), Col("PARAMFLAG", "i8", (9,)),
        Col("GAIAEDR3_SOURCE_ID", "i8"),
        Col("GAIAEDR3_PARALLAX", "f4", unit="mas", fill=np.nan),
        Col("GAIAEDR3_PHOT_G_MEAN_MAG", "f4", unit="mag", fill=np.nan),
        Col("GAIAEDR3_PHOT_BP_MEAN_MAG", "f4", unit="mag", fill=np.nan),
        Col("GAIAEDR3_PHOT_RP_MEAN_MAG", "f4", unit="mag", fill=np.nan),
        Col("SURVEY", "U32", fill="apogee2"), Col("APOGEE2_TARGET1", "i4"),
    ),
    required=("APOGEE_ID", "RA", "DEC", "ASPCAPFLAG", "STARFLAG"),
)

# Name variants seen across releases (datamodels.md §1.2): canonical -> accepted, in order.
ALIASES: dict[str, tuple[str, ...]] = {
    "RA": ("RA", "OBJRA"),
    "DEC": ("DEC", "OBJDEC"),
    "S2N": ("S2N", "SNR"),
    "NEXP_VISIT": ("NEXP_VISIT", "NEXP"),
}


def resolve_column(reader: BinTableReader, name: str, *, required: bool = True) -> str | None:
    """The column of ``reader`` that holds canonical ``name`` (trying known variants)."""
    names = set(reader.names)
    for candidate in ALIASES.get(name, (name,)):
        if candidate in names:
            return candidate
    if required:
        variants = ALIASES.get(name, (name,))
        raise InputFileError(reader.path, "required column missing", hdu=reader.hdu_name or reader.hdu_index,
                             column=name, expected=" or ".join(variants))
    return None


def clean_mangaid(values: np.ndarray) -> np.ndarray:
    """MANGAIDs as stripped strings (the files pad them with spaces)."""
    return np.char.strip(np.asarray(values).astype(str))


def clean_ifudesign(values: np.ndarray) -> np.ndarray:
    """IFUDESIGN as the string of its integer ('12701'), whether stored as int or string."""
    v = np.asarray(values)
    if v.dtype.kind in "iu":
        return v.astype(str)
    s = np.char.strip(v.astype(str))
    out = s.copy()
    for i, x in enumerate(s):
        if x.lstrip("-").isdigit():
            out[i] = str(int(x))
    return out


def check_vector_column(reader: BinTableReader, name: str, length: int) -> None:
    """Fail early, naming the column, when a spectral vector has the wrong length."""
    col = reader.column(name)
    n = int(np.prod(col.shape)) if col.shape else 1
    if n != length:
        raise InputFileError(reader.path, f"vector length {n} per row", hdu=reader.hdu_name or reader.hdu_index,
                             column=name, expected=f"{length} pixels (the MaStar grid)")


def check_column_kind(reader: BinTableReader, name: str, kinds: str) -> None:
    """Fail early when a column has the wrong type: ``kinds`` is a set of FITS codes
    ("IJK" integers, "ED" floats, "A" strings, "L" logical, "B" bytes)."""
    col = reader.column(name)
    if col.code not in kinds:
        names = {"I": "int16", "J": "int32", "K": "int64", "E": "float32", "D": "float64", "A": "string",
                 "L": "logical", "B": "uint8"}
        want = " or ".join(dict.fromkeys(names.get(k, k) for k in kinds))
        raise InputFileError(reader.path, f"column has type {names.get(col.code, col.code)}",
                             hdu=reader.hdu_name or reader.hdu_index, column=name, expected=want)


NUMERIC = "BIJKED"
INTEGER_OR_STRING = "BIJKA"


def _check_layout_kind(reader: BinTableReader, actual: str, col: Col | None) -> None:
    if col is None:
        return
    if col.name in ("MANGAID",):
        check_column_kind(reader, actual, INTEGER_OR_STRING)
    elif col.name == "IFUDESIGN":
        check_column_kind(reader, actual, INTEGER_OR_STRING)
    elif not col.dtype.startswith("U"):
        check_column_kind(reader, actual, NUMERIC)


def read_catalog(path: str | Path, layout: Layout, *, hdu: int | str | None = None,
                 columns: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Read the named (canonical) columns of a small catalogue table.

    Required columns of ``layout`` must be present; others are read when present.
    MANGAID and IFUDESIGN come back cleaned; numeric columns native-endian.
    """
    with BinTableReader(path, hdu if hdu is not None else 1) as r:
        want = list(columns) if columns is not None else layout.names
        for req in layout.required:
            resolve_column(r, req, required=True)
        out: dict[str, np.ndarray] = {}
        actual = {}
        for name in want:
            col = resolve_column(r, name, required=name in layout.required)
            if col is not None:
                actual[name] = col
                _check_layout_kind(r, col, layout[name] if name in layout.names else None)
        data = r.read(list(dict.fromkeys(actual.values())))
    for name, col in actual.items():
        v = data[col]
        if name == "MANGAID":
            v = clean_mangaid(v)
        elif name == "IFUDESIGN":
            v = clean_ifudesign(v)
        out[name] = v
    return out
