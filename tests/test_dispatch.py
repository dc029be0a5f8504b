"""RemoteExperts over a real local Ray with real actor processes.

One Ray instance is shared by the whole module (starting Ray takes seconds). The
start-your-own-Ray lifecycle is checked in a fresh Python process, so it does not depend on
running before that Ray (the module runs shuffled in CI).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
import ray
import torch

ray = pytest.importorskip("ray")

from cluster.dispatch import RemoteExperts  # noqa: E402
from cluster.errors import ClusterError, ExpertTimeout, ShardUnavailable  # noqa: E402
from coordinator.checkpoint import Checkpoint  # noqa: E402
from coordinator.experts import LocalExperts  # noqa: E402
from workers import wire  # noqa: E402
from workers.errors import WireError  # noqa: E402

FAMILY, VARIANT = "mixtral", "e8_top3"   # 3 MoE layers x 8 experts, top-3, hidden 32


@pytest.fixture(scope="module")
def specs(checkpoint):
    return Checkpoint.open(checkpoint(FAMILY, VARIANT)).expert_specs()


@pytest.fixture(scope="module")
def local(specs):
    le = LocalExperts(specs, dtype="float32")
    yield le
    le.close()


@pytest.fixture(scope="module")
def ray_session():
    started = not ray.is_initialized()
    if started:
        # 3 actors of the `remote` fixture stay up while the other tests start 2 more.
        ray.init(address="local", num_cpus=6, num_gpus=0, resources={"host_1": 1, "host_2": 1},
                 include_dashboard=False, logging_level="WARNING")
    yield
    if started:
        ray.shutdown()


# 1-3 workers on the direct channel (the default), and 2 on plain Ray calls
@pytest.fixture(scope="module", params=[(1, "direct"), (2, "direct"), (3, "direct"), (2, "calls")],
                ids=lambda p: f"{p[0]}workers-{p[1]}")
def remote(request, ray_session, specs):
    re = RemoteExperts.build(specs, num_workers=request.param[0], dtype="float32", call_timeout_s=60,
                       transport=request.param[1])
    re.forward(layers_of(specs)[0], torch.randn(1, 32), torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.long))
    assert re.stats()["transport"] == request.param[1]
    yield re
    re.close()


def routing(T: int, k: int, E: int, seed: int, experts: list[int] | None = None):
    """Random x [T, H], weights [T, k], distinct ids [T, k] drawn from `experts` (default all)."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.tensor(experts if experts is not None else list(range(E)))
    ids = torch.stack([pool[torch.randperm(len(pool), generator=g)[:k]] for _ in range(T)])
    weights = torch.rand(T, k, generator=g).softmax(-1)
    return ids, weights, g


def layers_of(specs) -> list[int]:
    return sorted({s.layer for s in specs})


_OWN_RAY = textwrap.dedent("""
    import sys, time
    import ray, torch
    from cluster.dispatch import RemoteExperts
    from coordinator.checkpoint import Checkpoint
    from coordinator.experts import LocalExperts

    specs = Checkpoint.open(sys.argv[1]).expert_specs()
    assert not ray.is_initialized(), "a fresh process has no Ray"
    t0 = time.perf_counter()
    re = RemoteExperts.build(specs, num_workers=2, dtype="float32")
    started = time.perf_counter() - t0
    try:
        assert ray.is_initialized(), "RemoteExperts did not start a Ray"
        g = torch.Generator().manual_seed(11)
        ids = torch.stack([torch.randperm(8, generator=g)[:3] for _ in range(5)])
        w = torch.rand(5, 3, generator=g).softmax(-1)
        x = torch.randn(5, 32, generator=g)
        diff = (re.forward(0, x, w, ids) - LocalExperts(specs, dtype="float32").submit(0, x, w, ids)).abs().max()
        assert diff <= 1e-5, f"max abs diff {diff:.3g}"
    finally:
        re.close()
    assert not ray.is_initialized(), "close() left the Ray it started running"
    print(f"OK: local Ray start + 2 actors ready in {started:.1f}s")
""")


@pytest.mark.slow
def test_starts_and_stops_its_own_ray(checkpoint):
    """Without a Ray connection, RemoteExperts starts a local Ray and shuts it down on close."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.getcwd(), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-c", _OWN_RAY, str(checkpoint(FAMILY, VARIANT))], env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0 and "OK:" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    print(proc.stdout.strip())


def test_parity_with_local_experts(remote, local, specs):
    """Random routing over every MoE layer, several batch sizes: same result as in-process."""
    worst = 0.0
    for layer in layers_of(specs):
        for T, seed in ((1, 0), (7, 1), (33, 2)):
            ids, w, g = routing(T, 3, 8, seed=seed + 10 * layer)
            x = torch.randn(T, 32, generator=g)
            ours, ref = remote.forward(layer, x, w, ids), local.wait(local.submit(layer, x, w, ids))
            assert ours.shape == ref.shape and ours.dtype == ref.dtype
            worst = max(worst, (ours - ref).abs().max().item())
    assert worst <= 1e-5, f"max abs diff {worst:.3g}"


def test_submit_wait_overlap_and_empty_batch(remote, local):
    ids, w, g = routing(6, 3, 8, seed=5)
    x = torch.randn(6, 32, generator=g)
    p0 = remote.submit(0, x, w, ids)
    p1 = remote.submit(1, x, w, ids)       # two layers in flight at once
    torch.testing.assert_close(remote.wait(p1), local.submit(1, x, w, ids), atol=1e-5, rtol=0)
    torch.testing.assert_close(remote.wait(p0), local.submit(0, x, w, ids), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="already waited"):
        remote.wait(p0)
    empty = remote.forward(0, torch.zeros(0, 32), torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.long))
    assert empty.shape == (0, 32)


def test_each_actor_holds_only_its_own_experts(remote, specs):
    # Touch every expert of every layer so each actor loads all it owns.
    for layer in layers_of(specs):
        ids = torch.arange(24).remainder(8).view(8, 3)
        remote.forward(layer, torch.randn(8, 32), torch.full((8, 3), 1 / 3), ids)
    by_key = {s.key: s for s in specs}
    reports = remote.reports()
    assert len(reports) == len(remote.plan.workers)
    for w, rep in zip(remote.plan.workers, reports):
        mine = {t.key for k in w.experts for t in (by_key[k].gate, by_key[k].up, by_key[k].down)}
        assert sorted(map(tuple, rep["owned"])) == w.experts
        assert set(rep["loaded_tensors"]) == mine, f"actor {w.index} loaded tensors it does not own"
    owned = [tuple(k) for rep in reports for k in rep["owned"]]
    assert sorted(owned) == sorted(by_key)        # a partition: every expert exactly once


def test_one_call_per_active_actor_and_none_for_idle(remote, specs):
    """Active actors get one call per layer with all their rows. Idle ones get nothing at all."""
    layer = layers_of(specs)[1]
    plan = remote.plan

    def counts():
        return [(r["calls"], r["idle_messages"]) for r in remote.reports()]

    before = counts()
    # Route only to actor 0's experts of this layer: the others must do no work for it.
    mine = plan.workers[0].experts_of_layer(layer)
    ids, w, g = routing(9, min(3, len(mine)), 8, seed=3, experts=mine)
    remote.forward(layer, torch.randn(9, 32, generator=g), w, ids)
    mid = counts()
    assert [(m[0] - b[0], m[1] - b[1]) for m, b in zip(mid, before)] == [(1, 0)] + [(0, 0)] * (len(plan.workers) - 1)
    # Route to every expert: every actor gets exactly one call for the layer.
    ids, w, g = routing(16, 3, 8, seed=4)
    ids[:3] = torch.arange(9).remainder(8).view(3, 3)   # make sure all 8 experts are active
    remote.forward(layer, torch.randn(16, 32, generator=g), w, ids)
    after = counts()
    assert [(a[0] - m[0], a[1] - m[1]) for a, m in zip(after, mid)] == [(1, 0)] * len(plan.workers)
    stats = remote.stats()
    assert stats["backend"] == "ray" and stats["calls"] == sum(a["calls"] for a in stats["actors"])
    assert all(a["calls_per_layer"].get(layer, 0) >= 1 for a in stats["actors"])
    for a in stats["actors"]:
        assert a["node_id"] and a["ip"] and a["experts"] == len(plan.workers[a["index"]].experts)
        assert a["bytes_resident"] > 0 and a["rows"] > 0 and a["compute_s"] > 0 and a["transit_s"] > 0
    lat = stats["layers"][layer]
    assert 0 < lat["latency_p50_s"] <= lat["latency_max_s"] and lat["latency_mean_s"] > 0


def test_malformed_bytes_give_clear_error_and_actor_keeps_serving(remote, local):
    failures = remote.stats()["failures"]
    for bad, match in ((b"garbage", "truncated|msgpack"), (wire.encode({"op": "nope"}), "expected op")):
        with pytest.raises(WireError, match=match) as err:
            remote.run_raw(0, bad, layer=0, rows=0, hidden=32)
        assert "actor 0" in str(err.value) and "layer 0" in str(err.value)
    # A well-formed message the shard rejects (expert it does not own) -> moeshard error with the remote text.
    foreign = 99
    msg = wire.encode({"op": "run_layer", "layer": 0, "experts": [foreign], "counts": [1]}, {"rows": torch.zeros(1, 32)})
    with pytest.raises(ClusterError, match="not owned"):
        remote.run_raw(0, msg, layer=0, rows=1, hidden=32)
    assert remote.stats()["failures"] == failures, "a refused message is the caller's fault, never retried"
    ids, w, g = routing(4, 3, 8, seed=9)
    x = torch.randn(4, 32, generator=g)
    torch.testing.assert_close(remote.forward(0, x, w, ids), local.submit(0, x, w, ids), atol=1e-5, rtol=0)


def test_bad_routing_is_refused_before_sending(remote):
    with pytest.raises(ValueError, match="does not exist"):
        remote.forward(0, torch.randn(2, 32), torch.ones(2, 1), torch.tensor([[8], [0]]))
    with pytest.raises(ValueError, match="no routed experts"):
        remote.forward(77, torch.randn(2, 32), torch.ones(2, 1), torch.tensor([[1], [0]]))
    with pytest.raises(ValueError, match="compute in"):
        remote.forward(0, torch.randn(2, 32, dtype=torch.float64), torch.ones(2, 1), torch.tensor([[1], [0]]))


def test_timeout_names_actor_and_layer(remote, specs):
    """A stopped actor: the wait ends after call_timeout_s with an error naming actor and layer (no retries
    here; retries: test_recovery.py), and the next call goes to a replacement."""
    import os
    import signal

    layer = layers_of(specs)[1]
    mine = remote.plan.workers[0].experts_of_layer(layer)
    ids, w, g = routing(4, min(3, len(mine)), 8, seed=1, experts=mine)
    x = torch.randn(4, 32, generator=g)
    want = remote.forward(layer, x, w, ids)
    os.kill(remote.nodes[0]["pid"], signal.SIGSTOP)
    saved = remote.call_timeout_s, remote.max_call_retries
    remote.call_timeout_s, remote.max_call_retries = 1.0, 0
    try:
        with pytest.raises(ExpertTimeout, match=rf"actor 0 \(node .* layer {layer}"):
            remote.forward(layer, x, w, ids)
    finally:
        remote.call_timeout_s, remote.max_call_retries = saved
    assert torch.equal(remote.forward(layer, x, w, ids), want)   # replaced, same result


def test_prefetch_is_one_way_and_skips_actors_with_everything_resident(remote):
    import os
    import signal
    import threading

    before = remote.stats()
    # One-way: with every actor stopped (it cannot answer anything), prefetch still returns.
    pids = [n["pid"] for n in remote.nodes]
    sent = threading.Thread(target=remote.prefetch, args=(1, torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 99]])))
    for p in pids:
        os.kill(p, signal.SIGSTOP)
    try:
        sent.start()                         # 99: unknown, ignored
        sent.join(timeout=30)
        assert not sent.is_alive(), "prefetch waited for a stopped actor"
    finally:
        for p in pids:
            os.kill(p, signal.SIGCONT)
    # one hint per owning actor, except those whose last reply said every expert is resident for good
    can_use = sum(not a["all_resident"] for a in before["actors"])
    assert remote.stats()["hint_calls"] - before["hint_calls"] == can_use
    ids, w, g = routing(16, 3, 8, seed=5)
    for layer in (0, 1, 2):                  # no budget: after every expert ran once, all stay resident
        remote.forward(layer, torch.randn(16, 32, generator=g), torch.ones(16, 8) / 8, torch.arange(8).expand(16, 8))
    assert all(a["all_resident"] for a in remote.stats()["actors"]) and not remote.wants_hints
    sent = remote.stats()["hint_calls"]
    remote.prefetch(1, torch.arange(8))
    assert remote.stats()["hint_calls"] == sent


def test_paged_actors_prefetch_and_match_local(ray_session, specs, local):
    """Actors with a budget of 4 experts each (of 12 owned): prefetch loads ahead, results unchanged."""
    from cluster.placement import expert_nbytes

    budget = 4 * expert_nbytes(specs[0], 4)
    with RemoteExperts.build(specs, num_workers=2, dtype="float32", worker_memory=budget, min_resident=3) as re:
        assert all(w.paged_bytes == 2 * budget for w in re.plan.workers)
        re.prefetch(2, torch.arange(8))
        reports = re.reports()                      # runs after the hints on each actor
        assert [r["prefetch_hints"] for r in reports] == [4, 4]
        for layer in (2, 0, 1, 2):
            ids, w, g = routing(12, 3, 8, seed=layer)
            x = torch.randn(12, 32, generator=g)
            # bit-identical when both sides use one thread; 1e-5 covers MOESHARD_TEST_THREADS > 1
            torch.testing.assert_close(re.forward(layer, x, w, ids), local.submit(layer, x, w, ids),
                                       atol=1e-5, rtol=0)
        for r in re.reports():
            assert r["bytes_resident"] <= budget and r["evictions"] > 0


def test_bfloat16_parity(ray_session, specs):
    le = LocalExperts(specs, dtype="bfloat16")
    try:
        with RemoteExperts.build(specs, num_workers=2, dtype="bfloat16") as re:
            ids, w, g = routing(10, 3, 8, seed=21)
            x = torch.randn(10, 32, generator=g).bfloat16()
            ours, ref = re.forward(1, x, w, ids), le.submit(1, x, w, ids)
            assert ours.dtype == torch.bfloat16
            torch.testing.assert_close(ours, ref, atol=0, rtol=0)
    finally:
        le.close()


def _wait_gone(pid: int, timeout: float = 30) -> None:
    """Wait until process `pid` has exited (an actor ray.kill'ed is gone only when its process is)."""
    try:
        psutil.Process(pid).wait(timeout=timeout)
    except psutil.NoSuchProcess:
        pass


def test_pinned_actors_dead_actor_and_close(ray_session, specs):
    # Pin actor i to the "node" advertising host_{i+1} (both on this machine here). No retries, so the
    # dead actor is an error here (replacement and retry are tested in test_recovery.py).
    re = RemoteExperts.build(specs, num_workers=2, dtype="float32", call_timeout_s=30,
                       resources=[{"host_1": 0.01}, {"host_2": 0.01}], max_call_retries=0)
    actors = re.actors
    try:
        assert [w.resources for w in re.plan.workers] == [{"host_1": 0.01}, {"host_2": 0.01}]
        pids = [n["pid"] for n in re.nodes]
        ray.kill(actors[1], no_restart=True)
        # ray.kill is asynchronous and the data plane is not Ray: Ray may call the actor dead while its
        # process still runs and answers its channel (a correct answer, not the failure tested here), so
        # wait until the process itself is gone
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actors[1].ping.remote(), timeout=30)
        _wait_gone(pids[1])
        ids = torch.arange(24).remainder(8).view(8, 3)     # touches both actors
        with pytest.raises(ShardUnavailable, match=r"actor 1 \(node .*layer 0"):
            re.forward(0, torch.randn(8, 32), torch.full((8, 3), 1 / 3), ids)
    finally:
        re.close()
    re.close()  # idempotent
    assert ray.is_initialized(), "close() must not shut down a Ray it did not start"
    _wait_gone(pids[0])     # close() kills its actors; as above, the kill lands asynchronously
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(actors[0].ping.remote(), timeout=30)
    with pytest.raises(ClusterError, match="closed"):
        re.forward(0, torch.randn(1, 32), torch.ones(1, 1), torch.tensor([[0]]))


def test_actor_that_fails_to_start_is_named_with_the_remote_reason(ray_session, specs):
    import dataclasses

    bad = [dataclasses.replace(s, activation="bogus") for s in specs]
    with pytest.raises(ShardUnavailable, match=r"expert actor 0 failed to start: ValueError: unknown activation"):
        RemoteExperts.build(bad, num_workers=1, dtype="float32")


def test_unreachable_address_fails_fast(ray_session, specs):
    # "cannot reach" is the TCP probe's error, raised before ray.init (which retries for minutes and
    # would say "cannot connect"): fast by construction, so no timed assertion
    with pytest.raises(ClusterError, match="cannot reach the Ray cluster at 127.0.0.1:1"):
        RemoteExperts.build(specs, num_workers=1, dtype="float32", ray_address="127.0.0.1:1")
    with pytest.raises(ClusterError, match="host:port"):
        RemoteExperts.build(specs, num_workers=1, dtype="float32", ray_address="no-port-here")


def test_unsatisfiable_resources_refused_up_front(ray_session, specs):
    with pytest.raises(ClusterError, match="host_9: need 0.01, cluster has 0"):
        RemoteExperts.build(specs, num_workers=2, dtype="float32", resources=[{}, {"host_9": 0.01}])
    with pytest.raises(ClusterError, match="GPU"):
        RemoteExperts.build(specs, num_workers=1, dtype="float32", num_gpus_per_worker=1)


def test_plan_that_cannot_fit_is_refused_before_ray(specs):
    with pytest.raises(ClusterError, match=r"the minimum is \d+ bytes"):
        RemoteExperts.build(specs, num_workers=2, dtype="float32", worker_memory=100, min_resident=3)


def test_coordinator_threads_leave_the_actors_their_cores(ray_session, specs):
    """Actors on this node take cores: the coordinator's torch threads shrink to what is left, then come back."""
    import os

    before = torch.get_num_threads()
    torch.set_num_threads(8)
    try:
        cores = len(os.sched_getaffinity(0))
        with RemoteExperts.build(specs, num_workers=2, dtype="float32") as re:
            assert all(n["node_id"] == ray.get_runtime_context().get_node_id() for n in re.nodes)
            assert torch.get_num_threads() == min(8, max(1, cores - 2))
        assert torch.get_num_threads() == 8
        with RemoteExperts.build(specs, num_workers=1, dtype="float32", coordinator_threads=3):
            assert torch.get_num_threads() == 3
        assert torch.get_num_threads() == 8
        with pytest.raises(ValueError, match="coordinator_threads"):
            RemoteExperts.build(specs, num_workers=1, dtype="float32", coordinator_threads=0)
    finally:
        torch.set_num_threads(before)


def test_default_is_direct_and_idle_actors_block(ray_session, specs):
    """The direct channel unless asked; after a layer, an idle actor's threads block (no spinning): its
    CPU time over 3 s idle stays far below a core (a generous bound: a spinning loop takes ~100%)."""
    import psutil

    layer = layers_of(specs)[0]
    args = (layer, torch.randn(1, 32), torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="transport"):
        RemoteExperts.build(specs, num_workers=1, dtype="float32", transport="graph")
    with RemoteExperts.build(specs, num_workers=2, dtype="float32") as re:
        re.forward(*args)
        s = re.stats()
        assert s["transport"] == "direct" and s["calls"] == 1
        assert all(n["endpoint"].startswith(f"tcp://{n['ip']}:") and n["generation"] == 0 for n in re.nodes)
        # actors on this node are reached over their IPC endpoint, not TCP
        assert s["channel_endpoints"] == {i: n["local_endpoint"] for i, n in enumerate(re.nodes)}
        assert all(e.startswith("ipc://@") for e in s["channel_endpoints"].values())
        procs = [psutil.Process(n["pid"]) for n in re.nodes]
        c0 = [sum(p.cpu_times()[:2]) for p in procs]
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3.0:      # idle on purpose: nothing to poll for
            time.sleep(0.5)
        used = [(sum(p.cpu_times()[:2]) - c) / (time.monotonic() - t0) for p, c in zip(procs, c0)]
        assert max(used) < 0.1, f"idle actors used {used} of a core"
        assert torch.equal(re.forward(*args), re.forward(*args))


def test_actor_killed_while_idle_is_replaced_with_a_new_channel(ray_session, specs):
    """An actor SIGKILLed between layers: the next layer notices (its channel's death notice), replaces
    it, opens a channel to the new incarnation (generation 1) and gives the same result."""
    import os
    import signal

    import psutil

    layer = layers_of(specs)[0]
    ids, w, g = routing(8, 3, 8, seed=11)
    x = torch.randn(8, 32, generator=g)
    ids[:3] = torch.arange(9).remainder(8).view(3, 3)   # every actor has rows
    with RemoteExperts.build(specs, num_workers=2, dtype="float32", call_timeout_s=120) as re:
        want = re.forward(layer, x, w, ids)
        victim = re.nodes[1]["pid"]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while psutil.pid_exists(victim) and psutil.Process(victim).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the killed actor did not exit"
            time.sleep(0.1)
        assert re.fleet.lost_ips() == {re.nodes[1]["ip"]}      # what the job places fresh actors away from
        assert torch.equal(re.forward(layer, x, w, ids), want)
        assert re.fleet.lost_ips() == set()
        s = re.stats()
        kinds = [e["kind"] for e in s["recovery_events"]]
        assert "died" in kinds and "timeout" not in kinds, f"noticed by the call timeout, not the death: {kinds}"
        assert s["restarts"] == 1 and s["failures"] >= 1 and s["actors"][1]["incarnation"] == 1
        assert re.nodes[1]["generation"] == 1 and re.nodes[1]["pid"] != victim
        assert torch.equal(re.forward(layer, x, w, ids), want)
