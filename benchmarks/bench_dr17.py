"""Benchmark: the whole build, ingest to VAC, on a synthetic input of DR17 size.

    python -m benchmarks.bench_dr17                          # 59,266 visits, 3,350 reference stars
    python -m benchmarks.bench_dr17 --n 3000 --ref-stars 400 # a quick look
    nice -n 5 python -m benchmarks.bench_dr17 --keep         # keep the build's outputs
    python -m benchmarks.bench_dr17 --timeout 30             # stop the build after 30 min, report what it did

1. **Input files** (generated once into ``--cache``, default ``$MASTAR_VAC_CACHE/bench_dr17``
   or ``/tmp/mastar_vac_bench_dr17``; reused when present, and their generation is timed
   apart, not part of the pipeline time): ``--n`` visits of ~n/3 stars (1–5 visits each)
   in the DR17 file layouts, written with the same writers the demo uses
   (``mastar_vac.io``): the goodspec file (gzip, as the survey ships it), mastarall
   (GOODSTARS + GOODVISITS), the Gaia EDR3 crossmatch (ids and positions) and an allStar
   in which ``--ref-stars`` of the MaStar stars are clean APOGEE matches with 5 labels
   (TEFF, LOGG, FE_H and ALPHA_M, M_H, VMICRO from which ALPHA_FE and LOG10_VMICRO are
   derived), plus rows each reference cut removes (STAR_BAD, duplicates) and APOGEE stars
   MaStar never observed. Spectra: the 5-label analytic model of ``benchmarks/_toy.py``
   on the MaStar grid, times a Teff-dependent continuum and a flux level, with Gaussian
   noise at a per-visit S/N drawn log-normally (median 40, 3–300). Everything follows
   from ``--seed``.
2. **The build**, as a user runs it: a TOML written next to the outputs from
   ``pipelines/dr17.toml`` (its labels, emulator, fit and cluster settings) with the
   ``[inputs]`` paths pointed at the generated files, then ``python -m mastar_vac.build
   --config ... --output ...`` in a subprocess. Its log is parsed for each stage's wall
   time ("stage X ran in N s"); a sampler thread reads the RSS of the build process and
   of each of its Dask workers every 0.2 s (``benchmarks/_rss.py``; the per-process
   peak is the kernel's VmHWM).

Prints a table: per stage its wall time, the build process's peak RSS and the largest
Dask worker RSS sampled during it; then the per-process peaks over the whole run and
the targets of issue 16 (≤ 10 min end to end, ≤ 4 GB per process on the 2-core
machine), met or missed.
"""

from __future__ import annotations

import os

os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")  # before distributed is imported

import argparse
import json
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from benchmarks._rss import ProcessTreeRSS, self_peak_rss
from benchmarks._toy import LABELS5, toy5_labels, toy5_spectra

log = logging.getLogger("bench_dr17")

DR17_VISITS = 59266
DR17_REF_STARS = 3350
#: bump when the generated content changes for the same arguments (it names the cache dir)
GEN_VERSION = 1
TARGET_MINUTES = 10.0
TARGET_RSS_GB = 4.0
REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------
# Input files
# --------------------------------------------------------------------------------------


@dataclass
class DR17Inputs:
    """The generated files and what they hold."""

    root: Path
    goodspec: Path
    mastarall: Path
    allstar: Path
    gaia_xmatch: Path
    n_visits: int
    n_stars: int
    n_ref: int
    seed: int
    gen_seconds: float = 0.0
    reused: bool = False

    def manifest(self) -> dict:
        d = asdict(self)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items() if k != "reused"}


def default_cache() -> Path:
    env = os.environ.get("MASTAR_VAC_CACHE")
    return Path(env) / "bench_dr17" if env else Path(tempfile.gettempdir()) / "mastar_vac_bench_dr17"


def _file_names() -> dict[str, str]:
    from mastar_vac.demo import FILE_NAMES  # the DR17 names, as the demo writes them

    return {k: FILE_NAMES[k] for k in ("goodspec", "mastarall", "allstar", "gaia_xmatch")}


def _visit_counts(rng: np.random.Generator, n_visits: int) -> np.ndarray:
    """1–5 visits per star, mean 3 (DR17 has ~2.7 good visits per star), summing to n_visits."""
    counts = rng.choice([1, 2, 3, 4, 5], size=n_visits, p=[0.15, 0.2, 0.3, 0.2, 0.15])
    cs = np.cumsum(counts)
    k = int(np.searchsorted(cs, n_visits))
    counts = counts[:k + 1].copy()
    counts[-1] -= int(cs[k] - n_visits)
    return counts


def _unique_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    while True:  # positive Gaia-like source ids, all different
        ids = rng.integers(10**15, 7 * 10**18, n, dtype=np.int64)
        if len(np.unique(ids)) == n:
            return ids


def generate_inputs(cache: Path, n_visits: int = DR17_VISITS, n_ref: int = DR17_REF_STARS, *,
                    seed: int = 17, block: int = 1024) -> DR17Inputs:
    """Write (or reuse) the DR17-layout input files for ``n_visits`` visits and an
    allStar with ``n_ref`` clean matches. Written into a temporary directory renamed
    into place when complete, so an interrupted generation is never reused."""
    from mastar_vac.demo import MJDQUAL_BITS, _apogee_id
    from mastar_vac.io.allstar import write_allstar
    from mastar_vac.io.gaia_xmatch import write_gaia_xmatch
    from mastar_vac.io.goodspec import write_goodspec
    from mastar_vac.io.mastarall import write_mastarall
    from mastar_vac.wavegrid import MASTAR_NPIX, mastar_wavelength

    names = _file_names()
    root = Path(cache) / f"dr17-n{n_visits}-ref{n_ref}-seed{seed}-v{GEN_VERSION}"
    mf = root / "manifest.json"
    if mf.exists():
        m = json.loads(mf.read_text())
        if all((root / names[k]).exists() for k in names):
            log.info("reusing the generated inputs in %s", root)
            return DR17Inputs(**{**m, **{k: Path(m[k]) for k in ("root", *names)}}, reused=True)
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    counts = _visit_counts(rng, n_visits)
    ns = len(counts)
    if n_ref > ns:
        raise ValueError(f"--ref-stars {n_ref} > the {ns} stars of {n_visits} visits")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=root.name + ".part-", dir=root.parent))
    try:
        wave = mastar_wavelength()
        # ---- stars -----------------------------------------------------------------------
        labels = toy5_labels(ns, seed)
        mangaid = np.array([f"3-{20000000 + i}" for i in range(ns)])
        ra = rng.uniform(0.0, 360.0, ns)
        dec = np.degrees(np.arcsin(rng.uniform(-1.0, 1.0, ns)))
        source_id = _unique_ids(rng, ns)
        perm = rng.permutation(ns)
        n_bad = max(1, round(0.03 * n_ref))  # matched but STAR_BAD: the aspcap_bad cut removes them
        ref, bad = perm[:n_ref], perm[n_ref:n_ref + n_bad]
        is_ref = np.zeros(ns, bool)
        is_ref[ref] = True

        # ---- visits, in survey order (by MJD, plate, IFU: a star's visits are not adjacent) --
        star_of = np.repeat(np.arange(ns), counts)
        k_in_star = np.concatenate([np.arange(c) for c in counts])
        nv = n_visits
        mjd = (55600 + rng.integers(0, 1500, ns)[star_of] + 37 * k_in_star).astype(np.int32)  # distinct per star
        plate = (8000 + rng.integers(0, 3000, nv)).astype(np.int32)
        ifus = np.array(["1901", "1902", "3701", "3702", "3703", "3704", "6101", "6102", "6103", "6104",
                         "9101", "9102", "12701", "12702", "12703", "12704"])
        ifu = ifus[rng.integers(0, len(ifus), nv)]
        snr = np.clip(rng.lognormal(np.log(40.0), 0.7, nv), 3.0, 300.0).astype(np.float32)
        first = k_in_star == 0
        # APOGEE-overlap stars are bright: their first visit always passes the S/N and LOWSN cuts
        snr[first & is_ref[star_of]] = np.maximum(snr[first & is_ref[star_of]], 30.0)
        level = (10.0 ** rng.uniform(0.0, 2.0, nv)).astype(np.float32)  # 1e-17 erg/s/cm²/Å scale
        order = np.lexsort((ifu, plate, mjd))
        star_of, k_in_star, mjd, plate, ifu, snr, level = (a[order] for a in
                                                           (star_of, k_in_star, mjd, plate, ifu, snr, level))
        mjdqual = np.where(snr <= 15.0, 1 << MJDQUAL_BITS["LOWSN"], 0).astype(np.int32)
        jit = rng.normal(0.0, 0.5 / 3600.0, (2, nv))
        visits = {
            "MANGAID": mangaid[star_of], "PLATE": plate, "IFUDESIGN": ifu, "MJD": mjd,
            "IFURA": ra[star_of] + jit[0] / np.cos(np.radians(dec[star_of])), "IFUDEC": dec[star_of] + jit[1],
            "RA": ra[star_of], "DEC": dec[star_of], "MJDQUAL": mjdqual, "S2N": snr,
            "VELVARFLAG": np.zeros(nv, np.int16), "S2N10": (1.3 * snr).astype(np.float32),
        }

        # ---- spectra: star models once (ns × 4563 float32), visits block by block -------
        t1 = time.perf_counter()
        model = np.empty((ns, MASTAR_NPIX), np.float32)
        slope = (labels[:, 0] - 6000.0) / 2000.0  # hotter = bluer continuum, for normalize to remove
        shape = 1.0 + 0.3 * np.sin(wave / 700.0)
        for s in range(0, ns, 256):  # toy5_spectra holds (n, 512, 80) float64: keep n small
            e = min(ns, s + 256)
            cont = (wave[None, :] / 6000.0) ** (-slope[s:e, None]) * shape[None, :]
            model[s:e] = (toy5_spectra(labels[s:e], wave) * cont).astype(np.float32)
        log.info("generate: %d star spectra (%d labels) in %.1f s", ns, len(LABELS5), time.perf_counter() - t1)
        # FLUX and IVAR go through memory maps so that write_goodspec (which slices its
        # columns row block by row block) streams a 59k-visit file without ~2 GB in RAM
        flux = np.lib.format.open_memmap(tmp / "flux.npy", "w+", np.float32, (nv, MASTAR_NPIX))
        ivar = np.lib.format.open_memmap(tmp / "ivar.npy", "w+", np.float32, (nv, MASTAR_NPIX))
        for s in range(0, nv, block):
            e = min(nv, s + block)
            clean = model[star_of[s:e]] * level[s:e, None]
            # noise per pixel ~ the visit's continuum level / S/N (as for sky-limited spectra)
            cont = np.median(clean, axis=1, keepdims=True)
            sigma = cont / snr[s:e, None]
            flux[s:e] = clean + rng.standard_normal(clean.shape, dtype=np.float32) * sigma
            ivar[s:e] = np.broadcast_to(1.0 / sigma**2, clean.shape)
        flux.flush()
        ivar.flush()
        disp = (wave / (2.355 * 1800.0)).astype(np.float32)  # σ of R ≈ 1800
        write_goodspec(tmp / names["goodspec"], {
            **visits, "FLUX": flux, "IVAR": ivar,
            "MASK": np.broadcast_to(np.zeros(MASTAR_NPIX, np.int32), (nv, MASTAR_NPIX)),
            "DISP": np.broadcast_to(disp, (nv, MASTAR_NPIX)),
            "PREDISP": np.broadcast_to(0.9 * disp, (nv, MASTAR_NPIX))})
        del flux, ivar
        (tmp / "flux.npy").unlink()
        (tmp / "ivar.npy").unlink()

        # ---- mastarall, Gaia crossmatch -------------------------------------------------
        so = np.argsort(mangaid, kind="stable")  # the VAC is sorted by MANGAID
        vmin = np.full(ns, np.iinfo(np.int32).max, np.int64)
        vmax = np.zeros(ns, np.int64)
        np.minimum.at(vmin, star_of, mjd)
        np.maximum.at(vmax, star_of, mjd)
        goodstars = {"MANGAID": mangaid, "RA": ra, "DEC": dec, "NVISITS": counts.astype(np.int32),
                     "NPLATES": counts.astype(np.int32), "MINMJD": vmin.astype(np.int32),
                     "MAXMJD": vmax.astype(np.int32)}
        write_mastarall(tmp / names["mastarall"], {k: v[so] for k, v in goodstars.items()}, visits)
        gj = rng.normal(0.0, 0.05 / 3600.0, (2, ns))
        gaia = {"MANGAID": mangaid, "RA": ra, "DEC": dec, "SOURCE_ID": source_id,
                "GAIARA": ra + gj[0] / np.cos(np.radians(dec)), "GAIADEC": dec + gj[1],
                "GAIA_CLEANMATCH": np.ones(ns, np.int16)}
        write_gaia_xmatch(tmp / names["gaia_xmatch"], {k: v[so] for k, v in gaia.items()})

        # ---- allStar ---------------------------------------------------------------------
        write_allstar(tmp / names["allstar"], _allstar(rng, labels, ra, dec, source_id, ref, bad, _apogee_id))
        n_done = DR17Inputs(root, *(root / names[k] for k in names), n_visits=nv, n_stars=ns, n_ref=n_ref,
                            seed=seed, gen_seconds=time.perf_counter() - t0)
        (tmp / "manifest.json").write_text(json.dumps(n_done.manifest(), indent=1))
        if root.exists():
            shutil.rmtree(root)
        tmp.rename(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("generate: %d visits of %d stars, %d reference stars in %.0f s → %s", nv, ns, n_ref,
             n_done.gen_seconds, root)
    return n_done


def _allstar(rng: np.random.Generator, labels: np.ndarray, ra: np.ndarray, dec: np.ndarray,
             source_id: np.ndarray, ref: np.ndarray, bad: np.ndarray, apogee_id) -> dict[str, np.ndarray]:  # noqa: ANN001
    """allStar rows: the ``ref`` stars clean with their 5 labels (catalogue noise added),
    the ``bad`` stars flagged STAR_BAD, 1% duplicate rows (EXTRATARG bit 4, lower S/N),
    and as many APOGEE stars elsewhere on the sky as reference stars (never matched)."""
    idx = np.concatenate([ref, bad])
    n = len(idx)
    lab = labels[idx] + rng.normal(0.0, [30.0, 0.05, 0.02, 0.02, 0.0], (n, 5))
    vmicro = 10.0 ** labels[idx, 4] * (1.0 + rng.normal(0.0, 0.02, n))
    jit = rng.normal(0.0, 0.2 / 3600.0, (2, n))
    has_gaia = rng.random(n) < 0.85  # the rest match by position
    aspcap = np.zeros(n, np.int64)
    aspcap[len(ref):] |= np.int64(1) << 23  # STAR_BAD
    cols = {
        "APOGEE_ID": np.array([apogee_id(a, d) for a, d in zip(ra[idx], dec[idx])]),
        "RA": (ra[idx] + jit[0] / np.cos(np.radians(dec[idx]))) % 360.0, "DEC": dec[idx] + jit[1],
        "SNR": 10.0 ** rng.uniform(np.log10(60.0), np.log10(800.0), n),
        "VSCATTER": np.abs(rng.normal(0.0, 0.2, n)),
        "TEFF": lab[:, 0], "TEFF_ERR": 0.015 * lab[:, 0], "LOGG": lab[:, 1], "LOGG_ERR": np.full(n, 0.05),
        "FE_H": lab[:, 2], "FE_H_ERR": np.full(n, 0.02), "M_H": lab[:, 2], "M_H_ERR": np.full(n, 0.02),
        # ALPHA_FE = ALPHA_M + M_H − FE_H = ALPHA_M here; LOG10_VMICRO = log10(VMICRO)
        "ALPHA_M": lab[:, 3], "ALPHA_M_ERR": np.full(n, 0.02), "VMICRO": vmicro,
        "ASPCAPFLAG": aspcap, "STARFLAG": np.zeros(n, np.int64), "EXTRATARG": np.zeros(n, np.int32),
        "GAIAEDR3_SOURCE_ID": np.where(has_gaia, source_id[idx], 0),
    }
    d = rng.choice(len(ref), max(1, round(0.01 * len(ref))), replace=False)
    dup = {k: v[d].copy() for k, v in cols.items()}
    dup["EXTRATARG"] |= np.int32(1 << 4)
    dup["SNR"] *= 0.5
    dup["TEFF"] += rng.normal(0.0, 40.0, len(d))
    m = len(ref)
    ora, odec = rng.uniform(0.0, 360.0, m), np.degrees(np.arcsin(rng.uniform(-1.0, 1.0, m)))
    other = {"APOGEE_ID": np.array([apogee_id(a, b) for a, b in zip(ora, odec)]), "RA": ora, "DEC": odec,
             "SNR": np.full(m, 100.0), "VSCATTER": np.full(m, 0.1),
             **{k: cols[k][rng.integers(0, n, m)] for k in ("TEFF", "TEFF_ERR", "LOGG", "LOGG_ERR", "FE_H",
                                                            "FE_H_ERR", "M_H", "M_H_ERR", "ALPHA_M",
                                                            "ALPHA_M_ERR", "VMICRO")},
             "ASPCAPFLAG": np.zeros(m, np.int64), "STARFLAG": np.zeros(m, np.int64),
             "EXTRATARG": np.zeros(m, np.int32), "GAIAEDR3_SOURCE_ID": np.zeros(m, np.int64)}
    out = {k: np.concatenate([cols[k], dup[k], other[k]]) for k in cols}
    p = rng.permutation(len(out["APOGEE_ID"]))
    return {k: v[p] for k, v in out.items()}


# --------------------------------------------------------------------------------------
# The build
# --------------------------------------------------------------------------------------

_INPUT_LINE = re.compile(r'^(goodspec|mastarall|allstar|gaia_xmatch)\s*=.*$', re.M)
STAGE_START = re.compile(r"mastar_vac\.build: stage (.+?) \.\.\.\s*$")
STAGE_END = re.compile(r"mastar_vac\.build: stage (.+?) (ran|reused) in ([0-9.]+)s")
TRAIN_CAP = re.compile(r"training stopped at the ([0-9.]+)-minute cap \(epoch (\d+)\)")
# the two ways a training ends without the cap: early stopping, or the last epoch
TRAIN_END = re.compile(r"mastar_vac\.emulator: (early stop at epoch \d+|\d+ epochs) \(best test loss [^)]*\)")


def write_config(inputs: DR17Inputs, path: Path, outdir: Path) -> Path:
    """pipelines/dr17.toml with the [inputs] paths set to the generated files and the
    output dir set; every other setting (labels, emulator, fit, cluster) as shipped."""
    text = (REPO / "pipelines" / "dr17.toml").read_text()
    paths = {k: getattr(inputs, k) for k in ("goodspec", "mastarall", "allstar", "gaia_xmatch")}
    text, n = _INPUT_LINE.subn(lambda m: f'{m.group(1)} = {json.dumps(str(paths[m.group(1)]))}', text)
    if n != 4:
        raise RuntimeError(f"pipelines/dr17.toml: expected 4 [inputs] paths, found {n}")
    text = re.sub(r'^dir\s*=.*$', f"dir = {json.dumps(str(outdir))}", text, count=1, flags=re.M)
    text = re.sub(r'^name\s*=.*$', 'name = "bench_dr17"', text, count=1, flags=re.M)
    path.write_text(text)
    return path


@dataclass
class StageTime:
    name: str
    status: str
    seconds: float
    build_rss: int = 0
    worker_rss: int = 0


def _stop_group(proc: subprocess.Popen) -> None:
    """End the build and its Dask workers together (it runs in a session of its own)."""
    import signal

    for sig, wait in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            pass


def run_build(cfg: Path, outdir: Path, logfile: Path, *, timeout_s: float | None = None
              ) -> tuple[int, float, list[StageTime], ProcessTreeRSS, list[str]]:
    """Run the build in a subprocess, following its log; return (exit code, wall s,
    stages, the RSS sampler, notes such as the training cap)."""
    cmd = [sys.executable, "-m", "mastar_vac.build", "--config", str(cfg), "--output", str(outdir), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    log.info("running: %s", " ".join(cmd))
    stages: list[StageTime] = []
    notes: list[str] = []
    t0 = time.perf_counter()
    with open(logfile, "w", buffering=1) as fh:  # line-buffered: follow it with tail -f
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                cwd=outdir.parent, bufsize=1, start_new_session=True)
        timer = None
        if timeout_s:  # a run past the time available is stopped, and what it did is still reported
            def expire() -> None:
                notes.append(f"STOPPED by --timeout after {timeout_s / 60:.1f} min, during stage {rss.phase!r} "
                             f"(running {time.perf_counter() - phase_t0[0]:.0f} s)")
                _stop_group(proc)

            timer = threading.Timer(timeout_s, expire)
            timer.daemon = True
        phase_t0 = [t0]
        with ProcessTreeRSS(proc.pid, interval=0.2) as rss:
            assert proc.stdout is not None
            if timer is not None:
                timer.start()
            try:
                for line in proc.stdout:
                    _follow(line, fh, rss, stages, notes, t0, phase_t0)
            except KeyboardInterrupt:
                notes.append(f"INTERRUPTED during stage {rss.phase!r}")
                _stop_group(proc)
            finally:
                if timer is not None:
                    timer.cancel()
            rc = proc.wait()
            rss.sample()
    wall = time.perf_counter() - t0
    for st in stages:
        per = rss.phase_peaks.get(st.name, {})
        st.build_rss, st.worker_rss = per.get("build", 0), per.get("worker", 0)
    if rss.phase not in ("between stages", "start") and not any(st.name == rss.phase for st in stages):
        per = rss.phase_peaks.get(rss.phase, {})  # the stage the build was in when it ended
        stages.append(StageTime(rss.phase, "UNFINISHED", time.perf_counter() - phase_t0[0], per.get("build", 0),
                                per.get("worker", 0)))
    return rc, wall, stages, rss, notes


def _follow(line: str, fh, rss: ProcessTreeRSS, stages: list[StageTime], notes: list[str],  # noqa: ANN001
            t0: float, phase_t0: list[float]) -> None:
    """One line of the build's log: kept, and stage starts/ends and training notes picked out."""
    fh.write(line)
    if m := STAGE_START.search(line):
        rss.phase = m.group(1)
        phase_t0[0] = time.perf_counter()
        log.info("stage %s ... (%.0f s)", m.group(1), time.perf_counter() - t0)
    elif m := STAGE_END.search(line):
        stages.append(StageTime(m.group(1), m.group(2), float(m.group(3))))
        log.info("stage %s %s in %s s", m.group(1), m.group(2), m.group(3))
        rss.phase = "between stages"
    elif m := TRAIN_CAP.search(line):
        notes.append(f"emulator training hit the {m.group(1)}-minute cap ([emulator] max_minutes) at epoch "
                     f"{m.group(2)}")
        log.info("%s", notes[-1])
    elif m := TRAIN_END.search(line):  # one line per training (two: outlier search, then the clean set)
        notes.append(f"emulator training: {m.group(0)[len('mastar_vac.emulator: '):]}")
        log.info("%s", notes[-1])
    elif " ERROR " in line or "Traceback" in line:
        log.warning("build: %s", line.rstrip())


def _gb(b: int) -> str:
    return f"{b / 1e9:6.2f}" if b else "     -"


def report(inputs: DR17Inputs, rc: int, wall: float, stages: list[StageTime], rss: ProcessTreeRSS,
           notes: list[str]) -> str:
    lines = [f"DR17-size build: {inputs.n_visits:,} visits × 4,563 px of {inputs.n_stars:,} stars, "
             f"{inputs.n_ref:,} reference stars with 5 labels; {os.cpu_count()} cores",
             f"input files {'reused from' if inputs.reused else 'generated into'} {inputs.root} "
             f"(generation {inputs.gen_seconds:.0f} s, not part of the pipeline time)", "",
             f"{'stage':<12} {'status':<10} {'wall [s]':>9}  {'build RSS [GB]':>14}  {'max worker RSS [GB]':>19}",
             "-" * 71]
    for s in stages:
        lines.append(f"{s.name:<12} {s.status:<10} {s.seconds:9.1f}  {_gb(s.build_rss):>14}  {_gb(s.worker_rss):>19}")
    lines.append("-" * 71)
    lines.append(f"{'sum of stages':<20} {sum(s.seconds for s in stages):9.1f}")
    lines.append(f"{'build, wall':<20} {wall:9.1f}   (process start, imports and cluster start-up included)")
    lines.append("")
    lines.append("peak RSS per process over the run (VmHWM):")
    worst = 0
    for kind in ("build", "worker", "other"):
        for p in sorted(rss.by_kind(kind), key=lambda p: p.pid):
            if kind == "other" and p.peak < 200e6:
                continue  # the resource tracker and the like
            worst = max(worst, p.peak)
            lines.append(f"  {kind:<7} pid {p.pid:<8} {p.peak / 1e9:6.2f} GB")
    lines.append(f"  largest whole-tree total sampled: {max(rss.phase_total.values(), default=0) / 1e9:.2f} GB")
    lines.append("")
    ok_t = rc == 0 and wall <= TARGET_MINUTES * 60
    ok_m = worst <= TARGET_RSS_GB * 1e9
    stopped = any(n.startswith(("STOPPED", "INTERRUPTED")) for n in notes)
    why = "" if rc == 0 else ("; stopped before the end: at least this long" if stopped
                              else f"; the build FAILED with exit code {rc}")
    lines.append(f"target ≤ {TARGET_MINUTES:.0f} min end to end: {'met' if ok_t else 'MISSED'} "
                 f"({wall / 60:.1f} min{why})")
    lines.append(f"target ≤ {TARGET_RSS_GB:.0f} GB per process: {'met' if ok_m else 'MISSED'} "
                 f"(largest {worst / 1e9:.2f} GB)")
    lines += [f"note: {n}" for n in notes]
    if inputs.n_visits != DR17_VISITS or inputs.n_ref != DR17_REF_STARS:
        lines.append(f"note: not DR17 size (--n {inputs.n_visits} --ref-stars {inputs.n_ref}); the targets are "
                     f"for {DR17_VISITS:,} visits and {DR17_REF_STARS:,} reference stars")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=DR17_VISITS, help="visits (default: DR17's 59,266)")
    ap.add_argument("--ref-stars", type=int, default=DR17_REF_STARS, help="clean APOGEE matches (default 3,350)")
    ap.add_argument("--seed", type=int, default=17)
    ap.add_argument("--cache", type=Path, default=None, help=f"input files cache (default {default_cache()})")
    ap.add_argument("--workdir", type=Path, default=None, help="where the build writes (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the build's outputs")
    ap.add_argument("--timeout", type=float, default=None,
                    help="stop the build after this many minutes and report what it did")
    ap.add_argument("--generate-only", action="store_true", help="write the input files and stop")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    inputs = generate_inputs(args.cache or default_cache(), args.n, args.ref_stars, seed=args.seed)
    print(f"input files: {inputs.root} ({'reused' if inputs.reused else f'generated in {inputs.gen_seconds:.0f} s'}"
          f"; generator process peak RSS {self_peak_rss() / 1e9:.2f} GB)", flush=True)
    if args.generate_only:
        return 0
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_dr17_")).absolute()
    work.mkdir(parents=True, exist_ok=True)
    out = work / "output"
    if out.exists():
        shutil.rmtree(out)  # a fresh build each time: no stage may be reused
    out.mkdir()
    try:
        cfg = write_config(inputs, work / "bench_dr17.toml", out)
        rc, wall, stages, rss, notes = run_build(cfg, out, work / "build.log",
                                                 timeout_s=args.timeout * 60 if args.timeout else None)
        if rc != 0:  # the log's end first, so that the results table stays the last thing printed
            print(f"--- end of the build log {work / 'build.log'}:\n" + (work / "build.log").read_text()[-3000:])
            args.keep = True
        print(report(inputs, rc, wall, stages, rss, notes), flush=True)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
        elif args.keep:
            print(f"outputs kept in {work}")
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
