// turbo::prefill_attention — a prompt chunk (the L_q newest tokens of each sequence, causal
// among themselves) over one layer of the packed KV cache, on CPU. Same math as the reference
// (turbo_core.attention.reference.decode_attention_reference), the row max included: SAS
// weights and cuts are the reference's, not a running max's. turbo::decode_attention suits a
// few new tokens, this one hundreds.
//
// A chunk has hundreds of query rows per KV head — GEMM sizes. Jobs (at::parallel_for) are
// (sequence, KV head, block of up to 256 query rows: tokens x the GQA group, token-major, so a
// block covers consecutive positions). A job walks its keys in tiles of 4 pages (or up to 256
// rows of the INT8 buffer), decoded into float (D, n) tiles — K as INT8 values, V times its
// scale — never into a whole-history copy, twice:
//   pass 1: S = Q K (one sgemm; the INT8 query codes and key values are integers held in
//   float, so the products are exact), the key scales, the causal and window range: each
//   row's max over all its keys;
//   pass 2: S again, the weights (SAS or exp) against that max, acc += P Vᵀ (a second sgemm).
// The first pass costs one more Q K sgemm and K decode (about a quarter more work) and buys
// the reference's exact SAS semantics: a running max keeps weights the reference cuts
// (e^-T below the final max), which moved a real model's greedy tokens (issue 24's note).
// Tiles that no row of the block sees are skipped.
#include <ATen/Parallel.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/mm_cpu_dispatch.h>

#include "attention_common.h"
#include "ops.h"

namespace turbo {
namespace {

constexpr int kTilePages = 4;   // pages per key tile
constexpr int kBufferTile = 256;  // INT8 buffer rows per key tile
constexpr int kRowBlock = 256;  // query rows per job
constexpr int64_t kMaxKeptScores = int64_t{8} << 20;  // floats of a job's scores kept between passes (32 MB)

struct Job {
  int b, hk, i0, i1;  // tokens [i0, i1) of sequence b, KV head hk
};

struct Block {  // one job's query rows and their running state
  int R, D;
  std::vector<float> q, qs, m, l, acc;
  std::vector<int64_t> pos;  // each row's token position
};

// dst[d] = src[d] * w (INT8 -> float)
inline void int8_to_float(const int8_t* src, int D, float w, float* dst) {
  int d = 0;
  const __m256 vw = _mm256_set1_ps(w);
  for (; d + 8 <= D; d += 8)
    _mm256_storeu_ps(dst + d, _mm256_mul_ps(vw, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                                                  _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + d))))));
  for (; d < D; ++d) dst[d] = src[d] * w;
}

// s[t] *= f * ks[t] for t in [lo, hi); returns their max
inline float scale_max(float* s, const float* ks, float f, int lo, int hi) {
  const __m256 vf = _mm256_set1_ps(f);
  __m256 vmx = _mm256_set1_ps(kNeg);
  int t = lo;
  for (; t + 8 <= hi; t += 8) {
    const __m256 x = _mm256_mul_ps(_mm256_loadu_ps(s + t), _mm256_mul_ps(vf, _mm256_loadu_ps(ks + t)));
    _mm256_storeu_ps(s + t, x);
    vmx = _mm256_max_ps(vmx, x);
  }
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmx), _mm256_extractf128_ps(vmx, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  float mx = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
  for (; t < hi; ++t) {
    s[t] *= f * ks[t];
    mx = std::max(mx, s[t]);
  }
  return mx;
}

// The keys row r of a tile at positions p0 .. p0 + n - 1 sees: [lo, hi) (a row at position p
// sees keys in (p - window, p]; window 0: all up to p).
inline std::pair<int, int> row_range(const Block& st, int r, int window, int64_t p0, int n) {
  const int hi = static_cast<int>(std::min<int64_t>(n, st.pos[r] - p0 + 1));
  const int lo = window > 0 ? static_cast<int>(std::max<int64_t>(0, st.pos[r] - window + 1 - p0)) : 0;
  return {lo, hi};
}

// Pass 1 over a tile of n keys: s (R, n) = Q K times the key scales ks and sm_scale where each
// row sees them; with update_max, each row's max rises to the tile's. K in float, element
// (d, t) at d * sd + t * sk (pages: channel-major, sk = 1; rows: token-major, sd = 1).
void scores(Block& st, int window, float sm_scale, int64_t p0, int n, const float* k, int64_t sd,
            int64_t sk, const float* ks, float* s, bool update_max) {
  const int R = st.R, D = st.D;
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor S = at::from_blob(s, {R, n}, f32);
  at::cpu::mm_out(S, at::from_blob(st.q.data(), {R, D}, f32),
                  at::from_blob(const_cast<float*>(k), {D, n}, {sd, sk}, f32));
  for (int r = 0; r < R; ++r) {
    const auto [lo, hi] = row_range(st, r, window, p0, n);
    if (hi <= lo) continue;
    const float mx = scale_max(s + static_cast<int64_t>(r) * n, ks, st.qs[r] * sm_scale, lo, hi);
    if (update_max) st.m[r] = std::max(st.m[r], mx);
  }
}

// Pass 2 over the tile: the weights of s (SAS or exp) against each row's final max — the
// reference's, so SAS cuts and approximates exactly its weights — into l, and acc += P V.
void accumulate(Block& st, int window, const Softmax& sm, int64_t p0, int n, const float* v, int64_t sd,
                int64_t sk, float* s, int64_t& zeros, int64_t& seen) {
  const int R = st.R, D = st.D;
  for (int r = 0; r < R; ++r) {
    float* sr = s + static_cast<int64_t>(r) * n;
    const auto [lo, hi] = row_range(st, r, window, p0, n);
    if (hi <= lo) {
      std::fill(sr, sr + n, 0.f);
      continue;
    }
    st.l[r] += sm.weights(sr, lo, hi, st.m[r], zeros);  // sr[:lo] = 0
    std::fill(sr + hi, sr + n, 0.f);
    seen += hi - lo;
  }
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor acc = at::from_blob(st.acc.data(), {R, D}, f32);
  at::cpu::addmm_(acc, at::from_blob(s, {R, n}, f32), at::from_blob(const_cast<float*>(v), {n, D}, {sk, sd}, f32));
}

// The job's query rows (token-major: row (i - i0) * grp + j is query head hk * grp + j of new
// token i, at position pos0 + i) and a fresh running state.
void load_block(Block& st, const Job& jb, const float* qv, const float* qsv, int Hq, int Lq, int grp,
                int D, int64_t pos0) {
  st.R = (jb.i1 - jb.i0) * grp;
  st.D = D;
  st.q.resize(static_cast<size_t>(st.R) * D);
  st.qs.resize(st.R);
  st.pos.resize(st.R);
  st.m.assign(st.R, kNeg);
  st.l.assign(st.R, 0.f);
  st.acc.assign(static_cast<size_t>(st.R) * D, 0.f);
  for (int i = jb.i0; i < jb.i1; ++i)
    for (int j = 0; j < grp; ++j) {
      const int r = (i - jb.i0) * grp + j;
      const int64_t at = (static_cast<int64_t>(jb.b) * Hq + jb.hk * grp + j) * Lq + i;
      std::copy(qv + at * D, qv + (at + 1) * D, st.q.begin() + static_cast<int64_t>(r) * D);
      st.qs[r] = qsv[at];
      st.pos[r] = pos0 + i;
    }
}

// out rows = acc / l (0 for a row that saw no key, as the reference)
void store_block(const Block& st, const Job& jb, int Hq, int Lq, int grp, float* out) {
  const int D = st.D;
  for (int i = jb.i0; i < jb.i1; ++i)
    for (int j = 0; j < grp; ++j) {
      const int r = (i - jb.i0) * grp + j;
      const float inv = st.l[r] > 0.f ? 1.f / st.l[r] : 0.f;
      const float* ar = st.acc.data() + static_cast<int64_t>(r) * D;
      float* o = out + ((static_cast<int64_t>(jb.b) * Hq + jb.hk * grp + j) * Lq + i) * D;
      for (int d = 0; d < D; ++d) o[d] = ar[d] * inv;
    }
}

std::vector<Job> row_blocks(int B, int Hkv, int Lq, int grp) {
  const int tokens_per_job = std::max(1, kRowBlock / grp);
  std::vector<Job> jobs;
  for (int b = 0; b < B; ++b)
    for (int hk = 0; hk < Hkv; ++hk)
      for (int i0 = 0; i0 < Lq; i0 += tokens_per_job) jobs.push_back(Job{b, hk, i0, std::min(Lq, i0 + tokens_per_job)});
  return jobs;
}

at::Tensor summed(const std::vector<int64_t>& counts) {
  at::Tensor total = at::zeros({2}, at::kLong);
  for (size_t k = 0; k < counts.size(); k += 2) {
    total.data_ptr<int64_t>()[0] += counts[k];
    total.data_ptr<int64_t>()[1] += counts[k + 1];
  }
  return total;
}

void run_job(const Packed& pk, const Job& jb, const float* qv, const float* qsv, int Hq, int Lq,
             float sm_scale, const Group& g, int gi, float* out, int64_t* counts) {
  const int D = pk.D, C = pk.chunk, grp = Hq / pk.Hkv, b = jb.b, hk = jb.hk;
  const int NT = std::max(kTilePages * C, kBufferTile);
  thread_local Block st;
  thread_local std::vector<float> k, v, ks, s, sc, lo;
  load_block(st, jb, qv, qsv, Hq, Lq, grp, D, pk.qpos0[b]);
  const int R = st.R;
  const int64_t first = pk.qpos0[b] + jb.i0, last = pk.qpos0[b] + jb.i1 - 1;
  const int64_t oldest = pk.window > 0 ? first - pk.window + 1 : 0;  // the block sees [oldest, last]
  // the tiles in order: pages kTilePages at a time, then the INT8 buffer — the sinks (rows r <
  // sinks at r), then the tail (rows at tail_shift + r); (first page or row, keys, position)
  struct Tile { int at, n; int64_t p0; bool page; };
  std::vector<Tile> tiles;
  for (int c0 = 0; c0 < pk.n_chunks[b]; c0 += kTilePages) {
    const int n = std::min(kTilePages, pk.n_chunks[b] - c0) * C;
    const int64_t p0 = pk.first_pos[b] + static_cast<int64_t>(c0) * C;
    if (p0 <= last && p0 + n - 1 >= oldest) tiles.push_back(Tile{c0, n, p0, true});
  }
  const int blen = pk.blen[b], sink_rows = std::min(pk.sinks, blen);
  for (int seg = 0; seg < 2; ++seg) {
    const int r0 = seg ? sink_rows : 0, r1 = seg ? blen : sink_rows;
    for (int a = r0; a < r1; a += kBufferTile) {
      const int n = std::min(kBufferTile, r1 - a);
      const int64_t p0 = (seg ? pk.tail_shift[b] : 0) + a;
      if (p0 <= last && p0 + n - 1 >= oldest) tiles.push_back(Tile{a, n, p0, false});
    }
  }
  int64_t keys = 0;
  for (const Tile& t : tiles) keys += t.n;
  // pass 1's scores are kept for pass 2 when they fit, else computed again
  const bool keep = static_cast<int64_t>(R) * keys <= kMaxKeptScores;
  s.resize(static_cast<size_t>(R) * (keep ? keys : NT));
  k.resize(static_cast<size_t>(D) * NT);
  v.resize(static_cast<size_t>(D) * NT);
  ks.resize(NT);
  sc.resize(2 * C);
  lo.resize(2 * C);
  const int64_t base = (pk.slot[b] * pk.Hkv + hk) * pk.rows_cap;
  // one tile's K (into k, ks) and/or V (into v); returns (sd, sk): the layout of both
  auto load = [&](const Tile& t, bool want_k, bool want_v) -> std::pair<int64_t, int64_t> {
    if (t.page) {
      for (int p = 0; p < t.n / C; ++p) {
        const int64_t ph = static_cast<int64_t>(pk.table[b][t.at + p]) * g.n + gi;
        float* kd = want_k ? k.data() + p * C : nullptr;
        float* vd = want_v ? v.data() + p * C : nullptr;
        if (g.bits == 4) decode_page<4>(g, ph, D, C, kd, vd, NT, sc.data(), lo.data());
        else if (g.bits == 2) decode_page<2>(g, ph, D, C, kd, vd, NT, sc.data(), lo.data());
        else decode_page<8>(g, ph, D, C, kd, vd, NT, sc.data(), lo.data());
        std::fill(ks.begin() + p * C, ks.begin() + (p + 1) * C, g.kf[ph]);
      }
      return {NT, 1};
    }
    for (int i = 0; i < t.n; ++i) {  // rows (n, D), token-major
      const int64_t row = base + t.at + i;
      if (want_k) int8_to_float(pk.bk + row * D, D, 1.f, k.data() + static_cast<int64_t>(i) * D);
      if (want_v) int8_to_float(pk.bv + row * D, D, pk.bvs[row], v.data() + static_cast<int64_t>(i) * D);
      ks[i] = pk.bks[row];
    }
    return {1, D};
  };
  int64_t zeros = 0, seen = 0, off = 0;
  for (const Tile& t : tiles) {  // pass 1: the row maxima
    const auto [sd, sk] = load(t, true, false);
    scores(st, pk.window, sm_scale, t.p0, t.n, k.data(), sd, sk, ks.data(), s.data() + (keep ? off : 0), true);
    off += static_cast<int64_t>(R) * t.n;
  }
  off = 0;
  for (const Tile& t : tiles) {  // pass 2: the weights against them, and P V
    const auto [sd, sk] = load(t, !keep, true);
    float* st_s = s.data() + (keep ? off : 0);
    if (!keep) scores(st, pk.window, sm_scale, t.p0, t.n, k.data(), sd, sk, ks.data(), st_s, false);
    accumulate(st, pk.window, pk.sm, t.p0, t.n, v.data(), sd, sk, st_s, zeros, seen);
    off += static_cast<int64_t>(R) * t.n;
  }
  store_block(st, jb, Hq, Lq, grp, out);
  counts[0] += zeros;
  counts[1] += seen;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> prefill_attention(
    const at::Tensor& q, bool qk_int8, int64_t block_size, const std::vector<at::Tensor>& heads,
    const std::vector<at::Tensor>& k_packed, const std::vector<at::Tensor>& k_scale,
    const std::vector<at::Tensor>& k_low, const std::vector<at::Tensor>& k_first,
    const std::vector<at::Tensor>& v_packed, const std::vector<at::Tensor>& v_scale,
    const std::vector<at::Tensor>& v_low, const std::vector<at::Tensor>& v_first,
    std::vector<int64_t> bits, std::vector<int64_t> k_group, std::vector<int64_t> v_group,
    const at::Tensor& page_table, const at::Tensor& n_chunks, const at::Tensor& chunk_base,
    const at::Tensor& buffer_k, const at::Tensor& buffer_k_scale, const at::Tensor& buffer_v,
    const at::Tensor& buffer_v_scale, const at::Tensor& buffer_len, int64_t chunk, int64_t sinks,
    int64_t window, double sm_scale, const at::Tensor& lut, std::vector<double> coeffs,
    double lut_max, bool use_sas) {
  TORCH_CHECK(block_size >= 1, "block_size must be >= 1");
  const Packed pk = packed_view(q, heads, k_packed, k_scale, k_low, k_first, v_packed, v_scale, v_low,
                                v_first, bits, k_group, v_group, page_table, n_chunks, chunk_base,
                                buffer_k, buffer_k_scale, buffer_v, buffer_v_scale, buffer_len, chunk,
                                sinks, window, lut, coeffs, lut_max, use_sas);
  const int B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3), grp = Hq / pk.Hkv;
  const auto [qv, qsv] = query_codes(q, qk_int8, block_size);
  // where each KV head is stored: (group, row in the group)
  std::vector<std::pair<int, int>> where(pk.Hkv);
  for (size_t j = 0; j < pk.groups.size(); ++j)
    for (int i = 0; i < pk.groups[j].n; ++i) where[pk.groups[j].heads[i]] = {static_cast<int>(j), i};
  const std::vector<Job> jobs = row_blocks(B, pk.Hkv, Lq, grp);
  at::Tensor out = at::empty({B, Hq, Lq, D}, q.options());
  std::vector<int64_t> counts(2 * jobs.size(), 0);
  at::parallel_for(0, static_cast<int64_t>(jobs.size()), 1, [&](int64_t from, int64_t to) {
    for (int64_t j = from; j < to; ++j) {
      const auto [gi, row] = where[jobs[j].hk];
      run_job(pk, jobs[j], qv.data_ptr<float>(), qsv.data_ptr<float>(), Hq, Lq, static_cast<float>(sm_scale),
              pk.groups[gi], row, out.data_ptr<float>(), counts.data() + 2 * j);
    }
  });
  return {out, summed(counts)};
}

std::tuple<at::Tensor, at::Tensor> attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             bool qk_int8, int64_t block_size, bool causal, int64_t window,
                                             double sm_scale, const at::Tensor& lut, std::vector<double> coeffs,
                                             double lut_max, bool use_sas) {
  for (const auto* t : {&q, &k, &v})
    TORCH_CHECK(t->dim() == 4 && t->scalar_type() == at::kFloat && t->is_contiguous(),
                "q, k and v must be contiguous float32 (B, H, L, D) tensors");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(3) == q.size(3) && k.size(1) >= 1 &&
                  q.size(1) % k.size(1) == 0, "k and v must be (B, H_kv, L_k, D) with H_q a multiple of H_kv");
  TORCH_CHECK(block_size >= 1 && window >= 0 && (window == 0 || causal), "block_size >= 1; a window needs causal");
  TORCH_CHECK(!causal || q.size(2) <= k.size(2), "causal attention needs L_q <= L_k");
  TORCH_CHECK(!use_sas || (lut.scalar_type() == at::kFloat && lut.numel() >= lut_max + 2 && coeffs.size() >= 4),
              "lut must hold lut_max + 2 float32 entries and coeffs 4");
  const Softmax sm = make_softmax(use_sas, lut, coeffs, lut_max);
  const int B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3), Hkv = k.size(1), Lk = k.size(2);
  const int grp = Hq / Hkv;
  const auto [qv, qsv] = query_codes(q, qk_int8, block_size);
  const auto [kv, ksv] = query_codes(k, qk_int8, block_size);  // K quantized the same way
  // causal: query i at position L_k - L_q + i (bottom-right, as the reference); else after all keys
  const int64_t pos0 = causal ? Lk - Lq : static_cast<int64_t>(Lk);
  const std::vector<Job> jobs = row_blocks(B, Hkv, Lq, grp);
  at::Tensor out = at::empty({B, Hq, Lq, D}, q.options());
  std::vector<int64_t> counts(2 * jobs.size(), 0);
  at::parallel_for(0, static_cast<int64_t>(jobs.size()), 1, [&](int64_t from, int64_t to) {
    thread_local Block st;
    thread_local std::vector<float> s;
    for (int64_t j = from; j < to; ++j) {
      const Job& jb = jobs[j];
      load_block(st, jb, qv.data_ptr<float>(), qsv.data_ptr<float>(), Hq, Lq, grp, D, pos0);
      const int64_t base = (static_cast<int64_t>(jb.b) * Hkv + jb.hk) * Lk;
      const int64_t last = causal ? pos0 + jb.i1 - 1 : Lk, oldest = window > 0 ? pos0 + jb.i0 - window + 1 : 0;
      int64_t zeros = 0, seen = 0;
      // the scores of all keys stay from pass 1 to pass 2 when they fit, else are computed again
      const int a0 = causal || window > 0 ? static_cast<int>(std::max<int64_t>(0, oldest)) : 0;
      const int a1 = static_cast<int>(std::min<int64_t>(Lk, last + 1));
      const bool keep = static_cast<int64_t>(st.R) * (a1 - a0) <= kMaxKeptScores;
      s.resize(static_cast<size_t>(st.R) * (keep ? std::max(0, a1 - a0) : kBufferTile));
      const float* kp = kv.data_ptr<float>() + base * D;
      const float* vp = v.data_ptr<float>() + base * D;
      const float* kps = ksv.data_ptr<float>() + base;
      for (int pass = 0; pass < 2; ++pass)  // the row maxima, then the weights against them and P V
        for (int a = a0, off = 0; a < a1; a += kBufferTile) {  // token-major rows, read in place
          const int n = std::min(kBufferTile, a1 - a);
          float* ts = s.data() + (keep ? static_cast<int64_t>(st.R) * off : 0);
          if (pass == 0 || !keep)
            scores(st, static_cast<int>(window), static_cast<float>(sm_scale), a, n, kp + static_cast<int64_t>(a) * D,
                   1, D, kps + a, ts, pass == 0);
          if (pass == 1) accumulate(st, static_cast<int>(window), sm, a, n, vp + static_cast<int64_t>(a) * D, 1, D, ts, zeros, seen);
          off += n;
        }
      store_block(st, jb, Hq, Lq, grp, out.data_ptr<float>());
      counts[2 * j] += zeros;
      counts[2 * j + 1] += seen;
    }
  });
  return {out, summed(counts)};
}

}  // namespace turbo
