// turbo::append — one layer's cache write for one step, in place (turbo_core.attention.kvcache,
// docs/design.md §1.2): first every listed full chunk of INT8 buffer rows is compressed into its
// page (the head's bits) and the rows behind it move down, then the new K/V rows are quantized
// into the buffer. Byte for byte what QuantizedKVLayer's PyTorch path writes:
//   page, per head:  x = q8 * s_t;  s = max|x| / protect (1 if 0);  c8 = clamp(rne(x / s), +-protect)
//     8 bits: codes (D, c) as they are; 2/4 bits, integer only (quant.quantize_lowbit):
//     K per (channel, group of k_group tokens), V per (token, group of v_group channels):
//     lo = min, S = max(1, ceil((max - lo) / (2^b - 1))), code = (2 (c8 - lo) + S) div (2 S),
//     packed planar along the tokens (quant.pack: byte j holds tokens j, j + m, ...);
//   new row:  s_t = max|x| / 127 (1 if 0),  q8 = clamp(rne(x / s_t), +-127).
#include <ATen/Parallel.h>

#include "attention_common.h"
#include "ops.h"

#include <cstring>

namespace turbo {
namespace {

// integer asymmetric codes of n values (stride step) -> (S, lo); codes into out (stride 1)
inline void lowbit_group(const int8_t* c8, int n, int step, int levels, uint8_t* out, uint8_t& S,
                         int8_t& lo) {
  int mn = 127, mx = -128;
  for (int k = 0; k < n; ++k) {
    mn = std::min<int>(mn, c8[k * step]);
    mx = std::max<int>(mx, c8[k * step]);
  }
  const int s = std::max(1, (mx - mn + levels - 1) / levels);
  for (int k = 0; k < n; ++k) out[k] = static_cast<uint8_t>((2 * (c8[k * step] - mn) + s) / (2 * s));
  S = static_cast<uint8_t>(s);
  lo = static_cast<int8_t>(mn);
}

// codes (c,) of one channel -> planar bytes (c * bits / 8,)
inline void pack_planar(const uint8_t* codes, int c, int bits, uint8_t* dst) {
  const int per = 8 / bits, m = c / per;
  for (int j = 0; j < m; ++j) {
    uint8_t b = 0;
    for (int p = 0; p < per; ++p) b |= static_cast<uint8_t>(codes[p * m + j] << (p * bits));
    dst[j] = b;
  }
}

struct Pool {
  int bits, n, k_group, v_group;
  uint8_t *kp, *ksc, *vp, *vsc;
  int8_t *klo, *vlo;
  float *kf, *vf;
};

template <typename T>
T* mut(const at::Tensor& t) {
  return t.numel() ? t.data_ptr<T>() : nullptr;
}

// chunk rows x (c, D) of one head, as float -> page `page`, head row `row` of the pool
void compress_head(const float* x, int C, int D, float protect, const Pool& g, int64_t page, int row,
                   std::vector<int8_t>& c8, std::vector<int8_t>& tr, std::vector<uint8_t>& codes) {
  const int64_t ph = page * g.n + row;
  for (int side = 0; side < 2; ++side) {  // K then V
    const float* xs = x + static_cast<int64_t>(side) * C * D;
    const float sc = quantize_block(xs, static_cast<int64_t>(C) * D, protect, c8.data());
    (side ? g.vf : g.kf)[ph] = sc;
    for (int t = 0; t < C; ++t)  // (c, D) -> (D, c): channel-major, packing runs along tokens
      for (int d = 0; d < D; ++d) tr[static_cast<int64_t>(d) * C + t] = c8[static_cast<int64_t>(t) * D + d];
    uint8_t* packed = (side ? g.vp : g.kp) + ph * D * (C * g.bits / 8);
    if (g.bits == 8) {
      std::memcpy(packed, tr.data(), static_cast<size_t>(D) * C);
      continue;
    }
    const int levels = (1 << g.bits) - 1;
    if (side == 0) {  // K: per channel, groups of k_group tokens
      const int kgs = C / g.k_group;
      for (int d = 0; d < D; ++d) {
        for (int gi = 0; gi < kgs; ++gi) {
          const int64_t at = (ph * D + d) * kgs + gi;
          lowbit_group(tr.data() + static_cast<int64_t>(d) * C + gi * g.k_group, g.k_group, 1, levels,
                       codes.data() + static_cast<int64_t>(d) * C + gi * g.k_group, g.ksc[at], g.klo[at]);
        }
      }
    } else {  // V: per token, groups of v_group channels
      const int vgs = D / g.v_group;
      std::vector<uint8_t> col(g.v_group);
      for (int gi = 0; gi < vgs; ++gi)
        for (int t = 0; t < C; ++t) {
          const int64_t at = (ph * vgs + gi) * C + t;
          lowbit_group(tr.data() + static_cast<int64_t>(gi) * g.v_group * C + t, g.v_group, C, levels,
                       col.data(), g.vsc[at], g.vlo[at]);
          for (int k = 0; k < g.v_group; ++k) codes[static_cast<int64_t>(gi * g.v_group + k) * C + t] = col[k];
        }
    }
    for (int d = 0; d < D; ++d)
      pack_planar(codes.data() + static_cast<int64_t>(d) * C, C, g.bits, packed + static_cast<int64_t>(d) * (C * g.bits / 8));
  }
}

}  // namespace

void append(const at::Tensor& k, const at::Tensor& v, const at::Tensor& slots, const at::Tensor& rows,
            const at::Tensor& buffer_k, const at::Tensor& buffer_k_scale, const at::Tensor& buffer_v,
            const at::Tensor& buffer_v_scale, const at::Tensor& jobs, const at::Tensor& pages,
            const std::vector<at::Tensor>& heads, const std::vector<at::Tensor>& k_packed,
            const std::vector<at::Tensor>& k_scale, const std::vector<at::Tensor>& k_low,
            const std::vector<at::Tensor>& k_first, const std::vector<at::Tensor>& v_packed,
            const std::vector<at::Tensor>& v_scale, const std::vector<at::Tensor>& v_low,
            const std::vector<at::Tensor>& v_first, std::vector<int64_t> bits,
            std::vector<int64_t> k_group, std::vector<int64_t> v_group, int64_t chunk, int64_t protect) {
  TORCH_CHECK(buffer_k.dim() == 4 && buffer_k.scalar_type() == at::kChar && buffer_k.is_contiguous(),
              "buffer_k must be a contiguous int8 (slots, H_kv, rows, D) tensor");
  const int64_t n_slots = buffer_k.size(0), H = buffer_k.size(1), cap = buffer_k.size(2), D = buffer_k.size(3);
  TORCH_CHECK(buffer_v.sizes() == buffer_k.sizes() && buffer_v.scalar_type() == at::kChar && buffer_v.is_contiguous(),
              "buffer_v must be like buffer_k");
  for (const auto* t : {&buffer_k_scale, &buffer_v_scale})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 3 && t->size(0) == n_slots &&
                    t->size(1) == H && t->size(2) == cap, "buffer_k_scale/buffer_v_scale must be float32 (slots, H_kv, rows)");
  TORCH_CHECK(k.dim() == 4 && k.scalar_type() == at::kFloat && k.is_contiguous() && k.size(1) == H && k.size(3) == D &&
                  v.sizes() == k.sizes() && v.scalar_type() == at::kFloat && v.is_contiguous(),
              "k and v must be contiguous float32 (N, H_kv, T, D) matching the buffer");
  const int64_t N = k.size(0), T = k.size(2), C = chunk;
  TORCH_CHECK(slots.scalar_type() == at::kLong && rows.scalar_type() == at::kLong && slots.numel() == N &&
                  rows.numel() == N, "slots and rows must be int64 (N,)");
  TORCH_CHECK(jobs.scalar_type() == at::kLong && jobs.dim() == 2 && jobs.size(1) == 4 && jobs.is_contiguous(),
              "jobs must be int64 (J, 4): slot, first row, chunks, rows after them");
  TORCH_CHECK(pages.scalar_type() == at::kLong && pages.is_contiguous(), "pages must be int64");
  TORCH_CHECK(C >= 8 && protect >= 1 && protect <= 127, "chunk or protect out of range");
  const int64_t* sl = slots.data_ptr<int64_t>();
  const int64_t* rw = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i)
    TORCH_CHECK(sl[i] >= 0 && sl[i] < n_slots && rw[i] >= 0 && rw[i] + T <= cap, "slots[", i, "] = ", sl[i],
                " / rows[", i, "] = ", rw[i], " are outside the buffer (", n_slots, " slots of ", cap, " rows)");
  std::vector<Pool> pools;
  std::vector<std::pair<int, int>> where(H, {-1, -1});
  int64_t pool_pages = -1;
  for (size_t j = 0; j < heads.size(); ++j) {
    const int64_t n = heads[j].numel();
    TORCH_CHECK(bits[j] == 2 || bits[j] == 4 || bits[j] == 8, "bits must be 2, 4 or 8");
    TORCH_CHECK(k_packed[j].is_contiguous() && k_packed[j].dim() == 4 && k_packed[j].size(1) == n &&
                    k_packed[j].size(2) == D && k_packed[j].size(3) == C * bits[j] / 8 &&
                    v_packed[j].sizes() == k_packed[j].sizes() && v_packed[j].is_contiguous(),
                "k_packed/v_packed must be contiguous (pages, heads, D, chunk * bits / 8)");
    pool_pages = pool_pages < 0 ? k_packed[j].size(0) : std::min(pool_pages, k_packed[j].size(0));
    TORCH_CHECK(k_first[j].numel() == k_packed[j].size(0) * n && v_first[j].numel() == k_first[j].numel() &&
                    k_first[j].is_contiguous() && v_first[j].is_contiguous(), "k_first/v_first must be (pages, heads)");
    if (bits[j] != 8)
      TORCH_CHECK(k_group[j] >= 1 && C % k_group[j] == 0 && v_group[j] >= 1 && D % v_group[j] == 0 &&
                      k_scale[j].numel() == k_packed[j].size(0) * n * D * (C / k_group[j]) &&
                      v_scale[j].numel() == k_packed[j].size(0) * n * (D / v_group[j]) * C &&
                      k_low[j].numel() == k_scale[j].numel() && v_low[j].numel() == v_scale[j].numel(),
                  "k_scale/k_low/v_scale/v_low do not match the pages and groups");
    const int64_t* h = heads[j].data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i) {
      TORCH_CHECK(h[i] >= 0 && h[i] < H && where[h[i]].first < 0, "heads[", j, "] names KV head ", h[i], " twice or of ", H);
      where[h[i]] = {static_cast<int>(j), static_cast<int>(i)};
    }
    pools.push_back(Pool{static_cast<int>(bits[j]), static_cast<int>(n), static_cast<int>(k_group[j]),
                         static_cast<int>(v_group[j]), mut<uint8_t>(k_packed[j]), mut<uint8_t>(k_scale[j]),
                         mut<uint8_t>(v_packed[j]), mut<uint8_t>(v_scale[j]), mut<int8_t>(k_low[j]),
                         mut<int8_t>(v_low[j]), mut<float>(k_first[j]), mut<float>(v_first[j])});
  }
  for (int64_t h = 0; h < H; ++h) TORCH_CHECK(where[h].first >= 0 || jobs.size(0) == 0, "KV head ", h, " is in no pool");
  // the compression jobs: (slot, first row, chunks, rows after them) and their pages in order
  const int64_t J = jobs.size(0);
  const int64_t* jb = jobs.data_ptr<int64_t>();
  const int64_t* pg = pages.data_ptr<int64_t>();
  std::vector<std::pair<int64_t, int64_t>> work;  // (job, chunk)
  int64_t used = 0;
  for (int64_t j = 0; j < J; ++j) {
    const int64_t s = jb[4 * j], start = jb[4 * j + 1], n = jb[4 * j + 2], rest = jb[4 * j + 3];
    TORCH_CHECK(s >= 0 && s < n_slots && start >= 0 && n >= 1 && rest >= 0 && start + n * C + rest <= cap,
                "jobs[", j, "] = (", s, ", ", start, ", ", n, ", ", rest, ") is outside the buffer");
    for (int64_t c = 0; c < n; ++c) work.emplace_back(j, c);
    used += n;
  }
  TORCH_CHECK(pages.numel() == used, "pages holds ", pages.numel(), " pages for ", used, " chunks");
  for (int64_t i = 0; i < used; ++i)
    TORCH_CHECK(pg[i] >= 0 && pg[i] < pool_pages, "pages[", i, "] = ", pg[i], " is outside the pools of ", pool_pages, " pages");
  std::vector<int64_t> first_page(J, 0);
  for (int64_t j = 1; j < J; ++j) first_page[j] = first_page[j - 1] + jb[4 * (j - 1) + 2];
  int8_t* bk = buffer_k.data_ptr<int8_t>();
  int8_t* bv = buffer_v.data_ptr<int8_t>();
  float* bks = buffer_k_scale.data_ptr<float>();
  float* bvs = buffer_v_scale.data_ptr<float>();
  const float fprot = static_cast<float>(protect);
  at::parallel_for(0, static_cast<int64_t>(work.size()) * H, 1, [&](int64_t from, int64_t to) {
    std::vector<float> x(2 * C * D);
    std::vector<int8_t> c8(C * D), tr(C * D);
    std::vector<uint8_t> codes(C * D);
    for (int64_t w = from; w < to; ++w) {
      const auto [j, c] = work[w / H];
      const int64_t h = w % H, s = jb[4 * j], row0 = jb[4 * j + 1] + c * C;
      const int64_t base = (s * H + h) * cap + row0;
      for (int64_t t = 0; t < C; ++t)
        for (int64_t d = 0; d < D; ++d) {
          x[t * D + d] = static_cast<float>(bk[(base + t) * D + d]) * bks[base + t];
          x[C * D + t * D + d] = static_cast<float>(bv[(base + t) * D + d]) * bvs[base + t];
        }
      const auto [gi, row] = where[h];
      compress_head(x.data(), C, D, fprot, pools[gi], pg[first_page[j] + c], row, c8, tr, codes);
    }
  });
  for (int64_t j = 0; j < J; ++j) {  // the rows behind the compressed chunks move down
    const int64_t s = jb[4 * j], start = jb[4 * j + 1], n = jb[4 * j + 2], rest = jb[4 * j + 3];
    for (int64_t h = 0; h < H; ++h) {
      const int64_t base = (s * H + h) * cap;
      std::memmove(bk + (base + start) * D, bk + (base + start + n * C) * D, rest * D);
      std::memmove(bv + (base + start) * D, bv + (base + start + n * C) * D, rest * D);
      std::memmove(bks + base + start, bks + base + start + n * C, rest * sizeof(float));
      std::memmove(bvs + base + start, bvs + base + start + n * C, rest * sizeof(float));
    }
  }
  quantize_rows(k.data_ptr<float>(), v.data_ptr<float>(), N, H, T, D, sl, rw, cap, bk, bks, bv, bvs);
}

}  // namespace turbo
