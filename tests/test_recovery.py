"""Recovery from real actor failures mid-generation (no mocks): SIGKILL, ray.kill, SIGSTOP.

One local Ray (token auth on, as Ray 2.60 makes it for local clusters) and one
Coordinator with 3 expert actors serve the whole module. Faults are injected for
real at chosen points: between steps from `generate(on_token=...)`, or in the middle
of a step from a thin wrapper around the backend's `submit` (it only picks the
moment; the kill is a real signal or a real `ray.kill`). Every generation under
faults must equal the fault-free one token for token (greedy and seeded sampling),
and `forward` logits must be bit-identical.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import psutil
import pytest
import torch

ray = pytest.importorskip("ray")

from checkpoints import PAD_ID, make_prompts  # noqa: E402
from cluster import recovery  # noqa: E402
from cluster.errors import ClusterError, ExpertTimeout, ShardUnavailable  # noqa: E402
from cluster.nodes import RayNode  # noqa: E402
from coordinator import Coordinator  # noqa: E402
from coordinator.api import CoordinatorBusy  # noqa: E402
from coordinator.options import RecoveryOptions  # noqa: E402
from workers import wire  # noqa: E402
from workers.errors import WireError  # noqa: E402

pytestmark = pytest.mark.slow

FAMILY, VARIANT = "mixtral", "e8_top3"   # 3 MoE layers x 8 experts, top-3
NEW = 24                                 # tokens per generation: 1 prefill + 23 decode steps, 3 dispatches each
SAMPLING = dict(do_sample=True, temperature=0.9, top_p=0.9, seed=1234)
TIMES: dict[str, list[float]] = {}       # recovery seconds per kill, printed at the end of the module


@pytest.fixture(scope="module")
def ray_session():
    started = not ray.is_initialized()
    if started:
        assert os.environ.get("RAY_AUTH_MODE", "token").lower() == "token", "token auth must stay on in tests"
        # Forget a token cached by an earlier module (e.g. a harness cluster's, whose file is gone):
        # this local cluster uses its own (~/.ray/auth_token), as `ray.init()` does in a fresh process.
        from cluster import ray_internal

        ray_internal.reload_auth()
        # 3 actors + room for replacements while a killed or stopped actor still holds its CPU
        ray.init(address="local", num_cpus=6, num_gpus=0, include_dashboard=False, logging_level="WARNING")
    yield
    if started:
        ray.shutdown()
    if TIMES:
        print("\nrecovery seconds per fault: " + "; ".join(
            f"{k}: " + ", ".join(f"{t:.2f}" for t in v) for k, v in TIMES.items()))


@pytest.fixture(scope="module")
def prompts():
    return make_prompts((6, 3), seed=3)


@pytest.fixture(scope="module")
def coord(ray_session, checkpoint):
    # the default (direct) transport (plain Ray calls: test_five_sigkills_with_plain_calls)
    c = Coordinator.from_pretrained(checkpoint(FAMILY, VARIANT), num_workers=3, dtype="float32",
                                    call_timeout_s=20, restart_timeout_s=60)
    yield c
    c.close()


@pytest.fixture(scope="module")
def reference(coord, prompts):
    """Fault-free outputs of the same coordinator: greedy tokens, sampled tokens, logits."""
    ids, mask = prompts
    before = counters(coord)      # whichever test asks first, earlier tests may have injected faults
    greedy = coord.generate(ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=PAD_ID)
    sampled = coord.generate(ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=PAD_ID, **SAMPLING)
    logits = coord.forward(ids, attention_mask=mask)
    assert counters(coord)["failures"] == before["failures"], "the reference run itself must be fault-free"
    return {"greedy": greedy, "sampled": sampled, "logits": logits}


def pid(c: Coordinator, i: int) -> int:
    """Actor i's current process id, as the actor itself reported it."""
    return c.experts.nodes[i]["pid"]


def gone(p: int, within_s: float = 30.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(p).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.2)
    return False


def fault(c: Coordinator, i: int, how: str) -> int:
    """Inject one real fault into actor i; returns the pid it hit."""
    p = pid(c, i)
    if how == "sigkill":
        os.kill(p, signal.SIGKILL)
    elif how == "sigstop":
        os.kill(p, signal.SIGSTOP)
    elif how == "raykill":
        ray.kill(c.experts.actors[i], no_restart=True)
    else:
        raise ValueError(how)
    return p


@contextlib.contextmanager
def mid_step(c: Coordinator, schedule: dict[int, tuple[int, str]]):
    """Faults in the middle of a step, at chosen layer dispatches (0 = prefill's first MoE layer).

    how: "sigkill"/"raykill" before the dispatch is sent (its call hits a dying actor);
    "sigkill-inflight": the actor is stopped, the call sent to it, then it is SIGKILLed while
    the call is in flight; "raykill-inflight": the same with ray.kill.
    """
    experts = c.experts
    orig = experts.submit
    count = [0]
    hit: list[int] = []

    def submit(layer, x, w, ids, hints=None):
        n = count[0]
        count[0] += 1
        if n not in schedule:
            return orig(layer, x, w, ids, hints)
        i, how = schedule[n]
        if not how.endswith("-inflight"):
            hit.append(fault(c, i, how))
            return orig(layer, x, w, ids, hints)
        p = fault(c, i, "sigstop")
        try:
            return orig(layer, x, w, ids, hints)
        finally:
            if how == "sigkill-inflight":
                os.kill(p, signal.SIGKILL)
            else:
                ray.kill(experts.actors[i], no_restart=True)
            hit.append(p)

    experts.submit = submit
    try:
        yield hit
    finally:
        del experts.submit          # back to the class method


def between_steps(c: Coordinator, schedule: dict[int, tuple[int, str]], hit: list[int]):
    """on_token callback: after step s (0 = the token from prefill), fault schedule[s] = (actor, how)."""
    step = [0]

    def on_token(_tokens):
        s = step[0]
        step[0] += 1
        if s in schedule:
            i, how = schedule[s]
            hit.append(fault(c, i, how))

    return on_token


def recovered_times(c: Coordinator, since: int) -> list[float]:
    return [e["seconds"] for e in c.stats()["experts"]["recovery_events"][since:] if e["kind"] == "recovered"]


def counters(c: Coordinator) -> dict:
    """Module-wide counters now; tests assert on their own deltas, so they pass alone and in any order."""
    s = c.stats()["experts"]
    return ({k: s[k] for k in ("failures", "restarts", "retries", "recovery_s")}
            | {"events": len(s["recovery_events"]), "actor_restarts": [a["restarts"] for a in s["actors"]]})


# ---- tests ---------------------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_token_auth_is_on(ray_session):
    from cluster import ray_internal

    assert ray_internal.token_auth_enabled()


@pytest.mark.timeout(120)
def test_pure_helpers():
    # takeover budget: everything fits -> the planned budget; else the measured or configured cap
    assert recovery.takeover_budget(100, 10, None, None, 0.5, free=10_000) is None
    assert recovery.takeover_budget(100, 10, None, None, 0.5, free=1_000) == 500
    assert recovery.takeover_budget(100, 10, 800, None, 0.5, free=10_000) == 800
    assert recovery.takeover_budget(100, 10, None, 300, 0.5, free=10**9) == 300
    nodes = [RayNode(n, f"10.0.0.{i}", 1, True, {"CPU": c}) for i, (n, c) in enumerate((("a", 1), ("b", 4), ("c", 0)))]
    assert recovery.pick_node(nodes, {"CPU": 1}, {"a": {"CPU": 1}, "b": {"CPU": 0}}, {}).node_id == "a"
    assert recovery.pick_node(nodes, {"CPU": 1}, {"a": {"CPU": 1}, "b": {"CPU": 2}}, {"b": 1}).node_id == "a"
    assert recovery.pick_node(nodes, {"CPU": 2}, {}, {}).node_id == "b"
    assert recovery.pick_node(nodes, {"CPU": 8}, {}, {}) is None
    assert recovery.available_memory() > 0
    with pytest.raises(ValueError):
        RecoveryOptions(max_call_retries=-1)


@pytest.mark.timeout(300)
def test_five_sigkills_in_one_generation(coord, reference, prompts):
    """5 SIGKILLs across the 3 actors in one generation, before and during layer calls: same tokens."""
    ids, mask = prompts
    before = counters(coord)
    # dispatch n = MoE layer n % 3 of step n // 3 (step 0 = prefill)
    schedule = {4: (0, "sigkill"), 14: (1, "sigkill-inflight"), 28: (2, "sigkill"),
                41: (0, "sigkill-inflight"), 55: (1, "sigkill")}
    t0 = time.perf_counter()
    with mid_step(coord, schedule) as hit:
        out = coord.generate(ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=PAD_ID)
    took = time.perf_counter() - t0
    assert len(hit) == 5
    assert torch.equal(out, reference["greedy"]), f"tokens differ after kills:\n{out}\n{reference['greedy']}"
    after = counters(coord)
    assert after["failures"] - before["failures"] >= 5
    assert after["restarts"] - before["restarts"] == 5
    assert after["retries"] - before["retries"] >= 5
    assert after["recovery_s"] > before["recovery_s"]
    assert all(gone(p) for p in hit)
    assert len({pid(coord, i) for i in range(3)} & set(hit)) == 0
    assert all(a["alive"] for a in coord.stats()["experts"]["actors"])
    assert [n - b for n, b in zip(after["actor_restarts"], before["actor_restarts"])] == [2, 2, 1]
    # each replacement serves a channel sealed for its own generation (incarnation)
    assert coord.stats()["experts"]["transport"] == "direct"
    assert [n["generation"] for n in coord.experts.nodes] == [a["incarnation"] for a in coord.stats()["experts"]["actors"]]
    times = recovered_times(coord, before["events"])
    TIMES.setdefault("SIGKILL", []).extend(times)
    print(f"\n5 SIGKILLs: generation took {took:.1f}s; recovery per kill {', '.join(f'{t:.2f}' for t in times)}s")


@pytest.mark.timeout(300)
def test_five_sigkills_with_plain_calls(ray_session, checkpoint, reference, prompts):
    """The same faults on the plain-call transport: the same tokens."""
    ids, mask = prompts
    with Coordinator.from_pretrained(checkpoint(FAMILY, VARIANT), num_workers=3, dtype="float32", call_timeout_s=20,
                                     restart_timeout_s=60, transport="calls") as c:
        schedule = {4: (0, "sigkill"), 14: (1, "sigkill-inflight"), 28: (2, "sigkill"),
                    41: (0, "sigkill-inflight"), 55: (1, "sigkill")}
        with mid_step(c, schedule) as hit:
            out = c.generate(ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=PAD_ID)
        assert len(hit) == 5 and torch.equal(out, reference["greedy"])
        s = c.stats()["experts"]
        assert s["restarts"] == 5 and s["transport"] == "calls"


@pytest.mark.timeout(240)
def test_ray_kill_between_and_during_steps(coord, reference, prompts):
    ids, mask = prompts
    before = counters(coord)
    hit: list[int] = []
    with mid_step(coord, {3 * 9 + 1: (2, "raykill"), 3 * 15: (0, "raykill-inflight")}) as during:
        out = coord.generate(ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=PAD_ID,
                             on_token=between_steps(coord, {3: (1, "raykill")}, hit))
    assert len(hit) == 1 and len(during) == 2
    assert torch.equal(out, reference["greedy"])
    after = counters(coord)
    assert after["restarts"] - before["restarts"] == 3
    assert all(gone(p) for p in hit + during)
    TIMES.setdefault("ray.kill", []).extend(recovered_times(coord, before["events"]))


@pytest.mark.timeout(240)
def test_sigstopped_actor_times_out_and_is_replaced(coord, reference, prompts):
    """A hung (SIGSTOPped) actor is caught by the call timeout, killed and replaced; tokens unchanged."""
    ids, mask = prompts
    before = counters(coord)
    hit: list[int] = []
    saved, coord.experts.call_timeout_s = coord.experts.call_timeout_s, 3.0
    try:
        t0 = time.perf_counter()
        out = coord.generate(ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=PAD_ID,
                             on_token=between_steps(coord, {2: (1, "sigstop")}, hit))
        took = time.perf_counter() - t0
    finally:
        coord.experts.call_timeout_s = saved
    assert torch.equal(out, reference["greedy"])
    events = coord.stats()["experts"]["recovery_events"][before["events"]:]
    assert any(e["kind"] == "timeout" and e["actor"] == 1 for e in events), events
    assert counters(coord)["restarts"] - before["restarts"] >= 1
    assert took >= 3.0
    assert gone(hit[0], within_s=30), "the stopped process was not killed"
    TIMES.setdefault("SIGSTOP (after the 3 s timeout)", []).extend(recovered_times(coord, before["events"]))


@pytest.mark.timeout(240)
def test_seeded_sampling_identical_under_kills(coord, reference, prompts):
    ids, mask = prompts
    hit: list[int] = []
    with mid_step(coord, {3 * 6 + 2: (2, "sigkill-inflight")}) as during:
        out = coord.generate(ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=PAD_ID,
                             on_token=between_steps(coord, {1: (0, "sigkill"), 12: (1, "raykill")}, hit),
                             **SAMPLING)
    assert len(hit) + len(during) == 3
    assert torch.equal(out, reference["sampled"])


@pytest.mark.timeout(180)
def test_forward_logits_bit_identical_under_kill(coord, reference, prompts):
    ids, mask = prompts
    with mid_step(coord, {1: (0, "sigkill-inflight")}) as hit:
        logits = coord.forward(ids, attention_mask=mask)
    assert len(hit) == 1
    assert torch.equal(logits, reference["logits"])


@pytest.mark.timeout(300)
def test_retry_budget_exhausted_names_actor_node_layer_then_recovers(coord, reference, prompts):
    ids, mask = prompts
    experts = coord.experts
    call_retries, generation_retries = experts.max_call_retries, experts.max_generation_retries
    # per request: 2 kills, budget 1 -> the second failure gives up
    experts.max_generation_retries = 1
    hit: list[int] = []
    try:
        with pytest.raises(ShardUnavailable) as err:
            coord.generate(ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=PAD_ID,
                           on_token=between_steps(coord, {1: (0, "sigkill"), 4: (2, "sigkill")}, hit))
    finally:
        experts.max_generation_retries = generation_retries
    msg = str(err.value)
    node = experts.nodes[2]
    assert f"actor 2 (node {node['node_id'][:12]} at {node['ip']}), layer " in msg, msg
    assert "max_generation_retries=1" in msg and "gave up" in msg
    assert not experts.stats()["actors"][2]["alive"]
    # the next call works: actor 2 is replaced at its next dispatch
    out = coord.generate(ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=PAD_ID)
    assert torch.equal(out, reference["greedy"])
    assert all(a["alive"] for a in experts.stats()["actors"])

    # per call: no retries allowed -> the first failure is the error
    experts.max_call_retries = 0
    try:
        with pytest.raises(ShardUnavailable, match=r"actor 1 \(node \w+ at [\d.]+\), layer \d: gave up after 0 "
                                                   r"retries.*max_call_retries=0.*the actor is gone"):
            coord.generate(ids, attention_mask=mask, max_new_tokens=4, pad_token_id=PAD_ID,
                           on_token=between_steps(coord, {1: (1, "sigkill")}, []))
    finally:
        experts.max_call_retries = call_retries
    assert torch.equal(coord.generate(ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=PAD_ID),
                       reference["greedy"])

    # a hung actor with no retries left: ExpertTimeout; the stopped process is killed, not left behind
    hung: list[int] = []
    experts.max_call_retries, saved, experts.call_timeout_s = 0, experts.call_timeout_s, 2.0
    try:
        with pytest.raises(ExpertTimeout, match=r"actor 0 \(node \w+ at [\d.]+\), layer \d: gave up after 0 retries"
                                                r".*no reply within 2s"):
            coord.generate(ids, attention_mask=mask, max_new_tokens=4, pad_token_id=PAD_ID,
                           on_token=between_steps(coord, {1: (0, "sigstop")}, hung))
    finally:
        experts.max_call_retries, experts.call_timeout_s = call_retries, saved
    assert gone(hung[0], within_s=30)
    assert torch.equal(coord.generate(ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=PAD_ID),
                       reference["greedy"])


@pytest.mark.timeout(240)
def test_idle_dead_actor_is_replaced_at_next_dispatch(coord, reference, prompts):
    ids, mask = prompts
    victim = fault(coord, 2, "sigkill")
    assert gone(victim)
    out = coord.generate(ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=PAD_ID)
    assert torch.equal(out, reference["greedy"])


@pytest.mark.timeout(240)
def test_two_threads_get_the_single_threaded_results(coord, reference, prompts):
    ids, mask = prompts
    single = make_prompts((5,), seed=9)
    solo = coord.generate(single[0], attention_mask=single[1], max_new_tokens=NEW, pad_token_id=PAD_ID)
    results: dict[str, torch.Tensor] = {}
    errors: list[BaseException] = []

    def run(name, args, kwargs):
        try:
            results[name] = coord.generate(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=("batch", (ids,), dict(attention_mask=mask, max_new_tokens=NEW,
                                                                       pad_token_id=PAD_ID))),
               threading.Thread(target=run, args=("single", (single[0],), dict(
                   attention_mask=single[1], max_new_tokens=NEW, pad_token_id=PAD_ID))),
               threading.Thread(target=run, args=("sampled", (ids,), dict(attention_mask=mask, max_new_tokens=NEW,
                                                                         pad_token_id=PAD_ID, **SAMPLING)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads) and not errors, errors
    assert torch.equal(results["batch"], reference["greedy"])
    assert torch.equal(results["sampled"], reference["sampled"])
    assert torch.equal(results["single"], solo)


@pytest.mark.timeout(120)
def test_lock_wait_is_bounded_and_reentry_refused(coord, prompts):
    ids, mask = prompts
    # a call made from on_token (same thread, lock held) raises instead of waiting for itself forever
    with pytest.raises(RuntimeError, match="inside a running call"):
        coord.generate(ids, attention_mask=mask, max_new_tokens=2,
                       on_token=lambda _t: coord.generate(ids, max_new_tokens=1))
    # a second thread gives up after lock_timeout_s while the first is still running
    release = threading.Event()
    started = threading.Event()

    def slow(_t):
        started.set()
        release.wait(30)

    holder = threading.Thread(target=lambda: coord.generate(ids, attention_mask=mask, max_new_tokens=2,
                                                            on_token=slow))
    holder.start()
    assert started.wait(60)
    coord.lock_timeout_s = 0.3
    try:
        with pytest.raises(CoordinatorBusy, match="lock_timeout_s=0.3"):
            coord.forward(ids, attention_mask=mask)
        # it gave up while the lock was still held (waiting for it would have outlived the holder)
        assert holder.is_alive() and not release.is_set()
    finally:
        coord.lock_timeout_s = None
        release.set()
        holder.join(60)
    assert not holder.is_alive()
    coord.forward(ids, attention_mask=mask)   # usable again


@pytest.mark.timeout(180)
def test_bad_input_is_not_retried_and_the_actor_keeps_serving(coord, reference, prompts):
    """Errors raised by the shard itself are the caller's fault: no retry, no restart, same process."""
    experts = coord.experts
    before = counters(coord)
    pids = [pid(coord, i) for i in range(3)]
    owned = experts.plan.workers[0].experts_of_layer(0)
    foreign = next(e for e in range(8) if e not in owned)
    bad = [
        (b"\x00" * 3, WireError, "truncated|msgpack|header"),
        (wire.encode({"op": "run_layer", "layer": "0"}, {"rows": torch.zeros(1, 32)}), WireError, "layer must be"),
        (wire.encode({"op": "run_layer", "layer": 0, "experts": [owned[0]], "counts": [1]}, {}),
         WireError, "no 'rows'"),
        (wire.encode({"op": "run_layer", "layer": 0, "experts": [foreign], "counts": [1]},
                     {"rows": torch.zeros(1, 32)}), ClusterError, "not owned"),
        (wire.encode({"op": "run_layer", "layer": 0, "experts": [owned[0]], "counts": [1]},
                     {"rows": torch.zeros(1, 31)}), ClusterError, "hidden size 31"),
        (wire.encode({"op": "run_layer", "layer": 0, "experts": [owned[0]], "counts": [2]},
                     {"rows": torch.zeros(1, 32)}), ClusterError, "counts sum to 2"),
        (wire.encode({"op": "run_layer", "layer": 0, "experts": [owned[0]], "counts": [1]},
                     {"rows": torch.zeros(1, 32, dtype=torch.bfloat16)}), ClusterError, "computes in"),
        (wire.encode({"op": "run_layer", "layer": 0, "experts": "all", "counts": [1]},
                     {"rows": torch.zeros(1, 32)}), ClusterError, "list of ints"),
    ]
    # each goes through the dispatcher's own wait (retries and all): raised once, never retried
    for msg, exc, match in bad:
        with pytest.raises(exc, match=match):
            experts.run_raw(0, msg, layer=0, rows=1, hidden=32)
    assert counters(coord)["restarts"] == before["restarts"] and counters(coord)["failures"] == before["failures"]
    assert [pid(coord, i) for i in range(3)] == pids
    assert torch.equal(coord.forward(prompts[0], attention_mask=prompts[1]), reference["logits"])


@pytest.mark.timeout(240)
def test_stats_report_recovery_per_actor_and_in_total(coord, reference, prompts):
    """Its own faults (a SIGKILL mid-step, a SIGSTOP caught by the timeout), so it needs no earlier test."""
    ids, mask = prompts
    before = counters(coord)
    hit: list[int] = []
    saved, coord.experts.call_timeout_s = coord.experts.call_timeout_s, 3.0
    try:
        with mid_step(coord, {3 * 2 + 1: (0, "sigkill")}) as during:
            out = coord.generate(ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=PAD_ID,
                                 on_token=between_steps(coord, {5: (2, "sigstop")}, hit))
    finally:
        coord.experts.call_timeout_s = saved
    assert len(during) == 1 and len(hit) == 1 and torch.equal(out, reference["greedy"])
    s = coord.stats()["experts"]
    for k in ("failures", "restarts", "retries", "recovery_s"):
        assert s[k] == pytest.approx(sum(a[k] for a in s["actors"]))
    after = counters(coord)
    assert after["restarts"] - before["restarts"] == 2, (before, after)
    for k in ("failures", "retries"):      # a replacement that fails to start costs a failure and a retry more
        assert after[k] - before[k] >= 2, (k, before, after)
    assert after["recovery_s"] > before["recovery_s"]
    assert [n - b for n, b in zip(after["actor_restarts"], before["actor_restarts"])] == [1, 0, 1]
    assert s["retry_budget"]["max_call_retries"] == 3 and s["retry_budget"]["max_generation_retries"] == 10
    kinds = [(e["kind"], e.get("actor")) for e in s["recovery_events"][before["events"]:]]
    assert {("died", 0), ("timeout", 2), ("restart", 0), ("restart", 2), ("recovered", 0), ("recovered", 2)} <= set(
        kinds), kinds
    for a in s["actors"]:
        assert a["incarnation"] == a["restarts"] and a["alive"] and a["calls"] > 0
