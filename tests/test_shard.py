"""ExpertShard: compute under any budget is bit-identical to unlimited; validation; wire; errors."""
from __future__ import annotations

import os
import time

import pytest
import torch

from test_store import H, file_weights, make_expert_file
from workers import wire
from workers.errors import BudgetError, ExpertLoadError, WireError
from workers.kernels import ExpertWeights, run_grouped
from workers.shard import ExpertShard
from workers.store import ExpertStore

LAYERS, EXPERTS, TOP_K = [0, 1, 2], list(range(8)), 2


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("shard") / "experts.safetensors"
    return make_expert_file(path, LAYERS, EXPERTS)


def routed_batch(layer: int, tokens: int = 12, seed: int = 0):
    """Rows grouped by expert ascending, as the coordinator's ExpertBatch builds them."""
    g = torch.Generator().manual_seed(seed * 100 + layer)
    ids = torch.stack([torch.randperm(len(EXPERTS), generator=g)[:TOP_K] for _ in range(tokens)])  # [T, k]
    x = torch.randn(tokens, H, generator=g)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    rows = x[order // TOP_K]                                        # [N, H]
    counts = torch.bincount(flat, minlength=len(EXPERTS))
    experts = [e for e in EXPERTS if counts[e]]
    return rows, experts, [int(counts[e]) for e in experts]


def reference(tensors, layer, rows, experts, counts):
    ws = [ExpertWeights(*file_weights(tensors, (layer, e))) for e in experts]
    return run_grouped(rows, ws, counts)


def slot_bytes(specs) -> int:
    """Bytes one expert slot takes in float32 (the largest expert, with alignment gaps)."""
    probe = ExpertStore(specs)
    probe.close()
    return probe.slot_bytes


def _shard(specs, **kw) -> ExpertShard:
    return ExpertShard([s.to_dict() for s in specs], **kw)


def test_every_budget_is_bit_identical_to_unlimited(ckpt):
    specs, tensors = ckpt
    total = sum(s.numel() * 4 for s in specs)
    slot = slot_bytes(specs)
    batches = [(layer, *routed_batch(layer, seed=seed)) for seed in range(3) for layer in LAYERS]
    full = _shard(specs)
    want = [full.compute(*b) for b in batches]
    full.close()
    for (layer, rows, experts, counts), w in zip(batches, want):
        assert torch.equal(w, reference(tensors, layer, rows, experts, counts))
    for frac in (0.10, 0.25, 0.50, 1.00):
        budget = int(frac * total)
        assert budget >= slot
        shard = _shard(specs, budget_bytes=budget, min_resident=1)
        try:
            for b, w in zip(batches, want):
                shard.prefetch(b[0] + 1, EXPERTS)  # cross-layer hints, as the coordinator sends them
                assert torch.equal(shard.compute(*b), w), f"budget {frac:.0%}"
                assert shard.report()["bytes_resident"] <= budget
            rep = shard.report()
            if frac < 1:
                assert rep["evictions"] > 0
            assert rep["calls"] == len(batches) and rep["rows"] == sum(len(b[1]) for b in batches)
        finally:
            shard.close()


def test_validation_errors(ckpt):
    specs, _ = ckpt
    shard = _shard(specs)
    rows, experts, counts = routed_batch(0)
    try:
        with pytest.raises(ValueError, match=r"\(0, 99\).*not owned"):
            shard.compute(0, rows, experts[:-1] + [99], counts)
        with pytest.raises(ValueError, match=r"\(9, 0\)"):
            shard.compute(9, rows, experts, counts)
        with pytest.raises(ValueError, match="counts sum to"):
            shard.compute(0, rows, experts, counts[:-1] + [counts[-1] + 1])
        with pytest.raises(ValueError, match="experts but"):
            shard.compute(0, rows, experts, counts + [0])
        with pytest.raises(ValueError, match="hidden size"):
            shard.compute(0, torch.zeros(rows.shape[0], H + 1), experts, counts)
        with pytest.raises(ValueError, match="float16.*float32"):
            shard.compute(0, rows.half(), experts, counts)
        with pytest.raises(ValueError, match="non-negative"):
            shard.compute(0, rows, [0, 1], [-1, rows.shape[0] + 1])
        with pytest.raises(ValueError, match="2-D"):
            shard.compute(0, rows[0], [0], [1])
        with pytest.raises(ValueError, match="dtype"):
            _shard(specs, dtype="float64")
        assert torch.equal(shard.compute(0, rows, experts, counts), reference(ckpt[1], 0, rows, experts, counts))
    finally:
        shard.close()


def test_empty_batch(ckpt):
    shard = _shard(ckpt[0])
    try:
        out = shard.compute(1, torch.zeros(0, H), [3], [0])
        assert out.shape == (0, H)
        _, t = wire.decode(shard.run_layer(wire.encode(
            {"op": "run_layer", "layer": 1, "experts": [], "counts": []}, {"rows": torch.zeros(0, H)})))
        assert t["out"].shape == (0, H)
    finally:
        shard.close()


def _request(layer, rows, experts, counts, **extra) -> bytes:
    return wire.encode({"op": "run_layer", "layer": layer, "experts": experts, "counts": counts, **extra},
                       {"rows": rows})


def test_run_layer_matches_compute_and_survives_garbage(ckpt):
    specs, tensors = ckpt
    shard = _shard(specs, budget_bytes=3 * slot_bytes(specs))
    rows, experts, counts = routed_batch(2)
    good = _request(2, rows, experts, counts)
    try:
        header, out = wire.decode(shard.run_layer(good))
        assert set(header) == {"compute_s", "stall_s", "all_resident"} and header["all_resident"] is False
        assert header["compute_s"] >= header["stall_s"] >= 0
        assert torch.equal(out["out"], reference(tensors, 2, rows, experts, counts))
        bad = [
            (b"garbage", WireError),
            (good[:-7], WireError),
            (wire.encode({"op": "nope"}, {"rows": rows}), WireError),
            (wire.encode({"op": "run_layer", "layer": "2", "experts": experts, "counts": counts}, {"rows": rows}),
             WireError),
            (wire.encode({"op": "run_layer", "layer": 2, "experts": experts, "counts": counts}), WireError),
            (wire.encode({"op": "run_layer", "layer": 2, "experts": "x", "counts": counts}, {"rows": rows}),
             ValueError),
            (_request(2, rows, experts, counts[:-1]), ValueError),
            (_request(2, rows.to(torch.bfloat16), experts, counts), ValueError),
            (_request(2, rows, experts, counts, hints="3"), ValueError),
            (_request(2, rows, experts, counts, hints=[[3]]), ValueError),
            (_request(2, rows, experts, counts, hints=[[3, ["a"]]]), ValueError),
        ]
        for msg, exc in bad:
            with pytest.raises(exc):
                shard.run_layer(msg)
            _, again = wire.decode(shard.run_layer(good))  # the shard keeps serving
            assert torch.equal(again["out"], out["out"])
    finally:
        shard.close()


def test_hints_in_run_layer_are_taken_after_the_layer_is_safe(ckpt):
    """Hints ride with a layer's rows; they may not evict that layer's experts, and are then hit."""
    specs, tensors = ckpt
    shard = _shard(specs, budget_bytes=4 * slot_bytes(specs), policy="lru")
    try:
        rows, experts, counts = routed_batch(0, seed=3)
        active = [e for e, c in zip(experts, counts) if c][:2]
        mine = [c for e, c in zip(experts, counts) if e in active]
        sub = torch.cat([r for r, e, c in zip(torch.split(rows, counts), experts, counts) if e in active])
        msg = _request(0, sub, active, mine, hints=[[1, [0, 1]], [2, [5]]])
        _, out = wire.decode(shard.run_layer(msg))
        assert torch.equal(out["out"], reference(tensors, 0, sub, active, mine))
        assert shard.store.wait_idle(5)
        assert {(0, e) for e in active} | {(1, 0), (1, 1)} == set(shard.store.resident_keys())
        rep = shard.report()
        assert rep["prefetch_issued"] == 2 and rep["prefetch_dropped"] == 1   # 4 slots: no room for (2, 5)
        shard.compute(1, torch.randn(3, H), [0, 1], [2, 1])
        assert shard.report()["prefetch_used"] == 2
    finally:
        shard.close()


def test_prefetch_ignores_unowned_and_then_hits(ckpt):
    specs, _ = ckpt
    mine = [s for s in specs if s.layer == 1 and s.expert < 4]
    shard = _shard(mine)
    try:
        shard.prefetch(1, [0, 1, 6, 7])
        shard.prefetch(5, [0])
        deadline = time.monotonic() + 5
        while len(shard.store.resident_keys()) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.002)
        assert sorted(shard.store.resident_keys()) == [(1, 0), (1, 1)]
        rows = torch.randn(3, H)
        shard.compute(1, rows, [0, 1], [2, 1])
        rep = shard.report()
        assert rep["hits"] == 2 and rep["misses"] == 0 and rep["prefetch_used"] == 2
    finally:
        shard.close()


def test_report_fields(ckpt):
    specs, _ = ckpt
    mine = [s for s in specs if s.layer == 0]
    shard = _shard(mine, budget_bytes=10**6, num_threads=1)
    try:
        assert shard.ping() is True
        shard.compute(0, torch.randn(2, H), [5], [2])
        rep = shard.report()
        assert rep["owned"] == [[0, e] for e in EXPERTS]
        assert rep["loaded_tensors"] == [f"model.layers.0.experts.5.{n}.weight" for n in ("down", "gate", "up")]
        assert rep["bytes_resident"] == mine[5].numel() * 4 and rep["budget_bytes"] == 10**6
        assert rep["calls"] == 1 and rep["rows"] == 2 and rep["compute_s"] > 0
        for k in ("hits", "misses", "loads", "bytes_read", "evictions", "stall_seconds", "prefetch_wasted"):
            assert k in rep
    finally:
        shard.close()


def test_budget_error_from_shard(ckpt):
    specs, _ = ckpt
    slot = slot_bytes(specs)
    with pytest.raises(BudgetError, match=str(2 * slot)):
        _shard(specs, budget_bytes=slot, min_resident=TOP_K)


def test_pinned_expert_stays_resident(ckpt):
    specs, _ = ckpt
    slot = slot_bytes(specs)
    shard = _shard(specs, budget_bytes=3 * slot, pinned=[[0, 0]])
    try:
        for layer in LAYERS:
            shard.compute(layer, *routed_batch(layer))
            shard.compute(0, torch.randn(1, H), [0], [1])
            assert (0, 0) in shard.store.resident_keys()
    finally:
        shard.close()


def test_bf16_file_with_float32_compute(tmp_path):
    specs, tensors = make_expert_file(tmp_path / "bf.safetensors", [0], [0, 1, 2, 3], dtype=torch.bfloat16)
    shard = _shard(specs, dtype="float32", budget_bytes=2 * slot_bytes(specs))
    try:
        rows = torch.randn(6, H)
        out = shard.compute(0, rows, [0, 1, 3], [1, 3, 2])
        ws = [ExpertWeights(*(t.float() for t in file_weights(tensors, (0, e)))) for e in (0, 1, 3)]
        assert torch.equal(out, run_grouped(rows, ws, [1, 3, 2]))
    finally:
        shard.close()


def test_bf16_compute(tmp_path):
    specs, tensors = make_expert_file(tmp_path / "bf.safetensors", [0], [0, 1], dtype=torch.bfloat16)
    shard = _shard(specs, dtype="bfloat16")
    try:
        rows = torch.randn(4, H).bfloat16()
        out = shard.compute(0, rows, [0, 1], [2, 2])
        assert out.dtype == torch.bfloat16
        ws = [ExpertWeights(*file_weights(tensors, (0, e))) for e in (0, 1)]
        assert torch.equal(out, run_grouped(rows, ws, [2, 2]))
    finally:
        shard.close()


def test_missing_file_raises_and_shard_keeps_serving(tmp_path, ckpt):
    specs, tensors = ckpt
    lost, _ = make_expert_file(tmp_path / "lost.safetensors", [0], [8])
    os.remove(lost[0].gate.file)
    shard = _shard([s for s in specs if s.layer == 0] + lost, budget_bytes=4 * slot_bytes(specs))
    try:
        rows = torch.randn(3, H)
        with pytest.raises(ExpertLoadError, match=r"lost\.safetensors"):
            shard.compute(0, rows, [1, 8], [2, 1])
        with pytest.raises(ExpertLoadError, match=r"lost\.safetensors"):
            shard.run_layer(_request(0, rows, [8], [3]))
        out = shard.compute(0, rows, [1, 2], [2, 1])
        assert torch.equal(out, reference(tensors, 0, rows, [1, 2], [2, 1]))
    finally:
        shard.close()


def test_replicas_compute_the_owners_bits_until_released(ckpt):
    """A shard that adopts another shard's experts as replicas computes them bit for bit as their owner
    does, in the budget its own slots leave; a released replica is refused again."""
    specs, tensors = ckpt
    mine = [s for s in specs if s.key[1] % 2 == 0]
    theirs = [s for s in specs if s.key[1] % 2 == 1]
    layer = LAYERS[0]
    replicas = [s for s in theirs if s.key[0] == layer]
    owner = _shard(theirs)
    holder = _shard(mine, budget_bytes=slot_bytes(specs) * (len(mine) + len(replicas)))
    try:
        assert holder.report()["spare_bytes"] == slot_bytes(specs) * len(replicas)
        rows, experts, counts = routed_batch(layer, seed=7)
        odd = [(e, c) for e, c in zip(experts, counts) if e % 2]
        starts = [sum(counts[:i]) for i in range(len(counts))]
        sub = torch.cat([rows[s:s + c] for s, e, c in zip(starts, experts, counts) if e % 2])
        want = owner.compute(layer, sub, [e for e, _ in odd], [c for _, c in odd])
        with pytest.raises(ValueError, match="not owned by this shard"):
            holder.compute(layer, sub, [e for e, _ in odd], [c for _, c in odd])
        held = holder.adopt([s.to_dict() for s in theirs if s.key[0] == layer])
        assert sorted(map(tuple, held)) == sorted(s.key for s in theirs if s.key[0] == layer)
        assert holder.adopt([s.to_dict() for s in theirs if s.key[0] == layer]) == held, "adopting again is a no-op"
        assert torch.equal(holder.compute(layer, sub, [e for e, _ in odd], [c for _, c in odd]), want)
        # a mixed batch: own experts and replicas, against the reference kernel
        assert torch.equal(holder.compute(layer, rows, experts, counts), reference(tensors, layer, rows, experts, counts))
        assert holder.report()["replica_rows"] > 0 and holder.report()["replica_bytes"] > 0
        assert holder.release(held) == [] and holder.report()["replica_bytes"] == 0
        with pytest.raises(ValueError, match="not owned by this shard"):
            holder.compute(layer, sub, [e for e, _ in odd], [c for _, c in odd])
    finally:
        owner.close()
        holder.close()


def test_replicas_never_exceed_the_spare_budget(ckpt):
    """Replicas live in the budget the shard's own slots leave: one too many is refused with nothing
    loaded, and a shard that pages (no spare budget) adopts none."""
    specs, _ = ckpt
    mine = [s for s in specs if s.key[1] % 2 == 0]
    theirs = [s for s in specs if s.key[1] % 2 == 1]
    slot = slot_bytes(specs)
    holder = _shard(mine, budget_bytes=slot * (len(mine) + 2))
    try:
        with pytest.raises(BudgetError, match=r"3 more replica\(s\) .* leaves .* raise worker_memory"):
            holder.adopt([s.to_dict() for s in theirs[:3]])
        assert holder.report()["replicas"] == 0, "a refused adopt loads nothing"
        assert len(holder.adopt([s.to_dict() for s in theirs[:2]])) == 2
        with pytest.raises(BudgetError):
            holder.adopt([theirs[2].to_dict()])
        assert len(holder.adopt([theirs[0].to_dict()])) == 2, "one already held needs no room"
    finally:
        holder.close()
    pager = _shard(mine, budget_bytes=slot * TOP_K, min_resident=TOP_K)
    try:
        assert pager.report()["spare_bytes"] == 0
        with pytest.raises(BudgetError):
            pager.adopt([theirs[0].to_dict()])
    finally:
        pager.close()
