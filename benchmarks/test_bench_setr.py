"""End-to-end SETR (ViT-B/16 encoder, PUP and MLA decoders): fast vs reference, inference and a training step.

Saved bytes are recorded twice: through the loss (``saved``, what the ratio table compares, as for
SegFormer; each provider's ``model(x, labels).loss``: the fused model's upsampling cross-entropy
keeps no full-resolution logits, the reference's F.interpolate + F.cross_entropy keeps them for
the main and every auxiliary head) and for the model's forward alone
(``extra_info["saved_bytes_model"]``).
"""

import pytest
import torch

from .conftest import model_providers, run_model_case, saved_bytes, size_param


@pytest.mark.parametrize("mode", ["inference", "train"])
@pytest.mark.parametrize("size", [size_param(512)])
@pytest.mark.parametrize("model", ["setr-pup-b16", "setr-mla-b16"])
@pytest.mark.parametrize("provider", ["fast", "reference"])
def test_setr(benchmark, device, provider, model, size, mode):
    p = model_providers(model, device)[provider]
    if mode == "train":
        p.module.train()
        x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
        params = list(p.module.parameters()) + list(p.module.buffers())
        benchmark.extra_info["saved_bytes_model"] = saved_bytes(lambda: p.module(x), params)
    run_model_case(benchmark, device, p, provider=provider, case=f"{model}-{size}-{mode}", size=size, mode=mode,
                   rounds=2 if mode == "train" else 3)
