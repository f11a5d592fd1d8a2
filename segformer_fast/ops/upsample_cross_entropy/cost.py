"""Roofline cost model of upsample_cross_entropy (the Triton path), see segformer_fast/ops/cost.py.

Shapes: logits (B, h, w, K) channels-last, labels (B, H, W) int64, no class weights, "mean".
P = B*H*W output pixels, L = B*h*w*K logits.

MODELLED: the git blobs of the files this model describes; benchmarks/roofline.py reports the model
as stale when they change (then update the model and MODELLED, and regenerate the report).
"""

from __future__ import annotations

from ..cost import (BF16, BOOL, EXP_FLOPS, FP32, INT64, L2_BYTES, LERP2D_FLOPS, LERP_MIN_FLOPS, Cost, Part, cdiv,
                    next_pow2)
from ..math_utils import bilinear_window

__all__ = ["roofline", "MODELLED"]

MODELLED = {"triton_kernels.py": "3b6c51d65af0f77ee7abc0fd0be8e554bf94d1c3",
            "op.py": "b891bf36d5d01a06bbe0467353235cba54b3d03b"}


def roofline(B: int, h: int, w: int, K: int, H: int, W: int, dtype_bytes: int = BF16) -> dict[str, Cost]:
    """{"forward": Cost, "backward": Cost} of one call on (B, h, w, K) logits and (B, H, W) labels."""
    block_k = min(64, next_pow2(K))  # launch_config's class block (both kernels); BLOCK_P = 2048 // block_k pixels
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
            # _check_label_values: labels < 0, labels >= K, |, labels != ignore, &, any() -- six passes over
            # (B, H, W) (int64 reads, bool temporaries) and a host sync
            Part("torch: label range check", P * (3 * (INT64 + BOOL) + 2 * 3 * BOOL + BOOL),
                 other_flops=P * 5, note="6 elementwise passes + any() (host sync)"),
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

    r_h, r_w = bilinear_window(h, H), bilinear_window(w, W)
    lanes = B * h * w * k_lanes * r_h * r_w
    # per (input pixel, class lane, window position): the 4-tap recompute, z - lse, exp, onehot select,
    # - onehot, mask select, one FMA into the accumulator
    bwd_lane_flops = LERP2D_FLOPS + 1 + EXP_FLOPS + 2 + 1 + 1 + 2
    # the per-pixel (coef, lse, label) arrays are re-read by every class-block pass (grid axis 1 is the
    # slowest: the passes run one after the other); they stay in L2 only if they fit
    per_pass = P * (FP32 + FP32 + INT64)
    passes = 1 if per_pass <= L2_BYTES else n_kb
    bwd = Cost(
        gemm_flops=0.0,
        other_flops=P * K * (LERP_MIN_FLOPS + 2 + EXP_FLOPS + 2 + LERP_MIN_FLOPS),
        min_bytes=L * dtype_bytes + P * px + L * dtype_bytes,  # logits, labels, lse in; grad logits out
        exps=P * K,
        notes=("logits + labels + lse read, grad logits written; per upsampled logit a separable sample, "
               "exp(z - lse) - onehot times coef, and the separable adjoint"),
        parts=(
            # _pixel_weights again (14 B/px), wp.sum(), coef = wp * g
            Part("torch: pixel weights, coef", P * (INT64 + 2 * BOOL + FP32) + P * (FP32 + 2 * FP32),
                 other_flops=P * 2),
            # one program per (BLOCK_P input pixels, BLOCK_K classes); each input pixel walks the r_h x r_w window
            # of output pixels that may read it and recomputes their 4-tap logits and exp for its class block:
            # all lanes compute (the window's dead positions are masked loads, not skipped work). The window
            # re-reads of neighbouring programs hit L2; counted: coef/lse/labels once per class-block pass
            Part("_upsample_cross_entropy_bwd_kernel", passes * per_pass + L * dtype_bytes + L * FP32,
                 other_flops=lanes * bwd_lane_flops,
                 note=f"{r_h}x{r_w} window x {k_lanes} class lanes recomputed per input pixel "
                      f"({lanes / (P * K):.1f}x the minimum exps); coef/lse/labels read {passes}x; fp32 grad out"),
            Part("torch: grad fp32 -> logits dtype", L * (FP32 + dtype_bytes)),
        ),
    )
    return {"forward": fwd, "backward": bwd}
