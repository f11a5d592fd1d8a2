// CUDA kernels of the fused depthwise 3x3 conv + bias + GELU on (B, N, C) tokens (plain CUDA, no torch).
//
// Block = kTC channels (threadIdx.x, contiguous in memory, so loads coalesce) x kTW columns
// (threadIdx.y); each thread walks down kRows rows of one (column, channel) keeping the 3x3
// window in registers, so each input element is loaded about 3 times instead of 9.
// x / y / grad_y / grad_x are fp32, fp16 or bf16; all arithmetic is fp32.
//
// Backward (see dwconv3x3_gelu.h): kernel 1 recomputes z, writes gz = grad_y * GELU'(z) (fp32
// scratch) and per-block partial sums for the weight / bias gradients (reduced over the block's
// columns through shared memory in a fixed order); kernel 2 reduces the partials over blocks in
// a fixed order; kernel 3 is the forward kernel run on gz with the kernel flipped (grad_x).
// No atomics anywhere, so gradients are bitwise reproducible.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "dwconv3x3_gelu/dwconv3x3_gelu.h"

#include "common.cuh"
#include "common/gelu.h"

using segformer_fast::from_float;
using segformer_fast::gelu_erf;
using segformer_fast::gelu_erf_grad;
using segformer_fast::gelu_tanh;
using segformer_fast::gelu_tanh_grad;
using segformer_fast::LibmMath;
using segformer_fast::to_float;

namespace {

constexpr int kTC = 32;   // channels per block (threadIdx.x)
constexpr int kTW = 8;    // columns per block (threadIdx.y)
constexpr int kRows = 8;  // rows per thread
constexpr int kReduceThreads = 256;

template <int ACT>
__device__ __forceinline__ float act_fwd(float z) {
  if (ACT == segformer_fast::kActGeluErf) return gelu_erf<LibmMath>(z);
  if (ACT == segformer_fast::kActGeluTanh) return gelu_tanh<LibmMath>(z);
  return z;
}

template <int ACT>
__device__ __forceinline__ float act_grad(float z) {
  if (ACT == segformer_fast::kActGeluTanh) return gelu_tanh_grad<LibmMath>(z);
  return gelu_erf_grad<LibmMath>(z);
}

// Row r, columns col-1, col, col+1 of channel c in image b (rows of the image start at img_row = b * H).
template <typename T>
__device__ __forceinline__ void load_row(const T* __restrict__ x, int64_t img_row, int r, int col, int c, int H,
                                         int W, int C, float v[3]) {
  v[0] = v[1] = v[2] = 0.0f;
  if (r < 0 || r >= H) return;
  const T* p = x + ((img_row + r) * W + col) * static_cast<int64_t>(C) + c;
  if (col > 0) v[0] = to_float(p[-C]);
  v[1] = to_float(p[0]);
  if (col + 1 < W) v[2] = to_float(p[C]);
}

// Tile coordinates from blockIdx.x = (b * n_hb + hb) * n_wb + wb.
struct Tile {
  int64_t b;
  int hb;
  int wb;
};

__device__ __forceinline__ Tile tile_of(int n_hb, int n_wb) {
  const int64_t t = blockIdx.x;
  return {t / (static_cast<int64_t>(n_hb) * n_wb), static_cast<int>((t / n_wb) % n_hb), static_cast<int>(t % n_wb)};
}

// y = ACT(depthwise conv3x3(x) + bias), the kernel optionally flipped by 180 degrees (grad_x).
template <typename TIn, typename TOut, int ACT, bool HAS_BIAS, bool FLIP>
__global__ void __launch_bounds__(kTC* kTW)
    dwconv3x3_kernel(const TIn* __restrict__ x, const float* __restrict__ weight, const float* __restrict__ bias,
                     TOut* __restrict__ y, int H, int W, int C, int n_hb, int n_wb) {
  const Tile tile = tile_of(n_hb, n_wb);
  const int c = blockIdx.y * kTC + threadIdx.x;
  const int col = tile.wb * kTW + threadIdx.y;
  if (c >= C || col >= W) return;  // no shared memory or barriers below
  float wk[9];
#pragma unroll
  for (int k = 0; k < 9; ++k) wk[k] = weight[c * 9 + (FLIP ? 8 - k : k)];
  const float bv = HAS_BIAS ? bias[c] : 0.0f;
  const int64_t img_row = tile.b * H;
  const int h0 = tile.hb * kRows;
  float a[3], m[3], d[3];
  load_row(x, img_row, h0 - 1, col, c, H, W, C, a);
  load_row(x, img_row, h0, col, c, H, W, C, m);
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    const int r = h0 + i;
    if (r >= H) break;
    load_row(x, img_row, r + 1, col, c, H, W, C, d);
    float z = bv;
#pragma unroll
    for (int j = 0; j < 3; ++j) z += wk[j] * a[j] + wk[3 + j] * m[j] + wk[6 + j] * d[j];
    y[((img_row + r) * W + col) * static_cast<int64_t>(C) + c] = from_float<TOut>(act_fwd<ACT>(z));
#pragma unroll
    for (int j = 0; j < 3; ++j) {
      a[j] = m[j];
      m[j] = d[j];
    }
  }
}

// gz = grad_y * ACT'(z), z recomputed; partial[blockIdx.x][k][c] = this block's sum of gz * tap k (k < 9)
// and of gz (k = 9).
template <typename T, int ACT>
__global__ void __launch_bounds__(kTC* kTW)
    dwconv3x3_gelu_grad_z_kernel(const T* __restrict__ grad_y, const T* __restrict__ x,
                                 const float* __restrict__ weight, const float* __restrict__ bias,
                                 float* __restrict__ gz, float* __restrict__ partial, int H, int W, int C, int n_hb,
                                 int n_wb) {
  __shared__ float red[10][kTW][kTC + 1];
  const Tile tile = tile_of(n_hb, n_wb);
  const int c = blockIdx.y * kTC + threadIdx.x;
  const int col = tile.wb * kTW + threadIdx.y;
  float acc[10];
#pragma unroll
  for (int k = 0; k < 10; ++k) acc[k] = 0.0f;
  if (c < C && col < W) {
    float wk[9];
#pragma unroll
    for (int k = 0; k < 9; ++k) wk[k] = weight[c * 9 + k];
    const float bv = bias[c];
    const int64_t img_row = tile.b * H;
    const int h0 = tile.hb * kRows;
    float a[3], m[3], d[3];
    load_row(x, img_row, h0 - 1, col, c, H, W, C, a);
    load_row(x, img_row, h0, col, c, H, W, C, m);
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int r = h0 + i;
      if (r >= H) break;
      load_row(x, img_row, r + 1, col, c, H, W, C, d);
      float z = bv;
#pragma unroll
      for (int j = 0; j < 3; ++j) z += wk[j] * a[j] + wk[3 + j] * m[j] + wk[6 + j] * d[j];
      const int64_t off = ((img_row + r) * W + col) * static_cast<int64_t>(C) + c;
      const float g = to_float(grad_y[off]) * act_grad<ACT>(z);
      gz[off] = g;
#pragma unroll
      for (int j = 0; j < 3; ++j) {
        acc[j] += g * a[j];
        acc[3 + j] += g * m[j];
        acc[6 + j] += g * d[j];
      }
      acc[9] += g;
#pragma unroll
      for (int j = 0; j < 3; ++j) {
        a[j] = m[j];
        m[j] = d[j];
      }
    }
  }
#pragma unroll
  for (int k = 0; k < 10; ++k) red[k][threadIdx.y][threadIdx.x] = acc[k];
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    float* out = partial + static_cast<int64_t>(blockIdx.x) * 10 * C + c;
#pragma unroll
    for (int k = 0; k < 10; ++k) {
      float s = 0.0f;
      for (int t = 0; t < kTW; ++t) s += red[k][t][threadIdx.x];  // fixed order
      out[static_cast<int64_t>(k) * C] = s;
    }
  }
}

// grad_weight[c * 9 + k] = sum_p partial[p][k][c] (k < 9), grad_bias[c] = sum_p partial[p][9][c].
__global__ void dwconv3x3_reduce_partials_kernel(const float* __restrict__ partial, int64_t n_partials, int C,
                                                 float* __restrict__ grad_weight, float* __restrict__ grad_bias) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;  // k * C + c
  if (idx >= 10 * static_cast<int64_t>(C)) return;
  const int k = static_cast<int>(idx / C), c = static_cast<int>(idx % C);
  float s = 0.0f;
  for (int64_t p = 0; p < n_partials; ++p) s += partial[p * 10 * C + idx];
  if (k < 9) {
    grad_weight[c * 9 + k] = s;
  } else {
    grad_bias[c] = s;
  }
}

struct Launch {
  dim3 grid;
  dim3 block;
  int n_hb;
  int n_wb;
};

Launch launch_of(int64_t B, int64_t H, int64_t W, int64_t C) {
  Launch l;
  l.n_hb = static_cast<int>((H + kRows - 1) / kRows);
  l.n_wb = static_cast<int>((W + kTW - 1) / kTW);
  l.grid = dim3(static_cast<unsigned>(B * l.n_hb * l.n_wb), static_cast<unsigned>((C + kTC - 1) / kTC), 1);
  l.block = dim3(kTC, kTW, 1);
  return l;
}

bool shape_ok(int64_t B, int64_t H, int64_t W, int64_t C) {
  const int64_t tiles = B * ((H + kRows - 1) / kRows) * ((W + kTW - 1) / kTW);
  return B >= 0 && H >= 0 && W >= 0 && C >= 0 && H < (1ll << 31) && W < (1ll << 31) && C * 9 < (1ll << 31) &&
         tiles < (1ll << 31) && (C + kTC - 1) / kTC < 65536;
}

template <typename T, int ACT>
void fwd_typed(const void* x, const float* weight, const float* bias, void* y, int64_t B, int64_t H, int64_t W,
               int64_t C, cudaStream_t stream) {
  const Launch l = launch_of(B, H, W, C);
  dwconv3x3_kernel<T, T, ACT, true, false><<<l.grid, l.block, 0, stream>>>(
      static_cast<const T*>(x), weight, bias, static_cast<T*>(y), static_cast<int>(H), static_cast<int>(W),
      static_cast<int>(C), l.n_hb, l.n_wb);
}

template <typename T, int ACT>
void bwd_typed(const void* grad_y, const void* x, const float* weight, const float* bias, void* grad_x,
               float* grad_weight, float* grad_bias, void* workspace, int64_t B, int64_t H, int64_t W, int64_t C,
               cudaStream_t stream) {
  const Launch l = launch_of(B, H, W, C);
  float* gz = static_cast<float*>(workspace);
  float* partial = gz + B * H * W * C;
  const int h = static_cast<int>(H), w = static_cast<int>(W), c = static_cast<int>(C);
  dwconv3x3_gelu_grad_z_kernel<T, ACT><<<l.grid, l.block, 0, stream>>>(
      static_cast<const T*>(grad_y), static_cast<const T*>(x), weight, bias, gz, partial, h, w, c, l.n_hb, l.n_wb);
  const int64_t n = 10 * C;
  dwconv3x3_reduce_partials_kernel<<<static_cast<unsigned>((n + kReduceThreads - 1) / kReduceThreads),
                                     kReduceThreads, 0, stream>>>(partial, static_cast<int64_t>(l.grid.x), c,
                                                                  grad_weight, grad_bias);
  dwconv3x3_kernel<float, T, segformer_fast::kActIdentity, false, true>
      <<<l.grid, l.block, 0, stream>>>(gz, weight, nullptr, static_cast<T*>(grad_x), h, w, c, l.n_hb, l.n_wb);
}

template <int ACT>
int fwd_dispatch(const void* x, const float* weight, const float* bias, void* y, int64_t B, int64_t H, int64_t W,
                 int64_t C, int dtype, cudaStream_t stream) {
  switch (dtype) {
    case 0:
      fwd_typed<float, ACT>(x, weight, bias, y, B, H, W, C, stream);
      break;
    case 1:
      fwd_typed<__half, ACT>(x, weight, bias, y, B, H, W, C, stream);
      break;
    case 2:
      fwd_typed<__nv_bfloat16, ACT>(x, weight, bias, y, B, H, W, C, stream);
      break;
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
  return static_cast<int>(cudaGetLastError());
}

template <int ACT>
int bwd_dispatch(const void* grad_y, const void* x, const float* weight, const float* bias, void* grad_x,
                 float* grad_weight, float* grad_bias, void* workspace, int64_t B, int64_t H, int64_t W, int64_t C,
                 int dtype, cudaStream_t stream) {
  switch (dtype) {
    case 0:
      bwd_typed<float, ACT>(grad_y, x, weight, bias, grad_x, grad_weight, grad_bias, workspace, B, H, W, C, stream);
      break;
    case 1:
      bwd_typed<__half, ACT>(grad_y, x, weight, bias, grad_x, grad_weight, grad_bias, workspace, B, H, W, C, stream);
      break;
    case 2:
      bwd_typed<__nv_bfloat16, ACT>(grad_y, x, weight, bias, grad_x, grad_weight, grad_bias, workspace, B, H, W, C,
                                    stream);
      break;
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

extern "C" {

int dwconv3x3_gelu_fwd_cuda(const void* x, const float* weight, const float* bias, void* y, int64_t B, int64_t H,
                            int64_t W, int64_t C, int dtype, int act, void* stream) {
  if (!shape_ok(B, H, W, C)) return static_cast<int>(cudaErrorInvalidValue);
  if (B * H * W * C == 0) return 0;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (act == segformer_fast::kActGeluErf) return fwd_dispatch<segformer_fast::kActGeluErf>(x, weight, bias, y, B, H, W, C, dtype, s);
  if (act == segformer_fast::kActGeluTanh) return fwd_dispatch<segformer_fast::kActGeluTanh>(x, weight, bias, y, B, H, W, C, dtype, s);
  return static_cast<int>(cudaErrorInvalidValue);
}

int64_t dwconv3x3_gelu_bwd_cuda_workspace(int64_t B, int64_t H, int64_t W, int64_t C) {
  const int64_t tiles = B * ((H + kRows - 1) / kRows) * ((W + kTW - 1) / kTW);
  return static_cast<int64_t>(sizeof(float)) * (B * H * W * C + tiles * 10 * C);
}

int dwconv3x3_gelu_bwd_cuda(const void* grad_y, const void* x, const float* weight, const float* bias, void* grad_x,
                            float* grad_weight, float* grad_bias, void* workspace, int64_t B, int64_t H, int64_t W,
                            int64_t C, int dtype, int act, void* stream) {
  if (!shape_ok(B, H, W, C)) return static_cast<int>(cudaErrorInvalidValue);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (B * H * W == 0 || C == 0) {  // empty: zero weight / bias grads, nothing else to write
    if (C > 0) {
      cudaMemsetAsync(grad_weight, 0, sizeof(float) * 9 * C, s);
      cudaMemsetAsync(grad_bias, 0, sizeof(float) * C, s);
    }
    return static_cast<int>(cudaGetLastError());
  }
  if (act == segformer_fast::kActGeluErf)
    return bwd_dispatch<segformer_fast::kActGeluErf>(grad_y, x, weight, bias, grad_x, grad_weight, grad_bias,
                                                     workspace, B, H, W, C, dtype, s);
  if (act == segformer_fast::kActGeluTanh)
    return bwd_dispatch<segformer_fast::kActGeluTanh>(grad_y, x, weight, bias, grad_x, grad_weight, grad_bias,
                                                      workspace, B, H, W, C, dtype, s);
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // extern "C"
