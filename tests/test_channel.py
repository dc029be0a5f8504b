"""The direct channel (cluster/channel.py, cluster/transports.py) against real actors: sealing, and
forged, replayed, truncated, oversized and stale messages dropped and counted while the actor keeps
serving, with identical results. No mocks: a real Ray actor process and real ZMQ sockets.
"""
from __future__ import annotations

import time

import pytest
import torch

ray = pytest.importorskip("ray")
zmq = pytest.importorskip("zmq")

from checkpoints import PAD_ID, make_prompts  # noqa: E402
from cluster.actor import CONCURRENCY_GROUPS, ShardActor  # noqa: E402
from cluster.fleet import ActorNode  # noqa: E402
from cluster.transports import DirectTransport  # noqa: E402
from coordinator import Coordinator  # noqa: E402
from coordinator.checkpoint import Checkpoint  # noqa: E402
from workers import wire  # noqa: E402
from workers.shard import ExpertShard  # noqa: E402

FAMILY, VARIANT = "mixtral", "e8_top3"
KEY = bytes(range(32))


# ---- the framing, pure ---------------------------------------------------------------------------

def test_seal_round_trip_and_each_refusal_reason():
    msg = wire.encode({"op": "x"}, {"rows": torch.arange(6, dtype=torch.float32).view(2, 3)})
    frames = wire.seal(KEY, b"Q", 3, 9, msg)
    kind, gen, seq, payload = wire.unseal(KEY, frames, max_bytes=1 << 20)
    assert (kind, gen, seq, bytes(payload)) == (b"Q", 3, 9, msg)
    head, mac, body = frames
    cases = {
        "bad_mac": [head, mac, msg[:-1] + bytes([msg[-1] ^ 1])],         # one bit flipped
        "truncated": [head, mac, msg[:-8]],
        "oversized": [head, mac, msg + b"\0" * 8],
        "malformed": [head, mac],
    }
    for reason, bad in cases.items():
        with pytest.raises(wire.AuthError) as err:
            wire.unseal(KEY, bad, max_bytes=1 << 20)
        assert err.value.reason == reason, (reason, str(err.value))
    with pytest.raises(wire.AuthError, match="wrong key") as err:
        wire.unseal(b"k" * 32, frames, max_bytes=1 << 20)
    assert err.value.reason == "bad_mac"
    with pytest.raises(wire.AuthError) as err:
        wire.unseal(KEY, frames, max_bytes=len(msg) - 1)
    assert err.value.reason == "oversized"
    # generation and seq are authenticated: changing them in the header breaks the MAC
    forged_head = head[:8] + (4).to_bytes(8, "little") + head[16:]
    with pytest.raises(wire.AuthError) as err:
        wire.unseal(KEY, [forged_head, mac, msg], max_bytes=1 << 20)
    assert err.value.reason == "bad_mac"


# ---- a live actor ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def specs(checkpoint):
    return Checkpoint.open(checkpoint(FAMILY, VARIANT)).expert_specs()


def _poll_until(check, what: str, within_s: float = 30.0):
    deadline = time.monotonic() + within_s
    while not (value := check()):
        assert time.monotonic() < deadline, f"{what} did not happen within {within_s:g}s"
        time.sleep(0.05)
    return value


def test_forged_replayed_truncated_oversized_stale_are_dropped_and_counted(ray_session, specs):
    """A real actor serving the channel with a known secret: each attack is dropped (no reply) and
    counted by reason; the actor keeps serving and its answers stay bit-identical."""
    layer0 = [s for s in specs if s.layer == specs[0].layer]
    transport = DirectTransport(secret=KEY)
    actor = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(ShardActor).remote(
        [s.to_dict() for s in layer0], num_threads=1, **transport.actor_kwargs(0, 0))
    raw = None
    try:
        node = ActorNode.from_info(ray.get(actor.node_info.remote(), timeout=60))
        assert node.endpoint.startswith(f"tcp://{node.ip}:") and node.generation == 0
        transport.attach(0, actor, node, "actor 0")
        g = torch.Generator().manual_seed(0)
        rows = torch.randn(5, 32, generator=g)
        msg = wire.encode({"op": "run_layer", "layer": layer0[0].layer, "experts": [0, 3], "counts": [2, 3]},
                          {"rows": rows})
        want = wire.decode(ExpertShard([s.to_dict() for s in layer0], num_threads=1).run_layer(msg))[1]["out"]

        def round_trip():
            t = transport.send(0, msg, time.perf_counter())
            done = _poll_until(lambda: transport.poll([t], 1.0), "a reply")
            assert done[0][0] is t
            return wire.decode(done[0][1])[1]["out"]

        assert torch.equal(round_trip(), want)

        def dropped():
            return ray.get(actor.report.remote(), timeout=30)["channel"]["dropped"]

        raw = zmq.Context.instance().socket(zmq.DEALER)
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(node.endpoint)
        good = wire.seal(KEY, b"Q", 0, 1, msg)          # byte for byte what the transport sent first
        attacks = [
            ("bad_mac", wire.seal(b"\x01" * 32, b"Q", 0, 1000, msg)),                  # forged key
            ("replay", good),                                                          # replayed
            ("truncated", [good[0], good[1], msg[: len(msg) // 2]]),                   # cut short
            ("oversized", [good[0], good[1], msg + b"\0" * 64]),                       # padded
            ("stale_generation", wire.seal(KEY, b"Q", 7, 2000, msg)),                  # earlier incarnation
            ("malformed", [b"hello"]),
        ]
        for reason, frames in attacks:
            before = dropped()[reason]
            raw.send_multipart(frames)
            _poll_until(lambda: dropped()[reason] == before + 1, f"dropping a {reason} message")
            assert torch.equal(round_trip(), want), f"the actor stopped serving after a {reason} message"
        assert raw.poll(200) == 0, "an attack got a reply"
        counts = dropped()
        assert all(counts[r] == 1 for r, _ in attacks), counts
        assert ray.get(actor.report.remote(), timeout=30)["channel"]["served"] == 1 + len(attacks)
        assert transport.stats()["replies_dropped"] == {}
        assert transport.endpoints() == {0: node.local_endpoint}     # same node: IPC; the attacks came over TCP
    finally:
        if raw is not None:
            raw.close(linger=0)
        transport.close()
        ray.kill(actor, no_restart=True)


def test_generation_identical_while_a_stranger_attacks_the_channel(ray_session, checkpoint):
    """Coordinator on the default (direct) transport: greedy generation equals the in-process one, and
    stays identical after a stranger (no key) sends forged and truncated messages to every actor."""
    path = checkpoint(FAMILY, VARIANT)
    ids, mask = make_prompts((5, 3), seed=4)
    local = Coordinator.from_pretrained(path, dtype="float32")
    try:
        want = local.generate(ids, attention_mask=mask, max_new_tokens=8, pad_token_id=PAD_ID)
    finally:
        local.close()
    c = Coordinator.from_pretrained(path, num_workers=2, dtype="float32", call_timeout_s=60)
    try:
        assert c.stats()["experts"]["transport"] == "direct"
        assert torch.equal(c.generate(ids, attention_mask=mask, max_new_tokens=8, pad_token_id=PAD_ID), want)
        msg = wire.encode({"op": "run_layer", "layer": 0, "experts": [0], "counts": [1]}, {"rows": torch.zeros(1, 32)})
        socks = []
        for n in c.experts.nodes:
            s = zmq.Context.instance().socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(n["endpoint"])
            for seq in range(1, 4):
                s.send_multipart(wire.seal(b"guess" * 7, b"Q", n["generation"], seq, msg))
            frames = wire.seal(b"guess" * 7, b"Q", n["generation"], 99, msg)
            s.send_multipart([frames[0], frames[1], msg[:10]])
            socks.append(s)

        def counted():
            chans = [r["channel"]["dropped"] for r in c.experts.reports()]
            return all(d["bad_mac"] == 3 and d["truncated"] == 1 for d in chans)

        _poll_until(counted, "dropping the stranger's messages")
        assert torch.equal(c.generate(ids, attention_mask=mask, max_new_tokens=8, pad_token_id=PAD_ID), want)
        assert all(s.poll(100) == 0 for s in socks), "a stranger got a reply"
        assert c.stats()["experts"]["failures"] == 0
        for s in socks:
            s.close(linger=0)
    finally:
        c.close()
