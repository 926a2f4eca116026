"""``python -m mastar_vac.build``: run the pipeline end to end from a TOML configuration.

Orchestration only: each stage is a function of another module; this file decides the
order, where outputs go, and what is reused. Stages whose inputs and settings have not
changed are not recomputed (each stage keeps a record of what it was made from).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .config import Config, load_config
from .errors import MastarVacError

__all__ = ["main", "run_build", "BuildResult"]

log = logging.getLogger("mastar_vac.build")


@dataclass
class StageReport:
    name: str
    seconds: float
    status: str  # "ran" | "reused"
    detail: str = ""


@dataclass
class BuildResult:
    config: Config
    outdir: Path
    stages: list[StageReport] = field(default_factory=list)
    products: dict[str, Path] = field(default_factory=dict)

    def table(self) -> str:
        w = max(len(s.name) for s in self.stages) if self.stages else 5
        lines = [f"{'stage':<{w}}  {'status':<7} {'time':>8}  detail", "-" * (w + 40)]
        for s in self.stages:
            lines.append(f"{s.name:<{w}}  {s.status:<7} {s.seconds:7.1f}s  {s.detail}")
        lines.append("")
        lines.append("products:")
        for k, v in self.products.items():
            lines.append(f"  {k:<12} {v}")
        return "\n".join(lines)


def _stage(result: BuildResult, name: str, fn: Callable[[], tuple[str, str]]) -> None:
    log.info("stage %s ...", name)
    t0 = time.perf_counter()
    status, detail = fn()
    dt = time.perf_counter() - t0
    result.stages.append(StageReport(name, dt, status, detail))
    log.info("stage %s %s in %.1fs: %s", name, status, dt, detail)


def resolve_inputs(cfg: Config) -> Config:
    """Fill the input paths of a demo run with the embedded demo files (built on first use)."""
    if not cfg.inputs.demo:
        return cfg
    from .demo import demo_files

    files = demo_files(seed=cfg.run.seed, n_stars=cfg.inputs.demo_stars)
    chosen = {
        "goodspec": cfg.inputs.goodspec or files.goodspec,
        "mastarall": cfg.inputs.mastarall or files.mastarall,
        "allstar": cfg.inputs.allstar or files.allstar,
        "gaia_xmatch": cfg.inputs.gaia_xmatch or files.gaia_xmatch,
        "comparison_labels": cfg.inputs.comparison_labels or files.labels,
    }
    return cfg.replace("inputs", **chosen)


def _client_threads() -> None:
    """Torch threads of this (the client's) process, for its own work: training and
    validation. Set explicitly, from this process's cores, before any Dask cluster starts:
    a LocalCluster puts its workers' OMP_NUM_THREADS into this process's environment, and
    torch imported after that would train with one thread — a different float32
    summation order, so a different emulator than the same build with ``--scheduler``."""
    import torch

    from .cluster import worker_cores

    torch.set_num_threads(worker_cores())


def run_build(cfg: Config, *, scheduler: str | None = None, outdir: Path | None = None,
              progress: bool = True) -> BuildResult:
    """Run every stage; return what ran, what was reused and where the products are."""
    from . import stages
    from .cluster import dask_client
    from .io.atomic import remove_stale_parts

    # absolute (also the --output override): every product path derived from it goes to
    # Dask workers, which resolve relative paths in working directories of their own
    outdir = Path(outdir or cfg.output.dir).absolute()
    cfg = cfg.replace("output", dir=outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    n_stale = remove_stale_parts(outdir)
    if n_stale:
        log.info("removed %d partial file(s) left by an interrupted run in %s", n_stale, outdir)
    result = BuildResult(cfg, outdir)
    if cfg.inputs.demo:
        def demo() -> tuple[str, str]:
            nonlocal cfg
            cfg = resolve_inputs(cfg)
            result.config = cfg
            return "ran", f"goodspec {cfg.inputs.goodspec}"

        _stage(result, "demo data", demo)

    ctx = stages.StageContext(cfg, outdir, progress=progress)
    _client_threads()
    _stage(result, "ingest", ctx.ingest)
    result.products["cube"] = ctx.cube_path
    with dask_client(cfg.cluster, scheduler=scheduler) as client:
        log.info("Dask dashboard: %s", getattr(client, "dashboard_link", "n/a"))
        # the workers open the cube and the emulator by path: stop here, with the path and
        # the worker named, if one cannot (not on storage it sees), not deep in a task
        from .cluster import check_worker_storage

        check_worker_storage(client, outdir, read=[ctx.cube_path, *filter(None, [cfg.inputs.emulator])])
        _stage(result, "normalize", ctx.normalize)
        if cfg.inputs.emulator is None:
            _stage(result, "reference", ctx.reference)
            result.products["reference"] = ctx.reference_path
            _stage(result, "emulator", ctx.emulator)
            result.products["emulator"] = ctx.emulator_path
            result.products["diagnostic"] = ctx.diagnostic_path
        else:
            _stage(result, "emulator", ctx.use_given_emulator)
        _stage(result, "fit", ctx.fit)
        result.products["fits"] = ctx.fits_path
        if cfg.inputs.emulator is None:
            _stage(result, "validation", ctx.validation)
            result.products["validation"] = ctx.validation_path.with_suffix(".txt")
        _stage(result, "catalog", ctx.catalog)
        result.products["vac (FITS)"] = ctx.vac_fits_path
        result.products["vac (Parquet)"] = ctx.vac_parquet_path
        _stage(result, "compare", ctx.compare)
        _stage(result, "report", ctx.report)
        result.products["report"] = ctx.report_dir / "report.html"
    return result


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mastar_vac.build",
        description="Build the MaStar stellar-parameter catalogue. With no arguments, runs "
                    "pipelines/demo.toml on the embedded demo data (real MILES spectra).")
    p.add_argument("--config", type=Path, default=None, help="TOML configuration (default: pipelines/demo.toml)")
    p.add_argument("--scheduler", default=None, help="address of a running Dask scheduler to join")
    p.add_argument("--output", type=Path, default=None, help="output directory (overrides [output] dir)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--version", action="version", version=f"mastar_vac {__version__}")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    # distributed configures its loggers (at INFO) when first imported; keep them to
    # warnings unless the user asked for more
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("distributed", "numcodecs", "asyncio", "matplotlib", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg = load_config(args.config)
        result = run_build(cfg, scheduler=args.scheduler, outdir=args.output, progress=not args.no_progress)
    except MastarVacError as exc:
        log.error("%s", exc)
        return 2
    except OSError as exc:  # disk full, permissions, a vanished mount: say which file, stop cleanly
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        log.error("cannot read or write%s: %s. Outputs are written atomically: nothing half-written was left "
                  "under its final name; rerun once fixed and finished stages are reused.", where,
                  exc.strerror or exc)
        return 2
    print(result.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
