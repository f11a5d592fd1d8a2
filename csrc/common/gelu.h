// GELU, erf and tanh forms, and their derivatives, for the CUDA and the CPU kernels alike.
//
// Templates on the value type V (float, or a GCC vector of floats) and on Math, which supplies the
// transcendental functions: static V erf(V), exp(V), tanh(V). LibmMath is the C library's (on the
// GPU, CUDA's erff / expf / tanhf); the CPU kernels pass their vectorised approximations.
//
//   erf form:   GELU(z) = z Phi(z) = 0.5 z (1 + erf(z / sqrt 2)),   GELU'(z) = Phi(z) + z phi(z),
//               phi(z) = exp(-z^2 / 2) / sqrt(2 pi)
//   tanh form:  GELU(z) = 0.5 z (1 + tanh(u)),   u = sqrt(2 / pi) (z + 0.044715 z^3),
//               GELU'(z) = 0.5 (1 + t) + 0.5 z (1 - t^2) du/dz,   t = tanh(u),
//               du/dz = sqrt(2 / pi) (1 + 0.134145 z^2)        (0.134145 = 3 * 0.044715)
// Constants: 0.7071067811865476 = 1 / sqrt 2, 0.7978845608028654 = sqrt(2 / pi),
// 0.3989422804014327 = 1 / sqrt(2 pi).
// fp16 safety: V is float for every storage dtype (16-bit values are converted before the call):
// 0.044715 z^3 would pass fp16's 65504 at |z| ~ 114, and GELU'(z)'s products sooner.
#pragma once

#include <cmath>

#include "common/host_device.h"

namespace segformer_fast {

struct LibmMath {
  static SF_HOST_DEVICE SF_INLINE float erf(float x) { return erff(x); }
  static SF_HOST_DEVICE SF_INLINE float exp(float x) { return expf(x); }
  static SF_HOST_DEVICE SF_INLINE float tanh(float x) { return tanhf(x); }
};

template <typename Math, typename V>
SF_HOST_DEVICE SF_INLINE V gelu_erf(V z) {
  return 0.5f * z * (1.0f + Math::erf(z * 0.7071067811865476f));
}

template <typename Math, typename V>
SF_HOST_DEVICE SF_INLINE V gelu_tanh(V z) {
  return 0.5f * z * (1.0f + Math::tanh(0.7978845608028654f * (z + 0.044715f * z * z * z)));
}

template <typename Math, typename V>
SF_HOST_DEVICE SF_INLINE V gelu_erf_grad(V z) {
  const V cdf = 0.5f * (1.0f + Math::erf(z * 0.7071067811865476f));
  return cdf + z * 0.3989422804014327f * Math::exp(-0.5f * z * z);
}

template <typename Math, typename V>
SF_HOST_DEVICE SF_INLINE V gelu_tanh_grad(V z) {
  const V t = Math::tanh(0.7978845608028654f * (z + 0.044715f * z * z * z));
  const V du = 0.7978845608028654f * (1.0f + 0.134145f * z * z);
  return 0.5f * (1.0f + t) + 0.5f * z * (1.0f - t * t) * du;
}

}  // namespace segformer_fast
