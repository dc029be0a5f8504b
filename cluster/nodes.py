"""The cluster's nodes as Ray reports them: one typed view for the job, the fleet, recovery and the actors.

`ray_nodes()` is the one place that reads `ray.nodes()`; everything else works on `RayNode`s.
`host_slots` groups them into machines (`NodeSlot`: all Ray nodes sharing an IP) that can hold
expert actors, `wait_for_slots` waits (bounded) for enough of them, and `assign_slots` deals the
planned actors to them. The pure parts take plain values, so they are tested without a cluster.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from workers.units import format_bytes

from .errors import ClusterError

#: the custom resource that marks nodes meant for expert actors (ray_config.yaml sets it)
EXPERT_SHARD_RESOURCE = "expert_shard"


class ClusterTooSmall(ClusterError):
    """The alive nodes cannot hold the planned actors (CPUs, GPUs or memory)."""


@dataclass(frozen=True)
class RayNode:
    """One Ray node (a raylet): its id, address and total resources."""

    node_id: str
    ip: str
    port: int                     # the raylet's port (NodeManagerPort): what a reachability probe dials
    alive: bool
    resources: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def from_ray(cls, n: Mapping[str, Any]) -> "RayNode":
        return cls(n["NodeID"], n["NodeManagerAddress"], int(n.get("NodeManagerPort") or 0), bool(n.get("Alive")),
                   dict(n.get("Resources") or {}))

    @property
    def memory(self) -> float:
        """Ray's `memory` resource, bytes (0 = unknown)."""
        return float(self.resources.get("memory", 0.0))


def ray_nodes(*, alive_only: bool = True) -> list[RayNode]:
    """The nodes of the connected cluster (alive ones only, unless told otherwise)."""
    import ray

    nodes = [RayNode.from_ray(n) for n in ray.nodes()]
    return [n for n in nodes if n.alive] if alive_only else nodes


def find_node(node_id: str) -> RayNode | None:
    """The node with this id, alive or dead; None if Ray does not know it."""
    return next((n for n in ray_nodes(alive_only=False) if n.node_id == node_id), None)


def fits(resources: Mapping[str, float] | None, need: Mapping[str, float]) -> bool:
    """Whether `resources` (a node's total or free resources) covers every nonzero amount in `need`."""
    resources = resources or {}
    return all(resources.get(k, 0.0) + 1e-9 >= v for k, v in need.items() if v > 0)


# ---- machines that can host expert actors ------------------------------------------------------

@dataclass
class NodeSlot:
    """One machine (all Ray nodes sharing an IP) that can host expert actors."""

    ip: str
    cpus: float
    gpus: float
    memory: float                 # Ray's `memory` resource, bytes (0 = unknown)
    node_ids: list[str] = field(default_factory=list)
    driver: bool = False          # the job's driver (the coordinator) runs here
    suspect: bool = False         # an actor was lost here; use it last

    def capacity(self, cpus: float, gpus: float) -> int:
        """How many actors asking `cpus`/`gpus` fit."""
        fits_ = [math.floor(self.cpus / cpus + 1e-9) if cpus > 0 else math.inf,
                 math.floor(self.gpus / gpus + 1e-9) if gpus > 0 else math.inf]
        n = min(fits_)
        return 1_000_000 if n == math.inf else int(n)

    def describe(self) -> str:
        mem = f", {format_bytes(self.memory)} memory" if self.memory else ""
        return f"{self.ip} ({self.cpus:g} CPUs, {self.gpus:g} GPUs{mem})"


def group_slots(nodes: Sequence[RayNode], cpus: float, gpus: float, suspects: set[str] = frozenset(),
                driver_node: str | None = None) -> tuple[list[NodeSlot], list[str]]:
    """(machines that can hold one actor asking `cpus`/`gpus`, descriptions of those that cannot).

    When some node advertises `expert_shard`, only such nodes count. Usable machines come in the
    order actors should fill them: not suspect first, then not the driver's, then by IP."""
    role = any(n.resources.get(EXPERT_SHARD_RESOURCE, 0) > 0 for n in nodes)
    by_ip: dict[str, NodeSlot] = {}
    for n in nodes:
        if role and n.resources.get(EXPERT_SHARD_RESOURCE, 0) <= 0:
            continue
        slot = by_ip.setdefault(n.ip, NodeSlot(n.ip, 0.0, 0.0, 0.0, suspect=n.ip in suspects))
        slot.cpus += n.resources.get("CPU", 0.0)
        slot.gpus += n.resources.get("GPU", 0.0)
        slot.memory += n.memory
        slot.node_ids.append(n.node_id)
        slot.driver = slot.driver or n.node_id == driver_node
    usable = [s for s in by_ip.values() if s.capacity(cpus, gpus) >= 1]
    others = [s.describe() for s in by_ip.values() if s.capacity(cpus, gpus) < 1]
    usable.sort(key=lambda s: (s.suspect, s.driver, s.ip))
    return usable, others


def host_slots(cpus: float, gpus: float, suspects: set[str] = frozenset()) -> tuple[list[NodeSlot], list[str]]:
    """`group_slots` over the connected cluster's alive nodes, marking the driver's machine."""
    import ray

    try:
        driver_node = ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - not connected as a driver
        driver_node = None
    return group_slots(ray_nodes(), cpus, gpus, suspects, driver_node)


def wait_for_slots(want: int | None, timeout: float, cpus: float, gpus: float,
                   suspects: set[str] = frozenset()) -> tuple[list[NodeSlot], list[str]]:
    """`host_slots`; with `want`, wait up to `timeout` s for that many usable machines (then take what is there)."""
    deadline = time.monotonic() + timeout
    while True:
        slots, refused = host_slots(cpus, gpus, suspects)
        if want is None or len(slots) >= want or time.monotonic() >= deadline:
            return slots, refused
        time.sleep(min(2.0, max(0.1, deadline - time.monotonic())))


def assign_slots(slots: Sequence[NodeSlot], resident: Sequence[int], cpus: float, gpus: float,
                 refused: Sequence[str] = ()) -> list[str]:
    """The IP each actor goes to: fewest actors first, then slot order; ClusterTooSmall when they do not fit.

    `resident[i]` is actor i's resident expert bytes, checked against each machine's `memory` resource.
    """
    count = {n.ip: 0 for n in slots}
    mem = {n.ip: 0 for n in slots}
    out = []
    for i, need in enumerate(resident):
        ok = [n for n in slots if count[n.ip] < n.capacity(cpus, gpus)
              and (not n.memory or mem[n.ip] + need <= n.memory)]
        if not ok:
            have = "; ".join(n.describe() for n in slots) or "none"
            extra = f"; alive nodes that cannot hold one: {'; '.join(refused)}" if refused else ""
            raise ClusterTooSmall(
                f"the cluster is too small for {len(resident)} expert actors asking {cpus:g} CPU(s), {gpus:g} GPU(s) "
                f"and up to {format_bytes(max(resident))} of resident experts each: it holds only {i}. Nodes that "
                f"can hold an actor: {have}{extra}. Use fewer --workers, smaller --cpus-per-worker/--worker-memory, "
                f"or add nodes")
        best = min(ok, key=lambda n: count[n.ip])  # stable: ties keep slot order
        count[best.ip] += 1
        mem[best.ip] += need
        out.append(best.ip)
    return out
