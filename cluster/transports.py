"""How a layer's messages reach the actors: one small interface, two transports. None retries.

    ticket = transport.send(actor, msg)           # returns at once
    done = transport.poll(tickets, timeout_s)     # [(ticket, reply bytes | exception)], maybe []
    transport.cancel(ticket)                      # given up on (timed out): a late reply is dropped

A failure comes back in place of the reply: `ShardUnavailable` when the actor is gone (dead or its
node lost), a `RemoteFailure` (the shard's own error: `WireError`, ...) when the actor refused the
message. Timeouts are the caller's (cluster/dispatcher.py): it knows
each ticket's deadline and decides what a failure costs.

- `DirectTransport` ("direct", the default): sealed messages over ZMQ to the socket each actor
  binds (cluster/channel.py). Ray's part is the channel's setup (`attach`, when an actor starts or
  is replaced) and the death notice: the ref of the actor's `serve_channel` call fails when the
  actor dies, which `poll` checks whenever the channel has been quiet for `DEATH_CHECK_S`.
- `RayCallsTransport` ("calls"): one plain Ray actor call per message; the fallback, and the
  comparison.
"""
from __future__ import annotations

import logging
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import msgpack

from workers import errors as worker_errors
from workers import wire
from workers.errors import MoeshardError

from .channel import MAX_MESSAGE_BYTES, ChannelConfig
from .errors import ClusterError, ShardUnavailable

log = logging.getLogger(__name__)

#: a quiet channel checks the actors' death notices this often (one `ray.wait(timeout=0)`)
DEATH_CHECK_S = 0.1


@dataclass(eq=False)
class Ticket:
    """One message in flight to one actor."""

    actor: int
    t_sent: float
    generation: int
    key: Any = None          # the Ray ref (calls) or the sequence number (direct)




class Transport(Protocol):
    name: str

    def actor_kwargs(self, actor: int, generation: int) -> dict[str, Any]: ...
    def attach(self, actor: int, handle: Any, node: Any, where: str) -> None: ...
    def detach(self, actor: int) -> None: ...
    def send(self, actor: int, msg: bytes, t_sent: float) -> Ticket: ...
    def poll(self, tickets: Sequence[Ticket], timeout_s: float) -> list[tuple[Ticket, Any]]: ...
    def cancel(self, ticket: Ticket) -> None: ...
    def stats(self) -> dict[str, Any]: ...
    def close(self) -> None: ...


def root_message(e: BaseException) -> str:
    """The useful line(s) of a Ray actor error: the creation-task error when there is one."""
    msg = str(e).strip()
    return msg.splitlines()[-1] if msg else type(e).__name__


@dataclass(frozen=True)
class RemoteFailure:
    """An error the actor raised on a message (it refused it): its class name, whether it is one of
    ours, its text. `error(where)` is the coordinator-side exception."""

    type_name: str
    ours: bool
    message: str

    def error(self, where: str) -> BaseException:
        """The same moeshard class (from workers.errors) with `where` prefixed, or ClusterError
        naming a foreign type."""
        cls = getattr(worker_errors, self.type_name, None) if self.ours else None
        if isinstance(cls, type) and issubclass(cls, MoeshardError):
            try:
                return cls(f"{where}: {self.message}")
            except TypeError:       # a subclass with a different constructor
                pass
        return ClusterError(f"{where}: {self.type_name}: {self.message}")


class _Names:
    """Where each actor runs, for error messages (set by the backend at attach)."""

    def __init__(self) -> None:
        self.where: dict[int, str] = {}

    def __call__(self, actor: int) -> str:
        return self.where.get(actor, f"actor {actor}")


# ---- plain Ray calls -----------------------------------------------------------------------------

class RayCallsTransport:
    name = "calls"

    def __init__(self) -> None:
        self._handles: dict[int, Any] = {}
        self._where = _Names()

    def actor_kwargs(self, actor: int, generation: int) -> dict[str, Any]:
        return {}

    def attach(self, actor: int, handle: Any, node: Any, where: str) -> None:
        self._handles[actor] = handle
        self._where.where[actor] = where

    def detach(self, actor: int) -> None:
        self._handles.pop(actor, None)

    def send(self, actor: int, msg: bytes, t_sent: float) -> Ticket:
        return Ticket(actor, t_sent, 0, self._handles[actor].run_layer.remote(msg))

    def poll(self, tickets: Sequence[Ticket], timeout_s: float) -> list[tuple[Ticket, Any]]:
        import ray

        by_ref = {t.key: t for t in tickets}
        ready, _ = ray.wait(list(by_ref), num_returns=1, timeout=max(0.0, timeout_s))
        return [(by_ref[r], self._get(by_ref[r])) for r in ready]

    def _get(self, t: Ticket) -> Any:
        import ray

        where = self._where(t.actor)
        try:
            return ray.get(t.key, timeout=0)
        except ray.exceptions.RayActorError as e:
            return ShardUnavailable(f"{where}: the actor is gone ({root_message(e)})")
        except ray.exceptions.RayTaskError as e:
            c = e.cause
            return RemoteFailure(type(c).__name__, isinstance(c, MoeshardError), str(c))
        except ray.exceptions.RayError as e:
            return ShardUnavailable(f"{where}: {type(e).__name__}: {e}")

    def cancel(self, ticket: Ticket) -> None:
        pass                    # a late reply is just never read

    def stats(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        self._handles.clear()


# ---- the direct channel --------------------------------------------------------------------------

@dataclass
class _Link:
    sock: Any
    generation: int
    sentinel: Any                                   # ref of the actor's serve_channel call
    endpoint: str
    seq: int = 0
    waiting: dict[int, Ticket] = field(default_factory=dict)
    arrived: dict[int, Any] = field(default_factory=dict)


class DirectTransport:
    """Sealed messages over ZMQ (see module doc). One DEALER socket per actor incarnation."""

    name = "direct"

    def __init__(self, secret: bytes | None = None, max_bytes: int = MAX_MESSAGE_BYTES):
        import zmq

        self._secret = secret or secrets.token_bytes(32)     # per backend; never leaves Ray and this process
        self._max = max_bytes
        self._ctx = zmq.Context(io_threads=1)
        self._links: dict[int, _Link] = {}
        self._where = _Names()
        self.dropped: Counter[str] = Counter()

    def actor_kwargs(self, actor: int, generation: int) -> dict[str, Any]:
        return {"channel": ChannelConfig(self._secret, generation, self._max).as_kwargs()}

    def attach(self, actor: int, handle: Any, node: Any, where: str) -> None:
        import zmq

        self.detach(actor)
        endpoint, generation = node.endpoint, node.generation
        if not endpoint:
            raise ClusterError(f"{where} reported no channel endpoint (started without one?)")
        if node.local_endpoint and node.node_id == self._node_id():
            endpoint = node.local_endpoint
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        sentinel = handle.serve_channel.options(concurrency_group="channel").remote()
        self._links[actor] = _Link(sock, generation, sentinel, endpoint)
        self._where.where[actor] = where

    def _node_id(self) -> str | None:
        """This process's Ray node (an actor there is reached over IPC, others over TCP)."""
        import ray

        try:
            return ray.get_runtime_context().get_node_id()
        except Exception:  # not a Ray driver or worker: TCP for everyone
            return None

    def endpoints(self) -> dict[int, str]:
        """The endpoint each actor's channel is connected to now."""
        return {a: link.endpoint for a, link in sorted(self._links.items())}

    def detach(self, actor: int) -> None:
        link = self._links.pop(actor, None)
        if link is not None:
            link.sock.close(linger=0)

    def send(self, actor: int, msg: bytes, t_sent: float) -> Ticket:
        link = self._links[actor]
        link.seq += 1
        t = Ticket(actor, t_sent, link.generation, link.seq)
        link.waiting[link.seq] = t
        link.sock.send_multipart(wire.seal(self._secret, b"Q", link.generation, link.seq, msg), copy=False)
        return t

    def cancel(self, ticket: Ticket) -> None:
        link = self._links.get(ticket.actor)
        if link is not None and link.generation == ticket.generation:
            link.waiting.pop(ticket.key, None)
            link.arrived.pop(ticket.key, None)

    def poll(self, tickets: Sequence[Ticket], timeout_s: float) -> list[tuple[Ticket, Any]]:
        import zmq

        deadline = time.perf_counter() + max(0.0, timeout_s)
        while True:
            done = self._take(tickets)
            if done:
                return done
            links = {id(l): l for t in tickets if (l := self._links.get(t.actor)) is not None}
            left = deadline - time.perf_counter()
            if not links or left <= 0:
                return []
            poller = zmq.Poller()
            for link in links.values():
                poller.register(link.sock, zmq.POLLIN)
            ready = dict(poller.poll(1000 * min(left, DEATH_CHECK_S)))
            if not ready:
                self._check_deaths(tickets)
                continue
            for link in links.values():
                if link.sock in ready:
                    self._drain(link)

    def _drain(self, link: _Link) -> None:
        import zmq

        while True:
            try:
                frames = link.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                kind, generation, seq, payload = wire.unseal(self._secret, frames, max_bytes=self._max)
            except wire.AuthError as e:
                self.dropped[e.reason] += 1
                log.warning("direct channel: dropped a reply (%s): %s", e.reason, e)
                continue
            t = link.waiting.get(seq)
            if generation != link.generation or t is None or kind == b"Q":
                # an earlier incarnation's, one we gave up on (timed out), or a request reflected back
                self.dropped["stale_generation" if generation != link.generation else
                             "malformed" if kind == b"Q" else "late"] += 1
                continue
            if kind == b"E":
                info = msgpack.unpackb(payload)
                link.arrived[seq] = RemoteFailure(info["type"], info["moeshard"], info["message"])
            else:
                link.arrived[seq] = payload

    def _take(self, tickets: Sequence[Ticket]) -> list[tuple[Ticket, Any]]:
        out = []
        for t in tickets:
            link = self._links.get(t.actor)
            if link is None or link.generation != t.generation:
                out.append((t, ShardUnavailable(f"{self._where(t.actor)}: its channel was closed "
                                                f"(the actor was replaced)")))
            elif t.key in link.arrived:
                out.append((t, link.arrived.pop(t.key)))
                link.waiting.pop(t.key, None)
        return out

    def _check_deaths(self, tickets: Sequence[Ticket]) -> None:
        """Fail the tickets of actors whose `serve_channel` call ended: the actor died, or its loop did."""
        import ray

        links = {t.actor: self._links[t.actor] for t in tickets if t.actor in self._links}
        by_ref = {l.sentinel: a for a, l in links.items()}
        ended, _ = ray.wait(list(by_ref), num_returns=len(by_ref), timeout=0)
        for ref in ended:
            a = by_ref[ref]
            try:
                ray.get(ref, timeout=0)
                why = "its channel loop ended"
            except ray.exceptions.RayActorError as e:
                why = f"the actor is gone ({root_message(e)})"
            except ray.exceptions.RayError as e:
                why = f"its channel failed: {type(e).__name__}: {root_message(e)}"
            link = links[a]
            for seq, t in list(link.waiting.items()):
                link.arrived.setdefault(seq, ShardUnavailable(f"{self._where(a)}: {why}"))

    def stats(self) -> dict[str, Any]:
        return {"replies_dropped": dict(self.dropped), "channel_endpoints": self.endpoints()}

    def close(self) -> None:
        for a in list(self._links):
            self.detach(a)
        self._ctx.term()


TRANSPORTS: dict[str, Callable[[], Transport]] = {"direct": DirectTransport, "calls": RayCallsTransport}


def make_transport(name: str) -> Transport:
    try:
        return TRANSPORTS[name]()
    except KeyError:
        raise ValueError(f"unknown transport {name!r}; choose from {sorted(TRANSPORTS)}") from None
