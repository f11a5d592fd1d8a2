// Torch binding of the upsample-and-sum CUDA kernels (header-only; included by csrc/bind_cuda.cpp).
#pragma once

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <vector>

#include "upsample_sum/upsample_sum.h"
#include "bind_cuda_common.h"

namespace segformer_fast {

inline void upsample_sum_cuda_check(const torch::Tensor& t, const torch::Tensor& like, const char* what) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device(), "upsample_sum (cuda): ", what, " must be on ", like.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "upsample_sum (cuda): ", what, " has dtype ", t.scalar_type(),
              ", expected ", like.scalar_type());
  TORCH_CHECK(t.dim() == 4 && t.is_contiguous(), "upsample_sum (cuda): ", what,
              " must be a contiguous (B, h, w, D) tensor, got shape ", t.sizes());
}

inline const float* upsample_sum_cuda_vec(const c10::optional<torch::Tensor>& t, const torch::Tensor& like, int64_t D,
                                          const char* what) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->device() == like.device() && t->scalar_type() == torch::kFloat32 && t->is_contiguous() && t->numel() == D,
              "upsample_sum (cuda): ", what, " must be a contiguous float32 tensor of ", D, " elements on ", like.device());
  return t->data_ptr<float>();
}

inline torch::Tensor upsample_sum_fwd_cuda_binding(const std::vector<torch::Tensor>& maps, int64_t H, int64_t W,
                                                   const c10::optional<torch::Tensor>& scale,
                                                   const c10::optional<torch::Tensor>& shift, bool relu) {
  TORCH_CHECK(!maps.empty() && maps.size() <= 4, "upsample_sum (cuda): needs 1 to 4 maps, got ", maps.size());
  const auto& m0 = maps[0];
  const int64_t B = m0.size(0), D = m0.size(3);
  std::vector<const void*> ptrs;
  std::vector<int64_t> hs, ws;
  for (const auto& m : maps) {
    upsample_sum_cuda_check(m, m0, "each map");
    TORCH_CHECK(m.size(0) == B && m.size(3) == D, "upsample_sum (cuda): maps disagree on B or D: ", m.sizes());
    ptrs.push_back(m.data_ptr());
    hs.push_back(m.size(1));
    ws.push_back(m.size(2));
  }
  const c10::cuda::CUDAGuard guard(m0.device());
  auto out = torch::empty({B, H, W, D}, m0.options());
  const int err = upsample_sum_fwd_cuda(out.data_ptr(), ptrs.data(), hs.data(), ws.data(), static_cast<int>(maps.size()),
                                        B, H, W, D, upsample_sum_cuda_vec(scale, m0, D, "scale"),
                                        upsample_sum_cuda_vec(shift, m0, D, "shift"), relu, cuda_dtype_code(m0, "upsample_sum"),
                                        c10::cuda::getCurrentCUDAStream().stream());
  cuda_check_launch(err, "upsample_sum", "forward launch");
  return out;
}

// Same contract as the CPU binding: returns [grad_map_i..., dscale?, dshift?], dscale/dshift fp32.
inline std::vector<torch::Tensor> upsample_sum_bwd_cuda_binding(const torch::Tensor& grad, const std::vector<int64_t>& sizes,
                                                                const std::vector<torch::Tensor>& maps,
                                                                const c10::optional<torch::Tensor>& out,
                                                                const c10::optional<torch::Tensor>& scale, bool relu,
                                                                bool need_dshift) {
  upsample_sum_cuda_check(grad, grad, "grad");
  TORCH_CHECK(!sizes.empty() && sizes.size() % 2 == 0 && sizes.size() <= 8,
              "upsample_sum (cuda): sizes must be [h0, w0, ...] for 1 to 4 maps");
  const int n = static_cast<int>(sizes.size() / 2);
  const int64_t B = grad.size(0), H = grad.size(1), W = grad.size(2), D = grad.size(3);
  const bool need_dscale = !maps.empty();
  TORCH_CHECK(!need_dscale || static_cast<int>(maps.size()) == n, "upsample_sum (cuda): maps and sizes disagree");
  const c10::cuda::CUDAGuard guard(grad.device());
  std::vector<int64_t> hs, ws;
  std::vector<const void*> map_ptrs;
  std::vector<void*> grad_ptrs;
  std::vector<torch::Tensor> result;
  for (int i = 0; i < n; ++i) {
    hs.push_back(sizes[2 * i]);
    ws.push_back(sizes[2 * i + 1]);
    if (need_dscale) {
      upsample_sum_cuda_check(maps[i], grad, "each map");
      TORCH_CHECK(maps[i].size(1) == hs[i] && maps[i].size(2) == ws[i], "upsample_sum (cuda): map ", i, " has shape ",
                  maps[i].sizes(), ", sizes say ", hs[i], "x", ws[i]);
      map_ptrs.push_back(maps[i].data_ptr());
    }
    result.push_back(torch::empty({B, hs[i], ws[i], D}, grad.options()));
    grad_ptrs.push_back(result.back().data_ptr());
  }
  const void* out_ptr = nullptr;
  if (relu) {
    TORCH_CHECK(out.has_value(), "upsample_sum (cuda): relu backward needs the forward output");
    upsample_sum_cuda_check(*out, grad, "out");
    out_ptr = out->data_ptr();
  }
  const float* scale_ptr = upsample_sum_cuda_vec(scale, grad, D, "scale");
  const auto f32 = grad.options().dtype(torch::kFloat32);
  torch::Tensor dscale, dshift, workspace;
  if (need_dscale) dscale = torch::empty({D}, f32);
  if (need_dshift) dshift = torch::empty({D}, f32);
  if (relu || scale_ptr || need_dscale || need_dshift) {
    workspace = torch::empty({upsample_sum_bwd_cuda_workspace(B, H, W, D)}, f32);
  }
  const int err = upsample_sum_bwd_cuda(
      grad_ptrs.data(), grad.data_ptr(), out_ptr, need_dscale ? map_ptrs.data() : nullptr, hs.data(), ws.data(), n, B, H,
      W, D, scale_ptr, relu, need_dscale ? dscale.data_ptr<float>() : nullptr,
      need_dshift ? dshift.data_ptr<float>() : nullptr, workspace.defined() ? workspace.data_ptr<float>() : nullptr,
      cuda_dtype_code(grad, "upsample_sum"), c10::cuda::getCurrentCUDAStream().stream());
  cuda_check_launch(err, "upsample_sum", "backward launch");
  if (need_dscale) result.push_back(dscale);
  if (need_dshift) result.push_back(dshift);
  return result;
}

}  // namespace segformer_fast

inline void register_upsample_sum(pybind11::module_& m) {
  m.def("upsample_sum_fwd", &segformer_fast::upsample_sum_fwd_cuda_binding, "upsample-and-sum forward (CUDA, NHWC)",
        pybind11::arg("maps"), pybind11::arg("H"), pybind11::arg("W"), pybind11::arg("scale"), pybind11::arg("shift"),
        pybind11::arg("relu"));
  m.def("upsample_sum_bwd", &segformer_fast::upsample_sum_bwd_cuda_binding, "upsample-and-sum backward (CUDA, NHWC)",
        pybind11::arg("grad"), pybind11::arg("sizes"), pybind11::arg("maps"), pybind11::arg("out"), pybind11::arg("scale"),
        pybind11::arg("relu"), pybind11::arg("need_dshift"));
}
