// What the attention ops share (decode_attention.cpp, prefill_attention.cpp): the packed view
// as the ops read it (checked once), the softmax of a tile, page decoding and the queries'
// INT8 quantization. Same layout and math as turbo_core.attention.packed / reference.
#pragma once

#include <ATen/ATen.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace turbo {

constexpr float kNeg = -3.0e38f;  // a finite "minus infinity"

inline float hsum(__m256 v) {  // the sum of 8 lanes
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}

inline float hmax(__m256 v) {  // the largest of 8 lanes
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
}

// e^x for 8 lanes, |relative error| < 2e-7 on [-87, 88] (below: 0): x = n ln2 + r,
// |r| <= ln2 / 2, e^r by a degree-6 Taylor polynomial, 2^n through the exponent bits.
inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3f);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504089f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln2, hi and lo parts
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.f / 720.f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

template <typename T>
const T* ptr(const at::Tensor& t) {
  return t.defined() && t.numel() ? t.data_ptr<T>() : nullptr;
}

struct Softmax {
  bool sas;
  const float* lut;  // T + 2 entries, the last 0: weights past the table cut without a branch
  float c0, c1, c2, c3, lut_max;
  // the table padded with zeros to 16 entries when it fits (T + 2 <= 16): read by two
  // _mm256_permutevar8x32_ps and a blend instead of a gather (slow on AMD's Zen)
  bool small = false;
  alignas(32) float lut16[16] = {};

  // s[lo:hi] -> e^(s - top) in place (and 0 before lo); returns their sum, adds SAS zeros.
  float weights(float* s, int lo, int hi, float top, int64_t& zeros) const;
};

// The op's softmax from its arguments (lut: T + 2 floats when use_sas).
Softmax make_softmax(bool use_sas, const at::Tensor& lut, const std::vector<double>& coeffs,
                     double lut_max);

struct Group {  // the KV heads stored at one bit width (PackedHeads)
  int bits, n, k_group, v_group;
  const int64_t* heads;
  const uint8_t *kp, *ksc, *vp, *vsc;
  const int8_t *klo, *vlo;
  const float *kf, *vf;
};

// One layer's packed view (PackedKV) for a batch of B sequences, with the token positions of
// packed.positions: held page ci of sequence b covers first_pos[b] + ci * chunk + t; buffer
// row r sits at r below the sinks, else at tail_shift[b] + r; new token i at qpos0[b] + i.
// Sequence b's page table row is table[b], its rows of the buffers those of slot[b] (b itself
// for a view gathered per sequence; the slot a step reads in place otherwise).
struct Packed {
  int B, Hkv, D, chunk, window, sinks, rows_cap, most_chunks;
  std::vector<const int32_t*> table;
  std::vector<int32_t> n_chunks, blen;
  std::vector<int64_t> slot, first_pos, tail_shift, qpos0;
  const int8_t *bk, *bv;
  const float *bks, *bvs;
  std::vector<Group> groups;
  Softmax sm;
};

// Checks the op's arguments (names what is wrong) and gathers the view. Without slots the
// per-sequence tensors (page_table, n_chunks, chunk_base, buffer_len, buffers) have one row per
// sequence; with slots (int64 (B,), distinct) they are slot-indexed and sequence b is slot slots[b].
Packed packed_view(const at::Tensor& q, const std::vector<at::Tensor>& heads,
                   const std::vector<at::Tensor>& k_packed, const std::vector<at::Tensor>& k_scale,
                   const std::vector<at::Tensor>& k_low, const std::vector<at::Tensor>& k_first,
                   const std::vector<at::Tensor>& v_packed, const std::vector<at::Tensor>& v_scale,
                   const std::vector<at::Tensor>& v_low, const std::vector<at::Tensor>& v_first,
                   const std::vector<int64_t>& bits, const std::vector<int64_t>& k_group,
                   const std::vector<int64_t>& v_group, const at::Tensor& page_table,
                   const at::Tensor& n_chunks, const at::Tensor& chunk_base,
                   const at::Tensor& buffer_k, const at::Tensor& buffer_k_scale,
                   const at::Tensor& buffer_v, const at::Tensor& buffer_v_scale,
                   const at::Tensor& buffer_len, int64_t chunk, int64_t sinks, int64_t window,
                   const at::Tensor& lut, const std::vector<double>& coeffs, double lut_max,
                   bool use_sas, const at::Tensor& slots = at::Tensor());

// n floats -> symmetric codes with one scale over all of them (quant.quantize_int8_blockwise
// of one block): s = max|x| / qmax (1 if all zero), code = clamp(round_half_even(x / s), +-qmax)
// as T (int8, or float holding the integer); returns s.
// 8 lanes at a time with the same operations (a true division, round half to even), so the
// codes are bit for bit the scalar loop's.
template <typename T>
inline float quantize_block(const float* x, int64_t n, float qmax, T* codes) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 m8 = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= n; k += 8)  // operands as std::max(amax, |x|): a NaN is skipped, as there
    m8 = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(x + k), abs_mask), m8);
  float amax = hmax(m8);
  for (; k < n; ++k) amax = std::max(amax, std::fabs(x[k]));
  const float sc = amax > 0.f ? amax / qmax : 1.f;
  const __m256 vs = _mm256_set1_ps(sc), hi = _mm256_set1_ps(qmax), lo = _mm256_set1_ps(-qmax);
  for (k = 0; k + 8 <= n; k += 8) {
    const __m256 c = _mm256_min_ps(_mm256_max_ps(_mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x + k), vs),
                                                                 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), lo), hi);
    if constexpr (std::is_same_v<T, float>) {
      _mm256_storeu_ps(codes + k, c);
    } else {
      alignas(32) int32_t v[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(v), _mm256_cvtps_epi32(c));
      for (int j = 0; j < 8; ++j) codes[k + j] = static_cast<T>(v[j]);
    }
  }
  for (; k < n; ++k)
    codes[k] = static_cast<T>(std::min(std::max(std::nearbyint(x[k] / sc), -qmax), qmax));
  return sc;
}

// slots (int64 (B,), contiguous) checked to name B distinct slots of n_slots (an error names the
// first that does not); returns its data.
const int64_t* checked_slots(const at::Tensor& slots, int64_t B, int64_t n_slots);

// New K/V rows k, v (N, H, T, D) float32 -> INT8 rows with one scale per (token, head)
// (quantize_block, qmax 127) into buffer rows rows[i]..rows[i] + T - 1 of slot slots[i] of the
// buffers (slots, H, cap, D) and their scales (slots, H, cap). Bounds checked by the caller.
void quantize_rows(const float* k, const float* v, int64_t N, int64_t H, int64_t T, int64_t D,
                   const int64_t* slots, const int64_t* rows, int64_t cap, int8_t* bk, float* bks,
                   int8_t* bv, float* bvs);

// The queries (B, H_q, L_q, D) as the reference takes them, with their scales (B, H_q, L_q):
// with qk_int8 quant.quantize_int8_blockwise(q, block_size) — quantize_block per block of
// block_size tokens of one (sequence, head), codes held in float —, else q and scales of 1.
std::pair<at::Tensor, at::Tensor> query_codes(const at::Tensor& q, bool qk_int8, int64_t block_size);

// Planar codes of one channel -> INT8 values in float: byte j of plane p holds token p*M + j.
template <int BITS>
inline void unpack_channel(const uint8_t* src, int M, const float* scale, const float* low,
                           float* dst) {
  if constexpr (BITS == 8) {
    for (int j = 0; j < M; ++j) dst[j] = static_cast<float>(static_cast<int8_t>(src[j]));
  } else {
    constexpr int kMask = (1 << BITS) - 1;
    for (int p = 0; p < 8 / BITS; ++p)
#pragma omp simd
      for (int j = 0; j < M; ++j) {
        const float code = static_cast<float>((src[j] >> (p * BITS)) & kMask);
        const int t = p * M + j;
        dst[t] = std::min(std::max(code * scale[t] + low[t], -127.f), 127.f);
      }
  }
}

// Page ph (= page * g.n + head row) of a group: K as INT8 values in float and V times its
// first-level scale, both (D, C) channel-major with row stride ld (a null k or v: not that one). sc/lo: 2C floats of scratch.
template <int BITS>
void decode_page(const Group& g, int64_t ph, int D, int C, float* k, float* v, int ld, float* sc,
                 float* lo) {
  const int M = C * BITS / 8;
  const int kgs = BITS == 8 ? 1 : C / g.k_group, vgs = BITS == 8 ? 1 : D / g.v_group;
  for (int d = 0; k != nullptr && d < D; ++d) {  // K: S and low per (channel, token group)
    if constexpr (BITS != 8)
      for (int gi = 0; gi < kgs; ++gi) {
        const int64_t at = (ph * D + d) * kgs + gi;
        std::fill(sc + gi * g.k_group, sc + (gi + 1) * g.k_group, float(g.ksc[at]));
        std::fill(lo + gi * g.k_group, lo + (gi + 1) * g.k_group, float(g.klo[at]));
      }
    unpack_channel<BITS>(g.kp + (ph * D + d) * M, M, sc, lo, k + static_cast<int64_t>(d) * ld);
  }
  if (v == nullptr) return;  // K only
  const float vscale = g.vf[ph];
  for (int d = 0; d < D; ++d) {  // V: S and low per (channel group, token)
    if constexpr (BITS != 8) {
      if (d % g.v_group == 0) {
        const int64_t at = (ph * vgs + d / g.v_group) * C;
        for (int t = 0; t < C; ++t) {
          sc[t] = g.vsc[at + t];
          lo[t] = g.vlo[at + t];
        }
      }
    }
    float* vd = v + static_cast<int64_t>(d) * ld;
    unpack_channel<BITS>(g.vp + (ph * D + d) * M, M, sc, lo, vd);
    for (int t = 0; t < C; ++t) vd[t] *= vscale;
  }
}

}  // namespace turbo
