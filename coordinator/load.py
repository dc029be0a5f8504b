"""Measured expert load: rows routed to each expert of each MoE layer over a sliding window.

`LoadWindow` is fed by the routers' activation counters (`RoutingStats.observed`, one count vector
per layer per forward pass) and keeps the last `window` passes per layer, so a placement planned
from it follows the recent traffic, not the whole history (vLLM's EPLB keeps a window of 1000
steps for the same reason). `LoadStats` is its typed snapshot and the `stats` JSON file that
`moeshard plan --from-stats FILE` reads; the file names the model's shape so that it cannot be
applied to another model by mistake.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

#: forward passes (decode steps) kept per layer by default
DEFAULT_WINDOW = 1000
FORMAT = "moeshard-expert-load/1"


class LoadFileError(ValueError):
    """A `stats` file that cannot be used: unreadable, malformed, or for another model."""


@dataclass(frozen=True)
class LoadStats:
    """Rows per expert per MoE layer over the last `window` forward passes.

    `loads[layer]` has `num_experts` entries; `model` names the checkpoint's shape
    (architecture, num_layers, num_experts, top_k) the counts were measured on."""

    model: Mapping[str, Any]
    window: int
    passes: Mapping[int, int]                 # forward passes counted per layer (<= window)
    loads: Mapping[int, tuple[float, ...]]    # layer -> rows per expert

    KEYS = ("format", "model", "window", "passes", "loads")

    def as_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "model": dict(self.model), "window": self.window,
                "passes": {str(l): n for l, n in sorted(self.passes.items())},
                "loads": {str(l): list(v) for l, v in sorted(self.loads.items())}}

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.as_json(), indent=1) + "\n")
        return path

    def load_map(self) -> dict[tuple[int, int], float]:
        """{(layer, expert): rows}, the form the placement planners take."""
        return {(l, e): float(v) for l, row in self.loads.items() for e, v in enumerate(row)}

    def check_model(self, model: Mapping[str, Any], moe_layers: list[int]) -> None:
        """LoadFileError unless these counts were measured on a model of this shape."""
        diff = {k: (self.model.get(k), v) for k, v in model.items() if self.model.get(k) != v}
        if diff:
            raise LoadFileError("the stats file is for another model: " + ", ".join(
                f"{k} is {got!r} in the file but {want!r} in the checkpoint" for k, (got, want) in sorted(diff.items())))
        if sorted(self.loads) != sorted(moe_layers):
            raise LoadFileError(f"the stats file has layers {sorted(self.loads)} but the checkpoint's MoE layers are "
                                f"{sorted(moe_layers)}")

    @classmethod
    def read(cls, path: str | Path) -> "LoadStats":
        try:
            raw = json.loads(Path(path).read_text())
        except OSError as e:
            raise LoadFileError(f"cannot read stats file {path}: {e.strerror or e}") from None
        except json.JSONDecodeError as e:
            raise LoadFileError(f"stats file {path} is not JSON: {e}") from None
        return cls.from_json(raw, where=str(path))

    @classmethod
    def from_json(cls, raw: Any, where: str = "stats") -> "LoadStats":
        if not isinstance(raw, dict):
            raise LoadFileError(f"{where}: expected a JSON object, got {type(raw).__name__}")
        if unknown := sorted(set(raw) - set(cls.KEYS)):
            raise LoadFileError(f"{where}: unknown keys {unknown}; a stats file has {list(cls.KEYS)}")
        if missing := [k for k in cls.KEYS if k not in raw]:
            raise LoadFileError(f"{where}: missing keys {missing}")
        if raw["format"] != FORMAT:
            raise LoadFileError(f"{where}: format is {raw['format']!r}, expected {FORMAT!r}")
        if not isinstance(raw["model"], dict):
            raise LoadFileError(f"{where}: 'model' must be an object naming the model's shape")
        window = raw["window"]
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise LoadFileError(f"{where}: 'window' must be a positive integer, got {window!r}")
        layers = _int_keys(raw["loads"], "loads", where)
        passes = _int_keys(raw["passes"], "passes", where)
        width = raw["model"].get("num_experts")
        loads: dict[int, tuple[float, ...]] = {}
        for l, row in layers.items():
            if not isinstance(row, list) or (width is not None and len(row) != width):
                raise LoadFileError(f"{where}: loads of layer {l} must be a list of {width} numbers, got "
                                    f"{row if not isinstance(row, list) else f'{len(row)} entries'}")
            bad = [v for v in row if isinstance(v, bool) or not isinstance(v, (int, float))
                   or not math.isfinite(v) or v < 0]
            if bad:
                raise LoadFileError(f"{where}: loads of layer {l} must be finite non-negative numbers, got {bad[:3]}")
            loads[l] = tuple(float(v) for v in row)
        return cls(model=dict(raw["model"]), window=window, passes={l: int(n) for l, n in passes.items()}, loads=loads)


def load_model_key(cfg: Any) -> dict[str, Any]:
    """What a stats file records of the model (a `ModelConfig`): enough to refuse another model's counts."""
    return {"model_type": cfg.model_type, "num_layers": cfg.num_layers, "num_experts": cfg.num_experts,
            "top_k": cfg.top_k, "hidden_size": cfg.hidden_size}


def _int_keys(obj: Any, name: str, where: str) -> dict[int, Any]:
    if not isinstance(obj, dict):
        raise LoadFileError(f"{where}: '{name}' must be an object keyed by layer")
    try:
        return {int(k): v for k, v in obj.items()}
    except ValueError:
        raise LoadFileError(f"{where}: '{name}' keys must be layer numbers, got {sorted(obj)[:5]}") from None


class LoadWindow:
    """The last `window` count vectors per layer (see module doc). Per layer a ring of [window, E]
    int32 counts (4 KB per 1000 passes per expert), allocated at its first pass; summed per snapshot."""

    def __init__(self, window: int = DEFAULT_WINDOW):
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise ValueError(f"load window must be a positive integer of forward passes, got {window!r}")
        self.window = window
        self._ring: dict[int, torch.Tensor] = {}      # layer -> [window, E] counts, oldest overwritten
        self._passes: dict[int, int] = {}

    def add(self, layer: int, counts: torch.Tensor) -> None:
        """One pass's counts [E] of `layer`: a single copy into the ring (this runs every decode step;
        the sums are made when a snapshot is taken)."""
        ring = self._ring.get(layer)
        if ring is None:
            ring = self._ring[layer] = torch.zeros(self.window, counts.numel(), dtype=torch.int32)
            self._passes[layer] = 0
        ring[self._passes[layer] % self.window].copy_(counts.detach())
        self._passes[layer] += 1

    def snapshot(self, model: Mapping[str, Any]) -> LoadStats:
        return LoadStats(model=dict(model), window=self.window,
                         passes={l: min(n, self.window) for l, n in sorted(self._passes.items())},
                         loads={l: tuple(float(v) for v in self._ring[l].sum(0, dtype=torch.int64).tolist())
                                for l in sorted(self._ring)})

    def load_map(self) -> dict[tuple[int, int], float]:
        """{(layer, expert): rows} over the window (`LoadStats.load_map` of a snapshot)."""
        return self.snapshot({}).load_map()

    def clear(self) -> None:
        self._ring.clear()
        self._passes.clear()
