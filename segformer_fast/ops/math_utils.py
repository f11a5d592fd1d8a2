"""Math shared by the PyTorch paths of the ops and layers (fp32 unless stated).

- PyTorch's bilinear source index (``upsample_bilinear2d``, align_corners=False): with
  scale = n_in / n_out in fp32, output index o reads src = max(scale (o + 0.5) - 0.5, 0), the taps
  i0 = floor(src) and i1 = i0 + (i0 < n_in - 1), with weights 1 - l1 and l1 = src - i0 (clamped to
  [0, 1]). :func:`bilinear_window` bounds the output indices that read one input index (the
  kernels' adjoint gathers).
- :func:`gelu_grad`: GELU'(z), erf or tanh form.
- BatchNorm: :func:`batch_norm_fold` (running statistics -> per-channel affine),
  :func:`batch_stats` (the batch mean and biased variance, over every rank of a process group as
  nn.SyncBatchNorm), :func:`update_running_stats` (momentum, PyTorch's unbiased variance) and
  :func:`batch_norm_backward` (the input gradient from the batch statistics, sums all-reduced
  over the group as SyncBatchNorm's backward).

The same math in C++/CUDA is csrc/common/{bilinear,gelu}.h, in Triton segformer_fast/ops/triton_math.py.
"""

from __future__ import annotations

import math

import torch

from ..utils.distributed import all_reduce_sum, sync_batch_stats

__all__ = [
    "bilinear_taps",
    "bilinear_window",
    "gelu_grad",
    "batch_norm_affine",
    "batch_norm_fold",
    "batch_stats",
    "unbiased_var",
    "update_running_stats",
    "batch_norm_backward",
]


def bilinear_taps(
    n_in: int, n_out: int, start: int, stop: int, device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PyTorch's bilinear taps of output indices [start, stop) reading an axis of n_in (align_corners=False).

    Returns:
        (i0, i1, l1), each (stop - start,): the two input indices read (int64) and the weight of i1
        (fp32; that of i0 is 1 - l1).

    Example:
        >>> bilinear_taps(2, 4, 0, 4, "cpu")[2]
        tensor([0.0000, 0.2500, 0.7500, 0.0000])
    """
    o = torch.arange(start, stop, dtype=torch.float32, device=device)
    scale = torch.tensor(n_in, dtype=torch.float32) / torch.tensor(n_out, dtype=torch.float32)
    src = (scale.to(device) * (o + 0.5) - 0.5).clamp_min(0.0)
    i0 = src.long()
    l1 = (src - i0).clamp(0.0, 1.0)
    i1 = torch.where(i0 < n_in - 1, i0 + 1, i0)
    return i0, i1, l1


def bilinear_window(n_in: int, n_out: int) -> int:
    """How many output indices from the first that can read an input index (less one of margin) may read it.

    Output indices reading one input index lie in a run of at most 2 / scale + 2; plus the margin
    of the window start. Never more than the whole output axis (the start is >= 0).
    """
    return min(int(math.ceil(2.0 * n_out / n_in)) + 4, n_out)


def gelu_grad(z: torch.Tensor, approximate: str) -> torch.Tensor:
    """dGELU/dz, fp32. approximate: "none" (erf GELU) or "tanh".

    erf: Phi(z) + z exp(-z^2 / 2) / sqrt(2 pi). tanh: 0.5 (1 + t) + 0.5 z (1 - t^2) du/dz with
    t = tanh(u), u = sqrt(2 / pi) (z + 0.044715 z^3), du/dz = sqrt(2 / pi) (1 + 0.134145 z^2).
    """
    if approximate == "tanh":
        k0 = 0.7978845608028654  # sqrt(2 / pi)
        t = torch.tanh(k0 * (z + 0.044715 * z**3))
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * k0 * (1.0 + 0.134145 * z * z)
    cdf = 0.5 * (1.0 + torch.erf(z * 0.7071067811865476))
    return cdf + z * torch.exp(-0.5 * z * z) * 0.3989422804014327


def batch_norm_affine(
    weight: torch.Tensor | None, bias: torch.Tensor | None, mean: torch.Tensor, invstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm with fixed statistics as a per-channel affine: BN(x) = scale * x + shift.

    Args:
        weight, bias: (C,) BatchNorm's affine, or None (affine=False). mean, invstd: (C,), invstd = 1 / sqrt(var + eps).
    Returns:
        (scale, shift), (C,): scale = weight * invstd, shift = bias - mean * scale.
    """
    scale = invstd if weight is None else weight * invstd
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    return scale, shift


def batch_norm_fold(
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm (running statistics) as a per-channel affine (scale, shift), each (C,).

    A conv (C_out, ...) followed by it folds into the conv W' = W * scale, b' = shift.

    Example:
        >>> bn = torch.nn.BatchNorm2d(4).eval()
        >>> scale, shift = batch_norm_fold(bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
    """
    return batch_norm_affine(weight, bias, running_mean, torch.rsqrt(running_var + eps))


def batch_stats(x: torch.Tensor, dim: int | tuple[int, ...], group=None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The batch statistics of training-mode BatchNorm: per-channel mean and biased variance.

    Args:
        x: the values, reduced over ``dim`` (the channel dimension is the one left), in the dtype
            to accumulate in. group: a torch.distributed process group: the statistics of every
            rank's values together, as nn.SyncBatchNorm (None: this process's only).
    Returns:
        (mean, var, count): (C,) each, and the number of values per channel (over all ranks).
    """
    var, mean = torch.var_mean(x, dim=dim, correction=0)
    count = 1
    for d in (dim,) if isinstance(dim, int) else dim:
        count *= x.shape[d]
    if group is not None:
        mean, var, count = sync_batch_stats(mean, var, count, group)
    return mean, var, count


def unbiased_var(var: torch.Tensor, count: int) -> torch.Tensor:
    """The unbiased variance from the biased one over ``count`` values: var * n / (n - 1), as BatchNorm keeps.

    (count = 1, which BatchNorm refuses in training, gives var rather than a division by zero.)
    """
    return var * count / max(count - 1, 1)


def update_running_stats(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    mean: torch.Tensor,
    var_unbiased: torch.Tensor,
    momentum: float | None,
    num_batches_tracked: torch.Tensor | None = None,
) -> None:
    """nn.BatchNorm's update of its buffers from a batch's mean and unbiased variance (:func:`unbiased_var`).

    running = (1 - momentum) * running + momentum * batch, in place and without autograd;
    momentum None: the cumulative average, momentum = 1 / num_batches_tracked. num_batches_tracked
    (a one-element tensor), when given, is incremented first, as BatchNorm does.
    """
    with torch.no_grad():
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        if momentum is None:
            momentum = 1.0 / float(num_batches_tracked)
        running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        running_var.mul_(1 - momentum).add_(var_unbiased.to(running_var.dtype), alpha=momentum)


def batch_norm_backward(
    g: torch.Tensor, xhat: torch.Tensor, scale: torch.Tensor, count: int, dim: int | tuple[int, ...], group=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training-mode BatchNorm's backward from its output gradient, with SyncBatchNorm semantics over ``group``.

    With xhat = (x - mean) * invstd and y = weight * xhat + bias:
        dL/dweight = sum(g * xhat),  dL/dbias = sum(g)            (this rank's sums: DDP averages them)
        dL/dx = weight * invstd * (g - sum(g) / n - xhat * sum(g * xhat) / n)
    where the sums in dL/dx run over every rank of ``group`` (all-reduced), n is ``count``, the
    values per channel of the global batch. In place: g becomes dL/dx and xhat is overwritten.

    Args:
        g: dL/dy, any layout with the channel the one dimension not in ``dim``; xhat: the same
            shape and dtype. scale: (C,) weight * invstd (invstd without an affine weight).
        count: values per channel over all ranks. dim: the dimensions summed over.
        group: a torch.distributed process group, or None.
    Returns:
        (dL/dx (which is g), dL/dweight, dL/dbias), the last two (C,).
    """
    dims = (dim,) if isinstance(dim, int) else dim
    shape = [1 if d in dims else -1 for d in range(g.ndim)]  # (C,) broadcast along the channel dimension
    sum_g, sum_gx = g.sum(dim), (g * xhat).sum(dim)
    dweight, dbias = sum_gx, sum_g
    if group is not None:
        sum_g, sum_gx = all_reduce_sum([sum_g, sum_gx], group)
    gx = g.sub_((sum_g / count).view(shape)).sub_(xhat.mul_((sum_gx / count).view(shape))).mul_(scale.view(shape))
    return gx, dweight, dbias
