"""split_by_owner (cluster/split.py): pure, so tested without Ray."""
from __future__ import annotations

import pytest
import torch

from cluster.split import split_by_owner
from coordinator.experts import ExpertBatch


def test_rows_go_to_their_owner_in_grouped_order_and_cover_the_batch():
    ids = torch.tensor([[3, 0], [1, 3], [0, 2]])
    batch = ExpertBatch.from_routing(torch.full((3, 2), 0.5), ids)
    owners = {0: 1, 1: 0, 2: 1, 3: 0}          # actor 0 owns 1 and 3, actor 1 owns 0 and 2
    shares = split_by_owner(batch, owners, layer=5)
    assert list(shares) == [0, 1]
    assert (shares[0].experts, shares[0].counts) == ([1, 3], [1, 2])
    assert (shares[1].experts, shares[1].counts) == ([0, 2], [2, 1])
    # every grouped row exactly once, each at the position of its expert's segment
    idx = torch.cat([s.idx for s in shares.values()])
    assert sorted(idx.tolist()) == list(range(len(batch.token_idx)))
    flat_experts = torch.repeat_interleave(torch.tensor(batch.experts), torch.tensor(batch.counts))
    for a, s in shares.items():
        assert all(owners[e] == a for e in flat_experts[s.idx].tolist())
    # an actor without active experts gets no share at all
    only = split_by_owner(ExpertBatch.from_routing(torch.ones(2, 1), torch.tensor([[1], [3]])), owners, 5)
    assert list(only) == [0]


def test_unknown_expert_is_refused_naming_layer_and_range():
    batch = ExpertBatch.from_routing(torch.ones(1, 1), torch.tensor([[9]]))
    with pytest.raises(ValueError, match=r"expert 9 of layer 2, which does not exist \(layer has experts 0..3\)"):
        split_by_owner(batch, {0: 0, 1: 0, 2: 1, 3: 1}, layer=2)
