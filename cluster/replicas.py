"""Load-driven re-placement: which actors also hold a replica of which hot expert. Pure (no Ray).

The static plan (cluster/placement.py) gives every expert one owner, its primary; an actor whose
experts are hot is then the critical path of every layer they are in. This planner adds replicas
of hot experts on actors with spare replica slots and says what share of an expert's rows each
holder serves, so that rows per actor per layer even out.

It is DeepSeek EPLB's greedy idea adapted to fixed primaries (the primaries stay where the static
plan put them: they are what a replacement actor reloads, and they keep the plan's memory
accounting true): repeatedly take the layer whose hottest actor is furthest above the layer's
mean, replicate that actor's expert with the highest load per replica onto the least loaded actor
of the layer that has a free slot, and water-fill the expert's rows over its holders. A replica is
kept if the layer's peak does not rise and its rows get more even; stop when no slot is left or no
replica does that for any layer.

Shares are spread over forward passes, never inside one: every row of an expert in one dispatch
goes to one holder (cluster/owners.py picks the one with the fewest rows served), because a matmul
over a subset of an expert's rows does not give the same bits as over all of them, and exact
routing must stay bit-identical. The shares are the plan's estimate of the balance; the table's
online choice is what realises it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from workers.spec import ExpertKey
from workers.units import format_bytes

from .errors import ClusterError

__all__ = ["ReplicaPlan", "plan_replicas", "layer_rows", "imbalance", "check_fits"]

_EPS = 1e-9


@dataclass(frozen=True)
class ReplicaPlan:
    """For every expert its holders as (actor, share of its rows), primary first; shares sum to 1."""

    num_actors: int
    holders: Mapping[ExpertKey, tuple[tuple[int, float], ...]]

    def replicas(self, actor: int) -> list[ExpertKey]:
        """The experts `actor` holds as a replica (not as their primary), ascending."""
        return sorted(k for k, hs in self.holders.items() if any(a == actor for a, _ in hs[1:]))

    def primary(self, key: ExpertKey) -> int:
        return self.holders[key][0][0]

    def table(self, loads: Mapping[ExpertKey, float], before: "ReplicaPlan | None" = None) -> list[str]:
        """Human-readable lines (used by `moeshard plan --from-stats`): per actor its primaries,
        replicas and its max/mean rows over layers; then the worst layer's max/mean."""
        rows = layer_rows(self, loads)
        lines = [f"{'actor':>5} {'primaries':>9} {'replicas':>8} {'max/mean rows over layers':>26}  replicas held"]
        for a in range(self.num_actors):
            prim = sum(1 for hs in self.holders.values() if hs[0][0] == a)
            reps = self.replicas(a)
            ratios = [r[a] / (sum(r) / len(r)) for r in rows.values() if sum(r) > 0]
            worst = f"{max(ratios):.2f}" if ratios else "-"
            held = " ".join(f"L{l}E{e}" for l, e in reps) or "-"
            lines.append(f"{a:>5} {prim:>9} {len(reps):>8} {worst:>26}  {held}")
        if before is not None:
            lines.append(f"max/mean rows per actor per layer: {imbalance(before, loads):.3f} (static) -> "
                         f"{imbalance(self, loads):.3f} (with replicas)")
        return lines


def static_plan(primary: Mapping[ExpertKey, int], num_actors: int) -> ReplicaPlan:
    """The static placement as a ReplicaPlan: one holder per expert."""
    return ReplicaPlan(num_actors, {k: ((a, 1.0),) for k, a in sorted(primary.items())})


def layer_rows(plan: ReplicaPlan, loads: Mapping[ExpertKey, float]) -> dict[int, list[float]]:
    """{layer: expected rows per actor} under `plan` for `loads`."""
    out: dict[int, list[float]] = {}
    for key, hs in plan.holders.items():
        row = out.setdefault(key[0], [0.0] * plan.num_actors)
        for a, share in hs:
            row[a] += share * float(loads.get(key, 0.0))
    return out


def imbalance(plan: ReplicaPlan, loads: Mapping[ExpertKey, float]) -> float:
    """max over layers of (rows of the busiest actor / mean rows per actor); 1.0 is perfect balance
    (layers without load are left out)."""
    ratios = [max(r) / (sum(r) / len(r)) for r in layer_rows(plan, loads).values() if sum(r) > 0]
    return max(ratios, default=1.0)


def plan_replicas(loads: Mapping[ExpertKey, float], primary: Mapping[ExpertKey, int], num_actors: int,
                  slots: Sequence[int]) -> ReplicaPlan:
    """Replicas of hot experts on spare slots (see module doc).

    `loads`: rows per (layer, expert) (missing = 0); `primary`: (layer, expert) -> owning actor (the
    static plan's `owners()`); `slots[a]`: how many replicas actor a may hold (its spare budget in
    experts). Deterministic for given inputs."""
    if num_actors < 1:
        raise ClusterError(f"num_actors must be at least 1, got {num_actors}")
    if len(slots) != num_actors:
        raise ClusterError(f"slots has {len(slots)} entries but there are {num_actors} actors")
    if any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in slots):
        raise ClusterError(f"replica slots must be non-negative integers, got {list(slots)}")
    if bad := [a for a in primary.values() if not 0 <= a < num_actors]:
        raise ClusterError(f"primary owners {sorted(set(bad))} are not actors 0..{num_actors - 1}")
    if unknown := sorted(set(loads) - set(primary)):
        raise ClusterError(f"loads name experts no actor owns: {unknown[:5]}")
    if bad := sorted(k for k, v in loads.items() if not (math.isfinite(v) and v >= 0)):
        raise ClusterError(f"loads must be finite and non-negative; bad entries: {bad[:5]}")

    load = {k: float(loads.get(k, 0.0)) for k in primary}
    share: dict[ExpertKey, dict[int, float]] = {k: {a: 1.0} for k, a in primary.items()}
    rows: dict[int, list[float]] = {}
    for k, a in primary.items():
        rows.setdefault(k[0], [0.0] * num_actors)[a] += load[k]
    free = list(slots)
    by_layer: dict[int, list[ExpertKey]] = {}
    for k in sorted(primary):
        by_layer.setdefault(k[0], []).append(k)

    while any(free):
        move = _best_move(rows, by_layer, load, share, free)
        if move is None:
            break
        key, b, new = move
        layer = rows[key[0]]
        for a, s in share[key].items():
            layer[a] -= s * load[key]
        share[key] = new
        for a, s in new.items():
            layer[a] += s * load[key]
        free[b] -= 1

    holders = {k: tuple([(primary[k], share[k][primary[k]])] +
                        sorted((a, s) for a, s in share[k].items() if a != primary[k]))
               for k in sorted(primary)}
    return ReplicaPlan(num_actors, holders)


def _best_move(rows, by_layer, load, share, free):
    """The replica that lowers the peak of the worst layer it can: (key, new holder, new shares) or None."""
    order = sorted((l for l, r in rows.items() if sum(r) > 0),
                   key=lambda l: (-max(rows[l]) / (sum(rows[l]) / len(rows[l])), l))
    for l in order:
        r = rows[l]
        peak = max(r)
        hot = min(a for a in range(len(r)) if r[a] == peak)
        # the hot actor's experts, highest load per replica first (EPLB's criterion)
        cands = sorted((k for k in by_layer[l] if share[k].get(hot, 0.0) > 0 and load[k] > 0),
                       key=lambda k: (-load[k] / len(share[k]), k))
        for key in cands:
            targets = [b for b in range(len(r)) if free[b] > 0 and b not in share[key]]
            if not targets:
                continue
            b = min(targets, key=lambda b: (r[b], b))
            new = _water_fill(r, share[key], load[key], [*share[key], b])
            after = list(r)
            for a, s in share[key].items():
                after[a] -= s * load[key]
            for a, s in new.items():
                after[a] += s * load[key]
            # the peak must not rise and the layer must get more even (sum of squares: two actors tied
            # at the peak need two moves, and the first of them does not lower the peak yet)
            tol = _EPS * max(1.0, peak) ** 2
            if (max(after) <= peak + tol and sum(v * v for v in after) < sum(v * v for v in r) - tol
                    and new.get(b, 0.0) > 0):
                return key, b, new
    return None


def _water_fill(rows: list[float], old: Mapping[int, float], w: float, holders: list[int]) -> dict[int, float]:
    """Shares of an expert of load `w` > 0 over `holders` that level their rows (its old shares taken
    out first): the lowest holders fill up to a common level. Every holder stays listed, a holder
    above the level with share 0 (a primary keeps its copy even when it serves none of the rows)."""
    base = {a: rows[a] - old.get(a, 0.0) * w for a in holders}
    ordered = sorted(holders, key=lambda a: (base[a], a))
    for used in range(1, len(ordered) + 1):
        level = (sum(base[a] for a in ordered[:used]) + w) / used
        if used == len(ordered) or level <= base[ordered[used]]:
            break
    return {a: (max(0.0, level - base[a]) / w if a in ordered[:used] else 0.0) for a in holders}


def check_fits(plan: ReplicaPlan, spare: Sequence[int | None], nbytes: Callable[[ExpertKey], int]) -> None:
    """ClusterError unless every actor's replicas fit `spare[a]`, the budget its own slots leave
    (`WorkerPlan.spare_bytes`; None: unlimited); `nbytes(key)` is what one replica holds."""
    for a, room in enumerate(spare):
        held = plan.replicas(a)
        need = sum(nbytes(k) for k in held)
        if room is not None and need > room:
            raise ClusterError(f"the replica plan gives actor {a} {len(held)} replica(s) of {format_bytes(need)}, but "
                               f"its worker_memory leaves {format_bytes(room)} after its own slots; plan with the "
                               "slots RemoteExperts.replica_slots() gives, or raise worker_memory")
