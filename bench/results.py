"""Results documents: one JSON per (date, machine), a markdown table, PNG plots.

Layout of `bench/results/<date>-<machine>.json`::

    {"schema": 1, "date": "2025-11-25", "machine": ..., "env": {...}, "commands": [...],
     "scenarios": {"1": {"title", "status", "reason", "figures": [Figure...], "details": {...},
                         "command", "quick", "started", "seconds"}, ...}}

A Figure is one reported number with its peer measured in the same run::

    {"id", "label", "value", "unit", "peer", "peer_value", "ratio", "target", "op", "met", "note"}

`ratio` is the median of per-round ratios (rounds interleaved A B A B), not the ratio of
medians, and it is what targets are checked against (absolute targets check `value`).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from workers.units import format_bytes

from .common import RESULTS_DIR, machine_name, write_json

SCHEMA = 1


def figure(id: str, label: str, value: float | None, unit: str, *, peer: str | None = None,
           peer_value: float | None = None, ratio: float | None = None, target: float | None = None,
           op: str = ">=", on: str = "ratio", note: str | None = None) -> dict[str, Any]:
    """One figure; `on` says whether the target applies to the ratio or to the value itself."""
    f = {"id": id, "label": label, "value": value, "unit": unit, "peer": peer, "peer_value": peer_value,
         "ratio": ratio, "target": target, "op": op, "on": on, "met": None, "note": note}
    f["met"] = verdict(f)
    return f


def verdict(f: dict[str, Any]) -> bool | None:
    """Met (True) or missed (False), from the figure's own measured value or ratio against its target; None
    without a target or when the checked figure was not measured. The one place a verdict is decided: the
    table recomputes it from the figures rather than trusting a stored "met"."""
    if f.get("target") is None:
        return None
    checked = f.get("ratio") if f.get("on", "ratio") == "ratio" else f.get("value")
    if checked is None:
        return None
    return checked >= f["target"] if f.get("op", ">=") == ">=" else checked <= f["target"]


def results_path(out_dir: Path | None = None, date: str | None = None, machine: str | None = None) -> Path:
    out_dir = Path(out_dir or RESULTS_DIR)
    return out_dir / f"{date or time.strftime('%Y-%m-%d')}-{machine or machine_name()}.json"


def load(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def update(path: Path, env: dict, scenario: str, result: dict, command: str) -> dict:
    """Merge one scenario's result into the document at `path` (creating it) and save."""
    doc = load(path) or {"schema": SCHEMA, "date": path.stem[:10], "machine": env.get("machine"),
                         "scenarios": {}, "commands": []}
    doc["env"] = env
    doc.setdefault("scenarios", {})[str(scenario)] = result
    if command not in doc.setdefault("commands", []):
        doc["commands"].append(command)
    write_json(path, doc)
    return doc


def latest(out_dir: Path | None = None) -> Path | None:
    """The most recent results JSON (by date in the name, then modification time)."""
    files = sorted(Path(out_dir or RESULTS_DIR).glob("*.json"), key=lambda p: (p.name[:10], p.stat().st_mtime))
    return files[-1] if files else None


# ---- markdown ---------------------------------------------------------------------------------

def _num(v: float | None, unit: str = "") -> str:
    if v is None:
        return "-"
    if unit == "s":
        if abs(v) < 1e-3:
            return f"{v * 1e6:.0f} us"
        if abs(v) < 1:
            return f"{v * 1e3:.1f} ms"
        return f"{v:.2f} s"
    if unit == "B":
        return format_bytes(v)
    if unit == "%":
        return f"{100 * v:.1f}%"
    a = abs(v)
    s = f"{v:.2g}" if a < 0.1 else f"{v:.2f}" if a < 10 else f"{v:.1f}" if a < 1000 else f"{v:,.0f}"
    return f"{s} {unit}".strip()


def _target(f: dict) -> str:
    if f.get("target") is None:
        return ""
    t = f["target"]
    if f.get("on") == "ratio":
        return f"{f['op']} {t:g}x"
    return f"{f['op']} {_num(t, f.get('unit', ''))}"


def _met(f: dict) -> str:
    if f.get("target") is None:
        return ""
    return {True: "met", False: "**missed**", None: "**not measured**"}[verdict(f)]


def markdown_table(doc: dict, title: bool = True) -> str:
    """The README benchmark table: one row per figure, grouped by scenario."""
    env = doc.get("env", {})
    lines = []
    if title:
        lines.append(f"Benchmarks of {doc.get('date', '?')} on {env.get('cpu', '?')} "
                     f"({env.get('cores', '?')} cores, {_num(env.get('memory_bytes'), 'B')} RAM), "
                     f"torch {env.get('torch')}, ray {env.get('ray')}, transformers {env.get('transformers')}, "
                     f"accelerate {env.get('accelerate')}. Medians of interleaved rounds; ratio = moeshard / peer, "
                     f"median of per-round ratios.")
        lines.append("")
    lines.append("| # | Figure | moeshard | Peer | Peer value | Ratio | Target | |")
    lines.append("|---|---|---:|---|---:|---:|---|---|")
    for key in sorted(doc.get("scenarios", {}), key=lambda k: int(k) if str(k).isdigit() else 99):
        sc = doc["scenarios"][key]
        if sc.get("status") != "ok" and not sc.get("figures"):
            lines.append(f"| {key} | {sc.get('title', '')}: {sc.get('status', '?')} "
                         f"({(sc.get('reason') or '').splitlines()[0][:120] if sc.get('reason') else ''}) "
                         f"| | | | | | |")
            continue
        for f in sc.get("figures", []):
            ratio = "" if f.get("ratio") is None else f"{f['ratio']:.2f}x"
            lines.append(f"| {key} | {f['label']} | {_num(f.get('value'), f.get('unit', ''))} | "
                         f"{f.get('peer') or ''} | {_num(f.get('peer_value'), f.get('unit', ''))} | {ratio} | "
                         f"{_target(f)} | {_met(f)} |")
    cmds = doc.get("commands") or []
    if cmds:
        lines.append("")
        lines.append("Produced by: " + "; ".join(f"`{c}`" for c in cmds))
    return "\n".join(lines) + "\n"


def write_markdown(doc: dict, path: Path) -> Path:
    md = path.with_suffix(".md")
    body = [f"# moeshard benchmarks: {doc.get('date')} on {doc.get('machine')}", "", markdown_table(doc), ""]
    for key in sorted(doc.get("scenarios", {}), key=lambda k: int(k) if str(k).isdigit() else 99):
        sc = doc["scenarios"][key]
        notes = sc.get("notes") or []
        if sc.get("reason") or notes:
            body.append(f"## Scenario {key}: {sc.get('title', '')}")
            if sc.get("reason"):
                body.append(f"Status: {sc.get('status')}: {sc['reason']}")
            body += [f"- {n}" for n in notes]
            body.append("")
    for png in sorted(path.parent.glob(path.stem + "-*.png")):
        body.append(f"![{png.stem}]({png.name})")
    md.write_text("\n".join(body) + "\n")
    return md
