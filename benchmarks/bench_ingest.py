"""Benchmark: ingest + normalize a DR17-size spectra file (59,266 × 4,563 pixels).

    python -m benchmarks.bench_ingest                  # 10k and 59,266 spectra
    python -m benchmarks.bench_ingest --sizes 2000     # quick look
    python -m benchmarks.bench_ingest --gzip           # the file gzip-compressed, as the survey ships it

Writes a goodspec file of synthetic spectra in the exact DR17 layout (values are random;
only throughput is measured), ingests it into a Zarr cube and normalizes it on a Dask
LocalCluster (2 workers × 1 thread). Prints wall time, spectra per second and the peak
resident memory of the whole process tree (this process plus the Dask workers), sampled
every 0.1 s, for each size. The target on a 2-core machine: the full cube in ≤ 5 min,
peak RSS ≤ 4 GB and not growing with the number of spectra.
"""

from __future__ import annotations

import os

os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")  # before distributed is imported

import argparse
import logging
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from mastar_vac.wavegrid import MASTAR_NPIX, mastar_wavelength

log = logging.getLogger("bench_ingest")


class PeakRSS:
    """Samples the RSS of this process and all its descendants in a thread."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.peak_total = 0
        self.peak_single = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            try:
                procs = [me, *me.children(recursive=True)]
                rss = []
                for p in procs:
                    try:
                        rss.append(p.memory_info().rss)
                    except psutil.Error:
                        pass
                self.peak_total = max(self.peak_total, sum(rss))
                self.peak_single = max(self.peak_single, max(rss, default=0))
            except psutil.Error:
                pass
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


def write_synthetic_goodspec(path: Path, n: int, *, seed: int = 1, block: int = 1024) -> None:
    """A goodspec file of ``n`` random visits in the DR17 layout, streamed to disk."""
    from mastar_vac.io.fitstable import FitsWriter
    from mastar_vac.io.layouts import GOODSPEC

    rng = np.random.default_rng(seed)
    wave = mastar_wavelength()
    cont = (1.0 + 0.3 * np.sin(wave / 700.0)).astype(np.float32)
    schema = {c.name: (np.dtype(c.dtype), c.shape) if not c.dtype.startswith("U") else np.array([""])
              for c in GOODSPEC.columns}
    with FitsWriter(path, compresslevel=1) as w:
        with w.begin_table(schema, n, extname="GOODSPEC", units=GOODSPEC.units,
                           string_widths=GOODSPEC.string_widths) as t:
            for s in range(0, n, block):
                m = min(block, n - s)
                level = rng.uniform(10, 1000, (m, 1)).astype(np.float32)
                flux = level * cont * (1 + rng.standard_normal((m, MASTAR_NPIX), dtype=np.float32) * 0.02)
                ivar = (1.0 / (0.02 * level) ** 2) * np.ones((m, MASTAR_NPIX), np.float32)
                cols = {
                    "MANGAID": np.array([f"3-{100000 + (s + i) // 3}" for i in range(m)]),
                    "PLATE": np.full(m, 9000 + s // 5000, np.int32),
                    "IFUDESIGN": np.array([str(3701 + (s + i) % 5) for i in range(m)]),
                    "MJD": (57000 + np.arange(s, s + m)).astype(np.int32),
                    "WAVE": np.broadcast_to(wave, (m, MASTAR_NPIX)),
                    "FLUX": flux, "IVAR": ivar,
                    "MASK": np.zeros((m, MASTAR_NPIX), np.int32),
                    "DISP": np.full((m, MASTAR_NPIX), 1.2, np.float32),
                    "PREDISP": np.full((m, MASTAR_NPIX), 1.1, np.float32),
                    "S2N": np.full(m, 50.0, np.float32),
                }
                t.write(GOODSPEC.fill(cols, m))


def run_one(n: int, workdir: Path, *, gzip: bool, chunk: int) -> dict[str, float]:
    from mastar_vac.cluster import dask_client
    from mastar_vac.config import ClusterConfig
    from mastar_vac.ingest import ingest_spectra
    from mastar_vac.normalize import normalize_cube

    src = workdir / (f"goodspec-{n}.fits" + (".gz" if gzip else ""))
    t0 = time.perf_counter()
    write_synthetic_goodspec(src, n)
    t_write = time.perf_counter() - t0
    store = workdir / f"cube-{n}.zarr"
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        ingest_spectra(src, store, chunk=chunk, progress=False)
        t_ingest = time.perf_counter() - t0
        with dask_client(ClusterConfig(n_workers=2, threads_per_worker=1, memory_limit="2GiB")):
            t1 = time.perf_counter()
            normalize_cube(store)
            t_norm = time.perf_counter() - t1
        t_total = time.perf_counter() - t0
    size = src.stat().st_size
    src.unlink()
    shutil.rmtree(store, ignore_errors=True)
    return {"n": n, "file_gb": size / 1e9, "write_s": t_write, "ingest_s": t_ingest, "normalize_s": t_norm,
            "total_s": t_total, "spec_per_s": n / t_total, "peak_rss_gb": rss.peak_total / 1e9,
            "peak_rss_single_gb": rss.peak_single / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10000, 59266])
    ap.add_argument("--gzip", action="store_true", help="gzip the input file as the survey does")
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--workdir", type=Path, default=None, help="scratch directory (needs ~8 GB for 59k)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("distributed").setLevel(logging.WARNING)
    os.environ.setdefault("MASTAR_VAC_PROGRESS", "0")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_ingest_"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for n in args.sizes:
            r = run_one(n, workdir, gzip=args.gzip, chunk=args.chunk)
            rows.append(r)
            print(f"n={r['n']:6d}  file {r['file_gb']:.2f} GB{' (gz)' if args.gzip else ''}  "
                  f"ingest {r['ingest_s']:6.1f}s  normalize {r['normalize_s']:6.1f}s  "
                  f"total {r['total_s']:6.1f}s  {r['spec_per_s']:7.0f} spectra/s  "
                  f"peak RSS {r['peak_rss_gb']:.2f} GB (largest process {r['peak_rss_single_gb']:.2f} GB)",
                  flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    if rows and rows[-1]["n"] != 59266:
        full = 59266 / rows[-1]["spec_per_s"]
        print(f"projected full DR17 cube (59,266 spectra) at the last rate: {full / 60:.1f} min")


if __name__ == "__main__":
    main()
