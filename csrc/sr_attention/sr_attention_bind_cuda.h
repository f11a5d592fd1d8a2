// Torch binding of the spatial-reduction attention CUDA kernels (header-only; included by csrc/bind_cuda.cpp).
#pragma once

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <tuple>

#include "sr_attention/sr_attention.h"
#include "bind_cuda_common.h"

namespace segformer_fast {

inline void sr_attention_cuda_check(const torch::Tensor& t, const torch::Tensor& like, int64_t dim, const char* what) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device(), "sr_attention (cuda): ", what, " must be on ", like.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "sr_attention (cuda): ", what, " has dtype ", t.scalar_type(),
              ", expected ", like.scalar_type());
  TORCH_CHECK(t.dim() == dim && t.is_contiguous(), "sr_attention (cuda): ", what, " must be a contiguous ", dim,
              "-d tensor, got shape ", t.sizes());
}

// x (B, H*W, C) -> patches (B, (H/sr)*(W/sr), sr*sr*C).
inline torch::Tensor sr_attention_patchify_binding(const torch::Tensor& x, int64_t H, int64_t W, int64_t sr) {
  sr_attention_cuda_check(x, x, 3, "x");
  TORCH_CHECK(sr >= 1 && H >= sr && W >= sr && x.size(1) == H * W, "sr_attention (cuda): x ", x.sizes(),
              " does not fit H=", H, " W=", W, " sr=", sr);
  const int64_t B = x.size(0), C = x.size(2), M = (H / sr) * (W / sr);
  const c10::cuda::CUDAGuard guard(x.device());
  auto patches = torch::empty({B, M, sr * sr * C}, x.options());
  cuda_check_launch(sr_attention_patchify_cuda(patches.data_ptr(), x.data_ptr(), B, H, W, C, sr,
                                                  cuda_dtype_code(x, "sr_attention"), c10::cuda::getCurrentCUDAStream().stream()), "sr_attention",
                       "patchify");
  return patches;
}

// dx (B, H*W, C) += unpatchify(dpatches (B, M, sr*sr*C)), in place (dx is a handle: its storage is written).
inline void sr_attention_unpatchify_add_binding(torch::Tensor dx, const torch::Tensor& dpatches, int64_t H, int64_t W,
                                                int64_t sr) {
  sr_attention_cuda_check(dx, dx, 3, "dx");
  sr_attention_cuda_check(dpatches, dx, 3, "dpatches");
  const int64_t B = dx.size(0), C = dx.size(2), M = (H / sr) * (W / sr);
  TORCH_CHECK(sr >= 1 && dx.size(1) == H * W && dpatches.size(0) == B && dpatches.size(1) == M &&
                  dpatches.size(2) == sr * sr * C,
              "sr_attention (cuda): dx ", dx.sizes(), " and dpatches ", dpatches.sizes(), " do not fit H=", H, " W=", W,
              " sr=", sr);
  const c10::cuda::CUDAGuard guard(dx.device());
  cuda_check_launch(sr_attention_unpatchify_add_cuda(dx.data_ptr(), dpatches.data_ptr(), B, H, W, C, sr,
                                                        cuda_dtype_code(dx, "sr_attention"),
                                                        c10::cuda::getCurrentCUDAStream().stream()), "sr_attention",
                       "unpatchify_add");
}

inline torch::Tensor sr_attention_f32_vec(const c10::optional<torch::Tensor>& t, const torch::Tensor& like, int64_t C,
                                          const char* what) {
  if (!t.has_value()) return torch::Tensor();
  TORCH_CHECK(t->device() == like.device() && t->numel() == C, "sr_attention (cuda): ", what, " must have ", C,
              " elements on ", like.device());
  return t->to(torch::kFloat32).contiguous();
}

// r (B, M, C) -> (LayerNorm(r + bias) * weight + beta, mean (B, M) fp32, rstd (B, M) fp32).
inline std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> sr_attention_bias_ln_fwd_binding(
    const torch::Tensor& r, const c10::optional<torch::Tensor>& bias, const torch::Tensor& weight,
    const torch::Tensor& beta, double eps) {
  sr_attention_cuda_check(r, r, 3, "r");
  const int64_t C = r.size(2), R = r.size(0) * r.size(1);
  sr_attention_cuda_check(weight, r, 1, "norm weight");
  sr_attention_cuda_check(beta, r, 1, "norm bias");
  TORCH_CHECK(weight.numel() == C && beta.numel() == C, "sr_attention (cuda): norm affine must have ", C, " elements");
  const c10::cuda::CUDAGuard guard(r.device());
  const auto b32 = sr_attention_f32_vec(bias, r, C, "conv bias");
  auto y = torch::empty_like(r);
  const auto f32 = r.options().dtype(torch::kFloat32);
  auto mean = torch::empty({r.size(0), r.size(1)}, f32);
  auto rstd = torch::empty({r.size(0), r.size(1)}, f32);
  cuda_check_launch(sr_attention_bias_ln_fwd_cuda(y.data_ptr(), mean.data_ptr<float>(), rstd.data_ptr<float>(),
                                                     r.data_ptr(), b32.defined() ? b32.data_ptr() : nullptr,
                                                     weight.data_ptr(), beta.data_ptr(), R, C, static_cast<float>(eps),
                                                     cuda_dtype_code(r, "sr_attention"),
                                                     c10::cuda::getCurrentCUDAStream().stream()), "sr_attention",
                       "bias_ln forward");
  return {y, mean, rstd};
}

// Returns (dr (B, M, C), dweight, dbeta, dbias), the last three (C,) fp32.
inline std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor> sr_attention_bias_ln_bwd_binding(
    const torch::Tensor& dy, const torch::Tensor& r, const c10::optional<torch::Tensor>& bias,
    const torch::Tensor& weight, const torch::Tensor& mean, const torch::Tensor& rstd) {
  sr_attention_cuda_check(r, r, 3, "r");
  sr_attention_cuda_check(dy, r, 3, "dy");
  TORCH_CHECK(dy.sizes() == r.sizes(), "sr_attention (cuda): dy ", dy.sizes(), " and r ", r.sizes(), " differ");
  const int64_t C = r.size(2), R = r.size(0) * r.size(1);
  sr_attention_cuda_check(weight, r, 1, "norm weight");
  TORCH_CHECK(weight.numel() == C, "sr_attention (cuda): norm weight must have ", C, " elements");
  for (const auto* t : {&mean, &rstd}) {
    TORCH_CHECK(t->is_cuda() && t->device() == r.device() && t->scalar_type() == torch::kFloat32 &&
                    t->is_contiguous() && t->numel() == R,
                "sr_attention (cuda): mean/rstd must be contiguous float32 with ", R, " elements");
  }
  const c10::cuda::CUDAGuard guard(r.device());
  const auto b32 = sr_attention_f32_vec(bias, r, C, "conv bias");
  auto dr = torch::empty_like(r);
  const auto f32 = r.options().dtype(torch::kFloat32);
  auto dweight = torch::empty({C}, f32), dbeta = torch::empty({C}, f32), dbias = torch::empty({C}, f32);
  cuda_check_launch(sr_attention_bias_ln_bwd_cuda(dr.data_ptr(), dweight.data_ptr<float>(), dbeta.data_ptr<float>(),
                                    dbias.data_ptr<float>(), dy.data_ptr(), r.data_ptr(),
                                    b32.defined() ? b32.data_ptr() : nullptr, weight.data_ptr(),
                                    mean.data_ptr<float>(), rstd.data_ptr<float>(), R, C, cuda_dtype_code(r, "sr_attention"),
                                    c10::cuda::getCurrentCUDAStream().stream()), "sr_attention",
      "bias_ln backward");
  return {dr, dweight, dbeta, dbias};
}

}  // namespace segformer_fast

inline void register_sr_attention(pybind11::module_& m) {
  m.def("sr_attention_patchify", &segformer_fast::sr_attention_patchify_binding,
        "tokens (B, H*W, C) -> sr x sr patches (B, M, sr*sr*C) (CUDA)", pybind11::arg("x"), pybind11::arg("H"),
        pybind11::arg("W"), pybind11::arg("sr"));
  m.def("sr_attention_unpatchify_add", &segformer_fast::sr_attention_unpatchify_add_binding,
        "dx += adjoint of patchify(dpatches), in place (CUDA)", pybind11::arg("dx"), pybind11::arg("dpatches"),
        pybind11::arg("H"), pybind11::arg("W"), pybind11::arg("sr"));
  m.def("sr_attention_bias_ln_fwd", &segformer_fast::sr_attention_bias_ln_fwd_binding,
        "LayerNorm(r + bias) -> (y, mean, rstd) (CUDA)", pybind11::arg("r"), pybind11::arg("bias"),
        pybind11::arg("weight"), pybind11::arg("beta"), pybind11::arg("eps"));
  m.def("sr_attention_bias_ln_bwd", &segformer_fast::sr_attention_bias_ln_bwd_binding,
        "backward of bias + LayerNorm -> (dr, dweight, dbeta, dbias) (CUDA)", pybind11::arg("dy"), pybind11::arg("r"),
        pybind11::arg("bias"), pybind11::arg("weight"), pybind11::arg("mean"), pybind11::arg("rstd"));
}
