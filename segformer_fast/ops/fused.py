"""The one way to make a fused op: a forward and a backward ``torch.library`` custom op, their fakes
(shapes for torch.compile / export) and the autograd formula joining them, registered together.

The fused ops are made by :func:`fused_op` (sr_attention, dwconv3x3_gelu, upsample_sum,
upsample_cross_entropy, mix_ffn, mlp_gelu); conv_bn_relu_up and all_mlp_decoder stay
torch.autograd.Functions because they take a process group (SyncBatchNorm semantics), which is no
custom-op argument type. ``segformer_fast::<name>`` and ``segformer_fast::<name>_backward`` are
opaque to torch.compile (no graph break, no tracing into kernels), and the backward is itself an op,
so double backward is refused rather than silently wrong. The public function in each op's op.py
validates its arguments (ValueError / TypeError naming the problem) and calls the forward op.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["fused_op", "cast", "in_dtype_of"]


def fused_op(name: str, forward: Callable, forward_fake: Callable, backward: Callable, backward_fake: Callable,
             setup_context: Callable, grads: Callable):
    """Registers ``segformer_fast::<name>`` (``forward``) and ``segformer_fast::<name>_backward``
    (``backward``), with their fake implementations and autograd (``setup_context``, ``grads``).

    Args:
        name: the op's name.
        forward, backward: the ops' bodies, fully type-annotated (the schema is inferred from them).
        forward_fake, backward_fake: the same signatures, returning empty tensors of the right shapes.
        setup_context: ``(ctx, inputs, output)``, saves what ``grads`` needs.
        grads: ``(ctx, *grad_outputs)`` -> one gradient (or None) per input of ``forward``; it calls
            the backward op.
    Returns:
        (forward op, backward op), callable like functions.

    Example:
        >>> fwd_op, bwd_op = fused_op("my_op", _fwd, _fwd_fake, _bwd, _bwd_fake, _setup, _grads)
    """
    fwd_op = torch.library.custom_op(f"segformer_fast::{name}", forward, mutates_args=())
    fwd_op.register_fake(forward_fake)
    bwd_op = torch.library.custom_op(f"segformer_fast::{name}_backward", backward, mutates_args=())
    bwd_op.register_fake(backward_fake)
    fwd_op.register_autograd(grads, setup_context=setup_context)
    return fwd_op, bwd_op


def cast(t, dtype: torch.dtype | None):
    """``t`` (a tensor, None, or a list/tuple of them) in ``dtype``; unchanged when ``dtype`` is None.
    Only floating tensors are cast."""
    if dtype is None or t is None:
        return t
    if isinstance(t, (list, tuple)):
        return type(t)(cast(u, dtype) for u in t)
    return t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t


def in_dtype_of(x: torch.Tensor, *tensors):
    """``tensors`` (None stays None) in x's dtype, as a tuple.

    The ops built on PyTorch GEMMs take their weights in x's dtype or, under mixed precision, in fp32
    with fp16/bf16 activations: they cast here, inside the op, so that autograd keeps the fp32
    parameter (which exists anyway) and not a 16-bit copy per call, and the backward casts again.
    """
    return cast(tensors, x.dtype)
