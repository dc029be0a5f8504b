"""The embedded default model (models/pydoc-moe): files intact, loads in transformers,
tokenizer round-trips, routing is not collapsed.

Produced by scripts/train_default_model.py; see models/pydoc-moe/README.md.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "pydoc-moe"
REQUIRED = [
    "config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
    "tokenizer_config.json", "loss.png", "README.md", "SHA256SUMS",
]
ROUND_TRIP = [
    "The for statement is used to iterate over the elements of a sequence.",
    "def f(x, *args, **kw):\n    return {'a': [1, 2.5e-3, None]}  # comment\n",
    "  leading spaces, tabs\tand unicode: café, 漢字, emoji 🐍, ünïcödé\r\n",
    "",
]
# Held-out-style text for the routing check (the reference manual's own phrasing).
ROUTING_TEXT = (
    "The while statement is used for repeated execution as long as an expression is true. "
    "This repeatedly tests the expression and, if it is true, executes the first suite; if "
    "the expression is false (which may be the first time it is tested) the suite of the else "
    "clause, if present, is executed and the loop terminates. A break statement executed in "
    "the first suite terminates the loop without executing the else clause's suite. "
    "Return a new list containing all items from the iterable in ascending order. A custom key "
    "function can be supplied to customize the sort order, and the reverse flag can be set to "
    "request the result in descending order. Raise ValueError if the value is not present."
)


def _sums() -> dict[str, str]:
    out = {}
    for line in (MODEL_DIR / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        out[name.lstrip("*")] = digest
    return out


def test_files_present_and_small():
    for name in REQUIRED:
        assert (MODEL_DIR / name).is_file(), name
    total = sum(p.stat().st_size for p in MODEL_DIR.iterdir() if p.is_file())
    assert total <= 42 * 1024 * 1024, total


def test_checksums_match():
    sums = _sums()
    files = {p.name for p in MODEL_DIR.iterdir() if p.is_file() and p.name != "SHA256SUMS"}
    assert set(sums) == files, "SHA256SUMS must list every file in the directory except itself"
    for name, digest in sums.items():
        assert hashlib.sha256((MODEL_DIR / name).read_bytes()).hexdigest() == digest, name


def test_checkpoint_is_standard_mixtral_bf16():
    from safetensors import safe_open

    cfg = json.loads((MODEL_DIR / "config.json").read_text())
    assert cfg["model_type"] == "mixtral"
    assert cfg["architectures"] == ["MixtralForCausalLM"]
    L, E, H, I, V = (cfg[k] for k in (
        "num_hidden_layers", "num_local_experts", "hidden_size", "intermediate_size", "vocab_size"))
    assert cfg["num_experts_per_tok"] == 2 and E == 8
    with safe_open(str(MODEL_DIR / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        for layer in range(L):
            p = f"model.layers.{layer}.block_sparse_moe"
            assert f.get_slice(f"{p}.gate.weight").get_shape() == [E, H]
            for e in range(E):
                assert f.get_slice(f"{p}.experts.{e}.w1.weight").get_shape() == [I, H]
                assert f.get_slice(f"{p}.experts.{e}.w3.weight").get_shape() == [I, H]
                assert f.get_slice(f"{p}.experts.{e}.w2.weight").get_shape() == [H, I]
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [V, H]
        assert "lm_head.weight" in keys
        dtypes = {f.get_slice(k).get_dtype() for k in keys}
    assert dtypes == {"BF16"}


def test_tokenizer_round_trips():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    for text in ROUND_TRIP:
        ids = tok.encode(text).ids
        assert ids[0] == 1  # <s> prepended, as in training
        assert tok.decode(ids, skip_special_tokens=True) == text


def test_hf_tokenizer_round_trips():
    transformers = pytest.importorskip("transformers")
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(MODEL_DIR)
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    assert len(tok) == json.loads((MODEL_DIR / "config.json").read_text())["vocab_size"]
    for text in ROUND_TRIP:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == text


@pytest.fixture(scope="module")
def hf_model():
    pytest.importorskip("transformers")
    import torch
    from transformers import AutoTokenizer, MixtralForCausalLM

    model = MixtralForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    return model, tok


def test_loads_and_generates_in_transformers(hf_model):
    import torch

    model, tok = hf_model
    assert type(model).__name__ == "MixtralForCausalLM"
    ids = tok("The for statement", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    new = out[0, ids["input_ids"].shape[1]:]
    assert len(new) > 0
    text = tok.decode(out[0], skip_special_tokens=True)
    assert text.startswith("The for statement")
    # A trained model: next-token loss on its own domain is far below uniform (ln V ~ 8.3).
    enc = tok(ROUTING_TEXT, return_tensors="pt")
    with torch.no_grad():
        loss = model(**enc, labels=enc["input_ids"]).loss.item()
    assert loss < 5.0, loss


def test_routing_not_collapsed(hf_model):
    import torch

    model, tok = hf_model
    enc = tok(ROUTING_TEXT, return_tensors="pt")
    with torch.no_grad():
        out = model(**enc, output_router_logits=True)
    E, k = model.config.num_local_experts, model.config.num_experts_per_tok
    assert len(out.router_logits) == model.config.num_hidden_layers
    for layer, logits in enumerate(out.router_logits):
        sel = torch.topk(logits.float(), k, dim=-1).indices.reshape(-1)
        share = torch.bincount(sel, minlength=E).double() / sel.numel()
        assert share.max() < 0.5, (layer, share.tolist())
        assert (share > 0).sum() >= E - 1, (layer, share.tolist())
