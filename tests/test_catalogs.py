"""LAMOST / SEGUE / Gaia DR3 readers and writers: layouts, formats, sentinels, blocks, errors."""

from __future__ import annotations

import gzip

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits

from mastar_vac.errors import InputFileError
from mastar_vac.io.catalogs import (
    STANDARD_COLUMNS,
    dask_external,
    detect_format,
    iter_gaia_dr3_blocks,
    iter_lamost_blocks,
    iter_segue_blocks,
    read_external,
    read_gaia_dr3,
    read_lamost,
    read_segue,
    write_gaia_dr3,
    write_lamost,
    write_segue,
)
from mastar_vac.io.fitstable import FitsWriter

N = 41


def _std(n: int = N, seed: int = 3) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({
        "ext_id": [str(700000000 + 17 * i) for i in range(n)],
        "RA": rng.uniform(0, 360, n), "DEC": rng.uniform(-20, 70, n),
        "TEFF": rng.uniform(3800, 8000, n), "TEFF_ERR": rng.uniform(20, 150, n),
        "LOGG": rng.uniform(0.5, 5, n), "LOGG_ERR": rng.uniform(0.02, 0.3, n),
        "FEH": rng.uniform(-2.5, 0.5, n), "FEH_ERR": rng.uniform(0.02, 0.2, n),
        "ALPHA": rng.uniform(-0.1, 0.4, n), "ALPHA_ERR": rng.uniform(0.01, 0.1, n),
        "SNR": rng.uniform(10, 300, n),
    })
    df.loc[[i for i in (2, 9) if i < n], "TEFF"] = np.nan  # written as -9999, must come back NaN
    df.loc[[i for i in (5,) if i < n], "ALPHA"] = np.nan
    return df


def _close(got: pd.Series, want: pd.Series, rtol: float = 1e-6) -> None:
    np.testing.assert_allclose(got.to_numpy(dtype=float), want.to_numpy(dtype=float), rtol=rtol, atol=0,
                               equal_nan=True)


def _check_labels(got: pd.DataFrame, want: pd.DataFrame, cols=("TEFF", "TEFF_ERR", "LOGG", "LOGG_ERR", "FEH",
                                                                 "FEH_ERR", "SNR")) -> None:
    assert list(got["ext_id"]) == list(want["ext_id"])
    _close(got["RA"], want["RA"], 1e-12)
    _close(got["DEC"], want["DEC"], 1e-12)
    for c in cols:
        _close(got[c], want[c], 1e-6)  # float32 in the survey files


# -- LAMOST ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["dr10_v2.0_LRS_stellar.fits", "dr10_v2.0_LRS_stellar.fits.gz",
                                  "lamost.csv", "lamost.csv.gz"])
def test_lamost_round_trip(tmp_path, name):
    want = _std()
    want["GAIA_SOURCE_ID"] = pd.array([3000000000000000000 + i if i % 3 else None for i in range(N)], dtype="Int64")
    p = write_lamost(tmp_path / name, want)
    got = read_lamost(p, rows=10)
    assert list(got.columns[:len(STANDARD_COLUMNS)]) == list(STANDARD_COLUMNS)
    assert set(got.columns) >= {"SNRR", "GAIA_SOURCE_ID", "FEH_KIND"}
    assert (got["survey"] == "LAMOST").all() and (got["FEH_KIND"] == "FE_H").all()
    _check_labels(got, want, cols=("TEFF", "TEFF_ERR", "LOGG", "FEH", "ALPHA", "ALPHA_ERR", "SNR"))
    assert got["TEFF"].isna().sum() == 2 and np.isnan(got.loc[5, "ALPHA"])
    assert got["GAIA_SOURCE_ID"].dtype == "Int64"
    assert got["GAIA_SOURCE_ID"].isna().sum() == want["GAIA_SOURCE_ID"].isna().sum()
    assert got["GAIA_SOURCE_ID"].dropna().tolist() == want["GAIA_SOURCE_ID"].dropna().tolist()  # exact int64


def test_lamost_file_is_in_the_survey_layout(tmp_path):
    p = write_lamost(tmp_path / "l.fits", _std())
    with fits.open(p) as h:
        h.verify("exception")
        cols = h[1].columns
        assert {"obsid", "ra", "dec", "teff", "teff_err", "logg", "feh", "alpha_m", "snrg", "snrr",
                "gaia_source_id"} <= set(cols.names)
        assert cols["obsid"].format == "K" and cols["teff"].format == "E" and cols["ra"].format == "D"
        teff = h[1].data["teff"]
        assert (teff[[2, 9]] == -9999).all()  # LAMOST's own missing value


def test_lamost_upper_case_columns_and_sentinels(tmp_path):
    p = tmp_path / "upper.fits"
    with FitsWriter(p) as w:
        w.add_table({
            "OBSID": np.array([1, 2, 3], np.int64),
            "RA": np.array([10.0, 11.0, 12.0]), "DEC": np.array([1.0, 2.0, 3.0]),
            "TEFF": np.array([5000, -9999, 9999], np.float32),  # 9999 K is a real Teff
            "LOGG": np.array([4.5, -999, 99.99], np.float32),
            "FEH": np.array([-0.3, 0.1, -9999], np.float32),
            "FEH_ERR": np.array([0.1, -1.0, 0.2], np.float32),
            "SNRG": np.array([-9999, 30, 40], np.float32),
        }, extname="LRS")
    got = read_lamost(p)
    _close(got["TEFF"], pd.Series([5000, np.nan, 9999]))
    _close(got["LOGG"], pd.Series([4.5, np.nan, np.nan]))
    _close(got["FEH"], pd.Series([-0.3, 0.1, np.nan]), 1e-6)
    _close(got["FEH_ERR"], pd.Series([0.1, np.nan, 0.2]), 1e-6)
    _close(got["SNR"], pd.Series([np.nan, 30, 40]))
    assert got["ALPHA"].isna().all() and got["GAIA_SOURCE_ID"].isna().all()  # absent → missing
    assert list(got["ext_id"]) == ["1", "2", "3"]


def test_lamost_mstar_variant_reads_m_h(tmp_path):
    want = _std(8)
    p = write_lamost(tmp_path / "dr10_v2.0_LRS_mstellar.fits", want, mstar=True)
    with fits.open(p) as h:
        assert "m_h" in h[1].columns.names and "feh" not in h[1].columns.names
    got = read_lamost(p)
    _close(got["FEH"], want["FEH"], 1e-6)
    assert (got["FEH_KIND"] == "M_H").all() and got["ALPHA"].isna().all()


def test_lamost_missing_column_names_file_and_variants(tmp_path):
    p = tmp_path / "bad.csv"
    pd.DataFrame({"obsid": [1], "ra": [1.0], "dec": [2.0], "teff": [5000.0], "logg": [4.0]}).to_csv(p, index=False)
    with pytest.raises(InputFileError) as e:
        read_lamost(p)
    msg = str(e.value)
    assert str(p) in msg and "feh" in msg and "m_h" in msg and "case-insensitive" in msg


def test_lamost_blocks_bound_the_rows(tmp_path):
    want = _std(100)
    p = write_lamost(tmp_path / "l.fits", want)
    blocks = list(iter_lamost_blocks(p, rows=37))
    assert [len(b) for b in blocks] == [37, 37, 26]
    _check_labels(pd.concat(blocks, ignore_index=True), want)


def test_lamost_pipe_separated_csv_with_comment_header(tmp_path):
    p = tmp_path / "lamost.txt"
    p.write_text("# LAMOST DR10 export\n# columns below\nobsid|ra|dec|teff|logg|feh\n"
                 "101|10.5|-3.25|5100|4.4|-0.2\n102|11.5|-4.25|-9999|-9999|-9999\n")
    got = read_lamost(p)
    assert list(got["ext_id"]) == ["101", "102"]
    _close(got["DEC"], pd.Series([-3.25, -4.25]))
    assert got.loc[1, ["TEFF", "LOGG", "FEH"]].isna().all()


# -- SEGUE -------------------------------------------------------------------

def _segue(n: int = N) -> pd.DataFrame:
    df = _std(n, seed=5)
    df["ext_id"] = [str(18446744073709551000 - 1000 * i) for i in range(n)]  # numeric(20), beyond int64
    df["PLATE"] = 2000 + np.arange(n) % 7
    df["MJD"] = 54000 + np.arange(n) % 11
    df["FIBER"] = 1 + np.arange(n) * 3 % 640
    df["FLAG"] = ["nnnn" if i % 4 else "nDnn" for i in range(n)]
    return df


def test_segue_sas_round_trip_and_layout(tmp_path):
    want = _segue()
    p = write_segue(tmp_path / "ssppOut-dr12.fits", want)
    with fits.open(p) as h:
        names = h[1].columns.names
        assert {"SPECOBJID", "TEFF_ADOP", "TEFF_ADOP_UNC", "LOGG_ADOP", "FEH_ADOP_UNC", "AFE", "AFE_UNC",
                "RA", "DEC", "PLATE", "MJD", "FIBER", "FLAG", "SNR"} <= set(names)
        assert h[1].columns["SPECOBJID"].format.endswith("A")  # char[22], not an integer
    got = read_segue(p, rows=9)
    _check_labels(got, want)
    _close(got["ALPHA"], want["ALPHA"], 1e-6)
    assert list(got["FLAG"]) == list(want["FLAG"])
    assert got["PLATE"].tolist() == want["PLATE"].tolist() and got["FIBER"].tolist() == want["FIBER"].tolist()


@pytest.mark.parametrize("name", ["sppParams.csv", "sppParams.fits"])
def test_segue_cas_with_positions(tmp_path, name):
    want = _segue()
    p = write_segue(tmp_path / name, want, flavour="cas")
    got = read_segue(p)
    _check_labels(got, want)  # ext_id exact: read as text, never through int64/float
    assert got["ALPHA"].isna().all()  # sppParams has no [alpha/Fe]


def test_segue_cas_without_positions_says_what_to_join(tmp_path):
    p = write_segue(tmp_path / "sppParams.csv", _segue(5), flavour="cas", positions=False)
    with pytest.raises(InputFileError) as e:
        read_segue(p)
    msg = str(e.value)
    assert str(p) in msg and "RA" in msg and "SpecObjAll" in msg and "positions" in msg


def test_segue_lower_case_cas_export_and_plate_mjd_fiber_id(tmp_path):
    p = tmp_path / "casjobs.csv"
    pd.DataFrame({"plate": [266, 266], "mjd": [51630, 51630], "fiberid": [7, 12], "ra": [145.1, 145.2],
                  "dec": [0.1, 0.2], "teffadop": [5800.0, -9999.0], "teffadopunc": [90.0, -9999.0],
                  "loggadop": [4.1, -9999.0], "fehadop": [-1.2, -9999.0], "snr": [25.0, 3.0]}).to_csv(p, index=False)
    got = read_segue(p)
    assert list(got["ext_id"]) == ["0266-51630-0007", "0266-51630-0012"]
    assert np.isnan(got.loc[1, "TEFF"]) and np.isnan(got.loc[1, "TEFF_ERR"])


def test_segue_blocks(tmp_path):
    want = _segue(50)
    p = write_segue(tmp_path / "ssppOut.fits.gz", want)
    blocks = list(iter_segue_blocks(p, rows=16))
    assert [len(b) for b in blocks] == [16, 16, 16, 2]
    _check_labels(pd.concat(blocks, ignore_index=True), want)


# -- Gaia DR3 ----------------------------------------------------------------

def _gaia(n: int = N) -> pd.DataFrame:
    rng = np.random.default_rng(11)
    df = pd.DataFrame({
        "SOURCE_ID": (4295806720000000000 + np.arange(n) * 98765431).astype(np.int64),
        "RA": rng.uniform(0, 360, n), "DEC": rng.uniform(-20, 70, n),
        "PARALLAX": rng.uniform(-0.5, 10, n), "PARALLAX_ERROR": rng.uniform(0.01, 0.5, n),
        "G": rng.uniform(8, 18, n), "BP_RP": rng.uniform(-0.2, 3, n), "RUWE": rng.uniform(0.8, 2, n),
        "TEFF": rng.uniform(4000, 9000, n), "TEFF_ERR": rng.uniform(10, 200, n),
        "LOGG": rng.uniform(1, 5, n), "FEH": rng.uniform(-2, 0.4, n),
    })
    df.loc[[i for i in (1, 4) if i < n], ["TEFF", "TEFF_ERR", "LOGG", "FEH"]] = np.nan  # no GSP-Phot
    df.loc[[i for i in (3,) if i < n], "G"] = np.nan
    return df


@pytest.mark.parametrize("name", ["gaia.fits", "gaia.fits.gz", "gaia.csv", "gaia.parquet"])
def test_gaia_round_trip(tmp_path, name):
    want = _gaia()
    p = write_gaia_dr3(tmp_path / name, want)
    got = read_gaia_dr3(p, rows=13)
    assert got["SOURCE_ID"].tolist() == want["SOURCE_ID"].tolist()  # exact 19-digit ids
    assert list(got["ext_id"]) == [str(x) for x in want["SOURCE_ID"]]
    for c in ("RA", "DEC", "PARALLAX"):
        _close(got[c], want[c], 1e-12)
    for c in ("PARALLAX_ERROR", "G", "BP_RP", "RUWE", "TEFF", "LOGG", "FEH"):
        _close(got[c], want[c], 1e-6)
    _close(got["TEFF_ERR"], want["TEFF_ERR"], 1e-4)  # from the lower/upper percentiles
    assert got["ALPHA"].isna().all() and got["SNR"].isna().all()
    assert (got["survey"] == "GAIA").all()


def test_gaia_archive_csv_with_nulls_and_ecsv_header(tmp_path):
    p = tmp_path / "gaia-result.csv"
    p.write_text("# %ECSV 1.0\n# ---\nsource_id,ra,dec,parallax,parallax_error,phot_g_mean_mag,"
                 "phot_bp_mean_mag,phot_rp_mean_mag,ruwe\n"
                 "5853498713190525696,217.39,-62.67,768.07,0.05,8.98,11.3,7.5,1.1\n"
                 "5853498713190525697,217.40,-62.68,,,12.5,,,\n")
    got = read_gaia_dr3(p)
    assert got["SOURCE_ID"].tolist() == [5853498713190525696, 5853498713190525697]
    _close(got["BP_RP"], pd.Series([11.3 - 7.5, np.nan]), 1e-9)  # derived when bp_rp is absent
    assert np.isnan(got.loc[1, "PARALLAX"]) and got["TEFF"].isna().all()


def test_gaia_parquet_blocks_and_directory(tmp_path):
    want = _gaia(60)
    d = tmp_path / "gaia_parts"
    d.mkdir()
    write_gaia_dr3(d / "part-0.parquet", want.iloc[:25])
    write_gaia_dr3(d / "part-1.parquet", want.iloc[25:])
    blocks = list(iter_gaia_dr3_blocks(d, rows=10))
    assert max(len(b) for b in blocks) <= 10
    got = pd.concat(blocks, ignore_index=True).sort_values("SOURCE_ID").reset_index(drop=True)
    assert got["SOURCE_ID"].tolist() == sorted(want["SOURCE_ID"].tolist())


# -- formats and the Dask path -------------------------------------------------

def test_detect_format(tmp_path):
    fits_noext = tmp_path / "table"
    write_gaia_dr3(tmp_path / "g.fits", _gaia(3))
    fits_noext.write_bytes((tmp_path / "g.fits").read_bytes())
    gz_noext = tmp_path / "table2"
    gz_noext.write_bytes(gzip.compress((tmp_path / "g.fits").read_bytes()))
    csv_noext = tmp_path / "table3"
    csv_noext.write_text("source_id,ra,dec\n1,2,3\n")
    assert detect_format(fits_noext) == "fits"
    assert detect_format(gz_noext) == "fits"
    assert detect_format(csv_noext) == "csv"
    assert detect_format(write_gaia_dr3(tmp_path / "g.pq", _gaia(3))) == "parquet"
    assert read_gaia_dr3(gz_noext)["SOURCE_ID"].tolist() == _gaia(3)["SOURCE_ID"].tolist()
    with pytest.raises(InputFileError, match="not found"):
        read_gaia_dr3(tmp_path / "nope.fits")
    with pytest.raises(ValueError, match="unknown survey"):
        read_external(tmp_path / "g.fits", "APOGEE")


@pytest.mark.parametrize("name", ["l.fits", "l.csv"])
def test_dask_external_matches_the_reader(tmp_path, name):
    want = _std(90)
    p = write_lamost(tmp_path / name, want)
    ddf = dask_external(p, "LAMOST", rows=37)
    if name.endswith(".fits"):
        assert ddf.npartitions == 3
    got = ddf.compute().reset_index(drop=True)
    ref = read_lamost(p)
    assert list(got.columns) == list(ref.columns)
    _check_labels(got, ref)
