"""The embedded demo data (mastar_vac.demo): files, determinism, physics, flags, cache."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mastar_vac import demo, lsf
from mastar_vac.demo import (
    ASPCAPFLAG_BITS,
    EXTRATARG_DUPLICATE,
    MASK_BITS,
    MILES_SIGMA_PIX,
    MJDQUAL_BITS,
    STARFLAG_BITS,
    DemoFiles,
    LsfModel,
    degrade_miles,
    demo_files,
)
from mastar_vac.io.allstar import read_allstar
from mastar_vac.io.fitstable import read_table
from mastar_vac.io.gaia_xmatch import read_gaia_xmatch
from mastar_vac.io.goodspec import VISIT_KEY, SpectraReader
from mastar_vac.io.mastarall import read_goodstars, read_goodvisits

N_STARS = 80  # includes m0078, the first MILES star with a placeholder label


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> DemoFiles:
    return demo_files(tmp_path_factory.mktemp("cache"), n_stars=N_STARS)


@pytest.fixture(scope="module")
def spectra(files: DemoFiles):  # noqa: ANN201
    with SpectraReader(files.goodspec) as r:
        blocks = list(r.iter_blocks(4096))
    assert len(blocks) == 1
    return blocks[0]


@pytest.fixture(scope="module")
def library() -> demo.MilesLibrary:
    return demo.load_miles(N_STARS)


@pytest.fixture(scope="module")
def model(library: demo.MilesLibrary) -> LsfModel:
    hc = demo.load_mastarhc()
    return LsfModel.from_resolution(library.wave_air, np.median(hc.sres, axis=0))


@pytest.fixture(scope="module")
def labels(files: DemoFiles) -> pd.DataFrame:
    return pd.read_csv(files.labels)


@pytest.fixture(scope="module")
def sources(files: DemoFiles) -> pd.DataFrame:
    """visit_sources.csv: one row per goodspec row, in the same order."""
    return pd.read_csv(files.visit_sources, dtype={"IFUDESIGN": str})


@pytest.fixture(scope="module")
def stelib_lib() -> demo.StelibStars:
    from mastar_vac.io.stelib import read_stelib_dir

    d = demo.templates_dir()
    miles = demo.load_miles(N_STARS)
    names = demo.read_miles_names(d / "miles" / "paramsMILES_v9.1.txt", range(1, 986))
    return demo.select_stelib(read_stelib_dir(d / "stelib"), names, miles.ids, N_STARS)


def _bit(values: np.ndarray, bit: int) -> np.ndarray:
    return (np.asarray(values).astype(np.int64) & (np.int64(1) << bit)) != 0


# ---- files and layouts ---------------------------------------------------------------


def test_files_exist_and_read_back(files: DemoFiles, spectra) -> None:  # noqa: ANN001
    for p in (files.goodspec, files.mastarall, files.allstar, files.gaia_xmatch, files.labels, files.visit_sources,
              files.manifest):
        assert p.is_file() and p.parent == files.root
    assert files.goodspec.name == "mastar-goodspec-v3_1_1-v1_7_7.fits.gz"
    assert files.mastarall.name == "mastarall-v3_1_1-v1_7_7.fits"
    assert files.allstar.name == "allStar-dr17-synspec_rev1.fits"
    assert files.gaia_xmatch.name == "mastarall-gaiaedr3-extcorr-simbad-ps1-v3_1_1-v1_7_7-v1.fits"
    assert files.root.name == f"demo-v{demo.FORMAT_VERSION}-s{demo.DEFAULT_SEED}-n{N_STARS}"

    gv = read_goodvisits(files.mastarall)
    gs = read_goodstars(files.mastarall)
    assert len(spectra) == len(gv)
    key_spec = pd.DataFrame({k: spectra.meta[k] for k in VISIT_KEY})
    assert not key_spec.duplicated().any()
    pd.testing.assert_frame_equal(key_spec.reset_index(drop=True), gv[list(VISIT_KEY)].reset_index(drop=True),
                                  check_dtype=False)
    np.testing.assert_array_equal(spectra.meta["S2N"], gv["S2N"].to_numpy())
    assert spectra.meta["S2N"].dtype == np.float32

    # one GOODSTARS row per star, with its visit count
    assert gs["MANGAID"].is_unique
    assert set(gs["MANGAID"]) == set(gv["MANGAID"])
    nvis = gv.groupby("MANGAID").size()
    assert (gs.set_index("MANGAID")["NVISITS"] == nvis.reindex(gs["MANGAID"]).to_numpy()).all()
    # MILES and STELIB-only stars 1–5 visits; a shared star 1–3 more per STELIB spectrum
    assert gs["NVISITS"].max() <= 5 + 3

    manifest = json.loads(files.manifest.read_text())
    c = manifest["counts"]
    assert manifest["seed"] == demo.DEFAULT_SEED and manifest["n_stars"] == N_STARS
    assert c["visits"] == len(gv) and c["stars"] == len(gs)
    assert c["miles_stars"] == N_STARS and c["hc_stars"] == c["stars"] - N_STARS - c["stelib_only_stars"]
    assert c["miles_visits"] + c["stelib_visits"] + c["hc_visits"] == c["visits"]
    # n_stars = 80: the 3 STELIB stars among the first 80 MILES stars, ⌈80·88/984⌉ STELIB-only ones
    assert c["stelib_shared_stars"] == 3 and c["stelib_only_stars"] == 8
    assert c["stelib_library_overlap_stars"] == 117 and c["stelib_library_files"] == 255
    assert set(manifest["files"].values()) == {p.name for p in files.root.iterdir()} - {"manifest.json"}

    # MaStarHC targets: one visit each, unlabelled
    hc = gs[gs["MANGAID"].str.startswith("hc-")]
    assert len(hc) == c["hc_stars"] > 30
    assert (hc["NVISITS"] == 1).all() and (hc["INPUT_TEFF"].isna() | (hc["INPUT_TEFF"] == -999)).all()


def test_identifiers_and_metadata(files: DemoFiles) -> None:
    gv = read_goodvisits(files.mastarall)
    miles = gv[gv["MANGAID"].str.startswith("3-")]
    assert miles["MANGAID"].str.len().max() <= 22
    assert miles["PLATE"].between(8000, 12000).all() and gv["MJD"].between(57000, 59000).all()
    assert set(gv["IFUDESIGN"]) <= set(demo._IFUDESIGNS)
    # visits of a star differ in MJD; some repeat visits share a plate
    assert not gv.duplicated(["MANGAID", "MJD"]).any()
    per_star = miles.groupby("MANGAID")["PLATE"].agg(["size", "nunique"])
    assert (per_star["nunique"] < per_star["size"]).any()
    assert gv["RA"].between(0, 360).all() and gv["DEC"].between(-90, 90).all()
    assert (gv["EPOCH"] == 2000).all()
    assert _bit(gv["MJDQUAL"], MJDQUAL_BITS["EMLINE"]).any()
    lowsn = _bit(gv["MJDQUAL"], MJDQUAL_BITS["LOWSN"])
    np.testing.assert_array_equal(lowsn, gv["S2N"].to_numpy() <= 15)
    assert (gv["VELVARFLAG"] == 1).any()
    vv = gv[gv["VELVARFLAG"] == 1]
    assert (vv["DV_MAXSIG"] > 3).all()
    frac_hi = (gv["S2N"] >= 50).mean()
    assert 0.75 < frac_hi < 0.97


def test_gaia_xmatch(files: DemoFiles) -> None:
    g = read_gaia_xmatch(files.gaia_xmatch)
    gs = read_goodstars(files.mastarall)
    assert len(g) == len(gs) and set(g["MANGAID"]) == set(gs["MANGAID"])
    sid = g["SOURCE_ID"].to_numpy(dtype=np.int64)
    assert (sid > 0).all() and len(np.unique(sid)) == len(sid)
    sep = np.hypot((g["GAIARA"] - g["RA"]) * np.cos(np.radians(g["DEC"])), g["GAIADEC"] - g["DEC"]) * 3600
    assert sep.max() < 1.0
    assert g["PHOT_G_MEAN_MAG"].isna().all() and g["BPRPC"].isna().all()  # no invented photometry


def test_labels_csv(labels: pd.DataFrame, library: demo.MilesLibrary, files: DemoFiles) -> None:
    from mastar_vac.stages import read_labels_table

    assert list(labels.columns) == list(demo.LABEL_COLUMNS)
    c = json.loads(files.manifest.read_text())["counts"]
    assert len(labels) == N_STARS + c["stelib_only_stars"] and labels["mangaid"].is_unique
    miles = labels[labels["library"].str.startswith("MILES")]
    np.testing.assert_array_equal(miles["miles_id"], library.ids)
    row = labels.set_index("miles_id").loc[78]  # catalogue: 13800 2.44 9999
    assert row["teff"] == 13800 and row["logg"] == 2.44 and np.isnan(row["fe_h"])
    assert labels.set_index("miles_id").loc[4, "star_name"] == "HD000004"
    # adopted labels: MILES's for MILES stars (shared too), STELIB's for STELIB-only stars
    np.testing.assert_array_equal(miles["teff"], miles["miles_teff"])
    only = labels[labels["library"] == "STELIB"]
    assert len(only) == c["stelib_only_stars"] and only["miles_id"].isna().all()
    np.testing.assert_array_equal(only["teff"], only["stelib_teff"])
    assert only[["teff", "logg", "fe_h"]].notna().all().all()
    shared = labels[labels["library"] == "MILES+STELIB"]
    assert len(shared) == c["stelib_shared_stars"] and shared["stelib_id"].str.startswith("HD").all()
    assert (abs(shared["teff"] - shared["stelib_teff"]) < 200).all()  # HD002857: 7569 vs 7611 K
    # the pipeline's comparison reader still takes it, one row per MANGAID
    t = read_labels_table(files.labels)
    assert len(t) == len(labels) and t["ext_id"].is_unique


def test_miles_params_quirks() -> None:
    d = demo.templates_dir() / "miles"
    known = range(1, 986)
    params = demo.read_miles_params(d / "MILES_params.db", known_ids=known)
    assert len(params) == 985
    assert params[221] == (7950.0, 3.95, 0.35)  # printed "022."
    bad = [i for i, v in params.items() if not np.all(np.isfinite(v))]
    assert len(bad) == 39
    assert all(np.isnan(v) for v in params[407])  # 99999 9999 9999


# ---- determinism ------------------------------------------------------------------------


def test_deterministic(tmp_path: Path) -> None:
    a = demo_files(tmp_path / "a", n_stars=4)
    b = demo_files(tmp_path / "b", n_stars=4)
    c = demo_files(tmp_path / "c", n_stars=4, seed=7)
    for name in ("goodspec", "mastarall", "allstar", "gaia_xmatch", "labels", "visit_sources", "manifest"):
        assert getattr(a, name).read_bytes() == getattr(b, name).read_bytes(), name
    assert a.goodspec.read_bytes() != c.goodspec.read_bytes()
    with gzip.open(a.goodspec) as fh:  # still a valid gzip stream, named after itself
        assert fh.read(6) == b"SIMPLE"
    assert a.goodspec.read_bytes()[10:].startswith(b"mastar-goodspec-v3_1_1-v1_7_7.fits\0")
    assert a.allstar.read_bytes() != c.allstar.read_bytes()


# ---- spectra ------------------------------------------------------------------------------


def test_pixels_outside_miles_are_nodata(spectra, model: LsfModel, sources: pd.DataFrame) -> None:  # noqa: ANN001
    miles = (sources["LIBRARY"] == "MILES").to_numpy()
    hc = (sources["LIBRARY"] == "MASTARHC").to_numpy()
    lo, hi = model.miles_wave[0], model.miles_wave[-1]
    outside = (model.wave > hi - 1.0) | (model.wave < lo + 1.0)
    nodata = _bit(spectra.mask, MASK_BITS["NODATA"])
    assert outside.sum() > 1000  # MILES stops at ~7410 A, MaStar goes to 10354 A
    assert (spectra.ivar[miles][:, outside] == 0).all()
    assert nodata[miles][:, outside].all()
    assert (spectra.flux[miles][:, outside] == 0).all()
    inside = (model.wave > lo + 5) & (model.wave < hi - 5)
    assert not nodata[miles | hc][:, inside].any()
    # the MaStarHC visits are real and cover the whole grid
    assert (spectra.ivar[hc][:, outside] > 0).mean() > 0.95


def test_snr_matches_s2n(spectra) -> None:  # noqa: ANN001
    ok = (spectra.ivar > 0) & np.isfinite(spectra.flux)
    s2n = spectra.meta["S2N"]
    checked = 0
    for i in np.flatnonzero(s2n > 0):
        med = np.median(spectra.flux[i][ok[i]] * np.sqrt(spectra.ivar[i][ok[i]]))
        assert abs(med / s2n[i] - 1) < 0.15, (i, med, s2n[i])
        checked += 1
    assert checked == len(s2n) - 1  # all but the zero-ivar visit


def test_lsf_kernel_variance_in_miles_frame(model: LsfModel) -> None:
    factor = 1.04
    s = model.extra_sigma_pix(factor)
    j = int(np.searchsorted(model.miles_wave, 6000.0))
    target_pix = model.target_sigma_miles[j] * factor / model.miles_dlam[j]
    assert target_pix > MILES_SIGMA_PIX  # MaStar is coarser than MILES here
    assert np.isclose(s[j] ** 2, target_pix**2 - MILES_SIGMA_PIX**2)
    delta = np.zeros(model.miles_wave.size)
    delta[j] = 1.0
    out = lsf.broaden(delta, s)
    k = np.arange(delta.size) - j
    assert np.isclose(out.sum(), 1.0, rtol=1e-3)  # gather form: σ varies across the kernel
    assert np.isclose((out * k**2).sum(), s[j] ** 2, rtol=0.02)  # local σ varies slowly
    # nothing is sharpened where MaStar is finer than MILES
    assert (model.extra_sigma_pix(0.5) == 0).any() and (s >= 0).all()


def test_disp_is_target_times_visit_factor(spectra, model: LsfModel, sources: pd.DataFrame) -> None:  # noqa: ANN001
    miles = (sources["LIBRARY"] == "MILES").to_numpy()
    lo, hi = demo.LSF_FACTOR_RANGE
    # where even the sharpest factor is coarser than MILES (σ_target > 1.25 σ_MILES there)
    red = (model.wave > 6300) & (model.wave < 7300)
    assert (lo * model.target_sigma[red] > model.miles_sigma[red]).all()
    ratio = spectra.disp[miles][:, red] / model.target_sigma[red]
    f = np.median(ratio, axis=1)
    assert np.allclose(ratio, f[:, None], rtol=2e-3)  # one factor per visit
    assert f.min() >= lo - 1e-3 and f.max() <= hi + 1e-3
    # the real library's spread (issue 14): of order ±10% in σ, sharper and broader visits
    assert 0.06 < f.std() < 0.10 and (f < 0.9).any() and (f > 1.1).any()
    assert np.isfinite(spectra.disp).all() and (spectra.disp > 0).all()
    # where MILES is coarser than a sharp visit's LSF, DISP is MILES's σ (honest), never less
    assert (spectra.disp[miles] >= model.miles_sigma * (1 - 2e-3)).all()


def test_visit_matches_degraded_miles(spectra, model: LsfModel, library: demo.MilesLibrary,
                                      labels: pd.DataFrame, sources: pd.DataFrame) -> None:  # noqa: ANN001
    """A high-S/N visit is the MILES spectrum at the recorded LSF, plus noise: χ²/pixel ≈ 1
    at DISP's factor and clearly worse without the extra broadening or with 10% more."""
    index = {m: i for i, m in enumerate(labels["mangaid"])}
    red = (model.wave > 6300) & (model.wave < 7300)  # where DISP is factor·σ_target for every factor
    mid = spectra.meta["MANGAID"].astype(str)
    miles = (sources["LIBRARY"] == "MILES").to_numpy()
    rows = [i for i in np.flatnonzero((spectra.meta["S2N"] > 120) & miles) if mid[i] in index][:6]
    assert rows
    for v in rows:
        k = index[mid[v]]
        f = float(np.median(spectra.disp[v][red] / model.target_sigma[red]))
        chi = []
        for factor in (f, 0.0, 1.1 * f):
            exp = degrade_miles(library.flux[k], model, [factor])[0][0]
            ok = (spectra.ivar[v] > 0) & np.isfinite(spectra.flux[v]) & np.isfinite(exp)
            w = spectra.ivar[v][ok]
            a = np.sum(spectra.flux[v][ok] * exp[ok] * w) / np.sum(exp[ok] ** 2 * w)
            chi.append(np.mean((spectra.flux[v][ok] - a * exp[ok]) ** 2 * w))
        assert 0.85 < chi[0] < 1.15, (mid[v], chi)
        assert chi[0] < chi[1] and chi[0] < chi[2], (mid[v], chi)


def test_pixel_problems(spectra, files: DemoFiles) -> None:  # noqa: ANN001
    zero = np.flatnonzero((spectra.ivar == 0).all(axis=1))
    assert len(zero) == 1
    gv = read_goodvisits(files.mastarall)
    z = zero[0]
    assert gv.iloc[z]["MANGAID"] == spectra.meta["MANGAID"][z]
    assert gv.iloc[z]["BADPIXFRAC"] == 1.0 and spectra.meta["S2N"][z] == 0
    manifest = json.loads(files.manifest.read_text())
    assert manifest["special_rows"]["zero_ivar_visit_row"] == z
    cosmic = _bit(spectra.mask, MASK_BITS["COSMIC"])
    assert cosmic.any(axis=1).sum() >= 1
    assert (spectra.ivar[cosmic] == 0).all()
    assert (~np.isfinite(spectra.flux)).any(axis=1).sum() >= 1
    # MILES pixels <= 0 are masked, not passed on as data
    badpix = _bit(spectra.mask, MASK_BITS["BADPIX"])
    assert (spectra.ivar[badpix] == 0).all()


# ---- STELIB visits ---------------------------------------------------------------------------


def test_visit_sources_table(files: DemoFiles, spectra, sources: pd.DataFrame) -> None:  # noqa: ANN001
    key = pd.DataFrame({k: spectra.meta[k] for k in VISIT_KEY}).astype({"PLATE": int, "MJD": int, "IFUDESIGN": str})
    pd.testing.assert_frame_equal(sources[list(VISIT_KEY)].astype({"PLATE": int, "MJD": int}), key,
                                  check_dtype=False)
    assert set(sources["LIBRARY"]) == {"MILES", "STELIB", "MASTARHC"}
    c = json.loads(files.manifest.read_text())["counts"]
    assert (sources["LIBRARY"] == "STELIB").sum() == c["stelib_visits"] > 0
    st = sources[sources["LIBRARY"] == "STELIB"]
    assert st["LIBRARY_ID"].str.match(r"^(HD\d{6}|[A-Z])").all()
    # STELIB (3.4 Å) is coarser than MaStar in the blue: the boundary lies near 6,000–7,500 Å
    # for a visit of median LSF, from ~5,000 Å (the broadest visits) to beyond STELIB's
    # red end (the sharpest: STELIB is coarser than them everywhere)
    assert st["COARSER_BELOW"].between(5000, 10400).all()
    assert (sources.loc[sources["LIBRARY"] == "MASTARHC", "COARSER_BELOW"] == 0).all()


def test_stelib_visits_reach_the_red(spectra, model: LsfModel, sources: pd.DataFrame) -> None:  # noqa: ANN001
    stelib = (sources["LIBRARY"] == "STELIB").to_numpy()
    red = model.wave > 7410.0  # beyond MILES
    good_red = ((spectra.ivar > 0) & red).sum(axis=1)
    assert (good_red[stelib] > 0).all() and np.median(good_red[stelib]) > 200
    assert (good_red[(sources["LIBRARY"] == "MILES").to_numpy()] == 0).all()
    # the Ca triplet (8,498–8,662 Å air) is usable in most STELIB visits
    cat = (model.wave > 8490) & (model.wave < 8680)
    assert ((spectra.ivar[stelib][:, cat] > 0).all(axis=1)).mean() > 0.5
    # beyond STELIB's red end (~9,600 Å air) there is no data
    beyond = model.wave > 9900
    assert (spectra.ivar[stelib][:, beyond] == 0).all()
    assert _bit(spectra.mask[stelib][:, beyond], MASK_BITS["NODATA"]).all()


def test_telluric_pixels_masked(spectra, model: LsfModel, sources: pd.DataFrame) -> None:  # noqa: ANN001
    from mastar_vac.wavegrid import air_to_vacuum

    stelib = (sources["LIBRARY"] == "STELIB").to_numpy()
    tell = _bit(spectra.mask, demo.TELLURIC_MASK_BIT)
    assert demo.TELLURIC_MASK_BIT == MASK_BITS["BADFLUXFACTOR"] == 27
    for lo, hi, name in demo.TELLURIC_BANDS_AIR:
        a, b = air_to_vacuum(np.array([lo, hi]))
        band = (model.wave >= a) & (model.wave <= b)
        assert (spectra.ivar[stelib][:, band] == 0).all(), name
        covered = ~_bit(spectra.mask[stelib][:, band], MASK_BITS["NODATA"])
        assert (tell[stelib][:, band] == covered).all(), name
    assert tell[stelib].any(axis=1).all()
    assert not tell[~stelib].any()  # MILES is telluric-corrected, MaStarHC is survey data


def test_stelib_disp(spectra, model: LsfModel, sources: pd.DataFrame) -> None:  # noqa: ANN001
    stelib_sigma = demo.STELIB_FWHM * lsf.FWHM_TO_SIGMA  # air Å; vacuum Å are 1.0003× wider
    rows = np.flatnonzero((sources["LIBRARY"] == "STELIB").to_numpy())
    for v in rows:
        d = spectra.disp[v]
        assert (d >= stelib_sigma * (1 - 1e-3)).all()
        edge = float(sources["COARSER_BELOW"].iloc[v])
        blue = model.wave < edge - 20
        red = model.wave > edge + 20
        # where STELIB is coarser DISP is STELIB's own σ; redward it is factor·σ_target
        assert np.allclose(d[blue], stelib_sigma * 1.0003, rtol=2e-3)
        f = np.median(d[red] / model.target_sigma[red])
        assert demo.LSF_FACTOR_RANGE[0] - 1e-3 <= f <= demo.LSF_FACTOR_RANGE[1] + 1e-3
        assert np.allclose(d[red], f * model.target_sigma[red], rtol=2e-3)
        # blueward of the boundary STELIB is coarser, or (for the sharpest factors, 7,700–8,700 Å)
        # equal to within 0.2%: the boundary is the reddest pixel where it is coarser
        assert (d[blue] >= f * model.target_sigma[blue] * (1 - 2e-3)).all()


def test_stelib_visit_matches_degraded_stelib(spectra, model: LsfModel, sources: pd.DataFrame,
                                              stelib_lib: demo.StelibStars) -> None:  # noqa: ANN001
    """A STELIB visit is its STELIB spectrum at the recorded LSF plus noise (χ²/pixel ≈ 1)."""
    by_name = {s.name: s for s in stelib_lib.spectra}
    rows = np.flatnonzero((sources["LIBRARY"] == "STELIB").to_numpy() & (spectra.meta["S2N"] > 30))[:4]
    assert len(rows)
    red = (model.wave > 7000) & (model.wave < 9000)
    for v in rows:
        spec = by_name[sources["LIBRARY_ID"].iloc[v]]
        f = float(np.median(spectra.disp[v][red] / model.target_sigma[red]))
        exp = demo.degrade_stelib(spec, model, [f])[0][0]
        ok = (spectra.ivar[v] > 0) & np.isfinite(spectra.flux[v]) & np.isfinite(exp)
        w = spectra.ivar[v][ok]
        a = np.sum(spectra.flux[v][ok] * exp[ok] * w) / np.sum(exp[ok] ** 2 * w)
        chi = np.mean((spectra.flux[v][ok] - a * exp[ok]) ** 2 * w)
        assert 0.85 < chi < 1.15, (sources["LIBRARY_ID"].iloc[v], chi)


def test_shared_stars_are_one_star(files: DemoFiles, labels: pd.DataFrame, sources: pd.DataFrame) -> None:
    """A STELIB star that is a MILES star is the same demo star: one MANGAID, one GOODSTARS
    row with MILES's labels, one Gaia row; its STELIB spectra are more of its visits."""
    gs = read_goodstars(files.mastarall).set_index("MANGAID")
    g = read_gaia_xmatch(files.gaia_xmatch)
    shared = labels[labels["library"] == "MILES+STELIB"]
    assert len(shared) == 3
    for _, row in shared.iterrows():
        libs = set(sources.loc[sources["MANGAID"] == row["mangaid"], "LIBRARY"])
        assert libs == {"MILES", "STELIB"}
        ids = set(sources.loc[(sources["MANGAID"] == row["mangaid"]) & (sources["LIBRARY"] == "STELIB"),
                              "LIBRARY_ID"])
        assert ids == set(row["stelib_id"].split(";"))
        assert gs.loc[row["mangaid"], "INPUT_TEFF"] == row["miles_teff"]
        assert gs.loc[row["mangaid"], "INPUT_SOURCE"] == "MILES"
        assert (g["MANGAID"] == row["mangaid"]).sum() == 1
    # STELIB-only stars have their own MANGAID, STELIB visits only and STELIB's labels
    only = labels[labels["library"] == "STELIB"]
    for _, row in only.iterrows():
        assert set(sources.loc[sources["MANGAID"] == row["mangaid"], "LIBRARY"]) == {"STELIB"}
        assert gs.loc[row["mangaid"], "INPUT_SOURCE"] == "STELIB"
        assert np.isclose(gs.loc[row["mangaid"], "INPUT_TEFF"], row["stelib_teff"])
    # no STELIB spectrum of a MILES star is given a STELIB-only MANGAID
    assert not set(only["stelib_id"]) & set(shared["stelib_id"])


# ---- allStar (the APOGEE overlap) --------------------------------------------------------


def _allstar_mangaid(files: DemoFiles, a: pd.DataFrame) -> np.ndarray:
    """MANGAID of every allStar row: by Gaia id, else by position (as the pipeline does)."""
    g = read_gaia_xmatch(files.gaia_xmatch)
    by_id = dict(zip(g["SOURCE_ID"].astype("int64"), g["MANGAID"]))
    out = []
    for sid, ra, dec in zip(a["GAIAEDR3_SOURCE_ID"], a["RA"], a["DEC"]):
        if sid > 0:
            out.append(by_id[int(sid)])
        else:
            d = np.hypot((g["RA"] - ra) * np.cos(np.radians(dec)), g["DEC"] - dec) * 3600
            assert d.min() < 1.5
            out.append(g["MANGAID"].iloc[int(np.argmin(d))])
    return np.array(out)


def test_allstar_overlap(files: DemoFiles, labels: pd.DataFrame) -> None:
    a = read_allstar(files.allstar)
    raw = read_table(files.allstar, columns=["TEFF", "LOGG", "FE_H"])
    mangaid = _allstar_mangaid(files, a)
    lab = labels.set_index("mangaid")
    valid_lab = lab[["teff", "logg", "fe_h"]].notna().all(axis=1)
    assert set(mangaid) <= set(lab.index)  # only labelled-library (MILES, STELIB-only) stars
    valid_row = a[["TEFF", "LOGG", "FE_H"]].notna().all(axis=1).to_numpy()
    # no star with a catalogue placeholder appears with valid labels
    assert valid_lab.reindex(mangaid[valid_row]).all()
    # valid rows carry the catalogue labels (the duplicate rows are perturbed)
    main = valid_row & ~_bit(a["EXTRATARG"], EXTRATARG_DUPLICATE)
    np.testing.assert_allclose(a["TEFF"][main], lab.loc[mangaid[main], "teff"], rtol=1e-6)
    np.testing.assert_allclose(a["FE_H"][main], lab.loc[mangaid[main], "fe_h"], atol=1e-6)
    np.testing.assert_allclose(a["M_H"][main], a["FE_H"][main])
    assert a["ALPHA_M"].isna().all() and a["VMICRO"].isna().all()
    # most labelled stars are in the overlap
    frac = len(set(mangaid[valid_row])) / valid_lab.sum()
    assert 0.7 < frac <= 1.0
    # missing labels come as NaN and as -9999 in the file
    teff_raw = np.asarray(raw["TEFF"])
    assert np.isnan(teff_raw).any() and (teff_raw == -9999).any()
    # Gaia ids: most match the crossmatch VAC, some are 0 (positional fallback)
    sid = a["GAIAEDR3_SOURCE_ID"].to_numpy()
    assert (sid == 0).any() and (sid > 0).mean() > 0.6
    assert a["APOGEE_ID"].str.startswith("2M").all()


def test_allstar_flags(files: DemoFiles) -> None:
    a = read_allstar(files.allstar)
    dup = _bit(a["EXTRATARG"], EXTRATARG_DUPLICATE)
    assert dup.sum() >= 1
    primary_ids = set(a["APOGEE_ID"][~dup])
    assert set(a["APOGEE_ID"][dup]) <= primary_ids  # a second row of a star already there
    assert _bit(a["ASPCAPFLAG"], ASPCAPFLAG_BITS["STAR_BAD"]).sum() >= 1
    binary = _bit(a["ASPCAPFLAG"], ASPCAPFLAG_BITS["MULTIPLE_SUSPECT"])
    for bit in STARFLAG_BITS.values():
        binary |= _bit(a["STARFLAG"], bit)
    assert binary.sum() >= 1
    assert (a["VSCATTER"][binary] >= 1).all()


# ---- cache ------------------------------------------------------------------------------------


def test_cache_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = demo_files(tmp_path, n_stars=2)
    mtimes = {p.name: p.stat().st_mtime_ns for p in first.root.iterdir()}

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("rebuilt")

    monkeypatch.setattr(demo, "build_demo", boom)
    again = demo_files(tmp_path, n_stars=2)
    assert again == first
    assert {p.name: p.stat().st_mtime_ns for p in again.root.iterdir()} == mtimes
    # the environment variable names the default cache
    monkeypatch.setenv("MASTAR_VAC_CACHE", str(tmp_path))
    assert demo.default_cache_dir() == tmp_path
    assert demo_files(n_stars=2) == first
    # force rebuilds (and here fails), leaving the existing demo and no partial build
    with pytest.raises(AssertionError, match="rebuilt"):
        demo_files(tmp_path, n_stars=2, force=True)
    assert first.complete()
    assert not [p for p in tmp_path.iterdir() if ".part-" in p.name]


def test_killed_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = demo.build_demo

    def half(out_dir: Path, **kwargs: object) -> dict:
        real(out_dir, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "build_demo", half)
    with pytest.raises(KeyboardInterrupt):
        demo_files(tmp_path, n_stars=1)
    assert list(tmp_path.iterdir()) == []
    # an incomplete demo directory (no manifest) is rebuilt
    monkeypatch.setattr(demo, "build_demo", real)
    files = demo_files(tmp_path, n_stars=1)
    files.manifest.unlink()
    files = demo_files(tmp_path, n_stars=1)
    assert files.complete()


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.main(["--cache", str(tmp_path), "--n-stars", "1", "-q"]) == 0
    out = capsys.readouterr().out
    assert "mastar-goodspec-v3_1_1-v1_7_7.fits.gz" in out and "visits" in out
    assert os.path.isdir(tmp_path / f"demo-v{demo.FORMAT_VERSION}-s{demo.DEFAULT_SEED}-n1")
    assert demo.main(["--cache", str(tmp_path), "--n-stars", "0", "-q"]) == 1
