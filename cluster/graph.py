"""The compiled-graph transport: one Ray Compiled Graph that hands every actor its `run_layer` message.

Scenario 4 on one 2-core host: echoing the same message to 2 actors costs 1.2 ms as plain
calls and 0.34 ms as a compiled graph, whose channels are set up once; moeshard's whole layer
round trip costs 2.4 ms on plain calls and 1.0 ms through this graph. The graph is static:
every actor gets a message each layer (with no rows when it has none, which still carries its
prefetch hints and costs it a few tens of microseconds). Its actors wait for input in a spin
loop, a core each, which is why it is an option rather than the default (docs/design.md).

Ray tears a compiled graph down when one of its actors dies (or a channel fails); the
backend (`cluster.dispatch.RemoteExperts`) then finishes that layer with plain calls, replaces
the actor, and builds a new graph at a later layer. Compiled-graph tasks run on a background
thread of each actor; plain calls (reports, hints from dense layers) run on its main thread,
which the shard's store allows (it takes its own lock).
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

log = logging.getLogger(__name__)


class LayerGraph:
    """A compiled fan-out: `execute(msgs)` sends msgs[i] to actors[i].run_layer, returns one ref each."""

    def __init__(self, actors: Sequence[Any], submit_timeout_s: float):
        from ray.dag import InputNode, MultiOutputNode

        with InputNode() as inp:
            dag = MultiOutputNode([a.run_layer.bind(inp[i]) for i, a in enumerate(actors)])
        self._graph = dag.experimental_compile(_submit_timeout=submit_timeout_s)
        self.size = len(actors)
        self.alive = True

    def execute(self, msgs: Sequence[bytes]) -> list[Any]:
        """Start one fan-out; returns a CompiledDAGRef per actor (ray.get each, with a timeout)."""
        if len(msgs) != self.size:
            raise ValueError(f"{len(msgs)} messages for a graph of {self.size} actors")
        refs = self._graph.execute(*msgs)
        return refs if isinstance(refs, list) else [refs]

    def teardown(self) -> None:
        """Stop the graph's loops on the actors (never raises; Ray makes a second call a no-op). Kill hung
        actors first: teardown waits for every actor's loop to exit, up to Ray's `teardown_timeout`."""
        self.alive = False
        try:
            self._graph.teardown()
        except Exception as e:  # already torn down by Ray after an actor died, or Ray gone
            log.debug("compiled graph teardown: %s", e)


def is_channel_failure(e: BaseException) -> bool:
    """A failure of the graph itself (a channel closed or timed out), not of the actor's code."""
    import ray

    return isinstance(e, (ray.exceptions.RayChannelError, ray.exceptions.RayCgraphCapacityExceeded))
