"""ExpertStore: a byte-budgeted cache of routed experts, paged from safetensors files.

Memory is a fixed pool of slots, one contiguous buffer per resident expert, sized for the
largest owned expert as held (its format: the compute dtype, or int8/int4 with scales).
Slots are allocated on first use and only freed by `close()`, so the resident set never
exceeds the budget and never fragments.

This module is the thin part: the one lock, the loader threads and the public API. Which
slot an expert takes and who is evicted is `workers/slots.py` (pure bookkeeping); reading
a slot (pread, spill files, dtype conversion and quantization) is `workers/reader.py`.
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import deque
from contextlib import contextmanager
from typing import Iterable, Iterator

import torch

from .budget import check_budget, slot_bytes, slot_layout
from .errors import ExpertLoadError
from .formats import FILE_DTYPES, format_of
from .kernels import activation_fn
from .reader import SPILL_COUNTER, ExpertReader
from .slots import POLICIES, Claim, ExpertInfo, Load, SlotTable
from .spec import ExpertKey, ExpertSpec

log = logging.getLogger(__name__)

__all__ = ["ExpertStore", "POLICIES"]


class ExpertStore:
    """Expert cache keyed by (layer, expert) with a byte budget, eviction policy and prefetch.

    Weights returned by `get` are views into a slot: valid until the same caller's
    next `get` or `end_layer`. Intended for one consuming thread (plus the store's
    own loader threads).

    Background loads come in two kinds, both claiming their slot at once in the
    caller's thread (so what is anticipated does not depend on thread timing) and
    read by loader threads, the current layer's first:
    - `load_ahead(keys)`: experts the current layer needs next;
    - `prefetch(keys)`: hints for later layers. A hint never evicts a needed, pinned or
      in-use expert, nor another unused hint, nor an expert hotter than the hint is worth
      (one use times the hints' measured precision). An unused hint is protected from
      demand eviction until its layer runs (or a newer hint for that layer leaves it out),
      then counts as wasted, so a wrong guess costs its read and one cold slot, no more.
    """

    def __init__(self, specs: list[ExpertSpec], budget_bytes: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 policy: str = "lfu-decay", pinned: Iterable[ExpertKey] = (), min_resident: int = 1,
                 loader_threads: int = 2, half_life: float = 256.0, wait_timeout_s: float = 120.0,
                 spill_dir: str | os.PathLike | None = None):
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; choose from {POLICIES}")
        self.device = torch.device(device or "cpu")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device} requested but torch.cuda.is_available() is False")
        self.dtype, self.policy, self.budget_bytes = dtype, policy, budget_bytes
        self._timeout = wait_timeout_s
        self.spill_dir = spill_dir
        infos: dict[ExpertKey, ExpertInfo] = {}
        for s in specs:
            if s.key in infos:
                raise ValueError(f"expert {s.key} listed twice")
            infos[s.key] = self._make_info(s)
        pinned = frozenset(tuple(k) for k in pinned)
        if unknown := pinned - infos.keys():
            raise ValueError(f"pinned experts {sorted(unknown)} are not owned by this store")
        owned = [i.spec for i in infos.values()]
        self.slot_bytes = slot_bytes(owned, dtype.itemsize)
        self.num_slots = check_budget(owned, dtype.itemsize, budget_bytes, min_resident=min_resident,
                                      pinned=pinned)
        self._t = SlotTable(infos, self.num_slots, policy, pinned, half_life)
        self.reader = ExpertReader(owned, dtype, self.device, spill_dir)
        self._slots: list[torch.Tensor | None] = [None] * self.num_slots  # uint8 [slot_bytes]
        self._cv = threading.Condition()  # the one lock
        # Loader threads wait on their own condition (same lock), woken only when reads are queued or the
        # store closes: a wake-up per layer (begin_layer, completions) would make them take the GIL from
        # the thread computing the layer for nothing.
        self._work = threading.Condition(self._cv)
        self._stall = 0.0
        self._loads_at_drop = 0                    # loads counted before the last drop_resident
        self._loaded_tensors: set[str] = set()  # tensor keys ever loaded, for reports
        self._queue: deque[ExpertKey] = deque()   # claimed keys waiting for a loader (current layer first)
        self._running = 0                          # reads in progress in loader threads
        self._closed = False
        self._threads = [threading.Thread(target=self._loader_loop, name=f"expert-loader-{i}", daemon=True)
                         for i in range(max(1, loader_threads))]
        for t in self._threads:
            t.start()
        log.info("ExpertStore: %d experts, %d slots x %d B (budget %s), policy %s, device %s",
                 len(infos), self.num_slots, self.slot_bytes, budget_bytes, policy, self.device)

    def _make_info(self, s: ExpertSpec) -> ExpertInfo:
        """Validate a spec and lay the tensors its format holds out in one slot."""
        activation_fn(s.activation)
        h, i = s.hidden_size, s.intermediate_size
        if not all(len(t.shape) == 2 for t in s.tensors) or s.up.shape != s.gate.shape or s.down.shape[0] != h:
            raise ValueError(f"expert {s.key}: shapes gate {s.gate.shape}, up {s.up.shape}, down {s.down.shape} "
                             "are not [I,H], [I,H], [H,I]")
        for t in (*s.tensors, *s.scales):
            if t.dtype not in FILE_DTYPES:
                raise ValueError(f"expert {s.key} tensor {t.key}: unsupported file dtype {t.dtype}")
            if t.nbytes != math.prod(t.shape) * FILE_DTYPES[t.dtype].itemsize:
                raise ValueError(f"expert {s.key} tensor {t.key}: nbytes {t.nbytes} != {t.shape} x {t.dtype}")
        fmt = format_of(s)
        fmt.check(s)
        if fmt.name == "dense" and (s.gate.shape != (i, h) or s.down.shape != (h, i)):
            raise ValueError(f"expert {s.key}: shapes gate {s.gate.shape}, up {s.up.shape}, down {s.down.shape} "
                             "are not [I,H], [I,H], [H,I]")
        layout, span = slot_layout(s, self.dtype.itemsize)
        return ExpertInfo(s, layout, nbytes=sum(nb for _, nb, _ in layout), span=span)

    # ---- public API -------------------------------------------------------------------------

    def get(self, key: ExpertKey):
        """Return the expert's weights. A hit: it is resident, or was claimed ahead (by `load_ahead`
        or a hint) and is still loading, a late hit that waits for the read or, if the read has
        not started, does it here. A miss: nothing claimed it, so it is loaded here and now."""
        t0 = time.perf_counter()
        with self._cv:
            t = self._t
            info = t.info(key)
            t.touch(info)
            if info.hinted:
                t.c["prefetch_used"] += 1
                t.unhint(info)
            waited = info.loading is Load.RUNNING
            while info.loading is Load.RUNNING:  # a loader thread is reading it
                if not self._cv.wait(self._timeout):
                    raise ExpertLoadError(f"timed out after {self._timeout}s waiting for expert {key} to load")
            hit = info.slot is not None       # None here: never claimed, or its read just failed
            t.count_access(info.spec.key, hit)
            if info.weights is not None:
                if waited:
                    t.c["late_hits"] += 1
                    self._stall += time.perf_counter() - t0
                return info.weights
            if hit:  # claimed, read still queued: read it here rather than wait in line
                t.c["late_hits"] += 1
                info.loading = Load.RUNNING
                slot = info.slot
            else:
                slot = self._reserve(info, Claim.DEMAND)
        weights = self._load_into(info, slot)
        with self._cv:
            self._complete(info, weights)
            self._stall += time.perf_counter() - t0
        return weights

    def begin_layer(self, keys: Iterable[ExpertKey]) -> None:
        """Mark the keys the current layer needs (no background load evicts them); hints for this
        layer that it does not need have been wrong: they lose their protection."""
        with self._cv:
            self._t.begin_layer(keys)
            self._cv.notify_all()

    def done(self, key: ExpertKey) -> None:
        """The current layer has finished with `key`; it may be evicted for later work."""
        with self._cv:
            self._t.needed.discard(tuple(key))

    def end_layer(self) -> None:
        """Clear the needed set."""
        with self._cv:
            self._t.needed = set()
            self._t.last_got = None

    @contextmanager
    def needed(self, keys: Iterable[ExpertKey]) -> Iterator[None]:
        """Context form of begin_layer/end_layer."""
        self.begin_layer(keys)
        try:
            yield
        finally:
            self.end_layer()

    def load_ahead(self, keys: Iterable[ExpertKey]) -> int:
        """Claim slots for keys the current layer will `get` next and read them in the background,
        ahead of any hint. Returns how many could not be claimed (no evictable slot yet)."""
        short = 0
        with self._cv:
            if self._closed:
                return 0
            ahead = []
            for k in keys:
                info = self._t.infos.get(tuple(k))
                if info is None or info.slot is not None:
                    continue
                if self._reserve(info, Claim.AHEAD) is None:
                    short += 1
                    continue
                self._t.c["ahead_loads"] += 1
                ahead.append(info.spec.key)
            self._queue.extendleft(reversed(ahead))
            if ahead:
                self._work.notify(len(ahead))
        return short

    def prefetch(self, keys: Iterable[ExpertKey]) -> None:
        """Hints: owned keys expected in later layers. Claims a slot for each that is not resident
        and may take one (see the class docstring), queues its read, and never blocks. A newer hint
        for a layer replaces the older ones: those it leaves out lose their protection."""
        with self._cv:
            if self._closed:
                return
            t = self._t
            wanted = [tuple(k) for k in keys if tuple(k) in t.infos]
            for layer in {k[0] for k in wanted}:
                t.expire_hints(layer, keep=set(wanted))
            for k in wanted:
                info = t.infos[k]
                if info.slot is not None:
                    continue
                t.c["prefetch_hints"] += 1
                if self._reserve(info, Claim.HINT) is None:
                    t.c["prefetch_dropped"] += 1
                    continue
                t.c["prefetch_issued"] += 1
                t.hint(info)
                self._queue.append(k)
            if self._queue:
                self._work.notify(len(self._queue))

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no background read is queued or running; False if `timeout` passed first."""
        with self._cv:
            return self._cv.wait_for(lambda: self._closed or not (self._queue or self._running), timeout)

    def resident_keys(self) -> list[ExpertKey]:
        """Keys whose weights are fully loaded."""
        with self._cv:
            return self._t.resident()

    def claimed_keys(self) -> list[ExpertKey]:
        """Keys holding a slot: loaded, or claimed and being read (what `get` counts as a hit)."""
        with self._cv:
            return [k for k in self._t.owner if k is not None]

    def resident_bytes(self) -> int:
        """Bytes of expert data (as held) in occupied slots (loaded or being loaded); never above the budget."""
        with self._cv:
            return self._t.occupied_bytes()

    @property
    def holds_all(self) -> bool:
        """The budget has a slot for every owned expert: once read, none is ever evicted."""
        return self.num_slots == len(self._t.infos)

    @property
    def all_resident(self) -> bool:
        """Every owned expert is loaded and none can ever be evicted (the budget holds them all)."""
        # with a slot per expert nothing is ever evicted, so each expert completes one load (since the last drop)
        return self.num_slots == len(self._t.infos) and \
            self._t.c["loads"] - self._loads_at_drop >= len(self._t.infos)

    def drop_resident(self, timeout: float | None = None) -> dict:
        """Forget every resident expert (pinned ones too), so the next use of each reads it again: the
        cold state of a fresh store, with the slots still allocated and counters and policy scores kept.
        Waits for background reads first, at most `timeout` s (default: the store's load timeout; a read
        still running then keeps its slot). Returns {"experts": dropped, "bytes": their bytes as held}."""
        self.wait_idle(self._timeout if timeout is None else timeout)
        with self._cv:
            n, nbytes = self._t.drop_idle()
            self._loads_at_drop = self._t.c["loads"]
            self._cv.notify_all()
        return {"experts": n, "bytes": nbytes}

    def loaded_tensor_keys(self) -> list[str]:
        """Names of every tensor loaded at least once, sorted."""
        with self._cv:
            return sorted(self._loaded_tensors)

    @property
    def stall_seconds(self) -> float:
        """Time callers of `get` have spent waiting for loads, since construction."""
        return self._stall

    @property
    def open_files(self) -> int:
        """Checkpoint files the reader holds open (0 after `close`)."""
        return self.reader.open_files

    @property
    def threads_alive(self) -> int:
        """Loader threads still running (0 after `close`)."""
        return sum(t.is_alive() for t in self._threads)

    def stats(self) -> dict:
        """Counters since construction, plus per-layer hits/misses."""
        with self._cv:
            t = self._t
            return {**t.c, "stall_seconds": self._stall, "per_layer": {k: dict(v) for k, v in t.per_layer.items()},
                    "slots": self.num_slots, "slot_bytes": self.slot_bytes,
                    "slots_allocated": sum(s is not None for s in self._slots)}

    def close(self, timeout: float = 5.0) -> None:
        """Stop loader threads (bounded wait), close files and free slots."""
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._queue.clear()
            self._cv.notify_all()
            self._work.notify_all()
        for th in self._threads:
            th.join(timeout)
        with self._cv:
            self.reader.close()
            self._slots = [None] * self.num_slots

    # ---- claims (all under self._cv) --------------------------------------------------------

    def _reserve(self, info: ExpertInfo, claim: Claim) -> int | None:
        """Claim a free slot or a victim's slot for `info`: queued for a loader thread for a
        background claim (None if no slot may be taken), else running here (waits for a slot)."""
        deadline = time.monotonic() + self._timeout
        while (slot := self._t.pick_slot(info, claim)) is None:
            if claim is not Claim.DEMAND:
                return None
            # every slot is pinned or mid-load: wait for a load to finish
            if not self._cv.wait(max(0.0, deadline - time.monotonic())):
                raise ExpertLoadError(f"no slot freed within {self._timeout}s for expert {info.spec.key}")
        self._t.claim(info, slot, Load.RUNNING if claim is Claim.DEMAND else Load.QUEUED)
        if self._slots[slot] is None:
            self._slots[slot] = torch.empty(self.slot_bytes, dtype=torch.uint8, device=self.device)
        return slot

    def _complete(self, info: ExpertInfo, weights) -> None:
        self._t.complete(info, weights)
        self._loaded_tensors.update(t.key for t in (*info.spec.tensors, *info.spec.scales))
        self._cv.notify_all()

    # ---- loading (outside the lock; the reserved slot is invisible to readers) ---------------

    def _load_into(self, info: ExpertInfo, slot: int):
        """Read the expert into its slot (workers/reader.py); on failure free the slot and raise."""
        try:
            weights, found, wrote = self.reader.read(info, self._slots[slot])
        except BaseException:
            with self._cv:
                self._t.c["load_errors"] += 1
                self._t.release(info)
                self._cv.notify_all()
            raise
        if found is not None:
            with self._cv:
                self._t.c[SPILL_COUNTER[found]] += 1
                self._t.c["spill_writes"] += wrote
        return weights

    def _loader_loop(self) -> None:
        """Read claimed slots in queue order; a claim `get` took over or a cancelled one is skipped."""
        while True:
            with self._cv:
                self._work.wait_for(lambda: self._closed or self._queue)
                if self._closed:
                    return
                info = self._t.infos[self._queue.popleft()]
                if info.loading is not Load.QUEUED:
                    continue
                info.loading = Load.RUNNING
                slot, hinted = info.slot, info.hinted
                self._running += 1
            try:
                weights = self._load_into(info, slot)
            except Exception as e:  # a background read failing must not kill the thread; get() reports it
                log.warning("background load of expert %s failed: %s", info.spec.key, e)
                weights = None
            with self._cv:
                self._running -= 1
                if weights is not None:
                    self._complete(info, weights)
                    if hinted:
                        t = self._t
                        t.c["bytes_prefetched"] += info.spec.file_nbytes
                        # recency = now so the next hint does not evict it at once (decay folded in first)
                        if self.policy == "lfu-decay":
                            info.freq = t.score(info)
                        info.last_tick = t.tick
                self._cv.notify_all()

