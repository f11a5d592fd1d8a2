from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SpatialReductionAttention(nn.Module):
    """Efficient self-attention of MiT (PVT's spatial reduction), reference implementation.

    Q comes from all N = H*W tokens; K and V from the M = floor(H/sr)*floor(W/sr) tokens made by a
    patchify Conv2d(dim, dim, k=sr, s=sr) and LayerNorm. sr = 1 is plain multi-head attention.
    Parameter names: q, k, v, proj (Linear), sr (Conv2d), sr_norm (LayerNorm).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        sr_ratio: int = 1,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        sr_eps: float = 1e-5,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.num_heads, self.sr_ratio = dim, num_heads, sr_ratio
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.sr_norm = nn.LayerNorm(dim, eps=sr_eps)

    def reduce(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """Tokens (B, N, C) -> reduced tokens (B, M, C) for K and V."""
        if self.sr_ratio == 1:
            return x
        b, n, c = x.shape
        x = x.transpose(1, 2).reshape(b, c, hw[0], hw[1])
        x = self.sr(x).flatten(2).transpose(1, 2)  # (B, M, C)
        return self.sr_norm(x)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """x: (B, N, C) with N = H*W; returns (B, N, C)."""
        b, n, c = x.shape
        q = self.q(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, N, d)
        kv = self.reduce(x, hw)
        m = kv.shape[1]
        k = self.k(kv).reshape(b, m, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, M, d)
        v = self.v(kv).reshape(b, m, self.num_heads, self.head_dim).transpose(1, 2)
        p = self.attn_drop if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=self.scale)  # (B, h, N, d)
        out = out.transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, sr_ratio={self.sr_ratio}"
