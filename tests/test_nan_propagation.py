"""A NaN in gives NaN out: every fused op and backend propagates a non-finite input as its reference does.

One element of one input is set to NaN (or +inf); the fused op's output and every gradient must be
NaN exactly where the reference's are (the ``isnan`` masks are compared, forward and backward). A
ReLU written as ``max(x, 0)`` / ``x > 0 ? x : 0`` maps NaN to 0 and fails here; so does a backward
that multiplies by a 0/1 mask (NaN * 0 is NaN where the reference's select gives 0).
The whole-model test plants one NaN pixel in a SegFormer-B0 input.
"""

import pytest
import torch
import torch.nn.functional as F

import segformer_fast as sf
from segformer_fast.backends import available_backends, cpu_extension
from segformer_fast.testing import backend_device, cuda_backend_unavailable_reason
from segformer_fast.ops import (conv_bn_relu_up, dwconv3x3_gelu, mix_ffn, mlp_gelu, sr_attention, upsample_cross_entropy,
                                upsample_sum)
from segformer_fast.ops.conv_bn_relu_up import conv_bn_relu_up_reference
from segformer_fast.ops.dwconv3x3_gelu import dwconv3x3_gelu_reference
from segformer_fast.ops.mix_ffn import mix_ffn_reference
from segformer_fast.ops.mlp_gelu import mlp_gelu_reference
from segformer_fast.ops.sr_attention import sr_attention_reference
from segformer_fast.ops.upsample_cross_entropy import upsample_cross_entropy_reference
from segformer_fast.ops.upsample_sum import upsample_sum_reference
from segformer_fast.nn.decode_head import AllMLPDecoder
from segformer_fast.nn.decode_head_fused import FusedAllMLPDecoder


def _skip_reason(backend, needs):
    if backend == "cuda":
        return cuda_backend_unavailable_reason(needs)
    status = available_backends()[backend]
    if not status.available:
        return f"{backend} backend unavailable: {status.reason}"
    if backend == "cpp" and not hasattr(cpu_extension(), needs):
        return f"segformer_fast._C_cpu was built without {needs}; rebuild with pip install --no-build-isolation -e ."
    return None


def _backends(needs):
    return [pytest.param(b, marks=pytest.mark.skipif(bool(r := _skip_reason(b, needs)), reason=r or ""), id=b)
            for b in ("torch", "triton", "cpp", "cuda")]


VALUES = [pytest.param(float("nan"), id="nan"), pytest.param(float("inf"), id="inf")]


def _plant(t: torch.Tensor, index, value) -> torch.Tensor:
    t = t.detach().clone()
    t[index] = value
    return t


def _bad(t: torch.Tensor, inputs) -> torch.Tensor:
    # NaN planted: NaN exactly where the reference's NaN are. inf planted: non-finite (inf or NaN) where
    # the reference's are non-finite; which of the two can differ between equal rewrites (inf - inf).
    planted_nan = any(i.is_floating_point() and i.isnan().any() for i in inputs)
    return t.isnan() if planted_nan else ~t.isfinite()


def _check_masks(fast, ref, inputs, grad_out=None):
    """fast(*inputs) and ref(*inputs): NaN (non-finite, for an inf) in the same places, output and every
    input gradient."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    leaves_ref = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out, out_ref = fast(*leaves), ref(*leaves_ref)
    assert _bad(out_ref, inputs).any(), "the planted value must reach the reference's output"
    assert torch.equal(_bad(out, inputs), _bad(out_ref, inputs)), (
        f"forward: {int(_bad(out, inputs).sum())} bad, the reference {int(_bad(out_ref, inputs).sum())}")
    g = torch.randn_like(out_ref) if grad_out is None else grad_out
    wrt = [i for i, t in enumerate(leaves) if t.requires_grad]
    grads = torch.autograd.grad(out, [leaves[i] for i in wrt], g, allow_unused=True)
    grads_ref = torch.autograd.grad(out_ref, [leaves_ref[i] for i in wrt], g, allow_unused=True)
    for i, a, b in zip(wrt, grads, grads_ref):
        a = torch.zeros_like(leaves[i]) if a is None else a
        b = torch.zeros_like(leaves[i]) if b is None else b
        assert torch.equal(_bad(a, inputs), _bad(b, inputs)), (
            f"gradient of input {i}: {int(_bad(a, inputs).sum())} bad, the reference {int(_bad(b, inputs).sum())}")


@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("backend", _backends("upsample_sum_fwd"))
def test_upsample_sum_propagates_nan(backend, relu, value):
    dev = backend_device(backend)
    D = 5
    maps = [torch.randn(2, D, 7, 9, device=dev), torch.randn(2, D, 4, 5, device=dev)]
    maps[1] = _plant(maps[1], (1, 2, 1, 3), value)
    scale, shift = torch.rand(D, device=dev) + 0.5, torch.randn(D, device=dev)
    # a negative planted value after the affine: -inf and NaN must both survive the ReLU as the reference's
    _check_masks(lambda a, b, s, t: upsample_sum([a, b], (13, 17), s, t, relu=relu, backend=backend),
                 lambda a, b, s, t: upsample_sum_reference([a, b], (13, 17), s, t, relu=relu),
                 [*maps, scale, shift])


@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("backend", _backends("dwconv3x3_gelu_fwd"))
def test_dwconv3x3_gelu_propagates_nan(backend, approximate, value):
    dev = backend_device(backend)
    h, w, c = 5, 6, 7
    x = _plant(torch.randn(2, h * w, c, device=dev), (1, 14, 3), value)
    wt, bs = torch.randn(c, 1, 3, 3, device=dev) * 0.5, torch.randn(c, device=dev)
    _check_masks(lambda x, wt, bs: dwconv3x3_gelu(x, (h, w), wt, bs, approximate=approximate, backend=backend),
                 lambda x, wt, bs: dwconv3x3_gelu_reference(x, (h, w), wt, bs, approximate),
                 [x, wt, bs])


@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("backend", _backends("dwconv3x3_gelu_fwd"))
def test_mix_ffn_propagates_nan(backend, value):
    dev = backend_device(backend)
    h, w, c = 4, 5, 6
    x = _plant(torch.randn(1, h * w, c, device=dev), (0, 7, 2), value)
    ps = [torch.randn(4 * c, c), torch.randn(4 * c), torch.randn(4 * c, 1, 3, 3), torch.randn(4 * c),
          torch.randn(c, 4 * c), torch.randn(c)]
    ps = [(p * 0.3).to(dev) for p in ps]
    _check_masks(lambda x, *p: mix_ffn(x, (h, w), *p, backend=backend),
                 lambda x, *p: mix_ffn_reference(x, (h, w), *p), [x, *ps])


@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("save_hidden", [True, False])
def test_mlp_gelu_propagates_nan(save_hidden, value):
    x = _plant(torch.randn(2, 5, 8), (1, 3, 4), value)
    ps = [torch.randn(16, 8) * 0.3, torch.randn(16), torch.randn(8, 16) * 0.3, torch.randn(8)]
    _check_masks(lambda *a: mlp_gelu(*a, save_hidden=save_hidden), mlp_gelu_reference, [x, *ps])


@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("training", [False, True])
def test_conv_bn_relu_up_propagates_nan(training, value):
    x = _plant(torch.randn(2, 4, 5, 7), (1, 2, 3, 4), value)
    wt = torch.randn(6, 4, 3, 3) * 0.3
    bnw, bnb = torch.rand(6) + 0.5, torch.randn(6)
    cw, cb = torch.randn(3, 6, 1, 1), torch.randn(3)
    mean, var = torch.randn(6) * 0.1, torch.rand(6) + 0.5

    def run(fn):
        return lambda x, wt, bnw, bnb, cw, cb: fn(x, wt, bnw, bnb, mean.clone(), var.clone(), training=training,
                                                  scale=2, cls_weight=cw, cls_bias=cb)

    _check_masks(run(conv_bn_relu_up), run(conv_bn_relu_up_reference), [x, wt, bnw, bnb, cw, cb])


@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("sr", [1, 2])
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_sr_attention_propagates_nan(backend, sr, value):
    reason = _skip_reason(backend, "sr_attention_patchify")
    if reason:
        pytest.skip(reason)
    dev = backend_device(backend)
    h, w, c, heads = 4, 6, 64, 2
    x = _plant(torch.randn(1, h * w, c, device=dev), (0, 9, 5), value)
    names = ["q_weight", "q_bias", "k_weight", "k_bias", "v_weight", "v_bias", "proj_weight", "proj_bias"]
    shapes = [(c, c), (c,)] * 4
    if sr > 1:
        names += ["sr_weight", "sr_bias", "norm_weight", "norm_bias"]
        shapes += [(c, c, sr, sr), (c,), (c,), (c,)]
    ps = [(torch.randn(s) * 0.1).to(dev) for s in shapes]

    def run(fn, **kw):
        return lambda x, *p: fn(x, (h, w), heads, sr=sr, **dict(zip(names, p)), **kw)

    _check_masks(run(sr_attention, backend=backend), run(sr_attention_reference), [x, *ps])


@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("backend", _backends("upsample_cross_entropy_fwd"))
def test_upsample_cross_entropy_propagates_nan(backend, value):
    dev = backend_device(backend)
    logits = _plant(torch.randn(2, 5, 4, 6, device=dev), (1, 2, 1, 3), value)
    labels = torch.randint(0, 5, (2, 11, 13), device=dev)
    _check_masks(lambda z: upsample_cross_entropy(z, labels, reduction="none", backend=backend),
                 lambda z: upsample_cross_entropy_reference(z, labels, reduction="none"), [logits])


@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("backend", _backends("upsample_sum_fwd"))
def test_all_mlp_decoder_propagates_nan(backend, mode, value):
    dev = backend_device(backend)
    channels, dim = (4, 6, 8, 10), 12
    ref = AllMLPDecoder(channels, dim, 3, dropout=0.0).to(dev)
    with torch.no_grad():
        ref.bn.running_var.uniform_(0.5, 2.0)
    fused = FusedAllMLPDecoder(channels, dim, 3, dropout=0.0, backend=backend).to(dev)
    fused.load_state_dict(ref.state_dict())
    ref.train(mode == "train"), fused.train(mode == "train")
    sizes = [(9, 11), (5, 6), (3, 3), (2, 2)]
    feats = [torch.randn(2, c, *s, device=dev) for c, s in zip(channels, sizes)]
    feats[2] = _plant(feats[2], (1, 3, 1, 2), value)
    _check_masks(lambda *f: fused(list(f)), lambda *f: ref(list(f)), feats)


@pytest.mark.parametrize("backend", _backends("upsample_sum_fwd"))
def test_segformer_nan_pixel_gives_nan_logits(backend):
    """SegFormer-B0 with one NaN pixel: NaN logits exactly where the reference model has them."""
    dev = backend_device(backend)
    torch.manual_seed(0)
    ref = sf.segformer("b0", num_classes=4, backend="torch", depths=(1, 1, 1, 1)).to(dev).eval()
    fast = sf.segformer("b0", num_classes=4, backend=backend, depths=(1, 1, 1, 1)).to(dev).eval()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(1, 3, 64, 64, device=dev)
    x[0, 1, 40, 21] = float("nan")
    with torch.no_grad():
        out, out_ref = fast(x), ref(x)
    assert out_ref.isnan().any()
    assert torch.equal(out.isnan(), out_ref.isnan()), (
        f"{int(out.isnan().sum())} NaN logits, the reference {int(out_ref.isnan().sum())} of {out.numel()}")
