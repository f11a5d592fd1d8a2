"""Roofline cost model of the sr_attention core (the Triton kernels), see segformer_fast/ops/cost.py.

Shapes: q, o (B, N, C), k, v (B, M, C), heads h of dim d = C / h, lse (B, h, N) fp32; S = B*h*N*M
scores. Only the attention core is modelled, not the q/k/v/output projections or the spatial
reduction (cuBLAS matmuls in torch). The minimum backward is flash attention's with O and lse
given (5 matmuls). The op as written (memory="save", its default: ``save_output=True``) keeps O, and
its backward runs 7: the dQ kernel and the dK/dV kernel each form S and dP. With ``save_output=False``
(memory="recompute": x and lse kept) the backward first recomputes O, a forward pass (9 matmuls).

MODELLED: the git blobs of the files this model describes; benchmarks/roofline.py reports the model
as stale when they change (then update the model and MODELLED, and regenerate the report).
"""

from __future__ import annotations

from ..cost import BF16, EXP_FLOPS, FP32, L2_BYTES, SMS, Cost, Part, cdiv

__all__ = ["roofline", "MODELLED", "VARIANTS"]

MODELLED = {"triton_kernels.py": "ad9a6652606238ed65a8115769cdee8bf2197caa",  # autotuned tiles: the default modelled
            "op.py": "f9d901e70aaab74b8c67f1522128881a9273d2e1"}
# the other memory mode, reported beside the default: {label: roofline() keyword arguments}
VARIANTS = {'memory="recompute" (O recomputed in backward)': {"save_output": False}}
BLOCK_N, BLOCK_M = 64, 32  # launch_config(): query rows, key rows per tile
DKDV_CTAS_PER_SM, DKDV_MIN_QUERY_BLOCKS = 4, 4  # triton_kernels' constants of dkdv_splits()


def dkdv_splits(N: int, M: int, bh: int, sms: int = SMS) -> int:
    """triton_kernels.dkdv_splits (the dK/dV kernel's query splits), then the launcher's no-empty-split rounding."""
    q_blocks = cdiv(N, BLOCK_N)
    want = min(cdiv(DKDV_CTAS_PER_SM * sms, cdiv(M, BLOCK_M) * bh), max(1, q_blocks // DKDV_MIN_QUERY_BLOCKS))
    splits = cdiv(q_blocks, cdiv(q_blocks, max(1, want)))
    return cdiv(N, cdiv(q_blocks, splits) * BLOCK_N)


def roofline(B: int, N: int, M: int, C: int, heads: int, dtype_bytes: int = BF16,
             save_output: bool = True) -> dict[str, Cost]:
    """{"forward": Cost, "backward": Cost} of one attention core call (one layer); ``save_output``: O kept by the
    forward (memory="save"), else recomputed from lse in backward."""
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

    # dK/dV: one program per (BLOCK_M keys, b*h, query split) walks its split's queries, re-reading q, dO, lse,
    # Delta once per key block. The n_kb programs of one (b, h, split) are consecutive in launch order and stream
    # the same rows in the same order, so the re-reads are assumed to hit L2 while those rows fit in half of it
    splits = dkdv_splits(N, M, bh)
    qdo_split = (N * d * 2 * dtype_bytes + N * 2 * FP32) / splits
    qdo_reads = 1 if qdo_split <= L2_BYTES // 2 else n_kb
    k_grid = f"grid {n_kb}x{bh}x{splits} = {n_kb * bh * splits} programs ({n_kb * bh * splits / SMS:.1f} per SM)"
    # with more than one split, fp32 partial dK, dV per split, then part.sum(0) (fp32) and dkv.copy_ (to bf16)
    dkdv_out = 2 * kv if splits == 1 else splits * 2 * kv * FP32 // dtype_bytes
    reduce = () if splits == 1 else (
        Part("torch: dK, dV partials part.sum(0), dkv.copy_",
             splits * 2 * kv * FP32 // dtype_bytes + 2 * (2 * kv * FP32 // dtype_bytes) + 2 * kv,
             other_flops=splits * 2 * B * M * C, note=f"{splits} query splits of fp32 partials"),)
    bwd = Cost(
        gemm_flops=5 * mm, other_flops=S * (4 + EXP_FLOPS) + 2 * B * N * C,
        min_bytes=3 * q + 2 * kv + rows + q + 2 * kv,  # q, o, dO, k, v, lse in; dQ, dK, dV out
        exps=S,
        notes="q, k, v, o, dO, lse read; dQ, dK, dV written (flash backward: 5 matmuls, one exp per score)",
        parts=(
            *(() if save_output else (
                Part("_sr_attention_fwd_kernel (O from lse)", 2 * q + 2 * kv * kv_reads + rows, gemm_flops=2 * mm,
                     other_flops=S * (3 + EXP_FLOPS),
                     note=f'O recomputed: memory="recompute" keeps x and lse, not O; {q_grid}'),)),
            # runs first: q, dO, O, lse in (K/V re-reads in L2); Delta = rowsum(dO * O) out for dK/dV, and dQ
            Part("_sr_attention_bwd_dq_kernel", 3 * q + 2 * rows + 2 * kv * kv_reads + q,
                 gemm_flops=3 * mm, other_flops=S * (5 + EXP_FLOPS) + 2 * B * N * C,
                 note=f"{q_grid}; writes Delta; recomputes S and P "
                      f"({2 if save_output else 3} exps per score in the whole backward)"),
            Part("_sr_attention_bwd_dkdv_kernel", 2 * kv + (2 * q + 2 * rows) * qdo_reads + dkdv_out,
                 gemm_flops=4 * mm, other_flops=S * (5 + EXP_FLOPS),
                 note=f"{k_grid}; q/dO/lse/Delta requested {n_kb}x per (b,h) "
                      f"({n_kb * (2 * q + 2 * rows) / 1e9:.2f} GB from L2 per call), DRAM {qdo_reads}x"),
            *reduce,
        ),
    )
    return {"forward": fwd, "backward": bwd}
