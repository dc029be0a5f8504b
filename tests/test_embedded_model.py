"""The embedded default model through moeshard: equal to transformers in-process, distributed
and paged; stable text; the first command's report (stats table and heatmap)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from coordinator import Coordinator

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "pydoc-moe"
PROMPT = "The for statement"
NEW_TOKENS = 32

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def reference():
    from transformers import MixtralForCausalLM

    model = MixtralForCausalLM.from_pretrained(MODEL, dtype=torch.float32, attn_implementation="eager").eval()
    with Coordinator.from_pretrained(MODEL) as c:
        ids = torch.tensor([c.tokenizer.encode(PROMPT).ids])
    with torch.no_grad():
        logits = model(ids).logits.float()
        tokens = model.generate(ids, do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=None,
                                pad_token_id=2, temperature=None, top_p=None, top_k=None)
    return ids, logits, tokens


def check(c: Coordinator, reference) -> None:
    ids, logits, tokens = reference
    assert (c.forward(ids) - logits).abs().max().item() <= 1e-4
    assert torch.equal(c.generate(ids, max_new_tokens=NEW_TOKENS), tokens)


def test_in_process_matches_transformers(reference):
    with Coordinator.from_pretrained(MODEL) as c:
        check(c, reference)


def test_in_process_paged_matches_transformers(reference):
    with Coordinator.from_pretrained(MODEL, worker_memory="5MB") as c:
        check(c, reference)
        assert c.stats()["experts"]["evictions"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("memory,store", [(None, False), ("4MB", False), ("6MB", True)],
                         ids=["resident", "paged", "paged-pinned-spill"])
def test_two_workers_match_transformers(reference, ray_session, tmp_path, memory, store):
    extra = dict(pin=[(0, 0), (0, 1)], spill_dir=tmp_path / "spill") if store else {}
    with Coordinator.from_pretrained(MODEL, num_workers=2, worker_memory=memory, **extra) as c:
        check(c, reference)
        s = c.stats()["experts"]
        assert s["num_workers"] == 2 and len(s["actors"]) == 2
        if memory:
            budget = int(memory.removesuffix("MB")) * 10**6
            assert s["evictions"] > 0 and all(a["bytes_resident"] <= budget for a in s["actors"])
        if store:
            assert s["spill_writes"] > 0 and sorted((tmp_path / "spill").iterdir())[0].name == "actor-0"


def test_text_is_stable_for_a_seed():
    with Coordinator.from_pretrained(MODEL) as c:
        greedy = c.generate_text(PROMPT, max_new_tokens=24)
        sampled = [c.generate_text(PROMPT, max_new_tokens=24, do_sample=True, temperature=0.8, top_p=0.95,
                                   seed=7) for _ in range(2)]
    with Coordinator.from_pretrained(MODEL) as c:
        assert c.generate_text(PROMPT, max_new_tokens=24) == greedy
    assert sampled[0] == sampled[1]
    assert greedy.strip(), "the model writes something"


@pytest.mark.slow
def test_first_command_reports_stats_and_heatmap(tmp_path):
    """What `make run` runs, on a fresh Ray: text, the per-actor table, and a heatmap PNG."""
    heatmap = tmp_path / "heat.png"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "generate", str(MODEL), "--workers", "2", "--worker-memory", "8MB",
         "--prompt", PROMPT, "--max-new-tokens", "16", "--heatmap", str(heatmap)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    for needle in ("tok/s", "prefetch precision", "resident", "misses", "read", f"heatmap written to {heatmap}"):
        assert needle in text, f"{needle!r} missing from:\n{text}"
    assert heatmap.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and heatmap.stat().st_size > 1000
