"""Routing schemes as pure functions: router logits in, (weights, expert ids) out.

Each follows its reference implementation step by step, including where it works in
float32, because a different top-k choice is a different model.
"""
from __future__ import annotations

import torch


def route_softmax(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral / Qwen-MoE / OLMoE: softmax over all experts (float32), top-k, optional renorm.

    logits [T, E] -> weights [T, k] float32, ids [T, k] int64.
    """
    probs = torch.softmax(logits.float(), dim=-1)              # [T, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)            # [T, k]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def group_mask(scores: torch.Tensor, n_group: int, topk_group: int, group_score: str) -> torch.Tensor:
    """[T, E] bool: the experts of each token's `topk_group` best groups, a group scored by the sum of
    its two best scores ("top2", DeepSeek-V3) or by its best one ("max", DeepSeek-V2)."""
    T, E = scores.shape
    grouped = scores.view(T, n_group, E // n_group)
    group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1) if group_score == "top2" else \
        grouped.max(dim=-1).values                                                        # [T, G]
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]           # [T, g]
    mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
    return mask.unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, E).bool()


def route_sigmoid_grouped(logits: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int, topk_group: int,
                          renormalize: bool, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3: sigmoid scores; the correction bias picks experts but never weighs them.

    Experts are chosen only from the `topk_group` groups whose two best biased scores sum
    highest. logits [T, E] float32, bias [E] -> weights [T, k] float32, ids [T, k].
    """
    scores = logits.float().sigmoid()                          # [T, E]
    choice = scores + bias                                     # [T, E]
    choice = choice.masked_fill(~group_mask(choice, n_group, topk_group, "top2"), float("-inf"))
    ids = torch.topk(choice, k=top_k, dim=-1, sorted=False)[1]                            # [T, k]
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scaling, ids


def route_softmax_grouped(logits: torch.Tensor, top_k: int, n_group: int, topk_group: int,
                          scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V2: softmax (float32), then top-k among the `topk_group` groups with the highest
    single expert score; never renormalised, scaled by `scaling`. n_group=1 is plain greedy.

    logits [T, E] float32 -> weights [T, k] float32, ids [T, k].
    """
    scores = torch.softmax(logits.float(), dim=-1)                             # [T, E]
    if n_group > 1:
        # the reference zeroes, it does not use -inf
        scores = scores.masked_fill(~group_mask(scores, n_group, topk_group, "max"), 0.0)
    weights, ids = torch.topk(scores, k=top_k, dim=-1, sorted=False)
    return weights * scaling, ids


def route_topk_softmax(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """gpt-oss: top-k of the (biased) router logits, then softmax over just those k, in the logits' dtype.

    logits [T, E] -> weights [T, k] float32, ids [T, k].
    """
    top, ids = torch.topk(logits, top_k, dim=-1)
    return torch.softmax(top, dim=-1, dtype=top.dtype).float(), ids
