// The attention ops' shared pieces (attention_common.h): the checked packed view, the tile
// softmax and the queries' INT8 quantization.
#include "attention_common.h"

#include <ATen/Parallel.h>

namespace turbo {

float Softmax::weights(float* s, int lo, int hi, float top, int64_t& zeros) const {
  for (int t = 0; t < lo; ++t) s[t] = 0.f;
  float total = 0.f;
  if (sas) {
    const float cut = lut_max + 1.f;
    // 8 at a time: neg = min(top - s, T + 1), n = floor(neg), w = LUT[n] P(neg - n)
    const __m256 vtop = _mm256_set1_ps(top), vcut = _mm256_set1_ps(cut), vmax = _mm256_set1_ps(lut_max);
    const __m256 lo8 = _mm256_load_ps(lut16), hi8 = _mm256_load_ps(lut16 + 8);
    __m256 vtot = _mm256_setzero_ps();
    int t = lo;
    for (; t + 8 <= hi; t += 8) {
      const __m256 neg = _mm256_min_ps(_mm256_sub_ps(vtop, _mm256_loadu_ps(s + t)), vcut);
      const __m256 n = _mm256_floor_ps(neg);
      const __m256 f = _mm256_sub_ps(neg, n);
      __m256 poly = _mm256_fmadd_ps(_mm256_set1_ps(c3), f, _mm256_set1_ps(c2));
      poly = _mm256_fmadd_ps(poly, f, _mm256_set1_ps(c1));
      poly = _mm256_fmadd_ps(poly, f, _mm256_set1_ps(c0));
      const __m256i idx = _mm256_cvttps_epi32(n);
      __m256 e;
      if (small) {  // entries 0..7 from the first half, 8..15 from the second
        e = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo8, idx), _mm256_permutevar8x32_ps(hi8, idx),
                             _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, _mm256_set1_epi32(7))));
      } else {
        e = _mm256_i32gather_ps(lut, idx, 4);
      }
      const __m256 w = _mm256_mul_ps(e, poly);
      _mm256_storeu_ps(s + t, w);
      vtot = _mm256_add_ps(vtot, w);
      zeros += __builtin_popcount(_mm256_movemask_ps(_mm256_cmp_ps(n, vmax, _CMP_GT_OQ)));
    }
    total = hsum(vtot);
    for (; t < hi; ++t) {
      const float neg = std::min(top - s[t], cut);
      const float n = std::floor(neg);
      const float f = neg - n;
      const float w = lut[static_cast<int>(n)] * (((c3 * f + c2) * f + c1) * f + c0);
      s[t] = w;
      total += w;
      zeros += n > lut_max;
    }
  } else {
    const __m256 vtop = _mm256_set1_ps(top);
    __m256 vtot = _mm256_setzero_ps();
    int t = lo;
    for (; t + 8 <= hi; t += 8) {
      const __m256 w = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + t), vtop));
      _mm256_storeu_ps(s + t, w);
      vtot = _mm256_add_ps(vtot, w);
    }
    total = hsum(vtot);
    for (; t < hi; ++t) {
      const float w = std::exp(s[t] - top);
      s[t] = w;
      total += w;
    }
  }
  return total;
}

std::pair<at::Tensor, at::Tensor> query_codes(const at::Tensor& q, bool qk_int8, int64_t block_size) {
  const int64_t rows = q.size(0) * q.size(1), L = q.size(2), D = q.size(3);
  at::Tensor qv = qk_int8 ? at::empty_like(q) : q, qsv = at::ones({q.size(0), q.size(1), L}, q.options());
  if (!qk_int8) return {qv, qsv};
  const float* x = q.data_ptr<float>();
  float* codes = qv.data_ptr<float>();
  float* scale = qsv.data_ptr<float>();
  const int64_t blk = block_size >= L ? L : block_size;
  at::parallel_for(0, rows, 16, [&](int64_t from, int64_t to) {
    for (int64_t row = from; row < to; ++row)
      for (int64_t t0 = 0; t0 < L; t0 += blk) {
        const int64_t t1 = std::min<int64_t>(L, t0 + blk), at = (row * L + t0) * D;
        const float sc = quantize_block(x + at, (t1 - t0) * D, 127.f, codes + at);
        std::fill(scale + row * L + t0, scale + row * L + t1, sc);
      }
  });
  return {qv, qsv};
}

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
                   bool use_sas, const at::Tensor& slots) {
  // the Python wrapper (turbo_kernels.cpu_ops) names bad arguments first; these keep a direct
  // call from reading out of bounds
  TORCH_CHECK(q.dim() == 4 && q.scalar_type() == at::kFloat && q.is_contiguous(),
              "q must be a contiguous float32 (B, H_q, L_q, D) tensor");
  const int64_t B = q.size(0);
  TORCH_CHECK(buffer_k.dim() == 4, "buffer_k must be (B, H_kv, rows, D)");
  const int64_t rows = slots.defined() ? buffer_k.size(0) : B;  // rows of the per-sequence tensors
  for (const auto* t : {&n_chunks, &chunk_base, &buffer_len})
    TORCH_CHECK(t->scalar_type() == at::kInt && t->is_contiguous() && t->numel() == rows,
                "n_chunks, chunk_base and buffer_len must be int32 (", rows, ",)");
  TORCH_CHECK(q.size(1) % buffer_k.size(1) == 0 && buffer_k.size(3) == q.size(3),
              "buffer_k must be (B, H_kv, rows, D) with H_q a multiple of H_kv");
  for (const auto* t : {&buffer_k, &buffer_v})
    TORCH_CHECK(t->scalar_type() == at::kChar && t->is_contiguous() && t->sizes() == buffer_k.sizes() &&
                    t->size(0) == rows, "buffer_k and buffer_v must be contiguous int8 (B, H_kv, rows, D)");
  for (const auto* t : {&buffer_k_scale, &buffer_v_scale})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == buffer_k.numel() / buffer_k.size(3),
                "buffer_k_scale and buffer_v_scale must be contiguous float32 (B, H_kv, rows)");
  TORCH_CHECK(page_table.scalar_type() == at::kInt && page_table.is_contiguous() &&
              page_table.dim() == 2 && page_table.size(0) == rows, "page_table must be int32 (B, pages)");
  TORCH_CHECK(chunk >= 8 && sinks >= 0 && window >= 0, "chunk, sinks or window out of range");
  TORCH_CHECK(!use_sas || (lut.scalar_type() == at::kFloat && lut.numel() >= lut_max + 2 && coeffs.size() >= 4),
              "lut must hold lut_max + 2 float32 entries and coeffs 4");
  Packed p{};
  p.B = B; p.D = q.size(3); p.Hkv = buffer_k.size(1);
  p.chunk = chunk; p.window = window; p.sinks = sinks; p.rows_cap = buffer_k.size(2);
  p.slot.resize(B);
  if (slots.defined()) {
    const int64_t* sl = checked_slots(slots, B, rows);
    std::copy(sl, sl + B, p.slot.begin());
  } else {
    for (int64_t b = 0; b < B; ++b) p.slot[b] = b;
  }
  const int32_t *nch = n_chunks.data_ptr<int32_t>(), *bl = buffer_len.data_ptr<int32_t>(),
                *cb = chunk_base.data_ptr<int32_t>();
  p.n_chunks.resize(B); p.blen.resize(B); p.table.resize(B);
  p.most_chunks = 0;
  for (int b = 0; b < p.B; ++b) {
    const int64_t s = p.slot[b];
    const int32_t n = nch[s], len = bl[s];
    TORCH_CHECK(n >= 0 && n <= page_table.size(1), "n_chunks[", s, "] = ", n, " is out of the page table");
    TORCH_CHECK(len >= 0 && len <= p.rows_cap, "buffer_len[", s, "] = ", len, " is out of the buffer's ",
                p.rows_cap, " rows");
    p.n_chunks[b] = n; p.blen[b] = len;
    p.table[b] = page_table.data_ptr<int32_t>() + s * page_table.size(1);
    p.most_chunks = std::max<int>(p.most_chunks, n);
  }
  TORCH_CHECK(heads.size() == bits.size() && k_packed.size() == heads.size(), "one entry per group");
  int64_t n_heads = 0;
  for (size_t j = 0; j < heads.size(); ++j) {
    TORCH_CHECK(bits[j] == 2 || bits[j] == 4 || bits[j] == 8, "bits must be 2, 4 or 8");
    TORCH_CHECK(k_packed[j].is_contiguous() && v_packed[j].is_contiguous(), "k_packed/v_packed must be contiguous");
    const int64_t cap = k_packed[j].size(0), n = heads[j].numel();
    TORCH_CHECK(k_packed[j].dim() == 4 && k_packed[j].size(1) == n && k_packed[j].size(2) == p.D &&
                    k_packed[j].size(3) == chunk * bits[j] / 8 && v_packed[j].sizes() == k_packed[j].sizes(),
                "k_packed/v_packed must be (pages, heads, D, chunk * bits / 8)");
    TORCH_CHECK(k_first[j].numel() == cap * n && v_first[j].numel() == cap * n, "k_first/v_first must be (pages, heads)");
    if (bits[j] != 8) {
      TORCH_CHECK(k_group[j] >= 1 && chunk % k_group[j] == 0 && v_group[j] >= 1 && p.D % v_group[j] == 0,
                  "k_group must divide the chunk and v_group the head_dim");
      TORCH_CHECK(k_scale[j].numel() == cap * n * p.D * (chunk / k_group[j]) && k_low[j].numel() == k_scale[j].numel() &&
                      v_scale[j].numel() == cap * n * (p.D / v_group[j]) * chunk && v_low[j].numel() == v_scale[j].numel(),
                  "k_scale/k_low/v_scale/v_low do not match the pages and groups");
    }
    const int64_t* h = heads[j].data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i)
      TORCH_CHECK(h[i] >= 0 && h[i] < p.Hkv, "heads[", j, "] names KV head ", h[i], " of ", p.Hkv);
    n_heads += n;
    for (int64_t b = 0; b < p.B; ++b)
      for (int32_t ci = 0; ci < p.n_chunks[b]; ++ci) {
        const int32_t pg = p.table[b][ci];
        TORCH_CHECK(pg >= 0 && pg < cap, "page_table[", p.slot[b], ", ", ci, "] = ", pg, " is outside the pool of ", cap, " pages");
      }
    p.groups.push_back(Group{static_cast<int>(bits[j]), static_cast<int>(n), static_cast<int>(k_group[j]),
                             static_cast<int>(v_group[j]), h, ptr<uint8_t>(k_packed[j]),
                             ptr<uint8_t>(k_scale[j]), ptr<uint8_t>(v_packed[j]), ptr<uint8_t>(v_scale[j]),
                             ptr<int8_t>(k_low[j]), ptr<int8_t>(v_low[j]), ptr<float>(k_first[j]),
                             ptr<float>(v_first[j])});
  }
  TORCH_CHECK(n_heads == p.Hkv, "the groups hold ", n_heads, " heads, the buffer ", p.Hkv);
  // positions (packed.py): held page 0 starts at sinks + base * chunk, buffer row r >= sinks
  // sits at (base + n) * chunk + r, new token 0 at the sequence's length - L_q
  p.first_pos.resize(p.B); p.tail_shift.resize(p.B); p.qpos0.resize(p.B);
  for (int b = 0; b < p.B; ++b) {
    const int64_t base = cb[p.slot[b]], n = p.n_chunks[b];
    p.first_pos[b] = sinks + base * chunk;
    p.tail_shift[b] = (base + n) * chunk;
    p.qpos0[b] = p.tail_shift[b] + p.blen[b] - q.size(2);
  }
  p.bk = buffer_k.data_ptr<int8_t>(); p.bv = buffer_v.data_ptr<int8_t>();
  p.bks = buffer_k_scale.data_ptr<float>(); p.bvs = buffer_v_scale.data_ptr<float>();
  p.sm = make_softmax(use_sas, lut, coeffs, lut_max);
  return p;
}

Softmax make_softmax(bool use_sas, const at::Tensor& lut, const std::vector<double>& coeffs,
                     double lut_max) {
  Softmax sm{use_sas, ptr<float>(lut), static_cast<float>(coeffs[0]), static_cast<float>(coeffs[1]),
             static_cast<float>(coeffs[2]), static_cast<float>(coeffs[3]), static_cast<float>(lut_max)};
  const int64_t entries = static_cast<int64_t>(lut_max) + 2;
  if (use_sas && sm.lut != nullptr && entries <= 16 && lut.numel() >= entries) {
    std::copy(sm.lut, sm.lut + entries, sm.lut16);
    sm.small = true;
  }
  return sm;
}

const int64_t* checked_slots(const at::Tensor& slots, int64_t B, int64_t n_slots) {
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() == B,
              "slots must be int64 (B,)");
  const int64_t* sl = slots.data_ptr<int64_t>();
  std::vector<bool> taken(n_slots, false);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(sl[b] >= 0 && sl[b] < n_slots && !taken[sl[b]], "slots[", b, "] = ", sl[b],
                " is outside the ", n_slots, " slots or named twice");
    taken[sl[b]] = true;
  }
  return sl;
}

void quantize_rows(const float* k, const float* v, int64_t N, int64_t H, int64_t T, int64_t D,
                   const int64_t* slots, const int64_t* rows, int64_t cap, int8_t* bk, float* bks,
                   int8_t* bv, float* bvs) {
  at::parallel_for(0, N * H * T, 64, [&](int64_t from, int64_t to) {
    for (int64_t w = from; w < to; ++w) {  // (i, h, t)
      const int64_t i = w / (H * T), h = (w / T) % H, t = w % T;
      const int64_t dst = (slots[i] * H + h) * cap + rows[i] + t;
      bks[dst] = quantize_block(k + w * D, D, 127.f, bk + dst * D);
      bvs[dst] = quantize_block(v + w * D, D, 127.f, bv + dst * D);
    }
  });
}

}  // namespace turbo
