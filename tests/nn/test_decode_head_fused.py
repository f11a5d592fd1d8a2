"""FusedAllMLPDecoder against the reference AllMLPDecoder: eval and train, forward, every gradient, BN stats."""

import copy
import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
from torch import nn

from segformer_fast.backends import available_backends, cpu_extension
from segformer_fast.testing import backend_device
from segformer_fast.nn.decode_head import AllMLPDecoder
from segformer_fast.nn.decode_head_fused import FusedAllMLPDecoder
from segformer_fast.utils.memory import SavedTensorRecorder

CHANNELS = (8, 12, 16, 24)
D, K = 20, 5
SHAPES = [(1, (7, 9)), (3, (17, 33))]


def require(backend):
    status = available_backends()[backend]
    if not status.available:
        pytest.skip(f"{backend} backend unavailable: {status.reason}")
    if backend == "cpp" and not hasattr(cpu_extension(), "upsample_sum_fwd"):
        pytest.skip("segformer_fast._C_cpu was built without upsample_sum; rebuild with pip install --no-build-isolation -e .")
    return backend_device(backend)  # "cuda" without a GPU: the CPU stand-in (tests/conftest.py)


def stage_sizes(hw):
    sizes = [hw]
    for _ in range(3):
        sizes.append((math.ceil(sizes[-1][0] / 2), math.ceil(sizes[-1][1] / 2)))
    return sizes


def make_pair(backend, device, dropout=0.0, dropout2d=False, channels=CHANNELS, dim=D):
    ref = AllMLPDecoder(channels, dim, K, dropout=dropout, dropout2d=dropout2d).to(device)
    with torch.no_grad():  # non-trivial BN state
        ref.bn.running_mean.normal_()
        ref.bn.running_var.uniform_(0.5, 2.0)
        ref.bn.weight.normal_()
        ref.bn.bias.normal_()
    fused = FusedAllMLPDecoder(channels, dim, K, dropout=dropout, dropout2d=dropout2d, backend=backend).to(device)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def make_features(B, hw, device, channels=CHANNELS):
    return [torch.randn(B, c, h, w, device=device, requires_grad=True) for c, (h, w) in zip(channels, stage_sizes(hw))]


def compare(ref, fused, feats, tol=1e-5):
    out_ref = ref(feats)
    out = fused(feats)
    scale = out_ref.abs().max().item()
    assert out.shape == out_ref.shape
    assert (out - out_ref).abs().max().item() <= tol * scale
    grad = torch.randn_like(out_ref)
    names = [f"features[{i}]" for i in range(len(feats))] + [n for n, _ in ref.named_parameters()]
    g_ref = torch.autograd.grad(out_ref, feats + list(ref.parameters()), grad)
    g_out = torch.autograd.grad(out, feats + list(fused.parameters()), grad)
    # Pre-BN biases have an exactly-zero gradient in train mode; measure every error against the
    # largest gradient of its kind so that rounding noise around zero is not a relative error.
    floor = max(g.abs().max().item() for g in g_ref[: len(feats)])
    for name, a, b in zip(names, g_out, g_ref):
        assert a.shape == b.shape, name
        err = (a - b).abs().max().item()
        assert err <= tol * max(b.abs().max().item(), floor), f"{name}: {err:.3e} vs scale {b.abs().max().item():.3e}"
    return out, out_ref


@pytest.mark.parametrize("backend", ["torch", "triton", "cpp", "cuda"])
@pytest.mark.parametrize("B,hw", SHAPES)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_matches_reference(backend, B, hw, mode):
    device = require(backend)
    ref, fused = make_pair(backend, device)
    ref.train(mode == "train")
    fused.train(mode == "train")
    feats = make_features(B, hw, device)
    compare(ref, fused, feats)
    # running stats after the step: updated identically in train, untouched in eval
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        a, b = getattr(fused.bn, name), getattr(ref.bn, name)
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name
    assert int(fused.bn.num_batches_tracked) == (1 if mode == "train" else 0)


def test_train_steps_cumulative_momentum_and_dropout2d():
    # Dropout2d draws one (B, D, 1, 1) mask, the same draw in both modules under the same seed.
    ref, fused = make_pair("torch", "cpu", dropout=0.5, dropout2d=True)
    ref.bn.momentum = fused.bn.momentum = None  # cumulative moving average
    ref.train()
    fused.train()
    for step in range(2):
        feats = make_features(3, (7, 9), "cpu")
        state = torch.get_rng_state()
        out_ref = ref(feats)
        torch.set_rng_state(state)
        out = fused(feats)
        assert (out - out_ref).abs().max() <= 1e-5 * out_ref.abs().max()
        g = torch.randn_like(out)
        g_ref = torch.autograd.grad(out_ref, feats + [ref.fuse.weight, ref.bn.weight], g)
        g_out = torch.autograd.grad(out, feats + [fused.fuse.weight, fused.bn.weight], g)
        for a, b in zip(g_out, g_ref):
            assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    assert torch.allclose(fused.bn.running_mean, ref.bn.running_mean, rtol=1e-5, atol=1e-6)
    assert torch.allclose(fused.bn.running_var, ref.bn.running_var, rtol=1e-5, atol=1e-6)
    assert int(fused.bn.num_batches_tracked) == int(ref.bn.num_batches_tracked) == 2


def _dropout_probe(dropout2d=False):
    """A training decoder with dropout 0.3 whose logits are the first K channels of d, every one positive
    before dropout (so zeros are exactly the dropped entries), and its features."""
    _, fused = make_pair("torch", "cpu", dropout=0.3, dropout2d=dropout2d)
    fused.train()
    fused.classifier.weight.data = torch.eye(K, D).view(K, D, 1, 1)
    fused.classifier.bias.data.zero_()
    with torch.no_grad():
        fused.bn.bias.fill_(5.0)
        fused.bn.weight.fill_(0.1)
    return fused, make_features(3, (17, 33), "cpu")


def test_elementwise_dropout_rate_and_mask_consistency():
    fused, feats = _dropout_probe()
    out = fused(feats)
    dropped = (out == 0).float().mean().item()
    assert 0.25 < dropped < 0.35
    kept = out[out != 0]
    assert kept.min() > 5.0 / 0.7 * 0.5  # survivors are rescaled by 1 / (1 - p)
    # the gradient reaching the BN shift is exactly (1 / (1 - p)) times the number of kept entries per channel
    (g_beta,) = torch.autograd.grad(out.sum(), [fused.bn.bias])
    expected = (out != 0).sum((0, 2, 3)).float() / 0.7
    assert torch.allclose(g_beta[:K], expected, rtol=1e-5)


def test_state_dict_and_from_reference():
    ref = AllMLPDecoder(CHANNELS, D, K, dropout=0.2, dropout2d=True)
    fused = FusedAllMLPDecoder(CHANNELS, D, K)
    assert list(fused.state_dict().keys()) == list(ref.state_dict().keys())
    shared = FusedAllMLPDecoder.from_reference(ref, backend="torch")
    for (n1, p1), (n2, p2) in zip(ref.named_parameters(), shared.named_parameters()):
        assert n1 == n2 and p1 is p2
    assert shared.bn.running_mean is ref.bn.running_mean
    assert isinstance(shared.dropout, nn.Dropout2d) and shared.dropout.p == 0.2
    assert shared.backend == "torch"
    ref.load_state_dict(fused.state_dict())


def test_eval_cache_follows_parameter_updates():
    ref, fused = make_pair("torch", "cpu")
    ref.eval()
    fused.eval()
    feats = [f.detach() for f in make_features(2, (7, 9), "cpu")]
    with torch.no_grad():
        assert torch.allclose(fused(feats), ref(feats), atol=1e-5)
        ref.fuse.weight.mul_(-0.5)  # shared in-place update (as an optimizer step)
        ref.bn.running_var.add_(1.0)
        fused.load_state_dict(ref.state_dict())
        out = fused(feats)
        assert (out - ref(feats)).abs().max() <= 1e-5 * out.abs().max()


def test_check_features_errors_match_reference():
    ref = AllMLPDecoder(CHANNELS, D, K)
    fused = FusedAllMLPDecoder(CHANNELS, D, K)
    good = [torch.randn(2, c, 4, 4) for c in CHANNELS]
    bad_inputs = [
        good[:3],
        [good[0][0]] + good[1:],
        [torch.randn(2, 9, 4, 4)] + good[1:],
        [torch.randn(3, 8, 4, 4)] + good[1:],
    ]
    for bad in bad_inputs:
        with pytest.raises(ValueError) as e_ref:
            ref(bad)
        with pytest.raises(ValueError) as e_fused:
            fused(bad)
        assert str(e_ref.value) == str(e_fused.value)
    with pytest.raises(ValueError, match="unknown backend"):
        FusedAllMLPDecoder(CHANNELS, D, K, backend="nope")


def test_saved_tensors_in_training():
    # What training keeps: the feature maps (inputs, needed for dA_i), the folded weights
    # (D, C_i) and (D,), the BN mean/invstd (D,). Nothing at the fine resolution with D or 4D
    # channels: u, z_i and the classifier input d are recomputed in backward (d with the forward's
    # dropout draws).
    channels, dim, B, hw = (8, 16, 40, 64), 64, 2, (16, 16)
    ref, fused = make_pair("torch", "cpu", dropout=0.1, channels=channels, dim=dim)
    ref.train()
    fused.train()
    feats = make_features(B, hw, "cpu", channels=channels)
    params = list(fused.parameters()) + list(fused.buffers())
    with SavedTensorRecorder(params) as rec:
        fused(feats).sum()
    fine = [s for s in rec.shapes if math.prod(s) >= B * hw[0] * hw[1] * dim]
    assert not fine, rec.shapes
    assert not any(4 * dim in s for s in rec.shapes), rec.shapes
    feature_bytes = sum(f.numel() * f.element_size() for f in feats)
    assert rec.bytes <= feature_bytes + 4 * sum(math.prod(s) for s in rec.shapes if len(s) <= 2), rec.shapes
    with SavedTensorRecorder(list(ref.parameters()) + list(ref.buffers())) as rec_ref:
        ref(feats).sum()
    assert rec.bytes <= 0.1 * rec_ref.bytes, (rec.bytes, rec_ref.bytes)


@pytest.fixture
def single_process_group():
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'pg')}", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


def test_sync_batchnorm_path_single_process(single_process_group):
    # With a process group the statistics go through all_gather / all_reduce (SyncBatchNorm semantics);
    # on one rank that must equal BatchNorm2d.
    ref, fused = make_pair("torch", "cpu")
    ref.train()
    fused.train()
    assert fused._group() is not None
    compare(ref, fused, make_features(3, (7, 9), "cpu"))
    assert torch.allclose(fused.bn.running_var, ref.bn.running_var, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_torch_compile_fullgraph(mode):
    ref, fused = make_pair("auto", "cpu")
    ref.train(mode == "train")
    fused.train(mode == "train")
    feats = make_features(2, (7, 9), "cpu")
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    out = compiled(feats)
    out_ref = ref(feats)
    assert (out - out_ref).abs().max() <= 1e-5 * out_ref.abs().max()
    g = torch.randn_like(out)
    g_out = torch.autograd.grad(out, feats + [fused.fuse.weight], g)
    g_ref = torch.autograd.grad(out_ref, feats + [ref.fuse.weight], g)
    for a, b in zip(g_out, g_ref):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()


@pytest.mark.parametrize("dropout2d", [False, True])
def test_torch_compile_fullgraph_with_dropout(dropout2d):
    """Training with dropout compiles in one graph (the dropout mask is kept instead of the generator
    state there), and its gradients see the forward's mask: the BN shift's gradient counts the kept
    entries, each scaled by 1 / (1 - p)."""
    fused, feats = _dropout_probe(dropout2d)
    out = torch.compile(fused, fullgraph=True, backend="aot_eager")(feats)
    (g_beta,) = torch.autograd.grad(out.sum(), [fused.bn.bias])
    expected = (out != 0).sum((0, 2, 3)).float() / 0.7
    assert 0 < int((out == 0).sum()) < out.numel()
    assert torch.allclose(g_beta[:K], expected, rtol=1e-5)


def _ema_update(ema, model, d):
    for e, p in zip(ema.parameters(), model.parameters()):
        e.data.mul_(d).add_(p.data, alpha=1 - d)


_UPDATES = {
    "data_inplace": lambda m: [p.data.mul_(-0.5) for p in m.parameters()],
    "data_assign": lambda m: [setattr(p, "data", p.data * 0.5 + 0.1) for p in m.parameters()],
    "no_grad_inplace": lambda m: [p.mul_(0.5).add_(0.1) for p in m.parameters()],
    "buffer_data": lambda m: m.bn.running_var.data.add_(1.0),
    "load_state_dict": lambda m: m.load_state_dict({k: v * 0.5 + 0.1 if v.is_floating_point() else v
                                                    for k, v in m.state_dict().items()}),
    "optimizer_step": lambda m: _sgd_step(m),
    "to_double_and_back": lambda m: m.double().float(),
}


def _sgd_step(m):
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    for p in m.parameters():
        p.grad = torch.randn_like(p)
    opt.step()


@pytest.mark.parametrize("update", list(_UPDATES))
def test_eval_cache_sees_every_weight_update(update):
    """Eval after any way of changing the weights computes with the new weights (no stale folded cache)."""
    _, fused = make_pair("torch", "cpu")
    fused.eval()
    feats = [f.detach() for f in make_features(2, (7, 9), "cpu")]
    with torch.no_grad():
        fused(feats)  # fills any cache
        _UPDATES[update](fused)
        ref = AllMLPDecoder(CHANNELS, D, K).eval()
        ref.load_state_dict(fused.state_dict())
        out, want = fused(feats), ref(feats)
    assert (out - want).abs().max() <= 1e-5 * want.abs().max()


def test_eval_cache_sees_ema_and_averaged_model_updates():
    """The usual EMA update through .data, and swa_utils.AveragedModel, reach the fused eval."""
    _, model = make_pair("torch", "cpu")
    ema = copy.deepcopy(model).eval()
    swa = torch.optim.swa_utils.AveragedModel(model).eval()
    feats = [f.detach() for f in make_features(2, (7, 9), "cpu")]
    with torch.no_grad():
        ema(feats), swa(feats)  # fill any cache
        for _ in range(2):
            for p in model.parameters():
                p.add_(torch.randn_like(p))
            _ema_update(ema, model, 0.5)
            swa.update_parameters(model)
        for avg in (ema, swa.module):
            ref = AllMLPDecoder(CHANNELS, D, K).eval()
            ref.load_state_dict(avg.state_dict())
            out, want = avg(feats), ref(feats)
            assert (out - want).abs().max() <= 1e-5 * want.abs().max()
