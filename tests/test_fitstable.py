"""The streaming FITS table reader/writer against astropy, plain and gzip."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
from astropy.io import fits

from mastar_vac.errors import InputFileError
from mastar_vac.io.fitstable import BinTableReader, FitsWriter, list_hdus, read_table


@pytest.fixture(params=["t.fits", "t.fits.gz"])
def table_file(tmp_path, request):
    p = tmp_path / request.param
    cols = {
        "NAME": np.array(["7-123", "a", "  padded"]),
        "I2": np.array([1, -2, 3], np.int16),
        "J": np.array([10, 20, 30], np.int32),
        "K": np.array([2**40, -1, 0], np.int64),
        "E": np.array([1.5, np.nan, -3], np.float32),
        "D": np.array([1e300, 2, 3], np.float64),
        "L": np.array([True, False, True]),
        "VEC": np.arange(15, dtype=np.float32).reshape(3, 5),
        "MAT": np.arange(24, dtype=np.float64).reshape(3, 2, 4),
    }
    with FitsWriter(p, primary_header={"ORIGIN": "test"}) as w:
        w.add_table(cols, extname="FIRST", units={"VEC": "Angstrom"})
        w.add_table({"X": np.arange(4, dtype=np.int32)}, extname="SECOND")
    return p, cols


def test_round_trip_and_astropy_agrees(table_file):
    p, cols = table_file
    got = read_table(p, "FIRST")
    for k, v in cols.items():
        if v.dtype.kind == "U":
            assert list(got[k]) == [s.strip() for s in v]
        else:
            np.testing.assert_array_equal(got[k], v)
    with fits.open(p) as hdul:
        hdul.verify("exception")
        np.testing.assert_array_equal(hdul["FIRST"].data["MAT"], cols["MAT"])
        assert hdul["FIRST"].columns["VEC"].unit == "Angstrom"
    assert [h[1] for h in list_hdus(p)] == ["PRIMARY", "FIRST", "SECOND"]
    assert list(read_table(p, 2)["X"]) == [0, 1, 2, 3]


def test_reads_astropy_written_file_with_unsigned(tmp_path):
    p = tmp_path / "a.fits"
    t = fits.BinTableHDU.from_columns([
        fits.Column("U", "J", bzero=2**31, array=np.array([0, 2**32 - 1], np.uint32)),
        fits.Column("S", "10A", array=np.array(["ab", "cd"])),
    ])
    fits.HDUList([fits.PrimaryHDU(), t]).writeto(p)
    got = read_table(p)
    assert got["U"].dtype == np.uint32
    assert list(got["U"]) == [0, 2**32 - 1]
    assert list(got["S"]) == ["ab", "cd"]


def test_iter_blocks_cover_all_rows(tmp_path):
    p = tmp_path / "b.fits.gz"
    with FitsWriter(p) as w:
        with w.begin_table({"V": (np.float32, (7,)), "I": (np.int64, ())}, 10, extname="T") as t:
            for s in range(0, 10, 3):
                m = min(3, 10 - s)
                t.write({"V": np.full((m, 7), s, np.float32), "I": np.arange(s, s + m)})
    with BinTableReader(p, "t") as r:
        starts = []
        rows = []
        for s, block in r.iter_blocks(4):
            starts.append(s)
            rows.extend(block["I"].tolist())
        assert starts == [0, 4, 8]
        assert rows == list(range(10))
        # random access after streaming (backwards seek)
        assert r.read(["I"], 2, 3)["I"].tolist() == [2]


def test_missing_file(tmp_path):
    with pytest.raises(InputFileError, match="file not found") as e:
        BinTableReader(tmp_path / "nope.fits")
    assert "nope.fits" in str(e.value)


def test_truncated_data_names_row(table_file):
    p, _ = table_file
    raw = gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
    # cut inside the first table's data
    with fits.open(p) as h:
        start = h[1]._data_offset
    cut = tmp = p.with_name("cut.fits")
    tmp.write_bytes(raw[: start + 100])
    with BinTableReader(cut, 1) as r:
        with pytest.raises(InputFileError, match=r"truncated") as e:
            r.read()
    assert "row" in str(e.value) and "cut.fits" in str(e.value)


def test_truncated_gzip_stream(tmp_path, table_file):
    p, _ = table_file
    if p.suffix != ".gz":
        pytest.skip("gzip only")
    data = p.read_bytes()
    cut = tmp_path / "cut.fits.gz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputFileError) as e:
        read_table(cut, "SECOND")
    assert "cut.fits.gz" in str(e.value)


def test_corrupt_header(tmp_path, table_file):
    p, _ = table_file
    raw = bytearray(gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes())
    i = raw.find(b"NAXIS1  =", 2880)
    raw[i + 10: i + 30] = b"   not-a-number     "
    bad = tmp_path / "bad.fits"
    bad.write_bytes(bytes(raw))
    with pytest.raises(InputFileError, match="HDU 1") as e:
        read_table(bad, 1)
    assert "bad.fits" in str(e.value)


def test_not_fits(tmp_path):
    p = tmp_path / "x.fits"
    p.write_bytes(b"hello world" * 400)
    with pytest.raises(InputFileError, match="not a FITS file"):
        read_table(p)
    p.write_bytes(b"")
    with pytest.raises(InputFileError, match="has no HDU"):
        read_table(p)


def test_wrong_hdu(table_file):
    p, _ = table_file
    with pytest.raises(InputFileError, match="has no HDU 'NOPE'"):
        BinTableReader(p, "NOPE")
    with pytest.raises(InputFileError, match="not a binary table"):
        BinTableReader(p, 0)


def test_failed_write_leaves_nothing(tmp_path):
    p = tmp_path / "out.fits"
    with pytest.raises(RuntimeError):
        with FitsWriter(p) as w:
            w.add_table({"A": np.arange(3)}, extname="A")
            raise RuntimeError("boom")
    assert not p.exists()
    assert list(tmp_path.iterdir()) == []


def test_unfinished_stream_is_refused(tmp_path):
    p = tmp_path / "out.fits"
    with pytest.raises(ValueError, match="promised"):
        with FitsWriter(p) as w:
            with w.begin_table({"A": (np.int32, ())}, 5, extname="A") as t:
                t.write({"A": np.arange(3, dtype=np.int32)})
    assert not p.exists()
