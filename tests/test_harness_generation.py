"""Generation on the multi-node harness: expert actors on their own hosts (netns + cgroup), the
driver in the root namespace, results equal to the in-process run, actors within their hosts' memory.

Needs namespace mode (root, iproute2, cgroups: capability ``harness``, see the skip policy in conftest.py). One 3-host cluster (host 0 is
the head) is shared by the module and torn down at its end.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

import checkpoints as ckpts
from cluster.harness import HarnessError, LocalCluster

REPO = Path(__file__).resolve().parents[1]
NEW_TOKENS = 8
WORKER_MEMORY = "20KB"  # qwen3_moe experts are 9.2 KB: 2 of each actor's 6 resident, the rest paged

pytestmark = [pytest.mark.slow, pytest.mark.requires("harness")]


@pytest.fixture(scope="module")
def cl():
    for attempt in (1, 2):  # on 2 loaded cores a host's `ray start` occasionally fails; retry once
        cluster = LocalCluster(hosts=3, host_memory="2GB", host_cpus=1)
        try:
            cluster.up()
            break
        except HarnessError as e:
            if attempt == 2:
                raise
            print(f"\nharness up failed, retrying once: {e}")
    with cluster:
        cluster.connect()
        yield cluster


@pytest.fixture(scope="module")
def model(checkpoint) -> Path:
    return checkpoint("qwen3_moe")


@pytest.fixture(scope="module")
def reference(model):
    """In-process run (experts in this process, same budget): logits and greedy tokens."""
    from coordinator import Coordinator

    ids, mask = ckpts.make_prompts()
    with Coordinator.from_pretrained(model, num_workers=0, worker_memory=WORKER_MEMORY) as c:
        logits = c.forward(ids, attention_mask=mask)
        out = c.generate(ids, max_new_tokens=NEW_TOKENS, attention_mask=mask, pad_token_id=ckpts.PAD_ID)
    return ids, mask, logits, out


def _peak_rss(pid: int) -> int:
    """VmHWM (peak resident set) of `pid`, read from the root namespace's /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


@pytest.mark.timeout(600)
def test_generation_on_hosts_equals_in_process(cl, model, reference):
    """Actors pinned to hosts 1 and 2 by their custom resources give the in-process logits and tokens,
    run in their hosts' cgroups, and their peak RSS (read from the root namespace) stays under the limit."""
    from coordinator import Coordinator

    ids, mask, ref_logits, ref_out = reference
    with Coordinator.from_pretrained(model, num_workers=2, worker_memory=WORKER_MEMORY, call_timeout_s=120,
                                     resources=[{cl.resource(1): 0.01}, {cl.resource(2): 0.01}]) as c:
        logits = c.forward(ids, attention_mask=mask)
        out = c.generate(ids, max_new_tokens=NEW_TOKENS, attention_mask=mask, pad_token_id=ckpts.PAD_ID)
        stats = c.stats()["experts"]
        actors = stats["actors"]
        # the direct channel works across hosts (separate Ray nodes, separate network namespaces)
        assert stats["transport"] == "direct" and all(a["channel"]["served"] > 0 for a in actors)
        peaks = {a["index"]: _peak_rss(a["pid"]) for a in actors}
        rss = {a["index"]: psutil.Process(a["pid"]).memory_info().rss for a in actors}
        host_pids = {i: cl.host_pids(i) for i in (1, 2)}

    assert torch.equal(out, ref_out), (out, ref_out)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    assert len(actors) == 2
    print()
    for i, a in enumerate(actors):
        host = cl.hosts[i + 1]
        print(f"actor {i} on {a['ip']} pid {a['pid']}: rss {rss[i] / 1e6:.0f} MB, peak {peaks[i] / 1e6:.0f} MB, "
              f"host limit {cl.host_memory / 1e6:.0f} MB")
        assert a["ip"] == host.ip, (i, a["ip"], host.ip)
        assert a["pid"] in host_pids[i + 1], f"actor {i} (pid {a['pid']}) is not in host {i + 1}'s cgroup"
        assert a["calls"] > 0 and a["misses"] > 0  # it computed, and paged (2 of its 6 experts resident)
        assert 0 < rss[i] <= peaks[i] < cl.host_memory, (i, rss[i], peaks[i])


@pytest.mark.timeout(600)
def test_job_entry_point_places_one_actor_per_host(cl, model):
    """`python -m cluster.job` run where a Ray job's driver runs (the head host, host 0): it skips the
    0-CPU driver node, keeps its own host last, and so puts one actor on each of hosts 1 and 2."""
    from cluster import job
    from coordinator import Coordinator

    gen = ["--ids", "1,5,9,13", "--ids", "1,7", "--max-new-tokens", "5", "--worker-memory", WORKER_MEMORY]
    args = job.build_parser().parse_args(["--model", str(model), *gen])
    with Coordinator.from_pretrained(model, num_workers=0, worker_memory=WORKER_MEMORY) as c:
        expected = [f"[{i}] {p} -> {r}" for i, (p, r) in enumerate(job._generate(c, "ids", job.read_prompts(args)[1],
                                                                                    args), 1)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(cl.auth_env, RAY_ADDRESS=cl.address, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(["ip", "netns", "exec", cl.hosts[0].ns, sys.executable, "-m", "cluster.job",
                           "--model", str(model), "--workers", "2", "--call-timeout", "120", *gen],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    print("\n" + proc.stdout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"[nodes: 0->{cl.hosts[1].ip}, 1->{cl.hosts[2].ip}]" in proc.stdout
    for line in expected:
        assert line in proc.stdout
    rows = [l.split() for l in proc.stdout.splitlines() if l[:1].isdigit() and len(l.split()) > 10]
    assert [(r[0], r[1]) for r in rows] == [("0", cl.hosts[1].ip), ("1", cl.hosts[2].ip)]


def _moeshard_generate(model: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    gen = ["generate", str(model), "--ids", "1,5,9,13", "--max-new-tokens", "5", "--worker-memory", WORKER_MEMORY]
    return subprocess.run([sys.executable, "-m", "cluster.cli", *gen, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=400)


@pytest.mark.timeout(600)
def test_moeshard_generate_with_ray_address_of_a_harness_cluster(cl, model):
    """What a user does after `harness up`: export the cluster's auth env, run `moeshard generate
    --ray-address <head>` from the root namespace. The actors land on harness hosts and the tokens equal
    those of the in-process run of the same command."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    local = _moeshard_generate(model, env, "--workers", "0", "--no-stats")
    assert local.returncode == 0, local.stdout[-3000:] + local.stderr[-3000:]
    expected = local.stdout.strip().splitlines()[0].split()   # the streamed new tokens
    assert len(expected) == 5, local.stdout
    remote = _moeshard_generate(model, {**env, **cl.auth_env}, "--workers", "2", "--call-timeout", "120",
                                "--ray-address", cl.address)
    print("\n" + remote.stdout)
    assert remote.returncode == 0, remote.stdout[-3000:] + remote.stderr[-3000:]
    assert remote.stdout.strip().splitlines()[0].split() == expected
    assert any(h.ip in remote.stdout for h in cl.hosts), remote.stdout   # the stats table names actor nodes
