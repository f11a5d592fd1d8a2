"""Roofline cost model of the training decoder (all_mlp_decoder_train), see segformer_fast/ops/cost.py.

Shapes: features (B, C_i, h_i, w_i) in the autocast dtype, NCHW-contiguous (the encoder stages end
with ``.contiguous()``), finest first at (H, W) = (h_1, w_1); decoder width D, K classes, element-wise
dropout p. T = B*H*W pixels, E = T*D values of the fused map u. The GEMMs are cuBLAS, each modelled
as reading its operands once and writing its result once; upsample_sum is its own model. The glue
(BatchNorm statistics, BN + ReLU + dropout and their backward) is the Triton implementation
(triton_kernels.py, auto's choice on CUDA and what benchmarks/roofline.py times); every other pass
is an ATen elementwise or reduction kernel, counted as it reads and writes.

MODELLED: the git blob of op.py this model describes; benchmarks/roofline.py reports the model as
stale when it changes (then update the model and MODELLED, and regenerate the report).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..cost import BF16, FP32, LERP_MIN_FLOPS, Cost, Part
from ..upsample_sum.cost import roofline as upsample_sum_roofline
from .op import MAX_CLASSES, MAX_STAGE_ONE_CHANNELS, class_blocks

__all__ = ["roofline", "MODELLED"]

MODELLED = {"op.py": "a0b2c396d4fe13077e37f3d4583f4dad575954c1", "triton_kernels.py": "e3838bc684902f19bfb874d5fbe0ab969af64a42"}
PHILOX_FLOPS = 10  # one dropout draw (Philox counter-based RNG, 4 values per round): an estimate
REDUCE_PROGRAMS = 256  # row ranges of the Triton reductions on a GPU (triton_kernels.launch_config)
LINEAR_PROGRAMS = 128  # row ranges of the fused classifier backward on a GPU (triton_kernels._linear_bwd_config)


def _gemm(name: str, m: int, n: int, k: int, read: float, write: float) -> Part:
    return Part(f"torch: {name}", read + write, gemm_flops=2 * m * n * k, note="cuBLAS, operands once")


def roofline(B: int, H: int, W: int, channels: Sequence[int], sizes: Sequence[tuple[int, int]], D: int, K: int,
             p: float = 0.0, dtype_bytes: int = BF16) -> dict[str, Cost]:
    """{"forward": Cost, "backward": Cost} of one training call; ``channels`` C_i and ``sizes`` (h_i, w_i)."""
    T, E = B * H * W, B * H * W * D
    db = dtype_bytes
    pix = [B * h * w for h, w in sizes]
    feat = [n * c for n, c in zip(pix, channels)]  # elements of each feature map
    stage_mm = sum(2 * n * c * D for n, c in zip(pix, channels))  # flops of the stage GEMMs (one pass)
    cls_mm = 2 * T * D * K
    up = upsample_sum_roofline(B, D, H, W, sizes, db)
    # backward: the finest stage is at (H, W), its map's gradient is dL/du itself; the adjoint runs for the others
    up_bwd = upsample_sum_roofline(B, D, H, W, sizes[1:], db) if len(sizes) > 1 else None
    upsampled = sum((h, w) != (H, W) for h, w in sizes)
    up_min = E * (upsampled * LERP_MIN_FLOPS + len(sizes) - 1)
    # the dropout mask is drawn in the kernels (Philox from a seed), in each of the three passes that need it
    philox = E * PHILOX_FLOPS if p > 0 else 0
    # the reductions' fp32 partials: (2, P, D) written, then read by torch's sum over P
    partials = 2 * (2 * REDUCE_PROGRAMS * D * FP32) + 2 * D * FP32

    # K <= MAX_CLASSES, upsample_sum "auto" (what benchmarks/roofline.py models): u is never stored. The
    # kernels that need it (statistics, classifier; backward passes 1 and 2) gather it: the finest stage from its
    # features (z_1 = A_1 c_1 + a_1 by a tl.dot per tile: its map, GEMM and NHWC copy are gone; C_1 <= 128), the
    # other stages from their maps with the upsample_sum kernel's flops (4-tap gathers, tap re-reads in cache)
    fused = K <= MAX_CLASSES
    one = fused and len(sizes) > 1 and channels[0] <= MAX_STAGE_ONE_CHANNELS
    first = 1 if one else 0
    maps_bytes = (feat[0] * db + D * channels[0] * db if one else 0) + sum(
        B * h * w * D * db for h, w in sizes[first:])
    gather = up["forward"].kernel_other_flops * (len(sizes) - first) / len(sizes)
    one_mm = 2 * T * channels[0] * D if one else 0  # the stage-one dot in each gathering kernel

    def stages(tag: str) -> list[Part]:
        parts = []
        for i, (n, c, f) in list(enumerate(zip(pix, channels, feat)))[first:]:
            if one:  # z = A c by bmm on the (B, h*w, C) view of the NCHW features (a transposed cuBLAS operand);
                # every stage's bias is added once with the finest stage's, in the gathering kernels
                parts.append(_gemm(f"stage {i + 1} z = A c (bmm on the NCHW view){tag}", n, D, c,
                                   f * db + D * c * db, n * D * db))
                continue
            # c.permute(0, 2, 3, 1).reshape(-1, C) of an NCHW-contiguous map is a copy
            parts.append(Part(f"torch: stage {i + 1} NCHW -> NHWC copy{tag}", 2 * f * db))
            parts.append(_gemm(f"stage {i + 1} z = A c + a{tag}", n, D, c, f * db + D * c * db, n * D * db))
        return parts

    lanes_f = sum(class_blocks(K)) if K <= MAX_CLASSES else K
    fwd_parts = [
        *stages(""),
        *((
            Part("_bn_stats_kernel (u gathered)", maps_bytes + partials, gemm_flops=one_mm,
                 other_flops=gather + E * 3,
                 note="the stage maps once (u gathered, never stored); sums of (u - u[0]) and its square"),
            # d = dropout(relu(scale * u + shift)) from the gathered u: neither stored; the classes in two
            # power-of-two blocks (K = 150: 128 + 32 lanes), counted as computed
            Part("_bn_relu_dropout_linear_kernel (u gathered)", maps_bytes + K * D * db + T * K * db,
                 gemm_flops=2 * T * D * lanes_f + one_mm, other_flops=gather + E * 4 + philox,
                 note=f"the stage maps once, logits once; {lanes_f} class lanes for K={K}"),
        ) if K <= MAX_CLASSES else (
            *up["forward"].parts,
            # per-channel sums of (u - u[0]) and its square, fp32 partials summed in a fixed order
            Part("triton: BN statistics (one read of u)", E * db + partials, other_flops=E * 3),
            # d = dropout(relu(scale * u + shift)) in place on u, then cuBLAS
            Part("triton: BN affine + ReLU + dropout (one pass)", E * 2 * db, other_flops=E * 4 + philox),
            _gemm("classifier", T, K, D, E * db + K * D * db, T * K * db),
        )),
    ]
    fwd = Cost(
        gemm_flops=stage_mm + cls_mm, other_flops=up_min + E * (2 + 3),
        min_bytes=sum(feat) * db + T * K * db,  # features in, logits out (the statistics are (D,))
        notes=("features read, logits written; stage GEMMs, upsample-sum, BN statistics and affine, classifier "
               "(the batch statistics need all of u before any of it is normalised: short of recomputing u, "
               f"an implementation also writes and reads it once more, {2 * E * db / 1e9:.2f} GB, not counted)"),
        parts=tuple(fwd_parts),
    )
    # the classifier fused into both backward passes (K <= MAX_CLASSES): g = gl Wc per tile (padded class lanes,
    # counted as computed), never stored; pass 1 also sums gl^T d (dWc, d never stored) and gl (dbc) into fp32
    # partials of LINEAR_PROGRAMS row ranges; gl's tile is re-read by the D / 64 channel blocks of its rows (D / 32 in
    # pass 2 summing dA_1), which run side by side (L2)
    lanes = sum(class_blocks(K)) if K <= MAX_CLASSES else K
    lin_partials = LINEAR_PROGRAMS * (2 * D + K * D + K) * FP32
    # pass 2 with the finest stage's features (StageOne) also sums dA_1 = gu^T c_1 (one tl.dot per tile, c_1's tile
    # re-read from cache): (LINEAR_PROGRAMS, D, C_1) fp32 partials, summed by torch
    a1_partials = LINEAR_PROGRAMS * D * channels[0] * FP32 if one else 0
    # with upsample_sum on Triton both passes gather u from the recomputed stage maps (u never stored)
    fused_bwd = (
        Part("_bn_relu_dropout_bwd_linear_kernel (pass 1: sums, dWc, dbc; u gathered)", maps_bytes + T * K * db
             + K * D * db + lin_partials, gemm_flops=2 * 2 * T * D * lanes + one_mm,
             other_flops=gather + E * 10 + philox,
             note="the stage maps and gl once; u, g and d never stored"),
        Part("torch: pass 1 partial sums", lin_partials + (2 * D + K * D + K) * FP32, other_flops=lin_partials / FP32),
        Part("_bn_relu_dropout_bwd_linear_kernel (pass 2: dL/du" + (", dA_1" if one else "") + "; u gathered)",
             maps_bytes + T * K * db + K * D * db + E * db + a1_partials, gemm_flops=2 * T * D * lanes + 2 * one_mm,
             other_flops=gather + E * 10 + philox,
             note="the stage maps and gl once, dL/du written" + ("; dA_1 = gu^T c_1 partials" if one else "")),
        *((Part("torch: dA_1 partial sums", a1_partials + D * channels[0] * FP32, other_flops=a1_partials / FP32),)
          if one else ()),
    )
    bwd_parts = [
        *stages(" (recomputed)"),
        *(() if K <= MAX_CLASSES else
          (Part(q.name + " (u recomputed)", q.bytes, q.gemm_flops, q.other_flops, q.note) for q in up["forward"].parts)),
        *(fused_bwd if K <= MAX_CLASSES else (
            _gemm("g = gl Wc", T, D, K, T * K * db + K * D * db, E * db),
            # reads u and g; gy = g * keep / (1 - p) * [y > 0] on the fly; sums of gy and gy * xhat; writes d again
            Part("triton: BN backward pass 1 (sums, d recomputed)", E * 3 * db + partials,
                 other_flops=E * 10 + philox),
            _gemm("dWc = gl^T d", K, D, T, T * K * db + E * db, K * D * db),
            Part("torch: dbc = gl.sum", T * K * db, other_flops=T * K),
            # reads u and g, writes dL/du in place on g, in u's dtype
            Part("triton: BN backward pass 2 (dL/du)", E * 3 * db, other_flops=E * 10 + philox),
        )),
        *(up_bwd["backward"].parts if up_bwd else ()),
    ]
    if K > MAX_CLASSES:  # every stage's bias gradient is sum(gu) (the fused pass 2 sums it as it writes gu)
        bwd_parts.append(Part("torch: grad a = gu.sum (all stages)", E * db, other_flops=E))
    for i, (n, c, f) in enumerate(zip(pix, channels, feat)):
        bwd_parts.append(_gemm(f"stage {i + 1} grad c = gz A", n, c, D, n * D * db + D * c * db, f * db))
        if not (i == 0 and one):  # the finest stage's dA_1: in pass 2
            # per image c_b (C, h*w) gz_b (h*w, D) on the NCHW features (no NHWC copy), then a sum over images
            bwd_parts.append(_gemm(f"stage {i + 1} grad A = sum_b c_b gz_b", D, c, n, n * D * db + f * db,
                                   2 * B * c * D * db))
    bwd = Cost(
        gemm_flops=3 * stage_mm + 2 * cls_mm, other_flops=up_min + E * (2 + 3 + 8) + up["backward"].other_flops,
        # features and the logits' gradient in; the features' gradients out (the weight gradients are small)
        min_bytes=2 * sum(feat) * db + T * K * db,
        notes="features + grad logits read, grad features written; u recomputed from the features, classifier and "
              "stage GEMM backward, BN backward, the upsample adjoint",
        parts=tuple(bwd_parts),
    )
    return {"forward": fwd, "backward": bwd}
