// Batch-1-first CPU kernels for weight-only int8 and int4 experts (AVX-512 VNNI).
//
// int8_expert / int4_expert / dense_expert run one routed expert, down(act(gate(x)) * up(x)), in one
// call (see "one routed expert" below); the linear ops run one weight.
//
// The low-bit ops take float32 activations x [M, K], quantize each row to int8 in blocks of 32 (one float32
// scale per block, as llama.cpp's Q8 activations), and run u8 x s8 dot products with vpdpbusd.
// Weights are held unsigned:
//   int8: u = q + 128, one scale per output channel:        w = (u - 128) * s[n]
//   int4: u = q in [0, 15], (scale, zero) per group of G:    w = (u - 8) * s + z
// The offset is folded into the dot product's starting value (-offset * the block's int8 sum),
// so the inner loop is load, unpack, one vpdpbusd, one convert, one multiply-add.
//
// Codes layout (K a multiple of 128):
//   int8 [N, K] uint8, plain row-major;
//   int4 N*K/2 bytes (viewed as [N, K/2] uint8; N a multiple of 4): rows in groups of 4 and, per
//   group, per span of 128 inputs, each of the 4 rows' 64 bytes in turn; byte j of a row's span
//   holds input j (low nibble) and j + 64 (high).
// Scales: int8 [N], int4 [N, K/G, 2] (scale, zero), bfloat16 or float32.
//
// Each output element is computed by one thread in a fixed order, so the result does not depend
// on the thread count. Work is split over output channels on pool.h's workers, as many as
// torch.get_num_threads() (the threads the rest of the model uses).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "pool.h"

namespace {

constexpr int64_t kChunk = 64;   // inputs per vpdpbusd (one zmm of bytes)
constexpr int64_t kBlock = 32;   // inputs per activation scale
constexpr int kInt4Rows = 4;     // int4 rows interleaved in the held codes, and computed together
constexpr int64_t kInt4Prefetch = 4096;   // bytes ahead of the int4 loads (2-8 KB measured alike, 1 KB ~10% slower)

struct QuantizedRows {
  std::vector<int8_t> q;        // [M, K]
  std::vector<float> dx;        // [M, K/32]  activation scale per block
  std::vector<int32_t> bsum;    // [M, K/64, 16] -(offset) * sum of each lane's 4 int8 values
  std::vector<float> xsum;      // [M, 2 K/G] 0, then the exact float sum of x, per weight group: int4's zeros
                                //            term is then a plain dot product with its (scale, zero) pairs
};

// Quantize rows of x to int8 per block of 32; `offset` is the weights' unsigned offset.
QuantizedRows quantize_rows(const float* x, int64_t M, int64_t K, int32_t offset, int64_t group) {
  QuantizedRows r;
  const int64_t nb = K / kBlock, nc = K / kChunk;
  r.q.resize(M * K);
  r.dx.resize(M * nb);
  r.bsum.resize(M * nc * 16);
  if (group) r.xsum.assign(M * 2 * (K / group), 0.f);
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    int8_t* qr = r.q.data() + m * K;
    for (int64_t b = 0; b < nb; ++b) {
      float amax = 0.f;
      for (int64_t j = 0; j < kBlock; ++j) amax = std::max(amax, std::fabs(xr[b * kBlock + j]));
      const float d = amax / 127.f;
      const float inv = d ? 1.f / d : 0.f;
      r.dx[m * nb + b] = d;
      for (int64_t j = 0; j < kBlock; ++j)
        qr[b * kBlock + j] = static_cast<int8_t>(std::nearbyint(xr[b * kBlock + j] * inv));
    }
    for (int64_t c = 0; c < nc; ++c)
      for (int l = 0; l < 16; ++l) {
        const int8_t* p = qr + c * kChunk + 4 * l;
        r.bsum[(m * nc + c) * 16 + l] = -offset * (int32_t(p[0]) + p[1] + p[2] + p[3]);
      }
    if (group)
      for (int64_t g = 0; g < K / group; ++g) {
        float s = 0.f;
        for (int64_t j = 0; j < group; ++j) s += xr[g * group + j];
        r.xsum[(m * (K / group) + g) * 2 + 1] = s;
      }
  }
  return r;
}


// n values of a bfloat16, float16 or float32 tensor, from element `i`, as float32 into dst.
inline void to_float(at::ScalarType t, const void* base, int64_t i, int64_t n, float* dst) {
  if (t == at::kFloat) {
    std::memcpy(dst, static_cast<const float*>(base) + i, n * sizeof(float));
    return;
  }
  const uint16_t* src = static_cast<const uint16_t*>(base) + i;
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = n - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1);
    const __m256i h = _mm256_maskz_loadu_epi16(k, src + j);
    const __m512 f = t == at::kBFloat16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
                                        : _mm512_cvtph_ps(h);
    _mm512_mask_storeu_ps(dst + j, k, f);
  }
}

// Per chunk: [v of block 2c] x 8 lanes, [v of block 2c + 1] x 8 lanes.
inline __m512 block_scales(const float* v, int64_t c) {
  return _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(v[2 * c]), _mm512_set1_ps(v[2 * c + 1]));
}

void check_scales(const at::Tensor& s) {
  const auto t = s.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf, "scales must be float32, bfloat16 or float16");
  TORCH_CHECK(s.is_contiguous() && s.device().is_cpu(), "scales must be a contiguous CPU tensor");
}

// Every check happens here, before any work reaches the pool: an exception on a worker thread ends the process.
void check_common(const at::Tensor& x, const at::Tensor& codes, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "x must be a contiguous float32 CPU [M, K] tensor");
  TORCH_CHECK(x.size(1) == K, "x has ", x.size(1), " inputs, the weight ", K);
  TORCH_CHECK(K % (2 * kChunk) == 0, "the input size ", K, " must be a multiple of ", 2 * kChunk);
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous(), "codes must be contiguous uint8");
}

// Rows of the weight are taken R at a time (R independent accumulators: more loads in flight
// and the activation loads shared); the tail of N one at a time.
template <int R>
inline void int8_rows(const uint8_t* w, int64_t K, const QuantizedRows& r, int64_t m, const float* s, float* o) {
  const int64_t nc = K / kChunk;
  const int8_t* xq = r.q.data() + m * K;
  const int32_t* bs = r.bsum.data() + m * nc * 16;
  const float* dx = r.dx.data() + m * (K / kBlock);
  __m512 acc[R];
  for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t c = 0; c < nc; ++c) {
    const __m512i xv = _mm512_loadu_si512(xq + c * kChunk);
    const __m512i bv = _mm512_loadu_si512(bs + c * 16);
    const __m512 dv = block_scales(dx, c);
    for (int i = 0; i < R; ++i) {
      const __m512i d = _mm512_dpbusd_epi32(bv, _mm512_loadu_si512(w + i * K + c * kChunk), xv);
      acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), dv, acc[i]);
    }
  }
  for (int i = 0; i < R; ++i) o[i] = s[i] * _mm512_reduce_add_ps(acc[i]);
}

// Rows [n0, n1) of an int8 weight [N, K] for every row of x (its quantized rows r) -> o [M, N].
void int8_range(int64_t n0, int64_t n1, int64_t N, int64_t M, int64_t K, const uint8_t* w, at::ScalarType st,
                const void* sp, const QuantizedRows& r, float* o) {
  std::vector<float> s(n1 - n0);
  float ob[4];
  to_float(st, sp, n0, n1 - n0, s.data());
  for (int64_t m = 0; m < M; ++m) {
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) {
      int8_rows<4>(w + n * K, K, r, m, s.data() + (n - n0), ob);
      for (int i = 0; i < 4; ++i) o[m * N + n + i] = ob[i];
    }
    for (; n < n1; ++n) int8_rows<1>(w + n * K, K, r, m, s.data() + (n - n0), o + m * N + n);
  }
}

void check_int8(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale) {
  check_common(x, codes, codes.size(1));
  check_scales(scale);
  TORCH_CHECK(scale.numel() == codes.size(0), "int8 scale must have one value per output channel (", codes.size(0), ")");
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale) {
  const int64_t N = codes.size(0), K = codes.size(1), M = x.size(0);
  check_int8(x, codes, scale);
  auto out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  const QuantizedRows r = quantize_rows(x.data_ptr<float>(), M, K, 128, 0);
  const uint8_t* w = codes.data_ptr<uint8_t>();
  const void* sp = scale.data_ptr();
  float* o = out.data_ptr<float>();
  moeshard::SpinPool::get().run(N, 16, at::get_num_threads(), [&](int64_t n0, int64_t n1) {
    int8_range(n0, n1, N, M, K, w, scale.scalar_type(), sp, r, o);
  });
  return out;
}

// The 4 rows i of a row group: sz[i] their (scale, zero) pairs per group as float32 [K/G, 2].
// One 64-byte load holds 128 codes of one row: the low nibbles are inputs [0, 64) of the span,
// the high ones [64, 128). The group's 4 rows are interleaved per span, so the loads run straight
// through memory (with 4 rows each only K/2 bytes long, row after row gave the hardware
// prefetcher streams too short to learn).
template <bool kUniform>   // kUniform: groups of >= 64 inputs (one scale per 64-input chunk)
inline void int4_rows(const uint8_t* w, int64_t K, int chunk_shift, int64_t ng, const QuantizedRows& r, int64_t m,
                      const float* const* sz, float* o) {
  const int64_t nc = K / kChunk;
  const int8_t* xq = r.q.data() + m * K;
  const int32_t* bs = r.bsum.data() + m * nc * 16;
  const float* dx = r.dx.data() + m * (K / kBlock);
  const float* xs = r.xsum.data() + m * ng * 2;
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 acc[kInt4Rows], acc1[kInt4Rows];   // two chains per row: the low and the high nibbles' chunks
  for (int i = 0; i < kInt4Rows; ++i) acc[i] = acc1[i] = _mm512_setzero_ps();
  for (int64_t c = 0; c < nc; c += 2) {
    const __m512i xv0 = _mm512_loadu_si512(xq + c * kChunk), xv1 = _mm512_loadu_si512(xq + (c + 1) * kChunk);
    const __m512i bv0 = _mm512_loadu_si512(bs + c * 16), bv1 = _mm512_loadu_si512(bs + (c + 1) * 16);
    const __m512 dv0 = block_scales(dx, c), dv1 = block_scales(dx, c + 1);
    const uint8_t* span = w + (c / 2) * (kInt4Rows * kChunk);
    for (int i = 0; i < kInt4Rows; ++i) {
      _mm_prefetch(reinterpret_cast<const char*>(span + kInt4Prefetch + i * kChunk), _MM_HINT_T0);
      const __m512i b = _mm512_loadu_si512(span + i * kChunk);
      const __m512i lo = _mm512_and_si512(b, low);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), low);
      __m512 s0, s1;
      if constexpr (kUniform) {
        s0 = _mm512_set1_ps(sz[i][2 * (c >> chunk_shift)]);
        s1 = _mm512_set1_ps(sz[i][2 * ((c + 1) >> chunk_shift)]);
      } else {   // groups of 32: two per chunk
        s0 = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(sz[i][4 * c]), _mm512_set1_ps(sz[i][4 * c + 2]));
        s1 = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(sz[i][4 * c + 4]), _mm512_set1_ps(sz[i][4 * c + 6]));
      }
      const __m512i d0 = _mm512_dpbusd_epi32(bv0, lo, xv0), d1 = _mm512_dpbusd_epi32(bv1, hi, xv1);
      acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0), _mm512_mul_ps(dv0, s0), acc[i]);
      acc1[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d1), _mm512_mul_ps(dv1, s1), acc1[i]);
    }
  }
  for (int i = 0; i < kInt4Rows; ++i) {   // + sum over groups of zero * sum(x): (scale, zero) . (0, sum(x))
    __m512 z = _mm512_add_ps(acc[i], acc1[i]);
    for (int64_t j = 0; j < 2 * ng; j += 16) {
      const __mmask16 k = 2 * ng - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (2 * ng - j)) - 1);
      z = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, sz[i] + j), _mm512_maskz_loadu_ps(k, xs + j), z);
    }
    o[i] = _mm512_reduce_add_ps(z);
  }
}

// Rows [n0, n1) (whole row groups) for every row of x.
template <bool kUniform>
void int4_range(int64_t n0, int64_t n1, int64_t N, int64_t M, int64_t K, int64_t group, const uint8_t* w,
                const QuantizedRows& r, const float* sz, float* o) {
  const int64_t ng = K / group;
  const int chunk_shift = group >= 128 ? __builtin_ctzll(group / kChunk) : 0;
  float ob[kInt4Rows];
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = n0; n < n1; n += kInt4Rows) {
      const float* rows[kInt4Rows];
      for (int i = 0; i < kInt4Rows; ++i) rows[i] = sz + (n - n0 + i) * ng * 2;
      int4_rows<kUniform>(w + n * (K / 2), K, chunk_shift, ng, r, m, rows, ob);
      for (int i = 0; i < kInt4Rows; ++i) o[m * N + n + i] = ob[i];
    }
}

// Rows [n0, n1) of an int4 weight for every row of x; this range's (scale, zero) pairs are
// converted to float32 once, for every row of x.
void int4_chunk(int64_t n0, int64_t n1, int64_t N, int64_t M, int64_t K, int64_t group, const uint8_t* w,
                at::ScalarType st, const void* qp, const QuantizedRows& r, float* o) {
  const int64_t ng = K / group;
  std::vector<float> sz((n1 - n0) * ng * 2);
  to_float(st, qp, n0 * ng * 2, (n1 - n0) * ng * 2, sz.data());
  if (group >= kChunk) int4_range<true>(n0, n1, N, M, K, group, w, r, sz.data(), o);
  else int4_range<false>(n0, n1, N, M, K, group, w, r, sz.data(), o);
}

void check_int4(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& qparams, int64_t group) {
  const int64_t N = codes.size(0), K = codes.size(1) * 2;
  check_common(x, codes, K);
  TORCH_CHECK(group >= kBlock && (group & (group - 1)) == 0 && K % group == 0,
              "group size ", group, " must be a power of two >= 32 that divides ", K);
  check_scales(qparams);
  TORCH_CHECK(qparams.numel() == N * (K / group) * 2, "int4 qparams must be [N, K/G, 2]");
  TORCH_CHECK(N % kInt4Rows == 0, "int4 weights need a multiple of ", kInt4Rows, " output channels, got ", N);
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& qparams, int64_t group) {
  const int64_t N = codes.size(0), K = codes.size(1) * 2, M = x.size(0);
  check_int4(x, codes, qparams, group);
  auto out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  const QuantizedRows r = quantize_rows(x.data_ptr<float>(), M, K, 8, group);
  const uint8_t* w = codes.data_ptr<uint8_t>();
  const void* qp = qparams.data_ptr();
  float* o = out.data_ptr<float>();
  moeshard::SpinPool::get().run(N / kInt4Rows, 16 / kInt4Rows, at::get_num_threads(), [&](int64_t g0, int64_t g1) {
    int4_chunk(g0 * kInt4Rows, g1 * kInt4Rows, N, M, K, group, w, qparams.scalar_type(), qp, r, o);
  });
  return out;
}

// x [M, K] float32 @ w [N, K] (float32 or bfloat16).T -> [M, N] float32, for small M (decode):
// each weight row is read once for all M rows of x. K a multiple of 16.
template <int R, bool kBf16>
inline void dense_rows(const void* w, int64_t K, const float* x, float* o) {
  __m512 acc[R];
  for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const __m512 xv = _mm512_loadu_ps(x + k);
    for (int i = 0; i < R; ++i) {
      __m512 wv;
      if constexpr (kBf16) {
        const uint16_t* p = static_cast<const uint16_t*>(w) + i * K + k;
        _mm_prefetch(reinterpret_cast<const char*>(p + R * K), _MM_HINT_T0);
        wv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(
            reinterpret_cast<const __m256i*>(p))), 16));
      } else {
        const float* p = static_cast<const float*>(w) + i * K + k;
        _mm_prefetch(reinterpret_cast<const char*>(p + R * K), _MM_HINT_T0);
        wv = _mm512_loadu_ps(p);
      }
      acc[i] = _mm512_fmadd_ps(wv, xv, acc[i]);
    }
  }
  for (int i = 0; i < R; ++i) o[i] = _mm512_reduce_add_ps(acc[i]);
}

template <bool kBf16>
void dense_range(int64_t n0, int64_t n1, int64_t N, int64_t M, int64_t K, const void* w, const float* x, float* o) {
  const int64_t item = kBf16 ? 2 : 4;
  float ob[4];
  for (int64_t m = 0; m < M; ++m) {
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) {
      dense_rows<4, kBf16>(static_cast<const char*>(w) + n * K * item, K, x + m * K, ob);
      for (int i = 0; i < 4; ++i) o[m * N + n + i] = ob[i];
    }
    for (; n < n1; ++n) dense_rows<1, kBf16>(static_cast<const char*>(w) + n * K * item, K, x + m * K, o + m * N + n);
  }
}

void check_dense(const at::Tensor& x, const at::Tensor& w) {
  const int64_t K = w.size(1);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu() && x.size(1) == K,
              "x must be a contiguous float32 CPU [M, K] tensor");
  TORCH_CHECK(w.is_contiguous() && w.device().is_cpu() && (w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16) && K % 16 == 0,
              "w must be a contiguous float32 or bfloat16 [N, K] tensor, K a multiple of 16");
}

void dense_chunk(int64_t n0, int64_t n1, int64_t N, int64_t M, const at::Tensor& w, const float* x, float* o) {
  if (w.scalar_type() == at::kBFloat16) dense_range<true>(n0, n1, N, M, w.size(1), w.data_ptr(), x, o);
  else dense_range<false>(n0, n1, N, M, w.size(1), w.data_ptr(), x, o);
}

at::Tensor dense_linear(const at::Tensor& x, const at::Tensor& w) {
  const int64_t N = w.size(0), M = x.size(0);
  check_dense(x, w);
  auto out = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  float* o = out.data_ptr<float>();
  moeshard::SpinPool::get().run(N, 16, at::get_num_threads(), [&](int64_t n0, int64_t n1) {
    dense_chunk(n0, n1, N, M, w, xp, o);
  });
  return out;
}

// ---- one routed expert, down(act(gate(x)) * up(x)), in one call ---------------------------------
//
// Two pool jobs instead of three calls and the torch ops between them: gate and up rows [n0, n1)
// together (x rounded to int8 once for both), then, after the activation (ATen's own, so the bits
// are those of act(gate(x)) * up(x) computed op by op), down over h. Every output element is
// still computed by one thread in a fixed order.

// ATen's activation by name, in place.
void activate(at::Tensor& g, const std::string& act) {
  if (act == "silu") at::silu_(g);
  else if (act == "gelu") at::gelu_(g);
  else if (act == "relu") at::relu_(g);
  else TORCH_CHECK(false, "unknown activation '", act, "' (silu, gelu, relu)");
}

void check_expert(const at::Tensor& x, int64_t I, int64_t H, const at::Tensor& gate, const at::Tensor& up,
                  const at::Tensor& down, int64_t down_in, const std::string& act) {
  TORCH_CHECK(gate.size(0) == I && up.size(0) == I && down.size(0) == H && down_in == I,
              "expert weights must be gate [I, H], up [I, H], down [H, I]; got gate ", gate.sizes(), ", up ",
              up.sizes(), ", down ", down.sizes());
  TORCH_CHECK(act == "silu" || act == "gelu" || act == "relu", "unknown activation '", act, "' (silu, gelu, relu)");
}

// `gate_up(n0, n1, g, u)` fills rows [n0, n1) of g and u [M, I], taken `unit` rows at a time (int4's
// row groups); `down(h, out)` computes out from h.
template <class GateUp, class Down>
at::Tensor expert(const at::Tensor& x, int64_t I, int64_t H, const std::string& act, int64_t unit, GateUp gate_up,
                  Down down) {
  const int64_t M = x.size(0);
  auto out = at::empty({M, H}, x.options());
  if (M == 0) return out;
  auto g = at::empty({M, I}, x.options()), u = at::empty({M, I}, x.options());
  float* gp = g.data_ptr<float>();
  float* up = u.data_ptr<float>();
  moeshard::SpinPool::get().run(I / unit, 16 / unit, at::get_num_threads(), [&](int64_t u0, int64_t u1) {
    gate_up(u0 * unit, u1 * unit, gp, up);
  });
  activate(g, act);
  g.mul_(u);
  down(g, out);
  return out;
}

at::Tensor int8_expert(const at::Tensor& x, const at::Tensor& gq, const at::Tensor& gs, const at::Tensor& uq,
                       const at::Tensor& us, const at::Tensor& dq, const at::Tensor& ds, const std::string& act) {
  const int64_t I = gq.size(0), H = gq.size(1), M = x.size(0);
  check_int8(x, gq, gs);
  check_scales(us);
  TORCH_CHECK(uq.sizes() == gq.sizes() && uq.scalar_type() == at::kByte && uq.is_contiguous() && us.numel() == I,
              "int8 up must match gate");
  check_common(at::empty({0, I}, x.options()), dq, dq.size(1));
  check_scales(ds);
  TORCH_CHECK(ds.numel() == dq.size(0), "int8 down scale must have one value per output channel");
  check_expert(x, I, H, gq, uq, dq, dq.size(1), act);
  const QuantizedRows r = quantize_rows(x.data_ptr<float>(), M, H, 128, 0);
  return expert(x, I, H, act, 1,
      [&](int64_t n0, int64_t n1, float* g, float* u) {
        int8_range(n0, n1, I, M, H, gq.data_ptr<uint8_t>(), gs.scalar_type(), gs.data_ptr(), r, g);
        int8_range(n0, n1, I, M, H, uq.data_ptr<uint8_t>(), us.scalar_type(), us.data_ptr(), r, u);
      },
      [&](const at::Tensor& h, at::Tensor& out) {
        const QuantizedRows rh = quantize_rows(h.data_ptr<float>(), M, I, 128, 0);
        float* o = out.data_ptr<float>();
        moeshard::SpinPool::get().run(H, 16, at::get_num_threads(), [&](int64_t n0, int64_t n1) {
          int8_range(n0, n1, H, M, I, dq.data_ptr<uint8_t>(), ds.scalar_type(), ds.data_ptr(), rh, o);
        });
      });
}

at::Tensor int4_expert(const at::Tensor& x, const at::Tensor& gq, const at::Tensor& gs, const at::Tensor& uq,
                       const at::Tensor& us, const at::Tensor& dq, const at::Tensor& ds, int64_t group,
                       const std::string& act) {
  const int64_t I = gq.size(0), H = gq.size(1) * 2, M = x.size(0);
  check_int4(x, gq, gs, group);
  TORCH_CHECK(uq.sizes() == gq.sizes(), "int4 up must match gate");
  check_int4(x, uq, us, group);
  check_int4(at::empty({0, dq.size(1) * 2}, x.options()), dq, ds, group);
  check_expert(x, I, H, gq, uq, dq, dq.size(1) * 2, act);
  const QuantizedRows r = quantize_rows(x.data_ptr<float>(), M, H, 8, group);
  return expert(x, I, H, act, kInt4Rows,
      [&](int64_t n0, int64_t n1, float* g, float* u) {
        int4_chunk(n0, n1, I, M, H, group, gq.data_ptr<uint8_t>(), gs.scalar_type(), gs.data_ptr(), r, g);
        int4_chunk(n0, n1, I, M, H, group, uq.data_ptr<uint8_t>(), us.scalar_type(), us.data_ptr(), r, u);
      },
      [&](const at::Tensor& h, at::Tensor& out) {
        const QuantizedRows rh = quantize_rows(h.data_ptr<float>(), M, I, 8, group);
        float* o = out.data_ptr<float>();
        moeshard::SpinPool::get().run(H / kInt4Rows, 16 / kInt4Rows, at::get_num_threads(), [&](int64_t g0, int64_t g1) {
          int4_chunk(g0 * kInt4Rows, g1 * kInt4Rows, H, M, I, group, dq.data_ptr<uint8_t>(), ds.scalar_type(), ds.data_ptr(), rh, o);
        });
      });
}

at::Tensor dense_expert(const at::Tensor& x, const at::Tensor& gw, const at::Tensor& uw, const at::Tensor& dw,
                        const std::string& act) {
  const int64_t I = gw.size(0), H = gw.size(1), M = x.size(0);
  check_dense(x, gw);
  check_dense(x, uw);
  TORCH_CHECK(uw.sizes() == gw.sizes(), "up must match gate");
  check_dense(at::empty({0, dw.size(1)}, x.options()), dw);
  check_expert(x, I, H, gw, uw, dw, dw.size(1), act);
  const float* xp = x.data_ptr<float>();
  return expert(x, I, H, act, 1,
      [&](int64_t n0, int64_t n1, float* g, float* u) {
        dense_chunk(n0, n1, I, M, gw, xp, g);
        dense_chunk(n0, n1, I, M, uw, xp, u);
      },
      [&](const at::Tensor& h, at::Tensor& out) {
        const float* hp = h.data_ptr<float>();
        float* o = out.data_ptr<float>();
        moeshard::SpinPool::get().run(H, 16, at::get_num_threads(), [&](int64_t n0, int64_t n1) {
          dense_chunk(n0, n1, H, M, dw, hp, o);
        });
      });
}

}  // namespace

TORCH_LIBRARY(moeshard_lowbit, m) {
  m.def("int8_linear(Tensor x, Tensor codes, Tensor scale) -> Tensor");
  m.def("int4_linear(Tensor x, Tensor codes, Tensor qparams, int group) -> Tensor");
  m.def("dense_linear(Tensor x, Tensor w) -> Tensor");
  m.def("int8_expert(Tensor x, Tensor gate, Tensor gate_scale, Tensor up, Tensor up_scale, Tensor down, "
        "Tensor down_scale, str activation) -> Tensor");
  m.def("int4_expert(Tensor x, Tensor gate, Tensor gate_qparams, Tensor up, Tensor up_qparams, Tensor down, "
        "Tensor down_qparams, int group, str activation) -> Tensor");
  m.def("dense_expert(Tensor x, Tensor gate, Tensor up, Tensor down, str activation) -> Tensor");
}

TORCH_LIBRARY_IMPL(moeshard_lowbit, CPU, m) {
  m.impl("int8_linear", &int8_linear);
  m.impl("int4_linear", &int4_linear);
  m.impl("dense_linear", &dense_linear);
  m.impl("int8_expert", &int8_expert);
  m.impl("int4_expert", &int4_expert);
  m.impl("dense_expert", &dense_expert);
}
