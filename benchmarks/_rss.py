"""Peak resident memory of a process tree, per process and per phase, sampled in a thread.

Used by benchmarks/bench_dr17.py, which runs the build as a subprocess: the root is the
build process, its Dask workers are descendants (LocalCluster: ``multiprocessing`` spawn
children; separate ``dask worker`` processes are recognised too). The whole-tree totals
that bench_ingest's ``PeakRSS`` gives cannot say which process would hit a per-process
limit, hence this one.

Each sample reads ``/proc/<pid>/status``: VmRSS (now) and VmHWM, the kernel's own
high-water mark of the process — exact, so a spike between two samples is not missed
in the per-process peak. Per-phase peaks come from the samples only (VmHWM never falls,
so it cannot be split by phase). The tree is listed with psutil when installed, else by
scanning /proc for parent ids.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

try:
    import psutil
except ImportError:  # /proc scanning below
    psutil = None  # type: ignore[assignment]

__all__ = ["ProcInfo", "ProcessTreeRSS", "process_kind"]


def _children_proc(root: int) -> list[int]:
    """Descendants of ``root`` from /proc/<pid>/stat (field 4 is the parent id)."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        # the command name (field 2) is in parentheses and may hold spaces
        rest = stat[stat.rfind(")") + 2:].split()
        parent[int(d.name)] = int(rest[1])
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


def _tree(root: int) -> list[int]:
    if psutil is not None:
        try:
            return [root, *(c.pid for c in psutil.Process(root).children(recursive=True))]
        except psutil.Error:
            return []
    return [root, *_children_proc(root)]


def _status(pid: int) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) in bytes, or None once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    vals = {}
    for line in text.splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            k, v = line.split(":", 1)
            vals[k] = int(v.split()[0]) * 1024
    if "VmRSS" not in vals:  # a zombie has no memory lines
        return None
    return vals["VmRSS"], vals.get("VmHWM", vals["VmRSS"])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def process_kind(cmdline: str, *, is_root: bool) -> str:
    """"build" (the root), "worker" (a Dask worker process) or "other" (e.g. the
    multiprocessing resource tracker, a compiler run by torch)."""
    if is_root:
        return "build"
    if "spawn_main" in cmdline or "dask worker" in cmdline or "distributed.cli.dask_worker" in cmdline:
        return "worker"
    return "other"


@dataclass
class ProcInfo:
    pid: int
    kind: str
    cmdline: str
    peak_sampled: int = 0
    hwm: int = 0  # last VmHWM read: the process's exact peak RSS up to then

    @property
    def peak(self) -> int:
        return max(self.peak_sampled, self.hwm)


@dataclass
class ProcessTreeRSS:
    """Sample ``root`` and its descendants every ``interval`` s until stopped. Set
    :attr:`phase` from outside (e.g. on a log line) to attribute samples to phases."""

    root: int
    interval: float = 0.2
    phase: str = "start"
    procs: dict[int, ProcInfo] = field(default_factory=dict)
    #: phase → kind → the largest single-process RSS sampled in that phase
    phase_peaks: dict[str, dict[str, int]] = field(default_factory=dict)
    #: phase → the largest whole-tree RSS sampled in that phase
    phase_total: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._t = threading.Thread(target=self._run, daemon=True, name="rss-sampler")

    def sample(self) -> None:
        phase = self.phase
        total = 0
        for pid in _tree(self.root):
            st = _status(pid)
            if st is None:
                continue
            rss, hwm = st
            with self._lock:
                info = self.procs.get(pid)
                if info is None:
                    cmd = _cmdline(pid)
                    info = self.procs[pid] = ProcInfo(pid, process_kind(cmd, is_root=pid == self.root), cmd)
                info.peak_sampled = max(info.peak_sampled, rss)
                info.hwm = max(info.hwm, hwm)
                per = self.phase_peaks.setdefault(phase, {})
                per[info.kind] = max(per.get(info.kind, 0), rss)
            total += rss
        with self._lock:
            self.phase_total[phase] = max(self.phase_total.get(phase, 0), total)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def by_kind(self, kind: str) -> Iterator[ProcInfo]:
        with self._lock:
            return iter([p for p in self.procs.values() if p.kind == kind])

    def __enter__(self) -> ProcessTreeRSS:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


def self_peak_rss() -> int:
    """VmHWM of this process (bytes)."""
    st = _status(os.getpid())
    return st[1] if st else 0
