"""Run configuration: one typed place, loaded from TOML files under ``pipelines/``.

Every section is a frozen dataclass; :func:`load_config` reads a TOML file, rejects
unknown sections and keys (a typo must not silently fall back to a default), checks
types, and resolves paths. Relative paths are taken relative to the current working
directory, as with any command-line tool; ``~`` and ``$VARS`` are expanded. Every path
is made absolute on load (:func:`absolute_paths`): Dask workers run in working
directories of their own (``dask worker`` started elsewhere, SLURM jobs), so a relative
path sent to them would name a different file.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .emulator import TrainConfig
from .errors import ConfigError
from .fit import FitConfig
from .quality import QualityConfig
from .reference import ReferenceConfig
from .synthetic import SyntheticConfig
from .uncertainty import UncertaintyConfig

__all__ = [
    "Config",
    "InputsConfig",
    "CubeConfig",
    "NormalizeConfig",
    "OutputConfig",
    "ClusterConfig",
    "ReferenceConfig",
    "SyntheticConfig",
    "TrainConfig",
    "FitConfig",
    "UncertaintyConfig",
    "QualityConfig",
    "load_config",
    "default_config_path",
    "absolute_paths",
]


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    seed: int = 20221


@dataclass(frozen=True)
class InputsConfig:
    """Survey files. With ``demo = true`` the embedded MILES/STELIB-based demo files are used
    for every survey file left empty."""

    demo: bool = False
    demo_stars: int | None = None  # limit the demo to its first N MILES stars, their STELIB visits and
    #                                ⌈N·88/984⌉ STELIB-only stars (tests)
    goodspec: Path | None = None
    mastarall: Path | None = None
    allstar: Path | None = None
    gaia_xmatch: Path | None = None
    combspec: Path | None = None
    lamost: Path | None = None
    segue: Path | None = None
    gaia_dr3: Path | None = None
    # FERRE grid (.hdr/.unf or .dat) for the theoretical extension, or "builtin": the grid
    # mastar_vac.builtin_grid builds (once, cached) from thedoppler's hot-dwarf Cannon model
    synthetic_grid: Literal["builtin"] | Path | None = None
    emulator: Path | None = None  # a saved emulator to use instead of training one
    comparison_labels: Path | None = None  # CSV of published labels by MANGAID (the demo: MILES/STELIB labels)


@dataclass(frozen=True)
class CubeConfig:
    chunk: int = 1024  # visits per Zarr chunk and per Dask task
    bad_mask_bits: int = -1  # MASK bits that make a pixel unusable; -1 = any bit, 0 = ignore MASK


@dataclass(frozen=True)
class NormalizeConfig:
    window: int = 400  # pixels in the running median (paper §2.2)
    min_count: int = 40  # fewer usable pixels in a window: continuum undefined there


@dataclass(frozen=True)
class OutputConfig:
    dir: Path = Path("output")


@dataclass(frozen=True)
class ClusterConfig:
    scheduler: str | None = None  # address of a running scheduler; None = start a LocalCluster
    n_workers: int = 2
    threads_per_worker: int = 1
    memory_limit: str = "4GiB"
    processes: bool = True
    profile: Path | None = None  # e.g. pipelines/cluster/slurm.toml (dask-jobqueue)


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    inputs: InputsConfig = field(default_factory=InputsConfig)
    cube: CubeConfig = field(default_factory=CubeConfig)
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    emulator: TrainConfig = field(default_factory=TrainConfig)
    fit: FitConfig = field(default_factory=FitConfig)
    uncertainty: UncertaintyConfig = field(default_factory=UncertaintyConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    source: Path | None = None  # the TOML file this came from

    def replace(self, section: str, **changes: Any) -> Config:
        """A copy with some keys of one section changed (e.g. from the command line)."""
        return dataclasses.replace(self, **{section: dataclasses.replace(getattr(self, section), **changes)})

    def to_dict(self) -> dict[str, Any]:
        def conv(v: Any) -> Any:
            if isinstance(v, Path):
                return str(v)
            if dataclasses.is_dataclass(v):
                return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
            if isinstance(v, (list, tuple)):
                return [conv(x) for x in v]
            if isinstance(v, collections.abc.Mapping):
                return {k: conv(x) for k, x in v.items()}
            return v

        d = conv(self)
        d.pop("source", None)
        return d


def default_config_path() -> Path:
    """``pipelines/demo.toml`` of the source tree, or the copy installed with the package."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "pipelines" / "demo.toml", here / "pipelines" / "demo.toml"):
        if candidate.exists():
            return candidate
    raise ConfigError("pipelines/demo.toml not found; pass --config")


def _expand(p: str) -> Path:
    return Path(os.path.expandvars(os.path.expanduser(p)))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is Literal:
        if not any(value == v and type(value) is type(v) for v in args):
            raise ConfigError(f"{where}: expected one of {list(args)}, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: expected a path string, got {value!r}")
        return _expand(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if args and args[-1] is not Ellipsis and len(args) != len(value):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        types_ = [args[0]] * len(value) if (not args or args[-1] is Ellipsis) else list(args)
        return tuple(_coerce(v, t, f"{where}[{i}]") for i, (v, t) in enumerate(zip(value, types_)))
    if origin in (dict, collections.abc.Mapping):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {k: _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, where)
    return value


def _from_dict(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.name != "source"}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:  # a section's own checks (e.g. bounds order)
        raise ConfigError(f"{where}: {exc}") from None


def _validate(cfg: Config) -> None:
    where = str(cfg.source) if cfg.source else "config"
    # tables keyed by label name: a misspelt label (TEFFF) would otherwise be kept and
    # never read, and the default silently used for the label meant
    from .fit import DEFAULT_BOUNDS
    from .uncertainty import DEFAULT_FLOORS

    known = sorted(set(DEFAULT_BOUNDS) | set(DEFAULT_FLOORS) | set(cfg.emulator.labels))
    for table, keys in (("fit.bounds", cfg.fit.bounds), ("uncertainty.floor", cfg.uncertainty.floor)):
        unknown = sorted(set(keys) - set(known))
        if unknown:
            raise ConfigError(f"{where}: [{table}] unknown label(s) {', '.join(unknown)}; "
                              f"known: {', '.join(known)}")
    if cfg.inputs.combspec is not None:
        # accepted and never read would be a silent key: refuse it until something reads it
        raise ConfigError(f"{where}: inputs.combspec = {cfg.inputs.combspec}: the LSF-homogenized combined "
                          "spectra are the input of the resolution study (paper §5.1), not of a build: give the "
                          "files to `python -m mastar_vac.studies.resolution --combspec FILE ...` and remove the "
                          "key (the build reads goodspec)")
    if cfg.cube.chunk < 1:
        raise ConfigError(f"{where}: cube.chunk must be >= 1, got {cfg.cube.chunk}")
    if cfg.normalize.window < 3:
        raise ConfigError(f"{where}: normalize.window must be >= 3, got {cfg.normalize.window}")
    if not 1 <= cfg.normalize.min_count <= cfg.normalize.window:
        raise ConfigError(f"{where}: normalize.min_count must be in [1, window]")
    if cfg.cluster.n_workers < 1 or cfg.cluster.threads_per_worker < 1:
        raise ConfigError(f"{where}: cluster.n_workers and threads_per_worker must be >= 1")
    if not cfg.inputs.demo and cfg.inputs.goodspec is None:
        raise ConfigError(f"{where}: [inputs] needs goodspec (or demo = true)")
    if not cfg.inputs.demo and cfg.inputs.allstar is None and cfg.inputs.emulator is None:
        raise ConfigError(f"{where}: [inputs] needs allstar (to build the reference set and train the emulator) "
                          "or emulator (a saved one)")
    if not cfg.emulator.labels:
        raise ConfigError(f"{where}: emulator.labels must name at least one label")
    if cfg.inputs.synthetic_grid == "builtin":
        from .builtin_grid import doppler_data_dir

        try:  # fail now, not after the ingest, when thedoppler is missing
            doppler_data_dir()
        except ConfigError as exc:
            raise ConfigError(f"{where}: inputs.{exc}") from None


def _absolute(value: Any, base: Path) -> Any:
    if isinstance(value, Path):
        return value if value.is_absolute() else Path(os.path.normpath(base / value))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: _absolute(getattr(value, f.name), base) for f in dataclasses.fields(value)
                   if f.init and f.name != "source"}
        changes = {k: v for k, v in changes.items() if v is not getattr(value, k)}
        return dataclasses.replace(value, **changes) if changes else value
    return value


def absolute_paths(cfg: Config, base: str | os.PathLike[str] | None = None) -> Config:
    """``cfg`` with every path of every section absolute, relative ones taken against
    ``base`` (default: the current working directory, that of the command)."""
    return _absolute(cfg, Path(base) if base is not None else Path.cwd())


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read and validate a TOML configuration (default: ``pipelines/demo.toml``)."""
    p = Path(path) if path is not None else default_config_path()
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{p}: configuration file not found") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot be read ({exc.strerror})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML ({exc})") from None
    try:
        cfg = _from_dict(Config, data, "")
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None
    cfg = dataclasses.replace(absolute_paths(cfg), source=p.resolve())
    _validate(cfg)
    return cfg
