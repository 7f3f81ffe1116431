// Fused per-token operations of a decoder layer (engine/llm/model.py; built by engine/llm/cpu_ops.py).
//
// A decode step runs a few rows through 28+ layers; each torch operator costs microseconds of
// dispatch, and an RMSNorm written in torch is ~19 of them. These do the same arithmetic in one call:
// rms_norm (transformers' Qwen/Llama RMSNorm: w * (x * rsqrt(mean(x^2) + eps)), fp32) and
// norm_rope_qk_ (Qwen3's per-head q/k RMSNorm, then rotary embedding x*cos + rotate_half(x)*sin, in
// place on the q|k|v projection). Built with -ffp-contract=off so a*b + c*d stays two roundings, as
// in torch's separate mul and add: the rotary products equal torch's bit for bit; only the norm's
// sum of squares is summed in another order (double here). attend_decode is one decode token's
// attention with its cache write: scores, softmax and weighted sum in fp32, in another summation
// order than torch's matmuls (ulp-level differences).
#include "ops.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

// p[0..n) <- w * (p * r) with r = 1 / sqrt(mean(p^2) + eps), from src
inline void rms_row(const float* src, const float* w, float* dst, int64_t n, float eps) {
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) sum += static_cast<double>(src[i]) * src[i];
  const float variance = static_cast<float>(sum / static_cast<double>(n));
  const float r = 1.0f / std::sqrt(variance + eps);
  for (int64_t i = 0; i < n; ++i) dst[i] = w[i] * (src[i] * r);
}

}  // namespace

// x: [N, H] float32; weight: [H] -> [N, H]
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be a 2-D float32 tensor");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous() && weight.numel() == x.size(1),
              "weight must be a contiguous float32 [H] tensor");
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty_like(xc);
  const int64_t n = xc.size(0), h = xc.size(1);
  const float* xp = xc.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, n, std::max<int64_t>(1, 16384 / std::max<int64_t>(h, 1)), [&](int64_t a, int64_t b) {
    for (int64_t t = a; t < b; ++t) rms_row(xp + t * h, wp, yp + t * h, h, static_cast<float>(eps));
  });
  return y;
}

// qkv: [N, (heads + 2 kv_heads) * d] float32, contiguous, changed in place: each q and k head
// normalized by q_norm / k_norm ([d], or undefined: none) and rotated by cos, sin ([N, d]).
void norm_rope_qk_(at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                   const c10::optional<at::Tensor>& q_norm, const c10::optional<at::Tensor>& k_norm,
                   int64_t heads, int64_t kv_heads, int64_t d, double eps) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.scalar_type() == at::kFloat && qkv.is_contiguous(), "qkv must be contiguous 2-D float32");
  TORCH_CHECK(qkv.size(1) == (heads + 2 * kv_heads) * d, "qkv has ", qkv.size(1), " columns, expected ", (heads + 2 * kv_heads) * d);
  TORCH_CHECK(d % 2 == 0, "head_dim must be even");
  const int64_t n = qkv.size(0);
  for (const at::Tensor* t : {&cos, &sin})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2 && t->size(0) == n && t->size(1) == d,
                "cos and sin must be contiguous float32 [N, head_dim]");
  const bool norm = q_norm.has_value() && q_norm->defined();
  TORCH_CHECK(norm == (k_norm.has_value() && k_norm->defined()), "q_norm and k_norm come together");
  if (norm)
    for (const at::Tensor* t : {&*q_norm, &*k_norm})
      TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == d, "q_norm / k_norm must be float32 [head_dim]");
  float* base = qkv.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  const float* qw = norm ? q_norm->data_ptr<float>() : nullptr;
  const float* kw = norm ? k_norm->data_ptr<float>() : nullptr;
  const int64_t row = qkv.size(1), rotated = heads + kv_heads, half = d / 2;
  at::parallel_for(0, n * rotated, std::max<int64_t>(1, 4096 / d), [&](int64_t a, int64_t b) {
    std::vector<float> tmp(d);
    for (int64_t job = a; job < b; ++job) {
      const int64_t t = job / rotated, head = job % rotated;
      float* p = base + t * row + head * d;
      if (norm) {
        rms_row(p, head < heads ? qw : kw, tmp.data(), d, static_cast<float>(eps));
        std::copy(tmp.begin(), tmp.end(), p);
      }
      const float* c = cp + t * d;
      const float* s = sp + t * d;
      for (int64_t i = 0; i < half; ++i) {
        const float x1 = p[i], x2 = p[i + half];
        p[i] = x1 * c[i] + (-x2) * s[i];
        p[i + half] = x2 * c[i + half] + x1 * s[i + half];
      }
    }
  });
}

namespace {

inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  float total = _mm_cvtss_f32(s);
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

}  // namespace

// One decode token of one sequence at position pos: writes its k, v ([kv_heads, d]) into the cache
// ([layers, kv_heads, capacity, d]) and returns softmax(q k^T / sqrt(d)) v over keys 0..pos for
// every head ([heads, d]; head h reads kv head h / (heads / kv_heads)), scores and sums in fp32.
at::Tensor attend_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& cache_k,
                         at::Tensor& cache_v, int64_t layer, int64_t pos) {
  TORCH_CHECK(cache_k.dim() == 4 && cache_k.is_contiguous() && cache_v.is_contiguous() && cache_k.sizes() == cache_v.sizes() &&
                  cache_k.scalar_type() == at::kFloat && cache_v.scalar_type() == at::kFloat,
              "the caches must be contiguous float32 [layers, kv_heads, capacity, d]");
  const int64_t kv_heads = cache_k.size(1), capacity = cache_k.size(2), d = cache_k.size(3);
  TORCH_CHECK(layer >= 0 && layer < cache_k.size(0) && pos >= 0 && pos < capacity, "layer or position outside the cache");
  TORCH_CHECK(q.dim() == 2 && q.size(1) == d && q.size(0) % kv_heads == 0 && q.scalar_type() == at::kFloat, "q must be float32 [heads, d]");
  TORCH_CHECK(k.numel() == kv_heads * d && v.numel() == kv_heads * d && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "k and v must be float32 [kv_heads, d]");
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  const int64_t heads = qc.size(0), group = heads / kv_heads, keys = pos + 1;
  float* ck = cache_k.data_ptr<float>() + layer * kv_heads * capacity * d;
  float* cv = cache_v.data_ptr<float>() + layer * kv_heads * capacity * d;
  for (int64_t g = 0; g < kv_heads; ++g) {
    std::copy_n(kc.data_ptr<float>() + g * d, d, ck + (g * capacity + pos) * d);
    std::copy_n(vc.data_ptr<float>() + g * d, d, cv + (g * capacity + pos) * d);
  }
  at::Tensor out = at::empty({heads, d}, qc.options());
  const float* qp = qc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  at::parallel_for(0, heads, 1, [&](int64_t a, int64_t b) {
    std::vector<float> p(keys);
    for (int64_t h = a; h < b; ++h) {
      const float* keys_h = ck + (h / group) * capacity * d;
      const float* values_h = cv + (h / group) * capacity * d;
      float peak = -INFINITY;
      for (int64_t j = 0; j < keys; ++j) {
        p[j] = dot(qp + h * d, keys_h + j * d, d) * scale;
        peak = std::max(peak, p[j]);
      }
      float total = 0.0f;
      for (int64_t j = 0; j < keys; ++j) total += (p[j] = std::exp(p[j] - peak));
      float* o = op + h * d;
      std::fill_n(o, d, 0.0f);
      for (int64_t j = 0; j < keys; ++j) {
        const __m256 w = _mm256_set1_ps(p[j] / total);
        const float* vj = values_h + j * d;
        int64_t i = 0;
        for (; i + 8 <= d; i += 8) _mm256_storeu_ps(o + i, _mm256_fmadd_ps(w, _mm256_loadu_ps(vj + i), _mm256_loadu_ps(o + i)));
        for (; i < d; ++i) o[i] += (p[j] / total) * vj[i];
      }
    }
  });
  return out;
}
