"""Benchmark: a DR17-size fit under load — more Dask workers than cores.

    python -m benchmarks.bench_load                      # 59,266 spectra, 4 workers
    python -m benchmarks.bench_load --n 10000 --workers 2
    python -m benchmarks.bench_load --n 10000 --workers 2 --separate   # + the same fit on dask scheduler/worker processes

Builds a DR17-size normalized cube of synthetic spectra (59,266 × 4,563 pixels, drawn
from a DR17-size 5-label emulator with noise at S/N 50), then fits every spectrum with
``fit_cube`` on a LocalCluster of ``--workers`` single-threaded workers on this machine.
Prints the wall time of the fit, spectra per second, and the peak resident memory of
every worker (its RSS sampled every 0.5 s) and of this process. Workers must
not run out of memory: each holds one chunk of spectra plus the emulator.

With ``--separate`` the same fit runs again on a cluster of separate processes — ``dask
scheduler`` and ``--workers`` × ``dask worker`` started as their own processes on
127.0.0.1, as on a real cluster — and both throughputs are printed side by side.
"""

from __future__ import annotations

import os

os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")  # before distributed is imported

import argparse
import logging
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import xarray as xr

from benchmarks.bench_fit import toy5_emulator

log = logging.getLogger("bench_load")


def synthetic_cube(path: Path, emu, n: int, chunk: int, seed: int = 0) -> None:  # noqa: ANN001
    """A normalized cube of ``n`` emulator spectra with noise, written chunk by chunk."""
    rng = np.random.default_rng(seed)
    glab = np.asarray(emu.config["start_grid"])
    first = True
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        lab = glab[rng.integers(0, len(glab), m)] + rng.normal(0, [80, 0.08, 0.03, 0.03, 0.03], (m, 5))
        flux = (emu.predict(lab) + rng.normal(0, 0.02, (m, emu.n_pixels))).astype(np.float32)
        ds = xr.Dataset(
            {"norm_flux": (("visit", "wave"), flux),
             "norm_ivar": (("visit", "wave"), np.full(flux.shape, 2500.0, np.float32))},
            coords={"mangaid": ("visit", np.array([f"3-{100000 + (s + i) // 3}" for i in range(m)], dtype="U22")),
                    "plate": ("visit", np.full(m, 9000, np.int32)),
                    "ifudesign": ("visit", np.array([str(3701 + (s + i) % 5) for i in range(m)], dtype="U5")),
                    "mjd": ("visit", (57000 + np.arange(s, s + m)).astype(np.int32))})
        enc = {"norm_flux": {"chunks": (chunk, emu.n_pixels)}, "norm_ivar": {"chunks": (chunk, emu.n_pixels)}}
        if first:
            ds.to_zarr(path, mode="w", zarr_format=2, encoding=enc, consolidated=True)
            first = False
        else:
            ds.to_zarr(path, append_dim="visit", zarr_format=2, consolidated=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=59266)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--memory-limit", default="3GiB")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--separate", action="store_true",
                    help="also fit on dask scheduler + dask worker processes of their own")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("distributed").setLevel(logging.WARNING)
    os.environ.setdefault("MASTAR_VAC_PROGRESS", "0")
    from distributed import Client, LocalCluster

    from mastar_vac.cluster import WorkerMemoryMonitor
    from mastar_vac.emulator import save_emulator
    from mastar_vac.fit import FitConfig, fit_cube

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_load_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        emu, _ = toy5_emulator(256)
        emu_path = save_emulator(emu, work / "emulator")
        t0 = time.perf_counter()
        synthetic_cube(work / "cube.zarr", emu, args.n, args.chunk)
        print(f"synthetic cube: {args.n} × {emu.n_pixels} px in {time.perf_counter() - t0:.0f} s")
        cube = xr.open_zarr(work / "cube.zarr", zarr_format=2)
        with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                          memory_limit=args.memory_limit, dashboard_address=None,
                          env={"OMP_NUM_THREADS": "1"}) as cluster, Client(cluster) as client:
            client.run(lambda: __import__("torch").set_num_threads(1))
            t0 = time.perf_counter()
            with WorkerMemoryMonitor(client, interval=0.5) as mon:
                df = client.compute(fit_cube(cube, emu_path, config=FitConfig())).result()
            dt = time.perf_counter() - t0
            peaks = mon.peaks
        ok = float((df["STATUS"] == 0).mean())
        print(f"fit: {len(df)} spectra with {args.workers} workers × 1 thread on {os.cpu_count()} cores in "
              f"{dt / 60:.1f} min ({len(df) / dt:.0f} spectra/s); converged {100 * ok:.1f}%; "
              f"rows unique: {not df.duplicated(['MANGAID', 'PLATE', 'IFUDESIGN', 'MJD']).any()}")
        for w, gb in sorted(peaks.items()):
            print(f"  worker {w}: peak RSS {gb:.2f} GB (limit {args.memory_limit})")
        if args.separate:
            from benchmarks._dask_procs import dask_processes
            from mastar_vac.cluster import WORKER_CORES_ENV, TorchThreads

            share = max(1, (os.cpu_count() or 1) // args.workers)  # they share this machine, as above
            with dask_processes(work / "procs", args.workers, memory_limit=args.memory_limit,
                                worker_env={WORKER_CORES_ENV: str(share)}) as procs, Client(procs.address) as client:
                client.register_plugin(TorchThreads(), name=TorchThreads.name)
                t0 = time.perf_counter()
                df2 = client.compute(fit_cube(cube, emu_path, config=FitConfig())).result()
                dt2 = time.perf_counter() - t0
            same = bool(np.array_equal(df2.iloc[:, 4:].to_numpy(), df.iloc[:, 4:].to_numpy(), equal_nan=True))
            print(f"fit throughput, {args.workers} workers × 1 thread: LocalCluster {len(df) / dt:.0f} spectra/s, "
                  f"separate dask scheduler/worker processes {len(df2) / dt2:.0f} spectra/s "
                  f"({dt:.1f} s vs {dt2:.1f} s for {len(df)} spectra); results identical: {same}")
        print(f"  this process: peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2:.2f} GB")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
