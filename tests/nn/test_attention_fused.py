"""FusedSpatialReductionAttention: interchangeable with the reference module, same results, memory-linear.

Tolerance as in tests/ops/test_sr_attention.py: fp32 module vs the fp64 reference module,
max|err| <= 1e-5 * max(1, max|ref|) for the output and the gradients of x and every parameter.
"""

import pytest
import torch

from segformer_fast.backends import available_backends
from segformer_fast.testing import backend_device
from segformer_fast.nn.attention import SpatialReductionAttention
from segformer_fast.nn.attention_fused import FusedSpatialReductionAttention
from segformer_fast.ops import sr_attention_reference
from segformer_fast.utils.memory import SavedTensorRecorder

TOL = 1e-5
PARAM_NAMES = {"q.weight", "q.bias", "k.weight", "k.bias", "v.weight", "v.bias", "proj.weight", "proj.bias",
               "sr.weight", "sr.bias", "sr_norm.weight", "sr_norm.bias"}


def _device(backend):
    status = available_backends()[backend]  # "cuda" without a GPU: the CPU stand-in (tests/conftest.py)
    if not status.available:
        pytest.skip(status.reason)
    return backend_device(backend)


@pytest.mark.parametrize("sr", [1, 2, 8])
def test_state_dict_interchangeable(sr):
    ref = SpatialReductionAttention(64, 2, sr)
    fused = FusedSpatialReductionAttention(64, 2, sr, backend="torch")
    assert set(fused.state_dict()) == set(ref.state_dict())
    assert set(ref.state_dict()) == (PARAM_NAMES if sr > 1 else {n for n in PARAM_NAMES if not n.startswith("sr")})
    fused.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(fused.state_dict(), strict=True)


def test_from_reference_shares_parameters():
    ref = SpatialReductionAttention(64, 2, 4, sr_eps=1e-6)
    fused = FusedSpatialReductionAttention.from_reference(ref, backend="torch")
    assert fused.backend == "torch" and fused.sr_norm.eps == 1e-6
    ref_params = dict(ref.named_parameters())
    for name, p in fused.named_parameters():
        assert p is ref_params[name], name
    assert len(ref_params) == len(dict(fused.named_parameters()))
    with pytest.raises(TypeError, match="SpatialReductionAttention"):
        FusedSpatialReductionAttention.from_reference(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
@pytest.mark.parametrize("b, h, w, c, heads, sr", [(2, 9, 13, 32, 1, 8), (1, 9, 13, 64, 2, 2), (1, 5, 7, 64, 2, 1)])
def test_module_matches_reference(backend, b, h, w, c, heads, sr):
    device = _device(backend)
    ref = SpatialReductionAttention(c, heads, sr).to(device)
    if sr > 1:
        with torch.no_grad():
            ref.sr_norm.weight.normal_(1.0, 0.2)
            ref.sr_norm.bias.normal_(0.0, 0.2)
    fused = FusedSpatialReductionAttention.from_reference(ref, backend=backend)
    x = torch.randn(b, h * w, c, device=device, requires_grad=True)
    y = fused(x, (h, w))
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *fused.parameters()], g)

    ref64 = SpatialReductionAttention(c, heads, sr).to(device).double()
    ref64.load_state_dict(ref.state_dict())
    xd = x.detach().double().requires_grad_()
    yr = ref64(xd, (h, w))
    refs = torch.autograd.grad(yr, [xd, *ref64.parameters()], g.double())
    names = ["x"] + [n for n, _ in fused.named_parameters()]
    for name, a, r in zip(["out"] + names, [y, *grads], [yr, *refs]):
        err = (a.double() - r).abs().max().item()
        assert err <= TOL * max(1.0, r.abs().max().item()), f"{name}: {err:.3g}"


def test_attn_drop_training_falls_back_to_reference():
    ref = SpatialReductionAttention(64, 2, 2, attn_drop=0.5)
    fused = FusedSpatialReductionAttention.from_reference(ref, backend="torch")
    x = torch.randn(1, 35, 64)
    torch.manual_seed(1)
    y_ref = ref(x, (5, 7))
    torch.manual_seed(1)
    y = fused(x, (5, 7))
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)  # same dropout mask: the very same path
    fused.eval(), ref.eval()
    torch.testing.assert_close(fused(x, (5, 7)), ref(x, (5, 7)), rtol=1e-5, atol=1e-6)


def _big_tensors(module_fn, n, m):
    with SavedTensorRecorder() as rec:
        out = module_fn()
    out.sum().backward()  # the saved tensors were usable
    return [s for s in rec.shapes if torch.Size(s).numel() >= n * m]


def test_training_forward_saves_no_scores():
    """Issue 5: a training forward at N*M large keeps no tensor with N*M elements per head for backward."""
    hw, c, heads, sr = (64, 64), 32, 1, 8
    n, m = hw[0] * hw[1], (hw[0] // sr) * (hw[1] // sr)  # 4096 x 64: N*M = 262144 > N*C = 131072
    fused = FusedSpatialReductionAttention(c, heads, sr, backend="torch").train()
    x = torch.randn(1, n, c, requires_grad=True)
    assert _big_tensors(lambda: fused(x, hw), n, m) == []
    # The detector works: the eager oracle keeps its (1, 1, N, M) scores and probabilities.
    w = {k.replace("sr_norm.", "norm_").replace(".", "_"): p for k, p in fused.named_parameters()}
    big = _big_tensors(lambda: sr_attention_reference(x, hw, heads, sr=sr, **w), n, m)
    assert (1, heads, n, m) in big


def test_memory_mode_keeps_the_output_or_not():
    """memory="save" keeps x, lse and the attention output o; "recompute" keeps x and lse only. Same gradients."""
    import copy
    import pickle

    hw, c, heads, sr = (8, 12), 64, 2, 2
    ref = SpatialReductionAttention(c, heads, sr)
    x = torch.randn(2, hw[0] * hw[1], c)
    saved, grads = {}, {}
    for memory in ("save", "recompute"):
        fused = FusedSpatialReductionAttention.from_reference(ref, backend="torch", memory=memory).train()
        assert fused.memory == memory and f"memory={memory!r}" in repr(fused)
        for clone in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
            assert clone.memory == memory
        xg = x.clone().requires_grad_()
        with SavedTensorRecorder(list(fused.parameters()) + [xg]) as rec:
            y = fused(xg, hw)
        saved[memory] = rec.bytes
        y.square().sum().backward()
        grads[memory] = [xg.grad] + [p.grad.clone() for p in fused.parameters()]
        for p in fused.parameters():
            p.grad = None
    # the output o: (B, N, C) fp32 more in "save"; everything else kept alike
    assert saved["save"] - saved["recompute"] == x.numel() * 4, saved
    for a, b in zip(grads["save"], grads["recompute"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="memory must be one of"):
        FusedSpatialReductionAttention(c, heads, sr, memory="checkpoint")
