"""Binary FITS tables read and written in row blocks, plain or gzip-compressed.

Why not ``astropy.io.fits`` alone: for a ``.fits.gz`` file astropy decompresses the
whole HDU into memory before the first row is available, and the DR17 goodspec file is
5 GB compressed. Here the header is parsed with astropy, but rows are streamed: memory
is bounded by the block, whatever the file size, gzip included. Writing streams the
same way, so a DR17-size test file can be made without holding it.

Only what the survey files use is supported: fixed-width columns of the FITS types
L, B, I, J, K, E, D and A (scalars or vectors, with TDIM), and the TZERO convention for
unsigned integers. Variable-length (P/Q) columns are refused with a clear message.
"""

from __future__ import annotations

import gzip
import io
import os
import re
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from astropy.io import fits

from ..errors import InputFileError, OutputError
from .atomic import atomic_path

__all__ = [
    "ColumnInfo",
    "BinTableReader",
    "FitsWriter",
    "read_table",
    "list_hdus",
]

BLOCK = 2880
CARD = 80

_FITS_TO_NUMPY = {
    "L": "S1",
    "B": "u1",
    "I": ">i2",
    "J": ">i4",
    "K": ">i8",
    "E": ">f4",
    "D": ">f8",
    "A": "S",
}
_UNSIGNED_ZERO = {"I": (32768, np.uint16), "J": (2**31, np.uint32), "K": (2**63, np.uint64)}
_TFORM_RE = re.compile(r"^\s*(\d*)([LXBIJKAEDCMPQ])(.*)$")


@dataclass(frozen=True)
class ColumnInfo:
    """One column of a binary table: its name, FITS code, per-row shape and unit."""

    name: str
    code: str  # FITS type letter
    repeat: int  # elements per row (characters for 'A')
    shape: tuple[int, ...]  # per-row shape of the values returned (() for scalars)
    unit: str | None
    tzero: float | None
    tscal: float | None


def _open_stream(path: Path) -> BinaryIO:
    """Open a file for reading, transparently gunzipping; errors name the file."""
    try:
        raw = open(path, "rb")  # noqa: SIM115 - closed by the reader
    except FileNotFoundError:
        raise InputFileError(path, "file not found") from None
    except IsADirectoryError:
        raise InputFileError(path, "is a directory", expected="a FITS file") from None
    except OSError as exc:
        raise InputFileError(path, f"cannot be opened ({exc.strerror})") from None
    magic = raw.read(2)
    raw.seek(0)
    if magic == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    return raw


def _read_exact(stream: BinaryIO, n: int, path: Path, what: str) -> bytes:
    try:
        data = stream.read(n)
    except (OSError, EOFError, zlib.error) as exc:
        raise InputFileError(path, f"corrupt compressed data while reading {what} ({exc})") from None
    return data


def _read_header(stream: BinaryIO, path: Path, index: int) -> fits.Header | None:
    """Read one header from the current position; None at a clean end of file."""
    chunks: list[bytes] = []
    while True:
        block = _read_exact(stream, BLOCK, path, f"the header of HDU {index}")
        if not block:
            if not chunks:
                return None
            raise InputFileError(path, "file ends inside a header (truncated)", hdu=index)
        if not chunks and index == 0 and not block.startswith(b"SIMPLE  ="):
            raise InputFileError(path, "not a FITS file (does not start with a SIMPLE card)",
                                 expected="a FITS file")
        if len(block) < BLOCK:
            if not chunks and not block.strip(b"\0 "):
                return None
            raise InputFileError(path, "file ends inside a header (truncated)", hdu=index)
        chunks.append(block)
        found = any(block[i : i + 3] == b"END" and block[i + 3 : i + CARD].strip() == b""
                    for i in range(0, BLOCK, CARD))
        if found:
            break
        if len(chunks) > 10000:  # 28 MB of cards: not a header
            raise InputFileError(path, "no END card found", hdu=index, expected="a FITS header")
    raw = b"".join(chunks)
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise InputFileError(path, "header holds non-ASCII bytes (corrupt header)", hdu=index) from None
    try:
        header = fits.Header.fromstring(text)
    except Exception as exc:  # astropy raises several types for malformed cards
        raise InputFileError(path, f"corrupt header ({exc})", hdu=index) from None
    first = "SIMPLE" if index == 0 else "XTENSION"
    if not len(header) or list(header.keys())[0] != first:
        raise InputFileError(path, "not a FITS header", hdu=index, expected=f"a first card {first}")
    return header


def _data_size(header: fits.Header, path: Path, index: int) -> int:
    try:
        bitpix = int(header["BITPIX"])
        naxis = int(header["NAXIS"])
        dims = [int(header[f"NAXIS{i}"]) for i in range(1, naxis + 1)]
        pcount = int(header.get("PCOUNT", 0))
        gcount = int(header.get("GCOUNT", 1))
    except (KeyError, ValueError, TypeError, fits.VerifyError) as exc:
        raise InputFileError(path, f"corrupt header: {exc}", hdu=index) from None
    if naxis == 0:
        return 0
    if any(d < 0 for d in dims) or pcount < 0 or gcount < 0 or bitpix not in (8, 16, 32, 64, -32, -64):
        raise InputFileError(path, "corrupt header: negative axis length or invalid BITPIX", hdu=index)
    n = abs(bitpix) // 8 * gcount * (pcount + int(np.prod(dims, dtype=np.int64)))
    return (n + BLOCK - 1) // BLOCK * BLOCK


def _skip(stream: BinaryIO, n: int, path: Path, index: int) -> None:
    if n == 0:
        return
    try:
        stream.seek(n, io.SEEK_CUR)
    except (OSError, EOFError, zlib.error) as exc:
        raise InputFileError(path, f"corrupt compressed data ({exc})", hdu=index) from None


def _hdu_name(header: fits.Header, index: int) -> str:
    if index == 0:
        return "PRIMARY"
    return str(header.get("EXTNAME", "")).strip().upper()


def list_hdus(path: str | os.PathLike[str]) -> list[tuple[int, str, str]]:
    """(index, EXTNAME, XTENSION) of every HDU; reads headers only."""
    path = Path(path)
    out: list[tuple[int, str, str]] = []
    with _open_stream(path) as stream:
        index = 0
        while True:
            header = _read_header(stream, path, index)
            if header is None:
                break
            kind = "PRIMARY" if index == 0 else str(header["XTENSION"]).strip()
            out.append((index, _hdu_name(header, index), kind))
            _skip(stream, _data_size(header, path, index), path, index)
            index += 1
    return out


def _parse_columns(header: fits.Header, path: Path, index: int) -> tuple[list[ColumnInfo], np.dtype]:
    try:
        nfields = int(header["TFIELDS"])
        rowbytes = int(header["NAXIS1"])
    except (KeyError, ValueError, TypeError, fits.VerifyError) as exc:
        raise InputFileError(path, f"corrupt header: binary-table keywords unreadable ({exc})", hdu=index) from None
    cols: list[ColumnInfo] = []
    fields: list[tuple[str, np.dtype]] = []
    seen: set[str] = set()
    for i in range(1, nfields + 1):
        name = str(header.get(f"TTYPE{i}", f"COL{i}")).strip()
        tform = str(header.get(f"TFORM{i}", ""))
        m = _TFORM_RE.match(tform)
        if not m:
            raise InputFileError(path, f"column {i} has an unreadable TFORM {tform!r}", hdu=index, column=name)
        repeat = int(m.group(1)) if m.group(1) else 1
        code = m.group(2)
        if code in "PQ":
            raise InputFileError(path, "variable-length array columns are not supported", hdu=index,
                                 column=name, expected="fixed-width columns as in the SDSS files")
        if code in "XCM":
            raise InputFileError(path, f"column type {code!r} is not supported", hdu=index, column=name)
        if code == "A":
            np_dtype = np.dtype(f"S{max(repeat, 1)}")
            shape: tuple[int, ...] = ()
            nbytes = repeat
        else:
            base = np.dtype(_FITS_TO_NUMPY[code])
            tdim = header.get(f"TDIM{i}")
            if tdim:
                try:
                    dims = tuple(int(x) for x in str(tdim).strip("() ").split(","))
                except ValueError:
                    raise InputFileError(path, f"unreadable TDIM {tdim!r}", hdu=index, column=name) from None
                shape = tuple(reversed(dims))  # FITS is Fortran order
                if int(np.prod(shape)) != repeat:
                    raise InputFileError(path, f"TDIM {tdim} does not match TFORM {tform}", hdu=index, column=name)
            else:
                shape = () if repeat == 1 else (repeat,)
            np_dtype = np.dtype((base, shape)) if shape else base
            nbytes = base.itemsize * repeat
        key = name if name not in seen else f"{name}_{i}"
        seen.add(key)
        if nbytes == 0:
            continue
        fields.append((key, np_dtype))
        cols.append(ColumnInfo(
            name=key, code=code, repeat=repeat, shape=shape,
            unit=(str(header[f"TUNIT{i}"]).strip() or None) if f"TUNIT{i}" in header else None,
            tzero=float(header[f"TZERO{i}"]) if f"TZERO{i}" in header else None,
            tscal=float(header[f"TSCAL{i}"]) if f"TSCAL{i}" in header else None,
        ))
    dtype = np.dtype(fields)
    if dtype.itemsize != rowbytes:
        raise InputFileError(
            path, f"corrupt header: the columns add up to {dtype.itemsize} bytes per row but NAXIS1 = {rowbytes}",
            hdu=index)
    return cols, dtype


def _convert(col: ColumnInfo, raw: np.ndarray) -> np.ndarray:
    """Big-endian raw field → native values (strings decoded and stripped)."""
    if col.code == "A":
        return np.char.strip(np.char.decode(raw, "ascii", errors="replace")).astype(str)
    if col.code == "L":
        return raw.view(np.uint8) == ord("T")
    if col.tzero is not None and col.code in _UNSIGNED_ZERO and (col.tscal in (None, 1.0)):
        zero, utype = _UNSIGNED_ZERO[col.code]
        if col.tzero == zero:
            # FITS stores unsigned integers offset by TZERO: flipping the sign bit undoes it
            signed = raw.astype(raw.dtype.newbyteorder("="))
            return signed.view(utype) ^ utype(zero)
    if col.code == "B" and col.tzero == -128:
        return (raw.astype(np.int16) - 128).astype(np.int8)
    out = raw.astype(raw.dtype.newbyteorder("="))
    if col.tscal not in (None, 1.0) or col.tzero not in (None, 0.0):
        out = out * (col.tscal or 1.0) + (col.tzero or 0.0)
    return out


class BinTableReader:
    """Stream the rows of one binary-table HDU of a (possibly gzipped) FITS file.

    Parameters
    ----------
    path
        FITS file, ``.gz`` or plain (compression is detected from the bytes, not the name).
    hdu
        Index (1 = first extension) or EXTNAME (case-insensitive).

    Examples
    --------
    >>> with BinTableReader("mastar-goodspec-v3_1_1-v1_7_7.fits.gz") as t:  # doctest: +SKIP
    ...     for first_row, block in t.iter_blocks(1024, columns=["MANGAID", "FLUX"]):
    ...         ...
    """

    def __init__(self, path: str | os.PathLike[str], hdu: int | str = 1) -> None:
        self.path = Path(path)
        self._stream = _open_stream(self.path)
        try:
            self._locate(hdu)
        except (fits.VerifyError, ValueError, TypeError, KeyError) as exc:
            # a card that astropy parsed lazily and only now finds unreadable
            self._stream.close()
            raise InputFileError(self.path, f"corrupt header ({exc})", hdu=hdu) from None
        except BaseException:
            self._stream.close()
            raise

    def _locate(self, hdu: int | str) -> None:
        want = hdu.upper() if isinstance(hdu, str) else hdu
        index = 0
        seen: list[str] = []
        while True:
            header = _read_header(self._stream, self.path, index)
            if header is None:
                raise InputFileError(self.path, f"has no HDU {hdu!r}", hdu=hdu,
                                     expected=f"one of {seen}" if seen else "a FITS file")
            name = _hdu_name(header, index)
            seen.append(f"{index}:{name or '-'}")
            size = _data_size(header, self.path, index)
            if (isinstance(want, int) and index == want) or (isinstance(want, str) and name == want):
                break
            _skip(self._stream, size, self.path, index)
            index += 1
        self.hdu_index = index
        self.hdu_name = name
        self.header = header
        if index == 0 or str(header.get("XTENSION", "")).strip() != "BINTABLE":
            kind = "PRIMARY" if index == 0 else str(header.get("XTENSION")).strip()
            raise InputFileError(self.path, f"HDU is a {kind}, not a binary table", hdu=hdu,
                                 expected="XTENSION = 'BINTABLE'")
        self.columns, self._dtype = _parse_columns(header, self.path, index)
        self.nrows = int(header["NAXIS2"])
        self.row_bytes = self._dtype.itemsize
        self._data_start = self._stream.tell()
        self._pos = 0  # next row the stream is positioned at

    # -- context manager -------------------------------------------------
    def __enter__(self) -> BinTableReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stream.close()

    # -- metadata --------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    def column(self, name: str) -> ColumnInfo:
        for c in self.columns:
            if c.name == name:
                return c
        raise InputFileError(self.path, "column missing", hdu=self.hdu_name or self.hdu_index,
                             column=name, expected=f"one of {self.names}")

    # -- data ------------------------------------------------------------
    def _seek_row(self, row: int) -> None:
        if row == self._pos:
            return
        try:
            self._stream.seek(self._data_start + row * self.row_bytes)
        except (OSError, EOFError, zlib.error) as exc:
            raise InputFileError(self.path, f"corrupt compressed data ({exc})", hdu=self.hdu_index,
                                 row=row) from None
        self._pos = row

    def read_raw(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as the big-endian structured array stored in the file."""
        stop = min(stop, self.nrows)
        if start >= stop:
            return np.empty(0, dtype=self._dtype)
        self._seek_row(start)
        want = (stop - start) * self.row_bytes
        data = _read_exact(self._stream, want, self.path, f"rows {start}-{stop - 1}")
        got_rows = len(data) // self.row_bytes
        self._pos = start + got_rows
        if len(data) < want:
            raise InputFileError(
                self.path, f"file ends at row {start + got_rows} of {self.nrows} (truncated)",
                hdu=self.hdu_name or self.hdu_index, row=start + got_rows,
                expected=f"{self.nrows} rows of {self.row_bytes} bytes")
        if stop == self.nrows:
            self._check_padding()
        return np.frombuffer(data, dtype=self._dtype)

    def _check_padding(self) -> None:
        """A file cut inside the last 2880-byte block has lost nothing of the rows, but it
        is a broken copy (an interrupted download): say so rather than read on."""
        nbytes = self.nrows * self.row_bytes + int(self.header.get("PCOUNT", 0))
        pad = (-nbytes) % BLOCK + int(self.header.get("PCOUNT", 0))
        if pad == 0:
            return
        got = len(_read_exact(self._stream, pad, self.path, "the end of the table"))
        self._pos = -1  # the stream is past the rows now: the next read seeks
        if got < pad:
            raise InputFileError(self.path, "file ends inside the table's final block (truncated)",
                                 hdu=self.hdu_name or self.hdu_index,
                                 expected=f"{pad} more bytes of FITS padding")

    def read(self, columns: Sequence[str] | None = None, start: int = 0,
             stop: int | None = None) -> dict[str, np.ndarray]:
        """Rows [start, stop) of the named columns, as native numpy arrays."""
        raw = self.read_raw(start, self.nrows if stop is None else stop)
        names = self.names if columns is None else list(columns)
        return {n: _convert(self.column(n), raw[n]) for n in names}

    def iter_blocks(self, rows: int, *, columns: Sequence[str] | None = None, start: int = 0,
                    stop: int | None = None) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """Yield ``(first_row, columns)`` for consecutive blocks of at most ``rows`` rows."""
        if rows < 1:
            raise ValueError("rows must be >= 1")
        stop = self.nrows if stop is None else min(stop, self.nrows)
        for s in range(start, stop, rows):
            yield s, self.read(columns, s, min(s + rows, stop))


def read_table(path: str | os.PathLike[str], hdu: int | str = 1,
               columns: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """A whole (small) binary table as a dict of native numpy arrays."""
    with BinTableReader(path, hdu) as t:
        return t.read(columns)


# ---------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------

def _fits_code(dtype: np.dtype) -> str:
    kind, size = dtype.kind, dtype.itemsize
    if kind == "b":
        return "L"
    if kind == "u" and size == 1:
        return "B"
    if kind == "i" and size in (1, 2):
        return "I"
    if kind == "i" and size == 4:
        return "J"
    if kind in "iu" and size == 8 or kind == "u" and size == 4:
        return "K"
    if kind == "u" and size == 2:
        return "J"
    if kind == "f" and size == 4:
        return "E"
    if kind == "f" and size == 8:
        return "D"
    if kind in "SU":
        return "A"
    raise TypeError(f"no FITS column type for dtype {dtype}")


@dataclass
class _WriteColumn:
    name: str
    code: str
    shape: tuple[int, ...]  # per-row shape; for 'A' the string width is in `width`
    width: int
    unit: str | None
    description: str | None

    @property
    def numpy_dtype(self) -> np.dtype:
        if self.code == "A":
            return np.dtype(f"S{self.width}")
        base = np.dtype(_FITS_TO_NUMPY[self.code]) if self.code != "L" else np.dtype("S1")
        return np.dtype((base, self.shape)) if self.shape else base

    @property
    def tform(self) -> str:
        if self.code == "A":
            return f"{self.width}A"
        n = int(np.prod(self.shape)) if self.shape else 1
        return f"{n}{self.code}" if n != 1 else self.code


def _column_spec(name: str, values: np.ndarray, unit: str | None, description: str | None,
                 width: int | None = None) -> _WriteColumn:
    values = np.asarray(values)
    code = _fits_code(values.dtype)
    if code == "A":
        if width is None:
            if values.size:
                lens = np.char.str_len(values.astype(str)) if values.dtype.kind == "U" else np.char.str_len(values)
                width = int(max(1, lens.max()))
            else:
                width = 1
        return _WriteColumn(name, "A", (), width, unit, description)
    return _WriteColumn(name, code, tuple(values.shape[1:]), 0, unit, description)


def _encode(col: _WriteColumn, values: np.ndarray) -> np.ndarray:
    values = np.asarray(values)
    if col.code == "A":
        if values.dtype.kind == "U":
            values = np.char.encode(values, "ascii")
        return values.astype(f"S{col.width}")
    if col.code == "L":
        return np.where(values.astype(bool), b"T", b"F").astype("S1")
    return values.astype(col.numpy_dtype.base if col.shape else col.numpy_dtype)


class _TableStream:
    """Rows of one table being written; made by :meth:`FitsWriter.begin_table`."""

    def __init__(self, fh: BinaryIO, cols: list[_WriteColumn], nrows: int, path: Path, extname: str):
        self._fh = fh
        self._cols = cols
        self._dtype = np.dtype([(c.name, c.numpy_dtype) for c in cols])
        self.nrows = nrows
        self.written = 0
        self._path = path
        self._extname = extname

    def write(self, block: Mapping[str, np.ndarray]) -> None:
        n = len(next(iter(block.values()))) if block else 0
        if self.written + n > self.nrows:
            raise ValueError(f"{self._extname}: {self.written + n} rows written, header says {self.nrows}")
        arr = np.zeros(n, dtype=self._dtype)
        for c in self._cols:
            if c.name not in block:
                raise KeyError(f"{self._extname}: block lacks column {c.name}")
            v = np.asarray(block[c.name])
            if len(v) != n:
                raise ValueError(f"{self._extname}: column {c.name} has {len(v)} rows, others {n}")
            if c.code != "A" and tuple(v.shape[1:]) != c.shape:
                raise ValueError(f"{self._extname}: column {c.name} rows have shape {v.shape[1:]}, expected {c.shape}")
            arr[c.name] = _encode(c, v)
        try:
            self._fh.write(arr.tobytes())
        except OSError as exc:
            raise OutputError(f"{self._path}: write failed ({exc.strerror or exc})") from exc
        self.written += n

    def _finish(self) -> None:
        if self.written != self.nrows:
            raise ValueError(f"{self._extname}: {self.written} rows written, header promised {self.nrows}")
        nbytes = self.nrows * self._dtype.itemsize
        pad = (-nbytes) % BLOCK
        self._fh.write(b"\0" * pad)


class FitsWriter:
    """Write a FITS file of binary tables, atomically, optionally gzip-compressed.

    The file appears under its name only when the ``with`` block ends without error;
    until then it lives under a temporary name beside it. ``.gz`` in the name means
    gzip. Rows can be streamed (:meth:`begin_table`) so that memory stays bounded.
    """

    def __init__(self, path: str | os.PathLike[str], *, primary_header: Mapping[str, object] | None = None,
                 overwrite: bool = True, compresslevel: int = 4) -> None:
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise OutputError(f"{self.path}: exists and overwrite is False")
        self._atomic = atomic_path(self.path)
        self._tmp = self._atomic.__enter__()
        try:
            raw = open(self._tmp, "wb")  # noqa: SIM115
        except OSError as exc:
            self._atomic.__exit__(type(exc), exc, None)
            raise OutputError(f"{self.path}: cannot be created ({exc.strerror})") from exc
        self._raw = raw
        # mtime=0 and the final name in the gzip header: same content, same bytes
        self._fh: BinaryIO = (gzip.GzipFile(filename=self.path.name.removesuffix(".gz"), fileobj=raw, mode="wb",  # type: ignore[assignment]
                                            compresslevel=compresslevel, mtime=0)
                              if self.path.name.endswith(".gz") else raw)
        hdr = fits.Header()
        hdr["SIMPLE"] = True
        hdr["BITPIX"] = 8
        hdr["NAXIS"] = 0
        hdr["EXTEND"] = True
        for k, v in (primary_header or {}).items():
            hdr[k] = v
        self._write_header(hdr)
        self._open: _TableStream | None = None

    def _write_header(self, hdr: fits.Header) -> None:
        try:
            self._fh.write(hdr.tostring(padding=True).encode("ascii"))
        except OSError as exc:
            raise OutputError(f"{self.path}: write failed ({exc.strerror or exc})") from exc

    def _table_header(self, cols: list[_WriteColumn], nrows: int, extname: str,
                      header: Mapping[str, object] | None) -> fits.Header:
        rowbytes = sum(c.numpy_dtype.itemsize for c in cols)
        h = fits.Header()
        h["XTENSION"] = "BINTABLE"
        h["BITPIX"] = 8
        h["NAXIS"] = 2
        h["NAXIS1"] = rowbytes
        h["NAXIS2"] = nrows
        h["PCOUNT"] = 0
        h["GCOUNT"] = 1
        h["TFIELDS"] = len(cols)
        for i, c in enumerate(cols, 1):
            h[f"TTYPE{i}"] = (c.name, (c.description or "")[:47])
            h[f"TFORM{i}"] = c.tform
            if c.unit:
                h[f"TUNIT{i}"] = c.unit
            if len(c.shape) > 1:
                h[f"TDIM{i}"] = "(" + ",".join(str(d) for d in reversed(c.shape)) + ")"
        h["EXTNAME"] = extname
        for k, v in (header or {}).items():
            h[k] = v
        return h

    def add_table(self, columns: Mapping[str, np.ndarray], *, extname: str,
                  units: Mapping[str, str] | None = None, descriptions: Mapping[str, str] | None = None,
                  header: Mapping[str, object] | None = None) -> None:
        """Write a whole table held in memory."""
        nrows = len(next(iter(columns.values()))) if columns else 0
        schema = {n: np.asarray(v) for n, v in columns.items()}
        with self.begin_table(schema, nrows, extname=extname, units=units, descriptions=descriptions,
                              header=header) as t:
            if nrows:
                t.write(schema)

    def begin_table(self, schema: Mapping[str, np.ndarray | tuple[np.dtype, tuple[int, ...]]], nrows: int, *,
                    extname: str, units: Mapping[str, str] | None = None,
                    descriptions: Mapping[str, str] | None = None,
                    header: Mapping[str, object] | None = None,
                    string_widths: Mapping[str, int] | None = None) -> _TableContext:
        """Start a table of ``nrows`` rows; ``schema`` maps names to an example array
        (its dtype and per-row shape are used) or to ``(dtype, per_row_shape)``."""
        if self._open is not None:
            raise RuntimeError("finish the previous table first")
        cols = []
        for name, spec in schema.items():
            if isinstance(spec, tuple):
                dt, shape = np.dtype(spec[0]), tuple(spec[1])
                example = np.zeros((0, *shape), dtype=dt)
            else:
                example = np.asarray(spec)
            width = (string_widths or {}).get(name)
            cols.append(_column_spec(name, example, (units or {}).get(name), (descriptions or {}).get(name), width))
        self._write_header(self._table_header(cols, nrows, extname, header))
        self._open = _TableStream(self._fh, cols, nrows, self.path, extname)
        return _TableContext(self, self._open)

    def _end_table(self) -> None:
        assert self._open is not None
        self._open._finish()
        self._open = None

    def close(self, *, commit: bool = True) -> None:
        if self._raw.closed:
            return
        exc_info: tuple = (None, None, None)
        try:
            if self._fh is not self._raw:
                self._fh.close()
            self._raw.flush()
            if commit:
                os.fsync(self._raw.fileno())
            self._raw.close()
        except OSError as exc:
            self._raw.close()
            self._atomic.__exit__(type(exc), exc, None)
            raise OutputError(f"{self.path}: write failed ({exc.strerror or exc})") from exc
        if not commit:
            exc_info = (RuntimeError, RuntimeError("aborted"), None)
        self._atomic.__exit__(*exc_info)

    def __enter__(self) -> FitsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:  # noqa: ANN001
        if exc_type is None and self._open is not None:
            exc_type = RuntimeError
            self.close(commit=False)
            raise RuntimeError(f"{self.path}: a table was left unfinished")
        self.close(commit=exc_type is None)


class _TableContext:
    def __init__(self, writer: FitsWriter, stream: _TableStream) -> None:
        self._writer = writer
        self.stream = stream

    def __enter__(self) -> _TableStream:
        return self.stream

    def __exit__(self, exc_type, exc, tb) -> None:  # noqa: ANN001
        if exc_type is None:
            self._writer._end_table()
