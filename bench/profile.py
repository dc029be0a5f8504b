"""Profile a moeshard decode: torch.profiler op table in-process, py-spy on coordinator and actors.

    python -m bench.profile --workers 0             # torch.profiler op table, in-process experts
    python -m bench.profile --workers 2 --seconds 15 # py-spy (root) on the coordinator and both actors
    python -m bench.profile --transformers          # the same op table for transformers' generate

Prints the top operators (torch.profiler) or the top inclusive Python functions per process
(py-spy folded stacks); what we found is in docs/performance.md.
"""
from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import make_checkpoint as mk


def _ids(vocab: int, batch: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


def torch_table(model_fn, tokens: int, top: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    model_fn(2)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        t0 = time.perf_counter()
        model_fn(tokens)
        dt = time.perf_counter() - t0
    return f"{tokens} tokens in {dt:.2f} s\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


def folded_summary(path: Path, top: int, keep: tuple[str, ...] = ()) -> str:
    """Top inclusive functions of a py-spy raw (folded) profile, as % of samples."""
    incl: collections.Counter = collections.Counter()
    leaf: collections.Counter = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        n = int(n)
        total += n
        frames = [f.split(" (")[0] for f in stack.split(";")]
        for f in set(frames):
            incl[f] += n
        leaf[frames[-1]] += n
    if not total:
        return "(no samples)"
    rows = [f"{total} samples; inclusive %:"]
    for f, n in incl.most_common(top * 3):
        if keep and not any(k in f for k in keep):
            continue
        rows.append(f"  {100 * n / total:5.1f}%  {f}")
        if len(rows) > top:
            break
    rows.append("leaf %:")
    rows += [f"  {100 * n / total:5.1f}%  {f}" for f, n in leaf.most_common(top)]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="coordinator torch threads (default: all cores)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=15, help="py-spy sampling time (workers > 0)")
    ap.add_argument("--budget", default=None, help="worker_memory (default: everything resident)")
    ap.add_argument("--transformers", action="store_true", help="profile transformers' generate instead")
    ap.add_argument("--top", type=int, default=18)
    a = ap.parse_args(argv)
    ckpt = a.checkpoint or mk.make_checkpoint(None, "mix8x32", progress=True)
    torch.set_num_threads(a.threads or os.cpu_count() or 1)
    if a.transformers:
        from transformers import AutoModelForCausalLM

        m = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
        ids = _ids(m.config.vocab_size, a.batch, 32)

        def run(n: int) -> None:
            with torch.inference_mode():
                m.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        print(torch_table(run, a.tokens, a.top))
        return 0

    from coordinator import Coordinator

    c = Coordinator.from_pretrained(ckpt, num_workers=a.workers, worker_memory=a.budget, prefetch_depth=1 if a.budget else 0)
    cfg = c.config
    c.generate(_ids(cfg.vocab_size, 1, 8 * cfg.num_experts), max_new_tokens=1)        # warm every expert
    ids = _ids(cfg.vocab_size, a.batch, 32)

    def run(n: int) -> None:
        c.generate(ids, max_new_tokens=n)

    try:
        if a.workers == 0:
            print(torch_table(run, a.tokens, a.top))
            return 0
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        pids = {"coordinator": os.getpid(), **{f"actor{i}": n["pid"] for i, n in enumerate(c.experts.nodes)}}
        tmp = Path(tempfile.mkdtemp(prefix="msprof-"))
        procs = {name: subprocess.Popen([spy, "record", "-p", str(pid), "-d", str(int(a.seconds)), "-r", "200",
                                         "-f", "raw", "-o", str(tmp / f"{name}.txt"), "--nonblocking"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for name, pid in pids.items()}
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < a.seconds:
            run(4)
            n += 4 * a.batch
        print(f"{n} tokens in {time.perf_counter() - t0:.1f} s with py-spy attached")
        for name, p in procs.items():
            p.wait(timeout=a.seconds + 60)
            print(f"\n== {name} ==")
            print(folded_summary(tmp / f"{name}.txt", a.top))
    finally:
        c.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
