"""Training checkpoints: tensors in safetensors, everything else in a small JSON, both written atomically.

A checkpoint in folder D is the pair
  D/checkpoint-<step>.safetensors  model ("model.*"), optimizer ("optim.state.<param>.<name>") tensors
  D/checkpoint.json                step, config, scalars, optimizer param groups, scheduler and
                                   GradScaler state, RNG states of every rank, and the name and id of
                                   its safetensors file.
Both files go through a temp file + os.replace, the safetensors first and the JSON last. The JSON is
the commit: a checkpoint is valid only when the JSON names a safetensors file whose metadata carries
the same random id. The previous safetensors file is deleted only after the new JSON is in place, so
a crash at any point leaves the previous checkpoint loadable.

Only files this package wrote are deleted: D/manifest.json lists the checkpoint files written into
D (each name is added before its file is written), and pruning removes those, never another file
that happens to match ``checkpoint-*``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import uuid

import numpy as np
import torch

from ..utils.atomic import atomic_path, atomic_write_json

__all__ = ["CheckpointError", "write_checkpoint", "read_checkpoint", "read_checkpoint_meta", "read_manifest",
           "run_checkpoint_files", "latest_checkpoint", "flatten_optimizer",
           "unflatten_optimizer", "capture_rng", "restore_rng"]

JSON_NAME = "checkpoint.json"
MANIFEST_NAME = "manifest.json"
FORMAT = "segformer_fast.train/1"


class CheckpointError(RuntimeError):
    """A checkpoint folder holds no valid checkpoint."""


def read_manifest(directory: str) -> list[str]:
    """Names of the checkpoint files written into ``directory`` (by any run there) and not yet pruned."""
    path = os.path.join(directory, MANIFEST_NAME)
    try:
        with open(path) as f:
            names = json.load(f).get("checkpoint_files", [])
    except FileNotFoundError:
        return []
    except (ValueError, AttributeError) as exc:
        raise CheckpointError(f"{path!r} is not a valid manifest: {exc}") from None
    return [n for n in names if isinstance(n, str) and os.path.basename(n) == n]


def _committed_tensors(directory: str) -> str | None:
    """The safetensors file the folder's checkpoint JSON names, or None."""
    try:
        meta = read_checkpoint_meta(directory)
    except CheckpointError:
        return None
    name = meta.get("tensors")
    return name if isinstance(name, str) and os.path.basename(name) == name else None


def run_checkpoint_files(directory: str) -> list[str]:
    """The checkpoint files in ``directory`` that runs of this package wrote: the manifest's, and the one
    the checkpoint JSON names."""
    names = read_manifest(directory)
    committed = _committed_tensors(directory)
    return names + ([committed] if committed is not None and committed not in names else [])


def _write_manifest(directory: str, names: list[str]) -> None:
    atomic_write_json(os.path.join(directory, MANIFEST_NAME), {"format": FORMAT, "checkpoint_files": names})


def write_checkpoint(directory: str, step: int, tensors: dict[str, torch.Tensor], meta: dict) -> str:
    """Write tensors + meta as the checkpoint of ``directory`` (replacing the previous one). Returns the JSON path.

    The checkpoint files listed in the folder's manifest, other than the new one, are deleted once
    the new checkpoint is in place; no other file is.
    """
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    ident = uuid.uuid4().hex
    name = f"checkpoint-{step:08d}.safetensors"
    written = run_checkpoint_files(directory)  # a checkpoint written before manifests existed is ours too
    if name not in written:
        _write_manifest(directory, written + [name])  # before the file exists: a crash leaves it listed
    with atomic_path(os.path.join(directory, name), suffix=".safetensors") as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp,
                  metadata={"checkpoint_id": ident, "step": str(step)})
    record = {"format": FORMAT, "tensors": name, "checkpoint_id": ident, "step": step, **meta}
    path = os.path.join(directory, JSON_NAME)
    atomic_write_json(path, record)
    for old in written:
        if old != name:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(directory, old))
    _write_manifest(directory, [name])
    return path


def latest_checkpoint(directory: str) -> str | None:
    """The checkpoint JSON of ``directory``, or None when there is none."""
    path = os.path.join(directory, JSON_NAME)
    return path if os.path.isfile(path) else None


def read_checkpoint_meta(directory: str) -> dict:
    """The JSON half of the checkpoint in ``directory`` (step, config, ...), without reading its tensors."""
    if not os.path.isdir(directory):
        raise CheckpointError(f"no such folder {directory!r}: nothing to resume from")
    path = latest_checkpoint(directory)
    if path is None:
        raise CheckpointError(f"no {JSON_NAME} in {directory!r}: nothing to resume from")
    try:
        with open(path) as f:
            meta = json.load(f)
    except ValueError as exc:
        raise CheckpointError(f"{path!r} is not valid JSON ({exc}): the checkpoint is damaged") from None
    kind = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
    if kind != FORMAT:
        raise CheckpointError(f"{path!r} is not a segformer_fast training checkpoint (format {kind!r})")
    return meta


def read_checkpoint(directory: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) of the checkpoint in ``directory``; CheckpointError when it is missing or inconsistent."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    meta = read_checkpoint_meta(directory)
    path = latest_checkpoint(directory)
    tensor_path = os.path.join(directory, meta["tensors"])
    if not os.path.isfile(tensor_path):
        raise CheckpointError(f"{path!r} names {meta['tensors']!r}, which does not exist")
    try:
        with safe_open(tensor_path, framework="pt") as f:
            ident = (f.metadata() or {}).get("checkpoint_id")
        if ident != meta["checkpoint_id"]:
            raise CheckpointError(f"{tensor_path!r} does not belong to {path!r} (id {ident} vs {meta['checkpoint_id']})")
        return load_file(tensor_path), meta
    except (OSError, ValueError, SafetensorError) as exc:
        raise CheckpointError(f"cannot read {tensor_path!r}: {exc} (truncated or damaged)") from None


def flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state_dict -> (tensors "optim.state.<param>.<name>", JSON-able rest)."""
    tensors, scalars = {}, {}
    for pid, state in state_dict["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.state.{pid}.{name}"] = value
            else:
                scalars.setdefault(str(pid), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    """Inverse of :func:`flatten_optimizer`."""
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim.state."):
            pid, name = key[len("optim.state."):].split(".", 1)
            state.setdefault(int(pid), {})[name] = value
    for pid, values in rest["scalars"].items():
        state.setdefault(int(pid), {}).update(values)
    groups = []
    for g in rest["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy())


def capture_rng() -> dict:
    """This process's torch, CUDA, numpy and Python RNG states, JSON-able."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    return {
        "torch": _b64(torch.get_rng_state()),
        "cuda": [_b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "python": [version, list(internal), py_gauss],
    }


def restore_rng(state: dict) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(_unb64(state["torch"]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, py_gauss = state["python"]
    random.setstate((version, tuple(internal), py_gauss))
