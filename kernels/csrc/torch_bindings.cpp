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
}

TORCH_LIBRARY_IMPL(turbo, CPU, m) { m.impl("decode_attention", &turbo::decode_attention); }
