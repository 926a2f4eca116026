"""Photometric starting points from Gaia colours and magnitudes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mastar_vac.isochrones import gaia_photometry
from mastar_vac.starts import A_G_PER_EBV, E_BPRP_PER_EBV, dereddened_cmd, photometric_starts


def test_dereddened_cmd_prefers_the_vac_and_falls_back_to_magnitudes():
    g = pd.DataFrame({
        "MANGAID": ["a", "b", "c"],
        "BPRPC": [0.8, -999.0, -999.0], "M_G": [4.6, -999.0, -999.0],
        "PHOT_G_MEAN_MAG": [10.0, 12.0, 12.0], "BP_RP": [0.9, 1.0, 1.0],
        "PARALLAX": [10.0, 10.0, -999.0], "PARALLAX_ERROR": [0.1, 0.1, -999.0],
        "EBV": [0.1, 0.1, -999.0], "R_MED_GEO": [100.0, 100.0, -999.0],
    })
    c, m = dereddened_cmd(g)
    assert c[0] == 0.8 and m[0] == 4.6
    assert c[1] == pytest.approx(1.0 - E_BPRP_PER_EBV * 0.1)
    assert m[1] == pytest.approx(12.0 - 5.0 - A_G_PER_EBV * 0.1)
    assert np.isnan(c[2]) and np.isnan(m[2])


def test_sun_like_star_starts_near_the_sun():
    bprp, mg = gaia_photometry(5772.0, 4.44, 0.0, 4.74)
    gaia = pd.DataFrame({"MANGAID": ["sun", "nophot"], "BPRPC": [float(bprp), -999.0], "M_G": [float(mg), -999.0]})
    starts = photometric_starts(gaia, ["sun", "sun", "nophot", "unknown"],
                                ["TEFF", "LOGG", "FE_H", "ALPHA_FE"])
    assert starts[0, 0] == pytest.approx(5772, abs=200) and starts[0, 1] == pytest.approx(4.44, abs=0.25)
    np.testing.assert_array_equal(starts[0], starts[1])  # visits of one star share its start
    assert starts[0, 3] == 0.0
    assert np.isnan(starts[2]).all() and np.isnan(starts[3]).all()


def test_star_far_from_every_isochrone_gets_no_start():
    gaia = pd.DataFrame({"MANGAID": ["odd"], "BPRPC": [0.2], "M_G": [12.0]})  # a white dwarf
    assert np.isnan(photometric_starts(gaia, ["odd"], ["TEFF", "LOGG", "FE_H"])).all()
