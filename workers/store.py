"""ExpertStore: a byte-budgeted cache of routed experts, paged from safetensors files.

Memory is a fixed pool of slots, one contiguous buffer per resident expert, sized
for the largest owned expert in the compute dtype. Slots are allocated on first
use and only freed by `close()`, so the resident set never exceeds the budget and
never fragments. Weights are read with `os.preadv` at each tensor's absolute file
offset, then dropped from the page cache so the budget is the real footprint.
Outside the budget: one staging buffer per loading thread (the largest single
tensor), used only when converting dtypes or copying to CUDA.
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

from . import spill
from .budget import SlotLayout, check_budget, slot_bytes, slot_layout
from .errors import ExpertLoadError
from .kernels import ExpertWeights, activation_fn
from .spec import DTYPE_SIZES, ExpertKey, ExpertSpec, TensorSpec

log = logging.getLogger(__name__)

POLICIES = ("lru", "lfu", "lfu-decay")
FILE_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
# spill lookups: a hit, no file yet (the read writes one), a file from another source (replaced)
_SPILL_COUNTER = {"hit": "spill_reads", "absent": "spill_misses", "stale": "spill_stale"}


@dataclass
class ExpertInfo:
    """Cache bookkeeping for one owned expert (resident or not)."""

    spec: ExpertSpec
    layout: SlotLayout                                # (byte offset in slot, nbytes, shape) per gate/up/down
    nbytes: int                                       # data bytes in the compute dtype
    span: int                                         # slot bytes: each tensor padded to SLOT_ALIGN
    slot: int | None = None                           # set while claimed (queued or loading) or resident
    weights: ExpertWeights | None = None              # set once the slot holds complete data
    loading: str | None = None                        # "queued" (claimed, read not started) or "running"
    freq: float = 0.0                                 # access count (decayed for lfu-decay)
    last_tick: int = -1                               # access tick of the last use
    hinted: bool = False                              # claimed by a prefetch hint and not yet used


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
        self._decay = 0.5 ** (1.0 / half_life)  # per access tick
        self._timeout = wait_timeout_s
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        self._spill = spill.SpillDir(self.spill_dir) if self.spill_dir is not None else None
        self._dtype_name = str(dtype).removeprefix("torch.")
        self._infos: dict[ExpertKey, ExpertInfo] = {}
        for s in specs:
            if s.key in self._infos:
                raise ValueError(f"expert {s.key} listed twice")
            self._infos[s.key] = self._make_info(s)
        self._pinned = frozenset(tuple(k) for k in pinned)
        if unknown := self._pinned - self._infos.keys():
            raise ValueError(f"pinned experts {sorted(unknown)} are not owned by this store")
        owned = [i.spec for i in self._infos.values()]
        self.slot_bytes = slot_bytes(owned, dtype.itemsize)
        n = len(self._infos)
        self.num_slots = check_budget(owned, dtype.itemsize, budget_bytes, min_resident=min_resident,
                                      pinned=self._pinned)
        self._slots: list[torch.Tensor | None] = [None] * self.num_slots  # uint8 [slot_bytes]
        self._owner: list[ExpertKey | None] = [None] * self.num_slots
        self._needed: set[ExpertKey] = set()
        self._last_got: ExpertKey | None = None
        self._hints: dict[int, set[ExpertKey]] = {}   # layer -> unused hints of that layer
        self._tick = 0
        self._cv = threading.Condition()  # the one lock
        self._c = dict.fromkeys((
            "hits", "late_hits", "misses", "loads", "bytes_read", "spill_reads", "spill_misses", "spill_stale",
            "spill_writes", "ahead_loads",
            "bytes_prefetched", "prefetch_hints", "prefetch_issued", "prefetch_dropped", "prefetch_used",
            "prefetch_wasted", "evictions", "load_errors"), 0)
        self._stall = 0.0
        self._per_layer: dict[int, dict[str, int]] = {}
        self._loaded_tensors: set[str] = set()  # tensor keys ever loaded, for reports
        self._fds: dict[str, int] = {}
        self._local = threading.local()  # per-thread staging buffer
        self._stage_bytes = max((t.nbytes for i in self._infos.values() for t in _tensors(i.spec)), default=0)
        self._queue: deque[ExpertKey] = deque()   # claimed keys waiting for a loader (current layer first)
        self._running = 0                          # reads in progress in loader threads
        self._closed = False
        self._threads = [threading.Thread(target=self._loader_loop, name=f"expert-loader-{i}", daemon=True)
                         for i in range(max(1, loader_threads))]
        for t in self._threads:
            t.start()
        log.info("ExpertStore: %d experts, %d slots x %d B (budget %s), policy %s, device %s",
                 n, self.num_slots, self.slot_bytes, budget_bytes, policy, self.device)

    def _make_info(self, s: ExpertSpec) -> ExpertInfo:
        """Validate a spec and lay its three tensors out in one slot."""
        activation_fn(s.activation)
        shapes = (s.gate.shape, s.up.shape, s.down.shape)
        if not (all(len(x) == 2 for x in shapes) and shapes[0] == shapes[1] == shapes[2][::-1]):
            raise ValueError(f"expert {s.key}: shapes gate {s.gate.shape}, up {s.up.shape}, down {s.down.shape} "
                             "are not [I,H], [I,H], [H,I]")
        for t in _tensors(s):
            if t.dtype not in FILE_DTYPES:
                raise ValueError(f"expert {s.key} tensor {t.key}: unsupported file dtype {t.dtype}")
            if t.nbytes != math.prod(t.shape) * DTYPE_SIZES[t.dtype]:
                raise ValueError(f"expert {s.key} tensor {t.key}: nbytes {t.nbytes} != {t.shape} x {t.dtype}")
        layout, span = slot_layout(s, self.dtype.itemsize)
        return ExpertInfo(s, layout, nbytes=sum(nb for _, nb, _ in layout), span=span)

    # ---- public API -------------------------------------------------------------------------

    def get(self, key: ExpertKey) -> ExpertWeights:
        """Return the expert's weights. A hit: it is resident, or was claimed ahead (by `load_ahead`
        or a hint) and is still loading, a late hit that waits for the read or, if the read has
        not started, does it here. A miss: nothing claimed it, so it is loaded here and now."""
        t0 = time.perf_counter()
        with self._cv:
            info = self._info(key)
            self._touch(info)
            if info.hinted:
                self._c["prefetch_used"] += 1
                self._unhint(info)
            waited = info.loading == "running"
            while info.loading == "running":  # a loader thread is reading it
                if not self._cv.wait(self._timeout):
                    raise ExpertLoadError(f"timed out after {self._timeout}s waiting for expert {key} to load")
            hit = info.slot is not None       # None here: never claimed, or its read just failed
            stats = self._per_layer.setdefault(key[0], {"hits": 0, "misses": 0})
            self._c["hits" if hit else "misses"] += 1
            stats["hits" if hit else "misses"] += 1
            self._last_got = info.spec.key
            if info.weights is not None:
                if waited:
                    self._c["late_hits"] += 1
                    self._stall += time.perf_counter() - t0
                return info.weights
            if hit:  # claimed, read still queued: read it here rather than wait in line
                self._c["late_hits"] += 1
                info.loading = "running"
                slot = info.slot
            else:
                slot = self._reserve(info)
        weights = self._load_into(info, slot)
        with self._cv:
            self._complete(info, weights)
            self._stall += time.perf_counter() - t0
        return weights

    def begin_layer(self, keys: Iterable[ExpertKey]) -> None:
        """Mark the keys the current layer needs (no background load evicts them); hints for this
        layer that it does not need have been wrong: they lose their protection."""
        with self._cv:
            self._needed = {tuple(k) for k in keys} & self._infos.keys()
            for layer in {k[0] for k in self._needed}:
                self._expire_hints(layer, keep=self._needed)

    def done(self, key: ExpertKey) -> None:
        """The current layer has finished with `key`; it may be evicted for later work."""
        with self._cv:
            self._needed.discard(tuple(key))

    def end_layer(self) -> None:
        """Clear the needed set."""
        with self._cv:
            self._needed = set()
            self._last_got = None

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
                info = self._infos.get(tuple(k))
                if info is None or info.slot is not None:
                    continue
                slot = self._reserve(info, background=True)
                if slot is None:
                    short += 1
                    continue
                self._c["ahead_loads"] += 1
                ahead.append(info.spec.key)
            self._queue.extendleft(reversed(ahead))
            if ahead:
                self._cv.notify_all()
        return short

    def prefetch(self, keys: Iterable[ExpertKey]) -> None:
        """Hints: owned keys expected in later layers. Claims a slot for each that is not resident
        and may take one (see the class docstring), queues its read, and never blocks. A newer hint
        for a layer replaces the older ones: those it leaves out lose their protection."""
        with self._cv:
            if self._closed:
                return
            wanted = [tuple(k) for k in keys if tuple(k) in self._infos]
            for layer in {k[0] for k in wanted}:
                self._expire_hints(layer, keep=set(wanted))
            queued = False
            for k in wanted:
                info = self._infos[k]
                if info.slot is not None:
                    continue
                self._c["prefetch_hints"] += 1
                slot = self._reserve(info, hint=True)
                if slot is None:
                    self._c["prefetch_dropped"] += 1
                    continue
                self._c["prefetch_issued"] += 1
                info.hinted = True
                self._hints.setdefault(k[0], set()).add(k)
                self._queue.append(k)
                queued = True
            if queued:
                self._cv.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no background read is queued or running; False if `timeout` passed first."""
        with self._cv:
            return self._cv.wait_for(lambda: self._closed or not (self._queue or self._running), timeout)

    def resident_keys(self) -> list[ExpertKey]:
        """Keys whose weights are fully loaded."""
        with self._cv:
            return [k for k in self._owner if k is not None and self._infos[k].weights is not None]

    def resident_bytes(self) -> int:
        """Bytes of expert data in occupied slots (loaded or being loaded); never above the budget."""
        with self._cv:
            return sum(self._infos[k].nbytes for k in self._owner if k is not None)

    @property
    def all_resident(self) -> bool:
        """Every owned expert is loaded and none can ever be evicted (the budget holds them all)."""
        # with a slot per expert nothing is ever evicted, so each expert completes one load
        return self.num_slots == len(self._infos) and self._c["loads"] >= len(self._infos)

    def loaded_tensor_keys(self) -> list[str]:
        """Names of every tensor loaded at least once, sorted."""
        with self._cv:
            return sorted(self._loaded_tensors)

    @property
    def stall_seconds(self) -> float:
        """Time callers of `get` have spent waiting for loads, since construction."""
        return self._stall

    def stats(self) -> dict:
        """Counters since construction, plus per-layer hits/misses."""
        with self._cv:
            return {**self._c, "stall_seconds": self._stall, "per_layer": {k: dict(v) for k, v in self._per_layer.items()},
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
        for t in self._threads:
            t.join(timeout)
        with self._cv:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            self._slots = [None] * self.num_slots

    # ---- cache state (all under self._cv) ---------------------------------------------------

    def _info(self, key: ExpertKey) -> ExpertInfo:
        info = self._infos.get(tuple(key))
        if info is None:
            raise ValueError(f"expert {tuple(key)} is not owned by this store")
        return info

    def _touch(self, info: ExpertInfo) -> None:
        self._tick += 1
        info.freq = (self._score(info) if self.policy == "lfu-decay" else info.freq) + 1
        info.last_tick = self._tick

    def _score(self, info: ExpertInfo) -> float:
        """Eviction priority (lower goes first); ties are broken by recency."""
        if self.policy == "lru":
            return 0.0
        if self.policy == "lfu":
            return info.freq
        return info.freq * self._decay ** (self._tick - info.last_tick)

    def _hint_precision(self) -> float:
        """Share of hints used by the layer they were for (Laplace-smoothed, so 0.5 before any)."""
        used, wasted = self._c["prefetch_used"], self._c["prefetch_wasted"]
        return (used + 1) / (used + wasted + 2)

    def _victim(self, demand: bool, hint_for: ExpertInfo | None = None) -> ExpertInfo | None:
        """Choose a loaded, unpinned expert to evict, or None.

        Demand (`get`): anything loaded, preferring experts the current layer does not need and
        then experts no unused hint holds. Background: never a needed expert, the one `get`
        handed out last, or an unused hint; for a hint (`hint_for`), only one colder than the
        hint is worth.
        """
        cands = [i for k in self._owner if k is not None and k not in self._pinned
                 for i in [self._infos[k]] if i.weights is not None]
        if demand:
            for keep in (lambda i: i.spec.key not in self._needed and not i.hinted,
                         lambda i: i.spec.key not in self._needed):
                if pool := [i for i in cands if keep(i)]:
                    cands = pool
                    break
        else:
            cands = [i for i in cands if i.spec.key not in self._needed and i.spec.key != self._last_got
                     and not i.hinted]
        victim = min(cands, key=lambda i: (self._score(i), i.last_tick), default=None)
        if victim is not None and hint_for is not None \
                and self._score(victim) >= self._score(hint_for) + self._hint_precision():
            return None
        return victim

    def _reserve(self, info: ExpertInfo, background: bool = False, hint: bool = False) -> int | None:
        """Claim a free slot or a victim's slot for `info`: queued for a loader thread when
        `background`/`hint` (None if no slot may be taken), else running here (waits for a slot)."""
        deadline = time.monotonic() + self._timeout
        while True:
            free = self._owner.count(None)
            # a hint leaves free slots to the current layer's experts that still need one
            if free and (not hint or free > sum(self._infos[k].slot is None for k in self._needed)):
                slot = self._owner.index(None)
            elif (victim := self._victim(not (background or hint), info if hint else None)) is not None:
                slot = victim.slot
            elif background or hint:
                return None
            else:  # every slot is pinned or mid-load: wait for a load to finish
                if not self._cv.wait(max(0.0, deadline - time.monotonic())):
                    raise ExpertLoadError(f"no slot freed within {self._timeout}s for expert {info.spec.key}")
                continue
            self._claim(info, slot, "queued" if background or hint else "running")
            return slot

    def _claim(self, info: ExpertInfo, slot: int, loading: str) -> None:
        """Give `slot` to `info` (evicting its occupant) for a read that is queued or running."""
        if (old := self._owner[slot]) is not None:
            victim = self._infos[old]
            self._c["evictions"] += 1
            if victim.hinted:
                self._c["prefetch_wasted"] += 1
                self._unhint(victim)
            victim.slot, victim.weights = None, None
            log.debug("evict %s from slot %d", old, slot)
        if self._slots[slot] is None:
            self._slots[slot] = torch.empty(self.slot_bytes, dtype=torch.uint8, device=self.device)
        self._owner[slot] = info.spec.key
        info.slot, info.weights, info.loading = slot, None, loading

    def _complete(self, info: ExpertInfo, weights: ExpertWeights) -> None:
        """The read into the claimed slot finished."""
        info.weights, info.loading = weights, None
        self._c["loads"] += 1
        self._c["bytes_read"] += info.spec.file_nbytes
        self._loaded_tensors.update(t.key for t in _tensors(info.spec))
        self._cv.notify_all()

    def _release(self, info: ExpertInfo) -> None:
        """Free the slot of a claim whose read failed or was cancelled."""
        if info.slot is not None:
            self._owner[info.slot] = None
        if info.hinted:
            self._unhint(info)
        info.slot, info.weights, info.loading = None, None, None
        self._cv.notify_all()

    def _unhint(self, info: ExpertInfo) -> None:
        info.hinted = False
        self._hints.get(info.spec.key[0], set()).discard(info.spec.key)

    def _expire_hints(self, layer: int, keep: set[ExpertKey]) -> None:
        """Unused hints of `layer` outside `keep` were wrong: unprotect them (cancel unstarted reads)."""
        for k in list(self._hints.get(layer, ())):
            if k in keep:
                continue
            info = self._infos[k]
            self._c["prefetch_wasted"] += 1
            if info.loading == "queued":
                self._release(info)
            else:
                self._unhint(info)

    # ---- loading (outside the lock; the reserved slot is invisible to readers) ---------------

    def _load_into(self, info: ExpertInfo, slot: int) -> ExpertWeights:
        """Read the expert's three tensors into its slot; on failure free the slot and raise.

        With a spill directory, an expert is read from the checkpoint once, then written there
        as its slot image (compute dtype, one contiguous span) and read back with one preadv;
        a spill file made from other bytes (workers/spill.py) is a miss and is rewritten.
        """
        try:
            buf = self._slots[slot]
            spilling = self._spill is not None and buf.device.type == "cpu"  # CUDA slots are not spilled
            digest = self._spill_digest(info) if spilling else b""
            if not (spilling and self._read_spill(info, buf, digest)):
                for t, (off, nb, _) in zip(_tensors(info.spec), info.layout):
                    self._read_tensor(info.spec, t, buf[off:off + nb])
                if spilling:
                    self._write_spill(info, buf, digest)
            views = [buf[off:off + nb].view(self.dtype).view(shape) for off, nb, shape in info.layout]
            return ExpertWeights(*views, activation=info.spec.activation)
        except BaseException:
            with self._cv:
                self._c["load_errors"] += 1
                self._release(info)
            raise

    def _spill_digest(self, info: ExpertInfo) -> bytes:
        """The source digest of the expert's spill file: the checkpoint files as opened for reading."""
        files = {t.file: os.fstat(self._fd(info.spec, t)) for t in _tensors(info.spec)}
        return spill.source_digest(info.spec, info.layout, self._dtype_name, files)

    def _read_spill(self, info: ExpertInfo, buf: torch.Tensor, digest: bytes) -> bool:
        """Fill the slot from a spill file made from this checkpoint; False on a miss."""
        found = self._spill.read(info.spec.key, self._dtype_name, digest, memoryview(buf[:info.span].numpy()))
        with self._cv:
            self._c[_SPILL_COUNTER[found]] += 1
        return found == "hit"

    def _write_spill(self, info: ExpertInfo, buf: torch.Tensor, digest: bytes) -> None:
        if self._spill.write(info.spec.key, self._dtype_name, digest, memoryview(buf[:info.span].numpy())):
            with self._cv:
                self._c["spill_writes"] += 1

    def _read_tensor(self, spec: ExpertSpec, t: TensorSpec, dst: torch.Tensor) -> None:
        """Fill dst (uint8 bytes of the slot) with tensor t converted to the compute dtype."""
        fd = self._fd(spec, t)
        src_dtype = FILE_DTYPES[t.dtype]
        if dst.device.type == "cpu" and src_dtype == self.dtype:
            self._pread(fd, dst, t.file, t.offset, t.nbytes, f"tensor {t.key!r} of expert {spec.key}")
            return
        stage = getattr(self._local, "stage", None)
        if stage is None:
            stage = torch.empty(self._stage_bytes, dtype=torch.uint8)
            if self.device.type == "cuda" and torch.cuda.is_available():
                stage = stage.pin_memory()  # pinned so the host-to-device copy is a plain DMA
            self._local.stage = stage
        src = stage[:t.nbytes]
        self._pread(fd, src, t.file, t.offset, t.nbytes, f"tensor {t.key!r} of expert {spec.key}")
        dst.view(self.dtype).copy_(src.view(src_dtype))  # synchronous: the staging buffer is reused

    @staticmethod
    def _pread(fd: int, dst: torch.Tensor, file: str, offset: int, nbytes: int, what: str) -> None:
        """Read exactly nbytes at offset into dst (uint8), then drop them from the page cache."""
        mv, got = memoryview(dst.numpy()), 0
        try:
            while got < nbytes:
                n = os.preadv(fd, [mv[got:]], offset + got)
                if n == 0:
                    raise ExpertLoadError(f"{file}: file ended after {got} of {nbytes} bytes of {what} "
                                          f"(offset {offset}); is the file truncated?")
                got += n
        except OSError as e:
            if isinstance(e, ExpertLoadError):
                raise
            raise ExpertLoadError(f"{file}: cannot read {what}: {e}") from e
        if hasattr(os, "posix_fadvise"):  # drop it from page cache: the budget is the real footprint
            os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)

    def _fd(self, spec: ExpertSpec, t: TensorSpec) -> int:
        with self._cv:
            fd = self._fds.get(t.file)
            if fd is None:
                try:
                    fd = self._fds[t.file] = os.open(t.file, os.O_RDONLY)
                except OSError as e:
                    raise ExpertLoadError(
                        f"{t.file}: cannot open for tensor {t.key!r} of expert {spec.key}: {e}") from e
            return fd

    def _loader_loop(self) -> None:
        """Read claimed slots in queue order; a claim `get` took over or a cancelled one is skipped."""
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._closed or self._queue)
                if self._closed:
                    return
                info = self._infos[self._queue.popleft()]
                if info.loading != "queued":
                    continue
                info.loading = "running"
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
                        self._c["bytes_prefetched"] += info.spec.file_nbytes
                        # recency = now so the next hint does not evict it at once (decay folded in first)
                        if self.policy == "lfu-decay":
                            info.freq = self._score(info)
                        info.last_tick = self._tick
                self._cv.notify_all()


def _tensors(s: ExpertSpec) -> tuple[TensorSpec, TensorSpec, TensorSpec]:
    return s.gate, s.up, s.down
