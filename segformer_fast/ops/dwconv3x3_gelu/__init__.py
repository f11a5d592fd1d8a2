"""Fused depthwise 3x3 conv + bias + GELU on (B, N, C) tokens: the middle of SegFormer's Mix-FFN."""

from .op import dwconv3x3_gelu
from .reference import dwconv3x3_gelu_reference

__all__ = ["dwconv3x3_gelu", "dwconv3x3_gelu_reference"]
