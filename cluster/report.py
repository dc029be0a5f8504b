"""Human-readable reports of a run: the per-actor stats table and the expert-activation heatmap."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from workers.units import format_bytes

log = logging.getLogger(__name__)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain aligned text table (first column left-aligned, the rest right-aligned)."""
    cells = [[str(h) for h in header]] + [[_cell(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for j, r in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def _ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def stats_report(stats: dict[str, Any]) -> str:
    """The `Coordinator.stats()` of a run as text: throughput, prefetch accuracy, one row per actor."""
    coord, experts, pre = stats["coordinator"], stats["experts"], stats.get("prefetch", {})
    lines = []
    if coord.get("tokens_per_second"):
        lines.append(f"generated {coord['generated_tokens']} tokens in {coord['generate_seconds']:.2f} s: "
                     f"{coord['tokens_per_second']:.2f} tok/s")
    lines.append(f"prefetch precision {_ratio(pre.get('precision'))}, recall {_ratio(pre.get('recall'))} "
                 "(next-layer router predictions vs experts actually picked)")
    r = stats.get("routing")
    if r is not None and r.mode == "cache-aware":
        rank = "-" if r.mean_substitute_rank is None else f"{r.mean_substitute_rank:.2f}"
        lines.append(f"cache-aware routing ({r.policy}): {r.rerouted_fraction:.1%} of tokens rerouted (per layer), "
                     f"substitutes at mean true rank {rank}; non-resident experts per token "
                     f"{r.new_experts_per_token_exact:.2f} exact -> {r.new_experts_per_token_chosen:.2f} used, "
                     f"{r.forced_tokens} token(s) over the cap for want of resident experts")
    rows = []
    for a in experts.get("actors", []):
        rows.append([a.get("index"), a.get("ip", "local"), a.get("experts"),
                     format_bytes(a.get("bytes_resident") or 0),
                     format_bytes(a["budget_bytes"]) if a.get("budget_bytes") else "unlimited",
                     a.get("hits"), a.get("misses"), a.get("evictions"), format_bytes(a.get("bytes_read") or 0),
                     f"{a.get('prefetch_used', 0)}/{a.get('prefetch_issued', 0)}",
                     a.get("calls"), a.get("compute_s"), a.get("transit_s")])
    lines.append(table(["actor", "node", "experts", "resident", "budget", "hits", "misses", "evicted", "read",
                        "prefetch used/issued", "calls", "compute s", "transit s"], rows))
    if experts.get("failures"):
        lines.append(f"recovered from {experts['failures']} actor failure(s): {experts.get('restarts', 0)} "
                     f"restart(s), {experts.get('retries', 0)} retried call(s), "
                     f"{experts.get('recovery_s', 0.0):.1f} s recovering")
    return "\n".join(lines)


def write_heatmap(activations: dict[int, list[int]], path: str | Path) -> Path | None:
    """PNG heatmap of how often each expert was picked, one row per MoE layer.

    Returns the path, or None (with a warning) when matplotlib is not installed.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed; no heatmap written (pip install 'moeshard[bench]')")
        return None
    import numpy as np

    layers = sorted(activations)
    data = np.array([activations[l] for l in layers], dtype=float)
    data = data / np.maximum(data.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * data.shape[1] + 2), max(2, 0.4 * len(layers) + 1.5)))
    im = ax.imshow(data, aspect="auto", cmap="viridis")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(layers)), [str(l) for l in layers])
    ax.set_title("share of routed tokens per expert")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
