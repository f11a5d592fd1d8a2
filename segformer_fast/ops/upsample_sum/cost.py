"""Roofline cost model of upsample_sum (the Triton path), see segformer_fast/ops/cost.py.

Maps (B, h_i, w_i, D) channels-last summed at (H, W). The training decoder's call (the default) has
no affine and no ReLU, so its backward has no prep pass (the gradient goes straight to the adjoint
kernels); ``relu`` and ``affine`` (a per-channel scale and shift, both with gradients) model the
prep pass that the fused inference-style call needs.

MODELLED: the git blobs of the files this model describes; benchmarks/roofline.py reports the model
as stale when they change (then update the model and MODELLED, and regenerate the report).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..cost import BF16, FP32, LERP2D_FLOPS, LERP_MIN_FLOPS, Cost, Part, cdiv, next_pow2

__all__ = ["roofline", "MODELLED"]

MODELLED = {"triton_kernels.py": "e99e1fe30c116c1c3d27e88c6fd57e9e3c11c7bc",
            "op.py": "54eeae594f4a4f5680fd7b7c5f71f323a13878f2"}


def _readers(n_in: int, n_out: int) -> int:
    # The longest run of output indices that read one interior input index with a nonzero weight:
    # src(o) in (i - 1, i + 1), 2 n_out / n_in of them (1 when the sizes are equal: a copy).
    return 1 if n_in == n_out else -(-2 * n_out // n_in)


def roofline(B: int, D: int, H: int, W: int, sizes: Sequence[tuple[int, int]],
             dtype_bytes: int = BF16, relu: bool = False, affine: bool = False) -> dict[str, Cost]:
    """{"forward": Cost, "backward": Cost} of one call summing maps of ``sizes`` [(h_i, w_i)] at (H, W).

    ``affine``: out = scale * sum + shift with dscale and dshift wanted; ``relu``: then a ReLU.
    """
    n = len(sizes)
    out = B * H * W * D  # output elements
    ins = [B * h * w * D for h, w in sizes]
    io_bytes = (out + sum(ins)) * dtype_bytes
    epilogue = 2 * affine + relu  # per output: the affine's FMA, the ReLU's max
    fwd_flops = out * (n * LERP2D_FLOPS + (n - 1) + epilogue)
    upsampled = sum((h, w) != (H, W) for h, w in sizes)  # a map already at (H, W) is a copy
    fwd = Cost(
        gemm_flops=0.0, other_flops=out * (upsampled * LERP_MIN_FLOPS + (n - 1) + epilogue), min_bytes=io_bytes,
        notes=f"{n} maps read, the sum written; a separable bilinear sample per upsampled map per output",
        parts=(
            # one program per (BLOCK_P output pixels, BLOCK_D channels), grid axis 1 (channel blocks) slowest:
            # each pass reads its channel slice of every map; neighbouring output pixels share taps, and the
            # programs in flight span several low-resolution rows, so the tap re-reads are assumed to hit L2
            Part("_upsample_sum_fwd_kernel", io_bytes, other_flops=fwd_flops,
                 note="maps once (tap re-reads in cache), output once; the full 4-tap sample even for a same-size map"),
        ),
    )
    parts = []
    bwd_min = io_bytes + relu * out * dtype_bytes + affine * sum(ins) * dtype_bytes  # + out (ReLU mask), maps (dscale)
    if relu or affine:
        block_p = max(1, 4096 // min(128, next_pow2(D)))  # launch_config's tile on a GPU
        partials = 2 * cdiv(B * H * W, block_p) * D * FP32  # (blocks, D) fp32 for dshift and for dscale
        # the gradient read; with ReLU `out` read and the masked gradient written in its own dtype; with the
        # affine the maps gathered again for u (tap re-reads in cache, as the forward) and the partials written,
        # then read by torch's sums
        prep_bytes = out * dtype_bytes * (1 + 2 * relu) + affine * (sum(ins) * dtype_bytes + partials)
        does = (["the ReLU-masked gradient in its own dtype"] * relu
                + ["(blocks, D) partials of dscale, dshift"] * affine)
        parts.append(Part("_upsample_sum_bwd_prep_kernel", prep_bytes,
                          other_flops=out * (relu + affine * (n * LERP2D_FLOPS + (n - 1) + 3)),
                          note="writes " + " and ".join(does)))
        if affine:
            parts.append(Part("torch: part_shift.sum(0), part_scale.sum(0)", partials + 2 * D * FP32,
                              other_flops=partials / FP32))
    # one launch for every map: a program per block of one map's input pixels, each looping over the longest
    # reader range of its tile, rows x columns (shorter ranges masked; per lane the bf16 -> fp32 cast and an
    # FMA). backward_schedule orders the blocks of all maps by the gradient rows they read, so the programs in
    # flight read a band of rows a few MB wide (L2 is 50 MB): the (masked) gradient is counted once from DRAM,
    # the re-reads by other maps' programs and by neighbouring input pixels' overlapping ranges in L2
    taps = [(_readers(h, H), _readers(w, W)) for h, w in sizes]
    parts.append(Part("_upsample_sum_bwd_kernel", (out + sum(ins)) * dtype_bytes,
                      other_flops=sum(n_in * (r_h * r_w * 3 + affine) for n_in, (r_h, r_w) in zip(ins, taps)),
                      note=f"all {n} maps in one launch, the gradient read once; live taps per input pixel "
                           + ", ".join(f"{r_h}x{r_w}" for r_h, r_w in taps)))
    bwd = Cost(
        gemm_flops=0.0, min_bytes=bwd_min,
        other_flops=out * (upsampled * LERP_MIN_FLOPS + relu + affine * (upsampled * LERP_MIN_FLOPS + n + 2))
        + affine * sum(ins),
        notes=f"the gradient read once, {n} map gradients written; a separable bilinear adjoint per upsampled map",
        parts=tuple(parts),
    )
    return {"forward": fwd, "backward": bwd}
