"""The `moeshard` command line: plan a placement, generate text, run the multi-host harness.

Errors are one line on stderr and exit status 1 (2 for a plan that cannot fit and
for commands this build does not have); `--debug` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from cluster.gen_common import (RUN_OPTIONS, OneLineParser, add_option_arguments, add_output_arguments, add_prompt_arguments,
                                add_sampling_arguments, check_writable, generate_for_prompts, print_stats,
                                read_prompts, run_options, sampling_options)
from coordinator.options import OptionError, UnknownOption, cli_message
from workers.errors import BudgetError

log = logging.getLogger(__name__)

EXIT_ERROR, EXIT_REFUSED = 1, 2
PLAN_OPTIONS = ("worker_memory", "dtype", "num_cpus_per_worker", "num_gpus_per_worker", "pin_layers",
                "expert_dtype", "group_size")


class Refused(Exception):
    """The request is understood but cannot be honoured (exit status 2)."""


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of `moeshard` (every flag documented in --help)."""
    parser = OneLineParser(
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
    plan.add_argument("checkpoint", help="directory of a Hugging Face MoE checkpoint (config.json + *.safetensors)")
    plan.add_argument("--workers", dest="num_workers", type=int, required=True, metavar="N",
                      help="number of expert-shard actors to spread the routed experts over")
    add_option_arguments(plan, PLAN_OPTIONS)
    plan.add_argument("--min-resident", type=int, default=None, metavar="K",
                      help="experts each actor must be able to hold at once (default: the model's top-k)")
    plan.add_argument("--from-stats", metavar="JSON", default=None,
                      help="also propose a load-driven re-placement from a stats file (`generate --load-stats`): "
                           "replicas of the hottest experts and each actor's max/mean rows, before and after")
    plan.add_argument("--replica-slots", type=int, default=None, metavar="R",
                      help="replicas each actor may hold beyond its own experts, for --from-stats (default: as "
                           "many as the budget its own slots leave, --worker-memory; one per MoE layer when unlimited)")
    plan.set_defaults(func=cmd_plan)

    gen = sub.add_parser("generate", help="generate tokens from a prompt, streaming them, then print run stats",
                         description="Load the checkpoint (dense part here, routed experts in this process or on "
                                     "--workers Ray actors), generate for the prompts (repeat --prompt or --ids for "
                                     "a batch), stream the new tokens of a single prompt to stdout, then print the "
                                     "per-actor stats table. Every flag is checked before anything loads.")
    gen.add_argument("checkpoint", help="directory of a Hugging Face MoE checkpoint (config.json + *.safetensors)")
    add_option_arguments(gen, RUN_OPTIONS)
    add_prompt_arguments(gen)
    add_sampling_arguments(gen)
    add_output_arguments(gen)
    gen.set_defaults(func=cmd_generate)

    qz = sub.add_parser("quantize", help="write a copy of a checkpoint whose routed experts are int8 or int4",
                        description="Quantize the routed-expert tensors of SRC into DST (layout: docs/quantization.md); "
                                    "the dense part is copied unchanged. Streams one tensor at a time; nothing is left "
                                    "half-written on error. The result loads like any checkpoint.")
    qz.add_argument("src", help="directory of a Hugging Face MoE checkpoint")
    qz.add_argument("dst", help="directory to write (refused if it exists, unless --force)")
    add_option_arguments(qz, ("expert_dtype", "group_size"))
    qz.add_argument("--force", action="store_true", help="replace DST if it exists (only once the new one is complete)")
    qz.set_defaults(func=cmd_quantize)

    ev = sub.add_parser("eval", help="print the perplexity of a checkpoint over a text file",
                        description="Load the checkpoint as `generate` would and print `perplexity: X` over the text "
                                    "of FILE, with a sliding window (transformers' perplexity guide).")
    ev.add_argument("checkpoint", help="directory of a Hugging Face MoE checkpoint (with tokenizer.json)")
    ev.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text file to score (at least two tokens)")
    ev.add_argument("--max-length", type=int, default=None, metavar="N",
                    help="tokens per window (default: the model's context, at most 1024)")
    ev.add_argument("--stride", type=int, default=None, metavar="N", help="tokens between windows (default: half the window)")
    ev.add_argument("--stepwise", action="store_true",
                    help="score one token per forward through the KV cache, as decode runs (consecutive windows, "
                         "no --stride): what cache-aware routing does while generating (docs/routing.md)")
    add_option_arguments(ev, RUN_OPTIONS)
    ev.set_defaults(func=cmd_eval)

    srv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (Ray Serve) with continuous batching",
                         description="Load the checkpoint in a Ray Serve replica (routed experts on --workers "
                                     "actors) and serve POST /v1/completions and /v1/chat/completions (streaming "
                                     "with stream: true), GET /v1/models, /health and /metrics, batching all "
                                     "running requests into each decode step. Runs until Ctrl-C.")
    srv.add_argument("checkpoint", help="directory of a Hugging Face MoE checkpoint (config.json + *.safetensors)")
    add_option_arguments(srv, RUN_OPTIONS)
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8000, help="HTTP port, 1-65535 (default: 8000)")
    srv.add_argument("--model-name", default=None, metavar="NAME",
                     help="the model name clients send (default: the checkpoint folder's name)")
    srv.add_argument("--max-batch", type=int, default=16, metavar="N",
                     help="sequences decoded together, each with its own KV slot (default: 16)")
    srv.add_argument("--max-queue", type=int, default=64, metavar="N",
                     help="requests that may wait for a slot; beyond it the server answers 429 (default: 64)")
    srv.set_defaults(func=cmd_serve)

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
    from cluster.placement import plan_for
    from coordinator.api import pinned_experts
    from coordinator.checkpoint import Checkpoint
    from workers.dtypes import COMPUTE_DTYPES
    from workers.quant import describe

    opts = run_options(args, ("num_workers", *PLAN_OPTIONS))
    if opts.placement.num_workers < 1:
        raise OptionError("num_workers", f"must be an integer >= 1 for a plan, got {opts.placement.num_workers}")
    if args.min_resident is not None and args.min_resident < 1:
        raise ValueError(f"--min-resident: must be an integer >= 1, got {args.min_resident}")
    if args.replica_slots is not None and (args.from_stats is None or args.replica_slots < 0):
        raise ValueError("--replica-slots: " + ("only with --from-stats" if args.from_stats is None else
                                                f"must be an integer >= 0, got {args.replica_slots}"))
    ckpt = Checkpoint.open(args.checkpoint)
    specs = ckpt.expert_specs(opts.store.expert_dtype, opts.store.group_size)
    cfg = ckpt.config
    min_resident = args.min_resident if args.min_resident is not None else cfg.top_k
    stats = None if args.from_stats is None else read_load_stats(args.from_stats, cfg)   # refused before any output
    pinned = pinned_experts(cfg, (), opts.store.pin_layers)
    try:
        plan = plan_for(specs, opts.placement, opts.store, opts.dtype, min_resident=min_resident, pinned=pinned)
    except ClusterError as e:
        raise Refused(f"cannot place {len(specs)} experts on {opts.placement.num_workers} actor(s): "
                      f"{cli_message(e)}") from e
    layers = sorted({s.layer for s in specs})
    print(f"{ckpt.path}: {len(specs)} routed experts ({cfg.num_experts} per layer x {len(layers)} MoE layers, "
          f"top-{cfg.top_k}), dtype {opts.dtype}, experts {describe(specs[0].expert_dtype, specs[0].group_size)}, "
          f"min_resident {min_resident}"
          + (f", {len(pinned)} pinned" if pinned else ""))
    for line in ckpt.summary(COMPUTE_DTYPES[opts.dtype].itemsize).lines(opts.dtype):  # what the checkpoint is
        print(f"  {line}")
    for line in plan.table():
        print(line)
    if stats is not None:
        from workers.budget import expert_nbytes

        nbytes = max(expert_nbytes(s, COMPUTE_DTYPES[opts.dtype].itemsize) for s in specs)
        print_replica_plan(plan, cfg, stats, args.from_stats, args.replica_slots, nbytes)
    return 0


def read_load_stats(path: str, cfg):
    """The `--from-stats` file, checked against the checkpoint it is to be applied to."""
    from coordinator.load import LoadFileError, LoadStats, load_model_key

    try:
        stats = LoadStats.read(path)
        stats.check_model(load_model_key(cfg), cfg.moe_layer_ids)
    except LoadFileError as e:
        raise ValueError(f"--from-stats: {e}") from None
    return stats


def print_replica_plan(plan, cfg, stats, path: str, slots: int | None, replica_nbytes: int) -> None:
    """The re-placement `--from-stats` proposes for this placement (see cluster/replicas.py)."""
    from cluster.replicas import imbalance, plan_replicas, static_plan

    loads, n = stats.load_map(), len(plan.workers)
    per = [slots] * n if slots is not None else plan.replica_slots(replica_nbytes, len(cfg.moe_layer_ids))
    before = static_plan(plan.owners(), n)
    after = plan_replicas(loads, plan.owners(), n, per)
    where = ("--replica-slots" if slots is not None else "unlimited worker_memory: one per MoE layer"
             if plan.worker_memory is None else "the budget each actor's own slots leave")
    print(f"re-placement from {path} (window {stats.window} passes, {sum(loads.values()):g} rows), "
          f"replica slots per actor {per} ({where}):")
    for line in after.table(loads, before):
        print(line)
    if imbalance(after, loads) >= imbalance(before, loads):
        print("no replica lowers the busiest actor's rows: the static placement stays")


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate with `Coordinator`, streaming a single prompt's tokens to stdout, then print the stats table."""
    from coordinator import Coordinator

    options = run_options(args)              # every flag checked before anything loads
    sampling = sampling_options(args)
    kind, prompts = read_prompts(args)
    check_writable(args.heatmap, "--heatmap")
    check_writable(args.load_stats, "--load-stats")
    with Coordinator.open(args.checkpoint, options) as coord:
        results = generate_for_prompts(coord, kind, prompts, sampling, stream=True)
        if len(results) > 1:
            for i, (p, c) in enumerate(results, 1):
                print(f"[{i}] {p} -> {c}")
        if not args.no_stats:
            print_stats(coord.stats())
        if args.heatmap:
            from cluster.report import write_heatmap
            if (path := write_heatmap(coord.expert_activations(), args.heatmap)) is not None:
                print(f"heatmap written to {path}")
        if args.load_stats:
            print(f"expert load written to {coord.expert_load().write(args.load_stats)}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    """Write the quantized checkpoint; print where and how much smaller its experts are."""
    from cluster.quantize import quantize_checkpoint
    from workers.quant import describe
    from workers.units import format_bytes

    opts = run_options(args, ("expert_dtype", "group_size"))
    if opts.store.expert_dtype is None:
        raise OptionError("expert_dtype", "quantize needs --expert-dtype int8 or int4")
    r = quantize_checkpoint(args.src, args.dst, opts.store.expert_dtype, opts.store.group_size, force=args.force)
    print(f"{r.path}: {r.expert_tensors} expert weights as {describe(opts.store.expert_dtype, opts.store.group_size)}, "
          f"{format_bytes(r.bytes_in)} -> {format_bytes(r.bytes_out)}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Print `perplexity: X` of the checkpoint over --text."""
    from coordinator import Coordinator

    options = run_options(args)              # every flag checked before anything loads
    for flag, v in (("--max-length", args.max_length), ("--stride", args.stride)):
        if v is not None and v < 1:
            raise ValueError(f"{flag}: must be an integer >= 1, got {v}")
    if args.stepwise and args.stride is not None:
        raise ValueError("--stride: does not apply with --stepwise (its windows follow each other)")
    try:
        text = open(args.text, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--text: cannot read {args.text}: {e}") from None
    if not text.strip():
        raise ValueError(f"--text: {args.text} is empty; give a text of at least two tokens")
    with Coordinator.open(args.checkpoint, options) as coord:
        ppl = coord.perplexity(text, max_length=args.max_length, stride=args.stride, stepwise=args.stepwise)
    print(f"perplexity: {ppl:.4f}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Check every flag and the checkpoint, then run the Ray Serve deployment until interrupted."""
    from coordinator.checkpoint import Checkpoint
    from coordinator.engine import EngineOptions

    options = run_options(args)
    try:
        engine = EngineOptions(max_batch=args.max_batch, max_queue=args.max_queue)
    except OptionError as e:
        raise ValueError(f"--{e.option.replace('_', '-')}: {e.detail}") from None
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port: must be in 1..65535, got {args.port}")
    if not args.host.strip():
        raise ValueError("--host: give an address to listen on, e.g. 127.0.0.1 or 0.0.0.0")
    if args.model_name is not None and not args.model_name.strip():
        raise ValueError("--model-name: give a non-empty name, or leave it out to use the folder's name")
    Checkpoint.open(args.checkpoint)                 # a missing or broken model fails before Ray starts
    from cluster.serve import ServeConfig, check_port, run_serve
    check_port(args.host, args.port)
    return run_serve(ServeConfig(str(args.checkpoint), options, engine, args.model_name), args.host, args.port)


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
    from cluster.deps import exit_if_missing

    exit_if_missing("moeshard", EXIT_ERROR)
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
    except (OptionError, UnknownOption, BudgetError) as e:
        if args.debug:
            raise
        print(f"moeshard: error: {cli_message(e)}", file=sys.stderr)
        return EXIT_ERROR
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
