"""Plumbing shared by the scenarios: environment, statistics, child processes, cgroups, disk.

Every timed figure is measured in child processes (`bench.child`) so that each system
gets a clean interpreter, its own thread settings and, for the out-of-core scenarios,
its own memory cgroup. Peers are measured interleaved (A B A B ...) on the same machine
in the same run, and figures are reported as medians and as ratios against the peer.
"""
from __future__ import annotations

import json
import os
import platform
import queue
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from cluster import cgroups

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = Path(os.environ.get("MOESHARD_BENCH_RESULTS", BENCH_DIR / "results"))
MARK = "@@BENCH "


# ---- environment --------------------------------------------------------------------------------

def machine_name() -> str:
    name = os.environ.get("MOESHARD_BENCH_MACHINE") or socket.gethostname() or "machine"
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)[:40]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(mod: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(mod)
    except Exception:
        return None


def env_info() -> dict[str, Any]:
    """What the figures were measured on."""
    import psutil

    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "machine": machine_name(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total,
        "memory_available_bytes": psutil.virtual_memory().available,
        "loadavg_at_start": load,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "torch": _version("torch"),
        "torch_threads_default": _torch_threads(),
        "ray": _version("ray"),
        "transformers": _version("transformers"),
        "accelerate": _version("accelerate"),
        "llama_cpp_python": _version("llama_cpp_python"),   # the optional llama.cpp peer (None: not installed)
        "safetensors": _version("safetensors"),
        "cgroup": cgroup_version(),
        "root": os.geteuid() == 0 if hasattr(os, "geteuid") else False,
    }


def _torch_threads() -> int | None:
    try:
        import torch
        return torch.get_num_threads()
    except Exception:
        return None


# ---- statistics ---------------------------------------------------------------------------------

def median(xs: Iterable[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def percentile(xs: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100)."""
    xs = sorted(xs)
    if not xs:
        return None
    k = max(0, min(len(xs) - 1, int(round(q / 100 * len(xs) + 0.5)) - 1))
    return xs[k]


def ratio_or_none(a: float, b: float) -> float | None:
    """a / b, or None where b is 0 (a figure with nothing to compare against)."""
    return a / b if b else None


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Median of per-round ratios a[i]/b[i] (rounds interleaved A B A B), the figure we report."""
    rs = [x / y for x, y in zip(a, b) if x is not None and y]
    return statistics.median(rs) if rs else None


# ---- child processes ----------------------------------------------------------------------------

class ChildError(RuntimeError):
    pass


class Child:
    """A `python -m bench.child` process that loads one system and runs commands on request.

    Commands and replies are JSON; replies come on stdout after a marker so that library
    chatter (Ray, transformers) can go anywhere. `cgroup` puts the process (and so
    everything it starts: Ray, actors) into a memory cgroup before Python starts.
    """

    def __init__(self, name: str, *, threads: int, env: dict[str, str] | None = None,
                 cgroup: cgroups.Cgroup | None = None, log_dir: Path | None = None, timeout_s: float = 900):
        self.name = name
        self.timeout_s = timeout_s
        e = dict(os.environ)
        e.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                  "MOESHARD_BENCH_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
                  "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                  "RAY_DEDUP_LOGS": "0", "TQDM_DISABLE": "1"})
        e["PYTHONPATH"] = str(ROOT) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
        e.update(env or {})
        cmd = [sys.executable, "-m", "bench.child"]
        if cgroup is not None:
            cmd = cgroup.wrap(cmd)
        log_dir = log_dir or Path("/tmp") / "moeshard-bench-logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{name}-{uuid.uuid4().hex[:6]}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=e, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, text=True, bufsize=1, start_new_session=True)
        self._q: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(MARK):
                self._q.put(json.loads(line[len(MARK):]))
            else:
                self._log.write(line)
        self._q.put(None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def call(self, op: str, timeout_s: float | None = None, **kw: Any) -> dict:
        """Send one command and wait for its reply; raises ChildError on failure or death."""
        if self.proc.poll() is not None:
            raise ChildError(f"{self.name}: process exited with {self.proc.returncode}; log: {self.log_path}\n"
                             f"{self.tail()}")
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        try:
            reply = self._q.get(timeout=timeout_s or self.timeout_s)
        except queue.Empty:
            self.kill()
            raise ChildError(f"{self.name}: no reply to {op!r} within {timeout_s or self.timeout_s:g}s; "
                             f"log: {self.log_path}\n{self.tail()}") from None
        if reply is None:
            self.proc.wait(timeout=30)
            raise ChildError(f"{self.name}: process died during {op!r} (exit {self.proc.returncode}); "
                             f"log: {self.log_path}\n{self.tail()}")
        if "error" in reply:
            raise ChildError(f"{self.name}: {op} failed: {reply['error']}\n{reply.get('traceback', '')}")
        return reply

    def tail(self, n: int = 30) -> str:
        try:
            self._log.flush()
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def close(self, timeout_s: float = 60) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=timeout_s)
            except Exception:
                self.kill()
        self._log.close()

    def kill(self) -> None:
        """Kill this child's process group (it was started in its own session)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, 9)
            except (ProcessLookupError, PermissionError):
                self.proc.kill()
            self.proc.wait(timeout=30)

    def __enter__(self) -> "Child":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def interleave(children: dict[str, Child], op: str, rounds: int, before: Callable[[str], None] | None = None,
               progress: Callable[[str], None] | None = None, **kw: Any) -> dict[str, list[dict]]:
    """Run `op` on every child in turn, `rounds` times (A B A B ...); replies per child, in round order."""
    out: dict[str, list[dict]] = {n: [] for n in children}
    for r in range(rounds):
        for name, ch in children.items():
            if before is not None:
                before(name)
            if progress is not None:
                progress(f"{op} {name} round {r + 1}/{rounds}")
            out[name].append(ch.call(op, **kw))
    return out


# ---- memory cgroups (cluster.cgroups does the work; the harness uses the same module) -------------

def cgroup_version() -> int | None:
    try:
        return cgroups.detect().version
    except (cgroups.CgroupError, OSError):
        return None


def cgroups_usable() -> str | None:
    """None if we can create memory cgroups here, else why not."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root (memory cgroups and drop_caches); rerun as root"
    return cgroups.unavailable_reason(pin_cpus=False) or None


def memory_cgroup(label: str, limit_bytes: int) -> cgroups.Cgroup:
    """A fresh memory-only cgroup with a hard limit (page cache is charged to it too); `remove()` it."""
    try:
        return cgroups.create(f"{cgroups.PREFIX}bench-{label}-{uuid.uuid4().hex[:6]}", limit_bytes)
    except cgroups.CgroupError as e:
        raise ChildError(str(e)) from e


def remove_cgroups(cgs: list[cgroups.Cgroup]) -> None:
    """Remove these cgroups (a scenario's `finally`), quietly: one already gone, or still busy, is left."""
    for cg in cgs:
        try:
            cg.remove()
        except (OSError, cgroups.CgroupError):
            pass


def drop_caches() -> bool:
    """sync, then drop the page cache (root only); False if not permitted."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


# ---- disk ---------------------------------------------------------------------------------------

def read_bandwidth(ranges: Sequence[tuple[str, int, int]], seconds: float = 4.0, threads: int = 1,
                   chunk: int = 8 << 20) -> dict[str, float]:
    """Cold read bandwidth over (file, offset, nbytes) ranges with the store's read path
    (pread into a reused buffer, then POSIX_FADV_DONTNEED), in the given order, for about `seconds`."""
    import mmap

    bufs = [mmap.mmap(-1, chunk) for _ in range(threads)]
    fds: dict[str, int] = {}
    for f, off, n in ranges:
        if f not in fds:
            fds[f] = os.open(f, os.O_RDONLY)
            os.posix_fadvise(fds[f], 0, 0, os.POSIX_FADV_DONTNEED)
    lock = threading.Lock()
    it = iter(ranges)
    total = [0]
    t0 = time.perf_counter()
    stop = t0 + seconds

    def work(buf: mmap.mmap) -> None:
        mv = memoryview(buf)
        while time.perf_counter() < stop:
            with lock:
                r = next(it, None)
            if r is None:
                return
            f, off, n = r
            fd, got = fds[f], 0
            while got < n:
                k = os.preadv(fd, [mv[:min(chunk, n - got)]], off + got)
                if k <= 0:
                    break
                got += k
            os.posix_fadvise(fd, off, n, os.POSIX_FADV_DONTNEED)
            with lock:
                total[0] += got

    ts = [threading.Thread(target=work, args=(b,)) for b in bufs]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    dt = time.perf_counter() - t0
    for fd in fds.values():
        os.close(fd)
    return {"bytes": total[0], "seconds": dt, "bytes_per_s": total[0] / dt if dt else 0.0, "threads": threads}


def expert_ranges(path: str | Path, seed: int = 0) -> list[tuple[str, int, int]]:
    """(file, offset, nbytes) of each routed expert whose gate/up/down are adjacent, in a shuffled order."""
    import random

    from coordinator.checkpoint import Checkpoint

    specs = Checkpoint.open(path).expert_specs()
    ranges = [(s.gate.file, s.gate.offset, s.gate.nbytes + s.up.nbytes + s.down.nbytes) for s in specs
              if s.up.offset == s.gate.offset + s.gate.nbytes and s.down.offset == s.up.offset + s.up.nbytes]
    random.Random(seed).shuffle(ranges)
    return ranges


def store_min_budget(path: str | Path, min_resident: int, itemsize: int = 4) -> int:
    """The smallest budget per expert holder that a store of the checkpoint at `path` accepts in
    a compute dtype of `itemsize` bytes (workers.budget, the function the stores use)."""
    from coordinator.checkpoint import Checkpoint
    from workers.budget import min_budget

    return min_budget(Checkpoint.open(path).expert_specs(), itemsize, min_resident)


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False, default=_json_default))
    os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    try:
        import torch
        if isinstance(o, torch.Tensor):
            return o.tolist()
    except Exception:
        pass
    return repr(o)
