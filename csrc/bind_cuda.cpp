// The one torch binding of the CUDA extension (segformer_fast._C_cuda).
// Kernels live in plain CUDA files, csrc/<op>/<op>.cu, with no torch headers, exposing
// extern "C" launchers declared in csrc/<op>/<op>.h; each op adds a header-only binding
// csrc/<op>/<op>_bind_cuda.h defining `void register_<op>(pybind11::module_& m)`, included and called below.
#include <torch/extension.h>
#include "upsample_sum/upsample_sum_bind_cuda.h"
#include "sr_attention/sr_attention_bind_cuda.h"
#include "dwconv3x3_gelu/dwconv3x3_gelu_bind_cuda.h"
#include "upsample_cross_entropy/upsample_cross_entropy_bind_cuda.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "segformer_fast CUDA kernels";
  register_upsample_sum(m);
  register_sr_attention(m);
  register_dwconv3x3_gelu(m);
  register_upsample_cross_entropy(m);
}
