"""mastar_vac: stellar parameters for the MaStar stellar library (SDSS-IV DR17).

Payne-style emulator trained on a semi-empirical reference set, χ² fits of every
visit on Dask, and the value-added catalogue as FITS and Parquet (Imig et al. 2022).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mastar_vac")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
