"""``LocalCluster``: several Ray nodes on one machine, each a "host" with its own IP and limits.

Namespace mode (root, iproute2 and cgroups available)::

    root ns: bridge 198.18.K.1 ── driver node (0 CPUs; raylet for drivers in the root ns)
      ├── netns moeshard-<id>-h0  198.18.K.2  cgroup moeshard-<id>-h0   ray head (GCS :6379)
      ├── netns moeshard-<id>-h1  198.18.K.3  cgroup moeshard-<id>-h1   ray worker node
      └── ...

Each host has ``num_cpus = host_cpus``, a cpuset, a memory cgroup limit, and a custom resource
``host_<i>: 1`` so work can be pinned to it. Why a driver node: a Ray driver advertises the IP of
the raylet it attaches to; attached to a raylet in a namespace it would advertise that
namespace's IP, which is not its own, and workers calling back into the driver (nested
``ray.get`` of driver-owned objects, actor owner checks) would hang. So a 0-CPU node runs in the
root namespace on the bridge address and ``connect()`` attaches to it.

Loopback mode (fallback when not root / no netns / no cgroups, or ``force_loopback=True``):
``ray.cluster_utils.Cluster`` on 127.0.0.2, .3, ... with the same ``host_<i>`` resources; link and memory
faults are unsupported there.

Authentication: Ray 2.60 turns token auth on for clusters that ``ray.init()`` creates, and for
``ray start`` whenever a token is found. The harness always enables it: a fresh random token is
written to ``<temp_dir>/auth_token`` (0600) and every Ray process gets ``RAY_AUTH_MODE=token`` and
``RAY_AUTH_TOKEN_PATH``; ``connect()`` puts the same two variables in ``os.environ`` before
``ray.init`` (``cl.auth_env`` has them for other processes). ``~/.ray/auth_token`` is untouched.
"""
from __future__ import annotations

import atexit
import contextlib
import fcntl
import ipaddress
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import psutil

from cluster import cgroups
from cluster.errors import ClusterError

from . import netns

log = logging.getLogger(__name__)

#: Everything a cluster writes lives under ``STATE_ROOT/<cluster-id>``; kept short because Ray's
#: unix socket paths (``<temp>/session_<date>_<pid>/sockets/plasma_store``) must stay < 108 bytes.
STATE_ROOT = Path(os.environ.get("MOESHARD_HARNESS_DIR", "/tmp/msh"))
CGROUP_PREFIX = "moeshard-"
DEFAULT_PORT = 6379  # free in every host: each namespace has its own port space
_ID_RE = re.compile(r"^[0-9a-f]{6}$")
_RAY_START = [sys.executable, "-m", "ray.scripts.scripts", "start", "--disable-usage-stats"]


class HarnessError(ClusterError):
    """The harness could not bring a cluster up, or could not tear it down completely."""


class HarnessUnsupported(HarnessError, NotImplementedError):
    """The requested fault cannot be injected in this mode (e.g. link cuts on loopback)."""


def parse_size(size: int | str) -> int:
    """``"3GB"``/``"512MiB"``/``1000`` -> bytes, by `workers.units.parse_bytes` (GB = 10**9, GiB = 2**30)."""
    from workers.units import parse_bytes

    return parse_bytes(size)


@dataclass
class Host:
    """One simulated machine."""

    index: int
    ip: str
    resource: str
    temp_dir: Path
    ns: str | None = None  # network namespace (None on loopback)
    cgroup: str | None = None  # cgroup name (None on loopback)
    node: Any = None  # the ray.cluster_utils.Cluster node on loopback


# --------------------------------------------------------------------------- state files


def proc_start_time(pid: int) -> float | None:
    """Start time of ``pid`` (guards against pid reuse), or None if it is gone."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _state_path(cluster_id: str) -> Path:
    return STATE_ROOT / cluster_id / "state.json"


def load_state(cluster_id: str) -> dict[str, Any] | None:
    """The state file of ``cluster_id`` (None if missing or unreadable)."""
    try:
        return json.loads(_state_path(cluster_id).read_text())
    except (OSError, ValueError):
        return None


def list_clusters() -> list[dict[str, Any]]:
    """State of every cluster with a state file, newest first."""
    states = [load_state(p.parent.name) for p in STATE_ROOT.glob("*/state.json")]
    return sorted((s for s in states if s), key=lambda s: s.get("created", 0), reverse=True)


def _owner_alive(state: dict[str, Any] | None) -> bool:
    """True if the process that owns this cluster is still running (and is not us)."""
    owner = (state or {}).get("owner")
    if not owner or owner["pid"] == os.getpid():
        return False
    start = proc_start_time(owner["pid"])
    return start is not None and start == owner.get("start")


@contextlib.contextmanager
def _lock() -> Iterator[None]:
    """Machine-wide harness lock (subnet allocation), bounded wait."""
    STATE_ROOT.mkdir(parents=True, exist_ok=True)
    with open(STATE_ROOT / ".lock", "w") as f:
        deadline = time.monotonic() + 60
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise HarnessError(f"timed out waiting for {STATE_ROOT / '.lock'}")
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- teardown


def _kill_pids(pids: list[int]) -> None:
    for pid in pids:
        if pid != os.getpid():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def pids_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains ``text`` (``pgrep -f`` without the regex)."""
    pids = []
    for proc in psutil.process_iter(["cmdline"]):
        if proc.pid != os.getpid() and any(text in arg for arg in proc.info["cmdline"] or ()):
            pids.append(proc.pid)
    return pids


def leftovers(cluster_id: str) -> dict[str, list[str]]:
    """Everything of ``cluster_id`` that still exists, by kind (empty lists = clean)."""
    prefix = f"{CGROUP_PREFIX}{cluster_id}-"
    tmp = STATE_ROOT / cluster_id
    return {
        "namespaces": netns.list_namespaces(prefix) if shutil.which("ip") else [],
        "links": (
            netns.list_links(netns.bridge_name(cluster_id))
            + netns.list_links(f"{netns.VETH_PREFIX}{cluster_id}-")
        )
        if shutil.which("ip")
        else [],
        "cgroups": cgroups.find(prefix),
        "processes": [str(p) for p in pids_mentioning(str(tmp) + "/")],
        "temp_dir": [str(tmp)] if tmp.exists() else [],
    }


def teardown(cluster_id: str, keep_logs: bool = False, timeout: float = 30.0) -> dict[str, list[str]]:
    """Remove every trace of ``cluster_id``, found by name; return what could not be removed.

    Order matters: processes first (a namespace with live processes outlives ``ip netns del``,
    a cgroup with processes cannot be removed), then namespaces, links, cgroups, files.
    """
    if not _ID_RE.match(cluster_id):
        raise ValueError(f"bad cluster id {cluster_id!r}")
    deadline = time.monotonic() + timeout
    prefix = f"{CGROUP_PREFIX}{cluster_id}-"
    tmp = STATE_ROOT / cluster_id
    have_ip = shutil.which("ip") is not None
    namespaces = netns.list_namespaces(prefix) if have_ip else []
    while True:  # processes can fork while we kill; repeat until none are left
        pids: set[int] = set(pids_mentioning(str(tmp) + "/"))
        for name in cgroups.find(prefix):
            pids.update(cgroups.open_existing(name).pids())
        for ns in namespaces:
            pids.update(netns.ns_pids(ns))
        pids.discard(os.getpid())
        if not pids or time.monotonic() > deadline:
            break
        _kill_pids(sorted(pids))
        time.sleep(0.1)
    for ns in namespaces:
        netns.delete_namespace(ns)
    if have_ip:
        for link in netns.list_links(f"{netns.VETH_PREFIX}{cluster_id}-"):
            netns.delete_link(link)
        for link in netns.list_links(netns.bridge_name(cluster_id)):
            netns.delete_link(link)
    for name in cgroups.find(prefix):
        try:
            cgroups.open_existing(name).remove(timeout=max(1.0, deadline - time.monotonic()))
        except cgroups.CgroupError as exc:
            log.warning("%s", exc)
    if tmp.exists():
        if keep_logs:
            _state_path(cluster_id).unlink(missing_ok=True)
            log.info("kept logs of cluster %s in %s", cluster_id, tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    left = leftovers(cluster_id)
    if keep_logs:
        left["temp_dir"] = []
    return {k: v for k, v in left.items() if v}


def _ids_on_machine() -> set[str]:
    """Cluster ids that own anything on this machine (state dirs, namespaces, links, cgroups)."""
    ids = {p.name for p in STATE_ROOT.glob("*") if _ID_RE.match(p.name)} if STATE_ROOT.exists() else set()
    names = cgroups.find(CGROUP_PREFIX)
    if shutil.which("ip"):
        names += netns.list_namespaces(CGROUP_PREFIX)
        names += [n.replace(netns.BRIDGE_PREFIX, CGROUP_PREFIX, 1) + "-" for n in netns.list_links(netns.BRIDGE_PREFIX)]
        names += [n.replace(netns.VETH_PREFIX, CGROUP_PREFIX, 1) for n in netns.list_links(netns.VETH_PREFIX)]
    for name in names:
        cid = name[len(CGROUP_PREFIX):].split("-", 1)[0]
        if _ID_RE.match(cid):
            ids.add(cid)
    return ids


def down_all(cluster_id: str | None = None, include_live: bool = False) -> list[str]:
    """Tear down leftover clusters found by name prefix; return the ids removed.

    A cluster whose owning process is still alive (another test session, say) is skipped
    unless ``include_live``; clusters started by ``python -m cluster.harness up`` have no owner
    and are always removed. ``cluster_id`` limits this to one cluster.
    """
    ids = [cluster_id] if cluster_id else sorted(_ids_on_machine())
    removed = []
    for cid in ids:
        if not include_live and _owner_alive(load_state(cid)):
            log.info("skipping cluster %s: its owner is alive", cid)
            continue
        left = teardown(cid)
        if left:
            log.warning("cluster %s: could not remove %s", cid, left)
        removed.append(cid)
    return removed


def namespace_unavailable_reason() -> str:
    """Why namespace mode (root, iproute2, ``ip netns add``, cgroups with cpusets) is unavailable here;
    "" when it works. Probes by creating and removing a namespace and a cgroup."""
    if os.geteuid() != 0:
        return "not root"
    if shutil.which("ip") is None:
        return "iproute2 missing"
    ok, why = netns.netns_supported()
    if not ok:
        return f"ip netns add failed: {why}"
    why = cgroups.unavailable_reason(pin_cpus=True)
    if why:
        return f"cgroups unusable: {why}"
    return ""


# --------------------------------------------------------------------------- the cluster

_LIVE: dict[str, "LocalCluster"] = {}
_handlers_installed = False


def _atexit_down() -> None:
    for cl in list(_LIVE.values()):
        with contextlib.suppress(Exception):
            cl.down()


def _on_signal(signum: int, _frame: Any) -> None:
    # Unwind normally: context managers and atexit then tear the clusters down.
    raise SystemExit(128 + signum)


def _install_handlers() -> None:
    """atexit always; SIGTERM/SIGHUP -> SystemExit where nobody else handles them."""
    global _handlers_installed
    if _handlers_installed:
        return
    _handlers_installed = True
    atexit.register(_atexit_down)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) in (signal.SIG_DFL, None):
                signal.signal(sig, _on_signal)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP during teardown and deliver them afterwards (main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {s: signal.signal(s, lambda n, _f: pending.append(n)) for s in sigs}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for s in pending[:1]:
            os.kill(os.getpid(), s)


class LocalCluster:
    """A multi-host Ray cluster on this machine. See the module docstring for the layout.

    >>> with LocalCluster(hosts=3, host_memory="3GB", host_cpus=1) as cl:
    ...     cl.connect()                      # ray.init(**cl.init_kwargs) with auth env set
    ...     f.options(resources={cl.resource(1): 0.01}).remote()
    """

    def __init__(
        self,
        hosts: int = 3,
        host_memory: int | str = "3GB",
        host_cpus: int = 1,
        *,
        cpu_quota: float | None = None,
        object_store_memory: int | str | None = None,
        ray_env: dict[str, str] | None = None,
        force_loopback: bool | None = None,
        dashboard: bool = False,
        port: int = DEFAULT_PORT,
        startup_timeout: float = 180.0,
        keep_logs: bool = False,
    ) -> None:
        """
        Args:
            hosts: number of hosts (host 0 is the Ray head).
            host_memory: memory cgroup limit per host; Ray's ``memory`` resource is half of it.
            host_cpus: ``--num-cpus`` and cpuset size per host (cpus assigned round-robin).
            cpu_quota: optional CFS quota per host, in CPUs.
            object_store_memory: per host; default ``host_memory / 5`` (>= 80 MB).
            ray_env: extra environment for Ray processes, e.g. health-check timings
                (``RAY_health_check_period_ms``) to detect dead hosts faster.
            force_loopback: use the loopback fallback even if namespaces work; None reads
                ``MOESHARD_HARNESS_LOOPBACK=1`` from the environment.
            dashboard: start the Ray dashboard on the head (off: saves a CPU-hungry process).
            port: GCS port on the head host.
            startup_timeout: bound on ``up()`` as a whole.
            keep_logs: keep ``<temp_dir>`` (Ray logs) after ``down()``.
        """
        if hosts < 1:
            raise ValueError(f"need at least one host, got hosts={hosts}")
        if host_cpus < 1:
            raise ValueError(f"host_cpus must be at least 1, got {host_cpus}")
        if cpu_quota is not None and not (0 < cpu_quota < float("inf")):
            raise ValueError(f"cpu_quota must be a number of CPUs > 0, got {cpu_quota}")
        if not startup_timeout > 0:
            raise ValueError(f"startup_timeout must be > 0 seconds, got {startup_timeout}")
        self.n_hosts = hosts
        self.host_memory = parse_size(host_memory)
        self.host_cpus = host_cpus
        self.cpu_quota = cpu_quota
        self.object_store_memory = (
            parse_size(object_store_memory)
            if object_store_memory is not None
            else max(80 * 10**6, self.host_memory // 5)
        )
        self.ray_env = dict(ray_env or {})
        if force_loopback is None:
            force_loopback = os.environ.get("MOESHARD_HARNESS_LOOPBACK") == "1"
        self.force_loopback = force_loopback
        self.dashboard = dashboard
        self.port = port
        self.startup_timeout = startup_timeout
        self.keep_logs = keep_logs
        self.cluster_id = secrets.token_hex(3)
        self.temp_dir = STATE_ROOT / self.cluster_id
        self.hosts: list[Host] = []
        self.mode: str | None = None  # "netns" or "loopback" once up
        self.address: str | None = None  # "198.18.K.2:6379"
        self.driver_ip: str | None = None  # IP drivers in the root namespace advertise
        self._subnet: ipaddress.IPv4Network | None = None
        self._loopback: Any = None  # ray.cluster_utils.Cluster
        self._saved_env: dict[str, str | None] | None = None
        self._owned = True

    # ----------------------------------------------------------------- public API

    @property
    def auth_token_path(self) -> Path:
        """File holding this cluster's auth token (0600)."""
        return self.temp_dir / "auth_token"

    @property
    def auth_env(self) -> dict[str, str]:
        """Environment a process needs to talk to this cluster (driver, ``ray`` CLI)."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.auth_token_path)}

    @property
    def init_kwargs(self) -> dict[str, Any]:
        """Arguments for ``ray.init`` from the root namespace (set ``auth_env`` first)."""
        if self.address is None:
            raise HarnessError("cluster is not up")
        return {"address": self.address, "_node_ip_address": self.driver_ip}

    def resource(self, i: int) -> str:
        """Custom resource name that pins work to host ``i`` (each host has 1 unit)."""
        return f"host_{i}"

    def up(self) -> "LocalCluster":
        """Start all hosts and wait until every node is alive (bounded by ``startup_timeout``)."""
        if self.mode is not None:
            return self
        _install_handlers()
        _LIVE[self.cluster_id] = self
        deadline = time.monotonic() + self.startup_timeout
        try:
            reason = "forced" if self.force_loopback else namespace_unavailable_reason()
            if reason:
                log.warning(
                    "moeshard harness: network namespaces/cgroups unavailable (%s); falling back "
                    "to ray.cluster_utils.Cluster on loopback 127.0.0.2+ (no namespaces, memory "
                    "limits or link faults)",
                    reason,
                )
                self.mode = "loopback"
                self._up_loopback()
            else:
                self.mode = "netns"
                self._up_netns(deadline)
        except BaseException:
            # the caller reports the error itself; this only explains the teardown that follows
            log.info("cluster %s failed to come up; tearing down", self.cluster_id)
            self.down()
            raise
        log.info("cluster %s up (%s): %s", self.cluster_id, self.mode, self.address)
        return self

    def down(self) -> None:
        """Stop everything and remove namespaces, links, cgroups, processes and temp files.

        Idempotent; raises :class:`HarnessError` if something could not be removed.
        """
        with _signals_deferred():
            _LIVE.pop(self.cluster_id, None)
            self._disconnect_if_ours()
            if self._loopback is not None:
                with contextlib.suppress(Exception):
                    self._loopback.shutdown()
                self._loopback = None
            left = teardown(self.cluster_id, keep_logs=self.keep_logs)
            self._restore_env()
            self.mode = None
        if left:
            raise HarnessError(f"cluster {self.cluster_id}: could not remove {left}")

    def __enter__(self) -> "LocalCluster":
        return self.up()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            self.down()
        except HarnessError:
            if exc_type is None:
                raise
            log.exception("teardown after %s also failed", exc_type.__name__)  # keep the first error

    def connect(self, **init_kwargs: Any) -> Any:
        """``ray.init`` this process as a driver of the cluster (auth env set, cache reset)."""
        import ray

        self._apply_auth_env()
        kwargs = {**self.init_kwargs, **init_kwargs}
        return ray.init(**kwargs)

    def detach(self) -> None:
        """Keep the cluster running after this process exits (``down_all`` removes it)."""
        _LIVE.pop(self.cluster_id, None)
        self._owned = False
        self._write_state()

    def kill_host(self, i: int) -> None:
        """SIGKILL every process of host ``i`` (its node goes dead; host 0 takes the GCS)."""
        host = self.hosts[i]
        if self.mode == "loopback":
            self._loopback.remove_node(host.node, allow_graceful=False)
            return
        cgroups.open_existing(host.cgroup).kill_all()
        _kill_pids(netns.ns_pids(host.ns))

    def cut_link(self, i: int) -> None:
        """Pull host ``i``'s cable: its veth goes down, packets to and from it are lost."""
        self._need_netns("cut_link")
        netns.set_link(self.cluster_id, i, up=False)

    def restore_link(self, i: int) -> None:
        """Plug host ``i``'s cable back in."""
        self._need_netns("restore_link")
        netns.set_link(self.cluster_id, i, up=True)

    def set_memory_limit(self, i: int, limit: int | str) -> None:
        """Change host ``i``'s memory cgroup limit; exceeding it OOM-kills inside the host."""
        self._need_netns("set_memory_limit")
        cgroups.open_existing(self.hosts[i].cgroup).set_memory_limit(parse_size(limit))

    def host_pids(self, i: int) -> list[int]:
        """PIDs living in host ``i``."""
        if self.mode == "loopback":
            return [proc.pid for _kind, proc in self.hosts[i].node.live_processes()]
        return cgroups.open_existing(self.hosts[i].cgroup).pids()

    def alive_ips(self, timeout: float = 30.0) -> dict[str, bool]:
        """``{node ip: alive}`` for every node the GCS knows (asked from a subprocess)."""
        return self._probe(expect=[], timeout=timeout)[0]

    @classmethod
    def from_state(cls, cluster_id: str | None = None) -> "LocalCluster":
        """A handle on a running cluster started elsewhere (e.g. by the CLI); not owned."""
        states = [load_state(cluster_id)] if cluster_id else list_clusters()
        state = states[0] if states and states[0] else None
        if state is None or state.get("address") is None:
            raise HarnessError(f"no running harness cluster {cluster_id or ''}".strip())
        cl = cls(hosts=len(state["hosts"]), host_memory=state["host_memory"], host_cpus=state["host_cpus"])
        cl.cluster_id, cl.temp_dir = state["cluster_id"], STATE_ROOT / state["cluster_id"]
        cl.mode, cl.address, cl.driver_ip = state["mode"], state["address"], state["driver_ip"]
        cl.hosts = [
            Host(h["index"], h["ip"], f"host_{h['index']}", Path(h["temp_dir"]), h.get("ns"), h.get("cgroup"))
            for h in state["hosts"]
        ]
        cl._owned = False
        return cl

    # ----------------------------------------------------------------- netns mode

    def _up_netns(self, deadline: float) -> None:
        layout = cgroups.detect()
        cpus = cgroups.parent_cpus(layout)
        with _lock():
            self._subnet = netns.pick_subnet()
            self.temp_dir.mkdir(parents=True)
            self._write_state()  # before creating anything, so down_all() finds a crash's leftovers
            netns.create_bridge(self.cluster_id, self._subnet)
        self.driver_ip = netns.bridge_ip(self._subnet)
        for i in range(self.n_hosts):
            ns = netns.ns_name(self.cluster_id, i)
            ip = netns.create_host(self.cluster_id, i, self._subnet)
            name = f"{CGROUP_PREFIX}{self.cluster_id}-h{i}"
            host_cpus = [cpus[(i * self.host_cpus + k) % len(cpus)] for k in range(self.host_cpus)]
            cgroups.create(name, self.host_memory, sorted(set(host_cpus)), self.cpu_quota, layout)
            self.hosts.append(Host(i, ip, self.resource(i), self.temp_dir / f"h{i}", ns, name))
        self.address = f"{self.hosts[0].ip}:{self.port}"
        # The driver node: root namespace, all cpus, no tight memory limit of its own.
        drv_cg = f"{CGROUP_PREFIX}{self.cluster_id}-drv"
        cgroups.create(drv_cg, max(self.host_memory, 2 << 30), cpus, None, layout)
        self._write_token()
        self._write_state()

        from tqdm import tqdm

        # a bar on a terminal only (disable=None): each `ray start` takes seconds
        with tqdm(total=self.n_hosts + 2, desc="starting hosts", unit="node", disable=None, leave=False) as bar:
            self._ray_start(self.hosts[0], head=True, deadline=deadline)
            bar.update()
            procs = [self._ray_start(h, head=False, deadline=deadline, wait=False) for h in self.hosts[1:]]
            procs.append(self._ray_start_driver_node(drv_cg, deadline))
            for proc, what in procs:
                self._wait_start(proc, what, deadline)
                bar.update()
            expect = [h.ip for h in self.hosts] + [self.driver_ip]
            alive, ok = self._probe(expect, timeout=max(1.0, deadline - time.monotonic()))
            bar.update()
        if not ok:
            missing = [ip for ip in expect if not alive.get(ip)]
            raise HarnessError(
                f"nodes {missing} did not join {self.address} within {self.startup_timeout:.0f}s; "
                f"logs under {self.temp_dir}"
            )
        self._write_state()

    def _ray_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
        env.update(self.auth_env)
        env.update(self.ray_env)
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        return env

    def _common_args(self, node_ip: str, temp_dir: Path) -> list[str]:
        return ["--node-ip-address", node_ip, "--temp-dir", str(temp_dir),
                "--object-store-memory", str(self.object_store_memory)]

    def _ray_start(
        self, host: Host, head: bool, deadline: float, wait: bool = True
    ) -> tuple[subprocess.Popen, str]:
        """Run ``ray start`` for ``host`` inside its namespace and cgroup."""
        args = self._common_args(host.ip, host.temp_dir) + [
            "--num-cpus", str(self.host_cpus),
            "--memory", str(self.host_memory // 2),
            "--resources", json.dumps({host.resource: 1}),
        ]
        if head:
            args += ["--head", "--port", str(self.port), f"--include-dashboard={str(self.dashboard).lower()}"]
        else:
            args += ["--address", self.address]
        cg = cgroups.open_existing(host.cgroup)
        cmd = ["ip", "netns", "exec", host.ns, *_RAY_START, *args]
        proc = self._spawn(cmd, cg, host.temp_dir.with_suffix(".start.log"))
        what = f"ray start on host {host.index} ({host.ip})"
        if wait:
            self._wait_start(proc, what, deadline)
        return proc, what

    def _ray_start_driver_node(self, cgroup_name: str, deadline: float) -> tuple[subprocess.Popen, str]:
        """A 0-CPU node on the bridge address for drivers in the root namespace."""
        args = self._common_args(self.driver_ip, self.temp_dir / "drv") + [
            "--address", self.address,
            "--num-cpus", "0",
            "--memory", "0",
            "--resources", json.dumps({"driver_node": 1}),
            # The root namespace is shared: never use a fixed default port here.
            "--dashboard-agent-listen-port", str(_free_port(self.driver_ip)),
            "--include-log-monitor=false",
        ]
        cmd = [*_RAY_START, *args]
        proc = self._spawn(cmd, cgroups.open_existing(cgroup_name), self.temp_dir / "drv.start.log")
        return proc, f"ray start of the driver node ({self.driver_ip})"

    def _spawn(self, cmd: list[str], cg: cgroups.Cgroup, log_path: Path) -> subprocess.Popen:
        env = self._ray_env()
        log.debug("spawn %s", " ".join(cmd))
        with open(log_path, "wb") as out:
            return subprocess.Popen(
                cg.wrap(cmd), env=env, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )

    def _wait_start(self, proc: subprocess.Popen, what: str, deadline: float) -> None:
        try:
            rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
            raise HarnessError(f"{what} did not finish in time; logs under {self.temp_dir}") from None
        if rc != 0:
            raise HarnessError(f"{what} exited {rc}; see {self.temp_dir}/*.start.log")

    def _probe(self, expect: list[str], timeout: float) -> tuple[dict[str, bool], bool]:
        """Ask the GCS which nodes are alive, polling until ``expect`` are (bounded)."""
        env = self._ray_env()
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        code = _PROBE.format(address=self.address, expect=expect, timeout=timeout)
        try:
            proc = subprocess.run(
                [sys.executable, "-c", code], env=env, capture_output=True, text=True,
                timeout=timeout + 30,
            )
        except subprocess.TimeoutExpired as exc:
            raise HarnessError(f"GCS probe of {self.address} hung") from exc
        lines = proc.stdout.strip().splitlines()
        if not lines:
            raise HarnessError(f"GCS probe of {self.address} failed: {proc.stderr[-2000:]}")
        result = json.loads(lines[-1])
        return result["alive"], proc.returncode == 0

    def _write_token(self) -> None:
        fd = os.open(self.auth_token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))

    def _write_state(self) -> None:
        pid = os.getpid()
        state = {
            "cluster_id": self.cluster_id,
            "mode": self.mode,
            "created": time.time(),
            "owner": {"pid": pid, "start": proc_start_time(pid)} if self._owned else None,
            "address": self.address,
            "driver_ip": self.driver_ip,
            "subnet": str(self._subnet) if self._subnet else None,
            "host_memory": self.host_memory,
            "host_cpus": self.host_cpus,
            "auth_env": self.auth_env,
            "hosts": [
                {"index": h.index, "ip": h.ip, "ns": h.ns, "cgroup": h.cgroup, "temp_dir": str(h.temp_dir)}
                for h in self.hosts
            ],
        }
        path = _state_path(self.cluster_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(path)

    def _need_netns(self, what: str) -> None:
        if self.mode != "netns":
            raise HarnessUnsupported(f"{what} needs namespace mode (cluster is in {self.mode} mode)")

    # ----------------------------------------------------------------- loopback mode

    def _up_loopback(self) -> None:
        """Hosts are ``ray.cluster_utils.Cluster`` nodes on 127.0.0.2, 127.0.0.3, ...

        Not 127.0.0.1: Ray rewrites that address (and "localhost") to the machine's outward IP
        when a driver connects, which would leave the loopback range.
        """
        from ray.cluster_utils import Cluster

        from cluster import ray_internal

        self.temp_dir.mkdir(parents=True)
        self._write_state()
        self._write_token()
        # Ray processes inherit this process's environment here: set auth (and ray_env) in it.
        self._apply_auth_env(extra={"RAY_USAGE_STATS_ENABLED": "0", **self.ray_env})

        def node_args(i: int) -> dict[str, Any]:
            return {
                "node_ip_address": _loopback_ip(i),
                "num_cpus": self.host_cpus,
                "memory": self.host_memory // 2,
                "object_store_memory": self.object_store_memory,
                "resources": {self.resource(i): 1},
                "temp_dir": str(self.temp_dir / f"h{i}"),
                "include_dashboard": self.dashboard if i == 0 else None,
            }

        ray_internal.ensure_address_file_dir()
        self._loopback = Cluster(initialize_head=True, head_node_args=node_args(0), shutdown_at_exit=False)
        self.address = self._loopback.address
        self.driver_ip = _loopback_ip(0)  # drivers attach to the head's raylet
        self.hosts.append(Host(0, _loopback_ip(0), self.resource(0), self.temp_dir / "h0",
                               node=self._loopback.head_node))
        for i in range(1, self.n_hosts):
            node = self._loopback.add_node(wait=True, **node_args(i))
            self.hosts.append(Host(i, _loopback_ip(i), self.resource(i), self.temp_dir / f"h{i}", node=node))
        self._loopback.wait_for_nodes(timeout=self.startup_timeout)
        self._write_state()

    # ----------------------------------------------------------------- env handling

    def _apply_auth_env(self, extra: dict[str, str] | None = None) -> None:
        """Put ``auth_env`` (and ``extra``) in ``os.environ`` and make Ray re-read it."""
        new = {**self.auth_env, **(extra or {})}
        if self._saved_env is None:
            self._saved_env = {k: os.environ.get(k) for k in new}
        os.environ.update(new)
        _reload_ray_auth()

    def _restore_env(self) -> None:
        """Undo ``_apply_auth_env``, including Ray's cached token, so a later local Ray in this
        process does not present this cluster's token."""
        if self._saved_env is None:
            return
        for k, v in self._saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self._saved_env = None
        _reload_ray_auth()

    def _disconnect_if_ours(self) -> None:
        """``ray.shutdown()`` if this process is a driver of this cluster."""
        if "ray" not in sys.modules or self.address is None:
            return
        import ray

        if not ray.is_initialized():
            return
        try:
            gcs = ray.get_runtime_context().gcs_address
        except Exception:  # noqa: BLE001 - half-initialised worker: shut it down anyway
            gcs = self.address
        if gcs == self.address:
            ray.shutdown()


def _loopback_ip(i: int) -> str:
    """Host ``i``'s address in loopback mode (127.0.0.2 + i; all of 127/8 is on ``lo``)."""
    if i > 250:
        raise ValueError("loopback mode supports at most 251 hosts")
    return f"127.0.0.{2 + i}"


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


_PROBE = """
import json, sys, time
from cluster.ray_internal import gcs_node_states
expect, deadline = set({expect!r}), time.monotonic() + {timeout!r}
alive, err = {{}}, None
while True:
    try:
        alive = gcs_node_states({address!r}, timeout_s=5)
        if all(alive.get(ip) for ip in expect):
            print(json.dumps({{"alive": alive}})); sys.exit(0)
    except Exception as exc:
        err = repr(exc)
    if time.monotonic() > deadline:
        print(json.dumps({{"alive": alive, "error": err}})); sys.exit(1)
    time.sleep(0.5)
"""
#: Where the ``cluster`` package lives, for the probe subprocess to import it from.
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


def _reload_ray_auth() -> None:
    """Make Ray re-read its auth settings and token from the environment."""
    from cluster import ray_internal

    ray_internal.reload_auth()
