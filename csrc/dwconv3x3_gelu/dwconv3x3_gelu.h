// Fused depthwise 3x3 conv + bias + GELU on (B, N, C) tokens (N = H * W, channels contiguous).
//
//   z[b, h, w, c] = bias[c] + sum_{i, j < 3} weight[c, i, j] * x[b, h + i - 1, w + j - 1, c]   (zero padding)
//   y = GELU(z)
//
// Backward recomputes z from x: gz = grad_y * GELU'(z); grad_x = conv of gz with the kernel flipped
// by 180 degrees; grad_weight[c, i, j] = sum gz * x_shifted and grad_bias[c] = sum gz, reduced from
// per-block partials in a fixed order (deterministic, no float atomics).
//
// Plain C++ / CUDA declarations, no torch headers; the bindings live in *_bind_{cpu,cuda}.h.
// Weights are fp32 (C, 1, 3, 3) contiguous; act is one of the codes below.
#pragma once

#include <cstdint>

namespace segformer_fast {

enum DwconvAct : int { kActIdentity = 0, kActGeluErf = 1, kActGeluTanh = 2 };

// CPU, fp32, OpenMP. Pointers are contiguous; y / grad_* are fully written.
void dwconv3x3_gelu_fwd_cpu(const float* x, const float* weight, const float* bias, float* y, int64_t B, int64_t H,
                            int64_t W, int64_t C, int act);

// Floats of scratch the CPU backward needs (gz plus the weight-gradient partials).
int64_t dwconv3x3_gelu_bwd_cpu_workspace(int64_t B, int64_t H, int64_t W, int64_t C);

void dwconv3x3_gelu_bwd_cpu(const float* grad_y, const float* x, const float* weight, const float* bias,
                            float* grad_x, float* grad_weight, float* grad_bias, float* workspace, int64_t B,
                            int64_t H, int64_t W, int64_t C, int act);

}  // namespace segformer_fast

// CUDA launchers (csrc/dwconv3x3_gelu/dwconv3x3_gelu.cu). dtype: 0 fp32, 1 fp16, 2 bf16 for x, y,
// grad_y and grad_x; weight, bias, grad_weight, grad_bias are fp32. stream is a cudaStream_t.
// Return a cudaError_t value (0 on success).
extern "C" {

int dwconv3x3_gelu_fwd_cuda(const void* x, const float* weight, const float* bias, void* y, int64_t B, int64_t H,
                            int64_t W, int64_t C, int dtype, int act, void* stream);

// Bytes of scratch the CUDA backward needs (fp32 gz plus the weight-gradient partials).
int64_t dwconv3x3_gelu_bwd_cuda_workspace(int64_t B, int64_t H, int64_t W, int64_t C);

int dwconv3x3_gelu_bwd_cuda(const void* grad_y, const void* x, const float* weight, const float* bias, void* grad_x,
                            float* grad_weight, float* grad_bias, void* workspace, int64_t B, int64_t H, int64_t W,
                            int64_t C, int dtype, int act, void* stream);
}
