"""cgroups (v1 or v2): the one module the harness, the bench and recovery use for them.

- the harness gives each host a cgroup with a memory limit, a cpuset and an optional cpu quota;
- the bench runs each system in a memory-only cgroup and reads its peak and OOM kills;
- recovery asks how much memory the current process's cgroups still allow (`memory_headroom`).

Detection follows the usual rule: v2 ("unified") if ``/sys/fs/cgroup/cgroup.controllers``
exists, else v1 with one mount per controller (found in ``/proc/mounts``). Cgroups are created
directly under each controller's mount root; names start with ``moeshard-`` so that teardown
can find them by prefix. This module imports nothing of ours and neither torch nor Ray.
"""
from __future__ import annotations

import errno
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
PREFIX = "moeshard-"
#: Controllers a cgroup may use: memory is required; cpuset only where cpus are pinned; cpu is optional.
CONTROLLERS = ("memory", "cpuset", "cpu")
_CPU_PERIOD_US = 100_000
#: v1 spells "no limit" as a huge multiple of the page size; anything above this is unlimited.
_V1_UNLIMITED = 1 << 60
# Joins every cgroup.procs file given before "--", then execs the rest: the process is inside its
# cgroup before the real command starts, so nothing it forks escapes.
_JOIN_THEN_EXEC = (
    'while [ "$1" != -- ]; do echo $$ > "$1" || exit 97; shift; done; shift; exec "$@"'
)


class CgroupError(RuntimeError):
    """cgroups are missing, not writable, or refused an operation."""


@dataclass(frozen=True)
class Layout:
    """Where the controllers live: version 2 has a single ``unified`` mount."""

    version: int
    mounts: dict[str, Path]

    def bases(self) -> list[Path]:
        """Distinct directories cgroups are created in."""
        return sorted(set(self.mounts.values()))


@dataclass(frozen=True)
class MemoryFiles:
    """Names of the memory controller's files in one cgroup version."""

    limit: str
    usage: str
    peak: str


def memory_files(version: int) -> MemoryFiles:
    """The memory controller's file names for cgroup ``version`` (1 or 2)."""
    if version == 2:
        return MemoryFiles("memory.max", "memory.current", "memory.peak")
    return MemoryFiles("memory.limit_in_bytes", "memory.usage_in_bytes", "memory.max_usage_in_bytes")


def detect(root: Path = CGROUP_ROOT, mounts_file: Path = Path("/proc/mounts")) -> Layout:
    """Find the cgroup layout of this machine; raise :class:`CgroupError` if it has no memory controller."""
    if (root / "cgroup.controllers").exists():
        available = (root / "cgroup.controllers").read_text().split()
        if "memory" not in available:
            raise CgroupError(f"cgroup v2 at {root} lacks the memory controller")
        return Layout(2, {c: root for c in CONTROLLERS if c in available})
    mounts: dict[str, Path] = {}
    with open(mounts_file) as f:
        for line in f:
            _dev, mnt, fstype, opts, *_ = line.split()
            if fstype != "cgroup":
                continue
            for opt in opts.split(","):
                if opt in CONTROLLERS:
                    mounts[opt] = Path(mnt)
    if "memory" not in mounts:
        raise CgroupError("cgroup v1 memory controller not mounted")
    return Layout(1, mounts)


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read_int(path: Path) -> int | None:
    """The integer in a cgroup file; None if missing, unreadable or "max"."""
    try:
        raw = path.read_text().strip()
    except OSError:
        return None
    if raw == "max":
        return None
    try:
        value = int(raw)
    except ValueError:
        return None
    return None if value >= _V1_UNLIMITED else value


def _enable_v2_controllers(base: Path, controllers: list[str]) -> None:
    """Delegate ``controllers`` to children of ``base`` (v2 ``cgroup.subtree_control``)."""
    enabled = (base / "cgroup.subtree_control").read_text().split()
    for c in controllers:
        if c not in enabled:
            try:
                _write(base / "cgroup.subtree_control", f"+{c}")
            except OSError as exc:
                raise CgroupError(
                    f"cannot enable the {c} controller in {base}/cgroup.subtree_control: {exc}"
                ) from exc


@dataclass
class Cgroup:
    """The directories of one cgroup (one per v1 controller, one on v2)."""

    name: str
    layout: Layout
    paths: dict[str, Path] = field(default_factory=dict)

    @property
    def main(self) -> Path:
        """The directory whose ``cgroup.procs`` lists every process of the cgroup."""
        return self.paths["memory"]

    def attach_files(self) -> list[Path]:
        """``cgroup.procs`` files a new process must write its pid to, one per hierarchy."""
        return sorted({p / "cgroup.procs" for p in self.paths.values()})

    def wrap(self, cmd: list[str]) -> list[str]:
        """argv that moves itself into this cgroup and then execs ``cmd`` (exit 97 if it cannot join)."""
        return ["sh", "-c", _JOIN_THEN_EXEC, "sh", *map(str, self.attach_files()), "--", *cmd]

    def pids(self) -> list[int]:
        """PIDs currently in the cgroup (empty if it is gone)."""
        try:
            return [int(p) for p in (self.main / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    def set_memory_limit(self, limit_bytes: int) -> None:
        """Set the memory limit, with no swap beyond it where the kernel accounts swap."""
        mem = self.paths["memory"]
        limit = mem / memory_files(self.layout.version).limit
        try:
            if self.layout.version == 2:
                _write(limit, str(limit_bytes))
                if (mem / "memory.swap.max").exists():
                    _write(mem / "memory.swap.max", "0")
                return
            memsw = mem / "memory.memsw.limit_in_bytes"
            # v1 requires memsw >= limit at every step: raise memsw first, lower it last.
            current = int(limit.read_text())
            order = [limit, memsw] if limit_bytes < current else [memsw, limit]
            for path in order:
                if path.exists():
                    _write(path, str(limit_bytes))
            if (mem / "memory.swappiness").exists():
                _write(mem / "memory.swappiness", "0")
        except OSError as exc:
            raise CgroupError(f"cannot set memory limit {limit_bytes} on {mem}: {exc}") from exc

    def memory_limit(self) -> int | None:
        """The memory limit in bytes (None: unlimited or unreadable)."""
        return _read_int(self.main / memory_files(self.layout.version).limit)

    def usage(self) -> int | None:
        """Memory charged to the cgroup now, page cache included."""
        return _read_int(self.main / memory_files(self.layout.version).usage)

    def peak(self) -> int | None:
        """Highest memory charged since creation (None where the kernel does not record it)."""
        return _read_int(self.main / memory_files(self.layout.version).peak)

    def oom_kills(self) -> int:
        """Processes the kernel OOM-killed inside the cgroup (0 if it does not say)."""
        events = "memory.events" if self.layout.version == 2 else "memory.oom_control"
        try:
            for line in (self.main / events).read_text().splitlines():
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
        except OSError:
            pass
        return 0

    def disk_read_bytes(self) -> int:
        """Bytes the cgroup's processes have read from storage so far (page-cache hits excluded): io.stat's
        rbytes on v2 where the io controller is on, else the sum of psutil's ``io_counters().read_bytes``
        over the processes now in the cgroup (a process that exited takes its count with it)."""
        stat = self.main / "io.stat"
        if self.layout.version == 2 and stat.exists():
            try:
                return sum(int(f.split("=", 1)[1]) for line in stat.read_text().splitlines()
                           for f in line.split()[1:] if f.startswith("rbytes="))
            except (OSError, ValueError):
                pass
        import psutil

        total = 0
        for pid in self.pids():
            try:
                total += psutil.Process(pid).io_counters().read_bytes
            except (psutil.Error, OSError):   # gone meanwhile, or not ours to read
                pass
        return total

    def set_cpus(self, cpus: list[int], quota: float | None = None) -> None:
        """Pin to ``cpus`` and optionally cap at ``quota`` CPUs of time."""
        if "cpuset" not in self.paths:
            raise CgroupError(f"cgroup {self.name} has no cpuset controller")
        cs = self.paths["cpuset"]
        if self.layout.version == 1:
            # A v1 cpuset accepts no task until both cpus and mems are set.
            parent_mems = (cs.parent / "cpuset.mems").read_text().strip()
            _write(cs / "cpuset.mems", parent_mems)
        _write(cs / "cpuset.cpus", ",".join(str(c) for c in cpus))
        if quota is not None:
            if "cpu" not in self.paths:
                raise CgroupError("cpu controller not available for a cpu quota")
            cpu = self.paths["cpu"]
            quota_us = max(1000, int(quota * _CPU_PERIOD_US))
            if self.layout.version == 2:
                _write(cpu / "cpu.max", f"{quota_us} {_CPU_PERIOD_US}")
            else:
                _write(cpu / "cpu.cfs_period_us", str(_CPU_PERIOD_US))
                _write(cpu / "cpu.cfs_quota_us", str(quota_us))

    def kill_all(self, timeout: float = 10.0) -> None:
        """SIGKILL every process in the cgroup until it is empty or ``timeout`` passes."""
        kill_file = self.main / "cgroup.kill"
        deadline = time.monotonic() + timeout
        while True:
            pids = self.pids()
            if not pids:
                return
            if self.layout.version == 2 and kill_file.exists():
                try:
                    _write(kill_file, "1")
                except OSError:
                    pass
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                raise CgroupError(f"processes {pids} survived SIGKILL in {self.main}")
            time.sleep(0.05)

    def remove(self, timeout: float = 10.0) -> None:
        """Kill what is left and remove every directory; missing is fine."""
        self.kill_all(timeout)
        for path in self.paths.values():
            remove_dir(path, timeout)

    def __enter__(self) -> "Cgroup":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def remove_dir(path: Path, timeout: float = 10.0) -> None:
    """``rmdir`` a cgroup directory, retrying while the kernel still reports it busy."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise CgroupError(f"cannot remove cgroup {path}: {exc}") from exc
            time.sleep(0.05)


def create(
    name: str,
    memory_bytes: int,
    cpus: list[int] | None = None,
    cpu_quota: float | None = None,
    layout: Layout | None = None,
) -> Cgroup:
    """Create cgroup ``name`` with a memory limit; with ``cpus`` also a cpuset (and optional cpu quota).

    Without ``cpus`` only the memory controller is used (the bench's case)."""
    layout = layout or detect()
    if cpus is None:
        controllers = ["memory"]
    else:
        if "cpuset" not in layout.mounts:
            raise CgroupError(f"cgroup v{layout.version} has no cpuset controller to pin cpus with")
        controllers = [c for c in CONTROLLERS if c in layout.mounts]
    if layout.version == 2:
        _enable_v2_controllers(layout.mounts["memory"], controllers)
    cg = Cgroup(name, layout)
    try:
        for controller in controllers:
            path = layout.mounts[controller] / name
            path.mkdir(exist_ok=True)
            cg.paths[controller] = path
        cg.set_memory_limit(memory_bytes)
        if cpus is not None:
            cg.set_cpus(cpus, cpu_quota)
    except OSError as exc:
        cg.remove()
        raise CgroupError(f"cannot create cgroup {name}: {exc}") from exc
    except CgroupError:
        cg.remove()
        raise
    return cg


def open_existing(name: str, layout: Layout | None = None) -> Cgroup:
    """A handle on an existing cgroup ``name`` (only the directories that exist)."""
    layout = layout or detect()
    paths = {c: base / name for c, base in layout.mounts.items() if (base / name).is_dir()}
    return Cgroup(name, layout, paths)


def find(prefix: str = PREFIX, layout: Layout | None = None) -> list[str]:
    """Names of cgroups starting with ``prefix`` under any controller's root."""
    try:
        layout = layout or detect()
    except CgroupError:
        return []
    names = set()
    for base in layout.bases():
        names.update(p.name for p in base.iterdir() if p.is_dir() and p.name.startswith(prefix))
    return sorted(names)


def parent_cpus(layout: Layout | None = None) -> list[int]:
    """CPUs the cpuset root allows (where host cpusets are carved from)."""
    layout = layout or detect()
    base = layout.mounts.get("cpuset")
    text = ""
    for fname in ("cpuset.cpus.effective", "cpuset.effective_cpus", "cpuset.cpus"):
        if base is not None and (base / fname).exists():
            text = (base / fname).read_text().strip()
            if text:
                break
    if not text:
        return list(range(os.cpu_count() or 1))
    cpus: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def unavailable_reason(pin_cpus: bool = True) -> str:
    """Why cgroups cannot be created here ("" if they can): creates and removes a probe cgroup.

    ``pin_cpus`` also needs the cpuset controller (the harness); without it, memory alone (the bench)."""
    probe = f"{PREFIX}probe-{os.getpid()}"
    try:
        layout = detect()
        create(probe, 256 << 20, parent_cpus(layout)[:1] if pin_cpus else None, layout=layout).remove()
    except (CgroupError, OSError) as exc:
        return str(exc)
    return ""


def process_cgroups(cgroup_file: Path = PROC_CGROUP) -> dict[str, str]:
    """``{controller: path}`` of a process from its ``/proc/<pid>/cgroup`` ("" is the v2 unified one)."""
    out: dict[str, str] = {}
    try:
        lines = cgroup_file.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        for c in controllers.split(",") if controllers else [""]:
            out[c] = path
    return out


def memory_headroom(layout: Layout | None = None, cgroup_file: Path = PROC_CGROUP) -> int | None:
    """Smallest (limit - usage) over a process's memory cgroup and its ancestors; None if no limit is set
    or cgroups are not readable (``cgroup_file`` names the process, this one by default)."""
    try:
        layout = layout or detect()
    except (CgroupError, OSError):
        return None
    rel = process_cgroups(cgroup_file).get("" if layout.version == 2 else "memory")
    base = layout.mounts.get("memory")
    if rel is None or base is None:
        return None
    files = memory_files(layout.version)
    best: int | None = None
    d = base / rel.lstrip("/")
    while True:
        limit, usage = _read_int(d / files.limit), _read_int(d / files.usage)
        if limit is not None and usage is not None:
            room = max(0, limit - usage)
            best = room if best is None else min(best, room)
        if d == base or d.parent == d:
            return best
        d = d.parent
