"""The generation loop: prefill once, then one token per step from the KV cache."""
from __future__ import annotations

from typing import Callable

import torch

from .model import MoETransformer


def select_next(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> next token ids [B]: argmax, or temperature + nucleus sampling."""
    if not do_sample:
        return logits.argmax(dim=-1)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    logits = logits / temperature
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= (1 - top_p)
        remove[:, -1] = False                      # always keep the most likely token
        logits = logits.masked_fill(remove.scatter(1, sorted_idx, remove), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def generate(model: MoETransformer, ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             seed: int | None = None, eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
             on_token: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """Generate up to `max_new_tokens` for a left-padded batch; returns [B, T + new] with the prompt.

    Positions follow the attention mask (left padding does not shift RoPE), as in
    transformers' `generate`. Finished rows (after `eos_token_id`) are filled with
    `pad_token_id`; the loop stops early once every row is finished.
    """
    B, T = ids.shape
    mask = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {tuple(mask.shape)} does not match ids shape {tuple(ids.shape)}")
    if max_new_tokens <= 0:
        return ids.clone()
    S = T + max_new_tokens
    key_valid = torch.ones(B, S, dtype=torch.bool)
    key_valid[:, :T] = mask
    positions = (mask.long().cumsum(-1) - 1).masked_fill(~mask, 0)            # [B, T]
    eos = torch.tensor([] if eos_token_id is None else
                       ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)))
    if eos.numel() and pad_token_id is None:
        pad_token_id = int(eos[0])
    generator = torch.Generator().manual_seed(seed) if seed is not None else None

    caches = model.new_caches(B, S)
    logits = model(ids, positions, torch.arange(T), key_valid, caches)         # [B, T, V]
    out = [ids]
    finished = torch.zeros(B, dtype=torch.bool)
    pos = positions[:, -1:]                                                    # [B, 1]
    for step in range(max_new_tokens):
        nxt = select_next(logits[:, -1], do_sample, temperature, top_p, generator)   # [B]
        if eos.numel():
            nxt = nxt.masked_fill(finished, pad_token_id)
            finished |= torch.isin(nxt, eos)
        out.append(nxt[:, None])
        if on_token is not None:
            on_token(nxt)
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        pos = pos + 1
        logits = model(nxt[:, None], pos, torch.tensor([T + step]), key_valid, caches)
    return torch.cat(out, dim=1)
