"""A private Ray head for tests: `ray start` with its own temp dir, ports and auth token, and the jobs
server; stopped by killing exactly its processes (found by the temp dir in their command lines, plus
their descendants), because `ray stop` would kill every Ray cluster on the machine.

Used by tests/test_job.py (the job entry point) and tests/test_readme.py (the README's `ray job submit`).
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import psutil

REPO = Path(__file__).resolve().parents[1]


# ---- the head --------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _pids_of(markers: list[str], also: set[int] = frozenset()) -> set[int]:
    """Processes whose command line contains one of `markers`, plus `also`, plus all their descendants
    (Ray workers rename their command line to `ray::...`, but they are children of the raylet)."""
    parent, pids = {}, set(also)
    for proc in psutil.process_iter(["ppid", "cmdline"]):
        if proc.pid == os.getpid() or proc.info["ppid"] is None:
            continue
        parent[proc.pid] = proc.info["ppid"]
        cmdline = "\0".join(proc.info["cmdline"] or ())
        if any(m in cmdline for m in markers):
            pids.add(proc.pid)
    grew = True
    while grew:
        kids = {p for p, pp in parent.items() if pp in pids} - pids
        pids |= kids
        grew = bool(kids)
    return {p for p in pids if p in parent}


def stop_head(temp: Path, gcs: str | None, timeout: float = 30.0) -> None:
    """Kill every process of the head started with --temp-dir `temp` (GCS at `gcs`), and only those.

    The daemons mention the temp dir or the GCS address in their command lines; everything else
    (workers, the job drivers) descends from them. Freeze first, so no child escapes to init (and
    out of sight) while its parent dies, then kill.
    """
    if gcs is None and (temp / "ray_current_cluster").exists():
        gcs = (temp / "ray_current_cluster").read_text().strip() or None
    markers = [str(temp)] + ([gcs] if gcs else [])  # mkdtemp's random name: no other cluster matches
    frozen: set[int] = set()
    deadline = time.monotonic() + timeout
    while (new := _pids_of(markers, frozen) - frozen) and time.monotonic() < deadline:
        for pid in new:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGSTOP)
        frozen |= new
    for pid in frozen:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    while (left := _pids_of(markers)) and time.monotonic() < deadline:
        for pid in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    shutil.rmtree(temp, ignore_errors=True)
    assert not left, f"processes of the test head survived: {left}"


@dataclass
class Head:
    temp: Path
    gcs: str                  # host:port
    dashboard: str            # http://127.0.0.1:port (jobs server)
    env: dict                 # auth env for clients (RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH)
    token: str

    def client(self, authenticated: bool = True):
        from ray.job_submission import JobSubmissionClient

        headers = {"Authorization": f"Bearer {self.token}"} if authenticated else None
        return JobSubmissionClient(self.dashboard, headers=headers)

    def driver_env(self, **extra) -> dict:
        """Environment of a driver process run directly (not as a job) against this head."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        return {**env, **self.env, "RAY_ADDRESS": self.gcs, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
                **extra}


@contextlib.contextmanager
def private_head(token_path: Path | None = None, env: dict | None = None, num_cpus: int = 3) -> Iterator[Head]:
    """A head with token auth and the jobs server on free ports, stopped (only its processes) on exit.

    token_path: the token the head uses (default: a fresh one in its temp dir). env: the environment
    `ray start` runs in, which is also what the job drivers inherit (default: ours minus RAY_*)."""
    temp = Path(tempfile.mkdtemp(prefix="mj-", dir="/tmp"))  # short: Ray's socket paths must stay < 108 bytes
    if token_path is None:
        token_path = temp / "auth_token"
        fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    token = Path(token_path).read_text().strip()
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}
    base = os.environ if env is None else env
    env = {k: v for k, v in base.items() if not k.startswith("RAY_")}
    env.update(auth, RAY_USAGE_STATS_ENABLED="0")
    dash = free_port()
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--port", str(free_port()),
           "--temp-dir", str(temp), "--num-cpus", str(num_cpus), "--include-dashboard=true",
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--ray-client-server-port",
           str(free_port()), "--dashboard-agent-listen-port", str(free_port()), "--disable-usage-stats"]
    t0 = time.monotonic()
    gcs = None
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        gcs = (temp / "ray_current_cluster").read_text().strip()
        h = Head(temp, gcs, f"http://127.0.0.1:{dash}", auth, token)
        deadline = time.monotonic() + 120
        while True:  # the jobs server comes up a little after `ray start` returns
            try:
                h.client()
                break
            except Exception:  # noqa: BLE001
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        print(f"\nhead up in {time.monotonic() - t0:.1f}s at {h.gcs}, jobs at {h.dashboard}")
        yield h
    finally:
        stop_head(temp, gcs)
