"""Conv-BN-ReLU-upsample stage of SETR's heads, pure-PyTorch reference (mmseg's ConvModule + Upsample).

    y   = Conv2d(x, W, padding=k//2)              x: (B, C_in, H, W), W: (C_out, C_in, k, k), no bias
    z   = ReLU(BatchNorm(y))                       batch statistics in training, running ones in eval
    u   = Up_s(z)                                  bilinear, align_corners=False, s = scale (1: none)
    out = Conv1x1(u, W_cls, b_cls)  if a classifier is given, else u
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["conv_bn_relu_up_reference"]


def conv_bn_relu_up_reference(
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
) -> torch.Tensor:
    """Returns (B, C_out or K, H*scale, W*scale); updates the running statistics in training."""
    y = F.conv2d(x, weight, None, padding=weight.shape[-1] // 2)
    z = F.relu(F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps))
    if scale > 1:
        z = F.interpolate(z, scale_factor=scale, mode="bilinear", align_corners=False)
    if cls_weight is not None:
        z = F.conv2d(z, cls_weight, cls_bias)
    return z
