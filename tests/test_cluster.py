"""Dask set-up: paths made absolute, torch threads decided per worker, plugins removed
from a shared scheduler, clear errors when a worker cannot open the run's files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mastar_vac.cluster import WORKER_CORES_ENV, TorchThreads, check_worker_storage, dask_client, worker_cores
from mastar_vac.config import ClusterConfig, absolute_paths, load_config
from mastar_vac.errors import WorkerStorageError


def test_every_path_is_absolute_relative_to_the_working_directory(tmp_path, monkeypatch):
    p = tmp_path / "conf" / "c.toml"
    p.parent.mkdir()
    p.write_text("[inputs]\ngoodspec = 'data/gs.fits'\nallstar = '../a.fits'\nemulator = 'emu'\n"
                 "synthetic_grid = '/abs/grid.hdr'\n[output]\ndir = 'out'\n[cluster]\nprofile = 'slurm.toml'\n")
    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.chdir(run)  # the command's working directory, not the config file's
    cfg = load_config(p)
    assert cfg.inputs.goodspec == run / "data" / "gs.fits"
    assert cfg.inputs.allstar == tmp_path / "a.fits"  # normalized, no ".."
    assert cfg.inputs.emulator == run / "emu" and cfg.inputs.synthetic_grid == Path("/abs/grid.hdr")
    assert cfg.output.dir == run / "out" and cfg.cluster.profile == run / "slurm.toml"

    def paths(obj):  # every Path anywhere in the config
        import dataclasses

        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if isinstance(v, Path):
                yield f.name, v
            elif dataclasses.is_dataclass(v):
                yield from paths(v)

    assert all(v.is_absolute() for _, v in paths(cfg)), list(paths(cfg))
    assert absolute_paths(cfg, "/elsewhere") == cfg  # idempotent: absolute paths stay


def test_demo_cache_from_a_relative_variable_is_absolute(tmp_path, monkeypatch):
    from mastar_vac.demo import default_cache_dir

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MASTAR_VAC_CACHE", "cache")
    assert default_cache_dir() == tmp_path / "cache"


def test_worker_cores_reads_the_share(monkeypatch):
    monkeypatch.delenv(WORKER_CORES_ENV, raising=False)
    own = worker_cores()
    assert 1 <= own <= (os.cpu_count() or 1)
    monkeypatch.setenv(WORKER_CORES_ENV, "1")
    assert worker_cores() == 1
    monkeypatch.setenv(WORKER_CORES_ENV, "10000")  # a share never exceeds what the process has
    assert worker_cores() == own


@pytest.fixture(scope="module")
def two_kinds_of_workers():
    """A cluster of two worker processes with 2 cores each to use: one with 1 Dask
    thread, one with 2."""
    from distributed import Client, Nanny, Scheduler, SpecCluster

    env = {WORKER_CORES_ENV: "2"}
    workers = {"one": {"cls": Nanny, "options": {"nthreads": 1, "env": env}},
               "two": {"cls": Nanny, "options": {"nthreads": 2, "env": env}}}
    with SpecCluster(workers=workers, scheduler={"cls": Scheduler, "options": {"host": "127.0.0.1",
                                                                                "dashboard_address": None}},
                     asynchronous=False) as cluster, Client(cluster) as client:
        client.wait_for_workers(2, timeout=60)
        yield cluster, client


def _threads(client) -> dict[str, tuple[int, int]]:
    """(Dask threads, torch threads) of each worker, by name."""
    def probe(dask_worker):
        import torch

        return dask_worker.name, dask_worker.state.nthreads, torch.get_num_threads()

    return {name: (n, t) for name, n, t in client.run(probe).values()}


def test_torch_threads_are_decided_on_each_worker(two_kinds_of_workers):
    cluster, client = two_kinds_of_workers
    cores = min(2, len(os.sched_getaffinity(0)))  # what each worker may use (its share, capped by the machine)
    before = _threads(client)
    client.register_plugin(TorchThreads(), name=TorchThreads.name)
    try:
        got = _threads(client)
        assert got["one"] == (1, cores) and got["two"] == (2, max(1, cores // 2))
        for n, t in got.values():
            assert n * t <= max(cores, n)  # never more threads than cores (one per Dask thread at least)
    finally:
        client.unregister_worker_plugin(TorchThreads.name)
    assert _threads(client) == before  # teardown restored what was there


def test_plugins_on_a_shared_scheduler_are_removed_when_the_build_ends(two_kinds_of_workers):
    cluster, client = two_kinds_of_workers

    def plugins() -> list[str]:
        return list(client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.worker_plugins)))

    with dask_client(ClusterConfig(), scheduler=cluster.scheduler_address) as c:
        assert TorchThreads.name in plugins()
        got = {name: t for name, (_, t) in _threads(c).items()}
        assert got["two"] <= got["one"]
    assert TorchThreads.name not in plugins()
    assert not cluster.status.name == "closed"  # a cluster the build joined is left running


def test_storage_check_and_emulator_load_name_the_path_and_the_worker(two_kinds_of_workers, tmp_path):
    from mastar_vac.fit import _load_emulator_on_worker

    _, client = two_kinds_of_workers
    check_worker_storage(client, tmp_path, read=[tmp_path])  # these workers see it: no error
    missing = tmp_path / "no-cube.zarr"
    with pytest.raises(WorkerStorageError, match=rf"{missing}: Dask worker tcp://127.0.0.1:\d+ on .* cannot open it "
                                                 r"\(no such file or directory\).*shared filesystem"):
        check_worker_storage(client, tmp_path, read=[missing])
    emu = tmp_path / "emulator"
    with pytest.raises(WorkerStorageError, match=rf"{emu}: Dask worker tcp://127.0.0.1:\d+ on .*not an emulator"):
        client.submit(_load_emulator_on_worker, str(emu), pure=False).result()
