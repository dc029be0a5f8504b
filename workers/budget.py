"""How many bytes an expert takes in a store's slot, and the smallest budget a store accepts.

The one place these are computed: `ExpertStore` lays its slots out with `slot_layout`, the
placement planner sizes actors with `expert_nbytes`/`min_budget`, and the benchmarks pick
budgets from `min_budget`, so a plan that passes is a store that starts.
"""
from __future__ import annotations

from typing import Iterable, Sequence

from .errors import BudgetError
from .formats import format_of
from .spec import ExpertKey, ExpertSpec
from .units import format_bytes

SLOT_ALIGN = 64  # every tensor of a slot starts on a 64-byte boundary, so each view is vector-aligned

# (byte offset in the slot, nbytes, shape) of each held tensor, weight by weight (gate, up, down),
# each weight's tensors in its format's order (workers/formats.py `parts`)
SlotLayout = list[tuple[int, int, tuple[int, ...]]]


def slot_layout(spec: ExpertSpec, itemsize: int) -> tuple[SlotLayout, int]:
    """Where each tensor the expert's format holds (gate, up, down and any scales) sits in a slot,
    with a compute dtype of `itemsize` bytes, and the slot bytes they span (each tensor padded to
    SLOT_ALIGN)."""
    layout, off = [], 0
    for weight in format_of(spec).parts(spec):
        for part in weight:
            nbytes = part.nbytes(itemsize)
            layout.append((off, nbytes, tuple(part.shape)))
            off = (off + nbytes + SLOT_ALIGN - 1) // SLOT_ALIGN * SLOT_ALIGN
    return layout, off


def expert_nbytes(spec: ExpertSpec, itemsize: int) -> int:
    """Slot bytes one expert takes as held: its format's tensors (int8/int4 data plus scales, or
    the three weights in the compute dtype of `itemsize` bytes), each 64-byte aligned."""
    return slot_layout(spec, itemsize)[1]


def slot_bytes(specs: Iterable[ExpertSpec], itemsize: int) -> int:
    """The size of every slot of a store owning `specs`: its largest expert (0 when none)."""
    return max((expert_nbytes(s, itemsize) for s in specs), default=0)


def slot_count(num_experts: int, slot: int, budget_bytes: int | None) -> int:
    """Slots a budget gives a store of `num_experts` experts in slots of `slot` bytes: as many as fit,
    never more than it owns (all of them when the budget is None)."""
    return num_experts if budget_bytes is None else min(num_experts, budget_bytes // max(slot, 1))


def min_slots(num_experts: int, num_pinned: int, min_resident: int) -> int:
    """Slots a store must have: its pinned experts plus `min_resident` (at least 1) more, capped at
    how many experts it owns."""
    return min(num_experts, num_pinned + max(min_resident, 1))


def _pinned_among(specs: Sequence[ExpertSpec], pinned: Iterable[ExpertKey]) -> int:
    keys = {s.key for s in specs}
    return len({tuple(k) for k in pinned} & keys)


def min_budget(specs: Sequence[ExpertSpec], itemsize: int, min_resident: int,
               pinned: Iterable[ExpertKey] = ()) -> int:
    """Smallest budget (bytes) a store owning `specs` accepts: `min_slots` slots of `slot_bytes`.
    Only the pinned keys that are among `specs` count."""
    need = min_slots(len(specs), _pinned_among(specs, pinned), min_resident)
    return need * slot_bytes(specs, itemsize)


def check_budget(specs: Sequence[ExpertSpec], itemsize: int, budget_bytes: int | None, *, min_resident: int,
                 pinned: Iterable[ExpertKey] = (), option: str = "budget_bytes", holder: str = "") -> int:
    """The number of slots `budget_bytes` gives a store owning `specs` (all of them when None).

    Raises BudgetError (carrying `needed_bytes` and `budget_bytes`) when that is below `min_slots`.
    `option` names the setting the caller's user wrote (e.g. "worker_memory"), `holder` who the
    budget is for (e.g. " per actor (actor 1)"), so the one-line message says what to raise.
    """
    n, slot = len(specs), slot_bytes(specs, itemsize)
    slots = slot_count(n, slot, budget_bytes)
    num_pinned = _pinned_among(specs, pinned)
    need = min_slots(n, num_pinned, min_resident)
    if slots >= need:
        return slots
    minimum = need * slot
    raise BudgetError(
        f"{option} of {budget_bytes} bytes ({format_bytes(budget_bytes)}){holder} holds {slots} experts of "
        f"{slot} bytes ({format_bytes(slot)}) but at least {need} must fit ({num_pinned} pinned + min_resident "
        f"{max(min_resident, 1)}); the minimum is {minimum} bytes ({format_bytes(minimum)}). Raise {option}, "
        "pin fewer experts, or spread the experts over more shards.",
        needed_bytes=minimum, budget_bytes=budget_bytes)


def spare_bytes(specs: Sequence[ExpertSpec], itemsize: int, budget_bytes: int | None) -> int | None:
    """Budget a store owning `specs` leaves unused: what remains after its slots (None = unlimited).
    Non-zero only when the budget holds every owned expert with room to spare; replicas of other
    actors' experts (load-driven re-placement) live there, so they never take a slot from paging."""
    if budget_bytes is None:
        return None
    slot = slot_bytes(specs, itemsize)
    return budget_bytes - slot_count(len(specs), slot, budget_bytes) * slot
