"""Cache-aware routing (coordinator/cache_routing.py): its invariants on every family's routing, and the
whole path in process and over real Ray actors.

- never more than `max_new_experts_per_token` non-resident experts per token while the layer has
  enough resident candidates, and a forced token counted where it has not;
- weights as the family requires: renormalised top-k softmax sums to 1 (Mixtral), sigmoid scores
  renormalised sum to `scaling` (DeepSeek-V3), unrenormalised softmax x scaling (DeepSeek-V2), softmax
  over the chosen logits (gpt-oss); only experts the family's group limit admits;
- with every expert resident it is exact routing, bit for bit; exact mode is today's routing.
"""
from __future__ import annotations

import pytest
import torch

from coordinator import Coordinator
from coordinator.cache_routing import (route_cache_aware, sigmoid_grouped_candidates, softmax_candidates,
                                       softmax_grouped_candidates, topk_softmax_candidates)
from coordinator.options import OptionError, RoutingOptions, UnknownOption
from coordinator.routing import (group_mask, route_sigmoid_grouped, route_softmax, route_softmax_grouped,
                                 route_topk_softmax)

MODEL = "models/pydoc-moe"
E, K, T = 16, 4, 64
SCALING = 2.5


def family(name: str, logits: torch.Tensor):
    """(exact weights, ids, candidates, allowed [T, E], what the weights of each token must sum to)."""
    if name == "mixtral":
        w, i = route_softmax(logits, K, True)
        return w, i, softmax_candidates(logits, True), torch.ones_like(logits, dtype=torch.bool), \
            lambda ids: torch.ones(ids.shape[0])
    if name == "deepseek_v3":
        bias = torch.linspace(-0.1, 0.1, E)
        w, i = route_sigmoid_grouped(logits, bias, K, 4, 2, True, SCALING)
        allowed = group_mask(logits.float().sigmoid() + bias, 4, 2, "top2")
        return w, i, sigmoid_grouped_candidates(logits, bias, 4, 2, True, SCALING), allowed, \
            lambda ids: torch.full((ids.shape[0],), SCALING)
    if name == "deepseek_v2":
        w, i = route_softmax_grouped(logits, K, 4, 2, SCALING)
        probs = torch.softmax(logits, -1)
        return w, i, softmax_grouped_candidates(logits, 4, 2, SCALING), group_mask(probs, 4, 2, "max"), \
            lambda ids: probs.gather(1, ids).sum(1) * SCALING
    w, i = route_topk_softmax(logits, K)
    return w, i, topk_softmax_candidates(logits), torch.ones_like(logits, dtype=torch.bool), \
        lambda ids: torch.ones(ids.shape[0])


FAMS = ("mixtral", "deepseek_v3", "deepseek_v2", "gpt_oss")
POLICIES = [RoutingOptions(mode="cache-aware", policy="cache-prior", strength=s) for s in (0.0, 0.3, 2.0)] + \
           [RoutingOptions(mode="cache-aware", policy="max-rank", max_rank=r) for r in (K, 8)] + \
           [RoutingOptions(mode="cache-aware", max_new_experts_per_token=0, strength=0.5),
            RoutingOptions(mode="cache-aware", max_new_experts_per_token=2, strength=0.5)]


@pytest.mark.parametrize("opts", POLICIES, ids=lambda o: f"{o.policy}-s{o.strength}-r{o.max_rank}-"
                                                       f"new{o.max_new_experts_per_token}")
@pytest.mark.parametrize("fam", FAMS)
def test_cap_and_weights_hold(fam, opts):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(T, E, generator=g) * 2
    weights, ids, cand, allowed, total = family(fam, logits)
    # half the experts of every group resident: every token has at least K resident candidates
    resident = torch.zeros(E, dtype=torch.bool)
    resident[torch.arange(0, E, 2)] = True
    w2, i2, d = route_cache_aware(weights, ids, cand, resident, opts)
    assert i2.shape == ids.shape and w2.dtype == torch.float32
    new = (~resident[i2]).sum(1)
    assert int(new.max()) <= opts.max_new_experts_per_token, f"{fam}: a token took {int(new.max())} new experts"
    assert d.forced == 0
    assert all(len(set(r)) == K for r in i2.tolist()), "an expert chosen twice for one token"
    assert bool(allowed.gather(1, i2).all()), "an expert outside the family's chosen groups"
    torch.testing.assert_close(w2.sum(1), total(i2), rtol=1e-5, atol=1e-6)
    # a changed token's weights are the router's own scores of its new set, by the family's rule
    changed = (torch.sort(i2, 1).values != torch.sort(ids, 1).values).any(1)
    rows = torch.nonzero(changed).flatten()
    torch.testing.assert_close(w2[rows], cand.weigh(i2[rows], rows))
    assert d.rerouted == int(changed.sum()) and d.tokens == T
    assert d.new_chosen == int(new.sum()) <= d.new_exact
    # an unchanged token keeps its exact weights and ids bit for bit
    assert torch.equal(w2[~changed], weights[~changed]) and torch.equal(i2[~changed], ids[~changed])
    if opts.policy == "max-rank":     # voluntary swaps come from the true top-max_rank (the cap may reach past)
        true_rank = torch.argsort(torch.argsort(cand.key, dim=1, descending=True, stable=True), dim=1)
        capped = (~resident[ids]).sum(1) > opts.max_new_experts_per_token
        assert int(true_rank.gather(1, i2)[~capped].max()) < opts.max_rank


@pytest.mark.parametrize("fam", FAMS)
@pytest.mark.parametrize("opts", POLICIES[:4], ids=lambda o: f"{o.policy}-s{o.strength}-r{o.max_rank}")
def test_everything_resident_is_exact_bit_for_bit(fam, opts):
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(5))
    weights, ids, cand, _, _ = family(fam, logits)
    w2, i2, d = route_cache_aware(weights, ids, cand, torch.ones(E, dtype=torch.bool), opts)
    assert w2 is weights and i2 is ids and d.rerouted == 0 and d.new_exact == 0


def test_a_cold_layer_fills_from_the_ranking_and_counts_forced():
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(7))
    weights, ids, cand, _, _ = family("mixtral", logits)
    resident = torch.zeros(E, dtype=torch.bool)
    resident[0] = True                                  # one resident expert; K=4 needs 3 with a cap of 1
    w2, i2, d = route_cache_aware(weights, ids, cand, resident, RoutingOptions(mode="cache-aware", strength=1.0))
    assert bool((i2 == 0).any(1).all()), "the one resident expert was not used by every token"
    assert d.forced == T and int((~resident[i2]).sum(1).min()) == K - 1
    torch.testing.assert_close(w2.sum(1), torch.ones(T))


def test_strength_zero_changes_only_what_the_cap_forbids():
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(9))
    weights, ids, cand, _, _ = family("mixtral", logits)
    resident = torch.arange(E) % 2 == 0
    opts = RoutingOptions(mode="cache-aware", strength=0.0, max_new_experts_per_token=K)
    w2, i2, d = route_cache_aware(weights, ids, cand, resident, opts)
    assert torch.equal(i2, ids) and d.rerouted == 0


def test_bad_routing_options_are_clear_errors():
    with pytest.raises(OptionError, match="routing: must be one of exact, cache-aware"):
        Coordinator.from_pretrained(MODEL, routing="sticky")
    with pytest.raises(UnknownOption, match="routing_strength: applies only with routing='cache-aware'"):
        Coordinator.from_pretrained(MODEL, routing_strength=0.5)
    with pytest.raises(OptionError, match="routing_policy"):
        RoutingOptions(mode="cache-aware", policy="lru")
    with pytest.raises(OptionError, match=r"routing_max_rank: must be at least the model's top-k \(2\)"):
        Coordinator.from_pretrained(MODEL, routing="cache-aware", routing_policy="max-rank", routing_max_rank=1)
    with pytest.raises(UnknownOption, match="not both"):
        Coordinator.from_pretrained(MODEL, routing=RoutingOptions(mode="cache-aware"), routing_strength=1.0)


IDS = torch.tensor([[1, 300, 400, 500, 77, 88, 1200, 35]])
HELDOUT = "docs/data/heldout-pydoc.txt"


def test_stepwise_perplexity_is_the_windows_one_token_at_a_time():
    import math

    with Coordinator.from_pretrained(MODEL) as c:
        ids = torch.tensor(c.tokenizer.encode(open(HELDOUT).read()[:1500]).ids[:200])
        # one window of 100, then one of the next 100 from a fresh cache (its first token unscored)
        nll = 0.0
        for begin in (0, 100):
            lp = torch.log_softmax(c.forward(ids[None, begin:begin + 100])[0].double(), -1)
            nll -= lp[:-1].gather(1, ids[begin + 1:begin + 100, None]).sum().item()
        want = math.exp(nll / 198)
        got = c.perplexity(ids, max_length=100, stepwise=True)
        assert math.isclose(got, want, rel_tol=1e-6), (got, want)
        with pytest.raises(ValueError, match="stride does not apply"):
            c.perplexity(ids, max_length=100, stride=50, stepwise=True)
        with pytest.raises(ValueError, match="stepwise must be True or False"):
            c.perplexity(ids, stepwise="yes")


def test_eval_takes_the_routing_flags_and_stepwise(capsys):
    from cluster.cli import main

    text = ["--text", HELDOUT, "--max-length", "64"]
    assert main(["eval", MODEL, *text, "--stepwise", "--stride", "8"]) == 1
    assert "--stride: does not apply with --stepwise" in capsys.readouterr().err
    assert main(["eval", MODEL, *text, "--routing-strength", "0.5"]) == 1
    assert "--routing-strength: applies only with --routing='cache-aware'" in capsys.readouterr().err
    assert main(["eval", MODEL, "--text", HELDOUT, "--worker-memory", "5MB", "--routing", "cache-aware",
                 "--routing-policy", "max-rank", "--routing-max-rank", "3", "--max-new-experts", "1"]) == 0
    assert capsys.readouterr().out.startswith("perplexity: ")


def _run(**kw):
    with Coordinator.from_pretrained(MODEL, **kw) as c:
        logits = c.forward(IDS)
        tokens = c.generate(IDS, max_new_tokens=12)
        return logits, tokens, c.stats()


def test_exact_is_the_default_and_cache_aware_with_everything_resident_is_exact():
    ref_logits, ref_tokens, st = _run()
    assert st["routing"].mode == "exact" and st["routing"].token_layers == 0
    logits, tokens, st = _run(routing="cache-aware", routing_strength=1.0)
    assert torch.equal(logits, ref_logits) and torch.equal(tokens, ref_tokens)
    assert st["routing"].rerouted == 0 and st["routing"].token_layers > 0


def test_in_process_paging_reroutes_toward_the_store_and_keeps_the_cap():
    ref_logits, ref_tokens, ref = _run(worker_memory="5MB")
    logits, tokens, st = _run(worker_memory="5MB", routing="cache-aware", routing_strength=1.0)
    r = st["routing"]
    assert r.mode == "cache-aware" and r.rerouted > 0 and 0 < r.rerouted_fraction < 1
    assert r.mean_substitute_rank is not None and r.mean_substitute_rank > 2        # beyond the true top-2
    assert r.new_experts_per_token_chosen < r.new_experts_per_token_exact
    assert not torch.equal(tokens, ref_tokens) or not torch.equal(logits, ref_logits)


ray = pytest.importorskip("ray")


@pytest.mark.slow
def test_ray_actors_report_residency_in_their_replies_and_reroute(ray_session):
    # everything resident on the actors: the same tokens as exact routing in process
    _, ref_tokens, _ = _run()
    _, tokens, st = _run(num_workers=2, routing="cache-aware", routing_strength=1.0)
    assert torch.equal(tokens, ref_tokens) and st["routing"].rerouted == 0
    # paging actors: the coordinator learns what they hold from the replies alone
    with Coordinator.from_pretrained(MODEL, num_workers=2, worker_memory="5MB", routing="cache-aware",
                                     routing_strength=1.0) as c:
        assert all(not c.experts.resident(layer) for layer in range(4)), "resident before any reply"
        c.generate(IDS, max_new_tokens=12)
        known = {layer: c.experts.resident(layer) for layer in range(4)}
        r = c.stats()["routing"]
        assert any(known.values()), "no residency report came back with the replies"
        assert sum(map(len, known.values())) <= 2 * 3, "more experts known resident than the actors' slots"
        assert r.rerouted > 0 and r.new_experts_per_token_chosen < r.new_experts_per_token_exact


@pytest.mark.slow
def test_bench_scenario_10_runs_end_to_end(tmp_path):
    """The bench rows run (tiny mode: three settings, a short text; no figure's value is asserted)."""
    from bench import scenarios as S

    ctx = S.Ctx(ckpt=tmp_path, params=S.Params.for_mode(False, True), threads=1, tiny=True,
                log_dir=tmp_path / "logs")
    res = S.run_scenario(10, ctx)
    assert res["status"] == "ok", res.get("reason")
    assert {f["id"] for f in res["figures"]} == {"s10.misses.10%", "s10.ppl.10%", "s10.ppl_windows.10%",
                                                  "s10.tok_s.10%"}
    rows = res["details"]["rows"]
    assert [r["setting"] for r in rows] == ["exact", "cache-prior 0.5", "max-rank 4"]
    assert rows[0]["greedy_agreement"] == 1.0 and rows[0]["stepwise_routing"]["token_layers"] == 0
    assert all(r["stepwise_routing"]["token_layers"] > 0 for r in rows[1:])
