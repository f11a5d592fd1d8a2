// Upsample-and-sum, CPU kernels (plain C++ + OpenMP, fp32, channels-last). See upsample_sum.h.
//
// Forward: rows of the (B, H, W, D) output are split over threads; each output pixel sums the
// 4-tap bilinear gather of every map into its D-vector (which stays in L1), then applies the
// affine and ReLU, so the output is written once. Backward: a prep pass masks and scales the
// gradient and keeps per-row partial sums for dscale/dshift (reduced in a fixed order, so the
// result does not depend on the thread count); the adjoint of each map's upsampling is then a
// gather: one low-resolution row first contracts the output rows that read it into a (W, D)
// buffer, then each of its pixels contracts the columns that read it. No atomics.
#include "upsample_sum/upsample_sum.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#include "common/bilinear.h"

namespace segformer_fast {
namespace {

// PyTorch's upsample_bilinear2d index rule (align_corners=False, common/bilinear.h), tabulated.
struct Taps {
  std::vector<int64_t> i0, i1;
  std::vector<float> l0, l1;
  bool identity = false;
};

Taps make_taps(int64_t n_in, int64_t n_out) {
  Taps t;
  t.i0.resize(n_out);
  t.i1.resize(n_out);
  t.l0.resize(n_out);
  t.l1.resize(n_out);
  t.identity = n_in == n_out;
  const float scale = bilinear_scale(n_in, n_out);
  for (int64_t o = 0; o < n_out; ++o) {
    const BilinearTap tap = bilinear_tap(o, scale, n_in);
    t.i0[o] = tap.i0;
    t.i1[o] = tap.i1;
    t.l1[o] = tap.l1;
    t.l0[o] = 1.f - tap.l1;
  }
  return t;
}

// For each input index, the (output index, weight) pairs that read it; zero weights dropped.
std::vector<std::vector<std::pair<int64_t, float>>> invert_taps(const Taps& t, int64_t n_in) {
  std::vector<std::vector<std::pair<int64_t, float>>> inv(n_in);
  for (int64_t o = 0; o < static_cast<int64_t>(t.i0.size()); ++o) {
    if (t.l0[o] != 0.f) inv[t.i0[o]].emplace_back(o, t.l0[o]);
    if (t.l1[o] != 0.f) inv[t.i1[o]].emplace_back(o, t.l1[o]);
  }
  return inv;
}

struct Maps {
  const float* const* data;
  const int64_t* hs;
  const int64_t* ws;
  int n;
  std::vector<Taps> ty, tx;

  Maps(const float* const* data_, const int64_t* hs_, const int64_t* ws_, int n_, int64_t H, int64_t W)
      : data(data_), hs(hs_), ws(ws_), n(n_) {
    for (int m = 0; m < n; ++m) {
      ty.push_back(make_taps(hs[m], H));
      tx.push_back(make_taps(ws[m], W));
    }
  }

  // o[0:D] = sum over maps of the bilinear sample at output pixel (b, oh, ow).
  void gather(float* __restrict o, int64_t b, int64_t oh, int64_t ow, int64_t D) const {
    for (int m = 0; m < n; ++m) {
      const int64_t h = hs[m], w = ws[m];
      const float* z = data[m];
      if (ty[m].identity && tx[m].identity) {
        const float* __restrict p = z + ((b * h + oh) * w + ow) * D;
        if (m == 0) {
          std::memcpy(o, p, sizeof(float) * D);
        } else {
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) o[d] += p[d];
        }
        continue;
      }
      const float* r0 = z + (b * h + ty[m].i0[oh]) * w * D;
      const float* r1 = z + (b * h + ty[m].i1[oh]) * w * D;
      const int64_t x0 = tx[m].i0[ow] * D, x1 = tx[m].i1[ow] * D;
      const float* __restrict p00 = r0 + x0;
      const float* __restrict p01 = r0 + x1;
      const float* __restrict p10 = r1 + x0;
      const float* __restrict p11 = r1 + x1;
      const float hl0 = ty[m].l0[oh], hl1 = ty[m].l1[oh], wl0 = tx[m].l0[ow], wl1 = tx[m].l1[ow];
      if (m == 0) {
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) o[d] = hl0 * (wl0 * p00[d] + wl1 * p01[d]) + hl1 * (wl0 * p10[d] + wl1 * p11[d]);
      } else {
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) o[d] += hl0 * (wl0 * p00[d] + wl1 * p01[d]) + hl1 * (wl0 * p10[d] + wl1 * p11[d]);
      }
    }
  }
};

}  // namespace

void upsample_sum_fwd_cpu(float* out, const float* const* maps, const int64_t* hs, const int64_t* ws, int num_maps,
                          int64_t B, int64_t H, int64_t W, int64_t D, const float* scale, const float* shift, bool relu) {
  const Maps mp(maps, hs, ws, num_maps, H, W);
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < B * H; ++row) {
    const int64_t b = row / H, oh = row % H;
    for (int64_t ow = 0; ow < W; ++ow) {
      float* __restrict o = out + (row * W + ow) * D;
      mp.gather(o, b, oh, ow, D);
      if (scale) {
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) o[d] *= scale[d];
      }
      if (shift) {
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) o[d] += shift[d];
      }
      if (relu) {
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) o[d] = o[d] < 0.f ? 0.f : o[d];  // NaN stays NaN, as torch.relu
      }
    }
  }
}

void upsample_sum_bwd_cpu(float* const* grad_maps, const float* grad, const float* out, const float* const* maps,
                          const int64_t* hs, const int64_t* ws, int num_maps, int64_t B, int64_t H, int64_t W,
                          int64_t D, const float* scale, bool relu, float* dscale, float* dshift) {
  const int64_t rows = B * H;
  const Maps mp(maps, hs, ws, num_maps, H, W);
  std::unique_ptr<float[]> gu_buf;
  const float* gu = grad;
  if (relu || scale || dscale || dshift) {
    gu_buf.reset(new float[rows * W * D]);
    std::unique_ptr<float[]> part_shift(dshift ? new float[rows * D] : nullptr);
    std::unique_ptr<float[]> part_scale(dscale ? new float[rows * D] : nullptr);
    float* g_all = gu_buf.get();
#pragma omp parallel
    {
      std::vector<float> u(dscale ? D : 0);
#pragma omp for schedule(static)
      for (int64_t row = 0; row < rows; ++row) {
        const int64_t b = row / H, oh = row % H;
        float* ps = dshift ? part_shift.get() + row * D : nullptr;
        float* pc = dscale ? part_scale.get() + row * D : nullptr;
        if (ps) std::fill(ps, ps + D, 0.f);
        if (pc) std::fill(pc, pc + D, 0.f);
        for (int64_t ow = 0; ow < W; ++ow) {
          const int64_t idx = (row * W + ow) * D;
          const float* __restrict g = grad + idx;
          float* __restrict dst = g_all + idx;
          if (relu) {
            const float* __restrict y = out + idx;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) dst[d] = y[d] <= 0.f ? 0.f : g[d];  // ATen's: NaN y passes g
          } else {
            std::memcpy(dst, g, sizeof(float) * D);
          }
          if (ps) {
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) ps[d] += dst[d];
          }
          if (pc) {
            mp.gather(u.data(), b, oh, ow, D);
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) pc[d] += dst[d] * u[d];
          }
          if (scale) {
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) dst[d] *= scale[d];
          }
        }
      }
#pragma omp for schedule(static)
      for (int64_t d = 0; d < D; ++d) {
        if (dshift) {
          float s = 0.f;
          for (int64_t row = 0; row < rows; ++row) s += part_shift[row * D + d];
          dshift[d] = s;
        }
        if (dscale) {
          float s = 0.f;
          for (int64_t row = 0; row < rows; ++row) s += part_scale[row * D + d];
          dscale[d] = s;
        }
      }
    }
    gu = g_all;
  }

  for (int m = 0; m < num_maps; ++m) {
    const int64_t h = hs[m], w = ws[m];
    float* gz = grad_maps[m];
    if (mp.ty[m].identity && mp.tx[m].identity) {
#pragma omp parallel for schedule(static)
      for (int64_t row = 0; row < rows; ++row) std::memcpy(gz + row * W * D, gu + row * W * D, sizeof(float) * W * D);
      continue;
    }
    const auto inv_y = invert_taps(mp.ty[m], h);
    const auto inv_x = invert_taps(mp.tx[m], w);
#pragma omp parallel
    {
      std::vector<float> tmp(W * D);
#pragma omp for schedule(static)
      for (int64_t r = 0; r < B * h; ++r) {
        const int64_t b = r / h, ih = r % h;
        // (W, D) <- sum over the output rows reading row ih of wy * gu[b, oh]
        std::fill(tmp.begin(), tmp.end(), 0.f);
        float* __restrict t = tmp.data();
        for (const auto& [oh, wt] : inv_y[ih]) {
          const float* __restrict src = gu + (b * H + oh) * W * D;
#pragma omp simd
          for (int64_t k = 0; k < W * D; ++k) t[k] += wt * src[k];
        }
        for (int64_t iw = 0; iw < w; ++iw) {
          float* __restrict dst = gz + (r * w + iw) * D;
          std::fill(dst, dst + D, 0.f);
          for (const auto& [ow, wt] : inv_x[iw]) {
            const float* __restrict src = t + ow * D;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) dst[d] += wt * src[d];
          }
        }
      }
    }
  }
}

}  // namespace segformer_fast
