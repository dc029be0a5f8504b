"""Which expert-shard actor owns which routed expert: a pure planner (no Ray).

The plan spreads every layer's experts across all actors. A layer's routed work is
then split into at most one call per actor, and all actors compute that layer in
parallel; giving an actor a whole layer (or a contiguous block of layers) would
serialise each layer on one actor.

Within a layer, experts are dealt one at a time, heaviest first, to the actor that
currently has the least of that layer's work, under a cap of ceil(E / W) experts of
the layer per actor. "Work" is the expected load when `load` is given (e.g. routing
counts observed on a calibration run), otherwise the expert's bytes. Ties go to the
actor holding the fewest bytes overall, then the lowest index, so layers whose
expert count is not a multiple of W rotate their extra expert across actors and the
total bytes stay balanced. With uniform experts and no load this is a rotating
round-robin: every actor holds the same bytes to within one expert.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

from cluster.errors import ClusterError
from coordinator.options import PlacementOptions, StoreOptions
# expert_nbytes is re-exported: callers size experts through the planner's import
from workers.budget import check_budget, expert_nbytes, min_budget, slot_bytes, slot_count, spare_bytes
from workers.dtypes import COMPUTE_DTYPES
from workers.errors import BudgetError
from workers.spec import ExpertKey, ExpertSpec
from workers.units import format_bytes

__all__ = ["Plan", "PlacementBudgetError", "WorkerPlan", "expert_nbytes", "plan_for", "plan_placement"]


class PlacementBudgetError(ClusterError, BudgetError):
    """The per-actor memory cannot hold the minimum working set. A ClusterError (the plan is
    refused) and a BudgetError (the same refusal an in-process store gives for its budget)."""


@dataclass(frozen=True)
class WorkerPlan:
    """What one expert-shard actor owns and what it asks Ray for.

    `expert_bytes` is the size of the owned experts in the compute dtype;
    `resident_bytes` is how much of that fits the actor's memory budget and
    `paged_bytes` the rest, which the actor pages from disk on demand.
    """

    index: int
    experts: list[ExpertKey]          # (layer, expert), ascending
    expert_bytes: int
    resident_bytes: int
    paged_bytes: int
    num_cpus: float
    num_gpus: float
    resources: dict[str, float] = field(default_factory=dict)
    load: float = 0.0                 # total expected load (0 when no load was given)
    pinned: list[ExpertKey] = field(default_factory=list)  # owned experts its store never evicts
    spare_bytes: int | None = None    # budget its slots leave for replicas (workers.budget.spare_bytes); None: unlimited

    def experts_of_layer(self, layer: int) -> list[int]:
        """Expert ids of `layer` this actor owns, ascending."""
        return [e for (l, e) in self.experts if l == layer]


@dataclass(frozen=True)
class Plan:
    """One `WorkerPlan` per actor, plus the budget every actor was planned with."""

    workers: list[WorkerPlan]
    worker_memory: int | None = None
    min_resident: int = 1

    def owners(self) -> dict[ExpertKey, int]:
        """(layer, expert) -> index of the owning actor."""
        return {key: w.index for w in self.workers for key in w.experts}

    def replica_slots(self, replica_nbytes: int, unlimited: int) -> list[int]:
        """Replicas of `replica_nbytes` each actor's spare budget holds (`WorkerPlan.spare_bytes`; 0 for
        an actor that pages), or `unlimited` where its budget is."""
        return [unlimited if w.spare_bytes is None else w.spare_bytes // replica_nbytes for w in self.workers]

    @property
    def total_bytes(self) -> int:
        return sum(w.expert_bytes for w in self.workers)

    def table(self) -> list[str]:
        """Human-readable lines, one per actor (used by `moeshard plan`)."""
        budget = "unlimited" if self.worker_memory is None else format_bytes(self.worker_memory)
        lines = [f"{len(self.workers)} actor(s), memory budget per actor: {budget}, "
                 f"routed experts total: {format_bytes(self.total_bytes)}",
                 f"{'actor':>5} {'experts':>8} {'bytes':>10} {'resident':>10} {'paged':>10} "
                 f"{'cpus':>5} {'gpus':>5}  {'per layer':<12} resources"]
        layers = sorted({l for w in self.workers for (l, _) in w.experts})
        for w in self.workers:
            per_layer = "/".join(str(len(w.experts_of_layer(l))) for l in layers)
            lines.append(f"{w.index:>5} {len(w.experts):>8} {format_bytes(w.expert_bytes):>10} "
                         f"{format_bytes(w.resident_bytes):>10} {format_bytes(w.paged_bytes):>10} "
                         f"{w.num_cpus:>5g} {w.num_gpus:>5g}  {per_layer:<12} {w.resources or '-'}")
        return lines


def plan_placement(specs: Sequence[ExpertSpec], num_workers: int, *, dtype_bytes: int,
                   worker_memory: int | None, min_resident: int,
                   load: Mapping[ExpertKey, float] | None = None, num_cpus: float = 1,
                   num_gpus: float = 0, resources: Sequence[Mapping[str, float]] | None = None,
                   pinned: Iterable[ExpertKey] = ()) -> Plan:
    """Assign every expert in `specs` to one of `num_workers` actors.

    `worker_memory` (bytes, None = unlimited) is each actor's budget for expert
    weights. The actor's store keeps whole experts in equal slots sized for its
    largest expert, so it holds floor(worker_memory / largest) experts resident and
    pages the rest from disk; it must hold at least `min_resident`, else ClusterError.
    `load` maps (layer, expert) to expected load (missing keys count as 0).
    `resources[i]` is given to actor i as Ray custom resources (e.g.
    `{"host_1": 0.01}` pins it to the node that advertises `host_1`).
    """
    if num_workers < 1:
        raise ClusterError(f"num_workers must be at least 1 for a distributed plan, got {num_workers}")
    if not specs:
        raise ClusterError("the checkpoint has no routed experts to place")
    if len(specs) < num_workers:
        raise ClusterError(f"{num_workers} actors requested but the model has only {len(specs)} routed "
                           f"experts; use at most {len(specs)} workers")
    if min_resident < 1:
        raise ClusterError(f"min_resident must be at least 1, got {min_resident}")
    if dtype_bytes < 1:
        raise ClusterError(f"dtype_bytes must be positive, got {dtype_bytes}")
    if resources is not None and len(resources) != num_workers:
        raise ClusterError(f"resources has {len(resources)} entries but there are {num_workers} actors; "
                           "give one dict per actor (use {} for an actor with no constraint)")
    if load is not None:
        bad = [k for k, v in load.items() if not (v >= 0 and math.isfinite(v))]
        if bad:
            raise ClusterError(f"expected load must be finite and non-negative; bad entries: {bad[:5]}")
    keys = [s.key for s in specs]
    if len(set(keys)) != len(keys):
        raise ClusterError("duplicate (layer, expert) in the expert specs")
    pins = {tuple(k) for k in pinned}
    if unknown := pins - set(keys):
        raise ClusterError(f"pinned experts {sorted(unknown)[:5]} are not routed experts of this checkpoint; "
                           "pin (layer, expert) pairs the checkpoint has")

    sizes = {s.key: expert_nbytes(s, dtype_bytes) for s in specs}
    owned: list[list[ExpertKey]] = [[] for _ in range(num_workers)]
    total_bytes = [0] * num_workers
    total_load = [0.0] * num_workers

    by_layer: dict[int, list[ExpertKey]] = {}
    for key in sorted(keys):
        by_layer.setdefault(key[0], []).append(key)

    for layer, layer_keys in sorted(by_layer.items()):
        cap = math.ceil(len(layer_keys) / num_workers)
        work_of = (lambda k: float(load.get(k, 0.0))) if load is not None else (lambda k: float(sizes[k]))
        # Heaviest first; sizes break load ties so big experts still spread; ids keep it deterministic.
        order = sorted(layer_keys, key=lambda k: (-work_of(k), -sizes[k], k[1]))
        layer_work = [0.0] * num_workers
        layer_count = [0] * num_workers
        for key in order:
            w = min((i for i in range(num_workers) if layer_count[i] < cap),
                    key=lambda i: (layer_work[i], total_bytes[i], i))
            owned[w].append(key)
            layer_work[w] += work_of(key)
            layer_count[w] += 1
            total_bytes[w] += sizes[key]
            if load is not None:
                total_load[w] += work_of(key)

    by_key = {s.key: s for s in specs}
    mine = [[by_key[k] for k in sorted(o)] for o in owned]
    if worker_memory is not None:
        # the actor whose store needs the most decides; its refusal is the one its store would give
        worst = max(range(num_workers), key=lambda i: min_budget(mine[i], dtype_bytes, min_resident, pins))
        try:
            check_budget(mine[worst], dtype_bytes, worker_memory, min_resident=min_resident, pinned=pins,
                         option="worker_memory", holder=f" per actor (actor {worst}, {len(mine[worst])} experts)")
        except BudgetError as e:
            raise PlacementBudgetError(str(e), needed_bytes=e.needed_bytes, budget_bytes=e.budget_bytes) from None

    workers = []
    for i in range(num_workers):
        nbytes = total_bytes[i]
        slot = slot_bytes(mine[i], dtype_bytes)  # the store keeps whole experts in equal slots
        slots = slot_count(len(owned[i]), slot, worker_memory)
        resident = min(nbytes, slots * slot)
        workers.append(WorkerPlan(
            index=i, experts=sorted(owned[i]), expert_bytes=nbytes, resident_bytes=resident,
            paged_bytes=nbytes - resident, num_cpus=num_cpus, num_gpus=num_gpus,
            resources=dict(resources[i]) if resources is not None else {}, load=total_load[i],
            pinned=sorted(k for k in owned[i] if k in pins),
            spare_bytes=spare_bytes(mine[i], dtype_bytes, worker_memory)))
    return Plan(workers=workers, worker_memory=worker_memory, min_resident=min_resident)


def plan_for(specs: Sequence[ExpertSpec], placement: PlacementOptions, store: StoreOptions, dtype: str, *,
             min_resident: int, pinned: Iterable[ExpertKey] = (),
             load: Mapping[ExpertKey, float] | None = None) -> Plan:
    """`plan_placement` from the typed options: the one plan the backend, the job and `moeshard plan` make."""
    return plan_placement(list(specs), placement.num_workers, dtype_bytes=COMPUTE_DTYPES[dtype].itemsize,
                          worker_memory=store.budget_bytes, min_resident=min_resident, load=load, pinned=pinned,
                          num_cpus=placement.num_cpus, num_gpus=placement.num_gpus,
                          resources=None if placement.resources is None else list(placement.resources))
