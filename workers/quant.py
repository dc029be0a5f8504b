"""Weight-only int8 and int4 for routed experts: quantization, its plain reference, and the kernels.

- int8: symmetric, one scale per output channel: w ~= q * scale, q in [-127, 127].
- int4: asymmetric, groups of `group_size` along the input dimension, one (scale, zero) pair
  per group: w ~= (q - 8) * scale + zero, q in [0, 15] (the convention of torch's int4 kernels:
  `zero` is the value at the middle code). Portable storage: two codes per byte, the even
  column in the low nibble, scales and zeros as `qparams` [N, K / group_size, 2].

Scales are rounded to the dtype they are kept in *before* the codes are chosen, so the codes
are the best ones for the scales the kernel will really use, and quantizing at read time or
in `moeshard quantize` gives the same bytes when the scale dtypes agree.

Kernels: on CPU the native ones (workers/native, AVX-512 VNNI) where they build; otherwise
`torch.ops.aten._weight_int8pack_mm` and `torch._weight_int4pack_mm_for_cpu` over
`torch._convert_weight_to_int4pack_for_cpu`'s layout. torch's fast paths take bf16/fp16
activations only (with float32 both fall back to a path 4x to 30x slower than a float32 GEMV:
docs/quantization.md), so on them the rows are cast to `kernel_dtype(compute dtype)` and back.
Scales are held in that dtype either way. On CUDA int4 uses `torch._weight_int4pack_mm` (bf16
activations), int8 a dequantize-per-use `F.linear` (torch has no weight-only int8 GEMM for CUDA);
both only run where a GPU exists.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import native

log = logging.getLogger(__name__)

EXPERT_DTYPES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 64
INT4_OUT_MULTIPLE = 16      # torch's int4 CPU packing needs the output dimension in multiples of 16
CONFIG_KEY = "moeshard_quantization"   # config.json entry of a `moeshard quantize`d checkpoint
LAYOUT_VERSION = 1


# ---- quantization (float32 math, deterministic on any thread count) ------------------------------

def _safe(s: Tensor) -> Tensor:
    """Divisor for a scale: an all-zero row/group has scale 0 and codes that do not matter."""
    return torch.where(s == 0, torch.ones_like(s), s)


def quantize_int8(w: Tensor, scale_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """w [N, K] -> (q int8 [N, K], scale [N] in scale_dtype)."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127).to(scale_dtype)
    q = torch.round(w / _safe(scale.float())[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: Tensor, scale: Tensor) -> Tensor:
    """The plain reference: float32 [N, K]."""
    return q.float() * scale.float()[:, None]


def quantize_int4(w: Tensor, group_size: int, scale_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """w [N, K] -> (codes uint8 [N, K/2], even column in the low nibble; qparams [N, K/g, 2] (scale, zero))."""
    n, k = w.shape
    g = w.float().reshape(n, k // group_size, group_size)
    lo, hi = g.amin(dim=2), g.amax(dim=2)
    scale = ((hi - lo) / 15).to(scale_dtype)
    zero = (lo + 8 * scale.float()).to(scale_dtype)
    q = torch.round((g - zero.float()[..., None]) / _safe(scale.float())[..., None] + 8).clamp_(0, 15)
    q = q.to(torch.uint8).reshape(n, k)
    codes = q[:, 0::2] | (q[:, 1::2] << 4)
    return codes.contiguous(), torch.stack([scale, zero], dim=2)


def unpack_int4(codes: Tensor) -> Tensor:
    """codes uint8 [N, K/2] -> int32 [N, K] in [0, 15]."""
    lo, hi = (codes & 0xF).to(torch.int32), (codes >> 4).to(torch.int32)
    return torch.stack([lo, hi], dim=2).reshape(codes.shape[0], -1)


def dequantize_int4(codes: Tensor, qparams: Tensor, group_size: int) -> Tensor:
    """The plain reference: float32 [N, K]."""
    q = unpack_int4(codes).float()
    n, k = q.shape
    p = qparams.float()
    g = (q.reshape(n, k // group_size, group_size) - 8) * p[..., 0:1] + p[..., 1:2]
    return g.reshape(n, k)


# ---- kernels ----------------------------------------------------------------------------------
#
# Two kernel sets, each with its own held layout (the slot bytes), chosen once per expert:
# - native (workers/native: AVX-512 VNNI, float32 activations quantized to int8 per 32 inputs),
#   on CPU where it builds, for input sizes that are multiples of NATIVE_MULTIPLE;
# - torch's weight-only kernels otherwise (and on CUDA).
# int8 native: codes + 128 as uint8 [N, K]; torch: int8 [N, K]. int4 native: N*K/2 bytes, rows in
# groups of NATIVE_INT4_ROWS and, per group, per 128-input span, each row's 64 bytes in turn (byte j
# holding inputs j (low nibble) and j + 64); qparams [N, K/g, 2]. torch: its packed layout and [K/g, N, 2].

NATIVE_MULTIPLE = 128
NATIVE_INT4_ROWS = 4        # rows interleaved per span in the native int4 layout (INT4_OUT_MULTIPLE is a multiple)


def uses_native(device: torch.device, in_sizes: Sequence[int]) -> bool:
    """Whether weights with these input sizes on `device` are held for (and run by) the native kernels."""
    return device.type == "cpu" and all(k % NATIVE_MULTIPLE == 0 for k in in_sizes) and native.ops() is not None


def kernel_dtype(compute: torch.dtype) -> torch.dtype:
    """The dtype of the low-bit scales (and, on torch's kernels, of the activations) in a run computing in `compute`."""
    return torch.float16 if compute == torch.float16 else torch.bfloat16


def hold_int8(q: Tensor, native_layout: bool) -> Tensor:
    """int8 codes [N, K] -> the held codes (uint8 q + 128 for the native kernel)."""
    return (q.to(torch.int16) + 128).to(torch.uint8) if native_layout else q


def pack_int4(codes: Tensor, device: torch.device, native_layout: bool) -> Tensor:
    """Portable codes [N, K/2] -> the int4 kernel's own layout on `device` (uint8 on CPU)."""
    if native_layout:
        q = unpack_int4(codes).to(torch.uint8)
        n, k = q.shape
        r = NATIVE_INT4_ROWS
        q = q.view(n // r, r, k // NATIVE_MULTIPLE, 2, NATIVE_MULTIPLE // 2)   # per span: inputs [0, 64) low, [64, 128) high
        spans = q[:, :, :, 0] | (q[:, :, :, 1] << 4)                             # [n/r, r, spans, 64]
        return spans.transpose(1, 2).reshape(n, k // 2).contiguous()            # each span's r rows in turn
    if device.type == "cuda":
        hi_first = ((codes & 0xF) << 4) | (codes >> 4)   # the CUDA packer wants the even column high
        return torch._convert_weight_to_int4pack(hi_first.to(device), 8)
    return torch._convert_weight_to_int4pack_for_cpu(unpack_int4(codes), 1)


def int4_kernel_qparams(qparams: Tensor, native_layout: bool) -> Tensor:
    """[N, K/g, 2] -> the scales and zeros the int4 kernel takes ([K/g, N, 2] for torch's)."""
    return qparams.contiguous() if native_layout else qparams.transpose(0, 1).contiguous()


def int8_linear(x: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    """x [M, K] @ (q * scale).T -> [M, N], in x's dtype; q held by `hold_int8`."""
    if q.dtype == torch.uint8:
        return native.ops().int8_linear(x.float().contiguous(), q, scale).to(x.dtype)
    k = x.to(scale.dtype)              # torch's fast paths take bf16/fp16 activations only
    if x.device.type == "cuda":
        return (F.linear(k, q.to(k.dtype)) * scale).to(x.dtype)
    return torch.ops.aten._weight_int8pack_mm(k, q, scale).to(x.dtype)


def int4_linear(x: Tensor, packed: Tensor, group_size: int, scales_zeros: Tensor, native_layout: bool) -> Tensor:
    """x [M, K] @ dequantized(packed).T -> [M, N], in x's dtype; layouts from `pack_int4`, `int4_kernel_qparams`."""
    if native_layout:
        return native.ops().int4_linear(x.float().contiguous(), packed, scales_zeros, group_size).to(x.dtype)
    k = x.to(scales_zeros.dtype)
    if x.device.type == "cuda":
        return torch._weight_int4pack_mm(k, packed, group_size, scales_zeros).to(x.dtype)
    return torch._weight_int4pack_mm_for_cpu(k, packed, group_size, scales_zeros).to(x.dtype)


def int8_expert(x: Tensor, q: Sequence[Tensor], scale: Sequence[Tensor], activation: str) -> Tensor:
    """down(act(gate(x)) * up(x)) for rows x [M, H] over native-held int8 weights (gate, up, down),
    in one native call; in x's dtype."""
    (gq, uq, dq), (gs, us, ds) = q, scale
    return native.ops().int8_expert(x.float().contiguous(), gq, gs, uq, us, dq, ds, activation).to(x.dtype)


def int4_expert(x: Tensor, packed: Sequence[Tensor], group_size: int, scales_zeros: Sequence[Tensor],
                activation: str) -> Tensor:
    """down(act(gate(x)) * up(x)) for rows x [M, H] over native-held int4 weights, in one native call."""
    (gp, up, dp), (gs, us, ds) = packed, scales_zeros
    return native.ops().int4_expert(x.float().contiguous(), gp, gs, up, us, dp, ds, group_size,
                                    activation).to(x.dtype)


# ---- what a checkpoint and the options say ---------------------------------------------------------

def check_group_size(group_size: Any) -> int:
    if isinstance(group_size, bool) or group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size!r}")
    return int(group_size)


def stored_quantization(config: Mapping[str, Any], where: str) -> tuple[str, int] | None:
    """(expert_dtype, group_size) a `moeshard quantize`d checkpoint's config.json records, or None.
    ValueError (one line) for an entry this build cannot read."""
    entry = config.get(CONFIG_KEY)
    if entry is None:
        return None
    if not isinstance(entry, dict) or entry.get("expert_dtype") not in EXPERT_DTYPES \
            or entry.get("layout_version") != LAYOUT_VERSION:
        raise ValueError(f"{where}: {CONFIG_KEY} {entry!r} is not a quantization this build reads "
                         f"(expert_dtype {' | '.join(EXPERT_DTYPES)}, layout_version {LAYOUT_VERSION}); "
                         "re-run `moeshard quantize` on the original checkpoint")
    group = int(entry.get("group_size") or 0)
    if entry["expert_dtype"] == "int4":
        check_group_size(group)
    return entry["expert_dtype"], group if entry["expert_dtype"] == "int4" else 0


def describe(expert_dtype: str | None, group_size: int) -> str:
    """'int4/g64', 'int8' or 'as stored': how a person reads a held format."""
    if expert_dtype is None:
        return "as stored"
    return f"int4/g{group_size}" if expert_dtype == "int4" else expert_dtype
