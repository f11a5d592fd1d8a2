// PyTorch's bilinear source index (upsample_bilinear2d, align_corners=False), for the CUDA and the
// CPU kernels alike (no torch headers).
//
// With scale = n_in / n_out in fp32, output index o reads src = max(scale * (o + 0.5) - 0.5, 0):
// the taps i0 = floor(src) and i1 = i0 + (i0 < n_in - 1) (the +1 neighbour clamped at the edge),
// with weights 1 - l1 and l1 = src - i0 (clamped to [0, 1]). A 2-D sample is the product of a row
// tap and a column tap. The adjoint (the gradient of the input) is a gather over the window of
// output indices that read each input index: bilinear_first_reader and bilinear_window bound it,
// bilinear_weight gives each weight exactly.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/host_device.h"

namespace segformer_fast {

struct BilinearTap {
  int64_t i0, i1;  // the two input indices read (equal at the last input index)
  float l1;        // the weight of i1; that of i0 is 1 - l1
};

// PyTorch's scale: in / out, in fp32.
SF_HOST_DEVICE SF_INLINE float bilinear_scale(int64_t n_in, int64_t n_out) {
  return static_cast<float>(n_in) / static_cast<float>(n_out);
}

SF_HOST_DEVICE SF_INLINE BilinearTap bilinear_tap(int64_t o, float scale, int64_t n_in) {
  float src = scale * (static_cast<float>(o) + 0.5f) - 0.5f;
  src = src < 0.f ? 0.f : src;
  const int64_t i0 = static_cast<int64_t>(src);  // floor: src >= 0
  float l1 = src - static_cast<float>(i0);
  l1 = l1 < 0.f ? 0.f : l1;
  l1 = 1.f < l1 ? 1.f : l1;
  return {i0, i0 + (i0 < n_in - 1 ? 1 : 0), l1};
}

// The weight with which output index o reads input index i (0 when it does not).
SF_HOST_DEVICE SF_INLINE float bilinear_weight(int64_t o, int64_t i, float scale, int64_t n_in) {
  const BilinearTap t = bilinear_tap(o, scale, n_in);
  return (t.i0 == i ? 1.f - t.l1 : 0.f) + (t.i1 == i ? t.l1 : 0.f);
}

// A lower bound of the output indices that read input index i: src(o) >= i - 1 <=> o >= (i - 0.5) /
// scale - 0.5, less one index of margin (the weights are recomputed exactly), at least 0.
SF_HOST_DEVICE SF_INLINE int64_t bilinear_first_reader(int64_t i, float scale) {
  const int64_t lo = static_cast<int64_t>(floorf((static_cast<float>(i) - 0.5f) / scale - 0.5f)) - 1;
  return lo < 0 ? 0 : lo;
}

// How many output indices from bilinear_first_reader(i) on can read input index i: those reading
// one input index lie in a run of at most 2 / scale + 2, plus the margin; at most the whole axis.
SF_HOST_DEVICE SF_INLINE int64_t bilinear_window(int64_t n_in, int64_t n_out) {
  const int64_t run = (2 * n_out + n_in - 1) / n_in + 4;
  return run < n_out ? run : n_out;
}

}  // namespace segformer_fast
