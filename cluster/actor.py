"""The expert-shard actor: `ExpertShard` plus what only a Ray actor can say about itself."""
from __future__ import annotations

import os
from typing import Any

from workers.budget import slot_bytes
from workers.dtypes import COMPUTE_DTYPES
from workers.shard import ExpertShard
from workers.spec import ExpertSpec

from . import recovery
from .nodes import find_node
from .channel import ChannelConfig, ChannelServer

#: Ray concurrency groups of the actor: the direct channel's serve loop runs on its own thread, and so
#: does loading replicas (`adopt`), so that a re-placement loads while layers keep being served
CONCURRENCY_GROUPS = {"channel": 1, "placement": 1}


class ShardActor(ExpertShard):
    """`ExpertShard` plus what only an actor can say about itself: where it runs.

    `takeover` (set for a replacement placed away from its planned node) makes the actor
    check that it can read the checkpoint files here and size its expert budget to the
    memory this node has free (`recovery.takeover_budget`), so it pages instead of failing.

    `channel` (a `ChannelConfig`'s fields) makes the actor bind the direct channel's socket on its
    node's IP (cluster/channel.py); `node_info` reports the endpoint, and `serve_channel` (on its own
    thread, see CONCURRENCY_GROUPS) answers it until the actor ends.
    """

    def __init__(self, specs: list[dict], budget_bytes: int | None = None, *,
                 takeover: dict[str, Any] | None = None, channel: dict[str, Any] | None = None, **kwargs: Any):
        self.takeover: dict[str, Any] | None = None
        self.channel: ChannelServer | None = None
        if takeover is not None:
            recovery.check_files(t["file"] for d in specs for t in (d["gate"], d["up"], d["down"]))
            itemsize = COMPUTE_DTYPES[kwargs.get("dtype", "float32")].itemsize
            parsed = [ExpertSpec.from_dict(d) for d in specs]
            slot = slot_bytes(parsed, itemsize)
            machine = recovery.available_memory()        # this process's view (cgroup limits if readable)
            node = _node_memory_left(takeover.get("held", {}))   # what the cluster says this node has left
            free = machine if node is None else min(machine, node)
            planned = budget_bytes
            budget_bytes = recovery.takeover_budget(slot, len(parsed), planned, takeover.get("memory"),
                                                    float(takeover.get("share", 0.5)), free)
            self.takeover = {"free_bytes": free, "machine_free_bytes": machine, "node_memory_left": node,
                             "planned_budget": planned, "budget_bytes": budget_bytes,
                             "expert_bytes": slot * len(parsed),
                             "paged": budget_bytes is not None and budget_bytes < slot * len(parsed)}
        super().__init__(specs, budget_bytes, **kwargs)
        if channel is not None:
            import ray

            self.channel = ChannelServer(ChannelConfig(**channel), ray.util.get_node_ip_address(), self.run_layer)

    def node_info(self) -> dict[str, Any]:
        """Liveness check that also reports the actor's node id, node IP and pid (and any takeover)."""
        import ray

        self.ping()
        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "ip": ray.util.get_node_ip_address(), "pid": os.getpid(),
                "device": str(self.device), "budget_bytes": self.budget_bytes, "takeover": self.takeover,
                "endpoint": None if self.channel is None else self.channel.endpoint,
                "local_endpoint": None if self.channel is None else self.channel.local_endpoint,
                "generation": None if self.channel is None else self.channel.config.generation}

    def serve_channel(self) -> None:
        """Serve the direct channel until the actor ends (see the class doc). Its ref is the
        coordinator's death notice: it fails as soon as the actor process is gone."""
        if self.channel is None:
            raise RuntimeError("this actor was started without a channel")
        self.channel.serve()

    def report(self) -> dict:
        rep = super().report()
        if self.channel is not None:
            rep["channel"] = self.channel.counters()
        return rep


def _node_memory_left(held: dict[str, int]) -> int | None:
    """This node's Ray `memory` resource (its memory for tasks and actors; sized from the node's
    cgroup or the operator's `--memory`) minus what our other actors there hold. None if unknown.

    Inside a harness host `ip netns exec` remounted /sys, so the cgroup files cannot be read
    from the process itself; Ray's figure for the node is the one that is always available."""
    import ray

    try:
        nid = ray.get_runtime_context().get_node_id()
        node = find_node(nid)
    except Exception:  # GCS unreachable: fall back on the local measurement
        return None
    total = node.memory if node is not None else None
    return None if not total else max(0, int(total) - int(held.get(nid, 0)))
