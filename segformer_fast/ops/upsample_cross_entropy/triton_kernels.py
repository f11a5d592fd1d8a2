"""Upsampled cross-entropy Triton kernels (logits channels-last: (B, h, w, K), K contiguous).

Forward, one program per block of output pixels: the 4-tap bilinear gather of the logits, one
block of classes at a time, with an online logsumexp (running max and rescaled sum), then the
label's logit by the same gather; writes lse and nll per pixel.

Backward (the maths: op.py's docstring), row-separable: dx[i, j] = sum_r a(r, i) T_r[j] with
T_r[j] = sum_c a(c, j) G[r, c]. One program per (class block of BLOCK_K, COLS low-res columns,
(b, band of ROWS low-res rows)); the output columns that read its columns (at most BLOCK_C) are
fixed for the program, and so is the column adjoint adj (BLOCK_J = COLS + 2 low-res columns x
BLOCK_C). It streams down the band: low-res rows i and i + 1, upsampled along the columns, are
loaded once per low-res row (two 4-tap halves u0, u1); each output row r whose first tap is i gives
z = (1 - l_r) u0 + l_r u1 (the forward's logits, its order of operations), G = c (exp(z - lse) -
onehot) once per (pixel, class), T_r = adj @ G (tl.dot, tf32x3: fp32-accurate), adds (1 - l_r) T_r
to row i and l_r T_r to row i + 1 (the carry into the next low-res row). The band's first row
also needs the output rows of low-res row i_s - 1: the one recomputed range per band. fp32
accumulation, each gradient element written once by one program (in the logits' dtype from the
op): no atomics, deterministic. A non-finite G would make its whole column of T non-finite
(0 * nan in the dot); a stored row with any non-finite value is recomputed with a second 0/1 dot
that puts nan only on the taps of the non-finite G, as the reference (never with finite data).

Cost of the backward, B2 at 1024 (logits (8, 256, 256, 150), labels (8, 1024, 1024)), GPU tiles
BLOCK_K = 16, BLOCK_C = 32, COLS = 7, ROWS = 32 (:func:`bwd_launch_config`); with n_c = ceil(w / COLS)
column blocks, n_b = ceil(h / ROWS) bands, Kp = ceil(K / BLOCK_K) BLOCK_K padded classes:
    exp lanes  B (H + (n_b - 1) H / h) n_c BLOCK_C Kp = 8 * 1052 * 37 * 32 * 160 = 1.59 G
               (1.26 G useful, B H W K; with COLS = 6: 1.85 G; the former window gather: 14.5 G); tensor cores: 3 dots
               of 2 BLOCK_J flops per lane (tf32x3), 153 GFLOP.
    DRAM bytes B h w K s (logits) + B H W 16 (int64 label, fp32 lse and coef) + B h w K s (gradient,
               s = 2 in bf16) = 157 + 134 + 157 = 449 MB, 0.09 ms at 4.8 TB/s, if the Kp / BLOCK_K
               class-block programs of a tile (adjacent program ids) share the per-pixel data in L2;
               from L2: the per-pixel data once per computed lane row, 16 B (H + (n_b - 1) H / h)
               n_c BLOCK_C (Kp / BLOCK_K) = 1.59 GB, the logits about B (h + n_b) w K s BLOCK_J / COLS
               = 0.37 GB (their column taps are re-read from L1 per output column).
At 16 exponentials per clock per SM (H200: 132 SMs, 1.98 GHz) the exp lanes alone take 0.38 ms:
this kernel is bound by the exponentials, not by memory (a model, not a measurement).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...utils.debug import empty
from ..triton_launch import check_interpreter_dtypes, gpu_launch_config
from .plan import column_plan
from ..triton_math import bilinear_tap, lerp2d

__all__ = ["launch_config", "bwd_launch_config", "upsample_cross_entropy_fwd_triton", "upsample_cross_entropy_bwd_triton"]


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
    return lerp2d(v00, v01, v10, v11, ly, lx)


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
def _first_reader(i, scale, n_in, n_out):
    # The first output index whose first tap i0 is >= i (n_out when none; 0 for i <= 0), i a scalar.
    # i0 is non-decreasing in the output index: for i >= 1 (no clamping of src), start two below the
    # real-arithmetic answer and step up with the exact tap rule, so that the ranges agree with the
    # taps the kernels compute.
    o = tl.floor((tl.cast(i, tl.float32) + 0.5) / scale - 0.5).to(tl.int32) - 2
    o = tl.where(i <= 0, 0, tl.minimum(tl.maximum(o, 0), n_out))  # i <= 0: src is clamped to 0 there
    for _ in tl.static_range(6):
        i0, _i1, _l1 = bilinear_tap(o, scale, n_in)
        o = tl.where((o < n_out) & (i0 < i), o + 1, o)
    return o


@triton.jit
def _columns_up(x_ptr, row, w, K, j0, j1, lc, k, mask):
    # Low-resolution row ``row`` (flat b * h + i, int64) upsampled along the columns at the
    # program's output columns: (BLOCK_C, BLOCK_K) fp32, one contiguous K-run per tap.
    x_row = x_ptr + row * w * K  # int64 scalar base, int32 offsets within the row
    v0 = tl.load(x_row + (j0 * K)[:, None] + k[None, :], mask=mask, other=0.0).to(tl.float32)
    v1 = tl.load(x_row + (j1 * K)[:, None] + k[None, :], mask=mask, other=0.0).to(tl.float32)
    return (1.0 - lc)[:, None] * v0 + lc[:, None] * v1


@triton.jit
def _row_grad(u0, u1, ly, row, c, c_mask, k, k_mask, labels_ptr, lse_ptr, coef_ptr):
    # One output row's G = c (softmax(z) - onehot(y)) over the program's columns and class block:
    # (BLOCK_C, BLOCK_K) fp32, 0 outside the columns and classes. row: flat b * H + r, int64.
    coef = tl.load(coef_ptr + row + c, mask=c_mask, other=0.0)
    lse = tl.load(lse_ptr + row + c, mask=c_mask, other=0.0)
    y = tl.load(labels_ptr + row + c, mask=c_mask, other=-1)
    z = (1.0 - ly) * u0 + ly * u1  # the forward's 4-tap logits, in its order of operations
    g = coef[:, None] * (tl.exp(z - lse[:, None]) - tl.where(k[None, :] == y[:, None], 1.0, 0.0))
    return tl.where(c_mask[:, None] & k_mask[None, :], g, 0.0)


@triton.jit
def _exact_adjoint(g, adj, adj_taps):
    # adj @ G where a dot's 0 * nan would spread a non-finite G to every low-res column of the tile:
    # the reference's adjoint reaches only the taps of that output column (0-weight taps included).
    # The finite part by the dot; the taps that read a non-finite G, counted by a 0/1 dot, set to nan.
    bad = (g != g) | (tl.abs(g) == float("inf"))
    t = tl.dot(adj, tl.where(bad, 0.0, g), input_precision="tf32x3")
    n_bad = tl.dot(adj_taps, tl.where(bad, 1.0, 0.0), input_precision="tf32")  # small integers: exact
    return tl.where(n_bad > 0.0, float("nan"), t)


@triton.jit
def _exact_row(x_ptr, labels_ptr, lse_ptr, coef_ptr, b, i, h, w, H, W, K, scale_h,
               j0, j1, lc, c, c_mask, k, k_mask, adj, adj_taps, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr):
    # Low-res row i of the program's tile from scratch, non-finite values exactly where the
    # reference has them: the output rows of S_{i-1} (weight l) and S_i (1 - l, or 1 on the last row).
    ld_mask = c_mask[:, None] & k_mask[None, :]
    acc = tl.zeros((BLOCK_J, BLOCK_K), dtype=tl.float32)
    u0 = _columns_up(x_ptr, b * h + tl.maximum(i - 1, 0), w, K, j0, j1, lc, k, ld_mask)
    u1 = _columns_up(x_ptr, b * h + i, w, K, j0, j1, lc, k, ld_mask)
    for r in range(_first_reader(i - 1, scale_h, h, H), _first_reader(i, scale_h, h, H)):
        _y0, _y1, ly = bilinear_tap(tl.cast(r, tl.int32), scale_h, h)
        g = _row_grad(u0, u1, ly, (b * H + r) * W, c, c_mask, k, k_mask, labels_ptr, lse_ptr, coef_ptr)
        acc += ly * _exact_adjoint(g, adj, adj_taps)
    u0 = u1
    u1 = _columns_up(x_ptr, b * h + tl.minimum(i + 1, h - 1), w, K, j0, j1, lc, k, ld_mask)
    for r in range(_first_reader(i, scale_h, h, H), _first_reader(i + 1, scale_h, h, H)):
        _y0, y1, ly = bilinear_tap(tl.cast(r, tl.int32), scale_h, h)
        g = _row_grad(u0, u1, ly, (b * H + r) * W, c, c_mask, k, k_mask, labels_ptr, lse_ptr, coef_ptr)
        acc += tl.where(y1 == i, 1.0, 1.0 - ly) * _exact_adjoint(g, adj, adj_taps)
    return acc


@triton.jit
def _upsample_cross_entropy_bwd_kernel(
    gx_ptr, x_ptr, labels_ptr, lse_ptr, coef_ptr,
    h, w, H, W, K, scale_h, scale_w, n_bands, COLS, ROWS,
    BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Program (class block, block of COLS low-res columns, (b, band of ROWS low-res rows)).
    k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = k < K
    j_lo = tl.program_id(1) * COLS - 1  # the low-res column of adjoint row 0: the left neighbour's last
    b = (tl.program_id(2) // n_bands).to(tl.int64)
    i_s = (tl.program_id(2) % n_bands) * ROWS
    i_e = tl.minimum(i_s + ROWS, h)
    # Output columns whose first tap is in [j_lo, j_lo + COLS]: all that read the owned columns
    # j_lo + 1 .. j_lo + COLS; the launcher sizes COLS so that they fit in BLOCK_C.
    c = _first_reader(j_lo, scale_w, w, W) + tl.arange(0, BLOCK_C)
    c_mask = c < _first_reader(j_lo + COLS + 1, scale_w, w, W)
    j0, j1, lc = bilinear_tap(c, scale_w, w)
    jj = tl.arange(0, BLOCK_J)
    hit0 = (jj[:, None] == (j0 - j_lo)[None, :]) & c_mask[None, :]
    hit1 = (jj[:, None] == (j1 - j_lo)[None, :]) & c_mask[None, :]
    adj = tl.where(hit0, 1.0 - lc[None, :], 0.0) + tl.where(hit1, lc[None, :], 0.0)  # (BLOCK_J, BLOCK_C)
    adj_taps = tl.where(hit0 | hit1, 1.0, 0.0)
    ld_mask = c_mask[:, None] & k_mask[None, :]
    jcol = j_lo + jj
    out_mask = ((jj >= 1) & (jj <= COLS) & (jcol < w))[:, None] & k_mask[None, :]
    # Streaming down the band: u0, u1 are low-res rows i, i + 1 upsampled along the columns (loaded
    # once per low-res row); each output row r whose first tap is i (r in S_i) adds (1 - l_r) T_r to
    # row i (acc) and l_r T_r to row i + 1 (carry), T_r = adj @ G_r. The band's first row also
    # needs S_{i_s - 1}: the one recomputed range per band.
    u1 = _columns_up(x_ptr, b * h + i_s, w, K, j0, j1, lc, k, ld_mask)
    u0 = _columns_up(x_ptr, b * h + tl.maximum(i_s - 1, 0), w, K, j0, j1, lc, k, ld_mask)
    carry = tl.zeros((BLOCK_J, BLOCK_K), dtype=tl.float32)
    for r in range(_first_reader(i_s - 1, scale_h, h, H), _first_reader(i_s, scale_h, h, H)):
        _y0, _y1, ly = bilinear_tap(tl.cast(r, tl.int32), scale_h, h)
        g = _row_grad(u0, u1, ly, (b * H + r) * W, c, c_mask, k, k_mask, labels_ptr, lse_ptr, coef_ptr)
        carry += ly * tl.dot(adj, g, input_precision="tf32x3")
    for i in range(i_s, i_e):
        u0 = u1
        u1 = _columns_up(x_ptr, b * h + tl.minimum(i + 1, h - 1), w, K, j0, j1, lc, k, ld_mask)
        acc = carry
        carry = tl.zeros((BLOCK_J, BLOCK_K), dtype=tl.float32)
        for r in range(_first_reader(i, scale_h, h, H), _first_reader(i + 1, scale_h, h, H)):
            _y0, y1, ly = bilinear_tap(tl.cast(r, tl.int32), scale_h, h)
            g = _row_grad(u0, u1, ly, (b * H + r) * W, c, c_mask, k, k_mask, labels_ptr, lse_ptr, coef_ptr)
            t = tl.dot(adj, g, input_precision="tf32x3")
            same = y1 == i  # the last row: both taps are row i
            acc += tl.where(same, 1.0, 1.0 - ly) * t
            carry += tl.where(same, 0.0, ly) * t
        # A non-finite G makes its whole column of T non-finite (0 * nan in the dot): where the
        # stored row has any, it is recomputed with the reference's pattern (never with finite data).
        n_bad = tl.sum(tl.sum(tl.where(out_mask & ((acc != acc) | (tl.abs(acc) == float("inf"))), 1, 0), 1), 0)
        if n_bad > 0:
            acc = _exact_row(x_ptr, labels_ptr, lse_ptr, coef_ptr, b, i, h, w, H, W, K, scale_h,
                             j0, j1, lc, c, c_mask, k, k_mask, adj, adj_taps, BLOCK_J, BLOCK_K)
        gx_row = gx_ptr + (b * h + i) * w * K
        tl.store(gx_row + (jcol * K)[:, None] + k[None, :], acc.to(gx_ptr.dtype.element_ty), mask=out_mask)


def fwd_class_block(K: int) -> int:
    """The forward's class block for K classes: the fewest padded lanes, then the larger block."""
    return min((16, 32, 64), key=lambda bk: (-(-K // bk) * bk, -bk))


def launch_config(K: int, gpu: bool) -> dict[str, int]:
    """Pixels (BLOCK_P) x classes (BLOCK_K) per program, for K classes; ``gpu``: see gpu_launch_config.

    On a GPU a tile holds about 2048 elements; the interpreter takes 64 pixels whatever K, so
    that it runs fewer programs. BLOCK_K is the one of 16, 32 and 64 that pads K the least (the
    larger on a tie): padded classes cost a gather and an exp per pixel like real ones, and the
    kernel is bound by those lanes (K = 150: 160 lanes with 32, against 192 with 64).
    """
    block_k = fwd_class_block(K)
    block_p = max(1, 2048 // block_k) if gpu else 64
    return {"BLOCK_P": block_p, "BLOCK_K": block_k}


def bwd_launch_config(K: int, w: int, W: int, gpu: bool) -> dict[str, int]:
    """The backward's program: a class block (BLOCK_K) x COLS low-res columns x ROWS low-res rows.

    The output columns that read COLS low-res columns have their first taps in a run of COLS + 1:
    COLS is the largest whose runs fit BLOCK_C, counted from the tap rule (:func:`plan.column_plan`),
    and at most BLOCK_J - 2 (the adjoint tile also holds the two neighbours the taps reach). BLOCK_C
    is 32, less when fewer columns suffice, more only when even COLS = 1 needs it (upsampling by
    more than ~14). BLOCK_K = 16 and BLOCK_C = 32: the
    loop-invariant adjoint is held as a tf32x3 dot operand (hi and lo parts) by every warp, and
    64 columns or 32 classes spill at sm_90 (B2 1024 bf16: 172 B with 64 x 16). ROWS: 32 low-res
    rows per program on a GPU (the rows of S_{i_s - 1} are recomputed once per band), 4 in the
    interpreter.
    """
    block_j = 16
    block_k = 16  # tl.dot's smallest N; also the fewest padded lanes (K = 150: 160)
    cols, block_c = column_plan(w, W, block_j)
    return {"BLOCK_J": block_j, "BLOCK_C": block_c, "BLOCK_K": block_k, "COLS": cols, "ROWS": 32 if gpu else 4}


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
    # 8 warps: with 4, the 4-tap gather of a 32 x 64 tile spills 64 B at sm_80 (255 registers)
    _upsample_cross_entropy_fwd_kernel[(triton.cdiv(n_pix, block_p),)](
        nll, lse, x, labels, n_pix, h, w, H, W, K, h / H, w / W, ignore_index,
        BLOCK_P=block_p, BLOCK_K=block_k, num_warps=8,
    )
    return nll, lse


def upsample_cross_entropy_bwd_triton(
    coef: torch.Tensor, x: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """d(sum coef * nll)/dx, (B, h, w, K) in ``out_dtype`` (accumulated in fp32, rounded once on store).

    coef, lse: contiguous (B, H, W) fp32; x: contiguous (B, h, w, K); labels: contiguous int64 (B, H, W).
    """
    check_interpreter_dtypes("upsample_cross_entropy", x, coef, lse)
    B, h, w, K = x.shape
    H, W = labels.shape[-2:]
    gx = empty(B, h, w, K, dtype=out_dtype, device=x.device)
    cfg = bwd_launch_config(K, w, W, gpu_launch_config(x))
    n_bands = triton.cdiv(h, cfg["ROWS"])
    grid = (triton.cdiv(K, cfg["BLOCK_K"]), triton.cdiv(w, cfg["COLS"]), B * n_bands)
    # 8 warps (222-234 registers, 0 spills with triton 3.6 and 3.9): with 4, triton 3.6 spills 28 B at sm_80 in 16 bits
    _upsample_cross_entropy_bwd_kernel[grid](
        gx, x, labels, lse, coef, h, w, H, W, K, h / H, w / W, n_bands, **cfg, num_warps=8,
    )
    return gx
