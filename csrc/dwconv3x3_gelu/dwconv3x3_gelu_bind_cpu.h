// Torch binding of the CPU dwconv3x3_gelu kernels (header-only; included by csrc/bind_cpu.cpp).
// Outputs are allocated by the Python caller (so debug mode can NaN-fill them); this file checks
// the tensors and hands raw pointers to the plain C++ kernels.
#pragma once

#include <torch/extension.h>

#include "dwconv3x3_gelu/dwconv3x3_gelu.h"

namespace dwconv3x3_gelu_bind {

inline void check_f32(const at::Tensor& t, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK(t.device().is_cpu(), "dwconv3x3_gelu (cpp): ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat, "dwconv3x3_gelu (cpp): ", name, " must be float32, got ",
              t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "dwconv3x3_gelu (cpp): ", name, " must be contiguous");
  TORCH_CHECK(t.sizes() == shape, "dwconv3x3_gelu (cpp): ", name, " must have shape ", shape, ", got ", t.sizes());
}

inline void check_act(int64_t act) {
  TORCH_CHECK(act == segformer_fast::kActGeluErf || act == segformer_fast::kActGeluTanh,
              "dwconv3x3_gelu (cpp): act must be 1 (erf GELU) or 2 (tanh GELU), got ", act);
}

// y = GELU(dwconv3x3(x) + bias); x, y (B, H*W, C), weight (C, 1, 3, 3), bias (C,), all fp32.
inline void fwd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, at::Tensor& y, int64_t H,
                int64_t W, int64_t act) {
  TORCH_CHECK(x.dim() == 3 && x.size(1) == H * W, "dwconv3x3_gelu (cpp): x must be (B, H*W, C) with H*W = ",
              H * W, ", got ", x.sizes());
  const int64_t B = x.size(0), C = x.size(2);
  check_f32(x, "x", x.sizes());
  check_f32(weight, "weight", {C, 1, 3, 3});
  check_f32(bias, "bias", {C});
  check_f32(y, "y", x.sizes());
  check_act(act);
  segformer_fast::dwconv3x3_gelu_fwd_cpu(x.data_ptr<float>(), weight.data_ptr<float>(), bias.data_ptr<float>(),
                                         y.data_ptr<float>(), B, H, W, C, static_cast<int>(act));
}

// Gradients of fwd, recomputing the conv from x; written into grad_x, grad_weight, grad_bias.
inline void bwd(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                at::Tensor& grad_x, at::Tensor& grad_weight, at::Tensor& grad_bias, int64_t H, int64_t W,
                int64_t act) {
  TORCH_CHECK(x.dim() == 3 && x.size(1) == H * W, "dwconv3x3_gelu (cpp): x must be (B, H*W, C) with H*W = ",
              H * W, ", got ", x.sizes());
  const int64_t B = x.size(0), C = x.size(2);
  check_f32(x, "x", x.sizes());
  check_f32(grad_y, "grad_y", x.sizes());
  check_f32(weight, "weight", {C, 1, 3, 3});
  check_f32(bias, "bias", {C});
  check_f32(grad_x, "grad_x", x.sizes());
  check_f32(grad_weight, "grad_weight", {C, 1, 3, 3});
  check_f32(grad_bias, "grad_bias", {C});
  check_act(act);
  at::Tensor workspace = at::empty({segformer_fast::dwconv3x3_gelu_bwd_cpu_workspace(B, H, W, C)}, x.options());
  segformer_fast::dwconv3x3_gelu_bwd_cpu(grad_y.data_ptr<float>(), x.data_ptr<float>(), weight.data_ptr<float>(),
                                         bias.data_ptr<float>(), grad_x.data_ptr<float>(),
                                         grad_weight.data_ptr<float>(), grad_bias.data_ptr<float>(),
                                         workspace.data_ptr<float>(), B, H, W, C, static_cast<int>(act));
}

}  // namespace dwconv3x3_gelu_bind

inline void register_dwconv3x3_gelu(pybind11::module_& m) {
  m.def("dwconv3x3_gelu_fwd", &dwconv3x3_gelu_bind::fwd, "GELU(depthwise 3x3 conv + bias) on (B, N, C) tokens (CPU)",
        pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("bias"), pybind11::arg("y"), pybind11::arg("H"),
        pybind11::arg("W"), pybind11::arg("act"));
  m.def("dwconv3x3_gelu_bwd", &dwconv3x3_gelu_bind::bwd,
        "grads (x, weight, bias) of dwconv3x3_gelu, recomputing the conv (CPU)", pybind11::arg("grad_y"),
        pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("bias"), pybind11::arg("grad_x"),
        pybind11::arg("grad_weight"), pybind11::arg("grad_bias"), pybind11::arg("H"), pybind11::arg("W"),
        pybind11::arg("act"));
}
