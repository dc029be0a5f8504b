"""Cache-aware routing: the router's own choice, bent toward experts that are already resident.

Out of core, a token that picks an expert not in memory pays a disk read. `route_cache_aware` takes
one layer's exact routing (what coordinator/routing.py gives, bit for bit the reference), the same
router scores as `Candidates` (what the family's top-k ranks, and how it weighs a chosen set), and
the layer's resident mask, and returns the experts to use instead. Pure functions: tensors in,
tensors out; the coordinator supplies the mask (docs/routing.md).

What "resident" means for a decision: the experts the backend knew to hold a slot (loaded or being
read) when the layer was routed. In process that is the store's own table; with Ray actors it is
what each actor's latest reply reported, so an actor's reads or evictions since then are not seen.
Every token of a batch is decided against that same set: an expert one token brings in does not
count as resident for the next token of the same layer.

Policies (after Skliar et al., arXiv 2412.00099):
- cache-prior: each non-resident expert's score is lowered by `strength` x the token's score range
  (max - min over the experts it may choose from), then the usual top-k. strength >= 1 puts every
  resident expert ahead of every non-resident one.
- max-rank: resident experts among the true top-`max_rank` come first, in the true order; then the
  rest in the true order.

Then, for both, the cap: walking that order, a resident expert is always taken and a non-resident
one only while the token has fewer than `max_new_experts_per_token` of them, until k are taken. If
the layer has too few resident candidates for that (a cold layer), the shortfall is filled from the
same order, non-resident, and the token counts as `forced`: the cap holds whenever the layer has at
least k - max_new resident candidates, and never costs a token one of its k experts.

A token whose exact top-k needs no change keeps its exact weights and ids, bit for bit; so with every
expert resident cache-aware routing is exact routing. A changed token's weights come from the
router's own scores over its new set, by the family's rule (`Candidates.weigh`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .options import RoutingOptions
from .routing import group_mask


@dataclass(frozen=True)
class Candidates:
    """One layer's router scores, as a family's routing uses them.

    key [T, E]: what the reference's top-k ranks (-inf: not allowed, e.g. outside the chosen groups);
    weigh(ids [T', k], rows [T']) -> weights [T', k] float32: the family's weights of a chosen set;
    mass [T, E]: each expert's router probability (or score), for the quality figures only."""

    key: torch.Tensor
    weigh: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    mass: torch.Tensor


def softmax_candidates(logits: torch.Tensor, renormalize: bool) -> Candidates:
    """Mixtral / Qwen-MoE / OLMoE (`route_softmax`): softmax probabilities, renormalised over the set."""
    probs = torch.softmax(logits.float(), dim=-1)

    def weigh(ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        w = probs[rows].gather(1, ids)
        return w / w.sum(dim=-1, keepdim=True) if renormalize else w
    return Candidates(probs, weigh, probs)


def sigmoid_grouped_candidates(logits: torch.Tensor, bias: torch.Tensor, n_group: int, topk_group: int,
                               renormalize: bool, scaling: float) -> Candidates:
    """DeepSeek-V3 (`route_sigmoid_grouped`): biased sigmoid scores rank within the chosen groups; the
    unbiased scores weigh, renormalised, times `scaling`."""
    scores = logits.float().sigmoid()
    choice = scores + bias
    key = choice.masked_fill(~group_mask(choice, n_group, topk_group, "top2"), float("-inf"))

    def weigh(ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        w = scores[rows].gather(1, ids)
        if renormalize:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return w * scaling
    return Candidates(key, weigh, scores)


def softmax_grouped_candidates(logits: torch.Tensor, n_group: int, topk_group: int, scaling: float) -> Candidates:
    """DeepSeek-V2 (`route_softmax_grouped`): softmax within the chosen groups, never renormalised."""
    scores = torch.softmax(logits.float(), dim=-1)
    key = scores
    if n_group > 1:
        key = scores.masked_fill(~group_mask(scores, n_group, topk_group, "max"), float("-inf"))

    def weigh(ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return scores[rows].gather(1, ids) * scaling
    return Candidates(key, weigh, scores)


def topk_softmax_candidates(logits: torch.Tensor) -> Candidates:
    """gpt-oss (`route_topk_softmax`): logits rank; a softmax over just the chosen logits weighs."""
    def weigh(ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        top = logits[rows].gather(1, ids)
        return torch.softmax(top, dim=-1, dtype=top.dtype).float()
    return Candidates(logits.float(), weigh, torch.softmax(logits.float(), dim=-1))


@dataclass(frozen=True)
class Decision:
    """What one layer's cache-aware routing did, as counts (summed by `RerouteCounter`)."""

    tokens: int
    rerouted: int              # tokens whose expert set differs from the exact one
    substituted: int           # experts used instead of one of the exact top-k
    substitute_rank_sum: int   # sum of their 1-based ranks in the router's true order (k+1 = next best)
    mass_lost: float           # sum over rerouted tokens of the router probability mass given up
    new_exact: int             # non-resident experts the exact routing would have used
    new_chosen: int            # non-resident experts used
    forced: int                # tokens given more than the cap, for want of resident candidates


def route_cache_aware(weights: torch.Tensor, ids: torch.Tensor, cand: Candidates, resident: torch.Tensor,
                      options: RoutingOptions) -> tuple[torch.Tensor, torch.Tensor, Decision]:
    """weights, ids [T, k] (the exact routing), resident [E] bool -> weights, ids [T, k] and a Decision.

    See the module docstring for the policies, the cap and what stays bit-identical."""
    T, k = ids.shape
    E = cand.key.shape[1]
    cap = options.max_new_experts_per_token
    new_exact = ~resident[ids]                                           # [T, k]
    if options.policy == "cache-prior" and options.strength == 0:
        rows = torch.nonzero(new_exact.sum(1) > cap).flatten()           # only the cap can change them
    else:
        rows = torch.nonzero(new_exact.any(1)).flatten()
    n_new_exact = int(new_exact.sum())
    unchanged = Decision(T, 0, 0, 0, 0.0, n_new_exact, n_new_exact, int((new_exact.sum(1) > cap).sum()))
    if rows.numel() == 0:
        return weights, ids, unchanged
    key = cand.key[rows]                                                  # [R, E]
    allowed = torch.isfinite(key)
    true_order = torch.sort(key, dim=1, descending=True, stable=True).indices    # [R, E]
    true_rank = torch.empty_like(true_order).scatter_(1, true_order, torch.arange(E).expand_as(true_order))
    res = resident.expand_as(key)
    order = _policy_order(key, allowed, res, true_order, true_rank, options)
    chosen = _walk(order, allowed.gather(1, order), res.gather(1, order), k, cap)     # [R, k]

    old = ids[rows]
    changed = (torch.sort(chosen, 1).values != torch.sort(old, 1).values).any(1)     # [R]
    rows, chosen, old, true_rank = rows[changed], chosen[changed], old[changed], true_rank[changed]
    if rows.numel() == 0:
        return weights, ids, unchanged
    weights, ids = weights.clone(), ids.clone()
    weights[rows] = cand.weigh(chosen, rows).to(weights.dtype)
    ids[rows] = chosen
    incoming = ~(chosen[:, :, None] == old[:, None, :]).any(-1)          # [R, k] not in the exact set
    mass = cand.mass[rows]
    n_new = ~resident[ids]
    return weights, ids, Decision(
        tokens=T, rerouted=int(rows.numel()), substituted=int(incoming.sum()),
        substitute_rank_sum=int((true_rank.gather(1, chosen)[incoming] + 1).sum()),
        mass_lost=float((mass.gather(1, old).sum(1) - mass.gather(1, chosen).sum(1)).sum()),
        new_exact=n_new_exact, new_chosen=int(n_new.sum()), forced=int((n_new.sum(1) > cap).sum()))  # all rows


def _policy_order(key: torch.Tensor, allowed: torch.Tensor, res: torch.Tensor, true_order: torch.Tensor,
                  true_rank: torch.Tensor, options: RoutingOptions) -> torch.Tensor:
    """[R, E] expert ids in the order the policy prefers them (not-allowed ones anywhere; the walk skips them)."""
    if options.policy == "cache-prior":
        lo = key.masked_fill(~allowed, float("inf")).min(1, keepdim=True).values
        hi = key.masked_fill(~allowed, float("-inf")).max(1, keepdim=True).values
        biased = key - (options.strength * (hi - lo)) * (~res).float()   # -inf stays -inf
        return torch.sort(biased, dim=1, descending=True, stable=True).indices
    E = key.shape[1]
    first = res & allowed & (true_rank < options.max_rank)
    return torch.sort(true_rank + E * (~first).long(), dim=1, stable=True).indices


def _walk(order: torch.Tensor, allowed: torch.Tensor, res: torch.Tensor, k: int, cap: int) -> torch.Tensor:
    """Take, in `order`, every resident expert and non-resident ones up to `cap`, until k; fill a
    shortfall with the next allowed experts. Vectorised over rows. -> ids [R, k]."""
    R, E = order.shape
    fresh = allowed & ~res
    take = (allowed & res) | (fresh & (fresh.cumsum(1) <= cap))
    take &= take.cumsum(1) <= k
    short = k - take.sum(1, keepdim=True)
    rest = allowed & ~take
    take |= rest & (rest.cumsum(1) <= short)
    pos = torch.arange(E).expand(R, E)
    picked = torch.sort(torch.where(take, pos, pos + E), dim=1).values[:, :k]
    if bool((picked >= E).any()):
        raise ValueError(f"a token has fewer than k={k} experts it may choose from")
    return order.gather(1, picked)


@dataclass(frozen=True)
class RerouteStats:
    """What cache-aware routing did so far (all zero with exact routing).

    rerouted_fraction: tokens (per MoE layer) whose experts differ from the exact top-k;
    mean_substitute_rank: 1-based rank, in the router's true order, of the experts used instead
    (k+1 = the next best); mass_lost_per_rerouted: router probability given up per rerouted token;
    new_experts_per_token_exact / _chosen: non-resident experts per token and layer, exact vs used;
    forced_tokens: tokens given more than the cap because their layer had too few resident experts."""

    mode: str
    policy: str | None
    token_layers: int
    rerouted: int
    rerouted_fraction: float
    substituted: int
    mean_substitute_rank: float | None
    mass_lost_per_rerouted: float | None
    new_experts_per_token_exact: float
    new_experts_per_token_chosen: float
    forced_tokens: int


class RerouteCounter:
    """Sums the `Decision`s of every MoE layer of a model."""

    def __init__(self, options: RoutingOptions):
        self.options = options
        self._sums = [0, 0, 0, 0, 0.0, 0, 0, 0]

    def record(self, d: Decision) -> None:
        for i, v in enumerate((d.tokens, d.rerouted, d.substituted, d.substitute_rank_sum, d.mass_lost,
                               d.new_exact, d.new_chosen, d.forced)):
            self._sums[i] += v

    def stats(self) -> RerouteStats:
        tokens, rerouted, subs, rank_sum, mass, new_exact, new_chosen, forced = self._sums
        return RerouteStats(
            mode=self.options.mode, policy=self.options.policy if self.options.cache_aware else None,
            token_layers=tokens, rerouted=rerouted, rerouted_fraction=rerouted / tokens if tokens else 0.0,
            substituted=subs, mean_substitute_rank=rank_sum / subs if subs else None,
            mass_lost_per_rerouted=mass / rerouted if rerouted else None,
            new_experts_per_token_exact=new_exact / tokens if tokens else 0.0,
            new_experts_per_token_chosen=new_chosen / tokens if tokens else 0.0, forced_tokens=forced)
