"""The `moeshard` command line: plan a placement, generate text, run the multi-host harness.

Errors are one line on stderr and exit status 1 (2 for a plan that cannot fit and
for commands this build does not have); `--debug` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from cluster.gen_common import add_sampling_arguments, sampling_kwargs

log = logging.getLogger(__name__)

DTYPE_CHOICES = ("float32", "bfloat16", "float16")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
EXIT_ERROR, EXIT_REFUSED = 1, 2


class Refused(Exception):
    """The request is understood but cannot be honoured (exit status 2)."""


# ---- arguments ---------------------------------------------------------------------------------

def _add_placement_args(p: argparse.ArgumentParser, *, workers_default: int | None) -> None:
    p.add_argument("checkpoint", help="directory of a Hugging Face MoE checkpoint (config.json + *.safetensors)")
    if workers_default is None:
        p.add_argument("--workers", type=int, required=True, metavar="N",
                       help="number of expert-shard actors to spread the routed experts over")
    else:
        p.add_argument("--workers", type=int, default=workers_default, metavar="N",
                       help="number of Ray expert-shard actors; 0 (default) keeps every expert in this process")
    p.add_argument("--worker-memory", default=None, metavar="SIZE",
                   help="memory budget for routed-expert weights per actor, e.g. 2GB, 512MiB or bytes; experts "
                        "beyond it are paged from the checkpoint files (default: no limit, all resident)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32",
                   help="compute dtype; expert sizes are counted in it (default: float32)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, metavar="C",
                   help="Ray CPUs each actor asks for; also its torch thread count (default: 1)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, metavar="G",
                   help="Ray GPUs each actor asks for; >0 runs its experts on CUDA (default: 0)")


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of `moeshard` (every flag documented in --help)."""
    parser = argparse.ArgumentParser(
        prog="moeshard",
        description="Run Mixture-of-Experts language models with the routed experts sharded over Ray actors "
                    "and paged from disk.")
    parser.add_argument("--debug", action="store_true",
                        help="show full tracebacks and debug logging instead of one-line errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO) to stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    plan = sub.add_parser("plan", help="show which actor would own which experts, and how much memory each needs",
                          description="Print the placement of a checkpoint's routed experts over N actors: experts, "
                                      "bytes, and the resident vs paged split per actor. Exits 2 if the plan cannot "
                                      "fit the memory budget, saying the minimum. Needs no Ray.")
    _add_placement_args(plan, workers_default=None)
    plan.add_argument("--min-resident", type=int, default=None, metavar="K",
                      help="experts each actor must be able to hold at once (default: the model's top-k)")
    plan.set_defaults(func=cmd_plan)

    gen = sub.add_parser("generate", help="generate tokens from a prompt, streaming them, then print run stats",
                         description="Load the checkpoint (dense part here, routed experts in this process or on "
                                     "--workers Ray actors), generate, stream the new tokens to stdout, then print "
                                     "the per-actor stats table.")
    _add_placement_args(gen, workers_default=0)
    prompt = gen.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--ids", action="append", metavar="I,J,K",
                        help="prompt as comma-separated token ids; repeat for a batch (left-padded)")
    prompt.add_argument("--prompt", metavar="TEXT", help="prompt text (needs tokenizer.json in the checkpoint)")
    add_sampling_arguments(gen)
    gen.add_argument("--ray-address", default=None, metavar="HOST:PORT",
                     help="join this Ray cluster (default: RAY_ADDRESS, else start a local Ray when --workers > 0)")
    gen.add_argument("--call-timeout", type=float, default=60.0, metavar="S",
                     help="seconds to wait for an actor's reply before failing (default: 60)")
    gen.add_argument("--policy", choices=("lfu-decay", "lfu", "lru"), default="lfu-decay",
                     help="which resident expert to evict when paging (default: lfu-decay)")
    gen.add_argument("--prefetch-depth", type=int, default=1, metavar="D",
                     help="how many next layers' routers predict experts to prefetch (0 = off; default: 1)")
    gen.add_argument("--prefetch-extra", type=int, default=0, metavar="X",
                     help="candidates beyond top-k each prediction prefetches (default: 0)")
    gen.add_argument("--pin-layers", type=lambda v: [int(x) for x in v.split(",")], default=[], metavar="L,M",
                     help="keep every expert of these MoE layers resident (never evicted; counts against the budget)")
    gen.add_argument("--spill-dir", default=None, metavar="DIR",
                     help="keep each expert's compute-dtype image here after its first read, for faster reloads")
    gen.add_argument("--transport", choices=("calls", "graph"), default="calls",
                     help="how each layer reaches the actors: plain actor calls (calls, default) or one Ray Compiled "
                          "Graph over all of them (graph: ~1 ms less per layer, but each actor keeps a core busy "
                          "waiting; for actors with a core to spare)")
    gen.add_argument("--coordinator-threads", type=int, default=None, metavar="T",
                     help="torch threads of this process (default: the cores left free by expert actors placed on "
                          "this machine, or unchanged)")
    gen.add_argument("--no-stats", action="store_true", help="do not print the stats table after generating")
    gen.add_argument("--heatmap", metavar="PNG", default=None,
                     help="also write a PNG heatmap of expert activations per layer (needs matplotlib)")
    gen.set_defaults(func=cmd_generate)

    har = sub.add_parser("harness", help="start/stop a local multi-host test cluster (up, down, list)",
                         description="Multi-host Ray cluster on one machine, for testing distribution.")
    try:
        from cluster.harness.cli import add_harness_arguments
    except ImportError as e:  # the harness is optional
        har.set_defaults(func=lambda args, err=e: _missing("harness", err))  # `e` is unbound after except
    else:
        add_harness_arguments(har)
        har.set_defaults(func=cmd_harness)

    job = sub.add_parser("job", help="the Ray job entry point (same as `python -m cluster.job`)",
                         description="Generate on the Ray cluster this process runs in (ray.init(address='auto')), "
                                     "one expert actor per node where possible; for `ray job submit`.")
    from cluster.job import add_job_arguments, run_job
    add_job_arguments(job, include_debug=False)
    job.set_defaults(func=run_job)

    bench = sub.add_parser("bench", help="benchmarks against transformers and accelerate (see bench/)",
                           description="Run the benchmark scenarios side by side with their peers and write "
                                       "bench/results/. Scenarios 2 and 3 need root (cgroups, namespaces).")
    try:
        from bench.run import add_bench_arguments
    except ImportError as e:  # bench/ lives in the source tree, beside the packages
        bench.set_defaults(func=lambda args, err=e: _missing("bench", err))
    else:
        add_bench_arguments(bench)
        bench.set_defaults(func=cmd_bench)
    return parser


# ---- commands ----------------------------------------------------------------------------------

def _missing(what: str, err: Exception) -> int:
    raise Refused(f"`moeshard {what}` is not available in this installation ({err})")


def cmd_plan(args: argparse.Namespace) -> int:
    """Print the placement; refuse (exit 2) when it cannot fit."""
    from cluster.errors import ClusterError
    from cluster.placement import plan_placement
    from coordinator.checkpoint import Checkpoint
    from workers.units import parse_bytes

    ckpt = Checkpoint.open(args.checkpoint)
    specs = ckpt.expert_specs()
    cfg = ckpt.config
    min_resident = args.min_resident if args.min_resident is not None else cfg.top_k
    try:
        plan = plan_placement(specs, args.workers, dtype_bytes=DTYPE_BYTES[args.dtype],
                              worker_memory=parse_bytes(args.worker_memory), min_resident=min_resident,
                              num_cpus=args.cpus_per_worker, num_gpus=args.gpus_per_worker)
    except ClusterError as e:
        raise Refused(f"cannot place {len(specs)} experts on {args.workers} actor(s): {e}") from e
    layers = sorted({s.layer for s in specs})
    print(f"{ckpt.path}: {len(specs)} routed experts ({cfg.num_experts} per layer x {len(layers)} MoE layers, "
          f"top-{cfg.top_k}), dtype {args.dtype}, min_resident {min_resident}")
    for line in plan.table():
        print(line)
    return 0


def _parse_ids(values: Sequence[str], pad_id: int):
    """Comma-separated id lists -> left-padded ids [B, T] and attention mask [B, T]."""
    from cluster.gen_common import parse_ids

    return parse_ids(values, pad_id)


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate with `Coordinator`, streaming tokens to stdout, then print the stats table."""
    from coordinator import Coordinator

    backend: dict = {}
    if args.workers > 0:
        backend = dict(num_cpus_per_worker=args.cpus_per_worker, num_gpus_per_worker=args.gpus_per_worker,
                       call_timeout_s=args.call_timeout, coordinator_threads=args.coordinator_threads,
                       transport=args.transport)
    elif args.coordinator_threads:
        import torch
        torch.set_num_threads(args.coordinator_threads)
    sampling = sampling_kwargs(args)
    with Coordinator.from_pretrained(args.checkpoint, num_workers=args.workers, worker_memory=args.worker_memory,
                                     dtype=args.dtype, ray_address=args.ray_address, policy=args.policy,
                                     prefetch_depth=args.prefetch_depth, prefetch_extra=args.prefetch_extra,
                                     pin_layers=args.pin_layers, spill_dir=args.spill_dir, **backend) as coord:
        if args.prompt is not None:
            coord.generate_text(args.prompt, max_new_tokens=args.max_new_tokens,
                                on_text=lambda s: print(s, end="", flush=True), **sampling)
            print()
        else:
            pad = coord.config.pad_token_id if getattr(coord.config, "pad_token_id", None) is not None else 0
            ids, mask = _parse_ids(args.ids, pad)
            single = ids.shape[0] == 1
            stream = (lambda step: print(int(step[0]), end=" ", flush=True)) if single else None
            out = coord.generate(ids, max_new_tokens=args.max_new_tokens, attention_mask=mask,
                                 pad_token_id=pad, on_token=stream, **sampling)
            if single:
                print()
            else:
                for row in out[:, ids.shape[1]:].tolist():
                    print(" ".join(map(str, row)))
        if not args.no_stats:
            _print_stats(coord.stats())
        if args.heatmap:
            from cluster.report import write_heatmap
            if (path := write_heatmap(coord.expert_activations(), args.heatmap)) is not None:
                print(f"heatmap written to {path}")
    return 0


def _print_stats(stats: dict) -> None:
    from cluster.gen_common import print_stats

    print_stats(stats)


def cmd_harness(args: argparse.Namespace) -> int:
    from cluster.harness.cli import run_harness_command

    return run_harness_command(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from bench.run import run_bench
    try:
        return run_bench(args)
    except SystemExit as e:  # bench reports bad arguments as SystemExit("message")
        if isinstance(e.code, str):
            raise Refused(e.code) from None
        raise


# ---- entry point -------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except Refused as e:
        if args.debug:
            raise
        print(f"moeshard: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        print("moeshard: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one clear line; --debug for the traceback
        if args.debug:
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        if len(msg) > 600:
            msg = msg[:600] + "... (--debug for the full message)"
        print(f"moeshard: error: {msg}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
