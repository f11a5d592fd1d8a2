// Torch binding of the upsample-and-sum CPU kernels (header-only; included by csrc/bind_cpu.cpp).
#pragma once

#include <torch/extension.h>

#include <vector>

#include "upsample_sum/upsample_sum.h"

namespace segformer_fast {

inline void upsample_sum_check_nhwc(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), "upsample_sum (cpp): ", what, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == torch::kFloat32, "upsample_sum (cpp): ", what, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 4 && t.is_contiguous(), "upsample_sum (cpp): ", what,
              " must be a contiguous (B, h, w, D) tensor, got shape ", t.sizes());
}

inline const float* upsample_sum_vec(const c10::optional<torch::Tensor>& t, int64_t D, const char* what) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == torch::kFloat32 && t->is_contiguous() && t->numel() == D,
              "upsample_sum (cpp): ", what, " must be a contiguous float32 CPU tensor of ", D, " elements");
  return t->data_ptr<float>();
}

// maps: (B, h_i, w_i, D) contiguous fp32. Returns (B, H, W, D).
inline torch::Tensor upsample_sum_fwd_cpu_binding(const std::vector<torch::Tensor>& maps, int64_t H, int64_t W,
                                                  const c10::optional<torch::Tensor>& scale,
                                                  const c10::optional<torch::Tensor>& shift, bool relu) {
  TORCH_CHECK(!maps.empty(), "upsample_sum (cpp): needs at least one map");
  const int64_t B = maps[0].size(0), D = maps[0].size(3);
  std::vector<const float*> ptrs;
  std::vector<int64_t> hs, ws;
  for (const auto& m : maps) {
    upsample_sum_check_nhwc(m, "each map");
    TORCH_CHECK(m.size(0) == B && m.size(3) == D, "upsample_sum (cpp): maps disagree on B or D: ", m.sizes());
    ptrs.push_back(m.data_ptr<float>());
    hs.push_back(m.size(1));
    ws.push_back(m.size(2));
  }
  auto out = torch::empty({B, H, W, D}, maps[0].options());
  upsample_sum_fwd_cpu(out.data_ptr<float>(), ptrs.data(), hs.data(), ws.data(), static_cast<int>(maps.size()), B, H, W,
                       D, upsample_sum_vec(scale, D, "scale"), upsample_sum_vec(shift, D, "shift"), relu);
  return out;
}

// grad: (B, H, W, D). sizes: [h0, w0, h1, w1, ...]. maps: empty, or the forward maps when dscale is
// needed. out: the forward output (read when relu). Returns [grad_map_i..., dscale?, dshift?].
inline std::vector<torch::Tensor> upsample_sum_bwd_cpu_binding(const torch::Tensor& grad, const std::vector<int64_t>& sizes,
                                                               const std::vector<torch::Tensor>& maps,
                                                               const c10::optional<torch::Tensor>& out,
                                                               const c10::optional<torch::Tensor>& scale, bool relu,
                                                               bool need_dshift) {
  upsample_sum_check_nhwc(grad, "grad");
  TORCH_CHECK(sizes.size() % 2 == 0 && !sizes.empty(), "upsample_sum (cpp): sizes must be [h0, w0, h1, w1, ...]");
  const int n = static_cast<int>(sizes.size() / 2);
  const int64_t B = grad.size(0), H = grad.size(1), W = grad.size(2), D = grad.size(3);
  const bool need_dscale = !maps.empty();
  TORCH_CHECK(!need_dscale || static_cast<int>(maps.size()) == n, "upsample_sum (cpp): maps and sizes disagree");
  std::vector<int64_t> hs, ws;
  std::vector<const float*> map_ptrs;
  std::vector<float*> grad_ptrs;
  std::vector<torch::Tensor> result;
  for (int i = 0; i < n; ++i) {
    hs.push_back(sizes[2 * i]);
    ws.push_back(sizes[2 * i + 1]);
    if (need_dscale) {
      upsample_sum_check_nhwc(maps[i], "each map");
      TORCH_CHECK(maps[i].size(1) == hs[i] && maps[i].size(2) == ws[i], "upsample_sum (cpp): map ", i, " has shape ",
                  maps[i].sizes(), ", sizes say ", hs[i], "x", ws[i]);
      map_ptrs.push_back(maps[i].data_ptr<float>());
    }
    result.push_back(torch::empty({B, hs[i], ws[i], D}, grad.options()));
    grad_ptrs.push_back(result.back().data_ptr<float>());
  }
  const float* out_ptr = nullptr;
  if (relu) {
    TORCH_CHECK(out.has_value(), "upsample_sum (cpp): relu backward needs the forward output");
    upsample_sum_check_nhwc(*out, "out");
    TORCH_CHECK(out->sizes() == grad.sizes(), "upsample_sum (cpp): out ", out->sizes(), " vs grad ", grad.sizes());
    out_ptr = out->data_ptr<float>();
  }
  torch::Tensor dscale, dshift;
  if (need_dscale) dscale = torch::empty({D}, grad.options());
  if (need_dshift) dshift = torch::empty({D}, grad.options());
  upsample_sum_bwd_cpu(grad_ptrs.data(), grad.data_ptr<float>(), out_ptr, need_dscale ? map_ptrs.data() : nullptr,
                       hs.data(), ws.data(), n, B, H, W, D, upsample_sum_vec(scale, D, "scale"), relu,
                       need_dscale ? dscale.data_ptr<float>() : nullptr, need_dshift ? dshift.data_ptr<float>() : nullptr);
  if (need_dscale) result.push_back(dscale);
  if (need_dshift) result.push_back(dshift);
  return result;
}

}  // namespace segformer_fast

inline void register_upsample_sum(pybind11::module_& m) {
  m.def("upsample_sum_fwd", &segformer_fast::upsample_sum_fwd_cpu_binding, "upsample-and-sum forward (CPU, fp32, NHWC)",
        pybind11::arg("maps"), pybind11::arg("H"), pybind11::arg("W"), pybind11::arg("scale"), pybind11::arg("shift"),
        pybind11::arg("relu"));
  m.def("upsample_sum_bwd", &segformer_fast::upsample_sum_bwd_cpu_binding, "upsample-and-sum backward (CPU, fp32, NHWC)",
        pybind11::arg("grad"), pybind11::arg("sizes"), pybind11::arg("maps"), pybind11::arg("out"), pybind11::arg("scale"),
        pybind11::arg("relu"), pybind11::arg("need_dshift"));
}
