"""The model's one door to routed experts: group by expert, run, combine.

`ExpertBatch` is the single implementation of grouping and combining. Every backend
(in-process `LocalExperts` here, `cluster.dispatch.RemoteExperts` over Ray) runs the
same kernel on the same rows in the same order and combines them the same way (each
token's k outputs summed in ascending expert order, as transformers' per-expert `index_add_`
does), which is what makes in-process, distributed and paged runs bit-identical.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import torch

from workers.shard import ExpertShard

from .load import LoadWindow
from workers.spec import ExpertSpec


class RoutedExperts(Protocol):
    """What a MoE block needs from wherever its experts live."""

    def submit(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
               hints: dict[int, torch.Tensor] | None = None) -> Any:
        """Start layer `layer`'s routed work. x [T, H], weights [T, k], ids [T, k].

        `hints` {later layer: predicted expert ids (any shape)} go with the work, to be taken
        once this layer's own experts are safe from eviction."""
        ...

    def wait(self, pending: Any) -> torch.Tensor:
        """Finish what `submit` started: [T, H] = sum over slots of weight * expert(x)."""
        ...

    def prefetch(self, layer: int, ids: torch.Tensor) -> None:
        """Hint that experts `ids` (any shape) of `layer` will be needed soon. Never waited on."""
        ...

    @property
    def wants_hints(self) -> bool:
        """False once hints cannot help: every expert is resident and can never be evicted."""
        ...

    def resident(self, layer: int) -> frozenset[int]:
        """Experts of `layer` known to hold a slot now (loaded or being read), without a round trip:
        what cache-aware routing prefers (coordinator/cache_routing.py). A holder whose budget has a
        slot for each of its experts counts all of them: nothing is ever evicted there, so bending the
        routing would change the model to save one first read."""
        ...

    def stats(self) -> dict: ...

    def drop_resident(self) -> dict:
        """Forget every resident expert, wherever it is held, so that the next use reads it from disk
        again (a cold cache; budgets and slots unchanged). {"experts", "bytes"} dropped, summed."""
        ...

    def close(self) -> None: ...


@dataclass
class ExpertBatch:
    """One layer's routed work, rows grouped by expert in ascending expert order."""

    token_idx: torch.Tensor   # [N] source row of each (token, slot) assignment
    weights: torch.Tensor     # [N] routing weight of each assignment
    experts: list[int]        # active expert ids, ascending
    counts: list[int]         # rows per active expert, same order
    num_tokens: int
    by_token: torch.Tensor    # [N] grouped rows in token order, each token's k in ascending expert order

    @classmethod
    def from_routing(cls, weights: torch.Tensor, ids: torch.Tensor) -> "ExpertBatch":
        """Sort the [T, k] assignments by expert (stable, so ties keep token order)."""
        T, k = ids.shape
        flat = ids.reshape(-1)                                   # [T*k]
        order = torch.argsort(flat, stable=True)                 # [N]
        sorted_ids = flat[order]
        experts, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
        token_idx = order // k
        return cls(
            token_idx=token_idx,
            weights=weights.reshape(-1)[order],
            experts=experts.tolist(),
            counts=counts.tolist(),
            num_tokens=T,
            by_token=torch.argsort(token_idx, stable=True),
        )

    def segments(self) -> list[tuple[int, int, int]]:
        """(expert, start, end) row ranges of each active expert."""
        out, start = [], 0
        for e, n in zip(self.experts, self.counts):
            out.append((e, start, start + n))
            start += n
        return out

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Rows of x in grouped order. x [T, H] -> [N, H]."""
        return x.index_select(0, self.token_idx)

    def combine(self, y: torch.Tensor) -> torch.Tensor:
        """Weighted sum of grouped expert outputs y [N, H] back to [T, H].

        A gather and a sum over each token's k rows, not `index_add_`: the sum runs in the same
        order (ascending expert), and torch's CPU index_add_ (a scatter_add_) was measured to take
        up to a quarter of a millisecond per layer at batch 1 (docs/performance.md)."""
        y = y * self.weights.to(y.dtype)[:, None]                                  # [N, H]
        k = y.shape[0] // self.num_tokens if self.num_tokens else 0                   # rows per token
        return y.index_select(0, self.by_token).view(self.num_tokens, k, y.shape[1]).sum(dim=1)   # [T, H]


class LocalExperts:
    """Every routed expert in this process, held by one in-process `ExpertShard`."""

    def __init__(self, specs: Sequence[ExpertSpec], *, dtype: str, budget_bytes: int | None = None,
                 min_resident: int = 1, policy: str = "lfu-decay", pinned: Sequence[tuple[int, int]] = (),
                 spill_dir: str | None = None):
        self.shard = ExpertShard([s.to_dict() for s in specs], budget_bytes=budget_bytes, dtype=dtype,
                                 policy=policy, min_resident=min_resident, pinned=pinned, spill_dir=spill_dir)
        self._owned = [s.key for s in specs]

    def submit(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
               hints: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        batch = ExpertBatch.from_routing(weights, ids)
        y = self.shard.compute(layer, batch.gather(x), batch.experts, batch.counts, hint_lists(hints))
        return batch.combine(y)

    def wait(self, pending: torch.Tensor) -> torch.Tensor:
        return pending

    def prefetch(self, layer: int, ids: torch.Tensor) -> None:
        self.shard.prefetch(layer, torch.unique(ids).tolist())

    @property
    def wants_hints(self) -> bool:
        return not self.shard.store.all_resident

    def resident(self, layer: int) -> frozenset[int]:
        store = self.shard.store
        if store.holds_all:      # a first read is all a miss can cost: count every expert as resident
            return frozenset(e for l, e in self._owned if l == layer)
        return frozenset(e for l, e in store.claimed_keys() if l == layer)

    def stats(self) -> dict:
        report = self.shard.report()
        actor = {"index": 0, "ip": "local", "experts": len(report["owned"]),
                 **{k: v for k, v in report.items() if k != "owned"}}
        return backend_stats("local", [actor], budget_bytes=self.shard.budget_bytes)

    def drop_resident(self) -> dict:
        return self.shard.drop_resident()

    def close(self) -> None:
        self.shard.close()


def hint_lists(hints: dict[int, torch.Tensor] | None) -> list[tuple[int, list[int]]]:
    """{layer: expert ids} -> [(layer, sorted unique experts)], the plain form shards take."""
    return [(layer, torch.unique(ids).tolist()) for layer, ids in (hints or {}).items()]


# Counters every actor reports that add up across actors.
SUMMED = ("calls", "rows", "compute_s", "bytes_resident", "hits", "late_hits", "misses", "loads", "bytes_read",
          "bytes_prefetched", "prefetch_issued", "prefetch_used", "prefetch_wasted", "evictions", "stall_seconds",
          "spill_reads", "spill_writes")


def backend_stats(backend: str, actors: list[dict], **extra: Any) -> dict:
    """The one shape of `RoutedExperts.stats()`: totals over actors, then each actor's own figures."""
    totals = {k: sum(a.get(k) or 0 for a in actors) for k in SUMMED}
    return {"backend": backend, "num_workers": len(actors) if backend != "local" else 0, **totals, **extra,
            "actors": actors}


class RoutingStats:
    """What the routers did: expert activation counts per layer, and how well the next-layer
    predictions used for prefetch matched the experts each layer then picked."""

    def __init__(self) -> None:
        self._pending: dict[int, set[int]] = {}
        self._scores: dict[int, list[int]] = {}        # layer -> [predicted, needed, correct]
        self.activations: dict[int, torch.Tensor] = {}  # layer -> [E] times each expert was picked
        self.window = LoadWindow()                      # the same counts, last passes only (placement)

    def predicted(self, layer: int, ids: torch.Tensor) -> None:
        self._pending.setdefault(layer, set()).update(torch.unique(ids).tolist())

    def observed(self, layer: int, ids: torch.Tensor, num_experts: int) -> None:
        counts = torch.bincount(ids.reshape(-1), minlength=num_experts)
        if layer in self.activations:
            self.activations[layer].add_(counts)
        else:
            self.activations[layer] = counts.clone()
        self.window.add(layer, counts)
        guess = self._pending.pop(layer, None)
        if guess is None:
            return
        needed = set(torch.nonzero(counts).flatten().tolist())
        c = self._scores.setdefault(layer, [0, 0, 0])
        c[0] += len(guess)
        c[1] += len(needed)
        c[2] += len(guess & needed)

    def prefetch_stats(self) -> dict:
        """Precision and recall of predictions, overall and per layer (None where nothing was predicted)."""
        def ratios(p: int, n: int, ok: int) -> dict:
            return {"precision": ok / p if p else None, "recall": ok / n if n else None}
        total = [sum(c[i] for c in self._scores.values()) for i in range(3)]
        return {**ratios(*total), "per_layer": {l: ratios(*c) for l, c in sorted(self._scores.items())}}
