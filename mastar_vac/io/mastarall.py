"""The summary file ``mastarall-v3_1_1-v1_7_7.fits`` (datamodels.md §1.3–§1.4).

HDU1 = GOODSTARS (one row per star), HDU2 = GOODVISITS (one row per good visit). The
HDUs are found by EXTNAME, falling back to their position.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputFileError
from .fitstable import FitsWriter, list_hdus
from .layouts import GOODSTARS, GOODVISITS, Layout, read_catalog
from .tables import to_frame

__all__ = ["read_goodstars", "read_goodvisits", "write_mastarall"]


def _hdu_for(path: Path, extname: str, position: int) -> int:
    hdus = list_hdus(path)
    for index, name, _ in hdus:
        if name == extname:
            return index
    if len(hdus) > position:
        return position
    raise InputFileError(path, f"has no {extname} HDU", expected=f"EXTNAME {extname} or HDU {position}")


def _read(path: str | os.PathLike[str], layout: Layout, position: int) -> pd.DataFrame:
    path = Path(path)
    cols = read_catalog(path, layout, hdu=_hdu_for(path, layout.extname, position))
    return to_frame(cols)


def read_goodstars(path: str | os.PathLike[str]) -> pd.DataFrame:
    """GOODSTARS as a DataFrame (PSFMAG → PSFMAG_0..4; MANGAID stripped)."""
    return _read(path, GOODSTARS, 1)


def read_goodvisits(path: str | os.PathLike[str]) -> pd.DataFrame:
    """GOODVISITS as a DataFrame, keyed by (MANGAID, PLATE, IFUDESIGN, MJD)."""
    df = _read(path, GOODVISITS, 2)
    key = ["MANGAID", "PLATE", "IFUDESIGN", "MJD"]
    dup = df.duplicated(key)
    if dup.any():
        i = int(np.flatnonzero(dup.to_numpy())[0])
        raise InputFileError(path, "duplicate visit key", hdu="GOODVISITS", row=i,
                             column="MANGAID,PLATE,IFUDESIGN,MJD", expected="unique visits")
    return df


def write_mastarall(path: str | os.PathLike[str], goodstars: Mapping[str, np.ndarray],
                    goodvisits: Mapping[str, np.ndarray], *, header: Mapping[str, object] | None = None) -> Path:
    """Write GOODSTARS and GOODVISITS in the DR17 layout (absent columns filled)."""
    with FitsWriter(path, primary_header=header) as w:
        for layout, data in ((GOODSTARS, goodstars), (GOODVISITS, goodvisits)):
            n = len(data["MANGAID"])
            w.add_table(layout.fill(data, n), extname=layout.extname, units=layout.units,
                        descriptions=layout.descriptions)
    return Path(path)
