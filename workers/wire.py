"""Versioned binary message format for shard requests and replies (see docs/wire.md).

    [u32 LE header length][msgpack header][pad to 64][tensor bytes, each 64-byte aligned]

`decode` is zero-copy: the returned tensors are views into the caller's buffer.
When that buffer is read-only (`bytes`), the tensors must be treated as
read-only too; clone one before writing to it.
"""
from __future__ import annotations

import hashlib
import hmac
import math
import struct
import sys
import warnings
from typing import Any

import msgpack
import torch
from torch import Tensor

from .errors import WireError

MAGIC = "moeshard-wire"
VERSION = 1
ALIGN = 64
_LEN = struct.Struct("<I")

# Wire dtype names are fixed strings so the format does not depend on torch's reprs.
DTYPES: dict[str, torch.dtype] = {
    "f32": torch.float32,
    "bf16": torch.bfloat16,
    "f16": torch.float16,
    "i64": torch.int64,
    "i32": torch.int32,
}
_NAMES = {v: k for k, v in DTYPES.items()}

if sys.byteorder != "little":  # tensor bytes are written as the host stores them
    raise ImportError("moeshard wire format requires a little-endian host")

# Views of a read-only buffer (`bytes`, as Ray delivers messages) make torch.frombuffer warn that the
# buffer is not writable; the module doc says such views are read-only, so the warning carries no
# news. Filtered once, for warnings raised from this module only (a catch_warnings per tensor cost
# ~10 us, a tenth of a decode).
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning,
                        module=__name__.replace(".", r"\."))


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _as_bytes(t: Tensor) -> memoryview:
    """Raw bytes of a contiguous CPU tensor, without a copy (bf16 included)."""
    flat = t.reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy())


def encode(header: dict[str, Any], tensors: dict[str, Tensor] | None = None) -> bytes:
    """Pack a msgpack-able header dict and named tensors into one message."""
    if not isinstance(header, dict):
        raise WireError(f"header must be a dict, got {type(header).__name__}")
    tensors = tensors or {}
    entries, chunks, offset = [], [], 0
    for name, t in tensors.items():
        if not isinstance(name, str):
            raise WireError(f"tensor names must be str, got {name!r}")
        if not isinstance(t, Tensor):
            raise WireError(f"tensor {name!r} is a {type(t).__name__}, not a torch.Tensor")
        if t.dtype not in _NAMES:
            raise WireError(f"tensor {name!r} has unsupported dtype {t.dtype}; supported: {list(DTYPES.values())}")
        t = t.detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        entries.append([name, _NAMES[t.dtype], list(t.shape), offset, nbytes])
        if nbytes:
            chunks.append((offset, _as_bytes(t)))
        offset = _align(offset + nbytes)
    meta = {"magic": MAGIC, "version": VERSION, "header": header, "tensors": entries, "data_nbytes": offset}
    try:
        packed = msgpack.packb(meta, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise WireError(f"header is not msgpack-serialisable: {e}") from e
    data_start = _align(_LEN.size + len(packed))
    parts: list[Any] = [_LEN.pack(len(packed)), packed, bytes(data_start - _LEN.size - len(packed))]
    pos = 0
    for off, mv in chunks:
        parts.append(bytes(off - pos))  # alignment padding
        parts.append(mv)
        pos = off + mv.nbytes
    parts.append(bytes(offset - pos))
    return b"".join(parts)  # the single copy of tensor data


def _check_entry(entry: Any, data_nbytes: int) -> tuple[str, torch.dtype, list[int], int, int]:
    """Validate one tensor entry [name, dtype, shape, offset, nbytes] from a header."""
    if not (isinstance(entry, list) and len(entry) == 5):
        raise WireError(f"tensor entry must be [name, dtype, shape, offset, nbytes], got {entry!r}")
    name, dt, shape, off, nbytes = entry
    if not isinstance(name, str):
        raise WireError(f"tensor name must be a string, got {name!r}")
    if dt not in DTYPES:
        raise WireError(f"tensor {name!r} has unknown dtype {dt!r}; known: {sorted(DTYPES)}")
    if not (isinstance(shape, list) and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
        raise WireError(f"tensor {name!r} has invalid shape {shape!r}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (off, nbytes)):
        raise WireError(f"tensor {name!r} has invalid offset/nbytes {off!r}/{nbytes!r}")
    dtype = DTYPES[dt]
    expect = math.prod(shape) * dtype.itemsize
    if nbytes != expect:
        raise WireError(f"tensor {name!r}: nbytes {nbytes} does not match shape {shape} x {dt} = {expect}")
    if off % ALIGN:
        raise WireError(f"tensor {name!r}: offset {off} is not {ALIGN}-byte aligned")
    if off + nbytes > data_nbytes:
        raise WireError(f"tensor {name!r} needs data bytes [{off}, {off + nbytes}) "
                        f"but the data section has only {data_nbytes}")
    return name, dtype, shape, off, nbytes


def decode(buf: bytes | bytearray | memoryview) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Unpack a message into (header, tensors); tensors are zero-copy views into `buf`.

    Raises WireError, saying what is wrong, for any malformed input.
    """
    if not isinstance(buf, (bytes, bytearray, memoryview)):
        raise WireError(f"expected bytes, bytearray or memoryview, got {type(buf).__name__}")
    mv = memoryview(buf).cast("B") if isinstance(buf, memoryview) else memoryview(buf)
    total = mv.nbytes
    if total < _LEN.size:
        raise WireError(f"truncated message: {total} bytes, need at least {_LEN.size} for the header length")
    (hlen,) = _LEN.unpack_from(mv, 0)
    if _LEN.size + hlen > total:
        raise WireError(f"truncated message: header length {hlen} exceeds the {total - _LEN.size} bytes after it")
    try:
        meta = msgpack.unpackb(mv[_LEN.size:_LEN.size + hlen], raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise WireError(f"header is not valid msgpack: {type(e).__name__}: {e}") from None
    if not isinstance(meta, dict):
        raise WireError(f"header must be a msgpack map, got {type(meta).__name__}")
    if meta.get("magic") != MAGIC:
        raise WireError(f"bad magic {meta.get('magic')!r}, expected {MAGIC!r}: not a moeshard message")
    if meta.get("version") != VERSION:
        raise WireError(f"unsupported wire version {meta.get('version')!r}; this build speaks {VERSION}")
    header, entries, data_nbytes = meta.get("header"), meta.get("tensors"), meta.get("data_nbytes")
    if not isinstance(header, dict):
        raise WireError(f"user header must be a map, got {type(header).__name__}")
    if not isinstance(entries, list):
        raise WireError(f"tensor table must be a list, got {type(entries).__name__}")
    if not isinstance(data_nbytes, int) or isinstance(data_nbytes, bool) or data_nbytes < 0:
        raise WireError(f"invalid data_nbytes {data_nbytes!r}")
    start = _align(_LEN.size + hlen)
    if start + data_nbytes != total:
        kind = "truncated" if start + data_nbytes > total else "oversized"
        raise WireError(f"{kind} message: header promises {start + data_nbytes} bytes, buffer has {total}")
    tensors: dict[str, Tensor] = {}
    for entry in entries:
        name, dtype, shape, off, nbytes = _check_entry(entry, data_nbytes)
        if name in tensors:
            raise WireError(f"duplicate tensor name {name!r}")
        if nbytes == 0:  # frombuffer refuses count=0
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        t = torch.frombuffer(mv, dtype=dtype, count=nbytes // dtype.itemsize, offset=start + off)
        tensors[name] = t.view(shape)
    return header, tensors


# ---- authenticated framing (the direct channel, docs/security.md) ------------------------------------
#
# A sealed message is three frames: [seal header][MAC][payload]. The seal header is fixed-size:
#     magic b"MSA1" | kind u8 (b"Q" request, b"R" reply, b"E" error reply) | 3 pad bytes |
#     generation u64 | seq u64 | payload length u64            (little-endian, 32 bytes)
# MAC = HMAC-SHA256(key, seal header || payload). The generation is the actor incarnation the message
# is for; seq grows by one per request to that incarnation, and a reply repeats its request's seq. The
# payload is a wire message (or, for kind E, a UTF-8 error text) and travels as its own frame, so ZMQ
# sends it without a copy; the MAC is computed over it in place.

SEAL_MAGIC = b"MSA1"
_SEAL = struct.Struct("<4sc3xQQQ")
SEAL_BYTES = _SEAL.size
MAC_BYTES = hashlib.sha256().digest_size
KINDS = (b"Q", b"R", b"E")


class AuthError(WireError):
    """A sealed message failed its checks; `reason` is one of AUTH_REASONS (what the counters count)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


AUTH_REASONS = ("bad_mac", "replay", "stale_generation", "truncated", "oversized", "malformed")


def _mac(key: bytes, head: bytes, payload: Any) -> bytes:
    h = hmac.new(key, head, hashlib.sha256)
    h.update(payload)
    return h.digest()


def seal(key: bytes, kind: bytes, generation: int, seq: int, payload: bytes | memoryview) -> list[Any]:
    """The frames of one authenticated message (see above)."""
    if kind not in KINDS:
        raise WireError(f"unknown sealed message kind {kind!r}; one of {KINDS}")
    head = _SEAL.pack(SEAL_MAGIC, kind, int(generation), int(seq), memoryview(payload).nbytes)
    return [head, _mac(key, head, payload), payload]


def unseal(key: bytes, frames: list[Any], *, max_bytes: int) -> tuple[bytes, int, int, memoryview]:
    """(kind, generation, seq, payload view) of sealed `frames`, or AuthError saying why not.

    Checks shape, size (`max_bytes` caps the payload) and the MAC; the caller checks generation and
    seq against what it expects (they are authenticated here)."""
    if len(frames) != 3:
        raise AuthError("malformed", f"sealed message has {len(frames)} frames, expected 3")
    head, mac, payload = (memoryview(f) for f in frames)
    if head.nbytes != SEAL_BYTES or mac.nbytes != MAC_BYTES:
        raise AuthError("malformed", f"seal header/MAC of {head.nbytes}/{mac.nbytes} bytes, "
                                     f"expected {SEAL_BYTES}/{MAC_BYTES}")
    magic, kind, generation, seq, length = _SEAL.unpack(head)
    if magic != SEAL_MAGIC or kind not in KINDS:
        raise AuthError("malformed", f"not a sealed moeshard message (magic {magic!r}, kind {kind!r})")
    if payload.nbytes > max_bytes:
        raise AuthError("oversized", f"payload of {payload.nbytes} bytes exceeds the {max_bytes}-byte limit")
    if payload.nbytes != length:
        reason = "truncated" if payload.nbytes < length else "oversized"
        raise AuthError(reason, f"{reason} payload: {payload.nbytes} bytes, the seal says {length}")
    if not hmac.compare_digest(_mac(key, head, payload), mac):
        raise AuthError("bad_mac", "message authentication failed (wrong key or altered bytes)")
    return kind, generation, seq, payload
