#!/usr/bin/env python
"""The quality table of docs/quantization.md: the embedded model with its experts as stored (bf16)
and in int8, int4/g32, int4/g64, int4/g128, all computed in bf16.

- perplexity: `Coordinator.perplexity` over docs/data/heldout-pydoc.txt (held-out documents of
  the model's own training split), windows of 128 tokens (the model was trained on 128-token
  windows), stride 64;
- top-1 agreement: over the first 512 tokens of that text, teacher-forced in four 128-token
  windows, the share of positions where the format's most likely next token is the bf16 model's.

    python scripts/quant_quality.py [--model models/pydoc-moe]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from coordinator import Coordinator

FORMATS = [("bf16 (as stored)", None, 64), ("int8", "int8", 64), ("int4/g32", "int4", 32),
           ("int4/g64", "int4", 64), ("int4/g128", "int4", 128)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/pydoc-moe")
    ap.add_argument("--text", default="docs/data/heldout-pydoc.txt")
    ap.add_argument("--tokens", type=int, default=512, help="tokens of the top-1 agreement")
    ap.add_argument("--window", type=int, default=128, help="tokens per window (the model's training window)")
    a = ap.parse_args()
    text = Path(a.text).read_text()
    rows, base_top, base_ppl = [], None, None
    for name, fmt, group in FORMATS:
        with Coordinator.from_pretrained(a.model, dtype="bfloat16", expert_dtype=fmt, group_size=group) as c:
            ids = torch.tensor(c.tokenizer.encode(text).ids)
            ppl = c.perplexity(ids, max_length=a.window, stride=a.window // 2, progress=False)
            top = torch.cat([c.forward(ids[None, s:s + a.window])[0].argmax(-1)
                             for s in range(0, a.tokens, a.window)])
            slot = c.stats()["experts"]["actors"][0]["slot_bytes"]
        if base_top is None:
            base_top, base_ppl, base_slot = top, ppl, slot
        agree = (top == base_top).float().mean().item()
        rows.append(f"| {name} | {ppl:.3f} | {100 * (ppl / base_ppl - 1):+.2f}% | {100 * agree:.1f}% | "
                    f"{slot:,} ({base_slot / slot:.2f}x) |")
    print(f"{len(ids)} held-out tokens, windows of {a.window}; top-1 agreement over the first {a.tokens}\n")
    print("| experts | perplexity | vs bf16 | top-1 agreement with bf16 | slot bytes per expert (vs bf16) |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
