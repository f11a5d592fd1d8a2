"""``from_pretrained``: build a SegFormer from a Hugging Face-format directory, a hub id or our own file."""

from __future__ import annotations

import json
import os
import re

from ..configs import SEGFORMER_VARIANTS, SegFormerConfig, check_id2label

__all__ = ["from_pretrained", "config_from_hf", "hf_id2label"]

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def hf_id2label(hf: dict, num_classes: int) -> dict[int, str] | None:
    """The class names of a Hugging Face ``config.json`` dict, when they name ``num_classes`` classes.

    None when the config has none, when they are transformers' placeholders ("LABEL_0", ...), or when
    their count differs from ``num_classes`` (e.g. a checkpoint loaded with a new head size).
    """
    labels = hf.get("id2label")
    if not isinstance(labels, dict) or len(labels) != num_classes:
        return None
    try:
        names = check_id2label(labels, num_classes, "config.json")
    except ValueError as exc:
        raise ValueError(f"the Hugging Face config's id2label is unusable: {exc}") from None
    if all(name == f"LABEL_{k}" for k, name in names.items()):
        return None
    return names


def config_from_hf(hf: dict, num_classes: int | None = None) -> SegFormerConfig:
    """A SegFormerConfig from a Hugging Face ``config.json`` dict (SegformerConfig fields).

    Its ``id2label`` names become the config's (see :func:`hf_id2label`).
    """
    if hf.get("model_type", "segformer") != "segformer":
        raise ValueError(f"config.json describes a {hf.get('model_type')!r} model, not a segformer")
    if num_classes is None:
        labels = hf.get("id2label")
        num_classes = len(labels) if labels else int(hf.get("num_labels", 150))
    fields = dict(
        hidden_sizes=hf.get("hidden_sizes", (32, 64, 160, 256)),
        depths=hf.get("depths", (2, 2, 2, 2)),
        num_heads=hf.get("num_attention_heads", (1, 2, 5, 8)),
        sr_ratios=hf.get("sr_ratios", (8, 4, 2, 1)),
        patch_sizes=hf.get("patch_sizes", (7, 3, 3, 3)),
        strides=hf.get("strides", (4, 2, 2, 2)),
        mlp_ratios=hf.get("mlp_ratios", (4, 4, 4, 4)),
        decoder_dim=hf.get("decoder_hidden_size", 256),
        in_channels=hf.get("num_channels", 3),
        drop_path_rate=hf.get("drop_path_rate", 0.1),
        attn_drop=hf.get("attention_probs_dropout_prob", 0.0),
        proj_drop=hf.get("hidden_dropout_prob", 0.0),
        decoder_dropout=hf.get("classifier_dropout_prob", 0.1),
        num_classes=num_classes,
        id2label=hf_id2label(hf, num_classes),
    )
    name = "custom"
    for key, known in SEGFORMER_VARIANTS.items():
        if tuple(fields["hidden_sizes"]) == known.hidden_sizes and tuple(fields["depths"]) == known.depths:
            name = key
    return SegFormerConfig(name=name).replace(**fields)


def _json_loads(text: str, what: str):
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{what} is not valid JSON: {exc}") from None


def _read_json(path: str) -> dict:
    """A JSON object from a file; ValueError naming the file when it is not one."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        value = json.loads(data)
    except ValueError as exc:
        raise ValueError(f"{path!r} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path!r} holds a JSON {type(value).__name__}, expected an object")
    return value


def _weight_files(directory: str) -> list[str]:
    for name in _WEIGHT_FILES:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return [path]
    for name in _INDEX_FILES:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            index = _read_json(path)
            if not isinstance(index.get("weight_map"), dict):
                raise ValueError(f"{path!r} has no \"weight_map\" object: not a weights index")
            shards = sorted(set(index["weight_map"].values()))
            return [os.path.join(directory, s) for s in shards]
    raise FileNotFoundError(f"no weights in {directory!r}: expected one of {_WEIGHT_FILES + _INDEX_FILES}")


def from_pretrained(name_or_path: str | os.PathLike, num_classes: int | None = None, backend: str | None = None,
                    strict: bool = True, **overrides):
    """A SegFormer (or a SETR saved by ``save_weights``) with pretrained weights.

    Args:
        name_or_path: a local Hugging Face-format directory (config.json + model.safetensors /
            pytorch_model.bin, sharded or not), a ``segformer-fast train`` output folder (its latest
            checkpoint, else its model.safetensors, as ``--weights`` reads it), a .safetensors file
            written by ``save_weights``, or a hub id such as
            "nvidia/segformer-b0-finetuned-ade-512-512" (downloaded with huggingface_hub when the
            network allows).
        num_classes: override the number of classes (e.g. for a backbone-only checkpoint); a head
            whose size then differs is a shape conflict (use strict=False to leave it initialised),
            and class names that no longer fit are dropped.
        backend: as in :func:`segformer_fast.segformer`.
        **overrides: SegFormerConfig fields to change (e.g. drop_path_rate, or id2label to rename the classes).
    Returns:
        A SegFormer (a SETR for a file whose metadata says so) in eval mode. Its class names, when
        the source has them (a Hugging Face ``config.json``'s ``id2label``, the config ``save_weights``
        or training recorded), are ``model.config.id2label``.

    Example:
        >>> model = segformer_fast.from_pretrained("./segformer-b0-finetuned-ade-512-512")
    """
    from ..models.segformer import segformer
    from .weights import load_weights, read_state_dict

    path = os.fspath(name_or_path)
    if os.path.isfile(path):
        _, metadata = read_state_dict(path)
        if "config" not in metadata:
            raise ValueError(f"{path!r} carries no model config; build the model with segformer() and use load_weights")
        if metadata.get("architecture") == "setr":
            return _setr_from_file(path, metadata, num_classes, backend, strict, overrides)
        cfg = SegFormerConfig.from_dict(_json_loads(metadata["config"], f"the config in {path!r}"))
        if num_classes is not None:
            cfg = cfg.replace(num_classes=num_classes)
        files = [path]
    elif _is_train_output(path):
        return _from_train_output(path, num_classes, backend, overrides)
    else:
        if not os.path.isdir(path):
            path = _download(path)
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"no config.json in {path!r}: expected a Hugging Face model folder "
                                    "(config.json + model.safetensors or pytorch_model.bin)")
        cfg = config_from_hf(_read_json(config_path), num_classes)
        files = _weight_files(path)
    model = segformer(cfg, num_classes=cfg.num_classes, backend=backend, **overrides)
    if len(files) == 1:
        load_weights(model, files[0], strict=strict)
    else:
        merged = {}
        for f in files:
            merged.update(read_state_dict(f)[0])
        load_weights(model, merged, strict=strict)
    return model.eval()


def _is_train_output(path: str) -> bool:
    """A folder ``segformer-fast train --out`` wrote: a checkpoint JSON or model.safetensors, no config.json."""
    from ..train.checkpoint import JSON_NAME

    return os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")) and any(
        os.path.isfile(os.path.join(path, name)) for name in (JSON_NAME, "model.safetensors"))


def _from_train_output(path: str, num_classes, backend, overrides: dict):
    from ..train.inference import load_model

    if num_classes is not None or overrides:
        raise ValueError(f"{path!r} is a training output folder, which records its model; num_classes and config "
                         "overrides do not apply (build the model with segformer() and use load_weights to change it)")
    return load_model(path, backend=backend)


def _setr_from_file(path: str, metadata: dict, num_classes, backend, strict: bool, overrides: dict):
    from ..backends import default_backend
    from ..configs import SETRConfig
    from ..models.setr import SETR
    from .setr_weights import load_setr_weights

    cfg = SETRConfig.from_dict(_json_loads(metadata["config"], f"the config in {path!r}"))
    cfg = cfg.replace(**overrides, **({} if num_classes is None else {"num_classes": num_classes}))
    model = SETR(cfg, backend=default_backend() if backend is None else backend,
                 aux=json.loads(metadata.get("aux", "true")))
    load_setr_weights(model, path, strict=strict)
    return model.eval()


_HUB_ID = re.compile(r"^[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9])?(?:/[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9])?)?$")
_FILE_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".json")


def _download(repo_id: str) -> str:
    if not _HUB_ID.match(repo_id) or ".." in repo_id or "--" in repo_id or repo_id.endswith(_FILE_SUFFIXES):
        raise FileNotFoundError(f"no such file or folder: {repo_id!r} (and it is not a Hugging Face hub id)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise FileNotFoundError(
            f"{repo_id!r} is not a local file or directory, and huggingface_hub is not installed to fetch it "
            "(pip install huggingface_hub)"
        ) from exc
    try:
        return snapshot_download(repo_id, allow_patterns=["config.json", "*.safetensors", "*.bin", "*.json"])
    except Exception as exc:  # noqa: BLE001 - offline, unknown repo, gated, ...: one line, not a hub traceback
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FileNotFoundError(f"{repo_id!r} is not a local file or folder, and downloading it from the Hugging Face "
                                f"hub failed ({type(exc).__name__}: {reason})") from None
