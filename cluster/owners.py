"""The routing (owner) table: which actor serves each active expert of one dispatch. Pure (no Ray).

An expert held by one actor always goes to it. An expert with replicas (cluster/replicas.py) goes,
all its rows of the dispatch together, to one holder chosen by smooth weighted round robin over
the plan's shares, so that over many passes each holder serves its share of the rows. Which holder
serves an expert never changes the result: the same rows meet the same weights in one matmul, and
the dispatcher combines in grouped (expert) order whoever answered.

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
        self._current: dict[ExpertKey, dict[int, float]] = {k: {a: 0.0 for a, _ in hs}
                                                            for k, hs in self._multi.items()}

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

    def pick(self, layer: int, experts: list[int]) -> dict[int, int] | None:
        """{expert: serving actor} for the layer (None if the layer has no routed experts), with one
        holder chosen for each of `experts` (the dispatch's active ones) that has replicas."""
        base = self._base.get(layer)
        if base is None or not self._multi:
            return base
        out = None
        for e in experts:
            cur = self._current.get((layer, e))
            if cur is None:
                continue
            hs = self._multi[(layer, e)]
            for a, s in hs:
                cur[a] += s
            chosen = max(hs, key=lambda h: (cur[h[0]], -h[0]))[0]
            cur[chosen] -= 1.0
            if out is None:
                out = dict(base)
            out[e] = chosen
        return base if out is None else out

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
