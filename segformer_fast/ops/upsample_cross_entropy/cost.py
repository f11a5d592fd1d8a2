"""Roofline cost model of upsample_cross_entropy (the Triton path), see segformer_fast/ops/cost.py.

Shapes: logits (B, h, w, K) channels-last, labels (B, H, W) int64, no class weights, "mean".
P = B*H*W output pixels, L = B*h*w*K logits.

MODELLED: the git blobs of the files this model describes; benchmarks/roofline.py reports the model
as stale when they change (then update the model and MODELLED, and regenerate the report).
"""

from __future__ import annotations


from ..cost import (BF16, BOOL, EXP_FLOPS, FP32, INT64, LERP2D_FLOPS, LERP_MIN_FLOPS, TF32_GEMM_WEIGHT, Cost, Part,
                    cdiv)
from .plan import column_plan

__all__ = ["roofline", "MODELLED"]

MODELLED = {"triton_kernels.py": "faf4431bf59779d10d7950598f0183d86d43eeb6",
            "op.py": "ce3e8bc279df4b3889c099ddfece43f4dfaeb6bb"}


def bwd_launch_config(K: int, w: int, W: int) -> dict[str, int]:
    """triton_kernels.bwd_launch_config's GPU tiles, without Triton (tests/test_roofline.py compares the two)."""
    cols, block_c = column_plan(w, W, 16)
    return {"BLOCK_J": 16, "BLOCK_C": block_c, "BLOCK_K": 16, "COLS": cols, "ROWS": 32}


def _rows_of(i: int, h: int, H: int) -> int:
    """How many output rows have low-res row ``i`` as their first bilinear tap (align_corners=False)."""
    scale = h / H
    return sum(min(int(max(0.0, scale * (o + 0.5) - 0.5)), h - 1) == i for o in range(H))


def roofline(B: int, h: int, w: int, K: int, H: int, W: int, dtype_bytes: int = BF16) -> dict[str, Cost]:
    """{"forward": Cost, "backward": Cost} of one call on (B, h, w, K) logits and (B, H, W) labels."""
    block_k = min((16, 32, 64), key=lambda bk: (cdiv(K, bk) * bk, -bk))  # launch_config's class block; BLOCK_P = 2048 // block_k
    n_kb = cdiv(K, block_k)
    k_lanes = n_kb * block_k  # class lanes computed per pixel, padding included (masked lanes still compute)
    P, L = B * H * W, B * h * w * K
    px = INT64 + FP32  # labels + one fp32 per pixel
    # online softmax per (pixel, class): the 4-tap sample, max, subtract, exp, add
    softmax_flops = LERP2D_FLOPS + 3 + EXP_FLOPS

    fwd = Cost(
        gemm_flops=0.0,
        other_flops=P * K * (LERP_MIN_FLOPS + 3 + EXP_FLOPS),
        min_bytes=L * dtype_bytes + P * px,  # logits, labels in; lse (saved for backward) out; the loss is a scalar
        exps=P * K,
        notes="logits + labels read, lse written; per upsampled logit a separable bilinear sample, max, exp, sum",
        parts=(
            # _check_label_values on CUDA, no host sync: labels < 0, labels >= K, |, labels != ignore, & -- five
            # passes over (B, H, W) (int64 reads, bool temporaries); the report: bad.sum(), bad.to(uint8), argmax;
            # labels.masked_fill(bad, ignore_index) (int64 + bool in, int64 out) for the kernels
            Part("torch: label check (asynchronous), masked labels",
                 P * (3 * (INT64 + BOOL) + 2 * 3 * BOOL) + P * (BOOL + 2 * BOOL + BOOL) + P * (INT64 + BOOL + INT64),
                 other_flops=P * 8, note="5 elementwise passes, a sum and an argmax, masked_fill; no host sync"),
            # one program per BLOCK_P output pixels: 4-tap gathers of K classes per pixel; neighbouring output
            # pixels share taps (each low-resolution logit feeds ~(2H/h)^2 outputs), and the programs in flight
            # cover a few low-resolution rows, so the re-reads are assumed to hit L1/L2: logits read once
            Part("_upsample_cross_entropy_fwd_kernel", L * dtype_bytes + P * (INT64 + 2 * FP32),
                 other_flops=P * k_lanes * softmax_flops + P * LERP2D_FLOPS,
                 note=f"logits once (tap re-reads in cache), labels, nll + lse out; {k_lanes} class lanes for K={K}"),
            # _pixel_weights: labels != ignore (int64 -> bool), .float() (bool -> fp32)
            Part("torch: pixel weights", P * (INT64 + BOOL + BOOL + FP32)),
            # nll * wp, losses.sum(), wp.sum()
            Part("torch: nll * w, sums", P * (3 * FP32 + 2 * FP32), other_flops=P * 3),
        ),
    )

    # backward: one program per (class block of BLOCK_K, COLS low-res columns, (b, band of ROWS low-res rows)),
    # bwd_launch_config's GPU tiles; each streams down its band computing G = coef (exp(z - lse) - onehot) once
    # per (output row, output column of its BLOCK_C, class lane), the output rows of low-res row i_s - 1
    # recomputed once per band (masked columns and padded classes still compute)
    cfg = bwd_launch_config(K, w, W)
    bk, bc, bj, cols, rows = cfg["BLOCK_K"], cfg["BLOCK_C"], cfg["BLOCK_J"], cfg["COLS"], cfg["ROWS"]
    n_c, n_b, kp = cdiv(w, cols), cdiv(h, rows), cdiv(K, bk) * bk
    out_rows = H + sum(_rows_of(i * rows - 1, h, H) for i in range(1, n_b))  # per image
    lanes = B * out_rows * n_c * bc * kp  # exp lanes
    lowres_lanes = B * (h + 2 * n_b) * n_c * bc * kp  # u0/u1: low-res rows upsampled along the columns
    acc = B * (out_rows * 4 + h * 4) * n_c * bj * kp  # acc/carry updates per output row; the non-finite check per row
    # per lane: z = (1 - l) u0 + l u1 (3), z - lse (1), exp, onehot select, subtract, * coef, mask select (4), the
    # tf32x3 split of G (2); T = adj @ G as 3 tf32 dots of 2 BLOCK_J flops a lane
    lane_flops = 3 + 1 + EXP_FLOPS + 4 + 2
    # DRAM: logits read once and the gradient written once in the logits' dtype; the per-pixel coef, lse
    # (fp32) and labels (int64) once, if the K / BLOCK_K class-block programs of a tile (adjacent program ids)
    # and the overlapping columns of neighbouring column blocks share them in L2. From L2: the per-pixel data
    # once per lane row and class block, the logits' low-res rows once per program and row load
    l2_px = B * out_rows * n_c * bc * (kp // bk) * (FP32 + FP32 + INT64)
    l2_logits = B * (h + 2 * n_b) * n_c * bj * K * dtype_bytes  # a BLOCK_J-column run per low-res row load
    bwd = Cost(
        gemm_flops=0.0,
        other_flops=P * K * (LERP_MIN_FLOPS + 2 + EXP_FLOPS + 2 + LERP_MIN_FLOPS),
        min_bytes=L * dtype_bytes + P * px + L * dtype_bytes,  # logits, labels, lse in; grad logits out
        exps=P * K,
        notes=("logits + labels + lse read, grad logits written; per upsampled logit a separable sample, "
               "exp(z - lse) - onehot times coef, and the separable adjoint"),
        parts=(
            # on CUDA the forward's labels are checked again without a host sync: the bad-label mask as in the
            # forward (6 passes) and labels.masked_fill (int64 + bool in, int64 out)
            Part("torch: bad labels -> ignore_index", P * (3 * (INT64 + BOOL) + 2 * 3 * BOOL + INT64 + BOOL + INT64),
                 other_flops=P * 6, note="6 elementwise passes + masked_fill"),
            # _pixel_weights again (14 B/px), wp.sum(), coef = wp * g
            Part("torch: pixel weights, coef", P * (INT64 + 2 * BOOL + FP32) + P * (FP32 + 2 * FP32),
                 other_flops=P * 2),
            Part("_upsample_cross_entropy_bwd_kernel", L * dtype_bytes + P * (FP32 + FP32 + INT64) + L * dtype_bytes,
                 gemm_flops=lanes * 3 * 2 * bj * TF32_GEMM_WEIGHT,
                 other_flops=lanes * lane_flops + lowres_lanes * 3 + acc,
                 note=f"{bk} classes x {cols} low-res columns ({bc} output columns) x {rows} low-res rows a program: "
                      f"{lanes / 1e9:.2f} G exp lanes ({lanes / (P * K):.2f}x the minimum); logits, coef/lse/labels "
                      f"once (L2: {l2_px / 1e9:.2f} GB per-pixel, {l2_logits / 1e9:.2f} GB logits); "
                      f"tf32x3 dots {lanes * 6 * bj / 1e9:.0f} GFLOP (x{TF32_GEMM_WEIGHT} at the bf16 rate); "
                      "grad out in the logits' dtype"),
        ),
    )
    return {"forward": fwd, "backward": bwd}
