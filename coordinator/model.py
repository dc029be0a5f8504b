"""The dense model: embeddings, attention, norms, routers, shared experts, LM head.

Routed experts are not part of the module tree. Each MoE block routes, then hands
`(x, weights, ids)` to a `RoutedExperts` backend given from outside, so the same
model runs with experts in this process or spread over Ray actors.
"""
from __future__ import annotations

import torch
from torch import nn

from .attention import Attention, AttentionInputs, KVCache, LatentAttention
from .config import ModelConfig
from .experts import RoutingStats, RoutedExperts
from .layers import MLP, Linear, RMSNorm, Rotary
from .options import RoutingOptions
from .cache_routing import (Candidates, Decision, RerouteCounter, route_cache_aware, sigmoid_grouped_candidates,
                            softmax_candidates, softmax_grouped_candidates, topk_softmax_candidates)
from .routing import route_sigmoid_grouped, route_softmax, route_softmax_grouped, route_topk_softmax


class MoEBlock(nn.Module):
    """Router + optional shared expert; the routed experts are reached through `experts`."""

    def __init__(self, cfg: ModelConfig, layer: int, experts: RoutedExperts, dtype: torch.dtype,
                 routing: RoutingStats, rerouter: RerouteCounter | None = None):
        super().__init__()
        self.cfg, self.layer, self.experts, self.routing = cfg, layer, experts, routing
        self.rerouter = rerouter        # None: exact routing; else cache-aware, with its options and counts
        if cfg.router in ("sigmoid_grouped", "softmax_grouped"):
            # The references keep these routers (and the bias) in float32 whatever the model dtype.
            self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False, dtype=torch.float32)
            if cfg.router == "sigmoid_grouped":
                self.gate.register_buffer("e_score_correction_bias", torch.zeros(cfg.num_experts))
        else:  # gpt-oss's router has a bias. The native GEMV: torch's bf16 GEMM takes ~100 us for these 32-64 rows
            self.gate = Linear(cfg.hidden_size, cfg.num_experts, bias=cfg.router == "topk_softmax", dtype=dtype)
        if cfg.shared_expert_size:
            self.shared_expert = MLP(cfg.hidden_size, cfg.shared_expert_size, cfg.hidden_act, dtype)
            if cfg.shared_expert_gated:
                self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False, dtype=dtype)

    def route(self, x: torch.Tensor, extra: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> weights [T, k+extra] (float32), ids [T, k+extra]: the model's exact routing."""
        return self._exact(self._logits(x), extra)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.router in ("sigmoid_grouped", "softmax_grouped"):
            return nn.functional.linear(x.float(), self.gate.weight)
        return self.gate(x)

    def _exact(self, logits: torch.Tensor, extra: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cfg
        k = min(c.top_k + extra, c.num_experts)
        if c.router == "sigmoid_grouped":
            return route_sigmoid_grouped(logits, self.gate.e_score_correction_bias, k, c.n_group, c.topk_group,
                                         c.norm_topk_prob, c.routed_scaling_factor)
        if c.router == "softmax_grouped":
            return route_softmax_grouped(logits, k, *self._groups(), c.routed_scaling_factor)
        if c.router == "topk_softmax":
            return route_topk_softmax(logits, k)
        return route_softmax(logits, k, c.norm_topk_prob)

    def _groups(self) -> tuple[int, int]:
        c = self.cfg
        return (c.n_group, c.topk_group) if c.topk_method == "group_limited_greedy" else (1, 1)

    def candidates(self, logits: torch.Tensor) -> Candidates:
        """The same router scores as `_exact` uses, for cache-aware routing to choose among."""
        c = self.cfg
        if c.router == "sigmoid_grouped":
            return sigmoid_grouped_candidates(logits, self.gate.e_score_correction_bias, c.n_group, c.topk_group,
                                              c.norm_topk_prob, c.routed_scaling_factor)
        if c.router == "softmax_grouped":
            return softmax_grouped_candidates(logits, *self._groups(), c.routed_scaling_factor)
        if c.router == "topk_softmax":
            return topk_softmax_candidates(logits)
        return softmax_candidates(logits, c.norm_topk_prob)

    def route_for_use(self, x: torch.Tensor, extra: int = 0, record: bool = True
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """The experts this layer uses: the exact routing, or with cache-aware routing the exact one
        bent toward the experts resident right now (coordinator/cache_routing.py). `record=False`
        for a prediction (prefetch hints), which must not count as a decision."""
        logits = self._logits(x)
        weights, ids = self._exact(logits, extra)
        if self.rerouter is None:
            return weights, ids
        resident = self.experts.resident(self.layer)
        if len(resident) == self.cfg.num_experts:
            if record:
                self.rerouter.record(Decision(ids.shape[0], 0, 0, 0, 0.0, 0, 0, 0))
            return weights, ids
        mask = torch.zeros(self.cfg.num_experts, dtype=torch.bool)
        mask[list(resident)] = True
        weights, ids, decision = route_cache_aware(weights, ids, self.candidates(logits), mask,
                                                   self.rerouter.options)
        if record:
            self.rerouter.record(decision)
        return weights, ids

    def forward(self, x: torch.Tensor, hints: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """x [B, T, H]; `hints` {later layer: predicted ids} travel with this layer's routed work."""
        B, T, H = x.shape
        flat = x.reshape(B * T, H)                                   # [T', H]
        weights, ids = self.route_for_use(flat)                      # [T', k]
        self.routing.observed(self.layer, ids, self.cfg.num_experts)
        pending = self.experts.submit(self.layer, flat, weights, ids, hints)
        # The shared expert runs while routed work is in flight elsewhere.
        shared = None
        if self.cfg.shared_expert_size:
            shared = self.shared_expert(flat)
            if self.cfg.shared_expert_gated:
                shared = torch.sigmoid(self.shared_expert_gate(flat)) * shared
        out = self.experts.wait(pending)
        if shared is not None:
            out = out + shared
        return out.view(B, T, H)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, experts: RoutedExperts, dtype: torch.dtype,
                 routing: RoutingStats, rerouter: RerouteCounter | None = None):
        super().__init__()
        attn = LatentAttention if cfg.attention == "mla" else Attention
        self.self_attn = attn(cfg, layer, dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.is_moe = cfg.moe_layers[layer]
        self.mlp = (MoEBlock(cfg, layer, experts, dtype, routing, rerouter) if self.is_moe
                    else MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, dtype))


class MoETransformer(nn.Module):
    """A decoder-only MoE language model of any supported family."""

    def __init__(self, cfg: ModelConfig, experts: RoutedExperts, dtype: torch.dtype,
                 prefetch_depth: int = 0, prefetch_extra: int = 0, routing: RoutingOptions = RoutingOptions()):
        super().__init__()
        self.cfg, self.dtype, self.experts = cfg, dtype, experts
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.routing = RoutingStats()
        self.rerouting = RerouteCounter(routing)
        rerouter = self.rerouting if routing.cache_aware else None
        self.layers = nn.ModuleList(DecoderLayer(cfg, l, experts, dtype, self.routing, rerouter)
                                    for l in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = Rotary(cfg.rope_dim, cfg.rope_theta, cfg.rope, cfg.max_position_embeddings)
        self.prefetch_depth, self.prefetch_extra = prefetch_depth, prefetch_extra
        self.moe_blocks = {l: layer.mlp for l, layer in enumerate(self.layers) if layer.is_moe}

    def new_caches(self, batch: int, max_len: int) -> list[KVCache]:
        return [layer.self_attn.new_cache(batch, max_len, self.dtype) for layer in self.layers]

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, input_pos: torch.Tensor,
                key_valid: torch.Tensor, caches: list[KVCache] | None = None) -> torch.Tensor:
        """ids [B, T], positions [B, T] (RoPE), input_pos [T] (cache slots), key_valid [B, S] -> logits [B, T, V]."""
        cos, sin = self.rotary(positions, self.dtype)
        a = AttentionInputs(cos, sin, input_pos, key_valid, {})
        h = self.embed_tokens(ids)                                           # [B, T, H]
        for l, layer in enumerate(self.layers):
            h = h + layer.self_attn(layer.input_layernorm(h), a, caches[l] if caches is not None else None)
            x = layer.post_attention_layernorm(h)
            hints = self._predict(l, x) if self.prefetch_depth and self.experts.wants_hints else {}
            if layer.is_moe:
                h = h + layer.mlp(x, hints)
            else:
                for nxt, ids in hints.items():
                    self.experts.prefetch(nxt, ids)
                h = h + layer.mlp(x)
        return self.lm_head(self.norm(h)).float()

    def _predict(self, layer: int, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """The next layers' routers applied to this hidden state: {layer: expert ids [T', k+extra]}."""
        flat = x.reshape(-1, x.shape[-1])
        hints = {}
        for nxt in range(layer + 1, min(layer + 1 + self.prefetch_depth, self.cfg.num_layers)):
            block = self.moe_blocks.get(nxt)
            if block is not None:
                # with cache-aware routing, predict what that layer will choose (mostly resident experts),
                # so that hints fetch its few new experts instead of evicting the ones it will prefer
                hints[nxt] = block.route_for_use(flat, self.prefetch_extra, record=False)[1]
                self.routing.predicted(nxt, hints[nxt])
        return hints
