"""Where a layer's round trip goes: the direct channel taken apart, stage by stage, in one run.

    python -m bench.dispatch_floor                 # tiny checkpoint, 2 peers, 2000 round trips per stage

Each stage adds one part of the real path to the one before, all with 2 peer processes on this
machine, the coordinator sending one message to each and waiting for both (as a layer does):

1. `zmq`: a plain pyzmq DEALER/ROUTER echo over IPC (the floor of any ZMQ-based channel);
2. `sealed`: the same through `ChannelServer` with an echo handler, the client sealing and
   unsealing (HMAC, sequence and generation checks, the server's poll loop);
3. `shard`: `ChannelServer` in front of a real `ExpertShard` on the tiny checkpoint (wire decode,
   store lookup, one trivial expert, wire encode);
4. `ray_actor`: moeshard's `RemoteExperts` on the direct transport, i.e. the same shard inside a
   Ray actor, with the dispatcher, split and combine on the coordinator (scenario 4's figure).

Stages are interleaved in blocks (1 2 3 4 1 2 3 4 ...) so that load on a shared machine hits
them alike. Prints p50/p99 per stage and the step from the previous stage; docs/performance.md
says what the figures mean.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import secrets
import time
from typing import Any, Callable

import torch

from workers import wire

from . import make_checkpoint as mk
from .common import percentile


def _serve(kind: str, path: str, layer: int, secret: bytes, ready: Any, stop: Any) -> None:
    """A peer process: a plain zmq echo, or a ChannelServer (echo or shard handler)."""
    import threading

    import zmq

    torch.set_num_threads(1)
    if kind == "zmq":
        ctx = zmq.Context(io_threads=1)
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        ep = f"ipc://@moeshard-floor-{secrets.token_hex(6)}"
        sock.bind(ep)
        ready.put(ep)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        while not stop.is_set():
            if poller.poll(200):
                sock.send_multipart(sock.recv_multipart(copy=False), copy=False)
        return
    from cluster.channel import ChannelConfig, ChannelServer
    from coordinator.checkpoint import Checkpoint
    from workers.shard import ExpertShard

    if kind == "sealed":
        handler: Callable[[memoryview], bytes] = bytes
    else:
        specs = [s.to_dict() for s in Checkpoint.open(path).expert_specs() if s.layer == layer]
        handler = ExpertShard(specs, None, dtype="float32", num_threads=1).run_layer
    server = ChannelServer(ChannelConfig(secret, 1), "127.0.0.1", handler)
    ready.put(server.local_endpoint)
    t = threading.Thread(target=server.serve, daemon=True)
    t.start()
    stop.wait()
    server.stop()
    t.join(5)


class _Client:
    """Sends one message to each peer and waits for both replies (sealed or not)."""

    def __init__(self, endpoints: list[str], secret: bytes | None):
        import zmq

        self.ctx = zmq.Context(io_threads=1)
        self.socks = []
        for ep in endpoints:
            s = self.ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(ep)
            self.socks.append(s)
        self.secret, self.seq = secret, 0
        self.poller = zmq.Poller()
        for s in self.socks:
            self.poller.register(s, zmq.POLLIN)

    def round_trip(self, msg: bytes) -> None:
        self.seq += 1
        for s in self.socks:
            s.send_multipart([msg] if self.secret is None else wire.seal(self.secret, b"Q", 1, self.seq, msg),
                             copy=False)
        left = set(range(len(self.socks)))
        while left:
            ready = dict(self.poller.poll(10_000))
            if not ready:
                raise TimeoutError("a peer did not answer within 10 s")
            for i in list(left):
                if self.socks[i] in ready:
                    frames = self.socks[i].recv_multipart(copy=False)
                    if self.secret is not None:
                        wire.unseal(self.secret, frames, max_bytes=1 << 30)
                    left.discard(i)

    def close(self) -> None:
        for s in self.socks:
            s.close(linger=0)
        self.ctx.term()


def measure(iters: int = 2000, blocks: int = 8, warmup: int = 100) -> dict[str, dict[str, float]]:
    """p50/p99 seconds per stage (see module doc)."""
    import ray

    from cluster.dispatch import RemoteExperts
    from coordinator.checkpoint import Checkpoint

    tiny = mk.make_checkpoint(None, "tiny")
    specs = Checkpoint.open(tiny).expert_specs()
    layer, hidden = specs[0].layer, specs[0].gate.shape[1]
    x = torch.randn(1, hidden)
    secret = secrets.token_bytes(32)
    msg = wire.encode({"op": "run_layer", "layer": layer, "experts": [0], "counts": [1]}, {"rows": x})
    spawn = mp.get_context("spawn")
    stop = spawn.Event()
    procs, clients = [], {}
    try:
        for kind in ("zmq", "sealed", "shard"):
            ready = spawn.Queue()
            for _ in range(2):
                p = spawn.Process(target=_serve, args=(kind, str(tiny), layer, secret, ready, stop), daemon=True)
                p.start()
                procs.append(p)
            eps = [ready.get(timeout=120) for _ in range(2)]
            clients[kind] = _Client(eps, None if kind == "zmq" else secret)
        if not ray.is_initialized():
            ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
        direct = RemoteExperts.build(specs, num_workers=2, dtype="float32", transport="direct")
        owners = direct.plan.owners()
        two = [next(e for (l, e), a in sorted(owners.items()) if l == layer and a == i) for i in (0, 1)]
        w, ids = torch.tensor([[0.6, 0.4]]), torch.tensor([two])
        stages: dict[str, Callable[[], Any]] = {
            **{k: (lambda c=c: c.round_trip(msg)) for k, c in clients.items()},
            "ray_actor": lambda: direct.wait(direct.submit(layer, x, w, ids)),
        }
        times: dict[str, list[float]] = {k: [] for k in stages}
        for _ in range(blocks):
            for name, fn in stages.items():
                for _ in range(max(1, warmup // blocks)):
                    fn()
                for _ in range(max(1, iters // blocks)):
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
        direct.close()
    finally:
        stop.set()
        for c in clients.values():
            c.close()
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    return {k: {"p50": percentile(v, 50), "p99": percentile(v, 99), "n": len(v)} for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.dispatch_floor", description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=2000, help="round trips per stage")
    args = ap.parse_args(argv)
    if args.iters < 8:
        ap.error(f"--iters must be at least 8, got {args.iters}")
    res = measure(args.iters)
    prev = None
    print(f"{'stage':<10} {'p50':>9} {'p99':>9} {'p50 step':>9}")
    for name, r in res.items():
        step = "" if prev is None else f"{(r['p50'] - prev) * 1e6:+.0f} us"
        print(f"{name:<10} {r['p50'] * 1e6:>7.0f}us {r['p99'] * 1e6:>7.0f}us {step:>9}")
        prev = r["p50"]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
