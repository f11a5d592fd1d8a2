// The one torch binding of the CPU extension (segformer_fast._C_cpu).
// Kernels live in plain C++ files, csrc/<op>/<op>_cpu.cpp, with no torch headers, so they compile
// fast; each op adds a header-only binding csrc/<op>/<op>_bind_cpu.h defining
// `void register_<op>(pybind11::module_& m)`, included and called below.
#include <torch/extension.h>
#include "upsample_sum/upsample_sum_bind_cpu.h"
#include "dwconv3x3_gelu/dwconv3x3_gelu_bind_cpu.h"
#include "upsample_cross_entropy/upsample_cross_entropy_bind_cpu.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "segformer_fast CPU kernels";
  register_upsample_sum(m);
  register_dwconv3x3_gelu(m);
  register_upsample_cross_entropy(m);
}
