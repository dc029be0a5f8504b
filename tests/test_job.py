"""`python -m cluster.job` as a real Ray job: a private head (`ray start`, token auth, jobs server),
submitted through the Jobs API with the repo as working dir, plus the exit statuses.

The head (tests/rayhead.py) is started once for the module with its own temp dir, ports and auth
token, and stopped by killing exactly its processes: `ray stop` would kill every Ray cluster on the machine.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import checkpoints as ckpts
from cluster import job, nodes
from rayhead import REPO, Head, free_port, private_head

pytestmark = pytest.mark.slow

# The upload is the repo minus these (and what .gitignore lists: .venv, bench/cache): ~1 MB.
EXCLUDES = [".git", "bench/cache", "models", "docs"]
PROMPTS = ["Hello", "The for statement"]


# ---- a private Ray head (tests/rayhead.py) -----------------------------------------------------------

@pytest.fixture(scope="module")
def head():
    with private_head() as h:
        yield h


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A tiny Mixtral (2 MoE layers x 4 experts, top-2) with a character-level tokenizer.json."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    path = ckpts.make_checkpoint(tmp_path_factory.mktemp("job") / "mixtral", "mixtral")
    vocab = {"<pad>": ckpts.PAD_ID, "<s>": ckpts.BOS_ID, "</s>": ckpts.EOS_ID, "<unk>": 3}
    for c in [chr(c) for c in range(32, 127)] + [chr(0xC0 + i) for i in range(ckpts.VOCAB)]:
        if len(vocab) < ckpts.VOCAB:
            vocab[c] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(["<pad>", "<s>", "</s>"])
    tok.save(str(path / "tokenizer.json"))
    return path


def _args(argv: list[str]) -> argparse.Namespace:
    return job.build_parser().parse_args(argv)


def _expected_lines(model: Path, argv: list[str]) -> list[str]:
    """The result lines the job must print: the same generation in this process, experts in-process."""
    from coordinator import Coordinator

    args = _args(["--model", str(model), *argv])
    kind, prompts = job.read_prompts(args)
    with Coordinator.from_pretrained(model, num_workers=0, worker_memory=args.worker_memory) as c:
        results = job._generate(c, kind, prompts, args)
    return [f"[{i}] {p} -> {r}" for i, (p, r) in enumerate(results, 1)]


def _wait(client, job_id: str, timeout: float) -> str:
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout
    while (status := client.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                              JobStatus.STOPPED}:
        if time.monotonic() > deadline:
            client.stop_job(job_id)
            pytest.fail(f"job {job_id} still {status} after {timeout:.0f}s; logs:\n{client.get_job_logs(job_id)}")
        time.sleep(1)
    return status


def _submit(head: Head, argv: list[str]) -> str:
    entry = " ".join([sys.executable, "-m", "cluster.job", *map(_quote, argv)])
    return head.client().submit_job(
        entrypoint=entry,
        runtime_env={"working_dir": str(REPO), "excludes": EXCLUDES, "env_vars": {"OMP_NUM_THREADS": "1"}})


def _quote(s: str) -> str:
    import shlex

    return shlex.quote(s)


# ---- through the Jobs API --------------------------------------------------------------------------

@pytest.mark.timeout(600)
def test_job_generates_and_prints_stats(head, model):
    from ray.job_submission import JobStatus

    gen = ["--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--max-new-tokens", "6", "--worker-memory", "40KB"]
    expected = _expected_lines(model, gen)  # 40KB: 2 of each actor's 4 experts resident, the rest paged
    t0 = time.monotonic()
    job_id = _submit(head, ["--model", str(model), "--workers", "2", *gen])
    status = _wait(head.client(), job_id, timeout=420)
    logs = head.client().get_job_logs(job_id)
    print(f"\njob took {time.monotonic() - t0:.1f}s\n{logs}")
    assert status == JobStatus.SUCCEEDED, logs
    for line in expected:
        assert line in logs
    assert "routed experts over 2 actor(s)" in logs
    # The stats table: one row per actor, with its node and the paging counters.
    header = next(l for l in logs.splitlines() if l.startswith("actor"))
    assert header.split()[:4] == ["actor", "node", "experts", "resident"]
    rows = [l.split() for l in logs.splitlines() if l[:1].isdigit() and len(l.split()) > 10]
    assert [r[0] for r in rows[:2]] == ["0", "1"] and all(r[2] == "4" for r in rows[:2])
    assert "prefetch precision" in logs and "tok/s" in logs


@pytest.mark.timeout(300)
def test_job_with_a_bad_model_fails_with_one_clear_line(head, tmp_path):
    from ray.job_submission import JobStatus

    missing = tmp_path / "no-such-model"
    job_id = _submit(head, ["--model", str(missing), "--ids", "1,2,3"])
    status = _wait(head.client(), job_id, timeout=240)
    logs = head.client().get_job_logs(job_id)
    assert status == JobStatus.FAILED, logs
    assert f"moeshard job: error: --model: no usable model at {missing}: checkpoint directory {missing} does not exist" in logs
    assert "Traceback" not in logs
    info = head.client().get_job_info(job_id)
    assert "exit code 2" in (info.message or ""), info.message


@pytest.mark.timeout(120)
def test_jobs_server_requires_the_token(head):
    with pytest.raises(Exception, match="(?i)auth|401|unauthori"):
        head.client(authenticated=False).list_jobs()


# ---- the driver run directly against the head (exit statuses) ---------------------------------------

def _run_driver(env: dict, argv: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.job", *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.timeout(300)
def test_ids_batch_with_spread_placement(head, model):
    gen = ["--ids", "1,5,9,13", "--ids", "1,7", "--max-new-tokens", "5"]
    expected = _expected_lines(model, gen)
    proc = _run_driver(head.driver_env(), ["--model", str(model), "--workers", "2", "--placement", "spread",
                                           "--no-stats", *gen])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for line in expected:
        assert line in proc.stdout
    assert expected[0].startswith("[1] 1,5,9,13 -> ") and len(expected[0].split(" -> ")[1].split(",")) == 5


@pytest.mark.timeout(300)
def test_cluster_too_small_exits_3(head, model):
    proc = _run_driver(head.driver_env(), ["--model", str(model), "--workers", "4", "--ids", "1,2"])
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "too small for 4 expert actors" in err[0] and "it holds only 3" in err[0], proc.stderr


@pytest.mark.timeout(120)
def test_no_cluster_exits_1_fast(model):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_ADDRESS=f"127.0.0.1:{free_port()}", PYTHONPATH=str(REPO))
    t0 = time.monotonic()
    proc = _run_driver(env, ["--model", str(model), "--ids", "1,2"], timeout=100)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stderr.count("\n") == 1 and "cannot reach the Ray cluster" in proc.stderr, proc.stderr
    print(f"\nfailed in {time.monotonic() - t0:.1f}s")


# ---- exit statuses without a cluster ------------------------------------------------------------------

def test_actor_lost_beyond_retry_exits_4(model, monkeypatch, capsys):
    """A lost actor is retried with fresh actors once (--retries 1), then reported with exit 4."""
    from cluster.errors import ShardUnavailable
    from coordinator import Coordinator

    calls = []

    def lost(path, options):
        calls.append(list(options.placement.resources))
        raise ShardUnavailable("actor 1 (node abc at 10.0.0.7), layer 0: the actor is gone (killed)")

    monkeypatch.setattr(job, "connect", lambda address, debug=False: False)
    monkeypatch.setattr(nodes, "host_slots", lambda cpus, gpus, suspects=(): (
        [nodes.NodeSlot("10.0.0.6", 2, 0, 0), nodes.NodeSlot("10.0.0.7", 2, 0, 0)], []))
    monkeypatch.setattr(Coordinator, "open", lost)     # the job opens its Coordinator with typed options
    code = job.run_job(_args(["--model", str(model), "--ids", "1,2", "--retries", "1"]))
    out, err = capsys.readouterr()
    assert code == 4 and len(calls) == 2
    assert calls[0] == [{"node:10.0.0.6": 0.001}, {"node:10.0.0.7": 0.001}]
    assert "retry 1 of 1" in out
    assert err.count("\n") == 1 and "expert actor lost" in err and "after 1 retries" in err, err


def test_assign_slots_one_per_node_then_fill_and_refuse():
    a = nodes.NodeSlot("10.0.0.2", 4, 0, 0)
    b = nodes.NodeSlot("10.0.0.3", 1, 0, 0)
    drv = nodes.NodeSlot("10.0.0.1", 8, 0, 0, driver=True)
    slots = sorted([drv, b, a], key=lambda s: (s.suspect, s.driver, s.ip))
    assert nodes.assign_slots(slots, [0, 0, 0], 1, 0) == ["10.0.0.2", "10.0.0.3", "10.0.0.1"]
    assert nodes.assign_slots(slots, [0] * 5, 1, 0) == ["10.0.0.2", "10.0.0.3", "10.0.0.1", "10.0.0.2", "10.0.0.1"]
    small = [nodes.NodeSlot("10.0.0.2", 2, 0, 1e9)]
    with pytest.raises(nodes.ClusterTooSmall, match="it holds only 1"):  # memory: two actors of 0.6 GB on a 1 GB node
        nodes.assign_slots(small, [6 * 10**8, 6 * 10**8], 1, 0)


def test_group_slots_by_ip_role_driver_and_suspects():
    def n(i, ip, cpu, **res):
        return nodes.RayNode(f"n{i}", ip, 1, True, {"CPU": cpu, "memory": 1e9, **res})

    raw = [n(0, "10.0.0.1", 2), n(1, "10.0.0.2", 1), n(2, "10.0.0.2", 1), n(3, "10.0.0.3", 0.5), n(4, "10.0.0.4", 1)]
    usable, others = nodes.group_slots(raw, 1, 0, suspects={"10.0.0.4"}, driver_node="n0")
    # two raylets on one IP are one machine; the driver's machine and suspects come last
    assert [(s.ip, s.cpus, s.memory, s.node_ids) for s in usable] == [
        ("10.0.0.2", 2, 2e9, ["n1", "n2"]), ("10.0.0.1", 2, 1e9, ["n0"]), ("10.0.0.4", 1, 1e9, ["n4"])]
    assert usable[1].driver and usable[2].suspect and others == ["10.0.0.3 (0.5 CPUs, 0 GPUs, 1 GB memory)"]
    # once a node advertises expert_shard, only such nodes are candidates
    usable, others = nodes.group_slots(raw + [n(5, "10.0.0.5", 1, expert_shard=1)], 1, 0)
    assert [s.ip for s in usable] == ["10.0.0.5"] and others == []
