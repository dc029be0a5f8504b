"""Unit tests for the pure placement planner (no Ray, no files)."""
from __future__ import annotations

import re

import pytest

from cluster.errors import ClusterError
from cluster.placement import Plan, expert_nbytes, plan_placement
from workers.errors import BudgetError
from workers.spec import ExpertSpec, TensorSpec


def _spec(layer: int, expert: int, hidden: int = 8, inter: int = 16) -> ExpertSpec:
    def t(name: str, shape: tuple[int, ...]) -> TensorSpec:
        return TensorSpec("/nowhere.safetensors", f"l{layer}.e{expert}.{name}", "F32", shape, 0, 4 * shape[0] * shape[1])
    return ExpertSpec(layer, expert, t("gate", (inter, hidden)), t("up", (inter, hidden)), t("down", (hidden, inter)))


def _specs(layers: int, experts: int, **kw) -> list[ExpertSpec]:
    return [_spec(l, e, **kw) for l in range(layers) for e in range(experts)]


def _check_partition(plan: Plan, specs: list[ExpertSpec]) -> None:
    seen = [k for w in plan.workers for k in w.experts]
    assert sorted(seen) == sorted(s.key for s in specs)
    assert len(seen) == len(set(seen))
    for w in plan.workers:
        assert w.experts == sorted(w.experts)
        assert w.resident_bytes + w.paged_bytes == w.expert_bytes


@pytest.mark.parametrize("workers", [1, 2, 3, 4, 5])
def test_every_layer_spreads_over_all_actors_and_bytes_balance(workers):
    specs = _specs(4, 8)
    plan = plan_placement(specs, workers, dtype_bytes=4, worker_memory=None, min_resident=1)
    _check_partition(plan, specs)
    per = expert_nbytes(specs[0], 4)
    for layer in range(4):
        counts = [len(w.experts_of_layer(layer)) for w in plan.workers]
        assert max(counts) - min(counts) <= 1, counts
        assert min(counts) >= 1
    sizes = [w.expert_bytes for w in plan.workers]
    assert max(sizes) - min(sizes) <= per  # within one expert overall (extra experts rotate)
    assert all(w.paged_bytes == 0 for w in plan.workers)


def test_uneven_layer_rotates_extra_expert():
    # 3 experts per layer on 2 actors: the extra expert must not always land on actor 0.
    specs = _specs(4, 3)
    plan = plan_placement(specs, 2, dtype_bytes=4, worker_memory=None, min_resident=1)
    assert [len(w.experts) for w in plan.workers] == [6, 6]


def test_mixed_sizes_balance_bytes():
    specs = [_spec(0, e, inter=16 * (e + 1)) for e in range(6)] + [_spec(1, e, inter=16) for e in range(6)]
    plan = plan_placement(specs, 3, dtype_bytes=2, worker_memory=None, min_resident=1)
    _check_partition(plan, specs)
    sizes = [w.expert_bytes for w in plan.workers]
    assert max(sizes) - min(sizes) <= max(expert_nbytes(s, 2) for s in specs)


def test_load_balances_expected_load_per_layer():
    specs = _specs(1, 8)
    load = {(0, 0): 100.0, (0, 1): 90.0, (0, 2): 1.0, (0, 3): 1.0, (0, 4): 1.0, (0, 5): 1.0}
    plan = plan_placement(specs, 2, dtype_bytes=4, worker_memory=None, min_resident=1, load=load)
    _check_partition(plan, specs)
    owners = plan.owners()
    assert owners[(0, 0)] != owners[(0, 1)]       # the two hot experts are split
    assert sorted(w.load for w in plan.workers) == [93.0, 101.0]  # best possible under the 4-per-actor cap
    assert [len(w.experts) for w in plan.workers] == [4, 4]


def test_memory_split_resident_and_paged():
    specs = _specs(2, 4)
    per = expert_nbytes(specs[0], 4)
    plan = plan_placement(specs, 2, dtype_bytes=4, worker_memory=3 * per, min_resident=2)
    for w in plan.workers:
        assert w.expert_bytes == 4 * per
        assert w.resident_bytes == 3 * per
        assert w.paged_bytes == per
    assert plan.worker_memory == 3 * per
    assert any("paged" in line for line in plan.table())


def test_refuses_plan_that_cannot_fit_and_states_minimum():
    specs = _specs(2, 4)
    per = expert_nbytes(specs[0], 4)
    with pytest.raises(ClusterError) as err:
        plan_placement(specs, 2, dtype_bytes=4, worker_memory=2 * per - 1, min_resident=2)
    assert f"the minimum is {2 * per} bytes" in str(err.value)
    assert isinstance(err.value, BudgetError)  # same family as the in-process store's refusal
    plan_placement(specs, 2, dtype_bytes=4, worker_memory=2 * per, min_resident=2)  # exactly enough


def test_resources_and_actor_shape_pass_through():
    specs = _specs(1, 4)
    res = [{"host_1": 0.01}, {"host_2": 0.01}]
    plan = plan_placement(specs, 2, dtype_bytes=4, worker_memory=None, min_resident=1,
                          num_cpus=2, num_gpus=0.5, resources=res)
    assert [w.resources for w in plan.workers] == res
    assert all(w.num_cpus == 2 and w.num_gpus == 0.5 for w in plan.workers)
    with pytest.raises(ClusterError, match="one dict per actor"):
        plan_placement(specs, 2, dtype_bytes=4, worker_memory=None, min_resident=1, resources=res[:1])


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_workers=0), "at least 1"),
    (dict(num_workers=9), "only 8 routed experts"),
    (dict(num_workers=2, min_resident=0), "min_resident"),
    (dict(num_workers=2, load={(0, 0): -1.0}), "non-negative"),
])
def test_rejects_bad_arguments(kwargs, match):
    args = dict(dtype_bytes=4, worker_memory=None, min_resident=1)
    args.update(kwargs)
    n = args.pop("num_workers")
    with pytest.raises(ClusterError, match=match):
        plan_placement(_specs(2, 4), n, **args)


def test_plan_is_deterministic_and_frozen():
    specs = _specs(3, 6)
    a = plan_placement(specs, 4, dtype_bytes=4, worker_memory=None, min_resident=1)
    b = plan_placement(list(reversed(specs)), 4, dtype_bytes=4, worker_memory=None, min_resident=1)
    assert a == b
    with pytest.raises(Exception):
        a.workers[0].index = 3  # type: ignore[misc]


def test_planner_minimum_matches_the_store():
    """The budget the planner calls minimal is exactly what ExpertStore accepts (64-byte slot layout included)."""
    import torch
    from workers.store import ExpertStore

    specs = _specs(1, 4, hidden=5, inter=3)  # 60-byte tensors, padded to 64 in a slot
    per = expert_nbytes(specs[0], 4)
    assert per == 3 * 64
    plan = plan_placement(specs, 2, dtype_bytes=4, worker_memory=2 * per, min_resident=2)
    mine = [s for s in specs if s.key in plan.workers[0].experts]
    ExpertStore(mine, 2 * per, torch.float32, min_resident=2).close()
    with pytest.raises(BudgetError):
        ExpertStore(mine, 2 * per - 1, torch.float32, min_resident=2)
    with pytest.raises(ClusterError):
        plan_placement(specs, 2, dtype_bytes=4, worker_memory=2 * per - 1, min_resident=2)


def test_pinned_experts_count_toward_the_minimum_as_in_the_store():
    """A budget that holds top-k but not top-k + the actor's pinned experts is refused by the planner
    with the store's error class and the store's minimum (before: it passed and the actor died)."""
    import torch
    from workers.store import ExpertStore

    specs = _specs(2, 4)  # 2 actors x 4 experts; pinning layer 0 pins 2 of each actor's 4
    per = expert_nbytes(specs[0], 4)
    pins = [(0, e) for e in range(4)]
    budget = 3 * per  # top-2 fits; 2 pinned + top-2 = 4 slots do not
    plan_placement(specs, 2, dtype_bytes=4, worker_memory=budget, min_resident=2)  # no pins: fits
    with pytest.raises(BudgetError) as planned:
        plan_placement(specs, 2, dtype_bytes=4, worker_memory=budget, min_resident=2, pinned=pins)
    plan = plan_placement(specs, 2, dtype_bytes=4, worker_memory=None, min_resident=2, pinned=pins)
    w = plan.workers[0]
    assert w.pinned == [k for k in w.experts if k[0] == 0] and len(w.pinned) == 2
    mine = [s for s in specs if s.key in w.experts]
    with pytest.raises(BudgetError) as stored:
        ExpertStore(mine, budget, torch.float32, min_resident=2, pinned=w.pinned)
    assert planned.value.needed_bytes == stored.value.needed_bytes == 4 * per
    assert isinstance(planned.value, ClusterError) and f"the minimum is {4 * per} bytes" in str(planned.value)
    assert "pinned" in str(planned.value) and "\n" not in str(planned.value)
    plan_placement(specs, 2, dtype_bytes=4, worker_memory=4 * per, min_resident=2, pinned=pins)  # exactly enough
    ExpertStore(mine, 4 * per, torch.float32, min_resident=2, pinned=w.pinned).close()


def test_unknown_pinned_expert_is_refused():
    with pytest.raises(ClusterError, match=r"pinned experts \[\(5, 0\)\]"):
        plan_placement(_specs(2, 4), 2, dtype_bytes=4, worker_memory=None, min_resident=1, pinned=[(5, 0)])


# ---- `moeshard plan` (pure: no Ray) ------------------------------------------------------------

def test_cli_plan_prints_per_actor_split(checkpoint, capsys):
    from cluster.cli import main

    path = checkpoint("mixtral", "e8_top3")
    capsys.readouterr()  # building the checkpoint (first test to ask for it) writes a progress bar
    assert main(["plan", str(path), "--workers", "3", "--worker-memory", "60KB"]) == 0
    out = capsys.readouterr().out
    assert "24 routed experts" in out and "top-3" in out
    rows = [l.split() for l in out.splitlines() if l.startswith("    ")]
    assert [r[0] for r in rows] == ["0", "1", "2"] and all(r[1] == "8" for r in rows)
    # 8 experts per layer over 3 actors: 3/3/2 in some rotation, every actor in every layer
    per_layer = [next(c for c in r if c.count("/") == 2) for r in rows]
    assert sorted(sum(map(int, p.split("/"))) for p in per_layer) == [8, 8, 8]
    assert all(set(p.split("/")) <= {"2", "3"} for p in per_layer)
    assert "54 KiB" in out  # resident: 3 slots of 18 KiB (18432 B) fit in 60 KB; the rest is paged


def test_cli_plan_refuses_with_minimum_and_exit_2(checkpoint, capsys):
    from cluster.cli import main

    path = checkpoint("mixtral", "e8_top3")
    capsys.readouterr()  # building the checkpoint (first test to ask for it) writes a progress bar
    assert main(["plan", str(path), "--workers", "2", "--worker-memory", "10KB"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(r"the minimum is \d+ bytes", err)


def test_cli_errors_are_one_line(tmp_path, capsys):
    from cluster.cli import main

    assert main(["plan", str(tmp_path / "missing"), "--workers", "2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("moeshard: error:") and err.count("\n") == 1
    assert main(["bench", "--scenario", "99"]) != 0
    err = capsys.readouterr().err
    assert "scenario" in err and err.count("\n") == 1


def test_cli_help_documents_every_flag(capsys):
    from cluster.cli import build_parser

    parser = build_parser()
    for cmd in ("plan", "generate"):
        sub = parser._subparsers._group_actions[0].choices[cmd]
        for action in sub._actions:
            assert action.help, f"{cmd} {action.option_strings or action.dest} has no help"
