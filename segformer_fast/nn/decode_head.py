from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class AllMLPDecoder(nn.Module):
    """SegFormer's All-MLP decode head, reference implementation (the unfused, textbook form).

        _ci = Upsample_to_1/4(Linear_i(c_i))               i = 1..4, bilinear, align_corners=False
        y   = classifier(dropout(ReLU(BN(fuse(concat[_c4, _c3, _c2, _c1])))))

    Parameter names: linear_c.{i} (Linear(C_i, D)), fuse (Conv2d(4D, D, 1, bias=False)), bn
    (BatchNorm2d(D)), classifier (Conv2d(D, num_classes, 1)).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        dim: int,
        num_classes: int,
        dropout: float = 0.1,
        dropout2d: bool = False,
    ):
        super().__init__()
        self.in_channels = tuple(in_channels)
        self.dim, self.num_classes = dim, num_classes
        self.linear_c = nn.ModuleList([nn.Linear(c, dim) for c in self.in_channels])
        self.fuse = nn.Conv2d(dim * len(self.in_channels), dim, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(dim)
        self.dropout = nn.Dropout2d(dropout) if dropout2d else nn.Dropout(dropout)
        self.classifier = nn.Conv2d(dim, num_classes, kernel_size=1)

    def check_features(self, features: Sequence[torch.Tensor]) -> None:
        if len(features) != len(self.in_channels):
            raise ValueError(f"decoder expects {len(self.in_channels)} feature maps, got {len(features)}")
        for i, (f, c) in enumerate(zip(features, self.in_channels)):
            if f.ndim != 4:
                raise ValueError(f"feature map {i} must be (B, C, H, W), got shape {tuple(f.shape)}")
            if f.shape[1] != c:
                raise ValueError(f"feature map {i} has {f.shape[1]} channels, decoder expects {c}")
            if f.shape[0] != features[0].shape[0]:
                raise ValueError(f"feature maps have different batch sizes: {[tuple(x.shape) for x in features]}")

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """features: four (B, C_i, H_i, W_i) maps, finest first; returns (B, classes, H_1, W_1)."""
        self.check_features(features)
        size = features[0].shape[-2:]
        ups = []
        for f, linear in zip(features, self.linear_c):
            y = linear(f.flatten(2).transpose(1, 2))  # (B, H_i*W_i, D)
            y = y.transpose(1, 2).reshape(f.shape[0], self.dim, f.shape[2], f.shape[3])
            ups.append(F.interpolate(y, size=size, mode="bilinear", align_corners=False))
        x = self.fuse(torch.cat(ups[::-1], dim=1))  # (B, D, H_1, W_1)
        x = self.dropout(F.relu(self.bn(x)))
        return self.classifier(x)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, dim={self.dim}, num_classes={self.num_classes}"
