import json
import os

import pytest
import torch

import segformer_fast.train.checkpoint as ckpt
from segformer_fast.train.checkpoint import (CheckpointError, capture_rng, flatten_optimizer, read_checkpoint,
                                             restore_rng, unflatten_optimizer, write_checkpoint)


def _tensors(v):
    return {"model.w": torch.full((3, 4), float(v)), "model.b": torch.arange(5)}


def test_roundtrip_and_old_files_removed(tmp_path):
    write_checkpoint(str(tmp_path), 1, _tensors(1), {"config": {"a": 1}})
    write_checkpoint(str(tmp_path), 2, _tensors(2), {"config": {"a": 2}})
    tensors, meta = read_checkpoint(str(tmp_path))
    assert meta["step"] == 2 and meta["config"] == {"a": 2}
    assert torch.equal(tensors["model.w"], torch.full((3, 4), 2.0)) and torch.equal(tensors["model.b"], torch.arange(5))
    names = sorted(os.listdir(tmp_path))
    assert names == ["checkpoint-00000002.safetensors", "checkpoint.json", "manifest.json"]


def test_crash_while_writing_tensors_keeps_previous(tmp_path, monkeypatch):
    write_checkpoint(str(tmp_path), 1, _tensors(1), {})
    from safetensors.torch import save_file as real_save

    def dying_save(tensors, path, metadata=None):
        real_save(tensors, path, metadata=metadata)
        with open(path, "r+b") as f:  # half-written file, then the process "dies"
            f.truncate(os.path.getsize(path) // 2)
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.torch.save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(str(tmp_path), 2, _tensors(2), {})
    monkeypatch.undo()
    tensors, meta = read_checkpoint(str(tmp_path))
    assert meta["step"] == 1 and torch.equal(tensors["model.w"], torch.full((3, 4), 1.0))
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".sftmp-")]


def test_crash_between_tensors_and_json_keeps_previous(tmp_path, monkeypatch):
    write_checkpoint(str(tmp_path), 1, _tensors(1), {})

    real_write = ckpt.atomic_write_json

    def dying_json(path, obj, indent=1):
        if os.path.basename(path) == "checkpoint.json":
            raise KeyboardInterrupt
        real_write(path, obj, indent)

    monkeypatch.setattr(ckpt, "atomic_write_json", dying_json)
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(str(tmp_path), 2, _tensors(2), {})
    monkeypatch.undo()
    assert os.path.exists(tmp_path / "checkpoint-00000002.safetensors")  # orphan: not named by the JSON
    tensors, meta = read_checkpoint(str(tmp_path))
    assert meta["step"] == 1 and torch.equal(tensors["model.w"], torch.full((3, 4), 1.0))
    write_checkpoint(str(tmp_path), 3, _tensors(3), {})  # the next checkpoint clears the orphan (in the manifest)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-00000003.safetensors", "checkpoint.json", "manifest.json"]


def test_json_naming_foreign_tensors_is_rejected(tmp_path):
    write_checkpoint(str(tmp_path), 1, _tensors(1), {})
    with pytest.raises(CheckpointError, match="nothing to resume"):
        read_checkpoint(str(tmp_path / "empty"))
    meta = json.loads((tmp_path / "checkpoint.json").read_text())
    meta["checkpoint_id"] = "0" * 32
    (tmp_path / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not belong"):
        read_checkpoint(str(tmp_path))
    meta["tensors"] = "checkpoint-00000009.safetensors"
    (tmp_path / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(str(tmp_path))


def test_optimizer_flatten_roundtrip():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW([{"params": [model.weight], "lr": 0.1}, {"params": [model.bias], "weight_decay": 0.0}])
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    tensors, rest = flatten_optimizer(opt.state_dict())
    assert set(tensors) == {f"optim.state.{i}.{n}" for i in (0, 1) for n in ("step", "exp_avg", "exp_avg_sq")}
    rest = json.loads(json.dumps(rest))
    opt2 = torch.optim.AdamW([{"params": [model.weight], "lr": 0.5}, {"params": [model.bias]}])
    opt2.load_state_dict(unflatten_optimizer(tensors, rest))
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for pid in a["state"]:
        for name, value in a["state"][pid].items():
            assert torch.equal(value, b["state"][pid][name])


def test_rng_roundtrip():
    import random

    import numpy as np

    state = json.loads(json.dumps(capture_rng()))
    first = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng(state)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and (first[1] == again[1]).all() and first[2] == again[2]
