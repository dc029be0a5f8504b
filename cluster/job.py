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
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Sequence

if __name__ == "__main__":  # before the imports below, which fail with a traceback under a Python without torch
    from cluster.deps import exit_if_missing

    exit_if_missing("moeshard job", 1)

from cluster.gen_common import (RUN_OPTIONS, OneLineParser, add_option_arguments, add_output_arguments,
                                add_prompt_arguments, add_sampling_arguments, check_writable, generate_for_prompts,
                                run_options, sampling_options)
from cluster.gen_common import read_prompts as _read_prompts
from coordinator.options import OptionError, RunOptions, UnknownOption, cli_message
from workers.units import format_bytes

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

@dataclass
class NodeSlot:
    """One machine (all Ray nodes sharing an IP) that can host expert actors."""

    ip: str
    cpus: float
    gpus: float
    memory: float                 # Ray's `memory` resource, bytes (0 = unknown)
    node_ids: list[str] = field(default_factory=list)
    driver: bool = False          # the job's driver (the coordinator) runs here
    suspect: bool = False         # an actor was lost here; use it last

    def capacity(self, cpus: float, gpus: float) -> int:
        """How many actors asking `cpus`/`gpus` fit."""
        fits = [math.floor(self.cpus / cpus + 1e-9) if cpus > 0 else math.inf,
                math.floor(self.gpus / gpus + 1e-9) if gpus > 0 else math.inf]
        n = min(fits)
        return 1_000_000 if n == math.inf else int(n)

    def describe(self) -> str:
        mem = f", {format_bytes(self.memory)} memory" if self.memory else ""
        return f"{self.ip} ({self.cpus:g} CPUs, {self.gpus:g} GPUs{mem})"


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


def cluster_nodes(cpus: float, gpus: float, suspects: set[str] = frozenset()) -> tuple[list[NodeSlot], list[str]]:
    """(nodes that can hold one actor, descriptions of the alive nodes that cannot)."""
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    role = any(n["Resources"].get("expert_shard", 0) > 0 for n in alive)
    try:
        driver_node = ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - not connected as a driver
        driver_node = None
    by_ip: dict[str, NodeSlot] = {}
    for n in alive:
        res = n["Resources"]
        if role and res.get("expert_shard", 0) <= 0:
            continue
        ip = n["NodeManagerAddress"]
        slot = by_ip.setdefault(ip, NodeSlot(ip, 0.0, 0.0, 0.0, suspect=ip in suspects))
        slot.cpus += res.get("CPU", 0.0)
        slot.gpus += res.get("GPU", 0.0)
        slot.memory += res.get("memory", 0.0)
        slot.node_ids.append(n["NodeID"])
        slot.driver = slot.driver or n["NodeID"] == driver_node
    usable = [s for s in by_ip.values() if s.capacity(cpus, gpus) >= 1]
    others = [s.describe() for s in by_ip.values() if s.capacity(cpus, gpus) < 1]
    usable.sort(key=lambda s: (s.suspect, s.driver, s.ip))
    return usable, others


def wait_for_nodes(want: int | None, timeout: float, cpus: float, gpus: float,
                   suspects: set[str] = frozenset()) -> tuple[list[NodeSlot], list[str]]:
    """`cluster_nodes`; with `want`, wait up to `timeout` s for that many usable nodes (then take what is there)."""
    deadline = time.monotonic() + timeout
    while True:
        nodes, refused = cluster_nodes(cpus, gpus, suspects)
        if want is None or len(nodes) >= want or time.monotonic() >= deadline:
            return nodes, refused
        time.sleep(min(2.0, max(0.1, deadline - time.monotonic())))


def assign_nodes(nodes: Sequence[NodeSlot], resident: Sequence[int], cpus: float, gpus: float,
                 refused: Sequence[str] = ()) -> list[str]:
    """The IP each actor goes to: fewest actors first, then node order; raises JobFailure(3) when they do not fit.

    `resident[i]` is actor i's resident expert bytes, checked against each node's `memory` resource.
    """
    count = {n.ip: 0 for n in nodes}
    mem = {n.ip: 0 for n in nodes}
    out = []
    for i, need in enumerate(resident):
        fits = [n for n in nodes if count[n.ip] < n.capacity(cpus, gpus)
                and (not n.memory or mem[n.ip] + need <= n.memory)]
        if not fits:
            have = "; ".join(n.describe() for n in nodes) or "none"
            extra = f"; alive nodes that cannot hold one: {'; '.join(refused)}" if refused else ""
            raise JobFailure(EXIT_TOO_SMALL, (
                f"the cluster is too small for {len(resident)} expert actors asking {cpus:g} CPU(s), {gpus:g} GPU(s) "
                f"and up to {format_bytes(max(resident))} of resident experts each: it holds only {i}. Nodes that "
                f"can hold an actor: {have}{extra}. Use fewer --workers, smaller --cpus-per-worker/--worker-memory, "
                f"or add nodes"))
        best = min(fits, key=lambda n: count[n.ip])  # stable: ties keep node order
        count[best.ip] += 1
        mem[best.ip] += need
        out.append(best.ip)
    return out


# ---- the job -----------------------------------------------------------------------------------

def _plan(specs, workers: int, opts: RunOptions, top_k: int, pinned):
    from cluster.errors import ClusterError
    from cluster.placement import PlacementBudgetError, plan_placement
    from workers.dtypes import COMPUTE_DTYPES

    try:
        return plan_placement(specs, workers, dtype_bytes=COMPUTE_DTYPES[opts.dtype].itemsize,
                              worker_memory=opts.store.budget_bytes, min_resident=top_k, pinned=pinned,
                              num_cpus=opts.placement.num_cpus, num_gpus=opts.placement.num_gpus)
    except PlacementBudgetError as e:
        raise JobFailure(EXIT_TOO_SMALL, f"the plan does not fit: {cli_message(e)}") from None
    except (ClusterError, ValueError) as e:
        raise JobFailure(EXIT_ERROR, f"cannot plan {workers} expert actors: {e}") from None


def _place(args: argparse.Namespace, opts: RunOptions, specs, top_k: int, pinned, workers: int | None,
           suspects: set[str]) -> tuple[int, list[dict] | None, list[str]]:
    """(workers, `resources=` per actor or None for SPREAD, target IPs) on the cluster as it is now."""
    cpus, gpus = opts.placement.num_cpus, opts.placement.num_gpus
    nodes, refused = wait_for_nodes(workers, args.wait_for_nodes, cpus, gpus, suspects)
    if not nodes:
        raise JobFailure(EXIT_TOO_SMALL, (
            f"no alive node can hold an expert actor asking {cpus:g} CPU(s) and {gpus:g} GPU(s); alive nodes: "
            f"{'; '.join(refused) or 'none'}"))
    if workers is None:
        workers = len(nodes)
    plan = _plan(specs, workers, opts, top_k, pinned)
    ips = assign_nodes(nodes, [w.resident_bytes for w in plan.workers], cpus, gpus, refused)
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
