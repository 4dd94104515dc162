// The turbo ops' schemas and their CPU kernels (one op per source file). Fake (meta)
// implementations live beside the Python wrapper (turbo_kernels.cpu_ops).
#include <torch/library.h>

#include <tuple>
#include <vector>

namespace turbo {
std::tuple<at::Tensor, at::Tensor> decode_attention(
    const at::Tensor& q, const at::Tensor& qs, const std::vector<at::Tensor>& heads,
    const std::vector<at::Tensor>& k_packed, const std::vector<at::Tensor>& k_scale,
    const std::vector<at::Tensor>& k_low, const std::vector<at::Tensor>& k_first,
    const std::vector<at::Tensor>& v_packed, const std::vector<at::Tensor>& v_scale,
    const std::vector<at::Tensor>& v_low, const std::vector<at::Tensor>& v_first,
    std::vector<int64_t> bits, std::vector<int64_t> k_group, std::vector<int64_t> v_group,
    const at::Tensor& page_table, const at::Tensor& n_chunks, const at::Tensor& first_pos,
    const at::Tensor& tail_shift, const at::Tensor& qpos0, const at::Tensor& buffer_k,
    const at::Tensor& buffer_k_scale, const at::Tensor& buffer_v, const at::Tensor& buffer_v_scale,
    const at::Tensor& buffer_len, int64_t chunk, int64_t sinks, int64_t window,
    int64_t pages_per_split, double sm_scale, const at::Tensor& lut, std::vector<double> coeffs,
    double lut_max, bool use_sas);
}  // namespace turbo

TORCH_LIBRARY(turbo, m) {
  m.def(
      "decode_attention(Tensor q, Tensor qs, Tensor[] heads, Tensor[] k_packed, Tensor[] k_scale, "
      "Tensor[] k_low, Tensor[] k_first, Tensor[] v_packed, Tensor[] v_scale, Tensor[] v_low, "
      "Tensor[] v_first, int[] bits, int[] k_group, int[] v_group, Tensor page_table, "
      "Tensor n_chunks, Tensor first_pos, Tensor tail_shift, Tensor qpos0, Tensor buffer_k, "
      "Tensor buffer_k_scale, Tensor buffer_v, Tensor buffer_v_scale, Tensor buffer_len, "
      "int chunk, int sinks, int window, int pages_per_split, float sm_scale, Tensor lut, "
      "float[] coeffs, float lut_max, bool use_sas) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(turbo, CPU, m) { m.impl("decode_attention", &turbo::decode_attention); }
