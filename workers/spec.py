"""Plain-data description of a routed expert: where its tensors live on disk.

This is everything a worker needs to know about an expert. It is built by the
coordinator's checkpoint reader and shipped to actors as msgpack-able dicts, so
the worker side never learns which model family it is serving.
"""
from __future__ import annotations

from dataclasses import dataclass, asdict
from typing import Any


ExpertKey = tuple[int, int]  # (layer, expert)


@dataclass(frozen=True)
class TensorSpec:
    """One tensor inside a safetensors file, addressable by absolute byte offset.

    `shape` is the tensor's own shape. For checkpoints that store all experts of
    a layer in one fused 3-D tensor, `offset`/`nbytes` address just this expert's
    slice, and `shape` is the slice's shape.
    """

    file: str        # absolute path of the .safetensors file
    key: str         # tensor name inside that file (for error messages)
    dtype: str       # safetensors dtype string, a key of workers/dtypes.py FILE_DTYPES
    shape: tuple[int, ...]
    offset: int      # absolute byte offset of the first element in `file`
    nbytes: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TensorSpec":
        return cls(d["file"], d["key"], d["dtype"], tuple(d["shape"]), int(d["offset"]), int(d["nbytes"]))


@dataclass(frozen=True)
class ExpertSpec:
    """A routed expert: out = down(act(gate(x)) * up(x)), weights in nn.Linear layout.

    gate: [I, H], up: [I, H], down: [H, I] as computed. `expert_dtype` is the format the
    expert is held and computed in (None: the compute dtype; "int8", "int4": workers/formats.py)
    with `group_size` for int4. `stored` is how the file holds it (None: a float dtype;
    "int8"/"int4": a `moeshard quantize`d checkpoint, whose tensor shapes are then the stored
    ones and whose per-weight scales are `scales`, in gate/up/down order). FP8 experts as DeepSeek-V3
    ships them: `expert_dtype` = `stored` = "fp8", F8_E4M3 weights, their float32 `_scale_inv` tensors
    in `scales` and the [out, in] block they scale in `block`. MXFP4 experts as gpt-oss ships them
    (`expert_dtype` = `stored` = "mxfp4"): their slices of the layer's fused tensors, `gate` the
    interleaved gate/up blocks (U8 [2I, H/2]), `up` the same tensor (gate and up are one), `down` the
    down blocks (U8 [H, I/2]); `scales` = (gate/up e8m0 scales, gate/up bias, down scales, down bias),
    `swiglu` = (alpha, limit) of its clamped SwiGLU.
    """

    layer: int
    expert: int
    gate: TensorSpec
    up: TensorSpec
    down: TensorSpec
    activation: str = "silu"
    expert_dtype: str | None = None
    group_size: int = 0
    stored: str | None = None
    scales: tuple[TensorSpec, ...] = ()
    block: tuple[int, ...] = ()
    swiglu: tuple[float, ...] = ()

    @property
    def key(self) -> ExpertKey:
        return (self.layer, self.expert)

    @property
    def tensors(self) -> tuple[TensorSpec, TensorSpec, TensorSpec]:
        return self.gate, self.up, self.down

    @property
    def hidden_size(self) -> int:
        """H: the down projection's output size (the one dimension no stored format packs)."""
        return int(self.down.shape[0])

    @property
    def intermediate_size(self) -> int:
        return int(self.gate.shape[0])

    @property
    def held_format(self) -> str:
        return self.expert_dtype or "dense"

    @property
    def file_nbytes(self) -> int:
        # each distinct file range once: a fused gate/up tensor is both `gate` and `up`
        return sum({(t.file, t.offset): t.nbytes for t in (*self.tensors, *self.scales)}.values())

    def numel(self) -> int:
        n = 0
        for t in (self.gate, self.up, self.down):
            m = 1
            for s in t.shape:
                m *= s
            n += m
        return n

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "expert": self.expert,
            "gate": self.gate.to_dict(),
            "up": self.up.to_dict(),
            "down": self.down.to_dict(),
            "activation": self.activation,
            "expert_dtype": self.expert_dtype,
            "group_size": self.group_size,
            "stored": self.stored,
            "scales": [t.to_dict() for t in self.scales],
            "block": list(self.block),
            "swiglu": list(self.swiglu),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExpertSpec":
        return cls(
            int(d["layer"]),
            int(d["expert"]),
            TensorSpec.from_dict(d["gate"]),
            TensorSpec.from_dict(d["up"]),
            TensorSpec.from_dict(d["down"]),
            d.get("activation", "silu"),
            d.get("expert_dtype"),
            int(d.get("group_size", 0)),
            d.get("stored"),
            tuple(TensorSpec.from_dict(t) for t in d.get("scales", ())),
            tuple(int(b) for b in d.get("block", ())),
            tuple(float(v) for v in d.get("swiglu", ())),
        )
