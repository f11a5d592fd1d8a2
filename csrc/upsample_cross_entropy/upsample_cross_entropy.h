// Upsampled cross-entropy: per output pixel p, z_p = bilinear gather of the logits (align_corners
// False, PyTorch's source-index rules), lse_p = logsumexp(z_p), nll_p = lse_p - z_p[y_p].
//
// Logits are channels-last (B, h, w, K) with K contiguous; labels (B, H, W) int64; per-pixel
// tensors (nll, lse, coef) are (B, H, W) fp32. Pixels labelled ignore_index get nll 0. The
// backward takes coef_p = dL/dnll_p (0 at ignored pixels) and writes
// grad_x = adjoint of the gather applied to coef_p (softmax(z_p) - onehot(y_p)).
// Plain C/C++ declarations with no torch headers; the torch bindings are upsample_cross_entropy_bind_*.h.
#pragma once

#include <cstdint>

namespace segformer_fast {

// CPU (OpenMP), fp32. Every label is in [0, K) or equals ignore_index (checked by the caller).
void upsample_cross_entropy_fwd_cpu(float* nll, float* lse, const float* x, const int64_t* labels, int64_t B,
                                    int64_t h, int64_t w, int64_t K, int64_t H, int64_t W, int64_t ignore_index);

// grad_x (B, h, w, K) is fully written. Deterministic for any thread count.
void upsample_cross_entropy_bwd_cpu(float* grad_x, const float* coef, const float* x, const int64_t* labels,
                                    const float* lse, int64_t B, int64_t h, int64_t w, int64_t K, int64_t H,
                                    int64_t W);

// CUDA, dtype 0 = fp32, 1 = fp16, 2 = bf16 for x and grad_x; accumulation in fp32. stream is a
// cudaStream_t. Return 0 on success, else a cudaError_t code.
int upsample_cross_entropy_fwd_cuda(float* nll, float* lse, const void* x, const int64_t* labels, int64_t B, int64_t h,
                                    int64_t w, int64_t K, int64_t H, int64_t W, int64_t ignore_index, int dtype,
                                    void* stream);
int upsample_cross_entropy_bwd_cuda(void* grad_x, const float* coef, const void* x, const int64_t* labels,
                                    const float* lse, int64_t B, int64_t h, int64_t w, int64_t K, int64_t H, int64_t W,
                                    int dtype, void* stream);

}  // namespace segformer_fast
