"""`RemoteExperts`: the routed-experts backend over Ray actors, one `ExpertShard` each.

Per MoE layer the coordinator groups the routed work once (`ExpertBatch`), this
module splits the grouped rows by owning actor and sends ONE `run_layer` call to
each actor that has rows (actors with none get no call), all in flight at once.
`submit` returns as soon as the calls are sent so the coordinator can compute the
shared expert meanwhile; `wait` collects the replies, puts every actor's output
back at its rows of the grouped buffer and combines with `ExpertBatch.combine`,
exactly as `LocalExperts` does, so results are bit-identical to in-process runs.

Ray failures are translated: a reply that does not come within `call_timeout_s`
raises `ExpertTimeout`, a dead actor `ShardUnavailable`, an error raised inside
the actor (bad message, bad routing) the same moeshard error with the remote message.
"""
from __future__ import annotations

import logging
import math
import os
import socket
import statistics
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from coordinator.experts import ExpertBatch, backend_stats
from workers import wire
from workers.errors import MoeshardError
from workers.shard import DTYPES, ExpertShard
from workers.spec import ExpertSpec

from .errors import ClusterError, ExpertTimeout, ShardUnavailable
from .placement import Plan, plan_placement

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 3.0      # TCP probe of a Ray address before ray.init (which retries for minutes)
LATENCY_WINDOW = 4096      # per-layer dispatch latencies kept for the median


class _ShardActor(ExpertShard):
    """`ExpertShard` plus what only an actor can say about itself: where it runs."""

    def node_info(self) -> dict[str, Any]:
        """Liveness check that also reports the actor's node id, node IP and pid."""
        import ray

        self.ping()
        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "ip": ray.util.get_node_ip_address(), "pid": os.getpid(),
                "device": str(self.device)}


# ---- Ray connection ------------------------------------------------------------------------------

def _probe(address: str) -> None:
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


def _resolve_auto() -> str | None:
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
        _probe(address)
    if ray.is_initialized():
        current = ray.get_runtime_context().gcs_address
        if address and address not in ("local", "auto") and address.rsplit(":", 1)[-1] != current.rsplit(":", 1)[-1]:
            raise ClusterError(f"this process is already connected to Ray at {current}; cannot also connect to "
                               f"{address} (call ray.shutdown() first, or pass no address to reuse {current})")
        log.info("reusing the Ray connection to %s", current)
        return False
    kwargs: dict[str, Any] = dict(logging_level=logging.WARNING, include_dashboard=False)
    if address and address != "local":
        if address == "auto" and (resolved := _resolve_auto()):
            _probe(resolved)
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


def _check_capacity(plan: Plan) -> None:
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


# ---- the backend ---------------------------------------------------------------------------------

@dataclass
class _Call:
    """One run_layer call in flight to one actor."""

    actor: int
    ref: Any                   # ray.ObjectRef of the reply bytes
    idx: torch.Tensor          # [n] positions of this actor's rows in the grouped buffer
    t_sent: float


@dataclass
class Pending:
    """A layer's routed work in flight; pass to `RemoteExperts.wait`."""

    layer: int
    batch: ExpertBatch
    x: torch.Tensor
    calls: list[_Call]
    t0: float
    done: bool = False


@dataclass
class _ActorStats:
    calls: int = 0
    rows: int = 0
    compute_s: float = 0.0
    stall_s: float = 0.0
    transit_s: float = 0.0
    calls_per_layer: dict[int, int] = field(default_factory=lambda: defaultdict(int))


class RemoteExperts:
    """Routed experts spread over `num_workers` Ray actors (see module docstring)."""

    def __init__(self, specs: Sequence[ExpertSpec], *, num_workers: int, dtype: str,
                 worker_memory: int | None = None, min_resident: int = 1, ray_address: str | None = None,
                 num_cpus_per_worker: float = 1, num_gpus_per_worker: float = 0,
                 resources: list[dict] | None = None, call_timeout_s: float = 60.0, policy: str = "lfu-decay",
                 ready_timeout_s: float = 120.0, load: dict[tuple[int, int], float] | None = None):
        import ray

        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose from {sorted(DTYPES)}")
        self.dtype = DTYPES[dtype]
        self.call_timeout_s = call_timeout_s
        self.plan = plan_placement(list(specs), num_workers, dtype_bytes=self.dtype.itemsize,
                                   worker_memory=worker_memory, min_resident=min_resident, load=load,
                                   num_cpus=num_cpus_per_worker, num_gpus=num_gpus_per_worker, resources=resources)
        self._owner: dict[int, dict[int, int]] = defaultdict(dict)   # layer -> expert -> actor
        for (layer, expert), a in self.plan.owners().items():
            self._owner[layer][expert] = a
        self._actors: list[Any] = []
        self._nodes: list[dict[str, Any]] = []
        self._closed = False
        custom: dict[str, float] = defaultdict(float)
        for w in self.plan.workers:
            for k, v in w.resources.items():
                custom[k] += v
        self._started_ray = connect_ray(ray_address, num_cpus=num_workers * num_cpus_per_worker,
                                        num_gpus=num_workers * num_gpus_per_worker, resources=dict(custom))
        try:
            _check_capacity(self.plan)
            by_key = {s.key: s for s in specs}
            cls = ray.remote(_ShardActor)
            for w in self.plan.workers:
                opts: dict[str, Any] = dict(num_cpus=w.num_cpus, num_gpus=w.num_gpus, max_restarts=0)
                if w.resources:
                    opts["resources"] = w.resources
                else:
                    opts["scheduling_strategy"] = "SPREAD"
                self._actors.append(cls.options(**opts).remote(
                    [by_key[k].to_dict() for k in w.experts], budget_bytes=worker_memory, dtype=dtype,
                    device="cuda" if w.num_gpus > 0 else None, policy=policy, min_resident=min_resident,
                    num_threads=max(1, int(w.num_cpus))))
            self._nodes = self._wait_ready(ready_timeout_s)
        except BaseException:
            self.close()
            raise
        self._stats = [_ActorStats() for _ in self._actors]
        self._latency: dict[int, deque] = defaultdict(lambda: deque(maxlen=LATENCY_WINDOW))
        self._layer_totals: dict[int, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])  # count, sum, max
        self._max_calls_per_actor: dict[int, int] = defaultdict(int)
        self._prefetch_hints = 0
        log.info("RemoteExperts: %d actors ready on %d node(s)", len(self._actors),
                 len({n["node_id"] for n in self._nodes}))

    # -- lifecycle ---------------------------------------------------------------------------------
    def _wait_ready(self, timeout_s: float) -> list[dict[str, Any]]:
        import ray

        refs = [a.node_info.remote() for a in self._actors]
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        if pending:
            late = [i for i, r in enumerate(refs) if r in pending]
            asks = {i: (self.plan.workers[i].num_cpus, self.plan.workers[i].num_gpus, self.plan.workers[i].resources)
                    for i in late}
            free = {k: v for k, v in ray.available_resources().items() if "memory" not in k and "node:" not in k}
            raise ClusterError(f"expert actors {late} were not ready after {timeout_s:g}s; they may be waiting for "
                               f"resources no node has free (cpus, gpus, custom resources asked: {asks}; "
                               f"free now: {free})")
        nodes = []
        for i, r in enumerate(refs):
            try:
                nodes.append(ray.get(r))
            except ray.exceptions.RayActorError as e:
                raise ShardUnavailable(f"expert actor {i} failed to start: {_root_message(e)}") from e
        return nodes

    def close(self) -> None:
        """Kill the actors this backend created; shut Ray down only if this backend started it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        import ray

        for a in self._actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception as e:  # already dead, or Ray gone
                log.debug("killing actor: %s", e)
        if self._started_ray and ray.is_initialized():
            ray.shutdown()

    def __enter__(self) -> "RemoteExperts":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def actors(self) -> list[Any]:
        """The actor handles, in plan order (actor i owns `plan.workers[i].experts`)."""
        return list(self._actors)

    def _where(self, i: int) -> str:
        n = self._nodes[i] if i < len(self._nodes) else {}
        return f"actor {i} (node {n.get('node_id', '?')[:12]} at {n.get('ip', '?')})"

    # -- the routed-experts protocol ---------------------------------------------------------------
    def forward(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [T, H], weights [T, k], ids [T, k] -> [T, H] = sum over slots of weight * expert(x)."""
        return self.wait(self.submit(layer, x, weights, ids))

    def submit(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> Pending:
        """Send layer `layer`'s routed rows: one call per actor that owns an active expert. Returns at once."""
        if self._closed:
            raise ClusterError("RemoteExperts is closed")
        if x.dtype != self.dtype:
            raise ValueError(f"x is {x.dtype} but the experts compute in {self.dtype}")
        t0 = time.perf_counter()
        batch = ExpertBatch.from_routing(weights, ids)
        owners = self._owner.get(layer)
        if owners is None:
            raise ValueError(f"layer {layer} has no routed experts (MoE layers: {sorted(self._owner)})")
        per: dict[int, tuple[list[int], list[int], list[torch.Tensor]]] = {}
        for e, s, t in batch.segments():
            a = owners.get(e)
            if a is None:
                raise ValueError(f"routing chose expert {e} of layer {layer}, which does not exist "
                                 f"(layer has experts 0..{max(owners)})")
            experts, counts, spans = per.setdefault(a, ([], [], []))
            experts.append(e)
            counts.append(t - s)
            spans.append(torch.arange(s, t, device=batch.token_idx.device))
        calls = []
        for a in sorted(per):
            experts, counts, spans = per[a]
            idx = spans[0] if len(spans) == 1 else torch.cat(spans)
            rows = x.index_select(0, batch.token_idx[idx])          # one gather per actor
            msg = wire.encode({"op": "run_layer", "layer": layer, "experts": experts, "counts": counts},
                              {"rows": rows})
            calls.append(_Call(a, self._actors[a].run_layer.remote(msg), idx, time.perf_counter()))
        return Pending(layer, batch, x, calls, t0)

    def wait(self, pending: Pending) -> torch.Tensor:
        """Collect the replies of `submit` and combine: [T, H]."""
        import ray

        if pending.done:
            raise ValueError("this pending layer was already waited on")
        pending.done = True
        layer, batch = pending.layer, pending.batch
        y = torch.empty(len(batch.token_idx), pending.x.shape[1], dtype=self.dtype, device=pending.x.device)
        by_ref = {c.ref: c for c in pending.calls}
        left = list(by_ref)
        deadline = time.perf_counter() + self.call_timeout_s
        while left:
            ready, left = ray.wait(left, num_returns=1, timeout=max(0.0, deadline - time.perf_counter()))
            if not ready:
                late = ", ".join(self._where(by_ref[r].actor) for r in left)
                raise ExpertTimeout(f"no reply within {self.call_timeout_s:g}s from {late} for layer {layer}")
            call = by_ref[ready[0]]
            arrived = time.perf_counter()
            header, out = self._reply(call, layer, y.shape[1])
            y.index_copy_(0, call.idx, out.to(y.device))
            st = self._stats[call.actor]
            st.calls += 1
            st.rows += len(call.idx)
            st.compute_s += float(header.get("compute_s", 0.0))
            st.stall_s += float(header.get("stall_s", 0.0))
            st.transit_s += max(0.0, arrived - call.t_sent - float(header.get("compute_s", 0.0)))
            st.calls_per_layer[layer] += 1
        result = batch.combine(y)
        self._record_layer(layer, pending, time.perf_counter() - pending.t0)
        return result

    def _reply(self, call: _Call, layer: int, hidden: int) -> tuple[dict, torch.Tensor]:
        """ray.get one reply and decode it, translating every failure into a moeshard error."""
        import ray

        where = f"{self._where(call.actor)}, layer {layer}"
        try:
            reply = ray.get(call.ref, timeout=self.call_timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise ExpertTimeout(f"no reply within {self.call_timeout_s:g}s from {where}") from None
        except ray.exceptions.RayActorError as e:
            raise ShardUnavailable(f"{where}: the actor is gone ({_root_message(e)})") from e
        except ray.exceptions.RayTaskError as e:
            cause = e.cause
            if isinstance(cause, MoeshardError):
                raise type(cause)(f"{where}: {cause}") from e
            raise ClusterError(f"{where}: {type(cause).__name__}: {cause}") from e
        except ray.exceptions.RayError as e:
            raise ShardUnavailable(f"{where}: {type(e).__name__}: {e}") from e
        header, tensors = wire.decode(reply)
        out = tensors.get("out")
        if out is None or tuple(out.shape) != (len(call.idx), hidden):
            raise ClusterError(f"{where}: reply has tensor 'out' of shape "
                               f"{None if out is None else tuple(out.shape)}, expected ({len(call.idx)}, {hidden})")
        return header, out

    def _record_layer(self, layer: int, pending: Pending, seconds: float) -> None:
        self._latency[layer].append(seconds)
        tot = self._layer_totals[layer]
        tot[0] += 1
        tot[1] += seconds
        tot[2] = max(tot[2], seconds)
        per_actor = defaultdict(int)
        for c in pending.calls:
            per_actor[c.actor] += 1
        self._max_calls_per_actor[layer] = max([self._max_calls_per_actor[layer], *per_actor.values()])

    def prefetch(self, layer: int, ids: torch.Tensor) -> None:
        """One-way hint to the owning actors; never waited on. Unknown experts are ignored."""
        if self._closed:
            return
        owners = self._owner.get(layer, {})
        per: dict[int, list[int]] = defaultdict(list)
        for e in torch.unique(ids).tolist():
            if (a := owners.get(int(e))) is not None:
                per[a].append(int(e))
        for a, experts in per.items():
            self._actors[a].prefetch.remote(layer, experts)  # ref dropped on purpose: fire and forget
            self._prefetch_hints += 1

    # -- reporting ---------------------------------------------------------------------------------
    def reports(self, timeout_s: float | None = None) -> list[dict]:
        """Each actor's raw `ExpertShard.report()`, in actor order."""
        import ray

        refs = [a.report.remote() for a in self._actors]
        out = []
        for i, r in enumerate(refs):
            try:
                out.append(ray.get(r, timeout=timeout_s or self.call_timeout_s))
            except ray.exceptions.GetTimeoutError:
                raise ExpertTimeout(f"{self._where(i)} did not report within {timeout_s or self.call_timeout_s:g}s")
            except ray.exceptions.RayActorError as e:
                raise ShardUnavailable(f"{self._where(i)} is gone ({_root_message(e)})") from e
        return out

    def stats(self) -> dict[str, Any]:
        """`coordinator.experts.backend_stats` shape: totals over actors, then per actor where it runs,
        what it owns and holds (its `report()` counters: cache hits, reads, prefetch...), and the
        dispatch-side figures: calls, rows, actor compute seconds vs transit seconds (round trip
        minus compute), calls per layer. `layers` gives each layer's dispatch latency (mean/p50/max)
        and the most calls any actor got in one dispatch (1 by construction)."""
        try:
            reports = self.reports() if not self._closed else [{} for _ in self._actors]
        except ClusterError as e:
            log.warning("stats without actor reports: %s", e)
            reports = [{} for _ in self._actors]
        actors = []
        for i, (w, st, rep) in enumerate(zip(self.plan.workers, self._stats, reports)):
            n = self._nodes[i]
            rep = {k: v for k, v in rep.items() if k not in ("owned", "loaded_tensors", "per_layer")}
            actors.append({
                **rep, "index": i, "node_id": n["node_id"], "ip": n["ip"], "pid": n["pid"], "device": n["device"],
                "experts": len(w.experts), "expert_bytes": w.expert_bytes, "calls": st.calls, "rows": st.rows,
                "compute_s": st.compute_s, "stall_s": st.stall_s, "transit_s": st.transit_s,
                "calls_per_layer": dict(st.calls_per_layer),
            })
        layers = {}
        for layer, lat in sorted(self._latency.items()):
            count, total, worst = self._layer_totals[layer]
            layers[layer] = {"dispatches": int(count), "latency_mean_s": total / count,
                             "latency_p50_s": statistics.median(lat), "latency_max_s": worst,
                             "max_calls_per_actor": self._max_calls_per_actor[layer]}
        return backend_stats("ray", actors, budget_bytes=self.plan.worker_memory,
                             transit_s=sum(st.transit_s for st in self._stats),
                             prefetch_hints=self._prefetch_hints, layers=layers)


def _root_message(e: BaseException) -> str:
    """The useful line(s) of a Ray actor error: the creation-task error when there is one."""
    msg = str(e).strip()
    return msg.splitlines()[-1] if msg else type(e).__name__
