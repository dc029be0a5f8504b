"""The read path of an expert store: file bytes -> a slot, in the expert's format.

`ExpertReader.read(info, buf)` fills one slot: from a spill file when one made from the same
source exists, else from the checkpoint with `os.preadv` at each tensor's absolute offset
(then dropped from the page cache, so the budget is the real footprint), converted by the
expert's format (workers/formats.py: dtype conversion, quantization, packing), and then
spilled. Thread-safe: each loading thread has its own staging buffer (outside the budget:
the largest weight with its scales as stored), file descriptors are shared under a lock.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import torch

from . import native, spill
from .errors import ExpertLoadError
from .formats import FILE_DTYPES, format_of
from .slots import ExpertInfo
from .spec import ExpertSpec, TensorSpec

log = logging.getLogger(__name__)

# spill lookups: a hit, no file yet (the read writes one), a file from another source (replaced)
SPILL_COUNTER = {"hit": "spill_reads", "absent": "spill_misses", "stale": "spill_stale"}


class ExpertReader:
    """Reads experts of `specs` into slots of compute dtype `dtype` on `device`."""

    def __init__(self, specs: list[ExpertSpec], dtype: torch.dtype, device: torch.device,
                 spill_dir: str | os.PathLike | None = None):
        self.dtype, self.device = dtype, device
        self.dtype_name = str(dtype).removeprefix("torch.")
        self.spill = spill.SpillDir(Path(spill_dir)) if spill_dir is not None else None
        self._fds: dict[str, int] = {}
        self._fd_lock = threading.Lock()
        self._local = threading.local()  # per-thread staging buffer
        self._stage_bytes = max((sum(t.nbytes for t in w) for s in specs for w in format_of(s).file_tensors(s)),
                                default=0)

    @property
    def open_files(self) -> int:
        with self._fd_lock:
            return len(self._fds)

    def image_name(self, spec: ExpertSpec) -> str:
        """What a slot of `spec` holds, for spill file names: compute dtype, and the format unless dense."""
        fmt = spec.held_format
        if fmt == "dense":
            return self.dtype_name
        return f"{fmt}{'g' + str(spec.group_size) if spec.group_size else ''}-{self.dtype_name}"

    def read(self, info: ExpertInfo, buf: torch.Tensor) -> tuple[object, str | None, bool]:
        """Fill slot `buf` (uint8) with the expert; return (its weights, the spill lookup or None
        without a spill directory, whether a spill file was written).

        With a spill directory, an expert is read from the checkpoint once, then written there
        as its slot image (as held, one contiguous span) and read back with one preadv; a spill
        file made from other bytes (workers/spill.py) is a miss and is rewritten.
        """
        spilling = self.spill is not None and buf.device.type == "cpu"  # CUDA slots are not spilled
        found, wrote = None, False
        if spilling:
            digest = self._spill_digest(info)
            found = self.spill.read(info.spec.key, self.image_name(info.spec), digest,
                                    memoryview(buf[:info.span].numpy()))
        if found != "hit":
            self._read_checkpoint(info, buf)
            wrote = spilling and self.spill.write(info.spec.key, self.image_name(info.spec), digest,
                                                  memoryview(buf[:info.span].numpy()))
        return self.views(info, buf), found, wrote

    def views(self, info: ExpertInfo, buf: torch.Tensor) -> object:
        """The runnable expert over slot `buf`'s bytes (no copy)."""
        spec, fmt = info.spec, format_of(info.spec)
        parts = iter(info.layout)
        views = []
        for weight in fmt.parts(spec):
            views.append([_typed(buf, next(parts), p.torch_dtype(self.dtype)) for p in weight])
        return fmt.weights(spec, views)

    def _read_checkpoint(self, info: ExpertInfo, buf: torch.Tensor) -> None:
        spec, fmt = info.spec, format_of(info.spec)
        layout = iter(info.layout)
        direct = buf.device.type == "cpu" and fmt.direct(spec, self.dtype)
        for weight, files in zip(fmt.parts(spec), fmt.file_tensors(spec)):
            slots = [next(layout) for _ in weight]
            if direct:  # the file bytes are the slot bytes: read straight into the slot
                for (off, nb, _), t in zip(slots, files):
                    self.read_raw(spec, t, buf[off:off + nb])
                continue
            stage, src, at = self._stage(), [], 0
            for t in files:
                self.read_raw(spec, t, stage[at:at + t.nbytes])
                src.append(stage[at:at + t.nbytes].view(FILE_DTYPES[t.dtype]).view(t.shape))
                at += t.nbytes
            dst = [_typed(buf, s, p.torch_dtype(self.dtype)) for s, p in zip(slots, weight)]
            fmt.convert(spec, src, dst)  # synchronous: the staging buffer is reused

    def _stage(self) -> torch.Tensor:
        stage = getattr(self._local, "stage", None)
        if stage is None:
            stage = torch.empty(self._stage_bytes, dtype=torch.uint8)
            if self.device.type == "cuda" and torch.cuda.is_available():
                stage = stage.pin_memory()  # pinned so the host-to-device copy is a plain DMA
            self._local.stage = stage
        return stage

    def read_raw(self, spec: ExpertSpec, t: TensorSpec, dst: torch.Tensor) -> None:
        """Read file tensor `t` of `spec` as stored into `dst` (uint8, CPU, t.nbytes long)."""
        self._pread(self._fd(spec, t), dst, t.file, t.offset, t.nbytes, f"tensor {t.key!r} of expert {spec.key}")

    def _spill_digest(self, info: ExpertInfo) -> bytes:
        """The source digest of the expert's spill file: the checkpoint files as opened for reading,
        and the torch build and kernel set that converted them (packed layouts are the kernel's own)."""
        spec = info.spec
        files = {t.file: os.fstat(self._fd(spec, t)) for t in (*spec.tensors, *spec.scales)}
        image = (f"{self.image_name(spec)}/torch {torch.__version__}/{torch.backends.cpu.get_cpu_capability()}"
                 f"/{native.kernel_id()}")
        return spill.source_digest(spec, info.layout, image, files)

    @staticmethod
    def _pread(fd: int, dst: torch.Tensor, file: str, offset: int, nbytes: int, what: str) -> None:
        """Read exactly nbytes at offset into dst (uint8), then drop them from the page cache."""
        mv, got = memoryview(dst.numpy()), 0
        try:
            while got < nbytes:
                n = os.preadv(fd, [mv[got:]], offset + got)
                if n == 0:
                    raise ExpertLoadError(f"{file}: file ended after {got} of {nbytes} bytes of {what} "
                                          f"(offset {offset}); is the file truncated?")
                got += n
        except OSError as e:
            if isinstance(e, ExpertLoadError):
                raise
            raise ExpertLoadError(f"{file}: cannot read {what}: {e}") from e
        if hasattr(os, "posix_fadvise"):  # drop it from page cache: the budget is the real footprint
            os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)

    def _fd(self, spec: ExpertSpec, t: TensorSpec) -> int:
        with self._fd_lock:
            fd = self._fds.get(t.file)
            if fd is None:
                try:
                    fd = self._fds[t.file] = os.open(t.file, os.O_RDONLY)
                except OSError as e:
                    raise ExpertLoadError(
                        f"{t.file}: cannot open for tensor {t.key!r} of expert {spec.key}: {e}") from e
            return fd

    def close(self) -> None:
        with self._fd_lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


def _typed(buf: torch.Tensor, entry: tuple[int, int, tuple[int, ...]], dtype: torch.dtype) -> torch.Tensor:
    off, nb, shape = entry
    return buf[off:off + nb].view(dtype).view(shape)
