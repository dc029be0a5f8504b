"""Connecting to Ray: reuse, join (after a TCP probe and a GCS handshake) or start a local Ray sized for a plan."""
from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from .errors import ClusterError
from .placement import Plan

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 3.0      # TCP probe of a Ray address before ray.init (which retries for minutes)
GCS_CHECK_TIMEOUT_S = 5.0  # one gRPC call to the GCS: milliseconds when it is there, even on a loaded machine
FREE_WAIT_S = 10.0         # killed actors give their CPUs back in ~40 ms on a quiet machine, over 3 s in a loaded CI run
# The first call every Ray client makes to the GCS. An empty protobuf request is zero bytes, so the
# check needs no generated stubs: only the method name, which is Ray's wire protocol.
GCS_PING_METHOD = "/ray.rpc.NodeInfoGcsService/GetClusterId"
# Ray's token settings (ray/exceptions.py AuthenticationError names them): a client sends the token
# only with RAY_AUTH_MODE=token, taking RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token.
AUTH_HOW = ("set RAY_AUTH_MODE=token and the cluster's token in RAY_AUTH_TOKEN, or in a file named by "
            "RAY_AUTH_TOKEN_PATH (default ~/.ray/auth_token); `ray get-auth-token` on the head node prints it")

_started_gcs: str | None = None    # the GCS address of the local Ray connect_ray started in this process


def _host_port(address: str) -> tuple[str, int]:
    hostport = address.split("://", 1)[-1]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise ClusterError(f"Ray address {address!r} is not host:port (e.g. 10.0.0.5:6379 or ray://10.0.0.5:10001)")
    return host.strip("[]"), int(port)


def probe(address: str, *, handshake: bool = True) -> None:
    """Fail fast with ClusterError if `address` (host:port) is not a Ray GCS this process may join.

    First a TCP connect (nothing listening), then, with `handshake` and for a GCS address (not
    ray://), `check_gcs`: one gRPC call the way Ray's client starts, which tells a port that is not
    Ray's GCS, or a token the cluster refuses, at once, where ray.init would retry each of these for
    20 s to many minutes, flooding stderr.
    """
    host, port = _host_port(address)
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            pass
    except OSError as e:
        raise ClusterError(f"cannot reach the Ray cluster at {address}: {e.strerror or e} "
                           f"(is `ray start --head` running there and is the port open?)") from None
    if handshake and not address.startswith("ray://"):   # the Ray Client server speaks its own protocol
        check_gcs(address)


def auth_token() -> tuple[str | None, str]:
    """(the token Ray's client would send, where it comes from); (None, where it looked) if none."""
    if token := os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return token, "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    where = f"RAY_AUTH_TOKEN_PATH={path}" if path else "~/.ray/auth_token"
    file = Path(path) if path else Path.home() / ".ray" / "auth_token"
    try:
        token = file.read_text(encoding="utf-8").strip()
    except OSError:
        return None, f"RAY_AUTH_TOKEN is not set and {where} cannot be read"
    return (token, where) if token else (None, f"RAY_AUTH_TOKEN is not set and {where} is empty")


def check_gcs(address: str) -> None:
    """ClusterError unless `address` answers as Ray's GCS and accepts this process's token (if it needs one)."""
    import grpc

    host, port = _host_port(address)
    # No HTTP proxy: the check is about this address, and Ray's own GCS client goes direct.
    with grpc.insecure_channel(f"{host}:{port}", options=[("grpc.enable_http_proxy", 0)]) as channel:
        ping = channel.unary_unary(GCS_PING_METHOD)

        def code(token: str | None) -> Any:
            try:
                ping(b"", timeout=GCS_CHECK_TIMEOUT_S,
                     metadata=[("authorization", f"Bearer {token}")] if token else None)
                return grpc.StatusCode.OK
            except grpc.RpcError as e:
                return e.code()

        first = code(None)
        if first == grpc.StatusCode.UNAUTHENTICATED:
            token, where = auth_token()
            if token is None:
                raise ClusterError(f"the Ray cluster at {address} requires token authentication and this process "
                                   f"has no token ({where}): {AUTH_HOW}")
            if code(token) == grpc.StatusCode.UNAUTHENTICATED:
                raise ClusterError(f"the Ray cluster at {address} rejects the auth token from {where} (a token of "
                                   f"another cluster?): {AUTH_HOW}")
            if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
                raise ClusterError(f"the Ray cluster at {address} requires token authentication, and Ray sends "
                                   f"the token from {where} only with RAY_AUTH_MODE=token (it is "
                                   f"{os.environ.get('RAY_AUTH_MODE', 'unset')!r}): {AUTH_HOW}")
            return
    what = {grpc.StatusCode.UNIMPLEMENTED: "answers as a gRPC server that is not Ray's GCS",
            grpc.StatusCode.UNAVAILABLE: "does not speak gRPC (an HTTP server?)",
            grpc.StatusCode.DEADLINE_EXCEEDED: f"does not answer a gRPC call within {GCS_CHECK_TIMEOUT_S:g} s"}
    if first not in what:  # OK, or an answer only a gRPC server with that method gives: let ray.init judge
        if first != grpc.StatusCode.OK:
            log.debug("GCS check of %s: %s; trying ray.init anyway", address, first)
        return
    raise ClusterError(f"{address} accepts connections but {what[first]}: is it Ray's GCS port (`ray start --head "
                       f"--port`, default 6379)? The dashboard (8265) and Ray Client (ray://, 10001) ports are not")


def resolve_auto() -> str | None:
    """The host:port `ray.init(address="auto")` would use, if Ray can tell (else None)."""
    from .ray_internal import bootstrap_address

    try:
        return bootstrap_address("auto")
    except Exception:  # no cluster recorded: let ray.init report it
        return None


def connect_ray(address: str | None, *, num_cpus: float, num_gpus: float,
                resources: dict[str, float]) -> bool:
    """Make sure this process is connected to Ray; return True if this call started Ray.

    - Ray already initialised (e.g. inside a Ray job, or by the caller): reuse it.
    - `address` given (or RAY_ADDRESS set): probe it, then `ray.init(address=...)`.
    - otherwise start a local Ray sized for the plan (CPUs, GPUs and any custom
      resources the plan pins actors with, so a multi-node plan also runs on one machine).
    """
    global _started_gcs
    import ray

    from . import ray_internal  # noqa: F401  (refuses a Ray outside the tested versions, in one line)

    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address not in ("local", "auto"):
        probe(address, handshake=not ray.is_initialized())  # a connected process needs no GCS check
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
    _started_gcs = ray.get_runtime_context().gcs_address
    log.info("started a local Ray (%g CPUs%s)", max(1, math.ceil(num_cpus)), ", GPUs autodetected" if num_gpus else "")
    return True


def plan_demand(plan: Plan) -> dict[str, float]:
    """The Ray resources the plan's actors ask for, summed (CPU, GPU and custom)."""
    want: dict[str, float] = defaultdict(float)
    for w in plan.workers:
        want["CPU"] += w.num_cpus
        want["GPU"] += w.num_gpus
        for k, v in w.resources.items():
            want[k] += v
    return {k: v for k, v in want.items() if v > 0}


def _short(want: dict[str, float], have: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in want.items() if v > have.get(k, 0) + 1e-9}


def check_capacity(plan: Plan) -> None:
    """ClusterError now, rather than actors pending until the ready timeout, if the cluster cannot host the plan.

    First the cluster's totals; then what is free now (`ray.available_resources`), since actors of
    another backend in this process, or other jobs, may hold the rest. Resources of actors just killed
    return to the free view asynchronously, so a shortfall is re-checked for up to FREE_WAIT_S.
    """
    import ray

    want = plan_demand(plan)
    have = ray.cluster_resources()
    if short := _short(want, have):
        raise ClusterError(f"the Ray cluster cannot host {len(plan.workers)} expert actors: " + "; ".join(
            f"{k}: need {v:g}, cluster has {have.get(k, 0):g}" for k, v in short.items()))
    deadline = time.monotonic() + FREE_WAIT_S
    while (short := _short(want, free := ray.available_resources())) and time.monotonic() < deadline:
        time.sleep(0.2)
    if not short:
        return
    need = "; ".join(f"{k}: need {v:g}, {free.get(k, 0):g} free of {have.get(k, 0):g}" for k, v in short.items())
    ours = _started_gcs is not None and _started_gcs == ray.get_runtime_context().gcs_address
    fix = (("this process started that local Ray, sized for the first plan; close the other Coordinator or "
            "backend first, or start Ray yourself with enough for both (ray.init(num_cpus=...) before the first, "
            "or `ray start --head --num-cpus N` and pass its address)") if ours else
           "other actors or jobs hold the rest: close them, wait for them, or add nodes")
    raise ClusterError(f"the Ray cluster does not have enough free resources for {len(plan.workers)} expert actors "
                       f"({need}): {fix}")
