"""Coordinator side of moeshard: config, checkpoint reading, the dense model, routing, generation.

`Coordinator` is imported on first use, so that the option table (coordinator/options.py) and
the CLI's argument parsers load without torch.
"""
from typing import Any

__all__ = ["Coordinator"]


def __getattr__(name: str) -> Any:
    if name == "Coordinator":
        from .api import Coordinator
        return Coordinator
    raise AttributeError(f"module 'coordinator' has no attribute {name!r}")
