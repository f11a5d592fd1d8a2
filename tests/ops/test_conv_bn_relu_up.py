"""conv_bn_relu_up (fused) against its reference: forward, every gradient, running statistics, memory."""

import pytest
import torch

from segformer_fast.ops.conv_bn_relu_up import conv_bn_relu_up, conv_bn_relu_up_reference
from segformer_fast.utils.memory import SavedTensorRecorder


def _params(c_in, c_out, k, classes, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    p = dict(weight=torch.randn(c_out, c_in, k, k, generator=g, dtype=dtype) * 0.3,
             bn_weight=torch.rand(c_out, generator=g, dtype=dtype) + 0.5,
             bn_bias=torch.randn(c_out, generator=g, dtype=dtype) * 0.1)
    if classes:
        p["cls_weight"] = torch.randn(classes, c_out, 1, 1, generator=g, dtype=dtype) * 0.3
        p["cls_bias"] = torch.randn(classes, generator=g, dtype=dtype)
    return p


@pytest.mark.parametrize("shape", [(1, 3, 7, 9), (3, 5, 4, 6)])
@pytest.mark.parametrize("k, scale, classes", [(3, 2, 0), (1, 1, 4), (3, 4, 5), (3, 1, 0)])
def test_train_forward_backward_and_running_stats(shape, k, scale, classes):
    b, c_in, h, w = shape
    p = _params(c_in, 6, k, classes)
    x = torch.randn(*shape, dtype=torch.float64)
    stats = {name: (torch.randn(6, dtype=torch.float64) * 0.1, torch.rand(6, dtype=torch.float64) + 0.5)
             for name in ("ref", "fast")}
    stats["fast"] = tuple(t.clone() for t in stats["ref"])
    outs, grads = {}, {}
    for name, fn in (("ref", conv_bn_relu_up_reference), ("fast", conv_bn_relu_up)):
        leaves = {n: t.clone().requires_grad_() for n, t in p.items()}
        xi = x.clone().requires_grad_()
        out = fn(xi, *(leaves[n] for n in ("weight", "bn_weight", "bn_bias")), *stats[name], training=True,
                 momentum=0.1, eps=1e-5, scale=scale, cls_weight=leaves.get("cls_weight"), cls_bias=leaves.get("cls_bias"))
        gout = torch.cos(out * 3)  # a fixed, non-uniform output gradient
        out.backward(gout)
        outs[name] = out.detach()
        grads[name] = [xi.grad] + [leaves[n].grad for n in sorted(leaves)]
    assert outs["fast"].shape == (b, classes or 6, h * scale, w * scale)
    torch.testing.assert_close(outs["fast"], outs["ref"], rtol=1e-10, atol=1e-10)
    for gf, gr in zip(grads["fast"], grads["ref"]):
        torch.testing.assert_close(gf, gr, rtol=1e-9, atol=1e-10)
    for sf, sr in zip(stats["fast"], stats["ref"]):
        torch.testing.assert_close(sf, sr, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("classes", [0, 4])
def test_eval_folds_batch_norm(classes):
    p = _params(5, 6, 3, classes, dtype=torch.float32)
    mean, var = torch.randn(6) * 0.2, torch.rand(6) + 0.5
    x = torch.randn(2, 5, 7, 9)
    args = (x, p["weight"], p["bn_weight"], p["bn_bias"], mean, var)
    kw = dict(training=False, eps=1e-5, scale=2, cls_weight=p.get("cls_weight"), cls_bias=p.get("cls_bias"))
    torch.testing.assert_close(conv_bn_relu_up(*args, **kw), conv_bn_relu_up_reference(*args, **kw), rtol=1e-5, atol=1e-5)


def test_training_keeps_only_the_input():
    p = {n: t.float().requires_grad_() for n, t in _params(8, 16, 3, 0).items()}
    x = torch.randn(1, 8, 16, 16, requires_grad=True)
    sizes = {}
    for name, fn in (("ref", conv_bn_relu_up_reference), ("fast", conv_bn_relu_up)):
        with SavedTensorRecorder(list(p.values())) as rec:
            fn(x, p["weight"], p["bn_weight"], p["bn_bias"], None, None, training=True, scale=2)
        sizes[name] = rec.bytes
    per_map = 16 * 16 * 16 * 4
    assert sizes["fast"] < x.numel() * 4 + per_map // 10  # x and per-channel statistics only
    assert sizes["ref"] >= 2 * per_map


def test_bad_shapes_raise():
    p = _params(5, 6, 3, 0, dtype=torch.float32)
    with pytest.raises(ValueError, match="do not fit"):
        conv_bn_relu_up(torch.randn(1, 4, 7, 9), p["weight"], p["bn_weight"], p["bn_bias"], None, None, training=True)
    with pytest.raises(ValueError, match="cls_weight"):
        conv_bn_relu_up(torch.randn(1, 5, 7, 9), p["weight"], p["bn_weight"], p["bn_bias"], None, None, training=True,
                        cls_weight=torch.randn(3, 5, 1, 1))
