"""The VAC writers: FITS (SDSS layout, valid headers, provenance) and the Parquet dataset."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits

from mastar_vac import __version__
from mastar_vac.catalog import VAC_COLUMNS, VAC_KEY
from mastar_vac.io.vac import (
    VAC_EXTNAME,
    read_vac_fits,
    read_vac_fits_provenance,
    read_vac_parquet,
    vac_schema_metadata,
    write_vac_fits,
    write_vac_parquet,
)

FLAG_BITS = [
    (0, "CHI2_HIGH", "reduced chi-square above 100: the emulator cannot reproduce this spectrum, "
                     "so the labels are not to be trusted"),
    (1, "NOT_CONVERGED", "the fit did not converge"),
    (4, "AT_BOUND", "a label sits on its bound"),
]


def make_vac_frame(n: int = 40, *, seed: int = 0, fitted: tuple[str, ...] = ("TEFF", "LOGG", "FEH")) -> pd.DataFrame:
    """A plausible fitted catalogue: ``fitted`` label columns filled, the others absent."""
    rng = np.random.default_rng(seed)
    teff = np.exp(rng.uniform(np.log(3300), np.log(20000), n))
    data: dict[str, object] = {
        "MANGAID": [f"{rng.integers(1, 99)}-{1000 + i // 2}" for i in range(n)],
        "PLATE": (8000 + rng.integers(0, 4000, n)).astype(np.int64),
        "IFUDESIGN": [str(x) for x in rng.choice([3701, 3702, 12705, 1901], n)],
        "MJD": 57000 + rng.integers(0, 2000, n),
        "RA": rng.uniform(0, 360, n),
        "DEC": rng.uniform(-20, 70, n),
        "S2N": rng.uniform(5, 200, n),
        "TEFF": teff,
        "LOGG": rng.uniform(0.5, 5.0, n),
        "FEH": rng.normal(-0.3, 0.4, n),
        "ALPHA": rng.normal(0.1, 0.1, n),
        "VMICRO": rng.normal(0.2, 0.1, n),
        "CHISQ": 10 ** rng.normal(0.3, 0.5, n),
        "NPIX": rng.integers(3000, 4563, n),
        "N_ITER": rng.integers(5, 60, n),
        "FIT_STATUS": rng.integers(0, 2, n),
    }
    for stem in ("TEFF", "LOGG", "FEH", "ALPHA", "VMICRO"):
        if stem not in fitted:
            del data[stem]
            continue
        scale = 80.0 if stem == "TEFF" else 0.05
        data[f"{stem}_ERR"] = rng.uniform(0.5, 2.0, n) * scale
        data[f"{stem}_FORMAL_ERR"] = rng.uniform(0.1, 1.0, n) * scale
    df = pd.DataFrame(data)
    flag = np.where(df["CHISQ"] > 10, 1, 0) | np.where(df["FIT_STATUS"] == 1, 2, 0)
    df["FLAG"] = flag.astype(np.int32)
    df["VALID"] = (flag == 0).astype(np.int16)
    if n > 3:
        df.loc[2, ["TEFF", "LOGG", "FEH", "CHISQ"]] = np.nan  # an unfittable visit
        df.loc[2, "FIT_STATUS"] = 2
        df.loc[2, "VALID"] = 0
    df["EXTRA_NOT_IN_VAC"] = 1.0
    return df


PROVENANCE = {
    "config": {"run": {"name": "test", "seed": 7}, "fit": {"bounds": {"TEFF": [3000, 32000]}},
               "notes": "a long configuration string " * 20 + "with 'quotes' & ampersands, and unicode: α"},
    "emulator_hash": "0123456789abcdef0123456789abcdef",
    "inputs": ["/data/sdss/mastar-goodspec-v3_1_1-v1_7_7.fits.gz", "/data/sdss/mastarall-v3_1_1-v1_7_7.fits"],
    "seed": 7,
    "drpver": "v3_1_1",
    "a provenance key that is not a keyword": "kept as HISTORY",
}


def _strict_open(path: Path) -> fits.HDUList:
    """Open and verify with warnings as errors (a header astropy would 'fix' is not valid;
    a missing or wrong CHECKSUM/DATASUM warns, so it fails here too)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hdul = fits.open(path, checksum=True)
        hdul.verify("exception")
    for hdu in hdul:
        assert "CHECKSUM" in hdu.header and "DATASUM" in hdu.header, hdu.name
    return hdul


def assert_same_values(got: pd.DataFrame, want: pd.DataFrame, columns: list[str] | None = None) -> None:
    """Equal values column by column (NaN equal to NaN; floats compared at the VAC precision)."""
    columns = columns or [c.name for c in VAC_COLUMNS]
    assert len(got) == len(want)
    for col in VAC_COLUMNS:
        if col.name not in columns:
            continue
        g = got[col.name].reset_index(drop=True)
        if col.name not in want:
            assert np.isnan(g.to_numpy(dtype=float)).all(), col.name
            continue
        w = want[col.name].reset_index(drop=True)
        if col.dtype.startswith("U"):
            assert [str(x) for x in g] == [str(x).strip() for x in w], col.name
        else:
            np.testing.assert_array_equal(g.to_numpy(dtype=col.dtype), w.to_numpy(dtype="float64").astype(col.dtype),
                                          err_msg=col.name)


# ---------------------------------------------------------------------------
# FITS
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["vac.fits", "vac.fits.gz"])
def test_fits_layout_units_and_round_trip(tmp_path, name):
    df = make_vac_frame()
    p = write_vac_fits(tmp_path / name, df, provenance=PROVENANCE, flag_bits=FLAG_BITS,
                       fitted_labels=["TEFF", "LOGG", "FE_H"])
    assert p == tmp_path / name
    with _strict_open(p) as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", VAC_EXTNAME]
        table = hdul[1]
        assert table.columns.names == [c.name for c in VAC_COLUMNS]
        assert table.header["NAXIS2"] == len(df)
        for i, col in enumerate(VAC_COLUMNS, 1):
            assert table.header.get(f"TUNIT{i}") == col.unit, col.name
            assert col.description.startswith(table.header.comments[f"TTYPE{i}"].rstrip()), col.name
            assert table.header.comments[f"TTYPE{i}"], col.name
        assert table.header["TFORM1"] == "22A"  # the VAC width, not the longest value
        np.testing.assert_array_equal(table.data["PLATE"], df["PLATE"])
    back = read_vac_fits(p)
    assert list(back.columns) == [c.name for c in VAC_COLUMNS]
    for c in VAC_COLUMNS:
        if not c.dtype.startswith("U"):
            assert back[c.name].dtype == np.dtype(c.dtype), c.name
    assert_same_values(back, df)
    assert back["ALPHA"].isna().all() and back["VMICRO_FORMAL_ERR"].isna().all()  # not fitted → NaN


def test_fits_provenance_header(tmp_path):
    df = make_vac_frame(10)
    p = write_vac_fits(tmp_path / "vac.fits", df, provenance=PROVENANCE, flag_bits=FLAG_BITS,
                       fitted_labels=["TEFF", "LOGG", "FE_H"], extra_header={"RUNNAME": ("demo", "run name")})
    with _strict_open(p) as hdul:
        h0, h1 = hdul[0].header, hdul[1].header
        assert h0["PKGVERS"] == __version__ and h1["PKGVERS"] == __version__
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", h0["DATE"])
        assert h0["FITLABEL"] == "TEFF,LOGG,FEH" == h1["FITLABEL"]
        assert h0["EMUHASH"] == PROVENANCE["emulator_hash"] == h1["EMUHASH"]
        assert h0["INPUT1"] == "mastar-goodspec-v3_1_1-v1_7_7.fits.gz"
        assert h0["NINPUT"] == 2
        assert h0["SEED"] == 7 and h0["DRPVER"] == "v3_1_1"
        assert h0["RUNNAME"] == "demo"
        assert any("not a keyword" in str(v) for v in h0["HISTORY"])
        for bit, name, _ in FLAG_BITS:
            assert h0[f"FLAGBIT{bit}"] == name == h1[f"FLAGBIT{bit}"]
        # the long configuration is one value continued over CONTINUE cards, and parses back
        config = json.loads(h0["CONFIG"])
        assert config["run"] == {"name": "test", "seed": 7}
        assert config["notes"] == PROVENANCE["config"]["notes"]
        assert "CONTINUE" in hdul[0].header.tostring()
        prov = json.loads(h0["PROVJSON"])
        assert prov["inputs"] == PROVENANCE["inputs"] and "config" not in prov
        # every card is 80 printable ASCII characters
        raw = h0.tostring()
        assert len(raw) % 80 == 0 and all(32 <= ord(ch) < 127 for ch in raw)
    info = read_vac_fits_provenance(p)
    assert info["fitted_labels"] == ["TEFF", "LOGG", "FEH"]
    assert info["flag_bits"] == sorted(FLAG_BITS)  # full descriptions, not the truncated card comments
    assert info["config"] == json.loads(json.dumps(PROVENANCE["config"]))
    assert info["inputs"] == ["mastar-goodspec-v3_1_1-v1_7_7.fits.gz", "mastarall-v3_1_1-v1_7_7.fits"]


@pytest.mark.filterwarnings("ignore:'dex' did not parse as fits unit")
def test_fits_config_as_json_string_and_astropy_table(tmp_path):
    from astropy.table import Table

    df = make_vac_frame(5, fitted=("TEFF", "LOGG", "FEH", "ALPHA", "VMICRO"))
    cfg = json.dumps({"a": 1, "b": [1, 2, 3]}, indent=4)
    p = write_vac_fits(tmp_path / "v.fits", df, provenance={"config": cfg}, flag_bits=[],
                       fitted_labels=["TEFF", "LOGG", "FEH", "ALPHA", "VMICRO"])
    with _strict_open(p) as hdul:
        assert hdul[0].header["CONFIG"] == '{"a":1,"b":[1,2,3]}'  # re-dumped compactly
    t = Table.read(p, hdu=VAC_EXTNAME)
    assert t["TEFF"].unit == "K" and t.meta["FITLABEL"] == "TEFF,LOGG,FEH,ALPHA,VMICRO"
    assert_same_values(read_vac_fits(p), df)


@pytest.mark.parametrize("name", ["vac.fits", "vac.fits.gz"])
def test_fits_checksums_catch_damage_and_bytes_are_reproducible(tmp_path, name):
    df = make_vac_frame(12)
    prov = dict(PROVENANCE, date="2026-01-01T00:00:00")
    kw = dict(provenance=prov, flag_bits=FLAG_BITS, fitted_labels=["TEFF", "LOGG", "FE_H"])
    a = write_vac_fits(tmp_path / "a" / name, df, **kw)
    b = write_vac_fits(tmp_path / "b" / name, df, **kw)
    # the checksum cards are stamped with the file's DATE, not the clock: same input, same bytes
    assert a.read_bytes() == b.read_bytes()
    with _strict_open(a) as hdul:
        assert hdul[1].header["DATASUM"] != "0"
    if name.endswith(".gz"):
        return
    raw = bytearray(a.read_bytes())
    with fits.open(a) as hdul:
        offset = hdul[1].fileinfo()["datLoc"]
    raw[offset + 30] ^= 0x01  # one bit of one row flipped
    a.write_bytes(bytes(raw))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with fits.open(a, checksum=True) as hdul:
            hdul[1].data  # noqa: B018 - reading is what checks the data sum
    assert any("Checksum verification failed" in str(w.message) or "Datasum verification failed" in str(w.message)
               for w in caught), [str(w.message) for w in caught]


def test_fits_empty_and_all_nan(tmp_path):
    df = make_vac_frame(6).iloc[:0]
    p = write_vac_fits(tmp_path / "empty.fits", df, provenance={}, flag_bits=FLAG_BITS, fitted_labels=["TEFF"])
    with _strict_open(p) as hdul:
        assert hdul[1].header["NAXIS2"] == 0
    assert len(read_vac_fits(p)) == 0
    nan = make_vac_frame(6)
    nan[["TEFF", "LOGG", "FEH", "CHISQ"]] = np.nan
    p = write_vac_fits(tmp_path / "nan.fits", nan, provenance={}, flag_bits=[], fitted_labels=["TEFF"])
    assert read_vac_fits(p)["TEFF"].isna().all()


@pytest.mark.parametrize("missing", list(VAC_KEY))
def test_missing_identifier_is_a_clear_error(tmp_path, missing):
    df = make_vac_frame(4).drop(columns=[missing])
    with pytest.raises(ValueError, match=f"identifier column.*{missing}"):
        write_vac_fits(tmp_path / "v.fits", df, provenance={}, flag_bits=[], fitted_labels=["TEFF"])
    with pytest.raises(ValueError, match=missing):
        write_vac_parquet(tmp_path / "v.parquet", df, provenance={})
    assert not list(tmp_path.iterdir())  # nothing left behind


def test_bad_values_are_refused_and_old_file_kept(tmp_path):
    good = make_vac_frame(4)
    p = write_vac_fits(tmp_path / "v.fits", good, provenance={}, flag_bits=[], fitted_labels=["TEFF"])
    before = p.read_bytes()
    cases = [
        (good.drop(columns=["VALID"]), "integer column VALID"),
        (good.assign(NPIX=[1.0, np.nan, 3.0, 4.0]), "NPIX has 1 missing"),
        (good.assign(MANGAID=["x" * 30] + list(good["MANGAID"][1:])), "MANGAID.*30 characters"),
        (good.assign(MANGAID=[None] + list(good["MANGAID"][1:])), "MANGAID has 1 missing"),
    ]
    for bad, msg in cases:
        with pytest.raises(ValueError, match=msg):
            write_vac_fits(p, bad, provenance={}, flag_bits=[], fitted_labels=["TEFF"])
    with pytest.raises(ValueError, match="not a VAC label"):
        write_vac_fits(p, good, provenance={}, flag_bits=[], fitted_labels=["MASS"])
    with pytest.raises(ValueError, match="int32 FLAG"):
        write_vac_fits(p, good, provenance={}, flag_bits=[(31, "X", "y")], fitted_labels=["TEFF"])
    assert p.read_bytes() == before
    assert [q.name for q in tmp_path.iterdir()] == ["v.fits"]


def test_integer_ifudesign_and_float_ints_are_converted(tmp_path):
    df = make_vac_frame(4)
    df["IFUDESIGN"] = [3701, 3702, 12705, 1901]
    df["NPIX"] = df["NPIX"].astype(float)
    back = read_vac_fits(write_vac_fits(tmp_path / "v.fits", df, provenance={}, flag_bits=[],
                                        fitted_labels=["TEFF"]))
    assert list(back["IFUDESIGN"]) == ["3701", "3702", "12705", "1901"]
    assert back["NPIX"].dtype == np.int32


# ---------------------------------------------------------------------------
# Parquet
# ---------------------------------------------------------------------------

def _three_readers(directory: Path) -> dict[str, pd.DataFrame]:
    import dask.dataframe as dd
    import pyarrow.dataset as ds

    return {
        "pandas": pd.read_parquet(directory),
        "pyarrow": ds.dataset(directory, format="parquet").to_table().to_pandas(),
        "dask": dd.read_parquet(directory).compute().reset_index(drop=True),
        "read_vac_parquet": read_vac_parquet(directory),
    }


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_parquet_dataset_three_readers_agree(tmp_path):
    df = make_vac_frame(53)
    d = write_vac_parquet(tmp_path / "cat.parquet", df, provenance=PROVENANCE, flag_bits=FLAG_BITS,
                          fitted_labels=["TEFF", "LOGG", "FE_H"], rows_per_file=20, row_group_rows=8)
    files = sorted(p.name for p in d.iterdir())
    assert files == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    for name, got in _three_readers(d).items():
        assert list(got.columns) == [c.name for c in VAC_COLUMNS], name
        assert_same_values(got, df)
        assert got["TEFF"].isna().sum() == 1 and got["ALPHA"].isna().all(), name
        assert isinstance(got["MANGAID"].iloc[0], str), name
    vac = read_vac_parquet(d)
    for c in VAC_COLUMNS:
        if not c.dtype.startswith("U"):
            assert vac[c.name].dtype == np.dtype(c.dtype), c.name


def test_parquet_schema_metadata(tmp_path):
    import pyarrow.dataset as ds

    d = write_vac_parquet(tmp_path / "cat.parquet", make_vac_frame(9), provenance=PROVENANCE,
                          flag_bits=FLAG_BITS, fitted_labels=["TEFF", "LOGG", "FE_H"])
    meta = vac_schema_metadata(d)
    for c in VAC_COLUMNS:
        assert meta["columns"][c.name] == {"unit": c.unit, "description": c.description}
    assert meta["fitted_labels"] == ["TEFF", "LOGG", "FEH"]
    assert meta["flag_bits"] == sorted(FLAG_BITS)
    assert meta["version"] == __version__
    prov = meta["provenance"]
    assert prov["config"]["run"]["seed"] == 7 and prov["emulator_hash"] == PROVENANCE["emulator_hash"]
    assert prov["package_version"] == __version__ and "date" in prov
    # the metadata is on the Arrow schema itself, as any Arrow reader sees it
    field = ds.dataset(d, format="parquet").schema.field("TEFF")
    assert field.metadata[b"unit"] == b"K"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_parquet_empty_frame(tmp_path):
    d = write_vac_parquet(tmp_path / "empty.parquet", make_vac_frame(5).iloc[:0], provenance={})
    for name, got in _three_readers(d).items():
        assert len(got) == 0 and list(got.columns) == [c.name for c in VAC_COLUMNS], name


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_parquet_hive_plate_buckets(tmp_path):
    import dask.dataframe as dd

    df = make_vac_frame(30)
    d = write_vac_parquet(tmp_path / "cat.parquet", df, provenance={}, partition_cols="PLATE_BUCKET")
    buckets = sorted(p.name for p in d.iterdir())
    assert buckets == sorted({f"PLATE_BUCKET={p // 1000}" for p in df["PLATE"]})
    # rows come back grouped by directory, in the order each reader lists them (PLATE_BUCKET=10
    # sorts before =8): compare in key order
    key = list(VAC_KEY)
    want = df.sort_values(key).reset_index(drop=True)

    def keyed(frame: pd.DataFrame) -> pd.DataFrame:
        return frame.sort_values(key).reset_index(drop=True)

    got = keyed(read_vac_parquet(d))
    assert list(got.columns)[: len(VAC_COLUMNS)] == [c.name for c in VAC_COLUMNS]
    assert_same_values(got, want)
    np.testing.assert_array_equal(got["PLATE_BUCKET"], want["PLATE"] // 1000)
    assert_same_values(keyed(pd.read_parquet(d)), want)
    assert_same_values(keyed(dd.read_parquet(d).compute()), want)
    sub = read_vac_parquet(d, filters=[("PLATE_BUCKET", "==", int(want["PLATE"].iloc[0] // 1000))])
    assert len(sub) == int((want["PLATE"] // 1000 == want["PLATE"].iloc[0] // 1000).sum())


def test_parquet_atomic_replace(tmp_path):
    target = tmp_path / "cat.parquet"
    write_vac_parquet(target, make_vac_frame(10, seed=1), provenance={"seed": 1})
    bad = make_vac_frame(10, seed=2).assign(NPIX=np.nan)
    with pytest.raises(ValueError):
        write_vac_parquet(target, bad, provenance={"seed": 2})
    assert vac_schema_metadata(target)["provenance"]["seed"] == 1
    write_vac_parquet(target, make_vac_frame(12, seed=2), provenance={"seed": 2})
    assert len(read_vac_parquet(target)) == 12
    assert [p.name for p in tmp_path.iterdir()] == ["cat.parquet"]
