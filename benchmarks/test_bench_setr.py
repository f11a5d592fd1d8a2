"""End-to-end SETR (ViT-B/16 encoder, PUP and MLA decoders): fast vs reference, inference and a training step.

Saved bytes are recorded twice: through the loss (``saved``, what the ratio table compares, as for
SegFormer; each provider's ``model(x, labels).loss``: the fused model's upsampling cross-entropy
keeps no full-resolution logits, the reference's F.interpolate + F.cross_entropy keeps them for
the main and every auxiliary head) and for the model's forward alone
(``extra_info["saved_bytes_model"]``).
"""

import pytest
import torch

from .conftest import model_providers, run_interleaved, run_model_case, saved_bytes, size_param


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


@pytest.mark.parametrize("size", [size_param(512)])
@pytest.mark.parametrize("model", ["setr-pup-b16", "setr-mla-b16"])
def test_setr_inference_interleaved(benchmark, device, model, size):
    """Inference of fast and reference timed alternately (5 rounds): the ratio for the 1.3x goal,
    free of the drift that separate one-provider-at-a-time runs of ~1.5 s calls pick up."""
    providers = model_providers(model, device)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    fns = {}
    for name in ("fast", "reference"):
        p = providers[name]
        p.module.eval()
        fns[name] = (lambda p=p: p.infer(x))
    with torch.no_grad():
        medians = run_interleaved(benchmark, fns, device, case=f"{model}-{size}-inference-interleaved", rounds=5,
                                  min_seconds=0.0)
    assert set(medians) == {"fast", "reference"}
