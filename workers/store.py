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
import os
import queue
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

from .errors import BudgetError, ExpertLoadError
from .kernels import ExpertWeights, activation_fn
from .spec import DTYPE_SIZES, ExpertKey, ExpertSpec, TensorSpec

log = logging.getLogger(__name__)

POLICIES = ("lru", "lfu", "lfu-decay")
FILE_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_ALIGN = 64  # tensor offsets inside a slot, so every view is vector-aligned


@dataclass
class ExpertInfo:
    """Cache bookkeeping for one owned expert (resident or not)."""

    spec: ExpertSpec
    layout: list[tuple[int, int, tuple[int, ...]]]  # (byte offset in slot, nbytes, shape) per gate/up/down
    nbytes: int                                       # data bytes in the compute dtype
    span: int                                         # slot bytes: each tensor padded to _ALIGN
    slot: int | None = None                           # set while loading or resident
    weights: ExpertWeights | None = None              # set once the slot holds complete data
    freq: float = 0.0                                 # access count (decayed for lfu-decay)
    last_tick: int = -1                               # access tick of the last use
    prefetched: bool = False                          # loaded by prefetch and not yet hit


class ExpertStore:
    """Expert cache keyed by (layer, expert) with a byte budget, eviction policy and prefetch.

    Weights returned by `get` are views into a slot: valid until the same caller's
    next `get` or `end_layer`. Prefetch never evicts keys marked needed, pinned
    keys, or the expert `get` handed out last; intended for one consuming thread.
    """

    def __init__(self, specs: list[ExpertSpec], budget_bytes: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 policy: str = "lfu-decay", pinned: Iterable[ExpertKey] = (), min_resident: int = 1,
                 prefetch_threads: int = 1, half_life: float = 256.0, wait_timeout_s: float = 120.0,
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
        if self.spill_dir is not None:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
        self._infos: dict[ExpertKey, ExpertInfo] = {}
        for s in specs:
            if s.key in self._infos:
                raise ValueError(f"expert {s.key} listed twice")
            self._infos[s.key] = self._make_info(s)
        self._pinned = frozenset(tuple(k) for k in pinned)
        if unknown := self._pinned - self._infos.keys():
            raise ValueError(f"pinned experts {sorted(unknown)} are not owned by this store")
        self.slot_bytes = max((i.span for i in self._infos.values()), default=0)
        n = len(self._infos)
        need = min(n, len(self._pinned) + max(min_resident, 1))
        self.num_slots = n if budget_bytes is None else min(n, budget_bytes // max(self.slot_bytes, 1))
        if self.num_slots < need:
            mb = need * self.slot_bytes / 2**20
            raise BudgetError(
                f"budget of {budget_bytes} bytes holds {self.num_slots} experts but at least {need} must fit "
                f"({len(self._pinned)} pinned + min_resident {min_resident}); the minimum is "
                f"{need * self.slot_bytes} bytes ({mb:,.2f} MB) at {self.slot_bytes} bytes per expert in {dtype}. "
                f"Raise budget_bytes, pin fewer experts, or spread experts over more shards.")
        self._slots: list[torch.Tensor | None] = [None] * self.num_slots  # uint8 [slot_bytes]
        self._owner: list[ExpertKey | None] = [None] * self.num_slots
        self._needed: set[ExpertKey] = set()
        self._last_got: ExpertKey | None = None
        self._tick = 0
        self._cv = threading.Condition()  # the one lock
        self._c = dict.fromkeys(("hits", "misses", "loads", "bytes_read", "spill_reads", "spill_writes", "bytes_prefetched", "prefetch_hints",
                                 "prefetch_issued", "prefetch_dropped", "prefetch_used", "prefetch_wasted",
                                 "evictions", "load_errors"), 0)
        self._stall = 0.0
        self._per_layer: dict[int, dict[str, int]] = {}
        self._loaded_tensors: set[str] = set()  # tensor keys ever loaded, for reports
        self._fds: dict[str, int] = {}
        self._local = threading.local()  # per-thread staging buffer
        self._stage_bytes = max((t.nbytes for i in self._infos.values() for t in _tensors(i.spec)), default=0)
        self._queue: queue.Queue[ExpertKey | None] = queue.Queue()
        self._queued: set[ExpertKey] = set()
        self._closed = False
        self._threads = [threading.Thread(target=self._prefetch_loop, name=f"expert-prefetch-{i}", daemon=True)
                         for i in range(prefetch_threads)]
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
        layout, off = [], 0
        for t in _tensors(s):
            if t.dtype not in FILE_DTYPES:
                raise ValueError(f"expert {s.key} tensor {t.key}: unsupported file dtype {t.dtype}")
            numel = t.shape[0] * t.shape[1]
            if t.nbytes != numel * DTYPE_SIZES[t.dtype]:
                raise ValueError(f"expert {s.key} tensor {t.key}: nbytes {t.nbytes} != {t.shape} x {t.dtype}")
            layout.append((off, numel * self.dtype.itemsize, tuple(t.shape)))
            off = (off + layout[-1][1] + _ALIGN - 1) // _ALIGN * _ALIGN
        # span = every tensor padded to 64 bytes (cluster/placement.py sizes experts the same way)
        return ExpertInfo(s, layout, nbytes=sum(nb for _, nb, _ in layout), span=off)

    # ---- public API -------------------------------------------------------------------------

    def get(self, key: ExpertKey) -> ExpertWeights:
        """Return the expert's weights: a hit, a wait on its in-flight prefetch, or a synchronous load."""
        t0 = time.perf_counter()
        with self._cv:
            info = self._info(key)
            self._touch(info)
            stats = self._per_layer.setdefault(key[0], {"hits": 0, "misses": 0})
            waited = False
            while info.slot is not None and info.weights is None:  # being loaded by prefetch
                waited = True
                if not self._cv.wait(self._timeout):
                    raise ExpertLoadError(f"timed out after {self._timeout}s waiting for expert {key} to load")
            if info.weights is not None:  # a wait on an in-flight prefetch counts as a hit (plus stall)
                self._c["hits"] += 1
                stats["hits"] += 1
                if info.prefetched:
                    self._c["prefetch_used"] += 1
                    info.prefetched = False
                if waited:
                    self._stall += time.perf_counter() - t0
                self._last_got = info.spec.key
                return info.weights
            self._c["misses"] += 1
            stats["misses"] += 1
            slot = self._reserve(info, prefetch=False)
        weights = self._load_into(info, slot)
        with self._cv:
            self._transition(info, slot, weights)
            self._last_got = info.spec.key
            self._stall += time.perf_counter() - t0
        return weights

    def begin_layer(self, keys: Iterable[ExpertKey]) -> None:
        """Mark the keys the current layer needs; prefetch will not evict them."""
        with self._cv:
            self._needed = {tuple(k) for k in keys} & self._infos.keys()

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

    def prefetch(self, keys: Iterable[ExpertKey]) -> None:
        """Queue non-resident owned keys for background loading (a hint; never blocks)."""
        with self._cv:
            for k in keys:
                k = tuple(k)
                info = self._infos.get(k)
                if self._closed or info is None or info.slot is not None or k in self._queued:
                    continue
                self._queued.add(k)
                self._c["prefetch_hints"] += 1
                self._queue.put(k)

    def resident_keys(self) -> list[ExpertKey]:
        """Keys whose weights are fully loaded."""
        with self._cv:
            return [k for k in self._owner if k is not None and self._infos[k].weights is not None]

    def resident_bytes(self) -> int:
        """Bytes of expert data in occupied slots (loaded or being loaded); never above the budget."""
        with self._cv:
            return sum(self._infos[k].nbytes for k in self._owner if k is not None)

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
        """Stop prefetch threads (bounded wait), close files and free slots."""
        with self._cv:
            if self._closed:
                return
            self._closed = True
        for _ in self._threads:
            self._queue.put(None)
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

    def _victim(self, prefetch: bool) -> ExpertInfo | None:
        """Choose a loaded, unpinned expert to evict; prefetch may not touch needed or in-use ones."""
        cands = [i for k in self._owner if k is not None and k not in self._pinned
                 for i in [self._infos[k]] if i.weights is not None]
        if prefetch:  # nor hints already waiting to be used, so hints cannot churn each other
            cands = [i for i in cands if i.spec.key not in self._needed and i.spec.key != self._last_got
                     and not i.prefetched]
        elif any(i.spec.key not in self._needed for i in cands):
            cands = [i for i in cands if i.spec.key not in self._needed]
        return min(cands, key=lambda i: (self._score(i), i.last_tick), default=None)

    def _reserve(self, info: ExpertInfo, prefetch: bool) -> int | None:
        """Claim a free slot or a victim's slot for `info`; prefetch gives up (None), get waits."""
        deadline = time.monotonic() + self._timeout
        while True:
            if None in self._owner:
                slot = self._owner.index(None)
            elif (victim := self._victim(prefetch)) is not None:
                slot = victim.slot
            elif prefetch:
                return None
            else:  # every slot is pinned or mid-load: wait for a load to finish
                if not self._cv.wait(max(0.0, deadline - time.monotonic())):
                    raise ExpertLoadError(f"no slot freed within {self._timeout}s for expert {info.spec.key}")
                continue
            self._transition(info, slot, None)
            return slot

    def _transition(self, info: ExpertInfo, slot: int | None, weights: ExpertWeights | None) -> None:
        """The one method that changes cache state.

        slot=None: drop `info` from its slot (failed load). weights=None: reserve `slot`
        for `info`, evicting its occupant. Otherwise: mark the reserved load complete.
        """
        if slot is None:
            self._owner[info.slot] = None
            info.slot, info.weights, info.prefetched = None, None, False
        elif weights is None:
            if (old := self._owner[slot]) is not None:
                victim = self._infos[old]
                self._c["evictions"] += 1
                self._c["prefetch_wasted"] += victim.prefetched
                victim.slot, victim.weights, victim.prefetched = None, None, False
                log.debug("evict %s from slot %d", old, slot)
            if self._slots[slot] is None:
                self._slots[slot] = torch.empty(self.slot_bytes, dtype=torch.uint8, device=self.device)
            self._owner[slot] = info.spec.key
            info.slot, info.weights = slot, None
        else:
            info.weights = weights
            self._c["loads"] += 1
            self._c["bytes_read"] += info.spec.file_nbytes
            self._loaded_tensors.update(t.key for t in _tensors(info.spec))
        self._cv.notify_all()

    # ---- loading (outside the lock; the reserved slot is invisible to readers) ---------------

    def _load_into(self, info: ExpertInfo, slot: int) -> ExpertWeights:
        """Read the expert's three tensors into its slot; on failure free the slot and raise.

        With a spill directory, an expert is read from the checkpoint once, then written there
        as its slot image (compute dtype, one contiguous span) and read back with one pread.
        """
        try:
            buf = self._slots[slot]
            if not self._read_spill(info, buf):
                for t, (off, nb, _) in zip(_tensors(info.spec), info.layout):
                    self._read_tensor(info.spec, t, buf[off:off + nb])
                self._write_spill(info, buf)
            views = [buf[off:off + nb].view(self.dtype).view(shape) for off, nb, shape in info.layout]
            return ExpertWeights(*views, activation=info.spec.activation)
        except BaseException:
            with self._cv:
                self._c["load_errors"] += 1
                self._transition(info, None, None)
            raise

    def _spill_path(self, info: ExpertInfo) -> Path:
        layer, expert = info.spec.key
        return self.spill_dir / f"L{layer}-E{expert}-{str(self.dtype).removeprefix('torch.')}.bin"

    def _read_spill(self, info: ExpertInfo, buf: torch.Tensor) -> bool:
        """Fill the slot from the spill file if there is a whole one (CPU slots only)."""
        if self.spill_dir is None or buf.device.type != "cpu":
            return False
        path = self._spill_path(info)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            if os.fstat(fd).st_size != info.span:
                return False  # a partial write from a crash: read the checkpoint again
            self._pread(fd, buf[:info.span], str(path), 0, info.span, f"spilled expert {info.spec.key}")
        finally:
            os.close(fd)
        with self._cv:
            self._c["spill_reads"] += 1
        return True

    def _write_spill(self, info: ExpertInfo, buf: torch.Tensor) -> None:
        if self.spill_dir is None or buf.device.type != "cpu":
            return
        path = self._spill_path(info)
        tmp = path.with_suffix(f".tmp{threading.get_ident()}")
        with open(tmp, "wb") as f:  # written whole, then renamed: a reader never sees half a file
            f.write(memoryview(buf[:info.span].numpy()))
            f.flush()
            if hasattr(os, "posix_fadvise"):
                os.fdatasync(f.fileno())
                os.posix_fadvise(f.fileno(), 0, info.span, os.POSIX_FADV_DONTNEED)
        os.replace(tmp, path)
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

    def _prefetch_loop(self) -> None:
        while (key := self._queue.get()) is not None:
            with self._cv:
                self._queued.discard(key)
                info = self._infos[key]
                # already there (a get() beat us), closing, or no evictable victim: drop the hint
                slot = None if self._closed or info.slot is not None else self._reserve(info, prefetch=True)
                self._c["prefetch_issued" if slot is not None else "prefetch_dropped"] += 1
            if slot is None:
                continue
            try:
                weights = self._load_into(info, slot)
            except Exception as e:  # a hint failing must not kill the thread; get() will report it
                log.warning("prefetch of expert %s failed: %s", key, e)
                continue
            with self._cv:
                self._transition(info, slot, weights)
                info.prefetched = True
                self._c["bytes_prefetched"] += info.spec.file_nbytes
                # recency = now so the next hint does not evict it at once (decay folded in first)
                if self.policy == "lfu-decay":
                    info.freq = self._score(info)
                info.last_tick = self._tick


def _tensors(s: ExpertSpec) -> tuple[TensorSpec, TensorSpec, TensorSpec]:
    return s.gate, s.up, s.down
