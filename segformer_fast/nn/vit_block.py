"""Pre-norm ViT block: x + DropPath(Attn(LN(x))), then x + DropPath(MLP(LN(x))).

Attention is :class:`SpatialReductionAttention` with sr_ratio=1 (plain multi-head attention with
q, k, v, proj Linears); the fused variant runs the memory-linear sr_attention op.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import SpatialReductionAttention
from .block import DropPath
from .mlp import FusedMlp, Mlp

__all__ = ["ViTBlock"]


class ViTBlock(nn.Module):
    """One ViT encoder block.

    Args:
        dim, num_heads, mlp_ratio, qkv_bias: the usual ViT sizes.
        drop: dropout on the attention and MLP outputs. drop_path: stochastic depth rate.
        eps: LayerNorm epsilon (1e-6 in ViT / SETR).
        backend: None builds the pure-PyTorch reference layers; a backend name builds the fused
            attention (sr_attention op, resolving that backend per call) and the fused MLP.
        memory: the fused attention's and MLP's activation policy, "save" or "recompute".

    Forward: x (B, N, C) -> (B, N, C); N may include a cls token.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int = 4, qkv_bias: bool = True, drop: float = 0.0,
                 drop_path: float = 0.0, eps: float = 1e-6, backend: str | None = None, memory: str = "save"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        if backend is None:
            self.attn = SpatialReductionAttention(dim, num_heads, 1, qkv_bias, 0.0, drop)
            self.mlp = Mlp(dim, dim * mlp_ratio, drop)
        else:
            from .attention_fused import FusedSpatialReductionAttention

            self.attn = FusedSpatialReductionAttention(dim, num_heads, 1, qkv_bias, 0.0, drop, backend=backend,
                                                       memory=memory)
            self.mlp = FusedMlp(dim, dim * mlp_ratio, drop, memory=memory)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hw = (1, x.shape[1])  # sr_ratio 1: the token grid only has to hold N tokens
        x = x + self.drop_path(self.attn(self.norm1(x), hw))
        return x + self.drop_path(self.mlp(self.norm2(x)))
