"""The models ``segformer-fast train``, ``predict`` and ``evaluate`` work with, by name.

Names: the SegFormer variants ("b0".."b5") and the SETR models of ``segformer-fast benchmark``
("setr-naive", "setr-pup", "setr-mla", and "-b16" for the ViT-B/16 encoder instead of ViT-L/16).
A built model is recorded as {"architecture": "segformer" | "setr", "config": its config as a dict,
"aux": SETR's auxiliary heads}, in each training checkpoint and in the metadata of the
``model.safetensors`` a run writes, so the tools rebuild it without being told what it is.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..configs import MEMORY_MODES, SEGFORMER_VARIANTS, SETR_MODELS, SegFormerConfig, SETRConfig, get_setr_config

__all__ = ["MODEL_NAMES", "is_setr", "memory_modes", "build_model", "model_record", "model_from_record",
           "classifier_names", "load_into", "load_native", "save_model", "load_model_file"]

MODEL_NAMES = tuple(sorted(SEGFORMER_VARIANTS)) + tuple(sorted(SETR_MODELS))


def is_setr(model_or_name) -> bool:
    """Whether a model name (see ``MODEL_NAMES``) or a built model is a SETR."""
    if isinstance(model_or_name, str):
        return model_or_name in SETR_MODELS
    from ..models.setr import SETR

    return isinstance(model_or_name, SETR)


def _check_name(name: str) -> None:
    if name not in SEGFORMER_VARIANTS and name not in SETR_MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")


def memory_modes(name: str) -> tuple[str, ...]:
    """The activation-memory modes the named model supports (all of ``configs.MemoryMode``, for SegFormer and SETR)."""
    _check_name(name)
    return MEMORY_MODES


def build_model(name: str, num_classes: int, backend: str | None = None, memory: str = "save",
                overrides: dict | None = None, img_size: int | None = None, id2label=None) -> nn.Module:
    """A randomly initialised model by name.

    Args:
        name: one of ``MODEL_NAMES``.
        num_classes: classifier outputs.
        backend: as in :func:`segformer_fast.segformer` (None: ``SEGFORMER_FAST_BACKEND`` or "auto").
        memory: activation-memory mode (see :func:`memory_modes`).
        overrides: config fields to change (``SegFormerConfig`` or ``SETRConfig`` ones).
        img_size: SETR only: the size its position embedding is made for, rounded up to a multiple
            of the patch size (default 512, the paper's); an ``img_size`` override wins.
        id2label: the class names for ``model.config.id2label`` ({id: name} or a list of names, e.g.
            the training dataset's ``class_names``); None: unnamed. An ``id2label`` override wins.
    Returns:
        A SegFormer or SETR in train mode.

    Example:
        >>> model = build_model("setr-mla", 6, overrides={"embed_dim": 32, "depth": 4, "num_heads": 2})
        >>> build_model("b0", 19, id2label=CITYSCAPES_CLASSES).config.id2label[0]
        'road'
    """
    from ..models.segformer import segformer
    from ..models.setr import setr

    _check_name(name)
    overrides = dict(overrides or {})
    if id2label is not None:
        overrides.setdefault("id2label", id2label)
    if not is_setr(name):
        return segformer(name, num_classes=num_classes, backend=backend, memory=memory, **overrides)
    decoder, variant = SETR_MODELS[name]
    patch = overrides.get("patch_size", get_setr_config(variant).patch_size)
    size = overrides.pop("img_size", -(-(img_size or 512) // patch) * patch)
    return setr(decoder, num_classes=num_classes, img_size=size, backend=backend, variant=variant, memory=memory,
                **overrides)


def model_record(model: nn.Module) -> dict:
    """{"architecture", "config", "aux"}: what :func:`model_from_record` needs to rebuild ``model``."""
    if is_setr(model):
        return {"architecture": "setr", "config": model.config.to_dict(), "aux": model.aux}
    return {"architecture": "segformer", "config": model.config.to_dict()}


def model_from_record(record: dict, backend: str | None = None) -> nn.Module:
    """A randomly initialised model as ``record`` (from :func:`model_record`) describes it."""
    from ..backends import default_backend
    from ..models.segformer import SegFormer
    from ..models.setr import SETR

    backend = default_backend() if backend is None else backend
    arch = record.get("architecture")
    if arch == "setr":
        return SETR(SETRConfig.from_dict(record["config"]), backend=backend, aux=record.get("aux", True))
    if arch == "segformer":
        return SegFormer(SegFormerConfig.from_dict(record["config"]), backend=backend)
    raise ValueError(f"unknown model architecture {arch!r} in a model record; expected 'segformer' or 'setr'")


def classifier_names(model: nn.Module) -> tuple[str, ...]:
    """Module names of the final 1x1 classifiers (SETR: main and auxiliary heads)."""
    if is_setr(model):
        return ("decode_head.conv_seg",) + tuple(f"aux_heads.{i}.conv_seg" for i in range(len(model.aux_heads)))
    return ("decoder.classifier",)


def load_into(model: nn.Module, source, strict: bool = True):
    """``load_weights`` for a SegFormer, ``load_setr_weights`` for a SETR; returns the LoadReport."""
    if is_setr(model):
        from ..io.setr_weights import load_setr_weights

        return load_setr_weights(model, source, strict=strict)
    from ..io.weights import load_weights

    return load_weights(model, source, strict=strict)


def load_native(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """``model.load_state_dict(state)``, with a mismatch reported as ``CheckpointMismatchError``."""
    from ..io.weights import CheckpointMismatchError

    target = model.state_dict()
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    shapes = [f"{k}: checkpoint {tuple(t.shape)} vs model {tuple(target[k].shape)}"
              for k, t in state.items() if k in target and tuple(t.shape) != tuple(target[k].shape)]
    if missing or unexpected or shapes:
        raise CheckpointMismatchError("native", missing, unexpected, shapes,
                                      f"the checkpoint does not fit the {model_record(model)['architecture']} "
                                      "its config describes")
    model.load_state_dict(state)


def save_model(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the model's weights, architecture and config to a .safetensors file, atomically
    (``save_weights``; :func:`load_model_file` and ``from_pretrained`` read it back)."""
    from ..io.weights import save_weights

    save_weights(model, path)


def load_model_file(path: str, num_classes: int | None = None, backend: str | None = None) -> nn.Module:
    """The model in a .safetensors written by :func:`save_model` / ``save_weights`` (SegFormer or SETR), in eval mode."""
    from ..io.hub import from_pretrained

    return from_pretrained(path, num_classes=num_classes, backend=backend)
