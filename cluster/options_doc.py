"""docs/options.md: every API argument and every CLI flag with its allowed values.

Rendered from the option table (coordinator/options.py) and the CLI's own argument parsers, so
the page cannot drift from the code; tests/test_options.py checks it is current and feeds every
entry an invalid value. Rewrite it with `python -m cluster.options_doc`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from coordinator.options import BY_NAME, OPTIONS, default_of

DOC = Path(__file__).resolve().parent.parent / "docs" / "options.md"

#: API arguments outside the option table (checked by the methods that take them)
CALL_ARGUMENTS = (
    ("forward, generate", "ids", "integer tensor [B, T] (or [T]) of token ids in [0, vocab_size), T >= 1"),
    ("forward, generate", "attention_mask", "0/1 (or bool) tensor of the ids' shape; generate: left padding only, "
                                            "every row with at least one token"),
    ("forward", "position_ids", "integer tensor of the ids' shape, values in [0, max_positions)"),
    ("generate", "eos_token_id, pad_token_id", "a token id, or a list of ids, in [0, vocab_size); or None"),
    ("generate", "on_token", "a callable taking the step's new tokens [B], or None"),
    ("generate", "prompt + max_new_tokens", "at most the model's context (config.json max_position_embeddings)"),
    ("generate_text", "prompt", "a non-empty string that encodes to at least one token"),
)


def walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, action) for every argument of every (sub)command, help actions left out."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk(sub, path + (name,))
        elif not isinstance(action, argparse._HelpAction):
            yield path, action


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def render() -> str:
    from cluster.cli import build_parser

    lines = ["# Options", "",
             "Every argument of the Python API and every flag of the `moeshard` CLI, with what it allows. Written "
             "from `coordinator/options.py` (one table: Python name, flag, check) and the CLI's parsers by "
             "`python -m cluster.options_doc`; `tests/test_options.py` keeps it current and feeds every entry an "
             "invalid value, which must give a one-line error naming it before anything starts.", "",
             "Sizes: `2GB` = 2 x 10^9 bytes, `2GiB` = 2 x 2^30 bytes, a plain number = bytes.", "",
             "## Python API", "",
             "`Coordinator.from_pretrained(path, **options)` takes the options below (or `options=RunOptions(...)`); "
             "`generate` takes the sampling ones. Actor-only options (placement, transport, recovery) with "
             "`num_workers=0` raise `UnknownOption` (a `TypeError`), as does any other name; a value out of range "
             "raises `OptionError` (a `ValueError`).", "",
             "| argument | concern | allowed | default | CLI flag |", "|---|---|---|---|---|"]
    for o in OPTIONS:
        default = default_of(o.name)
        lines.append(f"| `{o.name}` | {o.group} | {_cell(o.allowed)} | `{default!r}` | "
                     f"{f'`{o.flag}`' if o.flag else '-'} |")
    lines += ["", "Checked by the calls that take them:", "", "| method | argument | allowed |", "|---|---|---|"]
    lines += [f"| `{m}` | `{a}` | {_cell(allowed)} |" for m, a, allowed in CALL_ARGUMENTS]
    lines += ["", "## CLI", "",
              "Usage errors and invalid values print one line on stderr (`--debug` shows the traceback) and exit "
              "non-zero before anything loads.", ""]
    current = None
    for path, action in walk(build_parser()):
        cmd = " ".join(("moeshard",) + path)
        if cmd != current:
            current = cmd
            lines += ["", f"### `{cmd}`", "", "| flag | allowed | default |", "|---|---|---|"]
        name = ", ".join(action.option_strings) or action.dest
        if action.nargs == 0:
            allowed = "on/off switch"
        elif action.choices:
            allowed = " \\| ".join(map(str, action.choices))
        elif action.dest in BY_NAME and BY_NAME[action.dest].flag in action.option_strings:
            allowed = BY_NAME[action.dest].allowed
        else:
            allowed = (action.help or "").split(" (default")[0]
        helptext = " ".join((action.help or "").split())
        if action.required or not action.option_strings:
            default = "required"
        elif "(default: " in helptext:   # what --help says, the job's own defaults included
            default = helptext.rsplit("(default: ", 1)[1].rstrip(")")
        else:
            default = "off" if action.nargs == 0 else repr(action.default)
        lines.append(f"| `{name}` | {_cell(allowed)} | {_cell(default)} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    DOC.write_text(render())
    print(f"wrote {DOC}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
