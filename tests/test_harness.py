"""Multi-node harness: real hosts (netns + cgroup) on one machine, faults, clean teardown.

Namespace tests need root, iproute2 and cgroups (capability ``harness``; see the skip policy in
conftest.py: under CI=true a missing capability fails the run); the loopback fallback tests run everywhere. Every test has its own timeout (pytest-timeout counts fixture setup,
so the first test of the class includes bringing the cluster up).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

import ray
from cluster import cgroups
from cluster.harness import HarnessError, HarnessUnsupported, LocalCluster, down_all, leftovers, netns
from cluster.harness.cluster import STATE_ROOT, _lock, proc_start_time

REPO = Path(__file__).resolve().parents[1]
# Faster failure detection than Ray's defaults (~15 s), still far above a short link cut.
FAST_HEALTH = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "2000",
    "RAY_health_check_failure_threshold": "5",
}

needs_netns = pytest.mark.requires("harness")   # skipped only where the machine lacks it (see conftest)


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
        assert _gone(pid), f"pid {pid} survived"


def _gone(pid: int) -> bool:
    """True if ``pid`` no longer runs (exited, or a zombie waiting for its parent)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@ray.remote(num_cpus=0)
def where(bridge_ip: str) -> dict:
    """Where am I: Ray's node IP, the source IP toward the bridge, my cgroups and cpus."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((bridge_ip, 9))  # UDP connect sends nothing; it only picks the route
        src_ip = s.getsockname()[0]
    return {
        "node_ip": ray.util.get_node_ip_address(),
        "src_ip": src_ip,
        "cgroup": cgroups.process_cgroups(),
        "cpus": psutil.Process().cpu_affinity(),
        "node_id": ray.get_runtime_context().get_node_id(),
    }


@ray.remote(num_cpus=0, max_retries=0)
def get_nested(refs: list) -> int:
    """ray.get of a driver-owned object: the worker must call back into the driver."""
    return len(ray.get(refs[0], timeout=30))


def assert_auth_enforced(cl: LocalCluster) -> None:
    """A GCS client without the cluster's token is refused; with ``cl.auth_env`` it gets in."""
    probe = textwrap.dedent(f"""
        from cluster.ray_internal import gcs_node_states
        gcs_node_states({cl.address!r})
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(cl.temp_dir)  # no ~/.ray/auth_token to fall back on
    env["PYTHONPATH"] = str(REPO)
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
    """One 3-host cluster shared by the tests of this class, in any order: each undoes its fault."""

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
            assert any(p.endswith(f"/moeshard-{cl.cluster_id}-h{i}") for p in info["cgroup"].values()), info
        assert len({s["node_id"] for s in seen}) == 3
        assert len({tuple(sorted(s["cgroup"].items())) for s in seen}) == 3
        cpus = cgroups.parent_cpus()
        assert seen[0]["cpus"] == [cpus[0]] and seen[1]["cpus"] == [cpus[1 % len(cpus)]]
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


@needs_netns
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_kill_host_then_teardown_leaves_nothing():
    """Both faults are final, so they get a cluster of their own (the class's tests run in any order)."""
    cl = LocalCluster(hosts=2, host_memory="1500MB", host_cpus=1, ray_env=FAST_HEALTH)
    with cl:
        cl.connect()
        ip = cl.hosts[1].ip
        assert _alive(ip) and cl.host_pids(1)
        t0 = time.monotonic()
        cl.kill_host(1)
        assert cl.host_pids(1) == []
        while _alive(ip):
            assert time.monotonic() - t0 < 60, "node not marked dead within 60s"
            time.sleep(0.5)
        print(f"\nhost 1 marked dead {time.monotonic() - t0:.1f}s after SIGKILL")
        assert _alive(cl.hosts[0].ip)
        assert ray.get(where.options(resources={cl.resource(0): 0.01}).remote(cl.driver_ip), timeout=60)
        pids = cl.host_pids(0) + cgroups.open_existing(f"moeshard-{cl.cluster_id}-drv").pids()
        assert pids
        t0 = time.monotonic()
        cl.down()
        print(f"teardown took {time.monotonic() - t0:.1f}s")
        assert not ray.is_initialized()
        assert_nothing_left(cl.cluster_id, pids)
        cl.down()  # idempotent; leaving the `with` calls it again too


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
        sleepers.append(subprocess.Popen(cg.wrap(["ip", "netns", "exec", f"moeshard-{cid}-h0",
                          "sh", "-c", "sleep 300", str(STATE_ROOT / cid) + "/x"]), start_new_session=True))
        deadline = time.monotonic() + 10
        while not cg.pids():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        return cid

    gone = subprocess.Popen(["sleep", "0.1"])
    dead_owner = {"pid": gone.pid, "start": proc_start_time(gone.pid)}
    gone.wait()
    orphan = fake(dead_owner)
    live = fake({"pid": os.getppid(), "start": proc_start_time(os.getppid())})  # alive, not us
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
        assert _gone(pid)


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


@pytest.mark.timeout(30)
def test_memory_only_cgroup_on_fake_v1_and_v2_trees(tmp_path):
    """The bench's kind of cgroup: memory only, no cpuset or cpu directories, no cpus written."""
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cgroup.controllers").write_text("cpuset cpu memory\n")
    (v2 / "cgroup.subtree_control").write_text("")
    cg = cgroups.create("moeshard-bench-x", 10**9, layout=cgroups.detect(v2))
    assert cg.paths == {"memory": v2 / "moeshard-bench-x"}
    assert (v2 / "moeshard-bench-x/memory.max").read_text() == str(10**9)
    assert not (v2 / "moeshard-bench-x/cpuset.cpus").exists()
    assert (v2 / "cgroup.subtree_control").read_text() == "+memory"
    (v2 / "moeshard-bench-x/memory.peak").write_text("1234\n")
    (v2 / "moeshard-bench-x/memory.events").write_text("low 0\noom 2\noom_kill 1\n")
    assert cg.memory_limit() == 10**9 and cg.peak() == 1234 and cg.oom_kills() == 1

    v1 = tmp_path / "v1"
    (v1 / "memory/moeshard-bench-y").mkdir(parents=True)
    (v1 / "cpuset").mkdir()
    (v1 / "memory/moeshard-bench-y/memory.limit_in_bytes").write_text(str(2**63 - 4096))   # v1's "no limit"
    (v1 / "memory/moeshard-bench-y/memory.swappiness").write_text("60")
    mounts = tmp_path / "mounts"
    mounts.write_text(f"cgroup {v1}/memory cgroup rw,memory 0 0\ncgroup {v1}/cpuset cgroup rw,cpuset 0 0\n"
                      "proc /proc proc rw 0 0\n")
    layout = cgroups.detect(tmp_path / "nowhere", mounts)
    assert layout.version == 1 and set(layout.mounts) == {"memory", "cpuset"}
    cg = cgroups.create("moeshard-bench-y", 5 * 10**8, layout=layout)
    assert cg.paths == {"memory": v1 / "memory/moeshard-bench-y"}
    assert cg.memory_limit() == 5 * 10**8
    assert (v1 / "memory/moeshard-bench-y/memory.swappiness").read_text() == "0"
    assert not (v1 / "cpuset/moeshard-bench-y").exists()
    (v1 / "memory/moeshard-bench-y/memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n")
    assert cg.oom_kills() == 3


@pytest.mark.timeout(30)
def test_memory_headroom_v1_and_v2(tmp_path):
    """What a replacement actor may still allocate: min(limit - usage) up its memory cgroup's ancestors."""
    v1 = tmp_path / "v1"
    for d in ("job", "free"):
        (v1 / "memory/host" / d).mkdir(parents=True)
    (v1 / "memory/host/memory.limit_in_bytes").write_text("1000\n")
    (v1 / "memory/host/memory.usage_in_bytes").write_text("400\n")
    (v1 / "memory/host/job/memory.limit_in_bytes").write_text("300\n")
    (v1 / "memory/host/job/memory.usage_in_bytes").write_text("100\n")
    (v1 / "memory/host/free/memory.limit_in_bytes").write_text(str(2**63 - 4096))   # "no limit" in v1
    (v1 / "memory/host/free/memory.usage_in_bytes").write_text("100\n")
    (tmp_path / "c1").write_text("4:cpuset:/host\n3:memory:/host/job\n0::/\n")
    (tmp_path / "c1free").write_text("3:memory:/host/free\n")
    layout_v1 = cgroups.Layout(1, {"memory": v1 / "memory"})
    assert cgroups.process_cgroups(tmp_path / "c1") == {"cpuset": "/host", "memory": "/host/job", "": "/"}
    assert cgroups.memory_headroom(layout_v1, tmp_path / "c1") == 200      # the tighter of job and host
    assert cgroups.memory_headroom(layout_v1, tmp_path / "c1free") == 600  # unlimited job: the host's room
    v2 = tmp_path / "v2"
    (v2 / "a/b").mkdir(parents=True)
    (v2 / "a/memory.max").write_text("max\n")
    (v2 / "a/memory.current").write_text("5\n")
    (v2 / "a/b/memory.max").write_text("700\n")
    (v2 / "a/b/memory.current").write_text("200\n")
    (tmp_path / "c2").write_text("0::/a/b\n")
    layout_v2 = cgroups.Layout(2, {"memory": v2})
    assert cgroups.memory_headroom(layout_v2, tmp_path / "c2") == 500
    (tmp_path / "c3").write_text("0::/nowhere\n")
    assert cgroups.memory_headroom(layout_v2, tmp_path / "c3") is None
    assert cgroups.memory_headroom(layout_v2, tmp_path / "no-such-file") is None


@pytest.mark.timeout(30)
def test_wrap_refuses_to_run_outside_its_cgroup(tmp_path):
    """A command that cannot join its cgroup never starts (exit 97), so nothing runs unlimited."""
    ran = tmp_path / "ran"
    cg = cgroups.Cgroup("moeshard-gone", cgroups.Layout(2, {"memory": tmp_path}), {"memory": tmp_path / "gone"})
    proc = subprocess.run(cg.wrap(["touch", str(ran)]), capture_output=True, timeout=30)
    assert proc.returncode == 97 and not ran.exists()


@pytest.mark.requires("cgroups")
@pytest.mark.timeout(120)
def test_memory_cgroup_on_this_machine_limits_and_counts_oom_kills():
    """A real memory-only cgroup (the bench's): its processes are listed, a hog over the limit is
    OOM-killed inside it and counted, and removal kills what is left and leaves nothing."""
    cg = cgroups.create(f"moeshard-test-{secrets.token_hex(3)}", 64 << 20)
    with cg:
        assert set(cg.paths) == {"memory"} and cg.memory_limit() == 64 << 20
        hog = subprocess.run(cg.wrap([sys.executable, "-c", "x = b'x' * (512 << 20)"]), capture_output=True,
                             timeout=60)
        assert hog.returncode == -signal.SIGKILL, hog.stderr[-2000:]
        assert cg.oom_kills() >= 1
        assert cg.peak() is None or cg.peak() <= 64 << 20
        sleeper = subprocess.Popen(cg.wrap(["sleep", "300"]))
        deadline = time.monotonic() + 10
        while sleeper.pid not in cg.pids():
            assert time.monotonic() < deadline, "sleeper never showed up in its cgroup"
            time.sleep(0.05)
    assert sleeper.wait(timeout=10) == -signal.SIGKILL
    assert not cg.main.exists()
    assert cg.name not in cgroups.find("moeshard-test-")


def _harness_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "cluster.harness", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args, expect", [(["--host-memory", "lots"], "--host-memory: cannot read 'lots' as a size"),
                                          (["--hosts", "0"], "--hosts: need at least one host")])
def test_harness_up_bad_input_is_one_line_on_stderr(args, expect):
    out = _harness_cli("up", *args)
    assert out.returncode == 2 and out.stdout == "", (out.stdout, out.stderr)
    assert len(out.stderr.strip().splitlines()) == 1 and expect in out.stderr, out.stderr


@needs_netns
@pytest.mark.timeout(120)
def test_harness_up_failure_is_one_line_on_stderr_and_cleans_up():
    out = _harness_cli("up", "--hosts", "2", "--host-memory", "1GB", "--timeout", "3")
    assert out.returncode == 1 and out.stdout == "", (out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("harness up failed: "), out.stderr
    cid = re.search(rf"{STATE_ROOT}/([0-9a-f]{{6}})", lines[0])
    assert cid, lines[0]
    assert_nothing_left(cid.group(1))
