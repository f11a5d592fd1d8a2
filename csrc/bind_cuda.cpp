// The one torch binding of the CUDA extension (segformer_fast._C_cuda).
// Kernels live in plain CUDA files, csrc/<op>/<op>.cu, with no torch headers, exposing
// extern "C" launchers declared in csrc/<op>/<op>.h; each op adds a header-only binding
// csrc/<op>/<op>_bind_cuda.h defining `void register_<op>(pybind11::module_& m)`, included and called below.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "segformer_fast CUDA kernels";
}
