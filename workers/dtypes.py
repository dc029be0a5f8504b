"""The one table of dtype knowledge: what a checkpoint may store and what moeshard may compute in.

Every other module (checkpoint reader, expert formats and store, shard, options, CLI, bench)
asks this table, so adding a stored dtype (FP8, the uint8 bytes of MXFP4) is one row here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FileDType:
    """A safetensors dtype moeshard reads."""

    name: str            # safetensors header spelling: "F32", "BF16", "F8_E4M3", ...
    torch: torch.dtype
    kind: str            # "float": dense weights; "fp8": FP8 weights (with block scales); "int": quantized bytes

    @property
    def itemsize(self) -> int:
        return self.torch.itemsize


_FILE = [
    FileDType("F32", torch.float32, "float"),
    FileDType("BF16", torch.bfloat16, "float"),
    FileDType("F16", torch.float16, "float"),
    FileDType("F8_E4M3", torch.float8_e4m3fn, "fp8"),   # DeepSeek-V3/R1, Kimi-K2 linear weights
    FileDType("I8", torch.int8, "int"),
    FileDType("U8", torch.uint8, "int"),                # MXFP4 blocks and e8m0 scales (gpt-oss)
]
ROWS: dict[str, FileDType] = {d.name: d for d in _FILE}
FILE_DTYPES: dict[str, torch.dtype] = {d.name: d.torch for d in _FILE}   # safetensors name -> torch dtype
DTYPE_SIZES: dict[str, int] = {d.name: d.itemsize for d in _FILE}          # safetensors name -> bytes
FLOAT_FILE_DTYPES = tuple(d.name for d in _FILE if d.kind == "float")

# Compute dtypes, by the name the options, CLI and job use.
COMPUTE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                                          "float16": torch.float16}


def file_dtype_name(dtype: torch.dtype) -> str:
    """The safetensors spelling of a torch dtype (ValueError when moeshard does not read it)."""
    for d in _FILE:
        if d.torch == dtype:
            return d.name
    raise ValueError(f"dtype {dtype} is not one moeshard reads; known: {', '.join(FILE_DTYPES)}")


def compute_dtype(name: str) -> torch.dtype:
    """The torch dtype of compute dtype `name`; ValueError naming the choices."""
    try:
        return COMPUTE_DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose from {sorted(COMPUTE_DTYPES)}") from None


def compute_dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
