"""Training and prediction never delete or overwrite a file they did not write, unless told to."""

import os

import numpy as np
import pytest
import torch

import segformer_fast as sf
from segformer_fast.tools.cli import main
from segformer_fast.testing import tiny_train_config
from segformer_fast.train import predict_files, read_checkpoint, train, write_checkpoint
from segformer_fast.train.imageio import write_png


def _tiny(out, **kw):
    return tiny_train_config(out, **{**dict(synthetic_train=8, synthetic_val=2, batch=1, steps=2, val_every=2), **kw})


def test_train_into_an_existing_run_folder_refuses_without_overwrite(tmp_path):
    torch.set_num_threads(1)
    train(_tiny(tmp_path))
    before = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}
    with pytest.raises(FileExistsError) as info:
        train(_tiny(tmp_path, seed=1))
    message = str(info.value)
    for name in ("checkpoint.json", "metrics.json", "model.safetensors", "checkpoint-00000002.safetensors"):
        assert name in message
    assert "--overwrite" in message and "--resume" in message
    assert {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)} == before  # nothing touched


def test_train_overwrite_replaces_the_previous_run_but_no_user_file(tmp_path):
    torch.set_num_threads(1)
    train(_tiny(tmp_path, steps=3, val_every=3))
    mine = {"checkpoint-best.safetensors": b"user weights", "checkpoint-notes.txt": b"notes", "notes.md": b"md"}
    for name, data in mine.items():
        (tmp_path / name).write_bytes(data)
    train(_tiny(tmp_path, steps=2, seed=1), overwrite=True)
    names = set(os.listdir(tmp_path))
    assert "checkpoint-00000003.safetensors" not in names  # the previous run's checkpoint, pruned
    assert {"checkpoint-00000002.safetensors", "checkpoint.json", "manifest.json", "metrics.json",
            "model.safetensors"} <= names
    for name, data in mine.items():
        assert (tmp_path / name).read_bytes() == data
    assert read_checkpoint(str(tmp_path))[1]["config"]["seed"] == 1


def test_checkpoint_pruning_spares_files_the_run_did_not_write(tmp_path):
    user = tmp_path / "checkpoint-00000001-mine.safetensors"
    user.write_bytes(b"not ours")
    for step in (1, 2, 3):
        write_checkpoint(str(tmp_path), step, {"model.w": torch.full((2,), float(step))}, {})
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-00000001-mine.safetensors", "checkpoint-00000003.safetensors",
                                            "checkpoint.json", "manifest.json"]
    assert user.read_bytes() == b"not ours"


def test_cli_train_default_out_refuses_an_existing_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the default --out, runs/segformer, under the current folder
    os.makedirs("runs/segformer")
    with open("runs/segformer/model.safetensors", "wb") as f:
        f.write(b"an earlier run's model")
    rc = main(["train", "--synthetic-size", "64", "--crop", "64", "--steps", "1", "--workers", "0", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "model.safetensors" in err and "--overwrite" in err and "Traceback" not in err
    assert open("runs/segformer/model.safetensors", "rb").read() == b"an earlier run's model"


def _model_file(tmp_path):
    path = tmp_path / "model.safetensors"
    sf.save_weights(sf.segformer("b0", num_classes=3), path)
    return str(path)


def test_predict_refuses_to_overwrite_a_users_file(tmp_path, capsys):
    image = tmp_path / "cat.png"
    write_png(image, np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    users = tmp_path / "cat_label.png"
    users.write_bytes(b"my own hand-made label")
    argv = ["predict", str(image), "--out", str(tmp_path), "--weights", _model_file(tmp_path), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "cat_label.png" in err and "--overwrite" in err and "Traceback" not in err
    assert users.read_bytes() == b"my own hand-made label"
    assert not (tmp_path / "cat_color.png").exists()  # refused before writing anything
    assert main(argv + ["--overwrite"]) == 0
    assert users.read_bytes() != b"my own hand-made label" and (tmp_path / "cat_color.png").exists()


def test_predict_files_api_refuses_existing_outputs(tmp_path):
    image = tmp_path / "in" / "dog.png"
    write_png(image, np.zeros((64, 64, 3), np.uint8))
    model = sf.segformer("b0", num_classes=3).eval()
    out = tmp_path / "out"
    assert len(predict_files(model, [str(image)], str(out), progress=False)) == 4
    with pytest.raises(FileExistsError, match="dog_label.png"):
        predict_files(model, [str(image)], str(out), progress=False)
    assert len(predict_files(model, [str(image)], str(out), progress=False, overwrite=True)) == 4
