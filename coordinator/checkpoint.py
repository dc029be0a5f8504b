"""Hugging Face safetensors checkpoints: validated up front, read lazily.

`Checkpoint.open` reads config.json and every shard's header (never tensor data), and
checks that each file is whole and each tensor has a supported dtype. The dense part is
then loaded whole with `load_dense`; routed experts are only described
(`expert_specs`), as absolute byte ranges a worker can read on its own.
"""
from __future__ import annotations

import json
import logging
import os
import struct
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from workers.dtypes import FILE_DTYPES, FLOAT_FILE_DTYPES, ROWS
from workers.formats import held_as, stored_tensors
from workers.kernels import block_grid, dequantize_fp8
from workers.quant import DEFAULT_GROUP_SIZE, stored_quantization
from workers.spec import ExpertSpec, TensorSpec

from .config import ModelConfig, load_config
from .errors import CheckpointError, UnsupportedModelError

log = logging.getLogger(__name__)

# Checkpoint names of a routed expert's (gate, up, down) weights, per family.
EXPERT_NAMES = {
    "mixtral": "model.layers.{l}.block_sparse_moe.experts.{e}.{w}.weight",
    "default": "model.layers.{l}.mlp.experts.{e}.{w}.weight",
}
EXPERT_PARTS = {"mixtral": ("w1", "w3", "w2"), "default": ("gate_proj", "up_proj", "down_proj")}

# Our module name -> checkpoint name: "model." prefix (lm_head excepted), then these renames.
RENAMES = {
    "mixtral": [(".mlp.gate.", ".block_sparse_moe.gate.")],
    "deepseek_v3": [(".mlp.shared_expert.", ".mlp.shared_experts.")],
    "deepseek_v2": [(".mlp.shared_expert.", ".mlp.shared_experts.")],
    "glm4_moe": [(".mlp.shared_expert.", ".mlp.shared_experts.")],
    "gpt_oss": [(".mlp.gate.", ".mlp.router.")],
}

# Families whose routed experts are fused per layer into 3-D tensors (these names under mlp.experts).
FUSED_EXPERTS = {"gpt_oss": ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")}
# ... and as they ship in MXFP4 (quant_method mxfp4): blocks and e8m0 scales instead of the weights.
MXFP4_EXPERTS = {"gpt_oss": ("gate_up_proj_blocks", "gate_up_proj_scales", "gate_up_proj_bias",
                             "down_proj_blocks", "down_proj_scales", "down_proj_bias")}

# DeepSeek-V3/R1 and Kimi-K2: FP8 weight `<name>` has its float32 block scales in `<name>_scale_inv`.
SCALE_SUFFIX = "_scale_inv"
# Which stored dtype kinds (workers/dtypes.py) a checkpoint may hold, by quant_method (None: unquantized).
ALLOWED_KINDS = {None: ("float",), "fp8": ("float", "fp8"), "mxfp4": ("float", "int")}  # int: experts only


def checkpoint_name(family: str, name: str) -> str:
    """Map a parameter name of our model to the name the checkpoint stores it under."""
    if name.startswith("lm_head."):
        return name
    name = "model." + name
    for ours, theirs in RENAMES.get(family, []):
        name = name.replace(ours, theirs)
    return name


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int   # absolute byte offset in file
    nbytes: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse one safetensors header and check the file holds all the bytes it promises."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path} is truncated ({size} bytes): re-download the shard")
            (hlen,) = struct.unpack("<Q", raw)
            if hlen > size - 8:
                raise CheckpointError(f"{path} is truncated or not a safetensors file "
                                      f"(header claims {hlen} bytes, file has {size}): re-download the shard")
            header = json.loads(f.read(hlen))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read safetensors header of {path}: {e}") from None
    base = 8 + hlen
    out, end = {}, base
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta["dtype"] not in FILE_DTYPES:
            raise CheckpointError(f"tensor {name} in {path} has unsupported dtype {meta['dtype']}; "
                                  f"moeshard reads {', '.join(FILE_DTYPES)}: convert the checkpoint")
        a, b = meta["data_offsets"]
        out[name] = TensorInfo(path, meta["dtype"], tuple(meta["shape"]), base + a, b - a)
        end = max(end, base + b)
    if end > size:
        raise CheckpointError(f"{path} is truncated: tensors need {end} bytes but the file has {size}; "
                              "re-download the shard")
    return out


@dataclass(frozen=True)
class CheckpointSummary:
    """What a checkpoint is, read from its config and headers only (`moeshard plan` prints it)."""

    family: str
    layers: int
    moe_layers: int
    experts_per_layer: int
    top_k: int
    dense_dtypes: tuple[str, ...]     # file dtypes of everything that is not a routed expert
    expert_dtypes: tuple[str, ...]    # file dtypes of the routed experts' weights (scales not counted)
    expert_format: str                # how the workers hold them: "dense" (compute dtype), "fp8", ...
    quantization: str                 # "none", or the method with its block size
    rope: str
    expert_file_bytes: int            # the largest routed expert in the files (weights plus scales)
    expert_held_bytes: int            # one slot: the largest expert as held in a store
    total_expert_bytes: int           # every routed expert as held
    token_read_bytes: int             # what one token reads when every expert it routes to is paged in

    def lines(self, compute_dtype: str) -> list[str]:
        from workers.units import format_bytes

        def b(n: int) -> str:
            return f"{n} B ({format_bytes(n)})"

        held = "as stored" if self.expert_format != "dense" else f"in {compute_dtype}"
        return [
            f"model: {self.family}, {self.layers} layers ({self.moe_layers} MoE), {self.experts_per_layer} experts "
            f"per MoE layer, top-{self.top_k}, rope {self.rope}",
            f"weights: dense part {'/'.join(self.dense_dtypes)} (computed in {compute_dtype}), experts "
            f"{'/'.join(self.expert_dtypes)} held {self.expert_format} {held}; quantization {self.quantization}",
            f"expert bytes: {b(self.expert_held_bytes)} per expert held ({b(self.expert_file_bytes)} in the files), "
            f"{b(self.total_expert_bytes)} in all; one token reads up to {b(self.token_read_bytes)} of experts "
            f"(top-{self.top_k} x {self.moe_layers} MoE layers)",
        ]


class Checkpoint:
    """A validated checkpoint directory: config, tensor index, dense loading, expert specs."""

    def __init__(self, path: Path, config: ModelConfig, tensors: dict[str, TensorInfo]):
        self.path = path
        self.config = config
        self.tensors = tensors
        # (expert_dtype, group_size) of a `moeshard quantize`d checkpoint, else None (docs/quantization.md)
        try:
            self.expert_quantization = stored_quantization(json.loads((path / "config.json").read_text()),
                                                    str(path / "config.json"))
        except (OSError, ValueError) as e:
            raise CheckpointError(str(e)) from None

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Checkpoint":
        """Read config.json and all shard headers; raise CheckpointError on anything missing or broken."""
        root = Path(path)
        if not root.is_dir():
            raise CheckpointError(f"checkpoint directory {root} does not exist")
        config = load_config(root)
        q = config.quantization
        if q is not None and q.method == "mxfp4" and config.model_type not in MXFP4_EXPERTS:
            raise UnsupportedModelError(
                f"quantization_config.quant_method 'mxfp4' in {root / 'config.json'} is for gpt-oss's fused experts; "
                f"moeshard reads MXFP4 for {', '.join(MXFP4_EXPERTS)}, not {config.model_type}")
        index = root / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index ({e!r})") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in root.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {root}")
            weight_map = None
        tensors: dict[str, TensorInfo] = {}
        for name in files:
            p = root / name
            if not p.is_file():
                raise CheckpointError(f"shard {p} listed in {index.name} is missing: re-download the checkpoint")
            tensors.update(read_header(p))
        if weight_map is not None:
            for name, fname in weight_map.items():
                if name not in tensors or tensors[name].file.name != fname:
                    raise CheckpointError(f"tensor {name} is listed in {index} under {fname} but is not in that file")
        ckpt = cls(root, config, tensors)
        ckpt._check_dtypes()
        if q is not None and q.method == "fp8":
            ckpt._check_fp8_scales()
        ckpt.expert_specs()  # validates every expert's presence, shape and dtype without reading data
        return ckpt

    @property
    def fp8_block(self) -> tuple[int, int] | None:
        """[out, in] block of the FP8 scales (quantization_config.weight_block_size), None if not FP8."""
        q = self.config.quantization
        return tuple(q.weight_block_size) if q is not None and q.method == "fp8" else None

    def _check_dtypes(self) -> None:
        """Every tensor's dtype is one this checkpoint's quantization_config accounts for."""
        q = self.config.quantization
        method = q.method if q is not None else None
        allowed = ALLOWED_KINDS[method]
        # I8/U8 only for experts: MXFP4 blocks, or a `moeshard quantize`d checkpoint's weights and scales
        experts = self.expert_names() if method == "mxfp4" or self.expert_quantization is not None else set()
        for name, t in sorted(self.tensors.items()):
            kind = ROWS[t.dtype].kind
            if kind == "float" or (kind in allowed and kind != "int") or (kind == "int" and name in experts):
                continue
            holder = f"quant_method {method!r}" if method else "a checkpoint without quantization_config"
            raise CheckpointError(
                f"tensor {name} in {t.file.name} is {t.dtype}, which {holder} does not hold outside its experts; "
                f"moeshard reads {', '.join(FLOAT_FILE_DTYPES)}, F8_E4M3 weights with quantization_config "
                "quant_method fp8, U8 MXFP4 expert blocks with mxfp4, and I8/U8 experts of a `moeshard quantize`d "
                "checkpoint: check config.json or convert the checkpoint")

    def _check_fp8_scales(self) -> None:
        """Each FP8 weight has its float32 `_scale_inv` of one scale per block (edge blocks partial),
        and each scale its FP8 weight, before anything loads."""
        q = self.config.quantization
        block = q.weight_block_size
        where = f"quantization_config.weight_block_size in {self.path / 'config.json'}"
        if block is None or len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
            raise CheckpointError(f"{where} is {list(block) if block else None}: FP8 block scales need "
                                  "[out, in] positive block sizes, e.g. [128, 128]")
        for name, t in sorted(self.tensors.items()):
            if name.endswith(SCALE_SUFFIX):
                w = self.tensors.get(name[:-len(SCALE_SUFFIX)])
                if w is None or w.dtype != "F8_E4M3":
                    raise CheckpointError(f"scale tensor {name} in {t.file.name} has no F8_E4M3 weight "
                                          f"{name[:-len(SCALE_SUFFIX)]}: the checkpoint is incomplete or mislabelled")
                continue
            if t.dtype != "F8_E4M3":
                continue
            if len(t.shape) != 2:
                raise CheckpointError(f"FP8 tensor {name} in {t.file.name} has shape {list(t.shape)}; moeshard "
                                      "reads FP8 block-quantized 2-D linear weights only")
            s = self.tensors.get(name + SCALE_SUFFIX)
            if s is None:
                raise CheckpointError(f"FP8 tensor {name} in {t.file.name} has no scale tensor "
                                      f"{name + SCALE_SUFFIX}: FP8 weights need their float32 block scales "
                                      "(re-download the shard)")
            grid = block_grid(t.shape, block)
            if s.dtype != "F32" or s.shape != grid:
                raise CheckpointError(
                    f"scale tensor {name + SCALE_SUFFIX} in {s.file.name} is {s.dtype} {list(s.shape)} but the "
                    f"FP8 weight {list(t.shape)} in {list(block)} blocks ({where}) needs F32 {list(grid)}: "
                    "the checkpoint and config.json disagree")

    def info(self, name: str, shape: tuple[int, ...] | None = None) -> TensorInfo:
        """Header entry of tensor `name`, checked against the shape the config implies."""
        t = self.tensors.get(name)
        if t is None:
            raise CheckpointError(f"tensor {name} is missing from the checkpoint at {self.path}")
        if shape is not None and tuple(shape) != t.shape:
            raise CheckpointError(f"tensor {name} in {t.file.name} has shape {list(t.shape)} but the config "
                                  f"implies {list(shape)}: the checkpoint and config.json disagree")
        return t

    def expert_tensor_names(self, layer: int, expert: int) -> tuple[str, str, str]:
        fam = self.config.model_type if self.config.model_type in EXPERT_NAMES else "default"
        return tuple(EXPERT_NAMES[fam].format(l=layer, e=expert, w=w) for w in EXPERT_PARTS[fam])

    def expert_specs(self, expert_dtype: str | None = None, group_size: int = DEFAULT_GROUP_SIZE) -> list[ExpertSpec]:
        """Every routed expert as plain data: file, absolute offset, dtype, shape of its three weights
        (and their scales in a quantized checkpoint), held as `expert_dtype` (None: as stored)."""
        c = self.config
        if c.model_type in MXFP4_EXPERTS and c.quantization is not None and c.quantization.method == "mxfp4":
            return self._held_as(self._mxfp4_specs(), expert_dtype, group_size)
        if c.model_type in FUSED_EXPERTS:
            raise UnsupportedModelError(
                f"{c.model_type} experts fused per layer unquantized (mlp.experts."
                f"{', '.join(FUSED_EXPERTS[c.model_type])}) are not supported by the expert workers; moeshard reads "
                f"{c.model_type} as released, its experts in MXFP4 (quantization_config quant_method mxfp4)")
        H, I = c.hidden_size, c.moe_intermediate_size
        q = self.expert_quantization
        specs = []
        for layer in c.moe_layer_ids:
            for e in range(c.num_experts):
                names = self.expert_tensor_names(layer, e)
                if q is None and any(self.info(n).dtype == "F8_E4M3" for n in names):
                    specs.append(self._fp8_spec(layer, e, names))
                    continue
                parts, scales = [], []
                for name, shape in zip(names, ((I, H), (I, H), (H, I))):
                    weight, *extra = [self._tensor_spec(n, s) for n, s in stored_tensors(q, name, shape)]
                    parts.append(weight)
                    scales += extra
                specs.append(ExpertSpec(layer, e, *parts, activation=c.hidden_act, stored=q and q[0],
                                        group_size=q[1] if q else 0, scales=tuple(scales)))
        return self._held_as(specs, expert_dtype, group_size)

    def _held_as(self, specs: list[ExpertSpec], expert_dtype: str | None, group_size: int) -> list[ExpertSpec]:
        try:
            return held_as(specs, expert_dtype, group_size)
        except ValueError as e:
            raise CheckpointError(f"{self.path}: {e}") from None

    def _fp8_spec(self, layer: int, e: int, names: tuple[str, str, str]) -> ExpertSpec:
        """An FP8 expert as DeepSeek-V3 ships it: it stays FP8 in every tier, the workers reading weights
        and block scales as stored."""
        c = self.config
        H, I = c.hidden_size, c.moe_intermediate_size
        parts = [self._tensor_spec(n, shape) for n, shape in zip(names, ((I, H), (I, H), (H, I)))]
        if not all(p.dtype == "F8_E4M3" for p in parts):
            raise CheckpointError(f"expert {e} of layer {layer} mixes FP8 and unquantized weights "
                                  f"({', '.join(f'{n} {p.dtype}' for n, p in zip(names, parts))}); "
                                  "moeshard holds an expert in one format")
        scales = tuple(self._tensor_spec(n + SCALE_SUFFIX) for n in names)
        return ExpertSpec(layer, e, *parts, activation=c.hidden_act, stored="fp8", scales=scales,
                          block=self.fp8_block)

    def summary(self, itemsize: int) -> CheckpointSummary:
        """What this checkpoint is, with experts held in a compute dtype of `itemsize` bytes
        (workers/budget.py sizes the slots)."""
        from workers.budget import expert_nbytes, slot_bytes

        c, specs = self.config, self.expert_specs()
        experts = self.expert_names()
        q = c.quantization
        if q is None:
            quant = "none"
        elif q.weight_block_size:
            quant = f"{q.method} ({q.fmt or 'e4m3'}, {'x'.join(map(str, q.weight_block_size))} blocks)"
        else:
            quant = q.method
        moe = len(c.moe_layer_ids)
        held = slot_bytes(specs, itemsize)
        return CheckpointSummary(
            family=c.model_type, layers=c.num_layers, moe_layers=moe, experts_per_layer=c.num_experts,
            top_k=c.top_k,
            dense_dtypes=tuple(sorted({t.dtype for n, t in self.tensors.items()
                                       if n not in experts and not _is_mtp(n, c)})),
            expert_dtypes=tuple(sorted({t.dtype for s in specs for t in s.tensors})),
            expert_format="/".join(sorted({s.held_format for s in specs})) or "none",
            quantization=quant, rope=c.rope.kind,
            expert_file_bytes=max((s.file_nbytes for s in specs), default=0),
            expert_held_bytes=held,
            total_expert_bytes=sum(expert_nbytes(s, itemsize) for s in specs),
            token_read_bytes=min(c.top_k, c.num_experts) * moe * max((s.file_nbytes for s in specs), default=0))

    def _mxfp4_specs(self) -> list[ExpertSpec]:
        """gpt-oss in MXFP4: each expert is its slice (along the expert axis) of the layer's fused
        blocks [E, 2I, H/32, 16], scales [E, 2I, H/32] (e8m0), and biases; gate/up interleaved."""
        c = self.config
        E, H, I = c.num_experts, c.hidden_size, c.moe_intermediate_size
        if H % 32 or I % 32:
            raise CheckpointError(f"MXFP4 experts need hidden_size ({H}) and intermediate_size ({I}) that are "
                                  f"multiples of 32 (one e8m0 scale per 32 weights): check {self.path / 'config.json'}")
        shapes = {"gate_up_proj_blocks": ((E, 2 * I, H // 32, 16), "U8"),
                  "gate_up_proj_scales": ((E, 2 * I, H // 32), "U8"),
                  "gate_up_proj_bias": ((E, 2 * I), None),
                  "down_proj_blocks": ((E, H, I // 32, 16), "U8"),
                  "down_proj_scales": ((E, H, I // 32), "U8"),
                  "down_proj_bias": ((E, H), None)}
        specs = []
        for layer in c.moe_layer_ids:
            fused = {}
            for short, (shape, dtype) in shapes.items():
                name = t_name(layer, short)
                t = self.info(name, shape)
                if (dtype or "float") != (t.dtype if dtype else ROWS[t.dtype].kind):
                    raise CheckpointError(f"tensor {name} in {t.file.name} is {t.dtype}; MXFP4 experts store "
                                          f"{dtype or 'a float dtype'} there (quantization_config quant_method mxfp4)")
                fused[short] = t
            for e in range(E):
                part = {}
                for short, t in fused.items():
                    per = t.nbytes // E
                    rows = t.shape[1]
                    # 2-D per expert: blocks as [rows, bytes], the rest as stored
                    shape = (rows, per // (rows * ROWS[t.dtype].itemsize)) if len(t.shape) > 2 else t.shape[1:]
                    part[short] = TensorSpec(str(t.file.resolve()), f"{t_name(layer, short)}[{e}]", t.dtype,
                                             tuple(shape), t.offset + e * per, per)
                gu = part["gate_up_proj_blocks"]
                specs.append(ExpertSpec(
                    layer, e, gu, gu, part["down_proj_blocks"], activation=c.hidden_act, expert_dtype="mxfp4",
                    stored="mxfp4", scales=(part["gate_up_proj_scales"], part["gate_up_proj_bias"],
                                            part["down_proj_scales"], part["down_proj_bias"]),
                    swiglu=(c.swiglu_alpha, c.swiglu_limit)))
        return specs

    def _tensor_spec(self, name: str, shape: tuple[int, ...] | None = None) -> TensorSpec:
        t = self.info(name, shape)
        return TensorSpec(str(t.file.resolve()), name, t.dtype, t.shape, t.offset, t.nbytes)

    def expert_names(self) -> set[str]:
        c, q = self.config, self.expert_quantization
        fused = MXFP4_EXPERTS if c.quantization is not None and c.quantization.method == "mxfp4" else FUSED_EXPERTS
        if c.model_type in fused:
            return {t_name(l, w) for l in c.moe_layer_ids for w in fused[c.model_type]}
        H, I = c.hidden_size, c.moe_intermediate_size
        names = {n for l in c.moe_layer_ids for e in range(c.num_experts)
                 for name, shape in zip(self.expert_tensor_names(l, e), ((I, H), (I, H), (H, I)))
                 for n, _ in stored_tensors(q, name, shape)}
        return names | {n + SCALE_SUFFIX for n in names if n + SCALE_SUFFIX in self.tensors}

    def load_dense(self, model: torch.nn.Module) -> set[str]:
        """Fill every parameter and buffer of `model` from the checkpoint; return the checkpoint names loaded.

        Fails on any missing tensor, any shape mismatch, and any checkpoint tensor that is
        neither loaded nor a routed expert (a sign the config and weights disagree).
        """
        fam = self.config.model_type
        state = model.state_dict(keep_vars=True)
        wanted: dict[str, list[str]] = {}
        for ours, p in state.items():
            if ours == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            theirs = checkpoint_name(fam, ours)
            self.info(theirs, tuple(p.shape))
            wanted.setdefault(theirs, []).append(ours)
        by_file: dict[Path, list[str]] = {}
        for theirs in wanted:
            by_file.setdefault(self.tensors[theirs].file, []).append(theirs)
        # a bar on a terminal only (disable=None): the dense part of a big model is many GB
        bar = tqdm(total=sum(self.tensors[n].nbytes for n in wanted), desc="loading dense weights", unit="B",
                   unit_scale=True, disable=None, leave=False)
        scales = {n + SCALE_SUFFIX for n in wanted if self.tensors[n].dtype == "F8_E4M3"}
        with torch.no_grad(), bar, ExitStack() as files:
            handles: dict[Path, object] = {}

            def handle(path: Path):
                if path not in handles:
                    handles[path] = files.enter_context(safe_open(str(path), framework="pt"))
                return handles[path]

            for path, names in by_file.items():
                for theirs in names:
                    value = handle(path).get_tensor(theirs)
                    bar.update(self.tensors[theirs].nbytes)
                    if value.dtype == torch.float8_e4m3fn:  # dense FP8 weights: dequantized once, here
                        s = theirs + SCALE_SUFFIX
                        value = dequantize_fp8(value, handle(self.tensors[s].file).get_tensor(s), self.fp8_block,
                                               torch.float32)
                    for ours in wanted[theirs]:
                        target = state[ours]
                        # The model was built in its compute dtype (float32 where the reference keeps it).
                        target.data = value.to(target.dtype)
        loaded = set(wanted) | scales
        extra = set(self.tensors) - loaded - self.expert_names()
        mtp = {n for n in extra if _is_mtp(n, self.config)}
        if mtp:
            log.info("skipping %d tensors of the multi-token-prediction layer (model.layers.%d and up, "
                     "num_nextn_predict_layers=%d): moeshard decodes one token per step",
                     len(mtp), self.config.num_layers, self.config.num_nextn_predict_layers)
        extra = {n for n in extra - mtp if not _ignorable(n, self.tensors[n])}
        if extra:
            raise CheckpointError(f"checkpoint at {self.path} has tensors the {fam} config does not account for: "
                                  f"{', '.join(sorted(extra)[:5])}{' ...' if len(extra) > 5 else ''}; "
                                  "check that config.json matches the weights")
        return loaded


def t_name(layer: int, short: str) -> str:
    """The checkpoint name of a fused expert tensor of `layer` (gpt-oss)."""
    return f"model.layers.{layer}.mlp.experts.{short}"


def _is_mtp(name: str, config: ModelConfig) -> bool:
    """A tensor of a multi-token-prediction layer: DeepSeek-V3/R1 and GLM-4.5 store them as extra
    decoder layers at index num_hidden_layers and up, announced by num_nextn_predict_layers."""
    parts = name.split(".")
    if config.num_nextn_predict_layers <= 0 or len(parts) < 3 or parts[:2] != ["model", "layers"]:
        return False
    return parts[2].isdigit() and \
        config.num_layers <= int(parts[2]) < config.num_layers + config.num_nextn_predict_layers


def _ignorable(name: str, info: TensorInfo) -> bool:
    """Tensors real checkpoints carry that a decoder-only forward never uses."""
    if name.endswith("rotary_emb.inv_freq"):
        return True
    if 0 in info.shape:  # e.g. DeepSeek with n_shared_experts=0 still saves empty shared-expert weights
        return True
    return False
