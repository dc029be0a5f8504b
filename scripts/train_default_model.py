#!/usr/bin/env python
"""Train moeshard's embedded default model: a small Mixtral-format MoE ("pydoc-moe").

The model is trained with transformers' ``MixtralForCausalLM`` (scripts may use
transformers; moeshard's runtime may not) on the text of Python's own documentation:
``pydoc_data.topics`` (the language reference topics behind ``help()``) plus the
docstrings of the standard library (read with ``ast``, nothing is imported).

Everything is seeded and runs on one CPU thread, so a run with the same ``--steps``
on the same Python / torch / tokenizers versions reproduces the same weights.
``--minutes`` picks ``--steps`` from a short timing calibration when ``--steps`` is
not given; the model card records the exact ``--steps`` that was used.

Output (a standard Hugging Face checkpoint, bf16):
    config.json, model.safetensors, generation_config.json, tokenizer.json,
    tokenizer_config.json, special_tokens_map.json, loss.png, README.md, SHA256SUMS

Usage:
    python scripts/train_default_model.py --minutes 30 --out models/pydoc-moe
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import os
import platform
import random
import shlex
import struct
import sys
import sysconfig
import time
import zlib
from pathlib import Path

import numpy as np
import torch

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 (Mixtral's unk/bos/eos ids)
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2

# Stdlib directories whose docstrings we skip: tests, vendored/third-party code, tools.
SKIP_DIRS = {
    "site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3",
    "ensurepip", "__pycache__", "turtledemo", "venv", "pydoc_data",
}

SAMPLE_PROMPTS = [
    "The for statement",
    "The while statement is used",
    "A function definition",
    "Return a list of",
]


# --------------------------------------------------------------------------- data


def pydoc_topic_docs() -> list[tuple[str, str]]:
    from pydoc_data import topics

    return [(f"topic:{k}", topics.topics[k].strip()) for k in sorted(topics.topics)]


def _docstrings_in_order(node: ast.AST, prefix: str, out: list[str]) -> None:
    """Docstrings of a module and its classes/functions, in source order."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            name = f"{prefix}.{child.name}" if prefix else child.name
            doc = ast.get_docstring(child, clean=True)
            if doc and len(doc) >= 40:
                kind = "class" if isinstance(child, ast.ClassDef) else "def"
                out.append(f"{kind} {name}:\n{doc.strip()}")
            _docstrings_in_order(child, name, out)


def stdlib_docstring_docs() -> list[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: list[tuple[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if d not in SKIP_DIRS and not d.startswith("config-")
        )
        for fn in sorted(filenames):
            if not fn.endswith(".py"):
                continue
            path = Path(dirpath) / fn
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            rel = path.relative_to(root).as_posix()
            module = rel[:-3].replace("/", ".").removesuffix(".__init__")
            parts: list[str] = []
            mdoc = ast.get_docstring(tree, clean=True)
            if mdoc:
                parts.append(f"module {module}:\n{mdoc.strip()}")
            _docstrings_in_order(tree, module, parts)
            if parts:
                docs.append((f"stdlib:{rel}", "\n\n".join(parts)))
    return docs


def build_corpus(use_docstrings: bool) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Deterministic train / held-out split by document."""
    topics = pydoc_topic_docs()
    train = [d for i, d in enumerate(topics) if i % 10 != 9]
    held = [d for i, d in enumerate(topics) if i % 10 == 9]
    if use_docstrings:
        ds = stdlib_docstring_docs()
        train += [d for i, d in enumerate(ds) if i % 20 != 19]
        held += [d for i, d in enumerate(ds) if i % 20 == 19]
    return train, held


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A",
        pair="<s> $A <s> $B",
        special_tokens=[("<s>", BOS_ID)],
    )
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [UNK_ID, BOS_ID, EOS_ID]
    return tok


def encode_docs(tok, docs: list[tuple[str, str]]) -> np.ndarray:
    """<s> doc </s> <s> doc </s> ... as one packed stream."""
    encs = tok.encode_batch([text for _, text in docs])  # post-processor adds <s>
    ids: list[int] = []
    for e in encs:
        ids.extend(e.ids)
        ids.append(EOS_ID)
    return np.asarray(ids, dtype=np.int64)


# --------------------------------------------------------------------------- model


def make_config(args, vocab_size: int):
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        num_local_experts=args.experts,
        num_experts_per_tok=args.top_k,
        max_position_embeddings=args.max_positions,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        router_aux_loss_coef=args.aux_coef,
        output_router_logits=False,  # saved default; passed explicitly while training
        router_jitter_noise=0.0,
        tie_word_embeddings=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,
        sliding_window=None,
        use_cache=True,
    )


def lr_at(step: int, total: int, peak: float, warmup: int, floor_frac: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor_frac + (1 - floor_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def sample_batch(stream: np.ndarray, batch: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(stream) - seq, (batch,), generator=gen).tolist()
    return torch.from_numpy(np.stack([stream[s : s + seq] for s in starts]))


def eval_windows(stream: np.ndarray, seq: int, max_windows: int) -> torch.Tensor:
    n = min(max_windows, len(stream) // seq)
    return torch.from_numpy(stream[: n * seq].reshape(n, seq).copy())


@torch.no_grad()
def eval_loss(model, windows: torch.Tensor, chunk: int = 16, usage: bool = False):
    """Mean next-token cross-entropy; with usage=True also the per-layer max expert share."""
    model.eval()
    total, count = 0.0, 0
    E, k = model.config.num_local_experts, model.config.num_experts_per_tok
    counts = torch.zeros(model.config.num_hidden_layers, E)
    for i in range(0, len(windows), chunk):
        x = windows[i : i + chunk]
        out = model(input_ids=x, output_router_logits=usage)
        logits = out.logits[:, :-1].float()
        total += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
        ).item()
        count += x.numel() - x.shape[0]
        if usage:
            for layer, lg in enumerate(out.router_logits):
                sel = torch.topk(lg.float(), k, dim=-1).indices
                counts[layer] += torch.bincount(sel.reshape(-1), minlength=E).float()
    model.train()
    if usage:
        return total / count, (counts / counts.sum(1, keepdim=True)).max(1).values.tolist()
    return total / count


@torch.no_grad()
def expert_usage(model, windows: torch.Tensor, top_k: int, n_experts: int, chunk: int = 16):
    """Per layer: fraction of top-k assignments that go to each expert, and a [E, V] count
    of which token ids each expert receives (for the specialisation summary)."""
    model.eval()
    n_layers = model.config.num_hidden_layers
    counts = torch.zeros(n_layers, n_experts, dtype=torch.float64)
    vocab = model.config.vocab_size
    tok_counts = torch.zeros(n_layers, n_experts, vocab, dtype=torch.float64)
    for i in range(0, len(windows), chunk):
        x = windows[i : i + chunk]
        out = model(input_ids=x, output_router_logits=True)
        flat_ids = x.reshape(-1)
        for layer, logits in enumerate(out.router_logits):
            sel = torch.topk(logits.float(), top_k, dim=-1).indices  # [T, k]
            counts[layer] += torch.bincount(sel.reshape(-1), minlength=n_experts).double()
            for slot in range(top_k):
                tok_counts[layer].index_put_(
                    (sel[:, slot], flat_ids), torch.ones(len(flat_ids), dtype=torch.float64), accumulate=True
                )
    model.train()
    fracs = counts / counts.sum(dim=1, keepdim=True)
    return fracs, tok_counts


def specialisation(tok, tok_counts: torch.Tensor, layer: int, top_n: int = 8) -> list[str]:
    """For each expert: the tokens most over-represented in its traffic (lift vs. overall,
    tokens seen at least 20 times)."""
    c = tok_counts[layer]  # [E, V]
    total_tok = c.sum(0)  # each token counted top_k times
    share = c / total_tok.clamp(min=1)  # P(expert | token) * top_k
    base = c.sum(1) / c.sum()  # expert's overall share
    lines = []
    for e in range(c.shape[0]):
        lift = share[e] / base[e]
        lift = torch.where(total_tok >= 20, lift, torch.zeros_like(lift))
        shown = []
        for t in torch.argsort(lift, descending=True, stable=True).tolist():
            text = tok.decode([t])
            if text and "\ufffd" not in text:  # skip partial UTF-8 byte tokens
                shown.append(_code_span(repr(text)[1:-1]))
            if len(shown) == top_n:
                break
        lines.append(f"expert {e}: " + ", ".join(shown))
    return lines


def _code_span(text: str) -> str:
    """Markdown inline code that survives backticks and edge spaces."""
    if "`" in text:
        return f"`` {text} ``"
    return f"`{text}`"


@torch.no_grad()
def greedy(model, tok, prompt: str, new_tokens: int) -> str:
    model.eval()
    ids = torch.tensor([tok.encode(prompt).ids])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
        pad_token_id=EOS_ID, eos_token_id=EOS_ID,
    )
    model.train()
    return tok.decode(out[0].tolist(), skip_special_tokens=True)


# --------------------------------------------------------------------------- outputs


def plot_loss(path: Path, train_log: list[tuple[int, float]], val_log: list[tuple[int, float]]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _plot_loss_raw_png(path, train_log, val_log)
        return
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    steps = [s for s, _ in train_log]
    losses = [l for _, l in train_log]
    ax.plot(steps, losses, lw=0.6, alpha=0.35, color="tab:blue", label="train (per step)")
    if len(losses) >= 25:
        k = 25
        sm = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1 :], sm, lw=1.5, color="tab:blue", label=f"train ({k}-step mean)")
    if val_log:
        ax.plot([s for s, _ in val_log], [l for _, l in val_log], "o-", ms=3, color="tab:red", label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("pydoc-moe training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def _plot_loss_raw_png(path: Path, train_log, val_log, w: int = 640, h: int = 360) -> None:
    """Fallback without matplotlib: a bare line plot written as an RGB PNG by hand."""
    img = bytearray(b"\xff" * (w * h * 3))
    pts = train_log + val_log
    if not pts:
        return
    smax = max(s for s, _ in pts) or 1
    lo, hi = min(l for _, l in pts), max(l for _, l in pts)
    hi = hi if hi > lo else lo + 1

    def put(x, y, rgb):
        if 0 <= x < w and 0 <= y < h:
            o = (y * w + x) * 3
            img[o : o + 3] = bytes(rgb)

    def xy(s, l):
        return int(20 + (w - 40) * s / smax), int(h - 20 - (h - 40) * (l - lo) / (hi - lo))

    for log, rgb in ((train_log, (40, 90, 200)), (val_log, (220, 40, 40))):
        prev = None
        for s, l in log:
            cur = xy(s, l)
            if prev is not None:
                n = max(abs(cur[0] - prev[0]), abs(cur[1] - prev[1]), 1)
                for t in range(n + 1):
                    put(prev[0] + (cur[0] - prev[0]) * t // n, prev[1] + (cur[1] - prev[1]) * t // n, rgb)
            prev = cur
    raw = b"".join(b"\x00" + bytes(img[y * w * 3 : (y + 1) * w * 3]) for y in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    path.write_bytes(png)


def write_sha256sums(out: Path) -> None:
    lines = []
    for p in sorted(out.iterdir()):
        if p.is_file() and p.name != "SHA256SUMS":
            lines.append(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n")
    (out / "SHA256SUMS").write_text("".join(lines))


def dir_size(out: Path) -> int:
    return sum(p.stat().st_size for p in out.iterdir() if p.is_file())


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="models/pydoc-moe", help="output checkpoint directory")
    ap.add_argument("--minutes", type=float, default=30.0,
                    help="training time budget; used to choose --steps when it is not given")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides --minutes)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--warmup-frac", type=float, default=0.04)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--aux-coef", type=float, default=0.02)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--max-positions", type=int, default=1024)
    ap.add_argument("--no-docstrings", action="store_true", help="train on pydoc_data.topics only")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--log-every", type=int, default=10)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.time()
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)

    import tokenizers
    import transformers
    from transformers import GenerationConfig, MixtralForCausalLM, PreTrainedTokenizerFast

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for p in out.iterdir():  # a stale file would otherwise end up in SHA256SUMS
        if p.is_file():
            p.unlink()

    def log(msg: str) -> None:
        print(f"[{time.time() - t_start:7.1f}s] {msg}", flush=True)

    # ---- data + tokenizer
    train_docs, held_docs = build_corpus(not args.no_docstrings)
    n_chars = sum(len(t) for _, t in train_docs)
    log(f"corpus: {len(train_docs)} train docs ({n_chars:,} chars), {len(held_docs)} held-out docs")
    tok = train_tokenizer([t for _, t in train_docs], args.vocab)
    vocab_size = tok.get_vocab_size()
    train_stream = encode_docs(tok, train_docs)
    held_stream = encode_docs(tok, held_docs)
    log(f"tokenizer: vocab {vocab_size}; train {len(train_stream):,} tokens, held-out {len(held_stream):,} tokens")

    # ---- model
    config = make_config(args, vocab_size)
    model = MixtralForCausalLM(config)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    active = n_params - expert_params + expert_params * args.top_k // args.experts
    log(f"model: {n_params:,} params ({expert_params:,} in experts, ~{active:,} active per token)")

    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in n else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    gen = torch.Generator().manual_seed(args.seed)
    held_windows = eval_windows(held_stream, args.seq, args.eval_windows)

    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    def train_step(x: torch.Tensor, lr: float) -> tuple[float, float]:
        for g in opt.param_groups:
            g["lr"] = lr
        out_ = model(input_ids=x, output_router_logits=True)
        logits = out_.logits[:, :-1].float()
        lm = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        # Switch-style load balancing, applied per layer and averaged. (transformers' own
        # aux loss pools the counts of all layers, which does not stop a single layer from
        # collapsing onto a few experts as long as other layers use the rest.)
        aux = torch.stack([
            load_balancing_loss_func((lg,), args.experts, args.top_k) for lg in out_.router_logits
        ]).mean()
        loss = lm + args.aux_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return lm.item(), aux.item()

    # ---- choose the number of steps
    steps = args.steps
    calibrated = None
    if steps is None:
        # Time a few steps on a throwaway copy of the model/optimizer state so the real
        # run (and its RNG stream) is identical to one started with an explicit --steps.
        import copy

        m_state = copy.deepcopy(model.state_dict())
        o_state = copy.deepcopy(opt.state_dict())
        cal_gen = torch.Generator().manual_seed(args.seed + 1)
        train_step(sample_batch(train_stream, args.batch, args.seq, cal_gen), 1e-6)  # warm-up
        n_cal, t0 = 8, time.time()
        for _ in range(n_cal):
            train_step(sample_batch(train_stream, args.batch, args.seq, cal_gen), 1e-6)
        per_step = (time.time() - t0) / n_cal
        model.load_state_dict(m_state)
        opt.load_state_dict(o_state)
        torch.manual_seed(args.seed)
        eval_cost = per_step * 0.35 * (args.eval_windows / args.batch)  # forward-only estimate
        budget = args.minutes * 60 - (time.time() - t_start)
        steps = int(budget / (per_step + eval_cost / args.eval_every))
        steps = max(10, steps)
        calibrated = per_step
        log(f"calibration: {per_step:.3f} s/step -> --steps {steps} for a {args.minutes:g} min budget")

    warmup = max(1, int(args.warmup_frac * steps))
    train_log: list[tuple[int, float]] = []
    aux_log: list[tuple[int, float]] = []
    val_log: list[tuple[int, float]] = []
    t_train = time.time()
    ema = None
    for step in range(steps):
        lr = lr_at(step, steps, args.lr, warmup, args.min_lr_frac)
        x = sample_batch(train_stream, args.batch, args.seq, gen)
        lm_loss, aux = train_step(x, lr)
        if not math.isfinite(lm_loss):
            raise RuntimeError(f"non-finite loss at step {step}")
        train_log.append((step + 1, lm_loss))
        aux_log.append((step + 1, aux))
        ema = lm_loss if ema is None else 0.95 * ema + 0.05 * lm_loss
        if (step + 1) % args.log_every == 0 or step == 0:
            el = time.time() - t_train
            log(f"step {step + 1}/{steps} lm_loss {lm_loss:.4f} (ema {ema:.4f}) aux {aux:.4f} lr {lr:.2e} "
                f"{el / (step + 1):.3f}s/step")
        if (step + 1) % args.eval_every == 0 or step + 1 == steps:
            v, max_share = eval_loss(model, held_windows, usage=True)
            val_log.append((step + 1, v))
            log(f"step {step + 1}: held-out loss {v:.4f}; max expert share per layer "
                + " ".join(f"{m:.2f}" for m in max_share))
    train_seconds = time.time() - t_train
    final_train = float(np.mean([l for _, l in train_log[-50:]]))
    final_val = val_log[-1][1]
    log(f"trained {steps} steps in {train_seconds / 60:.1f} min; final train (last-50 mean) {final_train:.4f}, "
        f"held-out {final_val:.4f}")

    # ---- save in bf16 (evaluate the bf16 weights: that is what ships)
    model = model.to(torch.bfloat16)
    model.config.output_router_logits = False
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID,
        do_sample=False, max_new_tokens=64,
    ).save_pretrained(out)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>",
        model_max_length=args.max_positions, clean_up_tokenization_spaces=False,
    )
    hf_tok.save_pretrained(out)
    # transformers 5 records its own class name ("TokenizersBackend"); name the class that
    # every transformers version (4.x included) knows, and write the special-tokens map
    # that older versions read.
    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    tc_path.write_text(json.dumps(tc, indent=2, sort_keys=True) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>"},
        indent=2, sort_keys=True) + "\n")
    plot_loss(out / "loss.png", train_log, val_log)

    # ---- reload from disk and evaluate what ships
    model = MixtralForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    bf16_val = eval_loss(model, held_windows)
    eval_all = eval_windows(held_stream, args.seq, 10**9)
    fracs, tok_counts = expert_usage(model, eval_all, args.top_k, args.experts)
    samples = {p: greedy(model, tok, p, 48) for p in SAMPLE_PROMPTS}
    log(f"bf16 held-out loss {bf16_val:.4f}")
    for layer in range(fracs.shape[0]):
        log(f"layer {layer} expert usage: " + " ".join(f"{f:.3f}" for f in fracs[layer].tolist()))
    for p, s in samples.items():
        log(f"sample {p!r}: {s!r}")

    # ---- model card
    cmd = ["python", "scripts/train_default_model.py", "--out", str(args.out), "--steps", str(steps)]
    defaults = vars(parse_args([]))
    for k, v in vars(args).items():
        if k in ("out", "steps", "minutes"):
            continue
        if v != defaults[k]:
            flag = "--" + k.replace("_", "-")
            cmd += [flag] if isinstance(v, bool) else [flag, str(v)]
    card = make_card(
        args=args, steps=steps, calibrated=calibrated, cmd=" ".join(shlex.quote(c) for c in cmd),
        n_params=n_params, expert_params=expert_params, active=active, vocab_size=vocab_size,
        train_docs=train_docs, held_docs=held_docs, n_chars=n_chars,
        train_tokens=len(train_stream), held_tokens=len(held_stream), eval_tokens=eval_all.numel(),
        train_seconds=train_seconds, final_train=final_train, final_val=final_val, bf16_val=bf16_val,
        val_log=val_log, train_log=train_log, aux_log=aux_log, fracs=fracs,
        spec=[(layer, specialisation(tok, tok_counts, layer)) for layer in (0, fracs.shape[0] - 1)],
        samples=samples, versions={
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
        },
    )
    (out / "README.md").write_text(card)
    write_sha256sums(out)
    size = dir_size(out)
    log(f"saved {out} ({size / 1e6:.1f} MB): " + ", ".join(sorted(p.name for p in out.iterdir())))
    return 0


def make_card(**k) -> str:
    a = k["args"]
    fr = k["fracs"]
    n_layers, n_exp = fr.shape
    usage_rows = "\n".join(
        f"| {layer} | " + " | ".join(f"{100 * f:.1f}" for f in fr[layer].tolist())
        + f" | {100 * fr[layer].max():.1f} | {100 * fr[layer].min():.1f} |"
        for layer in range(n_layers)
    )
    usage_head = "| layer | " + " | ".join(f"e{e}" for e in range(n_exp)) + " | max | min |\n"
    usage_head += "|---" * (n_exp + 3) + "|\n"
    val_pts = k["val_log"]
    pick = sorted({0, len(val_pts) // 4, len(val_pts) // 2, 3 * len(val_pts) // 4, len(val_pts) - 1})
    tl = k["train_log"]
    al = k["aux_log"]

    def mean_around(log, step, w=25):
        vals = [l for s, l in log if step - w < s <= step]
        return sum(vals) / len(vals)

    curve_rows = "\n".join(
        f"| {val_pts[i][0]} | {mean_around(tl, val_pts[i][0]):.3f} | {val_pts[i][1]:.3f} | "
        f"{mean_around(al, val_pts[i][0]):.3f} |"
        for i in pick
    )
    first_loss = tl[0][1]
    spec = "\n\n".join(
        f"Layer {layer} (tokens most over-represented in each expert's traffic on held-out text):\n\n"
        + "\n".join(f"- {line}" for line in lines)
        for layer, lines in k["spec"]
    )
    samples = "\n\n".join(
        f"Prompt `{p}`:\n\n```text\n{s.rstrip()}\n```" for p, s in k["samples"].items()
    )
    v = k["versions"]
    if fr.max() < 0.5 and fr.min() > 0.01:
        verdict = (
            "Routing is learned and not collapsed: every expert gets a substantial share of "
            f"traffic in every layer (max {100 * fr.max():.1f}%, min {100 * fr.min():.1f}%), and the "
            "experts specialise."
        )
    else:
        verdict = (
            f"Routing is unbalanced in places (max {100 * fr.max():.1f}%, min {100 * fr.min():.1f}%)."
        )
    size_note = (
        f"{k['n_params']:,} parameters ({k['expert_params']:,} in routed experts; about "
        f"{k['active']:,} active per token)"
    )
    cal = (
        f"\nThe step count was chosen by `--minutes {a.minutes:g}` from a timing calibration "
        f"({k['calibrated']:.3f} s/step); the command above pins it with `--steps`."
        if k["calibrated"] is not None else ""
    )
    return f"""# pydoc-moe: moeshard's embedded default model

A deliberately tiny Mixture-of-Experts language model in the standard Hugging Face
**Mixtral** format (`MixtralForCausalLM`, per-expert `w1`/`w2`/`w3` tensors), shipped in
the repository so moeshard can be run, tested and benchmarked without downloading
anything. It is a real trained model with learned, non-collapsed routing, not random
weights, but it is a toy: it knows the *style* of Python's documentation, not Python.

## Architecture

| | |
|---|---|
| layers | {a.layers} |
| hidden size | {a.hidden} |
| attention | {a.heads} heads, {a.kv_heads} KV heads (GQA), head dim {a.hidden // a.heads}, RoPE theta 10000 |
| experts | {a.experts} routed SwiGLU experts per layer, top-{a.top_k}, intermediate size {a.intermediate} |
| vocab | {k['vocab_size']} (byte-level BPE), untied input/output embeddings |
| max positions | {a.max_positions} (trained on {a.seq}-token windows) |
| size | {size_note} |
| dtype | bfloat16 (`model.safetensors`) |

## Data

- `pydoc_data.topics` from Python {v['python']}: the {len([d for d in k['train_docs'] + k['held_docs'] if d[0].startswith('topic:')])}
  language-reference topics behind `help()` (statements, operators, data model, ...).
- {"Docstrings of the Python " + v['python'] + " standard library, extracted with `ast` (no imports): module, class and function docstrings of at least 40 characters, in source order, one document per source file; `test`, `idlelib`, `lib2to3`, `ensurepip`, `turtledemo`, `venv`, `site-packages` excluded." if not a.no_docstrings else "(stdlib docstrings not used: `--no-docstrings`)"}
- Held-out split by document: every 10th topic and every 20th stdlib file (in sorted order).
  Train: {len(k['train_docs'])} documents, {k['n_chars']:,} characters, {k['train_tokens']:,} tokens.
  Held-out: {len(k['held_docs'])} documents, {k['held_tokens']:,} tokens.
- Documents are packed as `<s> text </s>`; training samples are random {a.seq}-token windows.

Tokenizer: `tokenizers` byte-level BPE (no prefix space, GPT-2 style regex), vocabulary
{k['vocab_size']} trained on the training documents only, special tokens `<unk>`=0, `<s>`=1,
`</s>`=2. The tokenizer's post-processor prepends `<s>`, as in training. Decoding is
lossless: any string round-trips.

## Training

Trained with transformers' `MixtralForCausalLM` on one CPU thread: AdamW (betas 0.9/0.95,
weight decay {a.weight_decay} on matrices), peak LR {a.lr:g}, linear warm-up over {a.warmup_frac:.0%} of steps,
cosine decay to {a.min_lr_frac:g}x peak, gradient clipping 1.0, batch {a.batch} x {a.seq} tokens,
{k['steps']} steps ({k['steps'] * a.batch * a.seq:,} tokens, about
{k['steps'] * a.batch * a.seq / k['train_tokens']:.1f} passes over the training stream),
Switch-style router load-balancing loss from the router logits
(`output_router_logits=True`, coefficient {a.aux_coef}, the config's `router_aux_loss_coef`),
computed per layer and averaged over layers (transformers' built-in aux loss pools all
layers' counts, which lets individual layers collapse), seed {a.seed}, `torch.use_deterministic_algorithms(True)`.
Training took {k['train_seconds'] / 60:.1f} minutes of wall-clock time (one thread, on a
shared, busy machine, so expect it to be faster elsewhere).

Reproduce (Python {v['python']}, torch {v['torch']}, transformers {v['transformers']},
tokenizers {v['tokenizers']}; other versions give a different corpus or numerics):

```bash
{k['cmd']}
```
{cal}

### Loss

![loss curve](loss.png)

Language-model cross-entropy in nats/token (the router auxiliary loss is reported
separately: it is the per-layer Switch loss averaged over layers, which equals
top-k = {a.top_k} when routing is perfectly uniform). Step 1 training loss: {first_loss:.3f}
(ln {k['vocab_size']} = {math.log(k['vocab_size']):.3f}).

| step | train (25-step mean) | held-out | router aux |
|---|---|---|---|
{curve_rows}

Final: train {k['final_train']:.3f} (mean of the last 50 steps), held-out {k['final_val']:.3f}
(fp32 weights) / **{k['bf16_val']:.3f}** (the shipped bf16 weights), i.e. held-out perplexity
{math.exp(k['bf16_val']):.1f}.

## Expert usage

Share of top-{a.top_k} routing assignments per expert (%) on all {k['eval_tokens']:,}
held-out tokens with the bf16 weights (uniform = {100 / n_exp:.1f}%):

{usage_head}{usage_rows}

{verdict}

{spec}

## Samples

Greedy decoding (`do_sample=False`), 48 new tokens, bf16 weights:

{samples}

## What it can and cannot do

Can:
- Load with stock `transformers` (`MixtralForCausalLM.from_pretrained`,
  `PreTrainedTokenizerFast.from_pretrained`), and serve as moeshard's default
  model (it is an ordinary Mixtral checkpoint); small enough
  (about {a.layers * a.experts} experts of {3 * a.hidden * a.intermediate * 2 / 1e6:.2f} MB each) to exercise expert
  sharding, paging and prefetch in tests and benchmarks in seconds on a CPU.
- Produce text in the register of the Python reference manual and docstrings:
  plausible vocabulary, formatting and phrase structure, with routing that
  actually depends on the input, so distributed/paged runs can be checked for
  parity against transformers on real (non-uniform) routing.

Cannot:
- Answer questions, follow instructions, write working code or state facts
  reliably: it is a ~{k['n_params'] / 1e6:.0f}M-parameter model trained for {k['train_seconds'] / 60:.0f} CPU-thread minutes on about
  {k['train_tokens'] / 1e6:.1f}M tokens. Continuations drift and repeat after a sentence or two.
- Handle long contexts: trained on {a.seq}-token windows only, although the
  config allows {a.max_positions} positions.
- Be used for anything but testing and demonstrating moeshard.

License: the training text is Python's documentation (PSF License); the weights are
released with moeshard under the same terms as the repository.

## Files

`config.json`, `model.safetensors` (bf16), `generation_config.json`, `tokenizer.json`,
`tokenizer_config.json`, `special_tokens_map.json`, `loss.png`, this `README.md`, and `SHA256SUMS` (sha256 of every other
file; check with `cd {a.out} && sha256sum -c SHA256SUMS`).
"""


if __name__ == "__main__":
    sys.exit(main())
