"""ExpertStore against real safetensors files: loading, budgets, eviction policies, prefetch, errors."""
from __future__ import annotations

import json
import os
import pickle
import struct
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from workers.errors import BudgetError, ExpertLoadError
from workers.spec import ExpertSpec, TensorSpec
from workers.store import ExpertStore
from workers.units import format_bytes

H = 16


def _intermediate(e: int) -> int:
    return 8 + 4 * (e % 3)  # experts of different sizes, so slots hold smaller experts too


def make_expert_file(path: Path, layers: list[int], experts: list[int], dtype=torch.float32, seed: int = 0,
                     intermediate=_intermediate, hidden: int = H) -> tuple[list[ExpertSpec], dict[str, torch.Tensor]]:
    """Write one safetensors file holding gate/up/down of each (layer, expert); return specs and tensors."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in layers:
        for e in experts:
            i = intermediate(e)
            for name, shape in (("gate", (i, hidden)), ("up", (i, hidden)), ("down", (hidden, i))):
                tensors[f"model.layers.{layer}.experts.{e}.{name}.weight"] = (
                    torch.randn(shape, generator=g) * 0.2).to(dtype)
    save_file(tensors, str(path))
    return specs_from_safetensors(path), tensors


def specs_from_safetensors(path: Path) -> list[ExpertSpec]:
    """Read the safetensors header ourselves (8-byte LE length + JSON) and build absolute-offset specs."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    base = 8 + n

    def tspec(name: str) -> TensorSpec:
        h = header[name]
        a, b = h["data_offsets"]
        return TensorSpec(str(path), name, h["dtype"], tuple(h["shape"]), base + a, b - a)

    keys = sorted({tuple(int(p) for p in k.split(".")[2:5:2]) for k in header if k != "__metadata__"})
    pre = "model.layers.{}.experts.{}.{}.weight"
    return [ExpertSpec(l, e, tspec(pre.format(l, e, "gate")), tspec(pre.format(l, e, "up")),
                       tspec(pre.format(l, e, "down"))) for l, e in keys]


def file_weights(tensors: dict[str, torch.Tensor], key: tuple[int, int]) -> list[torch.Tensor]:
    return [tensors[f"model.layers.{key[0]}.experts.{key[1]}.{n}.weight"] for n in ("gate", "up", "down")]


def wait_for(cond, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.002)


@pytest.fixture
def experts(tmp_path):
    return make_expert_file(tmp_path / "e.safetensors", [0, 1], list(range(6)))


def _store(specs, slots=None, **kw) -> ExpertStore:
    """A store holding `slots` experts (None = unlimited)."""
    probe = ExpertStore(specs, dtype=kw.get("dtype", torch.float32))
    budget = None if slots is None else slots * probe.slot_bytes
    probe.close()
    return ExpertStore(specs, budget, **kw)


def test_get_loads_exact_weights_and_counts(experts):
    specs, tensors = experts
    store = ExpertStore(specs)
    try:
        for s in specs:
            w = store.get(s.key)
            for got, want in zip((w.gate, w.up, w.down), file_weights(tensors, s.key)):
                assert torch.equal(got, want)
        store.get((0, 1))
        st = store.stats()
        assert (st["hits"], st["misses"], st["loads"], st["evictions"]) == (1, 12, 12, 0)
        assert st["bytes_read"] == sum(s.file_nbytes for s in specs)
        assert st["per_layer"] == {0: {"hits": 1, "misses": 6}, 1: {"hits": 0, "misses": 6}}
        assert store.loaded_tensor_keys() == sorted(tensors)
    finally:
        store.close()


def test_slots_allocated_lazily(experts):
    store = _store(experts[0], slots=4)
    try:
        assert store.stats()["slots_allocated"] == 0
        store.get((0, 0))
        assert store.stats()["slots_allocated"] == 1
    finally:
        store.close()


def test_budget_too_small_names_the_minimum(experts):
    specs = experts[0]
    probe = ExpertStore(specs)
    slot = probe.slot_bytes
    probe.close()
    with pytest.raises(BudgetError) as e:
        ExpertStore(specs, budget_bytes=2 * slot - 1, min_resident=2)
    msg = str(e.value)
    assert f"minimum is {2 * slot} bytes ({format_bytes(2 * slot)})" in msg and "budget" in msg and "\n" not in msg
    assert (e.value.needed_bytes, e.value.budget_bytes) == (2 * slot, 2 * slot - 1)
    back = pickle.loads(pickle.dumps(e.value))  # how Ray hands an actor's refusal to the caller
    assert (str(back), back.needed_bytes, back.budget_bytes) == (msg, 2 * slot, 2 * slot - 1)


def test_budget_error_names_a_mebibyte_budget_in_mebibytes(tmp_path):
    """3 MiB of budget reads back as "3 MiB", not "3.15 MB": what the user wrote."""
    specs, _ = make_expert_file(tmp_path / "big.safetensors", [0], [0, 1], intermediate=lambda e: 16384)
    with pytest.raises(BudgetError) as e:
        ExpertStore(specs, budget_bytes=3 * 2**20, min_resident=2)
    assert "3145728 bytes (3 MiB)" in str(e.value)


def test_pinned_count_toward_the_minimum(experts):
    specs = experts[0]
    probe = ExpertStore(specs)
    slot = probe.slot_bytes
    probe.close()
    with pytest.raises(BudgetError, match=str(3 * slot)):
        ExpertStore(specs, budget_bytes=2 * slot, pinned=[(0, 0), (0, 1)])


def _run(store, keys):
    for k in keys:
        store.get(k)


def test_lru_evicts_least_recently_used(experts):
    store = _store(experts[0], slots=3, policy="lru")
    try:
        _run(store, [(0, 0), (0, 1), (0, 2), (0, 0), (0, 3)])
        assert sorted(store.resident_keys()) == [(0, 0), (0, 2), (0, 3)]  # (0,1) was least recent
        _run(store, [(0, 4)])
        assert sorted(store.resident_keys()) == [(0, 0), (0, 3), (0, 4)]
        assert store.stats()["evictions"] == 2
    finally:
        store.close()


def test_lfu_evicts_least_frequently_used(experts):
    store = _store(experts[0], slots=3, policy="lfu")
    try:
        _run(store, [(0, 0)] * 3 + [(0, 1)] + [(0, 2)] * 2 + [(0, 3)])
        assert sorted(store.resident_keys()) == [(0, 0), (0, 2), (0, 3)]
        _run(store, [(0, 3)] * 3 + [(0, 4)])  # (0,2) is now the least frequent
        assert sorted(store.resident_keys()) == [(0, 0), (0, 3), (0, 4)]
    finally:
        store.close()


def test_lfu_ties_break_by_recency(experts):
    store = _store(experts[0], slots=2, policy="lfu")
    try:
        _run(store, [(0, 0), (0, 1), (0, 2)])
        assert sorted(store.resident_keys()) == [(0, 1), (0, 2)]
    finally:
        store.close()


@pytest.mark.parametrize("policy,evicted", [("lfu", (0, 1)), ("lfu-decay", (0, 0))])
def test_lfu_decay_forgets_old_popularity(experts, policy, evicted):
    store = _store(experts[0], slots=3, policy=policy, half_life=1.0)
    try:
        _run(store, [(0, 0)] * 5 + [(0, 1), (0, 2)] * 2 + [(0, 2), (0, 3)])
        assert evicted not in store.resident_keys()
    finally:
        store.close()


def test_pinned_never_evicted(experts):
    specs = experts[0]
    store = _store(specs, slots=2, pinned=[(1, 5)])
    try:
        store.get((1, 5))
        for _ in range(3):
            _run(store, [s.key for s in specs if s.key != (1, 5)])
            store.prefetch([s.key for s in specs])
            assert store.wait_idle(5)
            assert (1, 5) in store.resident_keys()
    finally:
        store.close()


def test_resident_bytes_never_exceed_budget(experts):
    specs = experts[0]
    slot = max(s.numel() * 4 for s in specs)
    for frac in (0.1, 0.25, 0.5):
        budget = max(int(frac * sum(s.numel() * 4 for s in specs)), slot)  # at least one expert
        store = ExpertStore(specs, budget)
        try:
            g = torch.Generator().manual_seed(1)
            for _ in range(60):
                k = specs[int(torch.randint(len(specs), (1,), generator=g))].key
                store.prefetch([specs[int(torch.randint(len(specs), (1,), generator=g))].key])
                store.get(k)
                assert store.resident_bytes() <= budget
            assert store.wait_idle(5)
            assert store.resident_bytes() <= budget
            assert store.stats()["slots_allocated"] * store.slot_bytes <= budget
        finally:
            store.close()


def test_prefetch_loads_in_background_then_hits(experts):
    specs, tensors = experts
    store = _store(specs, slots=4)
    try:
        store.prefetch([(1, 2), (1, 3)])
        wait_for(lambda: {(1, 2), (1, 3)} <= set(store.resident_keys()))
        w = store.get((1, 2))
        assert torch.equal(w.down, file_weights(tensors, (1, 2))[2])
        st = store.stats()
        assert (st["hits"], st["misses"], st["prefetch_issued"], st["prefetch_used"]) == (1, 0, 2, 1)
        assert st["bytes_prefetched"] == specs[8].file_nbytes + specs[9].file_nbytes
    finally:
        store.close()


def test_prefetch_never_evicts_needed_keys(experts):
    store = _store(experts[0], slots=2, policy="lru")
    try:
        _run(store, [(0, 0), (0, 1)])
        with store.needed([(0, 0), (0, 1)]):
            store.prefetch([(0, 2)])
            assert store.wait_idle(5)
            assert sorted(store.resident_keys()) == [(0, 0), (0, 1)]
            assert store.stats()["prefetch_dropped"] == 1
        store.prefetch([(0, 2)])  # nothing is needed now: the hint may evict
        wait_for(lambda: (0, 2) in store.resident_keys())
    finally:
        store.close()


def test_unused_hint_is_kept_until_its_layer_runs_then_wasted(experts):
    store = _store(experts[0], slots=2, policy="lru")
    try:
        store.prefetch([(1, 4)])
        assert store.wait_idle(5)
        _run(store, [(0, 0), (0, 1), (0, 2)])   # layer 0 misses evict each other, never the hint
        assert (1, 4) in store.resident_keys()
        with store.needed([(1, 0)]):           # layer 1 runs without expert 4: the guess was wrong
            store.get((1, 0))
        assert (1, 4) not in store.resident_keys()
        st = store.stats()
        assert (st["prefetch_wasted"], st["prefetch_used"]) == (1, 0)
    finally:
        store.close()


def test_hint_does_not_evict_an_expert_hotter_than_it_is_worth(experts):
    store = _store(experts[0], slots=2, policy="lfu")
    try:
        _run(store, [(0, 0)] * 3 + [(0, 1)] * 3)
        store.prefetch([(1, 5)])               # worth one use at most: both residents are used 3 times
        assert store.wait_idle(5)
        assert sorted(store.resident_keys()) == [(0, 0), (0, 1)]
        assert store.stats()["prefetch_dropped"] == 1
    finally:
        store.close()


def test_newer_hint_for_a_layer_replaces_the_older_one(experts):
    store = _store(experts[0], slots=4, policy="lru", loader_threads=1)
    gate = threading.Event()
    real = store.reader.read_raw
    store.reader.read_raw = lambda *a: (gate.wait(5), real(*a))
    try:
        store.prefetch([(1, 0), (1, 1)])       # the loader blocks on (1, 0); (1, 1) waits in line
        store.prefetch([(1, 0), (1, 2)])       # a better guess: (1, 1) is dropped before it is read
        gate.set()
        assert store.wait_idle(5)
        assert sorted(store.resident_keys()) == [(1, 0), (1, 2)]
        st = store.stats()
        assert (st["prefetch_issued"], st["prefetch_wasted"], st["loads"]) == (3, 1, 2)
    finally:
        gate.set()
        store.close()


def test_get_reads_a_claimed_expert_itself_rather_than_wait_in_line(experts):
    specs, tensors = experts
    store = _store(specs, slots=4, loader_threads=1)
    gate = threading.Event()
    real = store.reader.read_raw

    def read(spec, *a):
        if spec.key == (1, 0):
            gate.wait(5)
        real(spec, *a)

    store.reader.read_raw = read
    try:
        store.prefetch([(1, 0), (1, 1)])       # the only loader is stuck on (1, 0)
        w = store.get((1, 1))                  # not waiting behind it: read here
        assert torch.equal(w.up, file_weights(tensors, (1, 1))[1])
        st = store.stats()
        assert (st["hits"], st["late_hits"], st["misses"], st["prefetch_used"]) == (1, 1, 0, 1)
        gate.set()
        assert store.wait_idle(5) and sorted(store.resident_keys()) == [(1, 0), (1, 1)]
        assert store.stats()["loads"] == 2
    finally:
        gate.set()
        store.close()


def test_demand_miss_evicts_a_resident_before_an_unused_hint(experts):
    store = _store(experts[0], slots=3, policy="lru")
    try:
        _run(store, [(0, 0), (0, 1)])
        store.prefetch([(1, 3)])
        assert store.wait_idle(5)
        _run(store, [(0, 2)])                  # the hint is the least recent, but it is kept
        assert sorted(store.resident_keys()) == [(0, 1), (0, 2), (1, 3)]
    finally:
        store.close()


def test_load_ahead_is_read_before_queued_hints(experts):
    store = _store(experts[0], slots=6, loader_threads=1)
    order, started, gate = [], threading.Event(), threading.Event()
    real = store.reader.read_raw

    def read(spec, *a):
        started.set()
        gate.wait(5)
        if not order or order[-1] != spec.key:
            order.append(spec.key)
        real(spec, *a)

    store.reader.read_raw = read
    try:
        store.prefetch([(1, 5)])               # the loader takes this one and waits on the gate
        assert started.wait(5)
        store.prefetch([(1, 5), (1, 0), (1, 1)])   # keeps (1, 5): a newer hint for layer 1 that still names it
        with store.needed([(0, 4), (0, 5)]):
            assert store.load_ahead([(0, 4), (0, 5)]) == 0
            gate.set()
            assert store.wait_idle(5)
        assert order == [(1, 5), (0, 4), (0, 5), (1, 0), (1, 1)]
    finally:
        gate.set()
        store.close()


def test_get_waits_for_in_flight_prefetch(experts):
    specs, tensors = experts
    store = _store(specs, slots=3)
    started = threading.Event()
    real = store.reader.read_raw

    def slow(*a):
        started.set()
        time.sleep(0.2)
        real(*a)

    store.reader.read_raw = slow
    try:
        store.prefetch([(0, 3)])
        assert started.wait(5)
        w = store.get((0, 3))  # must wait for the prefetch, not read a half-filled slot
        assert torch.equal(w.gate, file_weights(tensors, (0, 3))[0])
        st = store.stats()
        assert (st["loads"], st["hits"], st["late_hits"], st["misses"]) == (1, 1, 1, 0)
        assert st["stall_seconds"] > 0.1
    finally:
        store.close()


def test_reads_are_dropped_from_page_cache(experts, monkeypatch):
    calls = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, adv: calls.append((off, n, adv)))
    store = ExpertStore(experts[0])
    try:
        s = store.get((0, 0)) and experts[0][0]
        assert [(c[0], c[1]) for c in calls] == [(t.offset, t.nbytes) for t in (s.gate, s.up, s.down)]
        assert all(c[2] == os.POSIX_FADV_DONTNEED for c in calls)
    finally:
        store.close()


@pytest.mark.parametrize("file_dtype,compute", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                                (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16)])
def test_dtype_conversion(tmp_path, file_dtype, compute):
    specs, tensors = make_expert_file(tmp_path / "x.safetensors", [0], [0, 1, 2], dtype=file_dtype)
    store = _store(specs, slots=1, dtype=compute)
    try:
        for s in specs:
            w = store.get(s.key)
            for got, want in zip((w.gate, w.up, w.down), file_weights(tensors, s.key)):
                assert got.dtype == compute and torch.equal(got, want.to(compute))
    finally:
        store.close()


def test_odd_sizes_keep_views_aligned_and_exact(tmp_path):
    specs, tensors = make_expert_file(tmp_path / "odd.safetensors", [0], [0, 1, 2], dtype=torch.float16,
                                      intermediate=lambda e: 3 + 2 * e)  # 3*16*2 = 96 bytes: not 64-aligned
    store = _store(specs, slots=2, dtype=torch.float16)
    try:
        for _ in range(2):
            for s in specs:
                w = store.get(s.key)
                for got, want in zip((w.gate, w.up, w.down), file_weights(tensors, s.key)):
                    assert torch.equal(got, want) and got.data_ptr() % 64 == 0
        assert store.resident_bytes() == sum(s.numel() * 2 for s in specs[1:])
    finally:
        store.close()


def test_cuda_request_without_cuda_is_a_clear_error(experts):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ValueError, match="cuda"):
        ExpertStore(experts[0], device="cuda")


@pytest.mark.requires("cuda")
def test_cuda_slots_via_pinned_staging(experts):
    specs, tensors = experts
    store = _store(specs, slots=2, device="cuda")
    try:
        for s in specs[:4]:
            w = store.get(s.key)
            assert w.gate.is_cuda and torch.equal(w.down.cpu(), file_weights(tensors, s.key)[2])
    finally:
        store.close()


def test_missing_file_names_it_and_store_keeps_serving(tmp_path, experts):
    good = experts[0]
    gone, _ = make_expert_file(tmp_path / "gone.safetensors", [7], [0])
    os.remove(gone[0].gate.file)
    store = ExpertStore(good + gone, budget_bytes=2 * ExpertStore(good).slot_bytes)
    try:
        with pytest.raises(ExpertLoadError) as e:
            store.get((7, 0))
        assert "gone.safetensors" in str(e.value) and "experts.0.gate" in str(e.value) and "(7, 0)" in str(e.value)
        store.prefetch([(7, 0)])  # a failing hint must not kill the prefetch thread
        assert store.wait_idle(5)
        store.prefetch([(0, 1)])
        wait_for(lambda: (0, 1) in store.resident_keys())
        _run(store, [s.key for s in good])
        assert store.resident_bytes() <= store.budget_bytes
        assert (7, 0) not in store.resident_keys()
    finally:
        store.close()


def test_truncated_file_names_it_and_store_keeps_serving(tmp_path, experts):
    good = experts[0]
    cut, _ = make_expert_file(tmp_path / "cut.safetensors", [7], [0, 1])
    last = max(cut, key=lambda s: s.down.offset)
    os.truncate(last.down.file, last.down.offset + 10)
    store = ExpertStore(good + cut)
    try:
        with pytest.raises(ExpertLoadError, match=r"(?s)cut\.safetensors.*truncated"):
            store.get(last.key)
        other = next(s for s in cut if s.key != last.key)
        assert store.get(other.key) is not None and store.get((0, 0)) is not None
        with pytest.raises(ExpertLoadError):  # still failing, still reported, never cached
            store.get(last.key)
        assert last.key not in store.resident_keys()
    finally:
        store.close()


def test_invalid_specs_and_keys(experts):
    specs = experts[0]
    with pytest.raises(ValueError, match="policy"):
        ExpertStore(specs, policy="fifo")
    with pytest.raises(ValueError, match="not owned"):
        ExpertStore(specs, pinned=[(9, 9)])
    bad = ExpertSpec(3, 0, specs[0].gate, specs[0].up, specs[0].gate)
    with pytest.raises(ValueError, match="shapes"):
        ExpertStore([bad])
    flat = TensorSpec(specs[0].gate.file, "x", "F32", (4, 4, 4), 0, 256)
    with pytest.raises(ValueError, match="shapes"):
        ExpertStore([ExpertSpec(3, 0, flat, flat, flat)])
    with pytest.raises(ValueError, match="listed twice"):
        ExpertStore(specs[:1] * 2)
    store = ExpertStore(specs)
    try:
        with pytest.raises(ValueError, match=r"\(5, 5\)"):
            store.get((5, 5))
    finally:
        store.close()


def test_close_stops_threads(experts):
    store = ExpertStore(experts[0])
    store.get((0, 0))
    store.close()
    store.close()
    assert store.threads_alive == 0
    assert store.open_files == 0


def test_spill_dir_serves_the_same_bits_with_one_read_per_expert(tmp_path):
    """A bf16 file computed in float32: the spill file holds the converted slot image."""
    specs, _ = make_expert_file(tmp_path / "bf16.safetensors", [0, 1], list(range(4)), dtype=torch.bfloat16)
    plain = ExpertStore(specs, None, torch.float32)
    spill = tmp_path / "spill"
    first = ExpertStore(specs, None, torch.float32, spill_dir=spill)
    try:
        for s in specs:
            assert torch.equal(first.get(s.key).gate, plain.get(s.key).gate)
        assert first.stats()["spill_writes"] == len(specs)
    finally:
        first.close()
    second = ExpertStore(specs, None, torch.float32, spill_dir=spill)
    try:
        for s in specs:
            w, ref = second.get(s.key), plain.get(s.key)
            assert torch.equal(w.gate, ref.gate) and torch.equal(w.up, ref.up) and torch.equal(w.down, ref.down)
        st = second.stats()
        assert st["spill_reads"] == len(specs) and st["spill_writes"] == 0
    finally:
        second.close()
        plain.close()


def test_slot_table_eviction_rules_without_threads_or_files(experts):
    """workers/slots.py alone: claims, a demand victim, a hint that may not evict what is needed."""
    from workers.budget import slot_layout
    from workers.slots import Claim, ExpertInfo, Load, SlotTable

    specs = experts[0]
    infos = {s.key: ExpertInfo(s, *slot_layout(s, 4)[:1], nbytes=0, span=slot_layout(s, 4)[1]) for s in specs}
    t = SlotTable(infos, num_slots=2, policy="lru")
    for key in [(0, 0), (0, 1)]:
        info = t.info(key)
        t.touch(info)
        slot = t.pick_slot(info, Claim.DEMAND)
        t.claim(info, slot, Load.RUNNING)
        t.complete(info, object())
    assert t.resident() == [(0, 0), (0, 1)] and t.c["loads"] == 2
    t.begin_layer([(0, 0), (0, 1), (0, 2)])
    assert t.pick_slot(t.info((1, 0)), Claim.HINT) is None       # both residents are needed now
    assert t.pick_slot(t.info((0, 2)), Claim.DEMAND) == 0        # demand takes the least recent
    t.needed = set()
    t.claim(t.info((0, 2)), 0, Load.QUEUED)
    assert t.info((0, 0)).slot is None and t.c["evictions"] == 1
    t.release(t.info((0, 2)))
    assert t.owner == [None, (0, 1)] and t.info((0, 2)).loading is Load.IDLE


def test_drop_resident_makes_the_store_cold_again(experts):
    """After drop_resident every expert, pinned ones too, is read again on its next use (the weights
    unchanged), the slots stay allocated and all_resident turns false until each is loaded again."""
    specs, tensors = experts
    store = ExpertStore(specs, pinned=[(0, 0)])
    try:
        for s in specs:
            store.get(s.key)
        assert store.all_resident and len(store.resident_keys()) == len(specs)
        before = store.stats()
        dropped = store.drop_resident()
        assert dropped["experts"] == len(specs)
        assert dropped["bytes"] > 0 and store.resident_keys() == [] and store.resident_bytes() == 0
        assert not store.all_resident
        assert store.stats()["slots_allocated"] == before["slots_allocated"]
        for s in specs:
            w = store.get(s.key)
            for got, want in zip((w.gate, w.up, w.down), file_weights(tensors, s.key)):
                assert torch.equal(got, want)
        st = store.stats()
        assert st["misses"] - before["misses"] == len(specs) and st["hits"] == before["hits"]
        assert st["bytes_read"] == 2 * before["bytes_read"]
        assert store.all_resident
    finally:
        store.close()
