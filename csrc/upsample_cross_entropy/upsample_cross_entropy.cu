// Upsampled cross-entropy, CUDA kernels (plain CUDA, no torch headers). See upsample_cross_entropy.h.
//
// Forward: one warp per output pixel. The lanes stride over the K classes of the 4-tap bilinear
// gather (PyTorch's align_corners=False index rule, common/bilinear.h; each tap a contiguous
// K-vector, so loads coalesce), keep a running max and rescaled sum, and combine them with warp
// shuffles; lane 0 writes lse and nll.
// Backward: one thread per (low-resolution pixel, class), classes fastest. Each thread walks the
// window of output pixels that can read its pixel and accumulates
// a_p * coef_p * (exp(z_pk - lse_p) - [y_p == k]), recomputing z_pk from the four taps: the
// adjoint of the gather as a gather, no atomics, deterministic.
#include "upsample_cross_entropy/upsample_cross_entropy.h"

#include <cuda_runtime.h>

#include <cmath>

#include "common.cuh"
#include "common/bilinear.h"

namespace segformer_fast {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kBwdThreads = 256;

struct Gather {
  int64_t o00, o01, o10, o11;  // element offsets of the four taps' K-vectors
  float ly, lx;
};

__device__ __forceinline__ Gather taps(int64_t b, int64_t oh, int64_t ow, int64_t h, int64_t w, int64_t K,
                                       float scale_h, float scale_w) {
  const BilinearTap ty = bilinear_tap(oh, scale_h, h), tx = bilinear_tap(ow, scale_w, w);
  const int64_t r0 = (b * h + ty.i0) * w, r1 = (b * h + ty.i1) * w;
  return {(r0 + tx.i0) * K, (r0 + tx.i1) * K, (r1 + tx.i0) * K, (r1 + tx.i1) * K, ty.l1, tx.l1};
}

template <typename T>
__device__ __forceinline__ float sample(const T* x, const Gather& g, int64_t k) {
  const float v00 = to_float(x[g.o00 + k]), v01 = to_float(x[g.o01 + k]);
  const float v10 = to_float(x[g.o10 + k]), v11 = to_float(x[g.o11 + k]);
  return (1.f - g.ly) * ((1.f - g.lx) * v00 + g.lx * v01) + g.ly * ((1.f - g.lx) * v10 + g.lx * v11);
}

template <typename T>
__global__ void fwd_kernel(float* __restrict__ nll, float* __restrict__ lse, const T* __restrict__ x,
                           const int64_t* __restrict__ labels, int64_t n_pix, int64_t h, int64_t w, int64_t K,
                           int64_t H, int64_t W, float scale_h, float scale_w, int64_t ignore_index) {
  const int lane = threadIdx.x % 32;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (p >= n_pix) return;
  const int64_t ow = p % W, oh = (p / W) % H, b = p / (W * H);
  const Gather g = taps(b, oh, ow, h, w, K, scale_h, scale_w);
  float m = -INFINITY, s = 0.f;
  for (int64_t k = lane; k < K; k += 32) {
    const float z = sample(x, g, k);
    const float m_new = fmaxf(m, z);
    s = s * __expf(m - m_new) + __expf(z - m_new);
    m = m_new;
  }
  for (int off = 16; off > 0; off /= 2) {
    const float m_o = __shfl_xor_sync(0xffffffffu, m, off);
    const float s_o = __shfl_xor_sync(0xffffffffu, s, off);
    const float m_new = fmaxf(m, m_o);
    s = (m == -INFINITY ? 0.f : s * __expf(m - m_new)) + (m_o == -INFINITY ? 0.f : s_o * __expf(m_o - m_new));
    m = m_new;
  }
  if (lane == 0) {
    const float l = m + logf(s);
    const int64_t y = labels[p];
    lse[p] = l;
    nll[p] = y == ignore_index ? 0.f : l - sample(x, g, y);
  }
}

template <typename T>
__global__ void bwd_kernel(T* __restrict__ grad_x, const float* __restrict__ coef, const T* __restrict__ x,
                           const int64_t* __restrict__ labels, const float* __restrict__ lse, int64_t n, int64_t h,
                           int64_t w, int64_t K, int64_t H, int64_t W, float scale_h, float scale_w, int rh, int rw) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= n) return;
  const int64_t k = idx % K, pix = idx / K;
  const int64_t iw = pix % w, ih = (pix / w) % h, b = pix / (w * h);
  const int64_t lo_h = bilinear_first_reader(ih, scale_h), lo_w = bilinear_first_reader(iw, scale_w);
  float acc = 0.f;
  for (int r = 0; r < rh && lo_h + r < H; ++r) {
    const int64_t oh = lo_h + r;
    const float wy = bilinear_weight(oh, ih, scale_h, h);
    if (wy == 0.f) continue;
    for (int c = 0; c < rw && lo_w + c < W; ++c) {
      const int64_t ow = lo_w + c;
      const float wt = wy * bilinear_weight(ow, iw, scale_w, w);
      if (wt == 0.f) continue;
      const int64_t p = (b * H + oh) * W + ow;
      const float cp = coef[p];
      if (cp == 0.f) continue;
      const float z = sample(x, taps(b, oh, ow, h, w, K, scale_h, scale_w), k);
      acc += wt * cp * (__expf(z - lse[p]) - (labels[p] == k ? 1.f : 0.f));
    }
  }
  grad_x[idx] = from_float<T>(acc);
}

template <typename T>
int launch_fwd(float* nll, float* lse, const void* x, const int64_t* labels, int64_t B, int64_t h, int64_t w,
               int64_t K, int64_t H, int64_t W, int64_t ignore_index, cudaStream_t stream) {
  const int64_t n_pix = B * H * W;
  const int64_t blocks = (n_pix + kWarpsPerBlock - 1) / kWarpsPerBlock;
  fwd_kernel<T><<<static_cast<unsigned>(blocks), kWarpsPerBlock * 32, 0, stream>>>(
      nll, lse, static_cast<const T*>(x), labels, n_pix, h, w, K, H, W, bilinear_scale(h, H), bilinear_scale(w, W),
      ignore_index);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_bwd(void* grad_x, const float* coef, const void* x, const int64_t* labels, const float* lse, int64_t B,
               int64_t h, int64_t w, int64_t K, int64_t H, int64_t W, cudaStream_t stream) {
  const int64_t n = B * h * w * K;
  const int64_t blocks = (n + kBwdThreads - 1) / kBwdThreads;
  bwd_kernel<T><<<static_cast<unsigned>(blocks), kBwdThreads, 0, stream>>>(
      static_cast<T*>(grad_x), coef, static_cast<const T*>(x), labels, lse, n, h, w, K, H, W, bilinear_scale(h, H),
      bilinear_scale(w, W), static_cast<int>(bilinear_window(h, H)), static_cast<int>(bilinear_window(w, W)));
  return static_cast<int>(cudaGetLastError());
}

// f(T{}) with T the storage type of a dtype code (0 fp32, 1 fp16, 2 bf16).
template <typename F>
int by_dtype(int dtype, F&& f) {
  switch (dtype) {
    case 0:
      return f(float{});
    case 1:
      return f(__half{});
    case 2:
      return f(__nv_bfloat16{});
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}

}  // namespace

int upsample_cross_entropy_fwd_cuda(float* nll, float* lse, const void* x, const int64_t* labels, int64_t B, int64_t h,
                                    int64_t w, int64_t K, int64_t H, int64_t W, int64_t ignore_index, int dtype,
                                    void* stream) {
  return by_dtype(dtype, [&](auto tag) {
    return launch_fwd<decltype(tag)>(nll, lse, x, labels, B, h, w, K, H, W, ignore_index,
                                     static_cast<cudaStream_t>(stream));
  });
}

int upsample_cross_entropy_bwd_cuda(void* grad_x, const float* coef, const void* x, const int64_t* labels,
                                    const float* lse, int64_t B, int64_t h, int64_t w, int64_t K, int64_t H, int64_t W,
                                    int dtype, void* stream) {
  return by_dtype(dtype, [&](auto tag) {
    return launch_bwd<decltype(tag)>(grad_x, coef, x, labels, lse, B, h, w, K, H, W, static_cast<cudaStream_t>(stream));
  });
}

}  // namespace segformer_fast
