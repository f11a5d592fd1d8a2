// Upsample-and-sum, CUDA kernels (plain CUDA, no torch headers; channels-last). See upsample_sum.h.
//
// fp32 / fp16 / bf16 storage, fp32 arithmetic. One thread per (pixel, channel) element with the
// channel fastest, so every warp reads and writes contiguous channel runs of the NHWC tensors.
// Forward: the 4-tap bilinear gather of each map (PyTorch's align_corners=False index rule),
// summed, then affine and ReLU. Backward: a prep kernel masks and scales the gradient into an fp32
// workspace and writes per-chunk partial sums for dscale/dshift (block tree reduction, then a fixed-
// order sum over chunks); the adjoint of each map's upsampling is a gather over the window of
// output pixels that read each input pixel. No atomics: results are deterministic.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "upsample_sum/upsample_sum.h"

#include "common.cuh"

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

// PyTorch: src = scale * (dst + 0.5) - 0.5 clamped at 0; i1 = i0 + (i0 < n_in - 1).
__device__ __forceinline__ void source_index(int64_t o, float scale, int64_t n_in, int64_t& i0, int64_t& i1, float& l1) {
  float src = scale * (static_cast<float>(o) + 0.5f) - 0.5f;
  src = src < 0.f ? 0.f : src;
  i0 = static_cast<int64_t>(src);
  i1 = i0 + (i0 < n_in - 1 ? 1 : 0);
  l1 = fminf(fmaxf(src - static_cast<float>(i0), 0.f), 1.f);
}

// Weight with which output index o reads input index i (0 when it does not).
__device__ __forceinline__ float tap_weight(int64_t o, int64_t i, float scale, int64_t n_in) {
  int64_t i0, i1;
  float l1;
  source_index(o, scale, n_in, i0, i1, l1);
  return (i0 == i ? 1.f - l1 : 0.f) + (i1 == i ? l1 : 0.f);
}

template <typename T>
__device__ __forceinline__ float gather_sum(const MapArgs& ma, int64_t b, int64_t oh, int64_t ow, int64_t d, int64_t D) {
  float acc = 0.f;
#pragma unroll
  for (int m = 0; m < kMaxMaps; ++m) {
    if (m >= ma.n) break;
    const T* z = static_cast<const T*>(ma.ptr[m]);
    const int64_t h = ma.h[m], w = ma.w[m];
    int64_t y0, y1, x0, x1;
    float ly, lx;
    source_index(oh, ma.sh[m], h, y0, y1, ly);
    source_index(ow, ma.sw[m], w, x0, x1, lx);
    const int64_t r0 = (b * h + y0) * w, r1 = (b * h + y1) * w;
    const float v00 = to_float<T>(z[(r0 + x0) * D + d]);
    const float v01 = to_float<T>(z[(r0 + x1) * D + d]);
    const float v10 = to_float<T>(z[(r1 + x0) * D + d]);
    const float v11 = to_float<T>(z[(r1 + x1) * D + d]);
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
    if (relu) acc = acc > 0.f ? acc : 0.f;
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
      if (relu && !(to_float<T>(out[idx]) > 0.f)) g = 0.f;
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

// Adjoint of one map's upsampling: gz[b, ih, iw, d] = sum_{oh, ow} wy(oh, ih) wx(ow, iw) g[b, oh, ow, d].
template <typename G, typename T>
__global__ void upsample_sum_bwd_kernel(T* __restrict__ gz, const G* __restrict__ g, int64_t n_in_pix, int64_t h,
                                        int64_t w, float sh, float sw, int64_t H, int64_t W, int64_t D, int64_t win_h,
                                        int64_t win_w) {
  const int64_t total = n_in_pix * D;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t d = idx % D, p = idx / D;
    const int64_t iw = p % w, ih = (p / w) % h, b = p / (w * h);
    // First output index that can read input i: o >= (i - 0.5) / scale - 0.5; one index of margin.
    int64_t lo_h = static_cast<int64_t>(floorf((static_cast<float>(ih) - 0.5f) / sh - 0.5f)) - 1;
    int64_t lo_w = static_cast<int64_t>(floorf((static_cast<float>(iw) - 0.5f) / sw - 0.5f)) - 1;
    lo_h = lo_h < 0 ? 0 : lo_h;
    lo_w = lo_w < 0 ? 0 : lo_w;
    const int64_t hi_h = lo_h + win_h < H ? lo_h + win_h : H;
    const int64_t hi_w = lo_w + win_w < W ? lo_w + win_w : W;
    float acc = 0.f;
    for (int64_t oh = lo_h; oh < hi_h; ++oh) {
      const float wy = tap_weight(oh, ih, sh, h);
      if (wy == 0.f) continue;
      const G* row = g + (b * H + oh) * W * D + d;
      float racc = 0.f;
      for (int64_t ow = lo_w; ow < hi_w; ++ow) {
        const float wx = tap_weight(ow, iw, sw, w);
        if (wx != 0.f) racc += wx * to_float<G>(row[ow * D]);
      }
      acc += wy * racc;
    }
    gz[idx] = from_float<T>(acc);
  }
}

int64_t window(int64_t n_in, int64_t n_out) {
  const int64_t r = static_cast<int64_t>(std::ceil(2.0 * static_cast<double>(n_out) / static_cast<double>(n_in))) + 4;
  return r < n_out ? r : n_out;
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
    ma.sh[m] = static_cast<float>(hs[m]) / static_cast<float>(H);
    ma.sw[m] = static_cast<float>(ws[m]) / static_cast<float>(W);
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
          gz, workspace, n_in, h, w, ma.sh[m], ma.sw[m], H, W, D, window(h, H), window(w, W));
    } else {
      upsample_sum_bwd_kernel<T, T><<<grid_for(n_in * D), kThreads, 0, stream>>>(
          gz, static_cast<const T*>(grad), n_in, h, w, ma.sh[m], ma.sw[m], H, W, D, window(h, H), window(w, W));
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
