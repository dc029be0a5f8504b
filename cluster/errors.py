"""Ray failures, translated into moeshard's own exceptions."""
from workers.errors import MoeshardError


class ClusterError(MoeshardError, RuntimeError):
    """The Ray cluster cannot be reached or cannot hold the requested plan."""


class ShardUnavailable(ClusterError):
    """An expert-shard actor died or cannot be reached, and recovery was not possible."""


class ExpertTimeout(ShardUnavailable):
    """An expert-shard actor did not answer within the call timeout."""
