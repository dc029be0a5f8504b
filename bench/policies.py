"""Hit rate of each eviction policy, with and without prefetch, on the embedded model's real routing.

    python -m bench.policies [MODEL]

Hits, misses and loads are counts, not timings, so they are stable on a noisy machine (late hits,
claimed ahead but still loading when asked, depend on timing). A hit is an expert resident or
claimed ahead when asked; a miss is a load nobody anticipated.
"""
from __future__ import annotations

import sys

from coordinator import Coordinator

PROMPTS = ["The for statement", "Return a list of", "The while statement is used", "class Foo:",
           "Raise ValueError if"]


def main(model: str = "models/pydoc-moe") -> None:
    print("| budget | policy | prefetch depth | hit rate | misses | late hits | loads |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for budget in ("8MB", "16MB"):
        for policy in ("lru", "lfu", "lfu-decay"):
            for depth in (0, 1):
                with Coordinator.from_pretrained(model, worker_memory=budget, policy=policy,
                                                 prefetch_depth=depth) as c:
                    for p in PROMPTS:
                        c.generate_text(p, max_new_tokens=48)
                    s = c.stats()["experts"]
                print(f"| {budget} | {policy} | {depth} | {s['hits'] / (s['hits'] + s['misses']):.3f} | "
                      f"{s['misses']} | {s['late_hits']} | {s['loads']} |")


if __name__ == "__main__":
    main(*sys.argv[1:])
