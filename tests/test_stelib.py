"""The STELIB v3.2 reader (mastar_vac.io.stelib) on the real files, and the MILES match."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mastar_vac import demo
from mastar_vac.errors import InputFileError
from mastar_vac.io.stelib import hd_key, read_stelib_dir, read_stelib_file


@pytest.fixture(scope="module")
def stelib_dir() -> Path:
    return demo.templates_dir() / "stelib"


@pytest.fixture(scope="module")
def spectra(stelib_dir: Path):  # noqa: ANN201
    return read_stelib_dir(stelib_dir)


@pytest.fixture(scope="module")
def miles_names() -> dict[int, str]:
    d = demo.templates_dir() / "miles"
    ids = sorted(demo._miles_files(d))
    return {i: n for i, n in demo.read_miles_names(d / "paramsMILES_v9.1.txt", ids).items() if i in set(ids)}


def test_reads_every_file(spectra) -> None:  # noqa: ANN001
    assert len(spectra) == 255
    names = [s.name for s in spectra]
    assert names == sorted(names) and len(set(names)) == 255
    for s in spectra:
        assert s.wave_air.size == s.flux.size == 6700
        assert 3190 < s.wave_air[0] < 3210 and 9880 < s.wave_air[-1] < 9920  # air Å, ~1 Å pixels
        assert np.all(np.diff(s.wave_air) > 0)
    # zeros mark the ends and gaps: data from ~3,460 Å to at most ~9,850 Å
    cov = np.array([s.wave_air[s.covered][[0, -1]] for s in spectra])
    assert np.median(cov[:, 0]) < 3470 and np.median(cov[:, 1]) > 9600


def test_labels_parsed_and_dash_is_nan(spectra) -> None:  # noqa: ANN001
    by = {s.name: s for s in spectra}
    s = by["HD002857"]
    assert (s.teff, s.logg, s.feh) == (7611.0, 2.67, -1.51) and s.spectype == "A2" and s.hd == "HD2857"
    hr = by["HD015318"]  # TEFF 11300, LOG_G and FE_H '-'; OBJECT is another catalogue's name
    assert hr.teff == 11300 and np.isnan(hr.logg) and np.isnan(hr.feh) and hr.object == "HR718"
    wd = by["Feige110"]
    assert np.isnan([wd.teff, wd.logg, wd.feh]).all() and wd.hd is None
    assert sum(s.labelled for s in spectra) == 203
    assert sum(s.av_dereddened > 0 for s in spectra) == 112 and by["HD002857"].av_dereddened == 0.25
    assert sum(np.isnan(s.teff) for s in spectra) == 36


def test_hd_key() -> None:
    assert hd_key("HD002857") == hd_key("HD 2857") == hd_key("HD2857") == "HD2857"
    assert hd_key("HD053929lp") == hd_key("HD053929ss") == "HD53929"  # STELIB's two observations
    assert hd_key("HD112033C") == "HD112033C" != hd_key("HD112033")  # a component is another star
    assert hd_key("HD044691A") == "HD44691A"
    assert hd_key("BD+002058A") is None and hd_key("Feige110") is None


def test_miles_names(miles_names: dict[int, str]) -> None:
    assert len(miles_names) == 984  # m0970 is in omit/
    assert miles_names[4] == "HD000004" and miles_names[272] == "BD+002058A"
    assert miles_names[221] == "HD044691A"  # printed "022."
    assert miles_names[973] == "NGC 7789 468(589) Cl"  # a name with spaces and digits


def test_miles_overlap(spectra, miles_names: dict[int, str]) -> None:  # noqa: ANN001
    full = demo.select_stelib(spectra, miles_names, sorted(miles_names), None)
    assert full.library_overlap_stars == 117  # of 255 files: "about half" the stars
    assert len(full.shared) == 117 and sum(len(v) for v in full.shared.values()) == 117
    # labelled STELIB-only stars: HD053929 (observed twice) is one star with two spectra
    assert full.library_only_labelled == len(full.only) == 88
    twice = [o for o in full.only if o[1] == "HD053929"]
    assert len(twice) == 1 and [full.spectra[i].name for i in twice[0][2]] == ["HD053929lp", "HD053929ss"]
    assert all(full.spectra[i].labelled for _, _, idx in full.only for i in idx)
    # HD 2857 is m0018 in MILES; their labels agree to ~40 K
    assert full.spectra[full.shared[18][0]].name == "HD002857"
    # a demo of the first 80 MILES stars: their STELIB spectra and ⌈80·88/984⌉ = 8 STELIB-only stars
    part = demo.select_stelib(spectra, miles_names, sorted(miles_names)[:80], 80)
    assert sorted(part.shared) == [18, 42, 59] and len(part.only) == 8
    assert [o[1] for o in part.only] == [o[1] for o in full.only[:8]]  # the first ones, same keys
    assert [o[0] for o in part.only] == list(range(8))


def test_bad_files_name_the_file(tmp_path: Path, stelib_dir: Path) -> None:
    from astropy.io import fits

    junk = tmp_path / "STELIB_v3.2_HD000001.fits"
    junk.write_bytes(b"not a fits file")
    with pytest.raises(InputFileError, match="HD000001.fits"):
        read_stelib_file(junk)
    with pytest.raises(InputFileError, match="not a STELIB file name"):
        read_stelib_file(tmp_path / "other.fits")
    good = fits.getdata(stelib_dir / "STELIB_v3.2_HD002857.fits")
    hdr = fits.Header({"CRVAL1": 3200.0, "CDELT1": 1.0, "TEFF": "hot"})
    bad_label = tmp_path / "STELIB_v3.2_HD000002.fits"
    fits.PrimaryHDU(good, hdr).writeto(bad_label)
    with pytest.raises(InputFileError, match=r"HD000002.fits.*TEFF"):
        read_stelib_file(bad_label)
    no_wave = tmp_path / "STELIB_v3.2_HD000003.fits"
    fits.PrimaryHDU(good).writeto(no_wave)
    with pytest.raises(InputFileError, match=r"HD000003.fits.*wavelength"):
        read_stelib_file(no_wave)
    with pytest.raises(InputFileError, match="no STELIB spectra"):
        read_stelib_dir(tmp_path / "empty")


def test_degrade_stelib_keeps_flux_and_marks_gaps(spectra) -> None:  # noqa: ANN001
    by = {s.name: s for s in spectra}
    lib = demo.load_miles(1)
    hc = demo.load_mastarhc()
    model = demo.LsfModel.from_resolution(lib.wave_air, np.median(hc.sres, axis=0))
    s = by["HD087141"]  # a gap from 6,451 to 8,042 Å (air)
    out, nodata, disp, coarser = demo.degrade_stelib(s, model, [1.0])
    gap = (model.wave > 6470) & (model.wave < 8040)
    assert nodata[0][gap].all() and not nodata[0][(model.wave > 4000) & (model.wave < 6400)].any()
    assert np.isnan(out[0][model.wave > 9950]).all() and nodata[0][model.wave > 9950].all()
    # a flat spectrum stays flat (the kernel is normalized) away from the edges
    flat = type(s)(**{**s.__dict__, "flux": np.where(s.covered, 1.0, 0.0)})
    f = demo.degrade_stelib(flat, model, [1.0])[0][0]
    ok = ~nodata[0] & np.isfinite(f)
    assert np.allclose(f[ok], 1.0, atol=1e-6)
    assert 6000 < coarser[0] < 6600 and (disp[0] >= demo.STELIB_FWHM * 0.4246 * 0.999).all()
