"""Live re-placement and replicas as hot standbys, with real Ray actors and real SIGKILLs (no mocks).

One local Ray and one Coordinator with 2 expert actors serve the module. Every generation with a
re-placement applied mid-generation, a kill during a re-placement, or a kill of an actor whose
experts all have replicas must give the tokens of the same coordinator with its static placement,
and `forward` logits must be bit-identical. Each test starts from the static placement (`static`).
"""
from __future__ import annotations

import os
import signal
import time

import psutil
import pytest
import torch

ray = pytest.importorskip("ray")

from checkpoints import PAD_ID, make_prompts  # noqa: E402
from cluster.replicas import ReplicaPlan, static_plan  # noqa: E402
from coordinator import Coordinator  # noqa: E402

pytestmark = pytest.mark.slow

FAMILY, VARIANT = "mixtral", "e8_top3"   # 3 MoE layers x 8 experts, top-3
NEW = 16
WORKERS = 2
AUTO_OFF = 10**9         # the module's coordinator is built with automatic re-placement wired, but never due


@pytest.fixture(scope="module")
def coord(checkpoint):
    started = not ray.is_initialized()
    if started:
        from cluster import ray_internal

        ray_internal.reload_auth()
        ray.init(address="local", num_cpus=4, num_gpus=0, include_dashboard=False, logging_level="WARNING")
    c = Coordinator.from_pretrained(checkpoint(FAMILY, VARIANT), num_workers=WORKERS, dtype="float32",
                                    call_timeout_s=20, restart_timeout_s=60, rebalance_interval=AUTO_OFF)
    yield c
    c.close()
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def prompts():
    return make_prompts((6, 3), seed=5)


def static(c: Coordinator) -> None:
    """Back to the static placement (every replica released); a broken actor is replaced at its next use."""
    be = c.experts
    be.rebalance(static_plan(be.plan.owners(), WORKERS), timeout_s=60)
    assert be.replica_plan == static_plan(be.plan.owners(), WORKERS)


@pytest.fixture(scope="module")
def reference(coord, prompts):
    """Outputs of the static placement: greedy tokens and the logits over them."""
    static(coord)
    ids, mask = prompts
    tokens = coord.generate(ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=PAD_ID)
    full_mask = torch.cat([mask, torch.ones(mask.shape[0], NEW, dtype=mask.dtype)], dim=1)
    logits = coord.forward(tokens, attention_mask=full_mask)
    return {"tokens": tokens, "mask": full_mask, "logits": logits}


def hot_plan(c: Coordinator, slots: int = 6) -> ReplicaPlan:
    """Replicas planned from what the coordinator measured (the reference run's load)."""
    plan = c.experts.plan_replicas(c.expert_load().load_map(), slots)
    assert any(plan.replicas(a) for a in range(WORKERS)), "the plan must add replicas to test anything"
    return plan


def full_standby(c: Coordinator, actor: int) -> ReplicaPlan:
    """Every expert of `actor` also on the other actor; each serves half of their rows."""
    other = 1 - actor
    holders = {k: ((a, 1.0),) if a != actor else ((a, 0.5), (other, 0.5)) for k, a in c.experts.plan.owners().items()}
    return ReplicaPlan(WORKERS, holders)


def replica_rows(c: Coordinator) -> int:
    return sum(a.get("replica_rows", 0) for a in c.experts.stats()["actors"])


def gone(pid: int, timeout_s: float = 30) -> bool:
    """Whether process `pid` exits (or is a zombie) within `timeout_s`, polled."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def kill(c: Coordinator, i: int) -> int:
    p = c.experts.nodes[i]["pid"]
    os.kill(p, signal.SIGKILL)
    gone(p)
    return p


def generate(c, prompts, on_token=None):
    ids, mask = prompts
    return c.generate(ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=PAD_ID, on_token=on_token)


def test_automatic_replacement_mid_generation_gives_identical_tokens(coord, prompts, reference):
    """rebalance_interval: the backend plans from the coordinator's load window every N passes and
    applies the plan live; the tokens stay those of the static placement, and replicas serve rows."""
    static(coord)
    be = coord.experts
    st = be.stats()["rebalance"]
    assert st["interval"] == AUTO_OFF, "from_pretrained(rebalance_interval=...) wires the policy"
    applied, rows = st["applied"], replica_rows(coord)
    be.rebalance_every(4, lambda: coord.expert_load().load_map())   # the live window (the reference run's on)
    try:
        assert torch.equal(generate(coord, prompts), reference["tokens"])
        be.wait_rebalance(60)
        st = be.stats()["rebalance"]
        assert st["applied"] > applied and st["checks"] >= 1, st
        assert any(st["replicas"]), "the automatic plan added replicas"
        assert torch.equal(generate(coord, prompts), reference["tokens"])
        assert replica_rows(coord) > rows, "replicas served rows"
    finally:
        be.rebalance_every(AUTO_OFF, lambda: coord.expert_load().load_map())
        static(coord)


def test_replacement_mid_generation_gives_identical_tokens_and_logits(coord, prompts, reference):
    static(coord)
    plan = hot_plan(coord)
    applied = coord.experts.stats()["rebalance"]["applied"]
    served = replica_rows(coord)
    step = [0]

    def on_token(_):
        step[0] += 1
        if step[0] == 3:
            coord.experts.begin_rebalance(plan)   # loads while the next steps run; switches when loaded

    assert torch.equal(generate(coord, prompts, on_token), reference["tokens"])
    coord.experts.wait_rebalance(60)
    assert coord.experts.stats()["rebalance"]["applied"] == applied + 1
    assert coord.experts.replica_plan == plan
    logits = coord.forward(reference["tokens"], attention_mask=reference["mask"])
    assert replica_rows(coord) > served, "replicas must have served rows, else this compares nothing"
    assert torch.equal(logits, reference["logits"])
    # and back: dropping the replicas changes nothing either
    static(coord)
    assert torch.equal(generate(coord, prompts), reference["tokens"])


def test_kill_during_replacement_gives_identical_tokens(coord, prompts, reference):
    static(coord)
    plan = hot_plan(coord)
    victim = next(a for a in range(WORKERS) if plan.replicas(a))     # one that has replicas to load
    before = coord.experts.stats()
    step = [0]

    def on_token(_):
        step[0] += 1
        if step[0] == 2:
            pid = coord.experts.nodes[victim]["pid"]
            os.kill(pid, signal.SIGSTOP)         # so that the kill lands while its load is still pending
            coord.experts.begin_rebalance(plan)
            kill(coord, victim)

    assert torch.equal(generate(coord, prompts, on_token), reference["tokens"])
    coord.experts.wait_rebalance(60)
    after = coord.experts.stats()
    assert after["failures"] > before["failures"], "the kill must have hit a call"
    assert after["rebalance"]["abandoned"] == before["rebalance"]["abandoned"] + 1
    assert after["rebalance"]["last_error"].startswith(f"actor {victim} "), "the error names the actor whose load failed"
    assert coord.experts.replica_plan == static_plan(coord.experts.plan.owners(), WORKERS), "the old table stays"
    logits = coord.forward(reference["tokens"], attention_mask=reference["mask"])
    assert torch.equal(logits, reference["logits"])
    # the same plan applies once the victim's replacement is up
    coord.experts.rebalance(plan, timeout_s=60)
    assert coord.experts.replica_plan == plan
    assert torch.equal(generate(coord, prompts), reference["tokens"])


def test_replicas_serve_a_killed_actors_experts_at_once(coord, prompts, reference):
    static(coord)
    victim = 1
    coord.experts.rebalance(full_standby(coord, victim), timeout_s=60)
    before = coord.experts.stats()
    step, t_kill = [0], []

    def on_token(_):
        step[0] += 1
        if step[0] == 2:
            kill(coord, victim)
            t_kill.append(time.perf_counter())

    out = generate(coord, prompts, on_token)
    after = coord.experts.stats()
    assert torch.equal(out, reference["tokens"])
    assert after["restarts"] == before["restarts"], "no replacement needed: its replicas served everything"
    events = [e for e in after["recovery_events"] if e["kind"] == "failover"]
    assert events and events[-1]["actor"] == victim and events[-1]["reloaded"] == []
    logits = coord.forward(reference["tokens"], attention_mask=reference["mask"])
    assert torch.equal(logits, reference["logits"])
    # the static placement needs the victim's experts back: it is replaced at its next use
    static(coord)
    assert torch.equal(generate(coord, prompts), reference["tokens"])
    assert coord.experts.stats()["restarts"] == before["restarts"] + 1


def test_replicas_serve_a_hung_actors_experts_after_the_timeout(coord, prompts, reference):
    """A hung actor (SIGSTOP) whose experts all have a second holder: after `call_timeout_s` its rows go
    to that holder with no replacement started, and the hung process is killed, not left holding memory."""
    static(coord)
    be = coord.experts
    victim = 0
    be.rebalance(full_standby(coord, victim), timeout_s=60)
    before = be.stats()
    pid = be.nodes[victim]["pid"]
    step, timeout = [0], be.call_timeout_s

    def on_token(_):
        step[0] += 1
        if step[0] == 2:
            os.kill(pid, signal.SIGSTOP)

    be.call_timeout_s = 3
    try:
        out = generate(coord, prompts, on_token)
    finally:
        be.call_timeout_s = timeout
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    after = be.stats()
    assert torch.equal(out, reference["tokens"])
    assert after["restarts"] == before["restarts"], "no replacement needed: its replicas served everything"
    events = [e for e in after["recovery_events"] if e["kind"] == "failover"]
    assert events and events[-1]["actor"] == victim and events[-1]["cause"] == "timeout"
    assert events[-1]["reloaded"] == []
    assert gone(pid), "the hung actor was killed"
    static(coord)
    assert torch.equal(generate(coord, prompts), reference["tokens"])
    assert be.stats()["restarts"] == before["restarts"] + 1
