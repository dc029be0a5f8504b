"""Spill files: an expert's slot image on local disk, valid only for the bytes it was made from.

A spill file holds one expert as held (compute dtype, or its low-bit format) exactly as its slot lays it out, after a
64-byte header: magic, format version, payload size and a SHA-256 "source digest" of where
the weights came from (`source_digest`): for each of the three tensors the checkpoint file's
path, device, inode, size and modification time (ns), the tensor's name, file dtype, shape,
offset and size (scales too), the slot layout, what the slot image is (compute dtype, expert
format, packing kernel) and FORMAT_VERSION.
A file whose header does not match the expert being loaded (another checkpoint with the same
shapes, a checkpoint rewritten since, an older format, a torn file) is a miss: the expert is
read from the checkpoint and the spill file is replaced.

Writes go to a private temporary file in the same directory, then `os.replace` it over the
old one, so a reader (in this process or another) sees either the old whole file or the new
whole file, never part of one. Processes sharing a directory therefore never read wrong
weights; if they serve different checkpoints they keep replacing each other's files (each
load then reads the checkpoint, as without a spill directory), so give each its own.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import tempfile
from pathlib import Path
from typing import Literal, Mapping

from .budget import SlotLayout
from .spec import ExpertKey, ExpertSpec

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: the image may be a quantized format (scales, packed weights)
_MAGIC = b"MSHSPILL"
_HEADER = struct.Struct("<8sIIQ32s")  # magic, version, reserved (0), payload bytes, source digest
HEADER_BYTES = 64                     # the payload starts 64-byte aligned, like a slot
assert _HEADER.size <= HEADER_BYTES

Lookup = Literal["hit", "absent", "stale"]


def source_digest(spec: ExpertSpec, layout: SlotLayout, image: str,
                  files: Mapping[str, os.stat_result]) -> bytes:
    """SHA-256 of everything a spilled slot image depends on. `image` names what a slot holds
    (compute dtype, expert format, and for packed formats the kernel that packed it); `files`
    maps each tensor's file to the `os.fstat` of the descriptor its bytes are read through."""
    tensors = []
    for t in (*spec.tensors, *spec.scales):
        st = files[t.file]
        tensors.append([t.file, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
                        t.key, t.dtype, list(t.shape), t.offset, t.nbytes])
    ident = [FORMAT_VERSION, image, list(spec.key), tensors, [[off, nb] for off, nb, _ in layout]]
    return hashlib.sha256(json.dumps(ident, separators=(",", ":")).encode()).digest()


class SpillDir:
    """The spill files of one directory: `read` one into a slot, `write` one from a slot."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: ExpertKey, dtype_name: str) -> Path:
        layer, expert = key
        return self.root / f"L{layer}-E{expert}-{dtype_name}.bin"

    def read(self, key: ExpertKey, dtype_name: str, digest: bytes, dst: memoryview) -> Lookup:
        """Fill `dst` (exactly the slot span) from the spill file if it was made from `digest`'s
        source. "absent": no file; "stale": a file made from something else (or torn), which
        the next `write` replaces. `dst` may hold garbage after a miss."""
        path = self.path(key, dtype_name)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return "absent"
        try:
            if os.fstat(fd).st_size != HEADER_BYTES + len(dst):
                return "stale"
            header = bytearray(HEADER_BYTES)
            if not _preadv_exact(fd, [memoryview(header), dst]):
                return "stale"
            if hasattr(os, "posix_fadvise"):  # the budget is the real footprint: no page-cache copy
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        magic, version, _, nbytes, got = _HEADER.unpack_from(header)
        ok = (magic, version, nbytes, got) == (_MAGIC, FORMAT_VERSION, len(dst), digest)
        return "hit" if ok else "stale"

    def write(self, key: ExpertKey, dtype_name: str, digest: bytes, data: memoryview) -> bool:
        """Write the slot image atomically (temporary file, then rename over the old one).
        A failure (disk full, read-only directory) is logged and returns False: the spill
        directory only saves reads, so it never fails a load."""
        path = self.path(key, dtype_name)
        header = bytearray(HEADER_BYTES)
        _HEADER.pack_into(header, 0, _MAGIC, FORMAT_VERSION, 0, len(data), digest)
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{path.name}.", suffix=".tmp")
            try:
                _write_all(fd, memoryview(header))
                _write_all(fd, data)
                os.fdatasync(fd)  # the rename must not land before the data
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            return True
        except OSError as e:
            log.warning("cannot write spill file %s (%s); expert %s will be read from the checkpoint",
                        path, e, key)
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            return False


def _preadv_exact(fd: int, bufs: list[memoryview], offset: int = 0) -> bool:
    """Read the buffers back to back from `offset`, in one syscall when the kernel allows;
    False if the file ends first."""
    bufs = [b.cast("B") for b in bufs]
    while bufs:
        n = os.preadv(fd, bufs, offset)
        if n == 0:
            return False
        offset += n
        while bufs and n >= len(bufs[0]):
            n -= len(bufs[0])
            bufs.pop(0)
        if bufs and n:
            bufs[0] = bufs[0][n:]
    return True


def _write_all(fd: int, data: memoryview) -> None:
    data = data.cast("B")
    while data:
        data = data[os.write(fd, data):]
