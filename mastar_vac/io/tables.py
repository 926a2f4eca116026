"""Small helpers shared by the catalogue readers: arrays → DataFrame, sentinels → NaN."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import pandas as pd

__all__ = ["to_frame", "sentinel_to_nan"]

# Fill values used for "no measurement" across SDSS/APOGEE/SSPP files (datamodels.md
# leaves the exact sentinel unconfirmed: -999, -9999 and 99999-style values all occur).
SENTINELS = (-999.0, -9999.0, -99999.0, 99999.0, 9999.0)


def sentinel_to_nan(values: np.ndarray, sentinels: Iterable[float] = SENTINELS) -> np.ndarray:
    """Float copy of ``values`` with sentinel values and ±inf replaced by NaN."""
    v = np.array(values, dtype=np.float64)
    bad = ~np.isfinite(v)
    for s in sentinels:
        bad |= v == s
    v[bad] = np.nan
    return v


def to_frame(columns: Mapping[str, np.ndarray], *, nan_sentinels: Iterable[str] = ()) -> pd.DataFrame:
    """A DataFrame of 1-D columns; a vector column X of width k becomes X_0 … X_{k-1}.

    Columns named in ``nan_sentinels`` get their sentinel values replaced by NaN.
    """
    out: dict[str, np.ndarray] = {}
    nan_set = set(nan_sentinels)
    for name, v in columns.items():
        v = np.asarray(v)
        if v.ndim == 1:
            out[name] = sentinel_to_nan(v) if name in nan_set else v
        else:
            flat = v.reshape(len(v), -1)
            for i in range(flat.shape[1]):
                out[f"{name}_{i}"] = sentinel_to_nan(flat[:, i]) if name in nan_set else flat[:, i]
    return pd.DataFrame(out)
