"""Wire format: round trips for every dtype and every malformed input raising WireError."""
from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest
import torch

from workers import wire
from workers.errors import WireError

ROOT = Path(__file__).resolve().parents[1]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32]


def _tensor(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if dtype.is_floating_point:
        return torch.randn(shape).to(dtype)
    return torch.randint(-1000, 1000, shape, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_each_dtype(dtype):
    t = _tensor(dtype, (5, 7))
    buf = wire.encode({"op": "x", "n": 3, "l": [1, 2]}, {"a": t})
    header, tensors = wire.decode(buf)
    assert header == {"op": "x", "n": 3, "l": [1, 2]}
    assert tensors["a"].dtype == dtype and tensors["a"].shape == (5, 7)
    assert torch.equal(tensors["a"], t)


def test_several_tensors_aligned_and_zero_copy():
    ts = {"a": _tensor(torch.float32, (3, 5)), "b": _tensor(torch.bfloat16, (1, 3)),
          "c": _tensor(torch.int64, (7,)), "s": torch.tensor(2.5)}
    buf = bytearray(wire.encode({}, ts))
    _, out = wire.decode(buf)
    base = torch.frombuffer(buf, dtype=torch.uint8).data_ptr()
    for name, t in ts.items():
        assert torch.equal(out[name], t)
        assert (out[name].data_ptr() - base) % wire.ALIGN == 0
    out["a"][0, 0] = 123.0  # a bytearray gives writable views of the message itself
    assert wire.decode(buf)[1]["a"][0, 0] == 123.0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty_tensors_round_trip(dtype):
    t = torch.empty((0, 16), dtype=dtype)
    _, out = wire.decode(wire.encode({"k": 1}, {"rows": t, "more": _tensor(dtype, (2, 2))}))
    assert out["rows"].shape == (0, 16) and out["rows"].dtype == dtype
    assert out["more"].shape == (2, 2)


def test_no_tensors_and_memoryview_input():
    buf = wire.encode({"hello": "world"})
    assert wire.decode(memoryview(buf)) == ({"hello": "world"}, {})


def test_non_contiguous_input_is_encoded_as_values():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    assert torch.equal(wire.decode(wire.encode({}, {"t": t}))[1]["t"], t)


def test_decode_of_bytes_does_not_warn():
    """wire's own filter hides torch's read-only-buffer warning from a user's process.

    Checked in a fresh interpreter: torch warns once per process and pytest adds filters of its own
    (pyproject), so in-process either could hide a missing filter."""
    code = ("import torch; from workers import wire; "
            "_, out = wire.decode(wire.encode({}, {'a': torch.ones(4)})); assert out['a'].sum() == 4")
    r = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert r.returncode == 0 and "not writable" not in r.stderr, r.stderr


# ---- malformed input ------------------------------------------------------------------------

def _frame(meta, data: bytes = b"") -> bytes:
    """Build a message by hand from a header map, padding to the data section like encode()."""
    packed = msgpack.packb(meta, use_bin_type=True)
    start = (4 + len(packed) + 63) // 64 * 64
    return struct.pack("<I", len(packed)) + packed + bytes(start - 4 - len(packed)) + data


def _meta(**over):
    m = {"magic": wire.MAGIC, "version": wire.VERSION, "header": {}, "tensors": [], "data_nbytes": 0}
    m.update(over)
    return m


GOOD = wire.encode({"op": "run_layer"}, {"rows": torch.ones(4, 4)})

MALFORMED = {
    "empty": (b"", "truncated"),
    "short length": (b"\x01\x00", "truncated"),
    "header longer than buffer": (struct.pack("<I", 1000) + b"\x80", "truncated"),
    "truncated data": (GOOD[:-10], "truncated"),
    "trailing bytes": (GOOD + b"\x00" * 64, "oversized"),
    "garbage msgpack": (struct.pack("<I", 3) + b"\xc1\xc1\xc1", "msgpack"),
    "non-dict header": (_frame([1, 2, 3]), "map"),
    "bad magic": (_frame(_meta(magic="nope")), "magic"),
    "missing magic": (_frame({"version": 1}), "magic"),
    "bad version": (_frame(_meta(version=99)), "version"),
    "user header not a map": (_frame(_meta(header=[1])), "user header"),
    "tensor table not a list": (_frame(_meta(tensors={"a": 1})), "tensor table"),
    "bad data_nbytes": (_frame(_meta(data_nbytes=-1)), "data_nbytes"),
    "entry wrong arity": (_frame(_meta(tensors=[["a", "f32"]])), "entry"),
    "unknown dtype": (_frame(_meta(tensors=[["a", "f64", [1], 0, 8]], data_nbytes=64), bytes(64)), "dtype"),
    "negative shape": (_frame(_meta(tensors=[["a", "f32", [-1], 0, 4]], data_nbytes=64), bytes(64)), "shape"),
    "nbytes mismatch": (_frame(_meta(tensors=[["a", "f32", [2], 0, 4]], data_nbytes=64), bytes(64)), "nbytes"),
    "sizes exceed buffer": (_frame(_meta(tensors=[["a", "f32", [100], 0, 400]], data_nbytes=64), bytes(64)),
                            "data section"),
    "misaligned offset": (_frame(_meta(tensors=[["a", "f32", [1], 4, 4]], data_nbytes=64), bytes(64)), "aligned"),
    "duplicate names": (_frame(_meta(tensors=[["a", "f32", [1], 0, 4]] * 2, data_nbytes=64), bytes(64)),
                        "duplicate"),
    "name not a string": (_frame(_meta(tensors=[[1, "f32", [1], 0, 4]], data_nbytes=64), bytes(64)), "name"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_raises_wire_error(case):
    buf, needle = MALFORMED[case]
    with pytest.raises(WireError, match=f"(?i){needle}"):
        wire.decode(buf)


def test_every_truncation_of_a_good_message_is_a_wire_error():
    for n in range(len(GOOD)):
        with pytest.raises(WireError):
            wire.decode(GOOD[:n])


def test_decode_rejects_non_buffer():
    with pytest.raises(WireError, match="bytes"):
        wire.decode("a string")  # type: ignore[arg-type]


def test_encode_rejects_bad_input():
    with pytest.raises(WireError, match="dict"):
        wire.encode([1])  # type: ignore[arg-type]
    with pytest.raises(WireError, match="dtype"):
        wire.encode({}, {"a": torch.ones(2, dtype=torch.float64)})
    with pytest.raises(WireError, match="msgpack"):
        wire.encode({"x": object()})
