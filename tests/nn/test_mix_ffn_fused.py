"""FusedMixFFN against the reference MixFFN: forward, every gradient, state dicts, saved bytes."""

import math

import pytest
import torch

from segformer_fast.backends import available_backends, cpu_extension
from segformer_fast.testing import backend_device, cuda_backend_unavailable_reason
from segformer_fast.nn import MixFFN
from segformer_fast.nn.mix_ffn_fused import FusedMixFFN
from segformer_fast.utils.memory import SavedTensorRecorder


def _skip(reason):
    return pytest.mark.skipif(reason is not None, reason=reason or "")


def _cpp_reason():
    status = available_backends()["cpp"]
    if not status.available:
        return f"cpp backend not built: {status.reason}"
    if not hasattr(cpu_extension(), "dwconv3x3_gelu_fwd"):
        return "segformer_fast._C_cpu was built without dwconv3x3_gelu"
    return None


def _triton_reason():
    status = available_backends()["triton"]
    return None if status.available else f"triton backend unavailable: {status.reason}"


BACKENDS = [
    pytest.param("torch", id="torch"),
    pytest.param("triton", id="triton", marks=_skip(_triton_reason())),
    pytest.param("cpp", id="cpp", marks=_skip(_cpp_reason())),
    pytest.param("cuda", id="cuda", marks=_skip(cuda_backend_unavailable_reason("dwconv3x3_gelu_fwd"))),
]
B, H, W, DIM, HIDDEN = 3, 7, 9, 8, 36  # hidden not a multiple of any kernel block


def _device(backend):
    return backend_device(backend)  # "cuda" without a GPU: the CPU stand-in (tests/conftest.py)


def _reference_and_grads(ref, x64, grad_out):
    x = x64.clone().requires_grad_()
    out = ref(x, (H, W))
    out.backward(grad_out)
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in ref.named_parameters()}


def _close(actual, expected, summed=False):
    expected = expected.to(actual.device, actual.dtype)
    atol = 1e-5 * max(1.0, expected.abs().max().item()) if summed else 1e-5
    torch.testing.assert_close(actual, expected, atol=atol, rtol=1e-5)


@pytest.mark.parametrize("memory", ["save", "recompute"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, memory):
    device = _device(backend)
    ref = MixFFN(DIM, HIDDEN).double()
    x64 = torch.randn(B, H * W, DIM, dtype=torch.float64)
    grad_out = torch.randn(B, H * W, DIM, dtype=torch.float64)
    out_ref, gx_ref, gp_ref = _reference_and_grads(ref, x64, grad_out)

    fused = FusedMixFFN(DIM, HIDDEN, memory=memory, backend=backend).to(device)
    fused.load_state_dict(ref.state_dict())  # same names; fp64 values are copied into fp32 parameters
    x = x64.to(device, torch.float32).requires_grad_()
    out = fused(x, (H, W))
    out.backward(grad_out.to(out))
    _close(out, out_ref)
    _close(x.grad, gx_ref)
    for name, p in fused.named_parameters():
        _close(p.grad, gp_ref[name], summed=True)


def test_state_dict_interchangeable():
    ref, fused = MixFFN(DIM, HIDDEN), FusedMixFFN(DIM, HIDDEN)
    assert list(ref.state_dict()) == list(fused.state_dict())
    fused.load_state_dict(ref.state_dict())
    ref2 = MixFFN(DIM, HIDDEN)
    ref2.load_state_dict(fused.state_dict())
    for a, b in zip(ref.parameters(), ref2.parameters()):
        assert torch.equal(a, b)
    assert isinstance(fused.dwconv, torch.nn.Conv2d)


def test_from_reference_shares_parameters():
    ref = MixFFN(DIM, HIDDEN, drop=0.0)
    fused = FusedMixFFN.from_reference(ref, memory="recompute", backend="torch")
    assert fused.memory == "recompute"
    for (n1, p1), (n2, p2) in zip(ref.named_parameters(), fused.named_parameters()):
        assert n1 == n2 and p1 is p2
    x = torch.randn(1, H * W, DIM)
    torch.testing.assert_close(fused(x, (H, W)), ref(x, (H, W)), atol=1e-5, rtol=1e-5)


def _saved(module, x):
    with SavedTensorRecorder(module.parameters()) as rec:
        out = module(x, (H, W))
    del out
    return rec


@pytest.mark.parametrize("backend", [pytest.param("torch", id="torch"), BACKENDS[2]])
def test_saved_bytes(backend):
    ref = MixFFN(DIM, HIDDEN)
    x = torch.randn(B, H * W, DIM, requires_grad=True)
    ref_bytes = _saved(ref, x).bytes
    assert ref_bytes == 4 * B * H * W * (DIM + 3 * HIDDEN)  # x, fc1 out, conv out, GELU out
    token_bytes = 4 * B * H * W

    save = _saved(FusedMixFFN.from_reference(ref, memory="save", backend=backend), x)
    assert save.bytes == token_bytes * (DIM + HIDDEN)  # x and fc1's output
    assert save.bytes <= 0.40 * ref_bytes

    recompute = _saved(FusedMixFFN.from_reference(ref, memory="recompute", backend=backend), x)
    assert recompute.bytes == token_bytes * DIM  # x only
    assert recompute.bytes <= 0.15 * ref_bytes
    activation = B * H * W * HIDDEN
    wide = [s for s in recompute.shapes if s and s[-1] == HIDDEN and math.prod(s) >= activation]
    assert not wide, f"recompute kept hidden-width tensors {wide}"


def test_saved_bytes_vs_hugging_face():
    modeling = pytest.importorskip("transformers.models.segformer.modeling_segformer")
    from transformers import SegformerConfig

    hf = modeling.SegformerMixMLP(SegformerConfig(), DIM, HIDDEN)
    x = torch.randn(B, H * W, DIM, requires_grad=True)
    with SavedTensorRecorder(hf.parameters()) as rec:
        hf(x, H, W)
    ref = MixFFN(DIM, HIDDEN)
    assert rec.bytes == _saved(ref, x).bytes
    save = _saved(FusedMixFFN.from_reference(ref, memory="save", backend="torch"), x)
    recompute = _saved(FusedMixFFN.from_reference(ref, memory="recompute", backend="torch"), x)
    assert save.bytes <= 0.40 * rec.bytes and recompute.bytes <= 0.15 * rec.bytes


def test_dropout_training_matches_reference():
    ref = MixFFN(DIM, HIDDEN, drop=0.3).train()
    fused = FusedMixFFN.from_reference(ref, backend="torch").train()
    assert fused.drop.p == 0.3
    x = torch.randn(B, H * W, DIM)
    torch.manual_seed(1)
    out_ref = ref(x, (H, W))
    torch.manual_seed(1)
    out = fused(x, (H, W))  # the same dropout calls in the same order: the same masks
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    fused.eval()
    ref.eval()
    torch.testing.assert_close(fused(x, (H, W)), ref(x, (H, W)), atol=1e-5, rtol=1e-5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="memory"):
        FusedMixFFN(DIM, HIDDEN, memory="offload")
    with pytest.raises(ValueError, match="unknown backend"):
        FusedMixFFN(DIM, HIDDEN, backend="metal")
    fused = FusedMixFFN(DIM, HIDDEN, backend="torch")
    with pytest.raises(ValueError, match=r"H \* W == N"):
        fused(torch.randn(1, H * W, DIM), (H, W + 1))
    with pytest.raises(ValueError, match=r"\(B, N, 8\)"):
        fused(torch.randn(1, H * W, DIM + 1), (H, W))
