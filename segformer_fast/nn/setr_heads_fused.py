"""SETR's decoders on the fused conv-BN-ReLU-upsample op (segformer_fast.ops.conv_bn_relu_up).

Drop-ins for :mod:`segformer_fast.nn.setr_heads`: subclasses with the same parameters and state
dicts; only forward differs. Beyond the op's own rewrites (BN folded in eval; only the input kept
in training), the heads move their classifier before the last upsample, which is exact because a
1x1 conv and bilinear upsampling commute (see the op's docstring):
- PUP: the last stage runs conv-BN-ReLU-classifier at 1/2 and upsamples K channels, not 256.
- MLA: concat + classifier = sum over levels of the classifier's column block, so
      Conv_cls(concat_i Up4(z_i)) = Up4(sum_i W_cls,i z_i + b),
  one x4 upsample of K channels at the end instead of four of 128 and a 512-channel map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops.conv_bn_relu_up import conv_bn_relu_up
from ..utils.distributed import default_group
from ._autocast import cast, run_autocast
from .setr_heads import ConvBNReLU, MLANeck, SETRMLAHead, SETRUpHead, layer_norm_nchw

__all__ = ["FusedConvBNReLU", "FusedSETRUpHead", "FusedMLANeck", "FusedSETRMLAHead"]


class FusedConvBNReLU(ConvBNReLU):
    """:class:`ConvBNReLU` on the fused op; ``forward(x, cls_weight, cls_bias, upsample)`` can fold in
    a 1x1 classifier (applied before the upsample) and leave the upsample to the caller.

    In training under torch.distributed the batch statistics are those of every rank
    (nn.SyncBatchNorm semantics, on CPU with gloo too); set ``sync_bn = False`` for per-rank ones,
    or ``process_group`` to sync over a subgroup.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sync_bn = True
        self.process_group = None

    def forward(self, x: torch.Tensor, cls_weight: torch.Tensor | None = None, cls_bias: torch.Tensor | None = None,
                upsample: bool = True) -> torch.Tensor:
        bn = self.bn
        if bn.momentum is None or not bn.track_running_stats:  # cumulative averages: not folded here
            return super().forward(x)
        return run_autocast(self._fused_forward, x, cls_weight, cls_bias, upsample)

    def _fused_forward(self, x, cls_weight, cls_bias, upsample, dtype):
        # the convs' weights in the autocast dtype; BatchNorm's affine and statistics stay fp32
        bn = self.bn
        return conv_bn_relu_up(
            x, cast(self.conv.weight, dtype), bn.weight, bn.bias, bn.running_mean, bn.running_var,
            training=self.training, momentum=bn.momentum, eps=bn.eps, scale=self.scale if upsample else 1,
            cls_weight=cast(cls_weight, dtype), cls_bias=cast(cls_bias, dtype), num_batches_tracked=bn.num_batches_tracked,
            group=default_group(self.sync_bn, self.process_group) if self.training else None,
        )


class FusedSETRUpHead(SETRUpHead):
    conv_module = FusedConvBNReLU

    def forward(self, x: torch.Tensor, upsample: bool = True) -> torch.Tensor:
        """As :class:`SETRUpHead`; ``upsample=False`` returns the logits before the last stage's
        upsample (the resolution a fused upsampling loss wants)."""
        x = layer_norm_nchw(self.norm, x, channels_last=True)  # the convs run channels-last from here
        for up in self.up_convs[:-1]:
            x = up(x)
        return self.up_convs[-1](x, self.conv_seg.weight, self.conv_seg.bias, upsample)  # classifier, then upsample


class FusedMLANeck(MLANeck):
    conv_module = FusedConvBNReLU
    channels_last = True  # the convs run channels-last, from the LayerNorm's own layout


class FusedSETRMLAHead(SETRMLAHead):
    conv_module = FusedConvBNReLU

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        w, b = self.conv_seg.weight, self.conv_seg.bias
        d = w.shape[1] // len(self.up_convs)
        acc = None
        for i, (x, (first, second)) in enumerate(zip(feats, self.up_convs)):
            z = second(first(x), w[:, i * d:(i + 1) * d], b if i == 0 else None, upsample=False)  # (B, K, h, w)
            acc = z if acc is None else acc + z
        return F.interpolate(acc.contiguous(), scale_factor=self.scale, mode="bilinear", align_corners=False)
