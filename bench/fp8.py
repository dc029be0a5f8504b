"""FP8 experts against BF16 experts on mix8x32 (issue 12 item 2): decode tok/s and bytes read per token,
in memory and out of core, plus what dequantizing an FP8 expert costs per token.

    python -m bench.fp8 [--tokens 24] [--rounds 2] [--budget 0.25] [--out bench/results/DATE-vm-fp8.md]

mix8x32 is written in bfloat16 (bench/make_checkpoint.py), then converted to FP8 the way DeepSeek-V3
ships it: every linear weight but the router and the LM head as float8_e4m3fn with float32
`_scale_inv` per 128x128 block, `quantization_config = {quant_method: fp8, weight_block_size}`.
Both run in this process, one after the other in interleaved rounds (BF16, FP8, BF16, FP8), compute
dtype bfloat16, 0 workers. Out of core, both get the same budget in bytes: a fraction of the BF16
experts' bytes, so FP8 holds about twice as many experts. The machine is shared: the figures are noisy.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
from pathlib import Path

import torch

from bench.make_checkpoint import CACHE_DIR, make_checkpoint
from workers.kernels import quantize_fp8
from workers.units import format_bytes

log = logging.getLogger(__name__)

BLOCK = (128, 128)


def is_fp8_weight(name: str) -> bool:
    """The tensors DeepSeek-V3 ships in FP8: linear weights except the router, embeddings and LM head."""
    return name.endswith(".weight") and "norm" not in name and not any(
        k in name for k in ("embed_tokens", "lm_head", ".gate.weight"))


def convert_to_fp8(src: Path, dst: Path) -> Path:
    """dst: src with its linear weights in FP8 blocks (reused when complete)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    done = dst / "config.json"
    if done.exists():
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    weight_map = {}
    for fname in sorted(set(index["weight_map"].values())):
        out = {}
        with safe_open(str(src / fname), "pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                if is_fp8_weight(name) and t.ndim == 2:
                    out[name], out[name + "_scale_inv"] = quantize_fp8(t, BLOCK)
                else:
                    out[name] = t
        save_file(out, str(dst / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in out})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for extra in ("generation_config.json",):
        if (src / extra).exists():
            (dst / extra).write_text((src / extra).read_text())
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": list(BLOCK)}
    done.write_text(json.dumps(cfg, indent=2))
    return dst


def decode(path: Path, tokens: int, budget: int | None) -> dict:
    """Batch-1 greedy decode of `tokens` tokens after an 8-token prompt; tok/s and bytes read per token."""
    from coordinator import Coordinator

    ids = torch.arange(3, 11).view(1, 8)
    with Coordinator.from_pretrained(path, dtype="bfloat16", worker_memory=budget) as c:
        c.generate(ids, max_new_tokens=2, do_sample=False, eos_token_id=None)       # warm up, first loads
        before = c.stats()["experts"]
        t0 = time.perf_counter()
        c.generate(ids, max_new_tokens=tokens, do_sample=False, eos_token_id=None)
        dt = time.perf_counter() - t0
        after = c.stats()["experts"]
    read = after["bytes_read"] - before["bytes_read"]
    hits = after["hits"] - before["hits"]
    misses = after["misses"] - before["misses"]
    # per generated token; the 8-token prompt's reads (generate runs it first) are included
    return {"tok_s": tokens / dt, "bytes_read_per_token": read / tokens, "hit_rate": hits / max(hits + misses, 1),
            "slot_bytes": after["actors"][0]["slot_bytes"], "slots": after["actors"][0]["slots"]}


def dequant_cost(path: Path, rounds: int = 20) -> dict:
    """Seconds per token that FP8 experts spend dequantizing: one mix8x32 expert's forward at batch 1,
    FP8 (dequantize, then the BF16 matmuls) against the same expert in BF16, times top_k x MoE layers."""
    from coordinator.checkpoint import Checkpoint
    from workers.store import ExpertStore

    ckpt = Checkpoint.open(path)
    specs = ckpt.expert_specs()[:1]
    store = ExpertStore(specs, dtype=torch.bfloat16)
    try:
        w = store.get(specs[0].key)
        dense = w.dense(torch.bfloat16)
        x = torch.randn(1, specs[0].hidden_size).bfloat16()

        def best(fn):
            fn()
            ts = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            return statistics.median(ts)

        fp8_s, bf16_s = best(lambda: w.forward(x)), best(lambda: dense.forward(x))
    finally:
        store.close()
    c = ckpt.config
    per_token = (fp8_s - bf16_s) * c.top_k * len(c.moe_layer_ids)
    return {"fp8_expert_s": fp8_s, "bf16_expert_s": bf16_s, "dequant_s_per_token": per_token}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fp8", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=24, help="decoded tokens per round (default 24)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds per system (default 2)")
    ap.add_argument("--budget", type=float, default=0.25,
                    help="out-of-core budget as a fraction of the BF16 experts' bytes (default 0.25)")
    ap.add_argument("--out", type=Path, default=None, help="markdown report (a .json beside it)")
    args = ap.parse_args(argv)
    if args.tokens < 1 or args.rounds < 1 or not 0 < args.budget < 1:
        ap.error("--tokens and --rounds must be >= 1 and --budget in (0, 1)")
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    bf16 = make_checkpoint(preset="mix8x32", dtype="bfloat16")
    fp8 = convert_to_fp8(bf16, CACHE_DIR / "mix8x32-fp8")
    from coordinator.checkpoint import Checkpoint
    from workers.budget import expert_nbytes

    bf16_bytes = sum(expert_nbytes(s, 2) for s in Checkpoint.open(bf16).expert_specs())
    fp8_bytes = sum(expert_nbytes(s, 2) for s in Checkpoint.open(fp8).expert_specs())
    budget = int(args.budget * bf16_bytes)
    runs: dict[str, list[dict]] = {}
    for r in range(args.rounds):
        for where, b in (("in memory", None), (f"out of core ({args.budget:.0%} of BF16 expert bytes)", budget)):
            for name, path in (("BF16", bf16), ("FP8", fp8)):
                res = decode(path, args.tokens, b)
                runs.setdefault(f"{where}|{name}", []).append(res)
                print(f"round {r + 1} {where} {name}: {res['tok_s']:.2f} tok/s, "
                      f"{format_bytes(int(res['bytes_read_per_token']))} read/token, hit rate {res['hit_rate']:.1%}")
    cost = dequant_cost(fp8)
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in runs.items()}
    date = time.strftime("%Y-%m-%d")
    lines = [f"# FP8 vs BF16 experts on mix8x32: {date} on {platform.node() or 'vm'}", "",
             f"torch {torch.__version__}, {torch.get_num_threads()} threads, shared machine (figures noisy). "
             f"Compute dtype bfloat16, 0 workers, batch-1 greedy decode of {args.tokens} tokens, medians of "
             f"{args.rounds} interleaved rounds. Experts as held: BF16 {format_bytes(bf16_bytes)}, "
             f"FP8 {format_bytes(fp8_bytes)} (1 byte a weight plus 128x128 block scales).", "",
             "| Setting | Experts | decode tok/s | bytes read / token | hit rate | slots |",
             "|---|---|---:|---:|---:|---:|"]
    for k, v in med.items():
        where, name = k.split("|")
        lines.append(f"| {where} | {name} | {v['tok_s']:.2f} | {format_bytes(int(v['bytes_read_per_token']))} | "
                     f"{v['hit_rate']:.1%} | {int(v['slots'])} |")
    lines += ["", f"Dequantizing, per token (top-2 x 8 MoE layers, batch 1): one FP8 expert forward "
              f"{cost['fp8_expert_s'] * 1e3:.2f} ms against {cost['bf16_expert_s'] * 1e3:.2f} ms in BF16, so "
              f"{cost['dequant_s_per_token'] * 1e3:.1f} ms per token spent dequantizing.", "",
              "Produced by: `python -m bench.fp8" + (f" --tokens {args.tokens}" if args.tokens != 24 else "") +
              (f" --rounds {args.rounds}" if args.rounds != 2 else "") + "`"]
    out = args.out or Path(__file__).resolve().parent / "results" / f"{date}-vm-fp8.md"
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"runs": runs, "medians": med, "dequant": cost,
                                                    "budget_bytes": budget, "bf16_expert_bytes": bf16_bytes,
                                                    "fp8_expert_bytes": fp8_bytes}, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
