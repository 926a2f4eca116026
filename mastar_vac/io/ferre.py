"""Synthetic spectral grids in FERRE format (datamodels.md §5).

A FERRE grid is a Fortran-namelist header followed by Π N_P models of NPIX values:

* ASCII (``.dat``): header, then the numbers. Models are nominally one per line, but
  writers wrap long lines, so everything after the header is read as one flat stream
  of whitespace-separated numbers (Fortran ``D`` exponents are accepted).
* Binary (``.hdr`` + ``.unf``): the header alone in ``.hdr``; ``.unf`` is a Fortran
  direct-access unformatted file of float32 records without record markers, i.e. a raw
  float32 stream in native byte order.

Order: LABEL(1) varies slowest and the pixel axis fastest, so the data reshape in C
order to ``(N_P(1), …, N_P(N_OF_DIM), NPIX)``.

Wavelengths come from ``WAVE = start step`` in the space named by LOGW (0: λ,
1: log10 λ, 2: ln λ); VACUUM = 0 means air, and :func:`read_ferre` converts air to
vacuum so that ``FerreGrid.wave`` is always vacuum Å (the header keeps the file's
values, so writing the grid back reproduces the file). A header without VACUUM is
taken as air (synthesis codes and the Allende Prieto et al. 2018 grids use air above
2000 Å); ``FerreGrid.wave_note`` records what was assumed.

Header keys are case-insensitive and stored upper-case in ``FerreGrid.header`` with
typed values (int, float, str, or a list of them); unknown keys are kept there too.
``CONSTANT`` is kept in the header and not applied to the flux. Grids with
``MULTI > 0`` (several wavelength sections with their own headers, as APOGEE's) and
PCA-compressed grids (``NPCA``) are refused with a clear error, and so are transposed
grids (``TRANSPOSED > 0``).

:func:`interpolate` is a separable 4-point (cubic) Lagrange interpolation along every
axis with at least four nodes, and linear along axes with two or three nodes. It is
exact at nodes, reproduces any polynomial of degree ≤ 3 per axis exactly, and never
extrapolates. Models holding the header's ``INVALID_CODE`` poison only the pixels they
contribute to: an interpolated pixel whose stencil uses an invalid value with a
non-zero weight is NaN.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ..errors import InputFileError
from ..wavegrid import air_to_vacuum

__all__ = ["FerreGrid", "read_ferre", "read_ferre_header", "write_ferre", "interpolate"]

_REQUIRED = ("N_OF_DIM", "N_P", "NPIX", "LLIMITS", "STEPS")
_LABEL_RE = re.compile(r"^LABEL\s*\(\s*(\d+)\s*\)$")
_NUM_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eEdD][+-]?\d+)?$")
_INT_RE = re.compile(r"^[+-]?\d+$")


# --------------------------------------------------------------------------- grid object


@dataclass
class FerreGrid:
    """A FERRE grid in memory.

    ``flux`` has shape ``n_p + (npix,)`` (float32) with axis i along ``labels[i]``;
    node k of axis i is ``llimits[i] + k * steps[i]``. ``wave`` is vacuum Å (None only
    when the header has no WAVE and the grid was read with ``require_wave=False``).
    """

    labels: list[str]
    llimits: NDArray[np.float64]
    steps: NDArray[np.float64]
    n_p: tuple[int, ...]
    wave: NDArray[np.float64] | None
    flux: NDArray[np.float32]
    header: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    wave_note: str = ""

    @property
    def ndim(self) -> int:
        return len(self.n_p)

    @property
    def npix(self) -> int:
        return int(self.flux.shape[-1])

    @property
    def invalid_code(self) -> float | None:
        v = self.header.get("INVALID_CODE")
        return None if v is None else float(v)

    def nodes(self, axis: int | str) -> NDArray[np.float64]:
        """Node values along ``axis`` (an index or a label name, case-insensitive)."""
        i = self.axis(axis)
        return self.llimits[i] + self.steps[i] * np.arange(self.n_p[i], dtype=np.float64)

    def axis(self, axis: int | str) -> int:
        if isinstance(axis, str):
            names = [s.strip().upper() for s in self.labels]
            try:
                return names.index(axis.strip().upper())
            except ValueError:
                raise KeyError(f"no label {axis!r} in grid; labels are {self.labels}") from None
        i = int(axis)
        if not -self.ndim <= i < self.ndim:
            raise IndexError(f"axis {axis} out of range for a {self.ndim}-D grid")
        return i % self.ndim

    @property
    def label_range(self) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """(lo, hi): the smallest and largest node of every axis."""
        last = self.llimits + self.steps * (np.asarray(self.n_p, dtype=np.float64) - 1)
        return np.minimum(self.llimits, last), np.maximum(self.llimits, last)

    def __repr__(self) -> str:  # the flux array would swamp the default repr
        lo, hi = self.label_range
        axes = ", ".join(f"{n}[{a:g}..{b:g}]×{k}" for n, a, b, k in zip(self.labels, lo, hi, self.n_p))
        return f"FerreGrid({axes}; npix={self.npix}; path={self.path})"


# --------------------------------------------------------------------------- header


def _split_values(text: str) -> list[str]:
    """Tokens of a namelist value: quoted strings kept whole, commas as separators."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in " \t,\r\n":
            i += 1
        elif c in "'\"":
            q = c
            j = i + 1
            buf = []
            while j < n:
                if text[j] == q:
                    if j + 1 < n and text[j + 1] == q:  # doubled quote inside a string
                        buf.append(q)
                        j += 2
                        continue
                    break
                buf.append(text[j])
                j += 1
            out.append(q + "".join(buf) + q)
            i = j + 1
        else:
            j = i
            while j < n and text[j] not in " \t,\r\n":
                j += 1
            out.append(text[i:j])
            i = j
    return out


def _convert(token: str) -> Any:
    if len(token) >= 2 and token[0] == token[-1] and token[0] in "'\"":
        return token[1:-1]
    if _INT_RE.match(token):
        return int(token)
    if _NUM_RE.match(token):
        return float(token.replace("d", "e").replace("D", "e"))
    return token


def _parse_value(raw: str) -> Any:
    tokens = _split_values(raw)
    vals = [_convert(t) for t in tokens]
    if not vals:
        return ""
    return vals[0] if len(vals) == 1 else vals


def _parse_header_lines(lines: list[str], path: Path) -> tuple[dict[str, Any], dict[int, str]]:
    header: dict[str, Any] = {}
    labels: dict[int, str] = {}
    key: str | None = None
    raw: dict[str, str] = {}
    order: list[str] = []
    for lineno, line in enumerate(lines, start=2):
        s = line.strip()
        if not s:
            continue
        if "=" in s and not s.startswith(("'", '"')):
            k, v = s.split("=", 1)
            key = re.sub(r"\s+", "", k).upper()
            if not key:
                raise InputFileError(path, f"header line {lineno} has no key before '=': {line.rstrip()!r}",
                                     expected="KEY = value")
            if key not in raw:
                order.append(key)
            raw[key] = v.strip()
        elif key is not None:  # continuation of a long array
            raw[key] += " " + s
        else:
            raise InputFileError(path, f"header line {lineno} is not 'KEY = value': {line.rstrip()!r}",
                                 expected="KEY = value")
    for k in order:
        v = _parse_value(raw[k].rstrip(","))
        m = _LABEL_RE.match(k)
        if m:
            labels[int(m.group(1))] = str(v).strip()
        header[k] = v
    return header, labels


def _read_header_block(fh, path: Path) -> tuple[list[str], int]:  # noqa: ANN001
    """Header lines between ' &SYNTH' and ' /' of an open binary file; returns (lines, n_bytes)."""
    first = b""
    while True:
        first = fh.readline()
        if not first:
            raise InputFileError(path, "file is empty", expected="a FERRE header starting with ' &SYNTH'")
        if first.strip():
            break
    if not first.strip().upper().startswith(b"&SYNTH"):
        shown = first.strip()[:60].decode("latin-1")
        raise InputFileError(path, f"does not start with a FERRE header (first line {shown!r})",
                             expected="a first line ' &SYNTH'")
    lines: list[str] = []
    rest = first.strip()[len(b"&SYNTH"):].strip()
    if rest:
        lines.append(rest.decode("latin-1"))
    while True:
        line = fh.readline()
        if not line:
            raise InputFileError(path, "FERRE header is not terminated", expected="a line starting with ' /'")
        s = line.strip()
        if s.startswith(b"/") or s.upper().startswith(b"&END"):
            break
        try:
            lines.append(line.decode("ascii"))
        except UnicodeDecodeError:
            raise InputFileError(path, f"header line {len(lines) + 2} is not text (binary data inside the header?)",
                                 expected="a line starting with ' /' to end the header") from None
    return lines, fh.tell()


def _as_list(v: Any) -> list[Any]:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _validate(header: dict[str, Any], labels_by_index: dict[int, str], path: Path
              ) -> tuple[list[str], NDArray[np.float64], NDArray[np.float64], tuple[int, ...], int]:
    missing = [k for k in _REQUIRED if k not in header]
    if missing:
        raise InputFileError(path, f"FERRE header lacks required key(s) {', '.join(missing)}",
                             expected="N_OF_DIM, N_P, NPIX, LLIMITS and STEPS")
    multi = header.get("MULTI", 0)
    if not isinstance(multi, int) or multi > 0:
        raise InputFileError(path, f"MULTI = {multi!r}: grids with several wavelength sections are not supported",
                             expected="MULTI absent or 0 (one section)")
    if "NPCA" in header:
        raise InputFileError(path, "PCA-compressed grids (NPCA) are not supported", expected="a plain flux grid")
    transposed = header.get("TRANSPOSED", 0)
    if not isinstance(transposed, int) or transposed > 0:
        raise InputFileError(path, f"TRANSPOSED = {transposed!r}: transposed grids are not supported",
                             expected="TRANSPOSED absent or 0")

    def ints(key: str) -> list[int]:
        vals = _as_list(header[key])
        if not all(isinstance(v, int) for v in vals):
            raise InputFileError(path, f"{key} = {header[key]!r} is not integer-valued", expected="integers")
        return vals

    def floats(key: str) -> list[float]:
        vals = _as_list(header[key])
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            raise InputFileError(path, f"{key} = {header[key]!r} is not numeric", expected="numbers")
        return [float(v) for v in vals]

    nd = _as_list(header["N_OF_DIM"])
    if len(nd) != 1 or not isinstance(nd[0], int) or nd[0] < 1:
        raise InputFileError(path, f"N_OF_DIM = {header['N_OF_DIM']!r}", expected="one positive integer")
    ndim = nd[0]
    n_p = ints("N_P")
    llimits = floats("LLIMITS")
    steps = floats("STEPS")
    for key, vals in (("N_P", n_p), ("LLIMITS", llimits), ("STEPS", steps)):
        if len(vals) != ndim:
            raise InputFileError(path, f"{key} has {len(vals)} value(s) but N_OF_DIM = {ndim}",
                                 expected=f"{ndim} values")
    if any(k < 1 for k in n_p):
        raise InputFileError(path, f"N_P = {n_p} has a non-positive count", expected="positive integers")
    for i, (k, st) in enumerate(zip(n_p, steps)):
        if k > 1 and (st == 0.0 or not np.isfinite(st)):
            raise InputFileError(path, f"STEPS({i + 1}) = {st} for an axis of {k} nodes",
                                 expected="a finite non-zero step")
    if not all(np.isfinite(llimits)):
        raise InputFileError(path, f"LLIMITS = {llimits} is not finite", expected="finite numbers")
    npix_l = ints("NPIX")
    if len(npix_l) != 1 or npix_l[0] < 1:
        raise InputFileError(path, f"NPIX = {header['NPIX']!r}", expected="one positive integer")
    labels = []
    for i in range(1, ndim + 1):
        labels.append(labels_by_index.get(i, f"PAR{i}"))
    extra = sorted(j for j in labels_by_index if j > ndim or j < 1)
    if extra:
        raise InputFileError(path, f"LABEL({extra[0]}) given for a {ndim}-D grid", expected=f"LABEL(1..{ndim})")
    return labels, np.asarray(llimits), np.asarray(steps), tuple(n_p), npix_l[0]


def _wavelengths(header: dict[str, Any], npix: int, path: Path, require_wave: bool
                 ) -> tuple[NDArray[np.float64] | None, str]:
    if "WAVE" not in header:
        if require_wave:
            raise InputFileError(path, "FERRE header has no WAVE", expected="WAVE = start step")
        return None, "no WAVE in header"
    w = _as_list(header["WAVE"])
    if len(w) != 2 or not all(isinstance(v, (int, float)) for v in w):
        raise InputFileError(path, f"WAVE = {header['WAVE']!r}", expected="two numbers (start step)")
    logw = header.get("LOGW", 0)
    if logw not in (0, 1, 2):
        raise InputFileError(path, f"LOGW = {logw!r}", expected="0 (λ), 1 (log10 λ) or 2 (ln λ)")
    x = float(w[0]) + float(w[1]) * np.arange(npix, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        lam = {0: x, 1: 10.0**x, 2: np.exp(x)}[logw]
    if not np.all(np.isfinite(lam)) or np.any(lam <= 0) or (npix > 1 and not np.all(np.diff(lam) > 0)):
        raise InputFileError(path, f"WAVE = {w} with LOGW = {logw} gives non-finite, non-positive or "
                                   f"non-increasing wavelengths",
                             expected="positive increasing wavelengths in Å")
    note = {0: "linear λ", 1: "log10 λ", 2: "ln λ"}[logw]
    if "VACUUM" in header:
        vac = header["VACUUM"]
        if vac not in (0, 1):
            raise InputFileError(path, f"VACUUM = {vac!r}", expected="0 (air) or 1 (vacuum)")
        assumed = ""
    else:
        vac = 0
        assumed = " (VACUUM absent: air assumed)"
    if vac == 0:
        lam = air_to_vacuum(lam)
        note += ", air → vacuum" + assumed
    else:
        note += ", vacuum"
    return lam, note


def read_ferre_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The header of a FERRE file (``.dat``, ``.hdr`` or the ``.hdr`` beside a ``.unf``)."""
    path = Path(path)
    hdr_path = _sibling(path, ".hdr") if path.suffix.lower() == ".unf" else path
    if not hdr_path.is_file():
        raise InputFileError(hdr_path, "file not found", expected="a FERRE header file")
    with open(hdr_path, "rb") as fh:
        lines, _ = _read_header_block(fh, hdr_path)
    header, _ = _parse_header_lines(lines, hdr_path)
    return header


# --------------------------------------------------------------------------- read


def _sibling(path: Path, suffix: str) -> Path:
    """``path`` with another suffix, upper-case when the given suffix is upper-case."""
    return path.with_suffix(suffix.upper() if path.suffix.isupper() else suffix)


def _resolve_paths(path: Path) -> tuple[Path, Path | None]:
    """(header file, binary data file or None for ASCII)."""
    suf = path.suffix.lower()
    if suf in (".hdr", ".unf"):
        hdr = path if suf == ".hdr" else _sibling(path, ".hdr")
        unf = path if suf == ".unf" else _sibling(path, ".unf")
        if not path.is_file():
            raise InputFileError(path, "file not found", expected="a FERRE .hdr/.unf pair")
        if not hdr.is_file():
            raise InputFileError(hdr, f"FERRE header file missing (binary data {unf.name} found)",
                                 expected=f"{hdr.name} beside {unf.name}")
        if not unf.is_file():
            raise InputFileError(unf, f"FERRE binary data file missing (header {hdr.name} found)",
                                 expected=f"{unf.name} beside {hdr.name}")
        return hdr, unf
    if not path.is_file():
        raise InputFileError(path, "file not found", expected="a FERRE grid (.dat, or .hdr + .unf)")
    return path, None


def _read_ascii_data(fh, path: Path, start: int, n_expected: int, npix: int) -> NDArray[np.float32]:  # noqa: ANN001
    """All numbers after the header as one flat stream (models may wrap across lines)."""
    fh.seek(start)
    try:
        with warnings.catch_warnings():  # older numpy warns instead of raising on a bad token
            warnings.simplefilter("error", DeprecationWarning)
            data = np.fromfile(fh, dtype=np.float64, sep=" ")
    except (DeprecationWarning, ValueError):
        # Fortran D exponents, or a bad token to report
        fh.seek(start)
        raw = fh.read()
        tokens = raw.replace(b"D", b"E").replace(b"d", b"e").split()
        try:
            data = np.array(tokens, dtype=np.float64)
        except ValueError:
            for i, tok in enumerate(tokens):  # find the first offender to name it
                try:
                    float(tok)
                except ValueError:
                    shown = raw.split()[i][:40].decode("latin-1")
                    raise InputFileError(path, f"non-numeric value {shown!r} in the data at value {i} "
                                               f"(model {i // npix}, pixel {i % npix})",
                                         expected="whitespace-separated numbers after the header") from None
            raise
    return _check_count(data, n_expected, npix, path).astype(np.float32)


def _check_count(data: NDArray[Any], n_expected: int, npix: int, path: Path) -> NDArray[Any]:
    if data.size != n_expected:
        what = "truncated" if data.size < n_expected else "has extra values"
        raise InputFileError(path, f"data {what}: found {data.size} values ({data.size / npix:g} models)",
                             expected=f"{n_expected} values (Π N_P = {n_expected // npix} models × NPIX = {npix})")
    return data


def read_ferre(path: str | os.PathLike[str], *, require_wave: bool = True, mmap: bool = False,
               byteorder: str = "=") -> FerreGrid:
    """Read a FERRE grid.

    Parameters
    ----------
    path
        ``.dat`` (ASCII: header + data), ``.hdr`` (with ``.unf`` beside it) or ``.unf``
        (with ``.hdr`` beside it). Any other suffix is read as ASCII.
    require_wave
        Refuse a header without WAVE (default); when False such a grid gets ``wave=None``.
    mmap
        Memory-map a binary ``.unf`` instead of reading it (for grids larger than memory).
    byteorder
        Byte order of ``.unf`` ('=' native as FERRE writes it, '<' or '>').
    """
    path = Path(path)
    hdr_path, unf_path = _resolve_paths(path)
    with open(hdr_path, "rb") as fh:
        lines, data_start = _read_header_block(fh, hdr_path)
        header, labels_by_index = _parse_header_lines(lines, hdr_path)
        labels, llimits, steps, n_p, npix = _validate(header, labels_by_index, hdr_path)
        wave, note = _wavelengths(header, npix, hdr_path, require_wave)
        n_models = int(np.prod(n_p))
        n_expected = n_models * npix
        if unf_path is None:
            flat = _read_ascii_data(fh, hdr_path, data_start, n_expected, npix)
    if unf_path is not None:
        size = unf_path.stat().st_size
        if size != 4 * n_expected:
            found = size / 4
            what = "truncated" if size < 4 * n_expected else "longer than the header says"
            raise InputFileError(unf_path, f"binary data {what}: {size} bytes = {found:g} float32 values "
                                           f"({found / npix:g} models)",
                                 expected=f"{n_expected} float32 values (Π N_P = {n_models} models × NPIX = {npix}) "
                                          f"= {4 * n_expected} bytes, per {hdr_path.name}")
        dtype = np.dtype(np.float32).newbyteorder(byteorder)
        if mmap:
            flat = np.memmap(unf_path, dtype=dtype, mode="r", shape=(n_expected,))
        else:
            flat = np.fromfile(unf_path, dtype=dtype, count=n_expected)
        if dtype.byteorder not in ("=", "|") and dtype != np.dtype(np.float32):
            flat = flat.astype(np.float32)
        _check_byteorder(flat, unf_path, npix)
    flux = flat.reshape(n_p + (npix,))
    return FerreGrid(labels=labels, llimits=llimits, steps=steps, n_p=n_p, wave=wave, flux=flux,
                     header=header, path=path, wave_note=note)


def _looks(sample: NDArray[np.float32]) -> tuple[float, float]:
    """(fraction non-finite, 10–90 percentile spread of log10|x| in dex) of a sample."""
    with np.errstate(all="ignore"):
        fin = np.isfinite(sample)
        nz = sample[fin & (sample != 0)]
        spread = float(np.subtract(*np.percentile(np.log10(np.abs(nz)), [90, 10]))) if nz.size > 1 else 0.0
    return 1.0 - float(fin.mean()), spread


def _check_byteorder(flat: NDArray[Any], path: Path, npix: int) -> None:
    """Refuse data that read as garbage in this byte order but look sane swapped.

    Byte-swapped float32 values are scattered over ~70 decades and include NaN/inf;
    spectra span a few decades at most.
    """
    sample = np.asarray(flat[: min(flat.size, 100 * npix)], dtype=np.float32)
    if sample.size < 2:
        return
    bad_frac, spread = _looks(sample)
    if bad_frac < 0.5 and spread < 8.0:
        return
    bad_sw, spread_sw = _looks(sample.byteswap())
    if bad_sw < 0.01 and spread_sw < 4.0:
        raise InputFileError(path, f"float32 data look byte-swapped (in this byte order their magnitudes span "
                                   f"{spread:.0f} decades, swapped {spread_sw:.1f})",
                             expected="native byte order; pass byteorder='<' or '>' to read another")


# --------------------------------------------------------------------------- write


def _fmt_value(v: Any) -> str:
    if isinstance(v, (list, tuple, np.ndarray)):
        return " ".join(_fmt_value(x) for x in v)
    if isinstance(v, (bool, np.bool_)):
        return str(int(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return repr(float(v))
    s = str(v).replace("'", "''")
    return f"'{s}'"


def write_ferre(path: str | os.PathLike[str], grid_or_parts: FerreGrid | Mapping[str, Any], *,
                binary: bool = False) -> Path:
    """Write a grid in FERRE format; returns the header path (``.dat`` or ``.hdr``).

    ``grid_or_parts`` is a :class:`FerreGrid` or a mapping with ``flux`` (shape
    ``n_p + (npix,)``), ``llimits``, ``steps``, optional ``labels`` and optional
    ``header`` (extra keys such as WAVE, LOGW, VACUUM, RESOLUTION, INVALID_CODE).
    N_OF_DIM, N_P, NPIX, LLIMITS, STEPS and LABEL(i) are always written from the data.
    With ``binary=True`` the header goes to ``<stem>.hdr`` and the data to ``<stem>.unf``
    (float32, native byte order); otherwise one ASCII file holds both, one model per line.
    """
    if isinstance(grid_or_parts, FerreGrid):
        g = grid_or_parts
        flux, llimits, steps, labels, extra = g.flux, g.llimits, g.steps, list(g.labels), dict(g.header)
    else:
        parts = dict(grid_or_parts)
        flux = parts["flux"]
        llimits, steps = parts["llimits"], parts["steps"]
        extra = dict(parts.get("header", {}))
        labels = list(parts.get("labels") or [])
    flux = np.asarray(flux, dtype=np.float32)
    n_p = flux.shape[:-1]
    ndim = len(n_p)
    llimits = np.atleast_1d(np.asarray(llimits, dtype=np.float64))
    steps = np.atleast_1d(np.asarray(steps, dtype=np.float64))
    if ndim < 1 or len(llimits) != ndim or len(steps) != ndim:
        raise ValueError(f"flux of shape {flux.shape} needs {ndim} LLIMITS and STEPS, "
                         f"got {len(llimits)} and {len(steps)}")
    if not labels:
        labels = [f"PAR{i + 1}" for i in range(ndim)]
    if len(labels) != ndim:
        raise ValueError(f"{len(labels)} labels for a {ndim}-D grid")
    head: dict[str, Any] = {}
    head["N_OF_DIM"] = ndim
    head["N_P"] = [int(k) for k in n_p]
    for i, name in enumerate(labels):
        head[f"LABEL({i + 1})"] = str(name)
    head["LLIMITS"] = [float(x) for x in llimits]
    head["STEPS"] = [float(x) for x in steps]
    head["NPIX"] = int(flux.shape[-1])
    skip = set(head) | {"N_OF_DIM", "N_P", "NPIX", "LLIMITS", "STEPS"}
    for k, v in extra.items():
        ku = k.strip().upper()
        if ku in skip or _LABEL_RE.match(ku):
            continue
        head[ku] = v
    text = " &SYNTH\n" + "".join(f" {k} = {_fmt_value(v)}\n" for k, v in head.items()) + " /\n"

    path = Path(path)
    if binary:
        stem = path.with_suffix("") if path.suffix.lower() in (".hdr", ".unf", ".dat") else path
        hdr = stem.with_name(stem.name + ".hdr")
        unf = stem.with_name(stem.name + ".unf")
        hdr.write_text(text)
        np.ascontiguousarray(flux, dtype=np.float32).tofile(unf)
        return hdr
    rows = flux.reshape(-1, flux.shape[-1])
    with open(path, "w") as fh:
        fh.write(text)
        np.savetxt(fh, rows, fmt="%.9g")
    return path


# --------------------------------------------------------------------------- interpolation


def _axis_stencil(t: NDArray[np.float64], n: int) -> tuple[NDArray[np.intp], NDArray[np.float64]]:
    """Indices (m, s) and weights (m, s) along one axis for positions t in node units [0, n-1].

    s = 4 (cubic Lagrange) when n ≥ 4, 2 (linear) when n is 2 or 3, 1 when n is 1.
    """
    m = t.shape[0]
    if n == 1:
        return np.zeros((m, 1), np.intp), np.ones((m, 1))
    # snap near-integer positions so that nodes are hit exactly
    r = np.rint(t)
    t = np.where(np.abs(t - r) < 1e-9, r, t)
    if n < 4:
        i0 = np.clip(np.floor(t), 0, n - 2).astype(np.intp)
        u = t - i0
        return np.stack([i0, i0 + 1], axis=1), np.stack([1.0 - u, u], axis=1)
    i = np.clip(np.floor(t), 0, n - 2).astype(np.intp)  # interval [i, i+1]
    i0 = np.clip(i - 1, 0, n - 4)
    u = t - i0  # in [0, 3]
    w = np.stack([
        -(u - 1.0) * (u - 2.0) * (u - 3.0) / 6.0,
        u * (u - 2.0) * (u - 3.0) / 2.0,
        -u * (u - 1.0) * (u - 3.0) / 2.0,
        u * (u - 1.0) * (u - 2.0) / 6.0,
    ], axis=1)
    return i0[:, None] + np.arange(4), w


def interpolate(grid: FerreGrid, labels: ArrayLike, *, clip: bool = False,
                chunk_bytes: int = 16 * 2**20) -> NDArray[np.float32]:
    """Models at arbitrary label points: separable cubic Lagrange interpolation.

    Parameters
    ----------
    grid
        The grid.
    labels
        ``(n, ndim)`` array (or one ``(ndim,)`` point) in the grid's label order.
    clip
        False (default): a point outside the grid's label range raises ValueError naming
        the label and the range. True: points are moved onto the range boundary first.
        The grid is never extrapolated.
    chunk_bytes
        Memory budget for the nodes gathered per chunk of points (16 MiB keeps them in
        cache-friendly blocks; larger is not faster).

    Returns
    -------
    ``(n, npix)`` float32 array, or ``(npix,)`` for a single point. Along axes with
    ≥ 4 nodes the 4 nodes around each point are used (one-sided at the edges), along
    axes with 2–3 nodes 2 (linear); the result is exact at nodes (bit for bit) and
    exact for any polynomial of degree ≤ 3 per axis up to float32 rounding (weights
    and sums are float32 like the grid: relative error ~1e-6). Pixels to which a node
    holding INVALID_CODE contributes with a non-zero weight are NaN.
    """
    x = np.asarray(labels, dtype=np.float64)
    single = x.ndim == 1
    x = np.atleast_2d(x)
    ndim = grid.ndim
    if x.shape[1] != ndim:
        raise ValueError(f"labels have {x.shape[1]} columns but the grid has {ndim} axes {grid.labels}")
    if not np.all(np.isfinite(x)):
        bad = np.argwhere(~np.isfinite(x))[0]
        raise ValueError(f"point {bad[0]} has a non-finite {grid.labels[bad[1]]}")
    lo, hi = grid.label_range
    tol = 1e-9 * np.maximum(1.0, np.abs(grid.steps))
    if not clip:
        for a in range(ndim):
            out = (x[:, a] < lo[a] - tol[a]) | (x[:, a] > hi[a] + tol[a])
            if out.any():
                k = int(np.flatnonzero(out)[0])
                raise ValueError(
                    f"{int(out.sum())} point(s) outside the grid in {grid.labels[a]}: point {k} has "
                    f"{grid.labels[a]} = {x[k, a]:g}, the grid covers [{lo[a]:g}, {hi[a]:g}]; "
                    f"FERRE grids are not extrapolated (pass clip=True to move points onto the edge)")
    x = np.clip(x, lo, hi)

    n = x.shape[0]
    idx_axes, w_axes = [], []
    for a in range(ndim):
        k = grid.n_p[a]
        t = (x[:, a] - grid.llimits[a]) / grid.steps[a] if k > 1 else np.zeros(n)
        t = np.clip(t, 0.0, k - 1.0)
        ii, ww = _axis_stencil(t, k)
        idx_axes.append(ii)
        w_axes.append(ww)

    # tensor-product stencil: flat node index and weight of every combination
    strides = np.array([int(np.prod(grid.n_p[a + 1:])) for a in range(ndim)], dtype=np.intp)
    flat_idx = np.zeros((n, 1), np.intp)
    weight = np.ones((n, 1))
    for a in range(ndim):
        flat_idx = (flat_idx[:, :, None] + idx_axes[a][:, None, :] * strides[a]).reshape(n, -1)
        weight = (weight[:, :, None] * w_axes[a][:, None, :]).reshape(n, -1)

    npix = grid.npix
    models = np.asarray(grid.flux).reshape(-1, npix)
    ncomb = flat_idx.shape[1]
    step = max(1, int(chunk_bytes // max(ncomb * npix * 4, 1)))
    code = grid.invalid_code
    bad_models = _invalid_rows(grid, code) if code is not None else None
    weight32 = weight.astype(np.float32)
    out = np.empty((n, npix), dtype=np.float32)
    for s in range(0, n, step):
        e = min(n, s + step)
        idx = flat_idx[s:e]
        w = weight32[s:e, None, :]
        gathered = models[idx.ravel()].reshape(idx.shape + (npix,))
        if bad_models is not None and bad_models[idx].any():
            inval = gathered == np.float32(code)
            gathered = np.where(inval, np.float32(0.0), gathered)
            used = (weight[s:e] != 0.0).astype(np.float32)[:, None, :]
            poison = np.matmul(used, inval.astype(np.float32))[:, 0, :] > 0
            res = np.matmul(w, gathered)[:, 0, :]
            res[poison] = np.nan
        else:
            res = np.matmul(w, gathered)[:, 0, :]
        out[s:e] = res
    return out[0] if single else out


def _invalid_rows(grid: FerreGrid, code: float) -> NDArray[np.bool_]:
    """Boolean per model (flat index): does it hold INVALID_CODE anywhere? Cached on the grid."""
    key = (code, id(grid.flux))
    cache = getattr(grid, "_invalid_rows_cache", None)
    if cache is not None and cache[0] == key:
        return cache[1]
    models = np.asarray(grid.flux).reshape(-1, grid.npix)
    rows = np.zeros(models.shape[0], dtype=bool)
    step = max(1, (64 * 2**20) // (4 * grid.npix))
    for s in range(0, models.shape[0], step):
        rows[s:s + step] = (models[s:s + step] == np.float32(code)).any(axis=1)
    grid._invalid_rows_cache = (key, rows)  # type: ignore[attr-defined]
    return rows
