"""Transformer MLP, pure-PyTorch reference: y = fc2(GELU(fc1(x))), GELU exact (erf).

Shapes: x (..., C); w1 (Hd, C), b1 (Hd,); w2 (C_out, Hd), b2 (C_out,). Eager autograd keeps x, the
fc1 output and the GELU output: C + 2 Hd values per token (9C for the ViT's Hd = 4C).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["mlp_gelu_reference"]


def mlp_gelu_reference(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                       b2: torch.Tensor | None) -> torch.Tensor:
    """fc2(GELU(fc1(x))): (..., C) -> (..., C_out)."""
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)
