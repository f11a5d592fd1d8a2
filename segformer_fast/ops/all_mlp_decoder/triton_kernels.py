"""The training decoder's BatchNorm / ReLU / dropout glue as Triton kernels (u is (N, D), D contiguous).

Around the fused pre-BN map u = upsample_sum(z_1..z_n) (N = B*H*W rows of D channels, channels-last,
fp32/fp16/bf16), training-mode BatchNorm, ReLU and dropout before the classifier:

    y = scale * u + shift,  scale = gamma * invstd,  shift = beta - mean * scale
    d = dropout(relu(y))    (the classifier's input, in u's dtype)

Forward, two reads of u and one write of d (unfused ATen: a fp32 copy of u, var_mean, three
in-place passes and a four-pass dropout):

- :func:`bn_stats_triton`: per-channel sum and sum of squares of (u - k), k = u[0] (a per-channel
  shift against cancellation in E[x^2] - E[x]^2), fp32, one read of u. Each program sums its rows
  in registers and writes one partial row; the partials are summed in a fixed order (torch.sum
  over the program axis, no atomics), so the statistics are deterministic.
- :func:`bn_relu_dropout_fwd_triton`: d = dropout(relu(scale * u + shift)) in one pass (in place
  on u when asked), fp32 arithmetic and one rounding to u's dtype.

Backward (u recomputed by the caller, g = dL/dd from the classifier GEMM), two passes:

- :func:`bn_relu_dropout_bwd_reduce_triton`: gy = g * keep / (1 - p) * [y > 0] on the fly and
  per-channel partial sums of gy and gy * xhat (xhat = (u - mean) * invstd), i.e. dL/dbeta and
  dL/dgamma; the same pass writes d again for the classifier's weight gradient (it reads u anyway).
- :func:`bn_relu_dropout_bwd_triton`: dL/du = gamma * invstd * (gy - sum(gy) / n - xhat * sum(gy xhat) / n)
  in u's dtype (in place on g when asked). No fp32 copy of a full-size tensor anywhere.

Dropout mask: generated in the kernels by Philox (``tl.rand4x(seed, offset)``) from a seed the caller
draws from torch's generator, not a 1-byte mask from torch. The backward regenerates the forward's
mask from the same seed in both passes, so nothing of size N*D is kept between forward and backward
and no generator state is saved or restored; a torch mask would be written once (N*D bytes) and read
three times (forward, both backward passes). One Philox call gives four uniforms, used for four
consecutive channels: the draw of element (row, c) is number c % 4 of the call at counter
key(row) * ceil(D / 4) + c // 4, with key(row) = row (element-wise dropout) or row // (H*W), the
image (dropout2d: one draw per image and channel). The draw depends on (seed, row, c) only, never
on the block sizes; :func:`dropout_keep_mask` writes the same mask for tests. An element is kept
when its uniform is >= p.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ...utils.debug import empty
from ..triton_launch import check_interpreter_dtypes, dot_precision, gpu_launch_config
from ..upsample_sum.triton_kernels import MAX_MAPS, _gather, _gather_sum, _map_args
from .op import MAX_CLASSES, MAX_STAGE_ONE_CHANNELS, class_blocks

__all__ = ["dropout_keep_mask", "bn_stats_triton", "bn_relu_dropout_fwd_triton", "bn_relu_dropout_bwd_reduce_triton",
           "bn_relu_dropout_bwd_triton", "bn_relu_dropout_linear_triton", "bn_stats_gather_triton", "bn_relu_dropout_bwd_reduce_linear_triton",
           "bn_relu_dropout_bwd_linear_triton", "class_blocks", "MAX_CLASSES", "StageOne", "MAX_STAGE_ONE_CHANNELS",
           "launch_config"]

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _keep(seed, rows, col0, D, HW, p, DROPOUT2D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # (BLOCK_R, BLOCK_D) keep mask of rows (int64) x columns [col0, col0 + BLOCK_D), col0 a multiple of 4
    key = rows // HW if DROPOUT2D else rows
    groups = col0 // 4 + tl.arange(0, BLOCK_D // 4)
    counter = key[:, None] * ((D + 3) // 4) + groups[None, :]  # (BLOCK_R, BLOCK_D // 4) int64
    r0, r1, r2, r3 = tl.rand4x(seed, counter)
    # (BLOCK_R, BLOCK_D // 4, 2, 2) -> channel 4 g + j takes draw j of call g (r0, r1, r2, r3 in order)
    r = tl.join(tl.join(r0, r2), tl.join(r1, r3))
    r = tl.reshape(r, (BLOCK_R, BLOCK_D))
    return r >= p


# kernels the model never launches: benchmarks/aot_compile.py leaves them out
DIAGNOSTIC_KERNELS = ("_dropout_mask_kernel",)  # dropout_keep_mask(), which tests use to rebuild the fused kernels' dropout mask


@triton.jit
def _dropout_mask_kernel(mask_ptr, seed, N, D, HW, p, DROPOUT2D: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    col0 = tl.program_id(1) * BLOCK_D
    cols = col0 + tl.arange(0, BLOCK_D)
    m = (rows < N)[:, None] & (cols < D)[None, :]
    keep = _keep(seed, rows, col0, D, HW, p, DROPOUT2D, BLOCK_R, BLOCK_D)
    tl.store(mask_ptr + rows[:, None] * D + cols[None, :], keep.to(tl.int8), mask=m)


@triton.jit
def _u_rows(z0_ptr, z1_ptr, z2_ptr, z3_ptr, h0, w0, sh0, sw0, h1, w1, sh1, sw1, h2, w2, sh2, sw2, h3, w3, sh3, sw3,
            rows, cols, m, H, W, D, NUM_MAPS: tl.constexpr):
    # u = upsample_sum(z_0..z_3) at the flat pixel rows (b * H + oh) * W + ow and channels cols, (BLOCK_R, BLOCK_D)
    # fp32 rounded to the maps' dtype: the upsample_sum op's Triton gather, and the value it stores
    ow = rows % W
    oh = (rows // W) % H
    b = rows // (W * H)
    u = _gather_sum(z0_ptr, z1_ptr, z2_ptr, z3_ptr, h0, w0, sh0, sw0, h1, w1, sh1, sw1, h2, w2, sh2, sw2, h3, w3, sh3,
                    sw3, b, oh, ow, cols, m, D, NUM_MAPS)
    return u.to(z0_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def _stage_one_features(c_ptr, C1, rows, N, HW, BLOCK_C1: tl.constexpr):
    # the finest stage's features c_1 at the flat pixel rows from NCHW (B, C1, H, W): (BLOCK_R, BLOCK_C1), zero past
    # N and C1, in c's dtype
    cc = tl.arange(0, BLOCK_C1)
    return tl.load(c_ptr + ((rows // HW) * C1 * HW + rows % HW)[:, None] + (cc * HW)[None, :],
                   mask=(rows < N)[:, None] & (cc < C1)[None, :], other=0.0)


@triton.jit
def _stage_one(c_ptr, aw_ptr, ab_ptr, C1, rows, cols, N, H, W, D, dt, HAS_AB: tl.constexpr, BLOCK_C1: tl.constexpr,
               PRECISION: tl.constexpr):
    # the finest stage's map z_1 = A_1 c_1 + a_1 at (rows, cols) from its NCHW features (B, C1, H, W): one tl.dot,
    # rounded to dt as the stage GEMM stores z_1; (BLOCK_R, BLOCK_D) fp32
    cc = tl.arange(0, BLOCK_C1)
    c_ok = cc < C1
    x = _stage_one_features(c_ptr, C1, rows, N, H * W, BLOCK_C1)
    w = tl.load(aw_ptr + cols[None, :] * C1 + cc[:, None], mask=c_ok[:, None] & (cols < D)[None, :], other=0.0)
    z = tl.dot(x.to(dt), w.to(dt), input_precision=PRECISION)
    if HAS_AB:
        z += tl.load(ab_ptr + cols, mask=cols < D, other=0.0).to(dt).to(tl.float32)[None, :]
    return z.to(dt).to(tl.float32)


@triton.jit
def _u_tile(z0_ptr, z1_ptr, z2_ptr, z3_ptr, f1_ptr, aw_ptr, ab_ptr, C1,
            h0, w0, sh0, sw0, h1, w1, sh1, sw1, h2, w2, sh2, sw2, h3, w3, sh3, sw3,
            rows, cols, m, N, H, W, D, NUM_MAPS: tl.constexpr, GATHER: tl.constexpr, HAS_C1: tl.constexpr,
            HAS_AB: tl.constexpr, BLOCK_C1: tl.constexpr, PRECISION: tl.constexpr):
    # u at (rows, cols), fp32. GATHER: u = upsample_sum of the stage maps, gathered (the maps z0.. ; with HAS_C1 the
    # finest map is computed here from its features, and z0.. are the coarser NUM_MAPS), rounded to the maps' dtype
    # as the op stores u. Else loaded from z0_ptr, u itself (N, D).
    if GATHER:
        if HAS_C1:
            dt = z0_ptr.dtype.element_ty
            ow = rows % W
            oh = (rows // W) % H
            b = rows // (W * H)
            u = _stage_one(f1_ptr, aw_ptr, ab_ptr, C1, rows, cols, N, H, W, D, dt, HAS_AB, BLOCK_C1, PRECISION)
            u += _gather(z0_ptr, h0, w0, sh0, sw0, b, oh, ow, cols, m, D)  # the upsample_sum kernel's order
            if NUM_MAPS > 1:
                u += _gather(z1_ptr, h1, w1, sh1, sw1, b, oh, ow, cols, m, D)
            if NUM_MAPS > 2:
                u += _gather(z2_ptr, h2, w2, sh2, sw2, b, oh, ow, cols, m, D)
            u = u.to(dt).to(tl.float32)
        else:
            u = _u_rows(z0_ptr, z1_ptr, z2_ptr, z3_ptr, h0, w0, sh0, sw0, h1, w1, sh1, sw1, h2, w2, sh2, sw2, h3, w3,
                        sh3, sw3, rows, cols, m, H, W, D, NUM_MAPS)
    else:
        u = tl.load(z0_ptr + rows[:, None] * D + cols[None, :], mask=m, other=0.0).to(tl.float32)
    return u


@triton.jit
def _bn_stats_kernel(z0_ptr, z1_ptr, z2_ptr, z3_ptr, f1_ptr, aw_ptr, ab_ptr, C1, part_ptr, k_ptr,
                     h0, w0, sh0, sw0, h1, w1, sh1, sw1, h2, w2, sh2, sw2, h3, w3, sh3, sw3,
                     N, H, W, D, P, ROWS_PER_PROG, NUM_MAPS: tl.constexpr, GATHER: tl.constexpr,
                     HAS_C1: tl.constexpr, HAS_AB: tl.constexpr, BLOCK_C1: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # partial sums of (u - k) and its square over ROWS_PER_PROG rows -> part[0, pid], part[1, pid], k = u[0] (written
    # by the first programs); u read (z0 is u) or gathered from the stage maps (GATHER, never stored)
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = cols < D
    r = tl.arange(0, BLOCK_R)
    first = _u_tile(z0_ptr, z1_ptr, z2_ptr, z3_ptr, f1_ptr, aw_ptr, ab_ptr, C1, h0, w0, sh0, sw0, h1, w1, sh1, sw1,
                    h2, w2, sh2, sw2, h3, w3, sh3, sw3, (r * 0).to(tl.int64), cols, (r == 0)[:, None] & mask_d[None, :], N, H, W, D, NUM_MAPS, GATHER, HAS_C1, HAS_AB,
                    BLOCK_C1, PRECISION)
    k = tl.sum(tl.where((r == 0)[:, None], first, 0.0), axis=0)  # u[0] exactly: the other rows add zeros
    tl.store(k_ptr + cols, k, mask=mask_d & (cols * 0 + pid == 0))
    s1 = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    s2 = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    row0 = pid.to(tl.int64) * ROWS_PER_PROG
    for i in range(0, ROWS_PER_PROG, BLOCK_R):
        rows = row0 + i + r
        m = (rows < N)[:, None] & mask_d[None, :]
        x = _u_tile(z0_ptr, z1_ptr, z2_ptr, z3_ptr, f1_ptr, aw_ptr, ab_ptr, C1, h0, w0, sh0, sw0, h1, w1, sh1, sw1,
                    h2, w2, sh2, sw2, h3, w3, sh3, sw3, rows, cols, m, N, H, W, D, NUM_MAPS, GATHER, HAS_C1, HAS_AB,
                    BLOCK_C1, PRECISION)
        x = tl.where(m, x - k[None, :], 0.0)
        s1 += x
        s2 += x * x
    tl.store(part_ptr + pid.to(tl.int64) * D + cols, tl.sum(s1, axis=0), mask=mask_d)
    tl.store(part_ptr + (P + pid).to(tl.int64) * D + cols, tl.sum(s2, axis=0), mask=mask_d)


@triton.jit
def _bn_vectors(mean_ptr, invstd_ptr, scale_ptr, shift_ptr, cols, mask_d):
    # the per-channel BatchNorm vectors (fp32) at channels cols
    return (tl.load(mean_ptr + cols, mask=mask_d, other=0.0), tl.load(invstd_ptr + cols, mask=mask_d, other=0.0),
            tl.load(scale_ptr + cols, mask=mask_d, other=0.0), tl.load(shift_ptr + cols, mask=mask_d, other=0.0))


@triton.jit
def _relu_dropout(u, scale, shift, keep, inv_keep, HAS_DROPOUT: tl.constexpr):
    # fp32 dropout(relu(scale * u + shift)) and where it is live (ReLU passed and kept); NaN stays NaN
    y = u * scale[None, :] + shift[None, :]
    live = ~(y <= 0.0)
    y = tl.where(live, y, 0.0)
    if HAS_DROPOUT:
        live = live & keep
        y = y * tl.where(keep, inv_keep, 0.0)  # a product, as torch's dropout: a dropped NaN stays NaN
    return y, live


@triton.jit
def _bn_relu_dropout_fwd_kernel(u_ptr, d_ptr, scale_ptr, shift_ptr, seed, N, D, HW, p, inv_keep,
                                HAS_DROPOUT: tl.constexpr, DROPOUT2D: tl.constexpr,
                                BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    col0 = tl.program_id(1) * BLOCK_D
    cols = col0 + tl.arange(0, BLOCK_D)
    mask_d = cols < D
    m = (rows < N)[:, None] & mask_d[None, :]
    scale = tl.load(scale_ptr + cols, mask=mask_d, other=0.0)
    shift = tl.load(shift_ptr + cols, mask=mask_d, other=0.0)
    offs = rows[:, None] * D + cols[None, :]
    u = tl.load(u_ptr + offs, mask=m, other=0.0).to(tl.float32)
    keep = None
    if HAS_DROPOUT:
        keep = _keep(seed, rows, col0, D, HW, p, DROPOUT2D, BLOCK_R, BLOCK_D)
    d, _ = _relu_dropout(u, scale, shift, keep, inv_keep, HAS_DROPOUT)
    tl.store(d_ptr + offs, d.to(d_ptr.dtype.element_ty), mask=m)


@triton.jit
def _bn_relu_dropout_bwd_reduce_kernel(u_ptr, g_ptr, d_ptr, part_ptr, mean_ptr, invstd_ptr, scale_ptr, shift_ptr,
                                       seed, N, D, HW, P, ROWS_PER_PROG, p, inv_keep,
                                       HAS_DROPOUT: tl.constexpr, DROPOUT2D: tl.constexpr,
                                       BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # partial sums of gy and gy * xhat -> part[0, pid], part[1, pid]; d written again
    pid = tl.program_id(0)
    col0 = tl.program_id(1) * BLOCK_D
    cols = col0 + tl.arange(0, BLOCK_D)
    mask_d = cols < D
    mean, invstd, scale, shift = _bn_vectors(mean_ptr, invstd_ptr, scale_ptr, shift_ptr, cols, mask_d)
    s1 = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    s2 = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    row0 = pid.to(tl.int64) * ROWS_PER_PROG
    for r in range(0, ROWS_PER_PROG, BLOCK_R):
        rows = row0 + r + tl.arange(0, BLOCK_R)
        m = (rows < N)[:, None] & mask_d[None, :]
        offs = rows[:, None] * D + cols[None, :]
        u = tl.load(u_ptr + offs, mask=m, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
        keep = None
        if HAS_DROPOUT:
            keep = _keep(seed, rows, col0, D, HW, p, DROPOUT2D, BLOCK_R, BLOCK_D)
        d, live = _relu_dropout(u, scale, shift, keep, inv_keep, HAS_DROPOUT)
        tl.store(d_ptr + offs, d.to(d_ptr.dtype.element_ty), mask=m)
        gy = tl.where(live & m, g * inv_keep, 0.0)
        xhat = (u - mean[None, :]) * invstd[None, :]
        s1 += gy
        s2 += gy * xhat
    tl.store(part_ptr + pid.to(tl.int64) * D + cols, tl.sum(s1, axis=0), mask=mask_d)
    tl.store(part_ptr + (P + pid).to(tl.int64) * D + cols, tl.sum(s2, axis=0), mask=mask_d)


@triton.jit
def _bn_relu_dropout_bwd_kernel(u_ptr, g_ptr, gu_ptr, mean_ptr, invstd_ptr, scale_ptr, shift_ptr, gscale_ptr,
                                c1_ptr, c2_ptr, seed, N, D, HW, p, inv_keep,
                                HAS_DROPOUT: tl.constexpr, DROPOUT2D: tl.constexpr,
                                BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # gu = gscale * (gy - c1 - xhat * c2), c1 = sum(gy) / n, c2 = sum(gy * xhat) / n
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    col0 = tl.program_id(1) * BLOCK_D
    cols = col0 + tl.arange(0, BLOCK_D)
    mask_d = cols < D
    m = (rows < N)[:, None] & mask_d[None, :]
    mean, invstd, scale, shift = _bn_vectors(mean_ptr, invstd_ptr, scale_ptr, shift_ptr, cols, mask_d)
    gscale = tl.load(gscale_ptr + cols, mask=mask_d, other=0.0)
    c1 = tl.load(c1_ptr + cols, mask=mask_d, other=0.0)
    c2 = tl.load(c2_ptr + cols, mask=mask_d, other=0.0)
    offs = rows[:, None] * D + cols[None, :]
    u = tl.load(u_ptr + offs, mask=m, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
    keep = None
    if HAS_DROPOUT:
        keep = _keep(seed, rows, col0, D, HW, p, DROPOUT2D, BLOCK_R, BLOCK_D)
    _, live = _relu_dropout(u, scale, shift, keep, inv_keep, HAS_DROPOUT)
    gy = tl.where(live, g * inv_keep, 0.0)
    xhat = (u - mean[None, :]) * invstd[None, :]
    gu = gscale[None, :] * (gy - c1[None, :] - xhat * c2[None, :])
    tl.store(gu_ptr + offs, gu.to(gu_ptr.dtype.element_ty), mask=m)


@triton.jit
def _bn_relu_dropout_linear_kernel(z0_ptr, z1_ptr, z2_ptr, z3_ptr, f1_ptr, aw_ptr, ab_ptr, C1, scale_ptr, shift_ptr,
                                   wc_ptr, bc_ptr, out_ptr,
                                   h0, w0, sh0, sw0, h1, w1, sh1, sw1, h2, w2, sh2, sw2, h3, w3, sh3, sw3,
                                   seed, N, H, W, D, K, p, inv_keep, NUM_MAPS: tl.constexpr, GATHER: tl.constexpr,
                                   HAS_C1: tl.constexpr, HAS_AB: tl.constexpr, BLOCK_C1: tl.constexpr,
                                   HAS_BC: tl.constexpr, HAS_DROPOUT: tl.constexpr, DROPOUT2D: tl.constexpr,
                                   PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                                   BLOCK_N1: tl.constexpr, BLOCK_N2: tl.constexpr):
    # logits = dropout(relu(scale * u + shift)) Wc^T + bc for BLOCK_R rows and every class, u = upsample_sum(z_i)
    # gathered per tile (never stored): classes [0, BLOCK_N1) in one accumulator and [BLOCK_N1, BLOCK_N1 + BLOCK_N2)
    # in a second (K = 150: 128 + 32 lanes, not 256), so u and d are computed once per element; d rounded to the
    # maps' dtype, as the unfused path stores it, before the dots
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    n1 = tl.arange(0, BLOCK_N1)
    acc1 = tl.zeros((BLOCK_R, BLOCK_N1), dtype=tl.float32)
    if BLOCK_N2 > 0:
        n2 = BLOCK_N1 + tl.arange(0, BLOCK_N2)
        acc2 = tl.zeros((BLOCK_R, BLOCK_N2), dtype=tl.float32)
    dt = z0_ptr.dtype.element_ty
    for col0 in range(0, D, BLOCK_D):
        cols = col0 + tl.arange(0, BLOCK_D)
        mask_d = cols < D
        m = row_ok[:, None] & mask_d[None, :]
        scale = tl.load(scale_ptr + cols, mask=mask_d, other=0.0)
        shift = tl.load(shift_ptr + cols, mask=mask_d, other=0.0)
        u = _u_tile(z0_ptr, z1_ptr, z2_ptr, z3_ptr, f1_ptr, aw_ptr, ab_ptr, C1, h0, w0, sh0, sw0, h1, w1, sh1, sw1,
                    h2, w2, sh2, sw2, h3, w3, sh3, sw3, rows, cols, m, N, H, W, D, NUM_MAPS, GATHER, HAS_C1, HAS_AB,
                    BLOCK_C1, PRECISION)
        keep = None
        if HAS_DROPOUT:
            keep = _keep(seed, rows, col0, D, H * W, p, DROPOUT2D, BLOCK_R, BLOCK_D)
        d, _ = _relu_dropout(u, scale, shift, keep, inv_keep, HAS_DROPOUT)
        d = tl.where(m, d, 0.0).to(dt)
        wt1 = tl.load(wc_ptr + n1[None, :] * D + cols[:, None], mask=mask_d[:, None] & (n1 < K)[None, :], other=0.0)
        acc1 += tl.dot(d, wt1.to(dt), input_precision=PRECISION)
        if BLOCK_N2 > 0:
            wt2 = tl.load(wc_ptr + n2[None, :] * D + cols[:, None], mask=mask_d[:, None] & (n2 < K)[None, :],
                         other=0.0)
            acc2 += tl.dot(d, wt2.to(dt), input_precision=PRECISION)
    if HAS_BC:
        acc1 += tl.load(bc_ptr + n1, mask=n1 < K, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * K + n1[None, :], acc1.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (n1 < K)[None, :])
    if BLOCK_N2 > 0:
        if HAS_BC:
            acc2 += tl.load(bc_ptr + n2, mask=n2 < K, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rows[:, None] * K + n2[None, :], acc2.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (n2 < K)[None, :])


@triton.jit
def _class_rows(gl_ptr, rows, row_ok, K, n, dt):
    # rows of the logits' gradient gl (N, K) for the classes n, (BLOCK_R, len(n)) in dt, zero past N and K
    return tl.load(gl_ptr + rows[:, None] * K + n[None, :], mask=row_ok[:, None] & (n < K)[None, :], other=0.0).to(dt)


@triton.jit
def _class_cols(wc_ptr, n, cols, mask_d, K, D, dt):
    # the classifier's weight Wc (K, D) at classes n x channels cols, (len(n), BLOCK_D) in dt
    return tl.load(wc_ptr + n[:, None] * D + cols[None, :], mask=(n < K)[:, None] & mask_d[None, :], other=0.0).to(dt)


@triton.jit
def _bn_relu_dropout_bwd_linear_kernel(z0_ptr, z1_ptr, z2_ptr, z3_ptr, f1_ptr, aw_ptr, ab_ptr, C1, gl_ptr, wc_ptr,
                                       gu_ptr, part_ptr, wpart_ptr,
                                       bpart_ptr, mean_ptr, invstd_ptr, scale_ptr, shift_ptr, gscale_ptr, c1_ptr, c2_ptr,
                                       h0, w0, sh0, sw0, h1, w1, sh1, sw1, h2, w2, sh2, sw2, h3, w3, sh3, sw3,
                                       seed, N, H, W, D, K, P, ROWS_PER_PROG, p, inv_keep,
                                       NUM_MAPS: tl.constexpr, GATHER: tl.constexpr, HAS_C1: tl.constexpr,
                                       HAS_AB: tl.constexpr, BLOCK_C1: tl.constexpr,
                                       REDUCE: tl.constexpr, STAGE_ONE_GRAD: tl.constexpr,
                                       HAS_DROPOUT: tl.constexpr, DROPOUT2D: tl.constexpr,
                                       PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                                       BLOCK_N1: tl.constexpr, BLOCK_N2: tl.constexpr):
    # The glue's backward with u gathered from the stage maps (GATHER; else read: z0 is u) and the classifier's
    # g = dL/dd = gl Wc computed per row tile (tl.dot, g rounded to u's
    # dtype as the unfused GEMM stores it), never stored. A program owns BLOCK_D channels (its Wc columns stay in
    # registers) and ROWS_PER_PROG rows.
    # REDUCE (pass 1): part[0/1, pid] = sums of gy and gy * xhat; wpart[pid] = gl^T d (its dWc columns), d
    #   recomputed and never stored; bpart[pid] = sum gl (dbc), from the first channel block's programs.
    # else (pass 2): gu = gscale * (gy - c1 - xhat * c2) and part[pid] = its fp32 column sums; with STAGE_ONE_GRAD
    #   (HAS_C1) also wpart[pid] = gu^T c_1 over its rows, (BLOCK_D, C1) blocks of the finest stage's dA_1 (D, C1):
    #   the finest stage's map is at (H, W), its gradient is gu itself, so dA_1 = sum gu^T c_1 needs no other read.
    cb = tl.program_id(0)
    pid = tl.program_id(1)
    dt = z0_ptr.dtype.element_ty
    col0 = cb * BLOCK_D
    cols = col0 + tl.arange(0, BLOCK_D)
    mask_d = cols < D
    mean, invstd, scale, shift = _bn_vectors(mean_ptr, invstd_ptr, scale_ptr, shift_ptr, cols, mask_d)
    n1 = tl.arange(0, BLOCK_N1)
    wt1 = _class_cols(wc_ptr, n1, cols, mask_d, K, D, dt)
    if BLOCK_N2 > 0:
        n2 = BLOCK_N1 + tl.arange(0, BLOCK_N2)
        wt2 = _class_cols(wc_ptr, n2, cols, mask_d, K, D, dt)
    if REDUCE:
        s1 = tl.zeros((BLOCK_D,), dtype=tl.float32)
        s2 = tl.zeros((BLOCK_D,), dtype=tl.float32)
        dw1 = tl.zeros((BLOCK_N1, BLOCK_D), dtype=tl.float32)
        b1 = tl.zeros((BLOCK_N1,), dtype=tl.float32)
        if BLOCK_N2 > 0:
            dw2 = tl.zeros((BLOCK_N2, BLOCK_D), dtype=tl.float32)
            b2 = tl.zeros((BLOCK_N2,), dtype=tl.float32)
    else:
        gscale = tl.load(gscale_ptr + cols, mask=mask_d, other=0.0)
        c1 = tl.load(c1_ptr + cols, mask=mask_d, other=0.0)
        c2 = tl.load(c2_ptr + cols, mask=mask_d, other=0.0)
        s_gu = tl.zeros((BLOCK_D,), dtype=tl.float32)
        if STAGE_ONE_GRAD:
            ga1 = tl.zeros((BLOCK_D, BLOCK_C1), dtype=tl.float32)
    row0 = pid.to(tl.int64) * ROWS_PER_PROG
    for r in range(0, ROWS_PER_PROG, BLOCK_R):
        rows = row0 + r + tl.arange(0, BLOCK_R)
        row_ok = rows < N
        m = row_ok[:, None] & mask_d[None, :]
        offs = rows[:, None] * D + cols[None, :]
        u = _u_tile(z0_ptr, z1_ptr, z2_ptr, z3_ptr, f1_ptr, aw_ptr, ab_ptr, C1, h0, w0, sh0, sw0, h1, w1, sh1, sw1,
                    h2, w2, sh2, sw2, h3, w3, sh3, sw3, rows, cols, m, N, H, W, D, NUM_MAPS, GATHER, HAS_C1, HAS_AB,
                    BLOCK_C1, PRECISION)
        gl1 = _class_rows(gl_ptr, rows, row_ok, K, n1, dt)
        g = tl.dot(gl1, wt1, input_precision=PRECISION)
        if BLOCK_N2 > 0:
            gl2 = _class_rows(gl_ptr, rows, row_ok, K, n2, dt)
            g = tl.dot(gl2, wt2, g, input_precision=PRECISION)
        g = g.to(dt).to(tl.float32)
        keep = None
        if HAS_DROPOUT:
            keep = _keep(seed, rows, col0, D, H * W, p, DROPOUT2D, BLOCK_R, BLOCK_D)
        d, live = _relu_dropout(u, scale, shift, keep, inv_keep, HAS_DROPOUT)
        gy = tl.where(live & m, g * inv_keep, 0.0)
        xhat = (u - mean[None, :]) * invstd[None, :]
        if REDUCE:
            s1 += tl.sum(gy, axis=0)
            s2 += tl.sum(gy * xhat, axis=0)
            d = tl.where(m, d, 0.0).to(dt)  # the forward's d, rounded as stored there
            dw1 += tl.dot(tl.trans(gl1), d, input_precision=PRECISION)
            b1 += tl.sum(gl1.to(tl.float32), axis=0)
            if BLOCK_N2 > 0:
                dw2 += tl.dot(tl.trans(gl2), d, input_precision=PRECISION)
                b2 += tl.sum(gl2.to(tl.float32), axis=0)
        else:
            gu = gscale[None, :] * (gy - c1[None, :] - xhat * c2[None, :])
            gu_st = gu.to(gu_ptr.dtype.element_ty)
            tl.store(gu_ptr + offs, gu_st, mask=m)
            s_gu += tl.sum(tl.where(m, gu, 0.0), axis=0)
            if STAGE_ONE_GRAD:  # dA_1 from gu as stored (rounded), as the GEMM on the stored gu computes it
                x1 = _stage_one_features(f1_ptr, C1, rows, N, H * W, BLOCK_C1).to(dt)
                ga1 += tl.dot(tl.trans(tl.where(m, gu_st, 0.0).to(dt)), x1, input_precision=PRECISION)
    if REDUCE:
        pid64 = pid.to(tl.int64)
        tl.store(part_ptr + pid64 * D + cols, s1, mask=mask_d)
        tl.store(part_ptr + (P + pid64) * D + cols, s2, mask=mask_d)
        first = n1 * 0 + cb == 0  # a vector: the interpreter mistypes scalar & block masks
        tl.store(wpart_ptr + (pid64 * K + n1[:, None]) * D + cols[None, :], dw1, mask=(n1 < K)[:, None] & mask_d[None, :])
        tl.store(bpart_ptr + pid64 * K + n1, b1, mask=(n1 < K) & first)
        if BLOCK_N2 > 0:
            tl.store(wpart_ptr + (pid64 * K + n2[:, None]) * D + cols[None, :], dw2,
                     mask=(n2 < K)[:, None] & mask_d[None, :])
            tl.store(bpart_ptr + pid64 * K + n2, b2, mask=(n2 < K) & (n2 * 0 + cb == 0))
    else:
        tl.store(part_ptr + pid.to(tl.int64) * D + cols, s_gu, mask=mask_d)
        if STAGE_ONE_GRAD:
            cc = tl.arange(0, BLOCK_C1)
            tl.store(wpart_ptr + (pid.to(tl.int64) * D + cols[:, None]) * C1 + cc[None, :], ga1,
                     mask=mask_d[:, None] & (cc < C1)[None, :])


# ---------------------------------------------------------------------------------------------
# launchers


def launch_config(t: torch.Tensor) -> dict:
    """Block sizes for u like ``t``: the GPU's, or small ones for the interpreter (fewer, smaller programs).

    BLOCK_D is a multiple of 4 (four channels share one Philox call). REDUCE_PROGRAMS: about how many
    row ranges the reductions split N into (their partials, summed afterwards).
    """
    if gpu_launch_config(t):
        return dict(BLOCK_R=32, BLOCK_D=128, num_warps=8, REDUCE_PROGRAMS=256)
    return dict(BLOCK_R=64, BLOCK_D=32, num_warps=1, REDUCE_PROGRAMS=4)


def _check(op: str, u: torch.Tensor, *others: torch.Tensor) -> tuple[int, int]:
    if u.dim() != 2 or not u.is_contiguous():
        raise ValueError(f"{op}: u must be a contiguous (N, D) tensor, got shape {tuple(u.shape)} "
                         f"(contiguous={u.is_contiguous()})")
    if u.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"{op} (triton): u must be float32, float16 or bfloat16, got {u.dtype}")
    for t in others:
        if t.shape != u.shape or not t.is_contiguous() or t.dtype != u.dtype:
            raise ValueError(f"{op}: expected a contiguous {tuple(u.shape)} {u.dtype} tensor like u, got "
                             f"{tuple(t.shape)} {t.dtype}")
    check_interpreter_dtypes(op, u, *others)
    N, D = u.shape
    if N == 0 or D == 0:
        raise ValueError(f"{op}: u is empty, shape {tuple(u.shape)}")
    return N, D


def _vec(t: torch.Tensor, D: int, name: str) -> torch.Tensor:
    if t.shape != (D,):
        raise ValueError(f"{name} must be ({D},), got {tuple(t.shape)}")
    return t.to(torch.float32).contiguous()


def _dropout_args(p: float, HW: int, dropout2d: bool) -> tuple[float, float]:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if dropout2d and HW <= 0:
        raise ValueError(f"dropout2d needs the pixels per image, got HW={HW}")
    return float(p), 1.0 / (1.0 - p)


def _reduce_split(N: int, cfg: dict) -> tuple[int, int]:
    """(programs along N, rows per program), rows per program a multiple of BLOCK_R."""
    block_r = cfg["BLOCK_R"]
    per = triton.cdiv(triton.cdiv(N, cfg["REDUCE_PROGRAMS"]), block_r) * block_r
    return triton.cdiv(N, per), per


def dropout_keep_mask(seed: int, N: int, D: int, p: float, HW: int = 1, dropout2d: bool = False,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """The (N, D) bool keep mask the kernels draw for ``seed`` (see the module docstring).

    Example:
        >>> keep = dropout_keep_mask(1234, 6, 40, 0.1)  # d = relu(y) * keep / (1 - p)
    """
    _dropout_args(p, HW, dropout2d)
    probe = torch.empty(0, device=device)
    cfg = launch_config(probe)
    mask = torch.empty(N, D, dtype=torch.int8, device=device)
    grid = (triton.cdiv(N, cfg["BLOCK_R"]), triton.cdiv(D, cfg["BLOCK_D"]))
    _dropout_mask_kernel[grid](mask, seed, N, D, max(HW, 1), p, DROPOUT2D=dropout2d,
                               BLOCK_R=cfg["BLOCK_R"], BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"])
    return mask.bool()


def bn_relu_dropout_fwd_triton(u: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, p: float = 0.0,
                               seed: int = 0, HW: int = 1, dropout2d: bool = False,
                               out: torch.Tensor | None = None) -> torch.Tensor:
    """d = dropout(relu(scale * u + shift)), (N, D) in u's dtype; ``out=u`` writes it in place.

    Args:
        u: (N, D) contiguous. scale, shift: (D,). p: the dropout probability (0: none). seed: the
        Philox seed of the mask. HW: pixels per image (dropout2d's per-image draw). out: the output.
    """
    N, D = _check("bn_relu_dropout_fwd", u, *(() if out is None else (out,)))
    p, inv_keep = _dropout_args(p, HW, dropout2d)
    scale, shift = _vec(scale, D, "scale"), _vec(shift, D, "shift")
    cfg = launch_config(u)
    d = empty(N, D, dtype=u.dtype, device=u.device) if out is None else out
    grid = (triton.cdiv(N, cfg["BLOCK_R"]), triton.cdiv(D, cfg["BLOCK_D"]))
    _bn_relu_dropout_fwd_kernel[grid](u, d, scale, shift, seed, N, D, max(HW, 1), p, inv_keep,
                                      HAS_DROPOUT=p > 0, DROPOUT2D=dropout2d, BLOCK_R=cfg["BLOCK_R"],
                                      BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"])
    return d


def bn_relu_dropout_bwd_reduce_triton(u: torch.Tensor, g: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                                      scale: torch.Tensor, shift: torch.Tensor, p: float = 0.0, seed: int = 0,
                                      HW: int = 1, dropout2d: bool = False
                                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward pass 1: (d (N, D) in u's dtype, sum(gy) (D,), sum(gy * xhat) (D,)), sums fp32.

    g is dL/dd (N, D); gy = g * keep / (1 - p) * [scale * u + shift > 0] is dL/dy of the BN output y.
    """
    N, D = _check("bn_relu_dropout_bwd_reduce", u, g)
    p, inv_keep = _dropout_args(p, HW, dropout2d)
    mean, invstd = _vec(mean, D, "mean"), _vec(invstd, D, "invstd")
    scale, shift = _vec(scale, D, "scale"), _vec(shift, D, "shift")
    cfg = launch_config(u)
    P, per = _reduce_split(N, cfg)
    d = empty(N, D, dtype=u.dtype, device=u.device)
    part = empty(2, P, D, dtype=torch.float32, device=u.device)
    grid = (P, triton.cdiv(D, cfg["BLOCK_D"]))
    _bn_relu_dropout_bwd_reduce_kernel[grid](u, g, d, part, mean, invstd, scale, shift, seed, N, D, max(HW, 1), P,
                                             per, p, inv_keep, HAS_DROPOUT=p > 0, DROPOUT2D=dropout2d,
                                             BLOCK_R=cfg["BLOCK_R"], BLOCK_D=cfg["BLOCK_D"],
                                             num_warps=cfg["num_warps"])
    sum_g, sum_gx = part.sum(1)
    return d, sum_g, sum_gx


def bn_relu_dropout_bwd_triton(u: torch.Tensor, g: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                               scale: torch.Tensor, shift: torch.Tensor, gscale: torch.Tensor, sum_g: torch.Tensor,
                               sum_gx: torch.Tensor, count: int, p: float = 0.0, seed: int = 0, HW: int = 1,
                               dropout2d: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """Backward pass 2: dL/du = gscale * (gy - sum_g / count - xhat * sum_gx / count), (N, D) in u's dtype.

    gscale: (D,) gamma * invstd; sum_g, sum_gx: pass 1's sums (all-reduced over a process group when
    distributed), count: values per channel they cover. ``out=g`` writes in place.
    """
    N, D = _check("bn_relu_dropout_bwd", u, g, *(() if out is None else (out,)))
    p, inv_keep = _dropout_args(p, HW, dropout2d)
    vecs = [_vec(t, D, name) for t, name in ((mean, "mean"), (invstd, "invstd"), (scale, "scale"), (shift, "shift"),
                                              (gscale, "gscale"))]
    c1, c2 = _vec(sum_g, D, "sum_g") / count, _vec(sum_gx, D, "sum_gx") / count
    cfg = launch_config(u)
    gu = empty(N, D, dtype=u.dtype, device=u.device) if out is None else out
    grid = (triton.cdiv(N, cfg["BLOCK_R"]), triton.cdiv(D, cfg["BLOCK_D"]))
    _bn_relu_dropout_bwd_kernel[grid](u, g, gu, *vecs, c1, c2, seed, N, D, max(HW, 1), p, inv_keep,
                                      HAS_DROPOUT=p > 0, DROPOUT2D=dropout2d, BLOCK_R=cfg["BLOCK_R"],
                                      BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"])
    return gu


def _maps(op: str, maps: list[torch.Tensor], H: int, W: int) -> tuple[list[torch.Tensor], list, int, int]:
    """The stage maps (1..4 contiguous (B, h_i, w_i, D), one dtype) as the gather takes them: 4 pointers, their
    (h, w, scale_h, scale_w), N = B * H * W rows and D."""
    if not 1 <= len(maps) <= MAX_MAPS:
        raise ValueError(f"{op}: 1 to {MAX_MAPS} maps, got {len(maps)}")
    B, D = maps[0].shape[0], maps[0].shape[-1]
    for m in maps:
        if m.dim() != 4 or m.shape[0] != B or m.shape[3] != D or not m.is_contiguous() or m.dtype != maps[0].dtype:
            raise ValueError(f"{op}: maps must be contiguous (B={B}, h, w, D={D}) tensors of one dtype, got "
                             f"{[(tuple(t.shape), t.dtype) for t in maps]}")
    if maps[0].dtype not in _KERNEL_DTYPES:
        raise TypeError(f"{op} (triton): maps must be float32, float16 or bfloat16, got {maps[0].dtype}")
    check_interpreter_dtypes(op, *maps)
    N = B * H * W
    if N == 0 or D == 0:
        raise ValueError(f"{op}: u is empty, (B, H, W, D) = {(B, H, W, D)}")
    return [maps[min(i, len(maps) - 1)] for i in range(MAX_MAPS)], _map_args(maps, H, W), N, D


class StageOne(NamedTuple):
    """The finest stage given by its features instead of its map: z_1 = A c + a is computed inside the kernels that
    gather u (one tl.dot per tile), so it is never stored. c: (B, C1, H, W) contiguous NCHW, C1 <= 128; A: (D, C1);
    a: (D,) or None."""

    c: torch.Tensor
    A: torch.Tensor
    a: torch.Tensor | None


def _u_source(op: str, u, H: int, W: int) -> tuple[list, list, list, int, int, dict]:
    """The kernels' view of u: u itself, a contiguous (N = B * H * W, D) tensor (read); or a list of stage maps
    (gathered, see :func:`_maps`), the first of which may be a :class:`StageOne`. Returns (the 4 map pointers, the
    stage-one arguments (c, A, a, C1), the maps' 16 sizes and scales, N, D, the source's constexprs)."""
    if not isinstance(u, (list, tuple)):
        N, D = _check(op, u)
        if N % max(H * W, 1):
            raise ValueError(f"{op}: u has {N} rows, not a multiple of H * W = {H * W}")
        meta = dict(NUM_MAPS=1, GATHER=False, HAS_C1=False, HAS_AB=False, BLOCK_C1=16)
        return [u] * MAX_MAPS, [u, u, u, 1], [1, 1, 1.0, 1.0] * MAX_MAPS, N, D, meta
    u = list(u)
    one = u[0] if u and isinstance(u[0], StageOne) else None
    rest = u[1:] if one is not None else u
    zs, args, N, D = _maps(op, rest, H, W)
    if one is None:
        meta = dict(NUM_MAPS=len(rest), GATHER=True, HAS_C1=False, HAS_AB=False, BLOCK_C1=16)
        return zs, [zs[0], zs[0], zs[0], 1], args, N, D, meta
    c, A, a = one
    B = rest[0].shape[0]
    if (c.dim() != 4 or c.shape[0] != B or tuple(c.shape[2:]) != (H, W) or not c.is_contiguous()
            or c.dtype != rest[0].dtype or not 1 <= c.shape[1] <= MAX_STAGE_ONE_CHANNELS):
        raise ValueError(f"{op}: the finest stage's features must be a contiguous (B={B}, C1 <= "
                         f"{MAX_STAGE_ONE_CHANNELS}, {H}, {W}) {rest[0].dtype} tensor, got {tuple(c.shape)} {c.dtype}")
    C1 = c.shape[1]
    if tuple(A.shape) != (D, C1) or (a is not None and tuple(a.shape) != (D,)):
        raise ValueError(f"{op}: the finest stage's A must be ({D}, {C1}) and a ({D},), got {tuple(A.shape)} and "
                         f"{None if a is None else tuple(a.shape)}")
    A = A.contiguous()
    meta = dict(NUM_MAPS=len(rest), GATHER=True, HAS_C1=True, HAS_AB=a is not None,
                BLOCK_C1=max(16, triton.next_power_of_2(C1)))
    return zs, [c, A, a.contiguous() if a is not None else A, C1], args, N, D, meta


def bn_stats_triton(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel batch mean and biased variance of u (N, D), fp32 (D,) each, from one read of u."""
    return _bn_stats(u, 1, u.shape[0] if u.dim() == 2 else 0)


def bn_stats_gather_triton(maps: list[torch.Tensor], H: int, W: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`bn_stats_triton` of u = upsample_sum(maps, (H, W)) (rounded to the maps' dtype as the op stores it),
    gathered from the maps tile by tile: u is never stored. Returns (mean, biased var), fp32 (D,) each."""
    return _bn_stats(list(maps), H, W)


def _bn_stats(u, H: int, W: int) -> tuple[torch.Tensor, torch.Tensor]:
    zs, src, args, N, D, meta = _u_source("bn_stats", u, H, W)
    cfg = launch_config(zs[0])
    if meta["HAS_C1"] and zs[0].dtype == torch.float32 and gpu_launch_config(zs[0]):
        cfg["BLOCK_D"] = 32  # the stage-one dot in exact fp32 (FMAs) on 128 channels spills 10 KB
    P, per = _reduce_split(N, cfg)
    part = empty(2, P, D, dtype=torch.float32, device=zs[0].device)
    k = empty(D, dtype=torch.float32, device=zs[0].device)
    _bn_stats_kernel[(P, triton.cdiv(D, cfg["BLOCK_D"]))](
        *zs, *src, part, k, *args, N, H, W, D, P, per, **meta, PRECISION=dot_precision(zs[0].dtype),
        BLOCK_R=cfg["BLOCK_R"], BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"])
    s1, s2 = part.sum(1).div_(N)  # E[u - k], E[(u - k)^2], fixed order
    return k + s1, (s2 - s1 * s1).clamp_min_(0.0)


def bn_relu_dropout_linear_triton(maps: list[torch.Tensor], H: int, W: int, scale: torch.Tensor, shift: torch.Tensor,
                                  wc: torch.Tensor, bc: torch.Tensor | None, p: float = 0.0, seed: int = 0,
                                  dropout2d: bool = False) -> torch.Tensor:
    """logits = dropout(relu(scale * u + shift)) Wc^T + bc in one kernel, u = upsample_sum(maps, (H, W)) gathered
    per tile; (B*H*W, K) in the maps' dtype. Neither u nor d is stored.

    Args:
        maps: 1..4 contiguous (B, h_i, w_i, D) of one dtype, or u itself, (B*H*W, D) contiguous. scale, shift: (D,).
        wc: (K, D), K <= MAX_CLASSES; bc: (K,) or None. p, seed, dropout2d: the dropout, drawn as
        :func:`bn_relu_dropout_fwd_triton` draws it with HW = H * W (the same mask).
    """
    zs, src, args, N, D, meta = _u_source("bn_relu_dropout_linear", maps, H, W)
    p, inv_keep = _dropout_args(p, H * W, dropout2d)
    scale, shift = _vec(scale, D, "scale"), _vec(shift, D, "shift")
    if wc.dim() != 2 or wc.shape[1] != D or (bc is not None and bc.shape != (wc.shape[0],)):
        raise ValueError(f"bn_relu_dropout_linear: wc must be (K, {D}) and bc (K,), got {tuple(wc.shape)} and "
                         f"{None if bc is None else tuple(bc.shape)}")
    K = wc.shape[0]
    n1, n2 = class_blocks(K)
    check_interpreter_dtypes("bn_relu_dropout_linear", wc, bc)
    z0 = zs[0]
    out = empty(N, K, dtype=z0.dtype, device=z0.device)
    gpu = gpu_launch_config(z0)
    fp32 = z0.dtype == torch.float32
    block_r = 64 if gpu and not fp32 else 32  # fp32: 64 rows spill 24 B at sm_90 with the stage-one dot
    stages = 1 if fp32 else 3  # fp32 pipelined: 16-44 B spilled at sm_90/sm_80
    _bn_relu_dropout_linear_kernel[(triton.cdiv(N, block_r),)](
        *zs, *src, scale, shift, wc.to(z0.dtype).contiguous(), bc if bc is not None else scale, out, *args, seed, N,
        H, W, D, K, p, inv_keep, **meta, HAS_BC=bc is not None,
        HAS_DROPOUT=p > 0, DROPOUT2D=dropout2d, PRECISION=dot_precision(z0.dtype), BLOCK_R=block_r, BLOCK_D=32,
        BLOCK_N1=n1, BLOCK_N2=n2, num_warps=8 if gpu else 1, num_stages=stages)
    return out


def _linear_bwd_config(u: torch.Tensor, reduce: bool, stage_one_grad: bool = False) -> dict:
    """The fused backward's tile: BLOCK_R rows x BLOCK_D channels (a program's Wc columns and, in pass 1, its dWc
    block stay in registers: (160, 64) each for K = 150 in 16 bits, (160, 32) in fp32), about REDUCE_PROGRAMS row
    ranges per channel block. Pass 1 holds more (dWc, the sums): 16 rows a tile. Pass 2 summing dA_1
    (``stage_one_grad``) holds its (BLOCK_D, C1) block: 16 rows x 32 channels (64 channels spill 330-440 B at sm_80
    in 16 bits). No spills at sm_90 or sm_80 with u gathered from four maps (AOT report)."""
    if gpu_launch_config(u):
        fp32 = u.dtype == torch.float32
        heavy = reduce or stage_one_grad
        return dict(BLOCK_R=16 if heavy or fp32 else 32, BLOCK_D=32 if fp32 or stage_one_grad else 64,
                    num_warps=4 if fp32 and not heavy else 8, num_stages=1, REDUCE_PROGRAMS=128)
    return dict(BLOCK_R=32, BLOCK_D=32, num_warps=1, num_stages=1, REDUCE_PROGRAMS=3)


def _linear_bwd(u, H, W, gl, wc, vecs, cvecs, p, seed, dropout2d, reduce: bool, stage_one_grad: bool = False):
    op = "bn_relu_dropout_bwd_linear"
    zs, src, args, N, D, meta = _u_source(op, u, H, W)
    z0 = zs[0]
    if gl.dim() != 2 or gl.shape[0] != N or wc.shape != (gl.shape[1], D):
        raise ValueError(f"{op}: gl must be (N={N}, K) and wc (K, {D}), got {tuple(gl.shape)} and {tuple(wc.shape)}")
    check_interpreter_dtypes(op, gl, wc)
    K = gl.shape[1]
    n1, n2 = class_blocks(K)
    p, inv_keep = _dropout_args(p, H * W, dropout2d)
    stage_one_grad = stage_one_grad and meta["HAS_C1"]
    cfg = _linear_bwd_config(z0, reduce, stage_one_grad)
    P, per = _reduce_split(N, cfg)
    gl, wc = gl.to(z0.dtype).contiguous(), wc.to(z0.dtype).contiguous()
    f32 = dict(dtype=torch.float32, device=z0.device)
    part = empty(2 if reduce else 1, P, D, **f32)
    C1 = src[3]
    wpart = empty(P, K, D, **f32) if reduce else empty(P, D, C1, **f32) if stage_one_grad else vecs[0]
    bpart = empty(P, K, **f32) if reduce else vecs[0]
    gu = vecs[0] if reduce else empty(N, D, dtype=z0.dtype, device=z0.device)
    _bn_relu_dropout_bwd_linear_kernel[(triton.cdiv(D, cfg["BLOCK_D"]), P)](
        *zs, *src, gl, wc, gu, part, wpart, bpart, *vecs, *cvecs, *args, seed, N, H, W, D, K, P, per, p, inv_keep,
        **meta, REDUCE=reduce, STAGE_ONE_GRAD=stage_one_grad, HAS_DROPOUT=p > 0, DROPOUT2D=dropout2d,
        PRECISION=dot_precision(z0.dtype), BLOCK_R=cfg["BLOCK_R"], BLOCK_D=cfg["BLOCK_D"], BLOCK_N1=n1, BLOCK_N2=n2,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if reduce:
        sum_g, sum_gx = part.sum(1)  # fixed-order reductions over the row ranges
        return sum_g, sum_gx, wpart.sum(0), bpart.sum(0)
    return gu, part[0].sum(0), wpart.sum(0) if stage_one_grad else None


def bn_relu_dropout_bwd_reduce_linear_triton(u, H: int, W: int, gl: torch.Tensor, wc: torch.Tensor,
                                             mean: torch.Tensor, invstd: torch.Tensor, scale: torch.Tensor,
                                             shift: torch.Tensor, p: float = 0.0, seed: int = 0, dropout2d: bool = False
                                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward pass 1 with the classifier fused: (sum(gy) (D,), sum(gy * xhat) (D,), dWc = gl^T d (K, D),
    dbc = sum gl (K,)), all fp32. u: the stage maps (u gathered per tile, never stored) or u itself (B*H*W, D);
    gl (B*H*W, K) is the logits' gradient, wc (K, D) the classifier, K <= MAX_CLASSES; g = gl Wc and d are computed
    per tile and never stored."""
    D = u[-1].shape[-1] if isinstance(u, (list, tuple)) else u.shape[-1]
    vecs = [_vec(t, D, name) for t, name in ((mean, "mean"), (invstd, "invstd"), (scale, "scale"), (shift, "shift"))]
    return _linear_bwd(u, H, W, gl, wc, vecs, vecs[:3], p, seed, dropout2d, reduce=True)


def bn_relu_dropout_bwd_linear_triton(u, H: int, W: int, gl: torch.Tensor, wc: torch.Tensor, mean: torch.Tensor,
                                      invstd: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                                      gscale: torch.Tensor, sum_g: torch.Tensor, sum_gx: torch.Tensor, count: int,
                                      p: float = 0.0, seed: int = 0, dropout2d: bool = False,
                                      stage_one_grad: bool = False
                                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Backward pass 2 with the classifier fused: (dL/du as :func:`bn_relu_dropout_bwd_triton` gives it, (B*H*W, D)
    in u's dtype; its column sums (D,) fp32, from the values before rounding; with ``stage_one_grad`` and the finest
    stage given as a :class:`StageOne`, dA_1 = sum over pixels of (dL/du as stored)^T c_1, (D, C1) fp32, else None),
    u and g = gl Wc as in pass 1."""
    D = u[-1].shape[-1] if isinstance(u, (list, tuple)) else u.shape[-1]
    vecs = [_vec(t, D, name) for t, name in ((mean, "mean"), (invstd, "invstd"), (scale, "scale"), (shift, "shift"))]
    cvecs = [_vec(gscale, D, "gscale"), _vec(sum_g, D, "sum_g") / count, _vec(sum_gx, D, "sum_gx") / count]
    return _linear_bwd(u, H, W, gl, wc, vecs, cvecs, p, seed, dropout2d, reduce=False, stage_one_grad=stage_one_grad)
