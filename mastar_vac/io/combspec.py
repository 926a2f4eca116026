"""LSF-homogenised per-star spectra ``mastar-combspec-v3_1_1-v1_7_7-lsfpercentP.fits(.gz)``.

Datamodels.md §1.11: one row per star with MANGAID, WAVE, FLUX, IVAR, MASK (column list
beyond these unconfirmed). Read with the same block reader as goodspec; the visit-key
columns PLATE/IFUDESIGN/MJD do not exist here and come back as -1/''/-1.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .goodspec import SpectraReader, _write_spectra
from .layouts import COMBSPEC

__all__ = ["CombspecReader", "read_combspec", "write_combspec"]


class CombspecReader(SpectraReader):
    layout = COMBSPEC


def read_combspec(path: str | os.PathLike[str], **kwargs: object) -> CombspecReader:
    return CombspecReader(path, **kwargs)  # type: ignore[arg-type]


def write_combspec(path: str | os.PathLike[str], columns: Mapping[str, np.ndarray], **kwargs: object) -> Path:
    return _write_spectra(path, COMBSPEC, columns, **kwargs)  # type: ignore[arg-type]
