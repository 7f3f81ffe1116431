// y = x @ w.T + bias for a few fp32 activation rows (decode) and fp32 weights in their plain
// row-major [O, K] layout (engine/llm/linear.py; built by engine/llm/cpu_ops.py).
//
// Decode multiplies a few rows by every weight, so a step is bound by how fast the weights stream
// from memory. OUTS weight rows are read side by side, each 8 weights loaded once and multiplied
// into up to 4 activation rows. A row is short (a few KiB), too
// short a stream for the hardware prefetcher, so each step prefetches the same line of the next OUTS
// rows into L2: on the 2-core EPYC this took one lm_head product (151936 x 1024, 1 row) from 16 to
// 25 GB/s on one thread, 30 to 35 GB/s on two, the memory's limit (a plain sum reads 33-36 GB/s).
// Prefill runs oneDNN's matmul on the same row-major weight, so one copy serves both.
#include "avx2.h"
#include "ops.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>

namespace {

// Weight rows w[0..OUTS-1] (stride k_size) times R activation rows: sums[o * R + r]. Every dot
// product sums in the same order (8 lanes over the columns, then across lanes) whatever OUTS and R,
// so a sequence's result does not depend on which others share its batch.
template <int OUTS, int R>
void dot_rows(const float* w, const float* x, int64_t k_size, float* sums) {
  __m256 acc[OUTS][R];
  for (int o = 0; o < OUTS; ++o)
    for (int r = 0; r < R; ++r) acc[o][r] = _mm256_setzero_ps();
  constexpr int64_t LINE = 16;  // columns per cache line
  auto step = [&](int64_t col) {
    __m256 xs[R];
    for (int r = 0; r < R; ++r) xs[r] = _mm256_loadu_ps(x + r * k_size + col);
    for (int o = 0; o < OUTS; ++o) {
      const __m256 wv = _mm256_loadu_ps(w + o * k_size + col);
      for (int r = 0; r < R; ++r) acc[o][r] = _mm256_fmadd_ps(wv, xs[r], acc[o][r]);
    }
  };
  int64_t c = 0;
  for (; c + LINE <= k_size; c += LINE) {
    for (int o = 0; o < OUTS; ++o)  // the same line of the next OUTS rows, into L2
      _mm_prefetch(reinterpret_cast<const char*>(w + (o + OUTS) * k_size + c), _MM_HINT_T1);
#pragma GCC unroll 4
    for (int j = 0; j < LINE / 8; ++j) step(c + 8 * j);
  }
  if (c < k_size) step(c);  // K = 16m + 8
  for (int o = 0; o < OUTS; ++o)
    for (int r = 0; r < R; ++r) sums[o * R + r] = hsum(acc[o][r]);
}

// weight rows [o0, o1) (o1 - o0 a multiple of OUTS) times activation rows 0..R-1 -> y columns o0..o1-1
template <int OUTS, int R>
void rows_range(const float* w, const float* bias, const float* x, float* y, int64_t k_size, int64_t n_out, int64_t o0,
                int64_t o1) {
  float sums[OUTS * R];
  for (int64_t row = o0; row < o1; row += OUTS) {
    dot_rows<OUTS, R>(w + row * k_size, x, k_size, sums);
    for (int o = 0; o < OUTS; ++o)
      for (int r = 0; r < R; ++r) y[r * n_out + row + o] = sums[o * R + r] + (bias ? bias[row + o] : 0.0f);
  }
}

void run(const float* w, const float* bias, const float* x, float* y, int64_t n, int64_t k_size, int64_t n_out) {
  constexpr int64_t OUTS = 4;
  const int64_t blocks = n_out / OUTS;  // n_out % OUTS rows: the 1-row tail below
  // ~64 KiB of weights per task at least; each activation row group re-reads a tile of rows from L1/L2
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / (OUTS * k_size * 4));
  const int64_t tile = std::max<int64_t>(1, (int64_t{1} << 15) / (OUTS * k_size * 4));
  at::parallel_for(0, blocks, grain, [&](int64_t b_begin, int64_t b_end) {
    for (int64_t t0 = b_begin; t0 < b_end; t0 += tile) {
      const int64_t o0 = t0 * OUTS, o1 = std::min(t0 + tile, b_end) * OUTS;
      int64_t r = 0;
      for (; r + 4 <= n; r += 4) rows_range<2, 4>(w, bias, x + r * k_size, y + r * n_out, k_size, n_out, o0, o1);
      for (; r + 2 <= n; r += 2) rows_range<4, 2>(w, bias, x + r * k_size, y + r * n_out, k_size, n_out, o0, o1);
      for (; r < n; ++r) rows_range<4, 1>(w, bias, x + r * k_size, y + r * n_out, k_size, n_out, o0, o1);
    }
  });
  for (int64_t r = 0; r < n; ++r)
    rows_range<1, 1>(w, bias, x + r * k_size, y + r * n_out, k_size, n_out, blocks * OUTS, n_out);
}

}  // namespace

// x: [N, K] float32; weight: [O, K] float32, contiguous, K a multiple of 8; bias: [O] float32 or
// None -> [N, O] float32
at::Tensor dense_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be a 2-D float32 tensor");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.scalar_type() == at::kFloat,
              "weight must be a contiguous float32 [O, K] tensor");
  const int64_t n_out = weight.size(0), k_size = weight.size(1);
  TORCH_CHECK(k_size % 8 == 0, "the weight's K (", k_size, ") must be a multiple of 8");
  TORCH_CHECK(x.size(1) == k_size, "x has ", x.size(1), " columns, the weight ", k_size);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias)
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == n_out && bias->is_contiguous(),
                "bias must be a contiguous float32 [O] tensor");
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({xc.size(0), n_out}, xc.options());
  const float* b = has_bias ? bias->data_ptr<float>() : nullptr;
  run(weight.data_ptr<float>(), b, xc.data_ptr<float>(), y.data_ptr<float>(), xc.size(0), k_size, n_out);
  return y;
}
