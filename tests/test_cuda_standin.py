"""The CPU stand-in of the CUDA extension: its API is the binding's, it is test-only, and whole models
run their CUDA glue on it (forward, loss and every gradient) against the reference backend.

The per-op and per-layer tests run backend="cuda" on the stand-in too (tests/conftest.py selects it
for every test parametrised with backend="cuda" where there is no CUDA device)."""

import inspect
import re
from pathlib import Path

import pytest
import torch

import segformer_fast as sf
from segformer_fast import backends
from segformer_fast.dispatch import get_spec
from segformer_fast.testing import backend_device, cuda_standin, perturb_parameters

CSRC = Path(__file__).resolve().parents[1] / "csrc"


def _bindings() -> dict[str, list[str]]:
    """{function name: argument names} of every m.def in csrc/*/*_bind_cuda.h."""
    found = {}
    for header in sorted(CSRC.glob("*/*_bind_cuda.h")):
        text = header.read_text()
        for m in re.finditer(r'm\.def\("(\w+)",(.*?)\);', text, re.S):
            found[m.group(1)] = re.findall(r'pybind11::arg\("(\w+)"\)', m.group(2))
    return found


def test_standin_has_every_binding_with_its_argument_names():
    bindings = _bindings()
    assert len(bindings) >= 10, bindings  # upsample_sum 2, sr_attention 4, dwconv3x3_gelu 2, upsample_cross_entropy 2
    for name, args in bindings.items():
        fn = getattr(cuda_standin, name, None)
        assert fn is not None, f"the stand-in lacks {name}"
        assert list(inspect.signature(fn).parameters) == args, name


def test_standin_is_test_only_and_never_auto(monkeypatch):
    monkeypatch.delenv(cuda_standin.ENV_VAR, raising=False)
    if not torch.cuda.is_available():
        assert not sf.available_backends()["cuda"].available
        assert backends.cuda_extension() is not cuda_standin
        with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
            get_spec("upsample_sum").resolve("cuda", torch.randn(1, 2, 2, 3))
    monkeypatch.setenv(cuda_standin.ENV_VAR, "1")
    if cuda_standin.unavailable_reason():
        pytest.skip(cuda_standin.unavailable_reason())
    status = sf.available_backends()["cuda"]
    assert status.available and "stand-in" in status.reason and "test only" in status.reason
    assert backends.cuda_extension() is cuda_standin
    x = torch.randn(1, 2, 2, 3)
    assert get_spec("upsample_sum").resolve("cuda", x).backend == "cuda"
    assert get_spec("upsample_sum").resolve("auto", x).backend in ("cpp", "torch")  # auto never picks it


def test_standin_checks_arguments_like_the_binding(cuda_standin):
    x = torch.randn(2, 12, 8)
    with pytest.raises(RuntimeError, match="must be a contiguous 3-d tensor"):
        cuda_standin.sr_attention_patchify(x.transpose(1, 2).contiguous().transpose(1, 2), 3, 4, 2)
    with pytest.raises(RuntimeError, match="dtype must be float32, float16 or bfloat16"):
        cuda_standin.sr_attention_patchify(x.double(), 3, 4, 2)
    maps = [torch.randn(1, 3, 4, 5), torch.randn(1, 2, 2, 5).half()]
    with pytest.raises(RuntimeError, match="has dtype"):
        cuda_standin.upsample_sum_fwd(maps, 6, 8, None, None, False)
    with pytest.raises(RuntimeError, match="must be a contiguous float32"):
        cuda_standin.upsample_sum_fwd(maps[:1], 6, 8, torch.ones(5, dtype=torch.float64), None, False)
    y = torch.empty(2, 12, 8)
    w, b = torch.randn(8, 1, 3, 3), torch.randn(8)
    with pytest.raises(RuntimeError, match="y must have x's dtype"):
        cuda_standin.dwconv3x3_gelu_fwd(x, w, b, y.half(), 3, 4, 1)
    logits, labels = torch.randn(1, 3, 4, 5), torch.randint(0, 5, (1, 6, 8))
    with pytest.raises(RuntimeError, match="labels must be a contiguous int64"):
        cuda_standin.upsample_cross_entropy_fwd(logits, labels.int(), 255)


def test_standin_sr_helpers_match_the_torch_path(cuda_standin):
    # patchify / unpatchify_add against reduce.py; bias + LayerNorm (and its backward) against autograd
    from segformer_fast.ops.sr_attention.reduce import patchify, unpatchify_add

    x = torch.randn(2, 7 * 9, 6)
    p = cuda_standin.sr_attention_patchify(x, 7, 9, 2)
    torch.testing.assert_close(p, patchify(x, (7, 9), 2), rtol=0, atol=0)
    dx, dx_ref = torch.randn(2, 63, 6), None
    dx_ref = dx.clone()
    dp = torch.randn_like(p)
    cuda_standin.sr_attention_unpatchify_add(dx, dp, 7, 9, 2)
    torch.testing.assert_close(dx, unpatchify_add(dx_ref, dp, (7, 9), 2))
    r = torch.randn(2, 5, 6, dtype=torch.float64).float().requires_grad_()
    bias, weight, beta = (torch.randn(6, requires_grad=True) for _ in range(3))
    y, mean, rstd = cuda_standin.sr_attention_bias_ln_fwd(r.detach(), bias.detach(), weight.detach(), beta.detach(), 1e-5)
    ref = torch.nn.functional.layer_norm(r + bias, (6,), weight, beta, 1e-5)
    torch.testing.assert_close(y, ref.detach())
    dy = torch.randn_like(ref)
    grads = torch.autograd.grad(ref, (r, weight, beta, bias), dy)
    got = cuda_standin.sr_attention_bias_ln_bwd(dy, r.detach(), bias.detach(), weight.detach(), mean, rstd)
    for name, a, b in zip(("dr", "dweight", "dbeta", "dbias"), got, grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def _count_calls(monkeypatch) -> dict[str, int]:
    """Counts the calls of every stand-in function (where the cuda backend runs on the stand-in)."""
    calls = {}
    if torch.cuda.is_available():
        return calls
    for name in _bindings():
        fn = getattr(cuda_standin, name)

        def counted(*a, _fn=fn, _name=name, **k):
            calls[_name] = calls.get(_name, 0) + 1
            return _fn(*a, **k)

        monkeypatch.setattr(cuda_standin, name, counted)
    return calls


def _grads_close(fast, ref, rtol=1e-4, atol=1e-5):
    fp = dict(fast.named_parameters())
    n = 0
    for name, p in ref.named_parameters():
        if p.grad is None:
            assert fp[name].grad is None, name
            continue
        torch.testing.assert_close(fp[name].grad, p.grad, rtol=rtol, atol=atol, msg=name)
        n += 1
    assert n > 0


@pytest.mark.parametrize("backend", ["cuda"])
@pytest.mark.parametrize("memory", ["save", "recompute", "checkpoint"])
def test_segformer_on_the_cuda_path_matches_the_reference(backend, memory, monkeypatch):
    """A whole MiT-B0 (sr 8, 4, 2 and 1) with the fused decoder and loss, training step and eval."""
    device = backend_device(backend)
    calls = _count_calls(monkeypatch)
    kw = dict(num_classes=5, depths=(1, 2, 1, 1), drop_path_rate=0.0, decoder_dropout=0.0)
    torch.manual_seed(0)
    ref = perturb_parameters(sf.segformer("b0", backend="torch", **kw)).to(device)
    fast = sf.segformer("b0", backend=backend, memory=memory, **kw).to(device)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 65, 97, device=device)  # odd sizes: every stage crops in the reduction
    labels = torch.randint(0, 5, (2, 65, 97), device=device)
    labels[0, :9] = 255
    losses = {}
    for name, m in (("ref", ref), ("fast", fast)):
        m.train()
        losses[name] = m.loss(m(x), labels)
        losses[name].backward()
    torch.testing.assert_close(losses["fast"], losses["ref"], rtol=1e-5, atol=1e-6)
    _grads_close(fast, ref)
    for (name, a), b in zip(ref.named_buffers(), fast.buffers()):  # BatchNorm running statistics
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(fast.eval()(x), ref.eval()(x), rtol=1e-4, atol=1e-4)
    if device == "cpu":  # every CUDA kernel of the model ran (on the stand-in)
        assert set(calls) == set(_bindings()), sorted(set(_bindings()) - set(calls))


@pytest.mark.parametrize("backend", ["cuda"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_segformer_half_precision_on_the_cuda_path(backend, dtype):
    """Half-precision models (.to(dtype)) run the cuda glue end to end: every kernel gets the storage
    dtype it is given (the stand-in checks it like the binding does), outputs keep it."""
    device = backend_device(backend)
    kw = dict(num_classes=5, depths=(1, 1, 1, 1), drop_path_rate=0.0, decoder_dropout=0.0)
    torch.manual_seed(0)
    ref = perturb_parameters(sf.segformer("b0", backend="torch", **kw)).to(device)
    fast = sf.segformer("b0", backend=backend, **kw).to(device)
    fast.load_state_dict(ref.state_dict())
    fast.to(dtype).train()
    x = torch.randn(1, 3, 33, 47, device=device)
    labels = torch.randint(0, 5, (1, 33, 47), device=device)
    logits = fast(x.to(dtype))
    assert logits.dtype == dtype
    loss = fast.loss(logits, labels)
    loss.backward()
    ref_loss = ref.train().loss(ref(x), labels)
    assert torch.isfinite(loss) and abs(loss.item() - ref_loss.item()) < 0.05 * abs(ref_loss.item()) + 1e-3
    assert all(p.grad is not None and p.grad.dtype == dtype and torch.isfinite(p.grad).all()
               for p in fast.parameters())


@pytest.mark.parametrize("backend", ["cuda"])
@pytest.mark.parametrize("decoder", ["naive", "pup", "mla"])
def test_setr_on_the_cuda_path_matches_the_reference(backend, decoder):
    """SETR (attention with sr = 1, fused heads, fused upsampling loss on every head) on the cuda glue."""
    device = backend_device(backend)
    kw = dict(num_classes=5, embed_dim=64, depth=4, num_heads=2, img_size=64, head_channels=16,
              mla_head_channels=8)
    torch.manual_seed(0)
    ref = perturb_parameters(sf.setr(decoder, backend="torch", **kw)).to(device)
    fast = sf.setr(decoder, backend=backend, **kw).to(device)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 40, 56, device=device)  # padded to 48 x 64 inside
    labels = torch.randint(0, 5, (2, 40, 56), device=device)
    labels[1, :, :7] = 255
    literal = sf.setr_loss(ref.train()(x), labels)
    literal.backward()
    out = fast.train()(x, labels)
    torch.testing.assert_close(out.loss, literal, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    _grads_close(fast, ref)
    with torch.no_grad():
        torch.testing.assert_close(fast.eval()(x), ref.eval()(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["cuda"])
def test_patched_hf_on_the_cuda_path_matches_unpatched(backend):
    transformers = pytest.importorskip("transformers")
    device = backend_device(backend)
    cfg = transformers.SegformerConfig(num_labels=5, depths=[1, 2, 1, 1], drop_path_rate=0.0,
                                       classifier_dropout_prob=0.0)
    torch.manual_seed(0)
    ref = perturb_parameters(transformers.SegformerForSemanticSegmentation(cfg)).to(device).train()
    fast = transformers.SegformerForSemanticSegmentation(cfg).to(device).train()
    fast.load_state_dict(ref.state_dict())
    sf.patch(fast, backend=backend, memory="recompute")
    x = torch.randn(2, 3, 67, 93, device=device)
    labels = torch.randint(0, 5, (2, 67, 93), device=device)
    out, out_ref = fast(pixel_values=x, labels=labels), ref(pixel_values=x, labels=labels)
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    out_ref.loss.backward()
    _grads_close(fast, ref)
