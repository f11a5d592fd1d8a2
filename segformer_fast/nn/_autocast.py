"""Autocast policy of the fused layers.

torch.autocast does not reach inside custom ops, so each fused layer applies autocast's rules itself,
the way the unpatched layer would meet them:

- its input and its GEMM weights (Linear / Conv weights and biases) are cast to the autocast dtype,
  as autocast casts them for the linears and convs the fused op replaces. The ops that accept fp32
  weights with fp16/bf16 activations (sr_attention, mix_ffn, mlp_gelu) cast them inside, so autograd
  keeps the fp32 parameters, not a 16-bit copy per call, and return fp32 weight gradients; for the
  others (the decoder's classifier, the SETR head convs) the layer casts, an autograd op, so the
  fp32 parameters receive their gradients through it;
- inside, autocast is off and the op runs in that dtype: every kernel accumulates in fp32 and keeps
  softmax, the log-sum-exp, LayerNorm and BatchNorm statistics and the loss in fp32 (see each op);
  what it saves for backward is in the autocast dtype (plus fp32 per-row / per-channel statistics);
- BatchNorm affine parameters and running statistics stay fp32 (the ops read them in fp32);
- the layer returns the autocast dtype, as the unpatched layer's last linear / conv / BN would.

fp64 inputs are left alone (autocast never lowers fp64), and outside autocast nothing changes.
"""

from __future__ import annotations

import torch

from ..ops.fused import cast

__all__ = ["autocast_dtype", "cast", "run_autocast"]


def _first(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else x[0]


def autocast_dtype(x) -> torch.dtype | None:
    """The dtype autocast runs a GEMM on ``x`` (a tensor or a sequence of them) in; None outside
    autocast, or when autocast would not lower it (fp64, integer)."""
    t = _first(x)
    dev = t.device.type
    if not torch.is_autocast_enabled(dev) or not t.is_floating_point() or t.dtype == torch.float64:
        return None
    return torch.get_autocast_dtype(dev)


def run_autocast(fn, x, *args, **kwargs):
    """``fn(x, *args, dtype=..., **kwargs)`` under the policy above.

    Under autocast ``x`` arrives cast to the autocast dtype, ``dtype`` is that dtype (for ``fn`` to
    cast its GEMM weights with :func:`cast`) and autocast is off inside; otherwise ``x`` is unchanged
    and ``dtype`` is None. Autocast is off inside for fp64 too: an op's fp32 internals must not be
    lowered behind its back.
    """
    dev = _first(x).device.type
    if not torch.is_autocast_enabled(dev):
        return fn(x, *args, dtype=None, **kwargs)
    dtype = autocast_dtype(x)
    with torch.autocast(dev, enabled=False):
        return fn(cast(x, dtype), *args, dtype=dtype, **kwargs)
