"""Scenario 8, serving: `moeshard serve` (Ray Serve, continuous batching) under concurrent clients.

Every figure is a same-run ratio (rounds interleaved A B A B) or a percentile; nothing here is a
timed test. The server is a real `moeshard serve` subprocess on 127.0.0.1; clients stream over
HTTP from threads of this process.

- the embedded model, 2 expert actors: aggregate decode tok/s of 16 concurrent streaming clients
  (64 tokens each) over one client alone (target >= 4x); p50/p99 time to first token and
  inter-token latency;
- a load test: 200 requests from 16 clients, bounded in count and time; zero errors, and the
  server's memory (replica + actors) flat after warm-up: RSS growth < 5% between the end of the
  second quarter of requests and the end of the last;
- out of core (root only): the bench checkpoint (mix8x32) in a 3 GB memory cgroup with 2 actors,
  8 concurrent clients over one (target >= 3x): one expert read serves every sequence routed to it.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .common import ROOT, cgroups_usable, median, memory_cgroup, paired_ratio, percentile
from .results import figure

STARTUP_S = 600          # a server that does not answer /health by then is an error
REQUEST_S = 300          # per request
LOAD_S = 1800            # the whole load test
SERVE_OVERHEAD_BYTES = 300 * 10**6   # Serve controller + proxy + the `moeshard serve` driver, beyond scenario 2's Ray


class Server:
    """A `moeshard serve` subprocess (its own session, so only what it started is stopped)."""

    def __init__(self, model: Path, workers: int, worker_memory: str | None, cgroup: Any | None,
                 log_path: Path, max_batch: int = 16, max_queue: int = 256):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        argv = [sys.executable, "-m", "cluster.cli", "serve", str(model), "--workers", str(workers), "--port",
                str(self.port), "--max-batch", str(max_batch), "--max-queue", str(max_queue), "--model-name", "m"]
        if worker_memory:
            argv += ["--worker-memory", worker_memory]
        if cgroup is not None:          # it joins before it starts Ray: raylet and the actors inherit the cgroup
            argv = cgroup.wrap(argv)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        import httpx
        deadline = time.monotonic() + STARTUP_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moeshard serve exited with {self.proc.returncode}; see {log_path}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"moeshard serve did not answer /health within {STARTUP_S}s; see {log_path}")
            threading.Event().wait(0.5)

    def metrics(self) -> dict[str, float]:
        import httpx
        text = httpx.get(self.url + "/metrics", timeout=60).text
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line and not line.startswith("#")}

    def rss(self) -> int:
        """RSS of the serving processes: the replica and the expert actors."""
        import psutil
        pids = {int(k.split('pid="')[1].split('"')[0]) for k in self.metrics() if k.startswith("moeshard_actor_info")}
        total = 0
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                cmd = " ".join(p.info["cmdline"] or [])
                if p.info["pid"] in pids or "ServeReplica:moeshard" in cmd:
                    total += p.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return total

    def close(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        self._log.close()


def stream_one(url: str, prompt: str | list[int], max_tokens: int) -> dict:
    """One streaming greedy completion: tokens, time to first token, gaps between tokens, wall time."""
    import httpx
    import json

    t0 = time.perf_counter()
    stamps: list[float] = []
    usage = None
    with httpx.stream("POST", url + "/v1/completions", timeout=REQUEST_S,
                      json={"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                            "stream": True}) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:200]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk["choices"] and chunk["choices"][0]["finish_reason"] is None:
                stamps.append(time.perf_counter())
            usage = chunk.get("usage") or usage
    end = time.perf_counter()
    return {"tokens": (usage or {}).get("completion_tokens", len(stamps)), "ttft_s": stamps[0] - t0 if stamps else None,
            "itl_s": [b - a for a, b in zip(stamps, stamps[1:])], "wall_s": end - t0, "start": t0, "end": end}


def clients(url: str, prompts: list, max_tokens: int) -> dict:
    """All prompts at once, one thread each: aggregate tok/s over the wall time of the whole batch."""
    out: list[Any] = [None] * len(prompts)

    def run(i: int) -> None:
        try:
            out[i] = stream_one(url, prompts[i], max_tokens)
        except Exception as e:  # counted as an error
            out[i] = e
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(REQUEST_S)
    errors = [o for o in out if not isinstance(o, dict)]
    ok = [o for o in out if isinstance(o, dict)]
    wall = (max(o["end"] for o in ok) - t0) if ok else None
    toks = sum(o["tokens"] for o in ok)
    return {"tok_s": toks / wall if wall else None, "tokens": toks, "errors": len(errors),
            "error_sample": str(errors[0])[:300] if errors else None,
            "ttft_s": [o["ttft_s"] for o in ok if o["ttft_s"] is not None],
            "itl_s": [x for o in ok for x in o["itl_s"]]}


PROMPTS = ["The for statement", "def foo(x):", "A list comprehension is", "import os\nimport sys\n", "class",
           "The while loop", "Exceptions are raised", "Tuples and sequences", "Classes provide a means",
           "Modules are files", "The with statement", "Generators are", "Dictionaries map", "Strings can be",
           "Lambda expressions", "The try statement"]


#: token-id prompts for checkpoints without a tokenizer (the synthetic bench checkpoint)
ID_PROMPTS = [[1 + (37 * i + 11 * j) % 1000 for j in range(8)] for i in range(16)]


def _concurrency(server: Server, n: int, tokens: int, rounds: int, tag: str, progress,
                 prompts: list = PROMPTS) -> dict:
    one, many = [], []
    for r in range(rounds):
        progress(f"s8 {tag}: round {r + 1}/{rounds}: 1 client")
        one.append(clients(server.url, prompts[:1], tokens))
        progress(f"s8 {tag}: round {r + 1}/{rounds}: {n} clients")
        many.append(clients(server.url, [prompts[i % len(prompts)] for i in range(n)], tokens))
    return {"one": one, "many": many}


def _load_test(server: Server, total: int, n_clients: int, tokens: int, progress) -> dict:
    """`total` requests from `n_clients` threads; RSS sampled after each quarter of the requests."""
    lock = threading.Lock()
    done = {"n": 0, "errors": 0, "claimed": 0}
    marks = {max(1, total * q // 4): q for q in (1, 2, 3, 4)}     # requests finished -> quarter
    quarter_rss: dict[int, int] = {}
    deadline = time.monotonic() + LOAD_S

    def worker(k: int) -> None:
        while time.monotonic() < deadline:
            with lock:
                if done["claimed"] >= total:
                    return
                i = done["claimed"]
                done["claimed"] += 1
            try:
                stream_one(server.url, PROMPTS[i % len(PROMPTS)], tokens)
                ok = True
            except Exception:
                ok = False
            with lock:
                done["n" if ok else "errors"] += 1
                q = marks.get(done["n"] + done["errors"])
            if q is not None:
                quarter_rss[q] = server.rss()
                progress(f"s8 load: quarter {q}/4 of {total} requests done")
    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(LOAD_S)
    wall = time.perf_counter() - t0
    rss2, rss4 = quarter_rss.get(2), quarter_rss.get(4)
    growth = (rss4 - rss2) / rss2 if rss2 and rss4 and rss2 > 0 else None
    return {"requests": done["n"], "errors": done["errors"], "wall_s": wall, "clients": n_clients, "rss_by_quarter": quarter_rss,
            "rss_growth_q2_q4": growth, "timed_out": any(t.is_alive() for t in threads)}


def scenario_8(ctx) -> dict:
    """Serving: concurrent streaming clients against one client, latency percentiles, a load test, OOC."""
    figures, details, notes = [], {}, ["the bench machine is shared: figures are noisy; ratios are same-run"]
    tiny = ctx.tiny or ctx.quick
    tokens = 8 if ctx.tiny else 64
    rounds = 1 if ctx.tiny else (2 if ctx.quick else 3)
    n16 = 4 if ctx.tiny else 16
    server = Server(ctx.real_model, 2, None, None, ctx.log_dir / "s8-serve.log", max_batch=16)
    try:
        clients(server.url, PROMPTS[:2], 4)                                     # warm-up
        runs = _concurrency(server, n16, tokens, rounds, "embedded", ctx.progress)
        one, many = runs["one"], runs["many"]
        details["embedded"] = {"one": [{k: v for k, v in r.items() if k not in ("ttft_s", "itl_s")} for r in one],
                               "many": [{k: v for k, v in r.items() if k not in ("ttft_s", "itl_s")} for r in many]}
        figures.append(figure("s8.concurrency.embedded", f"embedded model, 2 actors: aggregate decode tok/s, "
                                                         f"{n16} streaming clients x {tokens} tokens",
                              median(r["tok_s"] for r in many), "tok/s", peer="one client alone",
                              peer_value=median(r["tok_s"] for r in one),
                              ratio=paired_ratio([r["tok_s"] for r in many], [r["tok_s"] for r in one]),
                              target=None if tiny else 4.0))
        ttft = [x for r in many for x in r["ttft_s"]]
        itl = [x for r in many for x in r["itl_s"]]
        for q in (50, 99):
            figures.append(figure(f"s8.ttft.p{q}", f"time to first token p{q}, {n16} clients", percentile(ttft, q),
                                  "s", on="value"))
            figures.append(figure(f"s8.itl.p{q}", f"inter-token latency p{q}, {n16} clients", percentile(itl, q),
                                  "s", on="value"))
        details["errors"] = sum(r["errors"] for r in one + many)
        total = 24 if ctx.tiny else (80 if ctx.quick else 200)
        ctx.progress(f"s8: load test, {total} requests from {n16} clients")
        load = _load_test(server, total, n16, 16 if ctx.tiny else 32, ctx.progress)
        details["load"] = load
        figures.append(figure("s8.load.errors", f"load test: errors in {total} requests from {n16} clients",
                              float(load["errors"] + (total - load["requests"] - load["errors"])), "requests",
                              target=0, op="<=", on="value"))
        figures.append(figure("s8.load.rss_growth", "load test: server RSS growth, end of 2nd quarter to the end",
                              load["rss_growth_q2_q4"], "fraction", target=0.05, op="<=", on="value"))
        details["server_metrics"] = {k: v for k, v in server.metrics().items() if not k.startswith("moeshard_actor")}
    finally:
        server.close()
    why = cgroups_usable()
    if why or ctx.tiny:
        notes.append(f"out of core with 8 clients not run: {why or 'tiny mode'}")
        return {"figures": figures, "details": details, "notes": notes}
    figures += out_of_core(ctx, details, rounds)
    return {"figures": figures, "details": details, "notes": notes}


def out_of_core(ctx, details: dict, rounds: int) -> list[dict]:
    """The bench checkpoint in a memory cgroup, 2 actors paging: 8 concurrent clients over one."""
    from .scenarios import _min_budget, _ooc_budget
    figures = []
    cg = memory_cgroup("s8-ooc", ctx.ooc_memory)
    try:
        # scenario 2's budget, less what Serve adds in the cgroup: its controller, its proxy and the CLI driver
        budget = max(_min_budget(ctx, 0, 2), _ooc_budget(ctx, 2) - SERVE_OVERHEAD_BYTES // 2)
        server = Server(ctx.ckpt, 2, str(budget), cg, ctx.log_dir / "s8-serve-ooc.log", max_batch=8)
        try:
            prompts = PROMPTS if (ctx.ckpt / "tokenizer.json").is_file() else ID_PROMPTS
            clients(server.url, prompts[:1], 2)
            runs = _concurrency(server, 8, 16 if ctx.quick else 32, rounds, "ooc", ctx.progress, prompts)
            details["ooc"] = {"budget_per_actor": budget, "cgroup_peak": cg.peak(), "oom_kills": cg.oom_kills(),
                              "one": [r["tok_s"] for r in runs["one"]], "many": [r["tok_s"] for r in runs["many"]],
                              "errors": sum(r["errors"] for r in runs["one"] + runs["many"]),
                              "error_sample": next((r["error_sample"] for r in runs["one"] + runs["many"]
                                                    if r["error_sample"]), None)}
            figures.append(figure("s8.concurrency.ooc", f"{ctx.ckpt.name} out of core (cgroup), 2 actors: "
                                                        "aggregate tok/s, 8 streaming clients",
                                  median(r["tok_s"] for r in runs["many"]), "tok/s", peer="one client alone",
                                  peer_value=median(r["tok_s"] for r in runs["one"]),
                                  ratio=paired_ratio([r["tok_s"] for r in runs["many"]],
                                                     [r["tok_s"] for r in runs["one"]]),
                                  target=None if ctx.quick else 3.0))
        finally:
            server.close()
    finally:
        cg.remove()
    return figures
