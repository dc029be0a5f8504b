"""End-to-end: `Coordinator(num_workers=N)` over real Ray actors equals `num_workers=0`.

For every family's base checkpoint and N = 1, 2, 3: logits within 1e-5 (in practice
bit-identical) and the same 32 greedy tokens for a left-padded batch of 3 prompts.
One local Ray serves the whole module.
"""
from __future__ import annotations

import pytest
import torch

ray = pytest.importorskip("ray")

from checkpoints import FAMILIES, PAD_ID, make_prompts  # noqa: E402
from coordinator import Coordinator  # noqa: E402

pytestmark = pytest.mark.slow  # ~15 actor sets; still run in CI

NEW_TOKENS = 32
ATOL = 1e-5
_reference: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def run(path, num_workers: int, **options):
    """(padded-batch logits, unpadded logits, greedy tokens) for one coordinator."""
    ids, mask = make_prompts((7, 4, 1), seed=5)
    with Coordinator.from_pretrained(path, num_workers=num_workers, dtype="float32", **options) as c:
        logits = c.forward(ids, attention_mask=mask)
        plain = c.forward(torch.tensor([[5, 9, 17, 33, 64, 100, 3, 8]]))
        tokens = c.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                            pad_token_id=PAD_ID)
        stats = c.stats()["experts"]
    return (logits[mask.bool()], plain, tokens), stats


def reference(family: str, path):
    if family not in _reference:
        _reference[family] = run(path, 0)[0]
    return _reference[family]


# the direct channel (the default) at 1-3 workers, plain Ray calls at 2
@pytest.mark.parametrize("num_workers,transport", [(1, "direct"), (2, "direct"), (3, "direct"), (2, "calls")],
                         ids=["1", "2", "3", "2-calls"])
@pytest.mark.parametrize("family", FAMILIES)
def test_distributed_equals_in_process(family, num_workers, transport, checkpoint, ray_session):
    path = checkpoint(family)
    ref_logits, ref_plain, ref_tokens = reference(family, path)
    (logits, plain, tokens), stats = run(path, num_workers, transport=transport)
    for what, ours, ref in (("padded batch", logits, ref_logits), ("single prompt", plain, ref_plain)):
        diff = (ours - ref).abs().max().item()
        assert diff <= ATOL, f"{family} x{num_workers} {what}: max abs logit diff {diff:.3g}"
    assert tokens.shape == (3, ref_tokens.shape[1]) and ref_tokens.shape[1] > NEW_TOKENS
    assert torch.equal(tokens, ref_tokens), (f"{family} x{num_workers}: greedy tokens differ\n"
                                             f"  ours {tokens.tolist()}\n  ref  {ref_tokens.tolist()}")
    # The run really was distributed, one call per active actor per layer.
    assert stats["backend"] == "ray" and len(stats["actors"]) == num_workers
    assert all(a["calls"] > 0 for a in stats["actors"])
    assert all(layer["max_calls_per_actor"] == 1 for layer in stats["layers"].values())
    assert stats["transport"] == transport
