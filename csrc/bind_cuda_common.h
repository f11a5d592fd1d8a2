// Helpers shared by the CUDA ops' torch bindings (header-only; the bindings are compiled in one TU).
#pragma once

#include <cuda_runtime_api.h>
#include <torch/extension.h>

namespace segformer_fast {

// The launchers' storage-type code: 0 float32, 1 float16, 2 bfloat16.
inline int cuda_dtype_code(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return 0;
    case at::kHalf:
      return 1;
    case at::kBFloat16:
      return 2;
    default:
      TORCH_CHECK(false, op, " (cuda): dtype must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return -1;
}

// A launcher's return value (a cudaError_t) turned into a torch error naming the op and the step.
inline void cuda_check_launch(int err, const char* op, const char* what) {
  TORCH_CHECK(err == 0, op, " (cuda): ", what, " failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

}  // namespace segformer_fast
