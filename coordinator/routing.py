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


def route_sigmoid_grouped(logits: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int, topk_group: int,
                          renormalize: bool, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3: sigmoid scores; the correction bias picks experts but never weighs them.

    Experts are chosen only from the `topk_group` groups whose two best biased scores sum
    highest. logits [T, E] float32, bias [E] -> weights [T, k] float32, ids [T, k].
    """
    T, E = logits.shape
    scores = logits.float().sigmoid()                          # [T, E]
    choice = scores + bias                                     # [T, E]
    group_scores = choice.view(T, n_group, E // n_group).topk(2, dim=-1)[0].sum(dim=-1)   # [T, G]
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]           # [T, g]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
    expert_mask = group_mask.unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, E).bool()
    choice = choice.masked_fill(~expert_mask, float("-inf"))
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
    T, E = logits.shape
    scores = torch.softmax(logits.float(), dim=-1)                             # [T, E]
    if n_group > 1:
        group_scores = scores.view(T, n_group, E // n_group).max(dim=-1).values  # [T, G]
        group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
        expert_mask = group_mask.unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, E).bool()
        scores = scores.masked_fill(~expert_mask, 0.0)   # the reference zeroes, it does not use -inf
    weights, ids = torch.topk(scores, k=top_k, dim=-1, sorted=False)
    return weights * scaling, ids


def route_topk_softmax(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """gpt-oss: top-k of the (biased) router logits, then softmax over just those k, in the logits' dtype.

    logits [T, E] -> weights [T, k] float32, ids [T, k].
    """
    top, ids = torch.topk(logits, top_k, dim=-1)
    return torch.softmax(top, dim=-1, dtype=top.dtype).float(), ids
