"""workers/native: the decode kernels against plain PyTorch, their invariants, and their pool's idling.

Low-bit results differ from dequantize-then-matmul by the activations' int8 rounding (per 32
inputs, as llama.cpp's Q8 activations) and float summation order; the dense GEMV by summation
order only. What must hold exactly: the same row gives the same bits on any thread count and
wherever it sits in the batch, which is what keeps in-process, distributed and paged runs equal."""
from __future__ import annotations

import time

import psutil
import pytest
import torch
import torch.nn.functional as F

from workers import native, quant
from workers.kernels import DECODE_ROWS, linear

pytestmark = pytest.mark.requires("native")

N, K = 96, 256


def _x(m: int, k: int = K, seed: int = 0) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed))


def _w(n: int = N, k: int = K, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05


def _int8(w, scale_dtype=torch.bfloat16):
    q, s = quant.quantize_int8(w, scale_dtype)
    return quant.hold_int8(q, True), s, quant.dequantize_int8(q, s)


def _int4(w, group, scale_dtype=torch.bfloat16):
    codes, qp = quant.quantize_int4(w, group, scale_dtype)
    dev = torch.device("cpu")
    return (quant.pack_int4(codes, dev, True), quant.int4_kernel_qparams(qp, True),
            quant.dequantize_int4(codes, qp, group))


def _rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _rounded_activations(x: torch.Tensor) -> torch.Tensor:
    """x as the low-bit kernels see it: int8 per 32 inputs, scale max|x| / 127, round half to even."""
    b = x.double().reshape(x.shape[0], -1, 32)
    d = b.abs().amax(-1, keepdim=True) / 127
    return (torch.round(b / torch.where(d == 0, 1, d)) * d).reshape(x.shape)


@pytest.mark.parametrize("m", [1, 3, 40])
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_int8_equals_dequantize_then_matmul(m, scale_dtype):
    codes, s, deq = _int8(_w(), scale_dtype)
    x = _x(m)
    assert _rel(native.ops().int8_linear(x, codes, s), F.linear(x, deq)) < 1.5e-2


@pytest.mark.parametrize("m", [1, 3, 40])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_int4_equals_dequantize_then_matmul(m, group, scale_dtype):
    packed, qp, deq = _int4(_w(), group, scale_dtype)
    x = _x(m)
    assert _rel(native.ops().int4_linear(x, packed, qp, group), F.linear(x, deq)) < 1.5e-2


def test_int4_layout_is_the_documented_one():
    # rows in groups of 4; per group, per 128-input span, each row's 64 bytes in turn; in a row's
    # span, inputs j and j + 64 share byte j, j in the low nibble
    q = (torch.arange(8 * 256).reshape(8, 256) * 7).remainder(16).to(torch.uint8)   # [8, 256] codes
    portable = q[:, 0::2] | (q[:, 1::2] << 4)
    packed = quant.pack_int4(portable, torch.device("cpu"), True)
    assert packed.shape == (8, 128)
    flat = packed.reshape(-1)
    for row, span, j in ((0, 0, 5), (5, 1, 5), (7, 1, 63), (2, 0, 0)):
        group, i = divmod(row, 4)
        at = group * 4 * 128 + span * 4 * 64 + i * 64 + j
        want = q[row, span * 128 + j] | (q[row, span * 128 + 64 + j] << 4)
        assert flat[at].item() == want.item(), (row, span, j)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_error_is_the_activations_rounding_only(fmt):
    # with x rounded as the kernels round it, what is left is float summation order. int4's zeros
    # multiply the exact sum of x over their group: w = (q - 8) * s + z, so x.w = sum(xr (q - 8) s) + z sum(x)
    w, x = _w(), _x(3)
    zeros = torch.zeros(N, K, dtype=torch.float64)
    if fmt == "int8":
        codes, s, deq = _int8(w, torch.float32)
        got = native.ops().int8_linear(x, codes, s)
    else:
        codes, qp, deq = _int4(w, 64, torch.float32)
        got = native.ops().int4_linear(x, codes, qp, 64)
        zeros = quant.quantize_int4(w, 64, torch.float32)[1][..., 1].double().repeat_interleave(64, 1)
    xr = _rounded_activations(x)
    ref = xr @ (deq.double() - zeros).T + x.double() @ zeros.T
    scale = xr.abs() @ deq.double().abs().T + x.double().abs() @ zeros.abs().T   # the size of the terms summed
    assert ((got.double() - ref).abs() / scale).max() < 1e-6


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dense_linear_equals_f_linear(wdtype):
    w = _w().to(wdtype)
    for m in (1, 2, DECODE_ROWS):
        x = _x(m)
        got = native.ops().dense_linear(x, w)
        assert torch.allclose(got, F.linear(x, w.float()), rtol=0, atol=1e-5 * F.linear(x, w.float()).abs().max())


def test_linear_takes_the_native_path_for_decode_rows_only(monkeypatch):
    w, b = _w(), torch.randn(N)
    calls = []
    real = native.ops().dense_linear
    monkeypatch.setattr(native, "ops", lambda: type("Ops", (), {"dense_linear": lambda *a: calls.append(1) or real(*a)}))
    x = _x(DECODE_ROWS).view(2, DECODE_ROWS // 2, K)
    out = linear(x, w, b)
    assert calls == [1] and out.shape == (2, DECODE_ROWS // 2, N)
    assert torch.allclose(out, F.linear(x, w, b), atol=1e-5)
    linear(_x(DECODE_ROWS + 1), w, b)                  # prefill-sized: torch's GEMM
    assert calls == [1]


I = 384   # the experts' intermediate size (a multiple of 128, the down weight's input size; not K, so a swapped gate and down cannot pass)


def _expert_weights(fmt: str, seed: int = 3):
    """gate [I, K], up [I, K], down [K, I] held for the native kernels, and the fused call's weight arguments."""
    ws = [_w(I, K, seed), _w(I, K, seed + 1), _w(K, I, seed + 2)]
    if fmt == "dense":
        return ws, ws
    held = [_int8(w)[:2] if fmt == "int8" else _int4(w, 64)[:2] for w in ws]
    return held, [t for pair in held for t in pair]


def _op_by_op(fmt: str, held, x, act):
    o, a = native.ops(), getattr(F, act)
    if fmt == "dense":
        (g, u, d) = held
        return o.dense_linear(a(o.dense_linear(x, g)) * o.dense_linear(x, u), d)
    if fmt == "int8":
        (g, gs), (u, us), (d, ds) = held
        return o.int8_linear(a(o.int8_linear(x, g, gs)) * o.int8_linear(x, u, us), d, ds)
    (g, gs), (u, us), (d, ds) = held
    return o.int4_linear(a(o.int4_linear(x, g, gs, 64)) * o.int4_linear(x, u, us, 64), d, ds, 64)


def _fused(fmt: str, args, x, act):
    o = native.ops()
    if fmt == "int4":
        return o.int4_expert(x, *args, 64, act)
    return getattr(o, f"{fmt}_expert")(x, *args, act)


@pytest.mark.parametrize("fmt", ["int8", "int4", "dense"])
@pytest.mark.parametrize("act", ["silu", "gelu", "relu"])
@pytest.mark.parametrize("m", [1, 3])
def test_fused_expert_gives_the_bits_of_its_ops_one_by_one(fmt, act, m):
    held, args = _expert_weights(fmt)
    x = _x(m)
    fused = _fused(fmt, args, x, act)
    assert fused.shape == (m, K)
    assert torch.equal(fused, _op_by_op(fmt, held, x, act))


@pytest.mark.parametrize("fmt", ["int8", "int4", "dense"])
def test_fused_expert_bad_input_is_a_clear_error(fmt):
    held, args = _expert_weights(fmt)
    with pytest.raises(RuntimeError, match="unknown activation 'tanh'"):
        _fused(fmt, args, _x(1), "tanh")
    swapped = list(args)
    n = len(args) // 3
    swapped[:n], swapped[2 * n:] = args[2 * n:], args[:n]        # down where gate belongs
    with pytest.raises(RuntimeError):
        _fused(fmt, swapped, _x(1), "silu")


def _all_kernels(x):
    w = _w(N, K)
    c8, s8, _ = _int8(w)
    p4, q4, _ = _int4(w, 64)
    o = native.ops()
    return [o.int8_linear(x, c8, s8), o.int4_linear(x, p4, q4, 64), o.dense_linear(x, w),
            *(_fused(fmt, _expert_weights(fmt)[1], x, "silu") for fmt in ("int8", "int4", "dense"))]


def test_same_bits_on_any_thread_count():
    before = torch.get_num_threads()
    x = _x(5)
    try:
        outs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(_all_kernels(x))
    finally:
        torch.set_num_threads(before)
    for other in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], other))


def test_a_row_gives_the_same_bits_wherever_it_sits_in_the_batch():
    x = _x(7)
    whole = _all_kernels(x)
    for i in (0, 3, 6):
        alone = _all_kernels(x[i:i + 1].clone())
        assert all(torch.equal(a[i:i + 1], b) for a, b in zip(whole, alone))


def test_idle_pool_workers_sleep():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x, w = _x(1, 1024), _w(2048, 1024)
        for _ in range(50):
            native.ops().dense_linear(x, w)         # wakes the pool's worker, which then spins a while
    finally:
        torch.set_num_threads(before)
    # past the 1 ms spin window the worker must be asleep: some 0.5 s window within 10 s uses < 5% of a core
    me, rates, deadline = psutil.Process(), [], time.monotonic() + 10
    while time.monotonic() < deadline and not (rates and rates[-1] < 0.05):
        t0, c0 = time.monotonic(), sum(me.cpu_times()[:2])
        time.sleep(0.5)                            # the measuring window, not a wait for a condition
        rates.append((sum(me.cpu_times()[:2]) - c0) / (time.monotonic() - t0))
    assert rates[-1] < 0.05, f"CPU while idle, cores per window: {rates}"


@pytest.mark.parametrize("call,match", [
    (lambda o, c, s: o.int8_linear(torch.randn(1, K, dtype=torch.float64), c, s), "contiguous float32"),
    (lambda o, c, s: o.int8_linear(torch.randn(1, K + 128), c, s), "inputs"),
    (lambda o, c, s: o.int4_linear(torch.randn(1, K), c[:, :K // 2].contiguous(), s, 48), "group size 48 must be a power of two"),
])
def test_bad_input_is_a_clear_error(call, match):
    codes, s, _ = _int8(_w())
    with pytest.raises(RuntimeError, match=match):
        call(native.ops(), codes, s)


def _attention_inputs(B, H, KV, S, D, seed=5):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, 1, D, generator=g)
    k = torch.randn(B, KV, S + 7, D, generator=g)[:, :, :S]      # views of a longer cache, as KVCache.update returns
    v = torch.randn(B, KV, S + 7, D, generator=g)[:, :, :S]
    mask = torch.zeros(B, 1, 1, S)
    mask[0, ..., : S // 3] = torch.finfo(torch.float32).min        # padding of the first sequence
    return q, k, v, mask


@pytest.mark.parametrize("B,H,KV,S,D", [(1, 16, 4, 37, 64), (3, 8, 8, 5, 16), (2, 4, 1, 100, 128), (1, 2, 2, 1, 24)])
def test_decode_attention_equals_sdpa(B, H, KV, S, D):
    q, k, v, mask = _attention_inputs(B, H, KV, S, D)
    got = native.ops().decode_attention(q, k, v, mask, 0.3)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=H != KV)
    assert got.shape == ref.shape
    assert (got - ref).abs().max() < 1e-5


def test_decode_attention_row_does_not_depend_on_its_batch():
    q, k, v, mask = _attention_inputs(3, 8, 2, 50, 64)
    whole = native.ops().decode_attention(q, k, v, mask, 0.125)
    for b in range(3):
        alone = native.ops().decode_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], mask[b:b + 1], 0.125)
        assert torch.equal(whole[b:b + 1], alone)


def test_attention_takes_the_native_kernel_for_decode_only(monkeypatch):
    from workers.kernels import attention
    calls = []
    real = native.ops().decode_attention
    monkeypatch.setattr(native, "ops", lambda: type("Ops", (), {"decode_attention": lambda *a: calls.append(1) or real(*a)}))
    q, k, v, mask = _attention_inputs(2, 8, 2, 20, 32)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert (attention(q, k, v, mask, None, gqa=True) - ref).abs().max() < 1e-5 and calls == [1]   # scale None: 1/sqrt(D)
    attention(q.repeat(1, 1, 3, 1), k, v, mask.repeat(1, 1, 3, 1), None, gqa=True)                 # 3 queries: torch's
    attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask.bfloat16(), None, gqa=True)            # bf16: torch's
    assert calls == [1]


@pytest.mark.parametrize("change,match", [
    (lambda q, k, v, m: (q.repeat(1, 1, 2, 1), k, v, m), "one query per sequence"),
    (lambda q, k, v, m: (q[:, :3], k, v, m), "multiple of kv heads"),
    (lambda q, k, v, m: (q, k, v, m[..., :-1]), "mask must be"),
    (lambda q, k, v, m: (q.double(), k, v, m), "float32"),
])
def test_decode_attention_bad_input_is_a_clear_error(change, match):
    with pytest.raises(RuntimeError, match=match):
        native.ops().decode_attention(*change(*_attention_inputs(2, 8, 2, 20, 32)), 0.1)


# ---- rms_norm and rope (rowops.cpp) -----------------------------------------------------------------

def _torch_rms(x, w, eps):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


def _torch_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 1024), (3, 2, 96), (5, 4, 64)])
def test_rms_norm_equals_the_reference(dtype, shape):
    g = torch.Generator().manual_seed(9)
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    w = (torch.rand(shape[-1], generator=g) + 0.5).to(dtype)
    got, ref = native.ops().rms_norm(x, w, 1e-6), _torch_rms(x, w, 1e-6)
    assert got.dtype == dtype and got.shape == ref.shape
    if dtype == torch.float32:
        assert _rel(got, ref) < 1e-6
    else:   # the sum of squares' order may move h by one bfloat16 step, never more
        assert ((got.float() - ref.float()).abs() <= ref.float().abs() * 2 ** -7 + 1e-6).all()
    for r in range(shape[0]):
        assert torch.equal(native.ops().rms_norm(x[r:r + 1], w, 1e-6), got[r:r + 1]), "a row alone gives its bits"


def test_rope_equals_the_reference():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, 6, 64, generator=g).transpose(1, 2)                  # [2, 6, 5, 64], as q after its view
    cos, sin = torch.randn(2, 1, 5, 64, generator=g), torch.randn(2, 1, 5, 64, generator=g)
    got = native.ops().rope(x, cos, sin)
    assert got.is_contiguous() and _rel(got, _torch_rope(x, cos, sin)) < 1e-6
    assert torch.equal(native.ops().rope(x[1:], cos[1:], sin[1:]), got[1:]), "a sequence alone gives its bits"
    with pytest.raises(RuntimeError, match="cos and sin"):
        native.ops().rope(x, cos[..., :32], sin[..., :32])
    with pytest.raises(RuntimeError, match="float32"):
        native.ops().rope(x.double(), cos, sin)


def test_rms_norm_and_rope_take_the_native_path_for_decode_rows_only(monkeypatch):
    from workers.kernels import rms_norm, rope
    calls = []
    real = native.ops()
    monkeypatch.setattr(native, "ops", lambda: type("Ops", (), {
        "rms_norm": lambda *a: calls.append("norm") or real.rms_norm(*a),
        "rope": lambda *a: calls.append("rope") or real.rope(*a)}))
    w, x2 = torch.rand(64) + 0.5, torch.randn(1, 2, 64)
    assert _rel(rms_norm(x2, w, 1e-5), _torch_rms(x2, w, 1e-5)) < 1e-6
    rms_norm(torch.randn(1, DECODE_ROWS + 1, 64), w, 1e-5)                     # a prefill: torch's
    x, cs = torch.randn(1, 4, 1, 64), torch.randn(1, 1, 1, 64)
    rope(x, cs, cs)
    rope(torch.randn(1, 4, DECODE_ROWS + 1, 64), torch.randn(1, 1, DECODE_ROWS + 1, 64),
         torch.randn(1, 1, DECODE_ROWS + 1, 64))                                 # a prefill: torch's
    assert calls == ["norm", "rope"]
