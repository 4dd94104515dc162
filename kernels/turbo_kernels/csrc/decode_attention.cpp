// turbo::decode_attention — the newest tokens of each sequence over one layer of the packed KV
// cache (docs/design.md §2.2), on CPU. Same math as the reference
// (turbo_core.attention.reference.decode_attention_reference) with running maxima.
//
// Jobs (at::parallel_for on torch's pool): (sequence b, KV head h, context split sp) walk their
// pages; (b, h) once more for the INT8 buffer. A job keeps, per query row r (query head of the
// GQA group x new token), a running max m, sum l and accumulator acc[D]; partials are merged
// exactly, in split order, so a sequence's result does not depend on its batch.
//
// Per page: the planar codes are unpacked into a (D, c) tile of INT8 values held in float,
//   q8 = clamp(code * S + low, +-127)          (K: S, low per (channel, token group);
//                                               V: S, low per (channel group, token)),
// the scores of all rows against the page's c keys are one loop over D with the tokens inner
// (the compiler vectorizes it: 8 floats per AVX2 FMA), then the tile softmax (one max, one
// exponent pass — SAS: LUT[n] * P(f) for -x = n + f, or exp — one rescale) and P.V with the
// tokens inner. Keys outside a row's sliding window are one range at the tile's front.
//
// The AVX2 page pass (pages_job_avx2, used when the tile is a whole number of 8-token blocks)
// folds the integer second level into the queries and the weights, exact because the clamp
// never acts inside the cache's protective range (quant.py):
//   q . k8[:, t] = sum_d (q_d S_dg) code_dt + sum_d q_d low_dg          (K: g = token group)
//   sum_t w_t v8[d, t] = sum_t (w_t S_gt) code_dt + sum_t w_t low_gt     (V: g = channel group)
// so a page's codes are only converted to float, once, for all the rows that read them.
//
// turbo::decode_step — a decode step's whole work on one layer in one call: the new K/V rows
// quantized into the INT8 buffer at each slot's length (append's rows, byte for byte), the
// slot-indexed lengths advanced in place, then this attention reading every per-sequence
// tensor by slot (no gathered view). QuantizedKVLayer.step calls it when no chunk is due for
// compression and no page leaves the window (QuantizedKVLayer.update otherwise).

#include <ATen/Parallel.h>

#include "attention_common.h"
#include "ops.h"

namespace turbo {

struct Rows {  // the running state of the R query rows of one job
  int R, D;
  std::vector<float> m, l, acc;
  Rows(int r, int d) : R(r), D(d), m(r, kNeg), l(r, 0.f), acc(static_cast<size_t>(r) * d, 0.f) {}

  // One tile of n keys: scores s (R, stride), values v (D, stride) as float, rows see keys
  // [lo[r], hi[r]).
  void update(float* s, int stride, const float* v, const int* lo, const int* hi,
              const Softmax& sm, int64_t& zeros, int64_t& seen) {
    for (int r = 0; r < R; ++r) {
      const int a = std::max(0, lo[r]), b = hi[r];
      if (b <= a) continue;
      float* sr = s + static_cast<size_t>(r) * stride;
      float mx = kNeg;
#pragma omp simd reduction(max : mx)
      for (int t = a; t < b; ++t) mx = std::max(mx, sr[t]);
      const float m_new = std::max(m[r], mx);
      const float alpha = std::exp(m[r] - m_new);
      l[r] = l[r] * alpha + sm.weights(sr, a, b, m_new, zeros);
      seen += b - a;
      float* ar = acc.data() + static_cast<size_t>(r) * D;
      for (int d = 0; d < D; ++d) {
        const float* vd = v + static_cast<size_t>(d) * stride;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int t = a; t < b; ++t) dot += sr[t] * vd[t];
        ar[d] = ar[d] * alpha + dot;
      }
      m[r] = m_new;
    }
  }
};

struct Call : Packed {  // the view, and this call's queries, splits and partial results
  int Hq, Lq, group, splits, step;
  float sm_scale;
  const float *q, *qs;
  float *m_out, *l_out, *acc_out;  // (B, Hq, Lq, S + 1[, D])
};

inline void load_query(const Call& c, int b, int hk, std::vector<float>& qr, std::vector<float>& qsr) {
  for (int g = 0; g < c.group; ++g)
    for (int i = 0; i < c.Lq; ++i) {
      const int64_t at = ((static_cast<int64_t>(b) * c.Hq + hk * c.group + g) * c.Lq + i);
      const int r = g * c.Lq + i;
      std::copy(c.q + at * c.D, c.q + (at + 1) * c.D, qr.begin() + static_cast<int64_t>(r) * c.D);
      qsr[r] = c.qs[at];
    }
}

inline void store_partial(const Call& c, int b, int hk, int slot, const Rows& st) {
  const int S1 = c.splits + 1;
  for (int g = 0; g < c.group; ++g)
    for (int i = 0; i < c.Lq; ++i) {
      const int r = g * c.Lq + i;
      const int64_t at = ((static_cast<int64_t>(b) * c.Hq + hk * c.group + g) * c.Lq + i) * S1 + slot;
      c.m_out[at] = st.m[r];
      c.l_out[at] = st.l[r];
      std::copy(st.acc.begin() + static_cast<int64_t>(r) * c.D,
                st.acc.begin() + static_cast<int64_t>(r + 1) * c.D, c.acc_out + at * c.D);
    }
}

// With a sliding window: lo[r] = the first key of held page ci that row r sees (key t sits at
// first_pos + ci * chunk + t; row r is new token r % Lq); returns the smallest.
inline int window_starts(const Call& c, int b, int ci, int R, int* lo) {
  int first = c.chunk;
  for (int r = 0; r < R; ++r) {
    lo[r] = static_cast<int>(c.qpos0[b] + r % c.Lq - c.window + 1 - (c.first_pos[b] + ci * c.chunk));
    first = std::min(first, lo[r]);
  }
  return first;
}

template <int BITS>
void pages_job(const Call& c, const Group& g, int b, int i, int sp, const Softmax& sm,
               int64_t* counts) {
  const int D = c.D, C = c.chunk, R = c.group * c.Lq;
  const int hk = static_cast<int>(g.heads[i]);
  const int nc = c.n_chunks[b];
  const int c_lo = std::min(nc, sp * c.step), c_hi = std::min(nc, sp * c.step + c.step);
  std::vector<float> qr(static_cast<size_t>(R) * D), qsr(R);
  load_query(c, b, hk, qr, qsr);
  Rows st(R, D);
  std::vector<float> k8(static_cast<size_t>(D) * C), v8(static_cast<size_t>(D) * C),
      s(static_cast<size_t>(R) * C), sc(2 * C), lo_t(2 * C);
  std::vector<int> lo(R, 0), hi(R, C);
  int64_t zeros = 0, seen = 0;
  for (int ci = c_lo; ci < c_hi; ++ci) {
    const int64_t p = c.table[b][ci];
    if (c.window > 0 && window_starts(c, b, ci, R, lo.data()) >= C) continue;  // nobody sees it
    const int64_t ph = p * g.n + i;  // (page, head row) of the pool tensors
    decode_page<BITS>(g, ph, D, C, k8.data(), v8.data(), C, sc.data(), lo_t.data());
    for (int r = 0; r < R; ++r) {  // s = q . k8, tokens inner
      float* sr = s.data() + static_cast<size_t>(r) * C;
      std::fill(sr, sr + C, 0.f);
      const float* q = qr.data() + static_cast<size_t>(r) * D;
      for (int d = 0; d < D; ++d) {
        const float qd = q[d];
        const float* kd = k8.data() + static_cast<size_t>(d) * C;
        for (int t = 0; t < C; ++t) sr[t] += qd * kd[t];
      }
      const float f = qsr[r] * g.kf[ph] * c.sm_scale;
      for (int t = 0; t < C; ++t) sr[t] *= f;
    }
    st.update(s.data(), C, v8.data(), lo.data(), hi.data(), sm, zeros, seen);
  }
  store_partial(c, b, hk, sp, st);
  counts[0] += zeros;
  counts[1] += seen;
}

// codes of tokens [t0, t0 + 8) of one channel as float (t0 % 8 == 0, M % 8 == 0): byte j of
// plane p holds token p * M + j (INT8: the signed byte).
template <int BITS>
inline __m256 codes8(const uint8_t* src, int M, int t0) {
  if constexpr (BITS == 8) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + t0))));
  } else {
    const int p = t0 / M, j = t0 - p * M;
    __m256i x = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + j)));
    if (p) x = _mm256_srli_epi32(x, p * BITS);
    if (p != 8 / BITS - 1) x = _mm256_and_si256(x, _mm256_set1_epi32((1 << BITS) - 1));
    return _mm256_cvtepi32_ps(x);
  }
}

// Asks for the n bytes from p into L1 (the next page's codes and scales while this one is
// read: pages sit apart in the pool, so the hardware prefetcher starts cold on each).
inline void prefetch(const void* p, int64_t n) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < n; o += 64) _mm_prefetch(c + o, _MM_HINT_T0);
}

// score_rows for the 32 tokens from t0 (ONE_GROUP: all in one token group of K's second level)
// codes8 with the chunk CC and the token T known at compile time: immediate shifts, no mask
// on the top plane
template <int BITS, int CC, int T>
inline __m256 codes8c(const uint8_t* src) {
  if constexpr (BITS == 8) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + T))));
  } else {
    constexpr int M = CC * BITS / 8, p = T / M, j = T - p * M;
    __m256i x = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + j)));
    if constexpr (p > 0) x = _mm256_srli_epi32(x, p * BITS);
    if constexpr (p < 8 / BITS - 1) x = _mm256_and_si256(x, _mm256_set1_epi32((1 << BITS) - 1));
    return _mm256_cvtepi32_ps(x);
  }
}

// acc (8 lanes) = alpha acc + z + sum_t w_t v_t over the 64 tokens of one channel (v: its codes
// as float, 8 registers); two chains of FMAs, then their sum
inline void pv_row64(const __m256* v, const float* w, __m256 alpha, __m256 z, float* acc) {
  __m256 x = _mm256_fmadd_ps(_mm256_loadu_ps(acc), alpha, z);
  __m256 y = _mm256_mul_ps(_mm256_loadu_ps(w), v[0]);
  x = _mm256_fmadd_ps(_mm256_loadu_ps(w + 8), v[1], x);
  y = _mm256_fmadd_ps(_mm256_loadu_ps(w + 16), v[2], y);
  x = _mm256_fmadd_ps(_mm256_loadu_ps(w + 24), v[3], x);
  y = _mm256_fmadd_ps(_mm256_loadu_ps(w + 32), v[4], y);
  x = _mm256_fmadd_ps(_mm256_loadu_ps(w + 40), v[5], x);
  y = _mm256_fmadd_ps(_mm256_loadu_ps(w + 48), v[6], y);
  x = _mm256_fmadd_ps(_mm256_loadu_ps(w + 56), v[7], x);
  _mm256_storeu_ps(acc, _mm256_add_ps(x, y));
}

// P.V of one V channel group (channels [d0, d0 + n), codes from src, M bytes a channel) for RR
// rows known at compile time: each row's weights, rescale and offset set once for the group
// (per channel and row they were ~8 instructions of address arithmetic and broadcasts, ~13 %
// of the op's), each channel's codes unpacked once for all rows; the same operations in the
// same order as the generic loop, so the same bits.
template <int BITS, int RR>
void pv_group64(const uint8_t* src, int M, int d0, int n, const float* wv, int vgs, int grp, int D,
                const float* alpha, const float* zv, float* accp) {
  const float* w[RR];
  __m256 al[RR], z[RR];
  for (int r = 0; r < RR; ++r) {
    w[r] = wv + (static_cast<size_t>(r) * vgs + grp) * 64;
    al[r] = _mm256_set1_ps(alpha[r]);
    z[r] = _mm256_set1_ps(zv[r * vgs + grp]);
  }
  for (int d = d0; d < d0 + n; ++d, src += M) {
    __m256 v[8];
    v[0] = codes8c<BITS, 64, 0>(src); v[1] = codes8c<BITS, 64, 8>(src);
    v[2] = codes8c<BITS, 64, 16>(src); v[3] = codes8c<BITS, 64, 24>(src);
    v[4] = codes8c<BITS, 64, 32>(src); v[5] = codes8c<BITS, 64, 40>(src);
    v[6] = codes8c<BITS, 64, 48>(src); v[7] = codes8c<BITS, 64, 56>(src);
    for (int r = 0; r < RR; ++r) pv_row64(v, w[r], al[r], z[r], accp + (static_cast<size_t>(r) * D + d) * 8);
  }
}

// CC > 0: the chunk and T0 (the block's first token) known at compile time
template <int BITS, int NR, bool ONE_GROUP, int CC = 0, int T0 = 0>
inline void score_block(const float* qk, const float* z, const uint8_t* kcodes, int D, int C,
                        int kgs, int k_group, int r0, int t0, float* s) {
  if constexpr (CC > 0) { C = CC; t0 = T0; }
  const int M = C * BITS / 8;
  const float* qrow[NR][4];
  int grp[4];
  for (int k = 0; k < 4; ++k) {
    grp[k] = (t0 + 8 * k) / k_group;
    for (int r = 0; r < NR; ++r) qrow[r][k] = qk + (static_cast<size_t>(r0 + r) * kgs + grp[k]) * D;
  }
  __m256 acc[NR][4];
  for (int r = 0; r < NR; ++r)
    for (int k = 0; k < 4; ++k) acc[r][k] = _mm256_setzero_ps();
  // where tokens t0 + 8k sit in a channel's planes: byte offset and shift, fixed over d
  int off[4];
  __m128i shift[4];
  for (int k = 0; k < 4; ++k) {
    const int p = BITS == 8 ? 0 : (t0 + 8 * k) / M;
    off[k] = t0 + 8 * k - p * M;
    shift[k] = _mm_cvtsi32_si128(p * BITS);
  }
  const __m256i mask = _mm256_set1_epi32((1 << BITS) - 1);
  auto load = [&](const uint8_t* kd, int k) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(kd + off[k]));
    if constexpr (BITS == 8) return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
    return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srl_epi32(_mm256_cvtepu8_epi32(b), shift[k]), mask));
  };
  for (int d = 0; d < D; ++d) {  // channel d's 32 codes become float in registers
    const uint8_t* kd = kcodes + static_cast<size_t>(d) * M;
    __m256 k0, k1, k2, k3;
    if constexpr (CC > 0) {
      k0 = codes8c<BITS, CC, T0>(kd); k1 = codes8c<BITS, CC, T0 + 8>(kd);
      k2 = codes8c<BITS, CC, T0 + 16>(kd); k3 = codes8c<BITS, CC, T0 + 24>(kd);
    } else {
      k0 = load(kd, 0); k1 = load(kd, 1); k2 = load(kd, 2); k3 = load(kd, 3);
    }
    for (int r = 0; r < NR; ++r) {
      if constexpr (ONE_GROUP) {
        const __m256 qv = _mm256_broadcast_ss(qrow[r][0] + d);
        acc[r][0] = _mm256_fmadd_ps(qv, k0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(qv, k1, acc[r][1]);
        acc[r][2] = _mm256_fmadd_ps(qv, k2, acc[r][2]);
        acc[r][3] = _mm256_fmadd_ps(qv, k3, acc[r][3]);
      } else {
        acc[r][0] = _mm256_fmadd_ps(_mm256_broadcast_ss(qrow[r][0] + d), k0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(_mm256_broadcast_ss(qrow[r][1] + d), k1, acc[r][1]);
        acc[r][2] = _mm256_fmadd_ps(_mm256_broadcast_ss(qrow[r][2] + d), k2, acc[r][2]);
        acc[r][3] = _mm256_fmadd_ps(_mm256_broadcast_ss(qrow[r][3] + d), k3, acc[r][3]);
      }
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int k = 0; k < 4; ++k)
      _mm256_storeu_ps(s + static_cast<size_t>(r0 + r) * C + t0 + 8 * k,
                       _mm256_add_ps(acc[r][k], _mm256_set1_ps(z[(r0 + r) * kgs + grp[k]])));
}

// s[r, t] = sum_d qk[r, g(t), d] code[d, t] + z[r, g(t)] for rows [r0, r0 + NR), 32 tokens a
// step (g(t) = t / k_group): NR rows x 4 blocks of 8 accumulators stay in registers; the codes
// are read from the page (planar, M bytes per channel) for each block of NR rows.
template <int BITS, int NR, int CC>
inline void score_rows(const float* qk, const float* z, const uint8_t* kcodes, int D, int C,
                       int kgs, int k_group, int r0, float* s) {
  if constexpr (CC == 64) {
    if (k_group % 32 == 0) {
      score_block<BITS, NR, true, 64, 0>(qk, z, kcodes, D, C, kgs, k_group, r0, 0, s);
      score_block<BITS, NR, true, 64, 32>(qk, z, kcodes, D, C, kgs, k_group, r0, 32, s);
    } else {
      score_block<BITS, NR, false, 64, 0>(qk, z, kcodes, D, C, kgs, k_group, r0, 0, s);
      score_block<BITS, NR, false, 64, 32>(qk, z, kcodes, D, C, kgs, k_group, r0, 32, s);
    }
    return;
  }
  for (int t0 = 0; t0 < C; t0 += 32) {
    if (k_group % 32 == 0) score_block<BITS, NR, true>(qk, z, kcodes, D, C, kgs, k_group, r0, t0, s);
    else score_block<BITS, NR, false>(qk, z, kcodes, D, C, kgs, k_group, r0, t0, s);
  }
}

// CC: the chunk as a compile-time constant (64, the default: every token loop unrolls) or 0
struct Scratch {  // what a thread's page jobs reuse: made once per parallel_for range
  std::vector<float> qr, qsr, s, qk, z, wv, zv, m, l, alpha, accp, vrow;
  std::vector<int> lo;
};

template <int BITS, int CC>
void pages_job_avx2(const Call& c, const Group& g, int b, int i, int sp, const Softmax& sm,
                    int64_t* counts, Scratch& S_) {
  const int D = c.D, C = CC ? CC : c.chunk, R = c.group * c.Lq, M = C * BITS / 8;
  const int hk = static_cast<int>(g.heads[i]);
  const int nc = c.n_chunks[b];
  const int c_lo = std::min(nc, sp * c.step), c_hi = std::min(nc, sp * c.step + c.step);
  const int kgs = BITS == 8 ? 1 : C / g.k_group, k_group = BITS == 8 ? C : g.k_group;
  const int vgs = BITS == 8 ? 1 : D / g.v_group, v_group = BITS == 8 ? D : g.v_group;
  // scratch of the thread's jobs (sized here, not cleared, but for the running state)
  auto &qr = S_.qr, &qsr = S_.qsr;
  qr.resize(static_cast<size_t>(R) * D);
  qsr.resize(R);
  load_query(c, b, hk, qr, qsr);
  S_.s.resize(static_cast<size_t>(R) * C);
  S_.qk.resize(static_cast<size_t>(R) * kgs * D);
  S_.z.resize(static_cast<size_t>(R) * kgs);
  S_.wv.resize(static_cast<size_t>(R) * vgs * C);
  S_.zv.resize(static_cast<size_t>(R) * vgs);
  S_.alpha.resize(R);
  S_.vrow.resize(C);
  S_.m.assign(R, kNeg);
  S_.l.assign(R, 0.f);
  S_.accp.assign(static_cast<size_t>(R) * D * 8, 0.f);  // per (row, channel): 8 lanes of partial sums
  S_.lo.assign(R, 0);
  float *s = S_.s.data(), *qk = S_.qk.data(), *z = S_.z.data(),
        *wv = S_.wv.data(), *zv = S_.zv.data(), *m = S_.m.data(), *l = S_.l.data(),
        *alpha = S_.alpha.data(), *accp = S_.accp.data(), *vrow = S_.vrow.data();
  int* lo = S_.lo.data();
  int64_t zeros = 0, seen = 0;
  const int64_t page_bytes = static_cast<int64_t>(D) * M;
  for (int ci = c_lo; ci < c_hi; ++ci) {
    const int64_t p = c.table[b][ci];
    if (ci + 1 < c_hi) {  // the next page: codes, and V's per-token scales
      const int64_t nph = c.table[b][ci + 1] * g.n + i;
      prefetch(g.kp + nph * page_bytes, page_bytes);
      prefetch(g.vp + nph * page_bytes, page_bytes);
      if constexpr (BITS != 8) {
        prefetch(g.vsc + nph * vgs * C, static_cast<int64_t>(vgs) * C);
        prefetch(g.vlo + nph * vgs * C, static_cast<int64_t>(vgs) * C);
      }
    }
    if (c.window > 0 && window_starts(c, b, ci, R, lo) >= C) continue;  // nobody sees it
    const int64_t ph = p * g.n + i;  // (page, head row) of the pool tensors
    // qk[r, grp, d] = q_rd S_d,grp;  z[r, grp] = sum_d q_rd low_d,grp  (times the page's scales)
    for (int r = 0; r < R; ++r) {
      const float f = qsr[r] * g.kf[ph] * c.sm_scale;
      const float* q = qr.data() + static_cast<size_t>(r) * D;
      if (BITS != 8 && kgs == 1) {  // S, low contiguous along the channels: 8 at a time
        float* out = qk + static_cast<size_t>(r) * D;
        const uint8_t* ks = g.ksc + ph * D;
        const int8_t* kl = g.klo + ph * D;
        const __m256 f8 = _mm256_set1_ps(f);
        __m256 zz = _mm256_setzero_ps();
        for (int d = 0; d < D; d += 8) {
          const __m256 qv = _mm256_loadu_ps(q + d);
          const __m256 sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(ks + d))));
          const __m256 low = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(kl + d))));
          _mm256_storeu_ps(out + d, _mm256_mul_ps(_mm256_mul_ps(qv, sc), f8));
          zz = _mm256_fmadd_ps(qv, low, zz);
        }
        z[r] = hsum(zz) * f;
        continue;
      }
      for (int grp = 0; grp < kgs; ++grp) {
        float* out = qk + (static_cast<size_t>(r) * kgs + grp) * D;
        float zz = 0.f;
        for (int d = 0; d < D; ++d) {
          const int64_t at = (ph * D + d) * kgs + grp;
          const float sc = BITS == 8 ? 1.f : g.ksc[at], low = BITS == 8 ? 0.f : g.klo[at];
          out[d] = q[d] * sc * f;
          zz += q[d] * low;
        }
        z[r * kgs + grp] = zz * f;
      }
    }
    int r = 0;
    const uint8_t* kcodes = g.kp + ph * page_bytes;
    for (; r + 3 <= R; r += 3) score_rows<BITS, 3, CC>(qk, z, kcodes, D, C, kgs, k_group, r, s);
    for (; r < R; ++r) score_rows<BITS, 1, CC>(qk, z, kcodes, D, C, kgs, k_group, r, s);
    const float vscale = g.vf[ph];
    const uint8_t* vcodes = g.vp + ph * page_bytes;
    for (r = 0; r < R; ++r) {
      float* sr = s + static_cast<size_t>(r) * C;
      const int a = std::max(0, lo[r]);
      if (a >= C) {  // the whole page is outside this row's window: no weight, no rescale
        alpha[r] = 1.f;
        for (int grp = 0; grp < vgs; ++grp) {
          std::fill(wv + (static_cast<size_t>(r) * vgs + grp) * C,
                    wv + (static_cast<size_t>(r) * vgs + grp + 1) * C, 0.f);
          zv[r * vgs + grp] = 0.f;
        }
        continue;
      }
      std::fill(sr, sr + a, kNeg);
      __m256 mx8 = _mm256_set1_ps(kNeg);
      for (int t = 0; t < C; t += 8) mx8 = _mm256_max_ps(mx8, _mm256_loadu_ps(sr + t));
      const float m_new = std::max(m[r], hmax(mx8));
      alpha[r] = std::exp(m[r] - m_new);
      l[r] = l[r] * alpha[r] + sm.weights(sr, a, C, m_new, zeros);  // sr[:a] = 0
      seen += C - a;
      m[r] = m_new;
      // wv[r, grp, t] = w_t S_grp,t vf;  zv[r, grp] = vf sum_t w_t low_grp,t
      for (int grp = 0; grp < vgs; ++grp) {
        float* w_out = wv + (static_cast<size_t>(r) * vgs + grp) * C;
        if constexpr (BITS == 8) {
          const __m256 vf8 = _mm256_set1_ps(vscale);
          for (int t = 0; t < C; t += 8) _mm256_storeu_ps(w_out + t, _mm256_mul_ps(_mm256_loadu_ps(sr + t), vf8));
          zv[r] = 0.f;
          continue;
        }
        const uint8_t* vs = g.vsc + (ph * vgs + grp) * C;
        const int8_t* vl = g.vlo + (ph * vgs + grp) * C;
        const __m256 vf8 = _mm256_set1_ps(vscale);
        __m256 zz = _mm256_setzero_ps();
        for (int t = 0; t < C; t += 8) {  // 8 tokens: S, low (u8, i8) -> float
          const __m256 w = _mm256_loadu_ps(sr + t);
          const __m256 sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(vs + t))));
          const __m256 low = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(vl + t))));
          _mm256_storeu_ps(w_out + t, _mm256_mul_ps(_mm256_mul_ps(w, sc), vf8));
          zz = _mm256_fmadd_ps(w, low, zz);
        }
        zv[r * vgs + grp] = hsum(zz) * vscale * 0.125f;  // spread over the 8 lanes
      }
    }
    // acc[r, d] (8 lanes) = alpha_r acc[r, d] + sum_t wv[r, g(d), t] code_dt + zv[r, g(d)]:
    // channel d's codes become float once, in registers, for all R rows
    for (int grp = 0, d = 0; grp < vgs; ++grp) {
      if (C == 64 && R <= 4) {  // the common shapes: rows unrolled, their scalars in registers
        const uint8_t* src = vcodes + static_cast<int64_t>(d) * M;
        if (R == 1) pv_group64<BITS, 1>(src, M, d, v_group, wv, vgs, grp, D, alpha, zv, accp);
        else if (R == 2) pv_group64<BITS, 2>(src, M, d, v_group, wv, vgs, grp, D, alpha, zv, accp);
        else if (R == 3) pv_group64<BITS, 3>(src, M, d, v_group, wv, vgs, grp, D, alpha, zv, accp);
        else pv_group64<BITS, 4>(src, M, d, v_group, wv, vgs, grp, D, alpha, zv, accp);
        d += v_group;
        continue;
      }
      for (int dd = 0; dd < v_group; ++dd, ++d) {
        const uint8_t* src = vcodes + static_cast<int64_t>(d) * M;
        if (C == 64) {
          __m256 v[8];
          v[0] = codes8c<BITS, 64, 0>(src); v[1] = codes8c<BITS, 64, 8>(src);
          v[2] = codes8c<BITS, 64, 16>(src); v[3] = codes8c<BITS, 64, 24>(src);
          v[4] = codes8c<BITS, 64, 32>(src); v[5] = codes8c<BITS, 64, 40>(src);
          v[6] = codes8c<BITS, 64, 48>(src); v[7] = codes8c<BITS, 64, 56>(src);
          for (r = 0; r < R; ++r) {
            const float* w = wv + (static_cast<size_t>(r) * vgs + grp) * C;
            float* acc = accp + (static_cast<size_t>(r) * D + d) * 8;
            pv_row64(v, w, _mm256_set1_ps(alpha[r]), _mm256_set1_ps(zv[r * vgs + grp]), acc);
          }
        } else {  // the channel's codes as float once (vrow), then every row
          for (int t = 0; t < C; t += 8) _mm256_storeu_ps(vrow + t, codes8<BITS>(src, M, t));
          for (r = 0; r < R; ++r) {
            const float* w = wv + (static_cast<size_t>(r) * vgs + grp) * C;
            float* acc = accp + (static_cast<size_t>(r) * D + d) * 8;
            __m256 x = _mm256_fmadd_ps(_mm256_loadu_ps(acc), _mm256_set1_ps(alpha[r]),
                                       _mm256_set1_ps(zv[r * vgs + grp]));
            for (int t = 0; t < C; t += 8) x = _mm256_fmadd_ps(_mm256_loadu_ps(w + t), _mm256_loadu_ps(vrow + t), x);
            _mm256_storeu_ps(acc, x);
          }
        }
      }
    }
  }
  Rows st(R, D);
  st.m.assign(m, m + R);
  st.l.assign(l, l + R);
  for (int r = 0; r < R; ++r)
    for (int d = 0; d < D; ++d)
      st.acc[static_cast<size_t>(r) * D + d] = hsum(_mm256_loadu_ps(accp + (static_cast<size_t>(r) * D + d) * 8));
  store_partial(c, b, hk, sp, st);
  counts[0] += zeros;
  counts[1] += seen;
}

// The AVX2 pass reads whole 8-token blocks of codes, 8 channels a step.
inline bool avx2_fits(const Group& g, int C, int D) {
  const int M = C * g.bits / 8;
  return M % 8 == 0 && C % 8 == 0 && D % 8 == 0 &&
         (g.bits == 8 || (g.k_group % 8 == 0 && C % g.k_group == 0 && D % g.v_group == 0));
}

// The INT8 buffer of (b, hk): rows are token-major (D contiguous), so a block of rows becomes
// float once (V with its row scale), scores are one dot per (row, key), and P.V adds
// w_t * v[t, :] into a row's accumulator 64 channels (8 registers) at a time — no
// transposition, no horizontal sums but the scores'. Channels past the last multiple of 8
// (D % 8 != 0) take scalar tails.
void buffer_job(const Call& c, int b, int hk, const Softmax& sm, int64_t* counts) {
  const int D = c.D, R = c.group * c.Lq, n_rows = c.blen[b];
  // rows a block at a time; the scratch sized by the rows there are (a decode step's buffer
  // holds a few: zeroing 64 rows of scratch cost more than reading them)
  const int kBlock = std::max(1, std::min(64, n_rows));
  std::vector<float> qr(static_cast<size_t>(R) * D), qsr(R);
  load_query(c, b, hk, qr, qsr);
  Rows st(R, D);
  std::vector<float> s(static_cast<size_t>(R) * kBlock), kf(static_cast<size_t>(kBlock) * D),
      vf(static_cast<size_t>(kBlock) * D);
  int64_t zeros = 0, seen = 0;
  const int64_t base = (c.slot[b] * c.Hkv + hk) * c.rows_cap;  // row 0 of (b, hk)
  const int D8 = D - D % 8;  // channels the 8-lane loops cover
  auto row8 = [](const int8_t* x) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(x))));
  };
  for (int start = 0; start < n_rows; start += kBlock) {
    const int nt = std::min(kBlock, n_rows - start);
    for (int t = 0; t < nt; ++t) {
      const int8_t* kr = c.bk + (base + start + t) * D;
      const int8_t* vr = c.bv + (base + start + t) * D;
      const __m256 w = _mm256_set1_ps(c.bvs[base + start + t]);
      float* ko = kf.data() + static_cast<size_t>(t) * D;
      float* vo = vf.data() + static_cast<size_t>(t) * D;
      for (int d = 0; d < D8; d += 8) {
        _mm256_storeu_ps(ko + d, row8(kr + d));
        _mm256_storeu_ps(vo + d, _mm256_mul_ps(row8(vr + d), w));
      }
      for (int d = D8; d < D; ++d) {
        ko[d] = kr[d];
        vo[d] = vr[d] * c.bvs[base + start + t];
      }
    }
    for (int r = 0; r < R; ++r) {
      const int i = r % c.Lq;
      const int h = std::min(nt, n_rows - c.Lq + i + 1 - start);  // causal among the new tokens
      int a = 0;
      if (c.window > 0) {  // the first row at or past the window's first position
        const int64_t first = c.qpos0[b] + i - c.window + 1;
        const int64_t at = first < c.sinks ? first : std::max<int64_t>(c.sinks, first - c.tail_shift[b]);
        a = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(at - start, kBlock)));
      }
      if (h <= a) continue;
      const float* q = qr.data() + static_cast<size_t>(r) * D;
      float* sr = s.data() + static_cast<size_t>(r) * kBlock;
      const float f = qsr[r] * c.sm_scale;
      float mx = kNeg;
      for (int t = a; t < h; ++t) {
        const float* kt = kf.data() + static_cast<size_t>(t) * D;
        __m256 x = _mm256_setzero_ps();
        for (int d = 0; d < D8; d += 8) x = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(kt + d), x);
        float dot = hsum(x);
        for (int d = D8; d < D; ++d) dot += q[d] * kt[d];
        sr[t] = dot * f * c.bks[base + start + t];
        mx = std::max(mx, sr[t]);
      }
      const float m_new = std::max(st.m[r], mx);
      const float alpha = std::exp(st.m[r] - m_new);
      st.l[r] = st.l[r] * alpha + sm.weights(sr, a, h, m_new, zeros);
      seen += h - a;
      st.m[r] = m_new;
      float* acc = st.acc.data() + static_cast<size_t>(r) * D;
      const __m256 va = _mm256_set1_ps(alpha);
      for (int d0 = 0; d0 < D8; d0 += 64) {  // 8 accumulators of 8 channels
        const int nd = std::min(64, D8 - d0) / 8;
        __m256 x[8];
        for (int k = 0; k < nd; ++k) x[k] = _mm256_mul_ps(_mm256_loadu_ps(acc + d0 + 8 * k), va);
        for (int t = a; t < h; ++t) {
          const __m256 w = _mm256_set1_ps(sr[t]);
          const float* vt = vf.data() + static_cast<size_t>(t) * D + d0;
          for (int k = 0; k < nd; ++k) x[k] = _mm256_fmadd_ps(w, _mm256_loadu_ps(vt + 8 * k), x[k]);
        }
        for (int k = 0; k < nd; ++k) _mm256_storeu_ps(acc + d0 + 8 * k, x[k]);
      }
      for (int d = D8; d < D; ++d) {
        float x = acc[d] * alpha;
        for (int t = a; t < h; ++t) x += sr[t] * vf[static_cast<size_t>(t) * D + d];
        acc[d] = x;
      }
    }
  }
  store_partial(c, b, hk, c.splits, st);
  counts[0] += zeros;
  counts[1] += seen;
}

// In split order, no reassociation: empty splits add exact zeros.
void merge(const Call& c, float* out) {
  const int S1 = c.splits + 1;
  at::parallel_for(0, static_cast<int64_t>(c.B) * c.Hq * c.Lq, 1, [&](int64_t from, int64_t to) {
    for (int64_t row = from; row < to; ++row) {
      const float* m = c.m_out + row * S1;
      float top = kNeg;
      for (int sp = 0; sp < S1; ++sp) top = std::max(top, m[sp]);
      float den = 0.f;
      float* o = out + row * c.D;
      std::fill(o, o + c.D, 0.f);
      for (int sp = 0; sp < S1; ++sp) {
        const float w = std::exp(m[sp] - top);
        den += c.l_out[row * S1 + sp] * w;
        const float* a = c.acc_out + (row * S1 + sp) * c.D;
        for (int d = 0; d < c.D; ++d) o[d] += a[d] * w;
      }
      for (int d = 0; d < c.D; ++d) o[d] /= den;
    }
  });
}

namespace {

// The attention of the view in c (packed_view): one job per (group row, sequence, split) and
// per (sequence, KV head) for the buffer, then the splits merged.
std::tuple<at::Tensor, at::Tensor> run(Call& c, const at::Tensor& q, bool qk_int8, int64_t block_size,
                                       int64_t pages_per_split, double sm_scale) {
  TORCH_CHECK(block_size >= 1 && pages_per_split >= 1, "block_size and pages_per_split must be >= 1");
  c.Hq = q.size(1); c.Lq = q.size(2); c.group = c.Hq / c.Hkv;
  const int most = c.most_chunks;
  c.step = pages_per_split;
  c.splits = std::max<int>(1, (most + c.step - 1) / c.step);
  c.sm_scale = sm_scale;
  const auto [qv, qsv] = query_codes(q, qk_int8, block_size);
  c.q = qv.data_ptr<float>(); c.qs = qsv.data_ptr<float>();
  const int S1 = c.splits + 1;
  auto opts = q.options().dtype(at::kFloat);
  at::Tensor m = at::full({c.B, c.Hq, c.Lq, S1}, kNeg, opts);
  at::Tensor l = at::zeros({c.B, c.Hq, c.Lq, S1}, opts);
  at::Tensor acc = at::zeros({c.B, c.Hq, c.Lq, S1, c.D}, opts);
  c.m_out = m.data_ptr<float>(); c.l_out = l.data_ptr<float>(); c.acc_out = acc.data_ptr<float>();
  const Softmax& sm = c.sm;
  const std::vector<Group>& groups = c.groups;
  // one job per (group row, sequence, split), then per (sequence, KV head) for the buffer
  std::vector<std::tuple<int, int, int>> jobs;  // (group, head row, sequence), split outer
  for (size_t j = 0; j < groups.size(); ++j)
    for (int i = 0; i < groups[j].n; ++i)
      for (int b = 0; b < c.B; ++b) jobs.emplace_back(j, i, b);
  const int64_t n_page_jobs = most ? static_cast<int64_t>(jobs.size()) * c.splits : 0;
  const int64_t n_jobs = n_page_jobs + static_cast<int64_t>(c.B) * c.Hkv;
  std::vector<int64_t> counts(2 * std::max<int64_t>(n_jobs, 1), 0);
  at::parallel_for(0, n_jobs, 1, [&](int64_t from, int64_t to) {
    Scratch scratch;
    for (int64_t job = from; job < to; ++job) {
      int64_t* cnt = counts.data() + 2 * job;
      if (job < n_page_jobs) {
        const auto [j, i, b] = jobs[job / c.splits];
        const int sp = job % c.splits;
        const Group& g = groups[j];
        if (avx2_fits(g, c.chunk, c.D)) {
          const bool c64 = c.chunk == 64;
          if (g.bits == 4) c64 ? pages_job_avx2<4, 64>(c, g, b, i, sp, sm, cnt, scratch) : pages_job_avx2<4, 0>(c, g, b, i, sp, sm, cnt, scratch);
          else if (g.bits == 2) c64 ? pages_job_avx2<2, 64>(c, g, b, i, sp, sm, cnt, scratch) : pages_job_avx2<2, 0>(c, g, b, i, sp, sm, cnt, scratch);
          else c64 ? pages_job_avx2<8, 64>(c, g, b, i, sp, sm, cnt, scratch) : pages_job_avx2<8, 0>(c, g, b, i, sp, sm, cnt, scratch);
        } else if (g.bits == 4) pages_job<4>(c, g, b, i, sp, sm, cnt);
        else if (g.bits == 2) pages_job<2>(c, g, b, i, sp, sm, cnt);
        else pages_job<8>(c, g, b, i, sp, sm, cnt);
      } else {
        const int64_t k = job - n_page_jobs;
        buffer_job(c, k / c.Hkv, k % c.Hkv, sm, cnt);
      }
    }
  });
  at::Tensor out = at::empty({c.B, c.Hq, c.Lq, c.D}, opts);
  merge(c, out.data_ptr<float>());
  int64_t zeros = 0, seen = 0;
  for (size_t k = 0; k < counts.size(); k += 2) { zeros += counts[k]; seen += counts[k + 1]; }
  at::Tensor total = at::empty({2}, at::kLong);
  total.data_ptr<int64_t>()[0] = zeros;
  total.data_ptr<int64_t>()[1] = seen;
  return {out, total};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> decode_attention(
    const at::Tensor& q, bool qk_int8, int64_t block_size, const std::vector<at::Tensor>& heads,
    const std::vector<at::Tensor>& k_packed, const std::vector<at::Tensor>& k_scale,
    const std::vector<at::Tensor>& k_low, const std::vector<at::Tensor>& k_first,
    const std::vector<at::Tensor>& v_packed, const std::vector<at::Tensor>& v_scale,
    const std::vector<at::Tensor>& v_low, const std::vector<at::Tensor>& v_first,
    std::vector<int64_t> bits, std::vector<int64_t> k_group, std::vector<int64_t> v_group,
    const at::Tensor& page_table, const at::Tensor& n_chunks, const at::Tensor& chunk_base,
    const at::Tensor& buffer_k,
    const at::Tensor& buffer_k_scale, const at::Tensor& buffer_v, const at::Tensor& buffer_v_scale,
    const at::Tensor& buffer_len, int64_t chunk, int64_t sinks, int64_t window,
    int64_t pages_per_split, double sm_scale, const at::Tensor& lut, std::vector<double> coeffs,
    double lut_max, bool use_sas) {
  Call c{};
  static_cast<Packed&>(c) = packed_view(q, heads, k_packed, k_scale, k_low, k_first, v_packed, v_scale,
                                        v_low, v_first, bits, k_group, v_group, page_table, n_chunks,
                                        chunk_base, buffer_k, buffer_k_scale, buffer_v, buffer_v_scale,
                                        buffer_len, chunk, sinks, window, lut, coeffs, lut_max, use_sas);
  return run(c, q, qk_int8, block_size, pages_per_split, sm_scale);
}

std::tuple<at::Tensor, at::Tensor> decode_step(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& slots,
    const at::Tensor& buffer_len, const at::Tensor& n_chunks, const at::Tensor& chunk_base,
    const at::Tensor& page_table, const at::Tensor& buffer_k, const at::Tensor& buffer_k_scale,
    const at::Tensor& buffer_v, const at::Tensor& buffer_v_scale, const std::vector<at::Tensor>& heads,
    const std::vector<at::Tensor>& k_packed, const std::vector<at::Tensor>& k_scale,
    const std::vector<at::Tensor>& k_low, const std::vector<at::Tensor>& k_first,
    const std::vector<at::Tensor>& v_packed, const std::vector<at::Tensor>& v_scale,
    const std::vector<at::Tensor>& v_low, const std::vector<at::Tensor>& v_first,
    std::vector<int64_t> bits, std::vector<int64_t> k_group, std::vector<int64_t> v_group,
    int64_t chunk, int64_t sinks, int64_t window, bool qk_int8, int64_t block_size,
    int64_t pages_per_split, double sm_scale, const at::Tensor& lut, std::vector<double> coeffs,
    double lut_max, bool use_sas) {
  // every argument checked before anything is written (a bad call leaves the cache as it was)
  TORCH_CHECK(q.dim() == 4 && buffer_k.dim() == 4 && buffer_k.scalar_type() == at::kChar &&
                  buffer_k.is_contiguous() && buffer_v.sizes() == buffer_k.sizes() &&
                  buffer_v.scalar_type() == at::kChar && buffer_v.is_contiguous(),
              "q must be (B, H_q, L_q, D) and buffer_k/buffer_v contiguous int8 (slots, H_kv, rows, D)");
  const int64_t B = q.size(0), T = q.size(2), n_slots = buffer_k.size(0), H = buffer_k.size(1),
                cap = buffer_k.size(2), D = buffer_k.size(3);
  for (const auto* t : {&k, &v})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 4 && t->size(0) == B &&
                    t->size(1) == H && t->size(2) == T && t->size(3) == D,
                "k and v must be contiguous float32 (B, H_kv, L_q, D) matching q and the buffer");
  for (const auto* t : {&buffer_k_scale, &buffer_v_scale})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == n_slots * H * cap,
                "buffer_k_scale/buffer_v_scale must be float32 (slots, H_kv, rows)");
  TORCH_CHECK(buffer_len.scalar_type() == at::kInt && buffer_len.is_contiguous() && buffer_len.numel() == n_slots,
              "buffer_len must be int32 (slots,)");
  const int64_t* sl = checked_slots(slots, B, n_slots);
  int32_t* bl = buffer_len.data_ptr<int32_t>();
  std::vector<int64_t> rows(B);
  for (int64_t b = 0; b < B; ++b) {
    rows[b] = bl[sl[b]];
    TORCH_CHECK(rows[b] >= 0 && rows[b] + T <= cap, "slot ", sl[b], " has ", rows[b], " rows: no room for ", T,
                " more in the buffer's ", cap);
  }
  for (int64_t b = 0; b < B; ++b) bl[sl[b]] += static_cast<int32_t>(T);
  Call c{};
  try {  // the view as it is with the new rows (their positions), checked before any write
    static_cast<Packed&>(c) = packed_view(q, heads, k_packed, k_scale, k_low, k_first, v_packed, v_scale,
                                          v_low, v_first, bits, k_group, v_group, page_table, n_chunks,
                                          chunk_base, buffer_k, buffer_k_scale, buffer_v, buffer_v_scale,
                                          buffer_len, chunk, sinks, window, lut, coeffs, lut_max, use_sas,
                                          slots);
  } catch (...) {
    for (int64_t b = 0; b < B; ++b) bl[sl[b]] -= static_cast<int32_t>(T);
    throw;
  }
  quantize_rows(k.data_ptr<float>(), v.data_ptr<float>(), B, H, T, D, sl, rows.data(), cap,
                buffer_k.data_ptr<int8_t>(), buffer_k_scale.data_ptr<float>(), buffer_v.data_ptr<int8_t>(),
                buffer_v_scale.data_ptr<float>());
  return run(c, q, qk_int8, block_size, pages_per_split, sm_scale);
}

}  // namespace turbo
