"""The OpenAI-compatible HTTP surface (cluster/openai_api.py), served by a real uvicorn on 127.0.0.1
over the embedded model, driven by the official `openai` client and by raw HTTP (httpx).

The Ray Serve deployment of the same handlers, `moeshard serve`, is tested in test_serve_ray.py.
"""
from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from cluster.openai_api import OpenAIServer, build_app
from coordinator import Coordinator
from coordinator.chat import ChatTemplate
from coordinator.engine import Engine, EngineOptions

MODEL = Path("models/pydoc-moe")
NAME = "pydoc-moe"
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


def chat_checkpoint(root: Path) -> Path:
    """The embedded model with a chat template added (the files linked, tokenizer_config.json edited)."""
    d = root / "pydoc-chat"
    d.mkdir()
    for f in MODEL.iterdir():
        if f.name != "tokenizer_config.json":
            (d / f.name).symlink_to(f.resolve())
    cfg = json.loads((MODEL / "tokenizer_config.json").read_text())
    cfg["chat_template"] = TEMPLATE
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


class Uvicorn:
    """A real HTTP server in a thread, on a free loopback port."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start within 30s"
            self.thread.join(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    path = chat_checkpoint(tmp_path_factory.mktemp("chat"))
    with Coordinator.from_pretrained(path) as coord:
        engine = Engine(coord, EngineOptions(max_batch=4, max_queue=2))
        with_chat = Uvicorn(build_app(OpenAIServer(engine, NAME, ChatTemplate.load(path), disconnect_poll_s=0.05)))
        without = Uvicorn(build_app(OpenAIServer(engine, NAME, ChatTemplate.load(MODEL))))
        yield {"coord": coord, "engine": engine, "url": with_chat.url, "plain_url": without.url}
        with_chat.close()
        without.close()
        engine.close()


@pytest.fixture
def client(stack):
    return openai.OpenAI(base_url=stack["url"] + "/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture
def http(stack):
    with httpx.Client(base_url=stack["url"], timeout=120) as c:
        yield c


def wait_idle(engine, within_s: float = 60) -> dict:
    deadline = time.monotonic() + within_s
    while True:
        s = engine.stats()
        if s["running"] == 0 and s["queued"] == 0:
            return s
        assert time.monotonic() < deadline, f"engine still busy after {within_s}s: {s}"
        threading.Event().wait(0.05)


def alone(coord, text: str, n: int) -> list[int]:
    ids = coord.tokenizer.encode(text).ids
    return coord.generate(torch.tensor([ids]), max_new_tokens=n)[0, len(ids):].tolist()


def test_the_embedded_model_has_no_chat_template():
    assert ChatTemplate.load(MODEL) is None


def test_completion_with_the_openai_client_equals_generate(stack, client):
    coord = stack["coord"]
    r = client.completions.create(model=NAME, prompt="The for statement", max_tokens=20, temperature=0)
    want = alone(coord, "The for statement", 20)
    eos = coord.config.eos_token_id
    cut = want.index(eos) if eos in want else len(want)
    assert r.choices[0].text == coord.tokenizer.decode(want[:cut])
    assert r.choices[0].finish_reason == ("stop" if cut < 20 else "length")
    assert r.usage.prompt_tokens == len(coord.tokenizer.encode("The for statement").ids)
    assert r.usage.completion_tokens == min(cut + 1, 20) and r.model == NAME and r.object == "text_completion"


def test_streamed_completion_gives_the_same_text_and_usage(client):
    full = client.completions.create(model=NAME, prompt="def foo(x):", max_tokens=24, temperature=0)
    chunks = list(client.completions.create(model=NAME, prompt="def foo(x):", max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens and not chunks[-1].choices


def test_chat_uses_the_template_streaming_and_not(stack, client):
    coord = stack["coord"]
    msgs = [{"role": "system", "content": "You explain Python."}, {"role": "user", "content": "What is a for loop?"}]
    r = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=16, temperature=0)
    prompt = ChatTemplate(TEMPLATE, "<s>", "</s>").render(msgs)
    assert prompt.startswith("<s>system: You explain Python.\nuser: What is a for loop?\nassistant:")
    want = alone(coord, prompt, 16)
    eos = coord.config.eos_token_id
    cut = want.index(eos) if eos in want else len(want)
    assert r.choices[0].message.content == coord.tokenizer.decode(want[:cut])
    assert r.choices[0].message.role == "assistant" and r.object == "chat.completion"
    assert r.usage.prompt_tokens == len(coord.tokenizer.encode(prompt).ids)
    chunks = list(client.chat.completions.create(model=NAME, messages=msgs, max_tokens=16, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content
    assert chunks[-1].usage.total_tokens == r.usage.total_tokens


def test_raw_sse_ends_with_done(http):
    with http.stream("POST", "/v1/completions", json={"model": NAME, "prompt": "class", "max_tokens": 5,
                                                      "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    body = [json.loads(line[6:]) for line in lines[:-1]]
    assert body[-1]["choices"][0]["finish_reason"] in ("stop", "length") and body[-1]["usage"]["prompt_tokens"] > 0


def test_models_health_and_metrics(stack, http, client):
    assert [m.id for m in client.models.list()] == [NAME]
    assert http.get("/health").json() == {"status": "ok"}
    client.completions.create(model=NAME, prompt="class", max_tokens=3, temperature=0)
    text = http.get("/metrics").text
    for name in ("requests_running", "requests_queued", "tokens_per_second", "time_to_first_token_seconds",
                 "inter_token_latency_seconds", "expert_cache_hit_rate", "actor_hits_total"):
        assert f"# TYPE moeshard_{name}" in text, name
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values["moeshard_generation_tokens_total"] >= 3
    assert values['moeshard_time_to_first_token_seconds{quantile="0.5"}'] > 0


BAD = [
    ("malformed JSON", b'{"model": "pydoc-moe", "prompt": ', None, "invalid_json"),
    ("not an object", b"[1, 2]", None, "invalid_json"),
    ("unknown model", {"model": "gpt-4", "prompt": "x"}, "model", "model_not_found"),
    ("no model", {"prompt": "x"}, "model", None),
    ("unknown field", {"model": NAME, "prompt": "x", "temprature": 1}, "temprature", "unknown_field"),
    ("prompt too long", {"model": NAME, "prompt": list(range(1, 1100))}, "prompt", None),
    ("no prompt", {"model": NAME}, "prompt", None),
    ("empty prompt", {"model": NAME, "prompt": ""}, "prompt", None),
    ("bad token id", {"model": NAME, "prompt": [1, 999999]}, "prompt", None),
    ("two prompts", {"model": NAME, "prompt": ["a", "b"]}, "prompt", "unsupported"),
    ("max_tokens 0", {"model": NAME, "prompt": "x", "max_tokens": 0}, "max_tokens", None),
    ("max_tokens -3", {"model": NAME, "prompt": "x", "max_tokens": -3}, "max_tokens", None),
    ("max_tokens beyond the context", {"model": NAME, "prompt": "x", "max_tokens": 5000}, "max_tokens", None),
    ("max_tokens text", {"model": NAME, "prompt": "x", "max_tokens": "5"}, "max_tokens", None),
    ("temperature < 0", {"model": NAME, "prompt": "x", "temperature": -0.1}, "temperature", None),
    ("temperature text", {"model": NAME, "prompt": "x", "temperature": "hot"}, "temperature", None),
    ("top_p 0", {"model": NAME, "prompt": "x", "top_p": 0}, "top_p", None),
    ("top_p > 1", {"model": NAME, "prompt": "x", "top_p": 1.5}, "top_p", None),
    ("n > 1", {"model": NAME, "prompt": "x", "n": 2}, "n", "unsupported"),
    ("seed float", {"model": NAME, "prompt": "x", "seed": 1.5}, "seed", None),
    ("too many stops", {"model": NAME, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop", None),
    ("stream text", {"model": NAME, "prompt": "x", "stream": "yes"}, "stream", None),
]


@pytest.mark.parametrize("what, body, param, code", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_400_with_an_openai_error_body_and_the_server_keeps_serving(http, what, body, param, code):
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {
        "json": body}
    r = http.post("/v1/completions", **kw)
    assert r.status_code == 400, (what, r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] == param and (code is None or err["code"] == code), err
    assert err["message"] and "\n" not in err["message"]
    ok = http.post("/v1/completions", json={"model": NAME, "prompt": "x", "max_tokens": 1})
    assert ok.status_code == 200


CHAT_BAD = [
    ({"model": NAME, "messages": []}, "messages"),
    ({"model": NAME, "messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"model": NAME, "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0},
     "max_completion_tokens"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "top_p": 2}, "top_p"),
]


@pytest.mark.parametrize("body, param", CHAT_BAD, ids=[b[1] for b in CHAT_BAD])
def test_bad_chat_input_is_a_400(http, body, param):
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_chat_without_a_template_is_a_clear_400(stack):
    r = httpx.post(stack["plain_url"] + "/v1/chat/completions", timeout=60,
                   json={"model": NAME, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "no_chat_template" and "chat template" in err["message"]


def test_a_full_queue_answers_429_with_retry_after(stack, http):
    engine = stack["engine"]
    long = {"model": NAME, "prompt": "The for statement", "max_tokens": 400, "temperature": 0, "stream": True}
    streams = []
    try:
        # 4 slots + 2 queue places: the seventh request is refused
        for i in range(6):
            s = http.stream("POST", "/v1/completions", json=long)
            r = s.__enter__()
            assert r.status_code == 200
            streams.append(s)
            deadline = time.monotonic() + 60
            while (st := engine.stats())["running"] != min(i + 1, 4) or st["queued"] != max(0, i - 3):
                assert time.monotonic() < deadline, st
                threading.Event().wait(0.02)
        r = http.post("/v1/completions", json={"model": NAME, "prompt": "x", "max_tokens": 1})
        assert r.status_code == 429, r.text
        assert int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"]["code"] == "queue_full"
    finally:
        for s in streams:
            s.__exit__(None, None, None)         # the clients go away: their requests are cancelled
    s = wait_idle(engine)
    assert s["finished"]["cancelled"] >= 6
    assert http.post("/v1/completions", json={"model": NAME, "prompt": "x", "max_tokens": 1}).status_code == 200


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_cancels_its_request(stack, stream):
    engine = stack["engine"]
    wait_idle(engine)
    before = engine.stats()["finished"]["cancelled"]
    body = {"model": NAME, "prompt": "The for statement", "max_tokens": 600, "temperature": 0, "stream": stream}
    with httpx.Client(base_url=stack["url"], timeout=120) as c:
        if stream:
            with c.stream("POST", "/v1/completions", json=body) as r:
                it = r.iter_lines()
                next(line for line in it if line.startswith("data: "))   # generating now
        else:
            with pytest.raises(httpx.ReadTimeout):
                c.post("/v1/completions", json=body, timeout=httpx.Timeout(120, read=1.0))
    s = wait_idle(engine)
    assert s["finished"]["cancelled"] == before + 1
    assert s["generated_tokens"] > 0
