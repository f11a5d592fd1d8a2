"""Triton kernels for the attention core of spatial-reduction attention (flash-style).

Inputs are per-token rows of the (B, L, C) projections with the heads side by side in C, so no
(B, h, L, d) transpose is ever made: q (B, N, C), k and v (B, M, C), any strides along B and L,
unit stride along C. Head h reads columns [h*d, (h+1)*d). lse is (B, h, N) fp32 (natural log).

Forward: one program per (query block, batch*head); an online softmax over key blocks (scores in
the log2 domain, exp2), fp32 accumulators; writes O and the row log-sum-exp. With USE_LSE the
max/normaliser tracking is skipped and P = exp(S - lse) is formed directly: the backward uses that
to recompute O from the saved lse. Backward: one kernel per query block accumulates dQ over all key
blocks and computes Delta = rowsum(dO * O) (fp32) on the way; then one kernel per (key block, query
split) accumulates dK, dV over its split's query blocks (fp32 partials summed afterwards when there
is more than one split: the key blocks alone are too few CTAs for an H100 at M = 1024); both recompute
P tile by tile. No atomics, no (N, M) buffer. Head dims 32 and 64.

Precision: fp32 inputs use TF32 dots when ``torch.backends.cuda.matmul.allow_tf32`` is set (as
PyTorch's own matmuls do), exact fp32 FMAs otherwise; fp16/bf16 dots accumulate in fp32.

Tiles: the forward and dQ kernels are autotuned on a GPU over a few declared tiles (FWD_TUNER,
DQ_TUNER; FWD_IEEE_TUNER, DQ_IEEE_TUNER for exact-fp32 dots, whose tiles are smaller), once per
dtype, head dim and precision; the dK/dV kernel's tiles are fixed (its query splits are sized by them).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...utils.debug import empty
from ..triton_launch import Autotuner, LaunchConfig, check_interpreter_dtypes, dot_precision, register_autotuner

__all__ = ["TRITON_HEAD_DIMS", "launch_config", "dkdv_splits", "sr_attention_fwd_triton", "sr_attention_bwd_triton",
           "FWD_TUNER", "DQ_TUNER", "FWD_IEEE_TUNER", "DQ_IEEE_TUNER"]

TRITON_HEAD_DIMS = (32, 64)
LOG2E = 1.4426950408889634
BLOCK_Q = 64
BLOCK_K = 32
DEFAULT_SMS = 132  # when the SM count is unknown (no CUDA device): an H100/H200
DKDV_CTAS_PER_SM = 4  # dK/dV CTAs wanted per SM before query splitting stops (4 warps each; not tuned on a GPU)
DKDV_MIN_QUERY_BLOCKS = 4  # shortest query split, in BLOCK_Q blocks: fp32 partials stay small next to Q, dO

# The forward (also the backward's O recompute) and the dQ kernel are autotuned over these on a GPU, per
# (dtype, head dim, dot precision[, O from lse]) -- never per image size; the first is the default (the
# interpreter, AOT's meta tensors). Each writes its outputs whole, so a timed launch is a real launch.
# Tensor-core dots (fp16, bf16, TF32) and exact fp32 FMA dots ("ieee") have their own sets: an FMA dot
# holds its whole product tile per thread, so the ieee tiles are smaller or spread over 8 warps (AOT
# report: no spills at sm_90 or sm_80, where the tensor-core tiles spill 0.2-16 KB in ieee).
_TILES = (
    LaunchConfig({"BLOCK_N": BLOCK_Q, "BLOCK_M": BLOCK_K}, num_warps=4, num_stages=3),
    LaunchConfig({"BLOCK_N": 128, "BLOCK_M": 32}, num_warps=8, num_stages=3),
    LaunchConfig({"BLOCK_N": 64, "BLOCK_M": 64}, num_warps=4, num_stages=2),
)
_IEEE_TILES = (
    LaunchConfig({"BLOCK_N": 32, "BLOCK_M": 32}, num_warps=4, num_stages=3),
    LaunchConfig({"BLOCK_N": 64, "BLOCK_M": 16}, num_warps=4, num_stages=3),
    LaunchConfig({"BLOCK_N": 32, "BLOCK_M": 32}, num_warps=8, num_stages=2),
)
# the dK/dV kernel with ieee dots: 32 query rows per tile on 8 warps (64 rows on 4 spill 0.6-13 KB, 32 on 4 0.6 KB)
DKDV_IEEE_BLOCK_N, DKDV_IEEE_WARPS = 32, 8
FWD_TUNER = register_autotuner(Autotuner("sr_attention_fwd", _TILES))
DQ_TUNER = register_autotuner(Autotuner("sr_attention_bwd_dq", _TILES))
FWD_IEEE_TUNER = register_autotuner(Autotuner("sr_attention_fwd_ieee", _IEEE_TILES))
DQ_IEEE_TUNER = register_autotuner(Autotuner("sr_attention_bwd_dq_ieee", _IEEE_TILES))


@triton.jit
def _sr_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
    N, M, HEADS,
    stride_qb, stride_qn, stride_kb, stride_km, stride_vb, stride_vm, stride_ob, stride_on,
    qk_scale,
    USE_LSE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HEADS).to(tl.int64)
    h = pid_bh % HEADS
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_n < N
    rows = offs_n.to(tl.int64)
    q = tl.load(q_ptr + b * stride_qb + h * HEAD_DIM + rows[:, None] * stride_qn + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    lse_rows = lse_ptr + pid_bh.to(tl.int64) * N + rows
    acc = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    if USE_LSE:
        lse2 = tl.load(lse_rows, mask=row_ok, other=0.0) * 1.4426950408889634  # log2 domain
    else:
        m_i = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_N,), dtype=tl.float32)
    k_base = k_ptr + b * stride_kb + h * HEAD_DIM
    v_base = v_ptr + b * stride_vb + h * HEAD_DIM
    for start in range(0, M, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        col_ok = offs_m < M
        cols = offs_m.to(tl.int64)
        k = tl.load(k_base + cols[:, None] * stride_km + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vm + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        # fp16 safety: the scores live in the fp32 accumulator only (never stored in 16 bits), so |q.k| past
        # 65504 cannot overflow; what meets 16 bits is P = exp2(s - max or lse) in [0, 1] and the P @ V sums
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M), log2 units
        s = tl.where(col_ok[None, :], s, float("-inf"))
        if USE_LSE:
            p = tl.exp2(s - lse2[:, None])
            acc += tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
    if not USE_LSE:
        acc = acc / l_i[:, None]
        tl.store(lse_rows, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=row_ok)
    tl.store(o_ptr + b * stride_ob + h * HEAD_DIM + rows[:, None] * stride_on + offs_d[None, :],
             acc.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _sr_attention_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    N, M, HEADS,
    stride_qb, stride_qn, stride_kb, stride_km, stride_vb, stride_vm, stride_dob, stride_don,
    stride_dkb, stride_dkm, stride_dvb, stride_dvm, stride_split, rows_per_split,
    sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)  # query split: rows [pid_s * rows_per_split, +rows_per_split) (a multiple of BLOCK_N)
    b = (pid_bh // HEADS).to(tl.int64)
    h = pid_bh % HEADS
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_m < M
    cols = offs_m.to(tl.int64)
    k = tl.load(k_ptr + b * stride_kb + h * HEAD_DIM + cols[:, None] * stride_km + offs_d[None, :],
                mask=col_ok[:, None], other=0.0)
    v = tl.load(v_ptr + b * stride_vb + h * HEAD_DIM + cols[:, None] * stride_vm + offs_d[None, :],
                mask=col_ok[:, None], other=0.0)
    dk = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    dv = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    q_base = q_ptr + b * stride_qb + h * HEAD_DIM
    do_base = do_ptr + b * stride_dob + h * HEAD_DIM
    row_base = pid_bh.to(tl.int64) * N
    q_lo = pid_s * rows_per_split
    q_hi = tl.minimum(q_lo + rows_per_split, N)
    for start in range(q_lo, q_hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        row_ok = offs_n < N
        rows = offs_n.to(tl.int64)
        q = tl.load(q_base + rows[:, None] * stride_qn + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_don + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        lse2 = tl.load(lse_ptr + row_base + rows, mask=row_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_ptr + row_base + rows, mask=row_ok, other=0.0)
        if PRECISION == "ieee":
            # exact fp32 (FMA) dots: P^T and dS^T formed directly, transposing the loaded Q and dO rather
            # than the computed tiles (AOT report: 568 B spilled instead of 13 KB at sm_90; sm_80 still ~13 KB)
            pt = tl.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse2[None, :])
            pt = tl.where(col_ok[:, None] & row_ok[None, :], pt, 0.0)  # (BLOCK_M, BLOCK_N)
            dv += tl.dot(pt, do, input_precision=PRECISION)
            dst = pt * (tl.dot(v, tl.trans(do), input_precision=PRECISION) - delta[None, :])
            dk += tl.dot(dst, q, input_precision=PRECISION)
        else:
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            p = tl.exp2(s - lse2[:, None])
            p = tl.where(row_ok[:, None] & col_ok[None, :], p, 0.0)  # (BLOCK_N, BLOCK_M)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    dk = dk * sm_scale
    split = pid_s.to(tl.int64) * stride_split  # 0 with one split (dK, dV written in place), else fp32 partials
    dk_ptr += split
    dv_ptr += split
    tl.store(dk_ptr + b * stride_dkb + h * HEAD_DIM + cols[:, None] * stride_dkm + offs_d[None, :],
             dk.to(dk_ptr.dtype.element_ty), mask=col_ok[:, None])
    tl.store(dv_ptr + b * stride_dvb + h * HEAD_DIM + cols[:, None] * stride_dvm + offs_d[None, :],
             dv.to(dv_ptr.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _sr_attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, o_ptr, lse_ptr, delta_ptr, dq_ptr,
    N, M, HEADS,
    stride_qb, stride_qn, stride_kb, stride_km, stride_vb, stride_vm, stride_dob, stride_don,
    stride_ob, stride_on, stride_dqb, stride_dqn,
    sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HEADS).to(tl.int64)
    h = pid_bh % HEADS
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_n < N
    rows = offs_n.to(tl.int64)
    q = tl.load(q_ptr + b * stride_qb + h * HEAD_DIM + rows[:, None] * stride_qn + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    do = tl.load(do_ptr + b * stride_dob + h * HEAD_DIM + rows[:, None] * stride_don + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0)
    o = tl.load(o_ptr + b * stride_ob + h * HEAD_DIM + rows[:, None] * stride_on + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    row_base = pid_bh.to(tl.int64) * N
    lse2 = tl.load(lse_ptr + row_base + rows, mask=row_ok, other=0.0) * 1.4426950408889634
    # Delta = rowsum(dO * O) in fp32, here where dO is loaded anyway; written for the dK/dV kernel, launched after
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)  # (BLOCK_N,)
    tl.store(delta_ptr + row_base + rows, delta, mask=row_ok)
    dq = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    k_base = k_ptr + b * stride_kb + h * HEAD_DIM
    v_base = v_ptr + b * stride_vb + h * HEAD_DIM
    for start in range(0, M, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        col_ok = offs_m < M
        cols = offs_m.to(tl.int64)
        k = tl.load(k_base + cols[:, None] * stride_km + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vm + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.exp2(s - lse2[:, None])
        p = tl.where(row_ok[:, None] & col_ok[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    dq = dq * sm_scale
    tl.store(dq_ptr + b * stride_dqb + h * HEAD_DIM + rows[:, None] * stride_dqn + offs_d[None, :],
             dq.to(dq_ptr.dtype.element_ty), mask=row_ok[:, None])


def _check(name: str, t: torch.Tensor, b: int, c: int) -> None:
    if t.ndim != 3 or t.shape[0] != b or t.shape[2] != c or t.stride(2) != 1:
        raise ValueError(f"sr_attention (triton): {name} must be (B={b}, L, C={c}) with unit stride along C, "
                         f"got shape {tuple(t.shape)} strides {t.stride()}")


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SMS  # meta tensors (compiling ahead of time) and the interpreter: an H100/H200's count


def dkdv_splits(n: int, m: int, bh: int, sms: int) -> int:
    """How many query splits the dK/dV kernel runs: enough CTAs to fill ``sms`` SMs DKDV_CTAS_PER_SM
    times over when the key blocks alone (cdiv(m, BLOCK_K) * bh CTAs) do not, each split at least
    DKDV_MIN_QUERY_BLOCKS query blocks long, and no split empty. 1 means dK, dV written in place.

    Example: B2 stage 1 at 1024x1024 batch 8 (N = 65536, M = 1024, bh = 8) on 132 SMs: 256 key-block
    CTAs, 3 splits -> 768 CTAs.
    """
    ctas = triton.cdiv(m, BLOCK_K) * bh
    q_blocks = triton.cdiv(n, BLOCK_Q)
    want = min(triton.cdiv(DKDV_CTAS_PER_SM * sms, ctas), max(1, q_blocks // DKDV_MIN_QUERY_BLOCKS))
    return triton.cdiv(q_blocks, triton.cdiv(q_blocks, max(1, want)))


def launch_config(precision: str = "tf32") -> dict[str, int]:
    """Default block sizes of every launch: query rows (BLOCK_N) and key rows (BLOCK_M) per tile, for
    tensor-core dots (``precision`` "tf32": fp16, bf16, TF32) or exact fp32 ones ("ieee"). On a GPU the
    forward and dQ kernels may run another declared tile (autotuning); the dK/dV kernel runs these.

    The same on a GPU and in the interpreter: the dots need tiles of at least 16 on a GPU, and
    the interpreter handles these sizes at test shapes.
    """
    if precision == "ieee":
        return {"BLOCK_N": DKDV_IEEE_BLOCK_N, "BLOCK_M": BLOCK_K}
    return {"BLOCK_N": BLOCK_Q, "BLOCK_M": BLOCK_K}


def sr_attention_fwd_triton(q, k, v, num_heads: int, scale: float, lse=None):
    """O (B, N, C) and lse (B, h, N) fp32. With ``lse`` given, recompute O from it (no online softmax)."""
    check_interpreter_dtypes("sr_attention", q, k, v)
    b, n, c = q.shape
    m = k.shape[1]
    d = c // num_heads
    if d not in TRITON_HEAD_DIMS or d * num_heads != c:
        raise ValueError(f"sr_attention (triton): head dim {c}/{num_heads} is not one of {TRITON_HEAD_DIMS}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check(name, t, b, c)
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"sr_attention (triton): k {tuple(k.shape)} and v {tuple(v.shape)} disagree")
    out = empty(b, n, c, dtype=q.dtype, device=q.device)
    use_lse = lse is not None
    if not use_lse:
        lse = empty(b, num_heads, n, dtype=torch.float32, device=q.device)
    prec = dot_precision(q.dtype)

    def launch(cfg: LaunchConfig):
        _sr_attention_fwd_kernel[(triton.cdiv(n, cfg.meta["BLOCK_N"]), b * num_heads)](
            q, k, v, out, lse, n, m, num_heads,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0),
            out.stride(1), scale * LOG2E,
            USE_LSE=use_lse, HEAD_DIM=d, PRECISION=prec, **cfg.kwargs(),
        )

    tuner = FWD_IEEE_TUNER if prec == "ieee" else FWD_TUNER
    launch(tuner.pick(q, launch, key=(d, prec, use_lse)))
    return out, lse


def sr_attention_bwd_triton(do, q, k, v, out, lse, num_heads: int, scale: float, splits: int | None = None):
    """dQ (B, N, C) and dK, dV (B, M, C) written side by side into one (B, M, 2C) tensor, returned as views.

    The dQ kernel runs first and writes Delta = rowsum(dO * O) (B, h, N) fp32 for the dK/dV kernel.
    ``splits``: query splits of the dK/dV kernel (default :func:`dkdv_splits`); with more than one,
    each split writes fp32 partial dK, dV (splits, B, M, 2C), summed over the split dim afterwards
    (a fixed order: deterministic, no atomics).
    """
    check_interpreter_dtypes("sr_attention", do, q, k, v, out)
    b, n, c = q.shape
    m = k.shape[1]
    d = c // num_heads
    for name, t in (("do", do), ("out", out)):
        _check(name, t, b, c)
    if splits is None:
        splits = dkdv_splits(n, m, b * num_heads, _sm_count(q.device))
    q_blocks = triton.cdiv(n, BLOCK_Q)
    if not 1 <= splits <= q_blocks:
        raise ValueError(f"sr_attention (triton): splits={splits} must be in [1, {q_blocks}] (query blocks of N={n})")
    rows_per_split = triton.cdiv(q_blocks, splits) * BLOCK_Q
    splits = triton.cdiv(n, rows_per_split)  # no empty split
    delta = empty(b, num_heads, n, dtype=torch.float32, device=q.device)  # written by the dQ kernel
    dq = empty(b, n, c, dtype=q.dtype, device=q.device)
    dkv = empty(b, m, 2 * c, dtype=k.dtype, device=k.device)
    part = dkv if splits == 1 else empty(splits, b, m, 2 * c, dtype=torch.float32, device=k.device)
    dk, dv = part[..., :c], part[..., c:]  # (B, M, C) or (splits, B, M, C)
    prec = dot_precision(q.dtype)
    common = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1))

    def launch_dq(cfg: LaunchConfig):
        _sr_attention_bwd_dq_kernel[(triton.cdiv(n, cfg.meta["BLOCK_N"]), b * num_heads)](
            q, k, v, do, out, lse, delta, dq, n, m, num_heads, *common,
            out.stride(0), out.stride(1), dq.stride(0), dq.stride(1), scale, scale * LOG2E,
            HEAD_DIM=d, PRECISION=prec, **cfg.kwargs(),
        )

    tuner = DQ_IEEE_TUNER if prec == "ieee" else DQ_TUNER
    launch_dq(tuner.pick(q, launch_dq, key=(d, prec)))
    _sr_attention_bwd_dkdv_kernel[(triton.cdiv(m, BLOCK_K), b * num_heads, splits)](
        q, k, v, do, lse, delta, dk, dv, n, m, num_heads, *common,
        dk.stride(-3), dk.stride(-2), dv.stride(-3), dv.stride(-2), 0 if splits == 1 else part.stride(0),
        rows_per_split, scale, scale * LOG2E,  # rows_per_split: a multiple of BLOCK_Q, hence of either BLOCK_N
        HEAD_DIM=d, BLOCK_N=DKDV_IEEE_BLOCK_N if prec == "ieee" else BLOCK_Q, BLOCK_M=BLOCK_K, PRECISION=prec,
        num_warps=DKDV_IEEE_WARPS if prec == "ieee" else 4,
    )
    if splits > 1:
        dkv.copy_(part.sum(0))  # (B, M, 2C): a fixed-order reduction over the splits
    return dq, dkv[..., :c], dkv[..., c:]
