"""Drop-in acceleration of existing SegFormer models: ``patch`` and ``unpatch``.

``patch(model)`` swaps, in place, the attention, Mix-FFN and decode head of a model for the fused
layers. The fused layers share the original Parameter and buffer objects (nothing is copied, an
optimizer built before or after keeps working), and state-dict keys, the forward signature and
the outputs stay as they were. Supported:

- ``segformer_fast.SegFormer`` built with ``backend="torch"`` (the reference layers);
- Hugging Face transformers (5.x module names) ``SegformerForSemanticSegmentation``,
  ``SegformerModel`` and ``SegformerForImageClassification``. The patched attention never forms the
  attention probabilities, so ``output_attentions=True`` returns none for patched layers. With
  ``labels``, a patched SegformerForSemanticSegmentation computes its loss with the fused
  upsample + cross-entropy op, so the full-resolution logits are never stored.

transformers 4.x builds its attention from ``SegformerEfficientSelfAttention``; such models are
refused with a clear error rather than patched half-way.
"""

from __future__ import annotations

import torch
from torch import nn

from .backends import default_backend, validate_backend
from .nn.attention import SpatialReductionAttention
from .nn.attention_fused import FusedSpatialReductionAttention
from .nn.decode_head import AllMLPDecoder
from .nn.decode_head_fused import FusedAllMLPDecoder
from .nn.mix_ffn import MixFFN
from .nn.mix_ffn_fused import FusedMixFFN

__all__ = ["patch", "unpatch", "is_patched", "SUPPORTED_MODELS"]

SUPPORTED_MODELS = (
    "segformer_fast.SegFormer",
    "transformers.SegformerForSemanticSegmentation",
    "transformers.SegformerModel",
    "transformers.SegformerForImageClassification",
)
_PATCHES = "_segformer_fast_patches"
_MEMORY = ("save", "recompute")


class _Adapter(nn.Module):
    """Stands in for a Hugging Face module: adopts its children (same objects under the same names,
    so the state dict is unchanged) and runs a fused twin that is not a registered submodule."""

    def __init__(self, original: nn.Module, fused: nn.Module):
        super().__init__()
        if next(original.parameters(recurse=False), None) is not None or next(original.buffers(recurse=False), None) is not None:
            raise TypeError(f"cannot adopt {type(original).__name__}: it holds parameters of its own")
        for name, child in original.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "_original", original)
        object.__setattr__(self, "_fused", fused)
        self.train(original.training)

    def fused(self) -> nn.Module:
        self._fused.training = self.training
        return self._fused

    def extra_repr(self) -> str:
        return f"fused={type(self._fused).__name__}({self._fused.extra_repr()})"


class PatchedSegformerAttention(_Adapter):
    def forward(self, hidden_states, height, width, attention_mask=None, **kwargs):
        if attention_mask is not None:
            raise ValueError("patched Segformer attention does not take an attention_mask")
        return self.fused()(hidden_states, (height, width)), None


class PatchedSegformerMixMLP(_Adapter):
    def forward(self, hidden_states, height, width):
        return self.fused()(hidden_states, (height, width))


class PatchedSegformerDecodeHead(_Adapter):
    def forward(self, encoder_hidden_states, **kwargs):
        feats = []
        for f in encoder_hidden_states:
            if f.ndim == 3:  # reshape_last_stage=False leaves the last stage as (B, N, C)
                side = int(round(f.shape[1] ** 0.5))
                f = f.reshape(f.shape[0], side, side, -1).permute(0, 3, 1, 2)
            feats.append(f)
        return self.fused()(feats)


def _fused_loss_forward(model: nn.Module, backend: str):
    """A forward for SegformerForSemanticSegmentation whose loss is the fused upsample + cross-entropy
    (full-resolution logits are never stored); outputs and signature as the original's."""
    from transformers.modeling_outputs import SemanticSegmenterOutput

    from .ops.upsample_cross_entropy import upsample_cross_entropy

    original = type(model).forward

    def forward(pixel_values, labels=None, **kwargs):
        if labels is None or model.config.num_labels < 2:  # BCE for a single label: the original's
            return original(model, pixel_values, labels=labels, **kwargs)
        out = original(model, pixel_values, **kwargs)
        logits = out[0] if isinstance(out, tuple) else out.logits
        loss = upsample_cross_entropy(logits, labels, ignore_index=model.config.semantic_loss_ignore_index,
                                      backend=backend)
        if isinstance(out, tuple):
            return (loss,) + out
        return SemanticSegmenterOutput(loss=loss, logits=out.logits, hidden_states=out.hidden_states,
                                       attentions=out.attentions)

    return forward


def _on_meta(cls, *args, **kwargs):
    with torch.device("meta"):  # the fused twin's own layers are replaced by the original ones
        return cls(*args, **kwargs)


def _hf_attention(m: nn.Module, backend: str) -> nn.Module:
    sr = m.sequence_reduction_ratio
    dim = m.q_proj.in_features
    eps = m.sequence_reduction.layer_norm.eps if sr > 1 else 1e-5
    fused = _on_meta(FusedSpatialReductionAttention, dim, m.num_attention_heads, sr, qkv_bias=m.q_proj.bias is not None,
                     attn_drop=float(m.attention_dropout), proj_drop=0.0, sr_eps=eps, backend=backend)
    fused.q, fused.k, fused.v, fused.proj = m.q_proj, m.k_proj, m.v_proj, m.o_proj
    fused.scale = m.scaling
    if sr > 1:
        fused.sr, fused.sr_norm = m.sequence_reduction.sequence_reduction, m.sequence_reduction.layer_norm
    return PatchedSegformerAttention(m, fused)


def _hf_mlp(m: nn.Module, backend: str, memory: str) -> nn.Module:
    if getattr(m, "activation_fn", None) is not None and type(m.activation_fn).__name__ not in ("GELUActivation",):
        raise TypeError(f"patch() fuses exact GELU only; this Mix-FFN uses {type(m.activation_fn).__name__}")
    fused = _on_meta(FusedMixFFN, m.fc1.in_features, m.fc1.out_features, drop=m.dropout.p, memory=memory,
                     backend=backend)
    fused.fc1, fused.dwconv, fused.fc2, fused.drop = m.fc1, m.dwconv.dwconv, m.fc2, m.dropout
    return PatchedSegformerMixMLP(m, fused)


def _hf_decode_head(m: nn.Module, backend: str) -> nn.Module:
    linears = [p.proj for p in m.linear_projections]
    fused = _on_meta(FusedAllMLPDecoder, [lin.in_features for lin in linears], m.linear_fuse.out_channels,
                     m.classifier.out_channels, dropout=m.dropout.p, dropout2d=isinstance(m.dropout, nn.Dropout2d),
                     backend=backend)
    fused.linear_c = nn.ModuleList(linears)
    fused.fuse, fused.bn, fused.dropout, fused.classifier = m.linear_fuse, m.batch_norm, m.dropout, m.classifier
    return PatchedSegformerDecodeHead(m, fused)


def _replacements(model: nn.Module, backend: str, memory: str):
    """(parent, attribute name, new module) for every module patch() swaps."""
    from .models.segformer import SegFormer

    out = []
    if isinstance(model, SegFormer):
        for parent in model.modules():
            for name, child in parent.named_children():
                if type(child) is SpatialReductionAttention:
                    out.append((parent, name, FusedSpatialReductionAttention.from_reference(child, backend=backend)))
                elif type(child) is MixFFN:
                    out.append((parent, name, FusedMixFFN.from_reference(child, memory=memory, backend=backend)))
                elif type(child) is AllMLPDecoder:
                    out.append((parent, name, FusedAllMLPDecoder.from_reference(child, backend=backend)))
        return out
    kind = type(model).__name__
    if not (kind.startswith("Segformer") and type(model).__module__.startswith("transformers")):
        raise TypeError(f"patch() supports {', '.join(SUPPORTED_MODELS)}; got {type(model).__module__}.{kind}")
    names = {type(m).__name__ for m in model.modules()}
    if "SegformerEfficientSelfAttention" in names:
        raise TypeError("this model uses transformers 4.x Segformer modules, which patch() does not support; "
                        "upgrade transformers to 5.x, or load its weights into segformer_fast.segformer(...) "
                        "with segformer_fast.load_weights")
    for parent in model.modules():
        for name, child in parent.named_children():
            cls = type(child).__name__
            if cls == "SegformerAttention":
                out.append((parent, name, _hf_attention(child, backend)))
            elif cls == "SegformerMixMLP":
                out.append((parent, name, _hf_mlp(child, backend, memory)))
            elif cls == "SegformerDecodeHead":
                out.append((parent, name, _hf_decode_head(child, backend)))
    if not out:
        raise TypeError(f"found no Segformer attention, Mix-FFN or decode head to patch in {kind}")
    return out


def patch(model: nn.Module, backend: str | None = None, memory: str = "save") -> nn.Module:
    """Swap a SegFormer's attention, Mix-FFN and decode head for fused layers, in place.

    Args:
        model: a ``segformer_fast.SegFormer`` (reference backend) or a transformers Segformer model.
        backend: "auto" (default: ``SEGFORMER_FAST_BACKEND`` or the fastest present), "torch",
            "triton", "cuda" or "cpp". A backend that is not available raises.
        memory: Mix-FFN activation policy, "save" or "recompute".
    Returns:
        The same model object, patched (patching again first undoes the previous patch).

    Example:
        >>> model = SegformerForSemanticSegmentation.from_pretrained("nvidia/segformer-b2-finetuned-ade-512-512")
        >>> segformer_fast.patch(model)
    """
    backend = validate_backend(default_backend() if backend is None else backend)
    if memory not in _MEMORY:
        raise ValueError(f"memory must be one of {_MEMORY}, got {memory!r}")
    if is_patched(model):
        unpatch(model)
    done = []
    for parent, name, new in _replacements(model, backend, memory):
        done.append((parent, name, getattr(parent, name)))
        setattr(parent, name, new)
    if type(model).__name__ == "SegformerForSemanticSegmentation":
        model.forward = _fused_loss_forward(model, backend)  # an instance attribute; unpatch removes it
    object.__setattr__(model, _PATCHES, done)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Put back the modules ``patch`` replaced (with the same, possibly trained, parameters)."""
    for parent, name, original in reversed(getattr(model, _PATCHES, [])):
        original.train(getattr(parent, name).training)
        setattr(parent, name, original)
    if hasattr(model, _PATCHES):
        object.__delattr__(model, _PATCHES)
    model.__dict__.pop("forward", None)
    return model


def is_patched(model: nn.Module) -> bool:
    return bool(getattr(model, _PATCHES, None))
