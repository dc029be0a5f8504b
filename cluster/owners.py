"""The routing (owner) table: which actor serves each active expert of one dispatch. Pure (no Ray).

An expert held by one actor always goes to it. An expert with replicas (cluster/replicas.py) goes,
all its rows of the dispatch together, to the holder that has served the fewest rows of this layer
since the table was installed, counting this dispatch's rows already assigned (biggest experts
placed first). The plan's shares say where replicas pay off on the measured load; choosing online
keeps the rows even when the traffic drifts from that load (fixed shares, tried first, balanced
held-out prompts much worse than planned: docs/placement.md).
Which holder serves an expert never changes the result: the same rows meet the same weights in one
matmul, and the dispatcher combines in grouped (expert) order whoever answered.

A table is replaced whole (the dispatcher swaps its reference between dispatches), never edited,
so one dispatch always sees one consistent table; only its round-robin counters move.
"""
from __future__ import annotations

from typing import Mapping

from workers.spec import ExpertKey

from .replicas import ReplicaPlan


class OwnerTable:
    """Holders and shares per (layer, expert), from a `ReplicaPlan` (see module doc)."""

    def __init__(self, plan: ReplicaPlan):
        self.plan = plan
        self._base: dict[int, dict[int, int]] = {}                 # layer -> expert -> first holder
        self._multi: dict[ExpertKey, tuple[tuple[int, float], ...]] = {}
        for (layer, e), hs in sorted(plan.holders.items()):
            serving = tuple((a, s) for a, s in hs if s > 0) or hs[:1]
            self._base.setdefault(layer, {})[e] = serving[0][0]
            if len(serving) > 1:
                self._multi[(layer, e)] = serving
        self._served: dict[int, list[int]] = {}                   # layer -> rows served per actor

    @classmethod
    def static(cls, owners: Mapping[int, Mapping[int, int]], num_actors: int) -> "OwnerTable":
        """The static plan's table: {layer: {expert: actor}}."""
        return cls(ReplicaPlan(num_actors, {(l, e): ((a, 1.0),) for l, m in owners.items() for e, a in m.items()}))

    @property
    def replicated(self) -> bool:
        return bool(self._multi)

    def layers(self) -> list[int]:
        return sorted(self._base)

    def holders(self, layer: int, expert: int) -> list[int]:
        """Every actor holding the expert (serving or standing by), primary first."""
        return [a for a, _ in self.plan.holders.get((layer, expert), ())]

    def pick(self, layer: int, experts: list[int], counts: list[int]) -> dict[int, int] | None:
        """{expert: serving actor} for the layer (None if the layer has no routed experts), with one
        holder chosen for each of `experts` (the dispatch's active ones, `counts` rows each) that has
        replicas. Deterministic for a given sequence of dispatches."""
        base = self._base.get(layer)
        if base is None or not self._multi:
            return base
        served = self._served.setdefault(layer, [0] * self.plan.num_actors)
        multi = []
        for e, c in zip(experts, counts):
            if (layer, e) in self._multi:
                multi.append((e, c))
            elif e in base:
                served[base[e]] += c
        if not multi:
            return base
        out = dict(base)
        for e, c in sorted(multi, key=lambda ec: (-ec[1], ec[0])):
            chosen = min((a for a, _ in self._multi[(layer, e)]), key=lambda a: (served[a], a))
            served[chosen] += c
            out[e] = chosen
        return out

    def without(self, actor: int) -> "OwnerTable":
        """This table with `actor` gone from every expert another actor also holds (its rows go to those,
        in proportion to their shares); experts only it holds stay with it (it must be replaced)."""
        holders = {}
        for k, hs in self.plan.holders.items():
            rest = tuple((a, s) for a, s in hs if a != actor)
            if not rest or len(rest) == len(hs):
                holders[k] = hs
                continue
            total = sum(s for _, s in rest)
            holders[k] = tuple((a, (s / total) if total > 0 else 1.0 / len(rest)) for a, s in rest)
        return OwnerTable(ReplicaPlan(self.plan.num_actors, holders))

    def without_replicas_on(self, actor: int) -> "OwnerTable":
        """This table with `actor` holding only its primaries (a replacement starts with no replicas)."""
        holders = {}
        for k, hs in self.plan.holders.items():
            if any(a == actor for a, _ in hs[1:]):
                rest = tuple(h for h in hs if h[0] != actor or h is hs[0])
                total = sum(s for _, s in rest)
                hs = tuple((a, (s / total) if total > 0 else 1.0 / len(rest)) for a, s in rest)
            holders[k] = hs
        return OwnerTable(ReplicaPlan(self.plan.num_actors, holders))
