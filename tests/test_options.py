"""Every option, API argument and CLI flag gets an invalid value and must answer with a clear error.

The entries come from the option table (coordinator/options.py) and from walking the CLI's own
parsers, so a new flag without an invalid value here fails `test_every_cli_flag_is_covered`.
Each case must fail before anything starts (no Ray, no generation), with one line that names the
flag (CLI) or the argument (API), within the per-test timeout.
"""
from __future__ import annotations

import math
import re

import pytest
import torch

from cluster.cli import build_parser, main
from cluster.options_doc import DOC, render, walk
from coordinator import Coordinator
from coordinator.options import OPTIONS, OptionError, RunOptions, UnknownOption

MODEL = "models/pydoc-moe"
IDS = ["--ids", "1,300,400", "--max-new-tokens", "1", "--no-stats"]
#: what each command needs besides the flag under test, so that only that flag can be wrong
BASE = {
    ("plan",): ["plan", MODEL, "--workers", "2"],
    ("generate",): ["generate", MODEL, *IDS],
    ("job",): ["job", "--model", MODEL, "--ids", "1,300,400", "--max-new-tokens", "1"],
    ("harness", "up"): ["harness", "up"],
    ("harness", "down"): ["harness", "down"],
    ("bench",): ["bench"],
    ("quantize",): ["quantize", MODEL, "/nonexistent-dst/q", "--expert-dtype", "int8"],
    ("eval",): ["eval", MODEL, "--text", "docs/data/heldout-pydoc.txt"],
    ("serve",): ["serve", MODEL],
}
#: invalid values of the flags outside the option table (those in it bring their own `cli_invalid`)
CLI_INVALID = {
    ("plan", "checkpoint"): ["/nonexistent/model"],
    ("plan", "--min-resident"): ["0", "x"],
    ("plan", "--workers"): ["0", "x"],
    ("generate", "checkpoint"): ["/nonexistent/model"],
    ("generate", "--prompt"): [""],
    ("generate", "--prompts-file"): ["/nonexistent/prompts.txt"],
    ("generate", "--ids"): ["1,x", ""],
    ("generate", "--heatmap"): ["/nonexistent/dir/map.png"],
    ("job", "--model"): ["/nonexistent/model"],
    ("job", "--placement"): ["anywhere"],
    ("job", "--prompt"): [""],
    ("job", "--prompts-file"): ["/nonexistent/prompts.txt"],
    ("job", "--ids"): ["1,x"],
    ("job", "--retries"): ["-1", "x"],
    ("job", "--wait-for-nodes"): ["-1", "nan"],
    ("job", "--heatmap"): ["/nonexistent/dir/map.png"],
    ("harness up", "--hosts"): ["0", "x"],
    ("harness up", "--host-memory"): ["lots", "0"],
    ("harness up", "--host-cpus"): ["0", "x"],
    ("harness up", "--cpu-quota"): ["-1", "x"],
    ("harness up", "--timeout"): ["0", "x"],
    ("harness down", "--cluster-id"): ["no-such-cluster"],
    ("bench", "--scenario"): ["99"],
    ("bench", "--checkpoint"): ["/nonexistent/model"],
    ("bench", "--threads"): ["0", "x"],
    ("bench", "--workers"): ["a", "-1"],
    ("bench", "--ooc-workers"): ["a", "-1"],
    ("bench", "--ooc-memory"): ["lots", "0"],
    ("bench", "--host-memory"): ["lots", "0"],
    ("bench", "--transport"): ["auto", "graph"],
    ("bench", "--out"): ["/dev/null/out"],
    ("quantize", "src"): ["/nonexistent/model"],
    ("quantize", "dst"): ["/nonexistent/model"],
    ("eval", "checkpoint"): ["/nonexistent/model"],
    ("eval", "--text"): ["/nonexistent/text.txt"],
    ("eval", "--max-length"): ["0", "x"],
    ("eval", "--stride"): ["0", "x"],
    ("serve", "checkpoint"): ["/nonexistent/model"],
    ("serve", "--host"): [" "],
    ("serve", "--port"): ["0", "70000", "x"],
    ("serve", "--model-name"): [" "],
    ("serve", "--max-batch"): ["0", "x"],
    ("serve", "--max-queue"): ["-1", "x"],
}
#: flags that take free text where no value is wrong (a name, a label)
FREE_TEXT = {("bench", "--machine")}


def _flags():
    for path, action in walk(build_parser()):
        if not path or action.nargs == 0:
            continue
        yield " ".join(path), max(action.option_strings or [action.dest], key=len), action


def _cases():
    from coordinator.options import BY_FLAG

    for cmd, flag, action in _flags():
        if (cmd, flag) in FREE_TEXT:
            continue
        values = CLI_INVALID.get((cmd, flag))
        if values is None and flag in BY_FLAG:
            values = BY_FLAG[flag].cli_invalid
        for v in values or []:
            yield pytest.param(cmd, flag, v, id=f"{cmd} {flag}={v!r}")


def test_every_cli_flag_is_covered():
    from coordinator.options import BY_FLAG

    missing = [(cmd, flag) for cmd, flag, _ in _flags()
               if (cmd, flag) not in CLI_INVALID and (cmd, flag) not in FREE_TEXT
               and not (flag in BY_FLAG and BY_FLAG[flag].cli_invalid)]
    assert not missing, f"flags without an invalid value in this test: {missing}"
    assert all(o.invalid for o in OPTIONS), [o.name for o in OPTIONS if not o.invalid]


def test_docs_table_is_current():
    assert DOC.read_text() == render(), "docs/options.md is stale: run python -m cluster.options_doc"
    text = DOC.read_text()
    for cmd, flag, _ in _flags():
        assert f"`{flag}" in text or f"`{flag}`" in text or f", {flag}`" in text, (cmd, flag)


@pytest.mark.timeout(15)
@pytest.mark.parametrize("cmd, flag, value", list(_cases()))
def test_cli_invalid_value_is_one_line_naming_the_flag(cmd, flag, value, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    argv = list(BASE[tuple(cmd.split())])
    if flag.startswith("-"):
        argv += [f"{flag}={value}"]
    else:                                 # a positional: replace the base command's value
        argv = [value if a == MODEL else a for a in argv]
    try:
        code = main(argv)
    except SystemExit as e:               # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code not in (0, None), f"{argv} was accepted"
    assert not out.strip(), f"{argv}: something ran before the error:\n{out}"
    assert len(lines) == 1, f"{argv}: expected one line on stderr, got:\n{err}"
    assert "Traceback" not in err
    if flag.startswith("-"):
        assert flag in lines[0], f"{argv}: the error does not name {flag}: {lines[0]}"
    else:
        assert value in lines[0], f"{argv}: the error does not name {value}: {lines[0]}"


# ---- the Python API ------------------------------------------------------------------------------

@pytest.mark.timeout(15)
@pytest.mark.parametrize("opt, value", [pytest.param(o, v, id=f"{o.name}={v!r}") for o in OPTIONS
                                        for v in o.invalid if o.group != "generate"])
def test_api_invalid_option_names_it_before_anything_starts(opt, value):
    workers = 1 if opt.group in ("placement", "transport", "recovery") and opt.name != "num_workers" else 0
    with pytest.raises((OptionError, UnknownOption)) as e:
        RunOptions.from_kwargs(**({"num_workers": workers} if opt.name != "num_workers" else {}),
                               **{opt.name: value})
    assert e.value.option == opt.name and opt.name in str(e.value) and "\n" not in str(e.value)


@pytest.fixture(scope="module")
def coord():
    with Coordinator.from_pretrained(MODEL) as c:
        yield c


IDS_T = torch.tensor([[1, 300, 400]])


@pytest.mark.timeout(15)
@pytest.mark.parametrize("opt, value", [pytest.param(o, v, id=f"{o.name}={v!r}") for o in OPTIONS
                                        for v in o.invalid if o.group == "generate"])
def test_generate_invalid_sampling_names_it(coord, opt, value):
    with pytest.raises(OptionError, match=re.escape(opt.name)):
        coord.generate(IDS_T, **{"max_new_tokens": 1, opt.name: value})


@pytest.mark.timeout(15)
@pytest.mark.parametrize("kwargs, needle", [
    (dict(ids=torch.zeros(1, 0, dtype=torch.long)), "empty"),
    (dict(ids=torch.tensor([[1.0, 2.0]])), "integer tensor"),
    (dict(ids=torch.tensor([[1, 99999]])), "token ids must be in"),
    (dict(attention_mask=torch.tensor([[1, 1, 0]])), "left padding only"),
    (dict(attention_mask=torch.tensor([[0, 0, 0]])), "no tokens"),
    (dict(attention_mask=torch.tensor([[1, 1]])), "shape"),
    (dict(attention_mask=torch.tensor([[2, 1, 1]])), "only 0 and 1"),
    (dict(eos_token_id=10**9), "eos_token_id"),
    (dict(pad_token_id=-1), "pad_token_id"),
    (dict(on_token=5), "on_token"),
    (dict(max_new_tokens=1022), "context of 1024"),
])
def test_generate_invalid_arguments(coord, kwargs, needle):
    kwargs = {"ids": IDS_T, "max_new_tokens": 1, **kwargs}
    with pytest.raises((ValueError, TypeError), match=re.escape(needle)):
        coord.generate(**kwargs)


def test_prompt_beyond_the_context_is_refused_and_one_that_fits_runs(coord):
    limit = coord.config.max_positions
    with pytest.raises(ValueError, match=f"more than the model's context of {limit}"):
        coord.forward(torch.ones(1, limit + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="position_ids"):
        coord.forward(IDS_T, position_ids=torch.tensor([[0, 1, limit]]))
    assert coord.generate(IDS_T, max_new_tokens=limit - 3).shape == (1, limit)   # exactly fits


def test_right_padding_was_a_different_continuation(coord):
    """Why right padding is refused: the same prompt, padded on the right, continues differently."""
    pad = 0
    left = coord.generate(torch.tensor([[pad, 1, 300, 400]]), attention_mask=torch.tensor([[0, 1, 1, 1]]),
                          max_new_tokens=4)[:, 4:]
    plain = coord.generate(IDS_T, max_new_tokens=4)[:, 3:]
    assert torch.equal(left, plain)
    with pytest.raises(ValueError, match="left padding only"):
        coord.generate(torch.tensor([[1, 300, 400, pad]]), attention_mask=torch.tensor([[1, 1, 1, 0]]),
                       max_new_tokens=4)


def test_generate_text_refuses_an_empty_prompt(coord):
    with pytest.raises(ValueError, match="non-empty"):
        coord.generate_text("")


def test_unknown_and_inapplicable_options_are_type_errors_in_both_backends():
    for workers in (0, 1):
        with pytest.raises(TypeError, match="bogus"):
            Coordinator.from_pretrained(MODEL, num_workers=workers, bogus=1)
        with pytest.raises(TypeError, match="kv_cache_dtype"):
            Coordinator.from_pretrained(MODEL, num_workers=workers, kv_cache_dtype="int8")
    with pytest.raises(TypeError, match="transport: applies only to expert actors"):
        Coordinator.from_pretrained(MODEL, num_workers=0, transport="calls")
    with pytest.raises(TypeError, match="not both"):
        Coordinator.from_pretrained(MODEL, num_workers=1, options=RunOptions())


def test_typed_options_equal_the_keywords():
    kw = RunOptions.from_kwargs(num_workers=2, worker_memory="8MB", policy="lru", call_timeout_s=30,
                                max_call_retries=1)
    assert kw.store.budget_bytes == 8 * 10**6 and kw.transport.call_timeout_s == 30.0
    assert kw.recovery.max_call_retries == 1 and kw.placement.num_workers == 2
    assert math.isclose(RunOptions.from_kwargs(worker_memory="1GiB").store.budget_bytes, 2**30)


def test_temperature_zero_is_greedy(coord):
    greedy = coord.generate(IDS_T, max_new_tokens=4)
    assert torch.equal(coord.generate(IDS_T, max_new_tokens=4, do_sample=True, temperature=0.0, seed=1), greedy)


def test_repeated_prompt_is_a_batch_equal_to_each_prompt_alone(capsys):
    """`--prompt A --prompt B` generates both (one left-padded batch), as the job does; each completion
    equals that prompt generated alone."""
    base = ["generate", MODEL, "--max-new-tokens", "6", "--no-stats"]
    assert main(base + ["--prompt", "The for statement", "--prompt", "A list"]) == 0
    batch = capsys.readouterr().out.strip().splitlines()
    assert len(batch) == 2 and batch[0].startswith("[1] 'The for statement' -> ") and batch[1].startswith("[2] 'A list'")
    for i, prompt in enumerate(("The for statement", "A list")):
        assert main(base + ["--prompt", prompt]) == 0
        alone = capsys.readouterr().out.rstrip("\n")
        assert batch[i].split(" -> ", 1)[1] == repr(alone)
