"""`Coordinator`: the public Python API."""
from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from workers.errors import MoeshardError
from workers.units import parse_bytes

from .checkpoint import Checkpoint
from .experts import LocalExperts, RoutedExperts
from .generation import generate
from .model import MoETransformer

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CoordinatorBusy(MoeshardError, TimeoutError):
    """Another call held the Coordinator for longer than `lock_timeout_s`."""


class Coordinator:
    """Runs the dense part of an MoE model here and its routed experts wherever the backend puts them.

    Calls are serialised: a second thread calling `forward`/`generate` while one runs
    waits for it (the KV cache and the backend are per call, the model is shared).
    The wait is bounded by the running call, whose every remote wait is bounded (call
    timeout x retry budgets); `lock_timeout_s` bounds it explicitly (CoordinatorBusy),
    and a call made from inside `on_token` raises instead of deadlocking.
    """

    def __init__(self, checkpoint: Checkpoint, model: MoETransformer, experts: RoutedExperts, dtype: str,
                 lock_timeout_s: float | None = None):
        self.checkpoint, self.config, self.model, self.experts, self.dtype = (
            checkpoint, checkpoint.config, model, experts, dtype)
        self._lock = threading.Lock()
        self._holder: int | None = None      # thread id running a call, for the re-entrancy check
        self.lock_timeout_s = lock_timeout_s
        self._tokenizer = None
        self._counters = {"forward_calls": 0, "generated_tokens": 0, "generate_seconds": 0.0}
        self._closed = False

    @classmethod
    def from_pretrained(cls, path: str | Path, num_workers: int = 0, worker_memory: int | str | None = None,
                        dtype: str = "float32", ray_address: str | None = None, *, prefetch_depth: int = 1,
                        prefetch_extra: int = 0, policy: str = "lfu-decay", pin: Iterable[tuple[int, int]] = (),
                        pin_layers: Iterable[int] = (), spill_dir: str | None = None,
                        lock_timeout_s: float | None = None, **backend_options: Any) -> "Coordinator":
        """Load a Hugging Face MoE checkpoint.

        num_workers=0 keeps routed experts in this process; N > 0 spreads them over N Ray
        actors (`ray_address` to join a cluster, else a local Ray is started).
        worker_memory caps resident expert bytes per expert holder ("2GB" or bytes);
        experts beyond it are paged from the checkpoint files. prefetch_depth/extra set how
        many next layers' routers predict experts to load ahead, and how many candidates
        beyond top-k each prediction takes. `pin` ((layer, expert) pairs) and `pin_layers`
        (every expert of those layers) are never evicted; `spill_dir` keeps each expert's
        compute-dtype image on local disk after its first read (see docs/memory.md). lock_timeout_s bounds how long a call waits for
        another thread's running call (None: until it finishes). With workers, backend_options
        also take the recovery settings: max_call_retries, max_generation_retries,
        restart_timeout_s, takeover_memory (see cluster/recovery.py), and `transport` ("calls" or
        "graph"), `coordinator_threads`, `call_timeout_s` and placement options (see
        cluster.dispatch.RemoteExperts).
        """
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        ckpt = Checkpoint.open(path)
        cfg = ckpt.config
        budget = parse_bytes(worker_memory)
        specs = ckpt.expert_specs()
        pinned = _pinned_experts(cfg, pin, pin_layers)
        store = dict(policy=policy, pinned=pinned, spill_dir=None if spill_dir is None else str(spill_dir))
        if num_workers == 0:
            experts: RoutedExperts = LocalExperts(specs, dtype=dtype, budget_bytes=budget, min_resident=cfg.top_k,
                                                  **store)
        else:
            # The one place the coordinator reaches up to cluster/: only when Ray is asked for.
            from cluster.dispatch import RemoteExperts
            experts = RemoteExperts(specs, num_workers=num_workers, dtype=dtype, worker_memory=budget,
                                    min_resident=cfg.top_k, ray_address=ray_address, **store, **backend_options)
        try:
            model = MoETransformer(cfg, experts, DTYPES[dtype], prefetch_depth=prefetch_depth,
                                   prefetch_extra=prefetch_extra)
            ckpt.load_dense(model)
            model.eval()
        except BaseException:
            experts.close()
            raise
        return cls(ckpt, model, experts, dtype, lock_timeout_s=lock_timeout_s)

    # -- inference ---------------------------------------------------------------------------------
    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V] (float32) for ids [B, T], without a cache. Positions default to 0..T-1."""
        ids = self._check_ids(ids)
        B, T = ids.shape
        mask = torch.ones(B, T, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        positions = torch.arange(T).expand(B, T) if position_ids is None else position_ids
        with self._serialised("forward"):
            self._counters["forward_calls"] += 1
            return self.model(ids, positions, torch.arange(T), mask)

    def generate(self, ids: torch.Tensor, max_new_tokens: int = 32, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
                 attention_mask: torch.Tensor | None = None, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int | None = None, on_token: Callable[[torch.Tensor], None] | None = None
                 ) -> torch.Tensor:
        """Generate for a (left-padded) batch; returns [B, T + new] including the prompt.

        Greedy by default; `do_sample` with `temperature`/`top_p` samples, reproducibly
        when `seed` is given. Stops rows at `eos_token_id` (none by default). `on_token`
        receives each step's new tokens [B] (for streaming).
        """
        ids = self._check_ids(ids)
        with self._serialised("generate"):
            t0 = time.perf_counter()
            out = generate(self.model, ids, attention_mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                           temperature=temperature, top_p=top_p, seed=seed, eos_token_id=eos_token_id,
                           pad_token_id=pad_token_id, on_token=on_token)
            self._counters["generate_seconds"] += time.perf_counter() - t0
            self._counters["generated_tokens"] += (out.shape[1] - ids.shape[1]) * ids.shape[0]
        return out

    @property
    def tokenizer(self):
        """The checkpoint's `tokenizers.Tokenizer` (tokenizer.json); raises if the checkpoint has none."""
        if self._tokenizer is None:
            from tokenizers import Tokenizer
            path = self.checkpoint.path / "tokenizer.json"
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: this checkpoint has no tokenizer; pass token ids instead")
            self._tokenizer = Tokenizer.from_file(str(path))
        return self._tokenizer

    def generate_text(self, prompt: str, max_new_tokens: int = 64, on_text: Callable[[str], None] | None = None,
                      **kwargs: Any) -> str:
        """Encode `prompt` with the checkpoint's tokenizer, generate, and return the new text."""
        tok = self.tokenizer
        ids = torch.tensor([tok.encode(prompt).ids])
        new: list[int] = []
        shown = ""

        def stream(step: torch.Tensor) -> None:
            nonlocal shown
            new.append(int(step[0]))
            text = tok.decode(new)
            if on_text is not None and len(text) > len(shown):
                on_text(text[len(shown):])
            shown = text

        kwargs.setdefault("eos_token_id", self.config.eos_token_id)
        self.generate(ids, max_new_tokens=max_new_tokens, on_token=stream, **kwargs)
        return tok.decode(new)

    # -- lifecycle and reporting --------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Counters of this coordinator and of its expert backend."""
        c = dict(self._counters)
        if c["generate_seconds"]:
            c["tokens_per_second"] = c["generated_tokens"] / c["generate_seconds"]
        return {"coordinator": c, "prefetch": self.model.routing.prefetch_stats(), "experts": self.experts.stats()}

    def expert_activations(self) -> dict[int, list[int]]:
        """How often each routed expert was picked so far: {layer: [count per expert]}."""
        return {l: c.tolist() for l, c in sorted(self.model.routing.activations.items())}

    def close(self) -> None:
        """Release the expert backend (actors it created, threads, files). Idempotent."""
        if not self._closed:
            self._closed = True
            self.experts.close()

    def __enter__(self) -> "Coordinator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def _serialised(self, what: str):
        """Hold the call lock for one request: bounded wait, no self-deadlock, fresh retry budget."""
        me = threading.get_ident()
        if self._holder == me:
            raise RuntimeError(f"Coordinator.{what} called from inside a running call on the same thread (e.g. "
                               "from on_token); that would wait for itself forever. Call it after generate returns.")
        timeout = -1 if self.lock_timeout_s is None else max(0.0, self.lock_timeout_s)
        if not self._lock.acquire(timeout=timeout):
            raise CoordinatorBusy(f"Coordinator.{what}: another call has been running for more than "
                                  f"lock_timeout_s={self.lock_timeout_s:g}s")
        self._holder = me
        try:
            self._check_open()
            begin = getattr(self.experts, "begin_request", None)
            if begin is not None:
                begin()                      # per-request retry budget starts here
            yield
        finally:
            self._holder = None
            self._lock.release()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this Coordinator is closed; create a new one with Coordinator.from_pretrained")

    def _check_ids(self, ids: torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(ids)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"ids must be an integer tensor [B, T], got {tuple(ids.shape)} {ids.dtype}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}), got range "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        return ids.long()


def _pinned_experts(cfg, pin: Iterable[tuple[int, int]], pin_layers: Iterable[int]) -> list[tuple[int, int]]:
    """Resolve the pinning options to (layer, expert) keys, refusing ones the model does not have."""
    keys = {(int(l), int(e)) for l, e in pin}
    keys |= {(int(l), e) for l in pin_layers for e in range(cfg.num_experts)}
    bad = sorted(k for k in keys if k[0] not in cfg.moe_layer_ids or not 0 <= k[1] < cfg.num_experts)
    if bad:
        raise ValueError(f"cannot pin {bad[:5]}: routed experts are layers {cfg.moe_layer_ids} x experts "
                         f"0..{cfg.num_experts - 1}")
    return sorted(keys)
