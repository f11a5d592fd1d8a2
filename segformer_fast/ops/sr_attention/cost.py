"""Roofline cost model of the sr_attention core (the Triton kernels), see segformer_fast/ops/cost.py.

Shapes: q, o (B, N, C), k, v (B, M, C), heads h of dim d = C / h, lse (B, h, N) fp32; S = B*h*N*M
scores. Only the attention core is modelled, not the q/k/v/output projections or the spatial
reduction (cuBLAS matmuls in torch). The minimum backward is flash attention's with O and lse
given (5 matmuls); the op as written saves only x and lse, so its backward first recomputes O
(a 6th and 7th matmul).

MODELLED: the git blobs of the files this model describes; benchmarks/roofline.py reports the model
as stale when they change (then update the model and MODELLED, and regenerate the report).
"""

from __future__ import annotations

from ..cost import BF16, EXP_FLOPS, FP32, L2_BYTES, SMS, Cost, Part, cdiv

__all__ = ["roofline", "MODELLED"]

MODELLED = {"triton_kernels.py": "4917ddbf432e42fdfe512c5fc3871ae36910f3cb",
            "op.py": "aad2fa593b38bb7f18c9a682548a0ece5083fb31"}
BLOCK_N, BLOCK_M = 64, 32  # launch_config(): query rows, key rows per tile


def roofline(B: int, N: int, M: int, C: int, heads: int, dtype_bytes: int = BF16) -> dict[str, Cost]:
    """{"forward": Cost, "backward": Cost} of one attention core call (one layer)."""
    bn, bm = BLOCK_N, BLOCK_M
    d = C // heads
    S = B * heads * N * M
    mm = 2 * B * N * M * C  # flops of one (N x M x d) matmul over every (b, h)
    q = B * N * C * dtype_bytes  # bytes of q, o, dO or dQ
    kv = B * M * C * dtype_bytes  # bytes of k, v, dK or dV
    rows = B * heads * N * FP32  # lse or Delta
    n_qb, n_kb = cdiv(N, bn), cdiv(M, bm)
    # K/V of one (b, h) are re-read by its n_qb query-block programs, which run back to back (grid axis 0)
    kv_bh = 2 * M * d * dtype_bytes
    kv_reads = 1 if kv_bh <= L2_BYTES // 2 else n_qb
    bh = B * heads
    q_grid = f"grid {n_qb}x{bh} = {n_qb * bh} programs ({n_qb * bh / SMS:.1f} per SM)"
    k_grid = f"grid {n_kb}x{bh} = {n_kb * bh} programs ({n_kb * bh / SMS:.1f} per SM)"

    fwd = Cost(
        gemm_flops=2 * mm, other_flops=S * (4 + EXP_FLOPS), min_bytes=2 * q + 2 * kv + rows, exps=S,
        notes="q, k, v read; o, lse written; QK^T and PV; max, subtract, exp, sum per score",
        parts=(
            # one program per (BLOCK_N queries, b*h); online softmax over key blocks; K/V re-reads hit L2
            Part("_sr_attention_fwd_kernel", 2 * q + 2 * kv * kv_reads + rows, gemm_flops=2 * mm,
                 other_flops=S * (5 + EXP_FLOPS) + B * heads * N * n_kb * (EXP_FLOPS + 3) + B * N * C * n_kb,
                 note=f"{q_grid}; K/V per (b,h) {kv_bh / 2**10:.0f} KiB, re-read by {n_qb} query blocks from L2"),
        ),
    )

    # dK/dV: one program per (BLOCK_M keys, b*h) walks all N queries, re-reading q, dO, lse, Delta once per key
    # block. The n_kb programs of one (b, h) are consecutive in launch order and stream the same rows in the
    # same order, so the re-reads are assumed to hit L2 while one (b, h)'s rows fit in half of it
    qdo_bh = N * d * 2 * dtype_bytes + N * 2 * FP32
    qdo_reads = 1 if qdo_bh <= L2_BYTES // 2 else n_kb
    bwd = Cost(
        gemm_flops=5 * mm, other_flops=S * (4 + EXP_FLOPS) + 2 * B * N * C,
        min_bytes=3 * q + 2 * kv + rows + q + 2 * kv,  # q, o, dO, k, v, lse in; dQ, dK, dV out
        exps=S,
        notes="q, k, v, o, dO, lse read; dQ, dK, dV written (flash backward: 5 matmuls, one exp per score)",
        parts=(
            Part("_sr_attention_fwd_kernel (O from lse)", 2 * q + 2 * kv * kv_reads + rows, gemm_flops=2 * mm,
                 other_flops=S * (3 + EXP_FLOPS),
                 note=f"O recomputed: the op keeps x and lse, not O; {q_grid}"),
            # (do.float() * out.float()).view(...).sum(-1).transpose(1, 2).contiguous(): five torch passes
            Part("torch: Delta = rowsum(dO * O)",
                 B * N * C * (2 * (dtype_bytes + FP32) + 3 * FP32 + FP32) + 3 * rows, other_flops=2 * B * N * C,
                 note="fp32 copies of dO and O, their product, the head sums, a transpose copy"),
            Part("_sr_attention_bwd_dkdv_kernel", 2 * kv + (2 * q + 2 * rows) * qdo_reads + 2 * kv,
                 gemm_flops=4 * mm, other_flops=S * (5 + EXP_FLOPS),
                 note=f"{k_grid}; q/dO/lse/Delta requested {n_kb}x per (b,h) "
                      f"({n_kb * (2 * q + 2 * rows) / 1e9:.2f} GB from L2 per call), DRAM {qdo_reads}x"),
            Part("_sr_attention_bwd_dq_kernel", 2 * q + 2 * rows + 2 * kv * kv_reads + q,
                 gemm_flops=3 * mm, other_flops=S * (5 + EXP_FLOPS),
                 note=f"{q_grid}; recomputes S and P again (3 exps per score in the whole backward)"),
        ),
    )
    return {"forward": fwd, "backward": bwd}
