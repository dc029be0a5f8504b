"""Expert compute kernels: one gated MLP per routed expert, run over grouped rows.

Every caller (the in-process shard, remote actors, tests) goes through
`forward_into`, so the same rows and the same weights always take the same
code path and give bit-identical results whatever the memory budget or placement.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "relu": F.relu,
}

# Matmul libraries may pick different vectorised paths for differently aligned
# inputs, which can change the last bits of a result. Segments are re-homed to
# an aligned buffer so a row gives the same output wherever it sat in a batch.
_ALIGN = 64


@dataclass(frozen=True)
class ExpertWeights:
    """One expert's weights in nn.Linear layout, all views into one contiguous buffer.

    The views are only valid while the owning store keeps the expert resident
    (see `ExpertStore.get`); they are never copied.
    """

    gate: Tensor  # [I, H]
    up: Tensor    # [I, H]
    down: Tensor  # [H, I]
    activation: str = "silu"

    @property
    def hidden_size(self) -> int:
        return int(self.gate.shape[1])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.gate, self.up, self.down))

    def forward(self, x: Tensor) -> Tensor:
        return expert_forward(self, x)


def activation_fn(name: str) -> Callable[[Tensor], Tensor]:
    """Look up an activation by name; raise ValueError listing the known ones."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}") from None


def expert_forward(w: ExpertWeights, x: Tensor) -> Tensor:
    """down(act(gate(x)) * up(x)) for rows x [N, H] -> [N, H]."""
    act = activation_fn(w.activation)
    return F.linear(act(F.linear(x, w.gate)) * F.linear(x, w.up), w.down)  # [N, I] -> [N, H]


def forward_into(out: Tensor, w: ExpertWeights, x: Tensor) -> None:
    """Write w.forward(x) into `out` ([N, H], a slice of a preallocated output). `w` is any
    held format's weights (workers/formats.py): dense `ExpertWeights` or a low-bit one."""
    if x.shape[0] == 0:
        return
    if x.data_ptr() % _ALIGN:
        x = x.clone()  # see _ALIGN: same bits regardless of the row's offset in its batch
    out.copy_(w.forward(x))


def run_grouped(rows: Tensor, weights: Sequence[ExpertWeights], counts: Sequence[int]) -> Tensor:
    """Run each expert over its contiguous segment of `rows` (grouped by expert, ascending).

    rows: [N, H]; weights[i] handles the next counts[i] rows; sum(counts) == N.
    Returns [N, H], one matmul chain per active expert, no per-token Python loop.
    """
    if len(weights) != len(counts):
        raise ValueError(f"{len(weights)} experts but {len(counts)} counts")
    if sum(counts) != rows.shape[0]:
        raise ValueError(f"counts sum to {sum(counts)} but there are {rows.shape[0]} rows")
    out = torch.empty_like(rows)  # [N, H]
    start = 0
    for w, n in zip(weights, counts):
        if n:
            forward_into(out[start:start + n], w, rows[start:start + n])
        start += n
    return out
