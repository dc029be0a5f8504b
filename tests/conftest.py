"""Shared fixtures: a session cache of tiny random HF checkpoints (see checkpoints.py)."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import checkpoints as ckpts  # noqa: E402

# The test machines have 2 shared cores; tiny models gain nothing from more threads.
_THREADS = int(os.environ.get("MOESHARD_TEST_THREADS", "1"))
torch.set_num_threads(_THREADS)
try:
    torch.set_num_interop_threads(_THREADS)
except RuntimeError:  # already set (e.g. torch did parallel work before conftest)
    pass
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def _key(family, variant, dtype, shards, tied, seed, overrides):
    if isinstance(dtype, str):
        dtype = ckpts._DTYPES[dtype]
    dtype = str(dtype).replace("torch.", "")
    return (family, variant, str(dtype), int(shards), bool(tied), int(seed), tuple(sorted(
        (k, repr(v)) for k, v in overrides.items())))


class CheckpointCache:
    """Builds each distinct checkpoint once per session. Treat returned paths as READ-ONLY;
    use `fresh()` (or the `fresh_checkpoint` fixture) for a private copy you may corrupt."""

    def __init__(self, root: Path):
        self.root = root
        self._paths: dict[tuple, Path] = {}
        self._refs: dict[tuple, torch.nn.Module] = {}

    def get(self, family: str, variant: str = "base", *, dtype=torch.float32, shards: int = 1,
            tied: bool = False, seed: int = 0, **overrides) -> Path:
        key = _key(family, variant, dtype, shards, tied, seed, overrides)
        if key not in self._paths:
            d = self.root / f"ckpt{len(self._paths):03d}-{family}-{variant}"
            self._paths[key] = ckpts.make_checkpoint(
                d, family, variant=variant, dtype=dtype, shards=shards, tied=tied, seed=seed, **overrides)
        return self._paths[key]

    def fresh(self, dest: Path, family: str, variant: str = "base", **kw) -> Path:
        src = self.get(family, variant, **kw)
        dest = Path(dest)
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(src, dest)
        return dest

    def reference(self, path: Path, dtype=torch.float32):
        """The transformers model for `path` (cached; do not mutate it)."""
        key = (str(path), str(dtype))
        if key not in self._refs:
            self._refs[key] = ckpts.load_reference(path, dtype=dtype)
        return self._refs[key]


@pytest.fixture(scope="session")
def checkpoint_cache(tmp_path_factory) -> CheckpointCache:
    return CheckpointCache(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="session")
def checkpoint(checkpoint_cache):
    """Factory: checkpoint(family, variant="base", dtype=..., shards=1, tied=False, seed=0, **overrides) -> Path."""
    return checkpoint_cache.get


@pytest.fixture(scope="session")
def reference(checkpoint_cache):
    """Factory: reference(path, dtype=torch.float32) -> cached transformers model (eval, eager)."""
    return checkpoint_cache.reference


@pytest.fixture
def fresh_checkpoint(checkpoint_cache, tmp_path):
    """Factory: a private, mutable copy of a cached checkpoint under this test's tmp_path."""
    counter = [0]

    def make(family: str, variant: str = "base", **kw) -> Path:
        counter[0] += 1
        return checkpoint_cache.fresh(tmp_path / f"ckpt{counter[0]}", family, variant, **kw)

    return make


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray for one test module (4 CPUs); the Coordinator reuses an initialised Ray."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=4, num_gpus=0, include_dashboard=False, logging_level="WARNING")
    yield
    if started:
        ray.shutdown()
