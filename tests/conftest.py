"""Shared fixtures: a session cache of tiny random HF checkpoints (see checkpoints.py); the skip policy.

Skip policy: a test that needs something this machine may lack (a capability: ``harness``, ``cgroups``,
``cuda``, ``llama_cpp``, ``native``) says so with ``@pytest.mark.requires("harness")`` or, at run time, ``require("harness")``.
Where the capability is missing the test is skipped and the summary says why; with ``CI=true`` it fails
instead, unless ``MOESHARD_ALLOW_SKIP`` (comma-separated) names the capability. No other skip of a test
for a missing capability is allowed: that is how a suite ends up passing while testing nothing.
"""
from __future__ import annotations

import functools
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


# ---- skip policy --------------------------------------------------------------------------------

def _harness_missing() -> str:
    from cluster.harness import namespace_unavailable_reason

    return namespace_unavailable_reason()


def _cgroups_missing() -> str:
    from cluster import cgroups

    if os.geteuid() != 0:
        return "not root"
    return cgroups.unavailable_reason(pin_cpus=False)


def _cuda_missing() -> str:
    return "" if torch.cuda.is_available() else "no CUDA device (torch.cuda.is_available() is False)"


def _llama_cpp_missing() -> str:
    # llama-cpp-python importable and its GGUF converter already fetched (bench/llama_cpp.py); never downloads
    from bench import llama_cpp

    return llama_cpp.available(fetch=False) or ""


def _native_missing() -> str:
    from workers import native

    if native.ops() is not None:
        return ""
    return ("MOESHARD_NATIVE=0" if os.environ.get(native.ENV) == "0" else
            "no AVX-512 VNNI" if not native.cpu_supports() else "the build failed (see the log)")


#: capability -> probe returning why it is missing here ("" = available)
CAPABILITIES = {
    "harness": _harness_missing,   # root, iproute2, network namespaces, cgroups with cpusets
    "cgroups": _cgroups_missing,   # root and a writable memory controller
    "cuda": _cuda_missing,
    "llama_cpp": _llama_cpp_missing,   # the optional llama.cpp bench peer
    "native": _native_missing,         # workers/native's CPU kernels: AVX-512 VNNI and a C++ compiler
}
ALLOW_SKIP_ENV = "MOESHARD_ALLOW_SKIP"
_SKIPPED: list[tuple[str, str]] = []   # (capability, reason) per skipped test, for the summary


def _allowed_skips() -> set[str]:
    names = {n.strip() for n in os.environ.get(ALLOW_SKIP_ENV, "").split(",") if n.strip()}
    unknown = names - set(CAPABILITIES)
    if unknown:
        raise pytest.UsageError(f"{ALLOW_SKIP_ENV} names unknown capabilities {sorted(unknown)}; "
                                f"known: {', '.join(sorted(CAPABILITIES))}")
    return names


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1")


def _known(capability: str) -> None:
    if capability not in CAPABILITIES:
        pytest.fail(f"unknown capability {capability!r}; known: {', '.join(sorted(CAPABILITIES))}", pytrace=False)


@functools.cache
def missing(capability: str) -> str:
    """Why ``capability`` is unavailable on this machine ("" if it is available); probed once per session."""
    _known(capability)
    return CAPABILITIES[capability]()


def skip_for(capability: str, reason: str) -> None:
    """Skip the running test because ``capability`` is missing (``reason`` says why); under CI=true fail
    instead unless MOESHARD_ALLOW_SKIP names the capability."""
    _known(capability)
    if _ci() and capability not in _allowed_skips():
        pytest.fail(f"needs {capability}, which this machine lacks: {reason}. CI=true forbids skipping it; "
                    f"fix the machine, or set {ALLOW_SKIP_ENV}={capability} to allow the skip", pytrace=False)
    _SKIPPED.append((capability, reason))
    pytest.skip(f"needs {capability}: {reason}")


def require(capability: str) -> None:
    """Skip (or under CI=true fail) the running test unless this machine has ``capability``."""
    reason = missing(capability)
    if reason:
        skip_for(capability, reason)


def pytest_configure(config):
    config.addinivalue_line("markers", "requires(capability): the test needs a capability the machine may lack "
                                       f"({', '.join(sorted(CAPABILITIES))}); see tests/conftest.py")
    _allowed_skips()   # a misspelt MOESHARD_ALLOW_SKIP is an error before anything runs


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    # before fixtures: a missing capability must not first bring up a cluster
    for mark in item.iter_markers("requires"):
        if len(mark.args) != 1 or mark.kwargs:
            pytest.fail(f"use @pytest.mark.requires(capability), got {mark}", pytrace=False)
        require(mark.args[0])


def pytest_terminal_summary(terminalreporter):
    if not _SKIPPED:
        return
    terminalreporter.section("skipped: capabilities this machine lacks")
    counts: dict[tuple[str, str], int] = {}
    for key in _SKIPPED:
        counts[key] = counts.get(key, 0) + 1
    allowed = f" (allowed by {ALLOW_SKIP_ENV})" if _ci() else ""
    for (capability, reason), n in sorted(counts.items()):
        terminalreporter.write_line(f"{capability}: {n} test(s) skipped{allowed}: {reason}")


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
