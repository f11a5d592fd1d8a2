"""mix_ffn (the fused Mix-FFN autograd) against its functional reference, forward and every gradient."""

import pytest
import torch

from segformer_fast.backends import available_backends
from segformer_fast.ops.mix_ffn import mix_ffn, mix_ffn_reference


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("save_hidden", [True, False])
def test_matches_reference(backend, save_hidden):
    if not available_backends()[backend].available:
        pytest.skip(available_backends()[backend].reason)
    b, (h, w), c, hidden = 3, (7, 9), 8, 36
    torch.manual_seed(0)
    args = [torch.randn(b, h * w, c), torch.randn(hidden, c) * 0.3, torch.randn(hidden), torch.randn(hidden, 1, 3, 3) * 0.3,
            torch.randn(hidden), torch.randn(c, hidden) * 0.3, torch.randn(c)]
    ref_in = [t.double().requires_grad_() for t in args]
    fast_in = [t.clone().requires_grad_() for t in args]
    x, w1, b1, wc, bc, w2, b2 = ref_in
    ref = mix_ffn_reference(x, (h, w), w1, b1, wc, bc, w2, b2)
    x, w1, b1, wc, bc, w2, b2 = fast_in
    out = mix_ffn(x, (h, w), w1, b1, wc, bc, w2, b2, backend=backend, save_hidden=save_hidden)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    for name, a, r in zip(("x", "w1", "b1", "wc", "bc", "w2", "b2"), torch.autograd.grad(out, fast_in, g.float()),
                          torch.autograd.grad(ref, ref_in, g)):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-4, msg=name)


def test_bad_input_is_named():
    x = torch.randn(2, 63, 8)
    w1, wc, w2 = torch.randn(36, 8), torch.randn(36, 1, 3, 3), torch.randn(8, 36)
    with pytest.raises(ValueError, match="does not match x"):
        mix_ffn(x, (7, 8), w1, None, wc, torch.zeros(36), w2, None)
    with pytest.raises(ValueError, match=r"must be \(B, N, 8\)"):
        mix_ffn(x[..., :4], (7, 9), w1, None, wc, torch.zeros(36), w2, None)


@pytest.mark.parametrize("save_hidden", [True, False])
def test_opcheck(save_hidden):
    x = torch.randn(2, 12, 8, requires_grad=True)
    w1, b1 = torch.randn(16, 8, requires_grad=True), torch.randn(16, requires_grad=True)
    wc, bc = torch.randn(16, 1, 3, 3, requires_grad=True), torch.randn(16, requires_grad=True)
    w2, b2 = torch.randn(8, 16, requires_grad=True), torch.randn(8, requires_grad=True)
    torch.library.opcheck(torch.ops.segformer_fast.mix_ffn.default,
                          (x, w1, b1, wc, bc, w2, b2, 3, 4, "none", "torch", save_hidden))
