"""Errors raised while reading configs and checkpoints."""
from workers.errors import MoeshardError


class CheckpointError(MoeshardError, ValueError):
    """A checkpoint directory, file or tensor is missing, truncated or inconsistent."""


class UnsupportedModelError(MoeshardError, ValueError):
    """The config asks for an architecture or feature moeshard does not implement."""
