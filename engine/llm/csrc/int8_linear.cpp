// y = x @ (q * scale[:, None]).T + bias for int8 weights with one fp32 scale per output row,
// fp32 activations and fp32 accumulation (engine/llm/int8.py; built by engine/llm/cpu_ops.py).
//
// Decode multiplies a few rows by every weight, so the step is bound by how fast the weights stream
// from memory. The weights come packed in blocks of 4 rows, [O/4][K/16][4][16] (int8.py pack_rows):
// one 64-byte line holds 16 columns of 4 rows, so a block streams as one sequential run. Each 8
// weights are loaded straight into the widening instruction (AVX2 vpmovsxbd + cvtdq2ps) and
// multiplied into up to 4 activation rows; the scale is applied once per dot product, after the sum.
// Blocks are split across torch's intra-op threads.
#include "avx2.h"
#include "ops.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>

namespace {

constexpr int64_t ROWS = 4, CHUNK = 16, LINE = ROWS * CHUNK;  // one block's 16 columns: one cache line
constexpr int64_t PREFETCH_LINES = 32;  // 2 KiB ahead of the stream

// Rows first..first+OUTS-1 of one packed block times R activation rows: sums[o][r]. With few
// accumulators a second set takes every other 8 columns, so no FMA waits on the previous one.
template <int OUTS, int R>
void dot_block(const int8_t* block, int first, const float* x, int64_t k_size, float* sums) {
  constexpr int SETS = OUTS * R <= 4 ? 2 : 1;
  __m256 acc[SETS][OUTS][R];
  for (int a = 0; a < SETS; ++a)
    for (int o = 0; o < OUTS; ++o)
      for (int r = 0; r < R; ++r) acc[a][o][r] = _mm256_setzero_ps();
  const int64_t chunks = k_size / CHUNK;
  for (int64_t c = 0; c < chunks; ++c) {
    const int8_t* line = block + c * LINE;
    _mm_prefetch(reinterpret_cast<const char*>(line + PREFETCH_LINES * LINE), _MM_HINT_T0);
    for (int half = 0; half < 2; ++half) {
      __m256 xs[R];
      for (int r = 0; r < R; ++r) xs[r] = _mm256_loadu_ps(x + r * k_size + c * CHUNK + 8 * half);
      for (int o = 0; o < OUTS; ++o) {
        const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(line + (first + o) * CHUNK + 8 * half));
        const __m256 wv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
        for (int r = 0; r < R; ++r) acc[half % SETS][o][r] = _mm256_fmadd_ps(wv, xs[r], acc[half % SETS][o][r]);
      }
    }
  }
  for (int o = 0; o < OUTS; ++o)
    for (int r = 0; r < R; ++r) {
      __m256 total = acc[0][o][r];
      if constexpr (SETS == 2) total = _mm256_add_ps(total, acc[1][o][r]);
      sums[o * R + r] = hsum(total);
    }
}

// blocks [b0, b1) times activation rows r0..r0+R-1 -> y rows r0.., columns 4·b0..4·b1-1
template <int R>
void rows_block(const int8_t* w, const float* scale, const float* bias, const float* x, float* y, int64_t k_size,
                int64_t n_out, int64_t b0, int64_t b1) {
  constexpr int OUTS = R >= 4 ? 2 : 4;  // 4 rows x 4 activation rows would not fit the 16 registers
  float sums[OUTS * R];
  for (int64_t b = b0; b < b1; ++b) {
    const int8_t* block = w + b * (k_size / CHUNK) * LINE;
    for (int first = 0; first < ROWS; first += OUTS) {
      dot_block<OUTS, R>(block, first, x, k_size, sums);
      for (int o = 0; o < OUTS; ++o) {
        const int64_t row = b * ROWS + first + o;
        for (int r = 0; r < R; ++r) y[r * n_out + row] = sums[o * R + r] * scale[row] + (bias ? bias[row] : 0.0f);
      }
    }
  }
}

}  // namespace

// x: [N, K] float32 (K a multiple of 16); packed: [O/4, K/16, 4, 16] int8; scale: [O] float32;
// bias: [O] float32 or None -> [N, O]
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be a 2-D float32 tensor");
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == ROWS && packed.size(3) == CHUNK && packed.scalar_type() == at::kChar &&
                  packed.is_contiguous(),
              "packed must be a contiguous int8 [O/4, K/16, 4, 16] tensor (engine/llm/int8.py pack_rows)");
  const int64_t k_size = packed.size(1) * CHUNK, n_out = packed.size(0) * ROWS;
  TORCH_CHECK(x.size(1) == k_size, "x has ", x.size(1), " columns, the packed weight ", k_size);
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == n_out && scale.is_contiguous(),
              "scale must be a contiguous float32 [O] tensor");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias)
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == n_out && bias->is_contiguous(),
                "bias must be a contiguous float32 [O] tensor");
  const at::Tensor xc = x.contiguous();
  const int64_t n = xc.size(0);
  at::Tensor y = at::empty({n, n_out}, xc.options());
  const int8_t* w = packed.data_ptr<int8_t>();
  const float* s = scale.data_ptr<float>();
  const float* b = has_bias ? bias->data_ptr<float>() : nullptr;
  const float* xp = xc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // ~64 KiB of weights per task at least; each activation row group re-reads a tile of blocks from L1
  const int64_t grain = std::max<int64_t>(4, (int64_t{1} << 16) / (ROWS * k_size));
  const int64_t tile = std::max<int64_t>(1, (int64_t{1} << 15) / (ROWS * k_size));
  at::parallel_for(0, n_out / ROWS, grain, [&](int64_t b_begin, int64_t b_end) {
    for (int64_t t0 = b_begin; t0 < b_end; t0 += tile) {
      const int64_t t1 = std::min(t0 + tile, b_end);
      int64_t r = 0;
      for (; r + 4 <= n; r += 4) rows_block<4>(w, s, b, xp + r * k_size, yp + r * n_out, k_size, n_out, t0, t1);
      for (; r + 2 <= n; r += 2) rows_block<2>(w, s, b, xp + r * k_size, yp + r * n_out, k_size, n_out, t0, t1);
      for (; r < n; ++r) rows_block<1>(w, s, b, xp + r * k_size, yp + r * n_out, k_size, n_out, t0, t1);
    }
  });
  return y;
}
