"""Per-host cgroups (memory limit, cpuset, optional cpu quota) on cgroup v1 or v2.

Detection follows the usual rule: v2 ("unified") if ``/sys/fs/cgroup/cgroup.controllers``
exists, else v1 with one mount per controller (found in ``/proc/mounts``). Host cgroups
are created directly under each controller's mount root and named
``moeshard-<cluster-id>-h<i>`` so that teardown can find them by prefix.
"""
from __future__ import annotations

import errno
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
PREFIX = "moeshard-"
#: Controllers a host cgroup uses; memory and cpuset are required, cpu is optional.
CONTROLLERS = ("memory", "cpuset", "cpu")
_CPU_PERIOD_US = 100_000


class CgroupError(RuntimeError):
    """cgroups are missing, not writable, or refused an operation."""


@dataclass(frozen=True)
class Layout:
    """Where the controllers live: version 2 has a single ``unified`` mount."""

    version: int
    mounts: dict[str, Path]

    def bases(self) -> list[Path]:
        """Distinct directories host cgroups are created in."""
        return sorted(set(self.mounts.values()))


def detect(root: Path = CGROUP_ROOT) -> Layout:
    """Find the cgroup layout of this machine; raise :class:`CgroupError` if unusable."""
    if (root / "cgroup.controllers").exists():
        available = (root / "cgroup.controllers").read_text().split()
        missing = {"memory", "cpuset"} - set(available)
        if missing:
            raise CgroupError(f"cgroup v2 at {root} lacks controllers {sorted(missing)}")
        return Layout(2, {c: root for c in CONTROLLERS if c in available})
    mounts: dict[str, Path] = {}
    with open("/proc/mounts") as f:
        for line in f:
            _dev, mnt, fstype, opts, *_ = line.split()
            if fstype != "cgroup":
                continue
            for opt in opts.split(","):
                if opt in CONTROLLERS:
                    mounts[opt] = Path(mnt)
    missing = {"memory", "cpuset"} - set(mounts)
    if missing:
        raise CgroupError(f"cgroup v1 controllers not mounted: {sorted(missing)}")
    return Layout(1, mounts)


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


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
class HostCgroup:
    """The cgroup directories of one host (one per v1 controller, one on v2)."""

    name: str
    layout: Layout
    paths: dict[str, Path] = field(default_factory=dict)

    @property
    def main(self) -> Path:
        """The directory whose ``cgroup.procs`` lists every process of the host."""
        return self.paths["memory"]

    def attach_files(self) -> list[Path]:
        """``cgroup.procs`` files a new process must write its pid to, one per hierarchy."""
        return sorted({p / "cgroup.procs" for p in self.paths.values()})

    def pids(self) -> list[int]:
        """PIDs currently in the host (empty if the cgroup is gone)."""
        try:
            return [int(p) for p in (self.main / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    def set_memory_limit(self, limit_bytes: int) -> None:
        """Set the memory limit (swap included where the kernel accounts it)."""
        mem = self.paths["memory"]
        if self.layout.version == 2:
            _write(mem / "memory.max", str(limit_bytes))
            if (mem / "memory.swap.max").exists():
                _write(mem / "memory.swap.max", "0")
            return
        limit, memsw = mem / "memory.limit_in_bytes", mem / "memory.memsw.limit_in_bytes"
        # v1 requires memsw >= limit at every step: raise memsw first, lower it last.
        try:
            current = int(limit.read_text())
            order = [limit, memsw] if limit_bytes < current else [memsw, limit]
            for path in order:
                if path.exists():
                    _write(path, str(limit_bytes))
        except OSError as exc:
            raise CgroupError(f"cannot set memory limit {limit_bytes} on {mem}: {exc}") from exc

    def set_cpus(self, cpus: list[int], quota: float | None = None) -> None:
        """Pin to ``cpus`` and optionally cap at ``quota`` CPUs of time."""
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
        """SIGKILL every process in the host until it is empty or ``timeout`` passes."""
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
    cpus: list[int],
    cpu_quota: float | None = None,
    layout: Layout | None = None,
) -> HostCgroup:
    """Create cgroup ``name`` with a memory limit and cpuset (and optional cpu quota)."""
    layout = layout or detect()
    if layout.version == 2:
        _enable_v2_controllers(layout.mounts["memory"], [c for c in CONTROLLERS if c in layout.mounts])
    cg = HostCgroup(name, layout)
    try:
        for controller, base in layout.mounts.items():
            path = base / name
            path.mkdir(exist_ok=True)
            cg.paths[controller] = path
        cg.set_memory_limit(memory_bytes)
        cg.set_cpus(cpus, cpu_quota)
    except OSError as exc:
        cg.remove()
        raise CgroupError(f"cannot create cgroup {name}: {exc}") from exc
    except CgroupError:
        cg.remove()
        raise
    return cg


def open_existing(name: str, layout: Layout | None = None) -> HostCgroup:
    """A handle on an existing cgroup ``name`` (only the directories that exist)."""
    layout = layout or detect()
    paths = {c: base / name for c, base in layout.mounts.items() if (base / name).is_dir()}
    return HostCgroup(name, layout, paths)


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
    base = layout.mounts["cpuset"]
    text = ""
    for fname in ("cpuset.cpus.effective", "cpuset.effective_cpus", "cpuset.cpus"):
        if (base / fname).exists():
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


def supported() -> tuple[bool, str]:
    """Whether host cgroups can be created here (tries a probe cgroup)."""
    probe = f"{PREFIX}probe-{os.getpid()}"
    try:
        layout = detect()
        cpus = parent_cpus(layout)
        create(probe, 256 << 20, cpus[:1], layout=layout).remove()
    except (CgroupError, OSError) as exc:
        return False, str(exc)
    return True, ""
