// Torch binding of the CUDA dwconv3x3_gelu kernels (header-only; included by csrc/bind_cuda.cpp).
// Outputs are allocated by the Python caller (so debug mode can NaN-fill them); this file checks
// the tensors, converts the small weight / bias to fp32, allocates the backward's scratch through
// the caching allocator and calls the extern "C" launchers on the current stream.
#pragma once

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "dwconv3x3_gelu/dwconv3x3_gelu.h"
#include "bind_cuda_common.h"

namespace dwconv3x3_gelu_bind_cuda {

inline void check(const at::Tensor& t, const char* name, const at::Tensor& like, at::IntArrayRef shape) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device(), "dwconv3x3_gelu (cuda): ", name,
              " must be a CUDA tensor on ", like.device());
  TORCH_CHECK(t.is_contiguous(), "dwconv3x3_gelu (cuda): ", name, " must be contiguous");
  TORCH_CHECK(t.sizes() == shape, "dwconv3x3_gelu (cuda): ", name, " must have shape ", shape, ", got ", t.sizes());
}

// y = GELU(dwconv3x3(x) + bias); x, y (B, H*W, C) of one dtype, weight (C, 1, 3, 3), bias (C,).
inline void fwd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, at::Tensor& y, int64_t H,
                int64_t W, int64_t act) {
  TORCH_CHECK(x.dim() == 3 && x.size(1) == H * W, "dwconv3x3_gelu (cuda): x must be (B, H*W, C) with H*W = ",
              H * W, ", got ", x.sizes());
  const int64_t B = x.size(0), C = x.size(2);
  check(x, "x", x, x.sizes());
  check(y, "y", x, x.sizes());
  TORCH_CHECK(y.scalar_type() == x.scalar_type(), "dwconv3x3_gelu (cuda): y must have x's dtype");
  check(weight, "weight", x, {C, 1, 3, 3});
  check(bias, "bias", x, {C});
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor w32 = weight.to(at::kFloat).contiguous();
  const at::Tensor b32 = bias.to(at::kFloat).contiguous();
  const int err = dwconv3x3_gelu_fwd_cuda(x.data_ptr(), w32.data_ptr<float>(), b32.data_ptr<float>(), y.data_ptr(),
                                          B, H, W, C, segformer_fast::cuda_dtype_code(x, "dwconv3x3_gelu"), static_cast<int>(act),
                                          c10::cuda::getCurrentCUDAStream().stream());
  segformer_fast::cuda_check_launch(err, "dwconv3x3_gelu", "forward");
}

// Gradients of fwd, recomputing the conv from x. grad_weight / grad_bias are fp32.
inline void bwd(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                at::Tensor& grad_x, at::Tensor& grad_weight, at::Tensor& grad_bias, int64_t H, int64_t W,
                int64_t act) {
  TORCH_CHECK(x.dim() == 3 && x.size(1) == H * W, "dwconv3x3_gelu (cuda): x must be (B, H*W, C) with H*W = ",
              H * W, ", got ", x.sizes());
  const int64_t B = x.size(0), C = x.size(2);
  check(x, "x", x, x.sizes());
  check(grad_y, "grad_y", x, x.sizes());
  check(grad_x, "grad_x", x, x.sizes());
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type() && grad_x.scalar_type() == x.scalar_type(),
              "dwconv3x3_gelu (cuda): grad_y and grad_x must have x's dtype");
  check(weight, "weight", x, {C, 1, 3, 3});
  check(bias, "bias", x, {C});
  check(grad_weight, "grad_weight", x, {C, 1, 3, 3});
  check(grad_bias, "grad_bias", x, {C});
  TORCH_CHECK(grad_weight.scalar_type() == at::kFloat && grad_bias.scalar_type() == at::kFloat,
              "dwconv3x3_gelu (cuda): grad_weight and grad_bias must be float32");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor w32 = weight.to(at::kFloat).contiguous();
  const at::Tensor b32 = bias.to(at::kFloat).contiguous();
  at::Tensor workspace =
      at::empty({dwconv3x3_gelu_bwd_cuda_workspace(B, H, W, C)}, x.options().dtype(at::kByte));
  const int err = dwconv3x3_gelu_bwd_cuda(grad_y.data_ptr(), x.data_ptr(), w32.data_ptr<float>(),
                                          b32.data_ptr<float>(), grad_x.data_ptr(), grad_weight.data_ptr<float>(),
                                          grad_bias.data_ptr<float>(), workspace.data_ptr(), B, H, W, C,
                                          segformer_fast::cuda_dtype_code(x, "dwconv3x3_gelu"), static_cast<int>(act),
                                          c10::cuda::getCurrentCUDAStream().stream());
  segformer_fast::cuda_check_launch(err, "dwconv3x3_gelu", "backward");
}

}  // namespace dwconv3x3_gelu_bind_cuda

inline void register_dwconv3x3_gelu(pybind11::module_& m) {
  m.def("dwconv3x3_gelu_fwd", &dwconv3x3_gelu_bind_cuda::fwd,
        "GELU(depthwise 3x3 conv + bias) on (B, N, C) tokens (CUDA)", pybind11::arg("x"), pybind11::arg("weight"),
        pybind11::arg("bias"), pybind11::arg("y"), pybind11::arg("H"), pybind11::arg("W"), pybind11::arg("act"));
  m.def("dwconv3x3_gelu_bwd", &dwconv3x3_gelu_bind_cuda::bwd,
        "grads (x, weight, bias) of dwconv3x3_gelu, recomputing the conv (CUDA)", pybind11::arg("grad_y"),
        pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("bias"), pybind11::arg("grad_x"),
        pybind11::arg("grad_weight"), pybind11::arg("grad_bias"), pybind11::arg("H"), pybind11::arg("W"),
        pybind11::arg("act"));
}
