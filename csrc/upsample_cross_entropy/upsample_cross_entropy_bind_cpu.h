// Torch binding of the upsampled cross-entropy CPU kernels (header-only; included by csrc/bind_cpu.cpp).
#pragma once

#include <torch/extension.h>

#include <vector>

#include "upsample_cross_entropy/upsample_cross_entropy.h"

namespace segformer_fast {

inline void upsample_cross_entropy_check_cpu(const torch::Tensor& x, const torch::Tensor& labels) {
  TORCH_CHECK(x.device().is_cpu() && labels.device().is_cpu(), "upsample_cross_entropy (cpp): tensors must be on the CPU");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 4 && x.is_contiguous(),
              "upsample_cross_entropy (cpp): logits must be a contiguous float32 (B, h, w, K) tensor, got ",
              x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(labels.scalar_type() == torch::kInt64 && labels.dim() == 3 && labels.is_contiguous() &&
                  labels.size(0) == x.size(0),
              "upsample_cross_entropy (cpp): labels must be a contiguous int64 (B, H, W) tensor, got ",
              labels.scalar_type(), " ", labels.sizes());
}

inline void upsample_cross_entropy_check_pixels(const torch::Tensor& t, const torch::Tensor& labels, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.is_contiguous() &&
                  t.sizes() == labels.sizes(),
              "upsample_cross_entropy (cpp): ", what, " must be a contiguous float32 ", labels.sizes(), " tensor");
}

// x: (B, h, w, K) fp32; labels: (B, H, W) int64. Returns [nll, lse], both (B, H, W) fp32.
inline std::vector<torch::Tensor> upsample_cross_entropy_fwd_cpu_binding(const torch::Tensor& x,
                                                                         const torch::Tensor& labels,
                                                                         int64_t ignore_index) {
  upsample_cross_entropy_check_cpu(x, labels);
  auto nll = torch::empty(labels.sizes(), x.options());
  auto lse = torch::empty(labels.sizes(), x.options());
  upsample_cross_entropy_fwd_cpu(nll.data_ptr<float>(), lse.data_ptr<float>(), x.data_ptr<float>(),
                                 labels.data_ptr<int64_t>(), x.size(0), x.size(1), x.size(2), x.size(3),
                                 labels.size(1), labels.size(2), ignore_index);
  return {nll, lse};
}

// coef, lse: (B, H, W) fp32. Returns grad_x (B, h, w, K) fp32.
inline torch::Tensor upsample_cross_entropy_bwd_cpu_binding(const torch::Tensor& coef, const torch::Tensor& x,
                                                            const torch::Tensor& labels, const torch::Tensor& lse) {
  upsample_cross_entropy_check_cpu(x, labels);
  upsample_cross_entropy_check_pixels(coef, labels, "coef");
  upsample_cross_entropy_check_pixels(lse, labels, "lse");
  auto grad = torch::empty(x.sizes(), x.options());
  upsample_cross_entropy_bwd_cpu(grad.data_ptr<float>(), coef.data_ptr<float>(), x.data_ptr<float>(),
                                 labels.data_ptr<int64_t>(), lse.data_ptr<float>(), x.size(0), x.size(1), x.size(2),
                                 x.size(3), labels.size(1), labels.size(2));
  return grad;
}

}  // namespace segformer_fast

inline void register_upsample_cross_entropy(pybind11::module_& m) {
  m.def("upsample_cross_entropy_fwd", &segformer_fast::upsample_cross_entropy_fwd_cpu_binding,
        "upsampled cross-entropy forward (CPU, fp32, NHWC logits): [nll, lse]", pybind11::arg("x"),
        pybind11::arg("labels"), pybind11::arg("ignore_index"));
  m.def("upsample_cross_entropy_bwd", &segformer_fast::upsample_cross_entropy_bwd_cpu_binding,
        "upsampled cross-entropy backward (CPU, fp32, NHWC logits)", pybind11::arg("coef"), pybind11::arg("x"),
        pybind11::arg("labels"), pybind11::arg("lse"));
}
