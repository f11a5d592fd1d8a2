"""Roofline cost model of mix_ffn (fc1 -> dwconv3x3_gelu -> fc2, save_hidden=True), see
segformer_fast/ops/cost.py.

Shapes: x (B, H*W, C), hidden = 4C typically; T = B*H*W tokens. With C <= 128 the forward's conv +
GELU + fc2 is one Triton kernel and the backward after fc1 three (triton_kernels.py), elsewhere the
matmuls are cuBLAS (torch),
each modelled as reading its operands once and writing its result once (tall-skinny GEMMs with
K <= 2048: the weight stays in L2, the activations stream once); the conv + GELU is the
dwconv3x3_gelu op's model.

MODELLED: the git blobs of the files this model describes; benchmarks/roofline.py reports the model as
stale when it changes (then update the model and MODELLED, and regenerate the report).
"""

from __future__ import annotations

from ..cost import BF16, FP32, SMS, Cost, Part, cdiv
from ..dwconv3x3_gelu.cost import GELU_GRAD_FLOPS, WGRAD_FLOPS
from ..dwconv3x3_gelu.cost import roofline as dwconv_roofline
from .op import fused_fc2_applies

__all__ = ["roofline", "MODELLED"]

MODELLED = {"op.py": "0093b72876ef2d6240234c2b54633031864b9054", "triton_kernels.py": "5e1b8bacaed1b12386fb816c43c37309625c8926"}


def _gemm(name: str, m: int, n: int, k: int, read: float, write: float, note: str = "") -> Part:
    return Part(f"torch: {name}", read + write, gemm_flops=2 * m * n * k, note=note or "cuBLAS, operands once")


def roofline(B: int, H: int, W: int, C: int, hidden: int, dtype_bytes: int = BF16) -> dict[str, Cost]:
    """{"forward": Cost, "backward": Cost} of one Mix-FFN on (B, H*W, C) tokens."""
    T = B * H * W
    x, h = T * C * dtype_bytes, T * hidden * dtype_bytes  # bytes of x (or out, gx) and of h (or y, gy, gh)
    w = C * hidden * dtype_bytes  # one fc weight
    conv = dwconv_roofline(B, H, W, hidden, dtype_bytes)
    mm = 2 * T * C * hidden  # one fc's flops

    fwd = Cost(
        gemm_flops=2 * mm, other_flops=conv["forward"].other_flops,
        min_bytes=x + 2 * w + x + h,  # x, weights in; out and h (kept for backward) out
        exps=conv["forward"].exps,
        notes="x read; out and fc1's output h (kept for backward) written; fc1, fc2 and the conv + GELU",
        parts=(_gemm("fc1 (h = x W1^T + b1)", T, hidden, C, x + w, h),) + (
            # C <= 128: one program per 4 x 16 pixels and all C outputs computes y chunk by chunk from 9 shifted
            # loads of h (the halo re-reads from L1/L2, as the conv alone) and multiplies it into fc2 at once
            (Part("_dwconv_gelu_linear_kernel", h + w + x + hidden * 10 * dtype_bytes, gemm_flops=mm,
                  other_flops=conv["forward"].other_flops,
                  note="h once (halo of 4x16 tiles in L2), out once; y never stored"),)
            if fused_fc2_applies(C) else
            (*conv["forward"].parts, _gemm("fc2 (out = y W2^T + b2)", T, C, hidden, h + w, x))
        ),
    )
    wgrad = 2 * C * hidden * FP32  # gw1, gw2 kept fp32 by the caller (mixed precision)
    E = T * hidden
    # the fused backward's weight-gradient kernels: 32 hidden channels x a group of pixel tiles per program, about
    # 4 programs per SM; each group writes fp32 partials of (C x hidden) + 10 x hidden (+ C), summed by torch
    groups = max(1, cdiv(4 * SMS, cdiv(hidden, 32)))
    partials = groups * (C * hidden + 10 * hidden + C) * FP32
    fused_bwd = (
        # gout's tile is re-read by the hidden/32 programs of its group, which run side by side: from L2
        Part("_stencil_wgrad_kernel (hidden: gW2, gb2, gy, gz, conv weight grads)", h + x + h + w + partials,
             gemm_flops=2 * mm, other_flops=conv["forward"].other_flops + E * (GELU_GRAD_FLOPS + 1 + WGRAD_FLOPS),
             note="h once (halo in L2), gout once, gz written; y and gy never stored"),
        Part("_dwconv_gelu_linear_kernel (gx = conv_flipped(gz) W1)", h + w + x, gemm_flops=mm, other_flops=E * 18,
             note="gz once (halo in L2), gx written; gh never stored"),
        Part("_stencil_wgrad_kernel (gh: gW1, gb1)", h + x + partials, gemm_flops=mm, other_flops=E * 19,
             note="gz once (halo in L2), x once; gh recomputed, never stored"),
        Part("torch: group partial sums", 2 * partials, other_flops=partials / FP32,
             note=f"{groups} groups of fp32 partials"),
    )
    bwd = Cost(
        gemm_flops=4 * mm, other_flops=conv["forward"].other_flops + conv["backward"].other_flops,
        min_bytes=2 * x + h + 2 * w + x + wgrad,  # x, gout, h, weights in; gx, fp32 weight grads out
        exps=conv["backward"].exps,
        notes="x, h, grad out read; grad x and fp32 weight grads written; y recomputed from h for fc2's weight grad",
        parts=fused_bwd if fused_fc2_applies(C) else (
            *(Part(p.name + " (y recomputed)", p.bytes, p.gemm_flops, p.other_flops, p.note)
              for p in conv["forward"].parts),
            _gemm("gW2 = gout^T y", C, hidden, T, x + h, C * hidden * dtype_bytes),
            Part("torch: gb2 = gout.sum", x, other_flops=T * C),
            _gemm("gy = gout W2", T, hidden, C, x + w, h),
            *conv["backward"].parts,
            _gemm("gx = gh W1", T, C, hidden, h + w, x),
            _gemm("gW1 = gh^T x", hidden, C, T, h + x, C * hidden * dtype_bytes),
            Part("torch: gb1 = gh.sum", h, other_flops=T * hidden),
        ),
    )
    return {"forward": fwd, "backward": bwd}
