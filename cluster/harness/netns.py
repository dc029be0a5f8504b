"""Network plumbing for the harness: one bridge per cluster, one namespace per host.

Layout for a cluster with id ``abc123`` on subnet ``198.18.K.0/24``::

    root namespace                      namespace moeshard-abc123-h<i>
    bridge msb-abc123  198.18.K.1/24    eth0 198.18.K.(2+i)/24, lo up
       └─ veth msv-abc123-<i>  <──────>  (peer of msv-abc123-<i>)

Only 198.18.0.0/15 (RFC 2544 benchmarking range) is ever assigned. All commands go
through ``ip`` (iproute2); every call has a timeout.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import subprocess

log = logging.getLogger(__name__)

#: The only range the harness assigns addresses from.
HARNESS_NET = ipaddress.ip_network("198.18.0.0/15")
#: Name prefixes; teardown finds leftovers by these.
NS_PREFIX = "moeshard-"
BRIDGE_PREFIX = "msb-"
VETH_PREFIX = "msv-"

_IP_TIMEOUT_S = 15.0


class NetnsError(RuntimeError):
    """An ``ip`` command failed."""


def ip(*args: str, check: bool = True, timeout: float = _IP_TIMEOUT_S) -> str:
    """Run ``ip <args>`` and return stdout; raise :class:`NetnsError` on failure if ``check``."""
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout


def ns_name(cluster_id: str, host: int) -> str:
    """Namespace name of ``host`` in cluster ``cluster_id``."""
    return f"{NS_PREFIX}{cluster_id}-h{host}"


def bridge_name(cluster_id: str) -> str:
    """Bridge name (<= 15 chars, the kernel's limit)."""
    return f"{BRIDGE_PREFIX}{cluster_id}"


def veth_name(cluster_id: str, host: int) -> str:
    """Root-side veth name of ``host`` (<= 15 chars)."""
    return f"{VETH_PREFIX}{cluster_id}-{host}"


def used_ipv4_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network assigned to an interface in the root namespace."""
    nets = []
    for line in ip("-o", "-4", "addr", "show").splitlines():
        parts = line.split()
        if "inet" in parts:
            nets.append(ipaddress.ip_interface(parts[parts.index("inet") + 1]).network)
    return nets


def pick_subnet() -> ipaddress.IPv4Network:
    """First /24 inside 198.18.0.0/15 that overlaps nothing assigned on this machine.

    Callers must hold the harness lock between picking and assigning, so two clusters
    started at once do not pick the same subnet.
    """
    used = used_ipv4_networks()
    for subnet in HARNESS_NET.subnets(new_prefix=24):
        if not any(subnet.overlaps(u) for u in used):
            return subnet
    raise NetnsError("no free /24 left in 198.18.0.0/15")


def host_ip(subnet: ipaddress.IPv4Network, host: int) -> str:
    """Address of ``host`` (host 0 is .2; .1 is the bridge)."""
    addr = subnet.network_address + 2 + host
    if addr not in subnet or addr == subnet.broadcast_address:
        raise NetnsError(f"host {host} does not fit in {subnet}")
    return str(addr)


def bridge_ip(subnet: ipaddress.IPv4Network) -> str:
    """Address of the bridge in the root namespace."""
    return str(subnet.network_address + 1)


def create_bridge(cluster_id: str, subnet: ipaddress.IPv4Network) -> None:
    """Create the cluster's bridge and give it the subnet's .1 address."""
    assert subnet.subnet_of(HARNESS_NET), subnet
    br = bridge_name(cluster_id)
    ip("link", "add", br, "type", "bridge")
    ip("addr", "add", f"{bridge_ip(subnet)}/{subnet.prefixlen}", "dev", br)
    ip("link", "set", br, "up")


def create_host(cluster_id: str, host: int, subnet: ipaddress.IPv4Network) -> str:
    """Create the namespace of ``host``, wire it to the bridge and return its address."""
    ns, veth, addr = ns_name(cluster_id, host), veth_name(cluster_id, host), host_ip(subnet, host)
    ip("netns", "add", ns)
    ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
    ip("link", "set", veth, "master", bridge_name(cluster_id), "up")
    ip("-n", ns, "addr", "add", f"{addr}/{subnet.prefixlen}", "dev", "eth0")
    ip("-n", ns, "link", "set", "lo", "up")
    ip("-n", ns, "link", "set", "eth0", "up")
    return addr


def set_link(cluster_id: str, host: int, up: bool) -> None:
    """Bring the root-side veth of ``host`` up or down (down = cable pulled)."""
    ip("link", "set", veth_name(cluster_id, host), "up" if up else "down")


def ns_pids(ns: str) -> list[int]:
    """PIDs of processes inside namespace ``ns`` (empty if it does not exist)."""
    out = ip("netns", "pids", ns, check=False)
    return [int(p) for p in out.split() if p.isdigit()]


def list_namespaces(prefix: str = NS_PREFIX) -> list[str]:
    """Names of namespaces starting with ``prefix``."""
    names = [line.split()[0] for line in ip("netns", "list", check=False).splitlines() if line.strip()]
    return [n for n in names if n.startswith(prefix)]


def list_links(prefix: str) -> list[str]:
    """Names of root-namespace links starting with ``prefix``."""
    links = []
    for line in ip("-o", "link", "show", check=False).splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            name = parts[1].strip().split("@")[0]
            if name.startswith(prefix):
                links.append(name)
    return links


def delete_namespace(ns: str) -> None:
    """Delete ``ns`` (its veth peer goes with it); missing is fine."""
    ip("netns", "del", ns, check=False)


def delete_link(name: str) -> None:
    """Delete a root-namespace link; missing is fine."""
    ip("link", "del", name, check=False)


def netns_supported() -> tuple[bool, str]:
    """Whether namespaces, veths and bridges can be created here (tries it)."""
    probe = f"{NS_PREFIX}probe-{os.getpid()}"
    try:
        ip("netns", "add", probe)
    except (NetnsError, OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    finally:
        ip("netns", "del", probe, check=False)
    return True, ""
