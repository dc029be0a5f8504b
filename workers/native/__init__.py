"""Native CPU kernels for batch-1 decode (lowbit.cpp: GEMVs and experts; attention.cpp: decode
attention; rowops.cpp: RMSNorm and RoPE of a few rows), built on first use with torch's extension builder.

`ops()` is `torch.ops.moeshard_lowbit` (int8/int4/dense `_linear` for one weight, `_expert` for a
whole routed expert in one call; decode_attention; rms_norm, rope) where they can run, else None and the callers
use torch's own kernels:
- MOESHARD_NATIVE=0 turns them off (to compare, or to rule them out);
- they need x86-64 with AVX-512 (F, BW, VL, DQ) and VNNI;
- they need a C++ compiler at first use; the build lands in ~/.cache/moeshard/native/<digest>
  (MOESHARD_NATIVE_DIR to move it), keyed by the source and torch version, so it happens once
  per machine and every process after that loads the same library.
A build that fails is logged once with the compiler's message, and the process runs on torch.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name(n) for n in ("lowbit.cpp", "attention.cpp", "rowops.cpp")]
HEADERS = [Path(__file__).with_name("pool.h")]
ENV = "MOESHARD_NATIVE"
DIR_ENV = "MOESHARD_NATIVE_DIR"
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni")
CFLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mfma", "-pthread"]


def cpu_supports() -> bool:
    """Whether this CPU has every instruction set the kernels use (Linux /proc/cpuinfo)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return all(f in flags for f in CPU_FLAGS)


def digest() -> str:
    """What the built library depends on: its source, the flags and the torch it links."""
    h = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES + HEADERS))
    h.update(" ".join(CFLAGS).encode() + torch.__version__.encode())
    return h.hexdigest()[:16]


def kernel_id() -> str:
    """'native-<digest>' or 'torch': which kernels (and so which held layouts) this process uses."""
    return f"native-{digest()}" if ops() is not None else "torch"


_build_lock = threading.Lock()   # the store's loader threads and the compute thread may ask at once


@functools.cache
def _ops():
    if os.environ.get(ENV, "1") == "0" or not cpu_supports():
        return None
    build = Path(os.environ.get(DIR_ENV) or Path.home() / ".cache" / "moeshard" / "native") / digest()
    built = build / "moeshard_lowbit.so"
    try:
        # the digest names source, flags and torch, so a library there is current, unless a build is
        # still writing it (torch's builder holds a "lock" file in the folder meanwhile)
        if built.is_file() and not (build / "lock").exists():
            torch.ops.load_library(str(built))
            return torch.ops.moeshard_lowbit
        from torch.utils.cpp_extension import load   # only to build: it runs ninja, ~1 s, even when current

        build.mkdir(parents=True, exist_ok=True)
        load(name="moeshard_lowbit", sources=[str(p) for p in SOURCES], extra_cflags=CFLAGS, extra_ldflags=["-pthread"],
             build_directory=str(build), is_python_module=False, verbose=False)
    except Exception as e:  # noqa: BLE001 - any build failure means: run on torch's kernels
        log.warning("native CPU kernels unavailable, using torch's (%s: %s)", type(e).__name__, str(e)[-400:])
        return None
    return torch.ops.moeshard_lowbit


def ops():
    """torch.ops.moeshard_lowbit, or None (see the module's docstring); builds or loads on first call."""
    with _build_lock:
        return _ops()


ops.cache_clear = _ops.cache_clear   # tests switch kernel sets with MOESHARD_NATIVE
