"""SegFormer's All-MLP decode head as one op: stage GEMMs at each stage's own resolution, one
upsample-and-sum pass, BatchNorm, ReLU, dropout and the classifier, never building the 4D-channel
concatenation or the four upsampled maps.

With the fuse conv's weight W_f (D, 4D) split into D x D blocks W_f,k (block k multiplies concat
slot k; the concat order is c4, c3, c2, c1, so stage i sits in slot n-1-i):

    fuse(concat[Up(L_i c_i)]) = sum_i Up(A_i c_i + a_i),   A_i = W_f,i W_i,  a_i = W_f,i b_i

because bilinear upsampling and 1x1 convs commute and bilinear weights sum to one
(:func:`fold_weights`). Each stage applies its folded (D, C_i) matrix at its own resolution
(channels-last), and the upsample_sum op upsamples and sums at 1/4 resolution.

eval (:func:`all_mlp_decoder_eval`): BatchNorm folded into a per-channel affine applied inside the
same pass, with the ReLU; the classifier is one GEMM on the channels-last result.

train (:func:`all_mlp_decoder_train`): BatchNorm uses the batch statistics of the fused pre-BN map u.
One autograd.Function covers stage GEMMs -> upsample_sum -> BN -> ReLU -> dropout -> classifier and
saves only its inputs (the feature maps and the small folded weights) and the per-channel mean and
invstd: backward recomputes u from the features (BatchNorm's backward needs it) and, from u, the
classifier input d = dropout(relu(bn(u))) with the same arithmetic and, for dropout, the forward's
generator state restored, so d and its masks are the forward's own. Gradients of the folded weights,
dA_i = dz_i^T c_i and da_i = sum dz_i, flow through autograd to W_f,i and W_i, b_i.

Distributed: with a process group, the batch statistics are the global batch's, as nn.SyncBatchNorm
computes them (ops/math_utils.py), and backward all-reduces sum(g) and sum(g * xhat); the BN affine
gradients stay local (DDP averages them). This op stays an autograd.Function, not a custom op: a
process group is not a custom-op argument type on the torch versions supported.

Implementations of the training glue (BN statistics, BN affine + ReLU + dropout and their backward;
the GEMMs are cuBLAS and upsample_sum has its own backend in both):

- "torch": ATen passes (fp32 copies of u); dropout by torch, its generator state kept and restored
  for backward (under torch.compile the 1-byte mask is kept instead).
- "triton" (triton_kernels.py, auto's choice on CUDA): up to 256 classes the classifier is a Triton
  GEMM whose prologue computes d from u (d never stored), in forward and in both backward passes
  (g = dL/dd recomputed per tile; pass 1 also sums dWc and dbc), and unless another upsample_sum
  backend is named, u itself is gathered from the stage maps (the finest stage from its features,
  StageOne) by each of these kernels and by the statistics kernel: u is never stored, forward or
  backward. There the other maps are A_i c_i alone (batched GEMMs on the NCHW features, no NHWC
  copy; every stage's bias is added once, with the finest stage's, since each output pixel's
  bilinear weights sum to one), and pass 2 also sums the finest stage's dA_1 = sum dL/du^T c_1.
  Otherwise: one read of u for the statistics, one pass for d and a cuBLAS GEMM; backward
  one reduction pass (which also writes d for the classifier's weight gradient) and one
  elementwise pass. The dropout mask is Philox in the kernels from a seed drawn from
  torch's default (CPU) generator, so torch.manual_seed reproduces a run and backward regenerates
  the mask from the seed; its draws are not torch.nn.functional.dropout's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ...dispatch import Impl, OpSpec, register
from ...utils.distributed import all_reduce_sum, sync_batch_stats
from ..cost import next_pow2
from ..math_utils import batch_norm_affine, batch_norm_backward, batch_stats, unbiased_var
from ..upsample_sum.op import upsample_sum_nhwc

__all__ = ["fold_weights", "all_mlp_decoder_eval", "all_mlp_decoder_train", "SPEC", "MAX_CLASSES", "MAX_STAGE_ONE_CHANNELS",
           "class_blocks"]


def _stage(c: torch.Tensor, A: torch.Tensor, a: torch.Tensor | None) -> torch.Tensor:
    """(B, C, h, w) features -> (B, h, w, D) = A c + a per pixel, channels-last."""
    B, C, h, w = c.shape
    x = c.permute(0, 2, 3, 1).reshape(B * h * w, C)
    z = torch.addmm(a.to(x.dtype), x, A.t().to(x.dtype)) if a is not None else x @ A.t().to(x.dtype)
    return z.view(B, h, w, A.shape[0])


def _stage_map(c: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) features -> (B, h, w, D) = A c per pixel, no bias, channels-last, by a batched GEMM on the
    (B, h*w, C) view of the features (NCHW or channels-last memory alike: a strided operand cuBLAS takes as it is,
    no NHWC copy)."""
    B, C, h, w = c.shape
    D = A.shape[0]
    x = c.reshape(B, C, h * w).transpose(1, 2)  # a view of contiguous NCHW (or channels-last) memory
    return torch.bmm(x, A.t().to(c.dtype).expand(B, C, D)).view(B, h, w, D)


def _float(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


@dataclass(frozen=True)
class _TrainCfg:
    n: int
    size: tuple[int, int]
    eps: float
    p: float
    dropout2d: bool
    backend: str
    group: object  # process group for SyncBatchNorm semantics, or None
    glue: str = "torch"  # the implementation of BN / ReLU / dropout: "torch" or "triton"


MAX_STAGE_ONE_CHANNELS = 128  # the gathering kernels' finest-stage features: one (C1, BLOCK_D) block of A per tile
MAX_CLASSES = 256  # the fused classifier's two class blocks cover at most 128 + 128 classes


def class_blocks(K: int) -> tuple[int, int]:
    """(BLOCK_N1, BLOCK_N2) of the fused classifier: the largest power of two <= K (16 to 128) and a power of two
    (0, or 16 to 128) for the rest, so that K = 150 computes 128 + 32 lanes.

    Example:
        >>> class_blocks(150), class_blocks(19), class_blocks(16)
        ((128, 32), (16, 16), (16, 0))
    """
    if not 1 <= K <= MAX_CLASSES:
        raise ValueError(f"fused classifier: K={K} classes, it takes 1 to {MAX_CLASSES}")
    n1 = min(128, max(16, 1 << (K.bit_length() - 1)))
    rest = K - n1
    return n1, 0 if rest <= 0 else max(16, next_pow2(rest))


def _rng_state(device: torch.device):
    """The generator state dropout will draw from on ``device`` (CPU or CUDA)."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _relu_dropout(u2: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, cfg: _TrainCfg, shape) -> torch.Tensor:
    """d = dropout(relu(scale * u + shift)), in place on u2 (B*H*W, D), in u2's dtype.

    Run once in forward and again in backward on the recomputed u, with the generator state of the
    forward restored: the same arithmetic and the same draws give the same d and the same mask.
    """
    B, H, W, D = shape
    d = u2.mul_(scale.to(u2.dtype)).add_(shift.to(u2.dtype)).relu_()
    if cfg.p > 0:
        if cfg.dropout2d:
            F.dropout2d(d.view(B, H, W, D).permute(0, 3, 1, 2), cfg.p, training=True, inplace=True)
        else:
            F.dropout(d, cfg.p, training=True, inplace=True)
    return d


class _DecoderTrainFunction(torch.autograd.Function):
    """features, folded weights, BN affine, classifier -> (logits (B, K, H, W), batch mean, unbiased var)."""

    @staticmethod
    def forward(ctx, cfg: _TrainCfg, *tensors):
        n = cfg.n
        feats, A, a = tensors[:n], tensors[n : 2 * n], tensors[2 * n : 3 * n]
        gamma, beta, wc, bc = tensors[3 * n : 3 * n + 4]
        H, W = cfg.size
        B, D, K = feats[0].shape[0], A[0].shape[0], wc.shape[0]
        if cfg.glue == "triton" and _gathers(cfg, K):  # u never stored: both kernels gather it
            return _triton_forward(ctx, cfg, _gather_source(feats, A, a), feats, A, a, gamma, beta, wc, bc,
                                   (B, H, W, D, K))
        z = [_stage(c, Ai, ai) for c, Ai, ai in zip(feats, A, a)]
        u = torch.ops.segformer_fast.upsample_sum(z, H, W, None, None, False, cfg.backend)  # (B, H, W, D)
        del z
        u2 = u.view(-1, D)
        if cfg.glue == "triton":
            return _triton_forward(ctx, cfg, u2, feats, A, a, gamma, beta, wc, bc, (B, H, W, D, K))
        # fp32 statistics from the 16-bit u: its squares overflow fp16 once |u| passes 256
        mean, var, count = batch_stats(u2.float(), 0, cfg.group)
        if count <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {(B, D, H, W)}")
        invstd = torch.rsqrt(var + cfg.eps)
        scale, shift = batch_norm_affine(_float(gamma), _float(beta), mean, invstd)
        # a compiled graph cannot capture the generator state: there the dropout mask is kept instead (1 byte
        # per value); eager keeps the state and redraws the same mask in backward
        keep_mask = cfg.p > 0 and torch.compiler.is_compiling()
        ctx.rng = _rng_state(u2.device) if cfg.p > 0 and not keep_mask else None
        d = _relu_dropout(u2, scale, shift, cfg, (B, H, W, D))  # in place: u is not kept
        kept = d != 0 if keep_mask else None
        logits = torch.addmm(bc, d, wc.t()) if bc is not None else d @ wc.t()  # (B*H*W, K)
        ctx.cfg, ctx.count = cfg, count
        # d is not kept either: backward recomputes u for BatchNorm's backward anyway, and d from it
        ctx.save_for_backward(*feats, *A, *a, gamma, beta, wc, mean, invstd, kept)
        var_unbiased = unbiased_var(var, count)
        ctx.mark_non_differentiable(mean, var_unbiased)
        return logits.view(B, H, W, K).permute(0, 3, 1, 2), mean, var_unbiased

    @staticmethod
    def backward(ctx, grad_logits, _grad_mean, _grad_var):
        cfg, n = ctx.cfg, ctx.cfg.n
        saved = ctx.saved_tensors
        feats, A, a = saved[:n], saved[n : 2 * n], saved[2 * n : 3 * n]
        gamma, beta, wc, mean, invstd, kept = saved[3 * n :]
        needs = ctx.needs_input_grad[1:]  # one per tensor input
        H, W = cfg.size
        B, D, K = feats[0].shape[0], A[0].shape[0], wc.shape[0]
        if cfg.glue == "triton" and _gathers(cfg, K):  # u gathered in both passes, never stored
            u2 = _gather_source(feats, A, a)
        else:
            z = [_stage(c, Ai, ai) for c, Ai, ai in zip(feats, A, a)]
            u2 = torch.ops.segformer_fast.upsample_sum(z, H, W, None, None, False, cfg.backend).view(-1, D)
            del z
        gA1 = None  # dA_1 where the fused pass 2 computed it
        if cfg.glue == "triton":
            gu, dgamma, dbeta, dwc, dbc, gu_sum, gA1 = _triton_backward(
                ctx, u2, grad_logits, gamma, beta, wc, mean, invstd, needs[3 * n : 3 * n + 4], (B, H, W, D, K),
                stage_one_grad=needs[n])
        else:
            gu, dgamma, dbeta, dwc, dbc = _torch_backward(ctx, u2, grad_logits, gamma, beta, wc, mean, invstd, kept,
                                                          needs[3 * n : 3 * n + 4], (B, H, W, D, K))
            gu_sum = None
        gu = gu.to(feats[0].dtype).view(B, H, W, D)
        sizes = [s for c in feats for s in (c.shape[2], c.shape[3])]
        # Every stage's bias gradient is sum(dL/du): the upsampling adjoint keeps a gradient's total (the bilinear
        # weights of each output pixel sum to one), so sum(gz_i) = sum(gu) for all i. The fused Triton pass 2 sums
        # gu as it writes it; else one sum of gu serves all stages.
        if gu_sum is None and any(needs[2 * n : 3 * n]):
            gu_sum = gu.view(-1, D).sum(0, dtype=torch.float32)
        # the finest stage is at (H, W): its map's gradient is gu itself (the adjoint of a same-size bilinear resize is
        # the identity), so the adjoint runs for the coarser maps only
        gz = [gu]
        if n > 1:
            gz += torch.ops.segformer_fast.upsample_sum_backward(gu, sizes[2:], [], None, None, False, False, False,
                                                                 cfg.backend)
        del gu
        grad_feats, grad_A, grad_a = [], [], []
        for i, (c, Ai) in enumerate(zip(feats, A)):
            C = c.shape[1]
            gz2 = gz[i].reshape(-1, D)  # (B*h*w, D)
            if needs[i]:
                gc = (gz2 @ Ai.to(gz2.dtype)).view(B, c.shape[2], c.shape[3], C).permute(0, 3, 1, 2)
                grad_feats.append(gc.to(c.dtype))
            else:
                grad_feats.append(None)
            if i == 0 and gA1 is not None:
                grad_A.append(gA1.to(Ai.dtype))
            elif needs[n + i]:  # sum over images of c_b (C, h*w) gz_b (h*w, D): the NCHW features, no NHWC copy
                gA = torch.bmm(c.reshape(B, C, -1).to(gz2.dtype), gz[i].reshape(B, -1, D))
                grad_A.append(gA.sum(0, dtype=torch.float32).t().to(Ai.dtype))
            else:
                grad_A.append(None)
            grad_a.append(gu_sum.to(Ai.dtype) if needs[2 * n + i] else None)
        return (None, *grad_feats, *grad_A, *grad_a, dgamma, dbeta, dwc, dbc)


def _torch_backward(ctx, u2, grad_logits, gamma, beta, wc, mean, invstd, kept, needs, shape):
    """The glue's backward in ATen passes: (dL/du (N, D) fp32, dgamma, dbeta, dWc, dbc)."""
    cfg = ctx.cfg
    B, H, W, D, K = shape
    xhat = u2.to(torch.float32, copy=True).sub_(mean).mul_(invstd)  # (B*H*W, D) fp32; u2 is reused below
    scale, shift = batch_norm_affine(_float(gamma), _float(beta), mean, invstd)
    scale_drop = 1.0 / (1.0 - cfg.p) if 0 < cfg.p < 1 else 1.0
    if kept is not None:  # compiled: relu(bn(u)) with the kept dropout mask and scale
        d = _relu_dropout(u2, scale, shift, replace(cfg, p=0.0), (B, H, W, D))
        d = d.mul_(scale_drop).masked_fill_(~kept, 0.0)
    elif ctx.rng is None:
        d = _relu_dropout(u2, scale, shift, cfg, (B, H, W, D))
    else:
        on_cuda = u2.device.type == "cuda"
        with torch.random.fork_rng(devices=[u2.device] if on_cuda else []):  # the caller's RNG is left as it was
            torch.cuda.set_rng_state(ctx.rng, u2.device) if on_cuda else torch.set_rng_state(ctx.rng)
            d = _relu_dropout(u2, scale, shift, cfg, (B, H, W, D))  # the forward's d, mask included
    gl = grad_logits.permute(0, 2, 3, 1).reshape(-1, K).to(d.dtype)  # (B*H*W, K)
    dwc = gl.t() @ d if needs[2] else None
    dbc = gl.sum(0) if needs[3] else None
    # dropout and ReLU: d > 0 exactly where the ReLU passed and dropout kept.
    g = (gl @ wc.to(d.dtype)).mul_(scale_drop).masked_fill_(d <= 0, 0.0).float()  # (B*H*W, D)
    del d, u2
    gscale = invstd if gamma is None else gamma.float() * invstd
    # BN backward: dL/du = gamma * invstd * (g - mean(g) - xhat * mean(g * xhat)), in place on g.
    gu, dgamma, dbeta = batch_norm_backward(g, xhat, gscale, ctx.count, 0, cfg.group)
    return gu, dgamma if needs[0] else None, dbeta if needs[1] else None, dwc, dbc


def _draw_seed() -> int:
    """The dropout kernels' Philox seed, from torch's default (CPU) generator: torch.manual_seed reproduces
    it, and no device synchronisation is needed to read it."""
    return int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64).item())


def _gather_source(feats, A, a) -> list:
    """What the gathering kernels read: the finest stage as its features (its map z_1 = A_1 c_1 + a_1 computed in the
    kernels, never stored) where it has at most MAX_STAGE_ONE_CHANNELS channels, and the other stages' maps."""
    from .triton_kernels import MAX_STAGE_ONE_CHANNELS, StageOne

    if len(feats) > 1 and feats[0].shape[1] <= MAX_STAGE_ONE_CHANNELS:
        # every stage's bias enters u once (each output pixel's bilinear weights sum to one): all of them are added
        # with the finest stage's, and the other maps are A_i c_i alone, batched GEMMs on the NCHW features
        biases = [ai for ai in a if ai is not None]
        ab = sum(biases) if biases else None
        first = [StageOne(feats[0].contiguous(), A[0], ab)]
        return first + [_stage_map(c, Ai) for c, Ai in zip(feats[1:], A[1:])]
    return [_stage(c, Ai, ai) for c, Ai, ai in zip(feats, A, a)]


def _gathers(cfg: _TrainCfg, K: int) -> bool:
    """Whether the Triton glue gathers u from the stage maps in its kernels (forward: the statistics, then the
    classifier with u and d computed in its prologue; backward: both passes, so every pass sees the same u, bit
    for bit) instead of running the upsample_sum op forward: where upsample_sum's backend is "auto" or "triton"
    (the gather is the Triton kernel's; another backend asked for by name runs as asked) and the classifier fits
    the fused kernels (K <= MAX_CLASSES). u is then never stored."""
    return K <= MAX_CLASSES and cfg.backend in ("auto", "triton") and cfg.n <= 4


def _triton_forward(ctx, cfg, u, feats, A, a, gamma, beta, wc, bc, shape):
    """The forward after the stage maps in the Triton kernels. ``u``: the list of stage maps (u gathered from them
    by the statistics kernel and the classifier's prologue, never stored), or u itself (N, D) (one read for the
    statistics, then the classifier with d computed in its prologue, or past MAX_CLASSES a pass for d and cuBLAS)."""
    from .triton_kernels import (bn_relu_dropout_fwd_triton, bn_relu_dropout_linear_triton, bn_stats_gather_triton,
                                 bn_stats_triton)

    B, H, W, D, K = shape
    mean, var = bn_stats_gather_triton(u, H, W) if isinstance(u, list) else bn_stats_triton(u)
    count = B * H * W
    if cfg.group is not None:
        mean, var, count = sync_batch_stats(mean, var, count, cfg.group)
    if count <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {(B, D, H, W)}")
    invstd = torch.rsqrt(var + cfg.eps)
    scale, shift = batch_norm_affine(_float(gamma), _float(beta), mean, invstd)
    seed = _draw_seed() if cfg.p > 0 else 0
    if K <= MAX_CLASSES:  # d never stored: the classifier's prologue computes it from u
        logits = bn_relu_dropout_linear_triton(u, H, W, scale, shift, wc, bc, cfg.p, seed, cfg.dropout2d)
    else:
        u2 = u.view(-1, D)
        d = bn_relu_dropout_fwd_triton(u2, scale, shift, cfg.p, seed, H * W, cfg.dropout2d, out=u2)  # u is not kept
        logits = torch.addmm(bc, d, wc.t()) if bc is not None else d @ wc.t()  # (B*H*W, K)
    ctx.cfg, ctx.count, ctx.seed, ctx.rng = cfg, count, seed, None
    ctx.save_for_backward(*feats, *A, *a, gamma, beta, wc, mean, invstd, None)
    var_unbiased = unbiased_var(var, count)
    ctx.mark_non_differentiable(mean, var_unbiased)
    return logits.view(B, H, W, K).permute(0, 3, 1, 2), mean, var_unbiased


def _triton_backward(ctx, u2, grad_logits, gamma, beta, wc, mean, invstd, needs, shape, stage_one_grad=False):
    """The glue's backward in two Triton passes over the recomputed u (N, D), or over u gathered from the stage
    maps ``u2`` (a list; the fused classifier only): (dL/du (N, D) in u's dtype, dgamma, dbeta, dWc, dbc,
    sum(dL/du) (D,) fp32 where the fused pass 2 summed it, else None, and the finest stage's dA_1 (D, C1) fp32 where
    ``stage_one_grad`` asked for it and pass 2 gathered that stage from its features (StageOne), else None)."""
    from .triton_kernels import (bn_relu_dropout_bwd_linear_triton, bn_relu_dropout_bwd_reduce_linear_triton,
                                 bn_relu_dropout_bwd_reduce_triton, bn_relu_dropout_bwd_triton)

    cfg = ctx.cfg
    B, H, W, D, K = shape
    scale, shift = batch_norm_affine(_float(gamma), _float(beta), mean, invstd)
    dt = u2[-1].dtype if isinstance(u2, list) else u2.dtype
    gl = grad_logits.permute(0, 2, 3, 1).reshape(-1, K).to(dt)  # (B*H*W, K)
    args = (cfg.p, ctx.seed, H * W, cfg.dropout2d)
    gscale = invstd if gamma is None else gamma.float() * invstd
    if K <= MAX_CLASSES:  # g = gl Wc and d computed per tile in both passes, never stored
        gl, fused_args = gl.contiguous(), (cfg.p, ctx.seed, cfg.dropout2d)
        sum_g, sum_gx, dwc, dbc = bn_relu_dropout_bwd_reduce_linear_triton(u2, H, W, gl, wc, mean, invstd, scale,
                                                                           shift, *fused_args)
        dgamma, dbeta = sum_gx, sum_g  # this rank's: DDP averages them
        if cfg.group is not None:
            sum_g, sum_gx = all_reduce_sum([sum_g, sum_gx], cfg.group)
        gu, gu_sum, gA1 = bn_relu_dropout_bwd_linear_triton(u2, H, W, gl, wc, mean, invstd, scale, shift, gscale,
                                                            sum_g, sum_gx, ctx.count, *fused_args,
                                                            stage_one_grad=stage_one_grad)
        return (gu, dgamma if needs[0] else None, dbeta if needs[1] else None, dwc.to(wc.dtype) if needs[2] else None,
                dbc.to(wc.dtype) if needs[3] else None, gu_sum, gA1)
    g = gl @ wc.to(u2.dtype)  # (B*H*W, D) dL/dd
    # pass 1: sum(gy), sum(gy * xhat) and the forward's d again (for dWc), one read of u and g
    d, sum_g, sum_gx = bn_relu_dropout_bwd_reduce_triton(u2, g, mean, invstd, scale, shift, *args)
    dwc = gl.t() @ d if needs[2] else None
    dbc = gl.sum(0) if needs[3] else None
    del d
    dgamma, dbeta = sum_gx, sum_g  # this rank's: DDP averages them
    if cfg.group is not None:
        sum_g, sum_gx = all_reduce_sum([sum_g, sum_gx], cfg.group)
    # pass 2: dL/du, in place on g
    gu = bn_relu_dropout_bwd_triton(u2, g, mean, invstd, scale, shift, gscale, sum_g, sum_gx, ctx.count, *args, out=g)
    return gu, dgamma if needs[0] else None, dbeta if needs[1] else None, dwc, dbc, None, None


def _triton_condition(x: torch.Tensor, facts: dict) -> str | None:
    if facts.get("compiling"):
        return "under torch.compile the torch glue runs (it keeps the dropout mask a graph can hold)"
    if facts.get("p", 0.0) >= 1.0:
        return f"dropout p={facts['p']} drops everything; the kernels take p < 1"
    return None


SPEC = register(OpSpec("all_mlp_decoder", [
    Impl("torch", _DecoderTrainFunction.apply, _DecoderTrainFunction.backward,
         note="PyTorch GEMMs around the upsample_sum op (its own backend); training in an autograd.Function "
              "keeping the classifier input only"),
    Impl("triton", _DecoderTrainFunction.apply, _DecoderTrainFunction.backward,
         dtypes=(torch.float32, torch.float16, torch.bfloat16), conditions=(_triton_condition,), fallback="torch",
         note="the BatchNorm statistics, BN + ReLU + dropout and their backward in Triton kernels "
              "(triton_kernels.py); GEMMs cuBLAS, upsample_sum its own backend"),
], prefer={"cuda": ("triton", "torch")}))


def fold_weights(fuse_weight: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None]
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """A_i = W_f,i W_i (D, C_i) and a_i = W_f,i b_i (D,), differentiable.

    Args:
        fuse_weight: the fuse conv's (D, n*D[, 1, 1]) weight; slot k of the concat is stage n-1-k.
        weights, biases: the stages' Linear(C_i, D) weights (D, C_i) and biases (D,) or None, finest first.
    """
    n = len(weights)
    D = weights[0].shape[0]
    wf = fuse_weight.reshape(D, n * D)
    A, a = [], []
    for i, (w, b) in enumerate(zip(weights, biases)):
        k = n - 1 - i  # concat order c4, c3, c2, c1
        wfi = wf[:, k * D : (k + 1) * D]
        A.append(wfi @ w)
        a.append(wfi @ b if b is not None else None)
    return A, a


def all_mlp_decoder_eval(features: Sequence[torch.Tensor], A: Sequence[torch.Tensor], a: Sequence[torch.Tensor | None],
                         scale: torch.Tensor, shift: torch.Tensor, cls_weight: torch.Tensor,
                         cls_bias: torch.Tensor | None, backend: str = "auto") -> torch.Tensor:
    """Eval decoder: features (B, C_i, H_i, W_i), finest first; folded weights A_i, a_i; the BatchNorm
    affine (D,) scale/shift; classifier (K, D), (K,). Returns (B, K, H_1, W_1), channels-last memory."""
    if not torch.compiler.is_compiling():  # the dispatcher's first lookup imports; never inside tracing
        SPEC.resolve("torch", features[0])  # recorded for explain(): BatchNorm is folded into upsample_sum's pass
    H, W = features[0].shape[-2:]  # ints, or symbolic under torch.export
    z = [_stage(c, Ai, ai) for c, Ai, ai in zip(features, A, a)]
    y = upsample_sum_nhwc(z, (H, W), scale, shift, relu=True, backend=backend)  # (B, H, W, D)
    return F.linear(y, cls_weight, cls_bias).permute(0, 3, 1, 2)  # (B, K, H, W)


def all_mlp_decoder_train(features: Sequence[torch.Tensor], A: Sequence[torch.Tensor],
                          a: Sequence[torch.Tensor | None], bn_weight: torch.Tensor | None,
                          bn_bias: torch.Tensor | None, cls_weight: torch.Tensor, cls_bias: torch.Tensor | None, *,
                          eps: float, p: float = 0.0, dropout2d: bool = False, backend: str = "auto",
                          group=None, glue: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training decoder with batch statistics: returns (logits (B, K, H_1, W_1), the batch mean (D,),
    the unbiased batch variance (D,)); the caller updates its running statistics from the last two.

    Args:
        features, A, a: as :func:`all_mlp_decoder_eval`. bn_weight, bn_bias: the BatchNorm affine (D,).
        cls_weight, cls_bias: the classifier (K, D), (K,). eps: BatchNorm's. p, dropout2d: the dropout
        before the classifier. backend: upsample_sum's, and the glue's (BatchNorm, ReLU, dropout) where
        it names one of this op's implementations ("torch", "triton"); else ("cpp", "cuda") the glue is
        auto's choice (Triton on CUDA, torch on the CPU). group: a process group for SyncBatchNorm
        semantics, or None. glue: the glue's implementation ("auto", "torch", "triton") when it should
        differ from ``backend``'s (None: as above).
    """
    if glue is None:
        glue = backend if backend in SPEC.impls else "auto"
    if torch.compiler.is_compiling():  # the torch glue (what resolve picks when compiling), looked up without
        impl = SPEC.impls["torch"]      # the dispatcher, whose first lookup imports modules
    else:
        impl = SPEC.resolve(glue, features[0], compiling=False, p=float(p))
    cfg = _TrainCfg(n=len(features), size=tuple(features[0].shape[-2:]), eps=eps,
                    p=float(p), dropout2d=dropout2d, backend=backend, group=group, glue=impl.backend)
    return impl.forward(cfg, *features, *A, *a, bn_weight, bn_bias, cls_weight, cls_bias)
