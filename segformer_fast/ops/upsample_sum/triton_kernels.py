"""Upsample-and-sum Triton kernels (channels-last: every tensor is (B, h, w, D), D contiguous).

Forward, one pass over the (B, H, W, D) output: for each output pixel the 4-tap bilinear gather
of each low-resolution map (PyTorch's align_corners=False source index, clamped at 0; see
ops/triton_math.py), summed in fp32, then the optional per-channel affine and ReLU.

Backward: a prep pass applies the ReLU mask and the scale to the incoming gradient and writes
per-block partial sums for the scale/shift gradients (recomputing the pre-affine sum by the same
gather); then, per map, the adjoint of the upsampling as a gather: every low-resolution pixel
sums the gradient over the window of output pixels that read it, weights recomputed exactly as
in the forward. No atomics, so results are deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...utils.debug import empty
from ..math_utils import bilinear_window
from ..triton_launch import check_interpreter_dtypes, gpu_launch_config
from ..triton_math import bilinear_first_reader, bilinear_tap, bilinear_weight

__all__ = ["launch_config", "upsample_sum_fwd_triton", "upsample_sum_bwd_triton"]

MAX_MAPS = 4


@triton.jit
def _gather(z_ptr, h, w, scale_h, scale_w, b, oh, ow, offs_d, mask, D):
    # (BLOCK_P, BLOCK_D) bilinear sample of map z (B, h, w, D) at output pixels (b, oh, ow).
    y0, y1, ly = bilinear_tap(oh, scale_h, h)
    x0, x1, lx = bilinear_tap(ow, scale_w, w)
    row0 = (b * h + y0) * w
    row1 = (b * h + y1) * w
    d = offs_d[None, :]
    v00 = tl.load(z_ptr + ((row0 + x0) * D)[:, None] + d, mask=mask, other=0.0).to(tl.float32)
    v01 = tl.load(z_ptr + ((row0 + x1) * D)[:, None] + d, mask=mask, other=0.0).to(tl.float32)
    v10 = tl.load(z_ptr + ((row1 + x0) * D)[:, None] + d, mask=mask, other=0.0).to(tl.float32)
    v11 = tl.load(z_ptr + ((row1 + x1) * D)[:, None] + d, mask=mask, other=0.0).to(tl.float32)
    ly = ly[:, None]
    lx = lx[:, None]
    return (1.0 - ly) * ((1.0 - lx) * v00 + lx * v01) + ly * ((1.0 - lx) * v10 + lx * v11)


@triton.jit
def _gather_sum(
    z0_ptr, z1_ptr, z2_ptr, z3_ptr,
    h0, w0, sh0, sw0, h1, w1, sh1, sw1, h2, w2, sh2, sw2, h3, w3, sh3, sw3,
    b, oh, ow, offs_d, mask, D,
    NUM_MAPS: tl.constexpr,
):
    # fp32 sum of the four maps' taps; the one 16-bit rounding is the output's, whose range is that of
    # the unfused decoder's fuse-conv output in the same dtype (the same sum, computed another way)
    acc = _gather(z0_ptr, h0, w0, sh0, sw0, b, oh, ow, offs_d, mask, D)
    if NUM_MAPS > 1:
        acc += _gather(z1_ptr, h1, w1, sh1, sw1, b, oh, ow, offs_d, mask, D)
    if NUM_MAPS > 2:
        acc += _gather(z2_ptr, h2, w2, sh2, sw2, b, oh, ow, offs_d, mask, D)
    if NUM_MAPS > 3:
        acc += _gather(z3_ptr, h3, w3, sh3, sw3, b, oh, ow, offs_d, mask, D)
    return acc


@triton.jit
def _upsample_sum_fwd_kernel(
    out_ptr, z0_ptr, z1_ptr, z2_ptr, z3_ptr, scale_ptr, shift_ptr,
    h0, w0, sh0, sw0, h1, w1, sh1, sw1, h2, w2, sh2, sw2, h3, w3, sh3, sw3,
    n_pix, H, W, D,
    NUM_MAPS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, RELU: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_p = offs_p < n_pix
    mask_d = offs_d < D
    mask = mask_p[:, None] & mask_d[None, :]
    ow = offs_p % W
    oh = (offs_p // W) % H
    b = offs_p // (W * H)
    acc = _gather_sum(
        z0_ptr, z1_ptr, z2_ptr, z3_ptr,
        h0, w0, sh0, sw0, h1, w1, sh1, sw1, h2, w2, sh2, sw2, h3, w3, sh3, sw3,
        b, oh, ow, offs_d, mask, D, NUM_MAPS,
    )
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + offs_d, mask=mask_d, other=0.0)[None, :]
    if HAS_SHIFT:
        acc = acc + tl.load(shift_ptr + offs_d, mask=mask_d, other=0.0)[None, :]
    if RELU:
        acc = tl.where(acc < 0.0, 0.0, acc)  # ReLU that keeps NaN (tl.maximum may return the 0)
    tl.store(out_ptr + offs_p[:, None] * D + offs_d[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _upsample_sum_bwd_prep_kernel(
    gu_ptr, part_shift_ptr, part_scale_ptr, g_ptr, out_ptr, scale_ptr,
    z0_ptr, z1_ptr, z2_ptr, z3_ptr,
    h0, w0, sh0, sw0, h1, w1, sh1, sw1, h2, w2, sh2, sw2, h3, w3, sh3, sw3,
    n_pix, H, W, D,
    NUM_MAPS: tl.constexpr, HAS_SCALE: tl.constexpr, RELU: tl.constexpr,
    NEED_DSCALE: tl.constexpr, NEED_DSHIFT: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_p = tl.program_id(0)
    offs_p = pid_p.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_p = offs_p < n_pix
    mask_d = offs_d < D
    mask = mask_p[:, None] & mask_d[None, :]
    idx = offs_p[:, None] * D + offs_d[None, :]
    g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        y = tl.load(out_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        g = tl.where(y <= 0.0, 0.0, g)  # ReLU's backward as ATen's: a NaN output passes the gradient
    if NEED_DSHIFT:
        tl.store(part_shift_ptr + pid_p * D + offs_d, tl.sum(g, axis=0), mask=mask_d)
    if NEED_DSCALE:
        ow = offs_p % W
        oh = (offs_p // W) % H
        b = offs_p // (W * H)
        u = _gather_sum(
            z0_ptr, z1_ptr, z2_ptr, z3_ptr,
            h0, w0, sh0, sw0, h1, w1, sh1, sw1, h2, w2, sh2, sw2, h3, w3, sh3, sw3,
            b, oh, ow, offs_d, mask, D, NUM_MAPS,
        )
        tl.store(part_scale_ptr + pid_p * D + offs_d, tl.sum(g * u, axis=0), mask=mask_d)
    if HAS_SCALE:
        g = g * tl.load(scale_ptr + offs_d, mask=mask_d, other=0.0)[None, :]
    tl.store(gu_ptr + idx, g, mask=mask)


@triton.jit
def _upsample_sum_bwd_kernel(
    gz_ptr, gu_ptr,
    h, w, scale_h, scale_w, n_in_pix, H, W, D, RH, RW,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Adjoint of one map's upsampling: gz[b, ih, iw] = sum_{oh, ow} wy(oh, ih) wx(ow, iw) gu[b, oh, ow].
    offs_p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_p = offs_p < n_in_pix
    mask_d = offs_d < D
    mask = mask_p[:, None] & mask_d[None, :]
    iw = (offs_p % w).to(tl.int32)
    ih = ((offs_p // w) % h).to(tl.int32)
    b = offs_p // (w * h)
    lo_h = bilinear_first_reader(ih, scale_h)  # the output window that can read each input pixel
    lo_w = bilinear_first_reader(iw, scale_w)
    acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)
    for r in range(0, RH):
        oh = lo_h + r
        wy = bilinear_weight(oh, ih, scale_h, h, (oh < H) & mask_p)
        row = (b * H + oh) * W
        for c in range(0, RW):
            ow = lo_w + c
            wt = wy * bilinear_weight(ow, iw, scale_w, w, ow < W)
            m = mask & (wt != 0.0)[:, None]
            g = tl.load(gu_ptr + ((row + ow) * D)[:, None] + offs_d[None, :], mask=m, other=0.0)
            acc += wt[:, None] * g
    tl.store(gz_ptr + offs_p[:, None] * D + offs_d[None, :], acc.to(gz_ptr.dtype.element_ty), mask=mask)


def _map_args(maps: list[torch.Tensor], H: int, W: int) -> list:
    # (h, w, scale_h, scale_w) per map, PyTorch's scale = in / out, padded to MAX_MAPS.
    args = []
    for i in range(MAX_MAPS):
        m = maps[min(i, len(maps) - 1)]
        h, w = m.shape[1], m.shape[2]
        args += [h, w, h / H, w / W]
    return args


def launch_config(D: int, gpu: bool) -> dict[str, int]:
    """Pixels (BLOCK_P) x channels (BLOCK_D) per program, for D channels; ``gpu``: see gpu_launch_config.

    On a GPU a tile holds about 4096 elements; the interpreter takes 128 pixels whatever D, so
    that it runs fewer (larger) programs.
    """
    block_d = min(128, triton.next_power_of_2(D))
    block_p = max(1, 4096 // block_d) if gpu else 128
    return {"BLOCK_P": block_p, "BLOCK_D": block_d}


def _blocks(D: int, t: torch.Tensor) -> tuple[int, int]:
    cfg = launch_config(D, gpu_launch_config(t))
    return cfg["BLOCK_P"], cfg["BLOCK_D"]


def upsample_sum_fwd_triton(
    maps: list[torch.Tensor], H: int, W: int, scale: torch.Tensor | None, shift: torch.Tensor | None, relu: bool
) -> torch.Tensor:
    """maps: 1..4 contiguous (B, h_i, w_i, D); scale/shift fp32 (D,) or None. Returns (B, H, W, D)."""
    check_interpreter_dtypes("upsample_sum", *maps)
    B, D = maps[0].shape[0], maps[0].shape[3]
    out = empty(B, H, W, D, dtype=maps[0].dtype, device=maps[0].device)
    n_pix = B * H * W
    block_p, block_d = _blocks(D, maps[0])
    zs = [maps[min(i, len(maps) - 1)] for i in range(MAX_MAPS)]
    grid = (triton.cdiv(n_pix, block_p), triton.cdiv(D, block_d))
    _upsample_sum_fwd_kernel[grid](
        out, *zs, scale if scale is not None else out, shift if shift is not None else out,
        *_map_args(maps, H, W), n_pix, H, W, D,
        NUM_MAPS=len(maps), HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, RELU=relu,
        BLOCK_P=block_p, BLOCK_D=block_d,
    )
    return out


def upsample_sum_bwd_triton(
    grad: torch.Tensor,
    sizes: list[tuple[int, int]],
    maps: list[torch.Tensor],
    out: torch.Tensor | None,
    scale: torch.Tensor | None,
    relu: bool,
    need_dscale: bool,
    need_dshift: bool,
) -> tuple[list[torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
    """grad: contiguous (B, H, W, D); sizes: (h_i, w_i) per map; maps needed only for need_dscale,
    out (the forward output) only for relu. Returns (grads of the maps, dscale, dshift) in fp32."""
    check_interpreter_dtypes("upsample_sum", grad, *maps, out)
    B, H, W, D = grad.shape
    n_pix = B * H * W
    block_p, block_d = _blocks(D, grad)
    dscale = dshift = None
    if relu or scale is not None or need_dscale or need_dshift:
        n_blocks = triton.cdiv(n_pix, block_p)
        gu = empty(B, H, W, D, dtype=torch.float32, device=grad.device)
        part_shift = empty(n_blocks, D, dtype=torch.float32, device=grad.device) if need_dshift else gu
        part_scale = empty(n_blocks, D, dtype=torch.float32, device=grad.device) if need_dscale else gu
        zs = [maps[min(i, len(maps) - 1)] for i in range(MAX_MAPS)] if need_dscale else [grad] * MAX_MAPS
        shapes = maps if need_dscale else [torch.empty(0, h, w, 0) for h, w in sizes]
        _upsample_sum_bwd_prep_kernel[(n_blocks, triton.cdiv(D, block_d))](
            gu, part_shift, part_scale, grad, out if relu else grad, scale if scale is not None else grad,
            *zs, *_map_args(shapes, H, W), n_pix, H, W, D,
            NUM_MAPS=len(sizes), HAS_SCALE=scale is not None, RELU=relu,
            NEED_DSCALE=need_dscale, NEED_DSHIFT=need_dshift, BLOCK_P=block_p, BLOCK_D=block_d,
        )
        if need_dshift:
            dshift = part_shift.sum(0)
        if need_dscale:
            dscale = part_scale.sum(0)
    else:
        gu = grad
    grads = []
    for h, w in sizes:
        gz = empty(B, h, w, D, dtype=grad.dtype, device=grad.device)
        n_in = B * h * w
        _upsample_sum_bwd_kernel[(triton.cdiv(n_in, block_p), triton.cdiv(D, block_d))](
            gz, gu, h, w, h / H, w / W, n_in, H, W, D, bilinear_window(h, H), bilinear_window(w, W),
            BLOCK_P=block_p, BLOCK_D=block_d,
        )
        grads.append(gz)
    return grads, dscale, dshift
