"""Upsampled cross-entropy (SegFormer's loss): fused upsample_cross_entropy vs F.interpolate + F.cross_entropy.

Forward (loss only, no autograd) and forward+backward (the loss's share of a training step), B2
with its 150 ADE20K classes at 512 and 1024 (1024 marked ``large``): 1/4-resolution logits against
full-resolution labels, 10% of them ignore_index. Saved-activation bytes of the forward with grad
in extra_info (the reference keeps the full-resolution logits). Shapes come from the model registry.
"""

import pytest
import torch

from segformer_fast.configs import SEGFORMER_VARIANTS
from segformer_fast.ops import upsample_cross_entropy, upsample_cross_entropy_reference

from .conftest import run, saved_bytes, size_param, stage_shapes

PROVIDERS = ("fast", "reference")


def _loss(provider):
    if provider == "reference":
        return upsample_cross_entropy_reference
    return upsample_cross_entropy


@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("size", [size_param(512), size_param(1024)])
@pytest.mark.parametrize("variant", ["b2"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_upsample_cross_entropy(benchmark, device, provider, variant, size, mode):
    K = SEGFORMER_VARIANTS[variant].num_classes
    s1 = stage_shapes(variant, size)[0]  # the logits are at stage 1's resolution
    gen = torch.Generator().manual_seed(0)
    # channels-last, as the fused decoder returns them
    logits = torch.randn(s1["B"], s1["H"], s1["W"], K, generator=gen).to(device).permute(0, 3, 1, 2)
    labels = torch.randint(0, K, (s1["B"], size, size), generator=gen)
    labels[torch.rand(labels.shape, generator=gen) < 0.1] = 255
    labels = labels.to(device)
    loss_fn = _loss(provider)
    case = f"upsample_cross_entropy-{variant}-{size}-{mode}"
    if mode == "forward":

        def fn():
            with torch.no_grad():
                return loss_fn(logits, labels)

        run(benchmark, fn, device, provider=provider, case=case)
        return
    logits.requires_grad_()
    saved = saved_bytes(lambda: loss_fn(logits, labels), [logits])  # the logits are the decoder's output

    def fn():
        logits.grad = None
        loss_fn(logits, labels).backward()

    run(benchmark, fn, device, provider=provider, case=case, saved=saved)
