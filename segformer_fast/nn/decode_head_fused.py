"""SegFormer's All-MLP decode head, fused: the same function as AllMLPDecoder, a fraction of the work.

This module holds the parameters (the reference's names, so state dicts load either way)
and the BatchNorm running statistics; the computation is the op
segformer_fast.ops.all_mlp_decoder (the fold identity, the eval pass and the training autograd,
described there). The folded weights are formed on every call, eval included: a cache cannot see
every way weights change (``p.data`` updates, as EMA does, leave no version bump), and folding is a
few small GEMMs (0.4-0.7 ms on a CPU, next to 1.1 s for B0 eval at 512).

Distributed: when torch.distributed is initialized and ``sync_bn`` is set (the default), the batch
statistics are those of the global batch, as nn.SyncBatchNorm computes them; ``process_group``
picks the group (None: the default).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..backends import validate_backend
from ..ops.all_mlp_decoder import all_mlp_decoder_eval, all_mlp_decoder_train, fold_weights
from ..ops.math_utils import batch_norm_fold, update_running_stats
from ..utils.distributed import default_group
from .decode_head import AllMLPDecoder
from ._autocast import cast, run_autocast

__all__ = ["FusedAllMLPDecoder"]


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
        """A_i = W_f,i W_i (D, C_i) and a_i = W_f,i b_i (D,), differentiable (the op's identity)."""
        return fold_weights(self.fuse.weight, [lin.weight for lin in self.linear_c], [lin.bias for lin in self.linear_c])

    def _bn_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        bn = self.bn
        return batch_norm_fold(None if bn.weight is None else bn.weight.float(),
                               None if bn.bias is None else bn.bias.float(), bn.running_mean.float(),
                               bn.running_var.float(), bn.eps)

    def _eval_params(self):
        # Not cached: ``p.data.mul_()`` (the usual EMA update) changes a weight without bumping its
        # version, and checking the contents costs as much as folding (and a host sync on a GPU).
        return (*self._folded(), *self._bn_affine())

    def _group(self):
        return default_group(self.sync_bn, self.process_group)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """features: four (B, C_i, H_i, W_i) maps, finest first; returns (B, classes, H_1, W_1).

        The logits come out in channels-last memory format (same shape and values as the reference),
        in the autocast dtype under autocast. The folded weights are formed in fp32 and cast per stage
        GEMM; BatchNorm statistics and affine stay fp32.
        """
        self.check_features(features)
        return run_autocast(self._fused_forward, features)

    def _fused_forward(self, features: Sequence[torch.Tensor], dtype: torch.dtype | None) -> torch.Tensor:
        bn, K = self.bn, self.num_classes
        wc, bc = cast(self.classifier.weight.view(K, self.dim), dtype), cast(self.classifier.bias, dtype)
        use_batch_stats = self.training or bn.running_mean is None
        if not use_batch_stats:
            A, a, scale, shift = self._eval_params()
            return all_mlp_decoder_eval(features, A, a, scale, shift, wc, bc, self.backend)
        A, a = self._folded()
        logits, mean, var = all_mlp_decoder_train(
            features, A, a, bn.weight, bn.bias, wc, bc,
            eps=bn.eps, p=float(self.dropout.p) if self.training else 0.0,
            dropout2d=isinstance(self.dropout, nn.Dropout2d), backend=self.backend,
            group=self._group() if self.training else None,
        )
        if self.training and bn.track_running_stats and bn.running_mean is not None:
            update_running_stats(bn.running_mean, bn.running_var, mean, var, bn.momentum, bn.num_batches_tracked)
        return logits

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"
