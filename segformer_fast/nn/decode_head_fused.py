"""SegFormer's All-MLP decode head, fused: the same function as AllMLPDecoder, a fraction of the work.

With the fuse conv's weight W_f (D, 4D) split into D x D blocks W_f,k (block k multiplies concat
slot k; the concat order is c4, c3, c2, c1, so stage i sits in slot n-1-i):

    fuse(concat[Up(L_i c_i)]) = sum_i Up(A_i c_i + a_i),   A_i = W_f,i W_i,  a_i = W_f,i b_i

because bilinear upsampling and 1x1 convs commute and bilinear weights sum to one. So each stage
applies its folded (D, C_i) matrix at its own resolution (z_i, channels-last), and one op,
segformer_fast.ops.upsample_sum, upsamples and sums the z_i at 1/4 resolution. The concatenated
4D-channel map and the four upsampled D-channel maps never exist.

eval: BatchNorm is folded into a per-channel affine applied inside the same pass, with the ReLU;
dropout is the identity; the classifier is one GEMM on the channels-last result. Without autograd
the folded weights are cached until a parameter or buffer changes.

train: BatchNorm uses the batch statistics of the fused pre-BN map u; running stats are updated
exactly as nn.BatchNorm2d does (momentum or cumulative average, unbiased variance,
num_batches_tracked). One autograd.Function covers stage GEMMs -> upsample_sum -> BN -> ReLU ->
dropout -> classifier and saves only the classifier input d = dropout(relu(bn(u))) (its zeros
carry the ReLU and dropout masks), the per-channel mean and invstd, and the inputs (the feature
maps and the small folded weights). u is recomputed in backward from the features. Gradients of
the folded weights, dA_i = dz_i^T c_i and da_i = sum dz_i, flow through autograd to
W_f,i (dA_i W_i^T + da_i b_i^T) and W_i, b_i (W_f,i^T dA_i, W_f,i^T da_i): matmuls once per step.

Distributed: when torch.distributed is initialized and ``sync_bn`` is set (the default), the batch
statistics are those of the global batch, as nn.SyncBatchNorm computes them: every rank
all-gathers its (mean, biased var, count), combines them exactly, and in backward all-reduces
sum(g) and sum(g * xhat) before forming the input gradient; the BN affine gradients stay local
(DDP averages them), as in SyncBatchNorm. ``process_group`` picks the group (None: the default).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..backends import validate_backend
from ..ops.upsample_sum.op import upsample_sum_nhwc
from ..ops._math import (
    batch_norm_affine,
    batch_norm_backward,
    batch_norm_fold,
    batch_stats,
    unbiased_var,
    update_running_stats,
)
from ..utils.distributed import default_group
from .decode_head import AllMLPDecoder
from ._autocast import fp32_under_autocast

__all__ = ["FusedAllMLPDecoder"]


def _stage(c: torch.Tensor, A: torch.Tensor, a: torch.Tensor | None) -> torch.Tensor:
    """(B, C, h, w) features -> (B, h, w, D) = A c + a per pixel, channels-last."""
    B, C, h, w = c.shape
    x = c.permute(0, 2, 3, 1).reshape(B * h * w, C)
    z = torch.addmm(a.to(x.dtype), x, A.t().to(x.dtype)) if a is not None else x @ A.t().to(x.dtype)
    return z.view(B, h, w, A.shape[0])


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


class _FusedDecoderTrain(torch.autograd.Function):
    """features, folded weights, BN affine, classifier -> (logits (B, K, H, W), batch mean, unbiased var)."""

    @staticmethod
    def forward(ctx, cfg: _TrainCfg, *tensors):
        n = cfg.n
        feats, A, a = tensors[:n], tensors[n : 2 * n], tensors[2 * n : 3 * n]
        gamma, beta, wc, bc = tensors[3 * n : 3 * n + 4]
        H, W = cfg.size
        B, D, K = feats[0].shape[0], A[0].shape[0], wc.shape[0]
        z = [_stage(c, Ai, ai) for c, Ai, ai in zip(feats, A, a)]
        u = torch.ops.segformer_fast.upsample_sum(z, H, W, None, None, False, cfg.backend)  # (B, H, W, D)
        del z
        u2 = u.view(-1, D)
        mean, var, count = batch_stats(u2.float(), 0, cfg.group)
        if count <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {(B, D, H, W)}")
        invstd = torch.rsqrt(var + cfg.eps)
        scale, shift = batch_norm_affine(_float(gamma), _float(beta), mean, invstd)
        d = u2.mul_(scale.to(u2.dtype)).add_(shift.to(u2.dtype)).relu_()  # in place: u is not kept
        if cfg.p > 0:
            if cfg.dropout2d:
                F.dropout2d(d.view(B, H, W, D).permute(0, 3, 1, 2), cfg.p, training=True, inplace=True)
            else:
                F.dropout(d, cfg.p, training=True, inplace=True)
        logits = torch.addmm(bc, d, wc.t()) if bc is not None else d @ wc.t()  # (B*H*W, K)
        ctx.cfg, ctx.count = cfg, count
        ctx.save_for_backward(*feats, *A, *a, gamma, wc, d, mean, invstd)
        var_unbiased = unbiased_var(var, count)
        ctx.mark_non_differentiable(mean, var_unbiased)
        return logits.view(B, H, W, K).permute(0, 3, 1, 2), mean, var_unbiased

    @staticmethod
    def backward(ctx, grad_logits, _grad_mean, _grad_var):
        cfg, n = ctx.cfg, ctx.cfg.n
        saved = ctx.saved_tensors
        feats, A, a = saved[:n], saved[n : 2 * n], saved[2 * n : 3 * n]
        gamma, wc, d, mean, invstd = saved[3 * n :]
        needs = ctx.needs_input_grad[1:]  # one per tensor input
        H, W = cfg.size
        B, D, K = feats[0].shape[0], A[0].shape[0], wc.shape[0]
        gl = grad_logits.permute(0, 2, 3, 1).reshape(-1, K).to(d.dtype)  # (B*H*W, K)
        dwc = gl.t() @ d if needs[3 * n + 2] else None
        dbc = gl.sum(0) if needs[3 * n + 3] else None
        # dropout and ReLU: d > 0 exactly where the ReLU passed and dropout kept.
        scale_drop = 1.0 / (1.0 - cfg.p) if 0 < cfg.p < 1 else 1.0
        g = (gl @ wc.to(d.dtype)).mul_(scale_drop).masked_fill_(d <= 0, 0.0).float()  # (B*H*W, D)
        z = [_stage(c, Ai, ai) for c, Ai, ai in zip(feats, A, a)]
        xhat = torch.ops.segformer_fast.upsample_sum(z, H, W, None, None, False, cfg.backend).view(-1, D).float()
        del z
        xhat.sub_(mean).mul_(invstd)
        gscale = invstd if gamma is None else gamma.float() * invstd
        # BN backward: dL/du = gamma * invstd * (g - mean(g) - xhat * mean(g * xhat)), in place on g.
        gu, dgamma, dbeta = batch_norm_backward(g, xhat, gscale, ctx.count, 0, cfg.group)
        dgamma = dgamma if needs[3 * n] else None
        dbeta = dbeta if needs[3 * n + 1] else None
        del xhat
        gu = gu.to(d.dtype).view(B, H, W, D)
        sizes = [s for c in feats for s in (c.shape[2], c.shape[3])]
        gz = torch.ops.segformer_fast.upsample_sum_backward(gu, sizes, [], None, None, False, False, False, cfg.backend)
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
            x = c.permute(0, 2, 3, 1).reshape(-1, C)
            grad_A.append((gz2.t() @ x.to(gz2.dtype)).to(Ai.dtype) if needs[n + i] else None)
            grad_a.append(gz2.sum(0).to(Ai.dtype) if needs[2 * n + i] else None)
        return (None, *grad_feats, *grad_A, *grad_a, dgamma, dbeta, dwc, dbc)


class FusedAllMLPDecoder(AllMLPDecoder):
    """Fused All-MLP decode head: numerically AllMLPDecoder, with the same parameters and state dict.

    Parameters and buffers carry the reference's names (linear_c.{i}, fuse, bn, classifier), so
    state dicts load either way. See the module docstring for the fusion and what training saves.

    Args:
        in_channels: channels C_i of the four feature maps, finest first.
        dim: decoder width D.
        num_classes: classifier outputs K.
        dropout: dropout probability before the classifier (element-wise, as Hugging Face).
        dropout2d: use channel-wise Dropout2d (the NVlabs original) instead.
        backend: upsample_sum backend ("auto", "torch", "triton", "cpp", "cuda").

    Example:
        >>> dec = FusedAllMLPDecoder((32, 64, 160, 256), 256, 150).eval()
        >>> feats = [torch.randn(1, c, 128 // 2**i, 128 // 2**i) for i, c in enumerate((32, 64, 160, 256))]
        >>> dec(feats).shape
        torch.Size([1, 150, 128, 128])
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        dim: int,
        num_classes: int,
        dropout: float = 0.1,
        dropout2d: bool = False,
        backend: str = "auto",
    ):
        super().__init__(in_channels, dim, num_classes, dropout=dropout, dropout2d=dropout2d)
        self.backend = validate_backend(backend, check_available=False)
        self.sync_bn = True  # SyncBatchNorm semantics whenever torch.distributed is initialized
        self.process_group = None
        self._eval_cache: tuple | None = None

    @classmethod
    def from_reference(cls, module: AllMLPDecoder, **kw) -> "FusedAllMLPDecoder":
        """A fused decoder sharing ``module``'s submodules (the same Parameter and buffer objects)."""
        new = cls(
            module.in_channels,
            module.dim,
            module.num_classes,
            dropout=module.dropout.p,
            dropout2d=isinstance(module.dropout, nn.Dropout2d),
            **kw,
        )
        new.linear_c, new.fuse, new.bn = module.linear_c, module.fuse, module.bn
        new.dropout, new.classifier = module.dropout, module.classifier
        return new.train(module.training)

    def _folded(self) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """A_i = W_f,i W_i (D, C_i) and a_i = W_f,i b_i (D,), differentiable."""
        D, n = self.dim, len(self.in_channels)
        wf = self.fuse.weight.view(D, n * D)
        A, a = [], []
        for i, lin in enumerate(self.linear_c):
            k = n - 1 - i  # concat order c4, c3, c2, c1
            wfi = wf[:, k * D : (k + 1) * D]
            A.append(wfi @ lin.weight)
            a.append(wfi @ lin.bias if lin.bias is not None else None)
        return A, a

    def _bn_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        bn = self.bn
        return batch_norm_fold(_float(bn.weight), _float(bn.bias), bn.running_mean.float(), bn.running_var.float(), bn.eps)

    def _eval_params(self):
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return (*self._folded(), *self._bn_affine())
        tensors = [*self.parameters(), *self.buffers()]
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
        if self._eval_cache is None or self._eval_cache[0] != key:
            self._eval_cache = (key, (*self._folded(), *self._bn_affine()))
        return self._eval_cache[1]

    def _group(self):
        return default_group(self.sync_bn, self.process_group)

    @fp32_under_autocast
    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """features: four (B, C_i, H_i, W_i) maps, finest first; returns (B, classes, H_1, W_1).

        The logits come out in channels-last memory format (same shape and values as the reference).
        """
        self.check_features(features)
        H, W = int(features[0].shape[-2]), int(features[0].shape[-1])
        bn, K = self.bn, self.num_classes
        use_batch_stats = self.training or bn.running_mean is None
        if not use_batch_stats:
            A, a, scale, shift = self._eval_params()
            z = [_stage(c, Ai, ai) for c, Ai, ai in zip(features, A, a)]
            y = upsample_sum_nhwc(z, (H, W), scale, shift, relu=True, backend=self.backend)  # (B, H, W, D)
            logits = F.linear(y, self.classifier.weight.view(K, self.dim), self.classifier.bias)  # (B, H, W, K)
            return logits.permute(0, 3, 1, 2)
        A, a = self._folded()
        cfg = _TrainCfg(
            n=len(features),
            size=(H, W),
            eps=bn.eps,
            p=float(self.dropout.p) if self.training else 0.0,
            dropout2d=isinstance(self.dropout, nn.Dropout2d),
            backend=self.backend,
            group=self._group() if self.training else None,
        )
        logits, mean, var = _FusedDecoderTrain.apply(
            cfg, *features, *A, *a, bn.weight, bn.bias, self.classifier.weight.view(K, self.dim), self.classifier.bias
        )
        if self.training and bn.track_running_stats and bn.running_mean is not None:
            update_running_stats(bn.running_mean, bn.running_var, mean, var, bn.momentum, bn.num_batches_tracked)
        return logits

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"
