"""Conv-BN-ReLU (-> 1x1 classifier) -> bilinear upsample, fused where it pays.

Three rewrites of :func:`conv_bn_relu_up_reference`, each exact up to rounding:

1. Eval: BatchNorm with running statistics is affine per channel, so it folds into the conv,
       W' = W * g / sqrt(var + eps),  b' = beta - mean * g / sqrt(var + eps),
   and the stage is one conv with bias, an in-place ReLU and the upsample.
2. Classifier before the upsample: bilinear upsampling mixes pixels with weights that sum to 1 and
   acts on every channel alike; a 1x1 conv mixes channels at each pixel alike. They commute, so
       Conv1x1(Up(z)) = Up(Conv1x1(z)),
   and the classifier runs at the low resolution on C_out channels instead of at s^2 times the
   pixels; the (B, C_out, sH, sW) map never exists. (For SETR-PUP at 512 the last stage's
   256-channel 512x512 map is 268 MB per image.)
3. Training: the autograd function keeps only the stage input x and the per-channel batch
   statistics; backward recomputes y = conv(x), z and the ReLU mask, then runs BatchNorm's and
   the conv's backward. The reference keeps x, y and z (and the classifier's input at the high
   resolution). The upsample after the function keeps nothing (bilinear backward needs no input).
   Running statistics are updated outside the function from the batch statistics, as BatchNorm
   does (unbiased variance, ``momentum``).

All of it is PyTorch ops (implementation "torch"): the stage is conv-bound, and the win is the
work and memory the rewrites remove, not a new kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...dispatch import Impl, OpSpec, register
from ..math_utils import batch_norm_backward, batch_norm_fold, batch_stats, unbiased_var, update_running_stats

__all__ = ["conv_bn_relu_up", "IMPLEMENTED", "SPEC"]


def _synced_batch_norm(y, bn_weight, bn_bias, eps, group):
    """BatchNorm of y with the batch statistics of every rank in ``group``: (z, mean, invstd, count)."""
    acc = torch.promote_types(y.dtype, torch.float32)  # statistics in fp32 at least
    mean, var, count = batch_stats(y.transpose(0, 1).reshape(y.shape[1], -1).to(acc), 1, group)
    invstd = torch.rsqrt(var + eps)
    shape = (1, -1, 1, 1)
    z = (y - mean.to(y.dtype).view(shape)) * (invstd * bn_weight.to(acc)).to(y.dtype).view(shape) \
        + bn_bias.to(y.dtype).view(shape)
    return z, mean, invstd, count


class _ConvBNReLUFunction(torch.autograd.Function):
    """(x, W, gamma, beta[, W_cls, b_cls]) -> ReLU(BN_batch(conv(x))) [-> 1x1 conv], keeping x only.

    Also returns the batch mean, invstd and the values per channel behind them (all ranks' with a
    process group: SyncBatchNorm semantics, the input gradient's BN reductions all-reduced too).
    """

    @staticmethod
    def forward(ctx, x, weight, bn_weight, bn_bias, eps, cls_weight, cls_bias, group):
        pad = weight.shape[-1] // 2
        y = F.conv2d(x, weight, None, padding=pad)  # (B, C_out, H, W)
        if group is None:
            z, mean, invstd = torch.native_batch_norm(y, bn_weight, bn_bias, None, None, True, 0.0, eps)
            count = y.numel() // y.shape[1]
        else:
            z, mean, invstd, count = _synced_batch_norm(y, bn_weight, bn_bias, eps, group)
        del y
        z = z.relu_()
        out = z if cls_weight is None else F.conv2d(z, cls_weight, cls_bias)
        ctx.save_for_backward(x, weight, bn_weight, bn_bias, mean, invstd, cls_weight)
        ctx.eps, ctx.pad, ctx.has_cls_bias, ctx.group, ctx.count = eps, pad, cls_bias is not None, group, count
        ctx.mark_non_differentiable(mean, invstd)
        return out, mean, invstd, count

    @staticmethod
    def backward(ctx, dout, _dmean, _dinvstd, _dcount):
        x, weight, bn_weight, bn_bias, mean, invstd, cls_weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        y = F.conv2d(x, weight, None, padding=ctx.pad)  # recomputed
        shape = (1, -1, 1, 1)
        # in y's dtype (fp16/bf16 under autocast, while the BN affine and statistics stay fp32)
        z = ((y - mean.view(shape)) * (invstd * bn_weight).view(shape) + bn_bias.view(shape)).to(y.dtype)
        gcw = gcb = None
        if cls_weight is not None:
            if need[5]:
                gcw = torch.einsum("bkhw,bchw->kc", dout, z.clamp(min=0))[:, :, None, None]
            if need[6] and ctx.has_cls_bias:
                gcb = dout.sum((0, 2, 3))
            dz = F.conv_transpose2d(dout, cls_weight)  # (B, C_out, H, W)
        else:
            dz = dout.contiguous()
        # ReLU's own backward: 0 where z <= 0 even for a NaN/inf dz (not dz * (z > 0)), and dz's memory format kept
        # (masked_fill would return NCHW for channels-last dz, changing the conv backward's algorithm)
        dz = torch.ops.aten.threshold_backward(dz, z, 0)
        del z
        if ctx.group is None:
            dy, gg, gb = torch.ops.aten.native_batch_norm_backward(
                dz, y, bn_weight, None, None, mean, invstd, True, ctx.eps, [True, need[2], need[3]])
        else:  # SyncBatchNorm's backward: this rank's sums give gamma/beta; the input needs the global ones
            acc = torch.promote_types(y.dtype, torch.float32)  # the reductions in fp32 at least
            xhat = (y.to(acc) - mean.view(shape)) * invstd.view(shape)
            dy, gg, gb = batch_norm_backward(dz.to(acc), xhat, (bn_weight * invstd).to(acc), ctx.count, (0, 2, 3),
                                             ctx.group)
            dy, gg, gb = dy.to(y.dtype), gg.to(bn_weight.dtype), gb.to(bn_weight.dtype)
            del xhat
        del dz
        dx, dw, _ = torch.ops.aten.convolution_backward(
            dy, x, weight, None, [1, 1], [ctx.pad, ctx.pad], [1, 1], False, [0, 0], 1, [need[0], need[1], False])
        return dx, dw, gg if need[2] else None, gb if need[3] else None, None, gcw, gcb, None


def _folded(weight, bn_weight, bn_bias, running_mean, running_var, eps):
    # folded in fp32 at least, then in the conv's dtype (fp16/bf16 weights under autocast, fp32 BN)
    scale, shift = batch_norm_fold(bn_weight, bn_bias, running_mean, running_var, eps)  # (C_out,)
    acc = torch.promote_types(torch.promote_types(weight.dtype, scale.dtype), torch.float32)
    return (weight.to(acc) * scale.view(-1, 1, 1, 1)).to(weight.dtype), shift.to(weight.dtype)


SPEC = register(OpSpec("conv_bn_relu_up", [
    Impl("torch", _ConvBNReLUFunction.apply, _ConvBNReLUFunction.backward,
         note="PyTorch ops: BatchNorm folded in eval; in training an autograd.Function keeping x only; no backend argument"),
]))
IMPLEMENTED = tuple(SPEC.impls)


def conv_bn_relu_up(
    x: torch.Tensor,
    weight: torch.Tensor,
    bn_weight: torch.Tensor,
    bn_bias: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    *,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    scale: int = 1,
    cls_weight: torch.Tensor | None = None,
    cls_bias: torch.Tensor | None = None,
    num_batches_tracked: torch.Tensor | None = None,
    group=None,
) -> torch.Tensor:
    """The fused stage; same arguments and result as :func:`conv_bn_relu_up_reference`.

    Args:
        x: (B, C_in, H, W). weight: (C_out, C_in, k, k), k odd, no bias. bn_*: (C_out,).
        running_mean, running_var: (C_out,) BatchNorm buffers (updated in place in training; may
            be None in training only). training: batch statistics (True) or running ones (False).
        scale: integer bilinear upsampling factor (1: none).
        cls_weight: optional (K, C_out, 1, 1) classifier and cls_bias (K,), applied before the
            upsample (rewrite 2). num_batches_tracked: BatchNorm's counter, incremented in training.
        group: a torch.distributed process group: batch statistics over all its ranks, as
            nn.SyncBatchNorm (works on CPU with gloo too); None: this process's batch only.
    Returns:
        (B, C_out or K, H*scale, W*scale).

    Example:
        >>> bn = torch.nn.BatchNorm2d(8).eval()
        >>> w = torch.randn(8, 4, 3, 3)
        >>> y = conv_bn_relu_up(torch.randn(1, 4, 5, 7), w, bn.weight, bn.bias, bn.running_mean,
        ...                     bn.running_var, training=False, scale=2)   # (1, 8, 10, 14)
    """
    if x.ndim != 4 or weight.ndim != 4 or x.shape[1] != weight.shape[1] or weight.shape[-1] % 2 == 0:
        raise ValueError(f"conv_bn_relu_up: x {tuple(x.shape)} and weight {tuple(weight.shape)} do not fit "
                         "(need (B, C_in, H, W) and (C_out, C_in, k, k) with k odd)")
    if cls_weight is not None and tuple(cls_weight.shape[1:]) != (weight.shape[0], 1, 1):
        raise ValueError(f"conv_bn_relu_up: cls_weight must be (K, {weight.shape[0]}, 1, 1), got {tuple(cls_weight.shape)}")
    impl = SPEC.resolve("auto", x)
    if training:
        out, mean, invstd, n = impl.forward(x, weight, bn_weight, bn_bias, eps, cls_weight, cls_bias, group)
        if running_mean is not None:
            var = unbiased_var(invstd.double().pow(-2) - eps, n)  # the batch variance, back from invstd
            update_running_stats(running_mean, running_var, mean, var, momentum, num_batches_tracked)
    else:
        w, b = _folded(weight, bn_weight, bn_bias, running_mean, running_var, eps)
        out = F.conv2d(x, w, b, padding=weight.shape[-1] // 2).relu_()
        if cls_weight is not None:
            out = F.conv2d(out, cls_weight, cls_bias)
    if cls_weight is not None:  # logits: upsampled from (and so returned in) the usual NCHW layout; a
        out = out.contiguous()  # copy of K channels at the low resolution, the upsample is as fast in NCHW
    if scale > 1:
        out = F.interpolate(out, scale_factor=scale, mode="bilinear", align_corners=False)
    return out
