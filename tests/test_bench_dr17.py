"""benchmarks/bench_dr17.py at a tiny size: the generated DR17-layout files are read by the
pipeline's own readers, the reference set they make has exactly the requested stars,
the written config loads, and the log parsing matches what the build logs. The build
itself is not run here (that is the benchmark)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from benchmarks import bench_dr17
from benchmarks._rss import ProcessTreeRSS, process_kind

N_VISITS, N_REF = 300, 60


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> bench_dr17.DR17Inputs:
    return bench_dr17.generate_inputs(tmp_path_factory.mktemp("cache"), N_VISITS, N_REF, seed=3)


def test_generated_files_read_by_pipeline_readers(inputs: bench_dr17.DR17Inputs) -> None:
    from mastar_vac.io.allstar import read_allstar
    from mastar_vac.io.gaia_xmatch import read_gaia_xmatch
    from mastar_vac.io.goodspec import read_goodspec
    from mastar_vac.io.mastarall import read_goodstars, read_goodvisits
    from mastar_vac.reference import allstar_columns_for, derive_labels
    from mastar_vac.stages import ALLSTAR_BASE_COLUMNS, ALLSTAR_OPTIONAL_COLUMNS
    from mastar_vac.wavegrid import MASTAR_NPIX

    assert inputs.goodspec.name.endswith(".fits.gz")  # gzip, as DR17 ships it
    n = 0
    with read_goodspec(inputs.goodspec) as r:
        assert r.nrows == N_VISITS
        for b in r.iter_blocks(128):
            assert b.flux.shape[1] == MASTAR_NPIX
            assert np.isfinite(b.flux).all() and (b.ivar > 0).all()
            n += len(b)
    assert n == N_VISITS
    gs, gv = read_goodstars(inputs.mastarall), read_goodvisits(inputs.mastarall)
    assert len(gs) == inputs.n_stars and len(gv) == N_VISITS and gs["NVISITS"].sum() == N_VISITS
    assert not gv.duplicated(["MANGAID", "PLATE", "IFUDESIGN", "MJD"]).any()
    gx = read_gaia_xmatch(inputs.gaia_xmatch)
    assert len(gx) == inputs.n_stars and gx["SOURCE_ID"].notna().all() and gx["SOURCE_ID"].is_unique
    cols = list(dict.fromkeys([*ALLSTAR_BASE_COLUMNS, *allstar_columns_for(bench_dr17.LABELS5)]))
    a = read_allstar(inputs.allstar, cols, optional=ALLSTAR_OPTIONAL_COLUMNS)
    assert np.isfinite(derive_labels(a, bench_dr17.LABELS5)).all()
    # the same files again come from the cache, not regenerated
    again = bench_dr17.generate_inputs(inputs.root.parent, N_VISITS, N_REF, seed=3)
    assert again.reused and again.goodspec == inputs.goodspec


def test_reference_set_has_the_requested_stars(inputs: bench_dr17.DR17Inputs, tmp_path) -> None:  # noqa: ANN001
    """Ingest → normalize → reference on the generated files: exactly N_REF stars survive
    (the STAR_BAD and duplicate rows are cut, the APOGEE-only rows never match)."""
    from mastar_vac.config import load_config
    from mastar_vac.io.allstar import read_allstar
    from mastar_vac.io.cube import open_cube
    from mastar_vac.io.gaia_xmatch import read_gaia_xmatch
    from mastar_vac.ingest import ingest_spectra
    from mastar_vac.normalize import normalize_cube
    from mastar_vac.reference import allstar_columns_for, build_reference_set
    from mastar_vac.stages import ALLSTAR_BASE_COLUMNS, ALLSTAR_OPTIONAL_COLUMNS

    out = tmp_path / "out"
    out.mkdir()
    cfg = load_config(bench_dr17.write_config(inputs, tmp_path / "b.toml", out))
    assert cfg.inputs.goodspec == inputs.goodspec and list(cfg.emulator.labels) == bench_dr17.LABELS5
    assert cfg.output.dir == out
    s = ingest_spectra(cfg.inputs.goodspec, out / "cube.zarr", mastarall=cfg.inputs.mastarall, chunk=128,
                       progress=False)
    assert s.nvisit == N_VISITS and not s.flag_counts.get("NO_MASTARALL_ROW")
    normalize_cube(out / "cube.zarr", window=cfg.normalize.window, min_count=cfg.normalize.min_count)
    cols = list(dict.fromkeys([*ALLSTAR_BASE_COLUMNS, *allstar_columns_for(cfg.emulator.labels)]))
    ref = build_reference_set(open_cube(out / "cube.zarr"),
                              read_allstar(cfg.inputs.allstar, cols, optional=ALLSTAR_OPTIONAL_COLUMNS),
                              read_gaia_xmatch(cfg.inputs.gaia_xmatch), cfg.emulator.labels, cfg.reference)
    assert len(ref) == N_REF
    assert ref.cut_report["aspcap_bad"] >= 1 and ref.cut_report["duplicate"] >= 1


def test_log_parsing_matches_the_build() -> None:
    from mastar_vac import build

    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    def line(msg: str, *args: object) -> str:
        return fmt.format(logging.LogRecord(build.log.name, logging.INFO, __file__, 0, msg, args, None))

    # the exact messages of mastar_vac.build._stage
    assert bench_dr17.STAGE_START.search(line("stage %s ...", "ingest")).group(1) == "ingest"
    m = bench_dr17.STAGE_END.search(line("stage %s %s in %.1fs: %s", "fit", "ran", 123.45, "59266 visits"))
    assert m.groups() == ("fit", "ran", "123.5")
    emu = logging.getLogger("mastar_vac.emulator")  # the messages of mastar_vac.emulator.train_emulator
    for msg, args in (("early stop at epoch %d (best test loss %.3g at epoch %d)", (461, 1.49e-4, 261)),
                      ("%d epochs (best test loss %.3g at epoch %d)", (3000, 1.49e-4, 2990))):
        rec = logging.LogRecord(emu.name, logging.INFO, __file__, 0, msg, args, None)
        assert bench_dr17.TRAIN_END.search(fmt.format(rec))
    cap = logging.LogRecord(emu.name, logging.WARNING, __file__, 0,
                            "training stopped at the %.1f-minute cap (epoch %d)", (9.0, 812), None)
    assert bench_dr17.TRAIN_CAP.search(fmt.format(cap)).groups() == ("9.0", "812")


def test_rss_sampler_sees_this_process() -> None:
    import os

    with ProcessTreeRSS(os.getpid(), interval=0.05) as rss:
        rss.phase = "x"
        rss.sample()
    (me,) = list(rss.by_kind("build"))
    assert me.peak > 10e6 and rss.phase_peaks["x"]["build"] > 0
    assert process_kind("python -c from multiprocessing.spawn import spawn_main; spawn_main()",
                        is_root=False) == "worker"
