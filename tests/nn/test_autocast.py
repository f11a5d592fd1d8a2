"""Fused layers under torch.autocast: computed in the autocast dtype, as autocast runs the unpatched layer.

Each case runs one layer three ways on the same weights and inputs: the reference layer in fp64 (the
oracle), the reference layer under autocast (PyTorch's own low-precision path) and the fused layer
under autocast; the fused layer's output and every gradient (input and parameters) must satisfy
err(fused, fp64) <= 2 * err(PyTorch autocast, fp64) + atol (segformer_fast.testing.precision). It
must also return the dtype the reference returns, and keep nothing activation-sized in fp32.
"""

from __future__ import annotations

import copy

import pytest
import torch

from segformer_fast.nn import AllMLPDecoder, MixFFN, SpatialReductionAttention
from segformer_fast.nn.attention_fused import FusedSpatialReductionAttention
from segformer_fast.nn.decode_head_fused import FusedAllMLPDecoder
from segformer_fast.nn.mix_ffn_fused import FusedMixFFN
from segformer_fast.nn.mlp import FusedMlp, Mlp
from segformer_fast.nn.setr_heads import ConvBNReLU
from segformer_fast.nn.setr_heads_fused import FusedConvBNReLU
from segformer_fast.testing import backend_device, interpreter_unavailable_reason, perturb_parameters
from segformer_fast.testing.precision import assert_lowp_close

DTYPES = (torch.bfloat16, torch.float16)
# unit roundoff: atol is one rounding of the largest reference value, for entries PyTorch gets exactly
_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _run(module, inputs, args, dy, autocast_dtype, device, fp32_saved=None, weight_copies=None):
    """(output, {name: grad}) of one forward + backward with upstream gradient dy; the numel of each
    fp32 tensor the forward saves for backward is appended to ``fp32_saved``, the shape of each saved
    16-bit tensor shaped like a parameter to ``weight_copies``."""
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]

    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    param_shapes = {tuple(p.shape) for p in module.parameters() if p.dim() > 1}

    def keep(t):  # the fp32 parameters themselves cost nothing extra
        if fp32_saved is not None and t.dtype == torch.float32 and t.untyped_storage().data_ptr() not in params:
            fp32_saved.append(t.numel())
        if weight_copies is not None and t.dtype in DTYPES and tuple(t.shape) in param_shapes:
            weight_copies.append(tuple(t.shape))
        return t

    with torch.autocast(device, dtype=autocast_dtype, enabled=autocast_dtype is not None), \
            torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        out = module(inputs if len(inputs) > 1 else inputs[0], *args)
    (out.to(dy.dtype) * dy).sum().backward()
    grads = {f"input{i}": t.grad for i, t in enumerate(inputs)}
    grads.update({n: p.grad for n, p in module.named_parameters() if p.grad is not None})
    return out, grads


def _check(ref_module, fused_module, inputs, args, dtype, device, fp32_limit, keeps_weight_copies=True):
    """Compare fused-under-autocast against reference-under-autocast, both against fp64. Unless
    ``keeps_weight_copies``, autograd must keep no 16-bit copy of a weight matrix (the op casts inside)."""
    ref64 = copy.deepcopy(ref_module).double()
    inputs64 = [t.double() for t in inputs]
    with torch.no_grad():
        shape = ref64(inputs64 if len(inputs64) > 1 else inputs64[0], *args).shape
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(7)).to(device)
    out64, g64 = _run(ref64, inputs64, args, dy.double(), None, device)
    out_t, g_t = _run(copy.deepcopy(ref_module), inputs, args, dy, dtype, device)
    fp32_saved = []  # numel of every fp32 tensor autograd keeps for the fused layer
    weight_copies = []
    out, g = _run(fused_module, inputs, args, dy, dtype, device, fp32_saved, weight_copies)
    assert out.dtype == out_t.dtype, f"fused layer returns {out.dtype}, the reference {out_t.dtype} under autocast"
    assert set(g) == set(g_t), f"gradients of {sorted(set(g_t) ^ set(g))} differ"
    for name in g:
        assert g[name].dtype == g_t[name].dtype, f"{name}: gradient {g[name].dtype}, reference {g_t[name].dtype}"
    rel = _ROUNDOFF[dtype]
    assert_lowp_close(out, out_t, out64, atol=rel * float(out64.detach().abs().max()), name="output")
    for name in g64:
        assert_lowp_close(g[name], g_t[name], g64[name], atol=rel * float(g64[name].abs().max()), name=f"grad {name}")
    big = [n for n in fp32_saved if n > fp32_limit]
    assert not big, f"fp32 tensors of {big} elements saved for backward under autocast (limit {fp32_limit})"
    assert keeps_weight_copies or not weight_copies, f"16-bit weight copies kept for backward: {weight_copies}"


def _device(backend, dtype):
    if backend == "triton" and dtype == torch.bfloat16 and interpreter_unavailable_reason() is None:
        pytest.skip("bfloat16 through Triton's interpreter is wrong (bf16 tl.dot); runs on a GPU")
    return backend_device(backend)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
@pytest.mark.parametrize("sr", [1, 2])
def test_attention(backend, sr, dtype):
    device = _device(backend, dtype)
    ref = perturb_parameters(SpatialReductionAttention(64, 2, sr_ratio=sr)).to(device)
    fused = FusedSpatialReductionAttention.from_reference(copy.deepcopy(ref), backend=backend)
    x = torch.randn(3, 7 * 9, 64, device=device)
    _check(ref, fused, [x], ((7, 9),), dtype, device, fp32_limit=3 * 2 * 63,  # lse (B, h, N) only
           keeps_weight_copies=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ["torch", "cpp", "triton", "cuda"])
@pytest.mark.parametrize("memory", ["save", "recompute"])
def test_mix_ffn(backend, memory, dtype):
    device = _device(backend, dtype)
    ref = perturb_parameters(MixFFN(24, 40)).to(device)
    fused = FusedMixFFN.from_reference(copy.deepcopy(ref), memory=memory, backend=backend)
    x = torch.randn(2, 13 * 11, 24, device=device)
    _check(ref, fused, [x], ((13, 11),), dtype, device, fp32_limit=0, keeps_weight_copies=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("memory", ["save", "recompute"])
def test_mlp(memory, dtype):
    ref = perturb_parameters(Mlp(24, 40))
    fused = FusedMlp(24, 40, memory=memory)
    fused.load_state_dict(ref.state_dict())
    _check(ref, fused, [torch.randn(3, 17, 24)], (), dtype, "cpu", fp32_limit=0, keeps_weight_copies=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ["torch", "cpp", "triton", "cuda"])
@pytest.mark.parametrize("training", [True, False])
def test_decoder(backend, training, dtype):
    device = _device(backend, dtype)
    chans = (8, 16, 24, 32)
    ref = perturb_parameters(AllMLPDecoder(chans, 16, 5, dropout=0.0)).to(device).train(training)
    with torch.no_grad():
        ref.bn.running_mean.uniform_(-0.2, 0.2)
        ref.bn.running_var.uniform_(0.5, 1.5)
    fused = FusedAllMLPDecoder.from_reference(copy.deepcopy(ref), backend=backend)
    sizes = ((13, 15), (7, 8), (4, 4), (2, 2))
    feats = [torch.randn(2, c, h, w, device=device) for c, (h, w) in zip(chans, sizes)]
    # fp32: the folded weights (D, C_i) and per-channel statistics; nothing per pixel
    _check(ref, fused, feats, (), dtype, device, fp32_limit=16 * 32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False])
def test_conv_bn_relu_up(training, dtype):
    ref = perturb_parameters(ConvBNReLU(12, 8, kernel_size=3, scale=2)).train(training)
    with torch.no_grad():
        ref.bn.running_mean.uniform_(-0.2, 0.2)
        ref.bn.running_var.uniform_(0.5, 1.5)
    fused = FusedConvBNReLU(12, 8, kernel_size=3, scale=2).train(training)
    fused.load_state_dict(ref.state_dict())
    # fp32: per-channel statistics and, in eval, the fp32 fold of the conv weight (weight-sized)
    _check(ref, fused, [torch.randn(2, 12, 9, 7)], (), dtype, "cpu", fp32_limit=8 * 12 * 3 * 3)


def test_fp64_is_left_alone_under_autocast():
    """autocast never lowers fp64: a fp64 layer stays fp64 inside an autocast region."""
    ref = SpatialReductionAttention(32, 1, sr_ratio=2).double()
    fused = FusedSpatialReductionAttention.from_reference(ref)
    x = torch.randn(1, 36, 32, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fused(x, (6, 6))
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, ref(x, (6, 6)), rtol=1e-5, atol=1e-6)  # nothing lowered to 16 bits


@pytest.mark.parametrize("layer", ["attention", "mix_ffn", "decoder"])
def test_compiles_under_autocast_without_graph_breaks(layer):
    """torch.compile(fullgraph=True) traces the autocast policy (the casts and the autocast-off region)."""
    if layer == "attention":
        m, args = FusedSpatialReductionAttention.from_reference(SpatialReductionAttention(32, 1, sr_ratio=2)), ((8, 8),)
        x = [torch.randn(2, 64, 32, requires_grad=True)]
    elif layer == "mix_ffn":
        m, args = FusedMixFFN.from_reference(MixFFN(32, 64), backend="cpp"), ((8, 8),)
        x = [torch.randn(2, 64, 32, requires_grad=True)]
    else:
        m = FusedAllMLPDecoder.from_reference(AllMLPDecoder((8, 16, 24, 32), 16, 5, dropout=0.0), backend="cpp")
        x, args = [[torch.randn(2, c, 16 // 2**i, 16 // 2**i) for i, c in enumerate((8, 16, 24, 32))]], ()
    m.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = m(*x, *args)
        got = torch.compile(m, fullgraph=True, backend="aot_eager")(*x, *args)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    got.float().sum().backward()
