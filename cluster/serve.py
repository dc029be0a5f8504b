"""`moeshard serve`: the OpenAI-compatible server as a Ray Serve deployment with a FastAPI ingress.

One replica (a Ray actor, 0 CPUs) loads the checkpoint's dense part, starts the expert actors
(`--workers N`) and runs the continuous-batching engine (coordinator/engine.py); the handlers are
cluster/openai_api.py's. Two ways to run it:

    moeshard serve models/pydoc-moe --workers 2 --worker-memory 8MB --host 127.0.0.1 --port 8000
    serve deploy serve_config.yaml        # on a running Ray cluster: import_path cluster.serve:app_builder
"""
from __future__ import annotations

import logging
import signal
import socket
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from ray import serve

from coordinator.chat import ChatTemplate
from coordinator.engine import Engine, EngineOptions
from coordinator.options import RunOptions, UnknownOption

from .openai_api import ROUTES, OpenAIServer

log = logging.getLogger(__name__)

APP_NAME = "moeshard"
ENGINE_FIELDS = ("max_batch", "max_queue", "max_seq_len", "max_prefill_tokens", "event_timeout_s")


@dataclass(frozen=True)
class ServeConfig:
    """What one replica serves: the checkpoint, its run options, the engine's limits, the model's name."""

    checkpoint: str
    options: RunOptions = field(default_factory=RunOptions)
    engine: EngineOptions = field(default_factory=EngineOptions)
    model_name: str | None = None

    @property
    def name(self) -> str:
        """The `model` clients send (GET /v1/models): --model-name, else the checkpoint folder's name."""
        return self.model_name or Path(self.checkpoint).resolve().name

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> "ServeConfig":
        """From a Serve config file's `args`: `model` (the checkpoint path), optional `model_name`, the
        engine's max_batch/max_queue/max_seq_len, and any option of `Coordinator.from_pretrained`."""
        args = dict(args)
        if not isinstance(args.get("model"), str):
            raise UnknownOption("model", "the Serve config's args need model: the checkpoint path on every node")
        checkpoint = args.pop("model")
        name = args.pop("model_name", None)
        engine = EngineOptions(**{k: args.pop(k) for k in ENGINE_FIELDS if k in args})
        return cls(checkpoint, RunOptions.from_kwargs(**args), engine, name)


app = FastAPI(title="moeshard")


class MoeshardServer:
    """The replica: a Coordinator, its engine, and the OpenAI handlers (bound to `app` below)."""

    def __init__(self, config: ServeConfig):
        from coordinator import Coordinator

        self.coord = Coordinator.open(config.checkpoint, config.options)
        try:
            self.engine = Engine(self.coord, config.engine)
            self.server = OpenAIServer(self.engine, config.name, ChatTemplate.load(config.checkpoint))
        except BaseException:
            self.coord.close()
            raise
        log.info("serving %s from %s", config.name, config.checkpoint)

    async def completions(self, request: Request):
        return await self.server.completions(request)

    async def chat_completions(self, request: Request):
        return await self.server.chat_completions(request)

    async def models(self, request: Request):
        return await self.server.models(request)

    async def health(self, request: Request):
        return await self.server.health(request)

    async def metrics(self, request: Request):
        return await self.server.metrics(request)

    def __del__(self):   # Serve's replica shutdown hook: stop the engine, release the expert actors
        engine, coord = getattr(self, "engine", None), getattr(self, "coord", None)
        if engine is not None:
            engine.close()
        if coord is not None:
            coord.close()


for _method, _path, _name in ROUTES:
    app.add_api_route(_path, getattr(MoeshardServer, _name), methods=[_method])

MoeshardDeployment = serve.deployment(name="MoeshardServer", num_replicas=1,
                                      ray_actor_options={"num_cpus": 0})(serve.ingress(app)(MoeshardServer))


def application(config: ServeConfig):
    """The Serve application for `config`. The replica joins the cluster it runs in, so no address is
    passed on; Serve lets more requests through than the engine holds, so a full queue is our 429."""
    options = replace(config.options, placement=replace(config.options.placement, ray_address=None))
    limit = config.engine.max_batch + config.engine.max_queue + 16
    return MoeshardDeployment.options(max_ongoing_requests=limit).bind(replace(config, options=options))


def app_builder(args: dict[str, Any]):
    """`import_path: cluster.serve:app_builder` for `serve run` / `serve deploy` config files."""
    return application(ServeConfig.from_args(args))


def check_port(host: str, port: int) -> None:
    """Fail now, in one line, if the HTTP port cannot be bound (Serve's proxy would retry for long)."""
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        raise ValueError(f"--port {port}: cannot listen on {host}:{port}: {e.strerror or e} (another server there? "
                         "pick another --port)") from None


def run_serve(config: ServeConfig, host: str, port: int) -> int:
    """Start (or join) Ray, deploy, print the address, serve until SIGINT/SIGTERM, then shut Serve down."""
    import ray

    from .connect import connect_ray

    p = config.options.placement
    started = connect_ray(p.ray_address, num_cpus=max(1.0, p.num_workers * p.num_cpus),
                          num_gpus=p.num_workers * p.num_gpus, resources={})
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve.start(http_options={"host": host, "port": port}, proxy_location="HeadOnly")
        serve.run(application(config), name=APP_NAME, route_prefix="/", blocking=False)
        print(f"moeshard serve: {config.name} at http://{host}:{port}/v1 (POST /v1/completions, "
              f"/v1/chat/completions; GET /v1/models, /health, /metrics). Ctrl-C stops.", flush=True)
        while not stop.wait(1.0):
            pass
        print("moeshard serve: stopping", flush=True)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        try:
            serve.shutdown()
        finally:
            if started:
                ray.shutdown()
    return 0
