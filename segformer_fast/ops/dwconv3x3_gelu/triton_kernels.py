"""Triton kernels of the fused depthwise 3x3 conv + bias + GELU, on the (B, N, C) token layout.

Forward: y = GELU(z), z[b, h, w, c] = bias[c] + sum_{i,j} weight[c, i, j] * x[b, h+i-1, w+j-1, c]
(zero padding). The tokens are channels-last, so a program owns a tile of BLOCK_W columns x
BLOCK_C channels and walks down ROWS rows keeping a 3-row sliding window in registers: every
input element is read about once per program and nothing is transposed.

Backward, two passes (the op saves only x; z is recomputed):
1. ``_dwconv3x3_gelu_bwd_kernel`` walks the forward's tile and 3-row x window: z and gz = grad_y *
   GELU'(z) once per element (in fp32 registers), gz stored in the input's dtype (16 bits for
   fp16/bf16, as unfused PyTorch hands GELU's gradient to the conv; grad_x's error then sits nearer
   the low-precision rule's 2x-of-PyTorch line than with an fp32 gz, and within it: see
   tests/ops/test_dwconv3x3_gelu.py), and per tile partial sums of the fp32 gz * x_shifted (the 9
   weight taps) and of gz (bias) to ``partial`` (P, 10, C). The weight/bias gradients are
   ``partial.sum(0)``: a fixed-order reduction, no float atomics.
2. grad_x = depthwise conv of gz with the kernel flipped by 180 degrees, no bias, no activation: the
   forward kernel with ``FLIP=True, ACT=0`` (the gz halo re-reads hit L2).
Memory traffic is x, grad_y read, gz written and read, grad_x written: 5 values per element, and
GELU' once per element (a single pass that recomputes gz at its halo instead evaluates it
3 (ROWS + 2) / ROWS times per element, which costs more than the gz round trip).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...utils.debug import empty
from ..triton_launch import Autotuner, LaunchConfig, check_interpreter_dtypes, register_autotuner
from ..triton_math import gelu_erf, gelu_erf_grad, gelu_tanh, gelu_tanh_grad

__all__ = ["dwconv3x3_gelu_fwd", "dwconv3x3_gelu_bwd", "launch_config", "ACT_CODES", "FWD_TUNER"]

# The forward's tiles (rows x columns x channels, capped by the image as in launch_config), autotuned on a GPU
# per (dtype, channels, GELU form) -- never per image size; the first is launch_config's default. The backward
# keeps launch_config's tiles: its per-tile weight partials are laid out by them.
FWD_TUNER = register_autotuner(Autotuner("dwconv3x3_gelu_fwd", (
    LaunchConfig({"ROWS": 8, "BLOCK_W": 16, "BLOCK_C": 64}, num_warps=4),
    LaunchConfig({"ROWS": 4, "BLOCK_W": 32, "BLOCK_C": 64}, num_warps=4),
    LaunchConfig({"ROWS": 8, "BLOCK_W": 16, "BLOCK_C": 128}, num_warps=8),
)))
BWD_NUM_WARPS = 8  # 4 elements a thread per tile tensor: the 9-tensor x window, 9 taps and 10 sums fit
ACT_CODES = {"none": 1, "tanh": 2}  # GELU approximation -> kernel ACT code; ACT=0 is identity
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _act(z, ACT: tl.constexpr):
    # z is the fp32 conv accumulator: GELU (erf, or tanh of a cubic, which in 16 bits would overflow for
    # |z| past ~110) is evaluated in fp32, and only its result, |GELU(z)| <= |z|, is rounded to 16 bits
    if ACT == 1:
        out = gelu_erf(z)
    elif ACT == 2:
        out = gelu_tanh(z)
    else:
        out = z
    return out


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    if ACT == 1:
        out = gelu_erf_grad(z)
    else:
        out = gelu_tanh_grad(z)
    return out


@triton.jit
def _tap(w_ptr, ch, c_mask, K: tl.constexpr, FLIP: tl.constexpr):
    # weight (C, 1, 3, 3) -> tap K (8 - K when FLIP: the kernel turned by 180 degrees) of every channel in the
    # block, (1, BLOCK_C) fp32
    if FLIP:
        idx = 8 - K
    else:
        idx = K
    return tl.load(w_ptr + ch * 9 + idx, mask=c_mask, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _load_row3(x_ptr, img_row, r, H, W, C, cols, ch, c_mask):
    # Row r of image (rows start at img_row = b * H): columns cols-1, cols, cols+1, each (BLOCK_W, BLOCK_C) fp32,
    # zero outside the image (the conv's padding).
    rv = cols * 0 + r  # the row index as a (BLOCK_W,) vector: the interpreter mistypes scalar & block masks
    r_ok = (rv >= 0) & (rv < H)
    base = x_ptr + (img_row + r) * W * C
    cm = c_mask[None, :]
    cl = cols - 1
    cr = cols + 1
    m_l = (r_ok & (cl >= 0) & (cl < W))[:, None] & cm
    m_c = (r_ok & (cols < W))[:, None] & cm
    m_r = (r_ok & (cr < W))[:, None] & cm
    left = tl.load(base + cl[:, None] * C + ch[None, :], mask=m_l, other=0.0).to(tl.float32)
    mid = tl.load(base + cols[:, None] * C + ch[None, :], mask=m_c, other=0.0).to(tl.float32)
    right = tl.load(base + cr[:, None] * C + ch[None, :], mask=m_r, other=0.0).to(tl.float32)
    return left, mid, right


@triton.jit
def _dwconv3x3_gelu_fwd_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    H,
    W,
    C,
    n_hb,
    n_wb,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    FLIP: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_c = tl.program_id(1)
    wb = pid % n_wb
    hb = (pid // n_wb) % n_hb
    b = pid // (n_wb * n_hb)
    img_row = b.to(tl.int64) * H
    cols = (wb * BLOCK_W + tl.arange(0, BLOCK_W)).to(tl.int64)  # (BLOCK_W,)
    ch = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # (BLOCK_C,)
    c_mask = ch < C
    w0 = _tap(w_ptr, ch, c_mask, 0, FLIP)
    w1 = _tap(w_ptr, ch, c_mask, 1, FLIP)
    w2 = _tap(w_ptr, ch, c_mask, 2, FLIP)
    w3 = _tap(w_ptr, ch, c_mask, 3, FLIP)
    w4 = _tap(w_ptr, ch, c_mask, 4, FLIP)
    w5 = _tap(w_ptr, ch, c_mask, 5, FLIP)
    w6 = _tap(w_ptr, ch, c_mask, 6, FLIP)
    w7 = _tap(w_ptr, ch, c_mask, 7, FLIP)
    w8 = _tap(w_ptr, ch, c_mask, 8, FLIP)
    if HAS_BIAS:
        bias = tl.load(b_ptr + ch, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    else:
        bias = tl.zeros([1, BLOCK_C], dtype=tl.float32)
    h0 = hb * ROWS
    a0, a1, a2 = _load_row3(x_ptr, img_row, h0 - 1, H, W, C, cols, ch, c_mask)
    m0, m1, m2 = _load_row3(x_ptr, img_row, h0, H, W, C, cols, ch, c_mask)
    for i in range(ROWS):
        r = h0 + i
        d0, d1, d2 = _load_row3(x_ptr, img_row, r + 1, H, W, C, cols, ch, c_mask)
        z = bias + w0 * a0 + w1 * a1 + w2 * a2 + w3 * m0 + w4 * m1 + w5 * m2 + w6 * d0 + w7 * d1 + w8 * d2
        y = _act(z, ACT)
        off = ((img_row + r) * W + cols[:, None]) * C + ch[None, :]
        tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=((cols < W) & (cols * 0 + r < H))[:, None] & c_mask[None, :])
        a0, a1, a2 = m0, m1, m2
        m0, m1, m2 = d0, d1, d2


@triton.jit
def _dwconv3x3_gelu_bwd_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    gy_ptr,
    gz_ptr,
    part_ptr,
    H,
    W,
    C,
    n_hb,
    n_wb,
    ACT: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # Pass 1: gz = grad_y * GELU'(z) once per element (z recomputed from the forward's 3-row x window), stored in
    # gz's dtype; per-tile weight/bias partial sums from the fp32 gz.
    pid = tl.program_id(0)
    pid_c = tl.program_id(1)
    wb = pid % n_wb
    hb = (pid // n_wb) % n_hb
    b = pid // (n_wb * n_hb)
    img_row = b.to(tl.int64) * H
    cols = (wb * BLOCK_W + tl.arange(0, BLOCK_W)).to(tl.int64)
    ch = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = ch < C
    w0 = _tap(w_ptr, ch, c_mask, 0, False)
    w1 = _tap(w_ptr, ch, c_mask, 1, False)
    w2 = _tap(w_ptr, ch, c_mask, 2, False)
    w3 = _tap(w_ptr, ch, c_mask, 3, False)
    w4 = _tap(w_ptr, ch, c_mask, 4, False)
    w5 = _tap(w_ptr, ch, c_mask, 5, False)
    w6 = _tap(w_ptr, ch, c_mask, 6, False)
    w7 = _tap(w_ptr, ch, c_mask, 7, False)
    w8 = _tap(w_ptr, ch, c_mask, 8, False)
    bias = tl.load(b_ptr + ch, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    # per-tile partial sums of gz * x_shifted (taps 0..8) and gz (bias), (BLOCK_W, BLOCK_C) each
    g0 = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    g1 = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    g2 = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    g3 = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    g4 = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    g5 = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    g6 = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    g7 = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    g8 = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    gb = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    h0 = hb * ROWS
    a0, a1, a2 = _load_row3(x_ptr, img_row, h0 - 1, H, W, C, cols, ch, c_mask)
    m0, m1, m2 = _load_row3(x_ptr, img_row, h0, H, W, C, cols, ch, c_mask)
    for i in range(ROWS):
        r = h0 + i
        d0, d1, d2 = _load_row3(x_ptr, img_row, r + 1, H, W, C, cols, ch, c_mask)
        z = bias + w0 * a0 + w1 * a1 + w2 * a2 + w3 * m0 + w4 * m1 + w5 * m2 + w6 * d0 + w7 * d1 + w8 * d2
        off = ((img_row + r) * W + cols[:, None]) * C + ch[None, :]
        mask = ((cols < W) & (cols * 0 + r < H))[:, None] & c_mask[None, :]
        gy = tl.load(gy_ptr + off, mask=mask, other=0.0).to(tl.float32)
        gz = gy * _act_grad(z, ACT)  # zero wherever the position is outside the image
        tl.store(gz_ptr + off, gz.to(gz_ptr.dtype.element_ty), mask=mask)
        g0 += gz * a0
        g1 += gz * a1
        g2 += gz * a2
        g3 += gz * m0
        g4 += gz * m1
        g5 += gz * m2
        g6 += gz * d0
        g7 += gz * d1
        g8 += gz * d2
        gb += gz
        a0, a1, a2 = m0, m1, m2
        m0, m1, m2 = d0, d1, d2
    part = part_ptr + pid.to(tl.int64) * 10 * C + ch  # partial (P, 10, C), row pid
    tl.store(part + 0 * C, tl.sum(g0, axis=0), mask=c_mask)
    tl.store(part + 1 * C, tl.sum(g1, axis=0), mask=c_mask)
    tl.store(part + 2 * C, tl.sum(g2, axis=0), mask=c_mask)
    tl.store(part + 3 * C, tl.sum(g3, axis=0), mask=c_mask)
    tl.store(part + 4 * C, tl.sum(g4, axis=0), mask=c_mask)
    tl.store(part + 5 * C, tl.sum(g5, axis=0), mask=c_mask)
    tl.store(part + 6 * C, tl.sum(g6, axis=0), mask=c_mask)
    tl.store(part + 7 * C, tl.sum(g7, axis=0), mask=c_mask)
    tl.store(part + 8 * C, tl.sum(g8, axis=0), mask=c_mask)
    tl.store(part + 9 * C, tl.sum(gb, axis=0), mask=c_mask)


def _check(x: torch.Tensor, hw: tuple[int, int], weight: torch.Tensor, bias: torch.Tensor, approximate: str):
    if x.dim() != 3:
        raise ValueError(f"x must be (B, N, C), got shape {tuple(x.shape)}")
    b, n, c = x.shape
    h, w = hw
    if h * w != n:
        raise ValueError(f"x has N={n} tokens (shape {tuple(x.shape)}) but hw={tuple(hw)} gives H*W={h * w}")
    if tuple(weight.shape) != (c, 1, 3, 3):
        raise ValueError(f"weight must be (C, 1, 3, 3) = ({c}, 1, 3, 3), got shape {tuple(weight.shape)}")
    if tuple(bias.shape) != (c,):
        raise ValueError(f"bias must be (C,) = ({c},), got shape {tuple(bias.shape)}")
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype} (shape {tuple(t.shape)})")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous, got shape {tuple(t.shape)} strides {t.stride()}")
    if approximate not in ACT_CODES:
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")


def launch_config(h: int, w: int, c: int) -> dict[str, int]:
    """Tile of one program for an (H=h, W=w, C=c) image: ROWS rows x BLOCK_W columns x BLOCK_C channels.

    The same on a GPU and in the interpreter: the tiles are capped by the image, so the
    interpreter's test shapes already get small ones.
    """
    return dict(zip(("ROWS", "BLOCK_W", "BLOCK_C"), _capped({"ROWS": 8, "BLOCK_W": 16, "BLOCK_C": 64}, h, w, c)))


def _capped(tile, h: int, w: int, c: int) -> tuple[int, int, int]:
    # a tile no larger than the image needs (powers of two), at least 4 channels
    return (min(tile["ROWS"], triton.next_power_of_2(h)), min(tile["BLOCK_W"], triton.next_power_of_2(w)),
            max(4, min(tile["BLOCK_C"], triton.next_power_of_2(c))))


def _blocks(h: int, w: int, c: int) -> tuple[int, int, int]:
    cfg = launch_config(h, w, c)
    return cfg["ROWS"], cfg["BLOCK_W"], cfg["BLOCK_C"]


def dwconv3x3_gelu_fwd(
    x: torch.Tensor, hw: tuple[int, int], weight: torch.Tensor, bias: torch.Tensor, approximate: str = "none"
) -> torch.Tensor:
    """GELU(dwconv3x3(x) + bias). x (B, N, C) contiguous, weight (C, 1, 3, 3), bias (C,); returns (B, N, C)."""
    _check(x, hw, weight, bias, approximate)
    check_interpreter_dtypes("dwconv3x3_gelu", x, weight, bias)
    b, n, c = x.shape
    h, w = hw
    y = empty(b, n, c, dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y

    def launch(cfg: LaunchConfig):
        rows, block_w, block_c = _capped(cfg.meta, h, w, c)
        n_hb, n_wb = triton.cdiv(h, rows), triton.cdiv(w, block_w)
        _dwconv3x3_gelu_fwd_kernel[(b * n_hb * n_wb, triton.cdiv(c, block_c))](
            x, weight, bias, y, h, w, c, n_hb, n_wb,
            HAS_BIAS=True, ACT=ACT_CODES[approximate], FLIP=False, ROWS=rows, BLOCK_W=block_w, BLOCK_C=block_c,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip

    launch(FWD_TUNER.pick(x, launch, key=(c, approximate)))
    return y


def dwconv3x3_gelu_bwd(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    hw: tuple[int, int],
    weight: torch.Tensor,
    bias: torch.Tensor,
    approximate: str = "none",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (grad_x (B, N, C), grad_weight (C, 1, 3, 3), grad_bias (C,)) of the op, recomputing z from x."""
    _check(x, hw, weight, bias, approximate)
    if grad_y.shape != x.shape:
        raise ValueError(f"grad_y must have x's shape {tuple(x.shape)}, got shape {tuple(grad_y.shape)}")
    if grad_y.dtype not in _DTYPES or not grad_y.is_contiguous():
        raise ValueError(
            f"grad_y must be a contiguous float32/float16/bfloat16 tensor, got {grad_y.dtype} with shape "
            f"{tuple(grad_y.shape)} strides {grad_y.stride()}"
        )
    check_interpreter_dtypes("dwconv3x3_gelu", grad_y, x, weight, bias)
    b, n, c = x.shape
    h, w = hw
    rows, block_w, block_c = _blocks(h, w, c)
    n_hb, n_wb = triton.cdiv(h, rows), triton.cdiv(w, block_w)
    n_tiles = b * n_hb * n_wb
    grad_x = empty(b, n, c, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return grad_x, torch.zeros_like(weight), torch.zeros_like(bias)
    gz = empty(b, n, c, dtype=x.dtype, device=x.device)  # grad of the conv output, in the input's dtype
    partial = empty(n_tiles, 10, c, dtype=torch.float32, device=x.device)
    grid = (n_tiles, triton.cdiv(c, block_c))
    _dwconv3x3_gelu_bwd_kernel[grid](
        x, weight, bias, grad_y, gz, partial, h, w, c, n_hb, n_wb,
        ACT=ACT_CODES[approximate], ROWS=rows, BLOCK_W=block_w, BLOCK_C=block_c, num_warps=BWD_NUM_WARPS,
    )  # fmt: skip
    _dwconv3x3_gelu_fwd_kernel[grid](
        gz, weight, bias, grad_x, h, w, c, n_hb, n_wb,
        HAS_BIAS=False, ACT=0, FLIP=True, ROWS=rows, BLOCK_W=block_w, BLOCK_C=block_c,
    )  # fmt: skip
    sums = partial.sum(0)  # (10, C): fixed-order reduction over tiles
    grad_weight = sums[:9].t().contiguous().view(c, 1, 3, 3).to(weight.dtype)
    grad_bias = sums[9].to(bias.dtype, copy=True)  # copies: the outputs must not alias each other
    return grad_x, grad_weight, grad_bias
