"""Pieces of a generation run shared by `moeshard generate` (cluster/cli.py) and the Ray job entry
point (cluster/job.py): flags built from the option table (coordinator/options.py), prompts (text,
a file, or `--ids`, each repeatable into one left-padded batch), output checks, the stats tables.

Imports torch lazily so that building the argument parsers (and `--help`) stays fast.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from coordinator.options import BY_NAME, OPTIONS, RunOptions, SamplingOptions, default_of

#: flags of every command that loads a model and generates (generate, job), in --help order
RUN_OPTIONS = ("num_workers", "worker_memory", "dtype", "num_cpus_per_worker", "num_gpus_per_worker",
               "ray_address", "call_timeout_s", "ready_timeout_s", "transport", "coordinator_threads", "policy",
               "prefetch_depth", "prefetch_extra", "pin_layers", "spill_dir", "expert_dtype", "group_size",
               "routing", "routing_policy", "routing_strength", "routing_max_rank", "max_new_experts_per_token")
SAMPLING_OPTIONS = tuple(o.name for o in OPTIONS if o.group == "generate")


class OneLineParser(argparse.ArgumentParser):
    """argparse, with its usage errors on one line (the usage itself is in --help); exit status 2."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (--help for usage)\n")


def _ints(v: str) -> list[int]:
    try:
        return [int(x) for x in v.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 0,1, got {v!r}") from None


_ARG_TYPES = {"int": dict(type=int, metavar="N"), "float": dict(type=float, metavar="X"),
              "size": dict(type=str, metavar="SIZE"), "str": dict(type=str, metavar="TEXT"),
              "ints": dict(type=_ints, metavar="I,J")}


def add_option_arguments(p: argparse.ArgumentParser, names: Iterable[str], *,
                         defaults: dict[str, str] | None = None) -> None:
    """One flag per option of the table, dest = the option's Python name, default None (= not given).

    `defaults` overrides what --help says the default is (e.g. the job's one actor per node)."""
    for name in names:
        opt = BY_NAME[name]
        kind = opt.check.kind  # type: ignore[attr-defined]
        default = (defaults or {}).get(name)
        if default is None:
            d = default_of(name)
            default = "none" if d is None else str(d)
        text = f"{opt.help or opt.allowed} (default: {default})"
        if kind == "flag":
            p.add_argument(opt.flag, dest=name, action="store_true", default=None, help=opt.help or opt.allowed)
        elif kind == "choice":
            choices = opt.check.choices  # type: ignore[attr-defined]
            p.add_argument(opt.flag, dest=name, choices=choices, default=None, help=text,
                           type=type(choices[0]))  # int choices (--group-size) read as ints
        else:
            p.add_argument(opt.flag, dest=name, default=None, help=text, **_ARG_TYPES[kind])


def given(args: argparse.Namespace, names: Iterable[str]) -> dict[str, Any]:
    """{option name: value} of the flags among `names` that were given."""
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def run_options(args: argparse.Namespace, names: Iterable[str] = RUN_OPTIONS, **fixed: Any) -> RunOptions:
    """The typed options of the flags given (checked: OptionError / UnknownOption name the option)."""
    return RunOptions.from_kwargs(**{**given(args, names), **fixed})


def sampling_options(args: argparse.Namespace) -> SamplingOptions:
    return SamplingOptions(**given(args, SAMPLING_OPTIONS))


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """--max-new-tokens, --sample, --temperature, --top-p, --seed (read back with `sampling_options`)."""
    add_option_arguments(p, SAMPLING_OPTIONS)


def add_prompt_arguments(p: argparse.ArgumentParser) -> None:
    """--prompt (repeatable), --prompts-file, --ids (repeatable): read back with `read_prompts`."""
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="prompt text (needs tokenizer.json in the checkpoint); repeat for a batch")
    p.add_argument("--prompts-file", default=None, metavar="FILE",
                   help="file with one text prompt per line (blank lines skipped); added after --prompt")
    p.add_argument("--ids", action="append", default=[], metavar="I,J,K",
                   help="prompt as comma-separated token ids; repeat for a batch (not with text prompts)")


def add_output_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-stats", action="store_true", help="do not print the stats table after generating")
    p.add_argument("--heatmap", metavar="PNG", default=None,
                   help="also write a PNG heatmap of expert activations per layer (needs matplotlib); its folder "
                        "must exist")
    p.add_argument("--load-stats", metavar="JSON", default=None,
                   help="also write the rows routed to each expert per layer over the recent window (the file "
                        "`moeshard plan --from-stats` plans replicas from); its folder must exist")


def read_prompts(args: argparse.Namespace) -> tuple[str, list]:
    """("text", [str, ...]) or ("ids", [[int, ...], ...]) from --prompt/--prompts-file/--ids; ValueError
    names what is wrong. Every repeat is one more row of the batch."""
    texts = list(args.prompt or [])
    if args.prompts_file:
        try:
            lines = Path(args.prompts_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--prompts-file: cannot read {args.prompts_file}: {getattr(e, 'strerror', None) or e}"
                             ) from None
        file_prompts = [line for line in lines if line.strip()]
        if not file_prompts:
            raise ValueError(f"--prompts-file: {args.prompts_file} has no prompts")
        texts += file_prompts
    if texts and args.ids:
        raise ValueError("give text prompts (--prompt/--prompts-file) or --ids, not both")
    if any(not t for t in texts):
        raise ValueError("--prompt: a prompt is empty; give some text")
    if texts:
        return "text", texts
    if args.ids:
        return "ids", parse_id_lists(args.ids)
    raise ValueError("nothing to generate: give --prompt TEXT, --prompts-file FILE or --ids I,J,K")


def check_writable(path: str | None, flag: str) -> None:
    """Fail before anything starts if an output file cannot be written where asked."""
    if path is None:
        return
    parent = Path(path).expanduser().resolve().parent
    if Path(path).is_dir():
        raise ValueError(f"{flag}: {path} is a folder; give a file name like {Path(path) / 'heatmap.png'}")
    if not parent.is_dir():
        raise ValueError(f"{flag}: the folder {parent} does not exist; create it or write elsewhere")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"{flag}: the folder {parent} is not writable")


def pad_token_id(config: Any) -> int:
    """The checkpoint's pad token, else 0 (left padding only needs an in-vocab id under a 0 mask)."""
    pad = getattr(config, "pad_token_id", None)
    return pad if pad is not None else 0


def parse_id_lists(values: Sequence[str]) -> list[list[int]]:
    """`--ids` values ("1,2,3", one per prompt) -> lists of ints; ValueError says what is wrong."""
    rows = []
    for v in values:
        try:
            rows.append([int(t) for t in v.replace(" ", "").split(",") if t != ""])
        except ValueError:
            raise ValueError(f"--ids {v!r}: expected comma-separated integers like 1,2,3") from None
        if not rows[-1]:
            raise ValueError("--ids needs at least one token id")
    return rows


def left_pad(rows: Sequence[Sequence[int]], pad_id: int):
    """Token id lists -> left-padded ids [B, T] and attention mask [B, T] (LongTensors)."""
    import torch

    T = max(map(len, rows))
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.tensor(list(r), dtype=torch.long)
        mask[i, T - len(r):] = 1
    return ids, mask


def parse_ids(values: Sequence[str], pad_id: int):
    """Comma-separated id lists -> left-padded ids [B, T] and attention mask [B, T]."""
    return left_pad(parse_id_lists(values), pad_id)


def generate_for_prompts(coord, kind: str, prompts: list, sampling: SamplingOptions,
                         stream: bool = False) -> list[tuple[str, str]]:
    """Generate for every prompt in one left-padded batch: [(prompt, completion)] as printable text.

    Text completions stop at the checkpoint's eos. With `stream` and a single prompt, the new text
    (or token ids) is printed as it comes."""
    import torch

    pad = pad_token_id(coord.config)
    kw = dataclasses.asdict(sampling)
    if kind == "text":
        tok = coord.tokenizer
        rows = [tok.encode(p).ids for p in prompts]
        for p, r in zip(prompts, rows):
            if not r:
                raise ValueError(f"prompt {p!r} encodes to no tokens")
        eos = coord.config.eos_token_id
        eos_set = set([eos] if isinstance(eos, int) else (eos or []))
    else:
        rows, tok, eos, eos_set = prompts, None, None, set()
    ids, mask = left_pad(rows, pad)
    new: list[int] = []
    shown = [""]

    def show(step: torch.Tensor) -> None:
        t = int(step[0])
        if tok is None:
            print(t, end=" ", flush=True)
            return
        if t in eos_set:
            return
        new.append(t)
        text = tok.decode(new)
        if len(text) > len(shown[0]):
            print(text[len(shown[0]):], end="", flush=True)
        shown[0] = text

    on_token = show if stream and len(rows) == 1 else None
    out = coord.generate(ids, attention_mask=mask, eos_token_id=eos, pad_token_id=pad, on_token=on_token, **kw)
    if on_token is not None:
        print(flush=True)
    results = []
    for p, new_ids in zip(prompts, out[:, ids.shape[1]:].tolist()):
        if tok is None:
            results.append((",".join(map(str, p)), ",".join(map(str, new_ids))))
        else:
            cut = next((j for j, t in enumerate(new_ids) if t in eos_set), len(new_ids))
            results.append((repr(p), repr(tok.decode(new_ids[:cut]))))
    return results


def print_stats(stats: dict) -> None:
    """`Coordinator.stats()` as the per-actor table, then per-layer dispatch latencies (remote runs)."""
    from cluster.report import stats_report, table

    print()
    print(stats_report(stats))
    layers = stats["experts"].get("layers")
    if layers:
        print()
        print(table(["layer", "dispatches", "mean ms", "p50 ms", "max ms", "calls/actor"],
                    [[l, d["dispatches"], 1e3 * d["latency_mean_s"], 1e3 * d["latency_p50_s"],
                      1e3 * d["latency_max_s"], d["max_calls_per_actor"]] for l, d in layers.items()]))
