"""Scenario 9: load-driven placement on a skewed-routing model (issue 17, targets 3 and 4).

The model is written by bench/make_checkpoint.py with a biased router (preset "skew16", skew 1:
a few hot experts per layer take most rows). One child per worker count runs `op_placement`:

1. calibration: greedy decode on 4 batches of prompts with the static placement, then the recorded
   load window;
2. balance: rows per actor per layer, counted by the dispatcher's trace hook on a held-out batch B,
   with the static placement and with the replica plan made from the calibration load (6 replica
   slots per actor; max/mean per layer, the worst layer reported; target <= 1.2 after);
3. decode tok/s on prompts B, static and replicas interleaved round by round (order alternating);
4. recovery: SIGKILL of one actor between two decode steps, time from the kill to the next token,
   with the static placement (the actor is replaced and reloads), with the load plan's replicas, and
   with every expert of the victim also held elsewhere (its rows fail over, nothing is reloaded first).
Every run also checks that the tokens equal the static placement's (exact routing).
"""
from __future__ import annotations

import os
import signal
import statistics
import time
from collections import defaultdict
from typing import Any

import torch

from .results import figure

SKEW = 1.0


def op_placement(path: str, workers: int, batch: int = 4, prompt_len: int = 16, new_tokens: int = 24,
                 rounds: int = 3, slots: int = 6, kills: int = 2, calibration: int = 4, call_timeout_s: float = 30.0,
                 **_: Any) -> dict:
    """Runs in a bench child (bench/child.py); see the module doc."""
    import logging

    import psutil
    import ray

    from cluster.replicas import ReplicaPlan, imbalance, static_plan
    from coordinator import Coordinator

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=workers + 2, num_gpus=0, include_dashboard=False,
                 logging_level=logging.WARNING)
    coord = Coordinator.from_pretrained(path, num_workers=workers, dtype="float32", call_timeout_s=call_timeout_s,
                                        restart_timeout_s=120)
    be = coord.experts
    rows: dict[int, list[int]] = defaultdict(lambda: [0] * workers)
    counting = [False]

    def hook(trace) -> None:
        if counting[0]:
            for t in trace.actors:
                rows[trace.layer][t.actor] += t.rows

    be.add_trace_hook(hook)
    vocab = coord.config.vocab_size

    def prompts(seed: int) -> torch.Tensor:
        return torch.randint(3, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(seed))

    def gen(ids: torch.Tensor, on_token=None) -> tuple[torch.Tensor, list[float]]:
        stamps: list[float] = []

        def tick(t):
            stamps.append(time.perf_counter())
            if on_token is not None:
                on_token(len(stamps))

        return coord.generate(ids, max_new_tokens=new_tokens, on_token=tick), stamps

    owners = be.plan.owners()
    static = static_plan(owners, workers)
    try:
        B = prompts(0)
        for seed in range(1, calibration + 1):      # the load window: prompts other than B's
            gen(prompts(seed))
        load = coord.expert_load()
        loads = load.load_map()
        plan = be.plan_replicas(loads, slots)
        ref, _ = gen(B)

        def measured(p: ReplicaPlan) -> dict:
            be.rebalance(p, timeout_s=120)
            rows.clear()
            counting[0] = True
            out, _ = gen(B)
            counting[0] = False
            per = {l: max(r) / (sum(r) / len(r)) for l, r in sorted(rows.items()) if sum(r)}
            return {"same_tokens": bool(torch.equal(out, ref)), "rows": {l: list(r) for l, r in sorted(rows.items())},
                    "max_over_mean_per_layer": per, "max_over_mean": max(per.values())}

        balance = {"static": measured(static), "replicas": measured(plan),
                   "planned_static": imbalance(static, loads), "planned_replicas": imbalance(plan, loads)}

        tok_s: dict[str, list[float]] = {"static": [], "replicas": []}
        same = True
        for r in range(rounds):
            order = ("static", "replicas") if r % 2 == 0 else ("replicas", "static")
            for mode in order:
                be.rebalance(static if mode == "static" else plan, timeout_s=120)
                gen(B[:, :4])              # warm: every replica read and the table settled
                out, stamps = gen(B)
                same &= bool(torch.equal(out, ref))
                tok_s[mode].append(batch * (len(stamps) - 1) / (stamps[-1] - stamps[0]))

        victim = workers - 1
        standby = ReplicaPlan(workers, {k: ((a, 1.0),) if a != victim else
                                        ((a, 1.0 / workers), *(((b, 1.0 / workers)) for b in range(workers) if b != a))
                                        for k, a in owners.items()})
        recovery: dict[str, list[float]] = {"static": [], "replicas": [], "standby": []}
        steady: dict[str, list[float]] = {m: [] for m in recovery}
        for k in range(kills):
            for mode in ("static", "replicas", "standby"):
                if be.fleet.broken(victim) is not None:     # the last kill's victim, failed over, not replaced yet
                    be.fleet.replace(victim, "bench: restore the victim before the next kill")
                be.rebalance({"static": static, "replicas": plan, "standby": standby}[mode], timeout_s=120)
                gen(B[:, :4])
                t_kill: list[float] = []

                def on_token(n: int) -> None:
                    if n == 4:
                        pid = be.nodes[victim]["pid"]
                        os.kill(pid, signal.SIGKILL)
                        try:
                            psutil.Process(pid).wait(timeout=30)
                        except psutil.NoSuchProcess:
                            pass
                        except psutil.TimeoutExpired:
                            raise RuntimeError(f"actor pid {pid} still alive 30 s after SIGKILL") from None
                        t_kill.append(time.perf_counter())

                out, stamps = gen(B, on_token)
                same &= bool(torch.equal(out, ref))
                recovery[mode].append(stamps[4] - t_kill[0])
                steady[mode].append(statistics.median(b - a for a, b in zip(stamps[5:], stamps[6:])))
        st = be.stats()
        return {"workers": workers, "balance": balance, "tok_s": tok_s, "same_tokens": same, "recovery_s": recovery,
                "steady_step_s": steady, "plan_replicas": [len(plan.replicas(a)) for a in range(workers)],
                "load_window": {"window": load.window, "passes": dict(load.passes)},
                "rebalance": st["rebalance"], "restarts": st["restarts"]}
    finally:
        coord.close()
        ray.shutdown()


def scenario_9(ctx) -> dict:
    """Skewed routing: balance, tok/s and recovery with and without replicas (see module doc)."""
    from . import make_checkpoint as mk

    quick = ctx.quick or ctx.tiny
    path = mk.make_checkpoint(None, "skew16", skew=SKEW)
    figures, details, notes = [], {}, []
    for nw in (2, 3):
        ctx.progress(f"s9: {nw} workers")
        ch = ctx.child(f"s9-{nw}w")
        r = ch.call("placement", path=str(path), workers=nw, rounds=2 if quick else 5, kills=1 if quick else 3,
                    new_tokens=12 if quick else 24, timeout_s=1800)
        ctx.close_children()
        details[f"{nw}w"] = r
        b = r["balance"]
        figures.append(figure(f"s9.balance.{nw}w", f"max/mean rows per actor per layer (worst layer), {nw} workers, "
                              "held-out prompts, replica plan from the calibration load",
                              b["replicas"]["max_over_mean"], "x", peer="static placement",
                              peer_value=b["static"]["max_over_mean"], target=1.2, op="<=", on="value"))
        ts, tr = statistics.median(r["tok_s"]["static"]), statistics.median(r["tok_s"]["replicas"])
        ratios = [a / s for a, s in zip(r["tok_s"]["replicas"], r["tok_s"]["static"])]
        figures.append(figure(f"s9.tok_s.{nw}w", f"decode tok/s, batch 4, {nw} workers, with replicas", tr, "tok/s",
                              peer="static placement", peer_value=ts, ratio=statistics.median(ratios)))
        rec = r["recovery_s"]
        figures.append(figure(f"s9.recovery.{nw}w", f"time from SIGKILL to the next token, {nw} workers, every "
                              "expert of the victim also held elsewhere", statistics.median(rec["standby"]), "s",
                              peer="static placement (replace and reload)", peer_value=statistics.median(rec["static"]),
                              ratio=statistics.median(rec["static"]) / max(1e-9, statistics.median(rec["standby"]))))
        figures.append(figure(f"s9.recovery_plan.{nw}w", f"same, with the load plan's replicas only ({nw} workers)",
                              statistics.median(rec["replicas"]), "s", peer="static placement",
                              peer_value=statistics.median(rec["static"])))
        if not r["same_tokens"] or not all(b[m]["same_tokens"] for m in ("static", "replicas")):
            notes.append(f"{nw} workers: tokens differed from the static placement's: a correctness failure")
    notes.append(f"model: bench/make_checkpoint.py preset skew16 with skew {SKEW:g} (biased routers); "
                 "rows counted by the dispatcher's trace hook; tok/s rounds interleaved, order alternating")
    return {"figures": figures, "details": details, "notes": notes}
