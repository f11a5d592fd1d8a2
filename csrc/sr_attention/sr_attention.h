// Spatial-reduction attention: the reduction side (patch gather / scatter, bias + LayerNorm).
//
// The Conv2d(C, C, k=sr, s=sr) of MiT's attention is a matmul over non-overlapping patches of the
// channels-last token layout x (B, H*W, C): patches (B, M, sr*sr*C) with M = (H/sr)*(W/sr)
// (floored, like nn.Conv2d), patch vector ordered (row in patch, column in patch, channel). The
// matmul itself runs on cuBLAS (via torch); these kernels do the gather, its adjoint, and the
// conv bias + LayerNorm over C fused into one pass (forward and backward).
// Plain C/C++ declarations with no torch headers; the torch binding is sr_attention_bind_cuda.h.
#pragma once

#include <cstdint>

namespace segformer_fast {

// dtype: 0 = fp32, 1 = fp16, 2 = bf16 for the token / patch / activation tensors; mean, rstd,
// the LayerNorm affine, the conv bias and the weight-gradient outputs are fp32 where noted.
// stream is a cudaStream_t. Every function returns 0 on success, else a cudaError_t code.

// patches (B, Hr*Wr, sr*sr*C) <- x (B, H*W, C). Both contiguous.
int sr_attention_patchify_cuda(void* patches, const void* x, int64_t B, int64_t H, int64_t W, int64_t C, int64_t sr,
                               int dtype, void* stream);

// dx (B, H*W, C) += adjoint of patchify applied to dpatches (B, Hr*Wr, sr*sr*C). Tokens outside
// the cropped (Hr*sr, Wr*sr) region are left unchanged. Each dx element gets at most one term.
int sr_attention_unpatchify_add_cuda(void* dx, const void* dpatches, int64_t B, int64_t H, int64_t W, int64_t C,
                                     int64_t sr, int dtype, void* stream);

// y = LayerNorm(r + bias) * weight + beta over the last dim C, rows R. r, y: (R, C) in dtype;
// bias (C,) fp32 or nullptr; weight, beta: (C,) in dtype; mean, rstd: (R,) fp32 outputs.
int sr_attention_bias_ln_fwd_cuda(void* y, float* mean, float* rstd, const void* r, const void* bias,
                                  const void* weight, const void* beta, int64_t R, int64_t C, float eps, int dtype,
                                  void* stream);

// Backward of the above. dy, r: (R, C) in dtype; mean, rstd: (R,) fp32 from the forward.
// Outputs: dr (R, C) in dtype (the gradient of r and of the pre-norm sum), and fp32 (C,) column
// sums dweight = sum dy * xhat, dbeta = sum dy, dbias = sum dr (any may be nullptr except dr).
int sr_attention_bias_ln_bwd_cuda(void* dr, float* dweight, float* dbeta, float* dbias, const void* dy, const void* r,
                                  const void* bias, const void* weight, const float* mean, const float* rstd, int64_t R,
                                  int64_t C, int dtype, void* stream);

}  // namespace segformer_fast
