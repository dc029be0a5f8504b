"""Load-driven re-placement without Ray: the replica planner's invariants, the owner table's picks,
the expert-load window and its stats file (bad files refused by name), and `moeshard plan --from-stats`."""
from __future__ import annotations

import json
import random
from collections import Counter

import pytest
import torch

from cluster.cli import main
from cluster.errors import ClusterError
from cluster.owners import OwnerTable
from cluster.errors import ClusterError
from cluster.replicas import ReplicaPlan, check_fits, imbalance, layer_rows, plan_replicas, static_plan
from coordinator.load import FORMAT, LoadFileError, LoadStats, LoadWindow

L, E = 4, 16


def skewed(seed: int = 0, layers: int = L, experts: int = E) -> dict[tuple[int, int], float]:
    """A Zipf-like load: a few experts take most rows, the hot ones differ per layer."""
    rnd = random.Random(seed)
    out = {}
    for l in range(layers):
        ranks = list(range(experts))
        rnd.shuffle(ranks)
        for e in range(experts):
            out[(l, e)] = 1000.0 / (1 + ranks[e]) ** 1.2
    return out


def round_robin(workers: int, layers: int = L, experts: int = E) -> dict[tuple[int, int], int]:
    return {(l, e): (e + l) % workers for l in range(layers) for e in range(experts)}


@pytest.mark.parametrize("workers,slots", [(2, 4), (3, 4), (3, [1, 0, 6]), (4, 8)])
def test_planner_invariants(workers, slots):
    loads, primary = skewed(workers), round_robin(workers)
    per = [slots] * workers if isinstance(slots, int) else slots
    plan = plan_replicas(loads, primary, workers, per)
    assert set(plan.holders) == set(primary), "every expert keeps a holder"
    for key, hs in plan.holders.items():
        assert hs[0][0] == primary[key], "the primary stays first and where the static plan put it"
        assert len({a for a, _ in hs}) == len(hs), "an actor holds an expert at most once"
        assert sum(s for _, s in hs) == pytest.approx(1.0), "an expert's rows are all served"
        assert all(s >= 0 for _, s in hs)
    for a in range(workers):
        assert len(plan.replicas(a)) <= per[a], f"actor {a} holds more replicas than its slots"
    assert imbalance(plan, loads) <= imbalance(static_plan(primary, workers), loads) + 1e-12
    assert plan == plan_replicas(loads, primary, workers, per), "deterministic"


@pytest.mark.parametrize("workers", [2, 3])
def test_planner_balances_a_skewed_load(workers):
    loads, primary = skewed(7), round_robin(workers)
    before = imbalance(static_plan(primary, workers), loads)
    after = imbalance(plan_replicas(loads, primary, workers, [2 * L] * workers), loads)
    assert before > 1.3, "the workload must be skewed for this test to mean anything"
    assert after <= 1.2 < before
    rows = layer_rows(plan_replicas(loads, primary, workers, [2 * L] * workers), loads)
    for l, r in rows.items():
        assert sum(r) == pytest.approx(sum(v for (ll, _), v in loads.items() if ll == l)), "no row lost"


def test_a_plan_must_fit_each_actors_spare_budget():
    plan = ReplicaPlan(2, {(0, 0): ((0, 0.5), (1, 0.5)), (0, 1): ((1, 0.5), (0, 0.5)),
                           (0, 2): ((0, 0.5), (1, 0.5)), (0, 3): ((1, 1.0),)})
    assert [len(plan.replicas(a)) for a in range(2)] == [1, 2]
    check_fits(plan, [100, 200], lambda k: 100)
    check_fits(plan, [None, 200], lambda k: 100)
    with pytest.raises(ClusterError, match=r"gives actor 1 2 replica\(s\) of 200 B, but its worker_memory leaves 199 B"):
        check_fits(plan, [None, 199], lambda k: 100)
    with pytest.raises(ClusterError, match="gives actor 0 1 replica"):
        check_fits(plan, [0, None], lambda k: 100)
    check_fits(static_plan({k: hs[0][0] for k, hs in plan.holders.items()}, 2), [0, 0], lambda k: 100)


def test_planner_without_slots_is_the_static_plan():
    loads, primary = skewed(1), round_robin(2)
    assert plan_replicas(loads, primary, 2, [0, 0]) == static_plan(primary, 2)


@pytest.mark.parametrize("kw,match", [
    (dict(slots=[1]), "slots has 1 entries"),
    (dict(slots=[1, -1]), "non-negative integers"),
    (dict(loads={(9, 0): 1.0}), "no actor owns"),
    (dict(loads={(0, 0): float("nan")}), "finite and non-negative"),
    (dict(primary={(0, 0): 5}), "not actors 0..1"),
])
def test_planner_bad_input(kw, match):
    args = dict(loads={(0, 0): 1.0}, primary={(0, 0): 0, (0, 1): 1}, num_actors=2, slots=[1, 1])
    with pytest.raises(ClusterError, match=match):
        plan_replicas(**{**args, **kw})


def test_owner_table_serves_each_expert_whole_on_the_least_busy_holder():
    plan = ReplicaPlan(3, {(0, 0): ((0, 0.5), (1, 0.25), (2, 0.25)), (0, 1): ((1, 1.0),), (0, 2): ((0, 1.0),),
                           (1, 0): ((2, 1.0),)})
    table = OwnerTable(plan)
    served = Counter()
    rnd = random.Random(3)
    for _ in range(400):
        counts = [rnd.randint(1, 6), rnd.randint(0, 3), rnd.randint(0, 3)]
        experts = [e for e, c in zip((0, 1, 2), counts) if c]
        owners = table.pick(0, experts, [c for c in counts if c])
        assert owners[1] == 1 and owners[2] == 0, "a single holder always serves"
        served[owners[0]] += counts[0]
        served[1] += counts[1]
        served[0] += counts[2]
    assert max(served.values()) - min(served.values()) <= 6, f"rows per actor must stay even: {served}"
    assert table.pick(5, [0], [1]) is None
    assert table.pick(1, [0], [4]) == {0: 2}


def test_owner_table_without_a_dead_actor():
    plan = ReplicaPlan(2, {(0, 0): ((0, 0.6), (1, 0.4)), (0, 1): ((1, 1.0),)})
    t = OwnerTable(plan).without(1)
    assert t.holders(0, 0) == [0] and t.pick(0, [0, 1], [1, 1]) == {0: 0, 1: 1}, \
        "sole-held experts stay (to be reloaded)"
    t = OwnerTable(plan).without(0)
    assert t.pick(0, [0], [3])[0] == 1
    assert OwnerTable(plan).without_replicas_on(1).holders(0, 0) == [0]
    assert OwnerTable(plan).without_replicas_on(1).holders(0, 1) == [1], "its primaries stay"


# ---- the load window and its file -------------------------------------------------------------

MODEL = {"model_type": "mixtral", "num_layers": 2, "num_experts": 4, "top_k": 2, "hidden_size": 8}


def test_window_keeps_the_last_passes():
    w = LoadWindow(window=2)
    for counts in ([1, 0, 0, 0], [0, 2, 0, 0], [0, 0, 3, 0]):
        w.add(0, torch.tensor(counts))
    s = w.snapshot(MODEL)
    assert s.loads[0] == (0.0, 2.0, 3.0, 0.0) and s.passes == {0: 2}
    with pytest.raises(ValueError, match="positive integer"):
        LoadWindow(window=0)


def test_stats_file_round_trip(tmp_path):
    s = LoadStats(MODEL, 10, {0: 3, 1: 3}, {0: (1.0, 2.0, 0.0, 3.0), 1: (0.0, 0.0, 6.0, 0.0)})
    path = s.write(tmp_path / "load.json")
    assert LoadStats.read(path) == s
    s.check_model(MODEL, [0, 1])


@pytest.mark.parametrize("edit,match", [
    (lambda d: d.update(extra=1), r"unknown keys \['extra'\]"),
    (lambda d: d.pop("window"), r"missing keys \['window'\]"),
    (lambda d: d.update(format="other/1"), "format is 'other/1'"),
    (lambda d: d["loads"].update({"0": [1, 2]}), "list of 4 numbers"),
    (lambda d: d["loads"].update({"0": [1, -2, 0, 0]}), "non-negative"),
    (lambda d: d["loads"].update({"x": [1, 2, 0, 0]}), "layer numbers"),
])
def test_bad_stats_files(tmp_path, edit, match):
    d = LoadStats(MODEL, 10, {0: 3, 1: 3}, {0: (1.0, 2.0, 0.0, 3.0), 1: (0.0, 0.0, 6.0, 0.0)}).as_json()
    edit(d)
    (tmp_path / "f.json").write_text(json.dumps(d))
    with pytest.raises(LoadFileError, match=match):
        LoadStats.read(tmp_path / "f.json")


def test_stats_for_another_model_are_refused():
    s = LoadStats(MODEL, 10, {0: 3, 1: 3}, {0: (1.0,) * 4, 1: (1.0,) * 4})
    with pytest.raises(LoadFileError, match="another model: num_experts is 4 in the file but 8"):
        s.check_model({**MODEL, "num_experts": 8}, [0, 1])
    with pytest.raises(LoadFileError, match="MoE layers are"):
        s.check_model(MODEL, [0, 1, 2])


# ---- moeshard plan --from-stats ---------------------------------------------------------------

def stats_for(ckpt_cfg: dict, layers: int, experts: int, hot: int = 0) -> dict:
    loads = {str(l): [100.0 if e == hot else 1.0 for e in range(experts)] for l in range(layers)}
    return {"format": FORMAT, "model": ckpt_cfg, "window": 1000, "passes": {str(l): 50 for l in range(layers)},
            "loads": loads}


def test_plan_from_stats(checkpoint, tmp_path, capsys):
    from coordinator.config import load_config
    from coordinator.load import load_model_key

    path = checkpoint("mixtral", "e8_top3")
    cfg = load_config(path)
    f = tmp_path / "s.json"
    f.write_text(json.dumps(stats_for(load_model_key(cfg), cfg.num_layers, cfg.num_experts)))
    assert main(["plan", str(path), "--workers", "2", "--from-stats", str(f), "--replica-slots", "3"]) == 0
    out = capsys.readouterr().out
    assert "replica slots per actor [3, 3] (--replica-slots)" in out
    line = next(x for x in out.splitlines() if x.startswith("max/mean rows per actor per layer"))
    before, after = (float(v) for v in line.split(": ")[1].replace(" (static)", "").split(" (with")[0].split(" -> "))
    assert after < before

    other = tmp_path / "other.json"
    other.write_text(json.dumps(stats_for({**load_model_key(cfg), "num_experts": 16}, cfg.num_layers, 16)))
    assert main(["plan", str(path), "--workers", "2", "--from-stats", str(other)]) == 1
    err = capsys.readouterr()
    assert "another model: num_experts is 16 in the file but 8" in err.err and err.out == ""
    assert main(["plan", str(path), "--workers", "2", "--replica-slots", "2"]) == 1
    assert "only with --from-stats" in capsys.readouterr().err


def test_plan_from_stats_sizes_replicas_from_the_spare_budget(checkpoint, tmp_path, capsys):
    """Without --replica-slots, each actor gets the replicas the budget its own slots leave holds: 2
    where worker_memory has room for its 12 experts and 2 more, none where it pages."""
    from coordinator.checkpoint import Checkpoint
    from coordinator.config import load_config
    from coordinator.load import load_model_key
    from workers.budget import expert_nbytes

    path = checkpoint("mixtral", "e8_top3")
    cfg = load_config(path)
    nbytes = max(expert_nbytes(s, 4) for s in Checkpoint.open(path).expert_specs(None, None))
    f = tmp_path / "s.json"
    f.write_text(json.dumps(stats_for(load_model_key(cfg), cfg.num_layers, cfg.num_experts)))
    mine = len(cfg.moe_layer_ids) * cfg.num_experts // 2
    for budget, want in ((mine + 2) * nbytes, "[2, 2]"), ((cfg.top_k + 1) * nbytes, "[0, 0]"):
        assert main(["plan", str(path), "--workers", "2", "--worker-memory", str(budget), "--dtype", "float32",
                     "--from-stats", str(f)]) == 0
        out = capsys.readouterr().out
        assert f"replica slots per actor {want} (the budget each actor's own slots leave)" in out
    assert main(["plan", str(path), "--workers", "2", "--from-stats", str(f)]) == 0
    assert f"replica slots per actor [{len(cfg.moe_layer_ids)}, {len(cfg.moe_layer_ids)}] (unlimited" in \
        capsys.readouterr().out


def test_window_ring_wraps_many_times():
    w = LoadWindow(window=3)
    seen = []
    for i in range(20):
        c = torch.tensor([i % 4, (i * 7) % 5, 1, 0])
        w.add(2, c)
        seen.append(c)
    assert w.snapshot(MODEL).loads[2] == tuple(float(v) for v in torch.stack(seen[-3:]).sum(0).tolist())
    assert w.snapshot(MODEL).passes == {2: 3}


def test_load_file_from_a_real_generation_plans(checkpoint, tmp_path, capsys):
    """generate --load-stats writes what plan --from-stats reads (in process: no Ray)."""
    path = checkpoint("mixtral", "e8_top3")
    out = tmp_path / "load.json"
    assert main(["generate", str(path), "--ids", "1,30,40,50", "--max-new-tokens", "6", "--no-stats",
                 "--load-stats", str(out)]) == 0
    stats = LoadStats.read(out)
    assert set(stats.passes.values()) == {6}, "prefill and 5 decode steps, every MoE layer"
    assert all(sum(row) == 4 * 3 + 5 * 3 for row in stats.loads.values()), "rows = tokens x top-k per layer"
    capsys.readouterr()
    assert main(["plan", str(path), "--workers", "2", "--from-stats", str(out)]) == 0
    assert "max/mean rows per actor per layer" in capsys.readouterr().out
