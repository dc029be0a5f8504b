"""`moeshard serve` for real: a subprocess running Ray Serve with 2 expert actors on the embedded
model, on 127.0.0.1, driven by the official `openai` client. An expert actor is SIGKILLed while 8
streams are open: every stream completes, with the greedy text of a clean run. Also: the Serve
config file (serve_config.yaml) is valid for Ray Serve and builds the application.
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

import httpx
import openai
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MODEL = "models/pydoc-moe"
NAME = "pydoc-moe"
PROMPTS = ["The for statement", "def foo(x):", "A list comprehension is", "import os\nimport sys\n",
           "The while loop", "Exceptions are raised", "Tuples and sequences", "Classes provide a means"]
TOKENS = 64


def test_serve_config_file_is_valid_and_builds_the_application():
    from ray.serve.schema import ServeDeploySchema

    from cluster.serve import ServeConfig, app_builder
    from coordinator.options import UnknownOption

    raw = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    ServeDeploySchema.model_validate(raw)
    (app,) = raw["applications"]
    assert app["import_path"] == "cluster.serve:app_builder"
    args = {**app["args"], "model": str(ROOT / MODEL)}
    cfg = ServeConfig.from_args(args)
    assert cfg.options.placement.num_workers == 2 and cfg.options.store.budget_bytes == 2 * 10 ** 9
    assert cfg.engine.max_batch == 16 and cfg.name == "pydoc-moe"
    assert app_builder(args) is not None
    with pytest.raises(UnknownOption, match="polcy"):
        ServeConfig.from_args({**args, "polcy": "lru"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=60).text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def actor_pids(url: str) -> list[int]:
    return [int(k.split('pid="')[1].split('"')[0]) for k in metrics(url) if k.startswith("moeshard_actor_info")]


def poll(cond, within_s: float, what: str):
    deadline = time.monotonic() + within_s
    while True:
        v = cond()
        if v:
            return v
        assert time.monotonic() < deadline, f"{what}: not within {within_s}s"
        threading.Event().wait(0.1)


@pytest.fixture(scope="module")
def server():
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "serve", MODEL, "--workers", "2",
                             "--worker-memory", "8MB", "--port", str(port), "--max-batch", "8", "--max-queue", "8",
                             "--call-timeout", "30"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    url = f"http://127.0.0.1:{port}"

    def healthy():
        assert proc.poll() is None, "moeshard serve exited:\n" + "".join(lines[-30:])
        try:
            return httpx.get(url + "/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False
    poll(healthy, 300, "moeshard serve answering /health")
    yield url
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)      # its own session: only what this test started
        proc.wait(30)
    assert any("stopping" in line for line in lines), "".join(lines[-30:])


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=300)


def stream_all(client, prompts, started: threading.Semaphore | None = None) -> list[str]:
    """One streaming greedy request per prompt, all at once; the texts, in prompt order."""
    texts: list[str | BaseException] = [""] * len(prompts)

    def one(i: int) -> None:
        try:
            parts = []
            for n, chunk in enumerate(client.completions.create(model=NAME, prompt=prompts[i], max_tokens=TOKENS,
                                                                temperature=0, stream=True)):
                if n == 0 and started is not None:
                    started.release()
                if chunk.choices:
                    parts.append(chunk.choices[0].text)
            texts[i] = "".join(parts)
        except BaseException as e:  # reported by the test thread
            texts[i] = e
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not any(t.is_alive() for t in threads), "a stream did not finish within 600s"
    errors = [t for t in texts if isinstance(t, BaseException)]
    assert not errors, errors
    return texts  # type: ignore[return-value]


def test_the_openai_client_through_ray_serve(server, client):
    r = client.completions.create(model=NAME, prompt="The for statement", max_tokens=12, temperature=0)
    assert r.choices[0].text and r.usage.completion_tokens == 12
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=NAME, prompt="The for statement", max_tokens=12, temperature=0, stream=True) if c.choices)
    assert streamed == r.choices[0].text
    assert [m.id for m in client.models.list()] == [NAME]
    with pytest.raises(openai.BadRequestError, match="chat template"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="unknown model"):
        client.completions.create(model="gpt-4", prompt="x")
    assert len(actor_pids(server)) == 2


def test_a_disconnect_through_ray_serve_cancels_the_request(server):
    before = metrics(server)['moeshard_requests_finished_total{reason="cancelled"}']
    with httpx.Client(base_url=server, timeout=120) as c:
        with c.stream("POST", "/v1/completions", json={"model": NAME, "prompt": "The for statement",
                                                       "max_tokens": 900, "temperature": 0, "stream": True}) as r:
            next(line for line in r.iter_lines() if line.startswith("data: "))
    poll(lambda: metrics(server)['moeshard_requests_finished_total{reason="cancelled"}'] == before + 1, 120,
         "the disconnected request cancelled")
    assert metrics(server)["moeshard_requests_running"] == 0


def test_sigkill_of_an_expert_actor_under_8_open_streams(server, client):
    clean = stream_all(client, PROMPTS)
    finished = metrics(server)
    assert all(clean)
    started = threading.Semaphore(0)
    result: dict = {}
    def run() -> None:
        try:
            result["texts"] = stream_all(client, PROMPTS, started)
        except BaseException as e:  # re-raised below, in the test's thread
            result["error"] = e
    runner = threading.Thread(target=run)
    runner.start()
    for _ in PROMPTS:                                # every stream has its first token: all 8 are open
        assert started.acquire(timeout=300), "the 8 streams did not all start"
    m = metrics(server)
    assert m["moeshard_requests_running"] == len(PROMPTS), m["moeshard_requests_running"]
    victim = actor_pids(server)[0]
    os.kill(victim, signal.SIGKILL)
    runner.join(600)
    assert not runner.is_alive()
    assert "error" not in result, f"a stream failed after the kill: {result.get('error')!r}"
    assert result["texts"] == clean
    after = metrics(server)
    assert sum(v for k, v in after.items() if k.startswith("moeshard_actor_restarts_total")) >= 1
    assert victim not in actor_pids(server)
    assert after['moeshard_requests_finished_total{reason="error"}'] == \
        finished['moeshard_requests_finished_total{reason="error"}']
