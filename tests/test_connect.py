"""Connecting to Ray fails fast and in one line: a port that is not Ray's GCS, a token cluster without
(or with the wrong) token, a second Coordinator that does not fit the local Ray this process started,
and a Python without moeshard's packages.

Everything is real: listening sockets and an HTTP server in this process, a private `ray start --head`
with token auth (its own temp dir and ports, stopped by killing exactly its processes), `python -m
cluster.job` and Coordinators in subprocesses. No test times anything: each subprocess has a timeout
well under what the old behaviour took, so a regression fails by timing out.
"""
from __future__ import annotations

import concurrent.futures
import http.server
import os
import re
import secrets
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import tomllib
from pathlib import Path

import pytest

from cluster import deps
from cluster.connect import check_gcs
from cluster.errors import ClusterError
from rayhead import free_port as _free_port, stop_head

REPO = Path(__file__).resolve().parents[1]
JOB_TIMEOUT_S = 60      # the job's own start (imports, checkpoint) plus a check that takes seconds, not minutes


def _env(home: Path, **extra: str) -> dict[str, str]:
    """This environment without any Ray settings (address, auth), HOME at `home` (no ~/.ray/auth_token)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return {**env, "HOME": str(home), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def _job(model: Path, address: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "cluster.job", "--model", str(model), "--ids", "1,5,9", "--max-new-tokens", "2",
           "--workers", "1", "--ray-address", address]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S, cwd=REPO)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("moeshard job: error: "), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def model(checkpoint) -> Path:
    return checkpoint("mixtral")


# ---- a port that is not Ray's GCS --------------------------------------------------------------------

@pytest.fixture
def silent_tcp():
    """A TCP server on 127.0.0.1 that accepts connections and never says anything."""
    srv = socket.create_server(("127.0.0.1", 0))
    conns: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conns.append(srv.accept()[0])
            except TimeoutError:
                continue
            except OSError:
                return

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield f"127.0.0.1:{srv.getsockname()[1]}"
    stop.set()
    t.join(5)
    for c in conns:
        c.close()
    srv.close()


@pytest.fixture
def http_server():
    """An HTTP/1.1 server on 127.0.0.1 (what the dashboard's port 8265 looks like to a client)."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()
    t.join(5)


@pytest.mark.parametrize("server", ["silent_tcp", "http_server"])
def test_job_against_a_port_that_is_not_ray_fails_in_one_line(request, server, model, tmp_path):
    """ray.init retried for over 4 minutes here; the job now says, within seconds, that this is no GCS port."""
    address = request.getfixturevalue(server)
    proc = _job(model, address, _env(tmp_path))
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = _one_error_line(proc)
    assert address in line and "is it Ray's GCS port" in line, line


@pytest.mark.timeout(60)
def test_connect_ray_against_an_http_port_fails_before_ray_init(http_server):
    """The API path (Coordinator/RemoteExperts with ray_address) takes the same check, in this process."""
    import ray

    from cluster.connect import connect_ray

    if ray.is_initialized():
        pytest.skip("Ray already initialised in this process: a connected process reuses it, no GCS check")
    with pytest.raises(ClusterError, match=rf"{http_server} accepts connections but does not speak gRPC"):
        connect_ray(http_server, num_cpus=1, num_gpus=0, resources={})
    assert not ray.is_initialized()


def test_a_grpc_server_that_is_not_the_gcs_is_named_so():
    grpc = pytest.importorskip("grpc")
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with pytest.raises(ClusterError, match=r"gRPC server that is not Ray's GCS.*is it Ray's GCS port"):
            check_gcs(f"127.0.0.1:{port}")
    finally:
        server.stop(0)


# ---- a token-auth cluster ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def token_head():
    """A private head with token auth: (GCS host:port, token). 1 CPU, no dashboard; stopped at module end."""
    temp = Path(tempfile.mkdtemp(prefix="h4-", dir="/tmp"))  # short: Ray's socket paths must stay < 108 bytes
    token = secrets.token_hex(32)
    (temp / "token").write_text(token)
    env = _env(temp, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(temp / "token"), RAY_USAGE_STATS_ENABLED="0")
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--port", str(_free_port()),
           "--temp-dir", str(temp), "--num-cpus", "1", "--include-dashboard=false",
           "--ray-client-server-port", str(_free_port()), "--dashboard-agent-listen-port", str(_free_port()),
           "--disable-usage-stats"]
    gcs = None
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        gcs = (temp / "ray_current_cluster").read_text().strip()
        yield gcs, token
    finally:
        stop_head(temp, gcs)


@pytest.mark.slow
@pytest.mark.parametrize("auth, expect", [
    ({}, r"requires token authentication and this process has no token"),
    ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}, r"rejects the auth token from RAY_AUTH_TOKEN"),
], ids=["no-token", "wrong-token"])
def test_job_against_a_token_cluster_says_the_token_is_missing_or_wrong(token_head, model, auth, expect, tmp_path):
    """Ray printed 20 s of warnings, then 'cannot connect'; now one line about the token and how to pass it."""
    gcs, _ = token_head
    proc = _job(model, gcs, _env(tmp_path, **auth))
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = _one_error_line(proc)
    assert gcs in line, line
    assert re.search(expect, line), line
    assert "RAY_AUTH_MODE=token" in line and "RAY_AUTH_TOKEN_PATH" in line and "ray get-auth-token" in line, line


@pytest.mark.slow
def test_token_checks_pass_with_the_right_token(token_head, monkeypatch, tmp_path):
    """The same check lets a client with the cluster's token through, and names RAY_AUTH_MODE when only that is off."""
    gcs, token = token_head
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "tok").write_text(token + "\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    with pytest.raises(ClusterError, match=r"only with RAY_AUTH_MODE=token \(it is 'unset'\)"):
        check_gcs(gcs)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    check_gcs(gcs)


# ---- a second Coordinator in the same process ---------------------------------------------------------

SECOND_COORDINATOR = textwrap.dedent("""
    import sys, ray
    from coordinator import Coordinator
    from cluster.errors import ClusterError

    path = sys.argv[1]
    opts = dict(num_workers=2, ready_timeout_s=60)

    # 1. The first Coordinator starts a local Ray sized for its plan (2 CPUs); a second cannot fit.
    first = Coordinator.from_pretrained(path, **opts)
    try:
        Coordinator.from_pretrained(path, **opts).close()
        print("SECOND-STARTED")
    except ClusterError as e:
        print("OURS:", e)
    first.close()
    assert not ray.is_initialized()
    # After closing the first, its Ray is gone and the next one starts a fresh, fitting Ray.
    Coordinator.from_pretrained(path, **opts).close()

    # 2. Ray started by the caller with room for two plans: both reuse it; a third does not fit.
    ray.init(address="local", num_cpus=4, num_gpus=0, include_dashboard=False, logging_level="WARNING")
    gcs = ray.get_runtime_context().gcs_address
    a = Coordinator.from_pretrained(path, **opts)
    b = Coordinator.from_pretrained(path, **opts)
    assert ray.get_runtime_context().gcs_address == gcs and ray.cluster_resources()["CPU"] == 4
    try:
        Coordinator.from_pretrained(path, **opts).close()
        print("THIRD-STARTED")
    except ClusterError as e:
        print("REUSED:", e)
    a.close()
    b.close()
    ray.shutdown()
    print("DONE")
""")


@pytest.mark.slow
def test_a_second_coordinator_that_does_not_fit_fails_at_once(model, tmp_path):
    """It waited the 120 s ready timeout; now: free vs needed, and what to do. A plan that fits reuses Ray."""
    proc = subprocess.run([sys.executable, "-c", SECOND_COORDINATOR, str(model)], env=_env(tmp_path),
                          capture_output=True, text=True, timeout=240, cwd=REPO)
    out = proc.stdout
    assert proc.returncode == 0 and "DONE" in out, out[-3000:] + proc.stderr[-3000:]
    ours = next(line for line in out.splitlines() if line.startswith(("OURS:", "SECOND-STARTED")))
    assert ours.startswith("OURS:"), ours
    assert "CPU: need 2, 0 free of 2" in ours and "this process started that local Ray" in ours, ours
    assert "close the other Coordinator" in ours, ours
    reused = next(line for line in out.splitlines() if line.startswith(("REUSED:", "THIRD-STARTED")))
    assert reused.startswith("REUSED:"), reused
    assert "CPU: need 2, 0 free of 4" in reused and "other actors or jobs hold the rest" in reused, reused


# ---- a Python without moeshard's packages ------------------------------------------------------------

SYSTEM_PYTHON = "/usr/bin/python3"


def _lacks_torch(python: str) -> bool:
    if not os.access(python, os.X_OK):
        return False
    probe = subprocess.run([python, "-c", "import importlib.util as u; print(u.find_spec('torch') is None)"],
                           capture_output=True, text=True, timeout=30)
    return probe.stdout.strip() == "True"


@pytest.mark.skipif(not _lacks_torch(SYSTEM_PYTHON), reason=f"needs {SYSTEM_PYTHON} without torch")
@pytest.mark.parametrize("argv", [["--help"], ["--model", "/nonexistent", "--ids", "1,2"]], ids=["help", "generate"])
def test_job_under_a_python_without_torch_says_so_in_one_line(argv):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "VIRTUAL_ENV")}
    proc = subprocess.run([SYSTEM_PYTHON, "-m", "cluster.job", *argv], env={**env, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = _one_error_line(proc)
    assert f"this Python ({SYSTEM_PYTHON}) lacks torch" in line and "moeshard" in line, line
    assert proc.stdout == "", proc.stdout


def test_the_checked_packages_are_pyprojects_dependencies():
    """deps.REQUIRED mirrors pyproject.toml, so a new dependency cannot be forgotten by the check."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = [re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0] for d in project["dependencies"]]
    assert list(deps.REQUIRED) == names
    assert deps.missing_packages() == []   # this test's own interpreter has them all
