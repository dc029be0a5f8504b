"""Pieces of a generation run shared by `moeshard generate` (cluster/cli.py) and the Ray job
entry point (cluster/job.py): sampling flags, `--ids` parsing with left padding, the stats tables.

Imports torch lazily so that building the argument parsers (and `--help`) stays fast.
"""
from __future__ import annotations

import argparse
from typing import Any, Sequence


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """--max-new-tokens, --sample, --temperature, --top-p, --seed (read back with `sampling_kwargs`)."""
    p.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="tokens to generate (default: 32)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --sample)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --sample)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The `Coordinator.generate` keywords of the flags `add_sampling_arguments` added."""
    return dict(do_sample=args.sample, temperature=args.temperature, top_p=args.top_p, seed=args.seed)


def pad_token_id(config: Any) -> int:
    """The checkpoint's pad token, else 0 (left padding only needs an in-vocab id under a 0 mask)."""
    pad = getattr(config, "pad_token_id", None)
    return pad if pad is not None else 0


def parse_id_lists(values: Sequence[str]) -> list[list[int]]:
    """`--ids` values ("1,2,3", one per prompt) -> lists of ints; ValueError says what is wrong."""
    rows = []
    for v in values:
        try:
            rows.append([int(t) for t in v.replace(" ", "").split(",") if t != ""])
        except ValueError:
            raise ValueError(f"--ids {v!r}: expected comma-separated integers like 1,2,3") from None
        if not rows[-1]:
            raise ValueError("--ids needs at least one token id")
    return rows


def left_pad(rows: Sequence[Sequence[int]], pad_id: int):
    """Token id lists -> left-padded ids [B, T] and attention mask [B, T] (LongTensors)."""
    import torch

    T = max(map(len, rows))
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.tensor(list(r), dtype=torch.long)
        mask[i, T - len(r):] = 1
    return ids, mask


def parse_ids(values: Sequence[str], pad_id: int):
    """Comma-separated id lists -> left-padded ids [B, T] and attention mask [B, T]."""
    return left_pad(parse_id_lists(values), pad_id)


def print_stats(stats: dict) -> None:
    """`Coordinator.stats()` as the per-actor table, then per-layer dispatch latencies (remote runs)."""
    from cluster.report import stats_report, table

    print()
    print(stats_report(stats))
    layers = stats["experts"].get("layers")
    if layers:
        print()
        print(table(["layer", "dispatches", "mean ms", "p50 ms", "max ms", "calls/actor"],
                    [[l, d["dispatches"], 1e3 * d["latency_mean_s"], 1e3 * d["latency_p50_s"],
                      1e3 * d["latency_max_s"], d["max_calls_per_actor"]] for l, d in layers.items()]))
