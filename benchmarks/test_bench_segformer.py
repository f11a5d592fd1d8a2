"""End-to-end SegFormer: fast vs reference vs Hugging Face, inference and a training step."""

import pytest
import torch

from segformer_fast.benchmark import build_providers

from .conftest import MODEL_PROVIDERS, run, saved_bytes, size_param, skip_unavailable

_CACHE: dict = {}


def _providers(variant, device, compile_hf):
    key = (variant, str(device), compile_hf)
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = build_providers(variant, num_classes=150, compile=compile_hf, device=str(device))
    return _CACHE[key]


@pytest.mark.parametrize("mode", ["inference", "train"])
@pytest.mark.parametrize("size", [size_param(512), size_param(1024)])
@pytest.mark.parametrize("variant", ["b0", "b2"])
@pytest.mark.parametrize("provider", MODEL_PROVIDERS)
def test_segformer(benchmark, request, device, provider, variant, size, mode):
    skip_unavailable(provider, request)
    providers = _providers(variant, device, request.config.getoption("--bench-compile"))
    p = providers[provider]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, size, size, generator=gen).to(device)
    case = f"segformer-{variant}-{size}-{mode}"
    if mode == "inference":
        p.module.eval()

        def fn():
            with torch.no_grad():
                return p.infer(x)

        run(benchmark, fn, device, provider=provider, case=case)
    else:
        p.module.train()
        labels = torch.randint(0, 150, (1, size, size), generator=gen).to(device)
        params = list(p.module.parameters()) + list(p.module.buffers())
        saved = saved_bytes(lambda: p.loss(x, labels), params)

        def fn():
            p.module.zero_grad(set_to_none=True)
            p.loss(x, labels).backward()

        run(benchmark, fn, device, provider=provider, case=case, saved=saved)
