"""The value-added catalogue on disk: the SDSS-style FITS file and a Parquet dataset.

Both writers take the same pandas DataFrame (one row per visit) and lay it out exactly
as :data:`mastar_vac.catalog.VAC_COLUMNS` says: the same column order, dtypes, units and
descriptions, whatever columns the caller's frame happens to carry. A label the run did
not fit is written as a NaN column, so every release has one layout and the headers /
schema metadata say which labels were fitted.

FITS (:func:`write_vac_fits`)
    A primary HDU holding only provenance, then one binary table ``GOODVISITS_PARAMS``.
    The name says which rows the table holds (MaStar *goodvisits*, one row per visit, as
    in the DR17 ``mastar-goodvisits-…-params`` files and the ``GOODVISITS`` HDU of
    mastarall) and what it holds (parameters); it leaves room for a per-star
    ``GOODSTARS_PARAMS`` HDU in the same file later. Provenance cards:

    ========  ===========================================================
    PIPELINE  ``mastar_vac``; PKGVERS its version; REFERENC the method paper
    DATE      UTC time the file was written (FITS ``YYYY-MM-DDThh:mm:ss``)
    FITLABEL  fitted labels as VAC column stems, comma-separated
    EMUHASH   hash of the emulator artefact (when given)
    INPUTn    base names of the input files (full paths stay in PROVJSON)
    FLAGBITn  name of bit n of FLAG (description in the comment and in a
              COMMENT card, because a card comment is too short for it)
    CONFIG    the run configuration as compact JSON
    PROVJSON  every provenance item except the configuration, as JSON
    ========  ===========================================================

    CONFIG and PROVJSON use the FITS long-string convention (a value continued over
    ``CONTINUE`` cards, part of FITS 4.0; ``LONGSTRN`` announces it), so astropy and
    CFITSIO give back the whole string and ``json.loads`` reads it; the header stays
    valid however long the configuration is. The table header repeats what is needed to
    interpret the columns (FITLABEL, FLAGBITn, PKGVERS, EMUHASH), because
    ``Table.read`` and most viewers only show the table's header.

    The file is written by ``astropy.io.fits`` (the whole table is in memory anyway: a
    VAC is one small row per visit). Every HDU carries CHECKSUM and DATASUM, stamped with
    DATE rather than the clock, so the same catalogue and provenance give the same bytes.

Parquet (:func:`write_vac_parquet`)
    A directory of Parquet files. By default the rows are cut, in the caller's order, into
    files of at most ``rows_per_file`` rows (``part-00000.parquet``, …; row groups of at
    most 10,000 rows). Why not hive partitions by default: a hive partition column is
    removed from the files and comes back as a categorical (pandas, Dask) or not at all
    (``pyarrow.dataset.dataset(dir)`` without ``partitioning="hive"``), so the three
    readers would disagree about the schema. Files of bounded size give Dask one
    partition per file and bounded memory per task with every reader seeing exactly the
    VAC columns. Hive partitioning (e.g. ``partition_cols=["PLATE_BUCKET"]``, with
    ``PLATE_BUCKET = PLATE // 1000`` made here when the frame lacks it) is available
    for users who want directory-level pruning.

    Each field carries ``unit`` and ``description`` metadata; the schema carries the
    provenance (JSON under ``mastar_vac.provenance``), the fitted labels and the flag
    bits, so :func:`vac_schema_metadata` gives them back without reading rows.

Both writers are atomic: the file or directory appears under its name only when complete.
"""

from __future__ import annotations

import datetime as _dt
import gzip
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import pandas as pd
from astropy.io import fits

from .. import __version__
from ..catalog import LABEL_TO_VAC, VAC_COLUMNS, VAC_KEY, VacColumn
from ..errors import OutputError
from .atomic import atomic_dir, atomic_path
from .fitstable import list_hdus, read_table

__all__ = [
    "VAC_EXTNAME",
    "FlagBit",
    "vac_arrays",
    "write_vac_fits",
    "read_vac_fits",
    "read_vac_fits_provenance",
    "write_vac_parquet",
    "read_vac_parquet",
    "vac_schema_metadata",
]

log = logging.getLogger(__name__)

VAC_EXTNAME = "GOODVISITS_PARAMS"
REFERENCE = "Imig et al. 2022, AJ 163, 56"
PARQUET_META_KEY = b"mastar_vac.provenance"
PARQUET_FITTED_KEY = b"mastar_vac.fitted_labels"
PARQUET_FLAGS_KEY = b"mastar_vac.flag_bits"
PARQUET_VERSION_KEY = b"mastar_vac.version"

ProvValue = Union[str, int, float, Sequence[str], Mapping[str, Any]]
FlagBit = tuple[int, str, str]

_LABEL_STEMS = tuple(dict.fromkeys(LABEL_TO_VAC.values()))
_LABEL_COLUMN_NAMES = frozenset(
    name for stem in _LABEL_STEMS for name in (stem, f"{stem}_ERR", f"{stem}_FORMAL_ERR"))
_KEYWORD_RE = re.compile(r"^[A-Z0-9_-]{1,8}$")
# keywords a provenance item must never overwrite: structure and our own cards
_RESERVED = re.compile(
    r"^(SIMPLE|BITPIX|NAXIS\d*|EXTEND|XTENSION|PCOUNT|GCOUNT|TFIELDS|T(TYPE|FORM|UNIT|DIM|NULL|SCAL|ZERO)\d+"
    r"|EXTNAME|END|COMMENT|HISTORY|CONTINUE|LONGSTRN|PIPELINE|PKGVERS|REFERENC|DATE|FITLABEL|NFITLAB"
    r"|EMUHASH|CONFIG|PROVJSON|INPUT\d+|NINPUT|FLAGBIT\d+)$")
# provenance keys with a fixed FITS keyword
_KNOWN_KEYS = {
    "package_version": "PKGVERS",
    "version": "PKGVERS",
    "emulator_hash": "EMUHASH",
    "date": "DATE",
}
_CONFIG_KEYS = ("config", "configuration")
_INPUT_KEYS = ("inputs", "input_files")


# ---------------------------------------------------------------------------
# the frame → VAC arrays
# ---------------------------------------------------------------------------

def _string_width(col: VacColumn) -> int:
    return int(col.dtype[1:])


def _as_strings(name: str, series: pd.Series, width: int) -> np.ndarray:
    """A string column as a numpy ``U<width>`` array; integers (IFUDESIGN 3701) become text."""
    if pd.api.types.is_integer_dtype(series.dtype):
        values = series.astype("int64").astype(str).to_numpy()
    else:
        if series.isna().any():
            raise ValueError(f"VAC column {name} has {int(series.isna().sum())} missing value(s); "
                             "string identifiers must be present in every row")
        values = np.array([str(v).strip() for v in series.to_numpy(dtype=object)], dtype=str)
    if values.size:
        longest = int(np.char.str_len(values.astype(str)).max())
        if longest > width:
            raise ValueError(f"VAC column {name} holds a value of {longest} characters; the VAC allows {width}")
    return values.astype(f"U{width}")


def _as_integers(name: str, series: pd.Series, dtype: np.dtype) -> np.ndarray:
    """An integer column; refuses missing or non-integral values rather than inventing a sentinel."""
    if series.isna().any():
        raise ValueError(f"VAC column {name} has {int(series.isna().sum())} missing value(s); an integer "
                         "column cannot hold NaN (fill it before writing)")
    if pd.api.types.is_bool_dtype(series.dtype) or pd.api.types.is_integer_dtype(series.dtype):
        raw = series.to_numpy(dtype="int64")
    else:
        as_float = pd.to_numeric(series, errors="raise").to_numpy(dtype="float64")
        if not np.all(np.isfinite(as_float)) or np.any(as_float != np.round(as_float)):
            raise ValueError(f"VAC column {name} holds non-integral values; it is an integer column")
        raw = as_float.astype("int64")
    info = np.iinfo(dtype)
    if raw.size and (raw.min() < info.min or raw.max() > info.max):
        raise ValueError(f"VAC column {name} has values outside the range of {dtype} "
                         f"[{info.min}, {info.max}]")
    return raw.astype(dtype)


def vac_arrays(df: pd.DataFrame) -> dict[str, np.ndarray]:
    """The frame as ``{column: native numpy array}`` in VAC order and dtypes.

    Identifier columns (:data:`~mastar_vac.catalog.VAC_KEY`) must be there: a row that
    cannot be joined back to its spectrum is worthless. Missing floating-point columns
    (labels not fitted, errors not modelled, S/N not known) become NaN. Missing integer
    columns are an error, since there is no honest NaN for them. Columns that are not
    in the VAC are left out (logged).
    """
    missing_key = [k for k in VAC_KEY if k not in df.columns]
    if missing_key:
        raise ValueError(f"VAC table lacks identifier column(s) {missing_key}; every row needs the key "
                         f"{list(VAC_KEY)}")
    n = len(df)
    out: dict[str, np.ndarray] = {}
    filled: list[str] = []
    for col in VAC_COLUMNS:
        dtype = np.dtype(col.dtype)
        if col.name not in df.columns:
            if dtype.kind == "f":
                out[col.name] = np.full(n, np.nan, dtype=dtype)
                filled.append(col.name)
                continue
            raise ValueError(f"VAC table lacks the integer column {col.name} ({col.description}); "
                             "there is no missing-value marker for it")
        series = df[col.name]
        if dtype.kind == "U":
            out[col.name] = _as_strings(col.name, series, _string_width(col))
        elif dtype.kind == "i":
            out[col.name] = _as_integers(col.name, series, dtype)
        else:
            out[col.name] = pd.to_numeric(series, errors="raise").to_numpy(
                dtype="float64", na_value=np.nan).astype(dtype)
    if filled:
        log.info("VAC columns absent from the frame, written as NaN: %s", ", ".join(filled))
    extra = [c for c in df.columns if c not in out]
    if extra:
        log.debug("frame columns not in the VAC, not written: %s", ", ".join(map(str, extra)))
    return out


def _fitted_stems(fitted_labels: Iterable[str]) -> list[str]:
    """Internal label names (FE_H) or VAC stems (FEH) → VAC stems, in order, checked."""
    stems: list[str] = []
    for label in fitted_labels:
        key = str(label).upper()
        stem = LABEL_TO_VAC.get(key, key)
        if stem not in _LABEL_STEMS:
            raise ValueError(f"fitted label {label!r} is not a VAC label; expected one of "
                             f"{sorted(set(LABEL_TO_VAC) | set(_LABEL_STEMS))}")
        if stem not in stems:
            stems.append(stem)
    return stems


def _check_unfitted(arrays: Mapping[str, np.ndarray], stems: Sequence[str]) -> None:
    for stem in _LABEL_STEMS:
        if stem not in stems and np.isfinite(arrays[stem]).any():
            log.warning("label %s is not among the fitted labels %s but has finite values in the frame",
                        stem, list(stems))


def _check_flag_bits(flag_bits: Iterable[Sequence[Any]]) -> list[FlagBit]:
    bits: list[FlagBit] = []
    seen_bits: set[int] = set()
    seen_names: set[str] = set()
    for item in flag_bits:
        bit, name, description = int(item[0]), str(item[1]), str(item[2])
        if not 0 <= bit <= 30:  # FLAG is a signed 32-bit column: bit 31 would be the sign
            raise ValueError(f"flag bit {bit} ({name}) does not fit the int32 FLAG column (0-30)")
        if bit in seen_bits or name in seen_names:
            raise ValueError(f"flag bit {bit} / name {name} given twice")
        seen_bits.add(bit)
        seen_names.add(name)
        bits.append((bit, name, description))
    return sorted(bits)


# ---------------------------------------------------------------------------
# provenance
# ---------------------------------------------------------------------------

def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _compact_json(value: Any) -> str:
    """Compact, ASCII-only JSON (FITS headers are 7-bit ASCII)."""
    return json.dumps(_jsonable(value), separators=(",", ":"), sort_keys=False, ensure_ascii=True, default=str)


def _config_value(value: Any) -> Any:
    """The configuration as a JSON object when it is one (a mapping, or a JSON string)."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value  # e.g. TOML text: kept as a string
    return _jsonable(value)


def _input_names(provenance: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(role, path) of every input named in the provenance (``inputs`` list or ``input_<role>``)."""
    out: list[tuple[str, str]] = []
    for key, value in provenance.items():
        low = key.lower()
        if low in _INPUT_KEYS:
            if isinstance(value, Mapping):
                out.extend((str(k), os.fspath(v)) for k, v in value.items() if v)
            elif isinstance(value, (str, os.PathLike)):
                out.extend(("", s.strip()) for s in re.split(r"[\n,;]", os.fspath(value)) if s.strip())
            else:
                out.extend(("", os.fspath(v)) for v in value if v)
        elif low.startswith("input_") and value and isinstance(value, (str, os.PathLike)):
            out.append((low.removeprefix("input_"), os.fspath(value)))
    return out


def _ascii(text: str) -> str:
    """Printable ASCII for a header card: non-ASCII escaped, control characters spaced."""
    text = text.encode("ascii", "backslashreplace").decode("ascii")
    return re.sub(r"[\x00-\x1f\x7f]", " ", text)


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")


def _put(header: fits.Header, key: str, value: Any, comment: str | None = None) -> None:
    """Set one card (append for COMMENT/HISTORY), in printable ASCII.

    A comment is cut to the room the 80-character card leaves, because astropy would cut
    it anyway with a warning per card; the full text is kept elsewhere (FLAGBITn
    descriptions in COMMENT cards, column descriptions in the Parquet schema).
    """
    if isinstance(value, str):
        value = _ascii(value)
    if key in ("COMMENT", "HISTORY"):
        header[key] = value
        return
    if comment:
        comment = _ascii(comment)
        if not (isinstance(value, str) and len(value) > 68):  # long strings carry any comment
            # the value field ends at column 30 at least; " / " and the comment fill the rest
            image = fits.Card(key, value).image.rstrip()
            room = 80 - max(len(image), 30) - 3
            comment = comment[:room] if room >= 8 else None
    header[key] = (value, comment) if comment else value


def _lsf_mode(provenance: Mapping[str, Any]) -> str:
    """The run's ``[fit] lsf`` from its configuration; "ignore" (the paper's choice and
    the default) when the configuration does not say."""
    config = next((provenance[k] for k in provenance if k.lower() in _CONFIG_KEYS), None)
    fit = _config_value(config).get("fit") if isinstance(_config_value(config), dict) else None
    return str(fit.get("lsf", "ignore")) if isinstance(fit, dict) else "ignore"


def _provenance_cards(provenance: Mapping[str, Any], stems: Sequence[str], bits: Sequence[FlagBit],
                      *, full: bool) -> fits.Header:
    """Header cards for the provenance; ``full`` adds CONFIG/PROVJSON/INPUTn (primary HDU)."""
    cards = fits.Header()
    version = str(provenance.get("package_version", provenance.get("version", __version__)))
    _put(cards, "PIPELINE", "mastar_vac", "software that made this file")
    _put(cards, "PKGVERS", version, "mastar_vac version")
    if full:
        _put(cards, "REFERENC", REFERENCE, "method")
        _put(cards, "DATE", str(provenance.get("date", _utc_now())), "file written (UTC)")
    _put(cards, "FITLABEL", ",".join(stems), "fitted labels (VAC column stems)")
    _put(cards, "NFITLAB", len(stems), "number of fitted labels")
    _put(cards, "LSFMODE", _lsf_mode(provenance), "[fit] lsf: visit LSF forward-modelled or ignored")
    if "emulator_hash" in provenance:
        _put(cards, "EMUHASH", str(provenance["emulator_hash"]), "hash of the emulator artefact")
    for bit, name, description in bits:
        _put(cards, f"FLAGBIT{bit}", name, description)
    if not full:
        return cards
    for bit, name, description in bits:
        _put(cards, "COMMENT", f"FLAG bit {bit} (value {1 << bit}) {name}: {description}")
    inputs = _input_names(provenance)
    if inputs:
        _put(cards, "NINPUT", len(inputs), "number of input files")
    for i, (role, path) in enumerate(inputs, 1):
        _put(cards, f"INPUT{i}", Path(path).name, role or "input file")
    used = set(cards.keys())
    for key, value in provenance.items():
        low = key.lower()
        if low in _KNOWN_KEYS or low in _CONFIG_KEYS or low in _INPUT_KEYS or low.startswith("input_"):
            continue
        kw = key.upper()
        if isinstance(value, np.generic):
            value = value.item()
        scalar = isinstance(value, (str, int, bool)) or (isinstance(value, float) and math.isfinite(value))
        if _KEYWORD_RE.match(kw) and not _RESERVED.match(kw) and kw not in used and scalar:
            _put(cards, kw, value)
            used.add(kw)
        else:
            _put(cards, "HISTORY", f"{key} = {value if isinstance(value, str) else _compact_json(value)}")
    _put(cards, "LONGSTRN", "OGIP 1.0", "CONTINUE long-string convention used")
    config = next((provenance[k] for k in provenance if k.lower() in _CONFIG_KEYS), None)
    if config is not None:
        _put(cards, "CONFIG", _compact_json(_config_value(config)), "run configuration, compact JSON")
    rest = {k: v for k, v in provenance.items() if k.lower() not in _CONFIG_KEYS}
    _put(cards, "PROVJSON", _compact_json(rest), "provenance, compact JSON")
    return cards


# ---------------------------------------------------------------------------
# FITS
# ---------------------------------------------------------------------------

def write_vac_fits(path: str | os.PathLike[str], df: pd.DataFrame, *,
                   provenance: Mapping[str, ProvValue],
                   flag_bits: Sequence[Sequence[Any]],
                   fitted_labels: Sequence[str],
                   extra_header: Mapping[str, Any] | None = None,
                   extname: str = VAC_EXTNAME) -> Path:
    """Write the VAC as an SDSS-style FITS file (``.fits`` or ``.fits.gz``), atomically.

    Parameters
    ----------
    path
        Output file; ``.gz`` in the name means gzip.
    df
        One row per visit. Columns are matched by name to ``VAC_COLUMNS``; see
        :func:`vac_arrays` for what may be missing.
    provenance
        What the file was made from. Recognised keys: ``package_version``/``version``,
        ``emulator_hash``, ``date`` (default: now, UTC), ``config``/``configuration``
        (mapping or JSON string), ``inputs`` (list, mapping role → path, or a
        comma/newline-separated string) and ``input_<role>`` (a path). Other keys that
        are valid FITS keywords (≤ 8 characters) become cards of their own, the rest
        HISTORY cards; all of them, except the configuration, are also in PROVJSON.
    flag_bits
        ``(bit, name, description)`` of each bit of the FLAG column.
    fitted_labels
        The labels this run fitted (internal names like ``FE_H`` or VAC stems like ``FEH``).
    extra_header
        More primary-header cards (``key: value`` or ``key: (value, comment)``).

    Every HDU carries CHECKSUM and DATASUM cards, so a damaged copy is detected
    (``astropy.io.fits.open(path, checksum=True)``, CFITSIO ``fitsverify``).
    """
    stems = _fitted_stems(fitted_labels)
    bits = _check_flag_bits(flag_bits)
    arrays = vac_arrays(df)
    _check_unfitted(arrays, stems)
    nrows = len(df)

    primary = _provenance_cards(provenance, stems, bits, full=True)
    for key, value in (extra_header or {}).items():
        if _RESERVED.match(str(key).upper()) and str(key).upper() not in ("COMMENT", "HISTORY"):
            raise ValueError(f"extra_header may not set the reserved keyword {key}")
        if isinstance(value, tuple):
            _put(primary, str(key).upper(), value[0], value[1] if len(value) > 1 else None)
        else:
            _put(primary, str(key).upper(), value)
    table_cards = _provenance_cards(provenance, stems, bits, full=False)
    # TTYPE comments hold 47 characters: the full text of longer descriptions goes in COMMENTs
    for col in VAC_COLUMNS:
        if len(col.description) > 47:
            _put(table_cards, "COMMENT", f"{col.name}: {col.description}")

    columns = [fits.Column(name=c.name, format=_fits_format(c), unit=c.unit or None, array=arrays[c.name])
               for c in VAC_COLUMNS]
    table = fits.BinTableHDU.from_columns(columns, name=extname)
    for i, col in enumerate(VAC_COLUMNS, 1):
        table.header.comments[f"TTYPE{i}"] = _ascii(col.description)[:47]
    table.header.extend(table_cards)
    hdul = fits.HDUList([fits.PrimaryHDU(header=primary), table])
    # checksums stamped with the file's DATE, not the wall clock: the same catalogue written
    # with the same provenance is the same bytes
    for hdu in hdul:
        hdu.add_checksum(when=f"as written {primary['DATE']}")
    path = Path(path)
    _write_atomically(hdul, path)
    log.info("wrote %s: %d visits, %d columns, HDU %s, fitted %s", path, nrows, len(VAC_COLUMNS), extname,
             ",".join(stems) or "-")
    return path


_FITS_FORMATS = {"i2": "I", "i4": "J", "i8": "K", "f4": "E", "f8": "D"}


def _fits_format(col: VacColumn) -> str:
    """TFORM of a VAC column: strings at the VAC width (not the longest value), so every
    release has the same layout."""
    if col.dtype.startswith("U"):
        return f"{_string_width(col)}A"
    return _FITS_FORMATS[np.dtype(col.dtype).str[1:]]


def _write_atomically(hdul: fits.HDUList, path: Path) -> None:
    """Write ``hdul`` (gzip when the name ends in ``.gz``) with checksums; the file appears
    under its name only when complete and flushed to disk."""
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as raw:
            if path.name.endswith(".gz"):
                # mtime=0 and the final name in the gzip header: same content, same bytes
                with gzip.GzipFile(filename=path.name.removesuffix(".gz"), fileobj=raw, mode="wb",
                                   compresslevel=4, mtime=0) as gz:
                    hdul.writeto(gz)
            else:
                hdul.writeto(raw)
            raw.flush()
            os.fsync(raw.fileno())
    except OSError as exc:
        raise OutputError(f"{path}: write failed ({exc.strerror or exc})") from exc


def _vac_frame(columns: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """A frame in VAC order and dtypes (native byte order), extra columns after them."""
    data: dict[str, Any] = {}
    for col in VAC_COLUMNS:
        if col.name in columns:
            v = np.asarray(columns[col.name])
            data[col.name] = v.astype(str) if col.dtype.startswith("U") else v.astype(col.dtype)
    for name, v in columns.items():
        if name not in data:
            data[name] = v
    return pd.DataFrame(data)


def read_vac_fits(path: str | os.PathLike[str], extname: str = VAC_EXTNAME) -> pd.DataFrame:
    """Read a VAC FITS file (plain or gzipped) back into a frame in VAC order and dtypes.

    Falls back to the first extension when the file has no ``extname`` HDU, so VACs
    written by other tools in the same layout can be read too.
    """
    names = [name for _, name, _ in list_hdus(path)]
    hdu: int | str = extname if extname.upper() in names else 1
    return _vac_frame(read_table(path, hdu))


def _joined_comments(header: fits.Header) -> list[str]:
    """COMMENT texts with astropy's 72-character wrapping undone (a full card continues)."""
    out: list[str] = []
    carry = False
    for card in header.cards:
        if card.keyword != "COMMENT":
            carry = False
            continue
        text = str(card.value)
        if carry and out and not text.startswith("FLAG bit "):
            out[-1] += text
        else:
            out.append(text)
        carry = len(card.image[8:].rstrip()) >= 72
    return out


def read_vac_fits_provenance(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The provenance of a VAC FITS file: fitted labels, flag bits, configuration and the rest.

    Returns ``{"package_version", "date", "fitted_labels", "flag_bits", "emulator_hash",
    "config", "provenance", "inputs"}`` (absent items as None or empty).
    """
    with fits.open(path) as hdul:
        h = hdul[0].header
        full = {}
        for text in _joined_comments(h):
            m = re.match(r"^FLAG bit (\d+) \(value \d+\) (\S+): (.*)$", str(text))
            if m:
                full[int(m.group(1))] = m.group(3).strip()
        bits = sorted((int(k[7:]), str(v), full.get(int(k[7:]), h.comments[k]))
                      for k, v in h.items() if re.match(r"^FLAGBIT\d+$", k))
        config = h.get("CONFIG")
        prov = h.get("PROVJSON")
        return {
            "package_version": h.get("PKGVERS"),
            "date": h.get("DATE"),
            "fitted_labels": [s for s in str(h.get("FITLABEL", "")).split(",") if s],
            "flag_bits": bits,
            "emulator_hash": h.get("EMUHASH"),
            "config": _config_value(config) if config is not None else None,
            "provenance": json.loads(prov) if prov else {},
            "inputs": [h[f"INPUT{i}"] for i in range(1, int(h.get("NINPUT", 0)) + 1)],
        }


# ---------------------------------------------------------------------------
# Parquet
# ---------------------------------------------------------------------------

def _arrow_type(col: VacColumn):  # noqa: ANN202 - a pyarrow DataType
    """The Arrow type of a VAC column: sized ints and floats as in the FITS file, strings as UTF-8."""
    import pyarrow as pa

    if col.dtype.startswith("U"):
        return pa.string()
    return pa.from_numpy_dtype(np.dtype(col.dtype))


def _arrow_schema(provenance: Mapping[str, Any], stems: Sequence[str], bits: Sequence[FlagBit],
                  extra_fields: Sequence[Any] = ()):  # noqa: ANN202
    import pyarrow as pa

    fields = []
    for col in VAC_COLUMNS:
        meta = {b"description": col.description.encode()}
        if col.unit:
            meta[b"unit"] = col.unit.encode()
        fields.append(pa.field(col.name, _arrow_type(col), nullable=True, metadata=meta))
    fields.extend(extra_fields)
    prov = {str(k): (_config_value(v) if k.lower() in _CONFIG_KEYS else _jsonable(v))
            for k, v in provenance.items()}
    prov.setdefault("package_version", __version__)
    prov.setdefault("date", _utc_now())
    metadata = {
        PARQUET_META_KEY: json.dumps(prov, separators=(",", ":"), default=str).encode(),
        PARQUET_FITTED_KEY: json.dumps(list(stems)).encode(),
        PARQUET_FLAGS_KEY: json.dumps([list(b) for b in bits]).encode(),
        PARQUET_VERSION_KEY: __version__.encode(),
    }
    return pa.schema(fields, metadata=metadata)


def write_vac_parquet(directory: str | os.PathLike[str], df: pd.DataFrame, *,
                      provenance: Mapping[str, ProvValue],
                      partition_cols: Sequence[str] | str | None = None,
                      flag_bits: Sequence[Sequence[Any]] = (),
                      fitted_labels: Sequence[str] | None = None,
                      rows_per_file: int = 25_000,
                      row_group_rows: int = 10_000,
                      compression: str = "zstd") -> Path:
    """Write the VAC as a Parquet dataset (a directory), atomically.

    Parameters
    ----------
    directory
        Output directory; replaced as a whole when the new one is complete.
    df
        One row per visit (as for :func:`write_vac_fits`).
    provenance
        Stored as JSON in the schema metadata (the configuration as a JSON object).
    partition_cols
        None (default): files of at most ``rows_per_file`` rows in the frame's order,
        every file holding exactly the VAC columns. Otherwise hive partitioning by these
        columns (``col=value/`` directories); each must be a column of ``df`` or
        ``PLATE_BUCKET`` (made as ``PLATE // 1000`` when missing). A partition column
        that is not a VAC column is stored only in the directory names. Readers return
        the rows grouped by directory in their own (lexicographic) order, so sort by
        :data:`~mastar_vac.catalog.VAC_KEY` when order matters.
    flag_bits, fitted_labels
        As for the FITS writer; kept in the schema metadata.
    rows_per_file, row_group_rows
        Upper bounds of file and row-group size: bounded memory per Dask task, and
        row-group statistics small enough for predicate pushdown.
    compression
        Parquet codec; zstd is read by pyarrow, fastparquet, Spark and DuckDB.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if rows_per_file < 1 or row_group_rows < 1:
        raise ValueError("rows_per_file and row_group_rows must be positive")
    stems = _fitted_stems(fitted_labels) if fitted_labels is not None else []
    bits = _check_flag_bits(flag_bits)
    arrays = vac_arrays(df)
    if fitted_labels is not None:
        _check_unfitted(arrays, stems)
    parts = [partition_cols] if isinstance(partition_cols, str) else list(partition_cols or [])

    schema = _arrow_schema(provenance, stems, bits)
    table = pa.Table.from_arrays(
        [pa.array(arrays[c.name], type=schema.field(c.name).type, from_pandas=False) for c in VAC_COLUMNS],
        schema=schema)
    directory = Path(directory)
    nfiles = 0
    with atomic_dir(directory) as tmp:
        if not parts:
            n = table.num_rows
            for i, start in enumerate(range(0, max(n, 1), rows_per_file)):
                pq.write_table(table.slice(start, rows_per_file), tmp / f"part-{i:05d}.parquet",
                               row_group_size=row_group_rows, compression=compression)
                nfiles += 1
        else:
            keys: dict[str, np.ndarray] = {}
            for col in parts:
                if col in df.columns:
                    keys[col] = df[col].to_numpy()
                elif col == "PLATE_BUCKET":
                    keys[col] = arrays["PLATE"] // 1000
                else:
                    raise ValueError(f"partition column {col!r} is not in the frame "
                                     "(only PLATE_BUCKET is derived here)")
                if pd.isna(pd.Series(keys[col])).any():
                    raise ValueError(f"partition column {col} has missing values")
            # the partition columns move from the files into the directory names
            file_schema = pa.schema([f for f in schema if f.name not in parts], metadata=schema.metadata)
            body = table.select([f.name for f in file_schema]).replace_schema_metadata(schema.metadata)
            body = body.cast(file_schema)
            groups = pd.DataFrame(keys).groupby(parts, sort=True, dropna=False).indices
            for value, idx in groups.items():
                values = value if isinstance(value, tuple) else (value,)
                sub = tmp.joinpath(*(f"{c}={_partition_text(v)}" for c, v in zip(parts, values)))
                sub.mkdir(parents=True, exist_ok=True)
                chunk = body.take(pa.array(np.sort(idx)))
                for i, start in enumerate(range(0, chunk.num_rows, rows_per_file)):
                    pq.write_table(chunk.slice(start, rows_per_file), sub / f"part-{i:05d}.parquet",
                                   row_group_size=row_group_rows, compression=compression)
                    nfiles += 1
            if not groups:  # no rows: one empty file keeps the schema readable
                pq.write_table(body, tmp / "part-00000.parquet", compression=compression)
                nfiles += 1
    log.info("wrote %s: %d visits in %d Parquet file(s)%s", directory, len(df), nfiles,
             f", hive-partitioned by {parts}" if parts else "")
    return directory


def _partition_text(value: Any) -> str:
    text = str(value.item() if isinstance(value, np.generic) else value)
    if not re.match(r"^[A-Za-z0-9_.+-]+$", text):
        raise ValueError(f"partition value {text!r} is not safe as a directory name")
    return text


def _data_files(directory: Path) -> list[Path]:
    files = sorted(p for p in directory.rglob("*.parquet")
                   if not any(part.startswith((".", "_")) for part in p.relative_to(directory).parts))
    if not files:
        raise FileNotFoundError(f"{directory}: no Parquet files (not a VAC Parquet dataset)")
    return files


def read_vac_parquet(directory: str | os.PathLike[str], columns: Sequence[str] | None = None,
                     filters: Any = None) -> pd.DataFrame:
    """Read the Parquet VAC into a frame in VAC order and dtypes (hive columns after them).

    ``columns`` and ``filters`` are passed to pyarrow (filters push down to row groups
    and, for hive layouts, to directories).
    """
    import pyarrow as pa
    import pyarrow.dataset as ds

    directory = Path(directory)
    _data_files(directory)
    dataset = ds.dataset(directory, format="parquet", partitioning="hive",
                         ignore_prefixes=[".", "_"])
    expr = None
    if filters is not None:
        import pyarrow.parquet as pq

        expr = pq.filters_to_expression(filters)
    table = dataset.to_table(columns=list(columns) if columns is not None else None, filter=expr)
    out: dict[str, np.ndarray] = {}
    for name in table.column_names:
        col = table.column(name)
        if pa.types.is_dictionary(col.type):
            col = col.cast(col.type.value_type)
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            out[name] = col.to_numpy(zero_copy_only=False).astype(str)
        else:
            out[name] = col.to_numpy()
    frame = _vac_frame(out)
    return frame


def vac_schema_metadata(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Units, descriptions and provenance of a Parquet VAC, from the schema of its first file.

    Returns ``{"columns": {name: {"unit": str|None, "description": str}},
    "provenance": dict, "fitted_labels": list, "flag_bits": [(bit, name, description)],
    "version": str}``.
    """
    import pyarrow.parquet as pq

    schema = pq.read_schema(_data_files(Path(directory))[0])
    columns = {}
    for field in schema:
        meta = field.metadata or {}
        columns[field.name] = {
            "unit": meta[b"unit"].decode() if b"unit" in meta else None,
            "description": meta.get(b"description", b"").decode(),
        }
    meta = schema.metadata or {}

    def _load(key: bytes, default: Any) -> Any:
        return json.loads(meta[key]) if key in meta else default

    return {
        "columns": columns,
        "provenance": _load(PARQUET_META_KEY, {}),
        "fitted_labels": _load(PARQUET_FITTED_KEY, []),
        "flag_bits": [tuple(b) for b in _load(PARQUET_FLAGS_KEY, [])],
        "version": meta.get(PARQUET_VERSION_KEY, b"").decode() or None,
    }
