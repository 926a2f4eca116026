"""Dask client set-up: a LocalCluster by default, an existing scheduler, or SLURM.

Thread budget: every worker runs ``nthreads`` Dask threads, and each task may call
torch/BLAS, which start threads of their own. To keep the machine busy without
oversubscription, each worker sizes its own torch pool when it starts (the
:class:`TorchThreads` plugin) so that Dask threads × torch threads ≤ the cores that
worker may use — decided on the worker, from its own ``nthreads`` and its process's CPU
affinity (or ``$MASTAR_VAC_WORKER_CORES``, its share when several workers share one
machine), never from the cluster's total.

Storage: workers run in working directories of their own and possibly on other hosts;
:func:`check_worker_storage` asks each worker to open the run's paths and stops the
build with one :class:`~mastar_vac.errors.WorkerStorageError` when one cannot.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import tomllib
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from distributed import Client, LocalCluster, WorkerPlugin

from .config import ClusterConfig
from .errors import ClusterError, ConfigError, WorkerStorageError

__all__ = ["dask_client", "threads_for_torch", "TorchThreads", "slurm_cluster", "worker_cores",
           "check_worker_storage", "worker_name", "WORKER_CORES_ENV"]

log = logging.getLogger(__name__)

#: the cores one worker may use, set by whoever starts several workers on one machine
#: (the LocalCluster here; the SLURM job script: cores / processes of the profile)
WORKER_CORES_ENV = "MASTAR_VAC_WORKER_CORES"


def threads_for_torch(cores: int, n_workers: int, threads_per_worker: int) -> int:
    """Torch threads per Dask thread so that the product never exceeds the cores."""
    return max(1, cores // max(1, n_workers * threads_per_worker))


def _cgroup_cpus() -> int | None:
    """The CPU quota of this process's cgroup (v2 ``cpu.max``), rounded down; None if unlimited."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, int(quota) // int(period))


def worker_cores() -> int:
    """Cores this process may use: ``$MASTAR_VAC_WORKER_CORES`` if set (the share of one
    worker among several on a machine), else its CPU affinity, capped by a cgroup quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    quota = _cgroup_cpus()
    if quota is not None:
        n = min(n, quota)
    share = os.environ.get(WORKER_CORES_ENV, "").strip()
    if share:
        try:
            n = min(n, max(1, int(share)))
        except ValueError:
            log.warning("$%s=%r is not an integer; using %d cores", WORKER_CORES_ENV, share, n)
    return n


class TorchThreads(WorkerPlugin):
    """Sizes torch's intra-op pool on each worker as it starts (or joins later):
    ``worker_cores() // nthreads`` of that worker, or a fixed ``n``. ``teardown`` (the
    plugin unregistered: a build on a shared scheduler ending) restores what was there."""

    name = "mastar-vac-torch-threads"

    def __init__(self, n: int | None = None) -> None:
        self.n = None if n is None else int(n)

    def setup(self, worker: Any) -> None:  # noqa: D401 - WorkerPlugin API
        nthreads = int(getattr(worker, "nthreads", None) or worker.state.nthreads)
        n = self.n if self.n is not None else max(1, worker_cores() // max(1, nthreads))
        self._before = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = str(n)
        try:
            import torch

            self._torch_before = torch.get_num_threads()
            torch.set_num_threads(n)
        except ImportError:  # torch is optional on pure-ingest workers
            self._torch_before = None
        log.debug("worker %s: %d Dask threads × %d torch threads", worker.address, nthreads, n)

    def teardown(self, worker: Any) -> None:  # noqa: D401 - WorkerPlugin API
        if getattr(self, "_torch_before", None) is not None:
            import torch

            torch.set_num_threads(self._torch_before)
        if getattr(self, "_before", None) is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = self._before


def slurm_cluster(profile: Path, *, scale: bool = True, overrides: Mapping[str, Any] | None = None) -> Any:
    """A dask-jobqueue ``SLURMCluster`` from a TOML profile (see pipelines/cluster/slurm.toml).

    ``overrides`` replace keys of the profile's ``[slurm]`` table. With ``scale=False`` no
    job is submitted (to inspect ``cluster.job_script()``). The job script exports
    ``$MASTAR_VAC_WORKER_CORES`` = cores / processes, each worker's share of its job."""
    try:
        data = tomllib.loads(Path(profile).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{profile}: cluster profile not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{profile}: not valid TOML ({exc})") from None
    section = data.get("slurm")
    if not isinstance(section, dict):
        raise ConfigError(f"{profile}: needs a [slurm] table")
    kwargs = {**section, **dict(overrides or {})}
    jobs = int(kwargs.pop("jobs", 1))
    share = max(1, int(kwargs.get("cores", 1)) // max(1, int(kwargs.get("processes", 1))))
    kwargs["job_script_prologue"] = [*kwargs.get("job_script_prologue", []), f"export {WORKER_CORES_ENV}={share}"]
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise ConfigError("a SLURM profile needs dask-jobqueue: pip install 'mastar_vac[cluster]'") from None
    try:
        cluster = SLURMCluster(**kwargs)
    except TypeError as exc:  # an unknown key of [slurm]
        raise ConfigError(f"{profile}: [slurm]: {exc}") from None
    if scale:
        cluster.scale(jobs=jobs)
    return cluster


def _probe_storage(probe: str, token: str, read: Sequence[str], dask_worker: Any = None) -> list[tuple[str, str]]:
    """On a worker: the paths it cannot use, with why."""
    problems = []
    try:
        if Path(probe).read_text() != token:
            problems.append((os.path.dirname(probe), "a different directory under the same path"))
        elif not os.access(os.path.dirname(probe), os.W_OK):
            problems.append((os.path.dirname(probe), "not writable"))
    except OSError as exc:
        problems.append((os.path.dirname(probe), exc.strerror or str(exc)))
    for p in read:
        if not os.path.exists(p):
            problems.append((p, "no such file or directory"))
        elif not os.access(p, os.R_OK):
            problems.append((p, "not readable"))
    return problems


def check_worker_storage(client: Client, shared_dir: Path, read: Sequence[Path] = ()) -> None:
    """Every worker must see ``shared_dir`` (the output directory: the same directory,
    writable) and the paths in ``read``; else one :class:`WorkerStorageError` naming
    the first such path and worker. A file written here is read back by each worker, so
    a same-named local directory on another host is caught too."""
    token = uuid.uuid4().hex
    probe = Path(shared_dir) / f".worker-check-{token}"
    probe.write_text(token)
    try:
        results = client.run(_probe_storage, str(probe), token, [str(p) for p in read])
    finally:
        probe.unlink(missing_ok=True)
    for worker, problems in sorted(results.items()):
        if problems:
            path, why = problems[0]
            host = client.scheduler_info(n_workers=-1)["workers"].get(worker, {}).get("host", "")
            raise WorkerStorageError(path, f"{worker}" + (f" on {host}" if host else ""), why)
    log.debug("storage check: %d workers see %s", len(results), shared_dir)


def worker_name() -> str:
    """This worker's address and host (for error messages raised inside tasks)."""
    try:
        from distributed import get_worker

        return f"{get_worker().address} on {socket.gethostname()}"
    except ValueError:  # not on a worker: the client process
        return f"the client process on {socket.gethostname()}"


@contextlib.contextmanager
def dask_client(cfg: ClusterConfig, *, scheduler: str | None = None, wait_timeout: float = 600.0) -> Iterator[Client]:
    """A distributed ``Client`` for the run, closed (with its cluster) on exit.

    ``scheduler`` (the ``--scheduler`` option) overrides ``cfg.scheduler``: join that
    cluster. Otherwise a SLURM profile if configured (waiting up to ``wait_timeout`` s
    for its first worker), else a ``LocalCluster``. The torch-threads plugin is
    registered for the run and, on a scheduler the run does not own, unregistered at the
    end, so that other clients' workers are left as they were.
    """
    address = scheduler or cfg.scheduler
    cluster = None
    fixed = None  # torch threads for every worker, when the workers share one process
    if address:
        log.info("joining Dask scheduler at %s", address)
        client = Client(address)
    elif cfg.profile is not None:
        cluster = slurm_cluster(cfg.profile)
        client = Client(cluster)
        log.info("SLURM: waiting up to %.0f s for the first worker job to start", wait_timeout)
        try:
            client.wait_for_workers(1, timeout=wait_timeout)
        except TimeoutError:
            client.close()
            cluster.close()
            raise ClusterError(f"{cfg.profile}: no SLURM worker job started within {wait_timeout:.0f} s "
                               "(see squeue / the job's output file)") from None
    else:
        cores = worker_cores()
        share = max(1, cores // cfg.n_workers)  # the workers share this machine
        torch_n = max(1, share // cfg.threads_per_worker)
        cluster = LocalCluster(n_workers=cfg.n_workers, threads_per_worker=cfg.threads_per_worker,
                               memory_limit=cfg.memory_limit, processes=cfg.processes,
                               dashboard_address=":0",
                               # OMP_NUM_THREADS before torch is imported there; the plugin reads the share
                               env={"OMP_NUM_THREADS": str(torch_n), WORKER_CORES_ENV: str(share)})
        client = Client(cluster)
        if not cfg.processes:  # threaded workers share this process and its one torch pool
            fixed = threads_for_torch(cores, cfg.n_workers, cfg.threads_per_worker)
        log.info("LocalCluster: %d workers × %d threads, torch threads per task %d, memory limit %s",
                 cfg.n_workers, cfg.threads_per_worker, torch_n, cfg.memory_limit)
    plugin = TorchThreads(fixed)
    registered = False
    try:
        client.register_plugin(plugin, name=TorchThreads.name)
        registered = True
        yield client
    finally:
        if registered and cluster is None:
            try:
                client.unregister_worker_plugin(TorchThreads.name)
            except Exception as exc:  # noqa: BLE001 - the scheduler went away: nothing left to clean
                log.warning("could not unregister %s from %s: %s", TorchThreads.name, address, exc)
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
