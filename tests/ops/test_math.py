"""segformer_fast.ops.math_utils (the PyTorch paths' shared math) against PyTorch's own modules and autograd."""

import pytest
import torch
import torch.nn.functional as F

from segformer_fast.ops.math_utils import (
    batch_norm_backward,
    batch_norm_fold,
    batch_stats,
    bilinear_taps,
    bilinear_window,
    gelu_grad,
    unbiased_var,
    update_running_stats,
)


@pytest.mark.parametrize("n_in, n_out", [(7, 27), (5, 9), (4, 4), (9, 5), (1, 6)])
def test_bilinear_taps_are_interpolates_weights(n_in, n_out):
    i0, i1, l1 = bilinear_taps(n_in, n_out, 0, n_out, "cpu")
    mat = torch.zeros(n_out, n_in)
    mat.index_put_((torch.arange(n_out), i0), 1.0 - l1, accumulate=True)
    mat.index_put_((torch.arange(n_out), i1), l1, accumulate=True)
    x = torch.randn(1, 1, n_in, 3)
    ref = F.interpolate(x, size=(n_out, 3), mode="bilinear", align_corners=False)[0, 0]  # (n_out, 3)
    torch.testing.assert_close(mat @ x[0, 0], ref, rtol=1e-6, atol=1e-6)
    if n_out >= n_in:  # every output index that reads input i lies in the window (upsampling, as the kernels use it)
        for i in range(n_in):
            readers = torch.nonzero((i0 == i) & (l1 < 1) | (i1 == i) & (l1 > 0)).flatten()
            lo = max(int(((i - 0.5) * n_out / n_in - 0.5) // 1) - 1, 0)
            assert readers.numel() == 0 or lo <= int(readers.min()) and int(readers.max()) < lo + bilinear_window(n_in, n_out)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_grad_is_autograds(approximate):
    z = torch.linspace(-6, 6, 241, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(F.gelu(z, approximate=approximate).sum(), z)
    torch.testing.assert_close(gelu_grad(z.detach(), approximate), g, rtol=1e-7, atol=1e-7)


def test_fold_and_running_stats_are_batch_norms():
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(5, momentum=0.3).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.normal_(), bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2)
    x = torch.randn(3, 5, 7, 9, dtype=torch.float64)
    scale, shift = batch_norm_fold(bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
    torch.testing.assert_close(scale.view(1, -1, 1, 1) * x + shift.view(1, -1, 1, 1), bn.eval()(x))

    mean, var, count = batch_stats(x.transpose(0, 1).reshape(5, -1), 1)
    assert count == 3 * 7 * 9
    stats = [bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()]
    update_running_stats(*stats[:2], mean, unbiased_var(var, count), bn.momentum, stats[2])
    bn.train()(x)
    for got, want in zip(stats, (bn.running_mean, bn.running_var, bn.num_batches_tracked)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)

    bn.momentum = None  # cumulative average
    update_running_stats(*stats[:2], mean, unbiased_var(var, count), None, stats[2])
    bn(x)
    for got, want in zip(stats, (bn.running_mean, bn.running_var, bn.num_batches_tracked)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_backward_is_autograds(affine):
    torch.manual_seed(1)
    x = torch.randn(2, 4, 5, 3, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_() if affine else None
    b = torch.randn(4, dtype=torch.float64).requires_grad_() if affine else None
    y = F.batch_norm(x, None, None, w, b, training=True, eps=1e-5)
    g = torch.cos(3 * y.detach())
    want = torch.autograd.grad(y, [x] + ([w, b] if affine else []), g)

    mean, var, count = batch_stats(x.detach(), (0, 2, 3))
    invstd = torch.rsqrt(var + 1e-5)
    xhat = (x.detach() - mean.view(1, -1, 1, 1)) * invstd.view(1, -1, 1, 1)
    scale = w.detach() * invstd if affine else invstd
    gx, gw, gb = batch_norm_backward(g.clone(), xhat, scale, count, (0, 2, 3))
    torch.testing.assert_close(gx, want[0])
    if affine:
        torch.testing.assert_close(gw, want[1])
        torch.testing.assert_close(gb, want[2])
