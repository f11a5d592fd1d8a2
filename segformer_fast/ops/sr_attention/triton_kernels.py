"""Triton kernels for the attention core of spatial-reduction attention (flash-style).

Inputs are per-token rows of the (B, L, C) projections with the heads side by side in C, so no
(B, h, L, d) transpose is ever made: q (B, N, C), k and v (B, M, C), any strides along B and L,
unit stride along C. Head h reads columns [h*d, (h+1)*d). lse is (B, h, N) fp32 (natural log).

Forward: one program per (query block, batch*head); an online softmax over key blocks (scores in
the log2 domain, exp2), fp32 accumulators; writes O and the row log-sum-exp. With USE_LSE the
max/normaliser tracking is skipped and P = exp(S - lse) is formed directly: the backward uses that
to recompute O from the saved lse. Backward: Delta = rowsum(dO * O) is precomputed; one kernel per
key block accumulates dK, dV over all query blocks, one per query block accumulates dQ over all key
blocks, both recomputing P tile by tile. No atomics, no (N, M) buffer. Head dims 32 and 64.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from ...utils.debug import empty
from ..triton_launch import check_interpreter_dtypes

__all__ = ["TRITON_HEAD_DIMS", "launch_config", "sr_attention_fwd_triton", "sr_attention_bwd_triton"]

TRITON_HEAD_DIMS = (32, 64)
LOG2E = 1.4426950408889634
BLOCK_Q = 64
BLOCK_K = 32


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
    stride_dkb, stride_dkm, stride_dvb, stride_dvm,
    sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
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
    for start in range(0, N, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        row_ok = offs_n < N
        rows = offs_n.to(tl.int64)
        q = tl.load(q_base + rows[:, None] * stride_qn + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_don + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        lse2 = tl.load(lse_ptr + row_base + rows, mask=row_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_ptr + row_base + rows, mask=row_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.exp2(s - lse2[:, None])
        p = tl.where(row_ok[:, None] & col_ok[None, :], p, 0.0)  # (BLOCK_N, BLOCK_M)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    dk = dk * sm_scale
    tl.store(dk_ptr + b * stride_dkb + h * HEAD_DIM + cols[:, None] * stride_dkm + offs_d[None, :],
             dk.to(dk_ptr.dtype.element_ty), mask=col_ok[:, None])
    tl.store(dv_ptr + b * stride_dvb + h * HEAD_DIM + cols[:, None] * stride_dvm + offs_d[None, :],
             dv.to(dv_ptr.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _sr_attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    N, M, HEADS,
    stride_qb, stride_qn, stride_kb, stride_km, stride_vb, stride_vm, stride_dob, stride_don,
    stride_dqb, stride_dqn,
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
    row_base = pid_bh.to(tl.int64) * N
    lse2 = tl.load(lse_ptr + row_base + rows, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(delta_ptr + row_base + rows, mask=row_ok, other=0.0)
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


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 inputs: exact fp32 dots, not TF32


def launch_config() -> dict[str, int]:
    """Block sizes of every launch: query rows (BLOCK_N) and key rows (BLOCK_M) per tile.

    The same on a GPU and in the interpreter: the dots need tiles of at least 16 on a GPU, and
    the interpreter handles these sizes at test shapes.
    """
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
    grid = (triton.cdiv(n, BLOCK_Q), b * num_heads)
    _sr_attention_fwd_kernel[grid](
        q, k, v, out, lse, n, m, num_heads,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        scale * LOG2E,
        USE_LSE=use_lse, HEAD_DIM=d, BLOCK_N=BLOCK_Q, BLOCK_M=BLOCK_K, PRECISION=_precision(q.dtype),
    )
    return out, lse


def sr_attention_bwd_triton(do, q, k, v, out, lse, num_heads: int, scale: float):
    """dQ (B, N, C) and dK, dV (B, M, C) written side by side into one (B, M, 2C) tensor, returned as views."""
    check_interpreter_dtypes("sr_attention", do, q, k, v, out)
    b, n, c = q.shape
    m = k.shape[1]
    d = c // num_heads
    for name, t in (("do", do), ("out", out)):
        _check(name, t, b, c)
    delta = (do.float() * out.float()).view(b, n, num_heads, d).sum(-1).transpose(1, 2).contiguous()  # (B, h, N)
    dq = empty(b, n, c, dtype=q.dtype, device=q.device)
    dkv = empty(b, m, 2 * c, dtype=k.dtype, device=k.device)
    dk, dv = dkv[..., :c], dkv[..., c:]
    prec = _precision(q.dtype)
    common = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1))
    _sr_attention_bwd_dkdv_kernel[(triton.cdiv(m, BLOCK_K), b * num_heads)](
        q, k, v, do, lse, delta, dk, dv, n, m, num_heads, *common,
        dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), scale, scale * LOG2E,
        HEAD_DIM=d, BLOCK_N=BLOCK_Q, BLOCK_M=BLOCK_K, PRECISION=prec,
    )
    _sr_attention_bwd_dq_kernel[(triton.cdiv(n, BLOCK_Q), b * num_heads)](
        q, k, v, do, lse, delta, dq, n, m, num_heads, *common,
        dq.stride(0), dq.stride(1), scale, scale * LOG2E,
        HEAD_DIM=d, BLOCK_N=BLOCK_Q, BLOCK_M=BLOCK_K, PRECISION=prec,
    )
    return dq, dk, dv
