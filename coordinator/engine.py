"""Continuous batching: many requests share one `Coordinator`, token by token.

    engine = Engine(coord, EngineOptions(max_batch=16, max_queue=64))
    gen = engine.submit("The for statement", RequestParams(max_tokens=32, temperature=0))
    for out in gen:                  # or `async for out in gen` inside an event loop
        print(out.text, end="")      # out.token: the new id; the last output has out.finish_reason
    engine.close()

One engine thread runs the loop. At every token boundary it drops cancelled requests, admits queued
ones into free KV slots (the prompts admitted together are prefilled in one forward, right-padded;
a lone prompt exactly as `Coordinator.generate` prefills a one-row batch), then runs ONE decode step
over every active sequence: one forward over [n, 1] tokens, so
each MoE layer sends one routed-expert dispatch carrying the rows of all n sequences, and one expert
read serves every sequence routed to it. Each sequence owns a row of the KV cache (its slot) and
its own positions; the active ones are kept in rows 0..n-1 (a finished one's row is filled with the
last active row) so a step reads the cache without gathering.

Each request has its own sampling (temperature, top_p, seed, stop strings, eos, max_tokens). With
the same parameters a request gets the tokens `Coordinator.generate` gives it alone: greedy token
for token (up to near-ties of the logits, which batching can flip by float rounding), and sampling
with a seed draws from its own generator as `generate` does.

`Coordinator.generate` is unchanged. Each engine step holds the Coordinator's call lock
(`Coordinator.exclusive`), so direct calls and the engine take turns between steps. Ray-free.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator, Sequence

import torch

from workers.errors import MoeshardError

from .generation import select_next
from .options import OptionError, check_option

log = logging.getLogger(__name__)

FINISH_REASONS = ("stop", "length", "cancelled", "error")


class BadRequest(MoeshardError, ValueError):
    """A request the engine cannot run as given. `param` names the offending field."""

    def __init__(self, param: str, message: str):
        self.param = param
        super().__init__(message)


class QueueFull(MoeshardError, RuntimeError):
    """The admission queue is full; try again after `retry_after_s` seconds."""

    def __init__(self, queued: int, retry_after_s: int):
        self.queued, self.retry_after_s = queued, retry_after_s
        super().__init__(f"the engine's queue is full ({queued} requests waiting); retry in {retry_after_s}s")


class EngineClosed(MoeshardError, RuntimeError):
    """The engine was closed; no request is admitted any more."""


class GenerationFailed(MoeshardError, RuntimeError):
    """A request was ended by an error of the backend (e.g. an actor lost beyond the retry budget)."""


@dataclass(frozen=True)
class EngineOptions:
    """How many sequences run at once, how many may wait, and how long a reader waits for a token."""

    max_batch: int = 16             # KV slots: sequences decoded together
    max_queue: int = 64             # requests waiting for a slot; beyond it submit raises QueueFull
    max_seq_len: int | None = None  # tokens per slot (prompt + completion); None = the model's context
    max_prefill_tokens: int = 4096  # padded prompt tokens prefilled in one forward (a longer prompt runs alone)
    event_timeout_s: float = 600.0  # a reader waiting this long for the next token gets TimeoutError

    def __post_init__(self) -> None:
        for name, lo in (("max_batch", 1), ("max_queue", 0), ("max_prefill_tokens", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise OptionError(name, f"must be an integer >= {lo}, got {v!r}")
        if self.max_seq_len is not None and (isinstance(self.max_seq_len, bool) or not isinstance(
                self.max_seq_len, int) or self.max_seq_len < 2):
            raise OptionError("max_seq_len", f"must be an integer >= 2 or None, got {self.max_seq_len!r}")
        if isinstance(self.event_timeout_s, bool) or not isinstance(self.event_timeout_s, (int, float)) or not (
                0 < self.event_timeout_s < math.inf):
            raise OptionError("event_timeout_s", f"must be a finite number of seconds > 0, got {self.event_timeout_s!r}")


@dataclass(frozen=True)
class RequestParams:
    """One request's sampling. temperature 0 = greedy; `eos_token_id` None = the model's eos, () = none."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    eos_token_id: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise BadRequest("max_tokens", f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        for name in ("temperature", "top_p", "seed"):
            try:
                object.__setattr__(self, name, check_option(name, getattr(self, name)))
            except OptionError as e:
                raise BadRequest(name, f"{name} {e.detail}") from None
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (tuple, list)) or not all(isinstance(s, str) and s for s in stop):
            raise BadRequest("stop", f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(stop))
        eos = self.eos_token_id
        if eos is not None:
            eos = (eos,) if isinstance(eos, int) and not isinstance(eos, bool) else eos
            if not isinstance(eos, (tuple, list)) or any(isinstance(t, bool) or not isinstance(t, int) for t in eos):
                raise BadRequest("eos_token_id", f"eos_token_id must be a token id or a list of them, got {eos!r}")
            object.__setattr__(self, "eos_token_id", tuple(eos))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Output:
    """One step of a request: its new token (None on a final output without one) and the text it adds.

    The last output has `finish_reason` (stop | length | cancelled | error)."""

    token: int | None
    text: str
    finish_reason: str | None = None


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Generation:
    """A submitted request: iterate it (sync or async) for its `Output`s; `cancel()` frees its slot."""

    def __init__(self, engine: "Engine", request_id: int, prompt: list[int], params: RequestParams):
        self.id, self.prompt, self.params = request_id, prompt, params
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self._last_at = 0.0
        self._engine = engine
        self._events: collections.deque[Output] = collections.deque()
        self._cond = threading.Condition()
        self._waker: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None
        self._cancelled = False
        self._done = False

    @property
    def usage(self) -> Usage:
        return Usage(len(self.prompt), len(self.tokens))

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        """Ask the engine to drop this request at the next token boundary (idempotent)."""
        if not self._done:
            self._cancelled = True
            self._engine._wake_up()

    # -- the engine thread's side --
    def _push(self, out: Output) -> None:
        with self._cond:
            self._events.append(out)
            if out.finish_reason is not None:
                self._done = True
            self._cond.notify_all()
            waker = self._waker
        if waker is not None:
            loop, event = waker
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:          # the reader's loop is closed: nobody is waiting any more
                pass

    # -- the reader's side --
    def __iter__(self) -> Iterator[Output]:
        timeout = self._engine.options.event_timeout_s
        while True:
            with self._cond:
                if not self._events and not self._cond.wait_for(lambda: bool(self._events), timeout=timeout):
                    self.cancel()
                    raise TimeoutError(f"request {self.id}: no token for {timeout:g}s (event_timeout_s)")
                out = self._events.popleft()
            yield from self._checked(out)
            if out.finish_reason is not None:
                return

    async def __aiter__(self) -> AsyncIterator[Output]:
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        with self._cond:
            self._waker = (loop, event)
        timeout = self._engine.options.event_timeout_s
        try:
            while True:
                event.clear()          # before looking, so a push after the look sets it again
                with self._cond:
                    out = self._events.popleft() if self._events else None
                if out is None:
                    try:
                        await asyncio.wait_for(event.wait(), timeout)
                    except asyncio.TimeoutError:
                        raise TimeoutError(f"request {self.id}: no token for {timeout:g}s (event_timeout_s)") from None
                    continue
                for o in self._checked(out):
                    yield o
                if out.finish_reason is not None:
                    return
        finally:
            # A reader that stops early (client gone, task cancelled) gives its slot back.
            if not self._done:
                self.cancel()

    def _checked(self, out: Output) -> Iterator[Output]:
        if out.finish_reason == "error" and self.error is not None:
            raise GenerationFailed(f"request {self.id} failed: {self.error}") from self.error
        yield out


@dataclass(eq=False)       # identity: the engine finds a sequence's row by `is`, not by value
class _Seq:
    """Engine-side state of one admitted request."""

    gen: Generation
    generator: torch.Generator | None
    eos: frozenset[int]
    pos: int = 0                  # cache slot (and RoPE position) of the next token fed in
    last: int = 0                 # the token fed in next
    shown: int = 0                # characters of the decoded completion already emitted
    text: str = ""


@dataclass
class _Counters:
    submitted: int = 0
    finished: dict[str, int] = field(default_factory=lambda: {r: 0 for r in FINISH_REASONS})
    rejected: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    decode_steps: int = 0
    decode_rows: int = 0
    prefills: int = 0
    busy_s: float = 0.0
    ttft_s: collections.deque = field(default_factory=lambda: collections.deque(maxlen=2048))
    itl_s: collections.deque = field(default_factory=lambda: collections.deque(maxlen=8192))
    request_s: collections.deque = field(default_factory=lambda: collections.deque(maxlen=256))


class Engine:
    """Continuous batching over a loaded `Coordinator` (see the module docstring)."""

    def __init__(self, coord: Any, options: EngineOptions = EngineOptions()):
        self.coord, self.model, self.config, self.options = coord, coord.model, coord.config, options
        limit = coord.config.max_positions
        self.max_seq_len = min(options.max_seq_len or limit, limit)
        self._caches = self.model.new_caches(options.max_batch, self.max_seq_len)
        self._active: list[_Seq] = []          # row i of the caches belongs to _active[i]
        self._queue: collections.deque[Generation] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._next_id = 0
        self._c = _Counters()
        self._started_at = time.perf_counter()
        eos = coord.config.eos_token_id
        self._model_eos = frozenset([eos] if isinstance(eos, int) else (eos or []))
        self._tokenizer = None
        self._thread = threading.Thread(target=self._loop, name="moeshard-engine", daemon=True)
        self._thread.start()

    # -- the public API --
    def tokenizer(self):
        """The checkpoint's tokenizer (raises FileNotFoundError where it has none)."""
        if self._tokenizer is None:
            self._tokenizer = self.coord.tokenizer
        return self._tokenizer

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """A prompt as token ids: text goes through the checkpoint's tokenizer; ids are checked."""
        if isinstance(prompt, str):
            if not prompt:
                raise BadRequest("prompt", "prompt is empty; give some text or token ids")
            try:
                tok = self.tokenizer()
            except FileNotFoundError as e:
                raise BadRequest("prompt", f"{e}") from None
            ids = tok.encode(prompt).ids
        else:
            ids = list(prompt)
        V = self.config.vocab_size
        if not ids:
            raise BadRequest("prompt", "the prompt encodes to no tokens; give some text or token ids")
        if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < V for t in ids):
            raise BadRequest("prompt", f"token ids must be integers in [0, {V})")
        return ids

    def check_fits(self, prompt_len: int, max_tokens: int) -> None:
        """Prompt plus completion must fit one KV slot (the model's context unless max_seq_len is smaller)."""
        limit = self.max_seq_len
        if prompt_len >= limit:
            raise BadRequest("prompt", f"the prompt has {prompt_len} tokens; this model's context is {limit} "
                                       f"tokens, which must also hold at least one new token: shorten it")
        if prompt_len + max_tokens > limit:
            raise BadRequest("max_tokens", f"max_tokens={max_tokens} with a {prompt_len}-token prompt exceeds the "
                                           f"context of {limit} tokens; ask for at most {limit - prompt_len}")

    def submit(self, prompt: str | Sequence[int], params: RequestParams = RequestParams()) -> Generation:
        """Queue a request; returns its `Generation` at once. BadRequest for a prompt that cannot run,
        QueueFull when `max_queue` requests already wait, EngineClosed after `close`."""
        ids = self.encode(prompt)
        self.check_fits(len(ids), params.max_tokens)
        if params.eos_token_id is not None:
            V = self.config.vocab_size
            if any(not 0 <= t < V for t in params.eos_token_id):
                raise BadRequest("eos_token_id", f"eos_token_id must be in [0, {V})")
        with self._cond:
            if self._closed:
                raise EngineClosed("the engine is closed; start a new one")
            if len(self._queue) >= self.options.max_queue:
                self._c.rejected += 1
                raise QueueFull(len(self._queue), self._retry_after())
            gen = Generation(self, self._next_id, ids, params)
            self._next_id += 1
            self._c.submitted += 1
            self._queue.append(gen)
            self._cond.notify_all()
        return gen

    @property
    def alive(self) -> bool:
        """True while the engine admits and runs requests."""
        return self._thread.is_alive() and not self._closed

    def stats(self) -> dict[str, Any]:
        """Running and queued requests, throughput, TTFT and inter-token latency percentiles, finish counts."""
        with self._cond:
            c = self._c
            wall = time.perf_counter() - self._started_at
            out = {
                "running": len(self._active), "queued": len(self._queue), "max_batch": self.options.max_batch,
                "max_queue": self.options.max_queue, "submitted": c.submitted, "rejected": c.rejected,
                "finished": dict(c.finished), "prompt_tokens": c.prompt_tokens,
                "generated_tokens": c.generated_tokens, "decode_steps": c.decode_steps, "prefills": c.prefills,
                "mean_batch": c.decode_rows / c.decode_steps if c.decode_steps else 0.0,
                "busy_s": c.busy_s, "uptime_s": wall,
                "tokens_per_second": c.generated_tokens / c.busy_s if c.busy_s else 0.0,
                "ttft_s": _quantiles(c.ttft_s), "itl_s": _quantiles(c.itl_s),
            }
        return out

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop admitting, cancel what is queued or running, and join the engine thread (bounded)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("engine thread still running after %.0fs (a step is stuck in the backend)", timeout_s)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the engine thread --
    def _wake_up(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _retry_after(self) -> int:
        """Seconds until a queued request is likely to have moved on: a typical request's duration."""
        recent = self._c.request_s
        return max(1, math.ceil(sum(recent) / len(recent))) if recent else 1

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or self._queue or self._active, timeout=1.0)
                if self._closed:
                    break
                if not self._queue and not self._active:
                    continue
            t0 = time.perf_counter()
            admit: list[Generation] = []
            try:
                with self.coord.exclusive("engine"):
                    admit = self._admit()          # at the token boundary: whatever queued meanwhile joins
                    self._drop_cancelled()
                    for group in self._prefill_groups(admit):
                        self._prefill(group)
                        admit = admit[len(group):]      # what an error below must still end
                    self._drop_cancelled()
                    if self._active:
                        self._decode()
            except BaseException as e:     # the backend gave up: end what runs, keep serving
                log.error("engine step failed: %s", e)
                for gen in admit:
                    self._finish_unadmitted(gen, "error", e)
                for seq in list(self._active):
                    self._end(seq, "error", e)
                self._active.clear()
                if not isinstance(e, Exception):
                    raise
            finally:
                with self._cond:
                    self._c.busy_s += time.perf_counter() - t0
        with self._cond:
            queued, self._queue = list(self._queue), collections.deque()
        for gen in queued:
            self._finish_unadmitted(gen, "cancelled")
        for seq in list(self._active):
            self._end(seq, "cancelled")
        self._active.clear()

    def _admit(self) -> list[Generation]:
        """Queued requests that fit the free rows, in order; cancelled ones leave the queue."""
        with self._cond:
            for gen in [g for g in self._queue if g.cancelled]:
                self._queue.remove(gen)
                self._finish_unadmitted(gen, "cancelled")
            admit = []
            while self._queue and len(self._active) + len(admit) < self.options.max_batch:
                admit.append(self._queue.popleft())
            return admit

    def _finish_unadmitted(self, gen: Generation, reason: str, error: BaseException | None = None) -> None:
        gen.error = error
        gen.finish_reason = reason
        with self._cond:
            self._c.finished[reason] += 1
        gen._push(Output(None, "", reason))

    def _prefill_groups(self, gens: list[Generation]) -> list[list[Generation]]:
        """Admitted prompts in groups of at most `max_prefill_tokens` padded tokens (at least one each)."""
        groups: list[list[Generation]] = []
        for gen in gens:
            g = groups[-1] if groups else None
            if g is not None and (len(g) + 1) * max(len(gen.prompt), *(len(x.prompt) for x in g)) <= \
                    self.options.max_prefill_tokens:
                g.append(gen)
            else:
                groups.append([gen])
        return groups

    def _prefill(self, gens: list[Generation]) -> None:
        """Prefill new prompts together into the next free rows: one forward, one dispatch per MoE layer.

        One prompt runs exactly as `generate` runs a one-row batch. Several are padded on the right
        to the longest; each row's padding writes cache slots after its prompt that its own decode
        steps overwrite before they are ever attended to (a step writes its slot, then attends up to it)."""
        row, k = len(self._active), len(gens)
        lens = [len(g.prompt) for g in gens]
        T = max(lens)
        ids = torch.zeros(k, T, dtype=torch.long)
        for i, g in enumerate(gens):
            ids[i, :lens[i]] = torch.tensor(g.prompt, dtype=torch.long)
        positions = torch.arange(T).expand(k, T)
        caches = [c.rows(row, row + k) for c in self._caches]
        logits = self.model(ids, positions, torch.arange(T) if k == 1 else positions,
                            torch.ones(k, T, dtype=torch.bool), caches)
        seqs = []
        for g, n in zip(gens, lens):
            p = g.params
            seq = _Seq(g, torch.Generator().manual_seed(p.seed) if p.seed is not None and not p.greedy else None,
                       self._model_eos if p.eos_token_id is None else frozenset(p.eos_token_id), pos=n)
            self._active.append(seq)            # all rows taken before any can finish and move rows
            seqs.append(seq)
        with self._cond:
            self._c.prompt_tokens += sum(lens)
            self._c.prefills += 1
        for i, seq in enumerate(seqs):
            self._emit(seq, logits[i:i + 1, lens[i] - 1])

    def _decode(self) -> None:
        """One token for every active sequence: one forward over [n, 1], one dispatch per MoE layer."""
        n = len(self._active)
        ids = torch.tensor([[s.last] for s in self._active], dtype=torch.long)
        pos = torch.tensor([[s.pos] for s in self._active], dtype=torch.long)
        key_valid = torch.ones(n, int(pos.max()) + 1, dtype=torch.bool)
        logits = self.model(ids, pos, pos, key_valid, self._caches)             # [n, 1, V]
        with self._cond:
            self._c.decode_steps += 1
            self._c.decode_rows += n
        for seq in self._active:
            seq.pos += 1
        for i, seq in enumerate(list(self._active)):
            self._emit(seq, logits[i:i + 1, -1])

    def _emit(self, seq: _Seq, logits: torch.Tensor) -> None:
        """Pick the sequence's next token, hand it to its reader, end the sequence if it is done."""
        p, gen = seq.gen.params, seq.gen
        tok = int(select_next(logits, not p.greedy, p.temperature, p.top_p, seq.generator)[0])
        now = time.perf_counter()
        with self._cond:
            self._c.generated_tokens += 1
            if gen.first_token_at is None:
                self._c.ttft_s.append(now - gen.submitted_at)
            else:
                self._c.itl_s.append(now - gen._last_at)
        if gen.first_token_at is None:
            gen.first_token_at = now
        gen._last_at = now
        gen.tokens.append(tok)
        seq.last = tok
        if tok in seq.eos:
            return self._end(seq, "stop", token=tok, text=self._text(seq, final=True)[0])
        text, stopped = self._text(seq, final=len(gen.tokens) >= p.max_tokens)
        if stopped:
            return self._end(seq, "stop", token=tok, text=text)
        if len(gen.tokens) >= p.max_tokens:
            return self._end(seq, "length", token=tok, text=text)
        gen._push(Output(tok, text))

    def _text(self, seq: _Seq, final: bool) -> tuple[str, bool]:
        """The completion text not yet emitted, and whether a stop string ended it. Text that could be
        the start of a stop string (or half a character) is held back until it is known."""
        try:
            tok = self.tokenizer()
        except FileNotFoundError:
            return "", False
        text = tok.decode([t for t in seq.gen.tokens if t not in seq.eos])
        stops = seq.gen.params.stop
        if stops:
            hits = [i for i in (text.find(s) for s in stops) if i >= 0]
            if hits:
                cut = min(hits)
                out = text[seq.shown:cut] if cut > seq.shown else ""
                seq.shown = max(seq.shown, cut)
                return out, True
        safe = len(text)
        if not final:
            if stops:
                safe -= max(len(s) for s in stops) - 1
            while safe > seq.shown and text[safe - 1] == "\ufffd":
                safe -= 1
        out = text[seq.shown:safe] if safe > seq.shown else ""
        seq.shown = max(seq.shown, safe)
        return out, False

    def _end(self, seq: _Seq, reason: str, error: BaseException | None = None, token: int | None = None,
             text: str = "") -> None:
        """Finish a sequence: its last output, and its row given to the last active sequence."""
        gen = seq.gen
        gen.error, gen.finish_reason = error, reason
        if seq in self._active:
            row = self._active.index(seq)
            last = len(self._active) - 1
            if row != last:
                for c in self._caches:
                    c.move_row(last, row)
                self._active[row] = self._active[last]
            self._active.pop()
        with self._cond:
            self._c.finished[reason] += 1
            self._c.request_s.append(time.perf_counter() - gen.submitted_at)
        gen._push(Output(token, text, reason))

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self._active if s.gen.cancelled]:
            self._end(seq, "cancelled")


def _quantiles(values: Sequence[float]) -> dict[str, float]:
    """p50/p99/mean/count of recent samples (seconds)."""
    if not values:
        return {"count": 0, "p50": 0.0, "p99": 0.0, "mean": 0.0}
    s = sorted(values)

    def q(f: float) -> float:
        return s[min(len(s) - 1, max(0, math.ceil(f * len(s)) - 1))]
    return {"count": len(s), "p50": q(0.5), "p99": q(0.99), "mean": sum(s) / len(s)}
