"""Roofline cost model of dwconv3x3_gelu (the Triton path, erf GELU), see segformer_fast/ops/cost.py.

Shapes: x (B, H*W, C) tokens, weight (C, 1, 3, 3), bias (C,); E = B*H*W*C elements. The backward
saves only x and recomputes z.

MODELLED: the git blobs of the files this model describes; benchmarks/roofline.py reports the model
as stale when they change (then update the model and MODELLED, and regenerate the report).
"""

from __future__ import annotations

from ..cost import BF16, ERF_FLOPS, EXP_FLOPS, FP32, Cost, Part, cdiv, next_pow2

__all__ = ["roofline", "MODELLED"]

MODELLED = {"triton_kernels.py": "e6366d65c7e26d47f26b9dd38daed59dd4bee7a4",
            "op.py": "ab17bbd042121023d4958e475cffbcb98710633a"}

CONV_FLOPS = 9 * 2 + 1  # 9 tap FMAs + the bias
GELU_FLOPS = ERF_FLOPS + 4  # 0.5 z (1 + erf(z / sqrt 2))
GELU_GRAD_FLOPS = ERF_FLOPS + EXP_FLOPS + 8  # Phi(z) + z exp(-z^2 / 2) / sqrt(2 pi)
WGRAD_FLOPS = 9 * 2 + 1  # gz * x_shifted into 9 tap sums + gz into the bias sum


def roofline(B: int, H: int, W: int, C: int, dtype_bytes: int = BF16) -> dict[str, Cost]:
    """{"forward": Cost, "backward": Cost} of one call on (B, H*W, C) tokens."""
    rows, block_w = min(8, next_pow2(H)), min(16, next_pow2(W))  # launch_config's tile
    n_tiles = B * cdiv(H, rows) * cdiv(W, block_w)
    E = B * H * W * C
    wb = 10 * C  # weight (9 taps) + bias values
    fwd_flops = E * (CONV_FLOPS + GELU_FLOPS)
    # a program keeps a 3-row window in registers and walks ROWS rows of a BLOCK_W x BLOCK_C tile: it reads
    # (ROWS + 2) rows x (BLOCK_W + 2) columns; the halo belongs to neighbouring tiles, which run at the same
    # time (the tile above is n_wb programs away in launch order), so the halo re-reads are assumed to hit L2
    fwd = Cost(
        gemm_flops=0.0, other_flops=fwd_flops, min_bytes=2 * E * dtype_bytes + wb * dtype_bytes,
        notes="x read, y written; 9 FMAs + GELU per element",
        parts=(Part("_dwconv3x3_gelu_fwd_kernel", 2 * E * dtype_bytes, other_flops=fwd_flops,
                    note=f"x once (halo of {rows}x{block_w} tiles in L2), y once"),),
    )
    partial = n_tiles * wb * FP32  # (tiles, 10, C) fp32 partial sums of the weight/bias gradients
    # one pass over the forward's tile: gz = grad_y * GELU'(z) is recomputed at the tile and its one-pixel halo
    # and never stored. Its rows slide through registers, ROWS + 2 gz rows per ROWS rows of the tile, each at
    # 3 column shifts (the column halo is recomputed): gz is evaluated gz_evals times per element
    gz_evals = 3 * (rows + 2) / rows
    # the halo loads: x rows h0-2 .. h0+ROWS+1 at columns -2 .. BLOCK_W+1, grad_y rows h0-1 .. h0+ROWS at
    # columns -1 .. BLOCK_W; what falls outside the tile was (or will be) read by the neighbouring tiles, which
    # run at the same time (the tile above is n_wb programs away in launch order): assumed to hit L2
    x_halo = (rows + 4) * (block_w + 4) / (rows * block_w)
    gy_halo = (rows + 2) * (block_w + 2) / (rows * block_w)
    bwd = Cost(
        gemm_flops=0.0, other_flops=E * (CONV_FLOPS + GELU_GRAD_FLOPS + 1 + WGRAD_FLOPS + CONV_FLOPS),
        min_bytes=3 * E * dtype_bytes + wb * FP32,  # x, grad_y in; grad_x out; fp32 weight/bias gradients
        exps=E,
        notes="x + grad_y read, grad_x + fp32 weight/bias grads written; z recomputed",
        parts=(
            # per element: gz_evals x (z: 9 FMAs + bias, GELU', * grad_y); the weight/bias sums (9 FMAs + 1 add);
            # grad_x = the flipped 9-tap conv of gz (9 FMAs, no bias)
            Part("_dwconv3x3_gelu_bwd_kernel", 3 * E * dtype_bytes + partial,
                 other_flops=E * (gz_evals * (CONV_FLOPS + GELU_GRAD_FLOPS + 1) + WGRAD_FLOPS + 9 * 2),
                 note=f"x, grad_y in, grad_x out once (halo re-reads in L2: x {x_halo:.3g}x, grad_y {gy_halo:.3g}x "
                      f"of the tile at {rows}x{block_w}); GELU' {gz_evals:g}x per element; "
                      "(tiles, 10, C) partials out"),
            Part("torch: partial.sum(0)", partial + wb * FP32, other_flops=n_tiles * wb,
                 note=f"{n_tiles} tiles x 10 x C fp32"),
        ),
    )
    return {"forward": fwd, "backward": bwd}
