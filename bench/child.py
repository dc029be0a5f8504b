"""A benchmark child process: loads one system, runs timed commands, answers in JSON.

Started by `bench.common.Child`; reads one JSON command per line on stdin and writes
one reply per command on stdout after the `@@BENCH ` marker. Commands:

- load {system: moeshard|transformers|accelerate|llama_cpp, path, ...options} (replaces what was loaded;
  llama_cpp: path is a GGUF file, options threads, use_mmap, n_ctx; batch 1 only)
- decode {batch, prompt_len, new_tokens, seed, sample}  -> tok/s over the decode steps only
- prefill {batch, length, seed}                          -> tok/s of one prompt pass
- drop_resident {}                                       -> moeshard forgets its resident experts (a cold cache)
- read_bandwidth {path, seconds, threads, probes}       -> cold read bandwidth probes from this process
- stats, memory, breakdown_reset, dispatch_bench, ray_init, quit
"""
from __future__ import annotations

import gc
import dataclasses
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from bench.placement import op_placement

MARK = "@@BENCH "
_THREADS = int(os.environ.get("MOESHARD_BENCH_THREADS", "0") or 0)
if _THREADS:
    torch.set_num_threads(_THREADS)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass


def reply(obj: dict) -> None:
    sys.stdout.write(MARK + json.dumps(obj, default=_default) + "\n")
    sys.stdout.flush()


def _default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    if dataclasses.is_dataclass(o) and not isinstance(o, type):   # typed stats (RerouteStats)
        return dataclasses.asdict(o)
    return repr(o)


# ---- per-layer time breakdown of moeshard ------------------------------------------------------

class Breakdown:
    """Wall time of attention, routing, dispatch, expert compute and I/O stall, summed over a run.

    Installed by wrapping the model's attention modules, the routers and the experts backend.
    For remote experts, a layer's expert compute is the slowest actor's compute (the critical
    path), its I/O stall that actor's stall, and dispatch the rest of the submit..wait time.
    """

    KEYS = ("attention", "routing", "dispatch", "expert_compute", "io_stall")

    def __init__(self, coord: Any):
        self.t = dict.fromkeys(self.KEYS, 0.0)
        self.layers = 0
        self._calls: list[tuple[float, float]] = []
        model, experts = coord.model, coord.experts
        for layer in model.layers:
            self._wrap(layer.self_attn, "forward", "attention")
            if getattr(layer, "is_moe", False):
                self._wrap(layer.mlp, "route", "routing")
        self._wrap_experts(experts)

    def _wrap(self, obj: Any, attr: str, key: str) -> None:
        fn = getattr(obj, attr)

        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.t[key] += time.perf_counter() - t0

        setattr(obj, attr, timed)

    def _wrap_experts(self, experts: Any) -> None:
        submit, wait = experts.submit, experts.wait
        shard = getattr(experts, "shard", None)
        if shard is not None:       # LocalExperts: compute happens inside submit
            compute = shard.compute

            def timed_compute(*a, **kw):
                s0, t0 = shard.store.stall_seconds, time.perf_counter()
                try:
                    return compute(*a, **kw)
                finally:
                    dt, st = time.perf_counter() - t0, shard.store.stall_seconds - s0
                    self._calls.append((dt, st))

            shard.compute = timed_compute
        else:                       # RemoteExperts: its per-layer trace hook gives each actor's compute/stall
            def on_layer(trace):
                self._calls.extend((t.compute_s, t.stall_s) for t in trace.actors)

            experts.add_trace_hook(on_layer)

        state: dict[str, float] = {}

        def timed_submit(*a, **kw):
            self._calls.clear()
            state["t0"] = time.perf_counter()
            return submit(*a, **kw)

        def timed_wait(p):
            try:
                return wait(p)
            finally:
                wall = time.perf_counter() - state.pop("t0", time.perf_counter())
                comp, stall = max(self._calls, default=(0.0, 0.0))
                comp = min(comp, wall)
                stall = min(stall, comp)
                self.t["expert_compute"] += comp - stall
                self.t["io_stall"] += stall
                self.t["dispatch"] += wall - comp
                self.layers += 1

        experts.submit, experts.wait = timed_submit, timed_wait

    def reset(self) -> None:
        self.t = dict.fromkeys(self.KEYS, 0.0)
        self.layers = 0

    def snapshot(self) -> dict:
        return {"seconds": dict(self.t), "moe_layer_calls": self.layers}


# ---- the loaded system --------------------------------------------------------------------------

class State:
    system: str | None = None
    obj: Any = None           # Coordinator or transformers model
    breakdown: Breakdown | None = None
    opts: dict = {}
    vocab: int = 0
    first_token_counters: dict = {}


S = State()


def _rss_tree(pid: int | None = None) -> dict:
    import psutil

    p = psutil.Process(pid or os.getpid())
    out = {"pid": p.pid, "rss": p.memory_info().rss}
    try:
        full = p.memory_full_info()
        out["uss"], out["pss"] = full.uss, getattr(full, "pss", None)
    except Exception:
        pass
    try:
        with open(f"/proc/{p.pid}/status") as f:
            for line in f:
                if line.startswith(("RssAnon", "RssFile", "RssShmem", "VmHWM")):
                    k, v = line.split(":")
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def op_ray_init(num_cpus: int = 2, object_store_memory: int | None = None, address: str | None = None,
                init_kwargs: dict | None = None, env: dict | None = None, **_: Any) -> dict:
    import logging

    import ray

    os.environ.update(env or {})
    if ray.is_initialized():
        ray.shutdown()
    if init_kwargs:
        ray.init(**init_kwargs, logging_level=logging.WARNING)
    else:
        kw: dict[str, Any] = dict(address=address or "local", num_cpus=num_cpus, num_gpus=0, include_dashboard=False,
                                  logging_level=logging.WARNING)
        if object_store_memory:
            kw["object_store_memory"] = int(object_store_memory)
        ray.init(**kw)
    return {"resources": ray.cluster_resources()}


def _close() -> None:
    if S.obj is not None:
        if S.system in ("moeshard", "llama_cpp"):
            S.obj.close()
        S.obj = None
        S.breakdown = None
        gc.collect()


def op_load(system: str, path: str, **o: Any) -> dict:
    _close()
    t0 = time.perf_counter()
    S.system, S.opts = system, {**o, "path": path}
    if o.get("threads"):
        torch.set_num_threads(int(o["threads"]))
    if system == "moeshard":
        from coordinator import Coordinator

        kw = dict(num_workers=o.get("num_workers", 0), worker_memory=o.get("worker_memory"),
                  prefetch_depth=o.get("prefetch_depth", 1), prefetch_extra=o.get("prefetch_extra", 0),
                  policy=o.get("policy", "lfu-decay"), dtype=o.get("dtype", "float32"))
        for k in ("num_cpus_per_worker", "resources", "call_timeout_s", "transport", "expert_dtype", "group_size",
                  "routing", "routing_policy", "routing_strength", "routing_max_rank", "max_new_experts_per_token"):
            if o.get(k) is not None:
                kw[k] = o[k]
        if o.get("coordinator_threads"):   # else, with actors on this node, it takes the cores they leave free
            kw["coordinator_threads"] = int(o["coordinator_threads"])
        if o.get("num_workers", 0) and o.get("ray"):
            op_ray_init(**o["ray"])
        S.obj = Coordinator.from_pretrained(path, **kw)
        S.vocab = S.obj.config.vocab_size
        if o.get("instrument", True):
            S.breakdown = Breakdown(S.obj)
        if o.get("pin_all"):
            _warm_all(S.obj)
    elif system == "llama_cpp":
        S.obj = _load_llama_cpp(path, **o)
        S.vocab = S.obj.n_vocab()
    else:
        from transformers import AutoModelForCausalLM

        kw = dict(dtype=getattr(torch, o.get("dtype", "float32")))
        if system == "accelerate":
            kw.update(device_map="auto", max_memory={"cpu": int(o["max_memory"])},
                      offload_folder=o["offload_folder"])
        S.obj = AutoModelForCausalLM.from_pretrained(path, **kw).eval()
        S.vocab = S.obj.config.vocab_size
        dm = getattr(S.obj, "hf_device_map", None)
        out = {"moe": _moe_implementation(S.obj, probe=not dm)}
        if dm:
            placed: dict[str, int] = {}
            for mod, dev in dm.items():
                placed[str(dev)] = placed.get(str(dev), 0) + 1
            gc.collect()
            return {"load_s": time.perf_counter() - t0, "memory": _rss_tree(), "device_map_counts": placed,
                    "device_map": {k: str(v) for k, v in list(dm.items())[:200]}, "threads": torch.get_num_threads(),
                    **out}
        gc.collect()
        return {"load_s": time.perf_counter() - t0, "memory": _rss_tree(), "threads": torch.get_num_threads(), **out}
    gc.collect()
    return {"load_s": time.perf_counter() - t0, "memory": _rss_tree(), "threads": torch.get_num_threads(),
            "actor_threads": _actor_threads(S.obj) if system == "moeshard" else None}


#: kernels a transformers MoE block may dispatch to, as the profiler names them
_MOE_KERNELS = ("aten::_grouped_mm", "aten::grouped_mm", "transformers::grouped_mm_fallback", "aten::bmm",
                "aten::baddbmm", "aten::linear", "aten::addmm", "aten::mm", "aten::matmul")


def _moe_implementation(model: Any, probe: bool = True) -> dict:
    """Which MoE implementation transformers runs: the config's experts_implementation (transformers >= 5),
    the experts module's class, and (`probe`) the matmul kernels one 4-token forward calls, from the profiler."""
    cfg = model.config
    out: dict[str, Any] = {"experts_implementation": getattr(cfg, "_experts_implementation", None),
                           "transformers": getattr(__import__("transformers"), "__version__", None)}
    experts = next((m for n, m in model.named_modules() if n.endswith(".experts")), None)
    out["experts_module"] = type(experts).__name__ if experts is not None else None
    if not probe:
        return out
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(3, cfg.vocab_size, (1, 4), generator=torch.Generator().manual_seed(5))
    try:
        with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
            model(ids)
        calls = {e.key: e.count for e in prof.key_averages() if e.key in _MOE_KERNELS}
    except Exception as e:  # the profiler is a report, never a reason to fail the load
        return {**out, "kernel_probe_error": f"{type(e).__name__}: {e}"}
    out["kernel_calls_per_forward"] = calls
    grouped = [k for k in _MOE_KERNELS[:3] if calls.get(k)]
    out["kernel"] = grouped[0] if grouped else ("aten::bmm" if calls.get("aten::bmm") else "per-expert aten::linear")
    return out


def _actor_threads(coord: Any) -> list[int] | None:
    """Torch threads each expert actor reports it runs with (ExpertShard.report), None without actors."""
    if not hasattr(coord.experts, "reports"):
        return None
    return [r.get("torch_threads") for r in coord.experts.reports()]


def _load_llama_cpp(path: str, threads: int | None = None, use_mmap: bool = False, n_ctx: int = 1024,
                    **_: Any) -> Any:
    """A llama.cpp model on the CPU with the bench's thread count for decode and prompt alike. The KV
    cache is f32 like moeshard's and transformers' (llama.cpp defaults to f16); without mmap the weights
    are read into memory at load (in memory, as the other systems hold them)."""
    from llama_cpp import GGML_TYPE_F32, Llama

    n = int(threads or _THREADS or os.cpu_count() or 1)
    return Llama(model_path=path, n_gpu_layers=0, n_threads=n, n_threads_batch=n, n_ctx=int(n_ctx),
                 n_batch=512, use_mmap=bool(use_mmap), type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32,
                 flash_attn=False, verbose=False)


def _generate_llama_cpp(ids: torch.Tensor, new_tokens: int, sample: bool, seed: int
                        ) -> tuple[list[float], torch.Tensor]:
    """llama.cpp generation from the same prompt ids: temperature 1 straight from the softmax (its `dist`
    sampler alone: no top-k, top-p or min-p, as the other systems sample) or greedy; the cache is reset
    first so no round reuses another's prompt."""
    if ids.shape[0] != 1:
        raise ValueError(f"the llama_cpp system runs batch 1 only, got batch {ids.shape[0]}")
    llm = S.obj
    llm.reset()
    llm.set_seed(int(seed))
    times: list[float] = []
    out: list[int] = []
    gen = llm.generate(ids[0].tolist(), temp=-1.0 if sample else 0.0, top_k=0, top_p=1.0, min_p=0.0,
                       typical_p=1.0, repeat_penalty=1.0, reset=True)
    for tok in gen:
        times.append(time.perf_counter())
        out.append(int(tok))
        if len(out) >= new_tokens:
            break
    gen.close()
    return times, torch.cat([ids, torch.tensor([out])], dim=1)


def _warm_all(coord: Any) -> None:
    """Touch every routed expert once (a prefill that routes to all of them), so in-memory runs are warm."""
    cfg = coord.config
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(3, cfg.vocab_size, (1, 8 * cfg.num_experts), generator=g)
    coord.generate(ids, max_new_tokens=1)


def _ids(batch: int, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, S.vocab, (batch, length), generator=g)


class _Stamp:
    """transformers streamer: records when each generated token arrives (first put() is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._first = True

    def put(self, value: Any) -> None:
        if self._first:
            self._first = False
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _generate(ids: torch.Tensor, new_tokens: int, sample: bool, seed: int, prompt_ids: list[int] | None = None
              ) -> tuple[list[float], torch.Tensor]:
    """Run generation; return token arrival times and the output."""
    if S.system == "moeshard":
        times: list[float] = []

        def on_token(_t: torch.Tensor) -> None:
            if not times:   # prefill done: counters from here on cover decode steps only
                S.first_token_counters = _expert_counters()
            times.append(time.perf_counter())

        out = S.obj.generate(ids, max_new_tokens=new_tokens, do_sample=sample, temperature=1.0, seed=seed,
                             on_token=on_token)
        return times, out
    if S.system == "llama_cpp":
        return _generate_llama_cpp(ids, new_tokens, sample, seed)
    st = _Stamp()
    torch.manual_seed(seed)
    kw: dict[str, Any] = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
                              streamer=st, attention_mask=torch.ones_like(ids))
    if sample:
        kw.update(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    else:
        kw.update(do_sample=False)
    with torch.inference_mode():
        out = S.obj.generate(ids, **kw)
    return st.times, out


def _expert_counters() -> dict:
    """moeshard cache counters summed over expert holders (hits, misses, bytes read, stall)."""
    if S.system != "moeshard":
        return {}
    keys = ("hits", "late_hits", "misses", "ahead_loads", "bytes_read", "bytes_prefetched", "prefetch_issued", "prefetch_used",
            "prefetch_wasted", "prefetch_dropped", "evictions", "stall_seconds", "loads")
    if hasattr(S.obj.experts, "reports"):   # RemoteExperts: fetch raw reports
        reps = S.obj.experts.reports()
        out = {k: sum(r.get(k, 0) for r in reps) for k in keys}
    else:                                    # LocalExperts: the one in-process shard
        rep = S.obj.experts.shard.report()
        out = {k: rep.get(k, 0) for k in keys}
    # router-driven prefetch predictions scored on the coordinator: [predicted, needed, correct] per layer
    tracker = getattr(S.obj.model, "routing", None) or getattr(S.obj.model, "prefetch", None)
    per_layer = getattr(tracker, "_scores", None) or getattr(tracker, "_per_layer", None) or {}
    for i, k in enumerate(("pf_predicted", "pf_needed", "pf_correct")):
        out[k] = sum(c[i] for c in per_layer.values())
    return out


def _diff(a: dict, b: dict) -> dict:
    return {k: b[k] - a.get(k, 0) for k in b}


def _prompt(batch: int, prompt_len: int, seed: int, text: str | None) -> torch.Tensor:
    """Random token ids, or `text` through the checkpoint's tokenizer (cut/repeated to prompt_len)."""
    if text is None:
        return _ids(batch, prompt_len, seed)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(S.opts["path"]) / "tokenizer.json"))
    ids = tok.encode(text).ids
    ids = (ids * (prompt_len // max(1, len(ids)) + 1))[:prompt_len]
    return torch.tensor([ids] * batch)


def op_decode(batch: int = 1, prompt_len: int = 32, new_tokens: int = 16, seed: int = 0, sample: bool = True,
              text: str | None = None, **_: Any) -> dict:
    ids = _prompt(batch, prompt_len, seed, text)
    c0 = _expert_counters()
    r0 = _reroute_stats() if S.system == "moeshard" else None
    if S.breakdown:
        S.breakdown.reset()
    t0 = time.perf_counter()
    times, out = _generate(ids, new_tokens, sample, seed)
    total = time.perf_counter() - t0
    if len(times) < 2:
        raise RuntimeError(f"only {len(times)} tokens arrived")
    decode_s = times[-1] - times[0]
    steps = len(times) - 1
    res = {"tok_s": batch * steps / decode_s, "decode_s": decode_s, "steps": steps, "batch": batch,
           "total_s": total, "prefill_s": times[0] - t0, "threads": torch.get_num_threads(),
           "step_s": [b - a for a, b in zip(times, times[1:])]}
    if S.system == "moeshard":
        end = _expert_counters()
        res["experts"] = e = _diff(S.first_token_counters, end)          # decode steps only
        res["experts_with_prefill"] = _diff(c0, end)
        res["prefetch_precision"] = e["pf_correct"] / e["pf_predicted"] if e.get("pf_predicted") else None
        res["prefetch_recall"] = e["pf_correct"] / e["pf_needed"] if e.get("pf_needed") else None
        if S.breakdown:   # covers prefill and decode; breakdown_decode has decode steps only
            res["breakdown"] = S.breakdown.snapshot()
        res["distinct_tokens"] = int(torch.unique(out[:, prompt_len:]).numel())
        if r0 is not None:      # what cache-aware routing did in this call (prefill and decode)
            res["routing"] = _routing_diff(r0, _reroute_stats())
    return res


def op_routing_eval(text: str, prompt_len: int = 32, new_tokens: int = 32, prompts: int = 4,
                    max_length: int = 256, stepwise_tokens: int = 512, **_: Any) -> dict:
    """Quality and cache figures of one routing setting (bench scenario 10), from a cold expert cache:
    perplexity of `text` (sliding windows of `max_length`), its stepwise perplexity over the first
    `stepwise_tokens` tokens (one token per forward, as decode runs), then greedy decodes of `prompts` prompts
    cut from the text's second half (the cache carries over from one to the next, as on a server):
    their new tokens, tok/s over the decode steps, and the cache counters of those steps."""
    S.obj.drop_resident()
    c0 = _expert_counters()
    t0 = time.perf_counter()
    ppl = S.obj.perplexity(text, max_length=max_length, progress=False)
    ppl_s = time.perf_counter() - t0
    ppl_counters = _diff(c0, _expert_counters())
    ids = S.obj.tokenizer.encode(text).ids
    S.obj.drop_resident()
    c1, r1 = _expert_counters(), _reroute_stats()
    t0 = time.perf_counter()
    step_ppl = S.obj.perplexity(ids[:stepwise_tokens], max_length=max_length, stepwise=True, progress=False)
    step_s = time.perf_counter() - t0
    step_counters = _diff(c1, _expert_counters())
    step_routing = _routing_diff(r1, _reroute_stats())
    starts = [len(ids) // 2 + i * (len(ids) // (2 * prompts)) for i in range(prompts)]
    tokens, seconds, steps, totals = [], 0.0, 0, {}
    for st in starts:
        times, out = _generate(torch.tensor([ids[st:st + prompt_len]]), new_tokens, False, 0)
        end = _expert_counters()
        totals = {k: totals.get(k, 0) + v for k, v in _diff(S.first_token_counters, end).items()}
        tokens.append(out[0, prompt_len:].tolist())
        seconds += times[-1] - times[0]
        steps += len(times) - 1
    return {"perplexity": ppl, "perplexity_s": ppl_s, "perplexity_misses": ppl_counters.get("misses"),
            "stepwise_perplexity": step_ppl, "stepwise_s": step_s, "stepwise_tokens": min(stepwise_tokens, len(ids)),
            "stepwise_misses": step_counters.get("misses"), "stepwise_loads": step_counters.get("loads"),
            "stepwise_routing": step_routing,
            "perplexity_loads": ppl_counters.get("loads"), "tokens": tokens, "tok_s": steps / seconds,
            "decode_steps": steps, "experts": totals, "routing": _reroute_stats()}


def _reroute_stats() -> Any:
    """What cache-aware routing did so far (`RerouteStats`, cumulative): the coordinator's own counter,
    without the actor round trips of a full `stats()`."""
    return S.obj.model.rerouting.stats()


def _routing_diff(a: Any, b: Any) -> dict:
    """What cache-aware routing did between two `RerouteStats` (they are cumulative): one pass's figures."""
    n = b.token_layers - a.token_layers
    subs = b.substituted - a.substituted
    rank_sum = (b.mean_substitute_rank or 0) * b.substituted - (a.mean_substitute_rank or 0) * a.substituted
    new = {k: getattr(b, k) * b.token_layers - getattr(a, k) * a.token_layers
           for k in ("new_experts_per_token_exact", "new_experts_per_token_chosen")}
    return {"token_layers": n, "rerouted_fraction": (b.rerouted - a.rerouted) / n if n else 0.0,
            "mean_substitute_rank": rank_sum / subs if subs else None,
            **{k: v / n if n else 0.0 for k, v in new.items()},
            "forced_fraction": (b.forced_tokens - a.forced_tokens) / n if n else 0.0}


def op_prefill(batch: int = 1, length: int = 512, seed: int = 0, **_: Any) -> dict:
    ids = _ids(batch, length, seed)
    c0 = _expert_counters()
    t0 = time.perf_counter()
    _generate(ids, 1, False, seed)
    dt = time.perf_counter() - t0
    res = {"tok_s": batch * length / dt, "seconds": dt, "tokens": batch * length, "threads": torch.get_num_threads()}
    if S.system == "moeshard":
        res["experts"] = _diff(c0, _expert_counters())
    return res


def op_breakdown_decode(batch: int = 1, prompt_len: int = 32, new_tokens: int = 8, seed: int = 0,
                        sample: bool = True, **_: Any) -> dict:
    """Per-layer breakdown of decode steps only: prefill with 1 token, reset, then decode."""
    ids = _ids(batch, prompt_len, seed)
    if S.system != "moeshard" or S.breakdown is None:
        raise RuntimeError("breakdown needs a moeshard system loaded with instrument=True")
    marks: list[float] = []
    snap: dict = {}

    def on_token(_t: torch.Tensor) -> None:
        marks.append(time.perf_counter())
        if len(marks) == 1:
            S.breakdown.reset()   # from here on only decode steps count

    S.obj.generate(ids, max_new_tokens=new_tokens, do_sample=sample, temperature=1.0, seed=seed, on_token=on_token)
    snap = S.breakdown.snapshot()
    steps = len(marks) - 1
    wall = marks[-1] - marks[0]
    # the last on_token fires before the loop ends: the breakdown timed `steps` forwards exactly
    return {"steps": steps, "wall_s": wall, "per_step_s": {k: v / steps for k, v in snap["seconds"].items()},
            "step_s": wall / steps, "moe_layer_calls": snap["moe_layer_calls"],
            "num_layers": S.obj.config.num_layers}


def op_stats(**_: Any) -> dict:
    if S.system != "moeshard":
        return {}
    st = S.obj.stats()
    st["counters"] = _expert_counters()
    return st


def op_memory(**_: Any) -> dict:
    out = {"self": _rss_tree()}
    import psutil

    kids = []
    for c in psutil.Process().children(recursive=True):
        try:
            kids.append({"name": c.name(), **_rss_tree(c.pid)})
        except Exception:
            pass
    out["children"] = kids
    if S.system == "moeshard" and getattr(S.obj.experts, "fleet", None) is not None:
        actors = []
        for n, rep in zip(S.obj.experts.nodes, S.obj.experts.reports()):
            try:
                actors.append({**_rss_tree(n["pid"]), "bytes_resident": rep.get("bytes_resident"),
                               "budget_bytes": rep.get("budget_bytes"), "slots": rep.get("slots"),
                               "slot_bytes": rep.get("slot_bytes"), "slots_allocated": rep.get("slots_allocated")})
            except Exception as e:  # actor on another host/namespace: pid not visible
                actors.append({"pid": n["pid"], "error": str(e), "bytes_resident": rep.get("bytes_resident")})
        out["actors"] = actors
    elif S.system == "moeshard":
        rep = S.obj.experts.shard.report()
        out["local_store"] = {k: rep.get(k) for k in ("bytes_resident", "budget_bytes", "slots", "slot_bytes",
                                                       "slots_allocated")}
    return out


def op_drop_resident(**_: Any) -> dict:
    """moeshard: forget every resident expert (Coordinator.drop_resident); other systems hold no such cache."""
    if S.system != "moeshard":
        return {"experts": 0, "bytes": 0}
    return S.obj.drop_resident()


def op_read_bandwidth(path: str, seconds: float = 1.0, threads: int = 4, probes: int = 3, **_: Any) -> dict:
    """Cold read bandwidth of the checkpoint's expert byte ranges, from this process (and so its cgroup):
    `probes` probes of about `seconds` each, each starting at a different place in a shuffled order."""
    from bench.common import expert_ranges, read_bandwidth

    ranges = expert_ranges(path)
    out = []
    for i in range(probes):
        k = (i * len(ranges)) // max(1, probes)
        out.append(read_bandwidth(ranges[k:] + ranges[:k], seconds=seconds, threads=threads))
    return {"probes": out}


def _cpu_s(pids: dict[str, int]) -> dict[str, float]:
    """user+system CPU seconds of each process so far (whole process, every thread)."""
    import psutil

    out = {}
    for name, pid in pids.items():
        try:
            out[name] = sum(psutil.Process(pid).cpu_times()[:2])
        except Exception:  # gone, or not visible from here
            out[name] = float("nan")
    return out


def op_dispatch_bench(path: str, iters: int = 400, warmup: int = 40, blocks: int = 4,
                      coordinator_threads: list[int] | None = None, idle_s: float = 10.0,
                      resources: list[dict[str, float]] | None = None, only: list[str] | None = None,
                      **_: Any) -> dict:
    """Per-layer round trip with 2 actors and trivial expert work, plus peers (see scenario 4), then
    the idle CPU of the coordinator and of the direct transport's actors over `idle_s` seconds.

    Peers, interleaved in blocks (A B C D A B C D ...): moeshard's RemoteExperts on the direct channel
    (the default) and on plain Ray calls (rows for both actors, and for one); LocalExperts (no
    dispatch); a plain Ray call that echoes the same wire message on two actors; and the same echo as a
    Ray Compiled Graph (Ray's own floor; its actors spin while they wait, so it exists only during its
    own block). moeshard's figures come from its public per-layer trace hook as well (transit per actor).

    `resources[i]` pins actor i of each backend and echo actor i (e.g. to a harness host); `only` keeps
    just the named peers; `idle_s=0` skips the idle measurement.
    """
    import ray

    from cluster.dispatch import RemoteExperts
    from coordinator.checkpoint import Checkpoint
    from coordinator.experts import LocalExperts
    from workers import wire

    specs = Checkpoint.open(path).expert_specs()
    H = specs[0].gate.shape[1]
    layer = specs[0].layer
    if not ray.is_initialized():   # room for both backends' actors (one CPU each, as in the other scenarios)
        ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
    wanted = (lambda name: only is None or name in only)
    pin = {} if resources is None else {"resources": resources}
    direct = RemoteExperts.build(specs, num_workers=2, dtype="float32", transport="direct", **pin)
    calls = (RemoteExperts.build(specs, num_workers=2, dtype="float32", transport="calls", **pin)
             if wanted("moeshard_calls_2actors") or wanted("moeshard_calls_1actor") else None)
    local = LocalExperts(specs, dtype="float32")
    transit: dict[str, list[float]] = {"direct": [], "calls": []}
    for name, be in (("direct", direct), ("calls", calls)):
        if be is not None:
            be.add_trace_hook(lambda t, name=name: transit[name].extend(a.transit_s for a in t.actors))
    owners = direct.plan.owners()
    mine = {a: [e for (l, e), o in sorted(owners.items()) if l == layer and o == a] for a in (0, 1)}
    x = torch.randn(1, H)
    w = torch.tensor([[0.6, 0.4]])
    ids_two = torch.tensor([[mine[0][0], mine[1][0]]])
    ids_one = torch.tensor([[mine[0][0], mine[0][1]]])
    msg = wire.encode({"op": "run_layer", "layer": layer, "experts": [mine[0][0]], "counts": [1]}, {"rows": x})

    @ray.remote(num_cpus=0)
    class Echo:
        def run(self, m: bytes) -> bytes:
            return m

        def pid(self) -> int:
            return os.getpid()

    echoes = [Echo.options(**({} if resources is None else {"resources": resources[i]})).remote() for i in (0, 1)]
    ray.get([e.run.remote(msg) for e in echoes])
    cg: dict[str, Any] = {}

    def echo_graph_up() -> None:
        from ray.dag import InputNode, MultiOutputNode

        with InputNode() as inp:
            dag = MultiOutputNode([echoes[0].run.bind(inp), echoes[1].run.bind(inp)])
        cg["g"] = dag.experimental_compile()

    def echo_graph_down() -> None:
        cg.pop("g").teardown()

    # name: (run once, set up before the block, tear down after it)
    peers: dict[str, tuple[Any, Any, Any]] = {
        "moeshard_direct_2actors": (lambda: direct.wait(direct.submit(layer, x, w, ids_two)), None, None),
        "moeshard_direct_1actor": (lambda: direct.wait(direct.submit(layer, x, w, ids_one)), None, None),
        "moeshard_calls_2actors": (lambda: calls.wait(calls.submit(layer, x, w, ids_two)), None, None),
        "moeshard_calls_1actor": (lambda: calls.wait(calls.submit(layer, x, w, ids_one)), None, None),
        "moeshard_local": (lambda: local.wait(local.submit(layer, x, w, ids_two)), None, None),
        "ray_call_2actors_echo": (lambda: ray.get([echoes[0].run.remote(msg), echoes[1].run.remote(msg)]), None, None),
    }
    peers = {k: v for k, v in peers.items() if wanted(k)}
    cg_error = None if wanted("ray_compiled_graph_2actors_echo") else "not asked for"
    if cg_error is None:
        try:
            echo_graph_up()
            ray.get(cg["g"].execute(msg))
            echo_graph_down()
            peers["ray_compiled_graph_2actors_echo"] = (lambda: ray.get(cg["g"].execute(msg)), echo_graph_up,
                                                         echo_graph_down)
        except Exception as e:  # unsupported here: report why
            cg_error = f"{type(e).__name__}: {e}"[:500]
    res: dict[str, list[float]] = {}
    per_block = max(1, iters // blocks)
    settings = sorted({torch.get_num_threads(), *(coordinator_threads or ())}, reverse=True)
    for _ in range(blocks):
        for th in settings:
            torch.set_num_threads(th)
            for name, (fn, up, down) in peers.items():
                key = name if th == settings[0] else f"{name}@{th}t"
                if up is not None:
                    up()
                for _ in range(max(1, warmup // blocks)):
                    fn()
                for _ in range(per_block):
                    t0 = time.perf_counter()
                    fn()
                    res.setdefault(key, []).append(time.perf_counter() - t0)
                if down is not None:
                    down()
    torch.set_num_threads(settings[0])
    if calls is not None:
        calls.close()
    local.close()
    # idle: the direct backend stays open with nothing to do; a blocked process costs ~0 CPU
    # (a plain Ray actor that does nothing, the echo, is the peer: what any idle Ray actor costs)
    idle, wall = {}, 0.0
    if idle_s > 0:
        pids = {"coordinator": os.getpid(), **{f"actor{i}": n["pid"] for i, n in enumerate(direct.nodes)},
                "ray_echo_actor": ray.get(echoes[0].pid.remote(), timeout=60)}
        c0, t0 = _cpu_s(pids), time.perf_counter()
        time.sleep(idle_s)
        c1, wall = _cpu_s(pids), time.perf_counter() - t0
        idle = {k: (c1[k] - c0[k]) / wall for k in pids}
    for e in echoes:
        ray.kill(e)
    where = [n["ip"] for n in direct.nodes]
    direct.close()
    return {"latencies_s": res, "transit_s": transit, "hidden": H,
            "experts": {"two": ids_two.tolist(), "one": ids_one.tolist()},
            "compiled_graph_error": cg_error, "coordinator_threads": settings,
            "idle_cpu_cores": idle, "idle_s": wall, "actor_ips": where}


OPS = {"load": op_load, "decode": op_decode, "prefill": op_prefill, "stats": op_stats, "memory": op_memory,
       "breakdown_decode": op_breakdown_decode, "dispatch_bench": op_dispatch_bench, "ray_init": op_ray_init,
       "drop_resident": op_drop_resident, "read_bandwidth": op_read_bandwidth, "placement": op_placement,
       "routing_eval": op_routing_eval}


def main() -> int:
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        cmd = json.loads(line)
        op = cmd.pop("op")
        if op == "quit":
            break
        try:
            reply(OPS[op](**cmd))
        except BaseException as e:  # report, keep serving
            reply({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})
    try:
        _close()
    except Exception:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
