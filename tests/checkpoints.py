"""Tiny random Hugging Face MoE checkpoints, built at test time (no downloads).

transformers is the reference implementation we must match; it is used only by
the tests, never by moeshard itself.

    path = make_checkpoint(tmp_dir, "mixtral", variant="tied", dtype=torch.bfloat16, shards=2)
    ref = load_reference(path)                       # transformers model, eval, eager attention

`VARIANTS[family]` lists the variant names of each family; `variant_config(family,
variant)` returns the config kwargs a variant uses. Everything is deterministic
in `seed`: the same (family, variant, seed, overrides) gives bit-identical
weights whatever `dtype` / `shards` / save layout is asked for, so a sharded or
bf16 checkpoint can be compared against the single-file fp32 one.

Weights are re-initialised after `from_config` with stds large enough that the
logits and the routing are far from degenerate (transformers' default 0.02 gives
near-uniform routing and near-constant logits at these sizes): linear weights
~N(0, 0.15), routers ~N(0, 0.3), embeddings ~N(0, 0.5), lm_head ~N(0, 0.3),
norms 1 + N(0, 0.1), biases N(0, 0.1), DeepSeek `e_score_correction_bias`
N(0, 0.1) (sigmoid scores spread over ~0.2..0.8, so the bias changes choices).

Checkpoints are written by `save_pretrained`, which (in transformers 5.x) writes
the classic per-expert layout (`...experts.{e}.w1.weight` for Mixtral,
`...experts.{e}.gate_proj.weight` for the others) that real checkpoints use, and a
5.x-style config.json (`rope_parameters`). `to_legacy_config(path)` rewrites a
config.json the way real hub checkpoints look (`rope_theta`, `rope_scaling`,
`torch_dtype`, Qwen3 `num_experts`); the "legacy" variant of every family does it.

DeepSeek-V3 and GLM-4.5 checkpoints carry their multi-token-prediction layer in the files, as
released (`add_mtp_layers`). `make_released_checkpoint(tmp, name)` builds one for each released
config in tests/fixtures/configs/ (`RELEASED` lists them), in the release's dtype and spelling.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "deepseek_v2", "glm4_moe")

# YaRN as the releases spell it (DeepSeek-V3/R1: mscale = mscale_all_dim = 1), shrunk: a 64-position
# original context stretched 4x to the fixtures' 256 max_position_embeddings.
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32.0,
        "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}

# Special tokens, inside the vocab for every family.
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
VOCAB = 128

_COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    pad_token_id=PAD_ID,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    tie_word_embeddings=False,
    attention_dropout=0.0,
)

# Base config per family (on top of _COMMON). Sizes differ between families on
# purpose (hidden 32/48/64, 2-3 layers, 4-8 experts) so that no shape is hard-coded.
_BASE: dict[str, dict[str, Any]] = {
    "mixtral": dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=4, num_experts_per_tok=2,
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
        sliding_window=None, router_jitter_noise=0.0,
    ),
    "qwen2_moe": dict(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=24,
        shared_expert_intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
        num_experts=4, num_experts_per_tok=2, norm_topk_prob=False,
        qkv_bias=True, decoder_sparse_step=1, mlp_only_layers=[],
        use_sliding_window=False,
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
    ),
    "qwen3_moe": dict(
        # head_dim (16) != hidden_size / num_attention_heads (8), like real Qwen3.
        hidden_size=32, intermediate_size=64, moe_intermediate_size=24,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, num_experts=6, num_experts_per_tok=2, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[], attention_bias=False,
        use_sliding_window=False,
        rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"},
    ),
    "olmoe": dict(
        hidden_size=48, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4,
        num_experts=4, num_experts_per_tok=2, norm_topk_prob=False,
        clip_qkv=None, attention_bias=False,
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
    ),
    "deepseek_v3": dict(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=24,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
        n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
        n_group=4, topk_group=2, first_k_dense_replace=1,
        routed_scaling_factor=2.5, norm_topk_prob=True,
        q_lora_rank=24, kv_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12,
        rope_interleave=True, attention_bias=False,
        # As released: one multi-token-prediction layer, stored at model.layers.{num_hidden_layers}.
        num_nextn_predict_layers=1,
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
    ),
    "deepseek_v2": dict(  # V2-Lite shape: no q_lora, greedy softmax routing, 2 shared experts
        hidden_size=32, intermediate_size=64, moe_intermediate_size=24,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
        n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=2, first_k_dense_replace=1,
        topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=False,
        q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12,
        attention_bias=False,
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
    ),
    "glm4_moe": dict(  # GLM-4.5-Air shape: q/k/v bias, partial RoPE, head_dim != hidden / heads
        hidden_size=32, intermediate_size=64, moe_intermediate_size=24,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
        n_group=1, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=True,
        attention_bias=True, use_qk_norm=False, partial_rotary_factor=0.5,
        num_nextn_predict_layers=1,
        rope_parameters={"rope_theta": 1000000.0, "rope_type": "default", "partial_rotary_factor": 0.5},
    ),
}

# Variants: config overrides (applied on top of the base), plus two flags:
#   "_legacy": rewrite config.json to hub style after saving (see to_legacy_config).
_VARIANT_DEFS: dict[str, dict[str, dict[str, Any]]] = {
    "mixtral": {
        "base": {},
        "e8_top3": dict(num_local_experts=8, num_experts_per_tok=3, num_hidden_layers=3),
        "top1": dict(num_experts_per_tok=1),
        "tied": dict(tie_word_embeddings=True),
        "mha_head_dim": dict(  # MHA, explicit head_dim 16 (q_proj 32 -> 64), other rope theta
            num_key_value_heads=4, head_dim=16,
            rope_parameters={"rope_theta": 500.0, "rope_type": "default"},
        ),
        "legacy": {"_legacy": True},
        "sliding": dict(sliding_window=5),
        # head_dim explicit: transformers' YaRN reads config.head_dim, which Mixtral leaves None
        "yarn": dict(head_dim=8, rope_parameters={"rope_theta": 10000.0, **YARN, "mscale": None,
                                                  "mscale_all_dim": None}),
        "linear": {"_legacy": True, "rope_parameters": {"rope_theta": 10000.0, "rope_type": "linear", "factor": 3.0}},
        # max_position_embeddings 24: generation runs past it (the context is factor x 24), so the NTK
        # base grows step by step
        "dynamic": dict(max_position_embeddings=24, head_dim=8,
                        rope_parameters={"rope_theta": 10000.0, "rope_type": "dynamic", "factor": 2.0}),
    },
    "qwen2_moe": {
        "base": {},
        "norm_topk_e8_top3": dict(num_experts=8, num_experts_per_tok=3, norm_topk_prob=True),
        "no_qkv_bias": dict(qkv_bias=False),
        "sparse_step2": dict(num_hidden_layers=4, decoder_sparse_step=2),  # MoE on layers 1, 3
        "mlp_only": dict(num_hidden_layers=3, mlp_only_layers=[1]),         # layer 1 dense
        "tied": dict(tie_word_embeddings=True),
        "legacy": {"_legacy": True, "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"}},
        "sliding": dict(num_hidden_layers=3, use_sliding_window=True, sliding_window=5, max_window_layers=2),
        "yarn": dict(rope_parameters={"rope_theta": 1000000.0, **YARN, "mscale": None, "mscale_all_dim": None}),
    },
    "qwen3_moe": {
        "base": {},
        "no_norm_topk_e8": dict(num_experts=8, num_experts_per_tok=2, norm_topk_prob=False),
        "top4_attn_bias": dict(num_experts_per_tok=4, attention_bias=True,
                               rope_parameters={"rope_theta": 10000.0, "rope_type": "default"}),
        "sparse_step2": dict(num_hidden_layers=4, decoder_sparse_step=2),
        "mlp_only": dict(num_hidden_layers=3, mlp_only_layers=[1]),
        "tied": dict(tie_word_embeddings=True),
        "legacy": {"_legacy": True},
        # Qwen3's documented long-context setting, legacy spelling; attention_factor given explicitly
        "yarn_legacy": {"_legacy": True, "rope_parameters": {"rope_theta": 1000000.0, **YARN, "mscale": None,
                                                             "mscale_all_dim": None, "attention_factor": 1.2}},
    },
    "olmoe": {
        "base": {},
        "clip_qkv": dict(clip_qkv=0.5),
        "e8_top4_norm": dict(num_experts=8, num_experts_per_tok=4, norm_topk_prob=True),
        "gqa": dict(num_key_value_heads=2, rope_parameters={"rope_theta": 500000.0, "rope_type": "default"}),
        "tied": dict(tie_word_embeddings=True),
        "legacy": {"_legacy": True, "clip_qkv": 1.0},
        "yarn_legacy": {"_legacy": True, "rope_parameters": {"rope_theta": 10000.0, **YARN, "mscale": None,
                                                             "mscale_all_dim": None, "truncate": False}},
        "dynamic": dict(max_position_embeddings=16,
                        rope_parameters={"rope_theta": 10000.0, "rope_type": "dynamic", "factor": 3.0}),
    },
    "deepseek_v3": {
        "base": {},
        "no_q_lora": dict(q_lora_rank=None),
        "no_shared": dict(n_shared_experts=0),
        "shared2": dict(n_shared_experts=2),
        "dense0_nogroup": dict(first_k_dense_replace=0, n_group=1, topk_group=1, num_hidden_layers=2),
        "top3_scale1_nonorm": dict(num_experts_per_tok=3, routed_scaling_factor=1.0, norm_topk_prob=False),
        "tied": dict(tie_word_embeddings=True),
        "legacy": {"_legacy": True},
        # the released spelling: rope_theta + rope_scaling {type: yarn, ...} (DeepSeek-V3/R1)
        "yarn_legacy": {"_legacy": True, "rope_parameters": {"rope_theta": 10000.0, **YARN}},
        # transformers 5 spelling; mscale != mscale_all_dim also scales cos/sin
        "yarn": dict(rope_parameters={"rope_theta": 10000.0, **YARN, "mscale": 0.707, "mscale_all_dim": 1.0}),
        "no_mtp": dict(num_nextn_predict_layers=0),
    },
    "deepseek_v2": {
        "base": {},
        # DeepSeek-V2 (not Lite): q_lora, group-limited greedy routing, large routed scaling
        "group_limited": dict(topk_method="group_limited_greedy", n_group=4, topk_group=2, q_lora_rank=24,
                              routed_scaling_factor=16.0, num_experts_per_tok=3),
        "tied": dict(tie_word_embeddings=True),
        "legacy": {"_legacy": True},
        # V2-Lite's released YaRN: mscale = mscale_all_dim = 0.707
        "yarn_legacy": {"_legacy": True, "rope_parameters": {"rope_theta": 10000.0, **YARN, "mscale": 0.707,
                                                             "mscale_all_dim": 0.707}},
    },
    "glm4_moe": {
        "base": {},
        # GLM-4.5 (not Air): qk-norm; grouped routing exercised too
        "qk_norm_grouped": dict(use_qk_norm=True, n_group=4, topk_group=2, routed_scaling_factor=2.5),
        "tied": dict(tie_word_embeddings=True),
        "legacy": {"_legacy": True},
        "yarn": dict(rope_parameters={"rope_theta": 1000000.0, **YARN, "mscale": None, "mscale_all_dim": None,
                                      "partial_rotary_factor": 0.5}),
    },
}

VARIANTS: dict[str, list[str]] = {fam: list(v) for fam, v in _VARIANT_DEFS.items()}

# (family, variant) pairs, handy for pytest.mark.parametrize(ids=...).
ALL_VARIANTS: list[tuple[str, str]] = [(f, v) for f in FAMILIES for v in VARIANTS[f]]

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def _config_class(family: str):
    import transformers as tf

    return {
        "mixtral": tf.MixtralConfig,
        "qwen2_moe": tf.Qwen2MoeConfig,
        "qwen3_moe": tf.Qwen3MoeConfig,
        "olmoe": tf.OlmoeConfig,
        "deepseek_v3": tf.DeepseekV3Config,
        "deepseek_v2": tf.DeepseekV2Config,
        "glm4_moe": tf.Glm4MoeConfig,
    }[family]


def variant_config(family: str, variant: str = "base", **overrides) -> dict[str, Any]:
    """Config kwargs for (family, variant) with `overrides` applied last. Flags start with '_'."""
    if family not in _BASE:
        raise KeyError(f"unknown family {family!r}; known: {sorted(_BASE)}")
    if variant not in _VARIANT_DEFS[family]:
        raise KeyError(f"unknown variant {variant!r} for {family}; known: {VARIANTS[family]}")
    kw = copy.deepcopy(_COMMON)
    kw.update(copy.deepcopy(_BASE[family]))
    kw.update(copy.deepcopy(_VARIANT_DEFS[family][variant]))
    kw.update(copy.deepcopy(overrides))
    return kw


def make_config(family: str, variant: str = "base", **overrides):
    """The transformers config object for (family, variant)."""
    kw = {k: v for k, v in variant_config(family, variant, **overrides).items() if not k.startswith("_")}
    return _config_class(family)(**kw)


@torch.no_grad()
def _reinit(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter (and the DeepSeek score bias) from a dedicated generator."""
    g = torch.Generator().manual_seed(seed + 7919)

    def normal_(t: torch.Tensor, mean: float, std: float) -> None:
        if t.numel() == 0:
            return
        t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float32) * std + mean)

    for name, p in model.named_parameters():  # tied params are listed once
        if p.ndim == 1:
            if name.endswith("bias"):
                normal_(p, 0.0, 0.1)
            else:  # every 1-D weight in these models is an RMSNorm weight
                normal_(p, 1.0, 0.1)
        elif "embed_tokens" in name:
            normal_(p, 0.0, 0.5)
        elif name.startswith("lm_head"):
            normal_(p, 0.0, 0.3)
        elif name.endswith(".gate.weight") or name.endswith("shared_expert_gate.weight"):
            normal_(p, 0.0, 0.3)  # routers: spread-out routing probabilities
        else:
            normal_(p, 0.0, 0.15)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            normal_(b, 0.0, 0.1)


def _state_nbytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def make_checkpoint(
    tmp_dir: str | os.PathLike,
    family: str,
    *,
    variant: str = "base",
    dtype: torch.dtype | str = torch.float32,
    shards: int = 1,
    tied: bool = False,
    seed: int = 0,
    legacy: bool | None = None,
    **overrides,
) -> Path:
    """Build a tiny random HF checkpoint for `family`/`variant` in `tmp_dir` and return its path.

    dtype: storage dtype of the saved tensors (fp32 / bf16 / fp16). DeepSeek's
      `e_score_correction_bias` stays float32 whatever the dtype, as in real checkpoints.
    shards: >1 writes a sharded checkpoint with model.safetensors.index.json (at least 2
      files; save_pretrained packs greedily so the count may differ from `shards` by one).
    tied: force tie_word_embeddings=True (no lm_head.weight in the files).
    legacy: rewrite config.json in hub style (`rope_theta`, ...); default: the variant's flag.
    overrides: config kwargs applied last (e.g. num_hidden_layers=4).
    """
    from transformers import AutoModelForCausalLM

    if isinstance(dtype, str):
        dtype = _DTYPES[dtype]
    kw = variant_config(family, variant, **overrides)
    if tied:
        kw["tie_word_embeddings"] = True
    if legacy is None:
        legacy = bool(kw.get("_legacy", False))
    cfg = _config_class(family)(**{k: v for k, v in kw.items() if not k.startswith("_")})

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    _reinit(model, seed)
    model.eval()
    if dtype != torch.float32:
        model.to(dtype)
        for mod in model.modules():
            b = getattr(mod, "e_score_correction_bias", None)
            if isinstance(b, torch.Tensor):
                mod.e_score_correction_bias = b.float()  # real DeepSeek keeps this in fp32
    model.config.dtype = dtype

    # Greedy decoding must not stop at EOS in the reference: generation config without eos.
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = BOS_ID, EOS_ID, PAD_ID

    out = Path(tmp_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_kw: dict[str, Any] = {}
    if shards > 1:
        save_kw["max_shard_size"] = _state_nbytes(model) // shards + 1
    model.save_pretrained(out, **save_kw)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    if shards > 1 and (len(files) < 2 or not (out / "model.safetensors.index.json").exists()):
        raise RuntimeError(f"expected a sharded checkpoint in {out}, got {files}")
    if shards <= 1 and files != ["model.safetensors"]:
        raise RuntimeError(f"expected a single model.safetensors in {out}, got {files}")
    mtp = kw.get("num_nextn_predict_layers") or 0
    if mtp:
        add_mtp_layers(out, model, mtp, seed)
    if legacy:
        to_legacy_config(out)
    return out


@torch.no_grad()
def add_mtp_layers(path: Path, model: torch.nn.Module, count: int, seed: int) -> list[str]:
    """Write `count` multi-token-prediction layers into the checkpoint's files, as DeepSeek-V3/R1 and
    GLM-4.5 ship them: at model.layers.{num_hidden_layers + i}, a full decoder layer (shaped like the
    last one, experts included) plus embed_tokens, enorm, hnorm, eh_proj and shared_head.{norm, head}.
    They go into the last shard (and the index), where the releases keep them. Returns their names."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(seed + 104729)
    n = model.config.num_hidden_layers
    last = f"model.layers.{n - 1}."
    H, V = model.config.hidden_size, model.config.vocab_size
    dtype = model.model.embed_tokens.weight.dtype
    index_path = path / "model.safetensors.index.json"
    files = sorted(p.name for p in path.glob("*.safetensors"))
    target = files[-1]
    tensors = load_file(str(path / target))
    on_disk = set()
    for fname in files:  # the saved (per-expert) names of the last layer, whatever the in-memory layout
        with safe_open(str(path / fname), "pt") as f:
            on_disk |= {k for k in f.keys() if k.startswith(last)}
    added = []
    for i in range(count):
        pre = f"model.layers.{n + i}."
        extra = {"embed_tokens.weight": (V, H), "enorm.weight": (H,), "hnorm.weight": (H,),
                 "eh_proj.weight": (H, 2 * H), "shared_head.norm.weight": (H,), "shared_head.head.weight": (V, H)}
        for name in sorted(on_disk):
            src = _saved_tensor(path, files, name)
            extra[name[len(last):]] = (tuple(src.shape), src.dtype)
        for short, spec in extra.items():
            shape, dt = spec if isinstance(spec[0], tuple) else (spec, dtype)
            t = torch.randn(shape, generator=g) * 0.15
            if short.endswith("norm.weight") or short.endswith("layernorm.weight"):
                t = 1 + t
            tensors[pre + short] = t.to(dt).contiguous()
            added.append(pre + short)
    save_file(tensors, str(path / target), metadata={"format": "pt"})
    if index_path.exists():
        index = json.loads(index_path.read_text())
        index["weight_map"].update({name: target for name in added})
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return added


def _saved_tensor(path: Path, files: list[str], name: str) -> torch.Tensor:
    from safetensors import safe_open

    for fname in files:
        with safe_open(str(path / fname), "pt") as f:
            if name in f.keys():
                return f.get_tensor(name)
    raise KeyError(name)


# ---- released configs (tests/fixtures/configs/*.json) ----------------------------------------------

FIXTURE_DIR = Path(__file__).parent / "fixtures" / "configs"

# fixture name -> (Hugging Face repo it copies, format of the released weights).
# "bf16": loads today. "fp8": block-quantized FP8 (issue 12 item 2). "mxfp4": MXFP4 experts (item 3).
RELEASED: dict[str, tuple[str, str]] = {
    "deepseek-v3": ("deepseek-ai/DeepSeek-V3", "fp8"),
    "deepseek-r1": ("deepseek-ai/DeepSeek-R1", "fp8"),
    "kimi-k2": ("moonshotai/Kimi-K2-Instruct", "fp8"),
    "qwen3-30b-a3b": ("Qwen/Qwen3-30B-A3B", "bf16"),
    "qwen3-235b-a22b": ("Qwen/Qwen3-235B-A22B", "bf16"),
    "mixtral-8x7b": ("mistralai/Mixtral-8x7B-v0.1", "bf16"),
    "olmoe-1b-7b": ("allenai/OLMoE-1B-7B-0924", "bf16"),
    "gpt-oss-20b": ("openai/gpt-oss-20b", "mxfp4"),
    "glm-4.5-air": ("zai-org/GLM-4.5-Air", "bf16"),
    "deepseek-v2-lite": ("deepseek-ai/DeepSeek-V2-Lite", "bf16"),
}

# model_type transformers knows the architecture under (Kimi-K2 ships DeepSeek-V3's as "kimi_k2").
_HF_MODEL_TYPE = {"kimi_k2": "deepseek_v3"}
# config.json keys of the releases that only their remote code or training read
_NOT_FOR_TRANSFORMERS = ("auto_map", "architectures", "quantization_config", "torch_dtype", "transformers_version")


def released_config(name: str) -> dict[str, Any]:
    """The fixture's config.json as a dict (the released file with sizes shrunk)."""
    return json.loads((FIXTURE_DIR / f"{name}.json").read_text())


def make_released_checkpoint(tmp_dir: str | os.PathLike, name: str, *, shards: int = 2, seed: int = 0,
                             strip_quantization: bool = True, fp8_block: tuple[int, int] | None = None) -> Path:
    """A tiny random checkpoint for fixture `name` in the released tensor layout and dtype
    (`torch_dtype`, float32 for the DeepSeek score bias), sharded, with the MTP layer in its files where
    the release has one, and the fixture's config.json written verbatim (released spelling).

    strip_quantization: drop `quantization_config` from the written config.json and write the weights
      unquantized. With it kept, an FP8 release gets its linear weights as float8_e4m3fn plus float32
      `<name>_scale_inv` per block (`quantize_fp8`), the block size from the config (or `fp8_block`);
      MXFP4 writing comes with its loader (issue 12 item 3).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    released = released_config(name)
    kw = {k: v for k, v in released.items() if k not in _NOT_FOR_TRANSFORMERS}
    kw["model_type"] = _HF_MODEL_TYPE.get(kw["model_type"], kw["model_type"])
    cfg = AutoConfig.for_model(**kw)
    dtype = _DTYPES[released.get("torch_dtype") or "bfloat16"]

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    _reinit(model, seed)
    model.eval()
    if dtype != torch.float32:
        model.to(dtype)
        for mod in model.modules():
            b = getattr(mod, "e_score_correction_bias", None)
            if isinstance(b, torch.Tensor):
                mod.e_score_correction_bias = b.float()
    out = Path(tmp_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_kw = {"max_shard_size": _state_nbytes(model) // shards + 1} if shards > 1 else {}
    model.save_pretrained(out, **save_kw)
    mtp = released.get("num_nextn_predict_layers") or 0
    if mtp:
        add_mtp_layers(out, model, mtp, seed)
    written = dict(released)
    q = written.get("quantization_config") or {}
    if strip_quantization:
        written.pop("quantization_config", None)
    elif q.get("quant_method") == "fp8":
        block = tuple(fp8_block or q["weight_block_size"])
        written["quantization_config"] = dict(q, weight_block_size=list(block))
        _quantize_files(out, block)
    (out / "config.json").write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")
    return out


FP8_MAX = 448.0  # largest finite float8_e4m3fn


def is_fp8_weight(name: str) -> bool:
    """Which tensors DeepSeek-V3/R1 and Kimi-K2 ship in FP8: every linear weight except the router,
    embeddings, lm_head and the MTP head; norms and the score bias are never FP8."""
    if not name.endswith(".weight") or "norm" in name:
        return False
    return not any(k in name for k in ("embed_tokens", "lm_head", ".mlp.gate.", "shared_head.head"))


def quantize_fp8(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (float8_e4m3fn [out, in], float32 scale_inv [ceil(out/bo), ceil(in/bi)]), one scale per
    block (edge blocks partial), with w ~= q * scale_inv blockwise as DeepSeek's weight_dequant reads it."""
    import torch.nn.functional as F

    (rows, cols), (bo, bi) = w.shape, block
    nbo, nbi = -(-rows // bo), -(-cols // bi)
    padded = F.pad(w.float(), (0, nbi * bi - cols, 0, nbo * bo - rows)).view(nbo, bo, nbi, bi)
    scale = padded.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX                      # [nbo, nbi]
    q = (padded / scale[:, None, :, None]).view(nbo * bo, nbi * bi)[:rows, :cols]
    return q.to(torch.float8_e4m3fn).contiguous(), scale.contiguous()


def dequantize_fp8(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The float32 weight an FP8 tensor and its block scales stand for."""
    (rows, cols), (bo, bi) = q.shape, block
    s = scale_inv.repeat_interleave(bo, 0).repeat_interleave(bi, 1)[:rows, :cols]
    return q.float() * s


def _quantize_files(path: Path, block: tuple[int, int]) -> None:
    """Rewrite every shard with its FP8 weights quantized, each scale in the same file as its weight."""
    from safetensors.torch import load_file, save_file

    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else None
    for f in sorted(path.glob("*.safetensors")):
        tensors = load_file(str(f))
        for name in [n for n in tensors if is_fp8_weight(n) and tensors[n].ndim == 2]:
            tensors[name], tensors[name + "_scale_inv"] = quantize_fp8(tensors[name], block)
            if index is not None:
                index["weight_map"][name + "_scale_inv"] = f.name
        save_file(tensors, str(f), metadata={"format": "pt"})
    if index is not None:
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _dequantized_copy(path: Path, ref_dir: Path, block: tuple[int, int]) -> None:
    """ref_dir gets path's tensors with every FP8 weight dequantized to float32 and its scale dropped."""
    from safetensors.torch import load_file, save_file

    for f in sorted(path.glob("*.safetensors")):
        tensors = load_file(str(f))
        for name in [n for n in tensors if n.endswith("_scale_inv")]:
            w = name[: -len("_scale_inv")]
            tensors[w] = dequantize_fp8(tensors[w], tensors.pop(name), block)
        save_file(tensors, str(ref_dir / f.name), metadata={"format": "pt"})
    index_path = path / "model.safetensors.index.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
        index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not k.endswith("_scale_inv")}
        (ref_dir / index_path.name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def released_reference(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """transformers' model for a released-fixture checkpoint. Where transformers cannot read it as is
    (Kimi-K2's model_type; FP8 weights, which it would quantize its own way) the reference reads a sibling
    copy: config.json naming deepseek_v3 without quantization_config, FP8 weights dequantized."""
    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    hf_type = _HF_MODEL_TYPE.get(cfg["model_type"])
    q = cfg.get("quantization_config") or {}
    if hf_type is None and not q:
        return load_reference(path, dtype)
    ref_dir = path.parent / (path.name + "-hf")
    ref_dir.mkdir(exist_ok=True)
    if q.get("quant_method") == "fp8":
        _dequantized_copy(path, ref_dir, tuple(q["weight_block_size"]))
    for f in path.iterdir():
        if f.name != "config.json" and not (ref_dir / f.name).exists():
            (ref_dir / f.name).symlink_to(f.resolve())
    cfg = {k: v for k, v in cfg.items() if k not in ("auto_map", "quantization_config")}
    cfg["model_type"] = hf_type or cfg["model_type"]
    (ref_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return load_reference(ref_dir, dtype)


def to_legacy_config(path: str | os.PathLike) -> dict[str, Any]:
    """Rewrite `path/config.json` the way real hub checkpoints spell it; returns the new dict.

    - `rope_parameters: {rope_theta, rope_type: default}` -> `rope_theta` + `rope_scaling: null`
    - `dtype` -> `torch_dtype`
    - qwen3_moe: `num_local_experts` -> `num_experts`; deepseek_v3: `n_routed_experts` kept
    - qwen2_moe: drop `layer_types` (old configs do not have it)
    """
    cfg_path = Path(path) / "config.json"
    cfg = json.loads(cfg_path.read_text())
    rp = cfg.pop("rope_parameters", None)
    if rp is not None:
        rp = dict(rp)
        cfg["rope_theta"] = rp.pop("rope_theta")
        rtype = rp.pop("rope_type", "default")
        partial = rp.pop("partial_rotary_factor", None)
        if partial is not None:  # released GLM-4.5 configs keep it at the top level
            cfg["partial_rotary_factor"] = partial
        if rtype == "default" and not rp:
            cfg["rope_scaling"] = None
        else:  # as released: only "type", no "rope_type"
            cfg["rope_scaling"] = {"type": rtype, **{k: v for k, v in rp.items() if v is not None}}
    if "dtype" in cfg:
        cfg["torch_dtype"] = cfg.pop("dtype")
    if cfg.get("model_type") == "qwen3_moe" and "num_local_experts" in cfg:
        cfg["num_experts"] = cfg.pop("num_local_experts")
    if cfg.get("model_type") == "qwen2_moe":
        cfg.pop("layer_types", None)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return cfg


def edit_config(path: str | os.PathLike, **changes) -> dict[str, Any]:
    """Set (or with value `...` delete) keys of `path/config.json`; returns the new dict."""
    cfg_path = Path(path) / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for k, v in changes.items():
        if v is ...:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return cfg


def load_reference(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """The transformers model for checkpoint `path`, in `dtype`, eval mode, eager attention.

    Its generation_config has eos_token_id=None so greedy generation never stops early.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="eager")
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD_ID
    return model


def expert_tensor_names(family: str, layer: int, expert: int) -> list[str]:
    """The three on-disk tensor names of one routed expert (gate, up, down)."""
    if family == "mixtral":
        p = f"model.layers.{layer}.block_sparse_moe.experts.{expert}"
        return [f"{p}.w1.weight", f"{p}.w3.weight", f"{p}.w2.weight"]
    p = f"model.layers.{layer}.mlp.experts.{expert}"
    return [f"{p}.gate_proj.weight", f"{p}.up_proj.weight", f"{p}.down_proj.weight"]


def moe_layers(family: str, variant: str = "base", **overrides) -> list[int]:
    """Indices of the decoder layers that have routed experts."""
    kw = variant_config(family, variant, **overrides)
    n = kw["num_hidden_layers"]
    if family in ("mixtral", "olmoe"):
        return list(range(n))
    if family in ("deepseek_v3", "deepseek_v2", "glm4_moe"):
        return list(range(kw["first_k_dense_replace"], n))
    step, only = kw.get("decoder_sparse_step", 1), set(kw.get("mlp_only_layers", []))
    return [i for i in range(n) if i not in only and (i + 1) % step == 0]


def num_experts(family: str, variant: str = "base", **overrides) -> int:
    kw = variant_config(family, variant, **overrides)
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        if key in kw:
            return kw[key]
    raise KeyError("no expert count")


def top_k(family: str, variant: str = "base", **overrides) -> int:
    return variant_config(family, variant, **overrides)["num_experts_per_tok"]


def make_prompts(batch_lengths=(7, 4, 1), seed: int = 1, vocab: int = VOCAB):
    """LEFT-padded prompts: (ids LongTensor [B, T], attention_mask LongTensor [B, T]).

    Tokens avoid the special ids (pad/bos/eos); each row starts with BOS.
    """
    g = torch.Generator().manual_seed(seed)
    T = max(batch_lengths)
    ids = torch.full((len(batch_lengths), T), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(batch_lengths), T), dtype=torch.long)
    for i, n in enumerate(batch_lengths):
        row = torch.randint(3, vocab, (n,), generator=g)
        row[0] = BOS_ID
        ids[i, T - n:] = row
        mask[i, T - n:] = 1
    return ids, mask
