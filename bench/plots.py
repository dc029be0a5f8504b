"""PNG plots of a results document (needs matplotlib; skipped with a note without it)."""
from __future__ import annotations

from pathlib import Path

BREAKDOWN_KEYS = ("attention", "routing", "dispatch", "expert_compute", "io_stall")


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_budget(doc: dict, path: Path) -> Path | None:
    """tok/s versus expert budget (fraction of routed-expert bytes) for moeshard and accelerate."""
    s5 = doc.get("scenarios", {}).get("5", {}).get("details", {})
    sweep = [r for r in s5.get("sweep", []) if r.get("tok_s")]
    acc = [r for r in s5.get("accelerate", []) if r.get("tok_s")]
    s2 = doc.get("scenarios", {}).get("2", {}).get("details", {})
    if not sweep and not acc:
        return None
    plt = _plt()
    models = sorted({r["model"] for r in sweep}) or ["-"]
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        rows = [r for r in sweep if r["model"] == model]
        for cfg in sorted({(r["prefetch_depth"], r["prefetch_extra"]) for r in rows}):
            pts = sorted((r["budget_frac"], r["tok_s"]) for r in rows if (r["prefetch_depth"], r["prefetch_extra"]) == cfg)
            label = "moeshard, no prefetch" if cfg[0] == 0 else f"moeshard, prefetch depth {cfg[0]} +{cfg[1]}"
            ax.plot([p[0] * 100 for p in pts], [p[1] for p in pts], marker="o", label=label)
        acc_pts = sorted((r["budget_frac"], r["tok_s"]) for r in acc if r.get("model", model) == model)
        if acc_pts:
            ax.plot([p[0] * 100 for p in acc_pts], [p[1] for p in acc_pts], marker="s", linestyle="--",
                    color="black", label="transformers + accelerate disk offload")
        if s2.get("accelerate_budget_frac") and s2.get("accelerate_tok_s") and model.startswith(s2.get("model") or "?"):
            ax.scatter([s2["accelerate_budget_frac"] * 100], [s2["accelerate_tok_s"]], marker="x", color="black",
                       label="accelerate, 3 GB cgroup (scenario 2)")
        ax.set_xlabel("expert memory budget (% of routed-expert bytes)")
        ax.set_ylabel("decode tok/s (batch 1)")
        ax.set_yscale("log")
        ax.set_title(model)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"tok/s vs expert budget ({doc.get('date')}, {doc.get('env', {}).get('cpu', '')})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def breakdown_rows(doc: dict) -> list[tuple[str, dict[str, float]]]:
    """(label, per-MoE-layer seconds per component) from every scenario that measured one."""
    rows = []
    for key in sorted(doc.get("scenarios", {})):
        for name, bd in (doc["scenarios"][key].get("details", {}).get("breakdown") or {}).items():
            if not bd or not bd.get("per_step_s"):
                continue
            layers = max(1, bd.get("num_layers") or 1)
            per_layer = {k: bd["per_step_s"].get(k, 0.0) / layers for k in BREAKDOWN_KEYS}
            per_layer["other"] = max(0.0, bd.get("step_s", 0.0) / layers - sum(per_layer.values()))
            rows.append((f"s{key}: {name}", per_layer))
    return rows


def plot_breakdown(doc: dict, path: Path) -> Path | None:
    """Stacked bars: per-layer decode time split into attention, routing, dispatch, compute, I/O stall."""
    rows = breakdown_rows(doc)
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows) + 2), 4.5))
    keys = (*BREAKDOWN_KEYS, "other")
    bottoms = [0.0] * len(rows)
    for k in keys:
        vals = [r[1][k] * 1e3 for r in rows]
        ax.bar(range(len(rows)), vals, bottom=bottoms, label=k.replace("_", " "))
        bottoms = [b + v for b, v in zip(bottoms, vals)]
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r[0] for r in rows], rotation=20, ha="right", fontsize=7)
    ax.set_ylabel("ms per layer per decode step (batch 1)")
    ax.legend(fontsize=7)
    ax.set_title("moeshard per-layer time breakdown", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(doc: dict, json_path: Path) -> list[Path]:
    """All plots next to the results JSON: <stem>-tok_s_vs_budget.png, <stem>-breakdown.png."""
    if not have_matplotlib():
        return []
    out: list[Path] = []
    for suffix, fn in (("tok_s_vs_budget", plot_budget), ("breakdown", plot_breakdown)):
        p = fn(doc, json_path.with_name(f"{json_path.stem}-{suffix}.png"))
        if p is not None:
            out.append(p)
    return out
