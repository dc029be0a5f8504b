"""The actor's end of the direct channel: a ZMQ socket that serves sealed `run_layer` messages.

Ray keeps the control plane (lifecycle, placement, health, recovery); the per-layer messages go
over this channel instead (cluster/transports.py is the coordinator's end). The actor binds a
ROUTER socket on its node's IP (the address Ray uses for it: never 0.0.0.0) at a free port and
reports the endpoint through Ray. Every message is sealed (`workers.wire.seal`): HMAC-SHA256 with
the backend's secret, which reaches the actor only as an actor-creation argument over Ray's
token-authenticated channel, over a header holding the actor's generation (incarnation) and a
sequence number. A message that fails a check is dropped and counted by reason, and the actor
keeps serving (docs/security.md).

`serve()` blocks in `zmq.Poller.poll` (epoll underneath): an idle actor uses no CPU. It runs as a
Ray actor method in its own concurrency group (cluster/actor.py), so the coordinator holds a ref
that fails the moment the actor dies: that, not only the channel timeout, is how a dead actor is
noticed quickly.
"""
from __future__ import annotations

import logging
import sys
import threading
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import msgpack

from workers import wire
from workers.errors import MoeshardError

log = logging.getLogger(__name__)

#: largest payload a channel accepts: far above any layer's rows at the batch sizes we run
MAX_MESSAGE_BYTES = 1 << 30
#: how often a blocked `serve()` wakes to see whether it was asked to stop (an idle wake-up costs ~10 us)
STOP_CHECK_S = 1.0


@dataclass(frozen=True)
class ChannelConfig:
    """What an actor needs to serve the direct channel; handed to it over Ray at creation."""

    secret: bytes
    generation: int
    max_bytes: int = MAX_MESSAGE_BYTES

    def as_kwargs(self) -> dict:
        return {"secret": self.secret, "generation": self.generation, "max_bytes": self.max_bytes}


def error_payload(e: BaseException) -> bytes:
    """An error reply's payload: the exception's class name, whether it is one of ours, its text."""
    return msgpack.packb({"type": type(e).__name__, "moeshard": isinstance(e, MoeshardError), "message": str(e)})


class ChannelServer:
    """Serves sealed requests on one socket with `handler(payload) -> reply bytes` (see module doc)."""

    def __init__(self, config: ChannelConfig, host: str, handler: Callable[[memoryview], bytes]):
        import zmq

        self.config = config
        self._handler = handler
        self._ctx = zmq.Context(io_threads=1)
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        port = self._sock.bind_to_random_port(f"tcp://{host}")
        self.endpoint = f"tcp://{host}:{port}"
        # Same node: also a Linux abstract-namespace IPC socket (no file to leave behind when the actor
        # is killed; local to this network namespace), which skips the TCP stack. The MAC still applies.
        self.local_endpoint: str | None = None
        if sys.platform.startswith("linux"):
            self.local_endpoint = f"ipc://@moeshard-{uuid.uuid4().hex}"
            self._sock.bind(self.local_endpoint)
        self._last_seq = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()       # counters are read by report() on the actor's main thread
        self._served = 0
        self._dropped: Counter[str] = Counter()

    def counters(self) -> dict:
        with self._lock:
            return {"served": self._served, "dropped": {r: self._dropped[r] for r in wire.AUTH_REASONS},
                    "generation": self.config.generation, "endpoint": self.endpoint,
                    "local_endpoint": self.local_endpoint}

    def stop(self) -> None:
        self._stop.set()

    def _drop(self, reason: str, why: str) -> None:
        with self._lock:
            self._dropped[reason] += 1
        log.warning("direct channel: dropped a message (%s): %s", reason, why)

    def serve(self) -> None:
        """Answer requests until `stop()`; blocks without spinning while idle."""
        import zmq

        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                if not poller.poll(STOP_CHECK_S * 1000):
                    continue
                while True:
                    try:
                        frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._one(frames)
        finally:
            self._sock.close(linger=0)
            self._ctx.term()

    def _one(self, frames: list) -> None:
        cfg = self.config
        ident, rest = frames[0], frames[1:]
        try:
            kind, generation, seq, payload = wire.unseal(cfg.secret, rest, max_bytes=cfg.max_bytes)
        except wire.AuthError as e:
            self._drop(e.reason, str(e))
            return
        if kind != b"Q":
            self._drop("malformed", f"a {kind!r} message sent to an actor")
            return
        if generation != cfg.generation:
            self._drop("stale_generation", f"for generation {generation}, this actor is {cfg.generation}")
            return
        if seq <= self._last_seq:
            self._drop("replay", f"sequence number {seq} after {self._last_seq}")
            return
        self._last_seq = seq
        try:
            reply, out_kind = self._handler(payload), b"R"
        except Exception as e:  # the shard refused the message: the caller gets the error, as over Ray
            reply, out_kind = error_payload(e), b"E"
        with self._lock:
            self._served += 1
        self._sock.send_multipart([ident, *wire.seal(cfg.secret, out_kind, generation, seq, reply)], copy=False)
