// Spatial-reduction attention, reduction side, CUDA kernels (plain CUDA, no torch headers). See sr_attention.h.
//
// fp32 / fp16 / bf16 storage, fp32 arithmetic; LayerNorm statistics in fp32.
// - patchify / unpatchify_add: one thread per patch element, channel fastest, so warps read and
//   write contiguous channel runs on both sides. The patches do not overlap, so the scatter-add
//   writes every dx element at most once: no atomics.
// - bias + LayerNorm forward: one warp per row (a reduced token), two passes over C (mean, then
//   the centred variance, which is stabler than E[x^2] - mean^2), warp-shuffle reductions.
//   fp16 safety: values are read to fp32 before squaring and summed in fp32, so a row with |r| ~ 300
//   (r^2 past fp16's 65504) cannot overflow; only the normalised output is rounded to 16 bits.
// - backward: one warp per row computes dr = rstd * (g - mean(g) - xhat * mean(g * xhat)),
//   g = dy * weight; a second kernel forms the column sums (dweight, dbeta, dbias) with one thread
//   per column and a fixed-order reduction over rows: deterministic.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "sr_attention/sr_attention.h"

#include "common.cuh"

namespace segformer_fast {

namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = 8;
constexpr int kColThreadsX = 32;
constexpr int kColThreadsY = 16;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Index of the token a patch element reads: element e of patches (B, M, sr*sr*C).
struct PatchGeom {
  int64_t H, W, C, sr, Wr, M, K;  // K = sr*sr*C
  __device__ __forceinline__ int64_t token_offset(int64_t e) const {
    const int64_t c = e % C;
    int64_t t = e / C;
    const int64_t q = t % sr;
    t /= sr;
    const int64_t p = t % sr;
    t /= sr;
    const int64_t m = t % M;
    const int64_t b = t / M;
    const int64_t i = m / Wr, j = m % Wr;
    return ((b * H + i * sr + p) * W + (j * sr + q)) * C + c;
  }
};

template <typename T>
__global__ void patchify_kernel(T* __restrict__ patches, const T* __restrict__ x, PatchGeom g, int64_t total) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    patches[e] = x[g.token_offset(e)];
  }
}

template <typename T>
__global__ void unpatchify_add_kernel(T* __restrict__ dx, const T* __restrict__ dpatches, PatchGeom g, int64_t total) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t o = g.token_offset(e);
    dx[o] = from_float<T>(to_float<T>(dx[o]) + to_float<T>(dpatches[e]));
  }
}

template <typename T>
__global__ void bias_ln_fwd_kernel(T* __restrict__ y, float* __restrict__ mean_out, float* __restrict__ rstd_out,
                                   const T* __restrict__ r, const float* __restrict__ bias, const T* __restrict__ weight,
                                   const T* __restrict__ beta, int64_t R, int64_t C, float eps) {
  const int lane = threadIdx.x & 31;
  const int64_t row = blockIdx.x * static_cast<int64_t>(kWarpsPerBlock) + (threadIdx.x >> 5);
  if (row >= R) return;  // whole warps exit together: the shuffles below see full warps
  const T* rr = r + row * C;
  float s = 0.f;
  for (int64_t c = lane; c < C; c += 32) s += to_float<T>(rr[c]) + (bias ? bias[c] : 0.f);
  const float mean = warp_sum(s) / static_cast<float>(C);
  float v = 0.f;
  for (int64_t c = lane; c < C; c += 32) {
    const float d = to_float<T>(rr[c]) + (bias ? bias[c] : 0.f) - mean;
    v += d * d;
  }
  const float rstd = rsqrtf(warp_sum(v) / static_cast<float>(C) + eps);
  T* yy = y + row * C;
  for (int64_t c = lane; c < C; c += 32) {
    const float xhat = (to_float<T>(rr[c]) + (bias ? bias[c] : 0.f) - mean) * rstd;
    yy[c] = from_float<T>(xhat * to_float<T>(weight[c]) + to_float<T>(beta[c]));
  }
  if (lane == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

template <typename T>
__global__ void bias_ln_bwd_rows_kernel(T* __restrict__ dr, const T* __restrict__ dy, const T* __restrict__ r,
                                        const float* __restrict__ bias, const T* __restrict__ weight,
                                        const float* __restrict__ mean, const float* __restrict__ rstd, int64_t R,
                                        int64_t C) {
  const int lane = threadIdx.x & 31;
  const int64_t row = blockIdx.x * static_cast<int64_t>(kWarpsPerBlock) + (threadIdx.x >> 5);
  if (row >= R) return;
  const T* dyr = dy + row * C;
  const T* rr = r + row * C;
  const float mu = mean[row], rs = rstd[row];
  float sg = 0.f, sgx = 0.f;
  for (int64_t c = lane; c < C; c += 32) {
    const float g = to_float<T>(dyr[c]) * to_float<T>(weight[c]);
    const float xhat = (to_float<T>(rr[c]) + (bias ? bias[c] : 0.f) - mu) * rs;
    sg += g;
    sgx += g * xhat;
  }
  const float inv_c = 1.f / static_cast<float>(C);
  const float mg = warp_sum(sg) * inv_c, mgx = warp_sum(sgx) * inv_c;
  T* drr = dr + row * C;
  for (int64_t c = lane; c < C; c += 32) {
    const float g = to_float<T>(dyr[c]) * to_float<T>(weight[c]);
    const float xhat = (to_float<T>(rr[c]) + (bias ? bias[c] : 0.f) - mu) * rs;
    drr[c] = from_float<T>(rs * (g - mg - xhat * mgx));
  }
}

// blockDim (kColThreadsX, kColThreadsY): threadIdx.x picks the column, threadIdx.y strides rows.
template <typename T>
__global__ void bias_ln_bwd_cols_kernel(float* __restrict__ dweight, float* __restrict__ dbeta,
                                        float* __restrict__ dbias, const T* __restrict__ dr, const T* __restrict__ dy,
                                        const T* __restrict__ r, const float* __restrict__ bias,
                                        const float* __restrict__ mean, const float* __restrict__ rstd, int64_t R,
                                        int64_t C) {
  __shared__ float sw[kColThreadsY][kColThreadsX + 1];
  __shared__ float sb[kColThreadsY][kColThreadsX + 1];
  __shared__ float sd[kColThreadsY][kColThreadsX + 1];
  const int64_t c = blockIdx.x * static_cast<int64_t>(kColThreadsX) + threadIdx.x;
  float aw = 0.f, ab = 0.f, ad = 0.f;
  if (c < C) {
    const float bc = bias ? bias[c] : 0.f;
    for (int64_t row = threadIdx.y; row < R; row += kColThreadsY) {
      const float g = to_float<T>(dy[row * C + c]);
      const float xhat = (to_float<T>(r[row * C + c]) + bc - mean[row]) * rstd[row];
      aw += g * xhat;
      ab += g;
      ad += to_float<T>(dr[row * C + c]);
    }
  }
  sw[threadIdx.y][threadIdx.x] = aw;
  sb[threadIdx.y][threadIdx.x] = ab;
  sd[threadIdx.y][threadIdx.x] = ad;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    for (int k = 1; k < kColThreadsY; ++k) {
      aw += sw[k][threadIdx.x];
      ab += sb[k][threadIdx.x];
      ad += sd[k][threadIdx.x];
    }
    if (dweight) dweight[c] = aw;
    if (dbeta) dbeta[c] = ab;
    if (dbias) dbias[c] = ad;
  }
}

unsigned int elementwise_blocks(int64_t total) {
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(blocks < 65535 * 8 ? (blocks > 0 ? blocks : 1) : 65535 * 8);
}

PatchGeom make_geom(int64_t H, int64_t W, int64_t C, int64_t sr) {
  PatchGeom g;
  g.H = H;
  g.W = W;
  g.C = C;
  g.sr = sr;
  g.Wr = W / sr;
  g.M = (H / sr) * (W / sr);
  g.K = sr * sr * C;
  return g;
}

template <typename T>
int patchify_impl(void* patches, const void* x, int64_t B, int64_t H, int64_t W, int64_t C, int64_t sr,
                  cudaStream_t s) {
  const PatchGeom g = make_geom(H, W, C, sr);
  const int64_t total = B * g.M * g.K;
  if (total == 0) return 0;
  patchify_kernel<T><<<elementwise_blocks(total), kThreads, 0, s>>>(static_cast<T*>(patches),
                                                                    static_cast<const T*>(x), g, total);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int unpatchify_impl(void* dx, const void* dp, int64_t B, int64_t H, int64_t W, int64_t C, int64_t sr,
                    cudaStream_t s) {
  const PatchGeom g = make_geom(H, W, C, sr);
  const int64_t total = B * g.M * g.K;
  if (total == 0) return 0;
  unpatchify_add_kernel<T><<<elementwise_blocks(total), kThreads, 0, s>>>(static_cast<T*>(dx),
                                                                          static_cast<const T*>(dp), g, total);
  return static_cast<int>(cudaGetLastError());
}

unsigned int row_blocks(int64_t R) { return static_cast<unsigned int>((R + kWarpsPerBlock - 1) / kWarpsPerBlock); }

template <typename T>
int ln_fwd_impl(void* y, float* mean, float* rstd, const void* r, const void* bias, const void* weight,
                const void* beta, int64_t R, int64_t C, float eps, cudaStream_t s) {
  if (R == 0) return 0;
  bias_ln_fwd_kernel<T><<<row_blocks(R), kWarpsPerBlock * 32, 0, s>>>(
      static_cast<T*>(y), mean, rstd, static_cast<const T*>(r), static_cast<const float*>(bias),
      static_cast<const T*>(weight), static_cast<const T*>(beta), R, C, eps);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int ln_bwd_impl(void* dr, float* dweight, float* dbeta, float* dbias, const void* dy, const void* r, const void* bias,
                const void* weight, const float* mean, const float* rstd, int64_t R, int64_t C, cudaStream_t s) {
  if (R > 0) {
    bias_ln_bwd_rows_kernel<T><<<row_blocks(R), kWarpsPerBlock * 32, 0, s>>>(
        static_cast<T*>(dr), static_cast<const T*>(dy), static_cast<const T*>(r), static_cast<const float*>(bias),
        static_cast<const T*>(weight), mean, rstd, R, C);
    const int err = static_cast<int>(cudaGetLastError());
    if (err) return err;
  }
  if (dweight || dbeta || dbias) {  // with R == 0 this writes zeros
    const dim3 block(kColThreadsX, kColThreadsY);
    const unsigned int grid = static_cast<unsigned int>((C + kColThreadsX - 1) / kColThreadsX);
    bias_ln_bwd_cols_kernel<T><<<grid, block, 0, s>>>(dweight, dbeta, dbias, static_cast<const T*>(dr),
                                                      static_cast<const T*>(dy), static_cast<const T*>(r),
                                                      static_cast<const float*>(bias), mean, rstd, R, C);
    return static_cast<int>(cudaGetLastError());
  }
  return 0;
}

}  // namespace

#define SR_ATTENTION_DISPATCH(dtype, FN, ...)                                      \
  switch (dtype) {                                                                 \
    case 0:                                                                        \
      return FN<float>(__VA_ARGS__);                                               \
    case 1:                                                                        \
      return FN<__half>(__VA_ARGS__);                                              \
    case 2:                                                                        \
      return FN<__nv_bfloat16>(__VA_ARGS__);                                       \
    default:                                                                       \
      return static_cast<int>(cudaErrorInvalidValue);                              \
  }

int sr_attention_patchify_cuda(void* patches, const void* x, int64_t B, int64_t H, int64_t W, int64_t C, int64_t sr,
                               int dtype, void* stream) {
  if (sr < 1) return static_cast<int>(cudaErrorInvalidValue);
  SR_ATTENTION_DISPATCH(dtype, patchify_impl, patches, x, B, H, W, C, sr, static_cast<cudaStream_t>(stream))
}

int sr_attention_unpatchify_add_cuda(void* dx, const void* dpatches, int64_t B, int64_t H, int64_t W, int64_t C,
                                     int64_t sr, int dtype, void* stream) {
  if (sr < 1) return static_cast<int>(cudaErrorInvalidValue);
  SR_ATTENTION_DISPATCH(dtype, unpatchify_impl, dx, dpatches, B, H, W, C, sr, static_cast<cudaStream_t>(stream))
}

int sr_attention_bias_ln_fwd_cuda(void* y, float* mean, float* rstd, const void* r, const void* bias,
                                  const void* weight, const void* beta, int64_t R, int64_t C, float eps, int dtype,
                                  void* stream) {
  SR_ATTENTION_DISPATCH(dtype, ln_fwd_impl, y, mean, rstd, r, bias, weight, beta, R, C, eps,
                        static_cast<cudaStream_t>(stream))
}

int sr_attention_bias_ln_bwd_cuda(void* dr, float* dweight, float* dbeta, float* dbias, const void* dy, const void* r,
                                  const void* bias, const void* weight, const float* mean, const float* rstd, int64_t R,
                                  int64_t C, int dtype, void* stream) {
  SR_ATTENTION_DISPATCH(dtype, ln_bwd_impl, dr, dweight, dbeta, dbias, dy, r, bias, weight, mean, rstd, R, C,
                        static_cast<cudaStream_t>(stream))
}

#undef SR_ATTENTION_DISPATCH

}  // namespace segformer_fast
