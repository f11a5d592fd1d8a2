"""Load SETR weights: this package's own state dict, mmsegmentation's SETR checkpoints, timm ViT backbones.

Layouts (native name <-> source name; ``{i}`` a block, ``{k}`` an auxiliary head):
- ``native``: ``encoder.*``, ``neck.*``, ``decode_head.*``, ``aux_heads.{k}.*`` (SETR.state_dict()).
- ``mmseg`` (mmsegmentation 1.x SETR, ViT backbone + SETRUPHead / MLANeck + SETRMLAHead):
    encoder.patch_embed            <- backbone.patch_embed.projection
    encoder.cls_token, pos_embed   <- backbone.cls_token, backbone.pos_embed
    encoder.blocks.{i}.norm1/norm2 <- backbone.layers.{i}.ln1/ln2
    encoder.blocks.{i}.attn.q/k/v  <- backbone.layers.{i}.attn.attn.in_proj_weight/bias (rows: q, k, v)
    encoder.blocks.{i}.attn.proj   <- backbone.layers.{i}.attn.attn.out_proj
    encoder.blocks.{i}.mlp.fc1/fc2 <- backbone.layers.{i}.ffn.layers.0.0 / ffn.layers.1
    neck.channel_proj/feat_extract <- neck.mla.channel_proj/feat_extract (neck.norm as is)
    decode_head.up_convs.{j}.conv/bn (Naive/PUP) <- decode_head.up_convs.{j}.0.conv/bn
    aux_heads.{k}.*                <- auxiliary_head.{k}.* (same renames as decode_head)
  SETRMLAHead's ``up_convs.{j}.{0,1}`` and every ``norm`` / ``conv_seg`` keep their names.
  ``backbone.ln1`` (a final ViT norm; SETR's configs build none) is ignored.
- ``timm`` (a ViT backbone, e.g. vit_large_patch16_384): patch_embed.proj, cls_token, pos_embed,
  blocks.{i}.norm1, attn.qkv (rows q, k, v), attn.proj, norm2, mlp.fc1, mlp.fc2; the final
  ``norm`` and the classifier ``head`` are ignored. Backbone only: the heads keep their initialisation.

A position embedding made for another grid (e.g. 24x24 from a 384 model) is resized bilinearly to
the model's ``img_size / 16`` grid, the cls entry kept. A checkpoint without head tensors loads the
encoder and warns (:class:`BackboneOnlyWarning`); a model built with ``aux=False`` ignores
auxiliary-head tensors.
"""

from __future__ import annotations

import re
import warnings

import torch
import torch.nn.functional as F

from .weights import (
    BackboneOnlyWarning,
    CheckpointMismatchError,
    LoadReport,
    Rule,
    _packed,
    adopt_class_names,
    apply_rules,
    read_state_dict,
)

__all__ = ["SETR_LAYOUTS", "detect_setr_layout", "load_setr_weights"]

SETR_LAYOUTS = ("native", "mmseg", "timm")

_BLOCK_NAMES = {  # native block sub-module -> (mmseg, timm) names
    "norm1": ("ln1", "norm1"),
    "norm2": ("ln2", "norm2"),
    "attn.proj": ("attn.attn.out_proj", "attn.proj"),
    "mlp.fc1": ("ffn.layers.0.0", "mlp.fc1"),
    "mlp.fc2": ("ffn.layers.1", "mlp.fc2"),
}
_IGNORABLE = {"mmseg": ("backbone.ln1.",), "timm": ("norm.", "head.", "fc_norm.", "pre_logits.")}


def detect_setr_layout(keys) -> str:
    """"native", "mmseg" or "timm" from a set of state-dict keys; ValueError naming a few keys otherwise."""
    keys = list(keys)
    if any(k.startswith("encoder.blocks.") for k in keys):
        return "native"
    if any(k.startswith("backbone.layers.") for k in keys):
        return "mmseg"
    if any(k.startswith("blocks.") and ".attn.qkv." in k for k in keys):
        return "timm"
    raise ValueError(f"cannot tell the SETR checkpoint's layout (expected native, mmseg or timm ViT keys); "
                     f"first keys: {keys[:5]}")


def _head_source(native: str, model) -> str:
    """mmseg name of a neck / head / auxiliary-head tensor."""
    name = re.sub(r"^aux_heads\.", "auxiliary_head.", native)
    name = re.sub(r"^neck\.(channel_proj|feat_extract)\.", r"neck.mla.\1.", name)
    if model.config.decoder != "mla":  # SETRUPHead: up_convs.{j} is Sequential(ConvModule, Upsample)
        name = re.sub(r"\.up_convs\.(\d+)\.(conv|bn)\.", r".up_convs.\1.0.\2.", name)
    return name


def _rules(layout: str, model) -> list[Rule]:
    """Every tensor of ``model`` as it appears in ``layout``."""
    native_keys = list(model.state_dict().keys())
    if layout == "native":
        return [Rule((k,), (k,), decoder=not k.startswith("encoder."), optional=k.endswith("num_batches_tracked"))
                for k in native_keys]
    mm = layout == "mmseg"
    pre = "backbone." if mm else ""
    rules = [
        Rule(("encoder.patch_embed.weight",), (pre + ("patch_embed.projection.weight" if mm else "patch_embed.proj.weight"),)),
        Rule(("encoder.patch_embed.bias",), (pre + ("patch_embed.projection.bias" if mm else "patch_embed.proj.bias"),)),
        Rule(("encoder.cls_token",), (pre + "cls_token",)),
        Rule(("encoder.pos_embed",), (pre + "pos_embed",)),
    ]
    for i in range(model.config.depth):
        nat, src = f"encoder.blocks.{i}.", f"{pre}layers.{i}." if mm else f"blocks.{i}."
        qkv = [nat + "attn." + m for m in ("q", "k", "v")]
        for param in ("weight", "bias"):
            rules.append(_packed(qkv, src + (f"attn.attn.in_proj_{param}" if mm else f"attn.qkv.{param}"), param))
            for native, names in _BLOCK_NAMES.items():
                rules.append(Rule((f"{nat}{native}.{param}",), (f"{src}{names[0 if mm else 1]}.{param}",)))
    if mm:
        rules += [Rule((k,), (_head_source(k, model),), decoder=True, optional=k.endswith("num_batches_tracked"))
                  for k in native_keys if not k.startswith("encoder.")]
    return rules


def _resize_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, 1 + g*g, C) -> (1, 1 + grid*grid, C), the grid part resized bilinearly."""
    g = int(round((pos.shape[1] - 1) ** 0.5))
    if g * g != pos.shape[1] - 1 or g == grid:
        return pos
    body = pos[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2).float()
    body = F.interpolate(body, size=(grid, grid), mode="bilinear", align_corners=False)
    return torch.cat([pos[:, :1], body.flatten(2).transpose(1, 2).to(pos.dtype)], dim=1)


def load_setr_weights(model, source, strict: bool = True) -> LoadReport:
    """Load SETR weights of a supported layout (detected) into a :class:`segformer_fast.SETR`.

    Args:
        model: a ``segformer_fast.SETR`` (any backend: the state dicts are the same).
        source: a path (.safetensors, .bin, .pth), a state dict, or another SETR.
        strict: raise :class:`CheckpointMismatchError` on missing encoder tensors, missing head
            tensors of a checkpoint that has heads, unexpected keys or shape conflicts.
    Returns:
        A :class:`LoadReport` (its ``ln_eps`` is None: SETR uses one LayerNorm epsilon, 1e-6).

    Example:
        >>> model = segformer_fast.setr("pup", num_classes=150)
        >>> print(segformer_fast.load_setr_weights(model, "setr_vit-l_pup_8xb2-160k_ade20k-512x512.pth"))
    """
    from ..models.setr import SETR

    if not isinstance(model, SETR):
        raise TypeError(f"load_setr_weights needs a segformer_fast.SETR, got {type(model).__name__}")
    sd, metadata = read_state_dict(source)
    if not sd:
        raise ValueError("the checkpoint holds no tensors")
    layout = detect_setr_layout(sd.keys())
    target = model.state_dict()
    converted, missing, used, has_head = apply_rules(_rules(layout, model), sd)
    if "encoder.pos_embed" in converted:
        converted["encoder.pos_embed"] = _resize_pos_embed(converted["encoder.pos_embed"], model.config.grid_size)

    ignored, unexpected = [], []
    ignorable = _IGNORABLE.get(layout, ()) + (() if model.aux else ("auxiliary_head.", "aux_heads."))
    for k in sd:
        if k not in used:
            (ignored if k.startswith(ignorable) else unexpected).append(k)
    shapes = [f"{k}: checkpoint {tuple(t.shape)} vs model {tuple(target[k].shape)}"
              for k, t in converted.items() if tuple(t.shape) != tuple(target[k].shape)]
    if strict and (missing or unexpected or shapes):
        note = ""
        if any(".up_convs." in k for k in missing + unexpected):
            note = f"the model's decoder is {model.config.decoder!r}; is the checkpoint's head another kind?"
        raise CheckpointMismatchError(layout, missing, unexpected, shapes, note)

    loaded = 0
    with torch.no_grad():
        for k, t in converted.items():
            if tuple(t.shape) == tuple(target[k].shape):
                target[k].copy_(t.to(target[k].dtype))
                loaded += 1
    if has_head:
        adopt_class_names(model, source, metadata)
    else:
        warnings.warn(f"backbone-only checkpoint ({layout}): loaded {loaded} encoder tensors; the heads keep their "
                      "initialisation and need training", BackboneOnlyWarning, stacklevel=2)
    return LoadReport(layout, loaded, has_head, None, missing, unexpected, shapes, ignored)
