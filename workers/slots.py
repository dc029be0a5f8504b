"""Slot bookkeeping of an expert store: which expert holds which slot, and which one to evict.

Pure state, no threads and no files: `SlotTable` answers "which slot may this expert take"
and records claims, completions, hints and counters. `workers/store.py` calls it under its
one lock and does the waiting; `workers/reader.py` fills the slots. So every eviction rule
is testable by calling these methods in order.
"""
from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field
from typing import Any, Iterable

from .budget import SlotLayout
from .spec import ExpertKey, ExpertSpec

log = logging.getLogger(__name__)

POLICIES = ("lru", "lfu", "lfu-decay")

COUNTERS = ("hits", "late_hits", "misses", "loads", "bytes_read", "spill_reads", "spill_misses", "spill_stale",
            "spill_writes", "ahead_loads", "bytes_prefetched", "prefetch_hints", "prefetch_issued",
            "prefetch_dropped", "prefetch_used", "prefetch_wasted", "evictions", "load_errors")


class Load(enum.Enum):
    """Where an expert's read stands."""

    IDLE = "idle"        # not being read: resident (weights set) or without a slot
    QUEUED = "queued"    # claimed a slot, waiting for a loader thread
    RUNNING = "running"  # a thread is reading it into its slot


class Claim(enum.Enum):
    """Who claims a slot: the choice of victim differs."""

    DEMAND = "demand"    # `get` needs it now
    AHEAD = "ahead"      # the current layer needs it next (`load_ahead`)
    HINT = "hint"        # a prefetch hint for a later layer


@dataclass
class ExpertInfo:
    """Cache bookkeeping for one owned expert (resident or not)."""

    spec: ExpertSpec
    layout: SlotLayout                                # where each held tensor sits in a slot
    nbytes: int                                       # data bytes as held (format and compute dtype)
    span: int                                         # slot bytes: each tensor padded to SLOT_ALIGN
    slot: int | None = None                           # set while claimed (queued or loading) or resident
    weights: Any = None                               # set once the slot holds complete data
    loading: Load = Load.IDLE
    freq: float = 0.0                                 # access count (decayed for lfu-decay)
    last_tick: int = -1                               # access tick of the last use
    hinted: bool = False                              # claimed by a prefetch hint and not yet used


@dataclass
class SlotTable:
    """Owned experts, slot owners, the current layer's needed set, unused hints and counters."""

    infos: dict[ExpertKey, ExpertInfo]
    num_slots: int
    policy: str = "lfu-decay"
    pinned: frozenset = frozenset()
    half_life: float = 256.0
    owner: list[ExpertKey | None] = field(init=False)
    needed: set[ExpertKey] = field(default_factory=set)
    last_got: ExpertKey | None = None
    hints: dict[int, set[ExpertKey]] = field(default_factory=dict)   # layer -> unused hints of that layer
    tick: int = 0
    c: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    per_layer: dict[int, dict[str, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; choose from {POLICIES}")
        self.owner = [None] * self.num_slots
        self._decay = 0.5 ** (1.0 / self.half_life)  # per access tick

    def info(self, key: ExpertKey) -> ExpertInfo:
        info = self.infos.get(tuple(key))
        if info is None:
            raise ValueError(f"expert {tuple(key)} is not owned by this store")
        return info

    # ---- use and eviction priority --------------------------------------------------------------

    def touch(self, info: ExpertInfo) -> None:
        self.tick += 1
        info.freq = (self.score(info) if self.policy == "lfu-decay" else info.freq) + 1
        info.last_tick = self.tick

    def score(self, info: ExpertInfo) -> float:
        """Eviction priority (lower goes first); ties are broken by recency."""
        if self.policy == "lru":
            return 0.0
        if self.policy == "lfu":
            return info.freq
        return info.freq * self._decay ** (self.tick - info.last_tick)

    def count_access(self, key: ExpertKey, hit: bool) -> None:
        stats = self.per_layer.setdefault(key[0], {"hits": 0, "misses": 0})
        what = "hits" if hit else "misses"
        self.c[what] += 1
        stats[what] += 1
        self.last_got = key

    def hint_precision(self) -> float:
        """Share of hints used by the layer they were for (Laplace-smoothed, so 0.5 before any)."""
        used, wasted = self.c["prefetch_used"], self.c["prefetch_wasted"]
        return (used + 1) / (used + wasted + 2)

    def victim(self, demand: bool, hint_for: ExpertInfo | None = None) -> ExpertInfo | None:
        """Choose a loaded, unpinned expert to evict, or None.

        Demand (`get`): anything loaded, preferring experts the current layer does not need and
        then experts no unused hint holds. Background: never a needed expert, the one `get`
        handed out last, or an unused hint; for a hint (`hint_for`), only one colder than the
        hint is worth.
        """
        cands = [i for k in self.owner if k is not None and k not in self.pinned
                 for i in [self.infos[k]] if i.weights is not None]
        if demand:
            for keep in (lambda i: i.spec.key not in self.needed and not i.hinted,
                         lambda i: i.spec.key not in self.needed):
                if pool := [i for i in cands if keep(i)]:
                    cands = pool
                    break
        else:
            cands = [i for i in cands if i.spec.key not in self.needed and i.spec.key != self.last_got
                     and not i.hinted]
        victim = min(cands, key=lambda i: (self.score(i), i.last_tick), default=None)
        if victim is not None and hint_for is not None \
                and self.score(victim) >= self.score(hint_for) + self.hint_precision():
            return None
        return victim

    def pick_slot(self, info: ExpertInfo, claim: Claim) -> int | None:
        """A free slot or a victim's slot `info` may take now, or None (the caller waits or gives up)."""
        free = self.owner.count(None)
        # a hint leaves free slots to the current layer's experts that still need one
        if free and (claim is not Claim.HINT or free > sum(self.infos[k].slot is None for k in self.needed)):
            return self.owner.index(None)
        victim = self.victim(claim is Claim.DEMAND, info if claim is Claim.HINT else None)
        return None if victim is None else victim.slot

    # ---- claims ---------------------------------------------------------------------------------

    def claim(self, info: ExpertInfo, slot: int, loading: Load) -> None:
        """Give `slot` to `info` (evicting its occupant) for a read that is queued or running."""
        if (old := self.owner[slot]) is not None:
            victim = self.infos[old]
            self.c["evictions"] += 1
            if victim.hinted:
                self.c["prefetch_wasted"] += 1
                self.unhint(victim)
            victim.slot, victim.weights = None, None
            log.debug("evict %s from slot %d", old, slot)
        self.owner[slot] = info.spec.key
        info.slot, info.weights, info.loading = slot, None, loading

    def complete(self, info: ExpertInfo, weights: Any) -> None:
        """The read into the claimed slot finished."""
        info.weights, info.loading = weights, Load.IDLE
        self.c["loads"] += 1
        self.c["bytes_read"] += info.spec.file_nbytes

    def release(self, info: ExpertInfo) -> None:
        """Free the slot of a claim whose read failed or was cancelled."""
        if info.slot is not None:
            self.owner[info.slot] = None
        if info.hinted:
            self.unhint(info)
        info.slot, info.weights, info.loading = None, None, Load.IDLE

    def drop_idle(self) -> tuple[int, int]:
        """Free every slot whose expert is loaded and idle (pinned ones too): (experts, bytes) dropped.
        Slot buffers stay allocated; the next use of a dropped expert reads it again."""
        n = nbytes = 0
        for k in list(self.owner):
            if k is not None and (info := self.infos[k]).loading is Load.IDLE:
                nbytes += info.nbytes
                n += 1
                self.release(info)
        return n, nbytes

    def hint(self, info: ExpertInfo) -> None:
        info.hinted = True
        self.hints.setdefault(info.spec.key[0], set()).add(info.spec.key)

    def unhint(self, info: ExpertInfo) -> None:
        info.hinted = False
        self.hints.get(info.spec.key[0], set()).discard(info.spec.key)

    def expire_hints(self, layer: int, keep: set[ExpertKey]) -> None:
        """Unused hints of `layer` outside `keep` were wrong: unprotect them (cancel unstarted reads)."""
        for k in list(self.hints.get(layer, ())):
            if k in keep:
                continue
            info = self.infos[k]
            self.c["prefetch_wasted"] += 1
            if info.loading is Load.QUEUED:
                self.release(info)
            else:
                self.unhint(info)

    def begin_layer(self, keys: Iterable[ExpertKey]) -> None:
        self.needed = {tuple(k) for k in keys} & self.infos.keys()
        for layer in {k[0] for k in self.needed}:
            self.expire_hints(layer, keep=self.needed)

    def resident(self) -> list[ExpertKey]:
        return [k for k in self.owner if k is not None and self.infos[k].weights is not None]

    def occupied_bytes(self) -> int:
        return sum(self.infos[k].nbytes for k in self.owner if k is not None)
