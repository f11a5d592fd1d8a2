"""Roofline cost model of dwconv3x3_gelu (the Triton path, erf GELU), see segformer_fast/ops/cost.py.

Shapes: x (B, H*W, C) tokens, weight (C, 1, 3, 3), bias (C,); E = B*H*W*C elements. The backward
saves only x and recomputes z.

MODELLED: the git blobs of the files this model describes; benchmarks/roofline.py reports the model
as stale when they change (then update the model and MODELLED, and regenerate the report).
"""

from __future__ import annotations

from ..cost import BF16, ERF_FLOPS, EXP_FLOPS, FP32, Cost, Part, cdiv, next_pow2

__all__ = ["roofline", "MODELLED"]

MODELLED = {"triton_kernels.py": "da53091a45c17c42077a73c35848fe54a10e34db",  # forward tiles: the default
            "op.py": "bccde773517667246454355be6bca914a5316d67"}

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
    # two passes. 1: the forward's tile and 3-row x window (halo re-reads in L2, as in the forward); z, GELU' and
    # gz = grad_y * GELU'(z) once per element, gz stored in the input's dtype, the weight/bias sums from the fp32 gz.
    # 2: the forward kernel (flipped taps, no bias, no GELU) on gz: gz read (its halo from L2), grad_x written
    gz_flops = CONV_FLOPS + GELU_GRAD_FLOPS + 1  # z (9 FMAs + bias), GELU', * grad_y
    bwd = Cost(
        gemm_flops=0.0, other_flops=E * (CONV_FLOPS + GELU_GRAD_FLOPS + 1 + WGRAD_FLOPS + CONV_FLOPS),
        min_bytes=3 * E * dtype_bytes + wb * FP32,  # x, grad_y in; grad_x out; fp32 weight/bias gradients
        exps=E,
        notes="x + grad_y read, grad_x + fp32 weight/bias grads written; z recomputed",
        parts=(
            Part("_dwconv3x3_gelu_bwd_kernel", 3 * E * dtype_bytes + partial,
                 other_flops=E * (gz_flops + WGRAD_FLOPS),
                 note=f"x, grad_y in, gz out ({dtype_bytes} B) once (x halo of {rows}x{block_w} tiles in L2); "
                      "GELU' once per element; (tiles, 10, C) partials out"),
            Part("_dwconv3x3_gelu_fwd_kernel (flipped, on gz)", 2 * E * dtype_bytes, other_flops=E * 9 * 2,
                 note="gz in (halo in L2), grad_x out; 9 FMAs per element"),
            Part("torch: partial.sum(0)", partial + wb * FP32, other_flops=n_tiles * wb,
                 note=f"{n_tiles} tiles x 10 x C fp32"),
        ),
    )
    return {"forward": fwd, "backward": bwd}
