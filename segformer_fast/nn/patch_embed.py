from __future__ import annotations

import torch
from torch import nn


class OverlapPatchEmbed(nn.Module):
    """Overlapped patch embedding: Conv2d(k=patch, s=stride, pad=patch//2), then LayerNorm.

    Output side length is ceil(H / stride) for the MiT patch/stride pairs (7/4, 3/2).
    """

    def __init__(self, in_channels: int, dim: int, patch_size: int, stride: int, eps: float = 1e-5):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, C_in, H, W) -> tokens (B, H'*W', dim) and (H', W')."""
        x = self.proj(x)  # (B, dim, H', W')
        h, w = x.shape[-2:]
        x = self.norm(x.flatten(2).transpose(1, 2))  # (B, N, dim)
        return x, (h, w)
