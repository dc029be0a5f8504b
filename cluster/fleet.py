"""The fleet: the expert actors themselves. Start them, replace one, probe them, and say where each runs.

`Fleet` owns the actor handles (slot i owns `plan.workers[i].experts`), what each is created with,
its recovery record (cluster/recovery.py's `ActorRecovery`) and the typed view of where it runs
(`ActorNode`). It knows nothing about layers or messages: the dispatcher (cluster/dispatcher.py)
decides when an actor must be replaced, the fleet does it; `on_start(i, handle, node)` is called
for every actor that becomes ready (at start and after each replacement), which is where the
backend attaches the transport's channel.
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

from coordinator.options import RecoveryOptions

from . import nodes, recovery
from .actor import CONCURRENCY_GROUPS, ShardActor
from .errors import ClusterError, ShardUnavailable
from .placement import Plan
from .recovery import ActorRecovery, RecoveryLog
from .transports import root_message

log = logging.getLogger(__name__)

#: how long a liveness probe (`unresponsive`, `lost_ips`) waits for answers at most
PROBE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class ActorNode:
    """Where one actor incarnation runs, as it reported itself (`ShardActor.node_info`)."""

    node_id: str
    ip: str
    pid: int
    device: str
    budget_bytes: int | None = None
    takeover: dict | None = None
    endpoint: str | None = None        # its direct channel, if it serves one (TCP on the node's IP)
    local_endpoint: str | None = None  # the same channel for a peer on the same node (IPC)
    generation: int | None = None

    @classmethod
    def from_info(cls, info: dict[str, Any]) -> "ActorNode":
        return cls(**{k: info.get(k) for k in cls.__dataclass_fields__})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Fleet:
    """The actors of one plan (see module doc). `init_args[i]` are actor i's creation arguments;
    `actor_kwargs(i, generation)` adds the transport's (its channel config)."""

    def __init__(self, plan: Plan, init_args: Sequence[dict[str, Any]], *, recovery_options: RecoveryOptions,
                 actor_kwargs: Callable[[int, int], dict[str, Any]],
                 on_start: Callable[[int, Any, ActorNode], None]):
        import ray

        self.plan = plan
        self.recovery = recovery_options
        self._init_args = list(init_args)
        self._actor_kwargs = actor_kwargs
        self._on_start = on_start
        self._cls = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(ShardActor)
        self._actors: list[Any] = []
        self._nodes: list[ActorNode | None] = [None] * len(plan.workers)
        self.records = [ActorRecovery() for _ in plan.workers]
        self.log = RecoveryLog()

    # -- views -------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._actors)

    @property
    def actors(self) -> list[Any]:
        return list(self._actors)

    def handle(self, i: int) -> Any:
        return self._actors[i]

    @property
    def nodes(self) -> list[ActorNode]:
        """Where each actor runs now, in plan order."""
        return [n for n in self._nodes if n is not None]

    def node(self, i: int) -> ActorNode | None:
        return self._nodes[i] if i < len(self._nodes) else None

    def where(self, i: int) -> str:
        n = self.node(i)
        return f"actor {i} (node {((n and n.node_id) or '?')[:12]} at {(n and n.ip) or '?'})"

    def broken(self, i: int) -> str | None:
        return self.records[i].broken

    def mark_broken(self, i: int, why: str) -> None:
        self.records[i].broken = self.records[i].broken or why

    # -- start -------------------------------------------------------------------------------------
    def planned_options(self, i: int) -> dict[str, Any]:
        w = self.plan.workers[i]
        opts: dict[str, Any] = dict(num_cpus=w.num_cpus, num_gpus=w.num_gpus, max_restarts=0)
        if w.resources:
            opts["resources"] = w.resources
        else:
            opts["scheduling_strategy"] = "SPREAD"
        return opts

    def start(self, ready_timeout_s: float) -> None:
        """Create every planned actor and wait (bounded) until all are ready."""
        for i in range(len(self.plan.workers)):
            kw = {**self._init_args[i], **self._actor_kwargs(i, 0)}
            self._actors.append(self._cls.options(**self.planned_options(i)).remote(**kw))
        for i, info in enumerate(self._wait_ready(ready_timeout_s)):
            self._nodes[i] = ActorNode.from_info(info)
            self._on_start(i, self._actors[i], self._nodes[i])

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
        infos = []
        for i, r in enumerate(refs):
            try:
                infos.append(ray.get(r))
            except ray.exceptions.RayActorError as e:
                raise ShardUnavailable(f"expert actor {i} failed to start: {root_message(e)}") from e
        return infos

    # -- probes ------------------------------------------------------------------------------------
    def bad_nodes(self, i: int) -> set[str]:
        """{node id} of actor i's current node if that node is dead or its raylet unreachable, else {}."""
        n = self.node(i)
        if n is None or not n.node_id:
            return set()
        node = nodes.find_node(n.node_id)
        if node is None or not node.alive:
            return {n.node_id}
        return set() if recovery.node_reachable(node.ip, node.port) else {n.node_id}

    def unresponsive(self, actors: Sequence[int], timeout_s: float = PROBE_TIMEOUT_S) -> set[int]:
        """Those of `actors` that do not answer a ping on their main thread within `timeout_s`."""
        import ray

        refs = {self._actors[a].ping.remote(): a for a in actors}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        answered = set()
        for r in ready:
            try:
                ray.get(r, timeout=0)
                answered.add(refs[r])
            except Exception:   # dead
                pass
        return set(actors) - answered

    def lost_ips(self, timeout_s: float = PROBE_TIMEOUT_S) -> set[str]:
        """IPs of actors that no longer answer (where a fresh placement should go last)."""
        lost = self.unresponsive(range(len(self._actors)), timeout_s)
        return {n.ip for i in lost if (n := self.node(i)) is not None}

    # -- replace -----------------------------------------------------------------------------------
    def _placement(self, i: int, dead: set[str], suspect: set[str] = frozenset()) -> tuple[dict[str, Any], bool]:
        """Actor options for a replacement of actor i, and whether it is a takeover (placed away from
        where the plan put it, so it must fit its budget to the memory it finds there).

        Nothing to avoid: as planned (same pin, or SPREAD). Otherwise `dead` nodes are never used and
        `suspect` ones (where this call already failed) only if nothing else can host the actor. The
        planned pin is kept if an acceptable live node offers it; else it is dropped and the replacement
        goes to the best acceptable node (free resources first, then fewest of our actors)."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if not dead and not suspect:
            return self.planned_options(i), False
        w = self.plan.workers[i]
        need = {"CPU": w.num_cpus, "GPU": w.num_gpus}
        live = [n for n in nodes.ray_nodes() if n.node_id not in dead]
        base = dict(num_cpus=w.num_cpus, num_gpus=w.num_gpus, max_restarts=0)
        try:
            from .ray_internal import available_resources_per_node
            free = available_resources_per_node()
        except Exception:  # developer API: placement still works on totals
            free = {}
        ours: dict[str, int] = defaultdict(int)
        for j, n in enumerate(self._nodes):
            if j != i and n is not None and self.records[j].broken is None:
                ours[n.node_id] += 1
        preferred = [n for n in live if n.node_id not in suspect]
        for pool in (preferred, live):
            if pool is live and not dead:
                # only nodes this call already failed on are left, and they are up: retry as planned
                return self.planned_options(i), False
            if w.resources and any(nodes.fits(n.resources, {**need, **w.resources}) for n in pool):
                return {**base, "resources": w.resources}, True
            node = recovery.pick_node(pool, need, free, ours)
            if node is not None:
                return {**base, "scheduling_strategy": NodeAffinitySchedulingStrategy(
                    node.node_id, soft=True, _spill_on_unavailable=True)}, True
        raise ShardUnavailable(
            f"no surviving node can host a replacement for actor {i} (needs {w.num_cpus:g} CPU, "
            f"{w.num_gpus:g} GPU; dead or unreachable nodes: {sorted(x[:12] for x in dead)}; live nodes: "
            f"{[(n.ip, n.resources.get('CPU', 0)) for n in live]})")

    def replace(self, i: int, why: str, suspect: set[str] = frozenset()) -> None:
        """Kill actor i (no restart) and start a new one with the same experts, placed away from its node
        if that node is dead or unreachable; bounded by `restart_timeout_s`. Raises ShardUnavailable if the
        replacement is not ready in time."""
        import ray

        t0 = time.perf_counter()
        rec = self.records[i]
        dead = self.bad_nodes(i)
        old = self.node(i)
        self.kill_quietly(i)              # a hung actor must not come back; frees its resources
        rec.broken = rec.broken or why
        t_kill = time.perf_counter()
        opts, takeover = self._placement(i, dead, suspect)
        t_place = time.perf_counter()
        kwargs = {**self._init_args[i], **self._actor_kwargs(i, rec.incarnation + 1)}
        if takeover:
            held: dict[str, int] = defaultdict(int)     # expert bytes our other actors hold, per node
            for j, n in enumerate(self._nodes):
                if j != i and n is not None and self.records[j].broken is None:
                    own, budget = self.plan.workers[j].expert_bytes, n.budget_bytes
                    held[n.node_id] += own if budget is None else min(own, int(budget))
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
                err = f"the replacement failed to start: {root_message(e)}"
        if err is not None:
            try:
                ray.kill(handle, no_restart=True)
            except Exception:
                pass
            self.log.add(kind="restart_failed", actor=i, seconds=time.perf_counter() - t0, error=err)
            raise ShardUnavailable(f"{self.where(i)}: {err}")
        node = ActorNode.from_info(info)
        self._actors[i] = handle
        self._nodes[i] = node
        rec.incarnation += 1
        rec.restarts += 1
        rec.broken = None
        rec.takeover = node.takeover
        self._on_start(i, handle, node)
        dt = time.perf_counter() - t0
        self.log.add(kind="restart", actor=i, seconds=dt, why=why, incarnation=rec.incarnation,
                     kill_s=t_kill - t0, placement_s=t_place - t_kill, start_s=time.perf_counter() - t_place,
                     from_node=old and old.node_id, from_ip=old and old.ip, to_node=node.node_id,
                     to_ip=node.ip, pid=node.pid, budget_bytes=node.budget_bytes, takeover=rec.takeover)
        log.warning("expert actor %d replaced in %.2fs (%s): now pid %s on %s%s", i, dt, why, node.pid, node.ip,
                    f", paged takeover budget {node.budget_bytes}" if (rec.takeover or {}).get("paged") else "")

    def kill_quietly(self, i: int) -> None:
        """ray.kill actor i without restart; never raises (it may be dead already, or unreachable)."""
        import ray

        try:
            ray.kill(self._actors[i], no_restart=True)
        except Exception as e:
            log.debug("killing actor %d: %s", i, e)

    def close(self) -> None:
        for i in range(len(self._actors)):
            self.kill_quietly(i)
