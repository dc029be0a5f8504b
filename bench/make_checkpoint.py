"""Write the synthetic benchmark checkpoint ("mix8x32", or "tiny" for the smoke test).

A Mixtral-format Hugging Face checkpoint with random weights, written tensor by tensor
with a streaming safetensors writer, so memory stays at one tensor (8 MB for mix8x32)
whatever the model size:

- one shard per decoder layer (`model-0000i-of-0000N.safetensors`, the embeddings in the
  first, the final norm and LM head in the last) and `model.safetensors.index.json`;
- HF tensor names (`model.layers.{l}.block_sparse_moe.experts.{e}.w1/w2/w3.weight`, ...);
- each expert's w1, w3, w2 are adjacent in its file, and every file's data section starts
  on a 4 KiB boundary, so one expert is one contiguous, page-aligned byte range;
- a MixtralConfig-compatible config.json (transformers 5 `rope_parameters` plus the
  legacy `rope_theta`).

Weights are N(0, 1/sqrt(fan_in)) so activations keep their scale through the layers;
routers are N(0, 2/sqrt(hidden)), which puts router logits at std ~2: softmax routing that
is neither uniform nor collapsed onto a few experts. Everything is deterministic in `seed`.

    python -m bench.make_checkpoint                 # bench/cache/mix8x32 (about 6.2 GiB)
    python -m bench.make_checkpoint --tiny          # bench/cache/tiny (a few MB)
    python -m bench.make_checkpoint --preset skew16 --skew 1   # scenario 9's skewed-routing model
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import struct
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from workers.dtypes import COMPUTE_DTYPES, file_dtype_name
from workers.units import format_bytes

CACHE_DIR = Path(os.environ.get("MOESHARD_BENCH_CACHE", Path(__file__).resolve().parent / "cache"))
MANIFEST = "bench-manifest.json"
_DATA_ALIGN = 4096
DTYPES = COMPUTE_DTYPES


@dataclass(frozen=True)
class Preset:
    """Shape of a synthetic Mixtral model."""

    layers: int
    experts: int
    top_k: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    max_positions: int = 4096

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def expert_numel(self) -> int:
        return 3 * self.hidden * self.intermediate

    def dense_numel(self) -> int:
        H, D = self.hidden, self.head_dim
        attn = H * self.heads * D * 2 + H * self.kv_heads * D * 2
        per_layer = attn + 2 * H + self.experts * H
        return self.layers * per_layer + 2 * self.vocab * H + H


PRESETS = {
    "mix8x32": Preset(layers=8, experts=32, top_k=2, hidden=1024, intermediate=2048, heads=16, kv_heads=4,
                      vocab=4096),
    "tiny": Preset(layers=2, experts=8, top_k=2, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=256,
                   max_positions=1024),
    # the placement bench's skewed-routing model (written with skew > 0): 64 experts of 6 MiB in float32
    "skew16": Preset(layers=4, experts=16, top_k=2, hidden=512, intermediate=1024, heads=8, kv_heads=2,
                     vocab=2048, max_positions=1024),
}


def config_dict(p: Preset, dtype: torch.dtype) -> dict:
    """config.json contents that MixtralConfig (transformers 4.x and 5.x) and moeshard both read."""
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": p.vocab,
        "hidden_size": p.hidden,
        "intermediate_size": p.intermediate,
        "num_hidden_layers": p.layers,
        "num_attention_heads": p.heads,
        "num_key_value_heads": p.kv_heads,
        "head_dim": p.head_dim,
        "num_local_experts": p.experts,
        "num_experts_per_tok": p.top_k,
        "hidden_act": "silu",
        "max_position_embeddings": p.max_positions,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1000000.0,
        "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
        "sliding_window": None,
        "attention_dropout": 0.0,
        "router_jitter_noise": 0.0,
        "router_aux_loss_coef": 0.0,
        "output_router_logits": False,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "dtype": str(dtype).replace("torch.", ""),
        "torch_dtype": str(dtype).replace("torch.", ""),
    }


# ---- what goes where --------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    init: str          # "normal" (std), "norm" (1 + N(0, std))
    std: float


def shard_plans(p: Preset) -> list[list[TensorPlan]]:
    """Tensors of each shard, in file order (one shard per layer)."""
    H, I, D = p.hidden, p.intermediate, p.head_dim
    lin = 1 / math.sqrt(H)
    shards = []
    for l in range(p.layers):
        pre = f"model.layers.{l}"
        ts: list[TensorPlan] = []
        if l == 0:
            ts.append(TensorPlan("model.embed_tokens.weight", (p.vocab, H), "normal", 1.0))
        ts += [
            TensorPlan(f"{pre}.input_layernorm.weight", (H,), "norm", 0.1),
            TensorPlan(f"{pre}.self_attn.q_proj.weight", (p.heads * D, H), "normal", lin),
            TensorPlan(f"{pre}.self_attn.k_proj.weight", (p.kv_heads * D, H), "normal", lin),
            TensorPlan(f"{pre}.self_attn.v_proj.weight", (p.kv_heads * D, H), "normal", lin),
            TensorPlan(f"{pre}.self_attn.o_proj.weight", (H, p.heads * D), "normal", 1 / math.sqrt(p.heads * D)),
            TensorPlan(f"{pre}.post_attention_layernorm.weight", (H,), "norm", 0.1),
            TensorPlan(f"{pre}.block_sparse_moe.gate.weight", (p.experts, H), "normal", 2 * lin),
        ]
        for e in range(p.experts):
            ex = f"{pre}.block_sparse_moe.experts.{e}"
            ts += [TensorPlan(f"{ex}.w1.weight", (I, H), "normal", lin),
                   TensorPlan(f"{ex}.w3.weight", (I, H), "normal", lin),
                   TensorPlan(f"{ex}.w2.weight", (H, I), "normal", 1 / math.sqrt(I))]
        if l == p.layers - 1:
            ts += [TensorPlan("model.norm.weight", (H,), "norm", 0.1),
                   TensorPlan("lm_head.weight", (p.vocab, H), "normal", lin)]
        shards.append(ts)
    return shards


def _rng(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8],
                                                        "little") & (2**63 - 1))


def _generate(t: TensorPlan, seed: int, dtype: torch.dtype, skew: float = 0.0) -> torch.Tensor:
    x = torch.randn(t.shape, generator=_rng(seed, t.name), dtype=torch.float32).mul_(t.std)
    if t.init == "norm":
        x.add_(1.0)
    if skew:
        _skew(t, x, seed, skew)
    return x.to(dtype)


def _skew(t: TensorPlan, x: torch.Tensor, seed: int, skew: float) -> None:
    """A biased router: every token embedding gets a shared direction u, and each layer's router rows
    get +bias_e * u with bias falling off as 1/rank over a per-layer random ranking of its experts, so
    the residual stream's u component pushes every token toward the same few hot experts per layer."""
    H = x.shape[-1]
    u = torch.randn(H, generator=_rng(seed, "skew-direction"))
    u /= u.norm()
    if t.name == "model.embed_tokens.weight":
        x.add_(u * (skew * math.sqrt(H) ** 0.5))
    elif t.name.endswith("block_sparse_moe.gate.weight"):
        E = x.shape[0]
        rank = torch.randperm(E, generator=_rng(seed, t.name + ":rank"))
        bias = skew * 4.0 / (1.0 + rank.float())
        x.add_(bias[:, None] * u[None, :])


# ---- streaming safetensors writer --------------------------------------------------------------

def write_safetensors(path: Path, tensors: list[TensorPlan], dtype: torch.dtype,
                      make: Callable[[TensorPlan], torch.Tensor], metadata: dict | None = None) -> int:
    """Write `tensors` in this order, one at a time; the data section starts on a 4 KiB boundary."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    off = 0
    for t in tensors:
        nbytes = math.prod(t.shape) * itemsize
        header[t.name] = {"dtype": file_dtype_name(dtype), "shape": list(t.shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    pad = (-(8 + len(raw))) % _DATA_ALIGN
    raw += b" " * pad
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors:
            x = make(t).contiguous()
            assert x.dtype == dtype and tuple(x.shape) == t.shape
            f.write(memoryview(x.view(torch.uint8).numpy()) if dtype != torch.float32 else memoryview(x.numpy()))
    return 8 + len(raw) + off


# ---- the checkpoint ---------------------------------------------------------------------------

def expected_manifest(preset: str, dtype: str, seed: int, skew: float = 0.0) -> dict:
    m = {"preset": preset, "dtype": dtype, "seed": seed, "shape": asdict(PRESETS[preset]), "format": 1}
    return {**m, "skew": skew} if skew else m     # unskewed manifests keep their old form


def is_complete(path: Path, preset: str, dtype: str = "float32", seed: int = 0, skew: float = 0.0) -> bool:
    """True if `path` holds a finished checkpoint of exactly this preset/dtype/seed (and skew)."""
    try:
        m = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    want = expected_manifest(preset, dtype, seed, skew)
    if {k: m.get(k) for k in want} != want or (not skew and m.get("skew")):
        return False
    return all((path / f).is_file() and (path / f).stat().st_size == n for f, n in m.get("files", {}).items())


def make_checkpoint(dest: str | Path | None = None, preset: str = "mix8x32", *, dtype: str = "float32",
                    seed: int = 0, force: bool = False, progress: bool = False, skew: float = 0.0) -> Path:
    """Write (or reuse) the checkpoint; returns its directory. Written into a temp dir, then renamed.
    `skew` > 0 biases the routers toward a few hot experts per layer (see `_skew`)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {sorted(DTYPES)}")
    p, tdtype = PRESETS[preset], DTYPES[dtype]
    name = preset if dtype == "float32" else f"{preset}-{dtype}"
    dest = Path(dest) if dest is not None else CACHE_DIR / (name if not skew else f"{name}-skew{skew:g}")
    if not force and is_complete(dest, preset, dtype, seed, skew):
        return dest
    tmp = dest.with_name(dest.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    plans = shard_plans(p)
    n = len(plans)
    weight_map, files, total = {}, {}, 0
    bar = _progress(sum(math.prod(t.shape) for s in plans for t in s) * tdtype.itemsize, progress, preset)
    t0 = time.perf_counter()

    def make(t: TensorPlan) -> torch.Tensor:
        x = _generate(t, seed, tdtype, skew)
        bar.update(x.numel() * x.element_size())
        return x

    for i, tensors in enumerate(plans):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        files[fname] = write_safetensors(tmp / fname, tensors, tdtype, make)
        total += files[fname]
        weight_map.update({t.name: fname for t in tensors})
    bar.close()
    data_bytes = sum(math.prod(t.shape) for s in plans for t in s) * tdtype.itemsize
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": data_bytes}, "weight_map": weight_map}, indent=1))
    (tmp / "config.json").write_text(json.dumps(config_dict(p, tdtype), indent=2))
    (tmp / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "do_sample": False}, indent=2))
    expert_bytes = p.layers * p.experts * p.expert_numel() * tdtype.itemsize
    manifest = {**expected_manifest(preset, dtype, seed, skew), "files": files, "total_bytes": total,
                "expert_bytes": expert_bytes, "dense_bytes": data_bytes - expert_bytes,
                "seconds_to_write": round(time.perf_counter() - t0, 1)}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return dest


def manifest(path: str | Path) -> dict:
    return json.loads((Path(path) / MANIFEST).read_text())


class _NoBar:
    def update(self, n: int) -> None: ...
    def close(self) -> None: ...


def _progress(total: int, on: bool, name: str):
    if not on:
        return _NoBar()
    from tqdm import tqdm
    return tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {name}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m bench.make_checkpoint")
    ap.add_argument("--tiny", action="store_true", help="write the tiny preset (smoke tests) instead of mix8x32")
    ap.add_argument("--preset", choices=sorted(PRESETS), help="preset name (default mix8x32, or tiny with --tiny)")
    ap.add_argument("--out", type=Path, help=f"checkpoint directory (default {CACHE_DIR}/<preset>)")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="rewrite even if a complete copy exists")
    ap.add_argument("--skew", type=float, default=0.0,
                    help="bias the routers toward a few hot experts per layer (scenario 9 uses --preset skew16 "
                         "--skew 1); 0 = unbiased")
    a = ap.parse_args(argv)
    if not (a.skew >= 0 and math.isfinite(a.skew)):
        ap.error(f"--skew must be a finite number >= 0, got {a.skew}")
    preset = a.preset or ("tiny" if a.tiny else "mix8x32")
    path = make_checkpoint(a.out, preset, dtype=a.dtype, seed=a.seed, force=a.force, progress=True, skew=a.skew)
    m = manifest(path)
    print(f"{path}: {preset}, {format_bytes(m['total_bytes'])} "
          f"({format_bytes(m['expert_bytes'])} routed experts), written in {m['seconds_to_write']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
