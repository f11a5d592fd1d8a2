// Upsampled cross-entropy, CPU kernels (plain C++ + OpenMP, fp32). See upsample_cross_entropy.h.
//
// Forward: output rows are split over threads; each pixel gathers its K logits from the four taps
// into a buffer that stays in L1, then max, sum of exp, lse and nll.
// Backward: a scatter with a fixed order. Low-resolution rows are cut into chunks of kChunk rows
// per image (independent of the thread count); a chunk walks, in ascending order, the output rows
// that read any of its rows, forms each row's G = coef (softmax - onehot) pixel by pixel, applies
// the column adjoint into a (w, K) buffer, and adds that buffer, row-weighted, into its own rows.
// Output rows on a chunk boundary are recomputed by both chunks; no atomics, no races.
#include "upsample_cross_entropy/upsample_cross_entropy.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common/bilinear.h"

namespace segformer_fast {
namespace {

constexpr int64_t kChunk = 8;

// PyTorch's upsample_bilinear2d index rule (align_corners=False, common/bilinear.h) for every
// output index.
struct Axis {
  std::vector<int64_t> i0, i1;
  std::vector<float> l0, l1;

  Axis(int64_t n_in, int64_t n_out) : i0(n_out), i1(n_out), l0(n_out), l1(n_out) {
    const float scale = bilinear_scale(n_in, n_out);
    for (int64_t o = 0; o < n_out; ++o) {
      const BilinearTap tap = bilinear_tap(o, scale, n_in);
      i0[o] = tap.i0;
      i1[o] = tap.i1;
      l1[o] = tap.l1;
      l0[o] = 1.f - tap.l1;
    }
  }
};

// z[0:K] = bilinear logits of output pixel (b, oh, ow).
inline void gather(float* __restrict z, const float* x, const Axis& ay, const Axis& ax, int64_t b, int64_t oh,
                   int64_t ow, int64_t h, int64_t w, int64_t K) {
  const float* r0 = x + (b * h + ay.i0[oh]) * w * K;
  const float* r1 = x + (b * h + ay.i1[oh]) * w * K;
  const float* __restrict p00 = r0 + ax.i0[ow] * K;
  const float* __restrict p01 = r0 + ax.i1[ow] * K;
  const float* __restrict p10 = r1 + ax.i0[ow] * K;
  const float* __restrict p11 = r1 + ax.i1[ow] * K;
  const float a = ay.l0[oh], c = ay.l1[oh], u = ax.l0[ow], v = ax.l1[ow];
#pragma omp simd
  for (int64_t k = 0; k < K; ++k) z[k] = a * (u * p00[k] + v * p01[k]) + c * (u * p10[k] + v * p11[k]);
}

// The clamp in exp_nonpos is a float comparison; GCC vectorizes it only without trapping math.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#endif
// exp(x) for x <= 0.5 (here z - max or z - lse), relative error below 3e-7, written so that the
// compiler vectorizes it (std::exp is a scalar libm call): x = n ln2 + r with |r| <= ln2 / 2,
// exp(r) by its degree-6 Taylor polynomial, 2^n assembled in the exponent bits. n is rounded by
// adding 1.5 * 2^23, which leaves it in the low mantissa bits of t: no float-to-int conversion.
inline float exp_nonpos(float x) {
  x = x < -87.f ? -87.f : x;
  const float t = x * 1.44269504f + 12582912.f;
  const float n = t - 12582912.f;
  const float r = (x - n * 0.693145752f) - n * 1.42860677e-6f;  // ln 2 split in two for accuracy
  const float p =
      1.f + r * (1.f + r * (0.5f + r * (1.f / 6 + r * (1.f / 24 + r * (1.f / 120 + r * (1.f / 720))))));
  const int32_t bits = (__builtin_bit_cast(int32_t, t) - 0x4B400000 + 127) << 23;
  return p * __builtin_bit_cast(float, bits);
}

// e[k] = exp(z[k] - shift) for k < K.
inline void exp_shifted(float* __restrict e, const float* __restrict z, float shift, int64_t K) {
#pragma omp simd
  for (int64_t k = 0; k < K; ++k) e[k] = exp_nonpos(z[k] - shift);
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

inline float logsumexp(const float* z, float* scratch, int64_t K) {
  float m = z[0];
  for (int64_t k = 1; k < K; ++k) m = std::max(m, z[k]);
  exp_shifted(scratch, z, m, K);
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < K; ++k) s += scratch[k];
  return m + std::log(s);
}

}  // namespace

void upsample_cross_entropy_fwd_cpu(float* nll, float* lse, const float* x, const int64_t* labels, int64_t B,
                                    int64_t h, int64_t w, int64_t K, int64_t H, int64_t W, int64_t ignore_index) {
  const Axis ay(h, H), ax(w, W);
#pragma omp parallel
  {
    std::vector<float> z(K), scratch(K);
#pragma omp for schedule(static)
    for (int64_t row = 0; row < B * H; ++row) {
      const int64_t b = row / H, oh = row % H;
      for (int64_t ow = 0; ow < W; ++ow) {
        const int64_t p = row * W + ow;
        gather(z.data(), x, ay, ax, b, oh, ow, h, w, K);
        const float l = logsumexp(z.data(), scratch.data(), K);
        lse[p] = l;
        nll[p] = labels[p] == ignore_index ? 0.f : l - z[labels[p]];
      }
    }
  }
}

void upsample_cross_entropy_bwd_cpu(float* grad_x, const float* coef, const float* x, const int64_t* labels,
                                    const float* lse, int64_t B, int64_t h, int64_t w, int64_t K, int64_t H,
                                    int64_t W) {
  const Axis ay(h, H), ax(w, W);
  const int64_t chunks_per_image = (h + kChunk - 1) / kChunk;
#pragma omp parallel
  {
    std::vector<float> z(K), e(K), cols(w * K);
#pragma omp for schedule(dynamic, 1)
    for (int64_t job = 0; job < B * chunks_per_image; ++job) {
      const int64_t b = job / chunks_per_image;
      const int64_t r0 = (job % chunks_per_image) * kChunk, r1 = std::min(h, r0 + kChunk);
      float* gx = grad_x + (b * h + r0) * w * K;
      std::fill(gx, gx + (r1 - r0) * w * K, 0.f);
      for (int64_t oh = 0; oh < H; ++oh) {
        const int64_t t0 = ay.i0[oh], t1 = ay.i1[oh];
        const bool hit0 = t0 >= r0 && t0 < r1 && ay.l0[oh] != 0.f;
        const bool hit1 = t1 >= r0 && t1 < r1 && ay.l1[oh] != 0.f;
        if (!hit0 && !hit1) continue;
        std::fill(cols.begin(), cols.end(), 0.f);
        bool any = false;
        for (int64_t ow = 0; ow < W; ++ow) {
          const int64_t p = (b * H + oh) * W + ow;
          const float c = coef[p];
          if (c == 0.f || labels[p] < 0 || labels[p] >= K) continue;  // ignored pixel
          any = true;
          gather(z.data(), x, ay, ax, b, oh, ow, h, w, K);
          exp_shifted(e.data(), z.data(), lse[p], K);
#pragma omp simd
          for (int64_t k = 0; k < K; ++k) z[k] = c * e[k];
          z[labels[p]] -= c;
          float* __restrict d0 = cols.data() + ax.i0[ow] * K;
          float* __restrict d1 = cols.data() + ax.i1[ow] * K;
          const float u = ax.l0[ow], v = ax.l1[ow];
#pragma omp simd
          for (int64_t k = 0; k < K; ++k) d0[k] += u * z[k];
#pragma omp simd
          for (int64_t k = 0; k < K; ++k) d1[k] += v * z[k];
        }
        if (!any) continue;
        const float* __restrict src = cols.data();
        if (hit0) {
          float* __restrict dst = grad_x + (b * h + t0) * w * K;
          const float a = ay.l0[oh];
#pragma omp simd
          for (int64_t k = 0; k < w * K; ++k) dst[k] += a * src[k];
        }
        if (hit1) {
          float* __restrict dst = grad_x + (b * h + t1) * w * K;
          const float a = ay.l1[oh];
#pragma omp simd
          for (int64_t k = 0; k < w * K; ++k) dst[k] += a * src[k];
        }
      }
    }
  }
}

}  // namespace segformer_fast
