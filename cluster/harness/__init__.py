"""Multi-node test harness: Ray "hosts" in network namespaces + cgroups on one machine.

See :mod:`cluster.harness.cluster` for the layout and how auth works.
"""
from .cluster import (
    HarnessError,
    HarnessUnsupported,
    Host,
    LocalCluster,
    down_all,
    leftovers,
    list_clusters,
    namespace_unavailable_reason,
    parse_size,
)

__all__ = [
    "HarnessError",
    "HarnessUnsupported",
    "Host",
    "LocalCluster",
    "down_all",
    "leftovers",
    "list_clusters",
    "namespace_unavailable_reason",
    "parse_size",
]
