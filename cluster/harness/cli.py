"""``harness up|down|list`` command line; the ``moeshard harness`` CLI reuses these two functions."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from cluster.cgroups import CgroupError

from .cluster import HarnessError, LocalCluster, down_all, list_clusters
from .netns import NetnsError


def add_harness_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``up`` / ``down`` / ``list`` sub-commands to ``parser``."""
    sub = parser.add_subparsers(dest="harness_command", required=True)
    up = sub.add_parser("up", help="start a multi-host cluster and leave it running")
    up.add_argument("--hosts", type=int, default=3, help="number of hosts (host 0 is the head)")
    up.add_argument("--host-memory", default="3GB", help="memory limit per host, e.g. 3GB")
    up.add_argument("--host-cpus", type=int, default=1, help="CPUs per host")
    up.add_argument("--cpu-quota", type=float, default=None, help="CFS quota per host, in CPUs")
    up.add_argument("--loopback", action="store_true", help="force the loopback fallback (127.0.0.2+)")
    up.add_argument("--timeout", type=float, default=180.0, help="startup bound in seconds")
    up.add_argument("--json", action="store_true", help="print the state as JSON")
    down = sub.add_parser("down", help="remove harness clusters and everything they left behind")
    down.add_argument("--cluster-id", default=None, help="only this cluster")
    down.add_argument("--all", action="store_true", help="also clusters whose owner process is alive")
    sub.add_parser("list", help="list harness clusters")


def _one_line(text: object) -> str:
    """``text`` on one line (errors from ``ip`` or Ray may carry newlines)."""
    return " ".join(str(text).split())


def _bad_up_flag(args: argparse.Namespace) -> str | None:
    """What is wrong with `harness up`'s flags, in their names, before anything starts (None: nothing)."""
    from workers.units import parse_bytes

    if args.hosts < 1:
        return f"--hosts: need at least one host, got {args.hosts}"
    if args.host_cpus < 1:
        return f"--host-cpus: must be an integer >= 1, got {args.host_cpus}"
    if args.cpu_quota is not None and not 0 < args.cpu_quota < float("inf"):
        return f"--cpu-quota: must be a number of CPUs > 0, got {args.cpu_quota}"
    if not 0 < args.timeout < float("inf"):
        return f"--timeout: must be a number of seconds > 0, got {args.timeout}"
    try:
        memory = parse_bytes(args.host_memory)
    except ValueError as exc:
        return f"--host-memory: {_one_line(exc)}"
    if not memory or memory < 1:
        return f"--host-memory: must be a positive size like 3GB, got {args.host_memory!r}"
    return None


def run_harness_command(args: argparse.Namespace) -> int:
    """Run the parsed harness sub-command; returns the exit status (errors: one line on stderr)."""
    # warnings only: a failure must read as the one line below, not as a log of the teardown
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.harness_command == "up":
        if (bad := _bad_up_flag(args)) is not None:
            print(f"harness up: {bad}", file=sys.stderr)
            return 2
        try:
            cl = LocalCluster(
                hosts=args.hosts, host_memory=args.host_memory, host_cpus=args.host_cpus,
                cpu_quota=args.cpu_quota, force_loopback=args.loopback or None,
                startup_timeout=args.timeout,
            )
        except ValueError as exc:
            print(f"harness up: {_one_line(exc)}", file=sys.stderr)
            return 2
        try:
            cl.up()
        except (HarnessError, CgroupError, NetnsError, OSError) as exc:
            print(f"harness up failed: {_one_line(exc)}", file=sys.stderr)
            return 1
        cl.detach()
        if args.json:
            print(json.dumps({"cluster_id": cl.cluster_id, "address": cl.address, "mode": cl.mode,
                              "init_kwargs": cl.init_kwargs, "auth_env": cl.auth_env}))
        else:
            env = " ".join(f"{k}={v}" for k, v in cl.auth_env.items())
            print(f"cluster {cl.cluster_id} up ({cl.mode}): {cl.address}")
            for h in cl.hosts:
                print(f"  host {h.index}: {h.ip}  resource {h.resource}")
            print(f"connect: export {env}")
            print(f"         ray.init(address={cl.address!r}, _node_ip_address={cl.driver_ip!r})")
            print("   or:   LocalCluster.from_state().connect()")
            print("remove:  python -m cluster.harness down")
        return 0
    if args.harness_command == "down":
        try:
            removed = down_all(args.cluster_id, include_live=args.all or bool(args.cluster_id))
        except ValueError as exc:
            print(f"harness down: --cluster-id: {_one_line(exc)}", file=sys.stderr)
            return 2
        print("removed: " + (", ".join(removed) or "nothing"))
        return 0
    if args.harness_command == "list":
        for s in list_clusters():
            owner = s["owner"]["pid"] if s.get("owner") else "detached"
            print(f"{s['cluster_id']}  {s['mode']}  {s['address']}  hosts={len(s['hosts'])}  owner={owner}")
        return 0
    raise ValueError(args.harness_command)
