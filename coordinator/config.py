"""Model configuration: one frozen dataclass per family, read from config.json.

The model code reads only the fields of `ModelConfig`; each family's subclass knows
how its config.json spells them and which features it turns on.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckpointError, UnsupportedModelError


@dataclass(frozen=True)
class ModelConfig:
    """Fields shared by every family. Derived, family-specific behaviour is in properties."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int          # dense MLP layers
    moe_intermediate_size: int      # one routed expert
    num_experts: int
    top_k: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    hidden_act: str = "silu"
    attention_bias: bool = False    # q/k/v biases
    o_bias: bool = False
    norm_topk_prob: bool = True
    sliding_window: tuple[int | None, ...] = ()   # per layer; None = full attention
    moe_layers: tuple[bool, ...] = ()             # per layer: routed experts or dense MLP
    qk_norm: str = "none"           # "none" | "head" (per head) | "full" (whole projection)
    clip_qkv: float | None = None
    shared_expert_size: int = 0     # intermediate size of the shared expert(s), 0 = none
    shared_expert_gated: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    attention: str = field(default="gqa", init=False)
    router: str = field(default="softmax", init=False)

    @property
    def moe_layer_ids(self) -> list[int]:
        return [i for i, m in enumerate(self.moe_layers) if m]

    @property
    def max_positions(self) -> int:
        """How many positions (prompt + generated) the model is defined for."""
        return self.max_position_embeddings


@dataclass(frozen=True)
class DeepseekV3Config(ModelConfig):
    """DeepSeek-V3/R1: multi-head latent attention and sigmoid, group-limited routing."""

    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    rope_interleave: bool = True

    attention: str = field(default="mla", init=False)
    router: str = field(default="sigmoid_grouped", init=False)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


def _rope_theta(d: dict[str, Any]) -> float:
    """transformers 5 writes rope_parameters; released checkpoints write rope_theta/rope_scaling."""
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    for p in (params, scaling):
        kind = p.get("rope_type", p.get("type", "default"))
        if kind not in ("default", None):
            raise UnsupportedModelError(
                f"rope scaling {kind!r} is not implemented (config rope_scaling/rope_parameters); "
                "moeshard supports plain RoPE only. Remove the scaling or use a model without it.")
    theta = params.get("rope_theta", d.get("rope_theta"))
    return float(theta if theta is not None else 10000.0)


def _num_experts(d: dict[str, Any]) -> int:
    """Released checkpoints and transformers 5 spell the routed-expert count differently."""
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        if d.get(key):
            return d[key]
    raise KeyError("num_local_experts / num_experts / n_routed_experts")


def _common(d: dict[str, Any], head_dim: int | None = None) -> dict[str, Any]:
    heads = d["num_attention_heads"]
    return dict(
        model_type=d["model_type"],
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        num_layers=d["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=d.get("num_key_value_heads") or heads,
        head_dim=head_dim or d.get("head_dim") or d["hidden_size"] // heads,
        intermediate_size=d["intermediate_size"],
        moe_intermediate_size=d.get("moe_intermediate_size") or d["intermediate_size"],
        num_experts=_num_experts(d),
        top_k=d["num_experts_per_tok"],
        rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=_rope_theta(d),
        max_position_embeddings=d.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        hidden_act=d.get("hidden_act", "silu"),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=d.get("eos_token_id"),
        pad_token_id=d.get("pad_token_id"),
    )


def _sparse_layers(d: dict[str, Any]) -> tuple[bool, ...]:
    """Qwen-style: MoE where (l+1) % decoder_sparse_step == 0 and l not in mlp_only_layers."""
    step = d.get("decoder_sparse_step", 1) or 1
    dense = set(d.get("mlp_only_layers") or [])
    return tuple(l not in dense and (l + 1) % step == 0 for l in range(d["num_hidden_layers"]))


def _mixtral(d):
    c = _common(d)
    n = c["num_layers"]
    return ModelConfig(**c, norm_topk_prob=True, sliding_window=(d.get("sliding_window"),) * n,
                       moe_layers=(True,) * n)


def _qwen2_moe(d):
    c = _common(d)
    n = c["num_layers"]
    if d.get("use_sliding_window"):
        window = d.get("sliding_window")
        types = d.get("layer_types") or ["sliding_attention" if (i + 1) % 2 and i < d.get("max_window_layers", n)
                                         else "full_attention" for i in range(n)]
        windows = tuple(window if t == "sliding_attention" else None for t in types)
    else:
        windows = (None,) * n
    return ModelConfig(**c, attention_bias=d.get("qkv_bias", True), norm_topk_prob=d.get("norm_topk_prob", False),
                       sliding_window=windows, moe_layers=_sparse_layers(d),
                       shared_expert_size=d.get("shared_expert_intermediate_size", 0), shared_expert_gated=True)


def _qwen3_moe(d):
    c = _common(d)
    n = c["num_layers"]
    window = d.get("sliding_window") if d.get("use_sliding_window") else None
    return ModelConfig(**c, attention_bias=d.get("attention_bias", False), o_bias=d.get("attention_bias", False),
                       norm_topk_prob=d.get("norm_topk_prob", False), sliding_window=(window,) * n,
                       moe_layers=_sparse_layers(d), qk_norm="head")


def _olmoe(d):
    c = _common(d)
    n = c["num_layers"]
    return ModelConfig(**c, attention_bias=d.get("attention_bias", False), o_bias=d.get("attention_bias", False),
                       norm_topk_prob=d.get("norm_topk_prob", False), sliding_window=(None,) * n,
                       moe_layers=(True,) * n, qk_norm="full", clip_qkv=d.get("clip_qkv"))


def _deepseek_v3(d):
    c = _common(d, head_dim=d["qk_nope_head_dim"] + d["qk_rope_head_dim"])
    n = c["num_layers"]
    first_dense = d.get("first_k_dense_replace") or 0
    shared = d.get("n_shared_experts") or 0
    if d.get("scoring_func", "sigmoid") != "sigmoid" or d.get("topk_method", "noaux_tc") != "noaux_tc":
        raise UnsupportedModelError("DeepSeek routing other than scoring_func='sigmoid', topk_method='noaux_tc' "
                                    "(DeepSeek-V3/R1) is not implemented")
    return DeepseekV3Config(
        **c, attention_bias=d.get("attention_bias", False), o_bias=d.get("attention_bias", False),
        norm_topk_prob=d.get("norm_topk_prob", True), sliding_window=(None,) * n,
        moe_layers=tuple(l >= first_dense for l in range(n)),
        shared_expert_size=shared * c["moe_intermediate_size"],
        q_lora_rank=d.get("q_lora_rank"), kv_lora_rank=d["kv_lora_rank"],
        qk_nope_head_dim=d["qk_nope_head_dim"], qk_rope_head_dim=d["qk_rope_head_dim"], v_head_dim=d["v_head_dim"],
        n_group=d.get("n_group") or 1, topk_group=d.get("topk_group") or 1,
        routed_scaling_factor=d.get("routed_scaling_factor", 1.0), rope_interleave=d.get("rope_interleave", True),
    )


FAMILIES = {"mixtral": _mixtral, "qwen2_moe": _qwen2_moe, "qwen3_moe": _qwen3_moe, "olmoe": _olmoe,
            "deepseek_v3": _deepseek_v3}


def config_from_dict(d: dict[str, Any]) -> ModelConfig:
    """Build the family's config from a parsed config.json."""
    kind = d.get("model_type")
    if kind not in FAMILIES:
        raise UnsupportedModelError(
            f"model_type {kind!r} is not supported; supported model types: {', '.join(sorted(FAMILIES))}")
    try:
        return FAMILIES[kind](d)
    except KeyError as e:
        raise CheckpointError(f"config.json for {kind} lacks required field {e.args[0]!r}") from None


def load_config(path: str | Path) -> ModelConfig:
    """Read `path/config.json` (or a config.json path) into a frozen config."""
    p = Path(path)
    p = p / "config.json" if p.is_dir() else p
    if not p.is_file():
        raise CheckpointError(f"no config.json at {p}: point moeshard at a Hugging Face checkpoint directory")
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p} is not valid JSON ({e}); re-download or fix the file") from None
    return config_from_dict(d)
