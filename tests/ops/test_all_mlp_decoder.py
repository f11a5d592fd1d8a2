"""all_mlp_decoder (fold identity, eval pass, training autograd) against its functional reference."""

import pytest
import torch

from segformer_fast.backends import available_backends
from segformer_fast.ops.all_mlp_decoder import (
    all_mlp_decoder_eval,
    all_mlp_decoder_reference,
    all_mlp_decoder_train,
    fold_weights,
)
from segformer_fast.ops.math_utils import batch_norm_fold

C, D, K = (8, 12, 20, 24), 16, 5


def _params(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: (torch.randn(*s, generator=g) * 0.3).to(dtype)  # noqa: E731
    return dict(weights=[r(D, c) for c in C], biases=[r(D) for _ in C], fuse_weight=r(D, 4 * D, 1, 1),
                bn_weight=r(D) + 1, bn_bias=r(D), running_mean=r(D), running_var=r(D).abs() + 0.5,
                cls_weight=r(K, D, 1, 1), cls_bias=r(K))


def _features(dtype=torch.float64):
    sizes = [(9, 13), (5, 7), (3, 4), (2, 2)]
    return [torch.randn(2, c, h, w, dtype=dtype) for c, (h, w) in zip(C, sizes)]


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_eval_matches_reference(backend):
    if not available_backends()[backend].available:
        pytest.skip(available_backends()[backend].reason)
    p, feats = _params(), _features()
    ref = all_mlp_decoder_reference(feats, **p)
    A, a = fold_weights(p["fuse_weight"], p["weights"], p["biases"])
    scale, shift = batch_norm_fold(p["bn_weight"], p["bn_bias"], p["running_mean"], p["running_var"], 1e-5)
    f32 = lambda t: t.float()  # noqa: E731
    out = all_mlp_decoder_eval([f32(f) for f in feats], [f32(t) for t in A], [f32(t) for t in a], f32(scale),
                               f32(shift), f32(p["cls_weight"]).view(K, D), f32(p["cls_bias"]), backend)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_train_matches_reference_forward_and_gradients(backend):
    if not available_backends()[backend].available:
        pytest.skip(available_backends()[backend].reason)
    dtype = torch.float64 if backend == "torch" else torch.float32  # the kernel backends take fp32/16-bit only
    p, feats = _params(dtype), _features(dtype)
    leaves = {k: (v.requires_grad_() if isinstance(v, torch.Tensor) else [t.requires_grad_() for t in v])
              for k, v in p.items() if k not in ("running_mean", "running_var")}
    feats = [f.requires_grad_() for f in feats]
    rm, rv = p["running_mean"].clone(), p["running_var"].clone()
    ref = all_mlp_decoder_reference(feats, **{**p, "running_mean": rm, "running_var": rv}, training=True)
    A, a = fold_weights(p["fuse_weight"], p["weights"], p["biases"])
    out, mean, var = all_mlp_decoder_train(feats, A, a, p["bn_weight"], p["bn_bias"], p["cls_weight"].view(K, D),
                                           p["cls_bias"], eps=1e-5, backend=backend)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)  # batch statistics are taken in fp32
    torch.testing.assert_close(p["running_mean"] * 0.9 + mean * 0.1, rm)
    torch.testing.assert_close(p["running_var"] * 0.9 + var * 0.1, rv)
    inputs = feats + [t for v in leaves.values() for t in (v if isinstance(v, list) else [v])]
    g = torch.randn_like(ref)
    for i, (x, y) in enumerate(zip(torch.autograd.grad(out, inputs, g), torch.autograd.grad(ref, inputs, g))):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=f"input {i}")
