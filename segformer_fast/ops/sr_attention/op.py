"""Spatial-reduction attention (MiT / PVT "efficient self-attention"): dispatch, autograd, public API.

    q   = x Wq^T + bq                                   x: (B, N, C), N = H*W
    r   = patches(x) Wsr^T + bsr                        (B, M, C), M = (H//sr)*(W//sr)   [sr > 1]
    kvx = LayerNorm(r)  (sr > 1)  or  x  (sr = 1)
    k, v = kvx Wk^T + bk, kvx Wv^T + bv                   (B, M, C) each
    o   = softmax(q_h k_h^T / sqrt(d)) v_h  per head      (B, N, C), heads side by side in C
    y   = o Wp^T + bp                                   returned: after the output projection

The reduction is the Conv2d(k=s=sr) written as a matmul over non-overlapping patches of the token
layout (reduce.py): no NCHW copy. The attention core is flash-style: the (N, M) scores never exist
as a whole, forward or backward.

Saved for backward (``save_output``, memory="save" in the modules, the default): x, the row
log-sum-exp (B, h, N) and the attention output o (B, N, C) -- not q, k, v, nor any (N, M) tile. o is
the tensor the forward wrote anyway (the projection's input), so keeping it moves no extra bytes; it
spares the backward a forward pass over all scores. With ``save_output=False`` (memory="recompute")
only x and lse are kept, and the backward also recomputes O from the saved lse (P = exp(S - lse), one
pass with no online max). Either way the backward recomputes q, the reduction, k and v (matmuls,
cheap next to attention), then
    dO = dy Wp,  dWp = dy^T O,  Delta = rowsum(dO * O) per head,
    dP = dO V^T, dS = P * (dP - Delta),  dQ = dS K / sqrt(d),  dK = dS^T Q / sqrt(d),  dV = P^T dO,
    dbk = 0 (the key bias shifts each query's scores by a constant, which softmax ignores),
and chains through the projections, the LayerNorm and the patch matmul (whose adjoint scatters
the patch gradients back to the tokens; cropped tokens get no gradient from the reduction).
This keeps the saved activations at 2C + h values per token (C + h with save_output=False) against
3C or more for eager attention (which also keeps the (N, M) probabilities).

Implementations (``backend``):
- ``torch``: PyTorch ops. Attention core on CPU: ATen's tiled CPU flash-attention kernels
  (the kernels behind F.scaled_dot_product_attention, forward and backward, with lse); on other
  devices a query-chunked recomputation whose score tile is bounded (_CHUNK_ELEMS).
- ``triton``: the attention core in Triton (triton_kernels.py), head dims 32 and 64; any other head
  dim runs the torch core. The reduction runs as torch matmuls.
- ``cuda``: the patch gather / scatter and a fused bias + LayerNorm (forward and backward) from
  csrc/sr_attention/sr_attention.cu, the matmuls on cuBLAS via torch, the attention core in Triton
  when present (head dim 32/64), else the torch core.

Attention cores (the ``sr_attention.core`` spec): ``torch`` and ``triton`` as above, and ``aten``:
ATen's CUDA flash attention (fp16/bf16) or memory-efficient attention (fp32), forward and backward,
any head dim that is a multiple of 8. Auto takes triton then torch, or on a GPU listed in
CORE_GPU_PREFERENCE (filled from measurements only) the order measured there.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F

from ...backends import cuda_extension, validate_backend
from ...dispatch import Impl, OpSpec, register
from ..triton_launch import interpreter_refuses
from ..fused import fused_op, in_dtype_of
from .reduce import conv_weight_matrix, patchify, reduced_size, unpatchify_add

__all__ = ["sr_attention", "IMPLEMENTED", "attention_core_fwd", "attention_core_bwd"]

_CHUNK_ELEMS = 1 << 22  # max score-tile elements of the chunked torch core (16 MiB fp32)
_WEIGHT_NAMES = ("q_weight", "q_bias", "k_weight", "k_bias", "v_weight", "v_bias", "proj_weight", "proj_bias",
                 "sr_weight", "sr_bias", "norm_weight", "norm_bias")


# ---------------------------------------------------------------------------------------------
# attention core: o, lse = attn(q, k, v) and its backward; q, o: (B, N, C); k, v: (B, M, C)


def _heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    b, n, c = t.shape
    return t.view(b, n, num_heads, c // num_heads).transpose(1, 2)  # (B, h, L, d), a view


def _tokens(t: torch.Tensor) -> torch.Tensor:
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)  # (B, L, C); a view for ATen's (B, L, h, d) outputs


def _chunk_rows(n: int, m: int, bh: int) -> int:
    return max(1, min(n, _CHUNK_ELEMS // max(1, m * bh)))


def _torch_core_fwd(q, k, v, num_heads, scale):
    if q.device.type == "cpu" and q.dtype != torch.float64:
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            _heads(q, num_heads), _heads(k, num_heads), _heads(v, num_heads), scale=scale
        )
        return _tokens(o), lse
    return _chunked_core_fwd(q, k, v, num_heads, scale)


def _chunked_core_fwd(q, k, v, num_heads, scale):
    qh, kh, vh = _heads(q, num_heads), _heads(k, num_heads), _heads(v, num_heads)
    b, h, n, _ = qh.shape
    step = _chunk_rows(n, kh.shape[2], b * h)
    acc = torch.promote_types(q.dtype, torch.float32)  # fp64 stays fp64
    outs, lses = [], []
    for s in range(0, n, step):  # score tile (B, h, step, M): bounded, never (N, M)
        # fp32 scores and log-sum-exp: fp16 q.k products past 65504 cannot overflow; P = exp(S - lse) <= 1
        sc = (qh[:, :, s: s + step].to(acc) @ kh.to(acc).transpose(-1, -2)) * scale
        lse = torch.logsumexp(sc, -1)
        outs.append((torch.exp(sc - lse[..., None]) @ vh.to(acc)).to(q.dtype))
        lses.append(lse)
    return _tokens(torch.cat(outs, 2)), torch.cat(lses, 2)


def _torch_core_bwd(do, q, k, v, o, lse, num_heads, scale):
    qh, kh, vh, oh, doh = (_heads(t, num_heads) for t in (q, k, v, o, do))
    if q.device.type == "cpu" and q.dtype != torch.float64:
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            doh, qh, kh, vh, oh, lse, 0.0, False, scale=scale
        )
        return _tokens(dq), _tokens(dk), _tokens(dv)
    return _chunked_core_bwd(do, q, k, v, o, lse, num_heads, scale)


def _chunked_core_bwd(do, q, k, v, o, lse, num_heads, scale):
    qh, kh, vh, oh, doh = (_heads(t, num_heads) for t in (q, k, v, o, do))
    b, h, n, _ = qh.shape
    acc = torch.promote_types(q.dtype, torch.float32)  # fp64 stays fp64
    kf, vf = kh.to(acc), vh.to(acc)
    delta = (doh.to(acc) * oh.to(acc)).sum(-1)  # (B, h, N)
    dk, dv, dqs = torch.zeros_like(kf), torch.zeros_like(vf), []
    step = _chunk_rows(n, kh.shape[2], b * h)
    for s in range(0, n, step):
        e = s + step
        qc, doc = qh[:, :, s:e].to(acc), doh[:, :, s:e].to(acc)
        p = torch.exp((qc @ kf.transpose(-1, -2)) * scale - lse[:, :, s:e, None])  # (B, h, chunk, M)
        dv += p.transpose(-1, -2) @ doc
        ds = p * (doc @ vf.transpose(-1, -2) - delta[:, :, s:e, None])
        dqs.append((ds @ kf) * scale)
        dk += (ds.transpose(-1, -2) @ qc) * scale
    return _tokens(torch.cat(dqs, 2).to(q.dtype)), _tokens(dk.to(k.dtype)), _tokens(dv.to(v.dtype))


def _triton_core_condition(q: torch.Tensor, facts: dict) -> Optional[str]:
    from .triton_kernels import TRITON_HEAD_DIMS

    if facts["head_dim"] not in TRITON_HEAD_DIMS:
        return f"head dim {facts['head_dim']} is not one of the Triton kernels' {TRITON_HEAD_DIMS}"
    if q.dtype == torch.float64:
        return "the Triton kernels take float32, float16 and bfloat16"
    if interpreter_refuses(q):
        return "bfloat16 in Triton's interpreter is wrong (bf16 tl.dot)"
    return None


def _triton_core_fwd(q, k, v, num_heads, scale, lse):
    from .triton_kernels import sr_attention_fwd_triton

    return sr_attention_fwd_triton(q, k, v, num_heads, scale, None if lse is None else lse.contiguous())


def _triton_core_bwd(do, q, k, v, o, lse, num_heads, scale):
    from .triton_kernels import sr_attention_bwd_triton

    return sr_attention_bwd_triton(do.contiguous(), q, k, v, o, lse.contiguous(), num_heads, scale)


def _torch_core_fwd_lse(q, k, v, num_heads, scale, lse):
    o, lse2 = _torch_core_fwd(q, k, v, num_heads, scale)  # recomputes both; a given lse is kept
    return o, (lse2 if lse is None else lse)


# ATen's CUDA attention kernels as a core: flash attention (fp16/bf16, head dim <= 256, sm_80+) or
# memory-efficient attention (fp32, fp16, bf16), forward with the row log-sum-exp and backward from
# it. Both take (B, h, L, d) views with unit stride along d (our token layouts' _heads views) and
# return O in (B, L, h, d) memory, so _tokens is a view. lse: flash's is (B, h, N) fp32; efficient
# attention's is (B, h, ceil(N / 32) * 32) fp32, padded (+inf here) both ways. Both natural log of
# sum(exp(scale * q.k)), the convention of our lse. No dropout, no mask, so the RNG tensors and the
# varlen cumulative lengths are unused: zero-dim / None placeholders.
_aten = torch.ops.aten  # the ops are looked up through this name at call time (tests put CPU stand-ins here)
_LSE_ALIGN = 32
# The argument names of each op as this glue calls it (torch 2.11, the GPU machine's, and 2.13 agree);
# a torch whose schema differs is refused with the difference instead of being called wrongly.
_ATEN_ARGS = {
    "_scaled_dot_product_flash_attention": (
        "query", "key", "value", "dropout_p", "is_causal", "return_debug_mask", "scale"),
    "_scaled_dot_product_flash_attention_backward": (
        "grad_out", "query", "key", "value", "out", "logsumexp", "cum_seq_q", "cum_seq_k", "max_q", "max_k",
        "dropout_p", "is_causal", "philox_seed", "philox_offset", "scale"),
    "_scaled_dot_product_efficient_attention": (
        "query", "key", "value", "attn_bias", "compute_log_sumexp", "dropout_p", "is_causal", "scale"),
    "_scaled_dot_product_efficient_attention_backward": (
        "grad_out_", "query", "key", "value", "attn_bias", "out", "logsumexp", "philox_seed", "philox_offset",
        "dropout_p", "grad_input_mask", "is_causal", "scale"),
}


@functools.lru_cache(maxsize=None)
def _aten_schema_error(op: str) -> Optional[str]:
    """None when this torch's aten::<op> takes the arguments the glue passes, else what differs."""
    try:
        schema = getattr(torch.ops.aten, op).default._schema
    except (AttributeError, RuntimeError):
        return f"torch {torch.__version__} has no aten::{op}"
    got = tuple(a.name for a in schema.arguments)
    if got != _ATEN_ARGS[op]:
        return f"aten::{op} in torch {torch.__version__} takes {got}; this core passes {_ATEN_ARGS[op]}"
    return None


def _gpu_capability(device: torch.device) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(device))


def _aten_flash(q: torch.Tensor, head_dim: int) -> bool:
    """Flash attention (else memory-efficient attention) for this call, forward and backward alike."""
    return (q.dtype in (torch.float16, torch.bfloat16) and head_dim <= 256
            and _gpu_capability(q.device) >= (8, 0))


def _aten_core_condition(q: torch.Tensor, facts: dict) -> Optional[str]:
    if q.device.type != "cuda":
        return ("ATen's flash / memory-efficient attention kernels take CUDA tensors (on the CPU the torch core "
                "runs ATen's CPU flash attention)")
    d = facts["head_dim"]
    if d % 8:
        return f"head dim {d} is not a multiple of 8 (ATen's flash / memory-efficient attention kernels)"
    ops = (("_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward")
           if _aten_flash(q, d) else
           ("_scaled_dot_product_efficient_attention", "_scaled_dot_product_efficient_attention_backward"))
    return _aten_schema_error(ops[0]) or _aten_schema_error(ops[1])


def _rng_placeholder() -> torch.Tensor:
    return torch.zeros((), dtype=torch.int64)  # philox seed / offset: read only with dropout_p > 0


def _aten_core_fwd(q, k, v, num_heads, scale, lse):
    qh, kh, vh = _heads(q, num_heads), _heads(k, num_heads), _heads(v, num_heads)
    if _aten_flash(q, qh.shape[3]):
        o, lse2 = _aten._scaled_dot_product_flash_attention(qh, kh, vh, 0.0, False, False, scale=scale)[:2]
    else:
        o, lse2 = _aten._scaled_dot_product_efficient_attention(qh, kh, vh, None, True, 0.0, False, scale=scale)[:2]
        lse2 = lse2[..., : q.shape[1]]  # (B, h, N) of the padded (B, h, ceil(N/32)*32)
    return _tokens(o), (lse2.contiguous() if lse is None else lse)


def _aten_core_bwd(do, q, k, v, o, lse, num_heads, scale):
    qh, kh, vh, oh, doh = (_heads(t, num_heads) for t in (q, k, v, o, do))
    n, m = q.shape[1], k.shape[1]
    if _aten_flash(q, qh.shape[3]):
        dq, dk, dv = _aten._scaled_dot_product_flash_attention_backward(
            doh, qh, kh, vh, oh, lse, None, None, n, m, 0.0, False, _rng_placeholder(), _rng_placeholder(),
            scale=scale)
    else:
        b, h, _ = lse.shape
        lse_pad = lse.new_full((b, h, -(-n // _LSE_ALIGN) * _LSE_ALIGN), float("inf"))  # the layout it returned
        lse_pad[..., :n] = lse
        dq, dk, dv, _ = _aten._scaled_dot_product_efficient_attention_backward(
            doh, qh, kh, vh, None, oh, lse_pad, _rng_placeholder(), _rng_placeholder(), 0.0,
            [True, True, True, False], False, scale=scale)
    return _tokens(dq), _tokens(dk), _tokens(dv)


# Auto's core order per CUDA GPU, (major, minor) -> order, e.g. (9, 0): ("aten", "triton", "torch").
# Filled from measurements on that GPU only (benchmarks/test_bench_sr_attention.py); a GPU not
# listed gets the spec's default order, triton then torch (the aten core only when asked for).
CORE_GPU_PREFERENCE: dict[tuple[int, int], tuple[str, ...]] = {}

CORE = register(OpSpec("sr_attention.core", [
    Impl("torch", _torch_core_fwd_lse, _torch_core_bwd,
         note="ATen's flash-attention kernels on the CPU, else query-chunked PyTorch with bounded score tiles"),
    Impl("triton", _triton_core_fwd, _triton_core_bwd, conditions=(_triton_core_condition,), fallback="torch",
         note="flash-style Triton kernels (triton_kernels.py)"),
    Impl("torch", _aten_core_fwd, _aten_core_bwd, dtypes=(torch.float32, torch.float16, torch.bfloat16),
         conditions=(_aten_core_condition,), name="aten",
         note="ATen's CUDA flash attention (fp16/bf16) or memory-efficient attention (fp32), forward and backward"),
], prefer={"*": ("triton", "torch")}, prefer_gpu=CORE_GPU_PREFERENCE))


def _core(request: str, q: torch.Tensor, num_heads: int) -> Impl:
    # "torch"; "triton" (its declared fallback: torch); "aten"; "auto": the best core present (the per-GPU
    # table, else triton then torch), whatever the environment says
    return CORE.resolve(request, q, use_env=False, head_dim=q.shape[2] // num_heads)


def attention_core_fwd(q, k, v, num_heads: int, scale: float, core: str = "torch", lse=None):
    """Flash-style attention on token layouts. q: (B, N, C); k, v: (B, M, C) -> o (B, N, C), lse (B, h, N) fp32.

    ``core``: "torch", "triton", "aten" or "auto" (the ``sr_attention.core`` spec). With ``lse`` given (the
    triton core) O is recomputed from it; the torch core recomputes both.
    """
    return _core(core, q, num_heads).forward(q, k, v, num_heads, scale, lse)


def attention_core_bwd(do, q, k, v, o, lse, num_heads: int, scale: float, core: str = "torch"):
    """Gradients dq (B, N, C), dk, dv (B, M, C) of the attention core, recomputing P from q, k and lse."""
    return _core(core, q, num_heads).backward(do, q, k, v, o, lse, num_heads, scale)


# ---------------------------------------------------------------------------------------------
# reduction + LayerNorm: kvx (B, M, C) from x, and its backward


def _reduce_ln_fwd(x, hw, sr, w, eps, kind):
    """kvx (B, M, C) and what the backward needs (patches, pre-norm r, mean, rstd)."""
    if sr == 1:
        return x, None
    c = x.shape[2]
    wmat = conv_weight_matrix(w["sr_weight"])  # (C, sr*sr*C)
    if kind == "cuda":
        ext = cuda_extension()
        patches = ext.sr_attention_patchify(x, hw[0], hw[1], sr)  # (B, M, sr*sr*C)
        r = torch.matmul(patches, wmat.t())  # (B, M, C), bias folded into the LN kernel
        kvx, mean, rstd = ext.sr_attention_bias_ln_fwd(r, w["sr_bias"], w["norm_weight"], w["norm_bias"], eps)
        return kvx, (patches, r, mean, rstd)
    patches = patchify(x, hw, sr)
    r = F.linear(patches, wmat, w["sr_bias"])  # (B, M, C)
    kvx, mean, rstd = torch.native_layer_norm(r, (c,), w["norm_weight"], w["norm_bias"], eps)
    return kvx, (patches, r, mean, rstd)


def _reduce_ln_bwd(dkvx, dx, hw, sr, w, eps, saved, kind):
    """Adds the reduction's input gradient into dx (in place); returns dsr_weight, dsr_bias, dnorm_weight, dnorm_bias."""
    if sr == 1:
        dx.add_(dkvx)
        return None, None, None, None
    patches, r, mean, rstd = saved
    c = dx.shape[2]
    if kind == "cuda":
        dr, dnw, dnb, dsb = cuda_extension().sr_attention_bias_ln_bwd(
            dkvx.contiguous(), r, w["sr_bias"], w["norm_weight"], mean, rstd)
    else:
        dr, dnw, dnb = torch.ops.aten.native_layer_norm_backward(
            dkvx, r, [c], mean, rstd, w["norm_weight"], w["norm_bias"], [True, True, True])
        dsb = dr.sum((0, 1))
    wmat = conv_weight_matrix(w["sr_weight"])
    dr2 = dr.reshape(-1, c)
    dwmat = dr2.t() @ patches.reshape(dr2.shape[0], -1)  # (C, sr*sr*C)
    dsw = dwmat.view(c, sr, sr, c).permute(0, 3, 1, 2)  # back to the conv layout (C, C, sr, sr)
    dpatches = torch.matmul(dr, wmat)  # (B, M, sr*sr*C)
    if kind == "cuda":
        cuda_extension().sr_attention_unpatchify_add(dx, dpatches.contiguous(), hw[0], hw[1], sr)
    else:
        unpatchify_add(dx, dpatches, hw, sr)
    return dsw.contiguous(), dsb, dnw, dnb


# ---------------------------------------------------------------------------------------------
# the whole layer


def _qkv(x, hw, sr, w, eps, kind):
    q = F.linear(x, w["q_weight"], w["q_bias"])  # (B, N, C)
    kvx, saved = _reduce_ln_fwd(x, hw, sr, w, eps, kind)  # (B, M, C)
    # K and V as two matmuls on the shared reduced tokens: one matmul on [Wk; Wv] would need that
    # (2C, C) concatenation copied on every call, which costs more than it saves at M << N.
    k = F.linear(kvx, w["k_weight"], w["k_bias"])  # (B, M, C)
    v = F.linear(kvx, w["v_weight"], w["v_bias"])
    return q, k, v, kvx, saved


def _fwd(x, hw, num_heads, sr, w, eps, kind, core):
    """(y, lse, o): the output, the row log-sum-exp and the attention output before the projection."""
    q, k, v, _, _ = _qkv(x, hw, sr, w, eps, kind)
    o, lse = attention_core_fwd(q, k, v, num_heads, (x.shape[2] // num_heads) ** -0.5, core)
    return F.linear(o, w["proj_weight"], w["proj_bias"]), lse, o


def _bwd(dy, x, lse, o, hw, num_heads, sr, w, eps, kind, core):
    """dx and the weight gradients; ``o`` is the saved attention output, or empty (recomputed from lse)."""
    c = x.shape[2]
    scale = (c // num_heads) ** -0.5
    q, k, v, kvx, saved = _qkv(x, hw, sr, w, eps, kind)
    if o.numel() == 0:
        o, _ = attention_core_fwd(q, k, v, num_heads, scale, core, lse=lse)  # recomputed from the saved lse
    dy2, o2 = dy.reshape(-1, c), o.reshape(-1, c)
    g = {"proj_weight": dy2.t() @ o2, "proj_bias": dy2.sum(0)}
    do = torch.matmul(dy, w["proj_weight"])  # (B, N, C)
    dq, dk, dv = attention_core_bwd(do, q, k, v, o, lse, num_heads, scale, core)
    dq2 = dq.reshape(-1, c)
    g["q_weight"], g["q_bias"] = dq2.t() @ x.reshape(-1, c), dq2.sum(0)
    dx = torch.matmul(dq, w["q_weight"]).contiguous()  # (B, N, C)
    kvx2 = kvx.reshape(-1, c)
    g["k_weight"], g["v_weight"] = dk.reshape(-1, c).t() @ kvx2, dv.reshape(-1, c).t() @ kvx2
    # The key bias adds q_n . b_k to every score of query n's row, which softmax ignores: its gradient is
    # exactly 0. Summing dk instead would return dk's rounding, several ulps in fp16/bf16; 0 * sum(dk)
    # keeps the 0 and a NaN (non-finite dk gives NaN, as the reference's sum does).
    g["k_bias"], g["v_bias"] = dk.reshape(-1, c).sum(0, dtype=torch.float32).mul_(0.0).to(dk.dtype), dv.reshape(-1, c).sum(0)
    dkvx = torch.matmul(dk, w["k_weight"]).add_(torch.matmul(dv, w["v_weight"]))  # (B, M, C)
    g["sr_weight"], g["sr_bias"], g["norm_weight"], g["norm_bias"] = _reduce_ln_bwd(dkvx, dx, hw, sr, w, eps, saved, kind)
    return dx, g


def _impl(kind: str, core: str) -> tuple[Callable, Callable]:
    # an implementation = the reduction's kind ("torch" or "cuda") + the attention core asked of sr_attention.core
    return functools.partial(_fwd, kind=kind, core=core), functools.partial(_bwd, kind=kind, core=core)


# Auto's order of the whole layer per CUDA GPU, (major, minor) -> order; filled from measurements on that GPU
# only (benchmarks/backend_table.py, run by benchmarks/gpu_check.sh); a GPU not listed gets the order below.
GPU_PREFERENCE: dict[tuple[int, int], tuple[str, ...]] = {}

SPEC = register(OpSpec("sr_attention", [
    Impl("torch", *_impl("torch", "torch"), note="PyTorch matmuls + the torch attention core"),
    Impl("triton", *_impl("torch", "triton"),
         note="PyTorch matmuls + the Triton attention core (sr_attention.core; torch for other head dims)"),
    Impl("cuda", *_impl("cuda", "auto"), dtypes=(torch.float32, torch.float16, torch.bfloat16),
         needs=("sr_attention_patchify", "sr_attention_unpatchify_add", "sr_attention_bias_ln_fwd",
                "sr_attention_bias_ln_bwd"),
         note="CUDA patch gather/scatter and bias+LayerNorm, cuBLAS matmuls, the best attention core present"),
    Impl("cpp", *_impl("torch", "torch"),
         note="no kernel of ours: the torch implementation, whose CPU core is ATen's C++ flash attention"),
], prefer={"cuda": ("cuda", "triton", "torch"), "cpu": ("torch",)}, prefer_gpu=GPU_PREFERENCE))
IMPLEMENTED = tuple(SPEC.impls)


def _weights_like(x: torch.Tensor, weights) -> dict:
    """{name: weight in x's dtype}: fp32 weights with fp16/bf16 x (mixed precision) are cast here, inside
    the op, so that autograd keeps the fp32 parameters rather than 16-bit copies."""
    return dict(zip(_WEIGHT_NAMES, in_dtype_of(x, *weights)))


def _op_forward(
    x: torch.Tensor, height: int, width: int, num_heads: int, sr: int,
    q_weight: torch.Tensor, q_bias: Optional[torch.Tensor], k_weight: torch.Tensor, k_bias: Optional[torch.Tensor],
    v_weight: torch.Tensor, v_bias: Optional[torch.Tensor], proj_weight: torch.Tensor, proj_bias: Optional[torch.Tensor],
    sr_weight: Optional[torch.Tensor], sr_bias: Optional[torch.Tensor],
    norm_weight: Optional[torch.Tensor], norm_bias: Optional[torch.Tensor],
    eps: float, backend: str, save_output: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, lse, o): o, the attention output before the projection, when ``save_output`` (kept for backward),
    else an empty tensor."""
    w = _weights_like(x, (q_weight, q_bias, k_weight, k_bias, v_weight, v_bias, proj_weight, proj_bias,
                          sr_weight, sr_bias, norm_weight, norm_bias))
    y, lse, o = SPEC.resolve(backend, x).forward(x, (height, width), num_heads, sr, w, eps)
    return y.contiguous(), lse.contiguous(), (o.contiguous() if save_output else o.new_empty(0))


def _op_forward_fake(x, height, width, num_heads, sr, *args):
    b, n, c = x.shape
    save_output = args[-1]
    return (x.new_empty((b, n, c)), x.new_empty((b, num_heads, n), dtype=torch.promote_types(x.dtype, torch.float32)),
            x.new_empty((b, n, c) if save_output else (0,)))


def _op_backward(
    grad: torch.Tensor, x: torch.Tensor, lse: torch.Tensor, o: torch.Tensor, height: int, width: int, num_heads: int,
    sr: int, weights: list[Optional[torch.Tensor]], eps: float, backend: str,
) -> list[torch.Tensor]:
    """Returns [dx] + the gradient of every weight in ``weights`` that is not None, in order (in its dtype).
    ``o``: the saved attention output, or an empty tensor (then recomputed from x and lse)."""
    dtypes = {k: t.dtype for k, t in zip(_WEIGHT_NAMES, weights) if t is not None}
    w = _weights_like(x, weights)
    dx, g = SPEC.resolve(backend, x).backward(grad, x, lse, o, (height, width), num_heads, sr, w, eps)
    return [dx] + [g[k].to(dtypes[k]).contiguous() for k in _WEIGHT_NAMES if w[k] is not None]


def _op_backward_fake(grad, x, lse, o, height, width, num_heads, sr, weights, eps, backend):
    return [torch.empty_like(x)] + [torch.empty_like(t) for t in weights if t is not None]


def _setup_context(ctx, inputs, output):
    x, height, width, num_heads, sr, *weights, eps, backend, _save_output = inputs
    ctx.args = (height, width, num_heads, sr, eps, backend)
    ctx.present = [t is not None for t in weights]
    # output[2]: the attention output o, or empty (recomputed in backward)
    ctx.save_for_backward(x, output[1], output[2], *[t for t in weights if t is not None])


def _backward(ctx, grad, _grad_lse, _grad_o):
    x, lse, o, *present = ctx.saved_tensors
    height, width, num_heads, sr, eps, backend = ctx.args
    it = iter(present)
    weights = [next(it) if p else None for p in ctx.present]
    res = torch.ops.segformer_fast.sr_attention_backward(
        grad.contiguous(), x, lse, o, height, width, num_heads, sr, weights, eps, backend)
    it = iter(res[1:])
    grads = [next(it) if p else None for p in ctx.present]
    return (res[0], None, None, None, None, *grads, None, None, None)


_sr_attention_op, _sr_attention_backward_op = fused_op(
    "sr_attention", _op_forward, _op_forward_fake, _op_backward, _op_backward_fake, _setup_context, _backward
)


# ---------------------------------------------------------------------------------------------
# public API


def _validate_tokens(x, hw, num_heads, sr):
    """The checks on x, hw, num_heads and sr (what a caller owning validated weights still needs)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"sr_attention: x must be a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"sr_attention: x must be floating point, got {x.dtype}")
    if x.ndim != 3:
        raise ValueError(f"sr_attention: x must be (B, N, C), got shape {tuple(x.shape)}")
    if (not isinstance(hw, (tuple, list)) or len(hw) != 2
            or not all(isinstance(s, (int, torch.SymInt)) and not isinstance(s, bool) for s in hw)):
        raise TypeError(f"sr_attention: hw must be a pair of ints (H, W), got {hw!r}")
    b, n, c = x.shape
    if hw[0] < 1 or hw[1] < 1 or hw[0] * hw[1] != n:
        raise ValueError(f"sr_attention: hw={tuple(hw)} does not match N={n} tokens of x {tuple(x.shape)}")
    for name, val in (("num_heads", num_heads), ("sr", sr)):
        if not isinstance(val, (int, torch.SymInt)) or isinstance(val, bool):
            raise TypeError(f"sr_attention: {name} must be an int, got {type(val).__name__}")
    if num_heads < 1 or c % num_heads:
        raise ValueError(f"sr_attention: C={c} is not divisible by num_heads={num_heads}")
    if sr < 1:
        raise ValueError(f"sr_attention: sr must be >= 1, got {sr}")
    if min(reduced_size(tuple(hw), sr)) < 1:
        raise ValueError(f"sr_attention: a {hw[0]}x{hw[1]} map is smaller than one {sr}x{sr} reduction patch")


def _dtype_fits(weight: torch.Tensor, x: torch.Tensor) -> bool:
    """A weight in x's dtype, or an fp32 one with fp16/bf16 x (mixed precision: cast inside the op)."""
    return weight.dtype == x.dtype or (weight.dtype == torch.float32 and x.dtype in (torch.float16, torch.bfloat16))


def _validate(x, hw, num_heads, sr, w, eps):
    _validate_tokens(x, hw, num_heads, sr)
    c = x.shape[2]
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps < 0:
        raise ValueError(f"sr_attention: eps must be a non-negative float, got {eps!r}")
    shapes = {"q_weight": (c, c), "k_weight": (c, c), "v_weight": (c, c), "proj_weight": (c, c),
              "q_bias": (c,), "k_bias": (c,), "v_bias": (c,), "proj_bias": (c,),
              "sr_weight": (c, c, sr, sr), "sr_bias": (c,), "norm_weight": (c,), "norm_bias": (c,)}
    required = {"q_weight", "k_weight", "v_weight", "proj_weight"} | (
        {"sr_weight", "norm_weight", "norm_bias"} if sr > 1 else set())
    for name, t in w.items():
        if t is None:
            if name in required:
                raise ValueError(f"sr_attention: {name} is required" + (f" when sr={sr} > 1" if name in
                                 ("sr_weight", "norm_weight", "norm_bias") else ""))
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"sr_attention: {name} must be a tensor or None, got {type(t).__name__}")
        if tuple(t.shape) != shapes[name]:
            raise ValueError(f"sr_attention: {name} must have shape {shapes[name]}, got {tuple(t.shape)}")
        if not _dtype_fits(t, x) or t.device != x.device:
            raise TypeError(f"sr_attention: {name} is {t.dtype} on {t.device}; x is {x.dtype} on {x.device} "
                            "(weights must be in x's dtype, or fp32 with fp16/bf16 x)")


def sr_attention_inference(x: torch.Tensor, hw: tuple[int, int], num_heads: int, sr: int, weights: dict,
                           eps: float, backend: str) -> torch.Tensor:
    """The forward alone, no autograd, for a caller whose weights are already checked (a module's own).

    Checks x, hw, num_heads, sr and that x matches the weights' dtype and device; ``weights`` maps
    every name of ``_WEIGHT_NAMES`` to its tensor or None; ``backend`` is already validated.
    """
    _validate_tokens(x, hw, num_heads, sr)
    q = weights["q_weight"]
    if not _dtype_fits(q, x) or x.device != q.device:
        raise TypeError(f"sr_attention: x is {x.dtype} on {x.device}; the weights are {q.dtype} on {q.device}")
    return _forward_only(x, hw, num_heads, sr, weights, eps, backend)


def _forward_only(x, hw, num_heads, sr, w, eps, backend) -> torch.Tensor:
    """y without the op dispatcher or autograd (inference), on checked arguments."""
    w = _weights_like(x, [w[k] for k in _WEIGHT_NAMES])
    return SPEC.resolve(backend, x).forward(x.contiguous(), tuple(hw), num_heads, sr, w, float(eps))[0]


def sr_attention(
    x: torch.Tensor,
    hw: tuple[int, int],
    num_heads: int,
    *,
    q_weight: torch.Tensor,
    q_bias: Optional[torch.Tensor],
    k_weight: torch.Tensor,
    k_bias: Optional[torch.Tensor],
    v_weight: torch.Tensor,
    v_bias: Optional[torch.Tensor],
    proj_weight: torch.Tensor,
    proj_bias: Optional[torch.Tensor],
    sr: int = 1,
    sr_weight: Optional[torch.Tensor] = None,
    sr_bias: Optional[torch.Tensor] = None,
    norm_weight: Optional[torch.Tensor] = None,
    norm_bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    backend: str = "auto",
    save_output: bool = True,
) -> torch.Tensor:
    """Fused spatial-reduction attention of a MiT block, output projection included.

    Args:
        x: (B, N, C) normalised tokens, N = H*W, row-major over (H, W).
        hw: (H, W).
        num_heads: h; C % h == 0, head dim d = C / h, scale d**-0.5.
        q_weight, k_weight, v_weight, proj_weight: (C, C) nn.Linear weights; the biases (C,) or None.
        sr: reduction ratio; 1 means plain multi-head attention (no reduction, no LayerNorm).
        sr_weight: (C, C, sr, sr) Conv2d weight, sr_bias (C,) or None; norm_weight, norm_bias (C,)
            and eps: the LayerNorm after the reduction. Needed when sr > 1, ignored when sr == 1.
        backend: "auto", "torch", "triton" or "cuda" (see the module docstring). float64 is computed
            in fp64 by the torch ops ("torch", "auto", and "triton", whose fp32 core falls back to the
            torch core); the "cuda" kernels take float32, float16 and bfloat16 (TypeError otherwise).
        save_output: keep the attention output o (before the projection) for backward: C more values per
            token (C + h + C in all, with x and lse), and the backward skips recomputing o (two of its nine
            (N x M x d) matmuls). False keeps x and lse only.
    Returns:
        (B, N, C): proj(attention(x)), before any dropout. Same dtype as x; the weights are in x's dtype,
        or fp32 with fp16/bf16 x (mixed precision: cast inside the op, fp32 gradients).

    Example:
        >>> m = SpatialReductionAttention(64, 2, sr_ratio=4)
        >>> y = sr_attention(x, (32, 32), 2, sr=4, q_weight=m.q.weight, q_bias=m.q.bias, ...,
        ...                  sr_weight=m.sr.weight, sr_bias=m.sr.bias,
        ...                  norm_weight=m.sr_norm.weight, norm_bias=m.sr_norm.bias)
    """
    w = dict(q_weight=q_weight, q_bias=q_bias, k_weight=k_weight, k_bias=k_bias, v_weight=v_weight, v_bias=v_bias,
             proj_weight=proj_weight, proj_bias=proj_bias, sr_weight=sr_weight, sr_bias=sr_bias,
             norm_weight=norm_weight, norm_bias=norm_bias)
    if sr == 1 and isinstance(sr, int):
        w.update(sr_weight=None, sr_bias=None, norm_weight=None, norm_bias=None)
    _validate(x, hw, num_heads, sr, w, eps)
    backend = validate_backend(backend, check_available=False)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *w.values()))
    if not needs_grad and not torch.compiler.is_compiling():  # inference: skip the op dispatcher's overhead
        return _forward_only(x, hw, num_heads, sr, w, eps, backend)
    y, _, _ = torch.ops.segformer_fast.sr_attention(
        x.contiguous(), *(s if isinstance(s, torch.SymInt) else int(s) for s in hw), num_heads, sr,
        *(w[k] for k in _WEIGHT_NAMES), float(eps), backend, bool(save_output and needs_grad))
    return y
