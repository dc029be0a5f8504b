"""`python -m cluster.job`: the Ray job entry point.

    ray job submit --working-dir . -- python -m cluster.job --model /models/m --workers 2 \\
        --worker-memory 2GB --prompt "The for statement"

Connects to the cluster the job runs in (`ray.init(address="auto")`, which reads the RAY_ADDRESS
the job supervisor sets), places the expert-shard actors one per node where it can, generates
for every prompt as one left-padded batch, prints `prompt -> completion` per prompt and the
per-actor stats table, and exits 0.

Placement: the candidate nodes are the alive nodes that can hold one actor (its CPUs and GPUs);
when some node advertises the custom resource `expert_shard` (ray_config.yaml does), only those.
Actors are dealt to the node with the fewest actors so far, nodes other than the driver's first,
and pinned there with Ray's built-in `node:<ip>` resource (`--placement spread` leaves it to
Ray's SPREAD strategy instead). The checkpoint must be at the same absolute path on every node:
actors page experts from the files themselves.

Every failure is one line on stderr and an exit status:

    0  success
    1  any other error (no Ray cluster to connect to, bad prompts, an expert raising, ...)
    2  no usable model: the checkpoint is missing or unreadable, or text prompts without
       tokenizer.json (also argparse usage errors, by argparse's convention)
    3  the cluster is too small for the plan: no node, or not enough nodes/CPUs/GPUs/memory, or
       the worker memory cannot hold the minimum working set
    4  an expert actor was lost (died, unreachable or timed out) and `--retries` fresh
       placements did not help

`add_job_arguments(parser)` and `run_job(args)` let the `moeshard` CLI offer this as `moeshard job`.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from typing import Sequence

if __name__ == "__main__":  # before the imports below, which fail with a traceback under a Python without torch
    from cluster.deps import exit_if_missing

    exit_if_missing("moeshard job", 1)

from cluster.gen_common import (RUN_OPTIONS, OneLineParser, add_option_arguments, add_output_arguments,
                                add_prompt_arguments, add_sampling_arguments, check_writable, generate_for_prompts,
                                run_options, sampling_options)
from cluster.gen_common import read_prompts as _read_prompts
from coordinator.options import OptionError, RunOptions, UnknownOption, cli_message

log = logging.getLogger(__name__)

EXIT_OK, EXIT_ERROR, EXIT_NO_MODEL, EXIT_TOO_SMALL, EXIT_ACTOR_LOST = 0, 1, 2, 3, 4
PROG = "moeshard job"
JOB_OPTIONS = RUN_OPTIONS


class JobFailure(Exception):
    """A failure with its exit status (see the module docstring)."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


# ---- arguments ---------------------------------------------------------------------------------

def add_job_arguments(p: argparse.ArgumentParser, *, include_debug: bool = True) -> None:
    """The job's flags, on `p` (a parser or a `moeshard job` sub-parser); run them with `run_job`.

    `include_debug=False` leaves `--debug` out, for a parent parser that already has it (argparse
    sub-parser defaults would otherwise overwrite the parent's value).
    """
    p.add_argument("--model", required=True, metavar="PATH",
                   help="checkpoint directory (config.json + *.safetensors); the same absolute path must exist on "
                        "every node, since actors page experts from the files")
    add_option_arguments(p, JOB_OPTIONS, defaults={"num_workers": "one per node that can hold one",
                                                   "ray_address": "auto"})
    p.add_argument("--placement", choices=("nodes", "spread"), default="nodes",
                   help="nodes: pin actors to nodes with node:<ip> resources, one per node where possible "
                        "(default); spread: let Ray's SPREAD strategy choose")
    add_prompt_arguments(p)
    add_sampling_arguments(p)
    p.add_argument("--retries", type=int, default=1, metavar="R",
                   help="after losing an actor, place fresh actors on the nodes still alive and regenerate, up "
                        "to R times (default: 1); then exit 4")
    p.add_argument("--wait-for-nodes", type=float, default=0.0, metavar="S",
                   help="wait up to S seconds for one node per actor to join, e.g. while `ray up` workers boot "
                        "(default: 0, use the nodes there now)")
    add_output_arguments(p)
    if include_debug:
        p.add_argument("--debug", action="store_true",
                       help="tracebacks instead of one-line errors; forward actor logs to this driver")


def build_parser(prog: str = "python -m cluster.job") -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=prog, description="Run an MoE model on the Ray cluster this job runs in: expert actors one per node, "
                               "generate for the prompts, print completions and the stats table.")
    add_job_arguments(parser)
    return parser


# ---- prompts -----------------------------------------------------------------------------------

def read_prompts(args: argparse.Namespace) -> tuple[str, list]:
    """("text", [str, ...]) or ("ids", [[int, ...], ...]) from --prompt/--prompts-file/--ids."""
    try:
        return _read_prompts(args)
    except ValueError as e:
        raise JobFailure(EXIT_ERROR, str(e)) from None


# ---- cluster -----------------------------------------------------------------------------------

def connect(address: str, *, debug: bool = False) -> bool:
    """`ray.init(address=...)`, failing fast with ClusterError when nothing is there.

    Returns True if this call connected (the caller then shuts Ray down), False if this
    process was already connected.
    """
    import ray

    from cluster.connect import probe, resolve_auto
    from cluster.errors import ClusterError

    if ray.is_initialized():
        return False
    target = address
    if address == "auto":
        target = resolve_auto()
        if target is None:
            raise ClusterError("no Ray cluster found: RAY_ADDRESS is not set and no running cluster was found on "
                               "this machine; submit with `ray job submit`, or start one (`ray start --head`, "
                               "`ray up ray_config.yaml`)")
    probe(target)  # a few seconds, where ray.init would retry for minutes
    try:
        ray.init(address=address, logging_level=logging.DEBUG if debug else logging.WARNING, log_to_driver=debug)
    except Exception as e:
        raise ClusterError(f"cannot connect to the Ray cluster at {target}: {e}") from e
    return True


# ---- the job -----------------------------------------------------------------------------------

def _plan(specs, workers: int, opts: RunOptions, top_k: int, pinned):
    from cluster.errors import ClusterError
    from cluster.placement import PlacementBudgetError, plan_for

    try:
        return plan_for(specs, dataclasses.replace(opts.placement, num_workers=workers, resources=None), opts.store,
                        opts.dtype, min_resident=top_k, pinned=pinned)
    except PlacementBudgetError as e:
        raise JobFailure(EXIT_TOO_SMALL, f"the plan does not fit: {cli_message(e)}") from None
    except (ClusterError, ValueError) as e:
        raise JobFailure(EXIT_ERROR, f"cannot plan {workers} expert actors: {e}") from None


def _place(args: argparse.Namespace, opts: RunOptions, specs, top_k: int, pinned, workers: int | None,
           suspects: set[str]) -> tuple[int, list[dict] | None, list[str]]:
    """(workers, `resources=` per actor or None for SPREAD, target IPs) on the cluster as it is now."""
    from cluster import nodes as cluster_nodes

    cpus, gpus = opts.placement.num_cpus, opts.placement.num_gpus
    slots, refused = cluster_nodes.wait_for_slots(workers, args.wait_for_nodes, cpus, gpus, suspects)
    if not slots:
        raise JobFailure(EXIT_TOO_SMALL, (
            f"no alive node can hold an expert actor asking {cpus:g} CPU(s) and {gpus:g} GPU(s); alive nodes: "
            f"{'; '.join(refused) or 'none'}"))
    if workers is None:
        workers = len(slots)
    plan = _plan(specs, workers, opts, top_k, pinned)
    try:
        ips = cluster_nodes.assign_slots(slots, [w.resident_bytes for w in plan.workers], cpus, gpus, refused)
    except cluster_nodes.ClusterTooSmall as e:
        raise JobFailure(EXIT_TOO_SMALL, str(e)) from None
    if args.placement == "spread":
        return workers, None, ips
    return workers, [{f"node:{ip}": 0.001} for ip in ips], ips


def _generate(coord, kind: str, prompts: list, args: argparse.Namespace) -> list[tuple[str, str]]:
    """Generate for all prompts in one left-padded batch; [(prompt, completion)] as printable text."""
    try:
        return generate_for_prompts(coord, kind, prompts, sampling_options(args))
    except ValueError as e:
        if isinstance(e, OptionError):
            raise
        raise JobFailure(EXIT_ERROR, str(e)) from None


def _lost_ips(coord) -> set[str]:
    """IPs of this coordinator's actors that no longer answer (where to place fresh ones last)."""
    return coord.experts.fleet.lost_ips()


def _run(args: argparse.Namespace) -> int:
    from cluster.errors import ShardUnavailable
    from coordinator import Coordinator
    from coordinator.api import pinned_experts
    from coordinator.checkpoint import Checkpoint
    from coordinator.errors import CheckpointError, UnsupportedModelError

    # every flag checked before anything connects or loads (the worker count is known once placed)
    opts = run_options(args, JOB_OPTIONS, num_workers=args.num_workers or 1)
    sampling_options(args)
    if args.retries < 0:
        raise JobFailure(EXIT_ERROR, f"--retries must be >= 0, got {args.retries}")
    if not args.wait_for_nodes >= 0 or args.wait_for_nodes == float("inf"):
        raise JobFailure(EXIT_ERROR, f"--wait-for-nodes must be a finite number >= 0, got {args.wait_for_nodes}")
    if args.num_workers is not None and args.num_workers < 1:
        raise JobFailure(EXIT_ERROR, f"--workers must be at least 1, got {args.num_workers}")
    kind, prompts = read_prompts(args)
    try:
        check_writable(args.heatmap, "--heatmap")
        check_writable(args.load_stats, "--load-stats")
    except ValueError as e:
        raise JobFailure(EXIT_ERROR, str(e)) from None
    try:
        ckpt = Checkpoint.open(args.model)
        specs = ckpt.expert_specs(opts.store.expert_dtype, opts.store.group_size)
    except (CheckpointError, UnsupportedModelError, OSError) as e:
        raise JobFailure(EXIT_NO_MODEL, f"--model: no usable model at {args.model}: {e}") from None
    if kind == "text" and not (ckpt.path / "tokenizer.json").is_file():
        raise JobFailure(EXIT_NO_MODEL, f"{ckpt.path} has no tokenizer.json, which text prompts need; "
                                        "pass token ids with --ids instead")
    pinned = pinned_experts(ckpt.config, opts.store.pin, opts.store.pin_layers)

    import ray

    debug = getattr(args, "debug", False)
    connected = connect(opts.placement.ray_address or "auto", debug=debug)
    gcs = ray.get_runtime_context().gcs_address if ray.is_initialized() else None  # the backend reuses it
    try:
        workers, suspects, attempt = args.num_workers, set(), 0
        while True:
            try:
                workers, resources, ips = _place(args, opts, specs, ckpt.config.top_k, pinned, workers, suspects)
            except JobFailure as e:
                if attempt:  # the cluster shrank under us: that is the actor loss we report
                    raise JobFailure(EXIT_ACTOR_LOST, f"{lost_msg}; and then {e}") from None
                raise
            if resources is None:
                where = f"Ray's SPREAD over {len(set(ips))} candidate node(s)"
            else:
                pins = ", ".join(f"{i}->{ip}" for i, ip in enumerate(ips))
                where = f"on {len(set(ips))} node(s) [nodes: {pins}]"
            print(f"moeshard job: {ckpt.path}: {len(specs)} routed experts over {workers} actor(s) {where}",
                  flush=True)
            coord = None
            try:
                placement = dataclasses.replace(opts.placement, num_workers=workers, ray_address=gcs,
                                                resources=None if resources is None else tuple(resources))
                coord = Coordinator.open(ckpt.path, dataclasses.replace(opts, placement=placement))
                t0 = time.perf_counter()
                results = _generate(coord, kind, prompts, args)
                seconds = time.perf_counter() - t0
                stats = None if args.no_stats else coord.stats()
                activations = coord.expert_activations() if args.heatmap else None
                load = coord.expert_load() if args.load_stats else None
            except ShardUnavailable as e:
                lost_msg = f"expert actor lost: {' '.join(str(e).split())}"
                if coord is not None:
                    suspects |= _lost_ips(coord)
                if attempt >= args.retries:
                    raise JobFailure(EXIT_ACTOR_LOST, lost_msg + (f" (after {attempt} retries)" if attempt else
                                                                  " (--retries 0)")) from e
                attempt += 1
                print(f"moeshard job: {lost_msg}; retry {attempt} of {args.retries} with fresh actors on the nodes "
                      f"still alive", flush=True)
                continue
            finally:
                if coord is not None:
                    coord.close()
            break
        mode = "sampled" if sampling_options(args).do_sample else "greedy"
        print(f"\n=== {len(results)} prompt(s), up to {args.max_new_tokens} new tokens each, {mode}, "
              f"{seconds:.2f} s ===")
        for i, (p, c) in enumerate(results, 1):
            print(f"[{i}] {p} -> {c}")
        if stats is not None:
            from cluster.gen_common import print_stats

            print_stats(stats)
        if activations is not None:
            from cluster.report import write_heatmap

            if (path := write_heatmap(activations, args.heatmap)) is not None:
                print(f"heatmap written to {path}")
        if load is not None:
            print(f"expert load written to {load.write(args.load_stats)}")
        sys.stdout.flush()
        return EXIT_OK
    finally:
        if connected and ray.is_initialized():
            ray.shutdown()


def run_job(args: argparse.Namespace) -> int:
    """Run the job for parsed `args`; returns the exit status, having printed one line on stderr on failure."""
    from cluster.errors import ClusterError, ShardUnavailable
    from cluster.placement import PlacementBudgetError
    from coordinator.errors import CheckpointError, UnsupportedModelError
    from workers.errors import MoeshardError

    debug = getattr(args, "debug", False)
    try:
        return _run(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        if isinstance(e, (OptionError, UnknownOption)):
            sys.stdout.flush()
            print(f"{PROG}: error: {cli_message(e)}", file=sys.stderr, flush=True)
            return EXIT_ERROR
        if isinstance(e, JobFailure):
            code = e.code
        elif isinstance(e, ShardUnavailable):
            code = EXIT_ACTOR_LOST
        elif isinstance(e, PlacementBudgetError):
            code = EXIT_TOO_SMALL
        elif isinstance(e, (CheckpointError, UnsupportedModelError)):
            code = EXIT_NO_MODEL
        else:
            code = EXIT_ERROR
        what = "" if isinstance(e, (MoeshardError, JobFailure, ValueError)) else f"{type(e).__name__}: "
        if isinstance(e, ClusterError) and not isinstance(e, ShardUnavailable):
            what = ""
        msg = " ".join(f"{what}{e}".split()) or type(e).__name__
        if len(msg) > 1000:
            msg = msg[:1000] + "... (--debug for the full message)"
        sys.stdout.flush()
        print(f"{PROG}: error: {msg}", file=sys.stderr, flush=True)
        return code


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return run_job(args)


if __name__ == "__main__":
    sys.exit(main())
