"""Expert compute kernels: one gated MLP per routed expert, run over grouped rows.

Every caller (the in-process shard, remote actors, tests) goes through
`forward_into`, so the same rows and the same weights always take the same
code path and give bit-identical results whatever the memory budget or placement.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import native

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "relu": F.relu,
}

# Matmul libraries may pick different vectorised paths for differently aligned
# inputs, which can change the last bits of a result. Segments are re-homed to
# an aligned buffer so a row gives the same output wherever it sat in a batch.
_ALIGN = 64


@dataclass(frozen=True)
class ExpertWeights:
    """One expert's weights in nn.Linear layout, all views into one contiguous buffer.

    The views are only valid while the owning store keeps the expert resident
    (see `ExpertStore.get`); they are never copied.
    """

    gate: Tensor  # [I, H]
    up: Tensor    # [I, H]
    down: Tensor  # [H, I]
    activation: str = "silu"

    @property
    def hidden_size(self) -> int:
        return int(self.gate.shape[1])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.gate, self.up, self.down))

    def forward(self, x: Tensor) -> Tensor:
        return expert_forward(self, x)


def block_grid(shape: Sequence[int], block: Sequence[int]) -> tuple[int, int]:
    """How many [bo, bi] blocks cover a [out, in] weight, edge blocks partial: the shape of its scales."""
    (rows, cols), (bo, bi) = shape, block
    return -(-rows // bo), -(-cols // bi)


def dequantize_fp8(q: Tensor, scale_inv: Tensor, block: Sequence[int], dtype: torch.dtype) -> Tensor:
    """The weight an FP8 tensor q [out, in] and its float32 block scales [ceil(out/bo), ceil(in/bi)]
    stand for, in `dtype`: q * scale_inv of its block, computed in float32 (as DeepSeek's
    weight_dequant does), edge blocks partial. The one FP8 dequantization: dense weights at load
    and routed experts per use both come here."""
    (rows, cols), (bo, bi) = q.shape, block
    nbo, nbi = block_grid(q.shape, block)
    w = q.to(torch.float32)
    if rows == nbo * bo and cols == nbi * bi:  # whole blocks: one broadcast multiply, no expanded scales
        w = w.view(nbo, bo, nbi, bi).mul_(scale_inv.view(nbo, 1, nbi, 1)).view(rows, cols)
    else:
        w.mul_(scale_inv.repeat_interleave(bo, 0)[:rows].repeat_interleave(bi, 1)[:, :cols])
    return w.to(dtype)


def quantize_fp8(w: Tensor, block: Sequence[int]) -> tuple[Tensor, Tensor]:
    """w [out, in] -> (float8_e4m3fn [out, in], float32 scale_inv [ceil(out/bo), ceil(in/bi)]): per
    block (edge blocks partial) the scale that maps its largest magnitude to FP8's largest finite
    value, so that `dequantize_fp8` gives w back within FP8's rounding (DeepSeek-V3's layout)."""
    (rows, cols), (bo, bi) = w.shape, block
    nbo, nbi = block_grid(w.shape, block)
    padded = F.pad(w.float(), (0, nbi * bi - cols, 0, nbo * bo - rows)).view(nbo, bo, nbi, bi)
    scale = padded.abs().amax(dim=(1, 3)).clamp(min=1e-12) / torch.finfo(torch.float8_e4m3fn).max
    q = (padded / scale[:, None, :, None]).view(nbo * bo, nbi * bi)[:rows, :cols]
    return q.to(torch.float8_e4m3fn).contiguous(), scale.contiguous()


@dataclass(frozen=True)
class FP8Weights:
    """One expert held as FP8 block-quantized weights (1 byte per weight) plus float32 block scales,
    views into its slot; dequantized into the activations' dtype on every use."""

    gate: Tensor      # float8_e4m3fn [I, H]
    up: Tensor        # float8_e4m3fn [I, H]
    down: Tensor      # float8_e4m3fn [H, I]
    scales: tuple[Tensor, Tensor, Tensor]   # float32 block scales of gate, up, down
    block: tuple[int, int]
    activation: str = "silu"

    @property
    def hidden_size(self) -> int:
        return int(self.gate.shape[1])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.gate, self.up, self.down, *self.scales))

    def dense(self, dtype: torch.dtype) -> ExpertWeights:
        """The expert dequantized into `dtype` (fresh tensors, outside any budget)."""
        g, u, d = (dequantize_fp8(q, s, self.block, dtype) for q, s in zip((self.gate, self.up, self.down),
                                                                            self.scales))
        return ExpertWeights(g, u, d, self.activation)

    def forward(self, x: Tensor) -> Tensor:
        return expert_forward(self.dense(x.dtype), x)


# The 16 values of an FP4 (e2m1) code, sign bit highest: MXFP4 as gpt-oss ships it (transformers'
# integrations/mxfp4.py holds the same table).
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
MXFP4_BLOCK = 32          # weights per e8m0 scale: 16 bytes of two codes each
E8M0_BIAS = 127


def dequantize_mxfp4(blocks: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    """The weight [out, in] that MXFP4 blocks [out, in/2] (uint8, two FP4 codes a byte, low nibble first)
    and e8m0 scales [out, in/32] (uint8, exponent + 127) stand for, in `dtype`: the code's value times
    2^exponent, as transformers' convert_moe_packed_tensors computes it."""
    rows, groups = scales.shape
    b = blocks.reshape(rows, groups, MXFP4_BLOCK // 2)
    lut = torch.tensor(FP4_VALUES, dtype=dtype, device=blocks.device)
    out = torch.empty(rows, groups, MXFP4_BLOCK, dtype=dtype, device=blocks.device)
    out[..., 0::2] = lut[(b & 0x0F).long()]
    out[..., 1::2] = lut[(b >> 4).long()]
    torch.ldexp(out, (scales.to(torch.int32) - E8M0_BIAS).unsqueeze(-1), out=out)
    return out.view(rows, groups * MXFP4_BLOCK)


@dataclass(frozen=True)
class MXFP4Weights:
    """One gpt-oss expert held as MXFP4 (4 bits a weight plus one byte per 32), views into its slot:
    gate and up fused and interleaved in one [2I, H] weight with a bias, then down [H, I] with a bias,
    and the clamped SwiGLU between them. Dequantized into the activations' dtype on every use."""

    gate_up: tuple[Tensor, Tensor, Tensor]   # blocks uint8 [2I, H/2], scales uint8 [2I, H/32], bias [2I]
    down: tuple[Tensor, Tensor, Tensor]      # blocks uint8 [H, I/2], scales uint8 [H, I/32], bias [H]
    alpha: float
    limit: float

    @property
    def hidden_size(self) -> int:
        return int(self.down[0].shape[0])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.gate_up, *self.down))

    def forward(self, x: Tensor) -> Tensor:
        dt = x.dtype
        (gb, gs, gbias), (db, ds, dbias) = self.gate_up, self.down
        gate_up = F.linear(x, dequantize_mxfp4(gb, gs, dt), gbias.to(dt))                # [N, 2I]
        gate = gate_up[:, 0::2].clamp(max=self.limit)
        up = gate_up[:, 1::2].clamp(min=-self.limit, max=self.limit)
        h = (up + 1) * (gate * torch.sigmoid(gate * self.alpha))                           # [N, I]
        return F.linear(h, dequantize_mxfp4(db, ds, dt), dbias.to(dt))                   # [N, H]


def activation_fn(name: str) -> Callable[[Tensor], Tensor]:
    """Look up an activation by name; raise ValueError listing the known ones."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}") from None


# Up to this many rows, a float32/bf16 weight is streamed once by the native GEMV (memory-bound
# decode: measured at about twice torch's CPU GEMV, docs/performance.md); more rows go to torch's
# GEMM, which is compute-bound there and faster.
DECODE_ROWS = 8


def linear(x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, w, bias), x [..., K] and w [N, K], on the native decode GEMV for a few rows on CPU.

    Which path runs depends only on the shapes, dtypes and device, so the same rows always give
    the same bits; the two paths differ by float rounding only."""
    rows = x.numel() // max(x.shape[-1], 1)
    if not _native_decode(x, rows, (w,)):
        return F.linear(x, w, bias)
    out = native.ops().dense_linear(x.reshape(rows, -1).float().contiguous(), w).to(x.dtype)
    if bias is not None:
        out = out + bias
    return out.view(*x.shape[:-1], w.shape[0])


_NATIVE_DENSE = (torch.float32, torch.bfloat16)


def _native_decode(x: Tensor, rows: int, ws: Sequence[Tensor]) -> bool:
    """Whether `rows` rows of x times the float weights `ws` take the native decode GEMV."""
    return (native.ops() is not None and 0 < rows <= DECODE_ROWS and x.device.type == "cpu"
            and x.dtype in _NATIVE_DENSE
            and all(w.dtype in _NATIVE_DENSE and w.shape[1] % 16 == 0 and w.is_contiguous() for w in ws)
            and not (torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in ws))))


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dim, normalised in float32 and scaled after casting back, as the
    references do. Decode rows (up to DECODE_ROWS) in float32/bf16 on CPU take one native call;
    the two paths differ by float rounding only (the sum of squares' order)."""
    rows = x.numel() // max(x.shape[-1], 1)
    if (native.ops() is not None and 0 < rows <= DECODE_ROWS and x.device.type == "cpu" and x.dtype in _NATIVE_DENSE
            and weight.dtype == x.dtype and not (torch.is_grad_enabled() and x.requires_grad)):
        return native.ops().rms_norm(x, weight, eps)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x * cos + rotate_half(x) * sin (half-split layout, cos and sin as wide as x [B, h, T, D]).
    A decode step's rows in float32 on CPU take one native call (the same math, float rounding apart)."""
    if (native.ops() is not None and x.shape[2] * x.shape[0] <= DECODE_ROWS and x.device.type == "cpu"
            and x.dtype == torch.float32 and cos.dtype == sin.dtype == torch.float32 and x.stride(3) == 1
            and cos.stride(3) == 1 and sin.stride(3) == 1 and not (torch.is_grad_enabled() and x.requires_grad)):
        return native.ops().rope(x, cos, sin)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float | None, gqa: bool) -> Tensor:
    """F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa) for
    q [B, h, T, Dk], k [B, kv, S, Dk], v [B, kv, S, Dv], mask [B, 1, T, S] additive.

    One query per sequence (decode) in float32 on CPU takes the native kernel: the same math,
    float rounding apart, with each (sequence, head) computed alone, so a row's result does not
    depend on the batch it sits in."""
    if (q.shape[2] == 1 and q.device.type == "cpu" and native.ops() is not None
            and all(t.dtype == torch.float32 and t.dim() == 4 and t.stride(3) == 1 for t in (q, k, v))
            and mask.dtype == torch.float32 and not (torch.is_grad_enabled() and q.requires_grad)):
        return native.ops().decode_attention(q, k, v, mask, q.shape[-1] ** -0.5 if scale is None else scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def expert_forward(w: ExpertWeights, x: Tensor) -> Tensor:
    """down(act(gate(x)) * up(x)) for rows x [N, H] -> [N, H].

    float32 decode rows take one native call (the same bits as the three GEMVs op by op)."""
    act = activation_fn(w.activation)
    if x.dtype == torch.float32 and x.dim() == 2 and _native_decode(x, x.shape[0], (w.gate, w.up, w.down)):
        return native.ops().dense_expert(x.contiguous(), w.gate, w.up, w.down, w.activation)
    return linear(act(linear(x, w.gate)) * linear(x, w.up), w.down)  # [N, I] -> [N, H]


def forward_into(out: Tensor, w: ExpertWeights, x: Tensor) -> None:
    """Write w.forward(x) into `out` ([N, H], a slice of a preallocated output). `w` is any
    held format's weights (workers/formats.py): dense `ExpertWeights` or a low-bit one."""
    if x.shape[0] == 0:
        return
    if x.data_ptr() % _ALIGN:
        x = x.clone()  # see _ALIGN: same bits regardless of the row's offset in its batch
    out.copy_(w.forward(x))


def run_grouped(rows: Tensor, weights: Sequence[ExpertWeights], counts: Sequence[int]) -> Tensor:
    """Run each expert over its contiguous segment of `rows` (grouped by expert, ascending).

    rows: [N, H]; weights[i] handles the next counts[i] rows; sum(counts) == N.
    Returns [N, H], one matmul chain per active expert, no per-token Python loop.
    """
    if len(weights) != len(counts):
        raise ValueError(f"{len(weights)} experts but {len(counts)} counts")
    if sum(counts) != rows.shape[0]:
        raise ValueError(f"counts sum to {sum(counts)} but there are {rows.shape[0]} rows")
    out = torch.empty_like(rows)  # [N, H]
    start = 0
    for w, n in zip(weights, counts):
        if n:
            forward_into(out[start:start + n], w, rows[start:start + n])
        start += n
    return out
