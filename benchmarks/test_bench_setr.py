"""End-to-end SETR (ViT-B/16 encoder, PUP and MLA decoders): fast vs reference, inference and a training step.

Saved bytes are recorded twice: through the loss (``saved``, what the ratio table compares, as for
SegFormer) and for the model's forward alone (``extra_info["saved_bytes_model"]``): SETR's four or
five full-resolution cross-entropies keep the same bytes in both providers.
"""

import pytest
import torch

from segformer_fast.benchmark import build_providers

from .conftest import run, saved_bytes, size_param

_CACHE: dict = {}


def _providers(model, device):
    key = (model, str(device))
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = build_providers(model, num_classes=150, device=str(device))
    return _CACHE[key]


@pytest.mark.parametrize("mode", ["inference", "train"])
@pytest.mark.parametrize("size", [size_param(512)])
@pytest.mark.parametrize("model", ["setr-pup-b16", "setr-mla-b16"])
@pytest.mark.parametrize("provider", ["fast", "reference"])
def test_setr(benchmark, device, provider, model, size, mode):
    p = _providers(model, device)[provider]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, size, size, generator=gen).to(device)
    case = f"{model}-{size}-{mode}"
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
        benchmark.extra_info["saved_bytes_model"] = saved_bytes(lambda: p.module(x), params)

        def fn():
            p.module.zero_grad(set_to_none=True)
            p.loss(x, labels).backward()

        run(benchmark, fn, device, provider=provider, case=case, saved=saved, rounds=2)
