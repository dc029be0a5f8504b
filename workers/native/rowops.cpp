// Per-row decode ops on CPU: RMSNorm and half-split RoPE for the few rows of a decode step.
//
// Why: at decode each is a handful of torch ops on 1-8 rows of ~1024 floats (RMSNorm: cast, pow,
// mean, add, rsqrt, two multiplies; RoPE: chunk, neg, cat, two multiplies, add), ~3 us of dispatch
// each, 17 norms and 16 rotations per mix8x32 token. Here each is one call on the calling thread
// (the work is too small to share), in a fixed order, so a row's result does not depend on the
// batch around it.
//
// rms_norm(x [..., H], w [H], eps): float32 or bfloat16 (x and w alike), contiguous. Per row, in
// float32: h = x / sqrt(mean(x^2) + eps); for bfloat16, h is rounded to bfloat16 before the scale,
// as the references (and coordinator/layers.py's RMSNorm) do; out = w * h in x's dtype.
// rope(x [B, h, T, D], cos, sin [B, 1, T, D]): float32, unit stride along D (any other strides);
// out = x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x[D/2:], x[:D/2]); out contiguous.
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>
#include <immintrin.h>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

inline float sum_of_squares(const float* x, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = n - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1);
    const __m512 v = _mm512_maskz_loadu_ps(k, x + j);
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  return _mm512_reduce_add_ps(acc);
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "rms_norm takes CPU tensors");
  TORCH_CHECK(x.scalar_type() == w.scalar_type() &&
              (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "rms_norm takes x and w of one dtype, float32 or bfloat16");
  TORCH_CHECK(x.dim() >= 1 && w.dim() == 1 && x.size(-1) == w.size(0), "rms_norm: x [..., H] and w [H]");
  const auto xc = x.contiguous();
  const auto wc = w.contiguous();
  const int64_t H = x.size(-1), rows = H ? x.numel() / H : 0;
  auto out = at::empty_like(xc);
  const float e = static_cast<float>(eps);
  if (x.scalar_type() == at::kFloat) {
    const float* xp = xc.data_ptr<float>();
    const float* wp = wc.data_ptr<float>();
    float* op = out.data_ptr<float>();
    for (int64_t r = 0; r < rows; ++r) {
      const float* xr = xp + r * H;
      const float inv = 1.f / std::sqrt(sum_of_squares(xr, H) / static_cast<float>(H) + e);
      for (int64_t j = 0; j < H; ++j) op[r * H + j] = wp[j] * (xr[j] * inv);
    }
    return out;
  }
  const c10::BFloat16* xp = xc.data_ptr<c10::BFloat16>();
  const c10::BFloat16* wp = wc.data_ptr<c10::BFloat16>();
  c10::BFloat16* op = out.data_ptr<c10::BFloat16>();
  std::vector<float> row(H);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < H; ++j) row[j] = static_cast<float>(xp[r * H + j]);
    const float inv = 1.f / std::sqrt(sum_of_squares(row.data(), H) / static_cast<float>(H) + e);
    for (int64_t j = 0; j < H; ++j) {
      const float h = static_cast<float>(c10::BFloat16(row[j] * inv));
      op[r * H + j] = c10::BFloat16(static_cast<float>(wp[j]) * h);
    }
  }
  return out;
}

at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  for (const at::Tensor* t : {&x, &cos, &sin})
    TORCH_CHECK(t->dim() == 4 && t->scalar_type() == at::kFloat && t->device().is_cpu() && t->stride(3) == 1,
                "rope takes float32 CPU tensors of 4 dimensions with unit stride along the last");
  const int64_t B = x.size(0), Hh = x.size(1), T = x.size(2), D = x.size(3), half = D / 2;
  TORCH_CHECK(D % 2 == 0 && cos.size(3) == D && sin.size(3) == D, "rope: cos and sin as wide as x, D even");
  TORCH_CHECK(cos.size(0) == B && cos.size(1) == 1 && cos.size(2) == T && sin.size(0) == B && sin.size(1) == 1 &&
              sin.size(2) == T, "rope: cos and sin [B, 1, T, D] for x [B, h, T, D]");
  auto out = at::empty({B, Hh, T, D}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hh; ++h)
      for (int64_t t = 0; t < T; ++t) {
        const float* xr = xp + b * x.stride(0) + h * x.stride(1) + t * x.stride(2);
        const float* c = cp + b * cos.stride(0) + t * cos.stride(2);
        const float* s = sp + b * sin.stride(0) + t * sin.stride(2);
        float* o = op + ((b * Hh + h) * T + t) * D;
        for (int64_t j = 0; j < half; ++j) o[j] = xr[j] * c[j] + (-xr[j + half]) * s[j];
        for (int64_t j = half; j < D; ++j) o[j] = xr[j] * c[j] + xr[j - half] * s[j];
      }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moeshard_lowbit, m) {
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor");
}

TORCH_LIBRARY_IMPL(moeshard_lowbit, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("rope", &rope);
}
