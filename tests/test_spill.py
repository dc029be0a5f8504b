"""Spill files are tied to the checkpoint bytes they came from (real files, real processes)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_store import file_weights, make_expert_file
from workers import spill
from workers.store import ExpertStore

KEYS = [(layer, e) for layer in (0, 1) for e in range(4)]


def _make(path: Path, seed: int):
    return make_expert_file(path, [0, 1], list(range(4)), seed=seed)


def _check_all(specs, tensors, spill_dir, budget=None) -> dict:
    """Get every expert through a store on `spill_dir`; each must be exactly the file's weights."""
    store = ExpertStore(specs, budget, torch.float32, spill_dir=spill_dir)
    try:
        for s in specs:
            w = store.get(s.key)
            for got, want in zip((w.gate, w.up, w.down), file_weights(tensors, s.key)):
                assert torch.equal(got, want), f"expert {s.key}: weights of another checkpoint"
        return store.stats()
    finally:
        store.close()


def test_same_shapes_other_weights_is_a_miss_and_the_stale_file_is_replaced(tmp_path):
    a_specs, a = _make(tmp_path / "a.safetensors", seed=0)
    b_specs, b = _make(tmp_path / "b.safetensors", seed=1)
    assert [s.gate.shape for s in a_specs] == [s.gate.shape for s in b_specs]
    d = tmp_path / "spill"
    st = _check_all(a_specs, a, d)
    assert (st["spill_misses"], st["spill_writes"]) == (8, 8)
    f = d / "L0-E0-float32.bin"
    a_bytes = f.read_bytes()
    with open(f, "rb") as reader:  # a reader that opened A's file before B replaced it
        st = _check_all(b_specs, b, d)  # before keying: B computed with A's spilled weights
        assert (st["spill_reads"], st["spill_stale"], st["spill_writes"]) == (0, 8, 8)
        # replaced by a rename, not rewritten in place: the open file is still all of A's
        assert os.fstat(reader.fileno()).st_ino != os.stat(f).st_ino and reader.read() == a_bytes
    assert f.read_bytes() != a_bytes
    st = _check_all(b_specs, b, d)  # replaced, not ignored forever: B now reads its own files
    assert (st["spill_reads"], st["spill_stale"], st["spill_writes"]) == (8, 0, 0)
    assert sorted(p.name for p in d.iterdir()) == sorted(f"L{l}-E{e}-float32.bin" for l, e in KEYS)


def test_checkpoint_rewritten_in_place_is_a_miss(tmp_path):
    path = tmp_path / "c.safetensors"
    specs, a = _make(path, seed=0)
    d = tmp_path / "spill"
    _check_all(specs, a, d)
    before = os.stat(path)
    specs, b = _make(path, seed=1)  # same name, same size, other weights
    # a later write moves the mtime on; set it so the test does not hang on the clock's tick
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    assert os.stat(path).st_size == before.st_size
    st = _check_all(specs, b, d)
    assert (st["spill_reads"], st["spill_stale"]) == (0, 8)


@pytest.mark.parametrize("damage", ["old-format", "torn", "other-digest", "other-version"])
def test_damaged_or_foreign_spill_file_is_replaced(tmp_path, damage):
    specs, tensors = _make(tmp_path / "c.safetensors", seed=0)
    d = tmp_path / "spill"
    _check_all(specs, tensors, d)
    f = d / "L0-E1-float32.bin"
    raw = bytearray(f.read_bytes())
    if damage == "old-format":      # what the unkeyed format wrote: the bare slot image
        f.write_bytes(raw[spill.HEADER_BYTES:])
    elif damage == "torn":
        f.write_bytes(raw[:len(raw) // 2])
    elif damage == "other-digest":
        raw[24] ^= 0xFF  # first byte of the source digest; the payload is intact
        f.write_bytes(raw)
    else:
        raw[8] += 1  # the format version
        f.write_bytes(raw)
    st = _check_all(specs, tensors, d)
    assert (st["spill_reads"], st["spill_stale"], st["spill_writes"]) == (7, 1, 1)
    st = _check_all(specs, tensors, d)
    assert (st["spill_reads"], st["spill_stale"]) == (8, 0)


def test_writes_leave_no_temporary_files_and_a_failed_write_does_not_fail_the_load(tmp_path):
    specs, tensors = _make(tmp_path / "c.safetensors", seed=0)
    d = tmp_path / "spill"
    _check_all(specs, tensors, d)
    assert not [p for p in d.iterdir() if p.name.endswith(".tmp")]
    blocked = tmp_path / "blocked"
    (blocked / "L0-E0-float32.bin").mkdir(parents=True)  # the rename over it fails, even for root
    st = _check_all(specs, tensors, blocked)
    assert (st["spill_writes"], st["spill_stale"], st["loads"]) == (7, 1, 8)
    assert not [p for p in blocked.iterdir() if p.name.endswith(".tmp")]


_CHILD = r"""
import json, os, sys, time
sys.path.insert(0, {tests!r})
import torch
from safetensors.torch import load_file
from test_store import file_weights, specs_from_safetensors
from workers.budget import slot_bytes
from workers.store import ExpertStore

ckpt, spill_dir, go, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
specs, tensors = specs_from_safetensors(ckpt), load_file(ckpt)
deadline = time.monotonic() + 60
while not os.path.exists(go):  # start together with the other process
    if time.monotonic() > deadline:
        sys.exit("the start file never appeared")
    time.sleep(0.001)
store = ExpertStore(specs, 2 * slot_bytes(specs, 4), torch.float32, spill_dir=spill_dir, loader_threads=1)
for r in range(rounds):  # two slots for eight experts: every get reloads, through the shared directory
    for s in specs:
        w = store.get(s.key)
        for got, want in zip((w.gate, w.up, w.down), file_weights(tensors, s.key)):
            if not torch.equal(got, want):
                sys.exit(f"round {{r}} expert {{s.key}}: wrong weights from the shared spill directory")
print(json.dumps(store.stats(), default=str))
store.close()
"""


@pytest.mark.parametrize("same", [True, False], ids=["same-checkpoint", "other-checkpoints"])
def test_two_processes_share_a_spill_directory(tmp_path, same):
    """Two real processes load through one spill directory at once. Sharing a checkpoint, they
    reuse each other's files; with different checkpoints of the same shapes they replace each
    other's files, and neither ever computes with the other's weights or a half-written file."""
    a = tmp_path / "a.safetensors"
    _make(a, seed=0)
    b = a
    if not same:
        b = tmp_path / "b.safetensors"
        _make(b, seed=1)
    d, go = tmp_path / "spill", tmp_path / "go"
    script = _CHILD.format(tests=str(Path(__file__).parent))
    procs = [subprocess.Popen([sys.executable, "-c", script, str(p), str(d), str(go), "40"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for p in (a, b)]
    go.touch()
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=240)
            assert p.returncode == 0, err.strip().splitlines()[-1] if err.strip() else p.returncode
            outs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(o["loads"] == 40 * 8 for o in outs)
    if same:  # a file one process wrote serves the other (or itself) on every later load
        assert sum(o["spill_reads"] for o in outs) > 0
        assert sum(o["spill_stale"] for o in outs) == 0
    assert not [p for p in d.iterdir() if p.name.endswith(".tmp")]
