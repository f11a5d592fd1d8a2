"""Bad inputs end in one clear line: a ValueError/TypeError/FileNotFoundError naming the problem from the
Python API, ``segformer-fast <cmd>: error: ...`` and exit status 2 (no traceback) from the command line."""

import os
import subprocess
import sys

import pytest
import torch

import segformer_fast as sf
from segformer_fast.tools.cli import main

TINY_TRAIN = ["--crop", "64", "--steps", "2", "--synthetic-size", "64", "--synthetic-train", "4", "--synthetic-val",
              "2", "--batch", "1", "--workers", "0", "--threads", "1", "--no-progress"]


def _files(tmp_path):
    """Broken and mismatched weight files, made on demand."""
    torch.manual_seed(0)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    noise = tmp_path / "noise.pth"
    noise.write_bytes(bytes(range(256)) * 8)
    good = tmp_path / "b0-4classes.safetensors"
    sf.save_weights(sf.segformer("b0", num_classes=4), good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    bad_config = tmp_path / "bad-config"
    bad_config.mkdir()
    (bad_config / "config.json").write_text('{"model_type": "segformer",')
    return {"empty": str(empty), "noise": str(noise), "good": str(good), "truncated": str(truncated),
            "bad_config": str(bad_config), "typo": str(tmp_path / "segformer-b0-finetuned-ade-512-512-typo"),
            "tmp": str(tmp_path)}


class _Pickled:
    pass


def _api_cases():
    def batch_zero(f):
        sf.segformer("b0", num_classes=4).eval()(torch.zeros(0, 3, 64, 64))

    def meta_weights(f):
        sf.segformer("b0", num_classes=4).to("meta").eval()(torch.zeros(1, 3, 64, 64))

    def meta_images(f):
        sf.segformer("b0", num_classes=4).eval()(torch.zeros(1, 3, 64, 64, device="meta"))

    def typo_path(f):
        sf.from_pretrained(f["typo"])

    def typo_relative_path(f):
        sf.from_pretrained("./segformer-b0-typo")

    def empty_pth(f):
        sf.load_weights(sf.segformer("b0", num_classes=4), f["empty"])

    def noise_pth(f):
        sf.load_weights(sf.segformer("b0", num_classes=4), f["noise"])

    def pickled_object_pth(f):
        path = os.path.join(f["tmp"], "object.pth")
        torch.save({"w": torch.ones(2), "extra": _Pickled()}, path)
        sf.load_weights(sf.segformer("b0", num_classes=4), path)

    def truncated_safetensors(f):
        sf.from_pretrained(f["truncated"])

    def bad_json_config(f):
        sf.from_pretrained(f["bad_config"])

    def train_val_every_zero(f):
        from segformer_fast.train import TrainConfig, train

        train(TrainConfig(val_every=0, out=os.path.join(f["tmp"], "run")))

    return [
        ("batch_zero", batch_zero, ValueError, ["batch size 0"]),
        ("meta_weights", meta_weights, ValueError, ["meta device", "weights"]),
        ("meta_images", meta_images, ValueError, ["meta device", "images"]),
        ("typo_local_path", typo_path, FileNotFoundError, ["no such file or folder", "typo"]),
        ("typo_relative_path", typo_relative_path, FileNotFoundError, ["no such file or folder", "./segformer-b0-typo"]),
        ("empty_pth", empty_pth, ValueError, ["empty.pth", "empty"]),
        ("random_bytes_pth", noise_pth, ValueError, ["noise.pth", "not a PyTorch checkpoint"]),
        ("pickled_object_pth", pickled_object_pth, ValueError, ["object.pth", "_Pickled", "state_dict"]),
        ("truncated_safetensors", truncated_safetensors, ValueError, ["truncated.safetensors", "truncated"]),
        ("bad_json_config", bad_json_config, ValueError, ["config.json", "not valid JSON"]),
        ("train_val_every_zero", train_val_every_zero, ValueError, ["val_every", "--val-every", "0"]),
    ]


@pytest.mark.parametrize("name,call,error,fragments", _api_cases(), ids=[c[0] for c in _api_cases()])
def test_api_error_names_the_problem(tmp_path, name, call, error, fragments):
    files = _files(tmp_path)
    with pytest.raises(error) as info:
        call(files)
    message = str(info.value)
    assert len(message.splitlines()) == 1, message
    for fragment in fragments:
        assert fragment in message, message
    assert "weights_only" not in message  # torch's advice to unpickle arbitrary code never reaches the user


CLI_CASES = [
    ("train_val_every_zero", ["train", *TINY_TRAIN, "--val-every", "0", "--out", "{tmp}/run"], ["--val-every", "0"]),
    ("train_crop_negative", ["train", *TINY_TRAIN[2:], "--crop", "-32", "--out", "{tmp}/run"], ["--crop", "-32"]),
    ("train_resume_missing", ["train", "--resume", "{tmp}/no-such-run"], ["no-such-run", "nothing to resume"]),
    ("predict_scales_nan", ["predict", "x.png", "--out", "{tmp}/p", "--weights", "{good}", "--scales", "nan"],
     ["--scales", "nan"]),
    ("predict_missing_image", ["predict", "{tmp}/missing.png", "--out", "{tmp}/p", "--weights", "{good}"],
     ["missing.png"]),
    ("evaluate_empty_pth", ["evaluate", "--data", "synthetic", "--weights", "{empty}", "--model", "b0",
                            "--num-classes", "6"], ["empty.pth", "empty"]),
    ("evaluate_random_bytes_pth", ["evaluate", "--data", "synthetic", "--weights", "{noise}", "--model", "b0",
                                   "--num-classes", "6"], ["noise.pth", "not a PyTorch checkpoint"]),
    ("evaluate_truncated_safetensors", ["evaluate", "--data", "synthetic", "--weights", "{truncated}"],
     ["truncated.safetensors"]),
    ("evaluate_bad_json_config", ["evaluate", "--data", "synthetic", "--weights", "{bad_config}"],
     ["config.json", "not valid JSON"]),
    ("evaluate_typo_path", ["evaluate", "--data", "synthetic", "--weights", "{typo}"], ["no such file or folder"]),
    ("evaluate_wrong_class_count", ["evaluate", "--data", "synthetic", "--synthetic-val", "2", "--synthetic-size", "64",
                                    "--weights", "{good}", "--no-progress"], ["6 classes", "predicts 4"]),
]


@pytest.mark.parametrize("name,argv,fragments", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_error_is_one_line_without_traceback(tmp_path, capsys, name, argv, fragments):
    files = _files(tmp_path)
    argv = [a.format(**files) for a in argv]
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own errors (a bad --scales value)
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if not line.startswith(("usage:", " ")) and ": warning: " not in line]
    assert len(lines) == 1 and lines[0].startswith(f"segformer-fast {argv[0]}: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], err
    assert "weights_only" not in err


def test_cli_entry_point_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "segformer_fast.tools.cli", "train", *TINY_TRAIN, "--crop", "-32",
                           "--out", str(tmp_path / "run")], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if ": warning: " not in line]  # a loaded machine's warning
    assert lines == ["segformer-fast train: error: crop (--crop) must be a positive integer, got -32"]
