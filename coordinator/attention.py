"""Attention with its KV cache: grouped-query attention and DeepSeek's latent attention."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from workers.kernels import attention

from .config import DeepseekV3Config, ModelConfig
from .layers import Linear, RMSNorm, apply_rope, apply_rope_interleaved


class KVCache(nn.Module):
    """Preallocated per-layer keys and values; `update` writes new slots and returns the filled prefix."""

    def __init__(self, batch: int, heads: int, max_len: int, k_dim: int, v_dim: int, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("k", torch.zeros(batch, heads, max_len, k_dim, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(batch, heads, max_len, v_dim, dtype=dtype), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """input_pos [T] slots (or [B, T], one row of slots per sequence); k [B, h, T, Dk], v [B, h, T, Dv]
        -> caches up to the last written slot (of any row). With [B, T] the batch may be a prefix of the
        cache's rows (the continuous-batching engine keeps its active sequences in rows 0..B-1)."""
        if input_pos.dim() == 2:
            B = k.shape[0]
            rows = torch.arange(B)[:, None]
            self.k[rows, :, input_pos] = k.transpose(1, 2)         # advanced indices first: [B, T, h, D]
            self.v[rows, :, input_pos] = v.transpose(1, 2)
            end = int(input_pos.max()) + 1
            return self.k[:B, :, :end], self.v[:B, :, :end]
        self.k[:, :, input_pos] = k
        self.v[:, :, input_pos] = v
        end = int(input_pos[-1]) + 1
        return self.k[:, :, :end], self.v[:, :, :end]

    def rows(self, start: int, stop: int) -> "KVCache":
        """A cache over rows [start, stop) that shares this one's storage (one sequence's slot)."""
        view = KVCache.__new__(KVCache)
        nn.Module.__init__(view)
        view.register_buffer("k", self.k[start:stop], persistent=False)
        view.register_buffer("v", self.v[start:stop], persistent=False)
        return view

    def move_row(self, src: int, dst: int) -> None:
        """Copy row `src` into row `dst` (the engine compacts its active sequences when one leaves)."""
        self.k[dst].copy_(self.k[src])
        self.v[dst].copy_(self.v[src])


@dataclass
class AttentionInputs:
    """What every attention layer of one forward step shares."""

    cos: torch.Tensor            # [B, 1, T, D_rope]
    sin: torch.Tensor
    input_pos: torch.Tensor      # [T] cache slots of the new tokens, or [B, T]: each row's own slots
    key_valid: torch.Tensor      # [B, S] bool, False for padding
    masks: dict                  # sliding window -> additive mask [B, 1, T, S], built once per step

    def mask(self, window: int | None, dtype: torch.dtype, kv_len: int) -> torch.Tensor:
        """Additive mask [B, 1, T, kv_len]: causal by cache slot, padding, optional sliding window."""
        if window not in self.masks:
            S = self.key_valid.shape[1]
            q = self.input_pos[..., :, None]                              # [T, 1] or [B, T, 1]
            s = torch.arange(S)                                           # [S]
            allowed = (s <= q)
            if window is not None:
                allowed = allowed & (q - s < window)
            if allowed.dim() == 2:
                allowed = allowed[None]
            allowed = allowed & self.key_valid[:, None, :]                # [B, T, S]
            m = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
            self.masks[window] = m[:, None]                               # [B, 1, T, S]
        return self.masks[window][..., :kv_len]


def attend_with_sinks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
                      sinks: torch.Tensor) -> torch.Tensor:
    """gpt-oss attention: each head's softmax also covers a learned sink logit, which takes
    probability mass and contributes no value. q [B, h, T, D], k/v [B, kv, S, D] -> [B, h, T, D]."""
    B, h, T, _ = q.shape
    rep = h // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)        # kv head i serves heads i*rep..
    logits = torch.matmul(q, k.transpose(2, 3)) * scale + mask                       # [B, h, T, S]
    combined = torch.cat([logits, sinks.view(1, h, 1, 1).expand(B, h, T, 1).to(logits.dtype)], dim=-1)
    # the reference subtracts the row max before its softmax; done the same way for the same rounding
    probs = torch.softmax(combined - combined.amax(dim=-1, keepdim=True), dim=-1)[..., :-1]
    return torch.matmul(probs.to(v.dtype), v)


class Attention(nn.Module):
    """Grouped-query attention (Mixtral, Qwen2/3-MoE, OLMoE, GLM-4.5, gpt-oss) with the families' q/k norms,
    clipping, partial RoPE and attention sinks."""

    def __init__(self, cfg: ModelConfig, layer: int, dtype: torch.dtype):
        super().__init__()
        H, D = cfg.hidden_size, cfg.head_dim
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, D
        self.q_proj = Linear(H, self.n_heads * D, bias=cfg.attention_bias, dtype=dtype)
        self.k_proj = Linear(H, self.n_kv * D, bias=cfg.attention_bias, dtype=dtype)
        self.v_proj = Linear(H, self.n_kv * D, bias=cfg.attention_bias, dtype=dtype)
        self.o_proj = Linear(self.n_heads * D, H, bias=cfg.o_bias, dtype=dtype)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm == "head":
            self.q_norm = RMSNorm(D, cfg.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(D, cfg.rms_norm_eps, dtype)
        elif cfg.qk_norm == "full":
            self.q_norm = RMSNorm(self.n_heads * D, cfg.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(self.n_kv * D, cfg.rms_norm_eps, dtype)
        self.clip = cfg.clip_qkv
        self.window = cfg.sliding_window[layer]
        self.scale = cfg.softmax_scale
        if cfg.attention == "gqa_sinks":
            self.sinks = nn.Parameter(torch.zeros(self.n_heads, dtype=dtype))   # one learned logit per head

    def forward(self, x: torch.Tensor, a: AttentionInputs, cache: KVCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)            # [B, T, h*D]
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip is not None:
            q, k, v = (t.clamp(-self.clip, self.clip) for t in (q, k, v))
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)                           # [B, h, T, D]
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, a.cos, a.sin), apply_rope(k, a.cos, a.sin)
        if cache is not None:
            k, v = cache.update(a.input_pos, k, v)                            # [B, kv, S, D]
        mask = a.mask(self.window, q.dtype, k.shape[2])
        if hasattr(self, "sinks"):
            y = attend_with_sinks(q, k, v, mask, self.scale, self.sinks)
        else:
            y = attention(q, k, v, mask, self.scale, gqa=self.n_kv != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype) -> KVCache:
        return KVCache(batch, self.n_kv, max_len, self.head_dim, self.head_dim, dtype)


LATENT_NORM_EPS = 1e-6


class LatentAttention(nn.Module):
    """DeepSeek-V2/V3 multi-head latent attention. The cache holds expanded per-head keys and values.

    V2's reference rotates pairs as complex numbers and keeps them interleaved; V3's de-interleaves
    them. Both apply the same permutation to q and k, so q·k and the outputs are the same."""

    def __init__(self, cfg: DeepseekV3Config, layer: int, dtype: torch.dtype):
        super().__init__()
        H, nh = cfg.hidden_size, cfg.num_heads
        self.n_heads, self.nope, self.rope, self.v_dim = nh, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_rank, self.q_rank = cfg.kv_lora_rank, cfg.q_lora_rank
        qk = cfg.qk_head_dim
        if self.q_rank is None:
            self.q_proj = Linear(H, nh * qk, bias=False, dtype=dtype)
        else:
            self.q_a_proj = Linear(H, self.q_rank, bias=cfg.attention_bias, dtype=dtype)
            # The reference builds both latent norms with RMSNorm's default eps, not rms_norm_eps.
            self.q_a_layernorm = RMSNorm(self.q_rank, LATENT_NORM_EPS, dtype)
            self.q_b_proj = Linear(self.q_rank, nh * qk, bias=False, dtype=dtype)
        self.kv_a_proj_with_mqa = Linear(H, self.kv_rank + self.rope, bias=cfg.attention_bias, dtype=dtype)
        self.kv_a_layernorm = RMSNorm(self.kv_rank, LATENT_NORM_EPS, dtype)
        self.kv_b_proj = Linear(self.kv_rank, nh * (self.nope + self.v_dim), bias=False, dtype=dtype)
        self.o_proj = Linear(nh * self.v_dim, H, bias=cfg.attention_bias, dtype=dtype)
        self.rope_fn = apply_rope_interleaved if cfg.rope_interleave else apply_rope
        self.scale = cfg.softmax_scale

    def forward(self, x: torch.Tensor, a: AttentionInputs, cache: KVCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x) if self.q_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, self.n_heads, -1).transpose(1, 2)                   # [B, h, T, qk]
        q_nope, q_rot = q.split([self.nope, self.rope], dim=-1)
        kv_latent, k_rot = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope], dim=-1)
        k_rot = k_rot.view(B, 1, T, self.rope)                               # one rotary key shared by all heads
        q_rot, k_rot = self.rope_fn(q_rot, a.cos, a.sin), self.rope_fn(k_rot, a.cos, a.sin)
        kv = self.kv_b_proj(self.kv_a_layernorm(kv_latent)).view(B, T, self.n_heads, -1).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)                # [B, h, T, nope], [B, h, T, v]
        q = torch.cat((q_nope, q_rot), dim=-1)
        k = torch.cat((k_nope, k_rot.expand(B, self.n_heads, T, self.rope)), dim=-1)
        if cache is not None:
            k, v = cache.update(a.input_pos, k, v)
        y = attention(q, k, v, a.mask(None, q.dtype, k.shape[2]), self.scale, gqa=False)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype) -> KVCache:
        return KVCache(batch, self.n_heads, max_len, self.nope + self.rope, self.v_dim, dtype)
