"""Reliability under faults: dying workers, killed builds, full disks, tampering, load.

The heavy cases use a small demo (40 MILES stars) and a quick emulator; the same
mechanisms carry a DR17-size run (see benchmarks/bench_load.py for the under-load
numbers at full size).
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from distributed.diagnostics.plugin import WorkerPlugin

from mastar_vac.emulator import load_emulator, save_emulator
from mastar_vac.errors import ArtifactError, OutputError
from mastar_vac.fit import FitConfig, fit_cube

from .toy import toy_cube, toy_emulator, toy_labels

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------
# a worker dies mid-fit
# ---------------------------------------------------------------------------


def _toy_cube(n: int, chunk: int, seed: int = 0) -> xr.Dataset:
    emu = toy_emulator()
    rng = np.random.default_rng(seed)
    lab = toy_labels(n, seed=seed)
    lab[:, 0] = np.clip(lab[:, 0], 4500, 8500)
    f = emu.predict(lab) + rng.normal(0, 0.02, (n, emu.n_pixels))
    return toy_cube(f, np.full(f.shape, 2500.0), chunk)


class AttemptLog(WorkerPlugin):
    """Appends ``pid, start, finish, key`` to a file whenever a task starts or stops
    executing on a worker: the record of every attempt, on whichever worker process ran
    it (the plugin is re-installed on a worker the nanny restarts)."""

    name = "test-attempt-log"

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def transition(self, key, start, finish, **kwargs) -> None:  # noqa: ANN001 - WorkerPlugin API
        if "executing" in (start, finish):
            with open(self.path, "a") as fh:
                fh.write(f"{os.getpid()}\t{start}\t{finish}\t{key!r}\n")


def _attempts(path: Path) -> list[tuple[int, str, str, str]]:
    if not path.exists():
        return []
    rows = [ln.split("\t") for ln in path.read_text().splitlines() if ln.count("\t") == 3]
    return [(int(pid), start, finish, key) for pid, start, finish, key in rows]


def _executing_now(path: Path) -> dict[str, int]:
    """Keys started and not yet finished, with the pid running each."""
    running: dict[str, int] = {}
    for pid, start, finish, key in _attempts(path):
        if finish == "executing":
            running[key] = pid
        elif start == "executing":
            running.pop(key, None)
    return running


def _fit_on_cluster(cube: xr.Dataset, emu_path: Path, parts: Path | None, log_path: Path,
                    kill: bool) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Fit on a 2-worker LocalCluster (torch: 1 thread per worker, as the build sets it);
    with ``kill``, SIGKILL a worker while it executes a block, once a few blocks are done."""
    from distributed import Client, LocalCluster

    from mastar_vac.cluster import TorchThreads

    info: dict[str, Any] = {}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      env={"OMP_NUM_THREADS": "1"}) as cluster, Client(cluster) as client:
        client.register_plugin(TorchThreads(1))
        client.register_plugin(AttemptLog(log_path))
        info["pids_before"] = set(client.run(os.getpid).values())
        fut = client.compute(fit_cube(cube, emu_path, config=FitConfig(), parts_dir=parts))
        if kill:
            assert parts is not None
            deadline = time.time() + 120
            while len(list(parts.glob("rows-*.npz"))) < 3 and time.time() < deadline:
                time.sleep(0.05)
            # the victim is a worker caught executing a block, so that block must be redone
            while not (running := _executing_now(log_path)) and time.time() < deadline:
                time.sleep(0.01)
            assert running, "no task was executing when the kill was due"
            info["victim_key"], info["victim"] = next(iter(running.items()))
            info["n_before"] = len(list(parts.glob("rows-*.npz")))
            os.kill(info["victim"], signal.SIGKILL)  # a worker dies with a block in flight
        df = fut.result(timeout=300)
        info["pids_after"] = set(client.run(os.getpid).values())
    return df, info


def test_worker_killed_mid_fit_run_completes_with_the_same_catalogue(tmp_path):
    emu_path = save_emulator(toy_emulator(), tmp_path / "emu")
    cube = _toy_cube(240, 8)
    # float32 GEMMs sum in a thread-count-dependent order, so "the same catalogue" means:
    # the same as an undisturbed run with the same worker set-up
    reference, _ = _fit_on_cluster(cube, emu_path, None, tmp_path / "clean.log", kill=False)
    log_path = tmp_path / "killed.log"
    df, info = _fit_on_cluster(cube, emu_path, tmp_path / "parts", log_path, kill=True)
    assert 3 <= info["n_before"] < 30, "the kill must land mid-fit"
    # the kill happened: the victim is gone and the nanny's replacement is a new process
    assert info["victim"] in info["pids_before"] and info["victim"] not in info["pids_after"]
    assert len(info["pids_after"]) == 2 and info["pids_after"] != info["pids_before"]
    # the block in flight on the victim was attempted again, elsewhere, and finished there
    tries = [(pid, start, finish) for pid, start, finish, key in _attempts(log_path) if key == info["victim_key"]]
    starts = [pid for pid, _, finish in tries if finish == "executing"]
    done = [pid for pid, start, finish in tries if start == "executing" and finish == "memory"]
    assert len(starts) >= 2 and starts[0] == info["victim"], tries
    assert done and info["victim"] not in done, tries
    assert len(df) == 240 and df["MANGAID"].is_unique
    pd.testing.assert_frame_equal(df.reset_index(drop=True), reference.reset_index(drop=True))


# ---------------------------------------------------------------------------
# the whole build is killed (SIGKILL) and run again
# ---------------------------------------------------------------------------


def _config(tmp: Path, out: str) -> Path:
    text = (ROOT / "pipelines" / "demo.toml").read_text()
    text = text.replace("demo = true", "demo = true\ndemo_stars = 40")
    text = text.replace("chunk = 512", "chunk = 4")  # many small chunks/blocks: something to resume
    text = text.replace('dir = "output/demo"', f'dir = "{tmp / out}"')
    text = text.replace("hidden = 256", "hidden = 32\nmax_epochs = 300\npatience = 300")
    text = text.replace("ema_decay = 0.999", "ema_decay = 0.0")  # a short training: the last weights
    p = tmp / f"{out}.toml"
    p.write_text(text)
    return p


def _env(tmp: Path) -> dict[str, str]:
    return dict(os.environ, MASTAR_VAC_CACHE=str(tmp / "cache"), MASTAR_VAC_PROGRESS="0", PYTHONUNBUFFERED="1")


def _build(cfg: Path, tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mastar_vac.build", "--config", str(cfg)], cwd=tmp,
                          env=_env(tmp), capture_output=True, text=True, timeout=900)


def _build_killed_at(cfg: Path, tmp: Path, marker: str, delay: float,
                     wait_for: tuple[Path, str] | None = None) -> str:
    """Start a build, SIGKILL its whole process group ``delay`` s after ``marker`` is logged
    (and, with ``wait_for`` = (folder, glob pattern), once a file matches there: on a loaded machine a
    fixed delay can end before the first fit block is written)."""
    proc = subprocess.Popen([sys.executable, "-m", "mastar_vac.build", "--config", str(cfg)], cwd=tmp,
                            env=_env(tmp), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    seen: list[str] = []
    hit = threading.Event()

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            if marker in line:
                hit.set()

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    assert hit.wait(600), "".join(seen[-30:])
    time.sleep(delay)
    if wait_for is not None:
        deadline = time.time() + 300
        while not list(wait_for[0].glob(wait_for[1])) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(60)
    t.join(10)
    return "".join(seen)


def _cube_complete(store: Path) -> bool:
    import zarr

    try:
        return bool(zarr.open_group(str(store), mode="r", zarr_format=2).attrs.get("complete"))
    except Exception:
        return False


def _catalogue(out: Path) -> pd.DataFrame:
    from mastar_vac.io.vac import read_vac_parquet

    return read_vac_parquet(out / "catalog" / "mastar_vac_params.parquet").sort_values(
        ["MANGAID", "PLATE", "IFUDESIGN", "MJD"]).reset_index(drop=True)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kill")
    proc = _build(_config(tmp, "clean"), tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, _catalogue(tmp / "clean")


@pytest.mark.parametrize("stage, marker, delay", [
    ("ingest", "stage ingest ...", 0.3),
    ("training", "stage emulator ...", 1.5),
    ("fitting", "stage fit ...", 1.0),
])
def test_killed_build_resumes_to_the_same_catalogue(uninterrupted, stage, marker, delay):
    tmp, clean = uninterrupted
    out = f"killed-{stage}"
    cfg = _config(tmp, out)
    blocks = (tmp / out / "fit", ".blocks-*/rows-*.npz")  # the fit's checkpoints
    log = _build_killed_at(cfg, tmp, marker, delay, wait_for=blocks if stage == "fitting" else None)
    assert "stage report ran" not in log  # it really died before the end
    assert not (tmp / out / "catalog" / "mastar_vac_params.parquet").exists()
    cube_done = _cube_complete(tmp / out / "cube.zarr")
    n_blocks = len(list((tmp / out / "fit").glob(".blocks-*/rows-*.npz")))
    again = _build(cfg, tmp)
    assert again.returncode == 0, again.stderr[-3000:]
    text = again.stdout + again.stderr
    if stage == "ingest":
        assert not cube_done, "the kill must land inside the ingest"
        assert "resuming ingest" in text
    if stage == "fitting":
        assert n_blocks > 0, "the kill must land after some blocks were fitted"
    if stage in ("training", "fitting"):
        for reused in ("ingest", "normalize", "reference"):
            line = next(ln for ln in again.stdout.splitlines() if ln.startswith(reused))
            assert "reused" in line, line
    resumed = _catalogue(tmp / out)
    pd.testing.assert_frame_equal(resumed, clean)
    leftovers = [p for p in (tmp / out).rglob(".*.part-*")]
    assert leftovers == []


# ---------------------------------------------------------------------------
# atomic outputs and a full disk
# ---------------------------------------------------------------------------


def test_full_disk_while_writing_the_vac_leaves_no_catalogue(tmp_path, monkeypatch):
    from mastar_vac.io import vac
    from mastar_vac.io.vac import write_vac_fits

    df = pd.DataFrame({"MANGAID": ["7-1", "7-2"], "PLATE": [1, 2], "IFUDESIGN": ["3701", "3702"], "MJD": [5, 6],
                       "VALID": [1, 1], "FLAG": [0, 0], "NPIX": [10, 10], "N_ITER": [3, 3], "FIT_STATUS": [0, 0]})
    target = tmp_path / "vac.fits"
    write_vac_fits(target, df, provenance={}, flag_bits=[], fitted_labels=["TEFF"])
    before = target.read_bytes()

    class FullDisk:
        """The file the writer opens: the disk fills up after the primary header's first block."""

        def __init__(self, fh):
            self.fh = fh
            self.room = 2880

        def write(self, b):
            if len(b) > self.room:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.room -= len(b)
            return self.fh.write(b)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def __getattr__(self, k):
            return getattr(self.fh, k)

    opened = []

    def full_open(file, mode="r", *a, **k):
        fh = open(file, mode, *a, **k)
        if "w" in mode:
            opened.append(file)
            return FullDisk(fh)
        return fh

    # the module-level name shadows the builtin inside vac only: the writer's own file fills up
    monkeypatch.setattr(vac, "open", full_open, raising=False)
    with pytest.raises(OutputError, match="No space left on device"):
        write_vac_fits(target, df, provenance={}, flag_bits=[], fitted_labels=["TEFF"])
    assert opened, "the writer must have opened its output through the full disk"
    assert target.read_bytes() == before  # the old catalogue is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["vac.fits"]  # no partial file left


def test_full_disk_during_ingest_is_a_clear_error(tmp_path, monkeypatch):
    from mastar_vac.ingest import ingest_spectra
    from mastar_vac.io.goodspec import write_goodspec

    from .conftest import make_visits

    gs = write_goodspec(tmp_path / "gs.fits", make_visits(6))
    import zarr

    real = zarr.Array.__setitem__

    def full(self, key, value):
        if self.path.endswith("flux"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, key, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", full)
    with pytest.raises(OutputError, match="cube.zarr: cannot write chunk 0.*No space left"):
        ingest_spectra(gs, tmp_path / "cube.zarr", chunk=3)


def test_build_on_a_small_filesystem_stops_cleanly(tmp_path):
    """A real full disk: a 6 MB tmpfs (needs root; skipped where mount is refused)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        cfg = _config(tmp_path, "o")
        cfg.write_text(cfg.read_text().replace(f'dir = "{tmp_path / "o"}"', f'dir = "{mnt / "o"}"'))
        proc = _build(cfg, tmp_path)
        assert proc.returncode == 2, proc.stderr[-2000:]
        last = [ln for ln in proc.stderr.splitlines() if "mastar_vac.build" in ln][-1]
        assert "ERROR" in last and ("No space left on device" in last or "space" in last.lower()), last
        assert not (mnt / "o" / "catalog" / "mastar_vac_params.fits").exists()
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


# ---------------------------------------------------------------------------
# integrity on reuse
# ---------------------------------------------------------------------------


def test_tampered_emulator_is_not_reused(tmp_path):
    import dataclasses

    emu = toy_emulator()
    d = save_emulator(emu, tmp_path / "emu")
    weights = {k: v.copy() for k, v in emu.weights.items()}
    weights["b2"] = weights["b2"] + 1e-3  # a different, internally consistent model
    save_emulator(dataclasses.replace(emu, weights=weights), d)
    with pytest.raises(ArtifactError, match="not the expected"):
        load_emulator(d, expected_hash=emu.content_hash())


def test_cube_with_wrong_shapes_is_rebuilt(tmp_path):
    import zarr

    from mastar_vac.ingest import ingest_spectra
    from mastar_vac.io.cube import open_cube
    from mastar_vac.io.goodspec import write_goodspec

    from .conftest import make_visits

    v = make_visits(6)
    gs = write_goodspec(tmp_path / "gs.fits", v)
    store = tmp_path / "c.zarr"
    ingest_spectra(gs, store, chunk=3)
    g = zarr.open_group(str(store), mode="r+", zarr_format=2)
    g["ivar"].resize((5, 4563))  # damage: an array no longer matches its record
    s = ingest_spectra(gs, store, chunk=3)
    assert not s.resumed and s.chunks_written == 2
    np.testing.assert_array_equal(open_cube(store).ivar.values, v["IVAR"])


# ---------------------------------------------------------------------------
# under load: more workers than cores
# ---------------------------------------------------------------------------


def test_four_workers_on_two_cores_complete_and_report_memory(tmp_path):
    from distributed import Client, LocalCluster

    from mastar_vac.cluster import WorkerMemoryMonitor

    emu_path = save_emulator(toy_emulator(), tmp_path / "emu")
    cube = _toy_cube(320, 16, seed=3)
    with LocalCluster(n_workers=4, threads_per_worker=1, processes=True, memory_limit="1GiB",
                      dashboard_address=None) as cluster, Client(cluster) as client:
        # a worker the nanny restarts (e.g. for memory) comes back under a new pid and
        # address, so the number of workers stays 4: compare the processes themselves
        before = client.run(os.getpid)
        with WorkerMemoryMonitor(client, interval=0.1) as mon:
            df = client.compute(fit_cube(cube, emu_path, config=FitConfig())).result(timeout=600)
        after = client.run(os.getpid)
    assert len(df) == 320 and (df["STATUS"] == 0).mean() > 0.95
    assert len(before) == 4 and after == before, "a worker was restarted during the fit"
    assert set(mon.peaks) == set(before)
    print("peak RSS per worker (GB):", {k.rsplit(":", 1)[-1]: round(v, 2) for k, v in mon.peaks.items()})
    assert max(mon.peaks.values()) < 1.0  # under the 1 GiB limit: no worker was paused or killed


def test_stale_parts_are_found_in_subfolders(tmp_path):
    """A killed run leaves partial files in the stages' own folders (fit/, catalog/, a
    partial folder with files inside); all are removed, finished products are not."""
    from mastar_vac.io.atomic import remove_stale_parts

    (tmp_path / "fit").mkdir()
    (tmp_path / "catalog" / "deep").mkdir(parents=True)
    (tmp_path / "fit" / ".fits.parquet.part-123").write_text("half")
    (tmp_path / "catalog" / "deep" / ".x.fits.part-9").write_text("half")
    folder = tmp_path / ".cube.zarr.part-7"
    (folder / "inner").mkdir(parents=True)
    (folder / "inner" / ".y.part-1").write_text("inside a partial folder")
    (tmp_path / "fit" / "fits.parquet").write_text("finished")
    assert remove_stale_parts(tmp_path) == 3
    assert not list(tmp_path.rglob(".*.part-*"))
    assert (tmp_path / "fit" / "fits.parquet").read_text() == "finished"
