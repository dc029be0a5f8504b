"""Typed options of a moeshard run: one frozen dataclass per concern, and one table of every option.

`OPTIONS` is the one place that says, for each option, its Python name, its CLI flag, which
concern it belongs to, what it allows and how it is checked. The dataclasses check their fields
against it when they are built, the CLI builds its flags from it (`cluster/cli.py`), the job
reuses them, and docs/options.md is written from it (`scripts/write_options_doc.py`).

    RunOptions.from_kwargs(num_workers=2, worker_memory="8MB", policy="lru")   # the API's keywords
    RunOptions(store=StoreOptions(budget_bytes=8_000_000), placement=PlacementOptions(num_workers=2))

Errors: a value out of range raises `OptionError` (a ValueError) naming the option; a name that is
not an option, or an option that does not apply to this backend (actor placement with
`num_workers=0`), raises `UnknownOption` (a TypeError). Both carry `.option`, the Python name, so
the CLI can say the flag instead (`cli_message`).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Iterable, Mapping

from workers.dtypes import COMPUTE_DTYPES
from workers.errors import MoeshardError
from workers.quant import DEFAULT_GROUP_SIZE, EXPERT_DTYPES, GROUP_SIZES
from workers.units import parse_bytes

DTYPE_NAMES = tuple(COMPUTE_DTYPES)
POLICY_NAMES = ("lfu-decay", "lfu", "lru")
ROUTING_MODES = ("exact", "cache-aware")
ROUTING_POLICIES = ("cache-prior", "max-rank")
TRANSPORT_NAMES = ("direct", "calls")


class OptionError(MoeshardError, ValueError):
    """An option's value is not allowed. `option` is its Python name, `detail` what is wrong."""

    def __init__(self, option: str, detail: str):
        self.option, self.detail = option, detail
        super().__init__(f"{option}: {detail}")


class UnknownOption(MoeshardError, TypeError):
    """An option name that does not exist, or one that does not apply to the chosen backend."""

    def __init__(self, option: str, detail: str):
        self.option, self.detail = option, detail
        super().__init__(f"{option}: {detail}")


# ---- checks: each takes a value and returns it normalised, or raises ValueError(what is allowed) ----

def _show(v: Any) -> str:
    return repr(v) if isinstance(v, str) else str(v)


def integer(lo: int | None = None, hi: int | None = None, optional: bool = False) -> Callable[[Any], Any]:
    def check(v: Any) -> Any:
        if v is None and optional:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            if not (hasattr(v, "__index__") and not isinstance(v, bool)):
                raise ValueError(f"must be an integer{_range(lo, hi)}, got {_show(v)}")
            v = int(v.__index__())
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise ValueError(f"must be an integer{_range(lo, hi)}, got {v}")
        return v
    check.kind = "int"  # type: ignore[attr-defined]  # how the CLI reads it
    return check


def number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
           optional: bool = False) -> Callable[[Any], Any]:
    def check(v: Any) -> Any:
        if v is None and optional:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"must be a number{_range(lo, hi, lo_open)}, got {_show(v)}")
        v = float(v)
        if not math.isfinite(v) or (lo is not None and (v <= lo if lo_open else v < lo)) or \
                (hi is not None and v > hi):
            raise ValueError(f"must be a finite number{_range(lo, hi, lo_open)}, got {v:g}")
        return v
    check.kind = "float"  # type: ignore[attr-defined]  # how the CLI reads it
    return check


def _range(lo: float | None, hi: float | None, lo_open: bool = False) -> str:
    if lo is not None and hi is not None:
        return f" in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
    if lo is not None:
        return f" {'>' if lo_open else '>='} {lo:g}"
    return "" if hi is None else f" <= {hi:g}"


def choice(names: Iterable[str], optional: bool = False) -> Callable[[Any], Any]:
    names = tuple(names)

    def check(v: Any) -> Any:
        if v is None and optional:
            return None
        if isinstance(v, bool) or v not in names or type(v) is not type(names[0]):
            raise ValueError(f"must be one of {', '.join(map(str, names))}, got {_show(v)}")
        return v
    check.kind, check.choices = "choice", names  # type: ignore[attr-defined]
    return check


def size(optional: bool = True) -> Callable[[Any], Any]:
    """A byte count: an int, or a string like "2GB" (10^9) / "2GiB" (2^30)."""
    def check(v: Any) -> Any:
        if v is None and optional:
            return None
        if isinstance(v, bool):
            raise ValueError(f"must be a size like 2GB, 512MiB or a number of bytes, got {v}")
        try:
            n = parse_bytes(v)
        except (ValueError, TypeError):
            raise ValueError(f"must be a size like 2GB, 512MiB or a number of bytes, got {_show(v)}") from None
        if n is None or n < 1:
            raise ValueError(f"must be a positive size like 2GB, 512MiB or a number of bytes, got {_show(v)}")
        return n
    check.kind = "size"  # type: ignore[attr-defined]  # how the CLI reads it
    return check


def text(optional: bool = True) -> Callable[[Any], Any]:
    def check(v: Any) -> Any:
        if v is None and optional:
            return None
        if hasattr(v, "__fspath__"):
            v = str(v.__fspath__())
        if not isinstance(v, str) or not v.strip():
            raise ValueError(f"must be a non-empty string, got {_show(v)}")
        return v
    check.kind = "str"  # type: ignore[attr-defined]  # how the CLI reads it
    return check


def flag() -> Callable[[Any], Any]:
    def check(v: Any) -> Any:
        if not isinstance(v, bool):
            raise ValueError(f"must be True or False, got {_show(v)}")
        return v
    check.kind = "flag"  # type: ignore[attr-defined]  # how the CLI reads it
    return check


def int_list(lo: int = 0) -> Callable[[Any], Any]:
    def check(v: Any) -> Any:
        if isinstance(v, (str, bytes)) or not isinstance(v, Iterable):
            raise ValueError(f"must be a list of integers >= {lo}, got {_show(v)}")
        out = []
        for x in v:
            if isinstance(x, bool) or not isinstance(x, int) or x < lo:
                raise ValueError(f"must be a list of integers >= {lo}, got {_show(x)} in it")
            out.append(int(x))
        return tuple(sorted(set(out)))
    check.kind = "ints"  # type: ignore[attr-defined]  # how the CLI reads it
    return check


def pairs() -> Callable[[Any], Any]:
    def check(v: Any) -> Any:
        bad = ValueError(f"must be a list of (layer, expert) pairs of integers >= 0, got {_show(v)}")
        if isinstance(v, (str, bytes)) or not isinstance(v, Iterable):
            raise bad
        out = set()
        for p in v:
            try:
                layer, expert = p
            except (TypeError, ValueError):
                raise bad from None
            if any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in (layer, expert)):
                raise bad
            out.add((int(layer), int(expert)))
        return tuple(sorted(out))
    check.kind = "pairs"  # type: ignore[attr-defined]  # how the CLI reads it
    return check


def resource_list() -> Callable[[Any], Any]:
    def check(v: Any) -> Any:
        if v is None:
            return None
        if isinstance(v, (str, bytes, Mapping)) or not isinstance(v, Iterable):
            raise ValueError(f"must be a list with one dict of Ray resources per actor, got {_show(v)}")
        out = []
        for d in v:
            if not isinstance(d, Mapping) or not all(
                    isinstance(k, str) and isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0
                    for k, x in d.items()):
                raise ValueError(f"must be a list of dicts {{resource name: amount >= 0}}, got {_show(d)} in it")
            out.append(dict(d))
        return tuple(out)
    check.kind = "resources"  # type: ignore[attr-defined]  # how the CLI reads it
    return check


# ---- the table ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Option:
    """One option: where it lives, how the CLI spells it, what it allows, an invalid value for tests."""

    name: str                       # Python name (keyword of from_pretrained / field of its dataclass)
    group: str                      # "run", "store", "placement", "transport", "recovery", "routing", "generate"
    check: Callable[[Any], Any]
    allowed: str                    # what a person reads in docs/options.md
    flag: str | None = None         # CLI flag, None where the CLI has none
    field: str | None = None        # dataclass field, where it differs from `name`
    invalid: tuple = ()             # values the invalid-input test feeds the API
    cli_invalid: tuple = ()         # what the same test feeds the CLI flag
    help: str = ""                  # the flag's --help text, where `allowed` does not say enough


OPTIONS: tuple[Option, ...] = (
    Option("num_workers", "placement", integer(0), "integer >= 0; 0 keeps routed experts in this process",
           "--workers", invalid=(-1, 1.5, "2"), cli_invalid=("-1", "x"),
           help="expert-shard Ray actors to spread the routed experts over; 0 keeps them in this process"),
    Option("worker_memory", "store", size(), "size (2GB = 10^9 bytes, 2GiB = 2^30, or bytes) or None (no limit)",
           "--worker-memory", field="budget_bytes", invalid=(0, "lots", -5), cli_invalid=("lots", "0"),
           help="resident routed-expert bytes per expert holder, e.g. 2GB (10^9), 512MiB (2^20) or bytes; experts "
                "beyond it are paged from the checkpoint files; none = no limit, all resident"),
    Option("dtype", "run", choice(DTYPE_NAMES), " | ".join(DTYPE_NAMES), "--dtype", invalid=("int3",),
           cli_invalid=("int3",),
           help="compute dtype (checkpoint files may be any of these)"),
    Option("ray_address", "placement", text(), "host:port of a Ray cluster, 'auto', 'local', or None",
           "--ray-address", invalid=("",), cli_invalid=("",),
           help="join this Ray cluster (host:port of its GCS, e.g. 10.0.0.5:6379); default: RAY_ADDRESS, else start a local Ray when --workers > 0"),
    Option("lock_timeout_s", "run", number(0, optional=True), "seconds >= 0, or None (wait for the running call)",
           invalid=(-1, float("nan"))),
    Option("coordinator_threads", "run", integer(1, optional=True),
           "integer >= 1: torch threads of the coordinator; None = the cores actors on this node leave free",
           "--coordinator-threads", invalid=(0, -2), cli_invalid=("0", "x"),
           help="torch threads of this process; default: the cores that expert actors placed on this machine leave free, else unchanged"),
    Option("prefetch_depth", "store", integer(0), "integer >= 0 (0 = no prefetch)", "--prefetch-depth",
           invalid=(-1,), cli_invalid=("-1",),
           help="how many next layers' routers predict experts to prefetch (0 = off)"),
    Option("prefetch_extra", "store", integer(0), "integer >= 0", "--prefetch-extra", invalid=(-1,),
           cli_invalid=("-1",),
           help="candidates beyond top-k each prediction prefetches"),
    Option("policy", "store", choice(POLICY_NAMES), " | ".join(POLICY_NAMES), "--policy", invalid=("fifo",),
           cli_invalid=("fifo",),
           help="which resident expert to evict when paging"),
    Option("pin", "store", pairs(), "list of (layer, expert) pairs of the model's routed experts",
           invalid=([(0,)], "0,1")),
    Option("pin_layers", "store", int_list(), "MoE layer indices of the model (comma-separated on the CLI)",
           "--pin-layers", invalid=([-1], "0"), cli_invalid=("a,b", "-1"),
           help="keep every expert of these MoE layers resident (never evicted; counts against the budget)"),
    Option("expert_dtype", "store", choice(EXPERT_DTYPES, optional=True),
           " | ".join(EXPERT_DTYPES) + ", or None (experts as stored)", "--expert-dtype",
           invalid=("int3", "fp8", 8), cli_invalid=("int3",),
           help="hold and compute routed experts in int8 (per output channel) or int4 (groups of --group-size); "
                "quantized when first read, then held quantized in memory, spill files and the budget "
                "(docs/quantization.md); default: as stored"),
    Option("group_size", "store", choice(GROUP_SIZES), " | ".join(map(str, GROUP_SIZES)) + " (int4 only)",
           "--group-size", invalid=(48, 0, "64", True), cli_invalid=("48", "x"),
           help="int4 group size along each weight's input dimension; must divide the hidden and intermediate sizes"),
    Option("spill_dir", "store", text(), "directory (created if missing), or None", "--spill-dir",
           invalid=("", 5), cli_invalid=("",),
           help="keep each expert's compute-dtype image here after its first read, for faster reloads (a folder, created if missing)"),
    Option("num_cpus_per_worker", "placement", number(0, lo_open=True), "number > 0 (Ray CPUs per actor)",
           "--cpus-per-worker", field="num_cpus", invalid=(0, -1), cli_invalid=("0", "x"),
           help="Ray CPUs each actor asks for (> 0); also its torch thread count"),
    Option("num_gpus_per_worker", "placement", number(0), "number >= 0 (Ray GPUs per actor)",
           "--gpus-per-worker", field="num_gpus", invalid=(-1,), cli_invalid=("-1",),
           help="Ray GPUs each actor asks for (>= 0); > 0 runs its experts on CUDA"),
    Option("resources", "placement", resource_list(), "one dict of Ray custom resources per actor, or None",
           invalid=({"host_1": 1}, ["x"])),
    Option("rebalance_interval", "placement", integer(1, optional=True),
           "integer >= 1: forward passes between load-driven re-placements; None = off", "--rebalance-interval",
           invalid=(0, 2.5, "100"), cli_invalid=("0", "x"),
           help="every N forward passes, plan replicas of the hottest experts from the recent load, within each "
                "actor's spare budget, and apply them live when they even out rows per actor (docs/placement.md); "
                "default: off"),
    Option("ready_timeout_s", "placement", number(0, lo_open=True), "seconds > 0", "--ready-timeout",
           invalid=(0,), cli_invalid=("0",),
           help="seconds to wait for the expert actors to start (> 0)"),
    Option("transport", "transport", choice(TRANSPORT_NAMES), " | ".join(TRANSPORT_NAMES) + " (default direct)",
           "--transport", invalid=("auto", "graph"), cli_invalid=("auto", "graph"),
           help="how each layer reaches the actors: an authenticated ZMQ channel straight to each actor (direct, the default; Ray keeps the control plane) or plain Ray actor calls (calls: the fallback and the comparison)"),
    Option("call_timeout_s", "transport", number(0, lo_open=True), "seconds > 0", "--call-timeout",
           invalid=(0, -1, float("inf")), cli_invalid=("0", "inf"),
           help="seconds to wait for an actor's reply before it counts as lost (> 0)"),
    Option("max_call_retries", "recovery", integer(0), "integer >= 0", invalid=(-1,)),
    Option("max_generation_retries", "recovery", integer(0), "integer >= 0", invalid=(-1,)),
    Option("restart_timeout_s", "recovery", number(0, lo_open=True), "seconds > 0", invalid=(0,)),
    Option("takeover_memory", "recovery", size(), "size, or None (measure the node's free memory)",
           invalid=(0, "big")),
    Option("takeover_share", "recovery", number(0, 1, lo_open=True), "number in (0, 1]", invalid=(0, 1.5)),
    Option("routing", "routing", choice(ROUTING_MODES), " | ".join(ROUTING_MODES) + " (default exact)",
           "--routing", field="mode", invalid=("sticky", 1), cli_invalid=("sticky",),
           help="exact: the model's own routing, bit-identical to transformers; cache-aware: prefer experts "
                "already resident (docs/routing.md)"),
    Option("routing_policy", "routing", choice(ROUTING_POLICIES), " | ".join(ROUTING_POLICIES) + " (cache-aware only)",
           "--routing-policy", field="policy", invalid=("lru",), cli_invalid=("lru",),
           help="cache-prior: demote non-resident experts by --routing-strength of the token's score range; "
                "max-rank: prefer resident experts within the true top --routing-max-rank"),
    Option("routing_strength", "routing", number(0), "finite number >= 0 (cache-prior; 0 = only the cap)",
           "--routing-strength", field="strength", invalid=(-0.1, float("nan"), "1"), cli_invalid=("-1", "x"),
           help="cache-prior bias as a fraction of each token's router-score range (>= 1: any resident expert "
                "beats any non-resident one)"),
    Option("routing_max_rank", "routing", integer(1), "integer >= 1 (max-rank; at least the model's top-k)",
           "--routing-max-rank", field="max_rank", invalid=(0, 2.5), cli_invalid=("0", "x"),
           help="max-rank: how deep in the router's true ranking a resident expert may be taken from"),
    Option("max_new_experts_per_token", "routing", integer(0), "integer >= 0 (cache-aware only)",
           "--max-new-experts", field="max_new_experts_per_token", invalid=(-1, 1.5), cli_invalid=("-1", "x"),
           help="at most this many non-resident experts per token and layer, while the layer has enough "
                "resident candidates (docs/routing.md)"),
    Option("max_new_tokens", "generate", integer(0), "integer >= 0", "--max-new-tokens", invalid=(-1, 2.5),
           cli_invalid=("-1", "x"),
           help="tokens to generate (>= 0); prompt + new tokens must fit the model's context"),
    Option("do_sample", "generate", flag(), "True | False (--sample)", "--sample", invalid=("yes",),
           help="sample instead of greedy decoding"),
    Option("temperature", "generate", number(0), "finite number >= 0 (0 = greedy)", "--temperature",
           invalid=(-0.5, float("nan"), float("inf")), cli_invalid=("-0.5", "nan", "inf"),
           help="sampling temperature, finite and >= 0 (0 = greedy; with --sample)"),
    Option("top_p", "generate", number(0, 1, lo_open=True), "number in (0, 1]", "--top-p", invalid=(0, 1.5),
           cli_invalid=("0", "1.5"),
           help="nucleus sampling mass in (0, 1] (with --sample)"),
    Option("seed", "generate", integer(optional=True), "integer, or None", "--seed", invalid=(1.5, "7"),
           cli_invalid=("1.5",),
           help="integer seed for reproducible sampling"),
)
BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS}
BY_FLAG: dict[str, Option] = {o.flag: o for o in OPTIONS if o.flag}


def flag_of(name: str) -> str:
    """The CLI spelling of option `name` (its Python name where the CLI has no flag)."""
    opt = BY_NAME.get(name)
    return opt.flag if opt is not None and opt.flag else name


def in_cli_terms(text: str) -> str:
    """`text` with every option's Python name replaced by its CLI flag."""
    for opt in OPTIONS:
        if opt.flag and opt.name in text:
            text = re.sub(rf"(?<![\w-]){opt.name}(?![\w-])", opt.flag, text)
    return text


def cli_message(e: Exception) -> str:
    """An error in the CLI's terms: flags instead of Python names (and the flag first, for an option's error)."""
    if isinstance(e, (OptionError, UnknownOption)):
        return f"{flag_of(e.option)}: {in_cli_terms(e.detail)}"
    return in_cli_terms(" ".join(str(e).split()))


def check_option(name: str, value: Any) -> Any:
    """`value` normalised by option `name`'s check, or OptionError naming it."""
    try:
        return BY_NAME[name].check(value)
    except ValueError as e:
        raise OptionError(name, str(e)) from None


class _Checked:
    """Checks every field against `OPTIONS` when a frozen dataclass below is built."""

    def __post_init__(self) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            name = _FIELD_TO_NAME.get((type(self).__name__, f.name))
            if name is not None:
                object.__setattr__(self, f.name, check_option(name, getattr(self, f.name)))


@dataclass(frozen=True)
class StoreOptions(_Checked):
    """Each expert holder's memory: budget, eviction, pinning, spill files, prefetch."""

    budget_bytes: int | None = None
    policy: str = "lfu-decay"
    pin: tuple[tuple[int, int], ...] = ()
    pin_layers: tuple[int, ...] = ()
    spill_dir: str | None = None
    expert_dtype: str | None = None
    group_size: int = DEFAULT_GROUP_SIZE
    prefetch_depth: int = 1
    prefetch_extra: int = 0


@dataclass(frozen=True)
class PlacementOptions(_Checked):
    """Where the expert actors run (distributed only, except `num_workers`)."""

    num_workers: int = 0
    ray_address: str | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: tuple[dict[str, float], ...] | None = None
    ready_timeout_s: float = 120.0
    rebalance_interval: int | None = None


@dataclass(frozen=True)
class TransportOptions(_Checked):
    """How each layer's routed rows reach the actors (distributed only)."""

    transport: str = "direct"
    call_timeout_s: float = 60.0


@dataclass(frozen=True)
class RecoveryOptions(_Checked):
    """How hard the distributed backend tries before it gives up (see cluster/recovery.py).

    max_call_retries: resends of one layer call to a replacement actor (0 = fail at once).
    max_generation_retries: resends across one request (the Coordinator starts one per call).
    restart_timeout_s: bound on a replacement actor becoming ready (process start, imports).
    takeover_memory: expert budget of an actor that takes over on another node because its own is
        gone; None = `takeover_share` of the memory that node has free, capped by the planned budget.
    """

    max_call_retries: int = 3
    max_generation_retries: int = 10
    restart_timeout_s: float = 60.0
    takeover_memory: int | None = None
    takeover_share: float = 0.5


@dataclass(frozen=True)
class RoutingOptions(_Checked):
    """Which experts each token uses (coordinator/cache_routing.py, docs/routing.md).

    mode "exact" is the model's own routing. "cache-aware" prefers experts already resident
    where the router's own ranking allows: `policy` says how (cache-prior: demote non-resident
    experts by `strength` x the token's score range; max-rank: resident experts within the true top
    `max_rank` first), and no token takes more than `max_new_experts_per_token` non-resident experts
    in a layer while that layer has enough resident candidates. The other fields only apply to
    cache-aware: giving one with mode "exact" is an error (UnknownOption), not silently ignored.
    """

    mode: str = "exact"
    policy: str = "cache-prior"
    strength: float = 0.5
    max_rank: int = 4
    max_new_experts_per_token: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode == "exact":
            for f in fields(self):
                if f.name != "mode" and getattr(self, f.name) != f.default:
                    raise UnknownOption(_FIELD_TO_NAME[("RoutingOptions", f.name)],
                                        "applies only with routing='cache-aware' (the exact mode has nothing to tune)")

    @property
    def cache_aware(self) -> bool:
        return self.mode == "cache-aware"


@dataclass(frozen=True)
class SamplingOptions(_Checked):
    """How `generate` picks tokens."""

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass(frozen=True)
class RunOptions(_Checked):
    """Everything `Coordinator.from_pretrained` takes beyond the checkpoint path."""

    dtype: str = "float32"
    lock_timeout_s: float | None = None
    coordinator_threads: int | None = None
    store: StoreOptions = field(default_factory=StoreOptions)
    placement: PlacementOptions = field(default_factory=PlacementOptions)
    transport: TransportOptions = field(default_factory=TransportOptions)
    recovery: RecoveryOptions = field(default_factory=RecoveryOptions)
    routing: RoutingOptions = field(default_factory=RoutingOptions)

    @property
    def distributed(self) -> bool:
        return self.placement.num_workers > 0

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "RunOptions":
        """Build from the flat keywords of `from_pretrained` (None = the default, for every option).

        Unknown names, and options of actor placement, transport or recovery with
        `num_workers=0`, raise UnknownOption naming them."""
        groups: dict[str, dict[str, Any]] = {g: {} for g in ("run", "store", "placement", "transport", "recovery",
                                                               "routing")}
        typed_routing = kwargs.get("routing")
        if isinstance(typed_routing, RoutingOptions):     # routing=RoutingOptions(...): the whole group, typed
            extra = [n for n, v in kwargs.items() if v is not None and n != "routing" and
                     BY_NAME.get(n) is not None and BY_NAME[n].group == "routing"]
            if extra:
                raise UnknownOption(extra[0], "give routing=RoutingOptions(...) or routing keywords, not both")
            kwargs = {n: v for n, v in kwargs.items() if n != "routing"}
        for name, value in kwargs.items():
            opt = BY_NAME.get(name)
            if opt is None or opt.group == "generate":
                known = ", ".join(o.name for o in OPTIONS if o.group != "generate")
                raise UnknownOption(name, f"unknown option; from_pretrained takes {known}")
            if value is not None:
                groups[opt.group][opt.field or opt.name] = value
        workers = check_option("num_workers", groups["placement"].pop("num_workers", 0))
        if workers == 0:
            remote = [n for g in ("placement", "transport", "recovery") for n in groups[g]]
            if remote:
                name = _NAME_OF_FIELD.get(remote[0], remote[0])
                raise UnknownOption(name, "applies only to expert actors (num_workers > 0); with num_workers=0 "
                                          "the experts run in this process")
        given = [f for f in groups["routing"] if f != "mode"]
        for f in given:                                    # a bad value is named as such first
            check_option(_NAME_OF_FIELD.get(f, f), groups["routing"][f])
        if given and groups["routing"].get("mode", "exact") == "exact":     # even at its default value
            raise UnknownOption(_NAME_OF_FIELD.get(given[0], given[0]),
                                "applies only with routing='cache-aware' (the exact mode has nothing to tune)")
        return cls(**groups["run"], store=StoreOptions(**groups["store"]),
                   placement=PlacementOptions(num_workers=workers, **groups["placement"]),
                   transport=TransportOptions(**groups["transport"]),
                   recovery=RecoveryOptions(**groups["recovery"]),
                   routing=typed_routing if isinstance(typed_routing, RoutingOptions) else
                   RoutingOptions(**groups["routing"]))

    def with_(self, **changes: Any) -> "RunOptions":
        return replace(self, **changes)


_CLASSES = {"run": RunOptions, "store": StoreOptions, "placement": PlacementOptions,
            "transport": TransportOptions, "recovery": RecoveryOptions, "routing": RoutingOptions,
            "generate": SamplingOptions}


def default_of(name: str) -> Any:
    """The default of option `name`: what leaving it out means."""
    opt = BY_NAME[name]
    return next(f.default for f in fields(_CLASSES[opt.group]) if f.name == (opt.field or opt.name))


_FIELD_TO_NAME = {(_CLASSES[o.group].__name__, o.field or o.name): o.name for o in OPTIONS}
_NAME_OF_FIELD = {o.field: o.name for o in OPTIONS if o.field}
