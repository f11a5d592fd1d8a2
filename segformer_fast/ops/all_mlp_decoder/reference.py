"""SegFormer's All-MLP decode head, literally (the oracle of the fused op):

    _ci = Upsample_to_1/4(Linear_i(c_i))               i = 1..n, bilinear, align_corners=False
    y   = classifier(dropout(ReLU(BN(fuse(concat[_cn, ..., _c1])))))
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["all_mlp_decoder_reference"]


def all_mlp_decoder_reference(features: Sequence[torch.Tensor], weights: Sequence[torch.Tensor],
                              biases: Sequence[torch.Tensor | None], fuse_weight: torch.Tensor,
                              bn_weight: torch.Tensor | None, bn_bias: torch.Tensor | None,
                              running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                              cls_weight: torch.Tensor, cls_bias: torch.Tensor | None, *, training: bool = False,
                              momentum: float = 0.1, eps: float = 1e-5) -> torch.Tensor:
    """features (B, C_i, H_i, W_i), finest first; Linear_i (D, C_i), (D,); fuse (D, n*D, 1, 1); BatchNorm
    (its running statistics updated in training, as nn.BatchNorm2d); classifier (K, D, 1, 1), (K,).
    No dropout. Returns (B, K, H_1, W_1)."""
    size = features[0].shape[-2:]
    ups = []
    for f, w, b in zip(features, weights, biases):
        y = F.linear(f.flatten(2).transpose(1, 2), w, b)  # (B, H_i*W_i, D)
        y = y.transpose(1, 2).reshape(f.shape[0], w.shape[0], f.shape[2], f.shape[3])
        ups.append(F.interpolate(y, size=size, mode="bilinear", align_corners=False))
    x = F.conv2d(torch.cat(ups[::-1], dim=1), fuse_weight)  # (B, D, H_1, W_1)
    x = F.relu(F.batch_norm(x, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps))
    return F.conv2d(x, cls_weight, cls_bias)
