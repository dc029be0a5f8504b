"""Exceptions shared by every floor. `workers/` is the bottom floor, so the base lives here."""


class MoeshardError(Exception):
    """Base of every error moeshard raises on purpose."""


class WireError(MoeshardError, ValueError):
    """A message on the wire is malformed: bad header, version, dtype or sizes."""


class BudgetError(MoeshardError, ValueError):
    """A memory budget cannot hold the minimum working set."""


class ExpertLoadError(MoeshardError, OSError):
    """An expert's tensors could not be read from disk (missing or corrupt file)."""
