"""Connecting to Ray: reuse, join (after a fast TCP probe) or start a local cluster sized for a plan."""
from __future__ import annotations

import logging
import math
import os
import socket
from collections import defaultdict
from typing import Any

from .errors import ClusterError
from .placement import Plan

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 3.0      # TCP probe of a Ray address before ray.init (which retries for minutes)


def probe(address: str) -> None:
    """Fail fast with ClusterError if nothing accepts TCP connections at `address` (host:port)."""
    hostport = address.split("://", 1)[-1]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise ClusterError(f"Ray address {address!r} is not host:port (e.g. 10.0.0.5:6379 or ray://10.0.0.5:10001)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_TIMEOUT_S):
            pass
    except OSError as e:
        raise ClusterError(f"cannot reach the Ray cluster at {address}: {e.strerror or e} "
                           f"(is `ray start --head` running there and is the port open?)") from None


def resolve_auto() -> str | None:
    """The host:port `ray.init(address="auto")` would use, if Ray can tell (else None)."""
    try:
        from ray._private.services import canonicalize_bootstrap_address
        return canonicalize_bootstrap_address("auto")
    except Exception:  # private API, or no cluster recorded: let ray.init report it
        return None


def connect_ray(address: str | None, *, num_cpus: float, num_gpus: float,
                resources: dict[str, float]) -> bool:
    """Make sure this process is connected to Ray; return True if this call started Ray.

    - Ray already initialised (e.g. inside a Ray job, or by the caller): reuse it.
    - `address` given (or RAY_ADDRESS set): probe it, then `ray.init(address=...)`.
    - otherwise start a local Ray sized for the plan (CPUs, GPUs and any custom
      resources the plan pins actors with, so a multi-node plan also runs on one machine).
    """
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address not in ("local", "auto"):
        probe(address)
    if ray.is_initialized():
        current = ray.get_runtime_context().gcs_address
        if address and address not in ("local", "auto") and address.rsplit(":", 1)[-1] != current.rsplit(":", 1)[-1]:
            raise ClusterError(f"this process is already connected to Ray at {current}; cannot also connect to "
                               f"{address} (call ray.shutdown() first, or pass no address to reuse {current})")
        log.info("reusing the Ray connection to %s", current)
        return False
    kwargs: dict[str, Any] = dict(logging_level=logging.WARNING, include_dashboard=False)
    if address and address != "local":
        if address == "auto" and (resolved := resolve_auto()):
            probe(resolved)
        try:
            ray.init(address=address, logging_level=logging.WARNING)
        except Exception as e:
            raise ClusterError(f"cannot connect to the Ray cluster at {address}: {e}") from e
        log.info("connected to Ray at %s", ray.get_runtime_context().gcs_address)
        return False
    ray.init(address="local", num_cpus=max(1, math.ceil(num_cpus)), num_gpus=None if num_gpus else 0,
             resources={k: float(max(1, math.ceil(v))) for k, v in resources.items()} or None, **kwargs)
    log.info("started a local Ray (%g CPUs%s)", max(1, math.ceil(num_cpus)), ", GPUs autodetected" if num_gpus else "")
    return True


def check_capacity(plan: Plan) -> None:
    """ClusterError now, rather than actors pending forever, if the cluster lacks the plan's totals."""
    import ray

    have = ray.cluster_resources()
    want: dict[str, float] = defaultdict(float)
    for w in plan.workers:
        want["CPU"] += w.num_cpus
        want["GPU"] += w.num_gpus
        for k, v in w.resources.items():
            want[k] += v
    short = [f"{k}: need {v:g}, cluster has {have.get(k, 0):g}" for k, v in want.items() if v > have.get(k, 0) + 1e-9]
    if short:
        raise ClusterError(f"the Ray cluster cannot host {len(plan.workers)} expert actors: " + "; ".join(short))
