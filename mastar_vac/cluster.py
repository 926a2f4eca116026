"""Dask client set-up: a LocalCluster by default, an existing scheduler, or SLURM.

Thread budget: every worker runs ``threads_per_worker`` Dask threads, and each task may
call torch/BLAS, which start threads of their own. To keep the machine busy without
oversubscription, each worker's torch and BLAS pools are sized so that
Dask threads × torch threads ≤ cores available to that worker.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from distributed import Client, LocalCluster, WorkerPlugin

from .config import ClusterConfig
from .errors import ConfigError

__all__ = ["dask_client", "threads_for_torch", "TorchThreads", "slurm_cluster"]

log = logging.getLogger(__name__)


def threads_for_torch(cores: int, n_workers: int, threads_per_worker: int) -> int:
    """Torch threads per Dask thread so that the product never exceeds the cores."""
    return max(1, cores // max(1, n_workers * threads_per_worker))


class TorchThreads(WorkerPlugin):
    """Sets torch's intra-op thread count on each worker when it starts."""

    name = "mastar-vac-torch-threads"

    def __init__(self, n: int) -> None:
        self.n = int(n)

    def setup(self, worker: Any) -> None:  # noqa: D401 - WorkerPlugin API
        os.environ["OMP_NUM_THREADS"] = str(self.n)
        try:
            import torch

            torch.set_num_threads(self.n)
        except ImportError:  # torch is optional on pure-ingest workers
            pass


def slurm_cluster(profile: Path, *, scale: bool = True) -> Any:
    """A dask-jobqueue ``SLURMCluster`` from a TOML profile (see pipelines/cluster/slurm.toml).

    With ``scale=False`` no job is submitted (to inspect ``cluster.job_script()``)."""
    try:
        data = tomllib.loads(Path(profile).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{profile}: cluster profile not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{profile}: not valid TOML ({exc})") from None
    section = data.get("slurm")
    if not isinstance(section, dict):
        raise ConfigError(f"{profile}: needs a [slurm] table")
    kwargs = dict(section)
    jobs = int(kwargs.pop("jobs", 1))
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise ConfigError("a SLURM profile needs dask-jobqueue: pip install 'mastar_vac[cluster]'") from None
    cluster = SLURMCluster(**kwargs)
    if scale:
        cluster.scale(jobs=jobs)
    return cluster


@contextlib.contextmanager
def dask_client(cfg: ClusterConfig, *, scheduler: str | None = None) -> Iterator[Client]:
    """A distributed ``Client`` for the run, closed (with its cluster) on exit.

    ``scheduler`` (the ``--scheduler`` option) overrides ``cfg.scheduler``: join that
    cluster. Otherwise a SLURM profile if configured, else a ``LocalCluster``.
    """
    address = scheduler or cfg.scheduler
    cluster = None
    if address:
        log.info("joining Dask scheduler at %s", address)
        client = Client(address)
        n_threads = sum(client.nthreads().values()) or 1
        torch_n = 1 if n_threads > 1 else (os.cpu_count() or 1)
    elif cfg.profile is not None:
        cluster = slurm_cluster(cfg.profile)
        client = Client(cluster)
        torch_n = 1
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch_n = threads_for_torch(cores, cfg.n_workers, cfg.threads_per_worker)
        cluster = LocalCluster(n_workers=cfg.n_workers, threads_per_worker=cfg.threads_per_worker,
                               memory_limit=cfg.memory_limit, processes=cfg.processes,
                               dashboard_address=":0", env={"OMP_NUM_THREADS": str(torch_n)})
        client = Client(cluster)
        log.info("LocalCluster: %d workers × %d threads, torch threads per task %d, memory limit %s",
                 cfg.n_workers, cfg.threads_per_worker, torch_n, cfg.memory_limit)
    try:
        client.register_plugin(TorchThreads(torch_n))
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


class WorkerMemoryMonitor:
    """Peak resident memory of every worker of a running cluster, sampled from the client.

    ``ru_maxrss`` is no measure here: worker processes can start as forks of a large
    parent and inherit its peak. The monitor polls each worker's current RSS instead.
    """

    def __init__(self, client: Client, interval: float = 0.25) -> None:
        import threading

        self.client = client
        self.interval = interval
        self.peaks: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _rss() -> float:
        import psutil

        return psutil.Process().memory_info().rss / 1024**3

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for w, gb in self.client.run(self._rss, on_error="ignore").items():
                    self.peaks[w] = max(self.peaks.get(w, 0.0), float(gb))
            except Exception:  # noqa: BLE001 - a worker restarting: sample again next time
                pass
            self._stop.wait(self.interval)

    def __enter__(self) -> WorkerMemoryMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
