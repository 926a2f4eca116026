"""A Dask cluster of separate processes on this machine, as a user starts one by hand:
``dask scheduler`` and ``dask worker`` subprocesses, each in a working directory of its
own, on 127.0.0.1 only, random free ports. Used by tests/test_distributed.py and
benchmarks/bench_load.py.

Every process is started in its own session (process group) and the whole group is
ended on exit, also when the body raises: a worker's nanny and its worker process go
together.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["DaskProcesses", "dask_processes"]


@dataclass
class DaskProcesses:
    address: str
    scheduler: subprocess.Popen
    workers: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    def log_tail(self, n: int = 3000) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-n:]}" for p in self.logs if p.exists())


def _end(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout)


@contextlib.contextmanager
def dask_processes(workdir: Path, n_workers: int = 2, *, nthreads: int = 1, memory_limit: str = "4GiB",
                   env: Mapping[str, str] | None = None, worker_env: Mapping[str, str] | None = None,
                   worker_prefix: Sequence[str] = (), timeout: float = 120.0) -> Iterator[DaskProcesses]:
    """Start ``dask scheduler`` and ``n_workers`` × ``dask worker`` (with nannies) under
    ``workdir`` (``scheduler/``, ``worker-<i>/`` as their working directories) and yield
    once every worker has joined. ``worker_prefix`` runs each worker under a wrapper
    command (e.g. ``unshare --mount ...``)."""
    workdir = Path(workdir).absolute()
    base_env = dict(os.environ if env is None else env)
    base_env.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    sched_dir = workdir / "scheduler"
    sched_dir.mkdir(parents=True, exist_ok=True)
    sched_file = sched_dir / "scheduler.json"
    sched_file.unlink(missing_ok=True)
    dask = [sys.executable, "-m", "dask"]  # the `dask` command of this interpreter
    procs: list[subprocess.Popen] = []
    logs: list[Path] = []

    def start(cmd: list[str], cwd: Path, name: str, extra_env: Mapping[str, str] | None = None) -> subprocess.Popen:
        log = cwd / f"{name}.log"
        logs.append(log)
        with open(log, "w") as fh:
            p = subprocess.Popen(cmd, cwd=cwd, env={**base_env, **dict(extra_env or {})}, stdout=fh,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(p)
        return p

    try:
        sched = start([*dask, "scheduler", "--host", "127.0.0.1", "--port", "0",
                       "--no-dashboard", "--scheduler-file", str(sched_file)], sched_dir, "scheduler")
        deadline = time.time() + timeout
        while not sched_file.exists():
            if sched.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"dask scheduler did not start:\n{logs[0].read_text()[-3000:]}")
            time.sleep(0.1)
        time.sleep(0.1)  # the file is written in one go, but give the writer its close
        address = json.loads(sched_file.read_text())["address"]
        workers = []
        for i in range(n_workers):
            wdir = workdir / f"worker-{i}"
            wdir.mkdir(parents=True, exist_ok=True)
            workers.append(start([*worker_prefix, *dask, "worker", address,
                                  "--host", "127.0.0.1", "--nthreads", str(nthreads), "--nworkers", "1",
                                  "--memory-limit", memory_limit, "--no-dashboard",
                                  "--local-directory", str(wdir / "dask-scratch"), "--name", f"w{i}"],
                                 wdir, f"worker-{i}", worker_env))
        from distributed import Client

        with Client(address, timeout=timeout) as client:
            client.wait_for_workers(n_workers, timeout=timeout)
        yield DaskProcesses(address, sched, workers, logs)
    finally:
        for p in reversed(procs):
            _end(p)
