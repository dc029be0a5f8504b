"""`moeshard quantize SRC DST`: a checkpoint whose routed-expert tensors are already int8 or int4.

The layout is in docs/quantization.md: each expert weight `<name>` is replaced by its codes
(I8 [N, K] for int8; U8 [N, K/2], two codes a byte, for int4) and gains `<name>_scale` (int8:
[N]; int4: [N, K/g, 2] scale and zero), in the low-bit kernels' dtype (bf16; fp16 for an fp16 source). Everything else is
copied byte for byte, config.json records `moeshard_quantization`. The codes are exactly the
ones `expert_dtype` computes when it quantizes at read time (same functions, workers/quant.py),
so a quantized checkpoint and quantize-at-read give the same experts when the scales' dtype is
the compute dtype.

It streams: one tensor in memory at a time, written at its final offset of a safetensors file
whose header is computed first. Everything is written to a temporary directory beside DST and
renamed into place at the end, so an error or an interrupt leaves nothing half-written.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from coordinator.checkpoint import Checkpoint
from coordinator.errors import CheckpointError
from workers import quant
from workers.formats import FILE_DTYPES, stored_tensors

log = logging.getLogger(__name__)

_DTYPE_NAMES = {v: k for k, v in FILE_DTYPES.items()}


@dataclass(frozen=True)
class QuantizeResult:
    path: Path
    expert_tensors: int      # expert weights quantized
    bytes_in: int            # expert bytes in SRC
    bytes_out: int           # expert bytes (codes + scales) in DST


def quantize_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, expert_dtype: str,
                        group_size: int = quant.DEFAULT_GROUP_SIZE, *, force: bool = False,
                        progress: bool | None = None) -> QuantizeResult:
    """Write DST: SRC with its routed experts quantized. ValueError/CheckpointError (one line) on
    bad input, before anything is written."""
    if expert_dtype not in quant.EXPERT_DTYPES:
        raise ValueError(f"expert_dtype: must be one of {', '.join(quant.EXPERT_DTYPES)}, got {expert_dtype!r}")
    group_size = quant.check_group_size(group_size) if expert_dtype == "int4" else 0
    ckpt = Checkpoint.open(src)
    if ckpt.expert_quantization is not None:
        raise CheckpointError(f"{ckpt.path}: its experts are already quantized as "
                              f"{quant.describe(*ckpt.expert_quantization)}; quantize the original checkpoint")
    dst = Path(dst)
    if dst.resolve() == ckpt.path.resolve():
        raise ValueError(f"DST {dst} is the source checkpoint: write the quantized one elsewhere")
    if dst.exists() and not force:
        raise FileExistsError(f"{dst} exists: pass --force to replace it")
    # every shape check (group size, multiples of 16) before a byte is written
    specs = ckpt.expert_specs(expert_dtype, group_size)
    stored = (expert_dtype, group_size)
    plan: dict[str, list[tuple[str, tuple[int, ...]]]] = {}   # expert weight -> its stored tensors
    for s in specs:
        for t, shape in zip(s.tensors, ((s.intermediate_size, s.hidden_size),) * 2
                            + ((s.hidden_size, s.intermediate_size),)):
            plan[t.key] = stored_tensors(stored, t.key, shape)

    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    total = sum(t.nbytes for t in ckpt.tensors.values())
    bar = tqdm(total=total, desc=f"quantizing experts to {quant.describe(expert_dtype, group_size)}",
               unit="B", unit_scale=True, disable=None if progress is None else not progress, leave=False)
    counts = {"n": 0, "in": 0, "out": 0}
    try:
        weight_map: dict[str, str] = {}
        files = sorted({t.file for t in ckpt.tensors.values()})
        with bar:
            for f in files:
                names = sorted((n for n, t in ckpt.tensors.items() if t.file == f),
                               key=lambda n: ckpt.tensors[n].offset)
                for name, _ in _write_file(f, tmp / f.name, names, ckpt, plan, stored, bar, counts):
                    weight_map[name] = f.name
        # tokenizer, generation config, ... copied as they are; checksums of the old files would be wrong
        for p in ckpt.path.iterdir():
            if p.is_file() and p.suffix != ".safetensors" and p.name not in ("config.json", "SHA256SUMS",
                                                                              "model.safetensors.index.json"):
                shutil.copy2(p, tmp / p.name)
        config = json.loads((ckpt.path / "config.json").read_text())
        config[quant.CONFIG_KEY] = {"expert_dtype": expert_dtype, "group_size": group_size,
                                    "layout_version": quant.LAYOUT_VERSION}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if (ckpt.path / "model.safetensors.index.json").is_file():
            index = json.loads((ckpt.path / "model.safetensors.index.json").read_text())
            index["weight_map"] = dict(sorted(weight_map.items()))
            index.setdefault("metadata", {})["total_size"] = sum((tmp / n).stat().st_size
                                                                 for n in set(weight_map.values()))
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        Checkpoint.open(tmp)  # what we wrote reads back as a valid quantized checkpoint
        if dst.exists():  # --force: only now, with the new one complete
            old = dst.parent / f".{dst.name}.old-{os.getpid()}"
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("quantized %d expert weights: %d -> %d bytes", counts["n"], counts["in"], counts["out"])
    return QuantizeResult(dst, counts["n"], counts["in"], counts["out"])


def _write_file(src: Path, out: Path, names: list[str], ckpt: Checkpoint, plan, stored, bar, counts):
    """Write one safetensors file: the header first (every output shape is known), then each
    tensor in order, one in memory at a time. Yields (tensor name, nbytes) written."""
    entries = []   # (out name, dtype string, shape, source name, which output of it)
    for n in names:
        t = ckpt.tensors[n]
        if n in plan:
            (wname, wshape), (sname, sshape) = plan[n]
            entries.append((wname, "I8" if stored[0] == "int8" else "U8", wshape, n, 0))
            entries.append((sname, _DTYPE_NAMES[quant.kernel_dtype(FILE_DTYPES[t.dtype])], sshape, n, 1))
        else:
            entries.append((n, t.dtype, t.shape, n, None))
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape, _, _ in entries:
        nbytes = _numel(shape) * FILE_DTYPES[dtype].itemsize
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(out, "wb") as fo, safe_open(str(src), framework="pt") as fi:
        fo.write(struct.pack("<Q", len(raw)))
        fo.write(raw)
        pending: dict[str, list[torch.Tensor]] = {}
        for name, dtype, shape, source, which in entries:
            if which is None:
                value = fi.get_tensor(source)
                bar.update(ckpt.tensors[source].nbytes)
            else:
                if which == 0:
                    w = fi.get_tensor(source)
                    scale_dtype = quant.kernel_dtype(w.dtype)   # the dtype the kernels hold them in
                    if stored[0] == "int8":
                        pending[source] = list(quant.quantize_int8(w, scale_dtype))
                    else:
                        pending[source] = list(quant.quantize_int4(w, stored[1], scale_dtype))
                    counts["n"] += 1
                    counts["in"] += ckpt.tensors[source].nbytes
                    bar.update(ckpt.tensors[source].nbytes)
                value = pending[source][which]
                if which == 1:
                    del pending[source]
                counts["out"] += value.numel() * value.element_size()
            assert _DTYPE_NAMES[value.dtype] == dtype and tuple(value.shape) == tuple(shape), (name, value.shape)
            fo.write(memoryview(value.contiguous().reshape(-1).view(torch.uint8).numpy()))
            yield name, value.numel() * value.element_size()
        fo.flush()
        os.fsync(fo.fileno())


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
