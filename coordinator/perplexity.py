"""Perplexity over a long token sequence with a sliding window, as in transformers' perplexity guide.

Windows of `max_length` tokens start every `stride` tokens; each window scores only the tokens
the previous windows did not (its last `end - prev_end`), with the rest as context, so every
token but the first is scored exactly once with up to `max_length - stride` tokens before it.
perplexity = exp(total negative log-likelihood / tokens scored), accumulated in float64.

`stepwise_perplexity` scores the same way but feeds the text one token per forward through the KV
cache, as decode runs: what a model whose output depends on the expert cache (cache-aware routing,
docs/routing.md) does while generating, which a window's one big forward does not show.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from tqdm import tqdm


def window_starts(n: int, max_length: int, stride: int) -> list[int]:
    """Where each window starts: every `stride` tokens until one reaches the end."""
    starts = []
    for begin in range(0, n, stride):
        starts.append(begin)
        if begin + max_length >= n:
            break
    return starts


def sliding_perplexity(logits_fn: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor, max_length: int,
                       stride: int, progress: bool | None = None) -> float:
    """ids [T] (T >= 2); `logits_fn(window [1, L]) -> [1, L, V]`. See the module docstring."""
    n = int(ids.numel())
    if n < 2:
        raise ValueError(f"perplexity needs at least two tokens, got {n}")
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be in [1, max_length={max_length}], got {stride}")
    nll, scored, prev_end = 0.0, 0, 0
    starts = window_starts(n, max_length, stride)
    for begin in tqdm(starts, desc="perplexity", unit="window", disable=None if progress is None else not progress,
                      leave=False):
        end = min(begin + max_length, n)
        window = ids[begin:end].reshape(1, -1)
        first = max(prev_end - begin, 1)        # window positions scored here (each needs one before it)
        logp = torch.log_softmax(logits_fn(window)[0, first - 1:end - begin - 1].double(), dim=-1)
        nll -= logp.gather(1, window[0, first:, None]).sum().item()
        scored += end - begin - first
        prev_end = end
    return math.exp(nll / scored)


def stepwise_perplexity(step_fn: Callable[[torch.Tensor, int, bool], torch.Tensor], ids: torch.Tensor,
                        max_length: int, progress: bool | None = None) -> float:
    """ids [T] (T >= 2); `step_fn(token [1, 1], position, fresh) -> logits [1, 1, V]` runs one decode step
    at `position` of a KV cache that `fresh` restarts. Consecutive windows of `max_length` tokens, each
    from a fresh cache, each token scored from the tokens of its window before it."""
    n = int(ids.numel())
    if n < 2:
        raise ValueError(f"perplexity needs at least two tokens, got {n}")
    nll, scored = 0.0, 0
    for t in tqdm(range(n - 1), desc="perplexity (stepwise)", unit="token",
                  disable=None if progress is None else not progress, leave=False):
        pos = t % max_length
        logits = step_fn(ids[t].reshape(1, 1), pos, pos == 0)
        if pos == max_length - 1:       # the window is full: its last token starts the next one
            continue
        nll -= torch.log_softmax(logits[0, -1].double(), dim=-1)[ids[t + 1]].item()
        scored += 1
    return math.exp(nll / scored)
