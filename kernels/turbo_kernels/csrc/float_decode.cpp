// turbo::float_decode_attention — the newest tokens of each sequence over one layer of the
// float KV cache (turbo_core.attention.floatcache: rows (slots, H_kv, rows, D), one slot per
// sequence), exact softmax attention in float32. The float baseline's decode op: the same job
// structure as turbo::decode_attention, so the two compare caches, not code paths.
//
// Sequence b lives in slot slots[b] and holds rows [row_lo[b], row_hi[b]); row r is at position
// r + (a per-sequence constant), so a window in positions is the same window in rows. Query
// token i of L_q sits at row row_hi - L_q + i and sees rows j <= its own, j > its own - window
// (window 0: none) and j >= row_lo.
//
// Jobs (at::parallel_for): (sequence, KV head, split of kSplitRows rows). A job scores its rows
// by tiles of kTile keys — s = (q · k_j) · scale, 8 lanes per FMA along D —, keeps a running
// max m, sum l and accumulator acc per query row (GQA group x new tokens):
//   m' = max(m, max_j s_j),  l' = l e^(m - m') + sum_j e^(s_j - m'),
//   acc' = acc e^(m - m') + sum_j e^(s_j - m') v_j,
// and the splits' partials are merged exactly in split order (the result of a sequence does
// not depend on its batch).

#include <ATen/Parallel.h>

#include "attention_common.h"
#include "ops.h"

namespace turbo {
namespace {

constexpr int kTile = 64;         // keys scored at once
constexpr int kSplitRows = 1024;  // rows per job: fixed, so sums never depend on the batch

constexpr int kPrefetchTiles = 2;

inline void prefetch_rows(const float* p, int64_t n) {  // n floats from p into the caches
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t at = 0; at < n * static_cast<int64_t>(sizeof(float)); at += 64) _mm_prefetch(c + at, _MM_HINT_T0);
}

// sum_d a[d] * b[d]
inline float dot(const float* a, const float* b, int D) {
  __m256 s = _mm256_setzero_ps();
  int d = 0;
  for (; d + 8 <= D; d += 8) s = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), s);
  float r = hsum(s);
  for (; d < D; ++d) r += a[d] * b[d];
  return r;
}

// acc[r, :] = acc[r, :] * alpha[r] + sum_t w[r, t] v[t, :] for t in [a[r], b[r]) (rows outside
// their range have w = 0 there), 8 channels at a time, four rows' accumulators in registers.
void accumulate(float* acc, const float* w, const float* v, int64_t vstride, int n, int R, int D,
                const float* alpha) {
  for (int r = 0; r < R; ++r)
    for (int d = 0; d < D; ++d) acc[r * D + d] *= alpha[r];
  for (int r0 = 0; r0 < R; r0 += 4) {
    const int nr = std::min(4, R - r0);
    const float* w0 = w + r0 * kTile;
    int d = 0;
    for (; d + 8 <= D; d += 8) {
      __m256 a[4];
      for (int r = 0; r < nr; ++r) a[r] = _mm256_loadu_ps(acc + (r0 + r) * D + d);
      for (int t = 0; t < n; ++t) {
        const __m256 vt = _mm256_loadu_ps(v + t * vstride + d);
        for (int r = 0; r < nr; ++r) a[r] = _mm256_fmadd_ps(_mm256_set1_ps(w0[r * kTile + t]), vt, a[r]);
      }
      for (int r = 0; r < nr; ++r) _mm256_storeu_ps(acc + (r0 + r) * D + d, a[r]);
    }
    for (; d < D; ++d)
      for (int r = 0; r < nr; ++r) {
        float s = 0.f;
        for (int t = 0; t < n; ++t) s += w0[r * kTile + t] * v[t * vstride + d];
        acc[(r0 + r) * D + d] += s;
      }
  }
}

struct Call {
  int B, Hq, Hkv, Lq, D, group, R, splits, window;
  int64_t rows_cap;
  float scale;
  const float *q, *k, *v;
  const int64_t *slots, *lo, *hi;
  float *m_out, *l_out, *acc_out;  // (B, Hkv, splits, R [, D])
};

void job(const Call& c, int b, int h, int sp, std::vector<float>& scratch) {
  const int R = c.R, D = c.D, Lq = c.Lq;
  const int64_t lo = c.lo[b], hi = c.hi[b];
  const int64_t from = lo + static_cast<int64_t>(sp) * kSplitRows;
  const int64_t to = std::min<int64_t>(hi, from + kSplitRows);
  const int64_t part = ((static_cast<int64_t>(b) * c.Hkv + h) * c.splits + sp) * R;
  float* m = c.m_out + part;
  float* l = c.l_out + part;
  float* acc = c.acc_out + part * D;
  std::fill(m, m + R, kNeg);
  std::fill(l, l + R, 0.f);
  std::fill(acc, acc + static_cast<int64_t>(R) * D, 0.f);
  if (from >= to) return;
  // query rows, pre-scaled: r = g * Lq + i (head h * group + g, new token i)
  scratch.resize(static_cast<size_t>(R) * (D + 2 * kTile + 3));
  float* qs = scratch.data();
  float* s = qs + static_cast<size_t>(R) * D;  // scores, then weights (R, kTile)
  int* rlo = reinterpret_cast<int*>(s + static_cast<size_t>(R) * kTile);  // row r's keys in the tile
  int* rhi = rlo + R;
  float* alpha = reinterpret_cast<float*>(rhi + R);
  for (int r = 0; r < R; ++r) {
    const int g = r / Lq, i = r % Lq;
    const float* src = c.q + ((static_cast<int64_t>(b) * c.Hq + h * c.group + g) * Lq + i) * D;
    for (int d = 0; d < D; ++d) qs[r * D + d] = src[d] * c.scale;
  }
  const int64_t base = (c.slots[b] * c.Hkv + h) * c.rows_cap;  // row 0 of this (slot, head)
  for (int64_t t0 = from; t0 < to; t0 += kTile) {
    const int n = static_cast<int>(std::min<int64_t>(kTile, to - t0));
    const float* kt = c.k + (base + t0) * D;
    const float* vt = c.v + (base + t0) * D;
    // the tile after next, while this one computes: one stream per thread is latency-bound
    // (~7 GB/s a core here) unless the loads are in flight well ahead of their use
    const int64_t ahead = std::min<int64_t>(kTile, std::max<int64_t>(0, to - t0 - kPrefetchTiles * kTile));
    prefetch_rows(kt + kPrefetchTiles * kTile * D, ahead * D);
    prefetch_rows(vt + kPrefetchTiles * kTile * D, ahead * D);
    for (int r = 0; r < R; ++r) {  // keys of the tile row r sees: [rlo, rhi)
      const int64_t own = hi - Lq + r % Lq;
      const int64_t first = c.window > 0 ? std::max<int64_t>(lo, own - c.window + 1) : lo;
      rlo[r] = static_cast<int>(std::clamp<int64_t>(first - t0, 0, n));
      rhi[r] = static_cast<int>(std::clamp<int64_t>(own + 1 - t0, 0, n));
    }
    for (int r = 0; r < R; ++r) {
      float* sr = s + r * kTile;
      alpha[r] = 1.f;
      if (rhi[r] <= rlo[r]) {
        std::fill(sr, sr + kTile, 0.f);
        continue;
      }
      float mx = kNeg;
      for (int t = rlo[r]; t < rhi[r]; ++t) {
        sr[t] = dot(qs + r * D, kt + static_cast<int64_t>(t) * D, D);
        mx = std::max(mx, sr[t]);
      }
      const float m_new = std::max(m[r], mx);
      alpha[r] = std::exp(m[r] - m_new);
      std::fill(sr, sr + rlo[r], 0.f);
      std::fill(sr + rhi[r], sr + kTile, 0.f);
      const __m256 top = _mm256_set1_ps(m_new);
      __m256 sum8 = _mm256_setzero_ps();
      int t = rlo[r];
      for (; t + 8 <= rhi[r]; t += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sr + t), top));
        _mm256_storeu_ps(sr + t, e);
        sum8 = _mm256_add_ps(sum8, e);
      }
      float sum = hsum(sum8);
      for (; t < rhi[r]; ++t) {
        sr[t] = std::exp(sr[t] - m_new);
        sum += sr[t];
      }
      l[r] = l[r] * alpha[r] + sum;
      m[r] = m_new;
    }
    accumulate(acc, s, vt, D, n, R, D, alpha);
  }
}

}  // namespace

at::Tensor float_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& slots, const at::Tensor& row_lo, const at::Tensor& row_hi,
                                  int64_t window, double sm_scale) {
  TORCH_CHECK(q.dim() == 4 && q.scalar_type() == at::kFloat && q.is_contiguous(),
              "q must be a contiguous float32 (B, H_q, L_q, D) tensor, got ", q.sizes(), " ", q.scalar_type());
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.scalar_type() == at::kFloat &&
                  v_cache.scalar_type() == at::kFloat && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "k_cache and v_cache must be contiguous float32 (slots, H_kv, rows, D) tensors of one shape, got ",
              k_cache.sizes(), " and ", v_cache.sizes());
  const int64_t B = q.size(0);
  for (const auto* t : {&slots, &row_lo, &row_hi})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == B && t->scalar_type() == at::kLong && t->is_contiguous(),
                "slots, row_lo and row_hi must be int64 (B,) tensors with B = ", B);
  TORCH_CHECK(q.size(3) == k_cache.size(3) && k_cache.size(1) >= 1 && q.size(1) % k_cache.size(1) == 0,
              "q ", q.sizes(), " does not fit a cache of ", k_cache.size(1), " heads of dim ", k_cache.size(3));
  TORCH_CHECK(window >= 0, "window must be >= 0 (0: none)");
  Call c{};
  c.B = static_cast<int>(B);
  c.Hq = static_cast<int>(q.size(1));
  c.Lq = static_cast<int>(q.size(2));
  c.D = static_cast<int>(q.size(3));
  c.Hkv = static_cast<int>(k_cache.size(1));
  c.group = c.Hq / c.Hkv;
  c.R = c.group * c.Lq;
  c.rows_cap = k_cache.size(2);
  c.window = static_cast<int>(window);
  c.scale = static_cast<float>(sm_scale);
  c.q = q.data_ptr<float>();
  c.k = k_cache.data_ptr<float>();
  c.v = v_cache.data_ptr<float>();
  c.slots = slots.data_ptr<int64_t>();
  c.lo = row_lo.data_ptr<int64_t>();
  c.hi = row_hi.data_ptr<int64_t>();
  int64_t most = 0;
  for (int b = 0; b < c.B; ++b) {
    TORCH_CHECK(c.slots[b] >= 0 && c.slots[b] < k_cache.size(0), "slot ", c.slots[b], " of sequence ", b,
                " is outside the cache's ", k_cache.size(0), " slots");
    TORCH_CHECK(0 <= c.lo[b] && c.lo[b] + c.Lq <= c.hi[b] && c.hi[b] <= c.rows_cap, "sequence ", b,
                " holds rows [", c.lo[b], ", ", c.hi[b], ") — it must hold its ", c.Lq,
                " new tokens, inside the cache's ", c.rows_cap, " rows");
    most = std::max(most, c.hi[b] - c.lo[b]);
  }
  c.splits = static_cast<int>(std::max<int64_t>(1, (most + kSplitRows - 1) / kSplitRows));
  auto opts = q.options();
  const int64_t parts = B * c.Hkv * c.splits * c.R;
  at::Tensor m = at::empty({parts}, opts), l = at::empty({parts}, opts), acc = at::empty({parts, c.D}, opts);
  c.m_out = m.data_ptr<float>();
  c.l_out = l.data_ptr<float>();
  c.acc_out = acc.data_ptr<float>();
  at::parallel_for(0, B * c.Hkv * c.splits, 1, [&](int64_t from, int64_t to) {
    std::vector<float> scratch;
    for (int64_t j = from; j < to; ++j)
      job(c, static_cast<int>(j / (c.Hkv * c.splits)), static_cast<int>(j / c.splits % c.Hkv),
          static_cast<int>(j % c.splits), scratch);
  });
  at::Tensor out = at::empty_like(q);
  float* o = out.data_ptr<float>();
  at::parallel_for(0, B * c.Hkv, 1, [&](int64_t from, int64_t to) {
    for (int64_t bh = from; bh < to; ++bh) {
      const int b = static_cast<int>(bh / c.Hkv), h = static_cast<int>(bh % c.Hkv);
      for (int r = 0; r < c.R; ++r) {
        float top = kNeg;
        for (int sp = 0; sp < c.splits; ++sp) top = std::max(top, c.m_out[(bh * c.splits + sp) * c.R + r]);
        float* dst = o + ((static_cast<int64_t>(b) * c.Hq + h * c.group + r / c.Lq) * c.Lq + r % c.Lq) * c.D;
        std::fill(dst, dst + c.D, 0.f);
        float total = 0.f;
        for (int sp = 0; sp < c.splits; ++sp) {
          const int64_t at = (bh * c.splits + sp) * c.R + r;
          if (c.l_out[at] == 0.f) continue;
          const float w = std::exp(c.m_out[at] - top);
          total += c.l_out[at] * w;
          for (int d = 0; d < c.D; ++d) dst[d] += c.acc_out[at * c.D + d] * w;
        }
        const float inv = total > 0.f ? 1.f / total : 0.f;
        for (int d = 0; d < c.D; ++d) dst[d] *= inv;
      }
    }
  });
  return out;
}

at::Tensor float_decode_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slots,
                             const at::Tensor& rows, int64_t window, double sm_scale) {
  // every argument checked before anything is written (a bad call leaves the cache as it was)
  TORCH_CHECK(q.dim() == 4 && q.scalar_type() == at::kFloat && q.is_contiguous(),
              "q must be a contiguous float32 (B, H_q, L_q, D) tensor");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.scalar_type() == at::kFloat &&
                  v_cache.scalar_type() == at::kFloat && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "k_cache and v_cache must be contiguous float32 (slots, H_kv, rows, D) tensors of one shape");
  const int64_t B = q.size(0), T = q.size(2), S = k_cache.size(0), H = k_cache.size(1),
                cap = k_cache.size(2), D = k_cache.size(3);
  TORCH_CHECK(q.size(3) == D && q.size(1) % H == 0, "q ", q.sizes(), " does not fit a cache of ", H,
              " heads of dim ", D);
  for (const auto* t : {&k, &v})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 4 && t->size(0) == B &&
                    t->size(1) == H && t->size(2) == T && t->size(3) == D,
                "k and v must be contiguous float32 (B, H_kv, L_q, D) matching q and the cache");
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.is_contiguous() && rows.dim() == 2 && rows.size(0) == 2 &&
                  rows.size(1) == S, "rows must be int64 (2, slots): each slot's held rows [lo, hi)");
  TORCH_CHECK(window >= 0, "window must be >= 0 (0: none)");
  const int64_t* sl = checked_slots(slots, B, S);
  int64_t *lo = rows.data_ptr<int64_t>(), *hi = lo + S;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(0 <= lo[sl[b]] && lo[sl[b]] <= hi[sl[b]] && hi[sl[b]] + T <= cap, "slot ", sl[b], " holds rows [",
                lo[sl[b]], ", ", hi[sl[b]], "): no room for ", T, " more in the cache's ", cap);
  }
  at::Tensor row_lo = at::empty({B}, at::kLong), row_hi = at::empty({B}, at::kLong);
  for (int64_t b = 0; b < B; ++b) {  // FloatKVLayer.append: the window's start, then the rows
    const int64_t s = sl[b];
    if (window > 0) lo[s] = std::max(lo[s], hi[s] - window + 1);
    for (int64_t h = 0; h < H; ++h) {
      const int64_t src = ((b * H + h) * T) * D, dst = ((s * H + h) * cap + hi[s]) * D;
      std::copy(k.data_ptr<float>() + src, k.data_ptr<float>() + src + T * D, k_cache.data_ptr<float>() + dst);
      std::copy(v.data_ptr<float>() + src, v.data_ptr<float>() + src + T * D, v_cache.data_ptr<float>() + dst);
    }
    hi[s] += T;
    row_lo.data_ptr<int64_t>()[b] = lo[s];
    row_hi.data_ptr<int64_t>()[b] = hi[s];
  }
  return float_decode_attention(q, k_cache, v_cache, slots, row_lo, row_hi, window, sm_scale);
}

}  // namespace turbo
