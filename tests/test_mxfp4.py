"""MXFP4 experts as gpt-oss ships them: each expert its slice of the layer's fused blocks, scales and
biases, held 4-bit in a store's slot, dequantized per use as transformers does; bad MXFP4 input named
before anything loads (issue 12 item 3)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import dequantize_mxfp4, make_released_checkpoint, quantize_mxfp4

H, I, E = 256, 96, 3


def test_dequantize_is_transformers_convert_moe_packed_tensors():
    from workers.kernels import dequantize_mxfp4 as ours

    w = torch.randn(E, H, 2 * I) * 0.3                                # [E, in, out] as gpt-oss stores it
    blocks, scales = quantize_mxfp4(w.transpose(1, 2))               # [E, 2I, H/32, 16], [E, 2I, H/32]
    ref = dequantize_mxfp4(blocks, scales)                           # [E, H, 2I] float32
    assert (ref - w).abs().max() <= w.abs().max() / 4                # the writer is MXFP4 at all
    for e in range(E):
        got = ours(blocks[e].reshape(2 * I, H // 2), scales[e], torch.float32)
        assert torch.equal(got, ref[e].t())
        assert torch.equal(ours(blocks[e].reshape(2 * I, H // 2), scales[e], torch.bfloat16), ref[e].t().bfloat16())


def _write_layer(path: Path, seed: int = 0):
    """One file holding layer 0's fused MXFP4 experts as gpt-oss ships them; return specs and the
    dequantized reference weights (transformers' layout [E, in, out]) and biases."""
    from workers.spec import ExpertSpec, TensorSpec

    g = torch.Generator().manual_seed(seed)
    gu, dn = torch.randn(E, H, 2 * I, generator=g) * 0.2, torch.randn(E, I, H, generator=g) * 0.2
    t = {}
    t["gate_up_proj_blocks"], t["gate_up_proj_scales"] = quantize_mxfp4(gu.transpose(1, 2))
    t["down_proj_blocks"], t["down_proj_scales"] = quantize_mxfp4(dn.transpose(1, 2))
    t["gate_up_proj_bias"] = (torch.randn(E, 2 * I, generator=g) * 0.1).bfloat16()
    t["down_proj_bias"] = (torch.randn(E, H, generator=g) * 0.1).bfloat16()
    save_file({f"model.layers.0.mlp.experts.{k}": v for k, v in t.items()}, str(path))
    import struct

    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    base = 8 + n

    def piece(short, e, shape):
        h = header[f"model.layers.0.mlp.experts.{short}"]
        a, b = h["data_offsets"]
        per = (b - a) // E
        return TensorSpec(str(path), f"{short}[{e}]", h["dtype"], shape, base + a + e * per, per)

    specs = []
    for e in range(E):
        gub = piece("gate_up_proj_blocks", e, (2 * I, H // 2))
        specs.append(ExpertSpec(0, e, gub, gub, piece("down_proj_blocks", e, (H, I // 2)), expert_dtype="mxfp4",
                                stored="mxfp4", swiglu=(1.702, 7.0),
                                scales=(piece("gate_up_proj_scales", e, (2 * I, H // 32)),
                                        piece("gate_up_proj_bias", e, (2 * I,)),
                                        piece("down_proj_scales", e, (H, I // 32)),
                                        piece("down_proj_bias", e, (H,)))))
    ref = {"gate_up": dequantize_mxfp4(t["gate_up_proj_blocks"], t["gate_up_proj_scales"]),
           "down": dequantize_mxfp4(t["down_proj_blocks"], t["down_proj_scales"]),
           "gate_up_bias": t["gate_up_proj_bias"].float(), "down_bias": t["down_proj_bias"].float()}
    return specs, ref


def _gpt_oss_expert(ref, e, x, alpha=1.702, limit=7.0):
    """transformers' GptOssExperts for one expert, on the dequantized weights."""
    gate_up = x @ ref["gate_up"][e] + ref["gate_up_bias"][e]
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    gate = gate.clamp(min=None, max=limit)
    up = up.clamp(min=-limit, max=limit)
    return ((up + 1) * (gate * torch.sigmoid(gate * alpha))) @ ref["down"][e] + ref["down_bias"][e]


def test_mxfp4_expert_is_held_4_bit_and_computes_like_transformers(tmp_path):
    from workers.budget import expert_nbytes
    from workers.kernels import MXFP4Weights
    from workers.store import ExpertStore

    specs, ref = _write_layer(tmp_path / "e.safetensors")
    four_bit = 3 * H * I // 2                                                  # gate, up, down at 4 bits
    scales = 3 * H * I // 32                                                   # one byte per 32 weights
    biases = 2 * (2 * I + H)
    assert specs[0].file_nbytes == four_bit + scales + biases                  # the fused gate/up counted once
    x = torch.randn(9, H, generator=torch.Generator().manual_seed(3)) * 2     # large enough to clamp
    store = ExpertStore(specs, budget_bytes=None, dtype=torch.float32)
    try:
        assert store.slot_bytes == expert_nbytes(specs[0], 4) <= 1.05 * specs[0].file_nbytes
        for e in range(E):
            w = store.get((0, e))
            assert isinstance(w, MXFP4Weights) and w.nbytes == specs[e].file_nbytes
            torch.testing.assert_close(w.forward(x), _gpt_oss_expert(ref, e, x), rtol=1e-4, atol=1e-4)
    finally:
        store.close()


def test_mxfp4_experts_page_through_one_slot_to_the_same_bits(tmp_path):
    from workers.store import ExpertStore

    specs, _ = _write_layer(tmp_path / "e.safetensors")
    x = torch.randn(4, H, generator=torch.Generator().manual_seed(4))
    full = ExpertStore(specs, dtype=torch.float32)
    want = [full.get((0, e)).forward(x) for e in range(E)]
    full.close()
    tight = ExpertStore(specs, budget_bytes=full.slot_bytes, dtype=torch.float32, spill_dir=tmp_path / "spill")
    try:
        for _ in range(2):
            for e in range(E):
                assert torch.equal(tight.get((0, e)).forward(x), want[e])
                tight.end_layer()
        assert tight.stats()["evictions"] >= 2 * E - 1 and tight.stats()["spill_reads"] >= E
    finally:
        tight.close()


# ---- bad input ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mxfp4_checkpoint(tmp_path_factory):
    return make_released_checkpoint(tmp_path_factory.mktemp("mx") / "ckpt", "gpt-oss-20b", strip_quantization=False)


def _rewrite(path: Path, name: str, value: torch.Tensor) -> None:
    f = path / json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][name]
    save_file({**load_file(str(f)), name: value}, str(f), metadata={"format": "pt"})


def _expect(path: Path, *needles: str) -> str:
    from coordinator.checkpoint import Checkpoint
    from coordinator.errors import CheckpointError

    with pytest.raises(CheckpointError) as err:
        Checkpoint.open(path)
    msg = str(err.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg
    return msg


@pytest.mark.parametrize("short", ["gate_up_proj_blocks", "down_proj_scales"])
def test_mxfp4_blocks_disagreeing_with_the_config_are_named(mxfp4_checkpoint, tmp_path, short):
    path = shutil.copytree(mxfp4_checkpoint, tmp_path / "c")
    name = f"model.layers.1.mlp.experts.{short}"
    from safetensors import safe_open

    f = path / json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][name]
    with safe_open(str(f), "pt") as h:
        t = h.get_tensor(name)
    _rewrite(path, name, torch.zeros((t.shape[0], t.shape[1] // 2, *t.shape[2:]), dtype=torch.uint8))
    _expect(path, name, "config")


def test_mxfp4_blocks_of_the_wrong_dtype_are_named(mxfp4_checkpoint, tmp_path):
    path = shutil.copytree(mxfp4_checkpoint, tmp_path / "c")
    name = "model.layers.0.mlp.experts.down_proj_blocks"
    from safetensors import safe_open

    f = path / json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][name]
    with safe_open(str(f), "pt") as h:
        t = h.get_tensor(name)
    _rewrite(path, name, t.to(torch.bfloat16))
    _expect(path, name, "BF16", "U8")


def test_a_byte_tensor_outside_the_experts_is_refused(mxfp4_checkpoint, tmp_path):
    path = shutil.copytree(mxfp4_checkpoint, tmp_path / "c")
    name = "model.layers.0.self_attn.q_proj.weight"
    from safetensors import safe_open

    f = path / json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][name]
    with safe_open(str(f), "pt") as h:
        t = h.get_tensor(name)
    _rewrite(path, name, t.to(torch.uint8))
    _expect(path, name, "U8", "mxfp4")


def test_plan_shows_mxfp4_experts(mxfp4_checkpoint, capsys):
    from cluster.cli import main
    from coordinator.checkpoint import Checkpoint
    from workers.budget import expert_nbytes

    specs = Checkpoint.open(mxfp4_checkpoint).expert_specs()
    assert main(["plan", str(mxfp4_checkpoint), "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "gpt_oss, 4 layers (4 MoE), 8 experts per MoE layer, top-2, rope yarn" in out
    assert "experts U8 held mxfp4 as stored; quantization mxfp4" in out
    assert f"{max(expert_nbytes(s, 4) for s in specs)} B" in out and f"({specs[0].file_nbytes} B" in out
