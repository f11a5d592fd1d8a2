// CPU kernels of the fused depthwise 3x3 conv + bias + GELU on (B, N, C) tokens, fp32, OpenMP.
//
// Tokens are channels-last, so for each output position the 9 taps are 9 contiguous rows of C
// floats; the inner loop runs over channels with no branches (a tap outside the image points at a
// row of zeros), so it vectorises. GELU (common/gelu.h) runs on branch-free erf / exp approximations
// (Abramowitz & Stegun 7.1.26 for erf, |error| < 1.5e-7; exp by range reduction and a degree-7
// polynomial), since std::erf / std::exp are not vectorised without -ffast-math.
// Parallel over rows (forward, grad_x) and over fixed blocks of rows (weight-gradient partials):
// the block partition depends on the shape only, so results do not depend on the thread count.
#include "dwconv3x3_gelu/dwconv3x3_gelu.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common/gelu.h"

namespace segformer_fast {
namespace {

constexpr int64_t kMaxBlocks = 128;  // weight-gradient partial blocks (fixed, shape-dependent only)
constexpr int64_t kParallelMin = 1 << 14;  // elements below which OpenMP is not worth starting

// GCC/Clang vector extensions: 4 fp32 lanes (one SSE register under x86-64-v2).
// The activation math is written on these types because a compiler will not if-convert the
// clamps of exp under the default -ftrapping-math, so the plain loop would stay scalar.
typedef float vf __attribute__((vector_size(16)));
typedef int32_t vi __attribute__((vector_size(16)));
constexpr int64_t kLanes = 4;

inline vf splat(float v) { return vf{} + v; }

inline vf load_v(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store_v(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }

inline vf exp_v(vf x_in) {
  vf x = x_in < splat(-87.0f) ? splat(-87.0f) : x_in;
  x = x > splat(88.0f) ? splat(88.0f) : x;
  const vf k = (x * 1.4426950408889634f + 12582912.0f) - 12582912.0f;  // round(x / ln 2) via 1.5 * 2^23
  const vf r = (x - k * 0.693145751953125f) - k * 1.428606765330187e-06f;  // ln 2 split in hi + lo
  vf p = splat(1.0f / 5040.0f);  // Taylor to r^7 on |r| <= ln(2) / 2: relative error < 3e-9
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const vi bits = (__builtin_convertvector(k, vi) + 127) << 23;  // 2^k
  vf scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  // 0 below -87 (an absolute error under 2e-38), so that GELU'(+-inf) = inf * exp(-inf) is NaN, as PyTorch's
  return x_in < splat(-87.0f) ? splat(0.0f) : p * scale;
}

inline vf erf_v(vf x) {
  vi xb;
  std::memcpy(&xb, &x, sizeof(xb));
  const vi sign = xb & static_cast<int32_t>(0x80000000u);
  const vi abs_bits = xb & 0x7fffffff;
  vf ax;
  std::memcpy(&ax, &abs_bits, sizeof(ax));
  const vf t = 1.0f / (1.0f + 0.3275911f * ax);
  vf p = splat(1.061405429f);
  p = p * t - 1.453152027f;
  p = p * t + 1.421413741f;
  p = p * t - 0.284496736f;
  p = p * t + 0.254829592f;
  const vf r = 1.0f - p * t * exp_v(-ax * ax);
  vi rb;
  std::memcpy(&rb, &r, sizeof(rb));
  rb |= sign;
  vf out;
  std::memcpy(&out, &rb, sizeof(out));
  return out;
}

inline vf tanh_v(vf u) { return 1.0f - 2.0f / (1.0f + exp_v(2.0f * u)); }

// The transcendental functions of common/gelu.h on 4 lanes.
struct VecMath {
  static vf erf(vf x) { return erf_v(x); }
  static vf exp(vf x) { return exp_v(x); }
  static vf tanh(vf x) { return tanh_v(x); }
};

template <int ACT>
inline vf act_fwd(vf z) {
  if constexpr (ACT == kActGeluErf) {
    return gelu_erf<VecMath>(z);
  } else if constexpr (ACT == kActGeluTanh) {
    return gelu_tanh<VecMath>(z);
  } else {
    return z;
  }
}

template <int ACT>
inline vf act_grad(vf z) {
  if constexpr (ACT == kActGeluErf) {
    return gelu_erf_grad<VecMath>(z);
  } else {
    return gelu_tanh_grad<VecMath>(z);
  }
}

// z[c] = ACT(z[c]) over one row of C channels, 8 lanes at a time (the tail through a padded copy).
template <int ACT>
inline void act_row(float* z, int64_t C) {
  int64_t c = 0;
  for (; c + kLanes <= C; c += kLanes) store_v(z + c, act_fwd<ACT>(load_v(z + c)));
  if (c < C) {
    float tmp[kLanes] = {};
    std::memcpy(tmp, z + c, (C - c) * sizeof(float));
    store_v(tmp, act_fwd<ACT>(load_v(tmp)));
    std::memcpy(z + c, tmp, (C - c) * sizeof(float));
  }
}

// gz[c] = gy[c] * ACT'(z[c]) over one row.
template <int ACT>
inline void grad_row(const float* z, const float* gy, float* gz, int64_t C) {
  int64_t c = 0;
  for (; c + kLanes <= C; c += kLanes) store_v(gz + c, load_v(gy + c) * act_grad<ACT>(load_v(z + c)));
  if (c < C) {
    float tz[kLanes] = {}, tg[kLanes] = {};
    std::memcpy(tz, z + c, (C - c) * sizeof(float));
    std::memcpy(tg, gy + c, (C - c) * sizeof(float));
    store_v(tg, load_v(tg) * act_grad<ACT>(load_v(tz)));
    std::memcpy(gz + c, tg, (C - c) * sizeof(float));
  }
}

// The 9 input rows (C floats each) feeding output position (b, h, w); zeros outside the image.
inline void gather_taps(const float* in, const float* zeros, int64_t b, int64_t h, int64_t w, int64_t H,
                        int64_t W, int64_t C, const float* taps[9]) {
  for (int i = 0; i < 3; ++i) {
    const int64_t hh = h + i - 1;
    for (int j = 0; j < 3; ++j) {
      const int64_t ww = w + j - 1;
      const bool ok = hh >= 0 && hh < H && ww >= 0 && ww < W;
      taps[i * 3 + j] = ok ? in + ((b * H + hh) * W + ww) * C : zeros;
    }
  }
}

// Weights (C, 1, 3, 3) -> tap-major (9, C), optionally flipped by 180 degrees (for grad_x).
std::vector<float> tap_major(const float* weight, int64_t C, bool flip) {
  std::vector<float> wt(9 * C);
  for (int64_t c = 0; c < C; ++c) {
    for (int k = 0; k < 9; ++k) wt[k * C + c] = weight[c * 9 + (flip ? 8 - k : k)];
  }
  return wt;
}

// One output position: out[c] = ACT(bias[c] + sum_k wt[k][c] * taps[k][c]).
template <int ACT>
inline void conv_point(const float* const taps[9], const float* __restrict__ wt, const float* __restrict__ bias,
                       float* __restrict__ out, int64_t C) {
  const float *__restrict__ p0 = taps[0], *__restrict__ p1 = taps[1], *__restrict__ p2 = taps[2];
  const float *__restrict__ p3 = taps[3], *__restrict__ p4 = taps[4], *__restrict__ p5 = taps[5];
  const float *__restrict__ p6 = taps[6], *__restrict__ p7 = taps[7], *__restrict__ p8 = taps[8];
  const float *__restrict__ w0 = wt, *__restrict__ w1 = wt + C, *__restrict__ w2 = wt + 2 * C;
  const float *__restrict__ w3 = wt + 3 * C, *__restrict__ w4 = wt + 4 * C, *__restrict__ w5 = wt + 5 * C;
  const float *__restrict__ w6 = wt + 6 * C, *__restrict__ w7 = wt + 7 * C, *__restrict__ w8 = wt + 8 * C;
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    float z = bias[c];
    z += w0[c] * p0[c] + w1[c] * p1[c] + w2[c] * p2[c];
    z += w3[c] * p3[c] + w4[c] * p4[c] + w5[c] * p5[c];
    z += w6[c] * p6[c] + w7[c] * p7[c] + w8[c] * p8[c];
    out[c] = z;
  }
  if constexpr (ACT != kActIdentity) act_row<ACT>(out, C);  // on the row just written, still in L1
}

// out = ACT(depthwise conv3x3(in) + bias) over all B * H rows.
template <int ACT>
void conv_all(const float* in, const float* wt, const float* bias, float* out, int64_t B, int64_t H, int64_t W,
              int64_t C) {
  const std::vector<float> zeros(C, 0.0f);
  const int64_t rows = B * H;
#pragma omp parallel for schedule(static) if (rows * W * C >= kParallelMin)
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t b = row / H, h = row % H;
    const float* taps[9];
    for (int64_t w = 0; w < W; ++w) {
      gather_taps(in, zeros.data(), b, h, w, H, W, C, taps);
      conv_point<ACT>(taps, wt, bias, out + (row * W + w) * C, C);
    }
  }
}

int64_t num_blocks(int64_t rows) { return std::min<int64_t>(rows, kMaxBlocks); }
int64_t rows_per_block(int64_t rows) { return (rows + num_blocks(rows) - 1) / num_blocks(rows); }

// gz = grad_y * ACT'(z) and per-block partial sums of gz * tap (9) and gz (bias), part (nblk, 10, C).
template <int ACT>
void grad_z(const float* grad_y, const float* x, const float* wt, const float* bias, float* gz, float* part,
            int64_t B, int64_t H, int64_t W, int64_t C) {
  const std::vector<float> zeros(C, 0.0f);
  const int64_t rows = B * H;
  const int64_t rpb = rows_per_block(rows);
  const int64_t nblk = (rows + rpb - 1) / rpb;
#pragma omp parallel for schedule(static) if (rows * W * C >= kParallelMin)
  for (int64_t blk = 0; blk < nblk; ++blk) {
    float* __restrict__ acc = part + blk * 10 * C;  // (10, C): taps 0..8, then bias
    std::vector<float> zbuf(C);
    std::fill(acc, acc + 10 * C, 0.0f);
    const float* taps[9];
    for (int64_t row = blk * rpb; row < std::min(rows, (blk + 1) * rpb); ++row) {
      const int64_t b = row / H, h = row % H;
      for (int64_t w = 0; w < W; ++w) {
        gather_taps(x, zeros.data(), b, h, w, H, W, C, taps);
        const int64_t off = (row * W + w) * C;
        conv_point<kActIdentity>(taps, wt, bias, zbuf.data(), C);  // z, recomputed
        float* __restrict__ g = gz + off;
        grad_row<ACT>(zbuf.data(), grad_y + off, g, C);
        const float *__restrict__ p0 = taps[0], *__restrict__ p1 = taps[1], *__restrict__ p2 = taps[2];
        const float *__restrict__ p3 = taps[3], *__restrict__ p4 = taps[4], *__restrict__ p5 = taps[5];
        const float *__restrict__ p6 = taps[6], *__restrict__ p7 = taps[7], *__restrict__ p8 = taps[8];
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const float gv = g[c];
          acc[c] += gv * p0[c];
          acc[C + c] += gv * p1[c];
          acc[2 * C + c] += gv * p2[c];
          acc[3 * C + c] += gv * p3[c];
          acc[4 * C + c] += gv * p4[c];
          acc[5 * C + c] += gv * p5[c];
          acc[6 * C + c] += gv * p6[c];
          acc[7 * C + c] += gv * p7[c];
          acc[8 * C + c] += gv * p8[c];
          acc[9 * C + c] += gv;
        }
      }
    }
  }
}

}  // namespace

void dwconv3x3_gelu_fwd_cpu(const float* x, const float* weight, const float* bias, float* y, int64_t B, int64_t H,
                            int64_t W, int64_t C, int act) {
  if (B * H * W * C == 0) return;
  const std::vector<float> wt = tap_major(weight, C, false);
  if (act == kActGeluTanh) {
    conv_all<kActGeluTanh>(x, wt.data(), bias, y, B, H, W, C);
  } else if (act == kActGeluErf) {
    conv_all<kActGeluErf>(x, wt.data(), bias, y, B, H, W, C);
  } else {
    conv_all<kActIdentity>(x, wt.data(), bias, y, B, H, W, C);
  }
}

int64_t dwconv3x3_gelu_bwd_cpu_workspace(int64_t B, int64_t H, int64_t W, int64_t C) {
  const int64_t rows = B * H;
  const int64_t nblk = rows > 0 ? (rows + rows_per_block(rows) - 1) / rows_per_block(rows) : 0;
  return B * H * W * C + nblk * 10 * C;
}

void dwconv3x3_gelu_bwd_cpu(const float* grad_y, const float* x, const float* weight, const float* bias,
                            float* grad_x, float* grad_weight, float* grad_bias, float* workspace, int64_t B,
                            int64_t H, int64_t W, int64_t C, int act) {
  const int64_t rows = B * H;
  if (rows * W == 0) {
    std::fill(grad_weight, grad_weight + 9 * C, 0.0f);
    std::fill(grad_bias, grad_bias + C, 0.0f);
    return;
  }
  float* gz = workspace;  // (B, N, C)
  float* part = workspace + B * H * W * C;  // (nblk, 10, C)
  const int64_t rpb = rows_per_block(rows);
  const int64_t nblk = (rows + rpb - 1) / rpb;
  const std::vector<float> wt = tap_major(weight, C, false);
  if (act == kActGeluTanh) {
    grad_z<kActGeluTanh>(grad_y, x, wt.data(), bias, gz, part, B, H, W, C);
  } else {
    grad_z<kActGeluErf>(grad_y, x, wt.data(), bias, gz, part, B, H, W, C);
  }
  // grad_x: transposed conv = conv with the kernel flipped, no bias, no activation.
  const std::vector<float> wflip = tap_major(weight, C, true);
  const std::vector<float> no_bias(C, 0.0f);
  conv_all<kActIdentity>(gz, wflip.data(), no_bias.data(), grad_x, B, H, W, C);
  // Fixed-order reduction of the partials: (10, C) sums, then to the (C, 1, 3, 3) / (C,) layouts.
  std::vector<float> sums(10 * C, 0.0f);
  for (int64_t blk = 0; blk < nblk; ++blk) {
    const float* __restrict__ p = part + blk * 10 * C;
    float* __restrict__ s = sums.data();
#pragma omp simd
    for (int64_t j = 0; j < 10 * C; ++j) s[j] += p[j];
  }
  for (int64_t c = 0; c < C; ++c) {
    for (int k = 0; k < 9; ++k) grad_weight[c * 9 + k] = sums[k * C + c];
    grad_bias[c] = sums[9 * C + c];
  }
}

}  // namespace segformer_fast
