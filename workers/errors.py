"""Exceptions shared by every floor. `workers/` is the bottom floor, so the base lives here."""


class MoeshardError(Exception):
    """Base of every error moeshard raises on purpose."""


class WireError(MoeshardError, ValueError):
    """A message on the wire is malformed: bad header, version, dtype or sizes."""


class BudgetError(MoeshardError, ValueError):
    """A memory budget cannot hold the minimum working set.

    `needed_bytes` (the smallest budget that would do) and `budget_bytes` (the one given) are set
    when the raiser knows them, so a caller can restate the refusal in its own option's name."""

    def __init__(self, message: str, *, needed_bytes: int | None = None, budget_bytes: int | None = None):
        super().__init__(message)
        self.needed_bytes, self.budget_bytes = needed_bytes, budget_bytes


class ExpertLoadError(MoeshardError, OSError):
    """An expert's tensors could not be read from disk (missing or corrupt file)."""
