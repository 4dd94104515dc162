// The turbo ops' C++ entry points (one source file each), registered in torch_bindings.cpp.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace turbo {

// The newest tokens of each sequence over one layer of the packed KV cache
// (decode_attention.cpp); returns the output (B, H_q, L_q, D) and (SAS zeros, valid keys).
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
    double lut_max, bool use_sas);

// A decode step on one layer (decode_attention.cpp): the new rows k, v (B, H_kv, L_q, D) into
// the INT8 buffers at row buffer_len[slots[b]], buffer_len advanced, then decode_attention with
// the per-sequence tensors indexed by slot; returns what decode_attention returns.
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
    double lut_max, bool use_sas);

// A prompt chunk (the L_q newest tokens, causal among themselves) over one layer of the packed
// KV cache (prefill_attention.cpp); the same arguments but the context splits.
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
    double lut_max, bool use_sas);

// Attention over plain float K/V (prefill_attention.cpp: the same tiles, read in place): the
// drop-in module's path; returns the output (B, H_q, L_q, D) and (SAS zeros, valid keys).
std::tuple<at::Tensor, at::Tensor> attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             bool qk_int8, int64_t block_size, bool causal, int64_t window,
                                             double sm_scale, const at::Tensor& lut, std::vector<double> coeffs,
                                             double lut_max, bool use_sas);

// One layer's cache write for one step (append.cpp): the listed full chunks of the INT8 buffer
// compressed into their pages, the rows behind them moved down, the new rows quantized in.
void append(const at::Tensor& k, const at::Tensor& v, const at::Tensor& slots, const at::Tensor& rows,
            const at::Tensor& buffer_k, const at::Tensor& buffer_k_scale, const at::Tensor& buffer_v,
            const at::Tensor& buffer_v_scale, const at::Tensor& jobs, const at::Tensor& pages,
            const std::vector<at::Tensor>& heads, const std::vector<at::Tensor>& k_packed,
            const std::vector<at::Tensor>& k_scale, const std::vector<at::Tensor>& k_low,
            const std::vector<at::Tensor>& k_first, const std::vector<at::Tensor>& v_packed,
            const std::vector<at::Tensor>& v_scale, const std::vector<at::Tensor>& v_low,
            const std::vector<at::Tensor>& v_first, std::vector<int64_t> bits,
            std::vector<int64_t> k_group, std::vector<int64_t> v_group, int64_t chunk, int64_t protect);

// The newest tokens of each sequence over one layer of the float KV cache (float_decode.cpp):
// exact softmax attention, rows [row_lo, row_hi) of slot slots[b]; returns (B, H_q, L_q, D).
at::Tensor float_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& slots, const at::Tensor& row_lo, const at::Tensor& row_hi,
                                  int64_t window, double sm_scale);

// A decode step on one layer of the float cache (float_decode.cpp): each slot's window start
// advanced (FloatKVLayer.append), the new rows k, v (B, H_kv, L_q, D) written at its held rows'
// end, rows (2, slots) = [lo, hi) advanced in place, then float_decode_attention over them.
at::Tensor float_decode_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slots,
                             const at::Tensor& rows, int64_t window, double sm_scale);

// y = x W^T + b for a decode step's few rows (linear.cpp): the weights streamed once; more
// than 16 rows, other dtypes or devices: at::linear.
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias);

}  // namespace turbo
