// Upsample-and-sum, CUDA kernels (plain CUDA, no torch headers; channels-last). See upsample_sum.h.
//
// fp32 / fp16 / bf16 storage, fp32 arithmetic. One thread per (pixel, channel) element with the
// channel fastest, so every warp reads and writes contiguous channel runs of the NHWC tensors.
// Forward: the 4-tap bilinear gather of each map (PyTorch's align_corners=False index rule,
// common/bilinear.h), summed, then affine and ReLU. Backward: a prep kernel masks and scales the
// gradient into an fp32 workspace and writes per-chunk partial sums for dscale/dshift (block tree
// reduction, then a fixed-order sum over chunks); the adjoint of each map's upsampling is a gather
// over the output pixels that read each input pixel, a row range times a column range computed in
// closed form (reader_range). No atomics: results are deterministic.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "upsample_sum/upsample_sum.h"

#include "common.cuh"
#include "common/bilinear.h"

namespace segformer_fast {

namespace {

constexpr int kMaxMaps = 4;
constexpr int kThreads = 256;
constexpr int kPrepChannels = 32;  // blockDim.x of the prep kernel: one warp of channels
constexpr int kPrepRows = 8;       // blockDim.y
constexpr int kPrepPixels = 256;   // pixels per prep block (per partial-sum chunk)

struct MapArgs {
  const void* ptr[kMaxMaps];
  int64_t h[kMaxMaps], w[kMaxMaps];
  float sh[kMaxMaps], sw[kMaxMaps];  // PyTorch's scale = in / out, fp32
  int n;
};

template <typename T>
__device__ __forceinline__ float gather_sum(const MapArgs& ma, int64_t b, int64_t oh, int64_t ow, int64_t d, int64_t D) {
  float acc = 0.f;
#pragma unroll
  for (int m = 0; m < kMaxMaps; ++m) {
    if (m >= ma.n) break;
    const T* z = static_cast<const T*>(ma.ptr[m]);
    const int64_t h = ma.h[m], w = ma.w[m];
    const BilinearTap ty = bilinear_tap(oh, ma.sh[m], h), tx = bilinear_tap(ow, ma.sw[m], w);
    const float ly = ty.l1, lx = tx.l1;
    const int64_t r0 = (b * h + ty.i0) * w, r1 = (b * h + ty.i1) * w;
    const float v00 = to_float<T>(z[(r0 + tx.i0) * D + d]);
    const float v01 = to_float<T>(z[(r0 + tx.i1) * D + d]);
    const float v10 = to_float<T>(z[(r1 + tx.i0) * D + d]);
    const float v11 = to_float<T>(z[(r1 + tx.i1) * D + d]);
    acc += (1.f - ly) * ((1.f - lx) * v00 + lx * v01) + ly * ((1.f - lx) * v10 + lx * v11);
  }
  return acc;
}

template <typename T>
__global__ void upsample_sum_fwd_kernel(T* __restrict__ out, MapArgs ma, int64_t n_pix, int64_t H, int64_t W, int64_t D,
                                        const float* __restrict__ scale, const float* __restrict__ shift, bool relu) {
  const int64_t total = n_pix * D;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t d = idx % D, p = idx / D;
    const int64_t ow = p % W, oh = (p / W) % H, b = p / (W * H);
    float acc = gather_sum<T>(ma, b, oh, ow, d, D);
    if (scale) acc *= scale[d];
    if (shift) acc += shift[d];
    if (relu) acc = acc < 0.f ? 0.f : acc;  // NaN stays NaN, as torch.relu (fmaxf would drop it)
    out[idx] = from_float<T>(acc);
  }
}

// Block (kPrepChannels, kPrepRows) handles channels [blockIdx.y * 32, +32) of pixel chunk blockIdx.x.
template <typename T>
__global__ void upsample_sum_bwd_prep_kernel(float* __restrict__ gu, float* __restrict__ part_scale,
                                             float* __restrict__ part_shift, const T* __restrict__ grad,
                                             const T* __restrict__ out, const float* __restrict__ scale, MapArgs ma,
                                             int64_t n_pix, int64_t H, int64_t W, int64_t D, bool relu) {
  __shared__ float s_shift[kPrepRows][kPrepChannels];
  __shared__ float s_scale[kPrepRows][kPrepChannels];
  const int64_t d = static_cast<int64_t>(blockIdx.y) * kPrepChannels + threadIdx.x;
  const int64_t p_begin = static_cast<int64_t>(blockIdx.x) * kPrepPixels;
  const int64_t p_end = p_begin + kPrepPixels < n_pix ? p_begin + kPrepPixels : n_pix;
  float sum_g = 0.f, sum_gu = 0.f;
  if (d < D) {
    for (int64_t p = p_begin + threadIdx.y; p < p_end; p += kPrepRows) {
      const int64_t idx = p * D + d;
      float g = to_float<T>(grad[idx]);
      if (relu && to_float<T>(out[idx]) <= 0.f) g = 0.f;  // ATen's ReLU backward: a NaN output passes g
      sum_g += g;
      if (part_scale) {
        const int64_t ow = p % W, oh = (p / W) % H, b = p / (W * H);
        sum_gu += g * gather_sum<T>(ma, b, oh, ow, d, D);
      }
      gu[idx] = scale ? g * scale[d] : g;
    }
  }
  s_shift[threadIdx.y][threadIdx.x] = sum_g;
  s_scale[threadIdx.y][threadIdx.x] = sum_gu;
  __syncthreads();
  if (threadIdx.y == 0 && d < D) {
    float a = 0.f, c = 0.f;
    for (int r = 0; r < kPrepRows; ++r) {
      a += s_shift[r][threadIdx.x];
      c += s_scale[r][threadIdx.x];
    }
    if (part_shift) part_shift[static_cast<int64_t>(blockIdx.x) * D + d] = a;
    if (part_scale) part_scale[static_cast<int64_t>(blockIdx.x) * D + d] = c;
  }
}

__global__ void reduce_chunks_kernel(float* __restrict__ dst, const float* __restrict__ part, int64_t n_chunks, int64_t D) {
  const int64_t d = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (d >= D) return;
  float s = 0.f;
  for (int64_t c = 0; c < n_chunks; ++c) s += part[c * D + d];
  dst[d] = s;
}

// The output indices [lo, hi) whose taps read input index i with a nonzero weight: src(o) in (i - 1, i + 1),
// and every o below for i = 0 and above for i = n_in - 1 (the clamped borders). The closed forms
// o > (i - 0.5) / scale - 0.5 and o >= (i + 1.5) / scale - 0.5 are rounded in fp32, so each bound is settled
// by evaluating src as bilinear_tap does at the three candidates around the estimate (the Triton kernel's
// _reader_range). Empty (lo >= hi) where no output reads i (downsampling).
__device__ __forceinline__ float source_index(int64_t o, float scale) {
  return scale * (static_cast<float>(o) + 0.5f) - 0.5f;  // bilinear_tap's, before the clamp at 0
}

__device__ __forceinline__ void reader_range(int64_t i, float scale, int64_t n_in, int64_t n_out, int64_t* lo,
                                             int64_t* hi) {
  const float fi = static_cast<float>(i);
  int64_t e = static_cast<int64_t>(floorf((fi - 0.5f) / scale - 0.5f));  // lo = e + 1 in exact arithmetic
  int64_t a = e - 1;
  for (int64_t k = e - 1; k <= e + 1; ++k) a += source_index(k, scale) <= fi - 1.f;
  e = static_cast<int64_t>(floorf((fi + 1.5f) / scale - 0.5f));  // hi = e or e + 1 in exact arithmetic
  int64_t b = e - 1;
  for (int64_t k = e - 1; k <= e + 1; ++k) b += source_index(k, scale) < fi + 1.f;
  a = a < 0 ? 0 : (a > n_out ? n_out : a);
  b = b < 0 ? 0 : (b > n_out ? n_out : b);
  *lo = i == 0 ? 0 : a;
  *hi = i == n_in - 1 ? n_out : b;
}

// Adjoint of one map's upsampling over the live taps only: gz[b, ih, iw, d] = sum_{oh, ow} wy(oh, ih)
// wx(ow, iw) g[b, oh, ow, d], oh in reader_range(ih), ow in reader_range(iw).
template <typename G, typename T>
__global__ void upsample_sum_bwd_kernel(T* __restrict__ gz, const G* __restrict__ g, int64_t n_in_pix, int64_t h,
                                        int64_t w, float sh, float sw, int64_t H, int64_t W, int64_t D) {
  const int64_t total = n_in_pix * D;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t d = idx % D, p = idx / D;
    const int64_t iw = p % w, ih = (p / w) % h, b = p / (w * h);
    int64_t lo_h, hi_h, lo_w, hi_w;
    reader_range(ih, sh, h, H, &lo_h, &hi_h);
    reader_range(iw, sw, w, W, &lo_w, &hi_w);
    float acc = 0.f;
    for (int64_t oh = lo_h; oh < hi_h; ++oh) {
      const float wy = bilinear_weight(oh, ih, sh, h);
      const G* row = g + (b * H + oh) * W * D + d;
      float racc = 0.f;
      for (int64_t ow = lo_w; ow < hi_w; ++ow) racc += bilinear_weight(ow, iw, sw, w) * to_float<G>(row[ow * D]);
      acc += wy * racc;
    }
    gz[idx] = from_float<T>(acc);
  }
}

unsigned int grid_for(int64_t total) {
  int64_t blocks = (total + kThreads - 1) / kThreads;
  const int64_t cap = int64_t(1) << 30;
  if (blocks > cap) blocks = cap;
  return static_cast<unsigned int>(blocks < 1 ? 1 : blocks);
}

int64_t prep_chunks(int64_t n_pix) { return (n_pix + kPrepPixels - 1) / kPrepPixels; }

MapArgs make_map_args(const void* const* maps, const int64_t* hs, const int64_t* ws, int n, int64_t H, int64_t W) {
  MapArgs ma{};
  ma.n = n;
  for (int m = 0; m < n; ++m) {
    ma.ptr[m] = maps ? maps[m] : nullptr;
    ma.h[m] = hs[m];
    ma.w[m] = ws[m];
    ma.sh[m] = bilinear_scale(hs[m], H);
    ma.sw[m] = bilinear_scale(ws[m], W);
  }
  return ma;
}

template <typename T>
int fwd_impl(void* out, const MapArgs& ma, int64_t B, int64_t H, int64_t W, int64_t D, const float* scale,
             const float* shift, bool relu, cudaStream_t stream) {
  const int64_t n_pix = B * H * W;
  upsample_sum_fwd_kernel<T><<<grid_for(n_pix * D), kThreads, 0, stream>>>(static_cast<T*>(out), ma, n_pix, H, W, D, scale,
                                                                          shift, relu);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int bwd_impl(void* const* grad_maps, const void* grad, const void* out, const MapArgs& ma, int64_t B, int64_t H, int64_t W,
             int64_t D, const float* scale, bool relu, float* dscale, float* dshift, float* workspace,
             cudaStream_t stream) {
  const int64_t n_pix = B * H * W;
  const bool prep = relu || scale || dscale || dshift;
  if (prep) {
    const int64_t chunks = prep_chunks(n_pix);
    float* gu = workspace;
    float* part_scale = dscale ? workspace + n_pix * D : nullptr;
    float* part_shift = dshift ? workspace + n_pix * D + chunks * D : nullptr;
    const dim3 block(kPrepChannels, kPrepRows);
    const dim3 grid(static_cast<unsigned int>(chunks), static_cast<unsigned int>((D + kPrepChannels - 1) / kPrepChannels));
    upsample_sum_bwd_prep_kernel<T><<<grid, block, 0, stream>>>(gu, part_scale, part_shift, static_cast<const T*>(grad),
                                                                static_cast<const T*>(out), scale, ma, n_pix, H, W, D, relu);
    const unsigned int rgrid = static_cast<unsigned int>((D + kThreads - 1) / kThreads);
    if (dscale) reduce_chunks_kernel<<<rgrid, kThreads, 0, stream>>>(dscale, part_scale, chunks, D);
    if (dshift) reduce_chunks_kernel<<<rgrid, kThreads, 0, stream>>>(dshift, part_shift, chunks, D);
  }
  for (int m = 0; m < ma.n; ++m) {
    const int64_t h = ma.h[m], w = ma.w[m], n_in = B * h * w;
    T* gz = static_cast<T*>(grad_maps[m]);
    if (prep) {
      upsample_sum_bwd_kernel<float, T><<<grid_for(n_in * D), kThreads, 0, stream>>>(
          gz, workspace, n_in, h, w, ma.sh[m], ma.sw[m], H, W, D);
    } else {
      upsample_sum_bwd_kernel<T, T><<<grid_for(n_in * D), kThreads, 0, stream>>>(
          gz, static_cast<const T*>(grad), n_in, h, w, ma.sh[m], ma.sw[m], H, W, D);
    }
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int upsample_sum_fwd_cuda(void* out, const void* const* maps, const int64_t* hs, const int64_t* ws, int num_maps,
                          int64_t B, int64_t H, int64_t W, int64_t D, const float* scale, const float* shift, bool relu,
                          int dtype, void* stream) {
  if (num_maps < 1 || num_maps > kMaxMaps) return static_cast<int>(cudaErrorInvalidValue);
  const MapArgs ma = make_map_args(maps, hs, ws, num_maps, H, W);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case 0:
      return fwd_impl<float>(out, ma, B, H, W, D, scale, shift, relu, s);
    case 1:
      return fwd_impl<__half>(out, ma, B, H, W, D, scale, shift, relu, s);
    case 2:
      return fwd_impl<__nv_bfloat16>(out, ma, B, H, W, D, scale, shift, relu, s);
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}

int64_t upsample_sum_bwd_cuda_workspace(int64_t B, int64_t H, int64_t W, int64_t D) {
  const int64_t n_pix = B * H * W;
  return n_pix * D + 2 * prep_chunks(n_pix) * D;
}

int upsample_sum_bwd_cuda(void* const* grad_maps, const void* grad, const void* out, const void* const* maps,
                          const int64_t* hs, const int64_t* ws, int num_maps, int64_t B, int64_t H, int64_t W,
                          int64_t D, const float* scale, bool relu, float* dscale, float* dshift, float* workspace,
                          int dtype, void* stream) {
  if (num_maps < 1 || num_maps > kMaxMaps) return static_cast<int>(cudaErrorInvalidValue);
  if ((relu || scale || dscale || dshift) && !workspace) return static_cast<int>(cudaErrorInvalidValue);
  if (dscale && !maps) return static_cast<int>(cudaErrorInvalidValue);
  const MapArgs ma = make_map_args(maps, hs, ws, num_maps, H, W);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case 0:
      return bwd_impl<float>(grad_maps, grad, out, ma, B, H, W, D, scale, relu, dscale, dshift, workspace, s);
    case 1:
      return bwd_impl<__half>(grad_maps, grad, out, ma, B, H, W, D, scale, relu, dscale, dshift, workspace, s);
    case 2:
      return bwd_impl<__nv_bfloat16>(grad_maps, grad, out, ma, B, H, W, D, scale, relu, dscale, dshift, workspace, s);
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}

}  // namespace segformer_fast
