"""Low-bit experts (docs/quantization.md): int8/int4 math, kernels against a dequantize-then-matmul
reference, slot sizes, paging and spill files, every family end to end, `moeshard quantize`,
perplexity and `moeshard eval`. All in this process (distributed: test_quant_distributed.py)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from checkpoints import FAMILIES, make_prompts
from cluster.cli import main
from cluster.quantize import quantize_checkpoint
from coordinator import Coordinator
from coordinator.errors import CheckpointError
from workers import native, quant
from workers.formats import held_as
from workers.kernels import ExpertWeights, expert_forward
from workers.store import ExpertStore
from conftest import require
from test_store import file_weights, make_expert_file

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

MODEL = Path("models/pydoc-moe")
HELDOUT = Path("docs/data/heldout-pydoc.txt")
FORMATS = [("int8", 0), ("int4", 32), ("int4", 64), ("int4", 128)]
IDS = torch.tensor([[5, 9, 17, 33, 64, 100, 3, 8, 90, 11]])


def quantized_reference(w: torch.Tensor, expert_dtype: str, group: int, scale_dtype: torch.dtype) -> torch.Tensor:
    """The plain-PyTorch reference of one weight: quantize, then dequantize to float32."""
    if expert_dtype == "int8":
        return quant.dequantize_int8(*quant.quantize_int8(w, scale_dtype))
    return quant.dequantize_int4(*quant.quantize_int4(w, group, scale_dtype), group)


# ---- the math ------------------------------------------------------------------------------------

@pytest.mark.parametrize("expert_dtype,group", FORMATS)
def test_quantization_error_is_at_most_half_a_step(expert_dtype, group):
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(1))
    w[3] = 0.0                                 # an all-zero row/group: scale 0, still exact
    deq = quantized_reference(w, expert_dtype, group, torch.float32)
    if expert_dtype == "int8":
        step = w.abs().amax(1, keepdim=True) / 127
    else:
        g = w.reshape(32, -1, group)
        step = ((g.amax(2) - g.amin(2)) / 15).repeat_interleave(group, 1)
    assert torch.all((deq - w).abs() <= step / 2 + 1e-6)
    assert torch.equal(deq[3], torch.zeros(256))


def test_int4_codes_are_portable_nibbles_low_first():
    w = torch.tensor([0.0, 15.0] * 32).repeat(16, 1)     # groups of 32 span 0..15: scale 1, zero 8, code = w
    codes, qparams = quant.quantize_int4(w, 32, torch.float32)
    assert codes.shape == (16, 32) and codes.dtype == torch.uint8 and qparams.shape == (16, 2, 2)
    assert torch.equal(qparams[0, 0], torch.tensor([1.0, 8.0]))
    assert torch.all(codes == 0xF0)                       # the even column (0) low, the odd one (15) high
    assert torch.equal(quant.unpack_int4(codes).float(), w)


# ---- a store of real files -----------------------------------------------------------------------

H = 128


@pytest.fixture
def big_experts(tmp_path):
    """Experts whose sizes int4 allows (multiples of 128 and 16), two intermediate sizes."""
    return make_expert_file(tmp_path / "q.safetensors", [0, 1], list(range(4)),
                            intermediate=lambda e: 128 if e % 2 else 256, hidden=H)


@pytest.fixture(params=["native", "torch"])
def kernels(request, monkeypatch):
    """Each kernel set in turn (workers/quant.py): the native one, then torch's (MOESHARD_NATIVE=0)."""
    if request.param == "native":
        require("native")
    else:
        monkeypatch.setenv(native.ENV, "0")
    native.ops.cache_clear()
    yield request.param
    native.ops.cache_clear()     # monkeypatch restores the environment next; ops() is re-read after


def _store(specs, expert_dtype, group, dtype=torch.float32, **kw) -> ExpertStore:
    return ExpertStore(held_as(specs, expert_dtype, group), dtype=dtype, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("expert_dtype,group", FORMATS)
def test_kernels_equal_dequantize_then_matmul(big_experts, expert_dtype, group, dtype, kernels):
    specs, tensors = big_experts
    store = _store(specs, expert_dtype, group, dtype)
    x = torch.randn(5, H, generator=torch.Generator().manual_seed(2)).to(dtype)
    try:
        for key in [(0, 0), (1, 3)]:
            w = store.get(key)
            assert type(w).__name__ == ("Int8Weights" if expert_dtype == "int8" else "Int4Weights")
            kdt = quant.kernel_dtype(dtype)    # the scales are kept in it; torch's kernels also run in it
            ref_w = ExpertWeights(*(quantized_reference(t, expert_dtype, group, kdt)
                                    for t in file_weights(tensors, key)))
            assert type(w.q[0] if expert_dtype == "int8" else w.packed[0]) is torch.Tensor
            assert (w.q[0].dtype == torch.uint8 if expert_dtype == "int8" else w.native) == (kernels == "native")
            ref = expert_forward(ref_w, x.float() if kernels == "native" else x.to(kdt).float())
            out = w.forward(x)
            assert out.dtype == dtype
            err = (out.float() - ref).abs().max().item()
            assert err <= 2e-2 * ref.abs().max().item(), (key, expert_dtype, group, err)
    finally:
        store.close()


def test_slots_hold_4x_and_about_8x_more_experts(big_experts):
    specs, _ = big_experts
    sizes = {}
    for fmt, group in [(None, 0), ("int8", 0), ("int4", 128)]:
        store = _store(specs, fmt, group, torch.bfloat16)
        sizes[fmt] = store.slot_bytes
        store.close()
    fp32 = ExpertStore(specs, dtype=torch.float32)
    budget = 2 * fp32.slot_bytes                 # two fp32 experts
    fp32.close()
    assert 3.9 <= 2 * sizes[None] / sizes["int8"] <= 4.0      # vs fp32: bf16 slots are half
    assert 7.0 <= 2 * sizes[None] / sizes["int4"] <= 8.0
    store = _store(specs, "int4", 128, torch.bfloat16, budget_bytes=budget)
    try:
        assert store.num_slots == min(len(specs), budget // sizes["int4"]) >= 8   # every expert: 8 of them
        assert store.stats()["slot_bytes"] == sizes["int4"]
    finally:
        store.close()


@pytest.mark.parametrize("expert_dtype,group", [("int8", 0), ("int4", 64)])
def test_paged_and_spilled_equal_unpaged(big_experts, tmp_path, expert_dtype, group):
    specs, _ = big_experts
    order = [(0, 0), (0, 1), (1, 2), (0, 0), (1, 3), (0, 2), (1, 0), (0, 1), (1, 2)]
    x = torch.randn(3, H, generator=torch.Generator().manual_seed(4))

    def outputs(**kw):
        store = _store(specs, expert_dtype, group, **kw)
        try:
            return [store.get(k).forward(x) for k in order], store.stats()
        finally:
            store.close()

    full, _ = outputs()
    probe = _store(specs, expert_dtype, group)
    one_slot = probe.slot_bytes
    probe.close()
    paged, st = outputs(budget_bytes=2 * one_slot)
    assert st["evictions"] > 0
    spill = tmp_path / "spill"
    outputs(budget_bytes=2 * one_slot, spill_dir=spill)          # writes the quantized images
    spilled, st = outputs(budget_bytes=2 * one_slot, spill_dir=spill)
    assert st["spill_reads"] > 0 and st["spill_writes"] == 0
    assert all(p.name.startswith("L") and expert_dtype in p.name for p in spill.iterdir())
    for a, b, c in zip(full, paged, spilled):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_group_size_that_does_not_divide_is_one_clear_line(tmp_path):
    specs, _ = make_expert_file(tmp_path / "odd.safetensors", [0], [0, 1], intermediate=lambda e: 48, hidden=64)
    with pytest.raises(ValueError, match=r"group_size 64 needs hidden size 64 and intermediate size 48") as e:
        held_as(specs, "int4", 64)
    assert "\n" not in str(e.value) and "int8" in str(e.value)
    with pytest.raises(ValueError, match="group_size must be one of 32, 64, 128"):
        held_as(specs, "int4", 48)
    held_as(specs, "int8", 0)                   # int8 has no groups: any size


# ---- every family end to end ---------------------------------------------------------------------

# expert sizes int4 allows: hidden 64, expert intermediate 32
SIZES = {"mixtral": dict(hidden_size=64, intermediate_size=32), "olmoe": dict(hidden_size=64, intermediate_size=32)}


def _family(checkpoint, family):
    return checkpoint(family, **SIZES.get(family, dict(hidden_size=64, moe_intermediate_size=32)))


def fake_quantized_copy(src: Path, dst: Path, expert_dtype: str, group: int) -> Path:
    """A float checkpoint whose routed-expert weights are replaced by quantize-then-dequantize
    (the plain reference; moeshard then computes it with F.linear)."""
    import shutil
    shutil.copytree(src, dst)
    names = Coordinator_names(src)
    for f in dst.glob("*.safetensors"):
        with safe_open(str(f), "pt") as fi:
            tensors = {n: fi.get_tensor(n) for n in fi.keys()}
        for n in tensors:
            if n in names:
                # scales rounded as the kernels hold them (bf16), see workers/quant.py kernel_dtype
                tensors[n] = quantized_reference(tensors[n], expert_dtype, group,
                                                 quant.kernel_dtype(tensors[n].dtype)).to(tensors[n].dtype)
        save_file(tensors, str(f), metadata={"format": "pt"})
    return dst


def Coordinator_names(path: Path) -> set[str]:
    from coordinator.checkpoint import Checkpoint
    return Checkpoint.open(path).expert_names()


@pytest.mark.parametrize("expert_dtype,group", [("int8", 0), ("int4", 32)])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_equals_the_dequantized_reference(family, expert_dtype, group, checkpoint, tmp_path):
    path = _family(checkpoint, family)
    ref_path = fake_quantized_copy(path, tmp_path / "fake", expert_dtype, group)
    ids, mask = make_prompts((7, 4, 1), seed=5)
    with Coordinator.from_pretrained(ref_path) as c:
        ref = c.forward(ids, attention_mask=mask)
    with Coordinator.from_pretrained(path, expert_dtype=expert_dtype, group_size=group or 64) as c:
        ours = c.forward(ids, attention_mask=mask)
        actor = c.stats()["experts"]["actors"][0]
    with Coordinator.from_pretrained(path) as c:
        dense = c.forward(ids, attention_mask=mask)
        ratio = c.stats()["experts"]["actors"][0]["slot_bytes"] / actor["slot_bytes"]
    m = mask.bool()
    diff, effect = (ours - ref)[m].abs(), (dense - ref)[m].abs()
    # the kernels run the experts with bf16 activations (their fast path): rounding of that size,
    # next to the quantization's own effect (int4: ~20x larger; int8: about 2x)
    assert diff.max().item() <= 0.06 and diff.mean().item() <= 0.01, \
        f"{family} {expert_dtype}: logit diff max {diff.max().item():.3g} mean {diff.mean().item():.3g}"
    assert effect.mean().item() > diff.mean().item()
    assert ratio > (3.5 if expert_dtype == "int8" else 5.0), ratio
    assert (ours - dense).abs().max().item() > 0       # the experts really were quantized


# ---- moeshard quantize ---------------------------------------------------------------------------

@pytest.mark.parametrize("expert_dtype,group", [("int8", 0), ("int4", 32)])
def test_quantized_checkpoint_equals_quantize_at_read(checkpoint, tmp_path, expert_dtype, group):
    src = checkpoint("qwen3_moe", shards=2, hidden_size=64, moe_intermediate_size=32)
    dst = tmp_path / "q"
    r = quantize_checkpoint(src, dst, expert_dtype, group or 64, progress=False)
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg[quant.CONFIG_KEY] == {"expert_dtype": expert_dtype, "group_size": group,
                                     "layout_version": quant.LAYOUT_VERSION}
    assert (dst / "model.safetensors.index.json").is_file() and len(list(dst.glob("*.safetensors"))) >= 2
    assert r.bytes_in / r.bytes_out > (3.5 if expert_dtype == "int8" else 5.0)
    with Coordinator.from_pretrained(src, expert_dtype=expert_dtype, group_size=group or 64) as c:
        at_read = c.forward(IDS)
        st = c.stats()["experts"]
        read_before = st["bytes_read"] / st["loads"]
    with Coordinator.from_pretrained(dst) as c:
        stored = c.forward(IDS)
        st = c.stats()["experts"]
        read_after = st["bytes_read"] / st["loads"]
    assert torch.equal(at_read, stored)                 # fp32 scales in an fp32 file: the same bytes
    # the disk tier reads the quantized bytes: per expert loaded (how many prefetches land first varies)
    assert read_before / read_after > 3.5
    # the same format asked for explicitly is fine; another one is a clear error
    with Coordinator.from_pretrained(dst, expert_dtype=expert_dtype, group_size=group or 64) as c:
        assert torch.equal(c.forward(IDS), stored)
    other = "int4" if expert_dtype == "int8" else "int8"
    with pytest.raises(CheckpointError, match="already quantized as"):
        Coordinator.from_pretrained(dst, expert_dtype=other, group_size=32)


def test_quantize_refuses_dst_and_leaves_nothing_half_written(checkpoint, tmp_path):
    src = checkpoint("mixtral", hidden_size=64, intermediate_size=32)
    dst = tmp_path / "q"
    dst.mkdir()
    (dst / "keep").write_text("mine")
    with pytest.raises(FileExistsError, match="--force"):
        quantize_checkpoint(src, dst, "int8", progress=False)
    with pytest.raises(CheckpointError, match="group_size 128"):   # 64 is not a multiple of 128
        quantize_checkpoint(src, dst, "int4", 128, force=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"] and (dst / "keep").read_text() == "mine"
    quantize_checkpoint(src, dst, "int4", 32, force=True, progress=False)
    assert not (dst / "keep").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["q"]
    with pytest.raises(CheckpointError, match="already quantized"):
        quantize_checkpoint(dst, tmp_path / "again", "int8", progress=False)


def _rewrite(path: Path, edit) -> None:
    f = next(path.glob("*.safetensors"))
    with safe_open(str(f), "pt") as fi:
        tensors = {n: fi.get_tensor(n) for n in fi.keys()}
    edit(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})


def test_quantized_checkpoint_with_missing_or_misshaped_scales(checkpoint, tmp_path):
    src = checkpoint("olmoe", hidden_size=64, intermediate_size=32)
    scale = "model.layers.1.mlp.experts.2.up_proj.weight_scale"
    for what, edit in (("missing", lambda t: t.pop(scale)),
                       ("has shape", lambda t: t.__setitem__(scale, t[scale][:, :1].contiguous()))):
        dst = quantize_checkpoint(src, tmp_path / what.replace(" ", "-"), "int4", 32, progress=False).path
        _rewrite(dst, edit)
        with pytest.raises(CheckpointError, match=rf"{scale}.*{what}|{what}.*{scale}") as e:
            Coordinator.from_pretrained(dst)
        assert "\n" not in str(e.value)


# ---- the embedded model: CLI, perplexity -------------------------------------------------------------

def test_quantize_plan_and_eval_commands_on_the_embedded_model(tmp_path, capsys):
    dst = tmp_path / "pydoc-int4"
    assert main(["quantize", str(MODEL), str(dst), "--expert-dtype", "int4", "--group-size", "64"]) == 0
    assert "int4/g64" in capsys.readouterr().out
    assert main(["quantize", str(MODEL), str(dst), "--expert-dtype", "int4"]) == 1
    assert "--force" in capsys.readouterr().err
    assert main(["plan", str(dst), "--workers", "2"]) == 0
    quantized_plan = capsys.readouterr().out
    assert main(["plan", str(MODEL), "--workers", "2"]) == 0
    dense_plan = capsys.readouterr().out
    assert "experts int4/g64" in quantized_plan and "experts as stored" in dense_plan

    def total(plan: str) -> float:           # "routed experts total: 7.5 MiB"
        value, unit = plan.split("routed experts total: ")[1].split()[:2]
        return float(value) * {"MiB": 2**20, "MB": 10**6, "KiB": 2**10, "kB": 10**3}[unit]
    assert 6.0 < total(dense_plan) / total(quantized_plan) < 8.0      # fp32 compute: 7.1x at g64
    text = tmp_path / "t.txt"
    text.write_text(HELDOUT.read_text()[:3000])
    assert main(["eval", str(dst), "--text", str(text), "--dtype", "bfloat16"]) == 0
    stored = capsys.readouterr().out
    assert main(["eval", str(MODEL), "--text", str(text), "--dtype", "bfloat16", "--expert-dtype", "int4"]) == 0
    at_read = capsys.readouterr().out
    assert stored == at_read and stored.startswith("perplexity: ")   # bf16 scales either way: same bits
    ppl = float(stored.split()[1])
    assert 1 < ppl < 1000
    text.write_text("  \n")
    assert main(["eval", str(MODEL), "--text", str(text)]) == 1
    assert "empty" in capsys.readouterr().err


def test_perplexity_is_the_sliding_window_of_the_guide():
    with Coordinator.from_pretrained(MODEL) as c:
        ids = torch.tensor(c.tokenizer.encode(HELDOUT.read_text()[:2000]).ids)
        n = ids.numel()
        # one window: exp(mean next-token cross-entropy) of the whole sequence
        logits = c.forward(ids[None])[0]
        whole = math.exp(torch.nn.functional.cross_entropy(logits[:-1].double(), ids[1:]).item())
        assert math.isclose(c.perplexity(ids, max_length=n), whole, rel_tol=1e-9)
        assert math.isclose(c.perplexity(ids[None].tolist()[0], max_length=n), whole, rel_tol=1e-9)
        # windows of 128 by 64: each token scored once, with at least 64 tokens of context after the first
        nll, prev = 0.0, 0
        for begin in range(0, n, 64):
            end = min(begin + 128, n)
            lp = torch.log_softmax(c.forward(ids[None, begin:end])[0].double(), -1)
            for pos in range(max(prev, begin + 1), end):
                nll -= lp[pos - begin - 1, ids[pos]].item()
            prev = end
            if end == n:
                break
        assert math.isclose(c.perplexity(ids, max_length=128, stride=64), math.exp(nll / (n - 1)), rel_tol=1e-9)
        for bad, match in (("", "empty"), ("   ", "empty"), (ids[:1], "at least two tokens")):
            with pytest.raises(ValueError, match=match):
                c.perplexity(bad)
        with pytest.raises(ValueError, match="stride"):
            c.perplexity(ids, max_length=64, stride=65)


def test_bench_scenario_7_runs_on_the_tiny_checkpoint(tmp_path, monkeypatch):
    """The bench rows run end to end (figures meaningless at this size; no timing asserted)."""
    from bench import make_checkpoint as mk
    from bench import scenarios as S

    from bench import llama_cpp

    tiny = mk.make_checkpoint(tmp_path / "tiny", "tiny")
    monkeypatch.setattr(S, "cgroups_usable", lambda: "needs root (memory cgroups and drop_caches)")
    # fetch=False: the llama.cpp peer runs only where its converter is already here (tests never download)
    peer = llama_cpp.available(fetch=False) is None
    res = S.run_scenario(7, S.Ctx(ckpt=tiny, params=S.Params.for_mode(False, True), threads=1, tiny=True,
                                  log_dir=tmp_path / "logs", fetch=False))
    assert res["status"] == "ok", res.get("reason")
    ids = {f["id"] for f in res["figures"]}
    want = {"s7.b1.stored", "s7.b1.int8", "s7.b1.int4", "s7.b1.int4-bf16"}
    llama_rows = {f"s7.b1.{t}.llama_cpp" for t in ("stored", "int8", "int4")} | \
        {f"s7.b1.{t}.llama_cpp_experts" for t in ("int8", "int4")}
    assert ids == want | (llama_rows if peer else set())
    assert all(f["value"] and f["peer_value"] for f in res["figures"])
    assert any("llama" in n for n in res["notes"]) and any("out-of-core rows skipped" in n for n in res["notes"])
    assert any("peer skipped" in n for n in res["notes"]) != peer
