"""Upsampled cross-entropy Triton kernels (logits channels-last: (B, h, w, K), K contiguous).

Forward, one program per block of output pixels: the 4-tap bilinear gather of the logits, one
block of classes at a time, with an online logsumexp (running max and rescaled sum), then the
label's logit by the same gather; writes lse and nll per pixel.

Backward, one program per block of low-resolution pixels and block of classes: the adjoint of the
gather computed as a gather. Each low-resolution pixel walks the window of output pixels that can
read it, recomputes their logits for its class block (4 taps), forms c_p (exp(z - lse_p) - onehot)
and accumulates it with the exact bilinear weight. No atomics: deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...utils.debug import empty
from ..math_utils import bilinear_window
from ..triton_launch import check_interpreter_dtypes, gpu_launch_config
from ..triton_math import bilinear_first_reader, bilinear_tap, bilinear_weight

__all__ = ["launch_config", "upsample_cross_entropy_fwd_triton", "upsample_cross_entropy_bwd_triton"]


@triton.jit
def _taps(x_ptr, b, oh, ow, h, w, scale_h, scale_w, K):
    # Flat offsets of the four taps of output pixels (b, oh, ow) and their bilinear weights.
    y0, y1, ly = bilinear_tap(oh, scale_h, h)
    x0, x1, lx = bilinear_tap(ow, scale_w, w)
    row0 = (b * h + y0) * w
    row1 = (b * h + y1) * w
    return (row0 + x0) * K, (row0 + x1) * K, (row1 + x0) * K, (row1 + x1) * K, ly, lx


@triton.jit
def _gather(x_ptr, o00, o01, o10, o11, ly, lx, cls, mask):
    # Bilinear logits at the pixels' classes ``cls`` (shape of mask), fp32.
    v00 = tl.load(x_ptr + o00 + cls, mask=mask, other=0.0).to(tl.float32)
    v01 = tl.load(x_ptr + o01 + cls, mask=mask, other=0.0).to(tl.float32)
    v10 = tl.load(x_ptr + o10 + cls, mask=mask, other=0.0).to(tl.float32)
    v11 = tl.load(x_ptr + o11 + cls, mask=mask, other=0.0).to(tl.float32)
    return (1.0 - ly) * ((1.0 - lx) * v00 + lx * v01) + ly * ((1.0 - lx) * v10 + lx * v11)


@triton.jit
def _upsample_cross_entropy_fwd_kernel(
    nll_ptr, lse_ptr, x_ptr, labels_ptr,
    n_pix, h, w, H, W, K, scale_h, scale_w, ignore_index,
    BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < n_pix
    ow = offs_p % W
    oh = (offs_p // W) % H
    b = offs_p // (W * H)
    o00, o01, o10, o11, ly, lx = _taps(x_ptr, b, oh, ow, h, w, scale_h, scale_w, K)
    m = tl.full((BLOCK_P,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_P,), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        z = _gather(x_ptr, o00[:, None], o01[:, None], o10[:, None], o11[:, None], ly[:, None], lx[:, None],
                    offs_k[None, :], mask_p[:, None] & mask_k[None, :])
        z = tl.where(mask_k[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        # fp32 logits (16-bit taps upcast on load), online max: every exp argument is <= 0, so no overflow
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
    lse = m + tl.log(s)
    y = tl.load(labels_ptr + offs_p, mask=mask_p, other=ignore_index)
    valid = mask_p & (y != ignore_index)
    cls = tl.where(valid, y, 0)
    zy = _gather(x_ptr, o00, o01, o10, o11, ly, lx, cls, valid)
    tl.store(lse_ptr + offs_p, lse, mask=mask_p)
    tl.store(nll_ptr + offs_p, tl.where(valid, lse - zy, 0.0), mask=mask_p)


@triton.jit
def _upsample_cross_entropy_bwd_kernel(
    gx_ptr, x_ptr, labels_ptr, lse_ptr, coef_ptr,
    n_in_pix, h, w, H, W, K, scale_h, scale_w, RH, RW,
    BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_p = offs_p < n_in_pix
    mask_k = offs_k < K
    iw = (offs_p % w).to(tl.int32)
    ih = ((offs_p // w) % h).to(tl.int32)
    b = offs_p // (w * h)
    lo_h = bilinear_first_reader(ih, scale_h)  # the output window that can read each input pixel
    lo_w = bilinear_first_reader(iw, scale_w)
    acc = tl.zeros((BLOCK_P, BLOCK_K), dtype=tl.float32)
    for r in range(0, RH):
        oh = lo_h + r
        wy = bilinear_weight(oh, ih, scale_h, h, (oh < H) & mask_p)
        for c in range(0, RW):
            ow = lo_w + c
            wt = wy * bilinear_weight(ow, iw, scale_w, w, ow < W)
            live = wt != 0.0
            pix = (b * H + oh) * W + ow
            coef = tl.load(coef_ptr + pix, mask=live, other=0.0)
            lse = tl.load(lse_ptr + pix, mask=live, other=0.0)
            y = tl.load(labels_ptr + pix, mask=live, other=-1)
            o00, o01, o10, o11, ly, lx = _taps(x_ptr, b, oh, ow, h, w, scale_h, scale_w, K)
            m = live[:, None] & mask_k[None, :]
            z = _gather(x_ptr, o00[:, None], o01[:, None], o10[:, None], o11[:, None], ly[:, None], lx[:, None],
                        offs_k[None, :], m)
            onehot = tl.where(offs_k[None, :] == y[:, None], 1.0, 0.0)
            g = tl.exp(z - lse[:, None]) - onehot
            acc += (wt * coef)[:, None] * tl.where(m, g, 0.0)
    out = offs_p[:, None] * K + offs_k[None, :]
    tl.store(gx_ptr + out, acc.to(gx_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_k[None, :])


def launch_config(K: int, gpu: bool) -> dict[str, int]:
    """Pixels (BLOCK_P) x classes (BLOCK_K) per program, for K classes; ``gpu``: see gpu_launch_config.

    On a GPU a tile holds about 2048 elements; the interpreter takes 64 pixels whatever K, so
    that it runs fewer programs.
    """
    block_k = min(64, triton.next_power_of_2(K))
    block_p = max(1, 2048 // block_k) if gpu else 64
    return {"BLOCK_P": block_p, "BLOCK_K": block_k}


def _blocks(K: int, t: torch.Tensor) -> tuple[int, int]:
    cfg = launch_config(K, gpu_launch_config(t))
    return cfg["BLOCK_P"], cfg["BLOCK_K"]


def upsample_cross_entropy_fwd_triton(
    x: torch.Tensor, labels: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: contiguous (B, h, w, K) logits; labels: contiguous int64 (B, H, W). Returns (nll, lse), (B, H, W) fp32."""
    check_interpreter_dtypes("upsample_cross_entropy", x)
    B, h, w, K = x.shape
    H, W = labels.shape[-2:]
    nll = empty(B, H, W, dtype=torch.float32, device=x.device)
    lse = empty(B, H, W, dtype=torch.float32, device=x.device)
    n_pix = B * H * W
    block_p, block_k = _blocks(K, x)
    _upsample_cross_entropy_fwd_kernel[(triton.cdiv(n_pix, block_p),)](
        nll, lse, x, labels, n_pix, h, w, H, W, K, h / H, w / W, ignore_index,
        BLOCK_P=block_p, BLOCK_K=block_k,
    )
    return nll, lse


def upsample_cross_entropy_bwd_triton(
    coef: torch.Tensor, x: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor
) -> torch.Tensor:
    """coef, lse: contiguous (B, H, W) fp32; x: (B, h, w, K). Returns d(sum coef * nll)/dx, (B, h, w, K) fp32."""
    check_interpreter_dtypes("upsample_cross_entropy", x, coef, lse)
    B, h, w, K = x.shape
    H, W = labels.shape[-2:]
    gx = empty(B, h, w, K, dtype=torch.float32, device=x.device)
    n_in = B * h * w
    block_p, block_k = _blocks(K, x)
    _upsample_cross_entropy_bwd_kernel[(triton.cdiv(n_in, block_p), triton.cdiv(K, block_k))](
        gx, x, labels, lse, coef, n_in, h, w, H, W, K, h / H, w / W, bilinear_window(h, H), bilinear_window(w, W),
        BLOCK_P=block_p, BLOCK_K=block_k,
    )
    return gx
