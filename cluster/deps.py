"""Is this interpreter moeshard's environment? A check that imports nothing heavy, for entry points.

`ray job submit -- python -m cluster.job ...` runs whichever `python` the cluster's PATH finds; one
without torch would otherwise die with a traceback deep inside an import. Standard library only, so
it can run before any of our modules that import torch, ray or msgpack.
"""
from __future__ import annotations

import importlib.util
import sys

# The import names of pyproject.toml's [project] dependencies (tests/test_connect.py keeps them in step).
REQUIRED = {"torch": "torch", "ray": "ray", "safetensors": "safetensors", "msgpack": "msgpack", "pyzmq": "zmq",
            "numpy": "numpy", "psutil": "psutil", "tqdm": "tqdm", "tokenizers": "tokenizers",
            "ninja": "ninja", "grpcio": "grpc"}   # distribution -> import name


def missing_packages() -> list[str]:
    """The required distributions this interpreter cannot import, in pyproject order."""
    return [dist for dist, module in REQUIRED.items() if importlib.util.find_spec(module) is None]


def exit_if_missing(prog: str, code: int) -> None:
    """Exit with `code` and one line on stderr if a required package is missing from this interpreter."""
    if missing := missing_packages():
        sys.stderr.write(f"{prog}: error: this Python ({sys.executable}) lacks {', '.join(missing)}, which moeshard "
                         f"needs: run it with the interpreter of moeshard's environment (e.g. .venv/bin/python -m "
                         f"...), or `pip install -e .` into this one\n")
        sys.exit(code)
