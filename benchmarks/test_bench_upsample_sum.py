"""All-MLP decode head: fused (FusedAllMLPDecoder over upsample_sum) vs reference vs Hugging Face.

Forward (eval, no autograd) and forward+backward (train mode, a training step's decoder work), B0
(D=256) and B2 (D=768) at 512 and 1024 (1024 marked ``large``); saved-activation bytes of the
train-mode forward in extra_info. Feature shapes come from the model registry.
"""

import pytest
import torch

from segformer_fast.configs import SEGFORMER_VARIANTS
from segformer_fast.nn.decode_head import AllMLPDecoder
from segformer_fast.nn.decode_head_fused import FusedAllMLPDecoder

from .conftest import run, saved_bytes, size_param, skip_unavailable, stage_shapes

PROVIDERS = ("fast", "reference", "hf")


def _hf_head(ref: AllMLPDecoder, variant: str):
    from transformers import SegformerConfig
    from transformers.models.segformer.modeling_segformer import SegformerDecodeHead

    cfg = SEGFORMER_VARIANTS[variant]
    config = SegformerConfig(
        hidden_sizes=list(cfg.hidden_sizes), decoder_hidden_size=cfg.decoder_dim, num_labels=cfg.num_classes,
        num_encoder_blocks=cfg.num_stages, classifier_dropout_prob=cfg.decoder_dropout,
    )
    head = SegformerDecodeHead(config)
    sd = {}
    for i in range(cfg.num_stages):
        sd[f"linear_projections.{i}.proj.weight"] = ref.linear_c[i].weight
        sd[f"linear_projections.{i}.proj.bias"] = ref.linear_c[i].bias
    sd["linear_fuse.weight"] = ref.fuse.weight
    for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        sd[f"batch_norm.{k}"] = getattr(ref.bn, k)
    sd["classifier.weight"], sd["classifier.bias"] = ref.classifier.weight, ref.classifier.bias
    head.load_state_dict({k: v.detach().clone() for k, v in sd.items()})
    return head


def _build(provider: str, variant: str, device):
    cfg = SEGFORMER_VARIANTS[variant]
    torch.manual_seed(0)
    ref = AllMLPDecoder(cfg.hidden_sizes, cfg.decoder_dim, cfg.num_classes, dropout=cfg.decoder_dropout)
    if provider == "reference":
        return ref.to(device)
    if provider == "hf":
        return _hf_head(ref, variant).to(device)
    fused = FusedAllMLPDecoder(cfg.hidden_sizes, cfg.decoder_dim, cfg.num_classes, dropout=cfg.decoder_dropout)
    fused.load_state_dict(ref.state_dict())
    return fused.to(device)


@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("size", [size_param(512), size_param(1024)])
@pytest.mark.parametrize("variant", ["b0", "b2"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_decode_head(benchmark, request, device, provider, variant, size, mode):
    skip_unavailable(provider, request)
    head = _build(provider, variant, device)
    gen = torch.Generator().manual_seed(0)
    feats = [torch.randn(s["B"], s["C"], s["H"], s["W"], generator=gen).to(device) for s in stage_shapes(variant, size)]
    case = f"decode_head-{variant}-{size}-{mode}"
    if mode == "forward":
        head.eval()

        def fn():
            with torch.no_grad():
                return head(feats)

        run(benchmark, fn, device, provider=provider, case=case, rounds=5, warmup=1)
        return
    head.train()
    feats = [f.requires_grad_() for f in feats]
    params = list(head.parameters()) + list(head.buffers())
    saved = saved_bytes(lambda: head(feats), params + feats)  # activations only: features are the encoder's
    grad = torch.randn(1, SEGFORMER_VARIANTS[variant].num_classes, size // 4, size // 4, generator=gen).to(device)

    def fn():
        head.zero_grad(set_to_none=True)
        head(feats).backward(grad)

    run(benchmark, fn, device, provider=provider, case=case, saved=saved)
