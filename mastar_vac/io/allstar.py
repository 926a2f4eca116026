"""APOGEE DR17 ``allStar-dr17-synspec_rev1.fits`` (datamodels.md §2).

Only the columns the reference set needs are read; the 3 GB file is streamed in row
blocks. Missing parameters may be NaN or −9999 in DR17 (unconfirmed): both become NaN.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputFileError
from .fitstable import BinTableReader, FitsWriter
from .layouts import ALLSTAR, NUMERIC, check_column_kind, resolve_column
from .tables import sentinel_to_nan

__all__ = ["read_allstar", "write_allstar", "DEFAULT_ALLSTAR_COLUMNS"]

DEFAULT_ALLSTAR_COLUMNS = (
    "APOGEE_ID", "TELESCOPE", "RA", "DEC", "SNR", "VSCATTER",
    "TEFF", "TEFF_ERR", "LOGG", "LOGG_ERR", "M_H", "ALPHA_M", "ALPHA_M_ERR", "FE_H", "FE_H_ERR", "VMICRO",
    "ASPCAPFLAG", "STARFLAG", "EXTRATARG", "GAIAEDR3_SOURCE_ID",
)


_STRING_COLUMNS = {"APOGEE_ID", "TELESCOPE", "FIELD", "SURVEY", "ASPCAPFLAGS", "STARFLAGS"}


def read_allstar(path: str | os.PathLike[str], columns: Sequence[str] = DEFAULT_ALLSTAR_COLUMNS, *,
                 optional: Sequence[str] = (), hdu: int | str = 1, rows_per_block: int = 20000) -> pd.DataFrame:
    """The named allStar columns as a DataFrame (float sentinels → NaN).

    Columns of ALLSTAR.required must exist; any other requested column that the file
    lacks is an error too, naming it (a label the user asked for cannot be skipped).
    Columns in ``optional`` are read when the file has them and left out otherwise.
    """
    path = Path(path)
    with BinTableReader(path, hdu) as r:
        for req in ALLSTAR.required:
            resolve_column(r, req)
        columns = list(dict.fromkeys([*columns, *(c for c in optional if c in r.names)]))
        missing = [c for c in columns if c not in r.names]
        if missing:
            raise InputFileError(path, "requested column(s) missing", hdu=hdu, column=",".join(missing),
                                 expected="the allStar DR17 layout")
        for c in columns:
            if r.column(c).shape:
                raise InputFileError(path, "is a vector column; name a scalar column", hdu=hdu, column=c)
            check_column_kind(r, c, "A" if c in _STRING_COLUMNS else NUMERIC)
        parts = [cols for _, cols in r.iter_blocks(rows_per_block, columns=list(columns))]
    data = {c: (np.concatenate([p[c] for p in parts]) if parts else np.array([])) for c in columns}
    out = {}
    for c, v in data.items():
        out[c] = sentinel_to_nan(v, (-9999.0, -999.0)) if v.dtype.kind == "f" else v
    return pd.DataFrame(out)


def write_allstar(path: str | os.PathLike[str], columns: Mapping[str, np.ndarray]) -> Path:
    n = len(columns["APOGEE_ID"])
    with FitsWriter(path) as w:
        w.add_table(ALLSTAR.fill(columns, n), extname="ALLSTAR", units=ALLSTAR.units)
    return Path(path)
