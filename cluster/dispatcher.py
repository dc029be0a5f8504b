"""The dispatcher: one layer's routed rows out to their actors and back, and the retry policy.

`submit` splits the grouped rows by owner (cluster/split.py), encodes one wire message per actor
with rows and sends it through the transport (cluster/transports.py), all in flight at once;
`wait` collects the replies, puts each actor's output at its rows of the grouped buffer and
combines with `ExpertBatch.combine`, exactly as `LocalExperts` does, so results are bit-identical.

Retry policy (the transports never retry): a message whose actor died, became unreachable or gave
no reply within `call_timeout_s` is retried. The fleet replaces the actor (cluster/fleet.py), and
the kept message is resent byte for byte: `run_layer` is a pure function of it, so a retry cannot
double-apply anything. Retries are bounded per call and per request (`RecoveryOptions`); an actor
that could not be recovered is replaced at its next call. An error raised by the shard itself (a
bad message, bad routing) is the caller's and is never retried.

Each `wait` ends by calling the trace hooks with a `LayerTrace`: per actor its compute, stall and
transit time. The backend's `stats()` and the benchmark both read these; nothing patches us.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from coordinator.experts import ExpertBatch
from coordinator.options import RecoveryOptions
from workers import wire
from workers.errors import MoeshardError

from .errors import ClusterError, ExpertTimeout, ShardUnavailable
from .fleet import Fleet
from .owners import OwnerTable
from .split import split_by_owner
from .transports import RemoteFailure, Ticket, Transport


@dataclass(frozen=True)
class ActorTrace:
    """One actor's part of one layer dispatch: rows, its compute (of which stall: waiting for experts
    off disk), transit = round trip minus compute, and how many retries the message needed."""

    actor: int
    rows: int
    compute_s: float
    stall_s: float
    transit_s: float
    round_trip_s: float
    retries: int


@dataclass(frozen=True)
class LayerTrace:
    layer: int
    seconds: float                     # submit to combined result
    actors: tuple[ActorTrace, ...]


@dataclass
class _Call:
    """One message in flight to one actor; `msg` is kept so a retry resends the same bytes."""

    actor: int
    ticket: Ticket
    idx: torch.Tensor                  # positions of this actor's rows in the grouped buffer
    msg: bytes
    incarnation: int
    attempt: int = 0
    t_failed: float | None = None
    failed_nodes: list[str] = field(default_factory=list)
    experts: list[int] = field(default_factory=list)   # what `msg` asks for (empty for a raw message)
    counts: list[int] = field(default_factory=list)


@dataclass
class Pending:
    """A layer's routed work in flight; pass to `wait`."""

    layer: int
    batch: ExpertBatch
    x: torch.Tensor
    calls: list[_Call]
    t0: float
    done: bool = False
    raw: bool = False                  # from `send_raw`: wait returns the rows as they came, uncombined


class Dispatcher:
    """See module doc. `table` (cluster/owners.py) says which actor serves each expert; it is replaced
    whole between dispatches (a re-placement, a failover), never edited."""

    def __init__(self, fleet: Fleet, transport: Transport, table: OwnerTable, dtype: torch.dtype,
                 call_timeout_s: float, recovery: RecoveryOptions):
        self.fleet = fleet
        self.transport = transport
        self.table = table
        self.dtype = dtype
        self.call_timeout_s = call_timeout_s
        self.recovery = recovery
        self.request_retries = 0
        self.all_resident = [False] * len(fleet.plan.workers)   # per actor, from its last reply
        # Cache-aware routing asks each reply for the actor's resident experts ({layer: {experts}} per
        # actor, from its last reply); off, the messages are exactly what they were without it.
        self.report_residency = False
        self.resident: list[dict[int, frozenset[int]]] = [{} for _ in fleet.plan.workers]
        self.hooks: list[Callable[[LayerTrace], None]] = []

    def begin_request(self) -> None:
        self.request_retries = 0

    # -- out ---------------------------------------------------------------------------------------
    def submit(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
               hints: dict[int, list[tuple[int, list[int]]]]) -> Pending:
        """One message per actor with rows, carrying its share of `hints` ({actor: [(layer, experts)]})."""
        if x.dtype != self.dtype:
            raise ValueError(f"x is {x.dtype} but the experts compute in {self.dtype}")
        t0 = time.perf_counter()
        batch = ExpertBatch.from_routing(weights, ids)
        table = self.table
        owners = table.pick(layer, batch.experts, batch.counts)
        if owners is None:
            raise ValueError(f"layer {layer} has no routed experts (MoE layers: {table.layers()})")
        shares = split_by_owner(batch, owners, layer)
        for a in shares:
            self.ensure_live(a, layer)
        calls = [self._send_share(a, layer, x, batch, share.experts, share.counts, share.idx, hints.get(a))
                 for a, share in shares.items()]
        return Pending(layer, batch, x, calls, t0)

    def _send_share(self, a: int, layer: int, x: torch.Tensor, batch: ExpertBatch, experts: list[int],
                    counts: list[int], idx: torch.Tensor, hints: Any = None) -> _Call:
        header: dict[str, Any] = {"op": "run_layer", "layer": layer, "experts": experts, "counts": counts}
        if hints:
            header["hints"] = hints
        if self.report_residency and not self.all_resident[a]:
            header["residency"] = True            # cache-aware routing: the reply lists what a holds
        rows = x.index_select(0, batch.token_idx[idx])          # one gather per actor
        call = self._send(a, idx, wire.encode(header, {"rows": rows}))
        call.experts, call.counts = list(experts), list(counts)
        return call

    def _send(self, a: int, idx: torch.Tensor, msg: bytes, like: _Call | None = None) -> _Call:
        ticket = self.transport.send(a, msg, time.perf_counter())
        call = _Call(a, ticket, idx, msg, self.fleet.records[a].incarnation)
        if like is not None:
            call.attempt, call.t_failed, call.failed_nodes = like.attempt, like.t_failed, like.failed_nodes
            call.experts, call.counts = like.experts, like.counts
        return call

    def send_raw(self, actor: int, msg: bytes, layer: int, rows: int, hidden: int) -> Pending:
        """A caller-made message to one actor, collected by `wait` like any other, retries included
        (diagnostics and tests: what the actor does with bytes we did not make)."""
        self.ensure_live(actor, layer)
        batch = ExpertBatch.from_routing(torch.ones(rows, 1), torch.zeros(rows, 1, dtype=torch.long))
        return Pending(layer, batch, torch.zeros(rows, hidden, dtype=self.dtype),
                       [self._send(actor, torch.arange(rows), msg)], time.perf_counter(), raw=True)

    # -- back --------------------------------------------------------------------------------------
    def wait(self, pending: Pending) -> torch.Tensor:
        """Collect the replies and combine: [T, H]. Each message has `call_timeout_s` from its sending;
        a failed one is retried on a replacement (`_retry`). A shard error is raised once the layer's
        other replies are in."""
        if pending.done:
            raise ValueError("this pending layer was already waited on")
        pending.done = True
        layer, batch = pending.layer, pending.batch
        y = torch.empty(len(batch.token_idx), pending.x.shape[1], dtype=self.dtype, device=pending.x.device)
        live = {id(c.ticket): c for c in pending.calls}
        traces: list[ActorTrace] = []
        error: BaseException | None = None
        while live:
            soonest = min(c.ticket.t_sent for c in live.values()) + self.call_timeout_s
            done = self.transport.poll([c.ticket for c in live.values()], soonest - time.perf_counter())
            if not done:
                now = time.perf_counter()
                for key, call in list(live.items()):
                    if call.ticket.t_sent + self.call_timeout_s <= now:
                        del live[key]
                        self.transport.cancel(call.ticket)
                        err = ExpertTimeout(f"no reply within {self.call_timeout_s:g}s from "
                                            f"{self.fleet.where(call.actor)} for layer {layer}")
                        for new in self._failover(call, pending, err, "timeout"):
                            live[id(new.ticket)] = new
                continue
            arrived = time.perf_counter()
            for ticket, outcome in done:
                call = live.pop(id(ticket))
                if isinstance(outcome, ShardUnavailable):
                    for new in self._failover(call, pending, outcome):
                        live[id(new.ticket)] = new
                elif isinstance(outcome, RemoteFailure):
                    error = error or outcome.error(f"{self.fleet.where(call.actor)}, layer {layer}")
                else:
                    try:
                        traces.append(self._accept(call, layer, outcome, y, arrived))
                    except MoeshardError as e:
                        error = error or e
        if error is not None:
            raise error
        result = y if pending.raw else batch.combine(y)
        trace = LayerTrace(layer, time.perf_counter() - pending.t0, tuple(traces))
        for hook in self.hooks:
            hook(trace)
        return result

    def _accept(self, call: _Call, layer: int, reply: Any, y: torch.Tensor, arrived: float) -> ActorTrace:
        """Decode one reply, put its rows in place, and say what it cost."""
        where = f"{self.fleet.where(call.actor)}, layer {layer}"
        try:
            header, tensors = wire.decode(reply)
        except MoeshardError as e:
            raise type(e)(f"{where}: reply: {e}") from None
        out = tensors.get("out")
        if out is None or tuple(out.shape) != (len(call.idx), y.shape[1]):
            raise ClusterError(f"{where}: reply has tensor 'out' of shape "
                               f"{None if out is None else tuple(out.shape)}, expected ({len(call.idx)}, {y.shape[1]})")
        self.all_resident[call.actor] = bool(header.get("all_resident", False))
        if "resident" in header:
            self.resident[call.actor] = {int(l): frozenset(map(int, es)) for l, es in header["resident"]}
        y.index_copy_(0, call.idx, out.to(y.device))
        compute = float(header.get("compute_s", 0.0))
        trip = arrived - call.ticket.t_sent
        if call.t_failed is not None:
            took = time.perf_counter() - call.t_failed
            self.fleet.records[call.actor].recovery_s += took
            self.fleet.log.add(kind="recovered", actor=call.actor, layer=layer, seconds=took, retries=call.attempt)
        return ActorTrace(call.actor, len(call.idx), compute, float(header.get("stall_s", 0.0)),
                          max(0.0, trip - compute), trip, call.attempt)

    # -- retries -----------------------------------------------------------------------------------
    def ensure_live(self, a: int, layer: int) -> None:
        """Replace actor a now if an earlier failure left it marked broken (lazy, at its next call)."""
        rec = self.fleet.records[a]
        if rec.broken is None:
            return
        t0 = time.perf_counter()
        try:
            self.fleet.replace(a, f"marked broken: {rec.broken}")
        except ShardUnavailable as e:
            raise ShardUnavailable(f"{self.fleet.where(a)}, layer {layer}: the actor is down ({rec.broken}) and "
                                   f"could not be replaced: {e}") from None
        rec.recovery_s += time.perf_counter() - t0

    def _failover(self, call: _Call, pending: Pending, error: ShardUnavailable, kind: str = "died") -> list[_Call]:
        """A call whose actor died or hung (`kind` "died" or "timeout"): the rows of experts another
        live actor also holds (a replica, or the primary of a replica it held) go to that holder at
        once, with no replacement to wait for; only the rest are retried on a replacement (`_retry`).
        Without replicas this is `_retry`."""
        a, layer = call.actor, pending.layer
        if pending.raw or not self.table.replicated:
            return [self._retry(call, layer, error, kind)]
        table = self.table.without(a)
        starts, s = [], 0
        for c in call.counts:
            starts.append(s)
            s += c
        moved, kept = [], []
        for e, s, c in zip(call.experts, starts, call.counts):
            live = [h for h in table.holders(layer, e) if h != a and self.fleet.broken(h) is None]
            (moved if live else kept).append((e, s, c))
        if not moved:
            return [self._retry(call, layer, error, kind)]
        t_failed = time.perf_counter()
        self.table = table      # later dispatches too: the dead actor serves only what nobody else holds
        self.fleet.records[a].failures += 1
        node = self.fleet.node(a)
        self.fleet.log.add(kind="failover", cause=kind, actor=a, layer=layer, node=node and node.node_id,
                           experts=[e for e, _, _ in moved], reloaded=[e for e, _, _ in kept], error=str(error)[:300])
        picked = table.pick(layer, [e for e, _, _ in moved], [c for _, _, c in moved])
        per: dict[int, list[tuple[int, int, int]]] = {}
        for e, s, c in moved:
            h = picked[e] if picked is not None else a
            if h == a or self.fleet.broken(h) is not None:
                h = next(x for x in table.holders(layer, e) if x != a and self.fleet.broken(x) is None)
            per.setdefault(h, []).append((e, s, c))
        out = []
        for h, segs in sorted(per.items()):
            idx = torch.cat([call.idx[s:s + c] for _, s, c in segs])
            new = self._send_share(h, layer, pending.x, pending.batch, [e for e, _, _ in segs],
                                   [c for _, _, c in segs], idx)
            new.t_failed = t_failed
            out.append(new)
        if kept:
            idx = torch.cat([call.idx[s:s + c] for _, s, c in kept])
            rest = self._send_share_later(a, layer, pending, kept, idx, call)
            out.append(self._retry(rest, layer, error, kind))
        else:
            self.fleet.mark_broken(a, f"{'hung' if kind == 'timeout' else 'died'} in layer {layer} (its replicated "
                                      "experts failed over)")
            if kind == "timeout":           # do not leave a hung actor holding its resources; replaced at next use
                self.fleet.kill_quietly(a)
        return out

    def _send_share_later(self, a: int, layer: int, pending: Pending, segs: list[tuple[int, int, int]],
                          idx: torch.Tensor, like: _Call) -> _Call:
        """The part of a failed call that only its dead actor holds, as a call `_retry` resends."""
        experts, counts = [e for e, _, _ in segs], [c for _, _, c in segs]
        rows = pending.x.index_select(0, pending.batch.token_idx[idx])
        msg = wire.encode({"op": "run_layer", "layer": layer, "experts": experts, "counts": counts}, {"rows": rows})
        return _Call(a, like.ticket, idx, msg, like.incarnation, like.attempt, like.t_failed,
                     list(like.failed_nodes), experts, counts)

    def _retry(self, call: _Call, layer: int, error: ShardUnavailable, kind: str) -> _Call:
        """Replace the call's actor if nobody did since the call was sent, then resend the same bytes.
        Raises the failure (naming actor, node and layer) once a retry budget is spent."""
        a, rec, pol, fleet = call.actor, self.fleet.records[call.actor], self.recovery, self.fleet
        call.t_failed = call.t_failed or time.perf_counter()
        rec.failures += 1
        node = fleet.node(a)
        fleet.log.add(kind=kind, actor=a, layer=layer, node=node and node.node_id, ip=node and node.ip,
                      attempt=call.attempt, error=str(error)[:300])
        while True:
            if node and node.node_id not in call.failed_nodes:
                call.failed_nodes.append(node.node_id)
            spent = ("call" if call.attempt >= pol.max_call_retries else
                     "generation" if self.request_retries >= pol.max_generation_retries else None)
            if spent is not None:
                fleet.mark_broken(a, f"{kind} in layer {layer}")
                if kind == "timeout":       # do not leave a hung actor holding its resources
                    fleet.kill_quietly(a)
                limit = pol.max_call_retries if spent == "call" else pol.max_generation_retries
                cls = ExpertTimeout if isinstance(error, ExpertTimeout) else ShardUnavailable
                raise cls(f"{fleet.where(a)}, layer {layer}: gave up after {call.attempt} "
                          f"retr{'y' if call.attempt == 1 else 'ies'} of this call "
                          f"({self.request_retries} in this request; budget max_{spent}_retries={limit}); "
                          f"last error: {error}") from error
            call.attempt += 1
            self.request_retries += 1
            rec.retries += 1
            try:
                if rec.incarnation == call.incarnation or rec.broken is not None:
                    # never a dead/unreachable node; after a first retry also not the nodes this
                    # call already failed on, unless nothing else can host the actor
                    suspect = set(call.failed_nodes) if call.attempt > 1 else set()
                    fleet.replace(a, f"{kind} in layer {layer}", suspect)
                return self._send(a, call.idx, call.msg, like=call)
            except ShardUnavailable as e:       # the replacement itself failed: that costs a retry too
                error = e
                node = fleet.node(a)

