from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MixFFN(nn.Module):
    """Mix-FFN, reference implementation: Linear(C, 4C) -> depthwise 3x3 conv -> GELU -> Linear(4C, C).

    Parameter names: fc1, dwconv (Conv2d(hidden, hidden, 3, padding=1, groups=hidden)), fc2.
    The conv runs on an NCHW view of the (B, N, hidden) tokens, as the original does.
    """

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.dwconv = nn.Conv2d(hidden_dim, hidden_dim, kernel_size=3, padding=1, groups=hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """x: (B, N, C) with N = H*W; returns (B, N, C)."""
        b, n, _ = x.shape
        x = self.fc1(x)  # (B, N, hidden)
        x = x.transpose(1, 2).reshape(b, -1, hw[0], hw[1])
        x = self.dwconv(x).flatten(2).transpose(1, 2)
        x = self.drop(F.gelu(x))
        return self.drop(self.fc2(x))
