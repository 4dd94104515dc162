// turbo::linear — y = x W^T + b for the few rows of a decode step (x: (..., K) with at most
// kMaxRows rows, W: (N, K) float32), streaming the weights once.
//
// Why: a decode step's linear layers are weight-bound (SmolLM2: 538 MB of float32 weights per
// step). MKL's sgemm for 8 rows read them at ~16 GB/s on our CPU, half what its gemv reaches for
// one row (~27 GB/s, the memory's read rate), so a batch of 8 paid ~33 ms a step for a ~20 ms
// floor. Here each thread takes a contiguous range of W's rows and reads each row once from
// memory; the few x rows stay in L1.
//
// Micro-kernel: kNr rows of W by kMr rows of x, 8 lanes along K per FMA — per 8 columns, kNr W
// loads, kMr x loads and kNr * kMr FMAs into kNr * kMr accumulators (8 of the 16 ymm registers);
// the x-row blocks re-read the kNr W rows from L1. Each y[m, n] is the 8-lane partial sums over
// K (k mod 8), then their horizontal sum, then the bias: the same arithmetic for a row whatever
// the other rows are, so a sequence's logits do not depend on its batch (up to kMaxRows).
//
// More rows (a prompt chunk) are compute-bound, where MKL's blocked sgemm is the right kernel:
// at::linear.

#include <ATen/Parallel.h>

#include "attention_common.h"
#include "ops.h"

namespace turbo {
namespace {

constexpr int64_t kMaxRows = 16;  // above: at::linear (compute-bound)
constexpr int kNr = 4;            // W rows per micro-tile
constexpr int kMr = 2;            // x rows per micro-tile
constexpr int64_t kAhead = 16 * 1024;  // bytes of W prefetched ahead of the tile being read

inline void prefetch(const float* p, int64_t floats) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t at = 0; at < floats * 4; at += 64) _mm_prefetch(c + at, _MM_HINT_T0);
}

// y[m * ldy + n] = sum_k x[m * K + k] * w[n * K + k] (+ bias[n]) for NR rows of w, MR rows of x
template <int NR, int MR>
void tile(const float* x, const float* w, const float* bias, float* y, int64_t K, int64_t ldy) {
  __m256 acc[NR][MR];
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < MR; ++j) acc[i][j] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 xv[MR];
    for (int j = 0; j < MR; ++j) xv[j] = _mm256_loadu_ps(x + j * K + k);
    for (int i = 0; i < NR; ++i) {
      __m256 wv = _mm256_loadu_ps(w + i * K + k);
      // in a register: gcc otherwise folds the load into every FMA using it (NR * MR loads an
      // iteration instead of NR + MR, the load ports then bound the loop, not the FMAs)
      asm("" : "+x"(wv));
      for (int j = 0; j < MR; ++j) acc[i][j] = _mm256_fmadd_ps(wv, xv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < MR; ++j) {
      float s = hsum(acc[i][j]);
      for (int64_t t = k; t < K; ++t) s += x[j * K + t] * w[i * K + t];
      y[j * ldy + i] = bias ? s + bias[i] : s;
    }
}

template <int NR>
void rows_tile(const float* x, const float* w, const float* bias, float* y, int64_t M, int64_t K,
               int64_t N) {
  int64_t m = 0;
  for (; m + kMr <= M; m += kMr) tile<NR, kMr>(x + m * K, w, bias, y + m * N, K, N);
  for (; m < M; ++m) tile<NR, 1>(x + m * K, w, bias, y + m * N, K, N);
}

}  // namespace

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  const int64_t K = x.size(-1);
  const int64_t M = K ? x.numel() / K : 0;
  const bool ours = x.device().is_cpu() && x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat &&
                    weight.dim() == 2 && weight.size(1) == K && M <= kMaxRows &&
                    (!bias || (bias->scalar_type() == at::kFloat && bias->dim() == 1 &&
                               bias->size(0) == weight.size(0)));
  if (!ours) return at::linear(x, weight, bias);
  const int64_t N = weight.size(0);
  const at::Tensor xc = x.contiguous().view({M, K});
  const at::Tensor wc = weight.contiguous();
  const at::Tensor bc = bias ? bias->contiguous() : at::Tensor();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  at::Tensor y = at::empty(shape, x.options());
  if (M == 0 || N == 0) return y;
  const float* xp = xc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  const float* bp = bc.defined() ? bc.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t blocks = (N + kNr - 1) / kNr;
  // at least ~64 KB of weights per task: smaller layers are not worth a second thread
  const int64_t grain = std::max<int64_t>(1, (64 * 1024) / (kNr * K * 4));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b * kNr;
      const float* w = wp + n * K;
      const float* bn = bp ? bp + n : nullptr;
      // the tile kAhead bytes on (this thread's range only): the memory's stream keeps
      // running while this tile's FMAs do, across the 4 KB pages the hardware stops at
      const int64_t ahead = n * K + kAhead / 4;
      if (ahead < b1 * kNr * K && ahead < N * K) prefetch(wp + ahead, std::min(kNr * K, N * K - ahead));
      switch (std::min<int64_t>(kNr, N - n)) {
        case 4: rows_tile<4>(xp, w, bn, yp + n, M, K, N); break;
        case 3: rows_tile<3>(xp, w, bn, yp + n, M, K, N); break;
        case 2: rows_tile<2>(xp, w, bn, yp + n, M, K, N); break;
        default: rows_tile<1>(xp, w, bn, yp + n, M, K, N); break;
      }
    }
  });
  return y;
}

}  // namespace turbo
