"""ExpertShard: owns a set of routed experts and computes a layer's work for them.

A plain class: `cluster/` wraps it with `ray.remote`, the coordinator uses it
in-process. Experts are processed one at a time (get, then compute its segment)
while the layer's later experts load in the background, so a budget smaller than
a layer's working set still works, and every budget gives bit-identical results.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Iterable, Sequence

import psutil
import torch
from torch import Tensor

from . import native, wire
from .budget import expert_nbytes, spare_bytes
from .dtypes import compute_dtype
from .errors import BudgetError, WireError
from .units import format_bytes
from .kernels import forward_into
from .spec import ExpertKey, ExpertSpec
from .store import ExpertStore

log = logging.getLogger(__name__)



def _int_list(name: str, v: Any) -> list[int]:
    if not isinstance(v, (list, tuple)) or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        raise ValueError(f"{name} must be a list of ints, got {v!r}")
    return list(v)


class ExpertShard:
    """A shard of routed experts with its own memory budget, paging and compute."""

    def __init__(self, specs: list[dict], budget_bytes: int | None = None, dtype: str = "float32",
                 device: str | None = None, policy: str = "lfu-decay", min_resident: int = 1,
                 num_threads: int | None = None, pinned: Iterable[tuple[int, int]] = (),
                 spill_dir: str | None = None):
        if num_threads:
            torch.set_num_threads(num_threads)
        native.ops()                # build (first time on a machine) or load the CPU kernels now, not mid-call
        self.dtype = compute_dtype(dtype)
        self.specs = [ExpertSpec.from_dict(d) for d in specs]
        self._hidden = {s.key: s.hidden_size for s in self.specs}
        self.budget_bytes = budget_bytes
        self.store = ExpertStore(self.specs, budget_bytes, self.dtype, device, policy,
                                 pinned=[tuple(p) for p in pinned], min_resident=min_resident, spill_dir=spill_dir)
        self.device = self.store.device
        self._store_args = dict(dtype=self.dtype, device=device, spill_dir=spill_dir)
        # replicas live in the budget the store's slots leave unused, never beside it
        self.spare_bytes = spare_bytes(self.specs, self.dtype.itemsize, budget_bytes)
        # Replicas (load-driven re-placement): one single-slot store per adopted expert, so that
        # dropping one frees its memory at once. The dict is replaced whole, never mutated, so a
        # layer computing on another thread sees either the old or the new set, never half of one.
        self._replicas: dict[ExpertKey, tuple[ExpertStore, int]] = {}   # key -> (store, hidden size)
        self._calls = self._rows = self._idle = self._replica_rows = 0
        self._compute_s = 0.0

    def compute(self, layer: int, rows: Tensor, experts: Sequence[int], counts: Sequence[int],
                hints: Sequence[tuple[int, Sequence[int]]] = ()) -> Tensor:
        """Unweighted expert outputs for rows [N, H] grouped by expert: counts[i] rows for experts[i].

        `hints`: (later layer, experts) predicted to come next; taken as prefetch hints once this
        layer's own experts are marked needed, so a hint can never evict one of them.
        Returns [N, H] on CPU. Raises ValueError for unowned experts or inconsistent inputs.
        """
        experts, counts = _int_list("experts", experts), _int_list("counts", counts)
        hint_keys = _hint_keys(hints)
        if len(experts) != len(counts):
            raise ValueError(f"{len(experts)} experts but {len(counts)} counts")
        if any(c < 0 for c in counts):
            raise ValueError(f"counts must be non-negative, got {counts}")
        if not isinstance(rows, Tensor) or rows.dim() != 2:
            raise ValueError(f"rows must be a 2-D tensor [N, H], got {getattr(rows, 'shape', type(rows))}")
        if sum(counts) != rows.shape[0]:
            raise ValueError(f"counts sum to {sum(counts)} but rows has {rows.shape[0]} rows")
        if rows.dtype != self.dtype:
            raise ValueError(f"rows are {rows.dtype} but this shard computes in {self.dtype}")
        keys: list[ExpertKey] = [(int(layer), e) for e in experts]
        replicas = self._replicas
        for k in keys:
            if k not in self._hidden and k not in replicas:
                raise ValueError(f"expert {k} (layer, expert) is not owned by this shard")
            hidden = replicas[k][1] if k in replicas else self._hidden[k]
            if hidden != rows.shape[1]:
                raise ValueError(f"rows have hidden size {rows.shape[1]} but expert {k} expects {self._hidden[k]}")

        t0 = time.perf_counter()
        x = rows.to(self.device)                   # [N, H]
        out = torch.empty_like(x)                  # [N, H]
        every = [(k, s, c) for k, s, c in zip(keys, _starts(counts), counts) if c]
        for k, s, c in every:            # replicas are resident for good: no slot to wait for
            if k in replicas:
                forward_into(out[s:s + c], replicas[k][0].get(k), x[s:s + c])
                self._replica_rows += c
        active = [a for a in every if a[0] not in replicas]
        self.store.begin_layer(k for k, _, _ in active)
        try:
            if hint_keys:
                self.store.prefetch(k for k in hint_keys if k in self._hidden)
            short = len(active) > 1
            for i, (k, s, c) in enumerate(active):
                w = self.store.get(k)
                if short:  # after get(), so a read of a later expert never competes for this one's slot
                    short = self.store.load_ahead(k2 for k2, _, _ in active[i + 1:]) > 0
                forward_into(out[s:s + c], w, x[s:s + c])
                self.store.done(k)
        finally:
            self.store.end_layer()
        out = out.cpu()
        if rows.shape[0]:
            self._calls += 1
            self._rows += rows.shape[0]
            self._compute_s += time.perf_counter() - t0
        else:   # a message with no rows (the compiled-graph transport sends one to idle actors): hints only
            self._idle += 1
        return out

    def run_layer(self, msg: bytes) -> bytes:
        """Wire form of compute: {"op": "run_layer", layer, experts, counts[, hints][, residency]} + "rows"
        -> {compute_s, stall_s, all_resident[, resident]} + "out" (see docs/wire.md)."""
        header, tensors = wire.decode(msg)
        if header.get("op") != "run_layer":
            raise WireError(f"expected op 'run_layer', got {header.get('op')!r}")
        layer = header.get("layer")
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise WireError(f"layer must be an int, got {layer!r}")
        if "rows" not in tensors:
            raise WireError(f"run_layer message has no 'rows' tensor (has {sorted(tensors)})")
        t0, stall0 = time.perf_counter(), self.store.stall_seconds
        out = self.compute(layer, tensors["rows"], header.get("experts"), header.get("counts"),
                           header.get("hints", ()))
        reply = {"compute_s": time.perf_counter() - t0, "stall_s": self.store.stall_seconds - stall0,
                 "all_resident": self.store.all_resident}
        if header.get("residency"):     # asked for by cache-aware routing: what this actor holds now
            reply["resident"] = self.residency()
        return wire.encode(reply, {"out": out})

    def residency(self) -> list[list]:
        """[[layer, [expert, ...]], ...]: the experts holding a slot now (loaded or being read), by layer."""
        by_layer: dict[int, list[int]] = {}
        for layer, expert in sorted(self.store.claimed_keys()):
            by_layer.setdefault(layer, []).append(expert)
        return [[layer, experts] for layer, experts in by_layer.items()]

    def prefetch(self, layer: int, experts: Iterable[int]) -> None:
        """Background-load these experts of `layer` if owned and they fit; never blocks."""
        self.store.prefetch(k for k in ((int(layer), int(e)) for e in experts) if k in self._hidden)

    def report(self) -> dict:
        """Owned experts, tensors ever loaded, bytes resident, call counters and cache stats."""
        return {
            "owned": [list(s.key) for s in self.specs],
            "loaded_tensors": self.store.loaded_tensor_keys(),
            "bytes_resident": self.store.resident_bytes(),
            "budget_bytes": self.budget_bytes,
            "calls": self._calls,
            "idle_messages": self._idle,
            "rows": self._rows,
            "compute_s": self._compute_s,
            "rss_bytes": psutil.Process().memory_info().rss,
            "torch_threads": torch.get_num_threads(),
            "replicas": len(self._replicas),
            "replica_rows": self._replica_rows,
            "replica_bytes": sum(r.resident_bytes() for r, _ in self._replicas.values()),
            "spare_bytes": self.spare_bytes,
            **self.store.stats(),
        }

    def drop_resident(self) -> dict:
        """Forget every resident expert (ExpertStore.drop_resident): the next layer reads from disk again."""
        return self.store.drop_resident()

    def adopt(self, specs: list[dict]) -> list[list[int]]:
        """Load these experts as replicas (fully resident, in the budget this shard's slots leave
        unused) and serve them from then on; returns the (layer, expert) keys now held as replicas.
        Blocks until every new replica is loaded: the coordinator routes no rows to it before this
        returns. Experts owned already or adopted already are skipped. BudgetError, with nothing
        loaded, when the replicas would not fit the spare budget."""
        parsed = [ExpertSpec.from_dict(d) for d in specs]
        todo = list({s.key: s for s in parsed if s.key not in self._hidden and s.key not in self._replicas}.values())
        held = sum(store.slot_bytes for store, _ in self._replicas.values())   # one slot of expert_nbytes each
        need = held + sum(expert_nbytes(s, self.dtype.itemsize) for s in todo)
        if self.spare_bytes is not None and need > self.spare_bytes:
            raise BudgetError(
                f"{len(todo)} more replica(s) would make {format_bytes(need)} of replicas, but this shard's budget "
                f"({format_bytes(self.budget_bytes)}) leaves {format_bytes(self.spare_bytes)} after its "
                f"{self.store.num_slots} slots of {format_bytes(self.store.slot_bytes)}; raise worker_memory or "
                "plan fewer replicas (RemoteExperts.replica_slots)",
                needed_bytes=self.budget_bytes + need - self.spare_bytes, budget_bytes=self.budget_bytes)
        new: dict[ExpertKey, tuple[ExpertStore, int]] = {}
        try:
            for s in todo:
                store = ExpertStore([s], None, loader_threads=1, **self._store_args)
                new[s.key] = (store, s.hidden_size)
                store.get(s.key)      # the read happens here, before anything is routed to it
        except BaseException:
            for store, _ in new.values():
                store.close()
            raise
        self._replicas = {**self._replicas, **new}
        return sorted([list(k) for k in self._replicas])

    def release(self, keys: Iterable[Sequence[int]]) -> list[list[int]]:
        """Drop these replicas and free their memory (unknown keys are ignored: a release may be
        repeated); returns the keys still held as replicas."""
        gone = {tuple(k) for k in keys} & self._replicas.keys()
        old = self._replicas
        self._replicas = {k: v for k, v in old.items() if k not in gone}
        for k in gone:
            old[k][0].close()
        return sorted([list(k) for k in self._replicas])

    def ping(self) -> bool:
        """Liveness check."""
        return True

    def close(self) -> None:
        """Stop background loading and release files and memory."""
        self.store.close()
        self.release(list(self._replicas))


def _hint_keys(hints: Any) -> list[ExpertKey]:
    """[(layer, [expert, ...]), ...] -> [(layer, expert), ...]; ValueError if it has another shape."""
    if not isinstance(hints, (list, tuple)):
        raise ValueError(f"hints must be a list of [layer, [experts]] pairs, got {hints!r}")
    keys = []
    for h in hints:
        if not (isinstance(h, (list, tuple)) and len(h) == 2 and isinstance(h[0], int)):
            raise ValueError(f"each hint must be [layer, [experts]], got {h!r}")
        keys += [(h[0], e) for e in _int_list("hinted experts", h[1])]
    return keys


def _starts(counts: Sequence[int]) -> list[int]:
    out, s = [], 0
    for c in counts:
        out.append(s)
        s += c
    return out
