"""FERRE grid reader/writer and cubic interpolation (mastar_vac.io.ferre)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from mastar_vac.errors import InputFileError
from mastar_vac.io.ferre import FerreGrid, interpolate, read_ferre, read_ferre_header, write_ferre
from mastar_vac.wavegrid import air_to_vacuum

LABELS = ["TEFF", "LOGG", "METALS"]
LLIMITS = np.array([4000.0, 1.0, -1.5])
STEPS = np.array([500.0, 1.0, 0.5])
N_P = (5, 4, 4)
NPIX = 200

WAVES = {  # name: (header keys, expected vacuum wavelengths)
    "linear-air": ({"WAVE": [4000.0, 2.0], "LOGW": 0, "VACUUM": 0},
                   air_to_vacuum(4000.0 + 2.0 * np.arange(NPIX))),
    "log10-vacuum": ({"WAVE": [3.6, 1.0e-4], "LOGW": 1, "VACUUM": 1},
                     10.0 ** (3.6 + 1.0e-4 * np.arange(NPIX))),
    "log10-air": ({"WAVE": [3.6, 1.0e-4], "LOGW": 1, "VACUUM": 0},
                  air_to_vacuum(10.0 ** (3.6 + 1.0e-4 * np.arange(NPIX)))),
    "ln-vacuum": ({"WAVE": [8.3, 2.0e-4], "LOGW": 2, "VACUUM": 1},
                  np.exp(8.3 + 2.0e-4 * np.arange(NPIX))),
}


def nodes_of(i: int) -> np.ndarray:
    return LLIMITS[i] + STEPS[i] * np.arange(N_P[i])


def analytic(teff, logg, mh, pix=np.arange(NPIX)):  # noqa: ANN001, ANN201
    """A smooth, non-polynomial spectrum: a line whose depth and width vary with the labels."""
    teff, logg, mh = (np.asarray(v, dtype=np.float64)[..., None] for v in (teff, logg, mh))
    depth = 0.4 + 0.15 * np.sin(teff / 1500.0) + 0.05 * np.cos(logg) + 0.1 * np.exp(0.5 * mh)
    width = 12.0 + 2.0 * np.tanh((teff - 5000.0) / 2000.0) + 0.5 * logg
    return 1.0 - depth * np.exp(-0.5 * ((pix - 100.0) / width) ** 2)


def cubic_poly(teff, logg, mh, pix=np.arange(NPIX)):  # noqa: ANN001, ANN201
    """Degree ≤ 3 in every label (a tensor product plus cross terms)."""
    t = (np.asarray(teff, dtype=np.float64)[..., None] - 5000.0) / 1000.0
    g = np.asarray(logg, dtype=np.float64)[..., None]
    m = np.asarray(mh, dtype=np.float64)[..., None]
    p = pix / NPIX
    return (1.0 + 0.3 * t - 0.2 * t**2 + 0.1 * t**3) * (1.0 + 0.1 * g - 0.02 * g**3) * (2.0 + m + 0.5 * m**3) \
        + p * t * g * m + 0.5 * p**2 * t**3 * m**2


def model_flux(fn) -> np.ndarray:  # noqa: ANN001
    T, G, M = np.meshgrid(nodes_of(0), nodes_of(1), nodes_of(2), indexing="ij")
    return fn(T, G, M).astype(np.float32)


def parts(fn=analytic, wave="log10-vacuum", **extra) -> dict:  # noqa: ANN001, ANN003
    header = dict(WAVES[wave][0])
    header.update({"RESOLUTION": 2000.0, "ID": "test grid, it's synthetic", "SYNTHFILE_INTERNAL": "x.syn"})
    header.update(extra)
    return {"flux": model_flux(fn), "llimits": LLIMITS, "steps": STEPS, "labels": LABELS, "header": header}


@pytest.fixture(scope="module")
def grid() -> FerreGrid:
    p = parts(analytic)
    return FerreGrid(labels=LABELS, llimits=LLIMITS, steps=STEPS, n_p=N_P, wave=WAVES["log10-vacuum"][1],
                     flux=p["flux"], header=p["header"])


@pytest.fixture(scope="module")
def poly_grid() -> FerreGrid:
    p = parts(cubic_poly)
    return FerreGrid(labels=LABELS, llimits=LLIMITS, steps=STEPS, n_p=N_P, wave=WAVES["log10-vacuum"][1],
                     flux=p["flux"], header=p["header"])


# ----------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("binary", [False, True], ids=["ascii", "binary"])
@pytest.mark.parametrize("wave", list(WAVES))
def test_round_trip(tmp_path: Path, binary: bool, wave: str) -> None:
    p = parts(analytic, wave=wave)
    out = write_ferre(tmp_path / ("g.dat" if not binary else "g"), p, binary=binary)
    assert out.suffix == (".hdr" if binary else ".dat")
    if binary:
        assert (tmp_path / "g.unf").stat().st_size == 4 * np.prod(N_P) * NPIX
    g = read_ferre(out)
    assert g.labels == LABELS
    assert g.n_p == N_P
    np.testing.assert_array_equal(g.llimits, LLIMITS)
    np.testing.assert_array_equal(g.steps, STEPS)
    assert g.flux.dtype == np.float32 and g.flux.shape == N_P + (NPIX,)
    np.testing.assert_array_equal(g.flux, p["flux"])
    np.testing.assert_allclose(g.wave, WAVES[wave][1], rtol=1e-12)
    assert np.all(np.isfinite(g.wave))
    assert g.header["RESOLUTION"] == 2000.0
    assert g.header["ID"] == "test grid, it's synthetic"
    assert g.header["SYNTHFILE_INTERNAL"] == "x.syn"
    assert ("air" in g.wave_note) == (WAVES[wave][0]["VACUUM"] == 0)
    # writing the grid that was read reproduces the file's header wavelengths
    again = read_ferre(write_ferre(tmp_path / "again.dat", g))
    np.testing.assert_array_equal(again.wave, g.wave)
    np.testing.assert_array_equal(again.flux, g.flux)


def test_binary_opened_from_unf_and_memmap(tmp_path: Path) -> None:
    p = parts(analytic)
    write_ferre(tmp_path / "grid.hdr", p, binary=True)
    a = read_ferre(tmp_path / "grid.unf")
    b = read_ferre(tmp_path / "grid.hdr", mmap=True)
    np.testing.assert_array_equal(a.flux, p["flux"])
    np.testing.assert_array_equal(np.asarray(b.flux), p["flux"])
    assert read_ferre_header(tmp_path / "grid.unf")["NPIX"] == NPIX


def test_data_order_label1_slowest(tmp_path: Path) -> None:
    """The k-th model in the file is node (i, j, l) with LABEL(1) slowest."""
    flux = np.zeros(N_P + (NPIX,), np.float32)
    for i in range(N_P[0]):
        for j in range(N_P[1]):
            for m in range(N_P[2]):
                flux[i, j, m] = 100 * i + 10 * j + m
    write_ferre(tmp_path / "o.dat", {"flux": flux, "llimits": LLIMITS, "steps": STEPS,
                                      "header": {"WAVE": [1000.0, 1.0], "VACUUM": 1}})
    text = (tmp_path / "o.dat").read_text().split("/\n", 1)[1].splitlines()
    assert [float(line.split()[0]) for line in text[:6]] == [0, 1, 2, 3, 10, 11]
    assert read_ferre(tmp_path / "o.dat").labels == ["PAR1", "PAR2", "PAR3"]


def test_ascii_wrapped_lines_fortran_exponents_lowercase_keys(tmp_path: Path) -> None:
    flux = model_flux(analytic)
    lines = [" &synth", " n_of_dim = 3", " n_p = 5 4 4", " label(1) = 'TEFF'", " Label(2) = 'LOGG'",
             " LABEL(3) = 'METALS'", " npix = 200", " llimits = 4000.0 1.0", "    -1.5",  # continuation line
             " steps = 500., 1., 0.5", " wave = 3.6d0 1.0D-4", " logw = 1", " vacuum = 1",
             " comments1 = 'a = b'", " /"]
    body = []
    for row in flux.reshape(-1, NPIX):
        vals = [f"{v:.9E}".replace("E", "D") for v in row]
        body += [" ".join(vals[k:k + 7]) for k in range(0, NPIX, 7)]  # models wrap over lines
    (tmp_path / "w.dat").write_text("\n".join(lines + body) + "\n")
    g = read_ferre(tmp_path / "w.dat")
    assert g.labels == LABELS and g.n_p == N_P
    np.testing.assert_array_equal(g.llimits, LLIMITS)
    np.testing.assert_array_equal(g.flux, flux)
    np.testing.assert_allclose(g.wave, WAVES["log10-vacuum"][1], rtol=1e-12)
    assert g.header["COMMENTS1"] == "a = b"


def test_vacuum_absent_means_air(tmp_path: Path) -> None:
    p = parts(analytic, wave="log10-vacuum")
    del p["header"]["VACUUM"]
    g = read_ferre(write_ferre(tmp_path / "a.dat", p))
    np.testing.assert_allclose(g.wave, WAVES["log10-air"][1], rtol=1e-12)
    assert "assumed" in g.wave_note


def test_nodes_and_label_range(grid: FerreGrid) -> None:
    for i in range(3):
        np.testing.assert_array_equal(grid.nodes(i), nodes_of(i))
    np.testing.assert_array_equal(grid.nodes("logg"), nodes_of(1))
    lo, hi = grid.label_range
    np.testing.assert_array_equal(lo, [4000.0, 1.0, -1.5])
    np.testing.assert_array_equal(hi, [6000.0, 4.0, 0.0])
    with pytest.raises(KeyError, match="VMICRO"):
        grid.nodes("VMICRO")


# ----------------------------------------------------------------------------- interpolation


def test_interpolation_exact_at_every_node(grid: FerreGrid) -> None:
    T, G, M = np.meshgrid(nodes_of(0), nodes_of(1), nodes_of(2), indexing="ij")
    pts = np.column_stack([T.ravel(), G.ravel(), M.ravel()])
    out = interpolate(grid, pts)
    np.testing.assert_array_equal(out, grid.flux.reshape(-1, NPIX))
    # a node reached through float arithmetic (0.1 + 0.2 style) is still exact
    p = np.array([4000.0 + 3 * (500.0 / 3.0), 1.0 + 0.1 + 0.2 - 0.3, -1.5 + 3 * 0.5])
    np.testing.assert_array_equal(interpolate(grid, p), grid.flux[1, 0, 3])


def test_interpolation_reproduces_cubic_polynomials(poly_grid: FerreGrid) -> None:
    rng = np.random.default_rng(1)
    lo, hi = poly_grid.label_range
    pts = rng.uniform(lo, hi, (300, 3))
    pts[:3] = lo  # the corners and edge intervals use one-sided stencils
    pts[3:6] = hi
    out = interpolate(poly_grid, pts)
    truth = cubic_poly(pts[:, 0], pts[:, 1], pts[:, 2])
    scale = np.abs(truth).max()
    assert np.max(np.abs(out - truth)) < 2e-6 * scale


def test_interpolation_between_nodes_matches_analytic(grid: FerreGrid) -> None:
    rng = np.random.default_rng(2)
    lo, hi = grid.label_range
    pts = rng.uniform(lo, hi, (400, 3))
    out = interpolate(grid, pts)
    truth = analytic(pts[:, 0], pts[:, 1], pts[:, 2])
    err = np.abs(out - truth)
    assert err.max() < 5e-3
    # cubic must clearly beat multilinear interpolation on a smooth function (the Lagrange
    # error bounds give ~0.2 in interior intervals and ~0.33 in edge ones)
    from scipy.interpolate import RegularGridInterpolator

    lin = RegularGridInterpolator([nodes_of(i) for i in range(3)], grid.flux.astype(np.float64))(pts)
    assert np.sqrt(np.mean(err**2)) < 0.4 * np.sqrt(np.mean((lin - truth) ** 2))


def test_interpolation_single_point_shape(grid: FerreGrid) -> None:
    assert interpolate(grid, [5100.0, 2.2, -0.3]).shape == (NPIX,)
    assert interpolate(grid, [[5100.0, 2.2, -0.3]]).shape == (1, NPIX)


@pytest.mark.parametrize("point, label", [
    ([3999.0, 2.0, -1.0], "TEFF"), ([6000.5, 2.0, -1.0], "TEFF"),
    ([5000.0, 0.5, -1.0], "LOGG"), ([5000.0, 2.0, 0.01], "METALS"),
])
def test_refuses_to_extrapolate(grid: FerreGrid, point: list[float], label: str) -> None:
    with pytest.raises(ValueError, match=label) as exc:
        interpolate(grid, [[5000.0, 2.0, -1.0], point])
    msg = str(exc.value)
    lo, hi = grid.label_range
    i = LABELS.index(label)
    assert f"[{lo[i]:g}, {hi[i]:g}]" in msg and "point 1" in msg


def test_clip_moves_points_onto_the_edge(grid: FerreGrid) -> None:
    out = interpolate(grid, [[7000.0, 0.0, 0.5]], clip=True)
    np.testing.assert_array_equal(out[0], grid.flux[-1, 0, -1])


def test_rejects_wrong_number_of_labels_and_nan(grid: FerreGrid) -> None:
    with pytest.raises(ValueError, match="3 axes"):
        interpolate(grid, [[5000.0, 2.0]])
    with pytest.raises(ValueError, match="non-finite LOGG"):
        interpolate(grid, [[5000.0, np.nan, -1.0]])


def test_linear_fallback_for_short_axes() -> None:
    """Axes of 2-3 nodes are linear, of 1 node constant; others stay cubic."""
    n_p = (6, 3, 1)
    ll, st = np.array([0.0, 0.0, 7.0]), np.array([1.0, 1.0, 1.0])
    a = np.arange(6.0)[:, None, None, None]
    b = np.arange(3.0)[None, :, None, None]
    pix = np.arange(5.0)[None, None, None, :]
    flux = ((a**3 - 2 * a) * (1 + 2 * b) + pix).repeat(1, axis=2).astype(np.float32)
    g = FerreGrid(labels=["A", "B", "C"], llimits=ll, steps=st, n_p=n_p, wave=None, flux=flux, header={})
    pts = np.array([[2.5, 0.5, 7.0], [0.3, 1.75, 7.0], [4.9, 2.0, 7.0]])
    truth = (pts[:, :1] ** 3 - 2 * pts[:, :1]) * (1 + 2 * pts[:, 1:2]) + np.arange(5.0)
    np.testing.assert_allclose(interpolate(g, pts), truth, rtol=1e-5, atol=1e-5)
    # quadratic along the 3-node axis is interpolated linearly (not exactly)
    flux2 = (np.zeros((6, 1, 1, 1)) + np.array([0.0, 1.0, 4.0])[None, :, None, None] + 0 * pix).astype(np.float32)
    g2 = FerreGrid(labels=["A", "B", "C"], llimits=ll, steps=st, n_p=n_p, wave=None, flux=flux2, header={})
    np.testing.assert_allclose(interpolate(g2, [[1.0, 0.5, 7.0]]), 0.5)
    with pytest.raises(ValueError, match="C"):
        interpolate(g, [[1.0, 1.0, 7.5]])


def test_invalid_code_poisons_only_models_that_touch_it(grid: FerreGrid) -> None:
    flux = grid.flux.copy()
    flux[2, 1, 1, 50:60] = -999.0
    g = FerreGrid(labels=LABELS, llimits=LLIMITS, steps=STEPS, n_p=N_P, wave=grid.wave, flux=flux,
                  header={**grid.header, "INVALID_CODE": -999.0})
    near = interpolate(g, [[5100.0, 2.3, -0.8]])[0]  # stencil includes node (2, 1, 1)
    assert np.all(np.isnan(near[50:60]))
    assert np.all(np.isfinite(near[:50])) and np.all(np.isfinite(near[60:]))
    np.testing.assert_allclose(near[:50], interpolate(grid, [[5100.0, 2.3, -0.8]])[0, :50], rtol=1e-6)
    # an exact node beside the bad one has zero weight on it: finite and exact
    np.testing.assert_array_equal(interpolate(g, [[5000.0, 3.0, -1.0]])[0], flux[2, 2, 1])
    # a point whose stencil avoids the bad node (exactly on another TEFF node) is untouched
    assert np.all(np.isfinite(interpolate(g, [[4000.0, 2.5, -0.8]])))
    assert np.all(np.isnan(interpolate(g, [[5000.0, 2.0, -1.0]])[0, 50:60]))


# ----------------------------------------------------------------------------- errors


def _write_header(path: Path, lines: list[str], data: str = "") -> Path:
    path.write_text(" &SYNTH\n" + "".join(f" {s}\n" for s in lines) + " /\n" + data)
    return path


GOOD = ["N_OF_DIM = 2", "N_P = 2 3", "NPIX = 4", "LLIMITS = 0.0 1.0", "STEPS = 1.0 0.5", "WAVE = 4000.0 1.0",
        "VACUUM = 1"]
GOOD_DATA = "\n".join(" ".join(str(float(4 * k + j)) for j in range(4)) for k in range(6)) + "\n"


def test_good_minimal_file_reads(tmp_path: Path) -> None:
    g = read_ferre(_write_header(tmp_path / "m.dat", GOOD, GOOD_DATA))
    assert g.flux.shape == (2, 3, 4) and g.flux[1, 2, 3] == 23.0


def _assert_input_error(path: Path, *needles: str, reader=read_ferre) -> InputFileError:  # noqa: ANN001
    with pytest.raises(InputFileError) as exc:
        reader(path)
    msg = str(exc.value)
    for n in needles:
        assert n in msg, msg
    return exc.value


def test_error_missing_file(tmp_path: Path) -> None:
    err = _assert_input_error(tmp_path / "nope.dat", "nope.dat", "not found")
    assert err.path.endswith("nope.dat")


def test_error_missing_unf(tmp_path: Path) -> None:
    _write_header(tmp_path / "b.hdr", GOOD)
    _assert_input_error(tmp_path / "b.hdr", "b.unf", "missing")


def test_error_missing_hdr(tmp_path: Path) -> None:
    np.zeros(24, np.float32).tofile(tmp_path / "c.unf")
    _assert_input_error(tmp_path / "c.unf", "c.hdr", "missing")


@pytest.mark.parametrize("key", ["N_OF_DIM", "N_P", "NPIX", "LLIMITS", "STEPS"])
def test_error_missing_required_key(tmp_path: Path, key: str) -> None:
    lines = [s for s in GOOD if not s.startswith(key + " ")]
    _assert_input_error(_write_header(tmp_path / "k.dat", lines, GOOD_DATA), "k.dat", key, "required")


@pytest.mark.parametrize("key, value", [("N_P", "2 3 4"), ("LLIMITS", "0.0"), ("STEPS", "1.0 0.5 0.1")])
def test_error_length_mismatch_with_n_of_dim(tmp_path: Path, key: str, value: str) -> None:
    lines = [s if not s.startswith(key + " ") else f"{key} = {value}" for s in GOOD]
    _assert_input_error(_write_header(tmp_path / "l.dat", lines, GOOD_DATA), key, "N_OF_DIM = 2")


@pytest.mark.parametrize("line, needle", [
    ("LLIMITS = 0.0 abc", "LLIMITS"), ("N_P = 2 3.5", "N_P"), ("NPIX = 'four'", "NPIX"),
    ("N_OF_DIM = 0", "N_OF_DIM"), ("STEPS = 1.0 0.0", "STEPS(2)"), ("WAVE = 4000.0", "WAVE"),
    ("LOGW = 3", "LOGW"), ("VACUUM = 2", "VACUUM"), ("MULTI = 1", "MULTI"), ("NPCA = 10", "PCA"),
])
def test_error_bad_header_values(tmp_path: Path, line: str, needle: str) -> None:
    key = line.split()[0]
    lines = [s for s in GOOD if not s.startswith(key + " ")] + [line]
    _assert_input_error(_write_header(tmp_path / "v.dat", lines, GOOD_DATA), "v.dat", needle)


def test_error_truncated_ascii_says_expected_and_found(tmp_path: Path) -> None:
    data = " ".join(["1.0"] * 21) + "\n"
    _assert_input_error(_write_header(tmp_path / "t.dat", GOOD, data), "truncated", "found 21 values", "24 values")


def test_error_extra_ascii_values(tmp_path: Path) -> None:
    data = " ".join(["1.0"] * 25) + "\n"
    _assert_input_error(_write_header(tmp_path / "x.dat", GOOD, data), "extra", "found 25", "24 values")


def test_error_non_numeric_data(tmp_path: Path) -> None:
    vals = ["1.0"] * 24
    vals[13] = "1.0.0d"
    _assert_input_error(_write_header(tmp_path / "n.dat", GOOD, " ".join(vals)), "non-numeric", "'1.0.0d'",
                        "model 3, pixel 1")


def test_error_truncated_binary(tmp_path: Path) -> None:
    _write_header(tmp_path / "tb.hdr", GOOD)
    np.zeros(20, np.float32).tofile(tmp_path / "tb.unf")
    _assert_input_error(tmp_path / "tb.hdr", "tb.unf", "truncated", "20 float32 values", "24 float32 values")


def test_error_byteswapped_binary(tmp_path: Path) -> None:
    _write_header(tmp_path / "bs.hdr", GOOD)
    (np.linspace(0.5, 1.5, 24).astype(np.float32).byteswap()).tofile(tmp_path / "bs.unf")
    _assert_input_error(tmp_path / "bs.hdr", "byte-swapped")
    g = read_ferre(tmp_path / "bs.hdr", byteorder=">" if np.little_endian else "<")
    np.testing.assert_allclose(g.flux.ravel(), np.linspace(0.5, 1.5, 24), rtol=1e-6)


def test_error_not_a_ferre_file_and_unterminated_header(tmp_path: Path) -> None:
    (tmp_path / "nf.dat").write_text("SIMPLE = T\n")
    _assert_input_error(tmp_path / "nf.dat", "&SYNTH")
    (tmp_path / "un.dat").write_text(" &SYNTH\n N_OF_DIM = 1\n")
    _assert_input_error(tmp_path / "un.dat", "not terminated")
    (tmp_path / "empty.dat").write_text("")
    _assert_input_error(tmp_path / "empty.dat", "empty")


def test_error_missing_wave_unless_allowed(tmp_path: Path) -> None:
    lines = [s for s in GOOD if not s.startswith("WAVE")]
    p = _write_header(tmp_path / "nw.dat", lines, GOOD_DATA)
    _assert_input_error(p, "WAVE")
    assert read_ferre(p, require_wave=False).wave is None


def test_input_error_pickles(tmp_path: Path) -> None:
    """The errors cross process boundaries on a Dask cluster."""
    with pytest.raises(InputFileError) as exc:
        read_ferre(_write_header(tmp_path / "p.dat", GOOD, "1 2 3\n"))
    again = pickle.loads(pickle.dumps(exc.value))
    assert str(again) == str(exc.value)
