"""The MaStar Gaia EDR3 crossmatch VAC
``mastarall-gaiaedr3-extcorr-simbad-ps1-v3_1_1-v1_7_7-v1.fits`` (datamodels.md §1.10).

One row per good star: Gaia EDR3 astrometry and photometry, distances, the 3D-dust
E(B−V), and the dereddened colour BPRPC and absolute magnitude M_G that the fit uses
for its photometric start. −999 marks missing values; they come back as NaN.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from .fitstable import FitsWriter
from .layouts import GAIA_XMATCH, read_catalog
from .tables import to_frame

__all__ = ["read_gaia_xmatch", "write_gaia_xmatch"]

_FLOATS = [c.name for c in GAIA_XMATCH.columns if c.dtype.startswith("f")]


def read_gaia_xmatch(path: str | os.PathLike[str]) -> pd.DataFrame:
    """The crossmatch VAC as a DataFrame with sentinels → NaN and SOURCE_ID ≤ 0 → missing."""
    cols = read_catalog(path, GAIA_XMATCH, hdu=1)
    df = to_frame(cols, nan_sentinels=_FLOATS)
    if "SOURCE_ID" in df:
        sid = df["SOURCE_ID"].astype("int64")
        df["SOURCE_ID"] = sid.where(sid > 0).astype("Int64")  # no Gaia match → <NA>
    return df


def write_gaia_xmatch(path: str | os.PathLike[str], columns: Mapping[str, np.ndarray]) -> Path:
    n = len(columns["MANGAID"])
    with FitsWriter(path) as w:
        w.add_table(GAIA_XMATCH.fill(columns, n), extname=GAIA_XMATCH.extname, units=GAIA_XMATCH.units,
                    descriptions=GAIA_XMATCH.descriptions)
    return Path(path)
