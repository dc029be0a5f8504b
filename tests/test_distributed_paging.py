"""Paging over real Ray actors gives the unpaged result, for every family and variant.

For each (family, variant) of the checkpoint registry and each budget (10/25/50% of an actor's
expert bytes, raised to the top-k floor a store must hold, see docs/memory.md), a Coordinator with
2 expert actors pages under that per-actor budget. Against the in-process unpaged Coordinator and
the transformers reference (the one test_parity.py uses): logits within 1e-4 and the same greedy
tokens. The run must really page: each actor keeps within its budget, and an actor that owns more
than its budget evicts.

One local Ray serves the whole module; each distinct (checkpoint, budget) gets one Coordinator,
which the budgets that the floor makes equal share.
"""
from __future__ import annotations

import pytest
import torch

ray = pytest.importorskip("ray")

from checkpoints import ALL_VARIANTS, PAD_ID, make_prompts, top_k  # noqa: E402
from cluster.placement import expert_nbytes, plan_placement  # noqa: E402
from coordinator import Coordinator  # noqa: E402
from coordinator.checkpoint import Checkpoint  # noqa: E402
from test_parity import ATOL, assert_close, assert_same_tokens, hf_greedy, hf_logits  # noqa: E402

pytestmark = pytest.mark.slow  # ~75 actor pairs; still run in CI

WORKERS = 2
FRACTIONS = (0.10, 0.25, 0.50)
NEW_TOKENS = 8                 # short: paging differences show in the prefill and the first decode steps
PROMPTS = dict(batch_lengths=(7, 4, 1), seed=5)
_runs: dict[tuple, dict] = {}  # (path, budget or None) -> outputs of one Coordinator; a speed-up only


def actor_budget(path, family: str, variant: str, frac: float) -> tuple[int, int]:
    """(per-actor budget, largest actor's expert bytes): `frac` of that actor's experts, at least
    the top-k slots a store must hold (the planner refuses less; docs/memory.md)."""
    specs = Checkpoint.open(path).expert_specs()
    plan = plan_placement(specs, WORKERS, dtype_bytes=4, worker_memory=None, min_resident=top_k(family, variant))
    largest = max(w.expert_bytes for w in plan.workers)
    floor = top_k(family, variant) * max(expert_nbytes(s, 4) for s in specs)
    return max(int(frac * largest), floor), largest


def run(path, num_workers: int, budget: int | None) -> dict:
    """Padded-batch logits (real tokens), greedy tokens and expert stats of one Coordinator."""
    key = (str(path), num_workers, budget)
    if key not in _runs:
        ids, mask = make_prompts(**PROMPTS)
        with Coordinator.from_pretrained(path, num_workers=num_workers, worker_memory=budget, dtype="float32",
                                         prefetch_depth=1) as c:
            logits = c.forward(ids, attention_mask=mask)[mask.bool()]
            tokens = c.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                                pad_token_id=PAD_ID)
            _runs[key] = {"logits": logits, "tokens": tokens, "stats": c.stats()["experts"]}
    return _runs[key]


def transformers_run(model) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(real-token logits, greedy tokens, step scores) of the transformers reference."""
    ids, mask = make_prompts(**PROMPTS)
    tokens, scores = hf_greedy(model, ids, mask, NEW_TOKENS, with_scores=True)
    return hf_logits(model, ids, mask)[mask.bool()], tokens, scores


@pytest.mark.parametrize("frac", FRACTIONS, ids=lambda f: f"{f:.0%}")
@pytest.mark.parametrize("family,variant", ALL_VARIANTS, ids=[f"{f}-{v}" for f, v in ALL_VARIANTS])
def test_paged_actors_equal_unpaged_and_transformers(family, variant, frac, checkpoint, reference, ray_session):
    path = checkpoint(family, variant)
    budget, largest = actor_budget(path, family, variant, frac)
    what = f"{family}/{variant} over {WORKERS} actors at {frac:.0%} ({budget} B per actor of {largest} B)"

    paged = run(path, WORKERS, budget)
    unpaged = run(path, 0, None)
    hf_logits_, hf_tokens, hf_scores = transformers_run(reference(path))

    assert_close(paged["logits"], unpaged["logits"], f"{what} vs in-process unpaged", ATOL)
    assert_close(paged["logits"], hf_logits_, f"{what} vs transformers", ATOL)
    assert torch.equal(paged["tokens"], unpaged["tokens"]), (
        f"{what}: greedy tokens differ from the in-process unpaged run\n"
        f"  paged   {paged['tokens'].tolist()}\n  unpaged {unpaged['tokens'].tolist()}")
    assert_same_tokens(paged["tokens"], hf_tokens, f"{what} vs transformers greedy", hf_scores)

    s = paged["stats"]
    assert s["backend"] == "ray" and len(s["actors"]) == WORKERS, s["backend"]
    for a in s["actors"]:
        assert a["budget_bytes"] == budget, (what, a["index"], a["budget_bytes"])
        assert 0 < a["bytes_resident"] <= budget, (what, a["index"], a["bytes_resident"])
        if a["expert_bytes"] > budget:
            # every actor's experts are touched by this prompt batch (prefill routes 12 tokens x top-k)
            assert a["evictions"] > 0, f"{what}: actor {a['index']} owns more than its budget but never evicted"
    assert any(a["expert_bytes"] > budget for a in s["actors"]), f"{what}: the budget does not page at all"


def test_drop_resident_empties_every_actor(checkpoint, ray_session):
    """RemoteExperts.drop_resident: each actor forgets its experts and reads them again, with the same logits."""
    path = checkpoint("mixtral")
    ids, mask = make_prompts(**PROMPTS)
    with Coordinator.from_pretrained(path, num_workers=WORKERS, dtype="float32") as c:
        want = c.forward(ids, attention_mask=mask)
        before = c.stats()["experts"]
        dropped = c.drop_resident()
        assert dropped["experts"] > 0 and dropped["bytes"] == before["bytes_resident"] > 0
        assert c.stats()["experts"]["bytes_resident"] == 0
        assert torch.equal(c.forward(ids, attention_mask=mask), want)
        assert c.stats()["experts"]["bytes_read"] == 2 * before["bytes_read"]
