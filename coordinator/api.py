"""`Coordinator`: the public Python API."""
from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from workers import native
from workers.errors import MoeshardError
from workers.budget import check_budget
from workers.dtypes import COMPUTE_DTYPES

from .checkpoint import Checkpoint
from .experts import LocalExperts, RoutedExperts
from .generation import generate
from .load import LoadStats, load_model_key
from .model import MoETransformer
from .options import OptionError, RunOptions, SamplingOptions, UnknownOption

log = logging.getLogger(__name__)




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
        self.options = RunOptions(dtype=dtype)
        self._threads = _CoordinatorThreads(None)

    @classmethod
    def from_pretrained(cls, path: str | Path, num_workers: int = 0, worker_memory: int | str | None = None,
                        dtype: str = "float32", ray_address: str | None = None, *,
                        options: RunOptions | None = None, **kwargs: Any) -> "Coordinator":
        """Load a Hugging Face MoE checkpoint.

        num_workers=0 keeps routed experts in this process; N > 0 spreads them over N Ray
        actors (`ray_address` to join a cluster, else a local Ray is started). worker_memory caps
        resident expert bytes per expert holder ("2GB" or bytes); experts beyond it are paged from
        the checkpoint files.

        The other keywords are the options of `coordinator/options.py` (every one is listed, with
        its allowed values, in docs/options.md): prefetch_depth, prefetch_extra, policy, pin,
        pin_layers, spill_dir, lock_timeout_s, coordinator_threads, routing ("exact", the default, or
        "cache-aware" with routing_policy, routing_strength, routing_max_rank, max_new_experts_per_token,
        or routing=RoutingOptions(...); docs/routing.md); with workers also the
        placement (num_cpus_per_worker, num_gpus_per_worker, resources, ready_timeout_s), transport
        (transport, call_timeout_s) and recovery (max_call_retries,
        max_generation_retries, restart_timeout_s, takeover_memory, takeover_share) options.
        `options=RunOptions(...)` gives them typed instead. Every value is checked before anything
        starts: an unknown option, or one that does not apply with num_workers=0, raises
        UnknownOption (TypeError); a value out of range OptionError (ValueError).
        """
        if options is None:
            options = RunOptions.from_kwargs(num_workers=num_workers, worker_memory=worker_memory, dtype=dtype,
                                             ray_address=ray_address, **kwargs)
        elif kwargs or (num_workers, worker_memory, dtype, ray_address) != (0, None, "float32", None):
            raise UnknownOption("options", "give either options=RunOptions(...) or keyword options, not both")
        return cls.open(path, options)

    @classmethod
    def open(cls, path: str | Path, options: RunOptions) -> "Coordinator":
        """`from_pretrained` with typed options."""
        ckpt = Checkpoint.open(path)
        native.ops()       # build (first time on a machine) or load the CPU kernels now, not in the first token
        cfg = ckpt.config
        store = options.store
        specs = ckpt.expert_specs(store.expert_dtype, store.group_size)
        pinned = pinned_experts(cfg, store.pin, store.pin_layers)
        routing = options.routing
        if routing.cache_aware and routing.policy == "max-rank" and routing.max_rank < cfg.top_k:
            raise OptionError("routing_max_rank", f"must be at least the model's top-k ({cfg.top_k}), got "
                                                  f"{routing.max_rank}")
        if not options.distributed:     # the distributed planner checks each actor's share the same way
            check_budget(specs, COMPUTE_DTYPES[options.dtype].itemsize, store.budget_bytes, min_resident=cfg.top_k,
                         pinned=pinned, option="worker_memory")
        threads = _CoordinatorThreads(options.coordinator_threads if not options.distributed else None)
        try:
            if not options.distributed:
                experts: RoutedExperts = LocalExperts(specs, dtype=options.dtype, budget_bytes=store.budget_bytes,
                                                      min_resident=cfg.top_k, policy=store.policy, pinned=pinned,
                                                      spill_dir=store.spill_dir)
            else:
                # The one place the coordinator reaches up to cluster/: only when Ray is asked for.
                from cluster.dispatch import RemoteExperts
                experts = RemoteExperts(specs, dtype=options.dtype, placement=options.placement, store=store,
                                        transport=options.transport, recovery=options.recovery,
                                        min_resident=cfg.top_k, pinned=pinned,
                                        coordinator_threads=options.coordinator_threads,
                                        report_residency=routing.cache_aware)
        except BaseException:
            threads.restore()
            raise
        try:
            model = MoETransformer(cfg, experts, COMPUTE_DTYPES[options.dtype], prefetch_depth=store.prefetch_depth,
                                   prefetch_extra=store.prefetch_extra, routing=routing)
            ckpt.load_dense(model)
            model.eval()
        except BaseException:
            experts.close()
            threads.restore()
            raise
        coord = cls(ckpt, model, experts, options.dtype, lock_timeout_s=options.lock_timeout_s)
        coord.options, coord._threads = options, threads
        if options.placement.rebalance_interval is not None:     # distributed only (RunOptions refuses it else)
            experts.rebalance_every(options.placement.rebalance_interval, model.routing.window.load_map)
        return coord

    # -- inference ---------------------------------------------------------------------------------
    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V] (float32) for ids [B, T], without a cache. Positions default to 0..T-1."""
        ids = self._check_ids(ids)
        B, T = ids.shape
        mask = _check_mask(attention_mask, ids)
        self._check_context(T, 0)
        positions = torch.arange(T).expand(B, T) if position_ids is None else position_ids
        positions = _check_positions(positions, ids, self.config.max_positions)
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
        when `seed` is given (temperature 0 is greedy). The prompt plus `max_new_tokens` must fit
        the model's context (`config.max_positions`); padding must be on the left. Stops rows at `eos_token_id` (none by default). `on_token`
        receives each step's new tokens [B] (for streaming).
        """
        ids = self._check_ids(ids)
        sampling = SamplingOptions(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                   top_p=top_p, seed=seed)
        mask = _check_mask(attention_mask, ids)
        if not bool(mask.any(dim=1).all()):
            raise ValueError(f"attention_mask: row {int((~mask.any(dim=1)).nonzero()[0])} has no tokens")
        if bool((mask[:, :-1] & ~mask[:, 1:]).any()):
            row = int((mask[:, :-1] & ~mask[:, 1:]).any(dim=1).nonzero()[0])
            raise ValueError(f"attention_mask: row {row} is padded on the right (or in the middle); generate "
                             "supports left padding only: put the pad tokens before the prompt")
        self._check_context(int(mask.sum(dim=1).max()), sampling.max_new_tokens)
        eos_token_id = self._check_token("eos_token_id", eos_token_id)
        pad_token_id = self._check_token("pad_token_id", pad_token_id)
        if on_token is not None and not callable(on_token):
            raise TypeError(f"on_token must be callable, got {type(on_token).__name__}")
        with self._serialised("generate"):
            t0 = time.perf_counter()
            out = generate(self.model, ids, mask, max_new_tokens=sampling.max_new_tokens,
                           do_sample=sampling.do_sample and sampling.temperature > 0,
                           temperature=sampling.temperature, top_p=sampling.top_p, seed=sampling.seed,
                           eos_token_id=eos_token_id, pad_token_id=pad_token_id, on_token=on_token)
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
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
        tok = self.tokenizer
        ids = torch.tensor([tok.encode(prompt).ids], dtype=torch.long)
        if ids.shape[1] == 0:
            raise ValueError(f"prompt {prompt!r} encodes to no tokens")
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

    def perplexity(self, text_or_ids: str | torch.Tensor | list[int], *, max_length: int | None = None,
                   stride: int | None = None, progress: bool | None = None, stepwise: bool = False) -> float:
        """Perplexity of a text (tokenized with the checkpoint's tokenizer) or of token ids [T] / [1, T],
        over sliding windows of `max_length` tokens (default: the context, at most 1024) moved by
        `stride` (default: max_length // 2), as in transformers' perplexity guide
        (coordinator/perplexity.py). A bar on a terminal only, unless `progress` says otherwise.

        `stepwise`: feed the text one token per forward through the KV cache, as decode does, in
        consecutive windows of `max_length` (no stride): the routing a generation sees, which matters
        with cache-aware routing (docs/routing.md). Slower: one forward per token."""
        from .perplexity import sliding_perplexity, stepwise_perplexity
        if isinstance(text_or_ids, str):
            if not text_or_ids.strip():
                raise ValueError("perplexity: the text is empty; give at least two tokens of text")
            ids = torch.tensor(self.tokenizer.encode(text_or_ids).ids, dtype=torch.long)
        else:
            ids = torch.as_tensor(text_or_ids, dtype=torch.long)
            if ids.dim() == 2 and ids.shape[0] == 1:
                ids = ids[0]
            if ids.dim() != 1:
                raise ValueError(f"perplexity takes one sequence of ids [T] or [1, T], got {tuple(ids.shape)}")
        if ids.numel() < 2:
            raise ValueError(f"perplexity needs at least two tokens, got {ids.numel()}: give a longer text")
        limit = self.config.max_position_embeddings
        max_length = min(limit, 1024) if max_length is None else max_length
        if not isinstance(max_length, int) or not 2 <= max_length <= limit:
            raise ValueError(f"max_length must be an integer in [2, {limit}] (the model's context), got {max_length}")
        if not isinstance(stepwise, bool):
            raise ValueError(f"stepwise must be True or False, got {stepwise!r}")
        if stepwise:
            if stride is not None:
                raise ValueError("stride does not apply with stepwise=True (windows follow each other)")
            return stepwise_perplexity(self._decode_step(max_length), ids, max_length, progress)
        stride = max(1, max_length // 2) if stride is None else stride
        if not isinstance(stride, int) or not 1 <= stride <= max_length:
            raise ValueError(f"stride must be an integer in [1, max_length={max_length}], got {stride}")
        return sliding_perplexity(self.forward, ids, max_length, stride, progress)

    def _decode_step(self, max_length: int) -> Callable[[torch.Tensor, int, bool], torch.Tensor]:
        """One decode step per call on a KV cache of `max_length` positions (`fresh` starts it again),
        each under the call lock, as `generate`'s steps are."""
        key_valid = torch.ones(1, max_length, dtype=torch.bool)
        caches: list = []

        def step(token: torch.Tensor, pos: int, fresh: bool) -> torch.Tensor:
            with self._serialised("perplexity"):
                if fresh:
                    caches[:] = self.model.new_caches(1, max_length)
                return self.model(token, torch.tensor([[pos]]), torch.tensor([pos]), key_valid[:, :pos + 1],
                                  caches)
        return step

    # -- lifecycle and reporting --------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Counters of this coordinator and of its expert backend; "routing" is what cache-aware routing
        did (`RerouteStats`, all zero with exact routing)."""
        c = dict(self._counters)
        if c["generate_seconds"]:
            c["tokens_per_second"] = c["generated_tokens"] / c["generate_seconds"]
        return {"coordinator": c, "prefetch": self.model.routing.prefetch_stats(), "experts": self.experts.stats(),
                "routing": self.model.rerouting.stats()}

    def drop_resident(self) -> dict:
        """Forget every resident routed expert (in this process or on the actors), so the next forward
        reads each expert it uses from disk again: a cold expert cache, as after loading, with budgets,
        slots and counters unchanged. Returns {"experts", "bytes"} dropped. Benchmarks use it to compare
        cold starts fairly; it does not touch the page cache."""
        return self.experts.drop_resident()

    def expert_activations(self) -> dict[int, list[int]]:
        """How often each routed expert was picked so far: {layer: [count per expert]}."""
        return {l: c.tolist() for l, c in sorted(self.model.routing.activations.items())}

    def expert_load(self) -> LoadStats:
        """Rows routed to each expert per MoE layer over the recent window of forward passes: what
        load-driven placement plans from (`LoadStats.write` makes the file `moeshard plan --from-stats` reads)."""
        return self.model.routing.window.snapshot(load_model_key(self.config))

    def close(self) -> None:
        """Release the expert backend (actors it created, threads, files). Idempotent."""
        if not self._closed:
            self._closed = True
            try:
                self.experts.close()
            finally:
                self._threads.restore()

    def __enter__(self) -> "Coordinator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def exclusive(self, what: str = "engine"):
        """Hold this Coordinator for one unit of outside work on its model (a serving engine's step):
        the same lock, bounded wait and fresh retry budget as a `generate` call."""
        return self._serialised(what)

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
        if ids.numel() == 0:
            raise ValueError(f"ids is empty (shape {tuple(ids.shape)}): give at least one token per row")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}), got range "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        return ids.long()

    def _check_context(self, prompt_len: int, max_new_tokens: int) -> None:
        """The prompt and what is generated must fit the positions the model is defined for."""
        limit = self.config.max_positions
        if prompt_len > limit:
            raise ValueError(f"the prompt has {prompt_len} tokens, more than the model's context of {limit} "
                             f"positions (config.json max_position_embeddings); shorten it")
        if prompt_len + max_new_tokens > limit:
            raise OptionError("max_new_tokens", (
                f"the prompt has {prompt_len} tokens, and {prompt_len} + {max_new_tokens} new tokens exceed the "
                f"model's context of {limit} positions; ask for at most {limit - prompt_len}"))

    def _check_token(self, name: str, value: int | list[int] | None) -> int | list[int] | None:
        if value is None:
            return None
        values = [value] if isinstance(value, int) and not isinstance(value, bool) else value
        if not isinstance(values, (list, tuple)) or not all(
                isinstance(v, int) and not isinstance(v, bool) and 0 <= v < self.config.vocab_size for v in values):
            raise ValueError(f"{name} must be a token id or a list of ids in [0, {self.config.vocab_size}), "
                             f"got {value!r}")
        return value


class _CoordinatorThreads:
    """Torch threads of this process set for a Coordinator's life (None: left as they are), then restored."""

    def __init__(self, threads: int | None):
        self._before = None
        if threads is not None and threads != torch.get_num_threads():
            self._before = torch.get_num_threads()
            torch.set_num_threads(threads)

    def restore(self) -> None:
        if self._before is not None:
            torch.set_num_threads(self._before)
            self._before = None


def _check_mask(mask: torch.Tensor | None, ids: torch.Tensor) -> torch.Tensor:
    """attention_mask [B, T] of 0/1 (or bool) -> bool; default all ones."""
    if mask is None:
        return torch.ones(ids.shape, dtype=torch.bool)
    mask = torch.as_tensor(mask)
    if mask.dim() == 1 and ids.shape[0] == 1:
        mask = mask[None]
    if tuple(mask.shape) != tuple(ids.shape):
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)}, but ids has {tuple(ids.shape)}; they must "
                         "match")
    if mask.dtype != torch.bool:
        if mask.is_floating_point() or mask.is_complex() or bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError("attention_mask must hold only 0 and 1 (or booleans)")
        mask = mask.bool()
    return mask


def _check_positions(positions: torch.Tensor, ids: torch.Tensor, limit: int) -> torch.Tensor:
    positions = torch.as_tensor(positions)
    if positions.dim() == 1:
        positions = positions.expand(ids.shape)
    if tuple(positions.shape) != tuple(ids.shape) or positions.is_floating_point() or positions.dtype == torch.bool:
        raise ValueError(f"position_ids must be an integer tensor of the ids' shape {tuple(ids.shape)}, got "
                         f"{tuple(positions.shape)} {positions.dtype}")
    if bool((positions < 0).any()) or bool((positions >= limit).any()):
        raise ValueError(f"position_ids must be in [0, {limit}) (the model's context), got range "
                         f"[{int(positions.min())}, {int(positions.max())}]")
    return positions.long()


def pinned_experts(cfg, pin: Iterable[tuple[int, int]], pin_layers: Iterable[int]) -> list[tuple[int, int]]:
    """Resolve the pinning options to (layer, expert) keys, refusing ones the model does not have."""
    keys = {(int(l), int(e)) for l, e in pin}
    keys |= {(int(l), e) for l in pin_layers for e in range(cfg.num_experts)}
    bad_layers = sorted({l for l in pin_layers if l not in cfg.moe_layer_ids})
    if bad_layers:
        raise OptionError("pin_layers", f"layers {bad_layers} have no routed experts; this model's MoE layers are "
                                        f"{cfg.moe_layer_ids}")
    bad = sorted(k for k in keys if k[0] not in cfg.moe_layer_ids or not 0 <= k[1] < cfg.num_experts)
    if bad:
        raise OptionError("pin", f"cannot pin {bad[:5]}: routed experts are layers {cfg.moe_layer_ids} x experts "
                                 f"0..{cfg.num_experts - 1}")
    return sorted(keys)
