// Torch binding of the upsampled cross-entropy CUDA kernels (header-only; included by csrc/bind_cuda.cpp).
#pragma once

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <vector>

#include "upsample_cross_entropy/upsample_cross_entropy.h"
#include "bind_cuda_common.h"

namespace segformer_fast {

inline int upsample_cross_entropy_cuda_check(const torch::Tensor& x, const torch::Tensor& labels) {
  TORCH_CHECK(x.is_cuda() && labels.device() == x.device(), "upsample_cross_entropy (cuda): logits and labels must be on one CUDA device");
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(), "upsample_cross_entropy (cuda): logits must be a contiguous (B, h, w, K) tensor, got ",
              x.sizes());
  TORCH_CHECK(labels.scalar_type() == torch::kInt64 && labels.dim() == 3 && labels.is_contiguous() &&
                  labels.size(0) == x.size(0),
              "upsample_cross_entropy (cuda): labels must be a contiguous int64 (B, H, W) tensor, got ",
              labels.scalar_type(), " ", labels.sizes());
  return cuda_dtype_code(x, "upsample_cross_entropy");
}

inline void upsample_cross_entropy_cuda_check_pixels(const torch::Tensor& t, const torch::Tensor& labels, const char* what) {
  TORCH_CHECK(t.device() == labels.device() && t.scalar_type() == torch::kFloat32 && t.is_contiguous() &&
                  t.sizes() == labels.sizes(),
              "upsample_cross_entropy (cuda): ", what, " must be a contiguous float32 ", labels.sizes(), " tensor on ",
              labels.device());
}

// x: (B, h, w, K); labels: (B, H, W) int64. Returns [nll, lse], both (B, H, W) fp32.
inline std::vector<torch::Tensor> upsample_cross_entropy_fwd_cuda_binding(const torch::Tensor& x,
                                                                          const torch::Tensor& labels,
                                                                          int64_t ignore_index) {
  const int dtype = upsample_cross_entropy_cuda_check(x, labels);
  const c10::cuda::CUDAGuard guard(x.device());
  auto opts = x.options().dtype(torch::kFloat32);
  auto nll = torch::empty(labels.sizes(), opts);
  auto lse = torch::empty(labels.sizes(), opts);
  const int err = upsample_cross_entropy_fwd_cuda(
      nll.data_ptr<float>(), lse.data_ptr<float>(), x.data_ptr(), labels.data_ptr<int64_t>(), x.size(0), x.size(1),
      x.size(2), x.size(3), labels.size(1), labels.size(2), ignore_index, dtype, c10::cuda::getCurrentCUDAStream().stream());
  cuda_check_launch(err, "upsample_cross_entropy", "forward launch");
  return {nll, lse};
}

// coef, lse: (B, H, W) fp32. Returns grad_x (B, h, w, K) in x's dtype.
inline torch::Tensor upsample_cross_entropy_bwd_cuda_binding(const torch::Tensor& coef, const torch::Tensor& x,
                                                             const torch::Tensor& labels, const torch::Tensor& lse) {
  const int dtype = upsample_cross_entropy_cuda_check(x, labels);
  upsample_cross_entropy_cuda_check_pixels(coef, labels, "coef");
  upsample_cross_entropy_cuda_check_pixels(lse, labels, "lse");
  const c10::cuda::CUDAGuard guard(x.device());
  auto grad = torch::empty(x.sizes(), x.options());
  const int err = upsample_cross_entropy_bwd_cuda(
      grad.data_ptr(), coef.data_ptr<float>(), x.data_ptr(), labels.data_ptr<int64_t>(), lse.data_ptr<float>(), x.size(0),
      x.size(1), x.size(2), x.size(3), labels.size(1), labels.size(2), dtype, c10::cuda::getCurrentCUDAStream().stream());
  cuda_check_launch(err, "upsample_cross_entropy", "backward launch");
  return grad;
}

}  // namespace segformer_fast

inline void register_upsample_cross_entropy(pybind11::module_& m) {
  m.def("upsample_cross_entropy_fwd", &segformer_fast::upsample_cross_entropy_fwd_cuda_binding,
        "upsampled cross-entropy forward (CUDA, NHWC logits): [nll, lse]", pybind11::arg("x"), pybind11::arg("labels"),
        pybind11::arg("ignore_index"));
  m.def("upsample_cross_entropy_bwd", &segformer_fast::upsample_cross_entropy_bwd_cuda_binding,
        "upsampled cross-entropy backward (CUDA, NHWC logits)", pybind11::arg("coef"), pybind11::arg("x"),
        pybind11::arg("labels"), pybind11::arg("lse"));
}
