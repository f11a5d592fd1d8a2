"""Mix-FFN's second half in one Triton kernel: out = GELU(dwconv3x3(h) + bc) W2^T + b2.

The unfused forward writes y = GELU(dwconv3x3(h) + bc) (B, N, hidden) and cuBLAS reads it back for fc2:
two passes over the largest tensor of the layer. Here y never leaves the chip: a program owns a
tile of ROWS x BLOCK_W pixels and BLOCK_N output channels and loops over the hidden channels in
chunks of BLOCK_K; for each chunk it computes the conv from 9 shifted loads of h (the halo rows and
columns come from L1/L2: neighbouring tiles read them too), the bias and GELU in fp32, rounds y to
h's dtype -- where the unfused path rounds it when storing y -- and multiplies it into the fp32
accumulator with the chunk of W2 (tl.dot: tensor cores in fp16/bf16, TF32 or exact fp32 in fp32 as
``torch.backends.cuda.matmul.allow_tf32`` says). With more output channels than BLOCK_N the conv is
recomputed once per channel block, so the launcher takes this path only up to MAX_OUT_CHANNELS
(MiT stages 1 and 2, where the layer is bound by the bytes of y; stages 3 and 4 are GEMM-bound).
The backward is unchanged: it recomputes y for fc2's weight gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...utils.debug import empty
from ..dwconv3x3_gelu.triton_kernels import ACT_CODES, _act
from ..triton_launch import check_interpreter_dtypes, dot_precision
from .op import MAX_OUT_CHANNELS, fused_fc2_applies

__all__ = ["MAX_OUT_CHANNELS", "fused_fc2_applies", "launch_config", "dwconv_gelu_linear_triton"]


@triton.jit
def _dwconv_gelu_linear_kernel(
    h_ptr, wc_ptr, bc_ptr, w2_ptr, b2_ptr, out_ptr,
    H, W, K, N_OUT, n_hb, n_wb,
    HAS_B2: tl.constexpr, ACT: tl.constexpr, PRECISION: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    wb = pid % n_wb
    hb = (pid // n_wb) % n_hb
    b = (pid // (n_wb * n_hb)).to(tl.int64)
    p = tl.arange(0, ROWS * BLOCK_W)
    oh = hb * ROWS + p // BLOCK_W  # (BLOCK_P,) pixel rows and columns of the tile
    ow = wb * BLOCK_W + p % BLOCK_W
    pix_ok = (oh < H) & (ow < W)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N_OUT
    acc = tl.zeros((ROWS * BLOCK_W, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        z = tl.zeros((ROWS * BLOCK_W, BLOCK_K), dtype=tl.float32)
        z += tl.load(bc_ptr + k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        for t in tl.static_range(9):
            ih = oh + (t // 3 - 1)
            iw = ow + (t % 3 - 1)
            ok = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)  # the conv's zero padding
            row = (b * H + ih) * W + iw
            hv = tl.load(h_ptr + row[:, None] * K + k[None, :], mask=ok[:, None] & k_ok[None, :], other=0.0)
            wt = tl.load(wc_ptr + k * 9 + t, mask=k_ok, other=0.0).to(tl.float32)
            z += hv.to(tl.float32) * wt[None, :]
        y = tl.where(k_ok[None, :], _act(z, ACT), 0.0).to(h_ptr.dtype.element_ty)  # y's rounding, as stored
        w2 = tl.load(w2_ptr + n[None, :] * K + k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc += tl.dot(y, w2.to(h_ptr.dtype.element_ty), input_precision=PRECISION)
    if HAS_B2:
        acc += tl.load(b2_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    rows = (b * H + oh) * W + ow
    tl.store(out_ptr + rows[:, None] * N_OUT + n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=pix_ok[:, None] & n_ok[None, :])


def launch_config(out_channels: int, dtype: torch.dtype) -> dict[str, int]:
    """A program's tile: ROWS x BLOCK_W pixels, BLOCK_K hidden channels per step, BLOCK_N output channels.

    16-bit: 64 pixels x 32 hidden channels per step (the 9 taps of a step in flight), all output channels
    (up to 128) in one block, on 8 warps for 128 of them; fp32 halves the hidden step (its taps take
    twice the registers). No spills at sm_90 or sm_80 (AOT report). The same on a GPU and in the
    interpreter (the test shapes are small).
    """
    block_n = max(16, triton.next_power_of_2(out_channels))
    return {"ROWS": 4, "BLOCK_W": 16, "BLOCK_K": 16 if dtype == torch.float32 else 32, "BLOCK_N": block_n}


def dwconv_gelu_linear_triton(h: torch.Tensor, hw: tuple[int, int], wc: torch.Tensor, bc: torch.Tensor,
                              w2: torch.Tensor, b2: torch.Tensor | None, approximate: str = "none") -> torch.Tensor:
    """GELU(dwconv3x3(h) + bc) W2^T + b2. h (B, N, K) (made contiguous), N = H * W; wc (K, 1, 3, 3); bc (K,);
    w2 (C_out, K) with C_out <= MAX_OUT_CHANNELS; b2 (C_out,) or None; all in h's dtype. Returns (B, N, C_out)."""
    check_interpreter_dtypes("mix_ffn", h, wc, bc, w2, b2)
    h = h.contiguous()
    b, n, k = h.shape
    height, width = hw
    c_out = w2.shape[0]
    if height * width != n or w2.shape[1] != k or wc.shape[0] != k or not fused_fc2_applies(c_out):
        raise ValueError(f"mix_ffn (triton): h {tuple(h.shape)}, hw {tuple(hw)}, w2 {tuple(w2.shape)}, "
                         f"wc {tuple(wc.shape)} do not fit (C_out <= {MAX_OUT_CHANNELS})")
    out = empty(b, n, c_out, dtype=h.dtype, device=h.device)
    if out.numel() == 0:
        return out
    cfg = launch_config(c_out, h.dtype)
    n_hb, n_wb = triton.cdiv(height, cfg["ROWS"]), triton.cdiv(width, cfg["BLOCK_W"])
    _dwconv_gelu_linear_kernel[(b * n_hb * n_wb, triton.cdiv(c_out, cfg["BLOCK_N"]))](
        h, wc.contiguous(), bc.contiguous(), w2.contiguous(), b2 if b2 is not None else bc, out,
        height, width, k, c_out, n_hb, n_wb,
        HAS_B2=b2 is not None, ACT=ACT_CODES[approximate], PRECISION=dot_precision(h.dtype), **cfg,
        num_warps=8 if cfg["BLOCK_N"] >= 128 else 4,  # the (64, 128) fp32 accumulator on 8 warps: no spills
    )
    return out
