"""Multi-node harness: real hosts (netns + cgroup) on one machine, faults, clean teardown.

Namespace tests need root and iproute2 and are skipped otherwise; the loopback fallback
tests run everywhere. Every test has its own timeout (pytest-timeout counts fixture setup,
so the first test of the class includes bringing the cluster up).
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import ray
from cluster.harness import HarnessError, HarnessUnsupported, LocalCluster, down_all, leftovers
from cluster.harness import cgroups, netns
from cluster.harness.cluster import _CG_WRAPPER, STATE_ROOT, _lock, _proc_start_time

REPO = Path(__file__).resolve().parents[1]
# Faster failure detection than Ray's defaults (~15 s), still far above a short link cut.
FAST_HEALTH = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "2000",
    "RAY_health_check_failure_threshold": "5",
}

_reason = LocalCluster._netns_unavailable_reason()
needs_netns = pytest.mark.skipif(bool(_reason), reason=f"namespace mode unavailable: {_reason}")


def _sh(cmd: str) -> str:
    return subprocess.run(cmd.split(), capture_output=True, text=True, timeout=30).stdout


def _pgrep(cluster_id: str) -> str:
    """``pgrep -f`` for processes mentioning the cluster's temp dir."""
    return _sh(f"pgrep -f {STATE_ROOT / cluster_id}/").strip()


def assert_nothing_left(cluster_id: str, pids: list[int] = ()) -> None:
    """Check with the system's own tools, not the harness's bookkeeping."""
    assert f"moeshard-{cluster_id}-" not in _sh("ip netns list")
    links = _sh("ip -o link show")
    assert f"msb-{cluster_id}" not in links and f"msv-{cluster_id}-" not in links
    for root in Path("/sys/fs/cgroup").iterdir():
        if root.is_dir():
            assert not list(root.glob(f"moeshard-{cluster_id}-*")), root
    assert _pgrep(cluster_id) == ""
    assert not (STATE_ROOT / cluster_id).exists()
    for pid in pids:
        assert _proc_start_time(pid) is None or _is_zombie(pid), f"pid {pid} survived"


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@ray.remote(num_cpus=0)
def where(bridge_ip: str) -> dict:
    """Where am I: Ray's node IP, the source IP toward the bridge, my cgroups and cpus."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((bridge_ip, 9))  # UDP connect sends nothing; it only picks the route
        src_ip = s.getsockname()[0]
    status = Path("/proc/self/status").read_text()
    cpus = next(line.split(":")[1].strip() for line in status.splitlines() if line.startswith("Cpus_allowed_list"))
    return {
        "node_ip": ray.util.get_node_ip_address(),
        "src_ip": src_ip,
        "cgroup": Path("/proc/self/cgroup").read_text().splitlines(),
        "cpus": cpus,
        "node_id": ray.get_runtime_context().get_node_id(),
    }


@ray.remote(num_cpus=0, max_retries=0)
def get_nested(refs: list) -> int:
    """ray.get of a driver-owned object: the worker must call back into the driver."""
    return len(ray.get(refs[0], timeout=30))


def assert_auth_enforced(cl: LocalCluster) -> None:
    """A GCS client without the cluster's token is refused; with ``cl.auth_env`` it gets in."""
    probe = textwrap.dedent(f"""
        from ray._raylet import GcsClient
        GcsClient(address={cl.address!r}).get_all_node_info(timeout=5)
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(cl.temp_dir)  # no ~/.ray/auth_token to fall back on
    denied = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert denied.returncode != 0 and "Authentication" in denied.stderr, denied.stderr[-2000:]
    allowed = subprocess.run([sys.executable, "-c", probe], env={**env, **cl.auth_env},
                             capture_output=True, text=True, timeout=60)
    assert allowed.returncode == 0, allowed.stderr[-2000:]


def _alive(ip: str) -> bool | None:
    states = [n["Alive"] for n in ray.nodes() if n["NodeManagerAddress"] == ip]
    return any(states) if states else None


@pytest.fixture(scope="class")
def cl():
    """A 3-host cluster, connected; torn down when the class using it is done."""
    cluster = LocalCluster(hosts=3, host_memory="2500MB", host_cpus=1, ray_env=FAST_HEALTH)
    t0 = time.monotonic()
    with cluster:
        print(f"\ncluster up in {time.monotonic() - t0:.1f}s")
        cluster.connect()
        yield cluster


@needs_netns
@pytest.mark.slow
class TestNamespaceCluster:
    """One 3-host cluster shared by the tests of this class, in order; the last tears it down."""

    @pytest.mark.timeout(300)
    def test_tasks_run_on_their_own_host(self, cl):
        assert cl.mode == "netns"
        assert cl.address == f"{cl.hosts[0].ip}:6379"
        ips = [h.ip for h in cl.hosts]
        assert len(set(ips)) == 3 and all(ip.startswith("198.1") for ip in ips)
        refs = [where.options(resources={cl.resource(i): 0.01}).remote(cl.driver_ip) for i in range(3)]
        seen = ray.get(refs, timeout=120)
        for i, info in enumerate(seen):
            assert info["node_ip"] == cl.hosts[i].ip
            assert info["src_ip"] == cl.hosts[i].ip  # the process really is in the host's netns
            assert any(line.endswith(f"/moeshard-{cl.cluster_id}-h{i}") for line in info["cgroup"]), info
        assert len({s["node_id"] for s in seen}) == 3
        assert len({tuple(s["cgroup"]) for s in seen}) == 3
        cpus = cgroups.parent_cpus()
        assert seen[0]["cpus"] == str(cpus[0]) and seen[1]["cpus"] == str(cpus[1 % len(cpus)])
        # Workers can reach the driver (the reason for the driver node on the bridge IP).
        big = ray.put(b"x" * (1 << 20))
        assert ray.get(get_nested.options(resources={cl.resource(2): 0.01}).remote([big]), timeout=60) == 1 << 20

    @pytest.mark.timeout(120)
    def test_auth_token_is_required(self, cl):
        assert_auth_enforced(cl)

    @pytest.mark.timeout(180)
    def test_cut_and_restore_link(self, cl):
        node = next(n for n in ray.nodes() if n["NodeManagerAddress"] == cl.hosts[2].ip and n["Alive"])
        target = (cl.hosts[2].ip, node["NodeManagerPort"])
        socket.create_connection(target, timeout=5).close()
        cl.cut_link(2)
        try:
            with pytest.raises(OSError):
                socket.create_connection(target, timeout=1.5).close()
            # The other hosts keep working while host 2 is unreachable.
            ray.get(where.options(resources={cl.resource(1): 0.01}).remote(cl.driver_ip), timeout=30)
        finally:
            cl.restore_link(2)
        socket.create_connection(target, timeout=5).close()
        info = ray.get(where.options(resources={cl.resource(2): 0.01}).remote(cl.driver_ip), timeout=60)
        assert info["node_ip"] == cl.hosts[2].ip
        assert _alive(cl.hosts[2].ip)

    @pytest.mark.timeout(180)
    def test_memory_limit_ooms_inside_the_host(self, cl):
        mem = cgroups.open_existing(f"moeshard-{cl.cluster_id}-h1").main
        usage_file = "memory.current" if (mem / "memory.current").exists() else "memory.usage_in_bytes"
        limit_file = "memory.max" if (mem / "memory.max").exists() else "memory.limit_in_bytes"
        usage = int((mem / usage_file).read_text())

        @ray.remote(num_cpus=0, max_retries=0)
        def hog(n: int) -> int:
            block = bytearray(n)
            for i in range(0, n, 4096):
                block[i] = 1
            return len(block)

        cl.set_memory_limit(1, usage + 300 * 10**6)
        try:
            assert int((mem / limit_file).read_text()) <= usage + 300 * 10**6
            with pytest.raises(ray.exceptions.RayError):
                ray.get(hog.options(resources={cl.resource(1): 0.01}).remote(800 * 10**6), timeout=120)
        finally:
            cl.set_memory_limit(1, cl.host_memory)
        # Host 1 survives its OOM (only the hog died) and still runs work.
        assert ray.get(hog.options(resources={cl.resource(1): 0.01}).remote(10**6), timeout=60) == 10**6

    @pytest.mark.timeout(120)
    def test_kill_host_marks_node_dead(self, cl):
        ip = cl.hosts[2].ip
        assert _alive(ip) and cl.host_pids(2)
        t0 = time.monotonic()
        cl.kill_host(2)
        assert cl.host_pids(2) == []
        while _alive(ip):
            assert time.monotonic() - t0 < 60, "node not marked dead within 60s"
            time.sleep(0.5)
        print(f"\nhost 2 marked dead {time.monotonic() - t0:.1f}s after SIGKILL")
        assert _alive(cl.hosts[1].ip)
        assert ray.get(where.options(resources={cl.resource(1): 0.01}).remote(cl.driver_ip), timeout=60)

    @pytest.mark.timeout(120)
    def test_teardown_leaves_nothing(self, cl):
        pids = [p for i in range(3) for p in cl.host_pids(i)]
        pids += cgroups.open_existing(f"moeshard-{cl.cluster_id}-drv").pids()
        assert pids
        t0 = time.monotonic()
        cl.down()
        print(f"\nteardown took {time.monotonic() - t0:.1f}s")
        assert not ray.is_initialized()
        assert_nothing_left(cl.cluster_id, pids)
        cl.down()  # idempotent; the fixture calls it again too


@needs_netns
@pytest.mark.timeout(120)
def test_failed_startup_cleans_up():
    cl = LocalCluster(hosts=2, host_memory="1GB", startup_timeout=3)
    with pytest.raises(HarnessError):
        cl.up()
    assert_nothing_left(cl.cluster_id)


@needs_netns
@pytest.mark.timeout(60)
def test_down_all_removes_orphans_and_spares_live_owners():
    """Leftovers of a crashed owner (made by hand here: no Ray needed) are found by prefix."""
    sleepers: list[subprocess.Popen] = []

    def fake(owner: dict) -> str:
        cid = secrets.token_hex(3)
        (STATE_ROOT / cid).mkdir(parents=True)
        (STATE_ROOT / cid / "state.json").write_text(json.dumps({"cluster_id": cid, "owner": owner}))
        with _lock():
            subnet = netns.pick_subnet()
            netns.create_bridge(cid, subnet)
        netns.create_host(cid, 0, subnet)
        cg = cgroups.create(f"moeshard-{cid}-h0", 256 << 20, cgroups.parent_cpus()[:1])
        env = {**os.environ, "MOESHARD_CGROUP_PROCS": ":".join(map(str, cg.attach_files()))}
        sleepers.append(subprocess.Popen(["sh", "-c", _CG_WRAPPER, "sh", "ip", "netns", "exec", f"moeshard-{cid}-h0",
                          "sh", "-c", "sleep 300", str(STATE_ROOT / cid) + "/x"], env=env, start_new_session=True))
        deadline = time.monotonic() + 10
        while not cg.pids():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        return cid

    gone = subprocess.Popen(["sleep", "0.1"])
    dead_owner = {"pid": gone.pid, "start": _proc_start_time(gone.pid)}
    gone.wait()
    orphan = fake(dead_owner)
    live = fake({"pid": os.getppid(), "start": _proc_start_time(os.getppid())})  # alive, not us
    try:
        assert down_all(orphan) == [orphan]
        assert_nothing_left(orphan)
        assert down_all(live) == [], "a cluster with a live owner must be spared"
        assert leftovers(live)["namespaces"] and leftovers(live)["cgroups"]
    finally:
        down_all(orphan, include_live=True)
        down_all(live, include_live=True)
        for p in sleepers:
            p.wait(timeout=10)
    assert_nothing_left(live)


@needs_netns
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigterm_tears_down():
    """An owner process killed by SIGTERM (not -9) still cleans up, via its signal handler."""
    script = textwrap.dedent("""
        import sys, time
        from cluster.harness import LocalCluster
        cl = LocalCluster(hosts=1, host_memory="1500MB").up()
        print(cl.cluster_id, flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        cid = proc.stdout.readline().strip()
        assert cid, "child did not bring its cluster up"
        assert leftovers(cid)["namespaces"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
    assert_nothing_left(cid)


@pytest.mark.timeout(240)
def test_loopback_fallback():
    cl = LocalCluster(hosts=2, host_memory="1500MB", host_cpus=1, force_loopback=True, ray_env=FAST_HEALTH)
    with cl:
        assert cl.mode == "loopback"
        assert cl.address.startswith("127.0.0.2:")  # never 127.0.0.1: Ray rewrites that one
        cl.connect()
        assert ray.get_runtime_context().gcs_address == cl.address
        seen = ray.get([where.options(resources={cl.resource(i): 0.01}).remote("127.0.0.1") for i in range(2)],
                       timeout=120)
        assert [s["node_ip"] for s in seen] == ["127.0.0.2", "127.0.0.3"]
        assert_auth_enforced(cl)
        assert seen[0]["node_id"] != seen[1]["node_id"]
        with pytest.raises(HarnessUnsupported):
            cl.cut_link(1)
        with pytest.raises(HarnessUnsupported):
            cl.set_memory_limit(1, "1GB")
        node_id = seen[1]["node_id"]
        cl.kill_host(1)
        deadline = time.monotonic() + 60
        while any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes()):
            assert time.monotonic() < deadline, "loopback node not marked dead"
            time.sleep(0.5)
        pids = cl.host_pids(0)
    assert not ray.is_initialized()
    assert _pgrep(cl.cluster_id) == ""
    assert not (STATE_ROOT / cl.cluster_id).exists()
    for pid in pids:
        assert _proc_start_time(pid) is None or _is_zombie(pid)


@pytest.mark.timeout(30)
def test_cgroup_v2_path_on_a_fake_tree(tmp_path):
    """This machine is cgroup v1; exercise the v2 writes against a fake unified hierarchy."""
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (tmp_path / "cgroup.subtree_control").write_text("")
    layout = cgroups.detect(tmp_path)
    assert layout.version == 2 and set(layout.mounts) == {"memory", "cpuset", "cpu"}
    child = tmp_path / "moeshard-abcdef-h0"
    child.mkdir()
    (child / "memory.swap.max").write_text("max")
    cg = cgroups.create("moeshard-abcdef-h0", 3 * 10**9, [0, 1], cpu_quota=0.5, layout=layout)
    assert (child / "memory.max").read_text() == str(3 * 10**9)
    assert (child / "memory.swap.max").read_text() == "0"
    assert (child / "cpuset.cpus").read_text() == "0,1"
    assert (child / "cpu.max").read_text() == "50000 100000"
    assert cg.attach_files() == [child / "cgroup.procs"]
    assert cgroups.find("moeshard-abcdef-", layout) == ["moeshard-abcdef-h0"]
    (tmp_path / "cgroup.controllers").write_text("cpu io\n")
    with pytest.raises(cgroups.CgroupError):
        cgroups.detect(tmp_path)
