// Batch-1-first CPU kernels for weight-only int8 and int4 experts (AVX-512 VNNI).
//
// Both take float32 activations x [M, K], quantize each row to int8 in blocks of 32 (one float32
// scale per block, as llama.cpp's Q8 activations), and run u8 x s8 dot products with vpdpbusd.
// Weights are held unsigned:
//   int8: u = q + 128, one scale per output channel:        w = (u - 128) * s[n]
//   int4: u = q in [0, 15], (scale, zero) per group of G:    w = (u - 8) * s + z
// The offset is folded into the dot product's starting value (-offset * the block's int8 sum),
// so the inner loop is load, unpack, one vpdpbusd, one convert, one multiply-add.
//
// Codes layout (K a multiple of 128):
//   int8 [N, K] uint8, plain row-major;
//   int4 [N, K/2] uint8, per span of 128 inputs: byte j holds input j (low nibble) and j + 64 (high).
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
#include <vector>

#include "pool.h"

namespace {

constexpr int64_t kChunk = 64;   // inputs per vpdpbusd (one zmm of bytes)
constexpr int64_t kBlock = 32;   // inputs per activation scale

struct QuantizedRows {
  std::vector<int8_t> q;        // [M, K]
  std::vector<float> dx;        // [M, K/32]  activation scale per block
  std::vector<int32_t> bsum;    // [M, K/64, 16] -(offset) * sum of each lane's 4 int8 values
  std::vector<float> xsum;      // [M, K/G]   exact float sum of x per weight group (int4 zeros)
};

// Quantize rows of x to int8 per block of 32; `offset` is the weights' unsigned offset.
QuantizedRows quantize_rows(const float* x, int64_t M, int64_t K, int32_t offset, int64_t group) {
  QuantizedRows r;
  const int64_t nb = K / kBlock, nc = K / kChunk;
  r.q.resize(M * K);
  r.dx.resize(M * nb);
  r.bsum.resize(M * nc * 16);
  if (group) r.xsum.resize(M * (K / group));
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
        r.xsum[m * (K / group) + g] = s;
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

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale) {
  const int64_t N = codes.size(0), K = codes.size(1), M = x.size(0);
  check_common(x, codes, K);
  check_scales(scale);
  TORCH_CHECK(scale.numel() == N, "int8 scale must have one value per output channel (", N, ")");
  auto out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  const QuantizedRows r = quantize_rows(x.data_ptr<float>(), M, K, 128, 0);
  const uint8_t* w = codes.data_ptr<uint8_t>();
  const void* sp = scale.data_ptr();
  float* o = out.data_ptr<float>();
  moeshard::SpinPool::get().run(N, 16, at::get_num_threads(), [&](int64_t n0, int64_t n1) {
    std::vector<float> s(n1 - n0), ob(4);
    to_float(scale.scalar_type(), sp, n0, n1 - n0, s.data());
    for (int64_t m = 0; m < M; ++m) {
      int64_t n = n0;
      for (; n + 4 <= n1; n += 4) {
        int8_rows<4>(w + n * K, K, r, m, s.data() + (n - n0), ob.data());
        for (int i = 0; i < 4; ++i) o[m * N + n + i] = ob[i];
      }
      for (; n < n1; ++n) int8_rows<1>(w + n * K, K, r, m, s.data() + (n - n0), o + m * N + n);
    }
  });
  return out;
}

// Per row i: sz[i] its (scale, zero) pairs per group as float32 [K/G, 2]. One 64-byte load holds
// 128 codes: the low nibbles are inputs [0, 64) of the span, the high ones [64, 128).
template <int R, bool kUniform>   // kUniform: groups of >= 64 inputs (one scale per 64-input chunk)
inline void int4_rows(const uint8_t* w, int64_t K, int chunk_shift, int64_t ng, const QuantizedRows& r, int64_t m,
                      const float* const* sz, float* o) {
  const int64_t nc = K / kChunk;
  const int8_t* xq = r.q.data() + m * K;
  const int32_t* bs = r.bsum.data() + m * nc * 16;
  const float* dx = r.dx.data() + m * (K / kBlock);
  const float* xs = r.xsum.data() + m * ng;
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 acc[R];
  for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t c = 0; c < nc; c += 2) {
    const __m512i xv0 = _mm512_loadu_si512(xq + c * kChunk), xv1 = _mm512_loadu_si512(xq + (c + 1) * kChunk);
    const __m512i bv0 = _mm512_loadu_si512(bs + c * 16), bv1 = _mm512_loadu_si512(bs + (c + 1) * 16);
    const __m512 dv0 = block_scales(dx, c), dv1 = block_scales(dx, c + 1);
    for (int i = 0; i < R; ++i) {
      const uint8_t* at = w + i * (K / 2) + c * (kChunk / 2);
      _mm_prefetch(reinterpret_cast<const char*>(at + R * (K / 2)), _MM_HINT_T0);   // the next rows' bytes
      const __m512i b = _mm512_loadu_si512(at);
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
      acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d1), _mm512_mul_ps(dv1, s1), acc[i]);
    }
  }
  for (int i = 0; i < R; ++i) {
    float zs = 0.f;
    for (int64_t g = 0; g < ng; ++g) zs += sz[i][2 * g + 1] * xs[g];
    o[i] = _mm512_reduce_add_ps(acc[i]) + zs;
  }
}

template <bool kUniform>
void int4_range(int64_t n0, int64_t n1, int64_t N, int64_t M, int64_t K, int64_t group, const uint8_t* w,
                const QuantizedRows& r, const float* sz, float* o) {
  const int64_t ng = K / group;
  const int chunk_shift = group >= 128 ? __builtin_ctzll(group / kChunk) : 0;
  float ob[4];
  for (int64_t m = 0; m < M; ++m) {
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) {
      const float* rows[4];
      for (int i = 0; i < 4; ++i) rows[i] = sz + (n - n0 + i) * ng * 2;
      int4_rows<4, kUniform>(w + n * (K / 2), K, chunk_shift, ng, r, m, rows, ob);
      for (int i = 0; i < 4; ++i) o[m * N + n + i] = ob[i];
    }
    for (; n < n1; ++n) {
      const float* rows[1] = {sz + (n - n0) * ng * 2};
      int4_rows<1, kUniform>(w + n * (K / 2), K, chunk_shift, ng, r, m, rows, o + m * N + n);
    }
  }
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& qparams, int64_t group) {
  const int64_t N = codes.size(0), K = codes.size(1) * 2, M = x.size(0);
  check_common(x, codes, K);
  TORCH_CHECK(group >= kBlock && (group & (group - 1)) == 0 && K % group == 0,
              "group size ", group, " must be a power of two >= 32 that divides ", K);
  const int64_t ng = K / group;
  check_scales(qparams);
  TORCH_CHECK(qparams.numel() == N * ng * 2, "int4 qparams must be [N, K/G, 2]");
  auto out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  const QuantizedRows r = quantize_rows(x.data_ptr<float>(), M, K, 8, group);
  const uint8_t* w = codes.data_ptr<uint8_t>();
  const void* qp = qparams.data_ptr();
  float* o = out.data_ptr<float>();
  moeshard::SpinPool::get().run(N, 16, at::get_num_threads(), [&](int64_t n0, int64_t n1) {
    // This range's (scale, zero) pairs as float32, converted once for every row of x.
    std::vector<float> sz((n1 - n0) * ng * 2);
    to_float(qparams.scalar_type(), qp, n0 * ng * 2, (n1 - n0) * ng * 2, sz.data());
    if (group >= kChunk) int4_range<true>(n0, n1, N, M, K, group, w, r, sz.data(), o);
    else int4_range<false>(n0, n1, N, M, K, group, w, r, sz.data(), o);
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

at::Tensor dense_linear(const at::Tensor& x, const at::Tensor& w) {
  const int64_t N = w.size(0), K = w.size(1), M = x.size(0);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu() && x.size(1) == K,
              "x must be a contiguous float32 CPU [M, K] tensor");
  TORCH_CHECK(w.is_contiguous() && w.device().is_cpu() && (w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16) && K % 16 == 0,
              "w must be a contiguous float32 or bfloat16 [N, K] tensor, K a multiple of 16");
  auto out = at::empty({M, N}, x.options());
  const bool bf = w.scalar_type() == at::kBFloat16;
  const void* wp = w.data_ptr();
  const float* xp = x.data_ptr<float>();
  float* o = out.data_ptr<float>();
  moeshard::SpinPool::get().run(N, 16, at::get_num_threads(), [&](int64_t n0, int64_t n1) {
    if (bf) dense_range<true>(n0, n1, N, M, K, wp, xp, o);
    else dense_range<false>(n0, n1, N, M, K, wp, xp, o);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(moeshard_lowbit, m) {
  m.def("int8_linear(Tensor x, Tensor codes, Tensor scale) -> Tensor");
  m.def("int4_linear(Tensor x, Tensor codes, Tensor qparams, int group) -> Tensor");
  m.def("dense_linear(Tensor x, Tensor w) -> Tensor");
}

TORCH_LIBRARY_IMPL(moeshard_lowbit, CPU, m) {
  m.impl("int8_linear", &int8_linear);
  m.impl("int4_linear", &int4_linear);
  m.impl("dense_linear", &dense_linear);
}
