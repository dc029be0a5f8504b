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
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from workers.spec import DTYPE_SIZES, ExpertSpec, TensorSpec

from .config import ModelConfig, load_config
from .errors import CheckpointError, UnsupportedModelError

log = logging.getLogger(__name__)

TORCH_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}

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

# What each quantization method is, for the one-line refusal until its loader exists (issue 12).
PENDING_QUANT = {"fp8": "FP8 block-quantized weights", "mxfp4": "MXFP4 experts"}


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
        if meta["dtype"] not in DTYPE_SIZES:
            raise CheckpointError(f"tensor {name} in {path} has unsupported dtype {meta['dtype']}; "
                                  f"moeshard reads {', '.join(DTYPE_SIZES)}: convert the checkpoint")
        a, b = meta["data_offsets"]
        out[name] = TensorInfo(path, meta["dtype"], tuple(meta["shape"]), base + a, b - a)
        end = max(end, base + b)
    if end > size:
        raise CheckpointError(f"{path} is truncated: tensors need {end} bytes but the file has {size}; "
                              "re-download the shard")
    return out


class Checkpoint:
    """A validated checkpoint directory: config, tensor index, dense loading, expert specs."""

    def __init__(self, path: Path, config: ModelConfig, tensors: dict[str, TensorInfo]):
        self.path = path
        self.config = config
        self.tensors = tensors

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Checkpoint":
        """Read config.json and all shard headers; raise CheckpointError on anything missing or broken."""
        root = Path(path)
        if not root.is_dir():
            raise CheckpointError(f"checkpoint directory {root} does not exist")
        config = load_config(root)
        q = config.quantization
        if q is not None:
            raise UnsupportedModelError(
                f"{PENDING_QUANT[q.method]} (quantization_config.quant_method {q.method!r} in {root / 'config.json'}) "
                "are not yet supported (issue 12): use a bfloat16 copy of the checkpoint")
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
        ckpt.expert_specs()  # validates every expert's presence, shape and dtype without reading data
        return ckpt

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

    def expert_specs(self) -> list[ExpertSpec]:
        """Every routed expert as plain data: file, absolute offset, dtype, shape of its three weights."""
        c = self.config
        if c.model_type in FUSED_EXPERTS:
            raise UnsupportedModelError(
                f"{c.model_type} experts fused per layer (mlp.experts.{', '.join(FUSED_EXPERTS[c.model_type])}; "
                "biases, clamped SwiGLU) are not yet supported by the expert workers (issue 12 item 3)")
        H, I = c.hidden_size, c.moe_intermediate_size
        specs = []
        for layer in c.moe_layer_ids:
            for e in range(c.num_experts):
                parts = []
                for name, shape in zip(self.expert_tensor_names(layer, e), ((I, H), (I, H), (H, I))):
                    t = self.info(name, shape)
                    parts.append(TensorSpec(str(t.file.resolve()), name, t.dtype, t.shape, t.offset, t.nbytes))
                specs.append(ExpertSpec(layer, e, *parts, activation=c.hidden_act))
        return specs

    def expert_names(self) -> set[str]:
        c = self.config
        if c.model_type in FUSED_EXPERTS:
            return {f"model.layers.{l}.mlp.experts.{w}" for l in c.moe_layer_ids for w in FUSED_EXPERTS[c.model_type]}
        return {n for l in c.moe_layer_ids for e in range(c.num_experts) for n in self.expert_tensor_names(l, e)}

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
        with torch.no_grad(), bar:
            for path, names in by_file.items():
                with safe_open(str(path), framework="pt") as f:
                    for theirs in names:
                        value = f.get_tensor(theirs)
                        bar.update(self.tensors[theirs].nbytes)
                        for ours in wanted[theirs]:
                            target = state[ours]
                            # The model was built in its compute dtype (float32 where the reference keeps it).
                            target.data = value.to(target.dtype)
        loaded = set(wanted)
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
