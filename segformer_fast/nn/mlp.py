"""Transformer MLP (ViT): Linear(C, 4C) -> GELU -> Linear(4C, C), reference and memory-lean fused."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import LAYER_MEMORY_MODES, MemoryMode
from ..ops.mlp_gelu import mlp_gelu
from ._autocast import run_autocast

__all__ = ["Mlp", "FusedMlp"]


class Mlp(nn.Module):
    """ViT MLP, reference implementation. Parameter names fc1, fc2 (timm's)."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N, C)."""
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class FusedMlp(Mlp):
    """ViT MLP on :func:`segformer_fast.ops.mlp_gelu.mlp_gelu`: same parameters, less kept for backward.

    Args:
        dim, hidden_dim, drop: as :class:`Mlp`. While training with drop > 0 the reference forward runs.
        memory: "save" keeps x and fc1's output (5C per token against the reference's 9C);
            "recompute" keeps x only (C per token) and recomputes fc1 in backward.

    Example:
        >>> y = FusedMlp(64, 256, memory="recompute")(torch.randn(2, 10, 64))
    """

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0, memory: str = "save"):
        super().__init__(dim, hidden_dim, drop)
        MemoryMode.parse(memory, allowed=LAYER_MEMORY_MODES)
        self.memory = memory

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N, C) (in the autocast dtype under autocast)."""
        if self.training and self.drop.p > 0:
            return super().forward(x)
        return run_autocast(self._fused_forward, x)

    def _fused_forward(self, x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
        # the op casts fp32 weights to x's dtype itself: autograd keeps the parameters, not 16-bit copies
        return mlp_gelu(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
                        save_hidden=self.memory == "save")

    def extra_repr(self) -> str:
        return f"memory={self.memory!r}"
