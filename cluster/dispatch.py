"""`RemoteExperts`: the routed-experts backend over Ray actors, one `ExpertShard` each.

It composes four parts, one job each:

- the **fleet** (cluster/fleet.py): starts, replaces and probes the actors, and says where each
  runs (`ActorNode`);
- a **transport** (cluster/transports.py): "direct" (the default) sends each layer's messages over
  an authenticated ZMQ channel straight to the actors, "calls" as plain Ray actor calls; neither
  retries;
- **split-by-owner** (cluster/split.py): a layer's grouped rows per owning actor;
- the **dispatcher** (cluster/dispatcher.py): one message per actor with rows, all in flight at once,
  the replies combined exactly as `LocalExperts` does, and the retry policy: a message whose actor
  died, hung past `call_timeout_s` or became unreachable is resent, byte for byte, to a replacement.

Ray keeps the control plane (lifecycle, placement, health, token auth, recovery); the per-layer
data goes over the transport. This module adds what is the backend's own: hints, stats, options.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import statistics
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from coordinator.experts import backend_stats, hint_lists
from coordinator.options import (PlacementOptions, RecoveryOptions, RunOptions, StoreOptions, TransportOptions,
                                 UnknownOption)
from workers.budget import expert_nbytes
from workers.dtypes import compute_dtype
from workers.spec import ExpertSpec

from .connect import check_capacity, connect_ray
from .dispatcher import Dispatcher, LayerTrace, Pending
from .errors import ClusterError, ExpertTimeout, ShardUnavailable
from .fleet import ActorNode, Fleet
from .owners import OwnerTable
from .placement import plan_for
from .rebalance import AutoRebalance, RebalanceStats, Rebalancer
from .replicas import ReplicaPlan, plan_replicas
from .transports import make_transport, root_message

log = logging.getLogger(__name__)

LATENCY_WINDOW = 4096      # per-layer dispatch latencies kept for the median

__all__ = ["RemoteExperts", "Pending", "LayerTrace"]


@dataclass
class _ActorStats:
    calls: int = 0
    rows: int = 0
    compute_s: float = 0.0
    stall_s: float = 0.0
    transit_s: float = 0.0
    calls_per_layer: dict[int, int] = field(default_factory=lambda: defaultdict(int))


class RemoteExperts:
    """Routed experts spread over `num_workers` Ray actors (see module docstring).

    Options are typed (coordinator/options.py): where actors go (`PlacementOptions`), each actor's
    memory (`StoreOptions`), the transport and its timeout (`TransportOptions`) and how hard recovery
    tries (`RecoveryOptions`); `build()` takes them as the API's flat keywords.

    `coordinator_threads`: torch threads for this (the coordinator's) process while the backend is
    open; None sizes them to the cores that actors placed on this node leave free (fewer only,
    never more; unchanged when no actor is here), restored at `close()`. Threads that spin on cores
    the actors need cost more than they compute (docs/performance.md).
    """

    def __init__(self, specs: Sequence[ExpertSpec], *, dtype: str, placement: PlacementOptions,
                 store: StoreOptions = StoreOptions(), transport: TransportOptions = TransportOptions(),
                 recovery: RecoveryOptions = RecoveryOptions(), min_resident: int = 1,
                 pinned: Sequence[tuple[int, int]] = (), coordinator_threads: int | None = None,
                 load: dict[tuple[int, int], float] | None = None, report_residency: bool = False):
        self.dtype = compute_dtype(dtype)
        num_workers = placement.num_workers
        worker_memory, spill_dir = store.budget_bytes, store.spill_dir
        self.plan = plan_for(specs, placement, store, dtype, min_resident=min_resident, pinned=pinned, load=load)
        self._owner: dict[int, dict[int, int]] = defaultdict(dict)   # layer -> expert -> actor
        for (layer, expert), a in self.plan.owners().items():
            self._owner[layer][expert] = a
        self._closed = False
        self._threads_before: int | None = None
        by_key = {s.key: s for s in specs}
        pinned_keys = set(map(tuple, pinned))
        # What each actor is created with, so a replacement is the same actor (plan order).
        init_args = [dict(specs=[by_key[k].to_dict() for k in w.experts], budget_bytes=worker_memory,
                          dtype=dtype, device="cuda" if w.num_gpus > 0 else None, policy=store.policy,
                          min_resident=min_resident, num_threads=max(1, int(w.num_cpus)),
                          pinned=[k for k in w.experts if k in pinned_keys],
                          spill_dir=None if spill_dir is None else os.path.join(spill_dir, f"actor-{w.index}"))
                     for w in self.plan.workers]
        custom: dict[str, float] = defaultdict(float)
        for w in self.plan.workers:
            for k, v in w.resources.items():
                custom[k] += v
        self._started_ray = connect_ray(placement.ray_address, num_cpus=num_workers * placement.num_cpus,
                                        num_gpus=num_workers * placement.num_gpus, resources=dict(custom))
        self._transport = make_transport(transport.transport)
        self._fleet = Fleet(self.plan, init_args, recovery_options=recovery,
                            actor_kwargs=self._transport.actor_kwargs, on_start=self._on_start)
        self._dispatcher = Dispatcher(self._fleet, self._transport,
                                      OwnerTable.static(self._owner, num_workers), self.dtype,
                                      transport.call_timeout_s, recovery)
        self._rebalancer = Rebalancer(self._fleet, specs, self.plan.owners(), lambda: self._dispatcher.table,
                                      self._swap_table, [w.spare_bytes for w in self.plan.workers],
                                      self.dtype.itemsize)
        self._replica_nbytes = max(expert_nbytes(s, self.dtype.itemsize) for s in specs)
        self._moe_layers = len({s.layer for s in specs})
        self._first_layer = min(s.layer for s in specs)
        self._auto: AutoRebalance | None = None
        self._dispatcher.report_residency = report_residency
        self._stats = [_ActorStats() for _ in self.plan.workers]
        self._latency: dict[int, deque] = defaultdict(lambda: deque(maxlen=LATENCY_WINDOW))
        self._layer_totals: dict[int, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])  # count, sum, max
        self._max_calls_per_actor: dict[int, int] = defaultdict(int)
        self._hint_calls = 0
        self._requests = 0
        self.add_trace_hook(self._count)
        try:
            check_capacity(self.plan)
            self._fleet.start(placement.ready_timeout_s)
        except BaseException:
            self.close()
            raise
        self._share_cores(coordinator_threads)
        log.info("RemoteExperts: %d actors ready on %d node(s), transport %s", len(self._fleet),
                 len({n.node_id for n in self._fleet.nodes}), self._transport.name)

    @classmethod
    def build(cls, specs: Sequence[ExpertSpec], *, dtype: str, min_resident: int = 1,
              pinned: Sequence[tuple[int, int]] = (), load: dict[tuple[int, int], float] | None = None,
              **options: Any) -> "RemoteExperts":
        """The backend from `Coordinator.from_pretrained`'s flat keywords (num_workers=2, call_timeout_s=30,
        ...), checked by `RunOptions.from_kwargs`: unknown or out-of-range options are errors."""
        run = RunOptions.from_kwargs(**options)
        if not run.distributed:
            raise UnknownOption("num_workers", "RemoteExperts needs num_workers >= 1")
        return cls(specs, dtype=dtype, placement=run.placement, store=run.store, transport=run.transport,
                   recovery=run.recovery, min_resident=min_resident, pinned=pinned,
                   coordinator_threads=run.coordinator_threads, load=load)

    # -- settings that tests and operators change on a live backend ------------------------------
    @property
    def recovery(self) -> RecoveryOptions:
        return self._dispatcher.recovery

    def _set_recovery(self, **change: Any) -> None:
        new = dataclasses.replace(self._dispatcher.recovery, **change)   # checked again, like any RecoveryOptions
        self._dispatcher.recovery = self._fleet.recovery = new

    max_call_retries = property(lambda self: self.recovery.max_call_retries,
                                lambda self, v: self._set_recovery(max_call_retries=v))
    max_generation_retries = property(lambda self: self.recovery.max_generation_retries,
                                      lambda self, v: self._set_recovery(max_generation_retries=v))
    restart_timeout_s = property(lambda self: self.recovery.restart_timeout_s,
                                 lambda self, v: self._set_recovery(restart_timeout_s=v))

    @property
    def call_timeout_s(self) -> float:
        return self._dispatcher.call_timeout_s

    @call_timeout_s.setter
    def call_timeout_s(self, v: float) -> None:
        TransportOptions(call_timeout_s=v)           # the option's own check
        self._dispatcher.call_timeout_s = v

    @property
    def transport(self) -> str:
        """The transport's name: "direct" or "calls"."""
        return self._transport.name

    def add_trace_hook(self, hook: Callable[[LayerTrace], None]) -> None:
        """Call `hook(LayerTrace)` after every layer dispatch: per actor its rows, compute, stall and transit
        seconds (what `stats()` sums and the benchmark reads)."""
        self._dispatcher.hooks.append(hook)

    def remove_trace_hook(self, hook: Callable[[LayerTrace], None]) -> None:
        self._dispatcher.hooks.remove(hook)

    # -- lifecycle ---------------------------------------------------------------------------------
    def _on_start(self, i: int, handle: Any, node: ActorNode) -> None:
        """An actor became ready (started or replaced): attach its channel; it starts with nothing loaded."""
        self._transport.attach(i, handle, node, self._fleet.where(i))
        self._dispatcher.all_resident[i] = False
        self._dispatcher.resident[i] = {}
        if self._fleet.records[i].incarnation > 0:      # a replacement: it holds its primaries only
            self._rebalancer.lost(i)

    def _swap_table(self, table: OwnerTable) -> None:
        self._dispatcher.table = table          # one reference: the next dispatch sees all of it

    # -- load-driven re-placement (cluster/replicas.py, cluster/rebalance.py) ----------------------
    @property
    def replica_plan(self) -> ReplicaPlan:
        """Who serves which expert now, with what share of its rows (the static plan until a re-placement)."""
        return self._dispatcher.table.plan

    def replica_slots(self) -> list[int]:
        """Replicas each actor can hold: as many of the largest expert as the budget its own slots leave
        (`WorkerPlan.spare_bytes`; 0 for an actor that pages), or one per MoE layer where the budget is
        unlimited."""
        return self.plan.replica_slots(self._replica_nbytes, self._moe_layers)

    def plan_replicas(self, loads: dict[tuple[int, int], float],
                      slots: int | Sequence[int] | None = None) -> ReplicaPlan:
        """A replica plan for measured `loads` ({(layer, expert): rows}, e.g. `LoadStats.load_map()`)
        with `slots` replicas per actor (one number for all, or one per actor; None: `replica_slots()`).
        Slots beyond an actor's spare budget are refused when the plan is applied."""
        n = len(self.plan.workers)
        per = self.replica_slots() if slots is None else [slots] * n if isinstance(slots, int) else list(slots)
        return plan_replicas(loads, self.plan.owners(), n, per)

    def rebalance_every(self, passes: int | None, loads: Callable[[], dict[tuple[int, int], float]] | None = None,
                        min_gain: float = 0.05) -> None:
        """Re-place automatically (`rebalance_interval`): every `passes` forward passes, plan replicas
        from `loads()` ({(layer, expert): rows}, the coordinator's recent load window) within
        `replica_slots()`, and apply the plan live when it lowers the worst layer's max/mean rows per
        actor by `min_gain` (cluster/rebalance.py `AutoRebalance`). None turns it off."""
        if passes is None:
            self._auto = None
            self._rebalancer.counted(interval=None)
            return
        if loads is None:
            raise ClusterError("rebalance_every needs the load to plan from (e.g. the coordinator's expert_load)")
        self._auto = AutoRebalance(self._rebalancer, passes, loads, self.plan_replicas, lambda: self.replica_plan,
                                   min_gain)

    def begin_rebalance(self, plan: ReplicaPlan) -> None:
        """Start a live re-placement: new holders load now; the owner table switches at the first
        dispatch after every load finished; dropped replicas are released then. Returns at once.
        Call it (and `wait_rebalance`) from the thread that generates, e.g. in `generate(on_token=...)`,
        or between requests: the switch is made by the dispatching thread, not under a lock."""
        if self._closed:
            raise ClusterError("RemoteExperts is closed")
        self._rebalancer.begin(plan)

    def wait_rebalance(self, timeout_s: float | None = None) -> RebalanceStats:
        """Block until the current re-placement is applied or abandoned (bounded: `restart_timeout_s`
        by default); its outcome is in the returned stats."""
        self._rebalancer.wait(self.recovery.restart_timeout_s if timeout_s is None else timeout_s)
        return self._rebalancer.stats

    def rebalance(self, plan: ReplicaPlan, timeout_s: float | None = None) -> RebalanceStats:
        """`begin_rebalance` then `wait_rebalance`."""
        self.begin_rebalance(plan)
        return self.wait_rebalance(timeout_s)

    def _share_cores(self, wanted: int | None) -> None:
        """Set this process's torch threads: `wanted`, or the cores our actors on this node leave free."""
        import ray

        if wanted is None:
            here = ray.get_runtime_context().get_node_id()
            taken = sum(w.num_cpus for w, n in zip(self.plan.workers, self._fleet.nodes) if n.node_id == here)
            if not taken:
                return
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            wanted = min(torch.get_num_threads(), max(1, cores - math.ceil(taken)))
        if wanted != torch.get_num_threads():
            self._threads_before = torch.get_num_threads()
            torch.set_num_threads(wanted)
            log.info("coordinator torch threads %d -> %d (expert actors share this node's cores)",
                     self._threads_before, wanted)

    def close(self) -> None:
        """Kill the actors this backend created; shut Ray down only if this backend started it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        import ray

        if getattr(self, "_fleet", None) is not None:
            self._fleet.close()
        if getattr(self, "_transport", None) is not None:
            self._transport.close()
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)
        if self._started_ray and ray.is_initialized():
            ray.shutdown()

    def __enter__(self) -> "RemoteExperts":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def actors(self) -> list[Any]:
        """The actor handles, in plan order (actor i owns `plan.workers[i].experts`)."""
        return self._fleet.actors

    @property
    def nodes(self) -> list[dict[str, Any]]:
        """Where each actor runs now ({node_id, ip, pid, device, endpoint, generation, ...}), in plan order."""
        return [n.as_dict() for n in self._fleet.nodes]

    @property
    def fleet(self) -> Fleet:
        """The actors themselves: typed node view (`fleet.nodes`), probes (`fleet.lost_ips()`)."""
        return self._fleet

    def begin_request(self) -> None:
        """Start a new request (a `generate` or `forward`): resets the per-request retry budget."""
        self._dispatcher.begin_request()
        self._requests += 1

    # -- the routed-experts protocol ---------------------------------------------------------------
    def forward(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [T, H], weights [T, k], ids [T, k] -> [T, H] = sum over slots of weight * expert(x)."""
        return self.wait(self.submit(layer, x, weights, ids))

    def submit(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
               hints: dict[int, torch.Tensor] | None = None) -> Pending:
        """Send layer `layer`'s routed rows: one message per actor that owns an active expert, carrying
        that actor's share of `hints` (actors with hints but no rows get a one-way `prefetch` instead).
        Returns at once (after replacing, bounded by `restart_timeout_s`, an actor an earlier failure
        left broken)."""
        if self._closed:
            raise ClusterError("RemoteExperts is closed")
        if self._auto is not None and layer == self._first_layer:
            self._auto.tick()                    # one forward pass begins here
        if self._rebalancer.in_progress:
            self._rebalancer.poll()              # swaps the table here, between dispatches, once loaded
        shares = self._hint_shares(hints)
        pending = self._dispatcher.submit(layer, x, weights, ids, shares)
        sent = {c.actor for c in pending.calls}
        for a, share in shares.items():
            if a not in sent:
                for hinted_layer, experts in share:
                    self._send_hint(a, hinted_layer, experts)
        return pending

    def wait(self, pending: Pending) -> torch.Tensor:
        """Collect the replies of `submit` and combine: [T, H] (retries: cluster/dispatcher.py)."""
        return self._dispatcher.wait(pending)

    def run_raw(self, actor: int, msg: bytes, *, layer: int, rows: int, hidden: int) -> torch.Tensor:
        """Send one caller-made `run_layer` message to `actor` over the transport and return its `out`
        rows, with the same failure handling as a layer (retries included); for diagnostics and tests."""
        if self._closed:
            raise ClusterError("RemoteExperts is closed")
        return self._dispatcher.wait(self._dispatcher.send_raw(actor, msg, layer, rows, hidden))

    def _count(self, trace: LayerTrace) -> None:
        """The trace hook behind `stats()`."""
        for t in trace.actors:
            st = self._stats[t.actor]
            st.calls += 1
            st.rows += t.rows
            st.compute_s += t.compute_s
            st.stall_s += t.stall_s
            st.transit_s += t.transit_s
            st.calls_per_layer[trace.layer] += 1
        self._latency[trace.layer].append(trace.seconds)
        tot = self._layer_totals[trace.layer]
        tot[0] += 1
        tot[1] += trace.seconds
        tot[2] = max(tot[2], trace.seconds)
        per_actor: dict[int, int] = defaultdict(int)
        for t in trace.actors:
            per_actor[t.actor] += 1
        self._max_calls_per_actor[trace.layer] = max([self._max_calls_per_actor[trace.layer], *per_actor.values()])

    def prefetch(self, layer: int, ids: torch.Tensor) -> None:
        """One-way hint to the owning actors; never waited on. Unknown experts are ignored."""
        if self._closed:
            return
        for a, share in self._hint_shares({layer: ids}).items():
            for hinted_layer, experts in share:
                self._send_hint(a, hinted_layer, experts)

    @property
    def wants_hints(self) -> bool:
        """False once every actor said (in its last reply) that all its experts are resident for good."""
        return not all(self._dispatcher.all_resident)

    def resident(self, layer: int) -> frozenset[int]:
        """Experts of `layer` resident on their owners as of each owner's latest reply (its residency
        report, asked for with `report_residency`; all it owns once it said `all_resident`, or where its
        budget holds all it owns, as `LocalExperts.resident`). An actor's reads and evictions since that
        reply are not seen: cache-aware routing's "known at routing time"."""
        out: set[int] = set()
        d = self._dispatcher
        for expert, a in self._owner.get(layer, {}).items():
            if self.plan.workers[a].paged_bytes == 0 or d.all_resident[a] or expert in d.resident[a].get(layer, ()):
                out.add(expert)
        return frozenset(out)

    def _hint_shares(self, hints: dict[int, torch.Tensor] | None) -> dict[int, list[tuple[int, list[int]]]]:
        """{layer: ids} -> {actor: [(layer, [its experts])]}, for actors that can still use a hint."""
        shares: dict[int, list[tuple[int, list[int]]]] = defaultdict(list)
        resident = self._dispatcher.all_resident
        for layer, experts in hint_lists(hints):
            owners = self._owner.get(layer, {})
            per: dict[int, list[int]] = defaultdict(list)
            for e in experts:
                if (a := owners.get(e)) is not None and not resident[a]:
                    per[a].append(e)
            for a, mine in per.items():
                shares[a].append((layer, mine))
        return shares

    def _send_hint(self, a: int, layer: int, experts: list[int]) -> None:
        if self._fleet.broken(a) is not None:   # replaced at its next call; a hint can wait
            return
        self._fleet.handle(a).prefetch.remote(layer, experts)  # ref dropped on purpose: fire and forget
        self._hint_calls += 1

    # -- reporting ---------------------------------------------------------------------------------
    def reports(self, timeout_s: float | None = None) -> list[dict]:
        """Each actor's raw `ExpertShard.report()`, in actor order."""
        import ray

        refs = [a.report.remote() for a in self._fleet.actors]
        out = []
        for i, r in enumerate(refs):
            try:
                out.append(ray.get(r, timeout=timeout_s or self.call_timeout_s))
            except ray.exceptions.GetTimeoutError:
                raise ExpertTimeout(f"{self._fleet.where(i)} did not report within {timeout_s or self.call_timeout_s:g}s")
            except ray.exceptions.RayActorError as e:
                raise ShardUnavailable(f"{self._fleet.where(i)} is gone ({root_message(e)})") from e
        return out

    def drop_resident(self, timeout_s: float | None = None) -> dict:
        """Every actor forgets its resident experts (`ExpertShard.drop_resident`); summed over actors."""
        import ray

        timeout_s = timeout_s or self.call_timeout_s
        refs = [a.drop_resident.remote() for a in self._fleet.actors]
        out = {"experts": 0, "bytes": 0}
        for i, r in enumerate(refs):
            try:
                got = ray.get(r, timeout=timeout_s)
            except ray.exceptions.GetTimeoutError:
                raise ExpertTimeout(f"{self._fleet.where(i)} did not drop its experts within {timeout_s:g}s")
            except ray.exceptions.RayActorError as e:
                raise ShardUnavailable(f"{self._fleet.where(i)} is gone ({root_message(e)})") from e
            self._dispatcher.all_resident[i] = False
            self._dispatcher.resident[i] = {}
            out = {k: out[k] + got[k] for k in out}
        return out

    def stats(self) -> dict[str, Any]:
        """`coordinator.experts.backend_stats` shape: totals over actors, then per actor where it runs,
        what it owns and holds (its `report()` counters: cache hits, reads, prefetch...), and the
        dispatch-side figures: calls, rows, actor compute seconds vs transit seconds (round trip
        minus compute), calls per layer. `layers` gives each layer's dispatch latency (mean/p50/max)
        and the most calls any actor got in one dispatch (1 by construction)."""
        reports = self._reports_tolerant() if not self._closed else [{} for _ in self.plan.workers]
        actors = []
        for i, (w, st, rep) in enumerate(zip(self.plan.workers, self._stats, reports)):
            n = self._fleet.node(i)
            rep = {k: v for k, v in rep.items() if k not in ("owned", "loaded_tensors", "per_layer")}
            actors.append({
                **rep, "index": i, "node_id": n.node_id, "ip": n.ip, "pid": n.pid, "device": n.device,
                "experts": len(w.experts), "expert_bytes": w.expert_bytes, "calls": st.calls, "rows": st.rows,
                "compute_s": st.compute_s, "stall_s": st.stall_s, "transit_s": st.transit_s,
                "calls_per_layer": dict(st.calls_per_layer), "all_resident": self._dispatcher.all_resident[i],
                **self._fleet.records[i].as_dict(),
            })
        layers = {}
        for layer, lat in sorted(self._latency.items()):
            count, total, worst = self._layer_totals[layer]
            layers[layer] = {"dispatches": int(count), "latency_mean_s": total / count,
                             "latency_p50_s": statistics.median(lat), "latency_max_s": worst,
                             "max_calls_per_actor": self._max_calls_per_actor[layer]}
        rec = self._fleet.records
        return backend_stats("ray", actors, budget_bytes=self.plan.worker_memory,
                             transit_s=sum(st.transit_s for st in self._stats),
                             hint_calls=self._hint_calls, layers=layers,
                             transport=self._transport.name, **self._transport.stats(),
                             failures=sum(r.failures for r in rec), restarts=sum(r.restarts for r in rec),
                             retries=sum(r.retries for r in rec), recovery_s=sum(r.recovery_s for r in rec),
                             retry_budget={"max_call_retries": self.recovery.max_call_retries,
                                           "max_generation_retries": self.recovery.max_generation_retries,
                                           "used_this_request": self._dispatcher.request_retries},
                             recovery_events=[dict(e) for e in self._fleet.log.events],
                             rebalance=dataclasses.asdict(self._rebalancer.stats))

    def _reports_tolerant(self) -> list[dict]:
        """`reports()`, but a dead, hung or broken actor gives {} instead of failing the whole call."""
        import ray

        timeout = min(self.call_timeout_s, 10.0)
        refs = [None if self._fleet.broken(i) else a.report.remote() for i, a in enumerate(self._fleet.actors)]
        live = [r for r in refs if r is not None]
        if live:
            ray.wait(live, num_returns=len(live), timeout=timeout)
        out = []
        for i, r in enumerate(refs):
            try:
                out.append({} if r is None else ray.get(r, timeout=0.01))
            except Exception as e:  # not ready, or gone
                log.warning("stats without the report of %s: %s", self._fleet.where(i), type(e).__name__)
                out.append({})
        return out
