"""External stellar-parameter catalogues for the comparison of paper §4.3: LAMOST LRS,
SEGUE SSPP and Gaia DR3 (datamodels.md §3, §4, §7).

Every reader returns the same **standardized schema**, so that the cross-match and the
offset/scatter tables never need to know which survey they are looking at:

=========================  ==================================================================
``survey``                 "LAMOST", "SEGUE" or "GAIA" (the prefix the cross-match gives)
``ext_id``                 the survey's own row identifier, as a string (LAMOST ``obsid``,
                           SEGUE ``SPECOBJID`` — numeric(20) in CAS, beyond int64 —, Gaia
                           ``source_id``)
``RA``, ``DEC``            degrees
``TEFF`` … ``ALPHA_ERR``   TEFF, TEFF_ERR, LOGG, LOGG_ERR, FEH, FEH_ERR, ALPHA, ALPHA_ERR
                           (float64; NaN where the survey has no value or no such label)
``SNR``                    the survey's S/N (LAMOST ``snrg``, SSPP ``SNR``; NaN for Gaia)
extras                     LAMOST: SNRR, GAIA_SOURCE_ID, FEH_KIND ("FE_H", or "M_H" for the
                           M-star catalogue, whose metallicity is [M/H]);
                           SEGUE: PLATE, MJD, FIBER, FLAG;
                           Gaia: SOURCE_ID, PARALLAX, PARALLAX_ERROR, PMRA, PMDEC, G, BP, RP,
                           BP_RP, RUWE
=========================  ==================================================================

Which file column feeds which standardized column is declared once per survey
(:data:`LAMOST_SCHEMA`, :data:`SEGUE_SCHEMA`, :data:`GAIA_SCHEMA`): each entry lists the
accepted names in order of preference, matched case-insensitively, because LAMOST ships
lower-case FITS columns, CasJobs exports whatever case the query used and the SAS SSPP
file is upper case. The writers use the :class:`~mastar_vac.io.layouts.Layout` of each
file (:data:`LAMOST_LRS`, :data:`LAMOST_LRS_MSTAR`, :data:`SSPP_OUT`, :data:`SPP_PARAMS`,
:data:`GAIA_DR3_SOURCE`) to make test files exactly like the survey's.

Formats: FITS (plain or gzip, streamed by :class:`~mastar_vac.io.fitstable.BinTableReader`),
CSV (``.csv``, ``.csv.gz``, ``.tsv``, ``.txt``; leading ``#`` lines such as an ECSV header
are skipped) and Parquet (a file or a directory of files). The format comes from the
suffix; an unknown suffix is sniffed from the first bytes.

Memory: LAMOST DR10 has ~10⁷ rows. ``iter_<survey>_blocks(path, rows)`` reads only the
needed columns, ``rows`` at a time, so memory is bounded by the block;
:func:`dask_external` gives the same blocks as a lazy Dask dataframe. ``read_<survey>``
concatenates the blocks for files that fit in memory.

Missing values: −9999, −999, −99999, 99999 (and ±inf) become NaN everywhere; 9999 too
except in Teff (a real 9999 K star is possible); magnitudes, colours and the
logg/[Fe/H]/[α/Fe] labels also lose |v| ≥ 99 (the 99.99 "no measurement" convention),
uncertainties lose negative values, and Teff ≤ 0 is missing.
"""

from __future__ import annotations

import gzip
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from ..errors import InputFileError
from .fitstable import BinTableReader, FitsWriter
from .layouts import Col, Layout
from .tables import SENTINELS, sentinel_to_nan

__all__ = [
    "STANDARD_COLUMNS",
    "DEFAULT_BLOCK_ROWS",
    "Field",
    "SurveySchema",
    "LAMOST_SCHEMA",
    "SEGUE_SCHEMA",
    "GAIA_SCHEMA",
    "SCHEMAS",
    "LAMOST_LRS",
    "LAMOST_LRS_MSTAR",
    "SSPP_OUT",
    "SPP_PARAMS",
    "GAIA_DR3_SOURCE",
    "detect_format",
    "standardize_block",
    "read_lamost",
    "iter_lamost_blocks",
    "read_segue",
    "iter_segue_blocks",
    "read_gaia_dr3",
    "iter_gaia_dr3_blocks",
    "read_external",
    "iter_external_blocks",
    "dask_external",
    "write_lamost",
    "write_segue",
    "write_gaia_dr3",
]

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
Format = Literal["fits", "csv", "parquet"]

#: Columns every reader returns, in this order (survey extras follow).
STANDARD_COLUMNS = ("survey", "ext_id", "RA", "DEC", "TEFF", "TEFF_ERR", "LOGG", "LOGG_ERR",
                    "FEH", "FEH_ERR", "ALPHA", "ALPHA_ERR", "SNR")

#: Rows per block: ~200k rows × ~15 float64 columns ≈ 25 MB per block.
DEFAULT_BLOCK_ROWS = 200_000

_FLOAT_KINDS = frozenset({"coord", "teff", "label", "err", "mag", "color", "float"})


# ---------------------------------------------------------------------------
# declarations
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Field:
    """One standardized column and the file columns that may hold it.

    ``kind`` decides the cleaning: ``coord``, ``teff``, ``label``, ``err``, ``mag``,
    ``color``, ``float`` (float64 with sentinels → NaN, see the module doc); ``id`` (a
    string identifier), ``int`` (nullable Int64), ``optid`` (nullable Int64, ≤ 0 → <NA>:
    a cross-identifier that may be absent), ``str`` (stripped strings).
    """

    std: str
    sources: tuple[str, ...]
    kind: str
    required: bool = False
    hint: str | None = None  # appended to the "missing column" error


@dataclass(frozen=True)
class SurveySchema:
    """Where a survey keeps each standardized column, plus survey-specific fix-ups.

    ``check(resolved, path)`` may refuse a file whose columns are insufficient in a way
    one field cannot express; ``post(frame, resolved)`` derives columns (e.g. Gaia's
    symmetric Teff error from its percentiles). Column names starting with ``_`` are
    working columns that ``post`` consumes; they never reach the output.
    """

    survey: str
    fields: tuple[Field, ...]
    extras: tuple[str, ...] = ()
    check: Callable[[Mapping[str, str], Path], None] | None = None
    post: Callable[[pd.DataFrame, Mapping[str, str]], pd.DataFrame] | None = None

    @property
    def columns(self) -> list[str]:
        return [*STANDARD_COLUMNS, *self.extras]

    def field(self, std: str) -> Field:
        for f in self.fields:
            if f.std == std:
                return f
        raise KeyError(std)


# -- LAMOST LRS --------------------------------------------------------------

def _lamost_post(df: pd.DataFrame, resolved: Mapping[str, str]) -> pd.DataFrame:
    kind = "M_H" if resolved.get("FEH", "").lower() == "m_h" else "FE_H"
    df["FEH_KIND"] = np.full(len(df), kind, dtype=object).astype(str)
    return df


LAMOST_SCHEMA = SurveySchema(
    "LAMOST",
    (
        Field("ext_id", ("obsid",), "id", required=True),
        Field("RA", ("ra", "ra_obs"), "coord", required=True),
        Field("DEC", ("dec", "dec_obs"), "coord", required=True),
        Field("TEFF", ("teff",), "teff", required=True),
        Field("TEFF_ERR", ("teff_err",), "err"),
        Field("LOGG", ("logg",), "label", required=True),
        Field("LOGG_ERR", ("logg_err",), "err"),
        # the M-star catalogue (LRS_mstellar) has [M/H] and no [Fe/H]; FEH_KIND says which
        Field("FEH", ("feh", "m_h"), "label", required=True),
        Field("FEH_ERR", ("feh_err", "m_h_err"), "err"),
        Field("ALPHA", ("alpha_m",), "label"),  # [α/M]; absent in older DRs (unconfirmed)
        Field("ALPHA_ERR", ("alpha_m_err",), "err"),
        Field("SNR", ("snrg",), "float"),
        Field("SNRR", ("snrr",), "float"),
        # Gaia DR2 ids in DR8 (datamodels §3.1): do not id-match against DR3 blindly
        Field("GAIA_SOURCE_ID", ("gaia_source_id",), "optid"),
    ),
    extras=("SNRR", "GAIA_SOURCE_ID", "FEH_KIND"),
    post=_lamost_post,
)


# -- SEGUE SSPP --------------------------------------------------------------

_SEGUE_POSITION_HINT = (
    "the CAS sppParams table has no positions: export ra, dec with it, e.g. "
    "SELECT p.*, s.ra, s.dec FROM sppParams AS p JOIN SpecObjAll AS s ON s.specObjID = p.specObjID"
)


def _segue_check(resolved: Mapping[str, str], path: Path) -> None:
    if "ext_id" not in resolved and not all(k in resolved for k in ("PLATE", "MJD", "FIBER")):
        raise InputFileError(path, "no spectrum identifier", column="SPECOBJID",
                             expected="SPECOBJID, or PLATE, MJD and FIBER/FIBERID (case-insensitive)")


def _segue_post(df: pd.DataFrame, resolved: Mapping[str, str]) -> pd.DataFrame:
    if "ext_id" not in resolved:  # SDSS-style plate-mjd-fiber when SPECOBJID was not exported
        p, m, f = (df[k].astype("Int64").astype(str) for k in ("PLATE", "MJD", "FIBER"))
        df["ext_id"] = (p.str.zfill(4) + "-" + m.str.zfill(5) + "-" + f.str.zfill(4)).astype(str)
    return df


SEGUE_SCHEMA = SurveySchema(
    "SEGUE",
    (
        Field("ext_id", ("SPECOBJID",), "id"),
        Field("RA", ("RA", "PLUG_RA"), "coord", required=True, hint=_SEGUE_POSITION_HINT),
        Field("DEC", ("DEC", "PLUG_DEC"), "coord", required=True, hint=_SEGUE_POSITION_HINT),
        Field("TEFF", ("TEFF_ADOP", "TEFFADOP"), "teff", required=True),
        Field("TEFF_ERR", ("TEFF_ADOP_UNC", "TEFFADOPUNC"), "err"),
        Field("LOGG", ("LOGG_ADOP", "LOGGADOP"), "label", required=True),
        Field("LOGG_ERR", ("LOGG_ADOP_UNC", "LOGGADOPUNC"), "err"),
        Field("FEH", ("FEH_ADOP", "FEHADOP"), "label", required=True),
        Field("FEH_ERR", ("FEH_ADOP_UNC", "FEHADOPUNC"), "err"),
        # ssppOut has AFE/AFE_UNC; the DR17 CAS sppParams schema has none (alias unconfirmed)
        Field("ALPHA", ("AFE", "ALPHAFE"), "label"),
        Field("ALPHA_ERR", ("AFE_UNC", "AFEUNC", "ALPHAFEUNC"), "err"),
        Field("SNR", ("SNR",), "float"),
        Field("PLATE", ("PLATE",), "int"),
        Field("MJD", ("MJD",), "int"),
        Field("FIBER", ("FIBER", "FIBERID"), "int"),
        Field("FLAG", ("FLAG",), "str"),
    ),
    extras=("PLATE", "MJD", "FIBER", "FLAG"),
    check=_segue_check,
    post=_segue_post,
)


# -- Gaia DR3 ----------------------------------------------------------------

def _half_interval(df: pd.DataFrame, lo: str, hi: str) -> pd.Series:
    if lo in df and hi in df:
        return (df[hi] - df[lo]) / 2.0
    return pd.Series(np.nan, index=df.index)


def _gaia_post(df: pd.DataFrame, resolved: Mapping[str, str]) -> pd.DataFrame:
    # GSP-Phot gives 16th/84th percentiles; half their distance is the 1σ equivalent
    for lab in ("TEFF", "LOGG", "FEH"):
        df[f"{lab}_ERR"] = _half_interval(df, f"_{lab}_LO", f"_{lab}_HI")
    df["ext_id"] = df["SOURCE_ID"].astype(str).replace("<NA>", "").astype(str)
    if "BP_RP" not in resolved:
        df["BP_RP"] = df["BP"] - df["RP"]
    return df


GAIA_SCHEMA = SurveySchema(
    "GAIA",
    (
        Field("SOURCE_ID", ("source_id",), "int", required=True),
        Field("RA", ("ra",), "coord", required=True),
        Field("DEC", ("dec",), "coord", required=True),
        Field("TEFF", ("teff_gspphot",), "teff"),
        Field("LOGG", ("logg_gspphot",), "label"),
        Field("FEH", ("mh_gspphot",), "label"),  # [M/H] from GSP-Phot
        Field("_TEFF_LO", ("teff_gspphot_lower",), "teff"),
        Field("_TEFF_HI", ("teff_gspphot_upper",), "teff"),
        Field("_LOGG_LO", ("logg_gspphot_lower",), "label"),
        Field("_LOGG_HI", ("logg_gspphot_upper",), "label"),
        Field("_FEH_LO", ("mh_gspphot_lower",), "label"),
        Field("_FEH_HI", ("mh_gspphot_upper",), "label"),
        Field("PARALLAX", ("parallax",), "float"),
        Field("PARALLAX_ERROR", ("parallax_error",), "err"),
        Field("PMRA", ("pmra",), "float"),
        Field("PMDEC", ("pmdec",), "float"),
        Field("G", ("phot_g_mean_mag",), "mag"),
        Field("BP", ("phot_bp_mean_mag",), "mag"),
        Field("RP", ("phot_rp_mean_mag",), "mag"),
        Field("BP_RP", ("bp_rp",), "color"),
        Field("RUWE", ("ruwe",), "float"),
    ),
    extras=("SOURCE_ID", "PARALLAX", "PARALLAX_ERROR", "PMRA", "PMDEC", "G", "BP", "RP", "BP_RP", "RUWE"),
    post=_gaia_post,
)

SCHEMAS: dict[str, SurveySchema] = {s.survey: s for s in (LAMOST_SCHEMA, SEGUE_SCHEMA, GAIA_SCHEMA)}


# -- file layouts (for the writers; the readers only need the schemas) --------

_LAMOST_COMMON = (
    Col("obsid", "i8", description="unique spectrum ID"),
    Col("designation", "U19", fill=""),
    Col("obsdate", "U10", fill="2019-01-01"),
    Col("lmjd", "i4", fill=58484),
    Col("mjd", "i4", fill=58483),
    Col("planid", "U20", fill=""),
    Col("spid", "i2", fill=1),
    Col("fiberid", "i2", fill=1),
    Col("ra_obs", "f8", unit="deg", fill=-9999.0),
    Col("dec_obs", "f8", unit="deg", fill=-9999.0),
    Col("snru", "f4", fill=-9999.0), Col("snrg", "f4", fill=-9999.0), Col("snrr", "f4", fill=-9999.0),
    Col("snri", "f4", fill=-9999.0), Col("snrz", "f4", fill=-9999.0),
    Col("objtype", "U10", fill="Star"),
    Col("class", "U10", fill="STAR"),
    Col("subclass", "U10", fill=""),
    Col("z", "f4", fill=0.0), Col("z_err", "f4", fill=-9999.0),
    Col("ra", "f8", unit="deg", fill=-9999.0),
    Col("dec", "f8", unit="deg", fill=-9999.0),
    Col("teff", "f4", unit="K", fill=-9999.0), Col("teff_err", "f4", unit="K", fill=-9999.0),
    Col("logg", "f4", unit="dex", fill=-9999.0), Col("logg_err", "f4", unit="dex", fill=-9999.0),
)
_LAMOST_TAIL = (
    Col("rv", "f4", unit="km/s", fill=-9999.0), Col("rv_err", "f4", unit="km/s", fill=-9999.0),
    Col("gaia_source_id", "i8", fill=-9999, description="Gaia source_id (DR2 in LAMOST DR8)"),
    Col("gaia_g_mean_mag", "f4", unit="mag", fill=-9999.0),
)

#: ``drN_vX_LRS_stellar.fits`` (A, F, G, K stars), one table in HDU 1 (EXTNAME unconfirmed).
LAMOST_LRS = Layout(
    "LRS_STELLAR",
    _LAMOST_COMMON + (
        Col("feh", "f4", unit="dex", fill=-9999.0), Col("feh_err", "f4", unit="dex", fill=-9999.0),
        Col("alpha_m", "f4", unit="dex", fill=-9999.0), Col("alpha_m_err", "f4", unit="dex", fill=-9999.0),
        Col("vsini_lasp", "f4", unit="km/s", fill=-9999.0),
    ) + _LAMOST_TAIL,
    required=("obsid", "ra", "dec", "teff", "logg", "feh"),
)

#: ``drN_vX_LRS_mstellar.fits`` (M stars): [M/H] instead of [Fe/H], no [α/M].
LAMOST_LRS_MSTAR = Layout(
    "LRS_MSTELLAR",
    _LAMOST_COMMON + (
        Col("m_h", "f4", unit="dex", fill=-9999.0), Col("m_h_err", "f4", unit="dex", fill=-9999.0),
    ) + _LAMOST_TAIL,
    required=("obsid", "ra", "dec", "teff", "logg", "m_h"),
)

#: SAS ``ssppOut-dr12.fits`` HDU 1 (a 40-column subset of its 239; names and types from
#: the SDSS datamodel: SPECOBJID char[22], PLATE/FIBER int16, FLAG char[5]).
SSPP_OUT = Layout(
    "SSPPOUT",
    (
        Col("SPECOBJID", "U22", fill=""),
        Col("PLATEID", "U19", fill=""),
        Col("PLUG_RA", "f8", unit="deg", fill=-9999.0), Col("PLUG_DEC", "f8", unit="deg", fill=-9999.0),
        Col("RUNSSPP", "U3", fill=""), Col("RUN2D", "U3", fill="26"),
        Col("MJD", "i4", fill=-9999), Col("PLATE", "i2", fill=-1), Col("FIBER", "i2", fill=-1),
        Col("SPECTYPE_HAMMER", "U4", fill=""), Col("FLAG", "U5", fill="nnnnn"),
        Col("TEFF_ADOP", "f4", fill=-9999.0), Col("TEFF_ADOP_N", "i2", fill=0),
        Col("TEFF_ADOP_UNC", "f4", fill=-9999.0),
        Col("LOGG_ADOP", "f4", fill=-9999.0), Col("LOGG_ADOP_N", "i2", fill=0),
        Col("LOGG_ADOP_UNC", "f4", fill=-9999.0),
        Col("FEH_ADOP", "f4", fill=-9999.0), Col("FEH_ADOP_N", "i2", fill=0),
        Col("FEH_ADOP_UNC", "f4", fill=-9999.0),
        Col("AFE", "f4", fill=-9999.0), Col("AFE_IND", "i2", fill=0), Col("AFE_UNC", "f4", fill=-9999.0),
        Col("RV_FLAG", "U4", fill=""), Col("RV_ADOP", "f4", fill=-9999.0), Col("RV_ADOP_UNC", "f4", fill=-9999.0),
        Col("G_MAG", "f4", fill=-9999.0), Col("GR", "f4", fill=-9999.0), Col("EBV", "f4", fill=-9999.0),
        Col("SNR", "f4", fill=-9999.0), Col("QA", "i2", fill=0),
        Col("RA", "f8", fill=-9999.0), Col("DEC", "f8", fill=-9999.0),
        Col("L", "f8", fill=-9999.0), Col("B", "f8", fill=-9999.0),
        Col("ELODIERVFINAL", "f4", fill=-9999.0), Col("ELODIERVFINALERR", "f4", fill=-9999.0),
        Col("ZWARNING", "i4", fill=0), Col("SURVEY", "U6", fill="segue2"),
    ),
    required=("RA", "DEC", "TEFF_ADOP", "LOGG_ADOP", "FEH_ADOP"),
)

#: CAS ``sppParams`` as exported by CasJobs (CSV or FITS): no positions, no [α/Fe];
#: ``specObjID`` is numeric(20), i.e. it can exceed int64 and is written as a string.
SPP_PARAMS = Layout(
    "SPPPARAMS",
    (
        Col("specObjID", "U20", fill=""),
        Col("PLATE", "i8", fill=-9999), Col("MJD", "i8", fill=-9999), Col("FIBERID", "i8", fill=-9999),
        Col("SPECTYPEHAMMER", "U8", fill=""), Col("FLAG", "U8", fill="nnnn"),
        Col("TEFFADOP", "f4", fill=-9999.0), Col("TEFFADOPN", "i2", fill=0), Col("TEFFADOPUNC", "f4", fill=-9999.0),
        Col("LOGGADOP", "f4", fill=-9999.0), Col("LOGGADOPN", "i2", fill=0), Col("LOGGADOPUNC", "f4", fill=-9999.0),
        Col("FEHADOP", "f4", fill=-9999.0), Col("FEHADOPN", "i2", fill=0), Col("FEHADOPUNC", "f4", fill=-9999.0),
        Col("SNR", "f4", fill=-9999.0), Col("QA", "i2", fill=0),
        Col("ELODIERVFINAL", "f4", fill=-9999.0), Col("ELODIERVFINALERR", "f4", fill=-9999.0),
        Col("ZWARNING", "i8", fill=0),
    ),
    required=("TEFFADOP", "LOGGADOP", "FEHADOP"),
)

#: Gaia DR3 ``gaia_source`` subset as the archive exports it (lower case; NaN = null).
GAIA_DR3_SOURCE = Layout(
    "GAIA_SOURCE",
    (
        Col("source_id", "i8"),
        Col("ref_epoch", "f8", unit="yr", fill=2016.0),
        Col("ra", "f8", unit="deg", fill=np.nan), Col("dec", "f8", unit="deg", fill=np.nan),
        Col("parallax", "f8", unit="mas", fill=np.nan), Col("parallax_error", "f4", unit="mas", fill=np.nan),
        Col("pmra", "f8", unit="mas/yr", fill=np.nan), Col("pmdec", "f8", unit="mas/yr", fill=np.nan),
        Col("ruwe", "f4", fill=np.nan),
        Col("phot_g_mean_mag", "f4", unit="mag", fill=np.nan),
        Col("phot_bp_mean_mag", "f4", unit="mag", fill=np.nan),
        Col("phot_rp_mean_mag", "f4", unit="mag", fill=np.nan),
        Col("bp_rp", "f4", unit="mag", fill=np.nan),
        Col("teff_gspphot", "f4", unit="K", fill=np.nan),
        Col("teff_gspphot_lower", "f4", unit="K", fill=np.nan),
        Col("teff_gspphot_upper", "f4", unit="K", fill=np.nan),
        Col("logg_gspphot", "f4", unit="dex", fill=np.nan),
        Col("logg_gspphot_lower", "f4", unit="dex", fill=np.nan),
        Col("logg_gspphot_upper", "f4", unit="dex", fill=np.nan),
        Col("mh_gspphot", "f4", unit="dex", fill=np.nan),
        Col("mh_gspphot_lower", "f4", unit="dex", fill=np.nan),
        Col("mh_gspphot_upper", "f4", unit="dex", fill=np.nan),
    ),
    required=("source_id", "ra", "dec"),
)


# ---------------------------------------------------------------------------
# formats
# ---------------------------------------------------------------------------

_FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz", ".fts.gz")
_CSV_SUFFIXES = (".csv", ".csv.gz", ".tsv", ".tsv.gz", ".txt", ".txt.gz", ".dat", ".dat.gz")
_PARQUET_SUFFIXES = (".parquet", ".pq", ".parq")


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def detect_format(path: PathLike) -> Format:
    """``fits``, ``csv`` or ``parquet``, from the suffix or, failing that, the first bytes."""
    path = Path(path)
    if not path.exists():
        raise InputFileError(path, "file not found")
    if path.is_dir():
        return "parquet"  # a partitioned Parquet dataset
    name = path.name.lower()
    for fmt, suffixes in (("fits", _FITS_SUFFIXES), ("csv", _CSV_SUFFIXES), ("parquet", _PARQUET_SUFFIXES)):
        if name.endswith(suffixes):
            return fmt  # type: ignore[return-value]
    with open(path, "rb") as fh:
        head = fh.read(9)
    if head[:2] == b"\x1f\x8b":
        with gzip.open(path, "rb") as fh:
            head = fh.read(9)
    if head.startswith(b"SIMPLE  ="):
        return "fits"
    if head.startswith(b"PAR1"):
        return "parquet"
    return "csv"


@dataclass
class _CsvInfo:
    names: list[str]
    skiprows: int
    sep: str
    compression: str | None
    bytes_per_row: float


def _csv_info(path: Path) -> _CsvInfo:
    gz = _is_gzip(path)
    opener = gzip.open if gz else open
    try:
        with opener(path, "rt", encoding="utf-8", errors="replace") as fh:  # type: ignore[operator]
            skip = 0
            header = None
            for line in fh:
                if line.startswith("#") or not line.strip():
                    skip += 1
                    continue
                header = line.rstrip("\r\n")
                break
            sample = [len(line) for _, line in zip(range(200), fh)]
    except (OSError, EOFError) as exc:
        raise InputFileError(path, f"cannot be read as text ({exc})", expected="a CSV file") from None
    if header is None:
        raise InputFileError(path, "has no header line", expected="a CSV file whose first row names the columns")
    sep = next((s for s in (",", "|", "\t") if s in header), ",")
    names = [n.strip().strip('"').strip("'") for n in header.split(sep)]
    return _CsvInfo(names, skip, sep, "gzip" if gz else None, float(np.mean(sample)) if sample else 100.0)


class _Table:
    """Column names and row blocks of one table, whatever its format."""

    def __init__(self, path: PathLike, hdu: int | str = 1) -> None:
        self.path = Path(path)
        self.format = detect_format(self.path)
        self.hdu: int | str | None = hdu if self.format == "fits" else None
        self._fits: BinTableReader | None = None
        if self.format == "fits":
            self._fits = BinTableReader(self.path, hdu)
            self.names = self._fits.names
            self.nrows: int | None = self._fits.nrows
        elif self.format == "csv":
            self._csv = _csv_info(self.path)
            self.names = self._csv.names
            self.nrows = None
        else:
            self._dataset = _parquet_dataset(self.path)
            self.names = list(self._dataset.schema.names)
            self.nrows = None

    def __enter__(self) -> _Table:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._fits is not None:
            self._fits.close()

    def iter_blocks(self, rows: int, columns: Sequence[str], text_columns: Sequence[str] = ()
                    ) -> Iterator[dict[str, np.ndarray]]:
        """Blocks of at most ``rows`` rows of the named (file) columns as numpy arrays."""
        if rows < 1:
            raise ValueError("rows must be >= 1")
        columns = list(dict.fromkeys(columns))
        if self._fits is not None:
            for c in columns:
                if self._fits.column(c).shape:
                    raise InputFileError(self.path, "is a vector column", hdu=self.hdu, column=c,
                                         expected="a scalar column")
            for _, block in self._fits.iter_blocks(rows, columns=columns):
                yield block
            return
        if self.format == "csv":
            info = self._csv
            try:
                reader = pd.read_csv(
                    self.path, sep=info.sep, skiprows=info.skiprows, usecols=columns,
                    dtype={c: str for c in text_columns}, chunksize=rows, compression=info.compression,
                    skipinitialspace=True, comment=None, low_memory=False)
                with reader:
                    for chunk in reader:
                        yield {c: chunk[c].to_numpy() for c in columns}
            except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as exc:
                raise InputFileError(self.path, f"unreadable CSV ({exc})", expected="a CSV table") from None
            return
        for batch in self._dataset.to_batches(columns=columns, batch_size=rows):
            # integer columns with nulls as Python ints, not float64 (19-digit source_ids)
            frame = batch.to_pandas(integer_object_nulls=True)
            yield {c: frame[c].to_numpy() for c in columns}


def _parquet_dataset(path: Path) -> Any:
    import pyarrow.dataset as pads

    try:
        return pads.dataset(str(path), format="parquet")
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for non-Parquet input
        raise InputFileError(path, f"cannot be read as Parquet ({exc})", expected="a Parquet file") from None


# ---------------------------------------------------------------------------
# pure core: column resolution and cleaning
# ---------------------------------------------------------------------------

def _resolve(names: Sequence[str], schema: SurveySchema, path: Path, hdu: int | str | None) -> dict[str, str]:
    """standardized name → file column, matching the accepted variants case-insensitively."""
    exact = set(names)
    lower: dict[str, str] = {}
    for n in names:
        lower.setdefault(n.lower(), n)
    resolved: dict[str, str] = {}
    for f in schema.fields:
        for src in f.sources:
            if src in exact:
                resolved[f.std] = src
                break
            if src.lower() in lower:
                resolved[f.std] = lower[src.lower()]
                break
        else:
            if f.required:
                variants = ", ".join(repr(s) for s in f.sources)
                expected = f"one of {variants} (matched case-insensitively)"
                if f.hint:
                    expected += f"; {f.hint}"
                raise InputFileError(path, f"required {schema.survey} column missing", hdu=hdu,
                                     column=f.sources[0], expected=expected)
    if schema.check is not None:
        schema.check(resolved, path)
    absent = [f.std for f in schema.fields if f.std not in resolved and not f.std.startswith("_")]
    if absent:
        log.debug("%s: no column for %s; they are missing values", path, ", ".join(absent))
    return resolved


def _to_float(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v)
    if v.dtype.kind in "fiub":
        return v.astype(np.float64)
    return pd.to_numeric(pd.Series(v, dtype=object), errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)


def _clean_float(v: np.ndarray, kind: str) -> np.ndarray:
    x = _to_float(v)
    if kind == "teff":
        x = sentinel_to_nan(x, (-9999.0, -999.0, -99999.0, 99999.0))
        x[x <= 0] = np.nan
        return x
    x = sentinel_to_nan(x, SENTINELS)
    if kind in ("label", "mag", "color"):
        x[np.abs(x) >= 99.0] = np.nan
    elif kind == "err":
        x[x < 0] = np.nan
    elif kind == "coord":
        x[np.abs(x) > 360.0] = np.nan
    return x


def _as_strings(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v)
    if v.dtype.kind in "iu":
        return v.astype(str)
    if v.dtype.kind == "f":  # an integer id that went through a float column
        out = np.array(["" if not np.isfinite(x) else str(int(x)) if x == int(x) else repr(x) for x in v],
                       dtype=object)
        return out.astype(str)
    s = pd.Series(v, dtype=object)
    return s.where(s.notna(), "").astype(str).str.strip().to_numpy(dtype=str)


def _as_int(v: np.ndarray, *, positive: bool = False) -> pd.api.extensions.ExtensionArray:
    """Nullable Int64, exact for 64-bit ids (strings are parsed as integers, never via float)."""
    v = np.asarray(v)
    n = len(v)
    if v.dtype.kind in "iu":
        out = pd.array(v.astype(np.int64), dtype="Int64")
    elif v.dtype.kind == "f":
        out = pd.Series(np.where(np.isfinite(v), v, np.nan)).round().astype("Int64").array
    else:
        s = pd.Series(v, dtype=object)
        txt = s.where(s.notna(), "").astype(str).str.strip()
        ok = ~txt.str.lower().isin(["", "nan", "null", "none", "<na>"])
        out = pd.array([pd.NA] * n, dtype="Int64")
        if ok.any():
            num = pd.to_numeric(txt[ok], errors="coerce")
            if num.dtype.kind == "f":
                num = num.round()
            out[ok.to_numpy()] = num.astype("Int64").array
    bad = (out <= 0) if positive else ((out == -9999) | (out == -999))
    out[bad.fillna(False).to_numpy(dtype=bool)] = pd.NA
    return out


def _empty_std(kind: str, n: int) -> Any:
    if kind in _FLOAT_KINDS:
        return np.full(n, np.nan)
    if kind in ("int", "optid"):
        return pd.array([pd.NA] * n, dtype="Int64")
    return np.full(n, "", dtype=object).astype(str)


def standardize_block(block: Mapping[str, Any], resolved: Mapping[str, str], schema: SurveySchema
                      ) -> pd.DataFrame:
    """One block of file columns → the standardized DataFrame (pure; no I/O).

    ``resolved`` maps standardized names to the file columns present in ``block`` (as
    found by the readers); standardized columns with no file column are NaN/<NA>/"".
    """
    n = len(next(iter(block.values()))) if block else 0
    data: dict[str, Any] = {}
    for f in schema.fields:
        src = resolved.get(f.std)
        if src is None:
            data[f.std] = _empty_std(f.kind, n)
            continue
        v = block[src]
        if f.kind in _FLOAT_KINDS:
            data[f.std] = _clean_float(v, f.kind)
        elif f.kind == "id":
            data[f.std] = _as_strings(v)
        elif f.kind == "int":
            data[f.std] = _as_int(v)
        elif f.kind == "optid":
            data[f.std] = _as_int(v, positive=True)
        else:
            data[f.std] = _as_strings(v)
    df = pd.DataFrame(data, index=pd.RangeIndex(n))
    if schema.post is not None:
        df = schema.post(df, resolved)
    df["survey"] = np.full(n, schema.survey, dtype=object).astype(str)
    for c in STANDARD_COLUMNS:
        if c not in df:
            df[c] = np.full(n, np.nan)
    return df[schema.columns]


def _text_columns(resolved: Mapping[str, str], schema: SurveySchema) -> list[str]:
    """File columns a CSV reader must keep as text (ids beyond int64, flags)."""
    return [resolved[f.std] for f in schema.fields if f.std in resolved and f.kind in ("id", "str", "optid", "int")]


# ---------------------------------------------------------------------------
# readers
# ---------------------------------------------------------------------------

def _schema(survey: str) -> SurveySchema:
    try:
        return SCHEMAS[survey.upper()]
    except KeyError:
        raise ValueError(f"unknown survey {survey!r}; expected one of {sorted(SCHEMAS)}") from None


def iter_external_blocks(path: PathLike, survey: str, rows: int = DEFAULT_BLOCK_ROWS, *,
                         hdu: int | str = 1) -> Iterator[pd.DataFrame]:
    """Standardized blocks of at most ``rows`` rows of a survey catalogue (any format).

    Only the columns the schema needs are read, so memory is bounded by the block
    whatever the size of the file.
    """
    schema = _schema(survey)
    with _Table(path, hdu) as table:
        resolved = _resolve(table.names, schema, table.path, table.hdu)
        first = True
        for block in table.iter_blocks(rows, list(resolved.values()), _text_columns(resolved, schema)):
            if first:
                _check_numeric(block, resolved, schema, table)
                first = False
            yield standardize_block(block, resolved, schema)


def _check_numeric(block: Mapping[str, Any], resolved: Mapping[str, str], schema: SurveySchema,
                   table: _Table) -> None:
    """A numeric field stored as text that holds no number at all is a wrong column,
    not missing data: say so instead of returning NaN everywhere."""
    for f in schema.fields:
        src = resolved.get(f.std)
        if src is None or f.kind not in _FLOAT_KINDS:
            continue
        v = np.asarray(block[src])
        if v.dtype.kind in "fiub" or v.size == 0:
            continue
        text = pd.Series(v, dtype=object).astype(str).str.strip()
        filled = ~text.isin(["", "nan", "NaN", "None", "null", "NULL"])
        if filled.any() and np.isnan(_to_float(v)[filled.to_numpy()]).all():
            raise InputFileError(table.path, f"column holds text ({text[filled].iloc[0]!r}), not numbers",
                                 hdu=table.hdu, column=src, expected=f"a numeric {f.std} column")


def read_external(path: PathLike, survey: str, *, rows: int = DEFAULT_BLOCK_ROWS,
                  hdu: int | str = 1) -> pd.DataFrame:
    """A whole survey catalogue as one standardized DataFrame (for files that fit in memory)."""
    schema = _schema(survey)
    parts = list(iter_external_blocks(path, survey, rows, hdu=hdu))
    if not parts:
        return standardize_block({}, {}, schema)
    return pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]


def iter_lamost_blocks(path: PathLike, rows: int = DEFAULT_BLOCK_ROWS, *, hdu: int | str = 1
                       ) -> Iterator[pd.DataFrame]:
    """LAMOST LRS stellar (or M-star) catalogue, FITS or CSV, in standardized blocks."""
    return iter_external_blocks(path, "LAMOST", rows, hdu=hdu)


def read_lamost(path: PathLike, *, rows: int = DEFAULT_BLOCK_ROWS, hdu: int | str = 1) -> pd.DataFrame:
    """LAMOST LRS stellar (or M-star) catalogue as a standardized DataFrame."""
    return read_external(path, "LAMOST", rows=rows, hdu=hdu)


def iter_segue_blocks(path: PathLike, rows: int = DEFAULT_BLOCK_ROWS, *, hdu: int | str = 1
                      ) -> Iterator[pd.DataFrame]:
    """SEGUE SSPP (SAS ssppOut FITS or CAS sppParams CSV/FITS with ra, dec) in blocks."""
    return iter_external_blocks(path, "SEGUE", rows, hdu=hdu)


def read_segue(path: PathLike, *, rows: int = DEFAULT_BLOCK_ROWS, hdu: int | str = 1) -> pd.DataFrame:
    """SEGUE SSPP parameters as a standardized DataFrame."""
    return read_external(path, "SEGUE", rows=rows, hdu=hdu)


def iter_gaia_dr3_blocks(path: PathLike, rows: int = DEFAULT_BLOCK_ROWS, *, hdu: int | str = 1
                         ) -> Iterator[pd.DataFrame]:
    """A Gaia DR3 gaia_source subset (FITS, CSV or Parquet) in standardized blocks."""
    return iter_external_blocks(path, "GAIA", rows, hdu=hdu)


def read_gaia_dr3(path: PathLike, *, rows: int = DEFAULT_BLOCK_ROWS, hdu: int | str = 1) -> pd.DataFrame:
    """A Gaia DR3 gaia_source subset as a standardized DataFrame."""
    return read_external(path, "GAIA", rows=rows, hdu=hdu)


def _read_fits_rows(bounds: tuple[int, int], *, path: str, hdu: int | str, file_columns: list[str],
                    resolved: dict[str, str], survey: str) -> pd.DataFrame:
    with BinTableReader(path, hdu) as r:
        block = r.read(file_columns, bounds[0], bounds[1])
    return standardize_block(block, resolved, SCHEMAS[survey])


def _standardize_frame(frame: pd.DataFrame, resolved: dict[str, str], survey: str) -> pd.DataFrame:
    return standardize_block({c: frame[c].to_numpy() for c in frame.columns}, resolved, SCHEMAS[survey])


def dask_external(path: PathLike, survey: str, rows: int = DEFAULT_BLOCK_ROWS, *, hdu: int | str = 1) -> Any:
    """A survey catalogue as a lazy ``dask.dataframe`` of standardized partitions.

    Each partition reads its own rows, so workers read in parallel: FITS by row range,
    CSV by byte range (about ``rows`` rows each), Parquet by the file's row groups. A
    gzipped FITS or CSV file cannot be entered in the middle: FITS partitions would each
    decompress from the start (quadratic time) and CSV becomes a single partition; for
    those, stream with ``iter_<survey>_blocks`` instead.
    """
    import dask.dataframe as dd

    schema = _schema(survey)
    with _Table(path, hdu) as table:
        resolved = _resolve(table.names, schema, table.path, table.hdu)
        fmt, nrows = table.format, table.nrows
        csv = table._csv if fmt == "csv" else None
        text = _text_columns(resolved, schema)
    columns = list(dict.fromkeys(resolved.values()))
    # the output dtypes depend on the field kinds only, so empty input gives the meta
    meta = standardize_block({c: np.array([], dtype=np.float64) for c in columns}, resolved, schema)
    path = Path(path)
    if fmt == "fits":
        if _is_gzip(path):
            log.warning("%s: gzipped FITS cannot be read from the middle; each Dask partition "
                        "decompresses from the start. Prefer iter_%s_blocks for this file.",
                        path, schema.survey.lower())
        assert nrows is not None
        bounds = [(s, min(s + rows, nrows)) for s in range(0, max(nrows, 1), rows)] or [(0, 0)]
        return dd.from_map(_read_fits_rows, bounds, path=str(path), hdu=hdu, file_columns=columns,
                           resolved=resolved, survey=schema.survey, meta=meta, enforce_metadata=False)
    if fmt == "csv":
        assert csv is not None
        blocksize = None if csv.compression else max(int(rows * csv.bytes_per_row), 1 << 16)
        extra = {"sample": blocksize} if blocksize else {}  # dask asks sample <= blocksize with skiprows
        raw = dd.read_csv(str(path), sep=csv.sep, skiprows=csv.skiprows, usecols=columns,
                          dtype={c: str for c in text}, blocksize=blocksize, compression=csv.compression,
                          skipinitialspace=True, **extra)
    else:
        raw = dd.read_parquet(str(path), columns=columns)
    return raw.map_partitions(_standardize_frame, resolved, schema.survey, meta=meta)


# ---------------------------------------------------------------------------
# writers (test fixtures and demos: files in the survey's own layout)
# ---------------------------------------------------------------------------

def _native_columns(df: pd.DataFrame | Mapping[str, Any], layout: Layout, schema: SurveySchema,
                    *, nan_fill: float | None) -> dict[str, np.ndarray]:
    """Layout columns from ``df``: a column of the layout's own name (any case) wins,
    else the standardized column that maps to it; missing values become ``nan_fill``."""
    frame = df if isinstance(df, pd.DataFrame) else pd.DataFrame(dict(df))
    by_lower = {str(c).lower(): c for c in frame.columns}
    layout_lower = {c.name.lower(): c.name for c in layout.columns}
    std_for: dict[str, str] = {}
    for f in schema.fields:
        for src in f.sources:  # the first accepted name that this layout uses
            name = layout_lower.get(src.lower())
            if name is not None:
                std_for.setdefault(name, f.std)
                break
    out: dict[str, np.ndarray] = {}
    for col in layout.columns:
        if col.name.lower() in by_lower:
            v = frame[by_lower[col.name.lower()]]
        elif col.name in std_for and std_for[col.name] in frame:
            v = frame[std_for[col.name]]
        else:
            continue
        if col.dtype.startswith("U"):
            out[col.name] = pd.Series(v).astype(object).where(pd.Series(v).notna(), "").astype(str).to_numpy()
        elif col.dtype.startswith(("i", "u")):
            s = pd.to_numeric(pd.Series(v), errors="coerce")
            out[col.name] = s.fillna(col.fill).to_numpy().astype(col.dtype)
        else:
            x = pd.to_numeric(pd.Series(v), errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
            if nan_fill is not None:
                x = np.where(np.isfinite(x), x, nan_fill)
            out[col.name] = x
    return out


def _write(path: PathLike, data: dict[str, np.ndarray], layout: Layout, n: int) -> Path:
    path = Path(path)
    cols = layout.fill(data, n)
    fmt = _format_from_name(path)
    if fmt == "fits":
        with FitsWriter(path) as w:
            w.add_table(cols, extname=layout.extname, units=layout.units)
    elif fmt == "csv":
        pd.DataFrame(cols).to_csv(path, index=False)
    else:
        pd.DataFrame(cols).to_parquet(path, index=False)
    log.debug("wrote %d rows to %s (%s)", n, path, fmt)
    return path


def _format_from_name(path: Path) -> Format:
    name = path.name.lower()
    if name.endswith(_CSV_SUFFIXES):
        return "csv"
    if name.endswith(_PARQUET_SUFFIXES):
        return "parquet"
    return "fits"


def write_lamost(path: PathLike, df: pd.DataFrame | Mapping[str, Any], *, mstar: bool = False) -> Path:
    """A LAMOST LRS stellar catalogue (``mstar``: the M-star one) as FITS or CSV (by suffix).

    ``df`` holds standardized columns (as the reader returns) and/or LAMOST's own
    lower-case columns; NaN is written as LAMOST's −9999.
    """
    if _format_from_name(Path(path)) == "parquet":
        raise ValueError("LAMOST catalogues are FITS or CSV")
    layout = LAMOST_LRS_MSTAR if mstar else LAMOST_LRS  # FEH is written as m_h in the M-star file
    data = _native_columns(df, layout, LAMOST_SCHEMA, nan_fill=-9999.0)
    n = len(df) if isinstance(df, pd.DataFrame) else len(next(iter(df.values())))
    if "gaia_source_id" in data:
        data["gaia_source_id"] = np.where(data["gaia_source_id"] > 0, data["gaia_source_id"], -9999)
    return _write(path, data, layout, n)


def write_segue(path: PathLike, df: pd.DataFrame | Mapping[str, Any], *,
                flavour: Literal["sas", "cas"] = "sas", positions: bool = True) -> Path:
    """SEGUE SSPP parameters as the SAS ``ssppOut`` FITS (``flavour="sas"``) or a CasJobs
    ``sppParams`` export (``"cas"``: CSV or FITS by suffix; with ``ra``/``dec`` joined
    in when ``positions``, as the reader requires). NaN is written as −9999.
    """
    n = len(df) if isinstance(df, pd.DataFrame) else len(next(iter(df.values())))
    if flavour == "sas":
        data = _native_columns(df, SSPP_OUT, SEGUE_SCHEMA, nan_fill=-9999.0)
        return _write(path, data, SSPP_OUT, n)
    if flavour != "cas":
        raise ValueError("flavour must be 'sas' or 'cas'")
    data = _native_columns(df, SPP_PARAMS, SEGUE_SCHEMA, nan_fill=-9999.0)
    layout = SPP_PARAMS
    if positions:
        frame = df if isinstance(df, pd.DataFrame) else pd.DataFrame(dict(df))
        layout = Layout(SPP_PARAMS.extname, SPP_PARAMS.columns + (
            Col("ra", "f8", unit="deg", fill=-9999.0), Col("dec", "f8", unit="deg", fill=-9999.0)))
        for name, std in (("ra", "RA"), ("dec", "DEC")):
            src = name if name in frame else std
            data[name] = pd.to_numeric(frame[src], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    return _write(path, data, layout, n)


def write_gaia_dr3(path: PathLike, df: pd.DataFrame | Mapping[str, Any]) -> Path:
    """A Gaia DR3 gaia_source subset as FITS, CSV or Parquet (by suffix), lower-case
    columns, nulls as NaN (empty in CSV) as the archive exports them.

    Standardized ``TEFF_ERR`` (etc.) is written as a symmetric lower/upper interval.
    """
    frame = df if isinstance(df, pd.DataFrame) else pd.DataFrame(dict(df))
    frame = frame.copy()
    for lab, stem in (("TEFF", "teff_gspphot"), ("LOGG", "logg_gspphot"), ("FEH", "mh_gspphot")):
        if lab in frame and f"{lab}_ERR" in frame and f"{stem}_lower" not in frame:
            frame[f"{stem}_lower"] = frame[lab] - frame[f"{lab}_ERR"]
            frame[f"{stem}_upper"] = frame[lab] + frame[f"{lab}_ERR"]
    data = _native_columns(frame, GAIA_DR3_SOURCE, GAIA_SCHEMA, nan_fill=None)
    return _write(path, data, GAIA_DR3_SOURCE, len(frame))
