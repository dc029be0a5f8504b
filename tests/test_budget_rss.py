"""The memory budget is real: an actor paging 200 MB of experts through a 10% budget grows its
resident set by about the budget, not by the experts it touched.

The control run (no budget) must grow by the full expert bytes, so the check can fail.
"""
from __future__ import annotations

import pytest
import torch

from coordinator import Coordinator
from coordinator.checkpoint import Checkpoint

# Fixed cost beyond the budget: staging buffers, allocator slack, message buffers.
OVERHEAD = 48 * 10**6

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def grow(path, memory):
    """RSS growth of the one actor across a run that touches every expert, and its resident bytes."""
    ids = torch.randint(3, 120, (4, 64), generator=torch.Generator().manual_seed(0))
    with Coordinator.from_pretrained(path, num_workers=1, worker_memory=memory, prefetch_depth=0) as c:
        before = c.stats()["experts"]["actors"][0]["rss_bytes"]
        for _ in range(2):
            c.forward(ids)
        s = c.stats()["experts"]
        return s["actors"][0]["rss_bytes"] - before, s


def test_actor_rss_follows_the_budget_not_the_experts(checkpoint, ray_session):
    path = checkpoint("mixtral", hidden_size=512, intermediate_size=1024, num_local_experts=16,
                      num_attention_heads=8, num_key_value_heads=4)
    total = sum(s.numel() * 4 for s in Checkpoint.open(path).expert_specs())
    assert total > 190 * 10**6
    budget = total // 10

    growth, stats = grow(path, budget)
    assert stats["evictions"] > 0, "the run must page"
    assert stats["bytes_resident"] <= budget
    assert growth <= budget + OVERHEAD, f"RSS grew {growth / 1e6:.0f} MB under a {budget / 1e6:.0f} MB budget"

    growth_unlimited, _ = grow(path, None)
    assert growth_unlimited >= 0.9 * total, "control: without a budget every touched expert stays resident"
