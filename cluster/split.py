"""Split one layer's grouped rows by the actor that owns each expert. Pure: no Ray, no I/O."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from coordinator.experts import ExpertBatch


@dataclass(frozen=True)
class Share:
    """One actor's part of a layer: its experts in grouped order, their row counts, and the positions
    of those rows in the grouped buffer (`ExpertBatch` order)."""

    experts: list[int]
    counts: list[int]
    idx: torch.Tensor


def split_by_owner(batch: ExpertBatch, owners: Mapping[int, int], layer: int) -> dict[int, Share]:
    """{actor: Share} for the actors that own an active expert of `layer` (ValueError for an expert
    no actor owns: routing chose one the layer does not have)."""
    per: dict[int, tuple[list[int], list[int], list[torch.Tensor]]] = {}
    for e, s, t in batch.segments():
        a = owners.get(e)
        if a is None:
            raise ValueError(f"routing chose expert {e} of layer {layer}, which does not exist "
                             f"(layer has experts 0..{max(owners)})")
        experts, counts, spans = per.setdefault(a, ([], [], []))
        experts.append(e)
        counts.append(t - s)
        spans.append(torch.arange(s, t, device=batch.token_idx.device))
    return {a: Share(ex, co, sp[0] if len(sp) == 1 else torch.cat(sp)) for a, (ex, co, sp) in sorted(per.items())}
