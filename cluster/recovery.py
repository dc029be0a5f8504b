"""Recovery from lost expert actors: policy, bookkeeping and the helpers `RemoteExperts` uses.

What `RemoteExperts` does with these (see cluster/dispatch.py and the README section
"What happens when a worker dies"):

- a layer call that fails because its actor died, hung past `call_timeout_s` or became
  unreachable is retried: the actor is killed (no restart) and replaced by a new actor
  with the same experts, then the call's kept message is resent, byte for byte;
- the replacement goes where the planned actor went, unless that node is dead or
  unreachable (`node_reachable`): then it is placed on a surviving node and, if that
  node cannot hold the experts, it sizes its own budget to the memory it finds there
  (`takeover_budget`) and pages the rest from the checkpoint files;
- retries are bounded per call and per request (`coordinator.options.RecoveryOptions`); every wait is bounded;
- with replicas (cluster/replicas.py), a dead actor's rows of experts another live actor also holds
  are resent to that holder at once (`Dispatcher._failover`), and only the rest wait for a
  replacement; the replacement holds its planned experts only (cluster/rebalance.py: `lost`).

This module imports neither torch nor Ray at import time.
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from workers.errors import ExpertLoadError

from . import cgroups
from .nodes import RayNode, fits

#: how long to wait for a TCP connection to a node's raylet when deciding whether that node is alive
NODE_PROBE_TIMEOUT_S = 1.0
#: recovery events kept for `stats()` (oldest dropped first)
EVENTS_KEPT = 256


@dataclass
class ActorRecovery:
    """Recovery counters of one actor slot (all its incarnations)."""

    incarnation: int = 0          # 0 = the planned actor; +1 per replacement
    failures: int = 0             # failed calls seen (died, timed out, unreachable)
    restarts: int = 0             # replacement actors that became ready
    retries: int = 0              # calls resent
    recovery_s: float = 0.0       # time from failure detection to the retried call's reply
    broken: str | None = None     # why the current incarnation must be replaced before its next call
    takeover: dict[str, Any] | None = None   # set while the actor runs away from its planned node

    def as_dict(self) -> dict[str, Any]:
        return {"incarnation": self.incarnation, "failures": self.failures, "restarts": self.restarts,
                "retries": self.retries, "recovery_s": self.recovery_s, "alive": self.broken is None,
                "takeover": self.takeover}


@dataclass
class RecoveryLog:
    """Totals over actors plus the last `EVENTS_KEPT` recovery events."""

    events: list[dict[str, Any]] = field(default_factory=list)

    def add(self, **event: Any) -> None:
        event.setdefault("t", time.time())
        self.events.append(event)
        del self.events[:-EVENTS_KEPT]


# ---- node liveness -----------------------------------------------------------------------------

def node_reachable(ip: str, port: int, timeout_s: float = NODE_PROBE_TIMEOUT_S) -> bool:
    """True if the node's raylet accepts a TCP connection: a killed host refuses, a cut link times out."""
    try:
        with socket.create_connection((ip, int(port)), timeout=timeout_s):
            return True
    except OSError:
        return False


def pick_node(candidates: Sequence[RayNode], need: Mapping[str, float],
              free: Mapping[str, Mapping[str, float]], ours: Mapping[str, int]) -> RayNode | None:
    """The surviving node to re-place an actor on: one whose totals fit `need`, preferring nodes with
    the resources free right now, then fewer of our actors, then more free CPU, then node id."""
    ok = [n for n in candidates if fits(n.resources, need)]
    if not ok:
        return None
    return min(ok, key=lambda n: (not fits(free.get(n.node_id), need), ours.get(n.node_id, 0),
                                  -float((free.get(n.node_id) or {}).get("CPU", 0.0)), n.node_id))


# ---- memory on the node a replacement lands on (runs inside the actor) ---------------------------

def available_memory() -> int:
    """Bytes this process could still allocate on its node: the smaller of the machine's available
    memory and the headroom of the memory cgroups it runs in (a harness host, a container)."""
    import psutil

    free = int(psutil.virtual_memory().available)
    room = cgroups.memory_headroom()
    return free if room is None else min(free, room)


def check_files(paths: Iterable[str]) -> None:
    """ExpertLoadError unless every checkpoint file is readable here (the disk tier of a takeover)."""
    for p in sorted(set(paths)):
        if not os.access(p, os.R_OK):
            raise ExpertLoadError(f"checkpoint file {p} is not readable on this node "
                                  f"({socket.gethostname()}): the experts cannot be taken over here; "
                                  "put the checkpoint on storage every node can read")


def takeover_budget(slot_bytes: int, num_experts: int, planned: int | None, configured: int | None,
                    share: float, free: int) -> int | None:
    """Expert budget of an actor taking over on another node.

    Everything resident needs `num_experts * slot_bytes`. The cap is the configured takeover memory,
    else `share` of the node's free memory; the planned budget caps it too. Returns None (unlimited)
    when everything fits, else the cap (the store pages the rest and refuses budgets below its minimum).
    """
    cap = configured if configured is not None else int(free * share)
    if planned is not None:
        cap = min(cap, planned)
    if cap >= num_experts * slot_bytes:
        return planned
    return int(cap)
