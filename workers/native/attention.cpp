// Decode attention on CPU: one new query per sequence against its KV cache, for float32.
//
// Why not torch's scaled_dot_product_attention: at decode its flash kernel costs ~90 us a call on
// the 2-core VM for what is a few thousand multiply-adds per head, most of it in OpenMP's
// parallel region and its blocking. Here each (sequence, head) is one job on pool.h's workers.
//
// q [B, h, 1, Dk]; k [B, kv, S, Dk] and v [B, kv, S, Dv] with unit stride along D (views of the
// cache: any stride over B, kv and S); mask [B, 1, 1, S] additive (any strides); h a multiple of
// kv, head j reading kv head j / (h / kv) as torch's enable_gqa. Per head: logits = scale q.k + mask,
// softmax (max subtracted), then the probabilities times v, each in a fixed order, so a head's result
// does not depend on the thread count or on the other sequences in the batch.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "pool.h"

namespace {

inline float dot(const float* a, const float* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = n - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, a + j), _mm512_maskz_loadu_ps(k, b + j), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// out[0, n) += p * v[0, n)
inline void axpy(float p, const float* v, float* out, int64_t n) {
  const __m512 pv = _mm512_set1_ps(p);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = n - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1);
    _mm512_mask_storeu_ps(out + j, k, _mm512_fmadd_ps(pv, _mm512_maskz_loadu_ps(k, v + j), _mm512_maskz_loadu_ps(k, out + j)));
  }
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                            double scale) {
  for (const at::Tensor* t : {&q, &k, &v, &mask})
    TORCH_CHECK(t->dim() == 4 && t->scalar_type() == at::kFloat && t->device().is_cpu(),
                "decode_attention takes float32 CPU tensors of 4 dimensions");
  const int64_t B = q.size(0), H = q.size(1), Dk = q.size(3), KV = k.size(1), S = k.size(2), Dv = v.size(3);
  TORCH_CHECK(q.size(2) == 1, "decode_attention takes one query per sequence, got ", q.size(2));
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && v.size(1) == KV && v.size(2) == S && k.size(3) == Dk,
              "k must be [B, kv, S, Dk] and v [B, kv, S, Dv] for q [B, h, 1, Dk]");
  TORCH_CHECK(KV > 0 && H % KV == 0, "query heads ", H, " must be a multiple of kv heads ", KV);
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "q, k and v need unit stride along D");
  TORCH_CHECK(mask.size(0) == B && mask.size(1) == 1 && mask.size(2) == 1 && mask.size(3) == S,
              "mask must be [B, 1, 1, S]");
  TORCH_CHECK(S > 0, "decode_attention needs at least one key");
  auto out = at::zeros({B, H, 1, Dv}, q.options());
  const int64_t rep = H / KV;
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const float* mp = mask.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  moeshard::SpinPool::get().run(B * H, 1, at::get_num_threads(), [&](int64_t j0, int64_t j1) {
    std::vector<float> p(S);
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t b = j / H, h = j % H, g = h / rep;
      const float* qh = qp + b * q.stride(0) + h * q.stride(1);
      const float* kh = kp + b * k.stride(0) + g * k.stride(1);
      const float* vh = vp + b * v.stride(0) + g * v.stride(1);
      const float* mb = mp + b * mask.stride(0);
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t s = 0; s < S; ++s) {
        p[s] = sc * dot(qh, kh + s * k.stride(2), Dk) + mb[s * mask.stride(3)];
        top = std::max(top, p[s]);
      }
      float sum = 0.f;
      for (int64_t s = 0; s < S; ++s) {
        p[s] = std::exp(p[s] - top);
        sum += p[s];
      }
      float* oh = op + (b * H + h) * Dv;
      const float inv = 1.f / sum;
      for (int64_t s = 0; s < S; ++s) axpy(p[s] * inv, vh + s * v.stride(2), oh, Dv);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moeshard_lowbit, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(moeshard_lowbit, CPU, m) {
  m.impl("decode_attention", &decode_attention);
}
