// Upsample-and-sum: out = act(scale * sum_i Up_i(maps[i]) + shift), channels-last.
//
// Every tensor is (B, h, w, D) with D contiguous. Up_i is bilinear interpolation of map i to
// (H, W) with align_corners=False and PyTorch's source-index rules (clamped at 0). scale and shift
// are optional per-channel (D,) fp32 vectors (nullptr when absent); act is ReLU or the identity.
// Plain C/C++ declarations with no torch headers; the torch bindings are upsample_sum_bind_*.h.
#pragma once

#include <cstdint>

namespace segformer_fast {

// CPU (OpenMP), fp32. maps[i] points to (B, hs[i], ws[i], D); out is (B, H, W, D).
void upsample_sum_fwd_cpu(float* out, const float* const* maps, const int64_t* hs, const int64_t* ws, int num_maps,
                          int64_t B, int64_t H, int64_t W, int64_t D, const float* scale, const float* shift, bool relu);

// CPU backward. grad: (B, H, W, D). out: the forward output, read only when relu. maps: read only
// when dscale != nullptr (the pre-affine sum is recomputed). grad_maps[i]: (B, hs[i], ws[i], D),
// fully written. dscale / dshift: (D,) outputs or nullptr. Deterministic for any thread count.
void upsample_sum_bwd_cpu(float* const* grad_maps, const float* grad, const float* out, const float* const* maps,
                          const int64_t* hs, const int64_t* ws, int num_maps, int64_t B, int64_t H, int64_t W,
                          int64_t D, const float* scale, bool relu, float* dscale, float* dshift);

// CUDA, dtype 0 = fp32, 1 = fp16, 2 = bf16 (maps, out and grads share it; scale/shift and the
// dscale/dshift outputs are fp32; accumulation is fp32). stream is a cudaStream_t. At most 4 maps.
// Return 0 on success, else a cudaError_t code.
int upsample_sum_fwd_cuda(void* out, const void* const* maps, const int64_t* hs, const int64_t* ws, int num_maps,
                          int64_t B, int64_t H, int64_t W, int64_t D, const float* scale, const float* shift, bool relu,
                          int dtype, void* stream);

// workspace: fp32 scratch of at least upsample_sum_bwd_cuda_workspace(B, H, W, D) floats.
int64_t upsample_sum_bwd_cuda_workspace(int64_t B, int64_t H, int64_t W, int64_t D);
int upsample_sum_bwd_cuda(void* const* grad_maps, const void* grad, const void* out, const void* const* maps,
                          const int64_t* hs, const int64_t* ws, int num_maps, int64_t B, int64_t H, int64_t W,
                          int64_t D, const float* scale, bool relu, float* dscale, float* dshift, float* workspace,
                          int dtype, void* stream);

}  // namespace segformer_fast
