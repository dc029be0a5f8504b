"""The llama.cpp benchmark peer (bench/llama_cpp.py, the llama_cpp system of bench/child.py).

Its speed means something only if it computes the same model: the GGUF f32 file that llama.cpp's own
converter writes from the tiny bench checkpoint must give transformers' logits and greedy tokens on the
same ids. Then the quantized files, and the bench rows end to end (no timing asserted).
"""
from __future__ import annotations

import argparse

import sys

import numpy as np
import pytest
import torch

from bench import llama_cpp as L
from bench import make_checkpoint as mk
from bench import results as R
from bench import run as bench_run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return mk.make_checkpoint(tmp_path_factory.mktemp("llama") / "tiny", "tiny")


def _llama(path, **kw):
    from llama_cpp import GGML_TYPE_F32, Llama

    return Llama(model_path=str(path), n_threads=1, n_threads_batch=1, n_ctx=128, use_mmap=False,
                 type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, verbose=False, **kw)


def _ids(n: int = 16) -> torch.Tensor:
    return torch.randint(3, mk.PRESETS["tiny"].vocab, (1, n), generator=torch.Generator().manual_seed(0))


def test_missing_converter_is_one_clear_line(tmp_path, monkeypatch):
    """Offline, an absent converter is an error naming the one command that fetches it; nothing downloads."""
    monkeypatch.setattr(L, "SRC_CACHE", tmp_path / "src")
    with pytest.raises(L.LlamaCppError) as e:
        L.converter(fetch=False)
    msg = str(e.value)
    assert "\n" not in msg and "pip" in msg
    if L.installed_version():
        assert "pip download llama-cpp-python==" in msg and not any((tmp_path / "src").glob("*.tar.gz"))
    with pytest.raises(L.LlamaCppError, match="not a checkpoint folder"):
        L.gguf_f32(tmp_path)
    with pytest.raises(L.LlamaCppError, match="unknown llama.cpp type 'Q5_K'"):
        L.quantized(tmp_path, "Q5_K")


@pytest.mark.requires("llama_cpp")
def test_gguf_f32_computes_the_same_model_as_transformers(tiny):
    from transformers import AutoModelForCausalLM

    f32 = L.gguf_f32(tiny)
    assert f32 == L.out_dir(tiny) / "f32.gguf" and L.gguf_f32(tiny) == f32   # cached
    ids = _ids()
    ref = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(ids).logits[0].numpy()
    llm = _llama(f32, logits_all=True)
    try:
        llm.eval(ids[0].tolist())
        got = np.array(llm.scores[: ids.shape[1]])
        # Both compute in f32 (weights, activations, KV cache); they differ only in summation order and
        # in how RoPE and softmax are evaluated, a few ulps per op through 2 layers: the logits (std ~1,
        # max ~3.5) agree to 2.4e-6 here. 1e-4 leaves 40x for other SIMD paths and is far below any real
        # difference (a wrong RoPE layout, expert order or routing normalisation moves logits by 0.1-1).
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
        # greedy decoding from the same ids picks the same tokens
        with torch.no_grad():
            hf = ref.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0,
                              attention_mask=torch.ones_like(ids))[0, ids.shape[1]:].tolist()
        llm.reset()
        gen = llm.generate(ids[0].tolist(), temp=0.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0)
        lc = [int(next(gen)) for _ in range(8)]
        gen.close()
        assert lc == hf
    finally:
        llm.close()


@pytest.mark.requires("llama_cpp")
def test_q8_0_and_q4_0_files_are_written_and_load(tiny):
    f32 = L.gguf_f32(tiny)
    ids = _ids()[0].tolist()
    ref = _llama(f32, logits_all=True)
    ref.eval(ids)
    want = np.array(ref.scores[: len(ids)])
    ref.close()
    sizes = {"f32": f32.stat().st_size}
    # cosine of each position's logits against the f32 file's. Q8_0 rounds each weight to 1/254 of its
    # block's range (~0.2% rms); Q4_0 to 1/14 (~8% rms on these Gaussian weights, every matmul of 2 layers,
    # embeddings and attention included): measured here min/mean 0.9997/0.9998 and 0.89/0.97. Another
    # model's logits would be uncorrelated (cosine ~0), so these bounds still say "the same model".
    for kind, min_cos, mean_cos in (("Q8_0", 0.999, 0.999), ("Q4_0", 0.8, 0.95)):
        path = L.quantized(tiny, kind)
        assert path == L.out_dir(tiny) / f"{kind.lower()}.gguf" and L.gguf_file(tiny, kind) == path
        sizes[kind] = path.stat().st_size
        llm = _llama(path, logits_all=True)
        try:
            assert llm.n_vocab() == mk.PRESETS["tiny"].vocab
            llm.eval(ids)
            got = np.array(llm.scores[: len(ids)])
        finally:
            llm.close()
        cos = (got * want).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))
        assert cos.min() > min_cos and cos.mean() > mean_cos, (kind, cos)
    assert sizes["f32"] > sizes["Q8_0"] > sizes["Q4_0"]


@pytest.mark.requires("llama_cpp")
def test_experts_only_files_quantize_the_experts_alone(tiny, monkeypatch):
    """Q8_0-experts / Q4_0-experts: the routed experts quantized, every other tensor f32 and unchanged."""
    f32 = L.gguf_f32(tiny)
    monkeypatch.syspath_prepend(str(L.converter().parent / "gguf-py"))   # llama.cpp's own reader
    monkeypatch.delitem(sys.modules, "gguf", raising=False)
    import gguf

    ref = {t.name: t for t in gguf.GGUFReader(f32).tensors}
    for kind in ("Q8_0", "Q4_0"):
        path = L.gguf_file(tiny, f"{kind}-experts")
        assert path == L.out_dir(tiny) / f"{kind.lower()}-experts.gguf"
        got = {t.name: t for t in gguf.GGUFReader(path).tensors}
        experts = [n for n in got if n.endswith("_exps.weight")]
        assert got.keys() == ref.keys() and experts
        for name, t in got.items():
            if name in experts:
                assert t.tensor_type.name == kind, name
            else:
                assert t.tensor_type == ref[name].tensor_type and np.array_equal(t.data, ref[name].data), name
        _llama(path, logits_all=True).close()      # and llama.cpp loads it
    sys.modules.pop("gguf", None)


@pytest.mark.requires("llama_cpp")
def test_bench_records_llama_cpp_rows(tiny, tmp_path, monkeypatch):
    """`python -m bench.run --scenario 1,7 --tiny --workers 0` with the peer: its rows are recorded."""
    monkeypatch.setattr(mk, "CACHE_DIR", tmp_path / "cache")
    args = bench_run.add_bench_arguments(argparse.ArgumentParser()).parse_args(
        ["--tiny", "--threads", "1", "--no-progress", "--out", str(tmp_path), "--machine", "llama",
         "--scenario", "1,7", "--workers", "0", "--no-fetch"])
    assert bench_run.run_bench(args, ["--scenario", "1,7"]) == 0
    doc = R.load(R.latest(tmp_path))
    s1, s7 = doc["scenarios"]["1"], doc["scenarios"]["7"]
    assert s1["status"] == "ok" and s7["status"] == "ok", (s1.get("reason"), s7.get("reason"))
    rows = {f["id"]: f for sc in (s1, s7) for f in sc["figures"]}
    want = {"s1.b1.0w.llama_cpp": None, "s7.b1.stored.llama_cpp": 0.8, "s7.b1.int8.llama_cpp": 1.0,
            "s7.b1.int4.llama_cpp": 1.0, "s7.b1.int8.llama_cpp_experts": 1.0, "s7.b1.int4.llama_cpp_experts": 1.0}
    for fid, target in want.items():
        f = rows[fid]
        assert f["value"] and f["peer_value"] and f["ratio"] and f["target"] == target, f
        assert f["peer"].startswith("llama.cpp")
    assert not any("peer skipped" in n for sc in (s1, s7) for n in sc["notes"])
    r7 = s7["details"]["rounds"]
    for tag in ("stored", "int8", "int4"):
        lc, ms = r7[tag]["llama.cpp"], r7[tag]["moeshard"]
        assert len(lc) == len(ms) == 2 and all(x["steps"] == y["steps"] and x["batch"] == 1 for x, y in zip(lc, ms))
    assert "llama.cpp" not in r7["int4-bf16"]


@pytest.mark.requires("llama_cpp")
@pytest.mark.requires("cgroups")
def test_scenario_2_records_the_llama_cpp_mmap_row(tmp_path, monkeypatch):
    """Scenario 2 (memory cgroups): llama.cpp f32 memory-mapped in its own cgroup, in the same warm rounds."""
    monkeypatch.setattr(mk, "CACHE_DIR", tmp_path / "cache")
    args = bench_run.add_bench_arguments(argparse.ArgumentParser()).parse_args(
        ["--tiny", "--threads", "1", "--no-progress", "--out", str(tmp_path), "--machine", "llama",
         "--scenario", "2", "--ooc-workers", "0", "--no-fetch"])
    assert bench_run.run_bench(args, ["--scenario", "2"]) == 0
    s2 = R.load(R.latest(tmp_path))["scenarios"]["2"]
    assert s2["status"] == "ok", s2.get("reason")
    f = {f["id"]: f for f in s2["figures"]}["s2.llama_cpp.0w"]
    assert f["value"] and f["peer_value"] and f["ratio"] and f["target"] is None
    by_state = s2["details"]["rounds_0w"]
    rounds = by_state["warm"]["llama.cpp"]      # warm rounds only: its page cache is its expert cache
    assert rounds and all(r["state"] == "warm" and r["batch"] == 1 and r["disk_read_bytes"] >= 0 for r in rounds)
    assert "llama.cpp" not in by_state["cold"]
