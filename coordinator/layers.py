"""Small dense building blocks: Linear, RMSNorm, rotary embeddings, the SwiGLU MLP."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from workers.kernels import linear, rms_norm, rope

from .config import RopeScaling, yarn_mscale

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


class Linear(nn.Linear):
    """nn.Linear on `workers.kernels.linear`: the native GEMV at decode, torch's GEMM for more rows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)      # normalised in float32, scaled after casting back


class MLP(nn.Module):
    """Dense SwiGLU MLP (dense layers and shared experts)."""

    def __init__(self, hidden: int, inter: int, act: str, dtype: torch.dtype):
        super().__init__()
        self.gate_proj = Linear(hidden, inter, bias=False, dtype=dtype)
        self.up_proj = Linear(hidden, inter, bias=False, dtype=dtype)
        self.down_proj = Linear(inter, hidden, bias=False, dtype=dtype)
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def _default_inv_freq(dim: int, theta) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))        # [D/2]


def yarn_inv_freq(dim: int, theta: float, rope: RopeScaling) -> tuple[torch.Tensor, float]:
    """YaRN inverse frequencies and cos/sin factor, step for step as transformers'
    `_compute_yarn_parameters` (float32 tables, float64 scalars)."""
    factor = rope.factor
    if rope.attention_factor is not None:
        attention_factor = rope.attention_factor
    elif rope.mscale and rope.mscale_all_dim:
        attention_factor = float(yarn_mscale(factor, rope.mscale) / yarn_mscale(factor, rope.mscale_all_dim))
    else:
        attention_factor = yarn_mscale(factor)
    beta_fast, beta_slow = rope.beta_fast or 32, rope.beta_slow or 1
    original = rope.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        # the dimension whose wavelength fits `rotations` times into the original context
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # the reference's guard against a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extrapolation = 1 - ramp          # 1: keep the original frequency, 0: interpolate by `factor`
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, attention_factor


class Rotary:
    """cos/sin tables for RoPE (plain, linear, dynamic-NTK or YaRN), in float32 from position ids.

    Dynamic NTK keeps transformers' state: the frequencies are recomputed when a step reaches past
    every length seen so far (beyond max_position_embeddings), and reset when a step is back inside it.
    """

    def __init__(self, dim: int, theta: float, rope: RopeScaling = RopeScaling(), max_position_embeddings: int = 0):
        self.dim, self.theta, self.rope, self.max_pos = dim, theta, rope, max_position_embeddings
        self.attention_factor = 1.0
        if rope.kind == "yarn":
            self.inv_freq, self.attention_factor = yarn_inv_freq(dim, theta, rope)
        elif rope.kind == "linear":
            self.inv_freq = _default_inv_freq(dim, theta) / rope.factor
        elif rope.kind in ("default", "dynamic"):
            self.inv_freq = _default_inv_freq(dim, theta)
        else:
            raise ValueError(f"unknown RoPE type {rope.kind!r}")
        self.original_inv_freq = self.inv_freq
        self.max_seq_len_cached = max_position_embeddings

    def _dynamic_update(self, positions: torch.Tensor) -> None:
        seq_len = positions.max() + 1
        if seq_len > self.max_seq_len_cached:   # growth: NTK-scaled base for this length
            f = self.rope.factor
            base = self.theta * ((f * seq_len / self.max_pos) - (f - 1)) ** (self.dim / (self.dim - 2))
            self.inv_freq = _default_inv_freq(self.dim, base)
            self.max_seq_len_cached = int(seq_len)
        if seq_len < self.max_pos and self.max_seq_len_cached > self.max_pos:   # back inside: reset
            self.inv_freq = self.original_inv_freq
            self.max_seq_len_cached = self.max_pos

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] -> cos, sin [B, 1, T, D], broadcastable over heads."""
        if self.rope.kind == "dynamic" and positions.numel():
            self._dynamic_update(positions)
        freqs = positions[:, :, None].float() * self.inv_freq[None, None, :]     # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)                                 # [B, T, D]
        cos, sin = emb.cos() * self.attention_factor, emb.sin() * self.attention_factor
        return cos.to(dtype)[:, None], sin.to(dtype)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split layout (Llama style). x [B, h, T, D]; with partial RoPE (cos narrower than x)
    only the first cos.shape[-1] dims rotate and the rest pass through."""
    d = cos.shape[-1]
    if d < x.shape[-1]:
        return torch.cat((rope(x[..., :d], cos, sin), x[..., d:]), dim=-1)
    return rope(x, cos, sin)


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """DeepSeek layout: pairs (x0, x1), (x2, x3), ... rotate together; output is de-interleaved."""
    cos, sin = cos[..., : cos.shape[-1] // 2], sin[..., : sin.shape[-1] // 2]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
