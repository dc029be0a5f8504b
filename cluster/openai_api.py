"""The OpenAI-compatible HTTP surface over one continuous-batching `Engine` (no Ray here).

    POST /v1/completions, POST /v1/chat/completions   (stream: true -> server-sent events, then [DONE])
    GET  /v1/models, GET /health, GET /metrics        (Prometheus text)

`OpenAIServer` holds the handlers; `build_app(server)` binds them to a FastAPI app for a plain
ASGI server, and cluster/serve.py binds the same handlers to a Ray Serve deployment. Every field a
request may carry is checked; a bad one is a 400 with OpenAI's error body
`{"error": {"message", "type", "param", "code"}}`, and a full queue a 429 with `Retry-After`. A
client that goes away cancels its request: the engine frees its slot at the next token boundary.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import Request

from coordinator.chat import ChatError, ChatTemplate
from coordinator.engine import BadRequest, Engine, EngineClosed, GenerationFailed, QueueFull, RequestParams

log = logging.getLogger(__name__)

#: (HTTP method, path, OpenAIServer method): the one list both app builders use
ROUTES = (("POST", "/v1/completions", "completions"), ("POST", "/v1/chat/completions", "chat_completions"),
          ("GET", "/v1/models", "models"), ("GET", "/health", "health"), ("GET", "/metrics", "metrics"))

#: fields each endpoint accepts beyond its own; the value is what the field may be (None: anything valid below)
_COMMON = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options", "n", "user",
           "presence_penalty", "frequency_penalty", "logit_bias"}
_COMPLETION_ONLY = {"prompt", "echo", "logprobs", "best_of", "suffix"}
_CHAT_ONLY = {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "response_format", "tools",
              "tool_choice", "parallel_tool_calls"}
#: accepted only at the value that changes nothing (we do not implement them)
_NEUTRAL = {"n": (None, 1), "best_of": (None, 1), "echo": (None, False), "logprobs": (None, False),
            "top_logprobs": (None, 0), "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
            "logit_bias": (None, {}), "suffix": (None, ""), "tools": (None, []), "tool_choice": (None, "none"),
            "parallel_tool_calls": (None, True, False)}
MAX_STOP = 4                       # OpenAI's limit on stop strings


class ApiError(Exception):
    """An HTTP error with OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self):
        from fastapi.responses import JSONResponse
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


@dataclass(frozen=True)
class _Parsed:
    prompt: Any                     # text or token ids
    params: RequestParams
    stream: bool
    include_usage: bool


class OpenAIServer:
    """The handlers over one engine. `chat_template` None: chat answers 400 (the model has none)."""

    def __init__(self, engine: Engine, model_name: str, chat_template: ChatTemplate | None,
                 disconnect_poll_s: float = 0.25):
        self.engine, self.model_name, self.chat_template = engine, model_name, chat_template
        self.disconnect_poll_s = disconnect_poll_s
        self.created = int(time.time())

    # ---- handlers -------------------------------------------------------------------------------
    async def completions(self, request):
        try:
            body = await _json_body(request)
            parsed = self._parse(body, _COMPLETION_ONLY, chat=False)
            gen = self._submit(parsed)
        except ApiError as e:
            return e.response()
        return await self._answer(request, gen, parsed, chat=False)

    async def chat_completions(self, request):
        try:
            body = await _json_body(request)
            parsed = self._parse(body, _CHAT_ONLY, chat=True)
            gen = self._submit(parsed)
        except ApiError as e:
            return e.response()
        return await self._answer(request, gen, parsed, chat=True)

    async def models(self, request):
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "moeshard"}]}

    async def health(self, request):
        from fastapi.responses import JSONResponse
        ok = self.engine.alive
        return JSONResponse({"status": "ok" if ok else "engine stopped"}, status_code=200 if ok else 503)

    async def metrics(self, request):
        from fastapi.responses import PlainTextResponse
        experts = await asyncio.to_thread(lambda: self.engine.coord.stats()["experts"])
        return PlainTextResponse(prometheus_text(self.engine.stats(), experts),
                                 media_type="text/plain; version=0.0.4")

    # ---- parsing --------------------------------------------------------------------------------
    def _parse(self, body: dict, own: set[str], chat: bool) -> _Parsed:
        unknown = sorted(set(body) - _COMMON - own)
        if unknown:
            raise ApiError(400, f"unknown field {unknown[0]!r}; this endpoint takes {', '.join(sorted(_COMMON | own))}",
                           param=unknown[0], code="unknown_field")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(400, "model is required: the name GET /v1/models lists", param="model")
        if model != self.model_name:
            raise ApiError(400, f"unknown model {model!r}; this server serves {self.model_name!r}", param="model",
                           code="model_not_found")
        for name, ok in _NEUTRAL.items():
            if name in body and body[name] not in ok:
                what = "n > 1" if name == "n" else f"{name}={body[name]!r}"
                raise ApiError(400, f"{what} is not supported by this server; leave {name} out", param=name,
                               code="unsupported")
        if chat:
            if self.chat_template is None:
                raise ApiError(400, f"model {self.model_name!r} has no chat template (tokenizer_config.json "
                                    "chat_template); use /v1/completions with a prompt instead", param="messages",
                               code="no_chat_template")
            try:
                prompt: Any = self.chat_template.render(body.get("messages"))
            except ChatError as e:
                raise ApiError(400, str(e), param=e.param) from None
        else:
            prompt = _prompt(body.get("prompt"))
        try:
            ids = self.engine.encode(prompt)
        except BadRequest as e:
            raise ApiError(400, str(e), param=e.param) from None
        max_key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = body.get(max_key)
        if max_tokens is None:
            # OpenAI's defaults: 16 for completions; chat answers until the end of sequence or the context
            max_tokens = 16 if not chat else max(1, self.engine.max_seq_len - len(ids))
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
            raise ApiError(400, f"{max_key} must be an integer >= 1, got {max_tokens!r}", param=max_key)
        stop = body.get("stop")
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        elif not isinstance(stop, list) or len(stop) > MAX_STOP:
            raise ApiError(400, f"stop must be a string or a list of at most {MAX_STOP} strings", param="stop")
        for name in ("temperature", "top_p"):
            v = body.get(name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise ApiError(400, f"{name} must be a number, got {v!r}", param=name)
        stream = body.get("stream", False)
        if stream is None:
            stream = False
        if not isinstance(stream, bool):
            raise ApiError(400, f"stream must be true or false, got {stream!r}", param="stream")
        opts = body.get("stream_options") or {}
        if not isinstance(opts, dict) or set(opts) - {"include_usage"} or not isinstance(
                opts.get("include_usage", False), bool):
            raise ApiError(400, "stream_options must be {\"include_usage\": true|false}", param="stream_options")
        if body.get("user") is not None and not isinstance(body["user"], str):
            raise ApiError(400, "user must be a string", param="user")
        temperature = body.get("temperature")
        top_p = body.get("top_p")
        try:
            params = RequestParams(max_tokens=max_tokens, temperature=1.0 if temperature is None else temperature,
                                   top_p=1.0 if top_p is None else top_p, seed=body.get("seed"), stop=tuple(stop))
            self.engine.check_fits(len(ids), params.max_tokens)
        except BadRequest as e:
            param = max_key if e.param == "max_tokens" else e.param
            raise ApiError(400, str(e).replace("max_tokens", max_key), param=param) from None
        return _Parsed(ids, params, stream, bool(opts.get("include_usage", False)))

    def _submit(self, parsed: _Parsed):
        try:
            return self.engine.submit(parsed.prompt, parsed.params)
        except BadRequest as e:
            raise ApiError(400, str(e), param=e.param) from None
        except QueueFull as e:
            raise ApiError(429, str(e), kind="rate_limit_exceeded", code="queue_full",
                           headers={"Retry-After": str(e.retry_after_s)}) from None
        except EngineClosed as e:
            raise ApiError(503, str(e), kind="server_error", code="shutting_down") from None

    # ---- answering ------------------------------------------------------------------------------
    async def _answer(self, request, gen, parsed: _Parsed, chat: bool):
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if parsed.stream:
            from fastapi.responses import StreamingResponse
            return StreamingResponse(self._events(gen, rid, chat, parsed.include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        parts: list[str] = []

        async def read() -> None:
            async for out in gen:
                parts.append(out.text)

        task = asyncio.ensure_future(read())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=self.disconnect_poll_s)
                if done:
                    break
                if await request.is_disconnected():
                    gen.cancel()             # the slot is freed at the next token boundary
            task.result()
        except GenerationFailed as e:
            return ApiError(500, str(e), kind="server_error", code="generation_failed").response()
        finally:
            if not task.done():              # this handler was cancelled (Ray Serve: client gone)
                task.cancel()
                gen.cancel()
        text = "".join(parts)
        reason = _reason(gen)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                   "finish_reason": reason} if chat else
                  {"index": 0, "text": text, "logprobs": None, "finish_reason": reason})
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": self.model_name, "choices": [choice], "usage": _usage(gen)}

    async def _events(self, gen, rid: str, chat: bool, include_usage: bool) -> AsyncIterator[str]:
        created = int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, reason: str | None = None, first: bool = False, usage: bool = False) -> str:
            if chat:
                delta: dict[str, Any] = {}
                if first:
                    delta["role"] = "assistant"
                if text is not None:
                    delta["content"] = text
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
            c = {"id": rid, "object": kind, "created": created, "model": self.model_name, "choices": [choice]}
            if usage:
                c["usage"] = _usage(gen)
            return f"data: {json.dumps(c)}\n\n"

        try:
            if chat:
                yield chunk("", first=True)
            async for out in gen:
                if out.text:
                    yield chunk(out.text)
                if out.finish_reason is not None:
                    yield chunk(None if chat else "", reason=_reason(gen), usage=True)
                    if include_usage:
                        c = {"id": rid, "object": kind, "created": created, "model": self.model_name, "choices": [],
                             "usage": _usage(gen)}
                        yield f"data: {json.dumps(c)}\n\n"
        except GenerationFailed as e:
            yield f"data: {json.dumps(ApiError(500, str(e), kind='server_error', code='generation_failed').body())}\n\n"
        yield "data: [DONE]\n\n"


def _reason(gen) -> str:
    return gen.finish_reason if gen.finish_reason in ("stop", "length") else "stop"


def _usage(gen) -> dict:
    u = gen.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens, "total_tokens": u.total_tokens}


async def _json_body(request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return body


def _prompt(prompt: Any) -> Any:
    """One prompt: a string or a list of token ids (a one-element list of either is unwrapped)."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise ApiError(400, "several prompts in one request are not supported; send one request per prompt",
                       param="prompt", code="unsupported")
    raise ApiError(400, "prompt is required: a non-empty string or a list of token ids", param="prompt")


def build_app(server: OpenAIServer):
    """A FastAPI app with `ROUTES` bound to `server` (for uvicorn, or tests)."""
    from fastapi import FastAPI

    app = FastAPI(title="moeshard")
    def bind(handler):
        async def endpoint(request: Request):
            return await handler(request)
        return endpoint

    for method, path, name in ROUTES:
        app.add_api_route(path, bind(getattr(server, name)), methods=[method])
    return app


# ---- /metrics ---------------------------------------------------------------------------------

def prometheus_text(engine: dict, experts: dict) -> str:
    """Engine and expert-backend figures in the Prometheus text exposition format."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[dict, float]]) -> None:
        lines.append(f"# HELP moeshard_{name} {help_}")
        lines.append(f"# TYPE moeshard_{name} {kind}")
        for labels, value in samples:
            lab = ",".join(f'{k}="{v}"' for k, v in labels.items())
            v = float(value) if value is not None and math.isfinite(float(value)) else float("nan")
            lines.append(f"moeshard_{name}{{{lab}}} {v:.9g}" if lab else f"moeshard_{name} {v:.9g}")

    metric("requests_running", "gauge", "Requests holding a KV slot.", [({}, engine["running"])])
    metric("requests_queued", "gauge", "Requests waiting for a slot.", [({}, engine["queued"])])
    metric("requests_rejected_total", "counter", "Requests refused with 429 (queue full).", [({}, engine["rejected"])])
    metric("requests_finished_total", "counter", "Finished requests by reason.",
           [({"reason": r}, n) for r, n in engine["finished"].items()])
    metric("prompt_tokens_total", "counter", "Prompt tokens prefilled.", [({}, engine["prompt_tokens"])])
    metric("generation_tokens_total", "counter", "Tokens generated.", [({}, engine["generated_tokens"])])
    metric("tokens_per_second", "gauge", "Generated tokens per second of engine busy time.",
           [({}, engine["tokens_per_second"])])
    metric("batch_size_mean", "gauge", "Mean sequences per decode step.", [({}, engine["mean_batch"])])
    for name, key, what in (("time_to_first_token_seconds", "ttft_s", "Submit to first token (recent requests)."),
                            ("inter_token_latency_seconds", "itl_s", "Between consecutive tokens of a request.")):
        q = engine[key]
        metric(name, "summary", what, [({"quantile": "0.5"}, q["p50"]), ({"quantile": "0.99"}, q["p99"])])
        lines.append(f"moeshard_{name}_sum {q['mean'] * q['count']:.9g}")
        lines.append(f"moeshard_{name}_count {q['count']}")
    hits, misses = experts.get("hits", 0) or 0, experts.get("misses", 0) or 0
    metric("expert_cache_hit_rate", "gauge", "Routed-expert lookups served from resident memory.",
           [({}, hits / (hits + misses) if hits + misses else float("nan"))])
    actors = experts.get("actors", [])
    for name, key, kind, what in (("actor_hits_total", "hits", "counter", "Expert cache hits per actor."),
                                  ("actor_misses_total", "misses", "counter", "Expert cache misses per actor."),
                                  ("actor_bytes_read_total", "bytes_read", "counter", "Expert bytes read from disk."),
                                  ("actor_bytes_resident", "bytes_resident", "gauge", "Resident expert bytes."),
                                  ("actor_calls_total", "calls", "counter", "Layer calls per actor."),
                                  ("actor_compute_seconds_total", "compute_s", "counter", "Expert compute time."),
                                  ("actor_restarts_total", "restarts", "counter", "Replacements after a loss.")):
        samples = [({"actor": str(a.get("index", i))}, a.get(key) or 0) for i, a in enumerate(actors)]
        if samples:
            metric(name, kind, what, samples)
    if actors and any("pid" in a for a in actors):
        metric("actor_info", "gauge", "Where each expert actor runs (value 1).",
               [({"actor": str(a.get("index", i)), "pid": str(a.get("pid")), "ip": str(a.get("ip"))}, 1)
                for i, a in enumerate(actors)])
    return "\n".join(lines) + "\n"
