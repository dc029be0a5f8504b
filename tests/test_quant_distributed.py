"""Quantized experts over real Ray actors equal the same experts in this process, bit for bit,
paged or not: the specs carry the format to the actors, which read, hold and compute it the same way."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

from checkpoints import PAD_ID, make_prompts  # noqa: E402
from cluster.quantize import quantize_checkpoint  # noqa: E402
from coordinator import Coordinator  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]

MODEL = Path("models/pydoc-moe")


def run(path, **options):
    ids, mask = make_prompts((7, 4, 1), seed=5, vocab=4096)
    with Coordinator.from_pretrained(path, **options) as c:
        logits = c.forward(ids, attention_mask=mask)
        tokens = c.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=PAD_ID)
        stats = c.stats()["experts"]
    return logits[mask.bool()], tokens, stats


@pytest.mark.parametrize("quantized", ["at-read-int8", "stored-int4"])
def test_distributed_equals_in_process_bit_for_bit(quantized, tmp_path, ray_session):
    if quantized == "stored-int4":
        path, opts = quantize_checkpoint(MODEL, tmp_path / "int4", "int4", 64, progress=False).path, {}
    else:
        path, opts = MODEL, {"expert_dtype": "int8"}
    ref_logits, ref_tokens, local = run(path, **opts)
    slot = local["actors"][0]["slot_bytes"]
    for workers, memory in ((2, None), (2, 3 * slot)):           # all resident, then paged
        logits, tokens, stats = run(path, num_workers=workers, worker_memory=memory, **opts)
        assert torch.equal(logits, ref_logits), f"{quantized} x{workers} memory {memory}: logits differ"
        assert torch.equal(tokens, ref_tokens)
        assert stats["backend"] == "ray" and all(a["slot_bytes"] == slot for a in stats["actors"])
        if memory:
            assert stats["evictions"] > 0
