// The turbo ops' schemas and their CPU kernels (one op per source file). Fake (meta)
// implementations live beside the Python wrapper (turbo_kernels.cpu_ops).
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(turbo, m) {
  m.def(
      "decode_attention(Tensor q, bool qk_int8, int block_size, Tensor[] heads, Tensor[] k_packed, Tensor[] k_scale, "
      "Tensor[] k_low, Tensor[] k_first, Tensor[] v_packed, Tensor[] v_scale, Tensor[] v_low, "
      "Tensor[] v_first, int[] bits, int[] k_group, int[] v_group, Tensor page_table, "
      "Tensor n_chunks, Tensor chunk_base, Tensor buffer_k, "
      "Tensor buffer_k_scale, Tensor buffer_v, Tensor buffer_v_scale, Tensor buffer_len, "
      "int chunk, int sinks, int window, int pages_per_split, float sm_scale, Tensor lut, "
      "float[] coeffs, float lut_max, bool use_sas) -> (Tensor, Tensor)");
  m.def(
      "decode_step(Tensor q, Tensor k, Tensor v, Tensor slots, Tensor(a!) buffer_len, Tensor n_chunks, "
      "Tensor chunk_base, Tensor page_table, Tensor(b!) buffer_k, Tensor(c!) buffer_k_scale, "
      "Tensor(d!) buffer_v, Tensor(e!) buffer_v_scale, Tensor[] heads, Tensor[] k_packed, Tensor[] k_scale, "
      "Tensor[] k_low, Tensor[] k_first, Tensor[] v_packed, Tensor[] v_scale, Tensor[] v_low, "
      "Tensor[] v_first, int[] bits, int[] k_group, int[] v_group, int chunk, int sinks, int window, "
      "bool qk_int8, int block_size, int pages_per_split, float sm_scale, Tensor lut, float[] coeffs, "
      "float lut_max, bool use_sas) -> (Tensor, Tensor)");
  m.def(
      "prefill_attention(Tensor q, bool qk_int8, int block_size, Tensor[] heads, Tensor[] k_packed, "
      "Tensor[] k_scale, Tensor[] k_low, Tensor[] k_first, Tensor[] v_packed, Tensor[] v_scale, "
      "Tensor[] v_low, Tensor[] v_first, int[] bits, int[] k_group, int[] v_group, Tensor page_table, "
      "Tensor n_chunks, Tensor chunk_base, Tensor buffer_k, Tensor buffer_k_scale, Tensor buffer_v, "
      "Tensor buffer_v_scale, Tensor buffer_len, int chunk, int sinks, int window, float sm_scale, "
      "Tensor lut, float[] coeffs, float lut_max, bool use_sas) -> (Tensor, Tensor)");
  m.def(
      "attention(Tensor q, Tensor k, Tensor v, bool qk_int8, int block_size, bool causal, int window, "
      "float sm_scale, Tensor lut, float[] coeffs, float lut_max, bool use_sas) -> (Tensor, Tensor)");
  m.def(
      "append(Tensor k, Tensor v, Tensor slots, Tensor rows, Tensor(a!) buffer_k, "
      "Tensor(b!) buffer_k_scale, Tensor(c!) buffer_v, Tensor(d!) buffer_v_scale, Tensor jobs, "
      "Tensor pages, Tensor[] heads, Tensor(e!)[] k_packed, Tensor(f!)[] k_scale, Tensor(g!)[] k_low, "
      "Tensor(h!)[] k_first, Tensor(i!)[] v_packed, Tensor(j!)[] v_scale, Tensor(k!)[] v_low, "
      "Tensor(l!)[] v_first, int[] bits, int[] k_group, int[] v_group, int chunk, int protect) -> ()");
  m.def(
      "float_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor slots, Tensor row_lo, "
      "Tensor row_hi, int window, float sm_scale) -> Tensor");
  m.def(
      "float_decode_step(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slots, "
      "Tensor(c!) rows, int window, float sm_scale) -> Tensor");
  m.def("linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(turbo, CPU, m) {
  m.impl("decode_attention", &turbo::decode_attention);
  m.impl("decode_step", &turbo::decode_step);
  m.impl("prefill_attention", &turbo::prefill_attention);
  m.impl("attention", &turbo::attention);
  m.impl("append", &turbo::append);
  m.impl("float_decode_attention", &turbo::float_decode_attention);
  m.impl("float_decode_step", &turbo::float_decode_step);
  m.impl("linear", &turbo::linear);
}
