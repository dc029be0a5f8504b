"""FP8 block-quantized experts (DeepSeek-V3/R1, Kimi-K2): held FP8 in a store's slots, dequantized per
use, and the checkpoint's FP8 tensors and scales checked before anything loads (issue 12 item 2)."""
from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from checkpoints import dequantize_fp8, make_released_checkpoint, quantize_fp8

H, I = 320, 576           # neither a multiple of 128: every expert has partial edge blocks
BLOCK = (128, 128)


def _header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


def write_fp8_experts(path: Path, experts: int, block=BLOCK, seed: int = 0):
    """One file of `experts` FP8 experts of layer 0 with their block scales; return (fp8 specs, bf16 specs of
    the same experts' dequantized weights in a second file, the dequantized float32 weights)."""
    from workers.spec import ExpertSpec, TensorSpec

    g = torch.Generator().manual_seed(seed)
    q, deq = {}, {}
    for e in range(experts):
        for w, shape in (("gate", (I, H)), ("up", (I, H)), ("down", (H, I))):
            name = f"model.layers.0.mlp.experts.{e}.{w}_proj.weight"
            q[name], q[name + "_scale_inv"] = quantize_fp8(torch.randn(shape, generator=g) * 0.05, block)
            deq[name] = dequantize_fp8(q[name], q[name + "_scale_inv"], block)
    save_file(q, str(path))
    bf16_path = path.with_name(path.stem + "-bf16.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in deq.items()}, str(bf16_path))

    def specs(file: Path, fp8: bool):
        header, base = _header(file)

        def t(name):
            h = header[name]
            a, b = h["data_offsets"]
            return TensorSpec(str(file), name, h["dtype"], tuple(h["shape"]), base + a, b - a)

        out = []
        for e in range(experts):
            names = [f"model.layers.0.mlp.experts.{e}.{w}_proj.weight" for w in ("gate", "up", "down")]
            if fp8:
                out.append(ExpertSpec(0, e, *map(t, names), expert_dtype="fp8", stored="fp8",
                                      scales=tuple(t(n + "_scale_inv") for n in names), block=block))
            else:
                out.append(ExpertSpec(0, e, *map(t, names)))
        return out

    return specs(path, True), specs(bf16_path, False), deq


def _reference(deq: dict, e: int, x: torch.Tensor) -> torch.Tensor:
    """The dense expert kernel over the dequantized weights (the FP8 format must run exactly that)."""
    from workers.kernels import ExpertWeights, expert_forward

    g, u, d = (deq[f"model.layers.0.mlp.experts.{e}.{w}_proj.weight"] for w in ("gate", "up", "down"))
    return expert_forward(ExpertWeights(g, u, d), x)


def test_fp8_expert_is_held_in_fp8_bytes_and_computes_its_dequantized_weights(tmp_path):
    from workers.budget import expert_nbytes
    from workers.kernels import FP8Weights
    from workers.store import ExpertStore

    fp8, _, deq = write_fp8_experts(tmp_path / "e.safetensors", 2)
    held = sum(t.nbytes for s in fp8[:1] for t in (*s.tensors, *s.scales))   # 1 byte per weight + scales
    assert held == 3 * H * I + 4 * (3 * 5 * 3)                                 # 3 x 5 blocks of 128 per weight
    store = ExpertStore(fp8, dtype=torch.float32)
    try:
        assert store.slot_bytes == expert_nbytes(fp8[0], 4) <= 1.05 * held
        x = torch.randn(7, H, generator=torch.Generator().manual_seed(1))
        for e in range(2):
            w = store.get((0, e))
            assert isinstance(w, FP8Weights) and w.gate.dtype == torch.float8_e4m3fn
            assert w.nbytes == held
            assert torch.equal(w.forward(x), _reference(deq, e, x))   # float32: the same dequantized weights
        assert store.resident_bytes() <= 2 * store.slot_bytes
    finally:
        store.close()


def test_a_budget_holds_about_twice_as_many_fp8_experts_as_bf16(tmp_path):
    from workers.budget import check_budget

    fp8, bf16, _ = write_fp8_experts(tmp_path / "e.safetensors", 16)
    budget = 6 * 2 * 3 * H * I                              # six bfloat16 experts
    n_bf16 = check_budget(bf16, 2, budget, min_resident=1)
    n_fp8 = check_budget(fp8, 2, budget, min_resident=1)
    assert n_bf16 == 6 and n_fp8 >= 11, (n_bf16, n_fp8)


def test_fp8_experts_page_and_spill_to_the_same_numbers(tmp_path):
    """Through a one-slot store (every get evicts) and its spill files, each expert gives the same bits
    as with all resident."""
    from workers.store import ExpertStore

    fp8, _, deq = write_fp8_experts(tmp_path / "e.safetensors", 3)
    x = torch.randn(5, H, generator=torch.Generator().manual_seed(2))
    full = ExpertStore(fp8, dtype=torch.float32)
    want = [full.get((0, e)).forward(x) for e in range(3)]
    full.close()
    tight = ExpertStore(fp8, budget_bytes=full.slot_bytes, dtype=torch.float32, spill_dir=tmp_path / "spill")
    try:
        for _ in range(2):
            for e in range(3):
                assert torch.equal(tight.get((0, e)).forward(x), want[e])
                tight.end_layer()
        st = tight.stats()
        assert st["evictions"] >= 5 and st["spill_reads"] >= 3 and st["spill_writes"] == 3
    finally:
        tight.close()


def test_fp8_dequantize_in_bfloat16_is_the_float32_weights_rounded():
    from workers.kernels import dequantize_fp8 as ours

    w = torch.randn(200, 136)
    q, s = quantize_fp8(w, (64, 128))
    f32 = ours(q, s, (64, 128), torch.float32)
    assert torch.equal(f32, dequantize_fp8(q, s, (64, 128)))
    assert torch.equal(ours(q, s, (64, 128), torch.bfloat16), f32.to(torch.bfloat16))
    whole = torch.randn(256, 128)
    q, s = quantize_fp8(whole, (128, 128))                     # whole blocks take the broadcast path
    assert torch.equal(ours(q, s, (128, 128), torch.float32), dequantize_fp8(q, s, (128, 128)))


# ---- bad input: named, one line, nothing half-loaded ---------------------------------------------

@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory):
    return make_released_checkpoint(tmp_path_factory.mktemp("fp8") / "ckpt", "deepseek-v3", strip_quantization=False)


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _file_of(path: Path, name: str) -> Path:
    return path / json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][name]


def _edit(path: Path, name: str, value: torch.Tensor | None) -> None:
    f = _file_of(path, name)
    tensors = load_file(str(f))
    if value is None:
        del tensors[name]
        index = path / "model.safetensors.index.json"
        d = json.loads(index.read_text())
        del d["weight_map"][name]
        index.write_text(json.dumps(d))
    else:
        tensors[name] = value
    save_file(tensors, str(f), metadata={"format": "pt"})


def _expect(path: Path, *needles: str):
    from coordinator.errors import CheckpointError
    from coordinator.checkpoint import Checkpoint

    with pytest.raises(CheckpointError) as err:
        Checkpoint.open(path)
    msg = str(err.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg
    return msg


EXPERT = "model.layers.1.mlp.experts.3.down_proj.weight"
DENSE = "model.layers.0.self_attn.q_b_proj.weight"


@pytest.mark.parametrize("name", [EXPERT, DENSE])
def test_fp8_tensor_without_its_scale_is_named(fp8_checkpoint, tmp_path, name):
    path = _copy(fp8_checkpoint, tmp_path / "c")
    _edit(path, name + "_scale_inv", None)
    _expect(path, name, "_scale_inv", "block scales")


@pytest.mark.parametrize("name", [EXPERT, DENSE])
def test_fp8_scale_of_the_wrong_shape_is_named(fp8_checkpoint, tmp_path, name):
    path = _copy(fp8_checkpoint, tmp_path / "c")
    with safe_open(str(_file_of(path, name)), "pt") as f:
        s = f.get_tensor(name + "_scale_inv")
    _edit(path, name + "_scale_inv", torch.ones(s.shape[0] + 1, s.shape[1]))
    msg = _expect(path, name + "_scale_inv", "[128, 128]", str(list(s.shape)))
    assert re.search(r"needs F32 \[\d+, \d+\]", msg)


def test_fp8_block_size_disagreeing_with_the_scales_is_named(fp8_checkpoint, tmp_path):
    path = _copy(fp8_checkpoint, tmp_path / "c")
    d = json.loads((path / "config.json").read_text())
    d["quantization_config"]["weight_block_size"] = [16, 16]
    (path / "config.json").write_text(json.dumps(d))
    _expect(path, "weight_block_size", "[16, 16]")


def test_fp8_weights_without_fp8_quantization_config_are_refused(fp8_checkpoint, tmp_path):
    path = _copy(fp8_checkpoint, tmp_path / "c")
    d = json.loads((path / "config.json").read_text())
    del d["quantization_config"]
    (path / "config.json").write_text(json.dumps(d))
    _expect(path, "F8_E4M3", "without quantization_config", "quant_method fp8")


def test_scale_without_its_weight_is_named(fp8_checkpoint, tmp_path):
    path = _copy(fp8_checkpoint, tmp_path / "c")
    name = "model.layers.0.input_layernorm.weight"
    f = _file_of(path, name)
    save_file({**load_file(str(f)), name + "_scale_inv": torch.ones(1, 1)}, str(f), metadata={"format": "pt"})
    _expect(path, name + "_scale_inv", "no F8_E4M3 weight")


def test_plan_shows_what_an_fp8_checkpoint_is(fp8_checkpoint, capsys):
    """`moeshard plan` says, before anything loads: family, layers, experts, top-k, dtypes of the dense
    part and the experts, quantization, rope type, bytes per expert (held and in the files), total
    expert bytes and what one token reads."""
    from cluster.cli import main
    from coordinator.checkpoint import Checkpoint
    from workers.budget import expert_nbytes

    specs = Checkpoint.open(fp8_checkpoint).expert_specs()
    held = max(expert_nbytes(s, 4) for s in specs)
    file_bytes = max(s.file_nbytes for s in specs)
    cfg = json.loads((fp8_checkpoint / "config.json").read_text())
    moe = cfg["num_hidden_layers"] - cfg["first_k_dense_replace"]
    k = cfg["num_experts_per_tok"]
    assert main(["plan", str(fp8_checkpoint), "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert f"deepseek_v3, {cfg['num_hidden_layers']} layers ({moe} MoE), {cfg['n_routed_experts']} experts" in out
    assert f"top-{k}, rope yarn" in out
    assert re.search(r"dense part BF16/F32/F8_E4M3 \(computed in float32\), experts F8_E4M3 held fp8 as stored", out)
    assert "quantization fp8 (e4m3, 128x128 blocks)" in out
    assert f"{held} B" in out and f"({file_bytes} B" in out and held <= 1.05 * file_bytes + 6 * 64
    assert f"{sum(expert_nbytes(s, 4) for s in specs)} B" in out
    assert f"reads up to {k * moe * file_bytes} B" in out


def test_dtype_knowledge_is_one_table():
    """workers/dtypes.py is the one place that maps dtype names to torch dtypes: no other module of ours
    spells such a table out (adding F8 and MXFP4 was one row each there)."""
    import re

    root = Path(__file__).resolve().parents[1]
    table = re.compile(r"""["'](F32|BF16|F16|F8_E4M3|float32|bfloat16|float16)["']\s*:\s*(torch\.|\d)""")
    offenders = []
    for package in ("workers", "coordinator", "cluster", "bench"):
        for f in sorted((root / package).rglob("*.py")):
            rel = f.relative_to(root).as_posix()
            # bench/cache/ holds fetched third-party code (llama.cpp's GGUF converter), not modules of ours
            if rel == "workers/dtypes.py" or rel.startswith("bench/cache/"):
                continue
            offenders += [f"{f.relative_to(root)}:{i}" for i, line in enumerate(f.read_text().splitlines(), 1)
                          if table.search(line)]
    assert not offenders, f"dtype tables outside workers/dtypes.py: {offenders}"
    from workers.dtypes import DTYPE_SIZES, FILE_DTYPES

    assert FILE_DTYPES["F8_E4M3"] == torch.float8_e4m3fn and DTYPE_SIZES["F8_E4M3"] == 1
    assert FILE_DTYPES["U8"] == torch.uint8


def test_bench_fp8_converts_and_measures_the_tiny_preset(tmp_path):
    """bench/fp8.py end to end on the tiny preset: the converted checkpoint holds FP8 experts and a
    budget of a quarter of the BF16 expert bytes pages them, reading fewer bytes than BF16 at that budget."""
    from bench.fp8 import convert_to_fp8, decode
    from bench.make_checkpoint import make_checkpoint
    from coordinator.checkpoint import Checkpoint
    from workers.budget import expert_nbytes

    bf16 = make_checkpoint(tmp_path / "bf16", "tiny", dtype="bfloat16")
    fp8 = convert_to_fp8(bf16, tmp_path / "fp8")
    specs = Checkpoint.open(fp8).expert_specs()
    assert {s.held_format for s in specs} == {"fp8"}
    budget = sum(expert_nbytes(s, 2) for s in Checkpoint.open(bf16).expert_specs()) // 4
    a, b = decode(bf16, 4, budget), decode(fp8, 4, budget)
    assert b["slots"] > a["slots"] and b["bytes_read_per_token"] < a["bytes_read_per_token"]
    assert a["tok_s"] > 0 and b["tok_s"] > 0
