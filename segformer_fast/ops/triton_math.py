"""Math shared by the Triton kernels: PyTorch's bilinear source index, GELU and its derivative.

Bilinear (``upsample_bilinear2d`` with align_corners=False), used by the upsample_sum and
upsample_cross_entropy kernels: with scale = n_in / n_out in fp32, output index o reads
src = max(scale (o + 0.5) - 0.5, 0), the taps i0 = floor(src) and i1 = min(i0 + 1, n_in - 1), with
weights 1 - l1 and l1 = src - i0 (clamped to [0, 1]). A 2-D sample is the product of a row tap and
a column tap. The adjoint (the gradient of the input) is a gather: input index i sums over the
output indices from :func:`bilinear_first_reader` on, ``segformer_fast.ops.math_utils.bilinear_window``
of them, each with its exact weight from :func:`bilinear_weight`.

GELU (used by the dwconv3x3_gelu kernels), erf and tanh forms:
    GELU(z) = 0.5 z (1 + erf(z / sqrt 2)),      GELU'(z) = Phi(z) + z exp(-z^2 / 2) / sqrt(2 pi)
    GELU(z) = 0.5 z (1 + tanh(u)),  u = sqrt(2 / pi) (z + 0.044715 z^3),
    GELU'(z) = 0.5 (1 + t) + 0.5 z (1 - t^2) du/dz,  t = tanh(u),  du/dz = sqrt(2 / pi) (1 + 0.134145 z^2)

The same math in C++/CUDA is csrc/common/{bilinear,gelu}.h, in PyTorch segformer_fast/ops/math_utils.py.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = [
    "bilinear_tap",
    "bilinear_weight",
    "bilinear_first_reader",
    "lerp2d",
    "tanh",
    "gelu_erf",
    "gelu_tanh",
    "gelu_erf_grad",
    "gelu_tanh_grad",
]


@triton.jit
def bilinear_tap(o, scale, n_in):
    # Output indices o -> (i0, i1, l1): the two input indices read and the weight of i1 (i0's: 1 - l1).
    src = scale * (o.to(tl.float32) + 0.5) - 0.5
    src = tl.maximum(src, 0.0)
    i0 = src.to(tl.int32)  # floor, src >= 0
    i1 = tl.minimum(i0 + 1, n_in - 1)
    l1 = tl.minimum(tl.maximum(src - i0.to(tl.float32), 0.0), 1.0)
    return i0, i1, l1


@triton.jit
def bilinear_weight(o, i, scale, n_in, valid):
    # Weight with which output index o reads input index i (0 when it does not, or where not valid).
    i0, i1, l1 = bilinear_tap(o, scale, n_in)
    wt = tl.where(i0 == i, 1.0 - l1, 0.0) + tl.where(i1 == i, l1, 0.0)
    return tl.where(valid, wt, 0.0)


@triton.jit
def lerp2d(v00, v01, v10, v11, ly, lx):
    # The bilinear sample of four fp32 taps with fractions ly, lx (shapes that broadcast against the taps', e.g.
    # (P, 1) against (P, D)): the four products of weights are formed at the fractions' shape, once per pixel, so a
    # tap costs one multiply or FMA (4 per sample, not the nested form's 6). NaN/inf in any tap stays in the sum.
    wy0 = 1.0 - ly
    wx0 = 1.0 - lx
    return (wy0 * wx0) * v00 + (wy0 * lx) * v01 + (ly * wx0) * v10 + (ly * lx) * v11


@triton.jit
def bilinear_first_reader(i, scale):
    # A lower bound of the output indices that read input index i (int32): src(o) >= i - 1  <=>
    # o >= (i - 0.5) / scale - 0.5, less one index of margin (weights are recomputed exactly), >= 0.
    return tl.maximum(tl.floor((i.to(tl.float32) - 0.5) / scale - 0.5).to(tl.int32) - 1, 0)


@triton.jit
def tanh(u):
    # tanh from exp, stable for large |u| (the interpreter has no libdevice)
    e = tl.exp(-2.0 * tl.abs(u))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(u < 0.0, -t, t)


@triton.jit
def gelu_erf(z):
    return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))  # 1 / sqrt(2)


@triton.jit
def gelu_tanh(z):
    t = tanh((z + 0.044715 * z * z * z) * 0.7978845608028654)  # sqrt(2 / pi)
    return 0.5 * z * (1.0 + t)


@triton.jit
def gelu_erf_grad(z):
    cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
    return cdf + z * tl.exp(-0.5 * z * z) * 0.3989422804014327  # pdf = exp(-z^2 / 2) / sqrt(2 pi)


@triton.jit
def gelu_tanh_grad(z):
    t = tanh((z + 0.044715 * z * z * z) * 0.7978845608028654)
    du = (1.0 + 0.134145 * z * z) * 0.7978845608028654  # d/dz of the tanh argument
    return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * du
