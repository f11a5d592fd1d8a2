"""Depthwise 3x3 conv + GELU and Mix-FFN: fast vs reference vs Hugging Face, per MiT stage of B2.

Stage shapes of B2 at 512 and 1024 (1024 marked ``large``; deselect with ``-m "not large"``);
forward (no grad) and forward+backward time, and for forward+backward the bytes autograd saves
(parameters excluded, the input included for every provider alike).

- ``op`` level, on the hidden (4C-wide) tokens: segformer_fast.ops.dwconv3x3_gelu ("fast"),
  dwconv3x3_gelu_reference ("reference": fp32 NCHW conv), and transformers'
  SegformerDepthWiseConv + GELU ("hf": transpose, nn.Conv2d(groups=C), GELU, transpose).
- ``module`` level: FusedMixFFN with memory="save" ("fast") and "recompute" ("fast_recompute"),
  the reference MixFFN ("reference") and transformers' SegformerMixMLP ("hf"), same weights.
"""

import pytest
import torch

from segformer_fast.nn import MixFFN
from segformer_fast.nn.mix_ffn_fused import FusedMixFFN
from segformer_fast.ops import dwconv3x3_gelu
from segformer_fast.ops.dwconv3x3_gelu import dwconv3x3_gelu_reference

from .conftest import run, saved_bytes, size_param, skip_unavailable, stage_shapes

VARIANT = "b2"
STAGES = range(4)
OP_PROVIDERS = ("fast", "reference", "hf")
MODULE_PROVIDERS = ("fast", "fast_recompute", "reference", "hf")


def _hf_config():
    from transformers import SegformerConfig

    return SegformerConfig()  # hidden_act "gelu" (erf), dropout 0


def _op_callable(provider, conv):
    weight, bias = conv.weight, conv.bias
    if provider == "fast":
        return lambda x, hw: dwconv3x3_gelu(x, hw, weight, bias)
    if provider == "reference":
        return lambda x, hw: dwconv3x3_gelu_reference(x, hw, weight, bias)
    from transformers.activations import ACT2FN
    from transformers.models.segformer.modeling_segformer import SegformerDepthWiseConv

    hf = SegformerDepthWiseConv(conv.in_channels).to(conv.weight.device)
    hf.dwconv.load_state_dict(conv.state_dict())
    act = ACT2FN[_hf_config().hidden_act]
    return lambda x, hw: act(hf(x, hw[0], hw[1]))


def _module(provider, c, hidden, device):
    torch.manual_seed(0)
    ref = MixFFN(c, hidden).to(device)
    if provider == "reference":
        return ref, lambda x, hw: ref(x, hw)
    if provider.startswith("fast"):
        m = FusedMixFFN.from_reference(ref, memory="recompute" if provider == "fast_recompute" else "save")
        return m, lambda x, hw: m(x, hw)
    from transformers.models.segformer.modeling_segformer import SegformerMixMLP

    hf = SegformerMixMLP(_hf_config(), c, hidden).to(device)
    hf.fc1.load_state_dict(ref.fc1.state_dict())
    hf.dwconv.dwconv.load_state_dict(ref.dwconv.state_dict())
    hf.fc2.load_state_dict(ref.fc2.state_dict())
    return hf, lambda x, hw: hf(x, hw[0], hw[1])


def _bench(benchmark, device, provider, case, mode, fn, x, hw, params):
    if mode == "forward":

        def step():
            with torch.no_grad():
                return fn(x, hw)

        run(benchmark, step, device, provider=provider, case=case, rounds=5, warmup=1)
        return
    x = x.requires_grad_()
    saved = saved_bytes(lambda: fn(x, hw), params)
    grad = torch.randn_like(fn(x, hw).detach())

    def step():
        x.grad = None
        for p in params:
            p.grad = None
        fn(x, hw).backward(grad)

    run(benchmark, step, device, provider=provider, case=case, saved=saved)


@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("stage", STAGES, ids=lambda s: f"stage{s + 1}")
@pytest.mark.parametrize("size", [size_param(512), size_param(1024)])
@pytest.mark.parametrize("provider", OP_PROVIDERS)
def test_dwconv3x3_gelu_op(benchmark, request, device, provider, size, stage, mode):
    skip_unavailable(provider, request)
    s = stage_shapes(VARIANT, size)[stage]
    hidden, hw = s["hidden"], (s["H"], s["W"])
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden).to(device)
    fn = _op_callable(provider, conv)
    x = torch.randn(s["B"], s["N"], hidden, device=device)
    case = f"dwconv3x3_gelu-{VARIANT}-{size}-stage{stage + 1}-{mode}"
    _bench(benchmark, device, provider, case, mode, fn, x, hw, list(conv.parameters()))


@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("stage", STAGES, ids=lambda s: f"stage{s + 1}")
@pytest.mark.parametrize("size", [size_param(512), size_param(1024)])
@pytest.mark.parametrize("provider", MODULE_PROVIDERS)
def test_mix_ffn(benchmark, request, device, provider, size, stage, mode):
    skip_unavailable(provider, request)
    if provider == "fast_recompute" and mode == "forward":
        pytest.skip("recompute only changes what backward keeps; its forward is the 'fast' one")
    s = stage_shapes(VARIANT, size)[stage]
    module, fn = _module(provider, s["C"], s["hidden"], device)
    module.train(mode == "forward_backward")
    x = torch.randn(s["B"], s["N"], s["C"], device=device)
    case = f"mix_ffn-{VARIANT}-{size}-stage{stage + 1}-{mode}"
    _bench(benchmark, device, provider, case, mode, fn, x, (s["H"], s["W"]), list(module.parameters()))
