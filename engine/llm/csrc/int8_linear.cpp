// y = x @ (q * scale[:, None]).T + bias for int8 weights with one fp32 scale per output row,
// fp32 activations and fp32 accumulation (engine/llm/int8.py; built by engine/llm/cpu_ops.py).
//
// Decode multiplies a few rows by every weight, so the step is bound by how fast the weights stream
// from memory: each 16 int8 weights are loaded once, widened to fp32 in registers (AVX2
// cvtepi8_epi32 + cvtepi32_ps) and multiplied into up to ROWS activation rows. Output rows are split
// across torch's intra-op threads. The scale is applied once per dot product, after the sum.
#include "ops.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// OUTS output rows times R activation rows, K inputs: acc[o][r] += w[o] * x[r] in 8-wide lanes. Each
// 8 weights are loaded straight into the widening instruction (vpmovsxbd ymm, m64); with few
// accumulators a second set takes every other 8 inputs, so no FMA waits on the previous one.
template <int OUTS, int R>
void dot_block(const int8_t* w, const float* x, int64_t k_size, int64_t x_stride, float* sums /* [OUTS][R] */) {
  constexpr int SETS = OUTS * R <= 4 ? 2 : 1;
  __m256 acc[SETS][OUTS][R];
  for (int a = 0; a < SETS; ++a)
    for (int o = 0; o < OUTS; ++o)
      for (int r = 0; r < R; ++r) acc[a][o][r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= k_size; k += 16) {
    if ((k & 63) == 0)  // the next block of rows, same column: the hardware prefetcher alone fell behind
      for (int o = 0; o < OUTS; ++o) _mm_prefetch(reinterpret_cast<const char*>(w + (o + 4 * OUTS) * k_size + k), _MM_HINT_T0);
    for (int half = 0; half < 2; ++half) {
      const int64_t at = k + 8 * half;
      __m256 xs[R];
      for (int r = 0; r < R; ++r) xs[r] = _mm256_loadu_ps(x + r * x_stride + at);
      for (int o = 0; o < OUTS; ++o) {
        const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + o * k_size + at));
        const __m256 wv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
        for (int r = 0; r < R; ++r) acc[half % SETS][o][r] = _mm256_fmadd_ps(wv, xs[r], acc[half % SETS][o][r]);
      }
    }
  }
  for (int o = 0; o < OUTS; ++o)
    for (int r = 0; r < R; ++r) {
      __m256 total = acc[0][o][r];
      if constexpr (SETS == 2) total = _mm256_add_ps(total, acc[1][o][r]);
      float s = hsum(total);
      for (int64_t t = k; t < k_size; ++t) s += static_cast<float>(w[o * k_size + t]) * x[r * x_stride + t];
      sums[o * R + r] = s;
    }
}

template <int R>
void rows_block(const int8_t* w, const float* scale, const float* bias, const float* x, float* y, int64_t k_size,
                int64_t n_out, int64_t o_begin, int64_t o_end) {
  constexpr int OUTS = R >= 4 ? 2 : 4;
  float sums[OUTS * R];
  int64_t o = o_begin;
  auto store = [&](int64_t first, int outs) {
    for (int i = 0; i < outs; ++i)
      for (int r = 0; r < R; ++r) {
        const float b = bias ? bias[first + i] : 0.0f;
        y[r * n_out + first + i] = sums[i * R + r] * scale[first + i] + b;
      }
  };
  for (; o + OUTS <= o_end; o += OUTS) {
    dot_block<OUTS, R>(w + o * k_size, x, k_size, k_size, sums);
    store(o, OUTS);
  }
  for (; o < o_end; ++o) {
    dot_block<1, R>(w + o * k_size, x, k_size, k_size, sums);
    store(o, 1);
  }
}

}  // namespace

// x: [N, K] float32; qweight: [O, K] int8; scale: [O] float32; bias: [O] float32 or empty -> [N, O]
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                          const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be a 2-D float32 tensor");
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kChar && qweight.is_contiguous(),
              "qweight must be a contiguous 2-D int8 tensor");
  TORCH_CHECK(x.size(1) == qweight.size(1), "x has ", x.size(1), " columns, qweight ", qweight.size(1));
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == qweight.size(0) && scale.is_contiguous(),
              "scale must be a contiguous float32 [O] tensor");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias)
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == qweight.size(0) && bias->is_contiguous(),
                "bias must be a contiguous float32 [O] tensor");
  const at::Tensor xc = x.contiguous();
  const int64_t n = xc.size(0), k_size = xc.size(1), n_out = qweight.size(0);
  at::Tensor y = at::empty({n, n_out}, xc.options());
  const int8_t* w = qweight.data_ptr<int8_t>();
  const float* s = scale.data_ptr<float>();
  const float* b = has_bias ? bias->data_ptr<float>() : nullptr;
  const float* xp = xc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // ~64 KiB of weights per task at least, so small matrices are not split into tiny pieces
  const int64_t grain = std::max<int64_t>(16, (int64_t{1} << 16) / std::max<int64_t>(k_size, 1));
  // each activation row group re-reads a tile of weight rows from L1, not from memory
  const int64_t tile = std::max<int64_t>(4, ((int64_t{1} << 15) / std::max<int64_t>(k_size, 1)) & ~int64_t{3});
  at::parallel_for(0, n_out, grain, [&](int64_t o_begin, int64_t o_end) {
    for (int64_t t0 = o_begin; t0 < o_end; t0 += tile) {
      const int64_t t1 = std::min(t0 + tile, o_end);
      int64_t r = 0;
      for (; r + 4 <= n; r += 4) rows_block<4>(w, s, b, xp + r * k_size, yp + r * n_out, k_size, n_out, t0, t1);
      for (; r + 2 <= n; r += 2) rows_block<2>(w, s, b, xp + r * k_size, yp + r * n_out, k_size, n_out, t0, t1);
      for (; r < n; ++r) rows_block<1>(w, s, b, xp + r * k_size, yp + r * n_out, k_size, n_out, t0, t1);
    }
  });
  return y;
}
