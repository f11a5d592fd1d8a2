"""mlp_gelu (recomputing) against its reference: forward, every gradient, what it keeps."""

import pytest
import torch

from segformer_fast.ops.mlp_gelu import mlp_gelu, mlp_gelu_reference
from segformer_fast.utils.memory import SavedTensorRecorder


@pytest.mark.parametrize("save_hidden", [True, False])
@pytest.mark.parametrize("shape, c, hd, bias", [((1, 7), 12, 40, True), ((3, 2, 5), 9, 36, False)])
def test_matches_reference(save_hidden, shape, c, hd, bias):
    g = torch.Generator().manual_seed(0)
    t = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    x, w1, w2 = t(*shape, c), t(hd, c), t(c, hd)
    b1, b2 = (t(hd), t(c)) if bias else (None, None)
    leaves = [v for v in (x, w1, b1, w2, b2) if v is not None]
    ref = mlp_gelu_reference(x, w1, b1, w2, b2)
    out = mlp_gelu(x, w1, b1, w2, b2, save_hidden=save_hidden)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    gout = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, leaves, gout), torch.autograd.grad(ref, leaves, gout)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_keeps_less_than_eager():
    c, n = 32, 64
    x = torch.randn(2, n, c, requires_grad=True)
    w1, w2 = torch.randn(4 * c, c, requires_grad=True), torch.randn(c, 4 * c, requires_grad=True)
    kept = {}
    for name, fn in (("ref", lambda: mlp_gelu_reference(x, w1, None, w2, None)),
                     ("save", lambda: mlp_gelu(x, w1, None, w2, None, save_hidden=True)),
                     ("recompute", lambda: mlp_gelu(x, w1, None, w2, None, save_hidden=False))):
        with SavedTensorRecorder([w1, w2]) as rec:
            fn()
        kept[name] = rec.bytes
    token = 2 * n * 4  # bytes of one fp32 channel over all tokens
    assert kept["ref"] == 9 * c * token
    assert kept["save"] == 5 * c * token
    assert kept["recompute"] == c * token


@pytest.mark.parametrize("save_hidden", [True, False])
def test_opcheck_and_no_silent_double_backward(save_hidden):
    x = torch.randn(2, 5, 8, requires_grad=True)
    w1, b1 = torch.randn(16, 8, requires_grad=True), torch.randn(16, requires_grad=True)
    w2 = torch.randn(8, 16, requires_grad=True)
    torch.library.opcheck(torch.ops.segformer_fast.mlp_gelu.default, (x, w1, b1, w2, None, save_hidden))
    (gx,) = torch.autograd.grad(mlp_gelu(x, w1, b1, w2, None, save_hidden=save_hidden).square().sum(), x,
                                create_graph=True)
    # the backward is an op without a derivative: an error naming it, not a wrong number
    with pytest.raises(RuntimeError, match="mlp_gelu_backward.*no autograd formula"):
        gx.sum().backward()
