"""SETR's decoders, reference implementation (mmsegmentation's SETRUPHead, MLANeck, SETRMLAHead).

Parameter names follow mmseg (``norm``, ``up_convs.{i}...conv/bn``, ``conv_seg``) so its
checkpoints map one to one. Every head takes NCHW feature maps at 1/16 of the (padded) input.

- :class:`SETRUpHead`: LN -> num_convs x [conv k x k -> BN -> ReLU -> bilinear x scale] -> 1x1
  classifier. Naive: one 1x1 conv, no upsample; PUP: four 3x3 convs with x2 each (aux: two).
- :class:`MLANeck`: per level LN -> 1x1 conv-BN-ReLU; top-down cumulative sum from the deepest
  level; per level 3x3 conv-BN-ReLU. Outputs deepest-first, as mmseg's.
- :class:`SETRMLAHead`: per level 2 x [3x3 conv-BN-ReLU] then bilinear x4; concat -> classifier.
- :class:`ClassifierHead`: a 1x1 classifier (SETR-MLA's auxiliary heads, mmseg FCNHead num_convs=0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


__all__ = ["ConvBNReLU", "SETRUpHead", "MLANeck", "SETRMLAHead", "ClassifierHead", "layer_norm_nchw"]


def layer_norm_nchw(norm: nn.LayerNorm, x: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """LayerNorm over the channels of a (B, C, H, W) map; contiguous NCHW out, or with
    ``channels_last`` the LayerNorm's own (B, H, W, C) result seen as (B, C, H, W) (no copy)."""
    y = norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    return y if channels_last else y.contiguous()


class ConvBNReLU(nn.Module):
    """conv k x k (no bias) -> BatchNorm -> ReLU -> bilinear x ``scale``; names ``conv``, ``bn``.

    The module composition of :func:`segformer_fast.ops.conv_bn_relu_up.conv_bn_relu_up_reference`
    (nn.BatchNorm2d also counts ``num_batches_tracked``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, scale: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C_out, H*scale, W*scale)."""
        x = F.relu(self.bn(self.conv(x)))
        if self.scale > 1:
            x = F.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=False)
        return x

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


class SETRUpHead(nn.Module):
    """SETR Naive / PUP head: (B, C, h, w) -> (B, K, h * scale**num_convs, w * scale**num_convs)."""

    conv_module = ConvBNReLU

    def __init__(self, in_channels: int, channels: int, num_classes: int, num_convs: int, kernel_size: int,
                 scale: int, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(in_channels, eps=eps)
        self.up_convs = nn.ModuleList(
            self.conv_module(in_channels if i == 0 else channels, channels, kernel_size, scale) for i in range(num_convs)
        )
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = layer_norm_nchw(self.norm, x)
        for up in self.up_convs:
            x = up(x)
        return self.conv_seg(x)


class MLANeck(nn.Module):
    """SETR-MLA neck: four (B, C, h, w) maps (shallow first) -> four (B, D, h, w) maps (deepest first)."""

    conv_module = ConvBNReLU
    channels_last = False  # the LayerNorm output as a channels-last view (fused convs) or NCHW copy

    def __init__(self, in_channels: int, out_channels: int, num_levels: int = 4, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.ModuleList(nn.LayerNorm(in_channels, eps=eps) for _ in range(num_levels))
        self.channel_proj = nn.ModuleList(self.conv_module(in_channels, out_channels, 1) for _ in range(num_levels))
        self.feat_extract = nn.ModuleList(self.conv_module(out_channels, out_channels, 3) for _ in range(num_levels))

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        proj = [conv(layer_norm_nchw(norm, x, self.channels_last))
                for x, norm, conv in zip(feats, self.norm, self.channel_proj)]
        outs, acc = [], None
        for p, conv in zip(proj[::-1], self.feat_extract):  # top-down: p4, p4 + p3, ...
            acc = p if acc is None else acc + p
            outs.append(conv(acc))
        return outs


class SETRMLAHead(nn.Module):
    """SETR-MLA head: four (B, D, h, w) maps -> (B, K, h * scale, w * scale)."""

    conv_module = ConvBNReLU

    def __init__(self, in_channels: int, mla_channels: int, num_classes: int, num_levels: int = 4, scale: int = 4):
        super().__init__()
        self.scale = scale
        self.up_convs = nn.ModuleList(
            nn.Sequential(self.conv_module(in_channels, mla_channels, 3), self.conv_module(mla_channels, mla_channels, 3, scale))
            for _ in range(num_levels)
        )
        self.conv_seg = nn.Conv2d(num_levels * mla_channels, num_classes, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return self.conv_seg(torch.cat([up(x) for x, up in zip(feats, self.up_convs)], dim=1))


class ClassifierHead(nn.Module):
    """A 1x1 classifier on one map: (B, D, h, w) -> (B, K, h, w)."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.conv_seg = nn.Conv2d(in_channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(x)
