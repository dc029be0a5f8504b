"""Model configuration: one frozen dataclass per family, read from config.json.

The model code reads only the fields of `ModelConfig`; each family's subclass knows
how its config.json spells them and which features it turns on.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckpointError, UnsupportedModelError


ROPE_TYPES = ("default", "linear", "dynamic", "yarn")
QUANT_METHODS = ("fp8", "mxfp4")   # parsed here; the weights themselves are not yet supported (issue 12)


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling as transformers' `modeling_rope_utils` defines it.

    `kind` is one of ROPE_TYPES. `factor` is the context extension (linear, dynamic, yarn);
    the rest are YaRN's parameters, None where the config leaves them to their defaults.
    """

    kind: str = "default"
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class Quantization:
    """`quantization_config` of a released checkpoint, as read; which methods load is the checkpoint's concern."""

    method: str                                   # quant_method: "fp8" | "mxfp4"
    fmt: str | None = None                        # fp8: "e4m3"
    weight_block_size: tuple[int, ...] | None = None
    activation_scheme: str | None = None
    modules_to_not_convert: tuple[str, ...] = ()


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1 * mscale * ln(scale) + 1 (1 for scale <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


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
    rope: RopeScaling = RopeScaling()
    partial_rotary_factor: float = 1.0   # share of each head that RoPE rotates (GLM-4.5: 0.5)
    n_group: int = 1                     # grouped routing (DeepSeek, GLM-4.5)
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    num_nextn_predict_layers: int = 0    # multi-token-prediction layers stored after the decoder layers
    quantization: Quantization | None = None

    attention: str = field(default="gqa", init=False)
    router: str = field(default="softmax", init=False)

    @property
    def moe_layer_ids(self) -> list[int]:
        return [i for i, m in enumerate(self.moe_layers) if m]

    @property
    def rope_head_dim(self) -> int:
        """Per-head width of the part of q/k that RoPE sees, before the partial factor."""
        return self.head_dim

    @property
    def rope_dim(self) -> int:
        """Rotated width per head (transformers: int(head_dim * partial_rotary_factor))."""
        return int(self.rope_head_dim * self.partial_rotary_factor)

    @property
    def max_positions(self) -> int:
        """How many positions (prompt + generated) the model is defined for, RoPE scaling included.

        transformers itself enforces no limit; like vLLM's derived max length, YaRN allows
        factor * original_max_position_embeddings and linear/dynamic factor * max_position_embeddings
        (never less than max_position_embeddings).
        """
        r = self.rope
        if r.kind == "default" or not r.factor:
            return self.max_position_embeddings
        base = r.original_max_position_embeddings if r.kind == "yarn" else self.max_position_embeddings
        return max(self.max_position_embeddings, int(r.factor * base))

    @property
    def softmax_scale(self) -> float:
        """Attention's softmax scale: 1/sqrt(q·k width)."""
        return self.head_dim ** -0.5


@dataclass(frozen=True)
class DeepseekV3Config(ModelConfig):
    """DeepSeek-V3/R1: multi-head latent attention and sigmoid, group-limited routing."""

    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = True

    attention: str = field(default="mla", init=False)
    router: str = field(default="sigmoid_grouped", init=False)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def rope_head_dim(self) -> int:
        return self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """DeepSeek multiplies 1/sqrt(qk_head_dim) by yarn_mscale(factor, mscale_all_dim)**2 under any
        scaled RoPE (transformers' `yarn_apply_mscale`), so the YaRN-scaled logits keep their temperature."""
        scale = self.qk_head_dim ** -0.5
        r = self.rope
        if r.kind != "default" and r.mscale_all_dim:
            scale *= yarn_mscale(r.factor, r.mscale_all_dim) ** 2
        return scale


@dataclass(frozen=True)
class DeepseekV2Config(DeepseekV3Config):
    """DeepSeek-V2/V2-Lite: latent attention (RoPE always interleaved) and softmax routing,
    `topk_method` greedy or group_limited_greedy."""

    topk_method: str = "greedy"

    router: str = field(default="softmax_grouped", init=False)


@dataclass(frozen=True)
class GptOssConfig(ModelConfig):
    """gpt-oss: grouped-query attention with per-head sinks and alternating sliding/full layers, a biased
    router softmaxed over its top-k logits, experts with biases and a clamped SwiGLU."""

    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702

    attention: str = field(default="gqa_sinks", init=False)
    router: str = field(default="topk_softmax", init=False)


@dataclass(frozen=True)
class Glm4MoeConfig(ModelConfig):
    """GLM-4.5/4.5-Air: grouped-query attention with partial RoPE, DeepSeek-V3's sigmoid routing."""

    router: str = field(default="sigmoid_grouped", init=False)


def _rope(d: dict[str, Any], default_theta: float = 10000.0) -> tuple[float, RopeScaling]:
    """(rope_theta, scaling) from either spelling: released checkpoints write `rope_theta` and
    `rope_scaling` ({type: ...}); transformers 5 writes `rope_parameters` ({rope_type, rope_theta, ...}).
    Like transformers, `rope_scaling` wins when both are present."""
    p = d.get("rope_scaling") or d.get("rope_parameters") or {}
    if not isinstance(p, dict):
        raise CheckpointError(f"config rope_scaling/rope_parameters must be an object, got {p!r}")
    nested = sorted(k for k, v in p.items() if isinstance(v, dict))
    if nested:  # transformers 5 nests RoPE per layer type for some models (e.g. sliding vs full layers)
        raise UnsupportedModelError(f"per-layer-type RoPE parameters ({', '.join(nested)} in config "
                                    "rope_parameters) are not implemented; moeshard reads one RoPE setting per model")
    kind = p.get("rope_type", p.get("type")) or "default"
    theta = p.get("rope_theta", d.get("rope_theta"))
    theta = float(theta if theta is not None else default_theta)
    if kind not in ROPE_TYPES:
        raise UnsupportedModelError(
            f"RoPE type {kind!r} (config rope_scaling/rope_parameters) is not implemented; "
            f"moeshard implements {', '.join(ROPE_TYPES)}")
    if kind == "default":
        return theta, RopeScaling()
    if "factor" not in p:
        raise CheckpointError(f"config rope_scaling of type {kind!r} lacks required field 'factor'")
    factor = p["factor"]
    original = None
    if kind == "yarn":
        # transformers: a top-level original_max_position_embeddings (Phi-3 style) wins, else the
        # scaling's own, else max_position_embeddings; a null factor is their ratio.
        original = d.get("original_max_position_embeddings") or p.get("original_max_position_embeddings") \
            or d.get("max_position_embeddings", 4096)
        if factor is None:
            factor = d.get("max_position_embeddings", 4096) / original
    if not isinstance(factor, (int, float)) or factor <= 0:
        raise CheckpointError(f"config rope_scaling 'factor' must be a positive number, got {factor!r}")

    def num(key):
        v = p.get(key)
        return None if v is None else float(v)

    return theta, RopeScaling(kind=kind, factor=float(factor), original_max_position_embeddings=original,
                              beta_fast=num("beta_fast"), beta_slow=num("beta_slow"), mscale=num("mscale"),
                              mscale_all_dim=num("mscale_all_dim"), attention_factor=num("attention_factor"),
                              truncate=bool(p.get("truncate", True)))


def _partial_rotary_factor(d: dict[str, Any], default: float = 1.0) -> float:
    p = d.get("rope_parameters") or {}
    v = p.get("partial_rotary_factor", d.get("partial_rotary_factor"))
    return float(default if v is None else v)


def _quantization(d: dict[str, Any]) -> Quantization | None:
    """Read `quantization_config`; a method moeshard has no plan for is refused here, by name."""
    q = d.get("quantization_config")
    if not q:
        return None
    method = q.get("quant_method")
    if method not in QUANT_METHODS:
        raise UnsupportedModelError(
            f"quantization_config.quant_method {method!r} is not supported; moeshard loads unquantized "
            "(float32/bfloat16/float16) checkpoints: use the model's unquantized release")
    block = q.get("weight_block_size")
    return Quantization(method=method, fmt=q.get("fmt"), weight_block_size=tuple(block) if block else None,
                        activation_scheme=q.get("activation_scheme"),
                        modules_to_not_convert=tuple(q.get("modules_to_not_convert") or ()))


def _num_experts(d: dict[str, Any]) -> int:
    """Released checkpoints and transformers 5 spell the routed-expert count differently."""
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        if d.get(key):
            return d[key]
    raise KeyError("num_local_experts / num_experts / n_routed_experts")


def _common(d: dict[str, Any], head_dim: int | None = None, default_theta: float = 10000.0) -> dict[str, Any]:
    heads = d["num_attention_heads"]
    rope_theta, rope = _rope(d, default_theta)
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
        rope_theta=rope_theta,
        rope=rope,
        max_position_embeddings=d.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        hidden_act=d.get("hidden_act", "silu"),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=d.get("eos_token_id"),
        pad_token_id=d.get("pad_token_id"),
        num_nextn_predict_layers=d.get("num_nextn_predict_layers") or 0,
        quantization=_quantization(d),
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


def _moe_layer_freq(d: dict[str, Any]) -> None:
    # DeepSeek's own code also skips layers by moe_layer_freq; transformers does not, and every
    # release sets 1, so anything else is refused rather than guessed.
    freq = d.get("moe_layer_freq", 1)
    if freq not in (None, 1):
        raise UnsupportedModelError(f"moe_layer_freq {freq!r} is not implemented (config.json); "
                                    "moeshard implements moe_layer_freq 1, as every DeepSeek release sets")


def _latent(d: dict[str, Any]) -> dict[str, Any]:
    """What DeepSeek-V2 and V3 share: latent attention, dense first layers, shared experts."""
    c = _common(d, head_dim=d["qk_nope_head_dim"] + d["qk_rope_head_dim"])
    # Kimi-K2 ships the DeepSeek-V3 architecture under model_type "kimi_k2".
    c["model_type"] = {"kimi_k2": "deepseek_v3"}.get(c["model_type"], c["model_type"])
    n = c["num_layers"]
    _moe_layer_freq(d)
    first_dense = d.get("first_k_dense_replace") or 0
    return dict(
        **c, attention_bias=d.get("attention_bias", False), o_bias=d.get("attention_bias", False),
        sliding_window=(None,) * n, moe_layers=tuple(l >= first_dense for l in range(n)),
        shared_expert_size=(d.get("n_shared_experts") or 0) * c["moe_intermediate_size"],
        q_lora_rank=d.get("q_lora_rank"), kv_lora_rank=d["kv_lora_rank"],
        qk_nope_head_dim=d["qk_nope_head_dim"], qk_rope_head_dim=d["qk_rope_head_dim"], v_head_dim=d["v_head_dim"],
        n_group=d.get("n_group") or 1, topk_group=d.get("topk_group") or 1,
        routed_scaling_factor=d.get("routed_scaling_factor", 1.0),
    )


def _deepseek_v3(d):
    if d.get("scoring_func", "sigmoid") != "sigmoid" or d.get("topk_method", "noaux_tc") != "noaux_tc":
        raise UnsupportedModelError("DeepSeek-V3 routing other than scoring_func='sigmoid', topk_method='noaux_tc' "
                                    f"is not implemented (config has {d.get('scoring_func')!r}, "
                                    f"{d.get('topk_method')!r}); DeepSeek-V2 configs use model_type deepseek_v2")
    return DeepseekV3Config(**_latent(d), norm_topk_prob=d.get("norm_topk_prob", True),
                            rope_interleave=d.get("rope_interleave", True))


DEEPSEEK_V2_TOPK = ("greedy", "group_limited_greedy")


def _deepseek_v2(d):
    method = d.get("topk_method") or "greedy"
    if d.get("scoring_func", "softmax") != "softmax" or method not in DEEPSEEK_V2_TOPK:
        raise UnsupportedModelError(f"DeepSeek-V2 routing scoring_func={d.get('scoring_func')!r}, "
                                    f"topk_method={method!r} is not implemented; moeshard implements "
                                    f"scoring_func 'softmax' with topk_method {' or '.join(DEEPSEEK_V2_TOPK)}")
    if d.get("norm_topk_prob"):
        # transformers' DeepseekV2 never renormalises the top-k weights; every release sets false.
        raise UnsupportedModelError("DeepSeek-V2 with norm_topk_prob=true is not implemented "
                                    "(transformers ignores it; released V2 configs set false)")
    c = _latent(d)
    if method == "group_limited_greedy" and c["num_experts"] % c["n_group"]:
        raise CheckpointError(f"n_routed_experts {c['num_experts']} is not a multiple of n_group {c['n_group']}")
    return DeepseekV2Config(**c, norm_topk_prob=False, topk_method=method)


def _glm4_moe(d):
    c = _common(d)
    n = c["num_layers"]
    first_dense = d.get("first_k_dense_replace") or 0
    return Glm4MoeConfig(
        **c, attention_bias=d.get("attention_bias", False), o_bias=False,
        norm_topk_prob=d.get("norm_topk_prob", True), sliding_window=(None,) * n,
        moe_layers=tuple(l >= first_dense for l in range(n)),
        qk_norm="head" if d.get("use_qk_norm") else "none",
        shared_expert_size=(d.get("n_shared_experts") or 0) * c["moe_intermediate_size"],
        # transformers' Glm4MoeConfig defaults the factor to 0.5 when the config omits it.
        partial_rotary_factor=_partial_rotary_factor(d, 0.5),
        n_group=d.get("n_group") or 1, topk_group=d.get("topk_group") or 1,
        routed_scaling_factor=d.get("routed_scaling_factor", 1.0),
    )


def _gpt_oss(d):
    # transformers' GptOssConfig: theta 150000 and alternating sliding/full layers when the config omits them
    c = _common(d, default_theta=150000.0)
    n = c["num_layers"]
    types = d.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    if len(types) != n or set(types) - {"sliding_attention", "full_attention"}:
        raise CheckpointError(f"config layer_types must list {n} of 'sliding_attention' / 'full_attention', "
                              f"got {types}")
    window = d.get("sliding_window")
    bias = d.get("attention_bias", True)
    return GptOssConfig(
        **c, attention_bias=bias, o_bias=bias, norm_topk_prob=True,
        sliding_window=tuple(window if t == "sliding_attention" else None for t in types),
        moe_layers=(True,) * n, swiglu_limit=float(d.get("swiglu_limit", 7.0)),
        swiglu_alpha=float(d.get("swiglu_alpha", 1.702)),
    )


FAMILIES = {"mixtral": _mixtral, "qwen2_moe": _qwen2_moe, "qwen3_moe": _qwen3_moe, "olmoe": _olmoe,
            "deepseek_v3": _deepseek_v3, "kimi_k2": _deepseek_v3, "deepseek_v2": _deepseek_v2,
            "glm4_moe": _glm4_moe, "gpt_oss": _gpt_oss}


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
