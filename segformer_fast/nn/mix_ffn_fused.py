"""Mix-FFN on the fused depthwise conv + GELU op, with a choice of what autograd keeps.

Linear(C, 4C) -> depthwise 3x3 conv -> GELU -> Linear(4C, C) on (B, N, C) tokens, with the
reference's parameter names (fc1, dwconv, fc2), so state dicts are interchangeable with
:class:`segformer_fast.nn.MixFFN`.

What each variant keeps for backward, per token (fp32 words; C = dim, 4C = hidden):
- Hugging Face / reference: x (C), fc1 output (4C), conv output (4C), GELU output (4C) = 13C.
- ``memory="save"``: x (C) and the fc1 output h (4C) = 5C. The conv and GELU are recomputed from h
  in backward (fc2's weight gradient needs y = GELU(conv(h)), the op's backward needs h).
- ``memory="recompute"``: x only (C). Backward also recomputes h = fc1(x), one extra
  (C x 4C) matmul: one FFN forward traded for most of its activation memory.

Backward, with gout the output gradient (the op's backward gives the conv and GELU part):
    y = op(h);  gW2 = gout^T y;  gb2 = sum gout;  gy = gout W2
    gh, gWc, gbc = op_backward(gy, h);  gW1 = gh^T x;  gb1 = sum gh;  gx = gh W1
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..backends import validate_backend
from ..configs import LAYER_MEMORY_MODES, MemoryMode
from ..ops.dwconv3x3_gelu import dwconv3x3_gelu
from ..ops.dwconv3x3_gelu.op import _dwconv3x3_gelu_backward_op, _dwconv3x3_gelu_op
from ._autocast import fp32_under_autocast

__all__ = ["FusedMixFFN"]


class _MixFFNFunction(torch.autograd.Function):
    """fc1 -> dwconv3x3_gelu -> fc2 keeping x (and h = fc1(x) when save_hidden) for backward."""

    @staticmethod
    def forward(ctx, x, w1, b1, wc, bc, w2, b2, hw, approximate, backend, save_hidden):
        h = F.linear(x, w1, b1)  # (B, N, 4C)
        y = _dwconv3x3_gelu_op(h, hw[0], hw[1], wc, bc, approximate, backend)  # (B, N, 4C)
        out = F.linear(y, w2, b2)  # (B, N, C)
        ctx.save_for_backward(x, h if save_hidden else None, w1, b1, wc, bc, w2)
        ctx.hw, ctx.approximate, ctx.backend = hw, approximate, backend
        return out

    @staticmethod
    def backward(ctx, gout):
        x, h, w1, b1, wc, bc, w2 = ctx.saved_tensors
        hh, ww = ctx.hw
        if h is None:
            h = F.linear(x, w1, b1)  # recomputed fc1 output
        dt = h.dtype
        gout = gout.to(dt).contiguous()
        y = _dwconv3x3_gelu_op(h, hh, ww, wc, bc, ctx.approximate, ctx.backend)  # recomputed GELU output
        hidden = h.shape[-1]
        need = ctx.needs_input_grad
        gw2 = (gout.reshape(-1, gout.shape[-1]).t() @ y.reshape(-1, hidden)).to(w2.dtype) if need[5] else None
        gb2 = gout.sum(dim=(0, 1)).to(w2.dtype) if need[6] else None
        del y
        gy = gout @ w2.to(dt)  # (B, N, 4C)
        gh, gwc, gbc = _dwconv3x3_gelu_backward_op(gy, h, hh, ww, wc, bc, ctx.approximate, ctx.backend)
        del gy
        gx = (gh @ w1.to(dt)).to(x.dtype) if need[0] else None
        gw1 = (gh.reshape(-1, hidden).t() @ x.to(dt).reshape(-1, x.shape[-1])).to(w1.dtype) if need[1] else None
        gb1 = gh.sum(dim=(0, 1)).to(w1.dtype) if need[2] else None
        return gx, gw1, gb1, gwc if need[3] else None, gbc if need[4] else None, gw2, gb2, None, None, None, None


class FusedMixFFN(nn.Module):
    """Mix-FFN using the fused depthwise conv + GELU op, with selectable activation memory.

    Args:
        dim: C, the token width.
        hidden_dim: the hidden width (4C in SegFormer).
        drop: dropout after GELU and after fc2 (0 in SegFormer). While training with drop > 0 the
            module runs the plain autograd composition (fc1 -> op -> dropout -> fc2), which keeps
            the usual activations, since the dropout masks would otherwise need keeping too.
        memory: "save" keeps x and fc1's output (5C per token against the reference's 13C);
            "recompute" keeps only x (C per token) and recomputes fc1 in backward.
        backend: "auto", "torch", "triton", "cpp" or "cuda", for the conv + GELU op.
        approximate: GELU approximation, "none" (erf) or "tanh".

    Shapes: forward(x (B, N, C), hw=(H, W)) -> (B, N, C), N = H * W.

    Example:
        >>> ffn = FusedMixFFN(64, 256, memory="recompute")
        >>> out = ffn(torch.randn(2, 7 * 9, 64), (7, 9))
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        drop: float = 0.0,
        memory: str = "save",
        backend: str = "auto",
        approximate: str = "none",
    ):
        super().__init__()
        MemoryMode.parse(memory, allowed=LAYER_MEMORY_MODES)
        if approximate not in ("none", "tanh"):
            raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.dwconv = nn.Conv2d(hidden_dim, hidden_dim, kernel_size=3, padding=1, groups=hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)
        self.memory = memory
        self.backend = validate_backend(backend, check_available=False)
        self.approximate = approximate

    @classmethod
    def from_reference(cls, module: nn.Module, **kwargs) -> "FusedMixFFN":
        """A FusedMixFFN sharing ``module``'s fc1, dwconv and fc2 (the same Parameter objects).

        ``module`` is a :class:`segformer_fast.nn.MixFFN` (or anything with those three layers and
        an optional ``drop``); ``kwargs`` go to the constructor (memory, backend, approximate).
        """
        drop = module.drop.p if isinstance(getattr(module, "drop", None), nn.Dropout) else 0.0
        kwargs.setdefault("drop", drop)
        new = cls(module.fc1.in_features, module.fc1.out_features, **kwargs)
        new.fc1, new.dwconv, new.fc2 = module.fc1, module.dwconv, module.fc2
        return new

    def extra_repr(self) -> str:
        return f"memory={self.memory!r}, backend={self.backend!r}, approximate={self.approximate!r}"

    @fp32_under_autocast
    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """x: (B, N, C) with N = H*W; returns (B, N, C)."""
        if x.dim() != 3 or x.shape[-1] != self.fc1.in_features:
            raise ValueError(f"x must be (B, N, {self.fc1.in_features}), got shape {tuple(x.shape)}")
        wc, bc = self.dwconv.weight, self.dwconv.bias
        if self.training and self.drop.p > 0:
            h = self.fc1(x)
            y = self.drop(dwconv3x3_gelu(h, hw, wc, bc, self.approximate, self.backend))
            return self.drop(self.fc2(y))
        hh, ww = int(hw[0]), int(hw[1])
        if hh * ww != x.shape[1]:
            raise ValueError(f"hw={tuple(hw)} does not match x of shape {tuple(x.shape)}: need H * W == N")
        return _MixFFNFunction.apply(
            x.contiguous(), self.fc1.weight, self.fc1.bias, wc, bc, self.fc2.weight, self.fc2.bias,
            (hh, ww), self.approximate, self.backend, self.memory == "save",
        )  # fmt: skip
