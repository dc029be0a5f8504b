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

Recovery (cluster/recovery.py): a call whose actor died, hung past `call_timeout_s` or
became unreachable is retried. The actor is killed (no restart) and replaced by a new
one with the same experts (they reload lazily from the checkpoint files), re-placed on
a surviving node if its own node is gone, and the call's kept message is resent byte
for byte. `run_layer` is a pure function of that message, so a retry cannot
double-apply anything and the result is bit-identical. Retries are bounded per call
and per request; an actor that could not be recovered is replaced at its next call.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import statistics
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from coordinator.experts import ExpertBatch, backend_stats, hint_lists
from coordinator.options import (PlacementOptions, RecoveryOptions, RunOptions, StoreOptions, TransportOptions,
                                 UnknownOption)
from workers import wire
from workers.errors import MoeshardError
from workers.dtypes import compute_dtype
from workers.spec import ExpertSpec

from . import recovery
from .actor import ShardActor
from .connect import check_capacity, connect_ray
from .errors import ClusterError, ExpertTimeout, ShardUnavailable
from .graph import LayerGraph, is_channel_failure
from .placement import plan_placement
from .recovery import ActorRecovery, RecoveryLog

log = logging.getLogger(__name__)

LATENCY_WINDOW = 4096      # per-layer dispatch latencies kept for the median


# ---- the backend ---------------------------------------------------------------------------------

@dataclass
class _Call:
    """One run_layer call in flight to one actor. `msg` is kept so a retry resends the same bytes."""

    actor: int
    ref: Any                   # ray.ObjectRef of the reply bytes
    idx: torch.Tensor          # [n] positions of this actor's rows in the grouped buffer
    t_sent: float
    msg: bytes = b""
    incarnation: int = 0       # which incarnation of the actor the call went to
    attempt: int = 0           # retries so far
    t_failed: float | None = None      # when the first failure of this call was detected
    failed_nodes: list[str] = field(default_factory=list)   # nodes of the incarnations it failed on
    graph: bool = False        # sent through the compiled graph (ref is a CompiledDAGRef)


class _GraphDown(ShardUnavailable):
    """The compiled graph's channel failed (often because another of its actors died)."""


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


@dataclass
class _Failure:
    """A call failed in a way a replacement actor can fix: kind "died" (dead or unreachable) or "timeout"."""

    error: ShardUnavailable
    kind: str


class RemoteExperts:
    """Routed experts spread over `num_workers` Ray actors (see module docstring).

    Options are typed (coordinator/options.py): where actors go (`PlacementOptions`), each actor's
    memory (`StoreOptions`), the transport and its timeout (`TransportOptions`) and how hard recovery
    tries (`RecoveryOptions`); `build()` takes them as the API's flat keywords.

    `transport`: "calls" (default) sends each layer as plain actor calls, one per actor with rows;
    "graph" through one Ray Compiled Graph over all actors (`cluster/graph.py`): 1.0 ms per layer
    against 2.4 ms (scenario 4), but each actor keeps a thread spinning on the graph's channel, which
    takes a core: a loss where that core is needed for compute and paging (2 one-CPU hosts: 1.61 vs
    4.39 tok/s) and a wash next to the coordinator on one 2-core host (docs/performance.md). Use it
    where every actor has a core to spare. A layer that meets a failure finishes with plain calls and
    the graph is rebuilt afterwards; after `graph_idle_s` without a layer it is released
    (`release_graph`), so idle actors stop spinning, and the next layer builds it again (~0.2 s).

    `coordinator_threads`: torch threads for this (the coordinator's) process while the backend is
    open; None sizes them to the cores that actors placed on this node leave free (fewer only,
    never more; unchanged when no actor is here), restored at `close()`. Threads that spin on cores
    the actors need cost more than they compute (docs/performance.md).
    """

    def __init__(self, specs: Sequence[ExpertSpec], *, dtype: str, placement: PlacementOptions,
                 store: StoreOptions = StoreOptions(), transport: TransportOptions = TransportOptions(),
                 recovery: RecoveryOptions = RecoveryOptions(), min_resident: int = 1,
                 pinned: Sequence[tuple[int, int]] = (), coordinator_threads: int | None = None,
                 load: dict[tuple[int, int], float] | None = None):
        import ray

        self.dtype = compute_dtype(dtype)
        num_workers = placement.num_workers
        self.transport = transport.transport
        self.call_timeout_s = transport.call_timeout_s
        self.recovery = recovery
        worker_memory, spill_dir = store.budget_bytes, store.spill_dir
        self.plan = plan_placement(list(specs), num_workers, dtype_bytes=self.dtype.itemsize,
                                   worker_memory=worker_memory, min_resident=min_resident, load=load, pinned=pinned,
                                   num_cpus=placement.num_cpus, num_gpus=placement.num_gpus,
                                   resources=None if placement.resources is None else list(placement.resources))
        self._owner: dict[int, dict[int, int]] = defaultdict(dict)   # layer -> expert -> actor
        for (layer, expert), a in self.plan.owners().items():
            self._owner[layer][expert] = a
        self._actors: list[Any] = []
        self._nodes: list[dict[str, Any]] = []
        self._closed = False
        by_key = {s.key: s for s in specs}
        pinned_keys = set(map(tuple, pinned))
        # What each actor is created with, so a replacement is the same actor (plan order).
        self._init_args = [dict(specs=[by_key[k].to_dict() for k in w.experts], budget_bytes=worker_memory,
                                dtype=dtype, device="cuda" if w.num_gpus > 0 else None, policy=store.policy,
                                min_resident=min_resident, num_threads=max(1, int(w.num_cpus)),
                                pinned=[k for k in w.experts if k in pinned_keys],
                                spill_dir=None if spill_dir is None else os.path.join(spill_dir, f"actor-{w.index}"))
                           for w in self.plan.workers]
        self._rec = [ActorRecovery() for _ in self.plan.workers]
        self._log = RecoveryLog()
        self._request_retries = 0
        self._requests = 0
        custom: dict[str, float] = defaultdict(float)
        for w in self.plan.workers:
            for k, v in w.resources.items():
                custom[k] += v
        self._started_ray = connect_ray(placement.ray_address, num_cpus=num_workers * placement.num_cpus,
                                        num_gpus=num_workers * placement.num_gpus, resources=dict(custom))
        try:
            check_capacity(self.plan)
            self._cls = ray.remote(ShardActor)
            for i in range(len(self.plan.workers)):
                self._actors.append(self._cls.options(**self._planned_options(i)).remote(**self._init_args[i]))
            self._nodes = self._wait_ready(placement.ready_timeout_s)
        except BaseException:
            self.close()
            raise
        self._stats = [_ActorStats() for _ in self._actors]
        self._latency: dict[int, deque] = defaultdict(lambda: deque(maxlen=LATENCY_WINDOW))
        self._layer_totals: dict[int, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])  # count, sum, max
        self._max_calls_per_actor: dict[int, int] = defaultdict(int)
        self._hint_calls = 0
        self._all_resident = [False] * len(self._actors)   # per actor, from its last reply
        self._threads_before: int | None = None
        self._share_cores(coordinator_threads)
        self._graph: LayerGraph | None = None
        self._teardown: threading.Thread | None = None
        self._graph_builds = self._graph_failures = 0
        self._graph_lock = threading.RLock()      # the idle watchdog and the layer path both change the graph
        self._in_layer = 0                        # layers submitted and not yet waited on
        self._last_layer = time.monotonic()
        self.graph_idle_s = transport.graph_idle_s
        self._idle_stop = threading.Event()
        self._watchdog: threading.Thread | None = None
        log.info("RemoteExperts: %d actors ready on %d node(s)", len(self._actors),
                 len({n["node_id"] for n in self._nodes}))

    # retry budgets are plain attributes of the policy; these make them settable on the backend too
    max_call_retries = property(lambda self: self.recovery.max_call_retries,
                                lambda self, v: self._set_recovery(max_call_retries=v))
    max_generation_retries = property(lambda self: self.recovery.max_generation_retries,
                                      lambda self, v: self._set_recovery(max_generation_retries=v))
    restart_timeout_s = property(lambda self: self.recovery.restart_timeout_s,
                                 lambda self, v: self._set_recovery(restart_timeout_s=v))

    def _set_recovery(self, **change: Any) -> None:
        self.recovery = dataclasses.replace(self.recovery, **change)   # checked again, like any RecoveryOptions

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

    def _planned_options(self, i: int) -> dict[str, Any]:
        w = self.plan.workers[i]
        opts: dict[str, Any] = dict(num_cpus=w.num_cpus, num_gpus=w.num_gpus, max_restarts=0)
        if w.resources:
            opts["resources"] = w.resources
        else:
            opts["scheduling_strategy"] = "SPREAD"
        return opts

    # -- lifecycle ---------------------------------------------------------------------------------
    def _share_cores(self, wanted: int | None) -> None:
        """Set this process's torch threads: `wanted`, or the cores our actors on this node leave free."""
        import ray

        if wanted is None:
            here = ray.get_runtime_context().get_node_id()
            taken = sum(w.num_cpus for w, n in zip(self.plan.workers, self._nodes) if n.get("node_id") == here)
            if not taken:
                return
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            wanted = min(torch.get_num_threads(), max(1, cores - math.ceil(taken)))
        if wanted != torch.get_num_threads():
            self._threads_before = torch.get_num_threads()
            torch.set_num_threads(wanted)
            log.info("coordinator torch threads %d -> %d (expert actors share this node's cores)",
                     self._threads_before, wanted)

    def _wait_ready(self, timeout_s: float) -> list[dict[str, Any]]:
        import ray

        from tqdm import tqdm

        refs = [a.node_info.remote() for a in self._actors]
        deadline = time.monotonic() + timeout_s
        pending = list(refs)
        # a bar on a terminal only (disable=None): starting actors takes seconds each
        with tqdm(total=len(refs), desc="starting expert actors", unit="actor", disable=None, leave=False) as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
                if not done:
                    break
                bar.update(len(done))
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

        if getattr(self, "_idle_stop", None) is not None:
            self._idle_stop.set()
        if getattr(self, "_graph", None) is not None:
            self._graph_down(None)
            self._teardown.join(5.0)    # quick with live actors; a hung one is killed next, which ends it
        for a in self._actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception as e:  # already dead, or Ray gone
                log.debug("killing actor: %s", e)
        if getattr(self, "_teardown", None) is not None:
            self._teardown.join(5.0)
        if getattr(self, "_threads_before", None) is not None:
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
        return list(self._actors)

    @property
    def nodes(self) -> list[dict[str, Any]]:
        """Where each actor runs now ({node_id, ip, pid, device, ...}), in plan order."""
        return [dict(n) for n in self._nodes]

    def _where(self, i: int) -> str:
        n = self._nodes[i] if i < len(self._nodes) else {}
        return f"actor {i} (node {(n.get('node_id') or '?')[:12]} at {n.get('ip', '?')})"

    def begin_request(self) -> None:
        """Start a new request (a `generate` or `forward`): resets the per-request retry budget."""
        self._request_retries = 0
        self._requests += 1

    # -- recovery ----------------------------------------------------------------------------------
    def _bad_nodes(self, i: int) -> set[str]:
        """{node id} of actor i's current node if that node is dead or its raylet unreachable, else {}."""
        import ray

        nid = self._nodes[i].get("node_id") if i < len(self._nodes) else None
        if not nid:
            return set()
        node = next((n for n in ray.nodes() if n["NodeID"] == nid), None)
        if node is None or not node["Alive"]:
            return {nid}
        return set() if recovery.node_reachable(node["NodeManagerAddress"], node["NodeManagerPort"]) else {nid}

    def _placement(self, i: int, dead: set[str], suspect: set[str] = frozenset()) -> tuple[dict[str, Any], bool]:
        """Actor options for a replacement of actor i, and whether it is a takeover (placed away from
        where the plan put it, so it must fit its budget to the memory it finds there).

        Nothing to avoid: as planned (same pin, or SPREAD). Otherwise `dead` nodes are never used and
        `suspect` ones (where this call already failed) only if nothing else can host the actor. The
        planned pin is kept if an acceptable live node offers it; else it is dropped and the replacement
        goes to the best acceptable node (free resources first, then fewest of our actors)."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if not dead and not suspect:
            return self._planned_options(i), False
        w = self.plan.workers[i]
        need = {"CPU": w.num_cpus, "GPU": w.num_gpus}
        live = [n for n in ray.nodes() if n["Alive"] and n["NodeID"] not in dead]
        base = dict(num_cpus=w.num_cpus, num_gpus=w.num_gpus, max_restarts=0)
        try:
            from .ray_internal import available_resources_per_node
            free = available_resources_per_node()
        except Exception:  # developer API: placement still works on totals
            free = {}
        ours: dict[str, int] = defaultdict(int)
        for j, n in enumerate(self._nodes):
            if j != i and self._rec[j].broken is None:
                ours[n.get("node_id")] += 1
        preferred = [n for n in live if n["NodeID"] not in suspect]
        for pool in (preferred, live):
            if pool is live and not dead:
                # only nodes this call already failed on are left, and they are up: retry as planned
                return self._planned_options(i), False
            if w.resources and any(recovery.fits(n.get("Resources"), {**need, **w.resources}) for n in pool):
                return {**base, "resources": w.resources}, True
            node = recovery.pick_node(pool, need, free, ours)
            if node is not None:
                return {**base, "scheduling_strategy": NodeAffinitySchedulingStrategy(
                    node["NodeID"], soft=True, _spill_on_unavailable=True)}, True
        raise ShardUnavailable(
            f"no surviving node can host a replacement for actor {i} (needs {w.num_cpus:g} CPU, "
            f"{w.num_gpus:g} GPU; dead or unreachable nodes: {sorted(x[:12] for x in dead)}; live nodes: "
            f"{[(n['NodeManagerAddress'], n.get('Resources', {}).get('CPU', 0)) for n in live]})")

    def _replace(self, i: int, dead: set[str], why: str, suspect: set[str] = frozenset()) -> None:
        """Kill actor i (no restart) and start a new one with the same experts; bounded by
        `restart_timeout_s`. Raises ShardUnavailable if the replacement is not ready in time."""
        import ray

        t0 = time.perf_counter()
        rec = self._rec[i]
        old_node = dict(self._nodes[i]) if i < len(self._nodes) else {}
        self._kill_quietly(i)              # a hung actor must not come back; frees its resources
        rec.broken = rec.broken or why
        t_kill = time.perf_counter()
        opts, takeover = self._placement(i, dead, suspect)
        t_place = time.perf_counter()
        kwargs = dict(self._init_args[i])
        if takeover:
            held: dict[str, int] = defaultdict(int)     # expert bytes our other actors hold, per node
            for j, n in enumerate(self._nodes):
                if j != i and self._rec[j].broken is None:
                    own, budget = self.plan.workers[j].expert_bytes, n.get("budget_bytes")
                    held[n.get("node_id")] += own if budget is None else min(own, int(budget))
            kwargs["takeover"] = {"memory": self.recovery.takeover_memory, "share": self.recovery.takeover_share,
                                  "held": dict(held)}
        handle = self._cls.options(**opts).remote(**kwargs)
        ref = handle.node_info.remote()
        ready, _ = ray.wait([ref], timeout=self.recovery.restart_timeout_s)
        err: str | None = None
        if not ready:
            asked = {"CPU": opts.get("num_cpus"), "GPU": opts.get("num_gpus"), **opts.get("resources", {})}
            err = (f"the replacement was not ready within restart_timeout_s={self.recovery.restart_timeout_s:g}s "
                   f"(is any node able to give it {asked}?)")
        else:
            try:
                info = ray.get(ref, timeout=self.recovery.restart_timeout_s)
            except ray.exceptions.RayError as e:
                err = f"the replacement failed to start: {_root_message(e)}"
        if err is not None:
            try:
                ray.kill(handle, no_restart=True)
            except Exception:
                pass
            self._log.add(kind="restart_failed", actor=i, seconds=time.perf_counter() - t0, error=err)
            raise ShardUnavailable(f"{self._where(i)}: {err}")
        self._actors[i] = handle
        self._nodes[i] = info
        self._all_resident[i] = False         # a new actor starts empty
        rec.incarnation += 1
        rec.restarts += 1
        rec.broken = None
        rec.takeover = info.get("takeover")
        dt = time.perf_counter() - t0
        self._log.add(kind="restart", actor=i, seconds=dt, why=why, incarnation=rec.incarnation,
                      kill_s=t_kill - t0, placement_s=t_place - t_kill, start_s=time.perf_counter() - t_place,
                      from_node=old_node.get("node_id"), from_ip=old_node.get("ip"), to_node=info["node_id"],
                      to_ip=info["ip"], pid=info["pid"], budget_bytes=info.get("budget_bytes"),
                      takeover=rec.takeover)
        log.warning("expert actor %d replaced in %.2fs (%s): now pid %s on %s%s", i, dt, why, info["pid"], info["ip"],
                    f", paged takeover budget {info.get('budget_bytes')}" if (rec.takeover or {}).get("paged") else "")

    def _ensure_live(self, i: int, layer: int) -> None:
        """Replace actor i now if an earlier failure left it marked broken (lazy, at its next call)."""
        rec = self._rec[i]
        if rec.broken is None:
            return
        t0 = time.perf_counter()
        try:
            self._replace(i, self._bad_nodes(i), f"marked broken: {rec.broken}")
        except ShardUnavailable as e:
            raise ShardUnavailable(f"{self._where(i)}, layer {layer}: the actor is down ({rec.broken}) and could "
                                   f"not be replaced: {e}") from None
        rec.recovery_s += time.perf_counter() - t0

    def _retry(self, call: _Call, layer: int, failure: _Failure) -> _Call:
        """Replace the call's actor if nobody did since the call was sent, then resend the same bytes.

        Raises the failure (naming actor, node and layer) once a retry budget is spent."""
        a, rec, pol = call.actor, self._rec[call.actor], self.recovery
        now = time.perf_counter()
        call.t_failed = call.t_failed or now
        rec.failures += 1
        node = self._nodes[a].get("node_id") if a < len(self._nodes) else None
        self._log.add(kind=failure.kind, actor=a, layer=layer, node=node, ip=self._nodes[a].get("ip"),
                      attempt=call.attempt, error=str(failure.error)[:300])
        error = failure.error
        while True:
            if node and node not in call.failed_nodes:
                call.failed_nodes.append(node)
            spent = ("call" if call.attempt >= pol.max_call_retries else
                     "generation" if self._request_retries >= pol.max_generation_retries else None)
            if spent is not None:
                rec.broken = rec.broken or f"{failure.kind} in layer {layer}"
                if failure.kind == "timeout":       # do not leave a hung actor holding its resources
                    self._kill_quietly(a)
                limit = pol.max_call_retries if spent == "call" else pol.max_generation_retries
                cls = ExpertTimeout if isinstance(error, ExpertTimeout) else ShardUnavailable
                raise cls(f"{self._where(a)}, layer {layer}: gave up after {call.attempt} "
                          f"retr{'y' if call.attempt == 1 else 'ies'} of this call "
                          f"({self._request_retries} in this request; budget max_{spent}_retries={limit}); "
                          f"last error: {error}") from error
            call.attempt += 1
            self._request_retries += 1
            rec.retries += 1
            try:
                if rec.incarnation == call.incarnation or rec.broken is not None:
                    # never a dead/unreachable node; after a first retry also not the nodes this
                    # call already failed on, unless nothing else can host the actor
                    suspect = set(call.failed_nodes) if call.attempt > 1 else set()
                    self._replace(a, self._bad_nodes(a), f"{failure.kind} in layer {layer}", suspect)
                return self._resend(call)
            except ShardUnavailable as e:       # the replacement itself failed: that costs a retry too
                error = e
                node = self._nodes[a].get("node_id")

    def _resend(self, call: _Call) -> _Call:
        """The same message as a plain call to the actor's current incarnation (its failure record kept)."""
        a = call.actor
        return _Call(a, self._actors[a].run_layer.remote(call.msg), call.idx, time.perf_counter(), call.msg,
                     self._rec[a].incarnation, call.attempt, call.t_failed, call.failed_nodes)

    def _kill_quietly(self, i: int) -> None:
        """ray.kill actor i without restart; never raises (it may be dead already, or unreachable)."""
        import ray

        try:
            ray.kill(self._actors[i], no_restart=True)
        except Exception as e:
            log.debug("killing actor %d: %s", i, e)

    # -- the routed-experts protocol ---------------------------------------------------------------
    def forward(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [T, H], weights [T, k], ids [T, k] -> [T, H] = sum over slots of weight * expert(x)."""
        return self.wait(self.submit(layer, x, weights, ids))

    def submit(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
               hints: dict[int, torch.Tensor] | None = None) -> Pending:
        """Send layer `layer`'s routed rows: one call per actor that owns an active expert, carrying that
        actor's share of `hints` (actors with hints but no rows get a one-way `prefetch` instead).
        Returns at once (after replacing, bounded by `restart_timeout_s`, an actor an earlier failure
        left broken)."""
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
        graph = self._live_graph(layer)
        if graph is None:
            for a in sorted(per):
                self._ensure_live(a, layer)
        shares = self._hint_shares(hints)
        msgs: dict[int, bytes] = {}
        idxs: dict[int, torch.Tensor] = {}
        for a in (range(len(self._actors)) if graph is not None else sorted(per)):
            header: dict[str, Any] = {"op": "run_layer", "layer": layer, "experts": [], "counts": []}
            if a in per:
                experts, counts, spans = per[a]
                idxs[a] = spans[0] if len(spans) == 1 else torch.cat(spans)
                rows = x.index_select(0, batch.token_idx[idxs[a]])          # one gather per actor
                header.update(experts=experts, counts=counts)
            else:   # no rows (graph transport: every actor gets a message each layer)
                idxs[a] = torch.empty(0, dtype=torch.long)
                rows = x[:0]
            if a in shares:
                header["hints"] = shares[a]
            msgs[a] = wire.encode(header, {"rows": rows})
        if graph is not None:
            with self._graph_lock:
                refs = None
                if graph.alive:             # else released by the idle watchdog since _live_graph
                    try:
                        refs = graph.execute([msgs[a] for a in range(len(self._actors))])
                    except Exception as e:  # the channels failed before anything was sent: go by calls
                        self._graph_down(f"execute failed: {type(e).__name__}: {e}")
                if refs is not None:
                    self._in_layer += 1
                    t = time.perf_counter()
                    return Pending(layer, batch, x, [_Call(a, refs[a], idxs[a], t, msgs[a], self._rec[a].incarnation,
                                                           graph=True) for a in range(len(self._actors))], t0)
            # no actor to replace: a graph is built only while none is marked broken
        for a, share in shares.items():
            if a not in per:
                for hinted_layer, experts in share:
                    self._send_hint(a, hinted_layer, experts)
        calls = [_Call(a, self._actors[a].run_layer.remote(msgs[a]), idxs[a], time.perf_counter(), msgs[a],
                       self._rec[a].incarnation) for a in sorted(per)]
        return Pending(layer, batch, x, calls, t0)

    def wait(self, pending: Pending) -> torch.Tensor:
        """Collect the replies of `submit` and combine: [T, H]. Each call has `call_timeout_s` from its
        sending; a call that fails because its actor is dead, hung or unreachable is retried on a
        replacement (see `_retry`); any other failure (a bad message, a shard error) is raised once
        the layer's other replies are in."""
        import ray

        if pending.done:
            raise ValueError("this pending layer was already waited on")
        pending.done = True
        layer, batch = pending.layer, pending.batch
        y = torch.empty(len(batch.token_idx), pending.x.shape[1], dtype=self.dtype, device=pending.x.device)
        plain = [c for c in pending.calls if not c.graph]
        graph_calls = [c for c in pending.calls if c.graph]
        if graph_calls:
            try:
                plain += self._collect_graph(graph_calls, layer, y)
            finally:
                with self._graph_lock:
                    self._in_layer -= 1
                    self._last_layer = time.monotonic()
        by_ref = {c.ref: c for c in plain}
        while by_ref:
            now = time.perf_counter()
            soonest = min(c.t_sent for c in by_ref.values()) + self.call_timeout_s
            ready, _ = ray.wait(list(by_ref), num_returns=1, timeout=max(0.0, soonest - now))
            if not ready:
                now = time.perf_counter()
                for ref, call in list(by_ref.items()):
                    if call.t_sent + self.call_timeout_s <= now:
                        del by_ref[ref]
                        err = ExpertTimeout(f"no reply within {self.call_timeout_s:g}s from {self._where(call.actor)} "
                                            f"for layer {layer}")
                        new = self._retry(call, layer, _Failure(err, "timeout"))
                        by_ref[new.ref] = new
                continue
            call = by_ref.pop(ready[0])
            try:
                header, out = self._reply(call, layer, y.shape[1])
            except ShardUnavailable as e:
                new = self._retry(call, layer, _Failure(e, "timeout" if isinstance(e, ExpertTimeout) else "died"))
                by_ref[new.ref] = new
                continue
            self._accept(call, layer, header, out, y)
        result = batch.combine(y)
        self._record_layer(layer, pending, time.perf_counter() - pending.t0)
        return result

    def _collect_graph(self, calls: list[_Call], layer: int, y: torch.Tensor) -> list[_Call]:
        """Get every reply of one compiled-graph fan-out; return the plain calls that replace failed ones.

        A shard error is raised once all replies are in (the graph stays usable). A dead, hung or
        cut-off actor takes the graph down: hung ones are killed first (teardown waits for every
        actor), then its call is retried on a replacement (`_retry`), and the calls that lost their
        reply only because the graph went down are resent, as they were, as plain calls."""
        failed: list[tuple[_Call, ShardUnavailable]] = []
        shard_error: BaseException | None = None
        for call in calls:
            try:
                header, out = self._reply(call, layer, y.shape[1])
            except ShardUnavailable as e:
                failed.append((call, e))
                continue
            except MoeshardError as e:
                shard_error = shard_error or e
                continue
            self._accept(call, layer, header, out, y)
        if failed:
            # A fan-out's replies are read together: one dead or hung actor fails or stalls them all,
            # with the same error. The ones that still answer a ping only lost their reply.
            hung = self._unresponsive([c.actor for c, _ in failed])
            for i, (call, e) in enumerate(failed):
                if call.actor in hung:
                    self._kill_quietly(call.actor)      # a hung one must go, or the teardown waits for it
                    if isinstance(e, _GraphDown):       # its own reply only said the channel failed
                        failed[i] = (call, ShardUnavailable(f"{self._where(call.actor)}, layer {layer}: no answer to "
                                                            f"a ping after the compiled graph failed ({e})"))
                elif not isinstance(e, _GraphDown):
                    failed[i] = (call, _GraphDown(f"{self._where(call.actor)}, layer {layer}: reply lost with the "
                                                  f"compiled graph ({type(e).__name__})"))
            self._graph_down(f"layer {layer}: {next((e for c, e in failed if c.actor in hung), failed[0][1])}")
        if shard_error is not None:
            raise shard_error
        plain = []
        for call, e in failed:
            if isinstance(e, _GraphDown):
                if len(call.idx):   # an actor with no rows only lost its hints
                    plain.append(self._resend(call))
            else:
                plain.append(self._retry(call, layer, _Failure(e, "timeout" if isinstance(e, ExpertTimeout)
                                                               else "died")))
        return plain

    def _accept(self, call: _Call, layer: int, header: dict, out: torch.Tensor, y: torch.Tensor) -> None:
        """Put one reply's rows in place and count it."""
        arrived = time.perf_counter()
        self._all_resident[call.actor] = bool(header.get("all_resident", False))
        if not len(call.idx):       # a graph message without rows: nothing to place or count
            return
        y.index_copy_(0, call.idx, out.to(y.device))
        st = self._stats[call.actor]
        st.calls += 1
        st.rows += len(call.idx)
        st.compute_s += float(header.get("compute_s", 0.0))
        st.stall_s += float(header.get("stall_s", 0.0))
        st.transit_s += max(0.0, arrived - call.t_sent - float(header.get("compute_s", 0.0)))
        st.calls_per_layer[layer] += 1
        if call.t_failed is not None:
            took = time.perf_counter() - call.t_failed
            self._rec[call.actor].recovery_s += took
            self._log.add(kind="recovered", actor=call.actor, layer=layer, seconds=took, retries=call.attempt)

    # -- the compiled graph ------------------------------------------------------------------------
    def _live_graph(self, layer: int) -> LayerGraph | None:
        """The compiled graph, built now if it may be: transport allows it, no actor awaits replacement.

        A build that fails because an actor died since the last layer (nobody has called it since)
        marks that actor broken, like a failed call would, and this layer goes by plain calls, which
        replace it; a build that fails with every actor answering is a real error."""
        if self.transport != "graph":
            return None
        with self._graph_lock:
            self._last_layer = time.monotonic()
            if self._graph is not None and self._graph.alive:
                return self._graph
            if any(r.broken is not None for r in self._rec) or (self._teardown and self._teardown.is_alive()):
                return None         # plain calls until the replacement / the old graph's teardown is done
            try:
                self._graph = LayerGraph(self._actors, submit_timeout_s=self.call_timeout_s)
            except Exception as e:
                lost = self._unresponsive(list(range(len(self._actors))))
                if not lost:
                    raise ClusterError(f"cannot compile the expert fan-out as a Ray Compiled Graph: "
                                       f"{type(e).__name__}: {e} (transport='calls' works without one)") from e
                for a in sorted(lost):
                    rec = self._rec[a]
                    rec.failures += 1
                    rec.broken = rec.broken or f"died before layer {layer}"
                    self._log.add(kind="died", actor=a, layer=layer, node=self._nodes[a].get("node_id"),
                                  ip=self._nodes[a].get("ip"), attempt=0,
                                  error=f"no answer while the compiled graph was built: {type(e).__name__}")
                log.warning("compiled graph not built for layer %d: actors %s are gone; plain calls replace them",
                            layer, sorted(lost))
                return None
            self._graph_builds += 1
            if self._watchdog is None and self.graph_idle_s > 0:
                self._watchdog = threading.Thread(target=self._release_when_idle, name="moeshard-graph-idle",
                                                  daemon=True)
                self._watchdog.start()
            return self._graph

    def release_graph(self) -> None:
        """Stop the compiled graph's loops on the actors now (they spin while they wait for a layer);
        the next layer builds it again. Safe to call at any time between layers."""
        with self._graph_lock:
            if self._in_layer == 0:
                self._graph_down(None)

    def _release_when_idle(self) -> None:
        while not self._idle_stop.wait(min(1.0, self.graph_idle_s)):
            with self._graph_lock:
                idle = self._in_layer == 0 and time.monotonic() - self._last_layer > self.graph_idle_s
                if idle and self._graph is not None:
                    log.info("releasing the compiled graph after %.0fs without a layer", self.graph_idle_s)
                    self._graph_down(None)

    def _graph_down(self, why: str | None) -> None:
        """Drop the graph after a failure. Its teardown runs in the background (it waits for every actor's
        loop, up to Ray's `teardown_timeout`, e.g. on an unreachable node); a new graph is built at the first
        healthy layer after it has finished."""
        with self._graph_lock:
            if self._graph is None:
                return
            graph, self._graph = self._graph, None
            graph.alive = False      # a layer about to use it goes by calls instead
            self._teardown = threading.Thread(target=graph.teardown, name="moeshard-graph-teardown", daemon=True)
            self._teardown.start()
            if why is not None:      # None: released or closing, not a failure
                self._graph_failures += 1
                log.warning("compiled graph dropped (%s); finishing with plain calls", why[:200])

    def _unresponsive(self, actors: list[int]) -> set[int]:
        """Those of `actors` that do not answer a ping on their main thread within a few seconds."""
        import ray

        refs = {self._actors[a].ping.remote(): a for a in actors}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=max(1.0, min(5.0, self.call_timeout_s)))
        answered = set()
        for r in ready:
            try:
                ray.get(r, timeout=0)
                answered.add(refs[r])
            except Exception:   # dead
                pass
        return set(actors) - answered

    def _reply(self, call: _Call, layer: int, hidden: int) -> tuple[dict, torch.Tensor]:
        """ray.get one reply and decode it, translating every failure into a moeshard error."""
        import ray

        where = f"{self._where(call.actor)}, layer {layer}"
        timeout = max(0.0, call.t_sent + self.call_timeout_s - time.perf_counter()) if call.graph \
            else self.call_timeout_s
        try:
            reply = ray.get(call.ref, timeout=timeout)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayChannelTimeoutError):
            raise ExpertTimeout(f"no reply within {self.call_timeout_s:g}s from {where}") from None
        except ray.exceptions.RayActorError as e:
            raise ShardUnavailable(f"{where}: the actor is gone ({_root_message(e)})") from e
        except ray.exceptions.RayTaskError as e:
            cause = e.cause
            if isinstance(cause, MoeshardError):
                raise type(cause)(f"{where}: {cause}") from e
            raise ClusterError(f"{where}: {type(cause).__name__}: {cause}") from e
        except ray.exceptions.RayError as e:
            if call.graph and is_channel_failure(e):
                raise _GraphDown(f"{where}: compiled graph failed: {type(e).__name__}: {e}") from e
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
        for a, share in self._hint_shares({layer: ids}).items():
            for hinted_layer, experts in share:
                self._send_hint(a, hinted_layer, experts)

    @property
    def wants_hints(self) -> bool:
        """False once every actor said (in its last reply) that all its experts are resident for good."""
        return not all(self._all_resident)

    def _hint_shares(self, hints: dict[int, torch.Tensor] | None) -> dict[int, list[tuple[int, list[int]]]]:
        """{layer: ids} -> {actor: [(layer, [its experts])]}, for actors that can still use a hint."""
        shares: dict[int, list[tuple[int, list[int]]]] = defaultdict(list)
        for layer, experts in hint_lists(hints):
            owners = self._owner.get(layer, {})
            per: dict[int, list[int]] = defaultdict(list)
            for e in experts:
                if (a := owners.get(e)) is not None and not self._all_resident[a]:
                    per[a].append(e)
            for a, mine in per.items():
                shares[a].append((layer, mine))
        return shares

    def _send_hint(self, a: int, layer: int, experts: list[int]) -> None:
        if self._rec[a].broken is not None:   # replaced at its next call; a hint can wait
            return
        self._actors[a].prefetch.remote(layer, experts)  # ref dropped on purpose: fire and forget
        self._hint_calls += 1

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
        reports = self._reports_tolerant() if not self._closed else [{} for _ in self._actors]
        actors = []
        for i, (w, st, rep) in enumerate(zip(self.plan.workers, self._stats, reports)):
            n = self._nodes[i]
            rep = {k: v for k, v in rep.items() if k not in ("owned", "loaded_tensors", "per_layer")}
            actors.append({
                **rep, "index": i, "node_id": n["node_id"], "ip": n["ip"], "pid": n["pid"], "device": n["device"],
                "experts": len(w.experts), "expert_bytes": w.expert_bytes, "calls": st.calls, "rows": st.rows,
                "compute_s": st.compute_s, "stall_s": st.stall_s, "transit_s": st.transit_s,
                "calls_per_layer": dict(st.calls_per_layer), "all_resident": self._all_resident[i],
                **self._rec[i].as_dict(),
            })
        layers = {}
        for layer, lat in sorted(self._latency.items()):
            count, total, worst = self._layer_totals[layer]
            layers[layer] = {"dispatches": int(count), "latency_mean_s": total / count,
                             "latency_p50_s": statistics.median(lat), "latency_max_s": worst,
                             "max_calls_per_actor": self._max_calls_per_actor[layer]}
        rec = self._rec
        return backend_stats("ray", actors, budget_bytes=self.plan.worker_memory,
                             transit_s=sum(st.transit_s for st in self._stats),
                             hint_calls=self._hint_calls, layers=layers,
                             transport="graph" if self._graph is not None else "calls",
                             transport_setting=self.transport,
                             graph_builds=self._graph_builds, graph_failures=self._graph_failures,
                             failures=sum(r.failures for r in rec), restarts=sum(r.restarts for r in rec),
                             retries=sum(r.retries for r in rec), recovery_s=sum(r.recovery_s for r in rec),
                             retry_budget={"max_call_retries": self.recovery.max_call_retries,
                                           "max_generation_retries": self.recovery.max_generation_retries,
                                           "used_this_request": self._request_retries},
                             recovery_events=[dict(e) for e in self._log.events])

    def _reports_tolerant(self) -> list[dict]:
        """`reports()`, but a dead, hung or broken actor gives {} instead of failing the whole call."""
        import ray

        timeout = min(self.call_timeout_s, 10.0)
        refs = [None if self._rec[i].broken else a.report.remote() for i, a in enumerate(self._actors)]
        live = [r for r in refs if r is not None]
        if live:
            ray.wait(live, num_returns=len(live), timeout=timeout)
        out = []
        for i, r in enumerate(refs):
            try:
                out.append({} if r is None else ray.get(r, timeout=0.01))
            except Exception as e:  # not ready, or gone
                log.warning("stats without the report of %s: %s", self._where(i), type(e).__name__)
                out.append({})
        return out


def _root_message(e: BaseException) -> str:
    """The useful line(s) of a Ray actor error: the creation-task error when there is one."""
    msg = str(e).strip()
    return msg.splitlines()[-1] if msg else type(e).__name__
