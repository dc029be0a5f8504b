"""Live re-placement: apply a `ReplicaPlan` between dispatches without stopping generation.

Three steps, in this order, so that no row is ever routed to an actor that cannot serve it:

1. the new holders load their replicas (`ShardActor.adopt`, on the actor's "placement" thread, so
   the layers it serves meanwhile are not held up); `begin` sends these and returns at once;
2. once every load has finished, the next dispatch (`poll`, called by `RemoteExperts.submit`)
   swaps the dispatcher's owner table whole: one dispatch sees the old table or the new one;
3. replicas the new plan no longer has are released (`ShardActor.release`) after the swap; nothing
   is in flight then (a layer's dispatch is waited on before the next one is submitted).

A load that fails (its actor died or could not load) abandons the re-placement: the old table
stays, what the others loaded is released, and the failure is logged and counted. Output never
depends on the table (cluster/owners.py), so an abandoned or completed re-placement gives the
same tokens.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from workers.budget import expert_nbytes
from workers.spec import ExpertKey, ExpertSpec

from .errors import ClusterError, ExpertTimeout
from .fleet import Fleet
from .owners import OwnerTable
from .replicas import ReplicaPlan, check_fits, imbalance
from .transports import root_message

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RebalanceStats:
    """Re-placements so far: applied, abandoned (a load failed), and the last one's seconds from
    `begin` to the table swap."""

    applied: int = 0
    abandoned: int = 0
    last_load_s: float | None = None
    last_error: str | None = None
    replicas: tuple[int, ...] = ()          # replicas each actor holds now
    interval: int | None = None             # automatic re-placement every this many passes (None: off)
    checks: int = 0                         # automatic plans made (applied or not)


@dataclass
class _Loading:
    plan: ReplicaPlan
    refs: dict[int, Any]                    # actor -> ref of its adopt()
    incarnations: dict[int, int]
    t0: float
    stale: dict[int, list[ExpertKey]] = field(default_factory=dict)


class Rebalancer:
    """Owns which replicas each actor holds and the switch between owner tables (see module doc).
    `get_table()` / `set_table(t)` read and swap the dispatcher's table; `spare[a]` is the budget
    actor a's slots leave for replicas (None: unlimited), with experts held in `itemsize`-byte floats."""

    def __init__(self, fleet: Fleet, specs: Sequence[ExpertSpec], primary: dict[ExpertKey, int],
                 get_table: Callable[[], OwnerTable], set_table: Callable[[OwnerTable], None],
                 spare: Sequence[int | None], itemsize: int):
        self._fleet = fleet
        self._specs = {s.key: s for s in specs}
        self._spare, self._itemsize = list(spare), itemsize
        self.primary = dict(primary)
        self._get, self._set = get_table, set_table
        self.held: list[set[ExpertKey]] = [set() for _ in fleet.plan.workers]
        self._loading: _Loading | None = None
        self._stats = RebalanceStats(replicas=tuple(0 for _ in self.held))

    @property
    def stats(self) -> RebalanceStats:
        return dataclasses.replace(self._stats, replicas=tuple(len(h) for h in self.held))

    def counted(self, **changes: Any) -> None:
        """Update the counters (the automatic policy's `interval` and `checks`)."""
        self._stats = dataclasses.replace(self._stats, **changes)

    @property
    def in_progress(self) -> bool:
        return self._loading is not None

    def check(self, plan: ReplicaPlan) -> None:
        """ClusterError unless `plan` is for these actors and keeps every expert's primary."""
        if plan.num_actors != len(self.held):
            raise ClusterError(f"the replica plan is for {plan.num_actors} actors but there are {len(self.held)}")
        if set(plan.holders) != set(self.primary):
            missing = sorted(set(self.primary) - set(plan.holders))[:5]
            extra = sorted(set(plan.holders) - set(self.primary))[:5]
            raise ClusterError(f"the replica plan does not cover this model's experts (missing {missing}, "
                               f"unknown {extra}): was it planned for another checkpoint?")
        moved = [k for k, hs in plan.holders.items() if hs[0][0] != self.primary[k]]
        if moved:
            raise ClusterError(f"the replica plan moves primaries {moved[:5]}; primaries stay where the static "
                               "plan put them (plan replicas from the backend's own owners)")
        check_fits(plan, self._spare, lambda k: expert_nbytes(self._specs[k], self._itemsize))

    def begin(self, plan: ReplicaPlan) -> None:
        """Start loading what `plan` adds; returns at once (the swap happens in `poll`)."""
        self.check(plan)
        if self._loading is not None:
            raise ClusterError("a re-placement is already loading; wait for it (wait_rebalance) first")
        refs, inc = {}, {}
        for a in range(plan.num_actors):
            new = sorted(set(plan.replicas(a)) - self.held[a])
            if new:
                if self._fleet.broken(a) is not None:
                    raise ClusterError(f"{self._fleet.where(a)} is down; re-place after it was replaced")
                refs[a] = self._fleet.handle(a).adopt.options(concurrency_group="placement").remote(
                    [self._specs[k].to_dict() for k in new])
                inc[a] = self._fleet.records[a].incarnation
        stale = {a: sorted(self.held[a] - set(plan.replicas(a))) for a in range(plan.num_actors)}
        self._loading = _Loading(plan, refs, inc, time.perf_counter(), {a: s for a, s in stale.items() if s})
        log.info("re-placement: loading %d new replica(s) on %d actor(s)",
                 sum(len(set(plan.replicas(a)) - self.held[a]) for a in refs), len(refs))

    def poll(self, timeout_s: float = 0.0) -> bool:
        """Swap the table if every load of the current re-placement has finished (waiting up to
        `timeout_s` for them). True if nothing is loading any more (swapped, abandoned or idle)."""
        import ray

        job = self._loading
        if job is None:
            return True
        refs = list(job.refs.values())
        if refs:
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
            if len(done) < len(refs):
                return False
        loaded: dict[int, set[ExpertKey]] = {}
        error = None
        for a, ref in job.refs.items():
            try:
                loaded[a] = {tuple(k) for k in ray.get(ref, timeout=0)}
            except Exception as e:   # died, or could not load: nothing may be routed to it
                error = error or f"{self._fleet.where(a)}: {root_message(e) if isinstance(e, ray.exceptions.RayError) else e}"
            if self._fleet.records[a].incarnation != job.incarnations[a]:
                error = error or f"{self._fleet.where(a)} was replaced while it loaded its replicas"
        self._loading = None
        if error is not None:
            for a, keys in loaded.items():
                self._release(a, sorted(keys - self.held[a]))
            self._stats = dataclasses.replace(self._stats, abandoned=self._stats.abandoned + 1, last_load_s=None,
                                              last_error=error)
            self._fleet.log.add(kind="replacement_abandoned", error=error[:300])
            log.warning("re-placement abandoned, the previous placement stays: %s", error)
            return True
        table = OwnerTable(job.plan)
        for a in range(job.plan.num_actors):
            self.held[a] = set(job.plan.replicas(a))
            if self._fleet.broken(a) is not None:
                table = table.without(a)
        self._set(table)
        for a, keys in job.stale.items():
            self._release(a, keys)
        dt = time.perf_counter() - job.t0
        self._stats = dataclasses.replace(self._stats, applied=self._stats.applied + 1, last_load_s=dt, last_error=None)
        self._fleet.log.add(kind="replacement", seconds=dt, replicas=[len(h) for h in self.held])
        log.info("re-placement applied after %.2fs: replicas per actor %s", dt, [len(h) for h in self.held])
        return True

    def wait(self, timeout_s: float) -> None:
        """Block until the current re-placement is applied or abandoned; ExpertTimeout after `timeout_s`."""
        if not self.poll(timeout_s):
            raise ExpertTimeout(f"the re-placement's replicas were not loaded within {timeout_s:g}s")

    def lost(self, a: int) -> None:
        """Actor a was replaced: the new incarnation holds no replicas, so route nothing to it but primaries."""
        if self.held[a]:
            self.held[a] = set()
            self._set(self._get().without_replicas_on(a))

    def _release(self, a: int, keys: list[ExpertKey]) -> None:
        if keys and self._fleet.broken(a) is None:
            # fire and forget: nothing is routed to these any more, and a dead actor frees them anyway
            self._fleet.handle(a).release.options(concurrency_group="placement").remote([list(k) for k in keys])


class AutoRebalance:
    """The periodic policy (vLLM's EPLB step interval, DeepSeek's ~10-minute repack): every
    `interval` forward passes (`tick`, once per pass), plan replicas from `loads()` (the coordinator's
    load window) with `plan(loads)`, and start it when it lowers the worst layer's max/mean rows per
    actor by at least `min_gain` against `current()`, the plan in use. Never waits: the switch
    happens at a later dispatch, and a plan that cannot start (an actor down) is skipped and logged."""

    def __init__(self, rebalancer: Rebalancer, interval: int, loads: Callable[[], dict[ExpertKey, float]],
                 plan: Callable[[dict[ExpertKey, float]], ReplicaPlan], current: Callable[[], ReplicaPlan],
                 min_gain: float = 0.05):
        if not isinstance(interval, int) or isinstance(interval, bool) or interval < 1:
            raise ClusterError(f"rebalance_interval must be an integer >= 1 of forward passes, got {interval!r}")
        self._r, self.interval, self._loads, self._plan, self._current = rebalancer, interval, loads, plan, current
        self.min_gain = min_gain
        self._passes = 0
        rebalancer.counted(interval=interval)

    def tick(self) -> None:
        self._passes += 1
        if self._passes % self.interval or self._r.in_progress:
            return
        loads = self._loads()
        if not any(loads.values()):
            return
        plan, current = self._plan(loads), self._current()
        self._r.counted(checks=self._r.stats.checks + 1)
        before, after = imbalance(current, loads), imbalance(plan, loads)
        if plan == current or after > before * (1 - self.min_gain):
            return
        try:
            self._r.begin(plan)
        except ClusterError as e:
            log.warning("automatic re-placement skipped: %s", e)
            return
        log.info("automatic re-placement after %d passes: worst max/mean rows %.2f -> %.2f (planned)",
                 self._passes, before, after)
