"""Render the README benchmark table from the latest (or a given) results file.

    python -m bench.report                      # latest bench/results/*.json -> markdown on stdout
    python -m bench.report bench/results/2025-11-25-host.json --no-title

The lead pastes the output into the README's benchmark section; it ends with the
command(s) that produced the figures.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import results as R
from .common import RESULTS_DIR


def render(path: Path | None = None, title: bool = True) -> str:
    """Markdown table of the results at `path` (default: the latest in bench/results)."""
    path = path or R.latest(RESULTS_DIR)
    if path is None:
        raise FileNotFoundError(f"no results in {RESULTS_DIR}: run `python -m bench.run` first")
    doc = R.load(path)
    if not doc:
        raise FileNotFoundError(f"{path} is not a results file")
    return R.markdown_table(doc, title=title)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="?", type=Path, help="results JSON (default: latest in bench/results)")
    ap.add_argument("--no-title", action="store_true", help="table only, without the environment sentence")
    ap.add_argument("--dir", type=Path, default=None, help="results directory to take the latest from")
    a = ap.parse_args(argv)
    try:
        path = a.results or R.latest(a.dir or RESULTS_DIR)
        sys.stdout.write(render(path, title=not a.no_title))
    except FileNotFoundError as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
