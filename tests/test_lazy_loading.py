"""Routed experts are read lazily: nothing at load time, then exactly what the run routes to.

In-process store (num_workers=0, no budget). Counters come from `c.stats()["experts"]`:
`loads` (experts read), `bytes_read` (file bytes read for them), `loaded_tensors`
(checkpoint names of every expert tensor ever read).
"""
from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
import torch

from checkpoints import FAMILIES, VOCAB, load_reference, moe_layers, variant_config

_EXPERT_RE = re.compile(r"layers\.(\d+)\..*experts\.(\d+)\.")


def open_coordinator(path, **kw):
    from coordinator import Coordinator

    opts = dict(num_workers=0, worker_memory=None, dtype="float32", ray_address=None)
    opts.update(kw)
    return Coordinator.from_pretrained(path, **opts)


def expert_stats(c) -> dict:
    """Totals of the in-process backend, plus its one shard's list of loaded tensors."""
    s = c.stats()["experts"]
    return {**s, "loaded_tensors": s["actors"][0]["loaded_tensors"]}


def loaded_experts(stats: dict) -> set[tuple[int, int]]:
    """(layer, expert) pairs of every loaded expert tensor name."""
    out = set()
    for name in stats["loaded_tensors"]:
        m = _EXPERT_RE.search(name)
        assert m, f"loaded tensor {name} is not a routed expert tensor"
        out.add((int(m.group(1)), int(m.group(2))))
    return out


def expert_file_nbytes(family: str, variant: str = "base", elem: int = 4) -> int:
    kw = variant_config(family, variant)
    H = kw["hidden_size"]
    I = kw["intermediate_size"] if family in ("mixtral", "olmoe") else kw["moe_intermediate_size"]
    return 3 * H * I * elem


@torch.no_grad()
def hf_routed(model, ids) -> set[tuple[int, int]]:
    """(layer, expert) pairs the transformers model routes `ids` to."""
    seen: set[tuple[int, int]] = set()
    hooks = []
    for name, m in model.named_modules():
        if name.endswith(".experts"):
            layer = int(re.search(r"layers\.(\d+)\.", name).group(1))

            def hook(_m, args, layer=layer):
                seen.update((layer, int(e)) for e in args[1].reshape(-1).unique())

            hooks.append(m.register_forward_pre_hook(hook))
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return seen


def ids_for(n_tokens: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, n_tokens), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family,variant", [(f, "base") for f in FAMILIES] + [("qwen2_moe", "sparse_step2"),
                                                                              ("qwen3_moe", "mlp_only")],
                         ids=lambda x: x)
def test_nothing_read_at_load_then_exactly_the_routed_experts(family, variant, checkpoint, reference):
    path = checkpoint(family, variant)
    ids = ids_for(3)  # few tokens: only some experts of each layer are routed to
    expected = hf_routed(reference(path), ids)
    assert {layer for layer, _ in expected} == set(moe_layers(family, variant))
    with open_coordinator(path, prefetch_depth=0) as c:
        s = expert_stats(c)
        assert s["loads"] == 0 and s["bytes_read"] == 0 and not s["loaded_tensors"]

        c.forward(ids)
        s = expert_stats(c)
        got = loaded_experts(s)
        assert got == expected, f"loaded {sorted(got - expected)} not routed; routed {sorted(expected - got)} not loaded"
        assert s["loads"] == len(expected)
        assert s["bytes_read"] == len(expected) * expert_file_nbytes(family, variant)
        assert len(s["loaded_tensors"]) == 3 * len(expected)

        # Same tokens again: everything is resident (no budget), nothing more is read.
        c.forward(ids)
        s2 = expert_stats(c)
        assert s2["loads"] == s["loads"] and s2["bytes_read"] == s["bytes_read"]


def test_loading_grows_with_new_tokens_only_for_new_experts(checkpoint, reference):
    path = checkpoint("mixtral", "e8_top3")
    ref = reference(path)
    a, b = ids_for(1, seed=1), ids_for(2, seed=2)
    with open_coordinator(path, prefetch_depth=0) as c:
        c.forward(a)
        first = loaded_experts(expert_stats(c))
        assert first == hf_routed(ref, a)
        c.forward(b)
        s = expert_stats(c)
        assert loaded_experts(s) == first | hf_routed(ref, b)
        assert s["loads"] == len(first | hf_routed(ref, b))


def test_default_prefetch_stays_within_run_layers(checkpoint, reference):
    """With the default prefetch, loads may include predicted experts, but only of MoE layers,
    nothing before the first forward, and every routed expert."""
    family = "deepseek_v3"
    path = checkpoint(family)
    ids = ids_for(3, seed=4)
    expected = hf_routed(reference(path), ids)
    with open_coordinator(path) as c:
        assert expert_stats(c)["loads"] == 0
        c.forward(ids)
        s = expert_stats(c)
    got = loaded_experts(s)
    assert expected <= got
    assert {layer for layer, _ in got} <= set(moe_layers(family))
    assert s["loads"] == len(got)
    assert s["bytes_read"] == s["loads"] * expert_file_nbytes(family)


def test_bytes_read_are_file_bytes_of_a_bf16_checkpoint(checkpoint, reference):
    path = checkpoint("qwen3_moe", dtype=torch.bfloat16)
    ids = ids_for(2, seed=6)
    expected = hf_routed(reference(path), ids)
    with open_coordinator(path, dtype="float32", prefetch_depth=0) as c:
        c.forward(ids)
        s = expert_stats(c)
    assert s["loads"] == len(expected)
    assert s["bytes_read"] == len(expected) * expert_file_nbytes("qwen3_moe", elem=2)


def _zero_expert_data(path: Path) -> int:
    """Overwrite, in place, the data of every routed-expert tensor with zeros; returns tensors hit."""
    hit = 0
    for f in sorted(path.glob("*.safetensors")):
        with open(f, "r+b") as fh:
            (hlen,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(hlen))
            for name, meta in header.items():
                if name != "__metadata__" and _EXPERT_RE.search(name) and "shared" not in name:
                    a, b = meta["data_offsets"]
                    fh.seek(8 + hlen + a)
                    fh.write(b"\0" * (b - a))
                    hit += 1
    return hit


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_expert_data_is_read_after_load(family, fresh_checkpoint, checkpoint, reference):
    """Zeroing expert data after from_pretrained changes the result: it was not read at load."""
    path = fresh_checkpoint(family, shards=2)
    ids = ids_for(5, seed=8)
    original = reference(checkpoint(family))
    with torch.no_grad():
        before = original(input_ids=ids, use_cache=False).logits
    with open_coordinator(path, prefetch_depth=0) as c:
        assert _zero_expert_data(path) > 0
        ours = c.forward(ids)
    zeroed = load_reference(path)
    with torch.no_grad():
        after = zeroed(input_ids=ids, use_cache=False).logits
    assert (after - before).abs().max() > 1e-2  # the experts matter for this model
    diff = (ours - after).abs().max().item()
    assert diff <= 1e-4, f"result does not reflect expert data on disk at run time (diff {diff:.3g})"
