"""The bad-input matrix: every input kind × the ways it breaks → one clear error.

For each file kind the pipeline reads (goodspec, mastarall, allStar, Gaia crossmatch
VAC, LAMOST, SEGUE, FERRE grid, emulator artifact, TOML config) and each failure
(missing, empty, truncated, corrupt header, wrong HDU, missing column, wrong dtype or
vector length, all-NaN column, duplicate keys) the reader either raises one of the
project's exceptions whose message names the file and the problem, or — for problems
of single spectra — flags the row and goes on. Property-based tests feed the readers
random truncations and byte flips: only the project's exception types come out.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mastar_vac.config import load_config
from mastar_vac.emulator import load_emulator, save_emulator
from mastar_vac.errors import ArtifactError, ConfigError, InputFileError, MastarVacError
from mastar_vac.ingest import INGEST_FLAGS, ingest_spectra
from mastar_vac.io.allstar import read_allstar, write_allstar
from mastar_vac.io.catalogs import read_lamost, read_segue, write_lamost, write_segue
from mastar_vac.io.ferre import read_ferre, write_ferre
from mastar_vac.io.fitstable import FitsWriter, read_table
from mastar_vac.io.gaia_xmatch import read_gaia_xmatch, write_gaia_xmatch
from mastar_vac.io.goodspec import read_goodspec, write_goodspec
from mastar_vac.io.layouts import GOODSPEC
from mastar_vac.io.mastarall import read_goodstars, read_goodvisits, write_mastarall
from mastar_vac.wavegrid import mastar_wavelength

from .conftest import make_visits
from .toy import toy_emulator

# ---------------------------------------------------------------------------
# one good file of every kind, and how to read it
# ---------------------------------------------------------------------------


def _goodspec(p: Path) -> Path:
    return write_goodspec(p / "gs.fits", make_visits(6))


def _mastarall(p: Path) -> Path:
    v = make_visits(6)
    gv = {k: v[k] for k in ("MANGAID", "PLATE", "IFUDESIGN", "MJD", "RA", "DEC", "S2N")}
    return write_mastarall(p / "ma.fits", {"MANGAID": np.unique(v["MANGAID"])}, gv)


def _allstar(p: Path) -> Path:
    return write_allstar(p / "as.fits", {"APOGEE_ID": np.array(["2M1", "2M2"]), "RA": np.array([1.0, 2.0]),
                                         "DEC": np.array([3.0, 4.0]), "TEFF": np.array([5000.0, 6000.0])})


def _xmatch(p: Path) -> Path:
    return write_gaia_xmatch(p / "x.fits", {"MANGAID": np.array(["7-1", "7-2"]), "SOURCE_ID": np.array([1, 2])})


def _lamost(p: Path) -> Path:
    return write_lamost(p / "lamost.fits", pd.DataFrame({"obsid": [1, 2], "ra": [1.0, 2.0], "dec": [3.0, 4.0],
                                                         "teff": [5000.0, 6000.0], "logg": [4.0, 3.0],
                                                         "feh": [0.0, -0.5]}))


def _segue(p: Path) -> Path:
    return write_segue(p / "sspp.fits", pd.DataFrame({"SPECOBJID": ["1", "2"], "RA": [1.0, 2.0], "DEC": [3.0, 4.0],
                                                      "TEFF_ADOP": [5000.0, 6000.0], "LOGG_ADOP": [4.0, 3.0],
                                                      "FEH_ADOP": [0.0, -0.5]}))


FITS_KINDS = {
    "goodspec": (_goodspec, lambda p: list(read_goodspec(p).iter_blocks(100))),
    "mastarall": (_mastarall, lambda p: (read_goodstars(p), read_goodvisits(p))),
    "allstar": (_allstar, lambda p: read_allstar(p, ["APOGEE_ID", "RA", "DEC", "TEFF", "ASPCAPFLAG", "STARFLAG"])),
    "gaia_xmatch": (_xmatch, read_gaia_xmatch),
    "lamost": (_lamost, read_lamost),
    "segue": (_segue, read_segue),
}


@pytest.fixture(params=sorted(FITS_KINDS))
def kind(request):
    return request.param


def _expect_clean_error(reader, path: Path, match: str | None = None) -> MastarVacError:
    with pytest.raises(MastarVacError) as e:
        reader(path)
    assert path.name in str(e.value), str(e.value)
    if match:
        assert any(m in str(e.value) for m in match.split("|")), str(e.value)
    return e.value


def test_missing_file(kind, tmp_path):
    _, reader = FITS_KINDS[kind]
    _expect_clean_error(reader, tmp_path / "absent.fits", "not found")


def test_empty_file(kind, tmp_path):
    _, reader = FITS_KINDS[kind]
    p = tmp_path / "empty.fits"
    p.write_bytes(b"")
    _expect_clean_error(reader, p, "no HDU|empty|no rows|not a FITS")


@pytest.mark.parametrize("fraction", [0.3, 0.7, 0.97])
def test_truncated_file(kind, tmp_path, fraction):
    make, reader = FITS_KINDS[kind]
    good = make(tmp_path)
    raw = good.read_bytes()
    p = tmp_path / "cut.fits"
    p.write_bytes(raw[: int(len(raw) * fraction)])
    _expect_clean_error(reader, p, "truncated|ends|no HDU|not a FITS")


def test_corrupt_header(kind, tmp_path):
    make, reader = FITS_KINDS[kind]
    raw = bytearray(make(tmp_path).read_bytes())
    i = raw.find(b"TFIELDS =")
    raw[i + 10: i + 30] = b"  ##corrupt##       "
    p = tmp_path / "hdr.fits"
    p.write_bytes(bytes(raw))
    _expect_clean_error(reader, p, "corrupt header")


def test_wrong_hdu_type(kind, tmp_path):
    _, reader = FITS_KINDS[kind]
    p = tmp_path / "image.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.zeros((4, 4))), fits.ImageHDU(np.zeros(3))]).writeto(p)
    _expect_clean_error(reader, p, "not a binary table|no HDU|no GOODSTARS")


def _rewrite_without(path: Path, drop: str, out: Path, replace: dict | None = None) -> Path:
    """Copy a FITS table file with one column dropped or replaced (all HDUs kept)."""
    with fits.open(path) as h:
        hdus = [fits.PrimaryHDU(header=h[0].header)]
        for hdu in h[1:]:
            cols = [c for c in hdu.columns if c.name != drop]
            if replace and hdu.name == replace.get("hdu", hdu.name):
                cols = [replace["column"] if c.name == replace["column"].name else c for c in hdu.columns]
            hdus.append(fits.BinTableHDU.from_columns(cols, header=hdu.header, name=hdu.name))
        fits.HDUList(hdus).writeto(out, overwrite=True)
    return out


REQUIRED = {"goodspec": "FLUX", "mastarall": "MANGAID", "allstar": "ASPCAPFLAG", "gaia_xmatch": "MANGAID",
            "lamost": "teff", "segue": "TEFF_ADOP"}


def test_missing_column(kind, tmp_path):
    make, reader = FITS_KINDS[kind]
    p = _rewrite_without(make(tmp_path), REQUIRED[kind], tmp_path / "nocol.fits")
    err = _expect_clean_error(reader, p)
    assert REQUIRED[kind].upper() in str(err).upper()


def test_wrong_dtype(kind, tmp_path):
    make, reader = FITS_KINDS[kind]
    good = make(tmp_path)
    col = {"goodspec": "PLATE", "mastarall": "MJD", "allstar": "TEFF", "gaia_xmatch": "BPRPC",
           "lamost": "teff", "segue": "TEFF_ADOP"}[kind]
    with fits.open(good) as h:
        hdu = next(x for x in h[1:] if col in x.columns.names)
        n = len(hdu.data)
        name = hdu.name
    bad = fits.Column(name=col, format="8A", array=np.array(["nonsense"] * n))
    p = _rewrite_without(good, "", tmp_path / "dtype.fits", replace={"hdu": name, "column": bad})
    err = _expect_clean_error(reader, p)
    assert col.upper() in str(err).upper()


def test_goodspec_wrong_vector_length(tmp_path):
    v = make_visits(3)
    v["IVAR"] = v["IVAR"][:, :100]
    v["WAVE"] = np.broadcast_to(mastar_wavelength(), v["FLUX"].shape)
    p = tmp_path / "short.fits"
    with FitsWriter(p) as w:
        w.add_table(v, extname="GOODSPEC")
    _expect_clean_error(read_goodspec, p, "IVAR")


def test_goodspec_all_nan_flux_is_flagged_not_fatal(tmp_path):
    v = make_visits(5)
    v["FLUX"][:] = np.nan
    p = write_goodspec(tmp_path / "nan.fits", v)
    s = ingest_spectra(p, tmp_path / "c.zarr", chunk=2)
    assert s.nvisit == 5 and s.flag_counts["NO_USABLE_PIXELS"] == 5
    assert s.flag_counts["NONFINITE_FLUX"] == 5


def test_goodspec_duplicate_visit_keys(tmp_path):
    v = make_visits(4)
    v["MJD"][3] = v["MJD"][1]
    v["MANGAID"][3] = v["MANGAID"][1]
    v["PLATE"][3] = v["PLATE"][1]
    v["IFUDESIGN"][3] = v["IFUDESIGN"][1]
    p = write_goodspec(tmp_path / "dup.fits", v)
    with pytest.raises(InputFileError, match=r"row 1.*repeats") as e:
        ingest_spectra(p, tmp_path / "c.zarr")
    assert "dup.fits" in str(e.value)


def test_mastarall_duplicate_and_xmatch_duplicates(tmp_path):
    v = make_visits(3)
    gv = {k: np.concatenate([v[k], v[k][:1]]) for k in ("MANGAID", "PLATE", "IFUDESIGN", "MJD")}
    p = write_mastarall(tmp_path / "ma.fits", {"MANGAID": np.unique(v["MANGAID"])}, gv)
    _expect_clean_error(read_goodvisits, p, "duplicate visit key")


def test_allstar_all_nan_labels_stop_the_reference_stage_clearly(tmp_path):
    """All labels NaN leaves no reference star: the build says so, naming allStar."""
    from mastar_vac.config import Config, InputsConfig, OutputConfig
    from mastar_vac.stages import StageContext

    v = make_visits(12)
    gs = write_goodspec(tmp_path / "gs.fits", v)
    al = write_allstar(tmp_path / "allStar.fits", {
        "APOGEE_ID": np.array([f"2M{i}" for i in range(4)]), "RA": v["RA"][:12:3], "DEC": v["DEC"][:12:3],
        "TEFF": np.full(4, np.nan), "LOGG": np.full(4, np.nan), "FE_H": np.full(4, np.nan)})
    cfg = Config(inputs=InputsConfig(goodspec=gs, allstar=al), output=OutputConfig(dir=tmp_path / "o"))
    cfg = cfg.replace("emulator", labels=("TEFF", "LOGG", "FE_H"))
    ctx = StageContext(cfg, tmp_path / "o", progress=False)
    ctx.ingest()
    ctx.normalize()
    with pytest.raises(InputFileError, match="allStar.fits.*reference stars survive"):
        ctx.reference()


# ---------------------------------------------------------------------------
# FERRE grids, emulator artifacts, TOML configuration
# ---------------------------------------------------------------------------


def _ferre(p: Path) -> Path:
    flux = np.random.default_rng(0).random((3, 2, 50)).astype(np.float32)
    return write_ferre(p / "g.hdr", {"labels": ["TEFF", "LOGG"], "llimits": [5000.0, 3.0], "steps": [500.0, 1.0],
                                     "flux": flux, "header": {"WAVE": [3.6, 1e-3], "LOGW": 1, "VACUUM": 1}},
                       binary=True)


def test_ferre_bad_inputs(tmp_path):
    hdr = _ferre(tmp_path)
    unf = hdr.with_suffix(".unf")
    assert read_ferre(hdr).flux.shape == (3, 2, 50)
    _expect_clean_error(read_ferre, tmp_path / "none.hdr", "not found|missing")
    raw = unf.read_bytes()
    unf.write_bytes(raw[: len(raw) // 2])
    _expect_clean_error(read_ferre, hdr)
    unf.write_bytes(b"")
    _expect_clean_error(read_ferre, hdr)
    hdr.write_text(hdr.read_text().replace("N_OF_DIM", "N_OF_XXX"))
    _expect_clean_error(read_ferre, hdr, "N_OF_DIM")
    empty = tmp_path / "e.dat"
    empty.write_text("")
    _expect_clean_error(read_ferre, empty)


def test_emulator_artifact_bad_inputs(tmp_path):
    d = save_emulator(toy_emulator(), tmp_path / "emu")
    with pytest.raises(ArtifactError, match="not an emulator"):
        load_emulator(tmp_path / "nothing")
    w = d / "weights.safetensors"
    raw = w.read_bytes()
    w.write_bytes(raw[: len(raw) // 3])  # truncated
    with pytest.raises(ArtifactError, match="SHA-256"):
        load_emulator(d)
    w.write_bytes(raw)
    (d / "emulator.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="unreadable metadata"):
        load_emulator(d)
    (d / "emulator.json").write_text("")
    with pytest.raises(ArtifactError):
        load_emulator(d)


@pytest.mark.parametrize("text, match", [
    (None, "not found"),
    ("", "needs goodspec"),
    ("[inputs\ndemo = true", "not valid TOML"),
    ("[inputs]\ndemo = true\n[nonsense]\na = 1\n", "unknown key"),
    ("[inputs]\ndemo = 'yes'\n", "expected true or false"),
    ("[inputs]\ndemo = true\n[cube]\nchunk = 0\n", "chunk must be >= 1"),
    ("[inputs]\ndemo = true\n[inputs.x]\n", "unknown key"),
])
def test_config_bad_inputs(tmp_path, text, match):
    p = tmp_path / "c.toml"
    if text is not None:
        p.write_text(text)
    with pytest.raises(ConfigError, match=match) as e:
        load_config(p)
    assert "c.toml" in str(e.value)


# ---------------------------------------------------------------------------
# property-based: random truncations and byte flips
# ---------------------------------------------------------------------------

_GOOD_CACHE: dict[str, bytes] = {}


def _good_bytes(kind: str, tmp: Path) -> bytes:
    if kind not in _GOOD_CACHE:
        _GOOD_CACHE[kind] = FITS_KINDS[kind][0](tmp).read_bytes()
    return _GOOD_CACHE[kind]


def _only_project_errors(reader, path: Path) -> None:
    try:
        reader(path)
    except MastarVacError:
        pass  # a clear, named error: what we want


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(sorted(FITS_KINDS)), cut=st.floats(0.0, 1.0))
def test_random_truncation_gives_only_project_errors(tmp_path, kind, cut):
    raw = _good_bytes(kind, tmp_path)
    p = tmp_path / f"t-{kind}.fits"
    p.write_bytes(raw[: int(len(raw) * cut)])
    _only_project_errors(FITS_KINDS[kind][1], p)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(sorted(FITS_KINDS)), flips=st.lists(st.tuples(st.floats(0.0, 1.0),
                                                                          st.integers(1, 255)),
                                                                min_size=1, max_size=8),
       gz=st.booleans())
def test_random_byte_flips_give_only_project_errors(tmp_path, kind, flips, gz):
    raw = bytearray(_good_bytes(kind, tmp_path))
    for where, xor in flips:
        i = min(int(where * len(raw)), len(raw) - 1)
        raw[i] ^= xor
    data = gzip.compress(bytes(raw)) if gz else bytes(raw)
    p = tmp_path / (f"f-{kind}.fits" + (".gz" if gz else ""))
    p.write_bytes(data)
    _only_project_errors(FITS_KINDS[kind][1], p)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.floats(0.0, 1.0), flip=st.integers(0, 10**9))
def test_random_damage_to_gzip_stream(tmp_path, cut, flip):
    raw = gzip.compress(_good_bytes("goodspec", tmp_path))
    b = bytearray(raw[: max(1, int(len(raw) * cut))])
    b[flip % len(b)] ^= 0x5A
    p = tmp_path / "g.fits.gz"
    p.write_bytes(bytes(b))
    _only_project_errors(FITS_KINDS["goodspec"][1], p)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200))
def test_random_toml_gives_only_config_errors(tmp_path, text):
    p = tmp_path / "r.toml"
    p.write_text(text)
    try:
        load_config(p)
    except ConfigError:
        pass


def test_flagged_per_spectrum_problems_keep_the_run_going(tmp_path):
    v = make_visits(6)
    v["IVAR"][2] = -1.0
    v["FLUX"][4, :10] = np.inf
    p = write_goodspec(tmp_path / "gs.fits", v)
    s = ingest_spectra(p, tmp_path / "c.zarr", chunk=4)
    assert s.nvisit == 6
    assert s.flag_counts["NEGATIVE_IVAR"] == 1 and s.flag_counts["NONFINITE_FLUX"] == 1
    assert INGEST_FLAGS["NO_USABLE_PIXELS"]  # visit 2 has nothing usable but is still there
    assert read_table(p)["FLUX"].shape[0] == 6
    assert json.dumps(s.flag_counts)
    assert GOODSPEC.extname == "GOODSPEC"
