"""Expert formats: how a routed expert is stored in its file, held in a slot, and computed.

An expert's three weights (gate [I, H], up [I, H], down [H, I], nn.Linear layout) are held
in a slot in one format. A format is one object, found by name (`format_of(spec)`), that says:
- `parts(spec, itemsize)`: the tensors one weight holds in a slot (data plus scales), so the
  budget counts the bytes the format really takes (`workers/budget.py`);
- `file_tensors(spec)`: which file tensors are read for each weight (the weight, its scales);
- `direct(spec, dtype)`: whether the file bytes are the slot bytes (then read straight into the
  slot, no staging and no conversion);
- `convert(...)`: file tensors (as read, in their file dtype) -> the weight's slot parts
  (dtype conversion, quantization, packing for a kernel);
- `weights(...)`: the slot parts -> an object with `forward(x)` that runs the expert.
Adding a format (FP8 blocks, MXFP4) is one new entry in `FORMATS`; docs/quantization.md
describes the interface.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Iterable, Protocol, Sequence

import torch
from torch import Tensor

from . import quant
from .dtypes import FILE_DTYPES, FLOAT_FILE_DTYPES
from .kernels import MXFP4_BLOCK, ExpertWeights, FP8Weights, MXFP4Weights, activation_fn, block_grid
from .spec import ExpertSpec, TensorSpec



KERNEL = "kernel"   # a Part's dtype: the low-bit kernels' activation dtype (workers/quant.py kernel_dtype)


@dataclass(frozen=True)
class Part:
    """One tensor a weight holds in a slot."""

    shape: tuple[int, ...]
    dtype: torch.dtype | str | None   # None: the compute dtype; KERNEL: quant.kernel_dtype of it

    def nbytes(self, itemsize: int) -> int:
        if self.dtype is None:
            size = itemsize
        elif self.dtype == KERNEL:
            size = 2                  # bf16 or fp16, whatever the compute dtype
        else:
            size = self.dtype.itemsize
        return math.prod(self.shape) * size

    def torch_dtype(self, compute: torch.dtype) -> torch.dtype:
        if self.dtype is None:
            return compute
        return quant.kernel_dtype(compute) if self.dtype == KERNEL else self.dtype


class ExpertFormat(Protocol):
    name: str

    def check(self, spec: ExpertSpec) -> None:
        """Raise ValueError (one line, naming the expert and what to change) if `spec` cannot be held."""
        ...

    def parts(self, spec: ExpertSpec) -> list[list[Part]]:
        """Per weight (gate, up, down), the tensors it holds in a slot."""
        ...

    def file_tensors(self, spec: ExpertSpec) -> list[list[TensorSpec]]:
        """Per weight, the file tensors read for it (the weight first)."""
        ...

    def direct(self, spec: ExpertSpec, dtype: torch.dtype) -> bool:
        """True when each weight's file tensors are byte-for-byte its slot parts, in order."""
        ...

    def convert(self, spec: ExpertSpec, src: Sequence[Tensor], dst: Sequence[Tensor]) -> None:
        """Fill one weight's slot parts `dst` (typed views, on the store's device) from its file
        tensors `src` (typed views of the staging buffer, CPU)."""
        ...

    def weights(self, spec: ExpertSpec, views: Sequence[Sequence[Tensor]]) -> "ExpertWeights":
        """The runnable expert over its slot parts (per weight, typed views)."""
        ...


def weight_shapes(spec: ExpertSpec) -> list[tuple[int, int]]:
    """[out, in] of gate, up and down as computed (whatever the file stores)."""
    h, i = spec.hidden_size, spec.intermediate_size
    return [(i, h), (i, h), (h, i)]


class Dense:
    """Experts computed as stored, in the compute dtype (today's behaviour)."""

    name = "dense"

    def check(self, spec: ExpertSpec) -> None:
        for t in spec.tensors:
            if t.dtype not in FLOAT_FILE_DTYPES:
                raise ValueError(f"expert {spec.key} tensor {t.key}: file dtype {t.dtype} is not a float dtype "
                                 f"({', '.join(FLOAT_FILE_DTYPES)}); a quantized checkpoint needs its "
                                 "config.json quantization entry")

    def parts(self, spec: ExpertSpec) -> list[list[Part]]:
        return [[Part(s, None)] for s in weight_shapes(spec)]

    def file_tensors(self, spec: ExpertSpec) -> list[list[TensorSpec]]:
        return [[t] for t in spec.tensors]

    def direct(self, spec: ExpertSpec, dtype: torch.dtype) -> bool:
        return all(FILE_DTYPES[t.dtype] == dtype for t in spec.tensors)

    def convert(self, spec: ExpertSpec, src: Sequence[Tensor], dst: Sequence[Tensor]) -> None:
        dst[0].copy_(src[0])

    def weights(self, spec: ExpertSpec, views: Sequence[Sequence[Tensor]]) -> ExpertWeights:
        return ExpertWeights(views[0][0], views[1][0], views[2][0], activation=spec.activation)


class FP8Blocks:
    """FP8 block-quantized experts as DeepSeek-V3/R1 and Kimi-K2 ship them, held as stored: each weight
    float8_e4m3fn (1 byte per weight) plus its float32 block scales, read straight from the file into
    the slot, dequantized per use (workers/kernels.py `FP8Weights`)."""

    name = "fp8"

    def check(self, spec: ExpertSpec) -> None:
        if len(spec.block) != 2 or min(spec.block) < 1:
            raise ValueError(f"expert {spec.key}: FP8 weights need a [out, in] block size, got {list(spec.block)}")
        if len(spec.scales) != 3:
            raise ValueError(f"expert {spec.key}: FP8 weights need 3 scale tensors (gate, up, down), "
                             f"got {len(spec.scales)}")
        for t, shape, s in zip(spec.tensors, weight_shapes(spec), spec.scales):
            if t.dtype != "F8_E4M3" or t.shape != shape:
                raise ValueError(f"expert {spec.key} tensor {t.key}: FP8 experts hold F8_E4M3 {list(shape)}, "
                                 f"got {t.dtype} {list(t.shape)}")
            grid = block_grid(t.shape, spec.block)
            if s.dtype != "F32" or s.shape != grid:
                raise ValueError(f"expert {spec.key} scale {s.key}: expected F32 {list(grid)} (one per "
                                 f"{spec.block[0]}x{spec.block[1]} block of {list(t.shape)}), got {s.dtype} "
                                 f"{list(s.shape)}")

    def parts(self, spec: ExpertSpec) -> list[list[Part]]:
        return [[Part(t.shape, torch.float8_e4m3fn), Part(s.shape, torch.float32)]
                for t, s in zip(spec.tensors, spec.scales)]

    def file_tensors(self, spec: ExpertSpec) -> list[list[TensorSpec]]:
        return [[t, s] for t, s in zip(spec.tensors, spec.scales)]

    def direct(self, spec: ExpertSpec, dtype: torch.dtype) -> bool:
        return True  # weights and scales are held exactly as the file stores them

    def convert(self, spec: ExpertSpec, src: Sequence[Tensor], dst: Sequence[Tensor]) -> None:
        for s, d in zip(src, dst):
            d.copy_(s)

    def weights(self, spec: ExpertSpec, views: Sequence[Sequence[Tensor]]) -> FP8Weights:
        (g, gs), (u, us), (d, ds) = views
        return FP8Weights(g, u, d, (gs, us, ds), tuple(spec.block), activation=spec.activation)


class MXFP4:
    """gpt-oss's MXFP4 experts, held as stored: per expert its slices of the layer's fused blocks, e8m0
    scales and biases, read straight into the slot (4 bits a weight plus a byte per 32), dequantized
    per use (workers/kernels.py `MXFP4Weights`). Gate and up are one interleaved weight, so the `up`
    weight holds nothing of its own."""

    name = "mxfp4"

    def check(self, spec: ExpertSpec) -> None:
        g, d = spec.gate, spec.down
        h, i2 = d.shape[0], g.shape[0]
        i = i2 // 2
        if spec.up != spec.gate:
            raise ValueError(f"expert {spec.key}: MXFP4 gate and up are one fused tensor, got {spec.up.key}")
        if len(spec.scales) != 4 or len(spec.swiglu) != 2:
            raise ValueError(f"expert {spec.key}: MXFP4 experts need 4 scale/bias tensors and (alpha, limit), "
                             f"got {len(spec.scales)} and {list(spec.swiglu)}")
        gs, gbias, ds, dbias = spec.scales
        want = [(g, "U8", (i2, h // 2)), (d, "U8", (h, i // 2)), (gs, "U8", (i2, h // MXFP4_BLOCK)),
                (ds, "U8", (h, i // MXFP4_BLOCK))]
        if h % MXFP4_BLOCK or i % MXFP4_BLOCK or i2 % 2:
            raise ValueError(f"expert {spec.key}: MXFP4 needs hidden {h} and intermediate {i} sizes that are "
                             f"multiples of {MXFP4_BLOCK}")
        for t, dtype, shape in want:
            if t.dtype != dtype or t.shape != shape:
                raise ValueError(f"expert {spec.key} tensor {t.key}: expected {dtype} {list(shape)}, "
                                 f"got {t.dtype} {list(t.shape)}")
        for t, n in ((gbias, i2), (dbias, h)):
            if t.dtype not in FLOAT_FILE_DTYPES or t.shape != (n,):
                raise ValueError(f"expert {spec.key} bias {t.key}: expected a float [{n}], got {t.dtype} "
                                 f"{list(t.shape)}")

    def parts(self, spec: ExpertSpec) -> list[list[Part]]:
        return [[Part(t.shape, FILE_DTYPES[t.dtype]) for t in w] for w in self.file_tensors(spec)]

    def file_tensors(self, spec: ExpertSpec) -> list[list[TensorSpec]]:
        gs, gbias, ds, dbias = spec.scales
        return [[spec.gate, gs, gbias], [], [spec.down, ds, dbias]]

    def direct(self, spec: ExpertSpec, dtype: torch.dtype) -> bool:
        return True

    def convert(self, spec: ExpertSpec, src: Sequence[Tensor], dst: Sequence[Tensor]) -> None:
        for s, d in zip(src, dst):
            d.copy_(s)

    def weights(self, spec: ExpertSpec, views: Sequence[Sequence[Tensor]]) -> MXFP4Weights:
        alpha, limit = spec.swiglu
        return MXFP4Weights(tuple(views[0]), tuple(views[2]), alpha=alpha, limit=limit)


def _check_file(spec: ExpertSpec, t: TensorSpec, dtypes: Sequence[str], shape: tuple[int, ...]) -> None:
    """A quantized checkpoint's tensor: the dtype and shape its layout implies (docs/quantization.md)."""
    if t.dtype not in dtypes or tuple(t.shape) != tuple(shape):
        raise ValueError(f"expert {spec.key} tensor {t.key}: {t.dtype} {list(t.shape)} but a {spec.stored} "
                         f"checkpoint stores {'/'.join(dtypes)} {list(shape)} there; the checkpoint is damaged or "
                         "was not written by this build's `moeshard quantize`: re-run it")


def _check_scales(spec: ExpertSpec) -> None:
    if len(spec.scales) != 3:
        raise ValueError(f"expert {spec.key}: a {spec.stored} checkpoint needs a scale tensor for each of "
                         f"gate, up and down, found {len(spec.scales)}: re-run `moeshard quantize`")


def _weights_then_scales(spec: ExpertSpec) -> list[list[TensorSpec]]:
    """Per weight: a float file's weight alone, or a quantized file's codes then their scales."""
    if spec.stored is None:
        return [[t] for t in spec.tensors]
    return [[t, sc] for t, sc in zip(spec.tensors, spec.scales)]


@dataclass(frozen=True)
class Int8Weights:
    """An int8 expert: per weight, codes [N, K] and per-output-channel scales [N] (compute dtype)."""

    q: tuple[Tensor, Tensor, Tensor]       # gate, up, down codes, held by quant.hold_int8
    scale: tuple[Tensor, Tensor, Tensor]
    activation: str = "silu"

    @property
    def hidden_size(self) -> int:
        return int(self.q[0].shape[1])

    def forward(self, x: Tensor) -> Tensor:
        if self.q[0].dtype == torch.uint8:   # held for the native kernels: one fused call
            return quant.int8_expert(x, self.q, self.scale, self.activation)
        act = activation_fn(self.activation)
        (gq, uq, dq), (gs, us, ds) = self.q, self.scale
        return quant.int8_linear(act(quant.int8_linear(x, gq, gs)) * quant.int8_linear(x, uq, us), dq, ds)


class Int8:
    """Weight-only int8, symmetric per output channel (workers/quant.py)."""

    name = "int8"

    def check(self, spec: ExpertSpec) -> None:
        if spec.stored is None:
            return Dense().check(spec)
        _check_scales(spec)
        for t, sc, (n, k) in zip(spec.tensors, spec.scales, weight_shapes(spec)):
            _check_file(spec, t, ("I8",), (n, k))
            _check_file(spec, sc, FLOAT_FILE_DTYPES, (n,))

    def parts(self, spec: ExpertSpec) -> list[list[Part]]:
        return [[Part((n, k), torch.int8), Part((n,), KERNEL)] for n, k in weight_shapes(spec)]   # int8 or uint8: 1 byte

    def file_tensors(self, spec: ExpertSpec) -> list[list[TensorSpec]]:
        return _weights_then_scales(spec)

    def direct(self, spec: ExpertSpec, dtype: torch.dtype) -> bool:
        return False

    def convert(self, spec: ExpertSpec, src: Sequence[Tensor], dst: Sequence[Tensor]) -> None:
        if len(src) == 1:  # a float file: quantize now
            src = quant.quantize_int8(src[0], dst[1].dtype)
        native = _native(spec, dst[0].device)
        dst[0].view(torch.uint8 if native else torch.int8).copy_(quant.hold_int8(src[0], native))
        dst[1].copy_(src[1])

    def weights(self, spec: ExpertSpec, views: Sequence[Sequence[Tensor]]) -> Int8Weights:
        dtype = torch.uint8 if _native(spec, views[0][0].device) else torch.int8
        return Int8Weights(tuple(v[0].view(dtype) for v in views), tuple(v[1] for v in views), spec.activation)


@dataclass(frozen=True)
class Int4Weights:
    """An int4 expert: per weight, the kernel's packed codes and [K/g, N, 2] scales and zeros."""

    packed: tuple[Tensor, Tensor, Tensor]
    scales_zeros: tuple[Tensor, Tensor, Tensor]
    group_size: int
    native: bool                      # held for the native kernels (workers/quant.py)
    activation: str = "silu"

    @property
    def hidden_size(self) -> int:
        sz = self.scales_zeros[0]      # the gate's groups: [N, K/g, 2] native, [K/g, N, 2] torch
        return int(sz.shape[1] if self.native else sz.shape[0]) * self.group_size

    def forward(self, x: Tensor) -> Tensor:
        if self.native:   # one fused call
            return quant.int4_expert(x, self.packed, self.group_size, self.scales_zeros, self.activation)
        act = activation_fn(self.activation)
        (gp, up, dp), (gs, us, ds), g, nat = self.packed, self.scales_zeros, self.group_size, self.native
        h = act(quant.int4_linear(x, gp, g, gs, nat)) * quant.int4_linear(x, up, g, us, nat)
        return quant.int4_linear(h, dp, g, ds, nat)


class Int4:
    """Weight-only int4, asymmetric groups along the input dimension (workers/quant.py).

    Held in the kernel's packed layout, packed when read (the layout is the kernel's own, so
    files keep the portable one: docs/quantization.md)."""

    name = "int4"

    def check(self, spec: ExpertSpec) -> None:
        g = spec.group_size
        quant.check_group_size(g)
        h, i = spec.hidden_size, spec.intermediate_size
        if h % g or i % g or h % quant.INT4_OUT_MULTIPLE or i % quant.INT4_OUT_MULTIPLE:
            raise ValueError(f"expert {spec.key}: int4 with group_size {g} needs hidden size {h} and intermediate "
                             f"size {i} to be multiples of {g} (and of {quant.INT4_OUT_MULTIPLE}); choose a "
                             "group_size that divides both, or expert_dtype int8")
        if spec.stored is None:
            return Dense().check(spec)
        _check_scales(spec)
        for t, sc, (n, k) in zip(spec.tensors, spec.scales, weight_shapes(spec)):
            _check_file(spec, t, ("U8",), (n, k // 2))
            _check_file(spec, sc, FLOAT_FILE_DTYPES, (n, k // g, 2))

    def parts(self, spec: ExpertSpec) -> list[list[Part]]:
        g = spec.group_size
        return [[Part((n * k // 2,), torch.uint8), Part((k // g, n, 2), KERNEL)] for n, k in weight_shapes(spec)]

    def file_tensors(self, spec: ExpertSpec) -> list[list[TensorSpec]]:
        return _weights_then_scales(spec)

    def direct(self, spec: ExpertSpec, dtype: torch.dtype) -> bool:
        return False

    def convert(self, spec: ExpertSpec, src: Sequence[Tensor], dst: Sequence[Tensor]) -> None:
        if len(src) == 1:  # a float file: quantize now
            src = quant.quantize_int4(src[0], spec.group_size, dst[1].dtype)
        native = _native(spec, dst[0].device)
        dst[0].copy_(quant.pack_int4(src[0], dst[0].device, native).reshape(-1).view(torch.uint8))
        dst[1].view(-1).copy_(quant.int4_kernel_qparams(src[1], native).view(-1))

    def weights(self, spec: ExpertSpec, views: Sequence[Sequence[Tensor]]) -> Int4Weights:
        native = _native(spec, views[0][0].device)
        packed, qparams = [], []
        for (n, k), v in zip(weight_shapes(spec), views):
            packed.append(_packed_view(v[0], n, k))
            qparams.append(v[1].view(n, k // spec.group_size, 2) if native else v[1])
        return Int4Weights(tuple(packed), tuple(qparams), spec.group_size, native, spec.activation)


def _native(spec: ExpertSpec, device: torch.device) -> bool:
    """Whether this expert is held for the native kernels: on a CPU that runs them, with every
    weight's input size a multiple of quant.NATIVE_MULTIPLE."""
    return quant.uses_native(device, [k for _, k in weight_shapes(spec)])


def _packed_view(flat: Tensor, n: int, k: int) -> Tensor:
    """The packed codes' shape on their device (same bytes: N*K/2)."""
    if flat.device.type == "cuda":
        return flat.view(torch.int32).view(n // 8, k // (8 * 16), 32, 4)
    return flat.view(n, k // 2)


FORMATS: dict[str, ExpertFormat] = {"dense": Dense(), "int8": Int8(), "int4": Int4(), "fp8": FP8Blocks(),
                                     "mxfp4": MXFP4()}


def stored_tensors(stored: tuple[str, int] | None, name: str, shape: tuple[int, int]) -> list[tuple[str, tuple]]:
    """The file tensors (name, shape) holding weight `name` of computed shape [N, K]: the weight
    itself, then its scales for a `moeshard quantize`d checkpoint (docs/quantization.md)."""
    if stored is None:
        return [(name, tuple(shape))]
    dtype, g = stored
    n, k = shape
    if dtype == "int8":
        return [(name, (n, k)), (name + "_scale", (n,))]
    return [(name, (n, k // 2)), (name + "_scale", (n, k // g, 2))]


def held_as(specs: Iterable[ExpertSpec], expert_dtype: str | None, group_size: int) -> list[ExpertSpec]:
    """The specs held in `expert_dtype` (None: as stored) with `group_size` for int4; ValueError
    (one line) when a quantized checkpoint is asked for another format, or the shapes do not allow it."""
    out = []
    for s in specs:
        if s.stored is not None:
            stored = quant.describe(s.stored, s.group_size)
            if expert_dtype is not None and quant.describe(expert_dtype, group_size) != stored:
                raise ValueError(f"expert_dtype: the checkpoint's experts are already quantized as {stored}; "
                                 f"{quant.describe(expert_dtype, group_size)} would need the original checkpoint: "
                                 "leave expert_dtype out (or ask for the stored format), or quantize the original")
            s = dataclasses.replace(s, expert_dtype=s.stored)
        elif expert_dtype is not None:
            s = dataclasses.replace(s, expert_dtype=expert_dtype, group_size=group_size if expert_dtype == "int4" else 0)
        format_of(s).check(s)
        out.append(s)
    return out


def format_of(spec: ExpertSpec) -> ExpertFormat:
    """The format `spec` is held in; ValueError naming the known ones."""
    name = spec.held_format
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"expert {spec.key}: unknown expert format {name!r}; known: {sorted(FORMATS)}") from None
