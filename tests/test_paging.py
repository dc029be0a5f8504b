"""Paged experts give exactly the unpaged result, the budget is honoured, prefetch predicts.

In-process (num_workers=0): the coordinator's own ExpertShard pages under `worker_memory`.
The distributed variant (every family and variant of the registry, over 2 actors, against
the unpaged run and transformers) lives in test_distributed_paging.py.
"""
from __future__ import annotations

import pytest
import torch

from checkpoints import FAMILIES, PAD_ID, make_prompts
from coordinator import Coordinator
from coordinator.checkpoint import Checkpoint
from workers.errors import BudgetError

# Enough experts that 10% of them still holds one token's top-k.
MANY_EXPERTS = {
    "mixtral": dict(num_local_experts=16),
    "qwen2_moe": dict(num_experts=16),
    "qwen3_moe": dict(num_experts=16),
    "olmoe": dict(num_experts=16),
    "deepseek_v3": dict(n_routed_experts=16),
    "deepseek_v2": dict(n_routed_experts=16),
    "glm4_moe": dict(n_routed_experts=16),
}


def expert_bytes(path, itemsize: int = 4) -> int:
    return sum(s.numel() * itemsize for s in Checkpoint.open(path).expert_specs())


def run(path, **kw):
    ids, mask = make_prompts()
    with Coordinator.from_pretrained(path, **kw) as c:
        logits = c.forward(ids)
        tokens = c.generate(ids, attention_mask=mask, max_new_tokens=16, pad_token_id=PAD_ID)
        return logits, tokens, c.stats()["experts"]


@pytest.mark.parametrize("family", FAMILIES)
def test_paged_equals_unpaged(family, checkpoint):
    path = checkpoint(family, **MANY_EXPERTS[family])
    ref_logits, ref_tokens, ref_stats = run(path)
    assert ref_stats["evictions"] == 0
    total = expert_bytes(path)
    for frac in (0.10, 0.25, 0.50):
        budget = int(frac * total)
        logits, tokens, stats = run(path, worker_memory=budget)
        assert torch.equal(logits, ref_logits), f"{family} at {frac:.0%}: logits differ"
        assert torch.equal(tokens, ref_tokens), f"{family} at {frac:.0%}: tokens differ"
        assert stats["bytes_resident"] <= budget
        assert stats["evictions"] > 0, "a budget below the expert bytes must evict"


def test_budget_too_small_is_refused_with_the_minimum(checkpoint):
    path = checkpoint("mixtral")
    with pytest.raises(BudgetError, match=r"minimum is \d+ bytes"):
        Coordinator.from_pretrained(path, worker_memory=1000)


def test_budget_accepts_human_sizes(checkpoint):
    path = checkpoint("mixtral")
    with Coordinator.from_pretrained(path, worker_memory="1GB") as c:
        c.forward(torch.tensor([[5, 6, 7]]))
        assert c.stats()["experts"]["budget_bytes"] == 10**9


def predictable_checkpoint(path):
    """Make every layer route like layer 0 and keep the residual stream nearly unchanged,
    so layer l+1's router applied to layer l's hidden state predicts layer l+1 exactly."""
    from safetensors.torch import load_file, save_file
    f = path / "model.safetensors"
    t = load_file(f)
    gate0 = t["model.layers.0.block_sparse_moe.gate.weight"].clone()
    for name in list(t):
        if name.endswith("block_sparse_moe.gate.weight"):
            t[name] = gate0.clone()
        elif name.endswith(("o_proj.weight", ".w2.weight")):
            t[name] = t[name] * 1e-3
        elif name.endswith("post_attention_layernorm.weight"):
            t[name] = torch.ones_like(t[name])
    save_file(t, f, metadata={"format": "pt"})
    return path


def test_prefetch_predicts_next_layer_and_cuts_misses(fresh_checkpoint):
    path = predictable_checkpoint(fresh_checkpoint("mixtral", num_hidden_layers=4, num_local_experts=16))
    budget = int(0.5 * expert_bytes(path))
    ids = torch.randint(3, 100, (1, 6), generator=torch.Generator().manual_seed(0))

    def decode(depth):
        with Coordinator.from_pretrained(path, worker_memory=budget, prefetch_depth=depth) as c:
            out = c.generate(ids, max_new_tokens=24)
            stats = c.stats()
            return out, {**stats["experts"], **stats["prefetch"]}

    out_off, off = decode(0)
    out_on, on = decode(1)
    assert torch.equal(out_on, out_off), "prefetch must never change results"
    assert on["recall"] >= 0.9, on
    assert off["recall"] is None  # nothing predicted, nothing scored
    assert on["misses"] < off["misses"], (on["misses"], off["misses"])


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_prefetch_on_random_routing_keeps_results(family, checkpoint):
    path = checkpoint(family, **MANY_EXPERTS[family])
    budget = int(0.25 * expert_bytes(path))
    _, ref, _ = run(path)
    _, tokens, stats = run(path, worker_memory=budget, prefetch_depth=2, prefetch_extra=2)
    assert torch.equal(tokens, ref)
    assert stats["prefetch_issued"] > 0


def test_file_lost_mid_run_names_it_and_other_experts_keep_serving(fresh_checkpoint):
    from workers.errors import ExpertLoadError

    path = fresh_checkpoint("mixtral", shards=4, num_local_experts=16)
    specs = Checkpoint.open(path).expert_specs()
    files = sorted({s.gate.file for s in specs})
    assert len(files) > 1
    lost = files[-1]
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with Coordinator.from_pretrained(path, worker_memory=int(0.25 * expert_bytes(path)), prefetch_depth=0) as c:
        with open(lost, "r+b") as f:
            f.truncate(1000)
        with pytest.raises(ExpertLoadError, match=lost.rsplit("/", 1)[-1]):
            c.forward(ids)
        intact = next(s for s in specs if lost not in (s.gate.file, s.up.file, s.down.file))
        rows = torch.randn(3, intact.gate.shape[1])
        out = c.experts.shard.compute(intact.layer, rows, [intact.expert], [3])
        assert out.shape == rows.shape and torch.isfinite(out).all()


def test_pinned_layer_stays_resident_and_spill_dir_serves_reloads(checkpoint, tmp_path):
    path = checkpoint("mixtral", **MANY_EXPERTS["mixtral"])
    _, ref, _ = run(path)
    budget = int(0.75 * expert_bytes(path))  # 24 of 32 experts: the 16 pinned + 8 that page
    spill = tmp_path / "spill"
    for attempt in range(2):  # the second run reads every expert it needs from the spill files
        with Coordinator.from_pretrained(path, worker_memory=budget, pin_layers=[0], spill_dir=spill) as c:
            ids, mask = make_prompts()
            tokens = c.generate(ids, attention_mask=mask, max_new_tokens=16, pad_token_id=PAD_ID)
            s = c.stats()["experts"]
            resident = {tuple(k) for k in c.experts.shard.store.resident_keys()}
        assert torch.equal(tokens, ref)
        assert {(0, e) for e in range(16)} <= resident, "a pinned layer is never evicted"
        assert s["evictions"] > 0
        if attempt == 1:
            assert s["spill_reads"] > 0 and s["spill_writes"] == 0


def test_spill_dir_of_another_checkpoint_with_the_same_shapes_is_not_used(checkpoint, tmp_path):
    """Issue 11: generate with A, then with B (same shapes, other weights) on the same spill
    directory. B must print B's tokens (it printed A's when spill files were keyed by shape)."""
    a, b = checkpoint("mixtral", seed=0), checkpoint("mixtral", seed=1)
    assert [s.gate.shape for s in Checkpoint.open(a).expert_specs()] == \
        [s.gate.shape for s in Checkpoint.open(b).expert_specs()]
    ids = torch.tensor([[1, 30, 40, 50]])  # the issue used 1,300,400,500; this vocabulary has 128 ids

    def generate(path, spill):
        with Coordinator.from_pretrained(path, spill_dir=spill) as c:
            return c.generate(ids, max_new_tokens=8), c.stats()["experts"]

    ref_b, _ = generate(b, None)
    spill = tmp_path / "spill"
    generate(a, spill)
    tokens, s = generate(b, spill)
    assert torch.equal(tokens, ref_b), "B computed with A's spilled experts"
    assert s["spill_reads"] == 0 and s["spill_writes"] > 0, "A's files are misses, and B's replace them"
    tokens, s = generate(b, spill)
    assert torch.equal(tokens, ref_b) and s["spill_reads"] > 0 and s["spill_writes"] == 0


def test_pinning_an_unknown_layer_is_refused(checkpoint):
    with pytest.raises(ValueError, match=r"pin_layers: layers \[7\] have no routed experts"):
        Coordinator.from_pretrained(checkpoint("mixtral"), pin_layers=[7])


def test_drop_resident_makes_the_next_forward_read_every_expert_again(checkpoint):
    """Coordinator.drop_resident: a cold expert cache (the benchmarks' cold start), same results after it."""
    path = checkpoint("mixtral")
    ids, _ = make_prompts()
    with Coordinator.from_pretrained(path) as c:
        want = c.forward(ids)
        before = c.stats()["experts"]
        assert before["bytes_resident"] > 0 and before["misses"] > 0
        dropped = c.drop_resident()
        assert dropped["experts"] > 0 and dropped["bytes"] == before["bytes_resident"]
        assert c.stats()["experts"]["bytes_resident"] == 0
        assert torch.equal(c.forward(ids), want)
        after = c.stats()["experts"]
        assert after["misses"] - before["misses"] == before["misses"]     # every expert it used, read again
        assert after["bytes_read"] == 2 * before["bytes_read"]
