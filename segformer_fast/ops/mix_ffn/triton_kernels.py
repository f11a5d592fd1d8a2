"""Mix-FFN after fc1 in Triton kernels with the depthwise 3x3 conv in their prologue.

Forward: out = GELU(dwconv3x3(h) + bc) W2^T + b2. The unfused forward writes y = GELU(dwconv3x3(h) + bc)
(B, N, hidden) and cuBLAS reads it back for fc2: two passes over the largest tensor of the layer. Here y
never leaves the chip: a program owns a tile of ROWS x BLOCK_W pixels and BLOCK_N output channels and
loops over the hidden channels in chunks of BLOCK_K; for each chunk it computes the conv from 9 shifted
loads of h (the halo rows and columns come from L1/L2: neighbouring tiles read them too), the bias and
GELU in fp32, rounds y to h's dtype -- where the unfused path rounds it when storing y -- and multiplies
it into the fp32 accumulator with the chunk of W2 (tl.dot: tensor cores in fp16/bf16, TF32 or exact fp32
in fp32 as ``torch.backends.cuda.matmul.allow_tf32`` says). With more output channels than BLOCK_N the
conv is recomputed once per channel block, so the launcher takes this path only up to MAX_OUT_CHANNELS
(MiT stages 1 and 2, where the layer is bound by the bytes of y; stages 3 and 4 are GEMM-bound).

Backward (:func:`mix_ffn_bwd_triton`), the unfused chain being y recomputed, gW2 = gout^T y, gb2, gy =
gout W2, the conv's backward (gz = gy GELU'(z) written, then gh = conv_flipped(gz) written), gx = gh W1,
gW1 = gh^T x, gb1 = sum gh (about 13.5 passes over a hidden-sized tensor), in three kernels that store gz
only (about 4.75 passes):

1. the weight-gradient kernel over y: a program owns BLOCK_K hidden channels and a group of pixel
   tiles; per tile it recomputes y from h, adds gout^T y into its gW2 block (tl.dot), computes gy = gout
   W2 (its W2 chunk stays in registers), gz = gy GELU'(z), stores gz, and sums gz * h_shifted (9 taps)
   and gz for the conv's weight and bias gradients;
2. the forward's kernel with flipped taps, no bias and no GELU on gz, times W1: gx;
3. the weight-gradient kernel over gh = conv_flipped(gz): gW1 = gh^T x and gb1.

The per-group partials are summed afterwards in a fixed order (no atomics): deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...utils.debug import empty
from ..dwconv3x3_gelu.triton_kernels import ACT_CODES, _act, _act_grad
from ..triton_launch import check_interpreter_dtypes, dot_precision
from .op import MAX_OUT_CHANNELS, fused_fc2_applies

__all__ = ["MAX_OUT_CHANNELS", "fused_fc2_applies", "launch_config", "dwconv_gelu_linear_triton", "mix_ffn_bwd_triton",
           "wgrad_split"]


@triton.jit
def _tile_pixels(tile, n_hb, n_wb, ROWS: tl.constexpr, BLOCK_W: tl.constexpr):
    # tile number -> (image (int64), pixel rows, pixel columns) of its ROWS x BLOCK_W pixels, row-major
    wb = tile % n_wb
    hb = (tile // n_wb) % n_hb
    b = (tile // (n_wb * n_hb)).to(tl.int64)
    p = tl.arange(0, ROWS * BLOCK_W)
    return b, hb * ROWS + p // BLOCK_W, wb * BLOCK_W + p % BLOCK_W


@triton.jit
def _tap_load(src_ptr, b, oh, ow, H, W, K, k, k_ok, T: tl.constexpr):
    # src at the pixels shifted by tap T (rows T // 3 - 1, columns T % 3 - 1), zero outside the image (the
    # conv's padding) and past K: (BLOCK_P, BLOCK_K) fp32
    ih = oh + (T // 3 - 1)
    iw = ow + (T % 3 - 1)
    ok = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    row = (b * H + ih) * W + iw
    return tl.load(src_ptr + row[:, None] * K + k[None, :], mask=ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)


@triton.jit
def _stencil(src_ptr, wc_ptr, bc_ptr, b, oh, ow, H, W, K, k, k_ok,
             HAS_BIAS: tl.constexpr, FLIP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    # the depthwise 3x3 conv of src (B, H*W, K) at the tile's pixels for channels k, fp32 (BLOCK_P, BLOCK_K);
    # FLIP turns the kernel by 180 degrees (the conv's input gradient), HAS_BIAS adds bc
    z = tl.zeros((BLOCK_P, BLOCK_K), dtype=tl.float32)
    if HAS_BIAS:
        z += tl.load(bc_ptr + k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
    for t in tl.static_range(9):
        idx = 8 - t if FLIP else t
        wt = tl.load(wc_ptr + k * 9 + idx, mask=k_ok, other=0.0).to(tl.float32)
        z += _tap_load(src_ptr, b, oh, ow, H, W, K, k, k_ok, t) * wt[None, :]
    return z


@triton.jit
def _dwconv_gelu_linear_kernel(
    h_ptr, wc_ptr, bc_ptr, w2_ptr, b2_ptr, out_ptr,
    H, W, K, N_OUT, n_hb, n_wb, stride_wn, stride_wk,
    HAS_BC: tl.constexpr, FLIP: tl.constexpr, HAS_B2: tl.constexpr, ACT: tl.constexpr, PRECISION: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # out = act(conv(h) [+ bc]) W^T [+ b2], W[n, k] at w2_ptr + n * stride_wn + k * stride_wk: fc2 in the forward
    # (W2 (N_OUT, K)), gx = conv_flipped(gz) W1 in the backward (W1 (K, N_OUT) read transposed, no bias, ACT=0)
    b, oh, ow = _tile_pixels(tl.program_id(0), n_hb, n_wb, ROWS, BLOCK_W)
    pix_ok = (oh < H) & (ow < W)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N_OUT
    acc = tl.zeros((ROWS * BLOCK_W, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        z = _stencil(h_ptr, wc_ptr, bc_ptr, b, oh, ow, H, W, K, k, k_ok, HAS_BC, FLIP, ROWS * BLOCK_W, BLOCK_K)
        y = tl.where(k_ok[None, :], _act(z, ACT), 0.0).to(h_ptr.dtype.element_ty)  # y's rounding, as stored
        w2 = tl.load(w2_ptr + n[None, :] * stride_wn + k[:, None] * stride_wk, mask=k_ok[:, None] & n_ok[None, :],
                     other=0.0)
        acc += tl.dot(y, w2.to(h_ptr.dtype.element_ty), input_precision=PRECISION)
    if HAS_B2:
        acc += tl.load(b2_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    rows = (b * H + oh) * W + ow
    tl.store(out_ptr + rows[:, None] * N_OUT + n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=pix_ok[:, None] & n_ok[None, :])


@triton.jit
def _stencil_wgrad_kernel(
    src_ptr, wc_ptr, bc_ptr, other_ptr, w2_ptr, gz_ptr, wpart_ptr, vpart_ptr, opart_ptr,
    H, W, K, N_OTHER, n_hb, n_wb, n_tiles, TILES_PER_PROG,
    HIDDEN: tl.constexpr, ACT: tl.constexpr, PRECISION: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # A program owns BLOCK_K channels of the stencil's output v and TILES_PER_PROG pixel tiles, and sums over its
    # pixels, in fp32: wpart[g] = other^T v (BLOCK_N x BLOCK_K of the (N_OTHER, K) weight gradient) and
    # vpart[g, 9] = sum v (the bias gradient). Two uses:
    # - HIDDEN: v = y = GELU(conv(h) + bc) recomputed from h, other = gout: gW2 = gout^T y; and on the same tile
    #   gy = gout W2 (its chunk of W2 stays in registers), gz = gy * GELU'(z) (stored, for the conv's input
    #   gradient), vpart[g, 0..8] = sum gz * h_shifted and vpart[g, 9] = sum gz (the conv's weight and bias
    #   gradients), opart[g] = sum gout (gb2, from the first channel block's programs).
    # - else: v = gh = conv_flipped(gz), other = x: gW1 = gh^T x, vpart[g, 9] = gb1 = sum gh.
    # Each 16-bit value is rounded where the unfused path stores it (y, gy, gz, gh).
    kb = tl.program_id(0)
    g = tl.program_id(1)
    dt = src_ptr.dtype.element_ty
    k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = k < K
    n = tl.arange(0, BLOCK_N)
    n_ok = n < N_OTHER
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    s_v = tl.zeros((BLOCK_K,), dtype=tl.float32)
    if HIDDEN:
        w2 = tl.load(w2_ptr + n[:, None] * K + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(dt)
        s_o = tl.zeros((BLOCK_N,), dtype=tl.float32)
        s0 = tl.zeros((BLOCK_K,), dtype=tl.float32)
        s1 = tl.zeros((BLOCK_K,), dtype=tl.float32)
        s2 = tl.zeros((BLOCK_K,), dtype=tl.float32)
        s3 = tl.zeros((BLOCK_K,), dtype=tl.float32)
        s4 = tl.zeros((BLOCK_K,), dtype=tl.float32)
        s5 = tl.zeros((BLOCK_K,), dtype=tl.float32)
        s6 = tl.zeros((BLOCK_K,), dtype=tl.float32)
        s7 = tl.zeros((BLOCK_K,), dtype=tl.float32)
        s8 = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for i in range(TILES_PER_PROG):
        tile = g * TILES_PER_PROG + i
        # a tile past the last is read as the last (in bounds) and counts nowhere
        b, oh, ow = _tile_pixels(tl.minimum(tile, n_tiles - 1), n_hb, n_wb, ROWS, BLOCK_W)
        pix_ok = (oh < H) & (ow < W) & (oh * 0 + tile < n_tiles)  # a vector: the interpreter mistypes scalar & block
        rows = (b * H + oh) * W + ow
        o = tl.load(other_ptr + rows[:, None] * N_OTHER + n[None, :], mask=pix_ok[:, None] & n_ok[None, :],
                    other=0.0).to(dt)  # (BLOCK_P, BLOCK_N): zero on pixels outside the image
        if HIDDEN:
            z = _stencil(src_ptr, wc_ptr, bc_ptr, b, oh, ow, H, W, K, k, k_ok, True, False, ROWS * BLOCK_W, BLOCK_K)
            v = tl.where(k_ok[None, :], _act(z, ACT), 0.0).to(dt)  # y, rounded as the unfused path stores it
        else:
            z = _stencil(src_ptr, wc_ptr, bc_ptr, b, oh, ow, H, W, K, k, k_ok, False, True, ROWS * BLOCK_W, BLOCK_K)
            v = tl.where(pix_ok[:, None] & k_ok[None, :], z, 0.0).to(dt)  # gh, likewise
        acc += tl.dot(tl.trans(o), v, input_precision=PRECISION)
        if HIDDEN:
            s_o += tl.sum(o.to(tl.float32), axis=0)
            gy = tl.dot(o, w2, input_precision=PRECISION).to(dt).to(tl.float32)  # gy = gout W2, stored in dt
            gz = tl.where(pix_ok[:, None], gy * _act_grad(z, ACT), 0.0)
            tl.store(gz_ptr + rows[:, None] * K + k[None, :], gz.to(gz_ptr.dtype.element_ty),
                     mask=pix_ok[:, None] & k_ok[None, :])
            s_v += tl.sum(gz, axis=0)
            # the weight gradient from the fp32 gz; the shifted h come from L1/L2 (the stencil just read them)
            s0 += tl.sum(gz * _tap_load(src_ptr, b, oh, ow, H, W, K, k, k_ok, 0), axis=0)
            s1 += tl.sum(gz * _tap_load(src_ptr, b, oh, ow, H, W, K, k, k_ok, 1), axis=0)
            s2 += tl.sum(gz * _tap_load(src_ptr, b, oh, ow, H, W, K, k, k_ok, 2), axis=0)
            s3 += tl.sum(gz * _tap_load(src_ptr, b, oh, ow, H, W, K, k, k_ok, 3), axis=0)
            s4 += tl.sum(gz * _tap_load(src_ptr, b, oh, ow, H, W, K, k, k_ok, 4), axis=0)
            s5 += tl.sum(gz * _tap_load(src_ptr, b, oh, ow, H, W, K, k, k_ok, 5), axis=0)
            s6 += tl.sum(gz * _tap_load(src_ptr, b, oh, ow, H, W, K, k, k_ok, 6), axis=0)
            s7 += tl.sum(gz * _tap_load(src_ptr, b, oh, ow, H, W, K, k, k_ok, 7), axis=0)
            s8 += tl.sum(gz * _tap_load(src_ptr, b, oh, ow, H, W, K, k, k_ok, 8), axis=0)
        else:
            s_v += tl.sum(v.to(tl.float32), axis=0)
    g64 = g.to(tl.int64)
    tl.store(wpart_ptr + (g64 * N_OTHER + n[:, None]) * K + k[None, :], acc, mask=n_ok[:, None] & k_ok[None, :])
    vpart = vpart_ptr + g64 * 10 * K + k  # (G, 10, K): taps 0..8, then the bias
    tl.store(vpart + 9 * K, s_v, mask=k_ok)
    if HIDDEN:
        tl.store(vpart + 0 * K, s0, mask=k_ok)
        tl.store(vpart + 1 * K, s1, mask=k_ok)
        tl.store(vpart + 2 * K, s2, mask=k_ok)
        tl.store(vpart + 3 * K, s3, mask=k_ok)
        tl.store(vpart + 4 * K, s4, mask=k_ok)
        tl.store(vpart + 5 * K, s5, mask=k_ok)
        tl.store(vpart + 6 * K, s6, mask=k_ok)
        tl.store(vpart + 7 * K, s7, mask=k_ok)
        tl.store(vpart + 8 * K, s8, mask=k_ok)
        tl.store(opart_ptr + g64 * N_OTHER + n, s_o, mask=n_ok & (n * 0 + kb == 0))


def launch_config(out_channels: int, dtype: torch.dtype) -> dict[str, int]:
    """A program's tile: ROWS x BLOCK_W pixels, BLOCK_K hidden channels per step, BLOCK_N output channels.

    16-bit: 64 pixels x 32 hidden channels per step (the 9 taps of a step in flight), all output channels
    (up to 128) in one block, on 8 warps for 128 of them; fp32 halves the hidden step (its taps take
    twice the registers). No spills at sm_90 or sm_80 (AOT report). The same on a GPU and in the
    interpreter (the test shapes are small).
    """
    block_n = max(16, triton.next_power_of_2(out_channels))
    return {"ROWS": 4, "BLOCK_W": 16, "BLOCK_K": 16 if dtype == torch.float32 else 32, "BLOCK_N": block_n}


def _num_warps(cfg: dict[str, int]) -> int:
    return 8 if cfg["BLOCK_N"] >= 128 else 4  # a (64, 128) or (128, BLOCK_K) fp32 accumulator on 8 warps: no spills


def _stencil_linear(src: torch.Tensor, hw: tuple[int, int], wc: torch.Tensor, bc: torch.Tensor | None,
                    w: torch.Tensor, w_strides: tuple[int, int], n_out: int, bias: torch.Tensor | None, act: int,
                    flip: bool, num_stages: int = 3) -> torch.Tensor:
    """act(conv(src) [+ bc]) W^T [+ bias], (B, N, n_out) in src's dtype; W[n, k] at n * w_strides[0] + k * w_strides[1]."""
    b, n, k = src.shape
    height, width = hw
    out = empty(b, n, n_out, dtype=src.dtype, device=src.device)
    if out.numel() == 0:
        return out
    cfg = launch_config(n_out, src.dtype)
    n_hb, n_wb = triton.cdiv(height, cfg["ROWS"]), triton.cdiv(width, cfg["BLOCK_W"])
    _dwconv_gelu_linear_kernel[(b * n_hb * n_wb, triton.cdiv(n_out, cfg["BLOCK_N"]))](
        src, wc, bc if bc is not None else wc, w, bias if bias is not None else wc, out,
        height, width, k, n_out, n_hb, n_wb, *w_strides,
        HAS_BC=bc is not None, FLIP=flip, HAS_B2=bias is not None, ACT=act, PRECISION=dot_precision(src.dtype),
        **cfg, num_warps=_num_warps(cfg), num_stages=num_stages,
    )
    return out


def _fit(h: torch.Tensor, hw: tuple[int, int], wc: torch.Tensor, w2: torch.Tensor, what: str) -> None:
    b, n, k = h.shape
    c_out = w2.shape[0]
    if hw[0] * hw[1] != n or w2.shape[1] != k or wc.shape[0] != k or not fused_fc2_applies(c_out):
        raise ValueError(f"mix_ffn (triton): h {tuple(h.shape)}, hw {tuple(hw)}, {what} {tuple(w2.shape)}, "
                         f"wc {tuple(wc.shape)} do not fit (C_out <= {MAX_OUT_CHANNELS})")


def dwconv_gelu_linear_triton(h: torch.Tensor, hw: tuple[int, int], wc: torch.Tensor, bc: torch.Tensor,
                              w2: torch.Tensor, b2: torch.Tensor | None, approximate: str = "none") -> torch.Tensor:
    """GELU(dwconv3x3(h) + bc) W2^T + b2. h (B, N, K) (made contiguous), N = H * W; wc (K, 1, 3, 3); bc (K,);
    w2 (C_out, K) with C_out <= MAX_OUT_CHANNELS; b2 (C_out,) or None; all in h's dtype. Returns (B, N, C_out)."""
    check_interpreter_dtypes("mix_ffn", h, wc, bc, w2, b2)
    h = h.contiguous()
    _fit(h, hw, wc, w2, "w2")
    w2 = w2.contiguous()
    return _stencil_linear(h, hw, wc.contiguous(), bc.contiguous(), w2, (w2.shape[1], 1), w2.shape[0], b2,
                           ACT_CODES[approximate], flip=False)


def wgrad_config(n_other: int, dtype: torch.dtype, hidden: bool) -> dict[str, int]:
    """The weight-gradient kernel's tile (as launch_config's) with num_warps and num_stages, chosen by the AOT
    report's registers (no spills at sm_90 or sm_80 at B2's shapes).

    The hidden pass holds more per pixel (z, y, gy, gz, gout's tile, the W2 chunk, the gW2 block): 32 pixels on
    8 warps, unpipelined (16 in fp32 up to 64 channels of gout, where ptxas at sm_80 keeps 128 registers). The
    gh pass is the launch_config tile; fp32 on 8 warps, unpipelined.
    """
    cfg = launch_config(n_other, dtype)
    fp32 = dtype == torch.float32
    if hidden:
        cfg.update(ROWS=1 if fp32 and cfg["BLOCK_N"] <= 64 else 2, num_warps=8, num_stages=1)
    else:
        cfg.update(num_warps=8 if fp32 else _num_warps(cfg), num_stages=1 if fp32 else 3)
    return cfg


def wgrad_split(n_tiles: int, n_kb: int, device: torch.device) -> int:
    """Pixel groups of the weight-gradient kernels: about 4 programs per SM on a GPU (each sums its group's
    tiles, the groups' partials are summed afterwards in a fixed order), 3 groups in the interpreter."""
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(n_tiles, triton.cdiv(target, n_kb)))
    return min(n_tiles, 3)


def _stencil_wgrad(src: torch.Tensor, hw: tuple[int, int], wc: torch.Tensor, bc: torch.Tensor, other: torch.Tensor,
                   w2: torch.Tensor | None, act: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                                                               torch.Tensor | None]:
    """_stencil_wgrad_kernel: (other^T v (N_OTHER, K), vsums (10, K), gz or None, sum other (N_OTHER,) or None),
    sums fp32; w2 given: the hidden pass (v = y, gz written), else v = gh (see the kernel)."""
    b, n, k = src.shape
    n_other = other.shape[-1]
    height, width = hw
    hidden = w2 is not None
    cfg = wgrad_config(n_other, src.dtype, hidden)
    nw, ns = cfg.pop("num_warps"), cfg.pop("num_stages")
    n_hb, n_wb = triton.cdiv(height, cfg["ROWS"]), triton.cdiv(width, cfg["BLOCK_W"])
    n_tiles, n_kb = b * n_hb * n_wb, triton.cdiv(k, cfg["BLOCK_K"])
    groups = wgrad_split(n_tiles, n_kb, src.device)
    wpart = empty(groups, n_other, k, dtype=torch.float32, device=src.device)
    vpart = empty(groups, 10, k, dtype=torch.float32, device=src.device)
    opart = empty(groups, n_other, dtype=torch.float32, device=src.device) if hidden else None
    gz = empty(b, n, k, dtype=src.dtype, device=src.device) if hidden else None
    _stencil_wgrad_kernel[(n_kb, groups)](
        src, wc, bc, other, w2 if hidden else wc, gz if hidden else src, wpart, vpart, opart if hidden else wpart,
        height, width, k, n_other, n_hb, n_wb, n_tiles, triton.cdiv(n_tiles, groups),
        HIDDEN=hidden, ACT=act, PRECISION=dot_precision(src.dtype), **cfg, num_warps=nw, num_stages=ns,
    )
    vsums = vpart.sum(0) if hidden else vpart[:, 9].sum(0)  # fixed-order reductions over the groups
    return wpart.sum(0), vsums, gz, opart.sum(0) if hidden else None


def mix_ffn_bwd_triton(gout: torch.Tensor, x: torch.Tensor, h: torch.Tensor, hw: tuple[int, int], wc: torch.Tensor,
                       bc: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, approximate: str = "none"
                       ) -> tuple[torch.Tensor, ...]:
    """Mix-FFN's backward after fc1, in three kernels, neither y, gy nor gh stored:

    1. ``_stencil_wgrad_kernel`` (hidden): y recomputed from h; gW2 = gout^T y, gb2 = sum gout; gy = gout W2;
       gz = gy GELU'(z) written; the conv's weight and bias gradients from gz and the shifted h.
    2. ``_dwconv_gelu_linear_kernel`` (flipped taps, no bias, no GELU): gx = conv_flipped(gz) W1.
    3. ``_stencil_wgrad_kernel``: gh = conv_flipped(gz) again; gW1 = gh^T x, gb1 = sum gh.

    Args:
        gout (B, N, C_out), x (B, N, C), h = fc1(x) (B, N, K), all in one dtype (made contiguous); hw: (H, W),
        H * W = N; wc (K, 1, 3, 3), bc (K,), w1 (K, C), w2 (C_out, K) in that dtype; C, C_out <= MAX_OUT_CHANNELS.
    Returns:
        (gx (B, N, C) in h's dtype, then fp32: gW1 (K, C), gb1 (K,), gWc (K, 1, 3, 3), gbc (K,), gW2 (C_out, K),
        gb2 (C_out,)).
    """
    check_interpreter_dtypes("mix_ffn", gout, x, h, wc, bc, w1, w2)
    gout, x, h, wc, bc, w1, w2 = (t.contiguous() for t in (gout, x, h, wc, bc, w1, w2))
    _fit(h, hw, wc, w2, "w2")
    _fit(h, hw, wc, w1.t(), "w1^T")
    b, n, k = h.shape
    if gout.shape != (b, n, w2.shape[0]) or x.shape != (b, n, w1.shape[1]):
        raise ValueError(f"mix_ffn (triton): gout {tuple(gout.shape)} and x {tuple(x.shape)} do not fit h "
                         f"{tuple(h.shape)}, w1 {tuple(w1.shape)} and w2 {tuple(w2.shape)}")
    if h.numel() == 0 or gout.numel() == 0:
        f32 = dict(dtype=torch.float32, device=h.device)
        return (torch.zeros_like(x), torch.zeros(w1.shape, **f32), torch.zeros(k, **f32), torch.zeros(wc.shape, **f32),
                torch.zeros(k, **f32), torch.zeros(w2.shape, **f32), torch.zeros(w2.shape[0], **f32))
    act = ACT_CODES[approximate]
    gw2, conv_sums, gz, gb2 = _stencil_wgrad(h, hw, wc, bc, gout, w2, act)
    gx = _stencil_linear(gz, hw, wc, None, w1, (1, w1.shape[1]), w1.shape[1], None, act=0, flip=True,
                         num_stages=1 if gz.dtype == torch.float32 else 3)  # fp32 pipelined: 12 B spilled at sm_80
    gw1_t, gb1, _, _ = _stencil_wgrad(gz, hw, wc, bc, x, None, act)
    gwc = conv_sums[:9].t().contiguous().view(k, 1, 3, 3)
    return gx, gw1_t.t().contiguous(), gb1, gwc, conv_sums[9].clone(), gw2, gb2
